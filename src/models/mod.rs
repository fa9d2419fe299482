//! Model families: GPT (book ch04) and the Llama family (bonus material), [`AnyModel`] for
//! either, and [`CausalLm`], the interface generation drives. Models know nothing of files,
//! tokenizers or tasks: [`crate::weights`] loads their tensors and [`crate::resolve`] turns a
//! model name into a loaded model.
pub mod any;
pub mod causal;
pub mod gpt;
pub mod llama;
pub mod pooling;
pub mod trainable;

pub use any::AnyModel;
pub use causal::CausalLm;
pub use gpt::{generate_text_simple, param_stats, GptConfig, GptModel};
pub use llama::{LlamaConfig, LlamaModel};

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
