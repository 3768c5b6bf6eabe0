//! cleave's OpenAI-compatible HTTP frontend.

pub mod chat_template;
