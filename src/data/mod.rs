//! Chapter 2 (text to tokens to tensors) and the data sets of later chapters.
pub mod dataset;
pub mod registry;
pub mod tokenizer;

pub use dataset::{DataLoader, GptDataset};
pub use registry::Registry;
pub use tokenizer::{BpeTokenizer, SimpleTokenizerV1, SimpleTokenizerV2};
