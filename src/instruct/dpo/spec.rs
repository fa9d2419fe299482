//! The preference-tuning experiment file (`task: dpo`), validated before anything runs: the
//! instruct task's model, fine-tuning and generation settings, preference data, the `dpo:`
//! settings, and `train:` with the book's DPO values.
use super::data::PreferenceDataSpec;
use crate::error::LlmError;
use crate::finetune::{TrainArgs, TrainDefaults};
use crate::instruct::spec::{
    first_problem, GenerationSettings, InstructFinetuneSpec, InstructModelSpec,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoSpec {
    pub name: String,
    #[serde(default = "task_dpo")]
    pub task: String,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// The model to tune, usually a finished instruct run (`model: {run: runs/…}`).
    pub model: InstructModelSpec,
    #[serde(default)]
    pub data: PreferenceDataSpec,
    #[serde(default)]
    pub finetune: InstructFinetuneSpec,
    #[serde(default)]
    pub dpo: DpoSettings,
    #[serde(default)]
    pub train: DpoTrainSpec,
    #[serde(default)]
    pub generation: GenerationSettings,
}

fn task_dpo() -> String {
    "dpo".into()
}
fn default_seed() -> u64 {
    123
}

/// How a sequence's log-probability is formed from its response tokens' log-probabilities.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Logprobs {
    /// Their mean (the book's `compute_logprobs`).
    #[default]
    Mean,
    /// Their sum (TRL's `DPOTrainer` and the DPO paper).
    Sum,
}

/// Where the reference model's log-probabilities come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reference {
    /// Computed once before training for every training and validation pair (the frozen
    /// reference gives the same values at every step) and read at each step.
    #[default]
    Cached,
    /// A reference forward pass for every batch, as the book does (with LoRA: the same weights
    /// with the adapters off; with full fine-tuning: a second, frozen copy of the model).
    Live,
}

/// `dpo:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoSettings {
    /// β: how far the policy may move from the reference (the book: 0.1).
    #[serde(default = "default_beta")]
    pub beta: f64,
    #[serde(default)]
    pub logprobs: Logprobs,
    #[serde(default)]
    pub reference: Reference,
}

fn default_beta() -> f64 {
    0.1
}

impl Default for DpoSettings {
    fn default() -> Self {
        Self {
            beta: default_beta(),
            logprobs: Logprobs::Mean,
            reference: Reference::Cached,
        }
    }
}

/// The book's DPO settings (`dpo-from-scratch.ipynb`): one epoch, AdamW with lr 5e-6 and
/// weight decay 0.01, batches of 8, evaluation every 5 steps on 5 batches.
#[derive(Debug, Clone, PartialEq)]
pub struct BookDpo;

impl TrainDefaults for BookDpo {
    const EPOCHS: usize = 1;
    const EVAL_FREQ: usize = 5;
    const LR: f64 = 5e-6;
    const WEIGHT_DECAY: f64 = 0.01;
}

/// `train:` of a DPO run.
pub type DpoTrainSpec = TrainArgs<BookDpo>;

impl DpoSpec {
    /// Parses one trial's YAML (the runner reads experiment files, with sweeps, itself).
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, LlmError> {
        serde_yaml::from_str(text).map_err(|e| LlmError::Config {
            origin: origin.into(),
            message: e.to_string(),
        })
    }

    /// Range checks; the message starts with the key (the runner locates it in the file).
    pub fn validate(&self) -> Result<(), LlmError> {
        let beta = self.dpo.beta;
        first_problem([
            (self.task != "dpo").then(|| format!("task: '{}': expected dpo", self.task)),
            self.model.problem(),
            (!(beta.is_finite() && beta > 0.0))
                .then(|| format!("dpo.beta: {beta}: expected a number > 0")),
            self.data.check(),
            self.finetune.lora.check(),
            self.train.problem(),
            self.generation.problem(),
        ])
    }
}
