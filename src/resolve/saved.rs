//! What a fine-tuning run leaves for inference, and loading it: the base model it started from,
//! the LoRA adapters and tensors it trained, and (for instruction tuning) the prompt style it
//! learned. `LoadedLm::load` resolves a run folder through [`load_finetuned`], so `generate`,
//! `chat` and later the evaluations and the server load a fine-tuned model as they load any other.
use super::LoadedLm;
use crate::error::{read_text, LlmError};
use crate::models::trainable::Method;
use crate::nn::lora::LoraConfig;
use crate::prompt::{PromptStyle, Prompter};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::Device;

/// The file an instruction-tuning run writes beside its tensors (`finetuned.safetensors`).
pub const FINETUNED_RECORD: &str = "finetuned.json";
/// The trained tensors of an instruction-tuning run.
pub const FINETUNED_TENSORS: &str = "finetuned.safetensors";

/// What `finetuned.json` records: the base model and how to rebuild the fine-tuned one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FinetunedRecord {
    pub base_model: String,
    pub method: Method,
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    pub prompt_style: PromptStyle,
}

/// Loads a finished instruct run (`finetuned.json` + `finetuned.safetensors`) for inference:
/// the base model, the LoRA adapters it was trained with (merged into the weights), the trained
/// tensors, and the prompt style it learned (`LoadedLm::prompt_style`), so `llmlab generate` and
/// `llmlab chat` format prompts the way the model saw them in training.
pub fn load_finetuned(dir: &Path, device: Device) -> Result<LoadedLm> {
    let json = dir.join(FINETUNED_RECORD);
    let rec: FinetunedRecord =
        serde_json::from_str(&read_text(&json)?).map_err(|e| LlmError::BadFile {
            path: json.clone(),
            message: format!("not an llmlab instruct record ({e})"),
        })?;
    let file = dir.join(FINETUNED_TENSORS);
    if !file.is_file() {
        return Err(LlmError::BadFile {
            path: file,
            message: "missing: the run did not finish (run it again to resume)".into(),
        }
        .into());
    }
    let mut lm = LoadedLm::load(&rec.base_model, device)?;
    if let Some(l) = &rec.lora {
        // Adapters in every block: those the run did not train have B = 0 and merge to nothing.
        lm.add_lora(l);
    }
    crate::weights::load_tensors_into(&lm.vs, &file, &rec.base_model)?;
    lm.merge_lora();
    lm.prompt_style = Some(rec.prompt_style);
    lm.name = dir.display().to_string();
    Ok(lm)
}

/// For a model loaded from an instruct run: the prompter of the style it learned and the tokens
/// its responses end with (end-of-text, the padding its examples end with, end-of-turn).
pub fn run_prompter(lm: &LoadedLm) -> Option<(Prompter, Vec<i64>)> {
    let style = lm.prompt_style?;
    let prompter = Prompter::new(style, lm.chat.clone(), &lm.name).ok()?;
    Some((prompter, lm.response_stops()))
}
