//! Model families: GPT (book ch04), the Llama family (bonus material), and resolving a model
//! spec to weights.
pub mod gpt;
pub mod llama;
pub mod lm;
pub mod loader;

pub use gpt::{generate_text_simple, param_stats, GptConfig, GptModel};
pub use llama::{LlamaConfig, LlamaModel};
pub use lm::{InferenceDtype, LmSpec, LoadedLm};
pub use loader::ModelSource;

/// The YAML text of a built-in preset (`(name, text)` pairs compiled in from `configs/models/`),
/// or an error listing the names.
pub(crate) fn preset_text(
    presets: &[(&str, &'static str)],
    what: &'static str,
    name: &str,
) -> Result<&'static str, crate::error::LlmError> {
    presets
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .ok_or_else(|| crate::error::LlmError::Unknown {
            what,
            name: name.into(),
            expected: presets.iter().map(|(n, _)| n.to_string()).collect(),
        })
}
