//! llmlab: *Build a Large Language Model (From Scratch)*, chapter by chapter, on libtorch.
//!
//! | book | module |
//! | --- | --- |
//! | ch02 working with text: tokenizers, sliding windows, loaders, data sets | [`data`] |
//! | ch03 attention: self-attention → causal → multi-head | [`nn::attention`] |
//! | ch04 GPT: LayerNorm, GELU, feed-forward, blocks, `GPTModel`, greedy generation | [`nn::layers`], [`models::gpt`] |
//! | ch05 pretraining: loss, the training loop, saving/loading weights | [`train`], [`weights`] |
//! | ch06 classification fine-tuning: spam data, new head, freezing strategies; appendix E LoRA | [`classify`], [`nn::lora`] |
//! | ch07 instruction fine-tuning: instruction data, prompt styles, the padded collate with masking, responses; judge-free metrics and the judge model; preference data from a teacher model (ch07/04); their chat client | [`instruct`], [`eval`], [`remote`] |
//! | evaluation: perplexity (Hugging Face's strided window), pairwise judging, Chatbot Arena leaderboards | [`eval`] |
//! | serving: an OpenAI-compatible API over a continuous-batching engine, a web chat page | [`serve`] |
//! | bonus: GPT → Llama (RMSNorm, RoPE, SwiGLU, GQA), GGUF and Hugging Face weights, SmolLM2, chat; weight-only 4-bit inference | [`models::llama`], [`weights::gguf`], [`weights::llama`], [`resolve`], [`chat`], [`request`], [`nn::quant`] |
//!
//! Benchmarks (tokens/s, MFU, weight bandwidth) in [`bench`]. Experiments: sweeps, trials and reports in [`experiment`]; TensorBoard event files (scalars,
//! text samples, the HParams dashboard's data) in [`tensorboard`].
//!
//! [`shim`] holds the FFI to a small C++ shim for libtorch functions tch does not bind (fused
//! AdamW, bf16 autocast). The command-line interface lives in [`cli`]; `main.rs` only parses and dispatches.
pub mod bench;
pub mod chat;
pub mod classify;
pub mod cli;
pub mod data;
pub mod device;
pub mod dist;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod finetune;
pub mod generate;
pub mod instruct;
pub mod metrics;
pub mod models;
pub mod nn;
pub mod plot;
pub mod prompt;
pub mod remote;
pub mod request;
pub mod resolve;
pub mod serve;
pub mod shim;
pub mod signal;
pub mod tensorboard;
pub mod train;
pub mod weights;

pub use error::LlmError;

#[cfg(test)]
mod architecture;
