//! cleave's OpenAI-compatible HTTP frontend: validates requests, renders chat templates, tokenizes, routes each
//! request to a decode worker (by cached prefix and load, through `cleave-router`) naming a prefill worker for it,
//! streams tokens back as server-sent events, and exposes Prometheus metrics.
//!
//! - [`openai`]: request and response bodies, validation, OpenAI's error JSON.
//! - [`chat_template`]: Hugging Face chat templates on minijinja.
//! - [`model`]: the served model's name, tokenizer, template and limits.
//! - [`workers`]: connections to the workers, the router, request multiplexing.
//! - [`server`]: the axum routes and [`serve`], which serves them.
//! - [`metrics`]: the Prometheus registry (docs/metrics.md).

pub mod chat_template;
pub mod metrics;
pub mod model;
pub mod openai;
pub mod server;
pub mod workers;

pub use server::{AppState, FrontendConfig, routes, serve};
