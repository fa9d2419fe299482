//! Model families: GPT (book ch04), and resolving a model spec to weights.
pub mod gpt;
pub mod loader;

pub use gpt::{generate_text_simple, param_stats, GptConfig, GptModel};
pub use loader::ModelSource;
