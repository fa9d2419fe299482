//! The classification experiment file (`task: classify`), validated before anything runs.
use super::data::{ClassifyDataSpec, Padding};
use super::model::{TokenPos, Trainable};
use crate::error::LlmError;
use crate::finetune::{Method, TrainArgs, TrainDefaults};
pub use crate::models::trainable::Weights;
use crate::nn::lora::LoraConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifySpec {
    pub name: String,
    #[serde(default = "task_classify")]
    pub task: String,
    #[serde(default = "default_seed")]
    pub seed: u64,
    pub model: ClassifyModelSpec,
    #[serde(default)]
    pub data: ClassifyDataSpec,
    #[serde(default)]
    pub finetune: FinetuneSpec,
    #[serde(default)]
    pub train: ClassifyTrainSpec,
}

fn task_classify() -> String {
    "classify".into()
}
fn default_seed() -> u64 {
    123
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyModelSpec {
    /// A model spec as `llmlab generate --model` takes it (`smollm2-135m-instruct`, `gpt2:DIR`,
    /// a `.gguf` file, `hf:DIR`, a run folder, a preset).
    pub name: String,
    #[serde(default)]
    pub weights: Weights,
    /// Dropout rate of the model's blocks while fine-tuning (default: the model's own).
    #[serde(default)]
    pub dropout: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSpec {
    /// What trains besides the new head (the book's words; see [`crate::finetune::Trainable`]).
    #[serde(default = "default_trainable")]
    pub trainable: Trainable,
    /// `full` (default) or `lora`: how the blocks `trainable` names train.
    #[serde(default, skip_serializing_if = "is_full")]
    pub method: Method,
    /// Which token feeds the head: last, first, flexible, mean.
    #[serde(default)]
    pub token: TokenPos,
    /// `false` disables the causal attention mask.
    #[serde(default = "yes")]
    pub causal_mask: bool,
    /// LoRA settings (used with `trainable: lora` or `method: lora`).
    #[serde(default)]
    pub lora: LoraConfig,
    /// `ignore_index` of the cross-entropy (the book's option; -100 as PyTorch's default).
    #[serde(default = "default_ignore")]
    pub ignore_index: i64,
    /// Compute the frozen blocks once per example and reuse their outputs across epochs and
    /// trials (only when the frozen part has no dropout; the same results as the plain path).
    #[serde(default = "yes")]
    pub reuse_frozen: bool,
}

fn default_trainable() -> Trainable {
    Trainable::LastBlocks(1)
}
fn is_full(m: &Method) -> bool {
    *m == Method::Full
}
fn yes() -> bool {
    true
}
fn default_ignore() -> i64 {
    -100
}

impl Default for FinetuneSpec {
    fn default() -> Self {
        Self {
            trainable: default_trainable(),
            method: Method::Full,
            token: TokenPos::Last,
            causal_mask: true,
            lora: LoraConfig::default(),
            ignore_index: default_ignore(),
            reuse_frozen: true,
        }
    }
}

/// The chapter-6 defaults (`train_classifier_simple`): 5 epochs, evaluation every 50 steps.
#[derive(Debug, Clone, PartialEq)]
pub struct ChapterSix;

impl TrainDefaults for ChapterSix {
    const EPOCHS: usize = 5;
    const EVAL_FREQ: usize = 50;
}

/// `train:` of a classification run.
pub type ClassifyTrainSpec = TrainArgs<ChapterSix>;

impl ClassifySpec {
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, LlmError> {
        serde_yaml::from_str(text).map_err(|e| LlmError::Config {
            origin: origin.into(),
            message: e.to_string(),
        })
    }

    /// Range checks; the message starts with the key (the runner locates it in the file).
    pub fn validate(&self) -> Result<(), LlmError> {
        let err = |m: String| {
            Err(LlmError::Config {
                origin: String::new(),
                message: m,
            })
        };
        if self.task != "classify" {
            return err(format!("task: '{}': expected classify", self.task));
        }
        if let Some(p) = self.model.dropout {
            if !(0.0..1.0).contains(&p) {
                return err(format!("model.dropout: {p}: expected a value in [0, 1)"));
            }
        }
        if let Some(m) = self.data.check() {
            return err(m);
        }
        if let Some(m) = self.finetune.lora.check() {
            return err(m);
        }
        let t = &self.train;
        if let Some(m) = t.problem() {
            return err(m);
        }
        if self.data.padding == Padding::None && t.batch_size != 1 {
            return err(format!(
                "train.batch_size: {}: data.padding = none needs batch_size 1 (use train.grad_accum_steps for larger effective batches)",
                t.batch_size
            ));
        }
        Ok(())
    }
}
