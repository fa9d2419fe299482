//! Evaluation: judge-free figures of instruction responses ([`metrics`]: exact match, ROUGE-L,
//! book ch07 §7.7), scoring by a judge model through an OpenAI-compatible or Ollama API
//! ([`judge`], §7.8), pairwise comparisons by that judge ([`pairwise`]) and the leaderboard
//! they make ([`leaderboard`]: Bradley–Terry ratings with bootstrap intervals, online Elo, as
//! Chatbot Arena computes them), and the perplexity of a text ([`perplexity`], ch05 §5.1.2,
//! with Hugging Face's strided sliding window).
pub mod judge;
pub mod leaderboard;
pub mod loglik;
pub mod mmlu;
pub mod pairwise;
pub mod perplexity;
pub mod suite;
pub use crate::metrics;
