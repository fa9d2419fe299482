//! Preference tuning with DPO (book ch07/04, `dpo-from-scratch.ipynb`; Rafailov et al. 2023),
//! after instruction fine-tuning: the preference data, its tokenization and collate ([`data`]),
//! the loss and the reference model's log-probabilities ([`loss`]), the settings ([`spec`]) and
//! the training loop ([`train`]), on the shared fine-tuning layer ([`crate::finetune`]).
pub mod data;
pub mod loss;
pub mod spec;
pub mod train;

pub use spec::DpoSpec;
