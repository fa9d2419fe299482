//! Instruction fine-tuning (book ch07): the instruction data and its split ([`data`]), prompt
//! styles ([`prompt`]), the padded-batch collate with instruction masking and packing
//! ([`collate`]), the experiment settings ([`spec`]) and the training loop that ends with a
//! response for every test entry ([`train`]); then preference tuning with DPO ([`dpo`]) and
//! making its preference data with a teacher model ([`make_preferences`]).
pub mod collate;
pub mod data;
pub mod dpo;
pub mod make_preferences;
pub mod spec;
pub mod train;

pub use crate::prompt;
pub use spec::InstructSpec;
