//! Chat templates from `tokenizer_config.json`, rendered the way Hugging Face transformers renders them.
