//! Evaluating instruction-following models (book ch07 §7.7–7.8): judge-free figures of the
//! responses ([`metrics`]: exact match, ROUGE-L) and scoring by a judge model through an
//! OpenAI-compatible or Ollama API ([`judge`]).
pub mod judge;
pub use crate::metrics;
