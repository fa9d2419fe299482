//! `llmlab serve`: an OpenAI-compatible HTTP server (axum + tokio) over the continuous-batching
//! [`engine`], with a web chat page.
pub mod engine;
pub mod sampler;
pub mod text;
