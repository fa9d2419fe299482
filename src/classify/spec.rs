//! The classification experiment file (`task: classify`), validated before anything runs.
use super::data::{ClassifyDataSpec, Padding};
use super::model::{TokenPos, Trainable};
use crate::error::LlmError;
use crate::nn::lora::LoraConfig;
use crate::train::spec::FusedAdamW;
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

/// Random or pretrained starting weights (the book's `--weights`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weights {
    #[default]
    Pretrained,
    /// The same architecture re-initialised: N(0, 0.02) weights, zero biases, unit norms.
    Random,
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
    /// What trains besides the new head: head, last_layer, last_block, last_N_blocks, all, lora.
    #[serde(default = "default_trainable")]
    pub trainable: Trainable,
    /// Which token feeds the head: last, first, flexible, mean.
    #[serde(default)]
    pub token: TokenPos,
    /// `false` disables the causal attention mask.
    #[serde(default = "yes")]
    pub causal_mask: bool,
    /// LoRA settings (used with `trainable: lora`).
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
            token: TokenPos::Last,
            causal_mask: true,
            lora: LoraConfig::default(),
            ignore_index: default_ignore(),
            reuse_frozen: true,
        }
    }
}

/// The chapter-6 training settings (`train_classifier_simple`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyTrainSpec {
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    /// Evaluate every N optimizer steps.
    #[serde(default = "default_eval_freq")]
    pub eval_freq: usize,
    /// Batches per evaluation (loss and accuracy).
    #[serde(default = "default_eval_iter")]
    pub eval_iter: usize,
    #[serde(default = "one")]
    pub grad_accum_steps: usize,
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
    #[serde(default)]
    pub threads: Option<usize>,
    #[serde(default, skip_serializing_if = "FusedAdamW::is_auto")]
    pub fused_adamw: FusedAdamW,
}

fn default_epochs() -> usize {
    5
}
fn default_batch() -> usize {
    8
}
fn default_lr() -> f64 {
    5e-5
}
fn default_wd() -> f64 {
    0.1
}
fn default_eval_freq() -> usize {
    50
}
fn default_eval_iter() -> usize {
    5
}
fn one() -> usize {
    1
}

impl Default for ClassifyTrainSpec {
    fn default() -> Self {
        Self {
            epochs: default_epochs(),
            batch_size: default_batch(),
            lr: default_lr(),
            weight_decay: default_wd(),
            eval_freq: default_eval_freq(),
            eval_iter: default_eval_iter(),
            grad_accum_steps: 1,
            max_grad_norm: None,
            threads: None,
            fused_adamw: FusedAdamW::Auto,
        }
    }
}

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
        let ranges = crate::train::finetune::TrainRanges {
            epochs: t.epochs,
            batch_size: t.batch_size,
            lr: t.lr,
            weight_decay: t.weight_decay,
            eval_freq: t.eval_freq,
            eval_iter: t.eval_iter,
            grad_accum_steps: t.grad_accum_steps,
            max_grad_norm: t.max_grad_norm,
        };
        if let Some(m) = ranges.problem() {
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
