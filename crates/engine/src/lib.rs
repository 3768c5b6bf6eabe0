//! The cleave inference engine: Llama-family transformers (Llama 2/3, Mistral, Qwen2/3) over a backend interface,
//! with a paged KV cache, prefix caching and continuous batching.
//!
//! - [`presets::resolve_model`] turns a `--model` argument (a Hugging Face directory or a preset) into a
//!   [`config::ModelConfig`], a [`weights::WeightSource`] and a [`tokenizer::Tokenizer`].
//! - [`model::Model`] is the forward pass, written once over [`backend::Backend`]; [`backend::cpu::CpuBackend`]
//!   implements it on the CPU.
//! - [`engine::Engine`] owns a model, its KV cache and a [`scheduler::Scheduler`] whose KV blocks come from a
//!   [`cleave_kv::BlockPool`]; each `step` runs one continuous batch and samples with [`sampler::Sampler`].
//!
//! ```
//! use cleave_engine::{backend::cpu::CpuBackend, engine::{Engine, EngineConfig, RequestParams}, presets::resolve_model};
//! let mut engine = Engine::new(CpuBackend, resolve_model("tiny")?, EngineConfig::default())?;
//! let prompt = engine.tokenizer().encode("Hello")?;
//! let done = engine.generate(vec![(prompt, RequestParams { max_tokens: 4, ..Default::default() })])?;
//! assert_eq!(done[0].token_ids.len(), 4);
//! # Ok::<(), cleave_engine::Error>(())
//! ```
pub mod backend;
pub mod config;
pub mod engine;
pub mod error;
pub mod model;
pub mod presets;
pub mod rope;
pub mod sampler;
pub mod scheduler;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
