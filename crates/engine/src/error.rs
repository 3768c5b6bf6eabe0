//! The engine's error type. Every variant names what was wrong and where, so that a user who pointed cleave at a
//! broken model directory or sent a bad request can fix it without reading the source.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read (missing, unreadable).
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// config.json (or another JSON file of the model directory) is not what we understand.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    /// The model's architecture is not one cleave implements.
    #[error(
        "unsupported architecture {0:?}; cleave supports LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"
    )]
    UnsupportedArchitecture(String),
    /// A safetensors file is truncated, corrupt, or holds a tensor that does not fit the config.
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },
    /// A tensor the architecture needs is in none of the files.
    #[error("tensor {name:?} is missing from the model files in {dir}")]
    MissingTensor { name: String, dir: PathBuf },
    /// tokenizer.json failed to load or to encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A request that cannot be served as sent (empty prompt, prompt over the context, token id out of range...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The engine cannot take more work now (queue full). Callers retry later.
    #[error("engine overloaded: {0}")]
    Overloaded(String),
    /// Unknown model preset name.
    #[error(
        "unknown model {0:?}: not a directory and not a preset (presets: tiny, small, llama3-8b, llama3-70b, qwen2.5-7b)"
    )]
    UnknownModel(String),
    /// The backend failed (device error, out of memory).
    #[error("backend {backend}: {message}")]
    Backend { backend: &'static str, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
