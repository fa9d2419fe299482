//! Model families: GPT (book ch04).
pub mod gpt;

pub use gpt::{generate_text_simple, param_stats, GptConfig, GptModel};
