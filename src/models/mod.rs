//! Model families: GPT (book ch04), the Llama family (bonus material), and resolving a model
//! spec to weights.
pub mod gpt;
pub mod llama;
pub mod lm;
pub mod loader;

pub use gpt::{generate_text_simple, param_stats, GptConfig, GptModel};
pub use llama::{LlamaConfig, LlamaModel};
pub use lm::{LmSpec, LoadedLm};
pub use loader::ModelSource;
