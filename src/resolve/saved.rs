//! The one artifact every fine-tuning run leaves for inference, and loading it.
//!
//! A run folder holds `saved_model.json` (a [`SavedRecord`]) beside `saved_model.safetensors`.
//! The record names the base model the run started from, which also gives the tokenizer and
//! chat template. It says what trained and how (the LoRA adapters, or the weights themselves),
//! and what kind of model the run made:
//! * a language model, with the prompt style an instruction-tuning run learned;
//! * a classifier, with its head (labels, the token it reads, padding).
//!
//! The tensors file holds only the trained tensors, or every tensor when the run trained
//! everything. [`load_saved`] rebuilds the model from these. [`LoadedLm::load`] resolves a run
//! folder through it, so `generate`, `chat`, `classify`, the evaluations and a server all load
//! a fine-tuned model the way they load any other.
//!
//! Run folders from before this format (`classifier.json` + `classifier.safetensors`,
//! `finetuned.json` + `finetuned.safetensors`) still load: their records are read as format-1
//! records.
use super::LoadedLm;
use crate::error::{read_text, write_atomic, LlmError};
use crate::models::pooling::TokenPos;
use crate::models::trainable::{Method, Trainable, Weights};
use crate::nn::lora::LoraConfig;
use crate::nn::Linear;
use crate::prompt::{PromptStyle, Prompter};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// The record of a saved fine-tuned model.
pub const SAVED_RECORD: &str = "saved_model.json";
/// Its tensors.
pub const SAVED_TENSORS: &str = "saved_model.safetensors";
/// The format version this llmlab writes; it reads 1 to this.
pub const SAVED_FORMAT: u32 = 1;
/// Older run folders: a classification run's record, an instruction-tuning run's record.
const LEGACY_CLASSIFIER: &str = "classifier.json";
const LEGACY_FINETUNED: &str = "finetuned.json";
/// The variable prefix of a classifier's new head.
pub const CLS_HEAD: &str = "cls_head";

/// What kind of model a run made, with what that kind needs beyond the base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SavedHead {
    /// A language model (instruction tuning): its own output head.
    CausalLm {
        /// The prompt style it learned (`None`: plain text).
        #[serde(default)]
        prompt_style: Option<PromptStyle>,
    },
    /// A classifier: a new `cls_head` on one token's final hidden state.
    Classifier(ClassifierHead),
}

/// A classifier's head and how its inputs were prepared in training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierHead {
    pub labels: Vec<String>,
    pub token: TokenPos,
    pub causal_mask: bool,
    /// Padded length used in training (`None`: unpadded).
    pub pad_to: Option<usize>,
    /// Longer inputs are truncated to this many tokens.
    pub max_length: usize,
    pub pad_id: i64,
}

/// `saved_model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedRecord {
    pub format: u32,
    /// The task that wrote it (`classify`, `instruct`).
    pub task: String,
    /// The model spec the run started from (as `--model` takes it).
    pub base_model: String,
    #[serde(default)]
    pub weights: Weights,
    pub trainable: Trainable,
    #[serde(default)]
    pub method: Method,
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    /// The tensors file, beside the record.
    pub tensors: String,
    /// The tensors file holds every weight (`true`) or only the trained ones.
    pub full: bool,
    #[serde(flatten)]
    pub head: SavedHead,
}

/// The record of a classification run before `saved_model.json`.
#[derive(Deserialize)]
struct LegacyClassifier {
    base_model: String,
    weights: Weights,
    labels: Vec<String>,
    token: TokenPos,
    causal_mask: bool,
    trainable: Trainable,
    #[serde(default)]
    method: Method,
    #[serde(default)]
    lora: Option<LoraConfig>,
    pad_to: Option<usize>,
    max_length: usize,
    pad_id: i64,
    full: bool,
}

/// The record of an instruction-tuning run before `saved_model.json`.
#[derive(Deserialize)]
struct LegacyFinetuned {
    base_model: String,
    method: Method,
    #[serde(default)]
    lora: Option<LoraConfig>,
    prompt_style: PromptStyle,
}

impl SavedRecord {
    /// Whether `dir` holds a saved model (of this format or an older one).
    pub fn is_in(dir: &Path) -> bool {
        [SAVED_RECORD, LEGACY_CLASSIFIER, LEGACY_FINETUNED]
            .iter()
            .any(|f| dir.join(f).is_file())
    }

    /// Reads the record of the run folder `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let parse_err = |path: &PathBuf, e: serde_json::Error| LlmError::BadFile {
            path: path.clone(),
            message: format!("not an llmlab saved-model record ({e})"),
        };
        let path = dir.join(SAVED_RECORD);
        if path.is_file() {
            let v: serde_json::Value =
                serde_json::from_str(&read_text(&path)?).map_err(|e| parse_err(&path, e))?;
            let format = v.get("format").and_then(|f| f.as_u64()).unwrap_or(0);
            if !(1..=SAVED_FORMAT as u64).contains(&format) {
                return Err(LlmError::BadFile {
                    path,
                    message: format!(
                        "format version {format} (this llmlab reads 1 to {SAVED_FORMAT})"
                    ),
                }
                .into());
            }
            return Ok(serde_json::from_value(v).map_err(|e| parse_err(&path, e))?);
        }
        let path = dir.join(LEGACY_CLASSIFIER);
        if path.is_file() {
            let r: LegacyClassifier =
                serde_json::from_str(&read_text(&path)?).map_err(|e| parse_err(&path, e))?;
            return Ok(Self {
                format: 1,
                task: "classify".into(),
                base_model: r.base_model,
                weights: r.weights,
                trainable: r.trainable,
                method: r.method,
                lora: r.lora,
                tensors: "classifier.safetensors".into(),
                full: r.full,
                head: SavedHead::Classifier(ClassifierHead {
                    labels: r.labels,
                    token: r.token,
                    causal_mask: r.causal_mask,
                    pad_to: r.pad_to,
                    max_length: r.max_length,
                    pad_id: r.pad_id,
                }),
            });
        }
        let path = dir.join(LEGACY_FINETUNED);
        if path.is_file() {
            let r: LegacyFinetuned =
                serde_json::from_str(&read_text(&path)?).map_err(|e| parse_err(&path, e))?;
            return Ok(Self {
                format: 1,
                task: "instruct".into(),
                base_model: r.base_model,
                weights: Weights::Pretrained,
                // These runs trained every block (adapters everywhere with LoRA).
                trainable: Trainable::All,
                method: r.method,
                lora: r.lora,
                tensors: "finetuned.safetensors".into(),
                full: r.method == Method::Full,
                head: SavedHead::CausalLm {
                    prompt_style: Some(r.prompt_style),
                },
            });
        }
        Err(LlmError::Io {
            path: dir.join(SAVED_RECORD),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not a fine-tuned model: a finished classify, instruct or dpo run folder holds this file",
            ),
        }
        .into())
    }

    /// The classifier head, or an error naming `dir` when the run made a language model.
    pub fn classifier(&self, dir: &Path) -> Result<&ClassifierHead> {
        match &self.head {
            SavedHead::Classifier(h) => Ok(h),
            SavedHead::CausalLm { .. } => Err(LlmError::Usage(format!(
                "{}: a language model (task: {}), not a classifier; `llmlab generate --model {0}` runs it",
                dir.display(),
                self.task
            ))
            .into()),
        }
    }
}

/// Writes the trained tensors (or every tensor, per `rec.full`) and then the record, each
/// atomically: a folder with a record has its tensors.
pub fn save(dir: &Path, rec: &SavedRecord, tensors: &[(String, Tensor)]) -> Result<()> {
    crate::weights::save_tensors(&crate::weights::to_cpu(tensors), &dir.join(&rec.tensors))?;
    write_atomic(
        &dir.join(SAVED_RECORD),
        serde_json::to_string_pretty(rec)?.as_bytes(),
    )?;
    Ok(())
}

/// A new classification head (`cls_head`, PyTorch's `nn.Linear` initialisation drawn from the
/// current libtorch seed) on `lm`'s final hidden states.
pub fn class_head(lm: &LoadedLm, num_classes: i64) -> Linear {
    crate::nn::layers::linear(
        lm.vs.root() / CLS_HEAD,
        lm.model.emb_dim(),
        num_classes,
        true,
    )
}

/// A saved model, loaded.
pub struct Saved {
    pub lm: LoadedLm,
    pub record: SavedRecord,
    /// The classifier head (a classifier's record only).
    pub head: Option<Linear>,
}

/// Loads a finished fine-tuning run for inference: the base model, the LoRA adapters in the
/// blocks the run adapted, the trained tensors. A language model gets its adapters merged into
/// the weights and the prompt style it learned ([`LoadedLm::prompt_style`]), so `llmlab
/// generate` and `llmlab chat` format prompts the way the model saw them in training; a
/// classifier gets its head and causal-mask setting, and keeps its adapters beside the weights.
pub fn load_saved(dir: &Path, device: Device) -> Result<Saved> {
    let record = SavedRecord::read(dir)?;
    let file = dir.join(&record.tensors);
    if !file.is_file() {
        return Err(LlmError::BadFile {
            path: file,
            message: "missing: the run did not finish (run it again to resume)".into(),
        }
        .into());
    }
    let mut lm = LoadedLm::load(&record.base_model, device)?;
    let head = match &record.head {
        SavedHead::Classifier(h) => {
            lm.model.set_causal(h.causal_mask);
            Some(class_head(&lm, h.labels.len() as i64))
        }
        SavedHead::CausalLm { .. } => None,
    };
    if let Some(l) = &record.lora {
        let blocks = record
            .trainable
            .adapted_blocks(record.method, lm.model.n_layers());
        lm.add_lora_to(l, blocks);
    }
    crate::weights::load_tensors_into(&lm.vs, &file, &record.base_model)?;
    match &record.head {
        SavedHead::CausalLm { prompt_style } => {
            lm.merge_lora();
            lm.prompt_style = *prompt_style;
        }
        SavedHead::Classifier(_) => {
            if let crate::models::AnyModel::Llama(m) = &mut lm.model {
                m.prepare_for_inference();
            }
        }
    }
    lm.name = dir.display().to_string();
    Ok(Saved { lm, record, head })
}

/// For a model loaded from an instruct run: the prompter of the style it learned and the tokens
/// its responses end with (end-of-text, the padding its examples end with, end-of-turn).
pub fn run_prompter(lm: &LoadedLm) -> Option<(Prompter, Vec<i64>)> {
    let style = lm.prompt_style?;
    let prompter = Prompter::new(style, lm.chat.clone(), &lm.name).ok()?;
    Some((prompter, lm.response_stops()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, file: &str, text: &str) {
        std::fs::write(dir.join(file), text).expect("write");
    }

    /// A classification run folder from before `saved_model.json` reads as the same record a
    /// new run writes, and round-trips through the new format.
    #[test]
    fn a_legacy_classifier_record_reads_as_the_new_one() -> Result<()> {
        let dir = tempfile::tempdir()?;
        write(
            dir.path(),
            LEGACY_CLASSIFIER,
            r#"{"base_model": "smollm2-135m-instruct", "weights": "pretrained",
                "labels": ["ham", "spam"], "token": "flexible", "causal_mask": true,
                "trainable": "last_2_blocks", "method": "lora",
                "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0,
                         "targets": ["attention", "feed_forward"], "scale": "alpha"},
                "pad_to": null, "max_length": 64, "pad_id": 2, "full": false}"#,
        );
        let rec = SavedRecord::read(dir.path())?;
        assert_eq!(rec.tensors, "classifier.safetensors");
        assert_eq!(rec.trainable, Trainable::LastBlocks(2));
        assert_eq!(rec.method, Method::Lora);
        assert_eq!(rec.lora.as_ref().map(|l| l.rank), Some(8));
        let h = rec.classifier(dir.path())?;
        assert_eq!(h.labels, ["ham", "spam"]);
        assert_eq!(
            (h.token, h.max_length, h.pad_id),
            (TokenPos::Flexible, 64, 2)
        );
        // The new format holds the same record.
        let text = serde_json::to_string_pretty(&rec)?;
        assert!(text.contains(r#""kind": "classifier""#), "{text}");
        write(dir.path(), SAVED_RECORD, &text);
        assert_eq!(SavedRecord::read(dir.path())?, rec);
        Ok(())
    }

    #[test]
    fn a_legacy_instruct_record_is_a_language_model_that_trained_every_block() -> Result<()> {
        let dir = tempfile::tempdir()?;
        write(
            dir.path(),
            LEGACY_FINETUNED,
            r#"{"base_model": "tiny.yaml", "method": "full", "prompt_style": "phi3"}"#,
        );
        let rec = SavedRecord::read(dir.path())?;
        assert_eq!((rec.trainable, rec.full), (Trainable::All, true));
        assert_eq!(rec.tensors, "finetuned.safetensors");
        assert_eq!(
            rec.head,
            SavedHead::CausalLm {
                prompt_style: Some(PromptStyle::Phi3)
            }
        );
        let err = rec
            .classifier(dir.path())
            .expect_err("a language model")
            .to_string();
        assert!(err.contains("not a classifier"), "{err}");
        Ok(())
    }

    #[test]
    fn a_newer_format_and_a_missing_record_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = SavedRecord::read(dir.path())
            .expect_err("no record")
            .to_string();
        assert!(err.contains(SAVED_RECORD), "{err}");
        write(dir.path(), SAVED_RECORD, r#"{"format": 99}"#);
        let err = SavedRecord::read(dir.path())
            .expect_err("format 99")
            .to_string();
        assert!(
            err.contains("format version 99 (this llmlab reads 1 to 1)"),
            "{err}"
        );
    }
}
