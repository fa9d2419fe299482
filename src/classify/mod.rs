//! Classification fine-tuning (book ch06, appendix E): labelled-text data and its split
//! ([`data`]), the classifier with its layer-freezing strategies and LoRA ([`model`]), the
//! experiment settings ([`spec`]) and the training loop with frozen-prefix reuse ([`train`]).
pub mod data;
pub mod model;
pub mod spec;
pub mod train;

pub use model::{Classifier, TokenPos, Trainable};
pub use spec::ClassifySpec;
