//! The instruction fine-tuning experiment file (`task: instruct`), validated before anything runs.
use super::data::InstructDataSpec;
use crate::error::LlmError;
use crate::finetune::{TrainArgs, TrainDefaults, Trainable};
use crate::generate::GenerateSpec;
use crate::nn::lora::LoraConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstructSpec {
    pub name: String,
    #[serde(default = "task_instruct")]
    pub task: String,
    #[serde(default = "default_seed")]
    pub seed: u64,
    pub model: InstructModelSpec,
    #[serde(default)]
    pub data: InstructDataSpec,
    #[serde(default)]
    pub finetune: InstructFinetuneSpec,
    #[serde(default)]
    pub train: InstructTrainSpec,
    #[serde(default)]
    pub generation: GenerationSettings,
}

fn task_instruct() -> String {
    "instruct".into()
}
fn default_seed() -> u64 {
    123
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstructModelSpec {
    /// A model spec as `llmlab generate --model` takes it (`smollm2-135m-instruct`,
    /// `gpt2:DIR`, a `.gguf` file, `hf:DIR`, a run folder, a preset); `run:` is another name
    /// for it (a run folder to continue from, as DPO after instruction tuning).
    #[serde(alias = "run")]
    pub name: String,
    /// Dropout rate while fine-tuning (default: the model's own; the book uses 0.0).
    #[serde(default)]
    pub dropout: Option<f64>,
}

pub use crate::finetune::Method;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstructFinetuneSpec {
    /// What trains (default `all`; the book's words, see [`crate::finetune::Trainable`]); the
    /// language-model head is part of the last layer.
    #[serde(default = "all", skip_serializing_if = "is_all")]
    pub trainable: Trainable,
    /// `full` (every weight, the book's ch07) or `lora` (adapters, appendix E).
    #[serde(default)]
    pub method: Method,
    /// LoRA settings (used with `method: lora`).
    #[serde(default)]
    pub lora: LoraConfig,
}

impl Default for InstructFinetuneSpec {
    fn default() -> Self {
        Self {
            trainable: Trainable::All,
            method: Method::Full,
            lora: LoraConfig::default(),
        }
    }
}

fn all() -> Trainable {
    Trainable::All
}
fn is_all(t: &Trainable) -> bool {
    *t == Trainable::All
}

/// The chapter-7 defaults (`train_model_simple` with the book's values): 2 epochs, evaluation
/// every 5 steps.
#[derive(Debug, Clone, PartialEq)]
pub struct ChapterSeven;

impl TrainDefaults for ChapterSeven {
    const EPOCHS: usize = 2;
    const EVAL_FREQ: usize = 5;
}

/// `train:` of an instruction fine-tuning run.
pub type InstructTrainSpec = TrainArgs<ChapterSeven>;

/// How responses are generated (the epoch samples and the test responses).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSettings {
    /// The book: 256 for the test responses.
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: usize,
    /// 0: greedy (the book).
    #[serde(default)]
    pub temperature: f64,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Generate responses for the test split after training (`responses.json`).
    #[serde(default = "yes")]
    pub responses: bool,
}

fn default_new_tokens() -> usize {
    256
}
fn yes() -> bool {
    true
}

impl Default for GenerationSettings {
    fn default() -> Self {
        Self {
            max_new_tokens: default_new_tokens(),
            temperature: 0.0,
            top_k: None,
            top_p: None,
            responses: true,
        }
    }
}

/// The first of a spec's problems (messages starting with their key) as its validation error.
pub fn first_problem(problems: impl IntoIterator<Item = Option<String>>) -> Result<(), LlmError> {
    match problems.into_iter().flatten().next() {
        Some(message) => Err(LlmError::Config {
            origin: String::new(),
            message,
        }),
        None => Ok(()),
    }
}

impl InstructModelSpec {
    /// The first out-of-range value, as a message starting with its key.
    pub fn problem(&self) -> Option<String> {
        self.dropout
            .filter(|p| !(0.0..1.0).contains(p))
            .map(|p| format!("model.dropout: {p}: expected a value in [0, 1)"))
    }
}

impl GenerationSettings {
    /// The first out-of-range value, as a message starting with its key.
    pub fn problem(&self) -> Option<String> {
        if self.max_new_tokens == 0 {
            return Some("generation.max_new_tokens: 0: expected at least 1".into());
        }
        match self.to_spec(0, None, Vec::new()).validate() {
            Err(LlmError::Config { message, .. }) => Some(format!("generation.{message}")),
            _ => None,
        }
    }

    /// The generation spec with the model's stop ids.
    pub fn to_spec(&self, seed: u64, eos_id: Option<i64>, stop_ids: Vec<i64>) -> GenerateSpec {
        GenerateSpec {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: Some(seed),
            eos_id,
            stop_ids,
            use_cache: true,
        }
    }
}

impl InstructSpec {
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, LlmError> {
        serde_yaml::from_str(text).map_err(|e| LlmError::Config {
            origin: origin.into(),
            message: e.to_string(),
        })
    }

    /// Range checks; the message starts with the key (the runner locates it in the file).
    pub fn validate(&self) -> Result<(), LlmError> {
        first_problem([
            (self.task != "instruct").then(|| format!("task: '{}': expected instruct", self.task)),
            self.model.problem(),
            self.data.check(),
            self.finetune.lora.check(),
            self.train.problem(),
            self.generation.problem(),
        ])
    }
}
