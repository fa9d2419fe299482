//! Instruction fine-tuning (book ch07): the instruction data and its split ([`data`]), prompt
//! styles ([`prompt`]), the padded-batch collate with instruction masking and packing
//! ([`collate`]), the experiment settings ([`spec`]) and the training loop that ends with a
//! response for every test entry ([`train`]).
pub mod collate;
pub mod data;
pub mod make_preferences;
pub mod spec;
pub mod train;

pub use crate::prompt;
pub use spec::InstructSpec;
