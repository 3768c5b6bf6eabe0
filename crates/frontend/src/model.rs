//! The model as the frontend sees it: its API name, tokenizer, chat template and limits. No weights.

use std::path::Path;

use cleave_engine::presets::resolve_model_without_weights;
use cleave_engine::tokenizer::Tokenizer;

use crate::chat_template::ChatTemplate;
use crate::openai::ApiError;

pub struct ServedModel {
    /// The `model` field clients send.
    pub name: String,
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
    /// Tokens of prompt plus output the model takes.
    pub context_len: usize,
    pub vocab_size: usize,
}

impl ServedModel {
    /// Loads what the frontend needs of `model` (a Hugging Face directory or a preset); `name` is what clients call
    /// it (default: the argument itself). Models without a chat template get [`ChatTemplate::default_for_presets`].
    pub fn load(model: &str, name: Option<&str>) -> anyhow::Result<Self> {
        let resolved = resolve_model_without_weights(model)?;
        let dir = Path::new(model);
        let chat_template = if dir.is_dir() {
            ChatTemplate::from_model_dir(dir)?.unwrap_or_else(ChatTemplate::default_for_presets)
        } else {
            ChatTemplate::default_for_presets()
        };
        Ok(Self {
            name: name.unwrap_or(model).to_string(),
            tokenizer: resolved.tokenizer,
            chat_template,
            context_len: resolved.config.max_context,
            vocab_size: resolved.config.vocab_size,
        })
    }

    /// Token ids of `text`. `add_special_tokens`: let the tokenizer add BOS (completions); chat templates write
    /// their own, except that the byte tokenizer of presets has no textual BOS, so it always gets one.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ApiError> {
        let add = add_special_tokens || matches!(self.tokenizer, Tokenizer::Bytes);
        self.tokenizer
            .encode_with(text, add)
            .map_err(|e| ApiError::bad_param("prompt", format!("cannot tokenize the prompt: {e}")))
    }
}
