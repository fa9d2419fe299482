//! Resumable checkpoints (nanoGPT's `ckpt.pt` fields, llm.c's versioned header): model weights,
//! AdamW moments and the loop's position, each checkpoint a folder written under a temp name and
//! renamed into place, then `latest` updated atomically. A kill at any moment leaves either the
//! previous or the new checkpoint, never a half-written one.
use crate::error::{write_atomic, LlmError};
use crate::models::loader::{save_model_folder, WEIGHTS_FILE};
use crate::models::GptConfig;
use crate::train::optim::AdamW;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::nn::VarStore;

pub const FORMAT_VERSION: u32 = 1;
const OPTIM_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "state.json";

/// Where the loop stands; with the seed this fixes every random number that follows (dropout
/// is reseeded from `(seed, step)` each step and the shuffle from `(seed, epoch)`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    pub format_version: u32,
    /// Optimizer steps done.
    pub step: usize,
    /// Epoch in progress (0-based) and the next optimizer-step group within it.
    pub epoch: usize,
    pub next_group: usize,
    pub tokens_seen: usize,
    pub seed: u64,
    /// Learning rate of the last step (the schedule is a function of `step`).
    pub lr: f64,
    pub model_config: GptConfig,
}

fn dir_name(step: usize) -> String {
    format!("step_{step:08}")
}

/// Writes a checkpoint under `run/checkpoints/` and keeps the newest `keep`.
pub fn save(
    run: &Path,
    vs: &VarStore,
    opt: &AdamW,
    state: &TrainState,
    keep: usize,
) -> Result<PathBuf> {
    let root = run.join("checkpoints");
    let name = dir_name(state.step);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|source| LlmError::Io {
            path: tmp.clone(),
            source,
        })?;
    }
    save_model_folder(vs, &state.model_config, &tmp)?;
    crate::weights::save_tensors(&opt.state_tensors(), &tmp.join(OPTIM_FILE))?;
    write_atomic(
        &tmp.join(STATE_FILE),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    let dst = root.join(&name);
    if dst.exists() {
        std::fs::remove_dir_all(&dst).map_err(|source| LlmError::Io {
            path: dst.clone(),
            source,
        })?;
    }
    std::fs::rename(&tmp, &dst).map_err(|source| LlmError::Io {
        path: dst.clone(),
        source,
    })?;
    write_atomic(&root.join("latest"), name.as_bytes())?;
    // Prune: keep the newest `keep` step folders (names sort by step).
    let mut all: Vec<PathBuf> = std::fs::read_dir(&root)
        .map_err(|source| LlmError::Io {
            path: root.clone(),
            source,
        })?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("step_"))
        })
        .collect();
    all.sort();
    let n = all.len();
    for old in all.into_iter().take(n.saturating_sub(keep)) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(dst)
}

/// The newest checkpoint of a run, if any.
pub fn latest(run: &Path) -> Result<Option<PathBuf>> {
    let pointer = run.join("checkpoints").join("latest");
    if !pointer.is_file() {
        return Ok(None);
    }
    let name = crate::error::read_text(&pointer)?;
    let dir = run.join("checkpoints").join(name.trim());
    if !dir.is_dir() {
        return Err(LlmError::Checkpoint {
            path: pointer,
            message: format!("points to {}, which does not exist", dir.display()),
        }
        .into());
    }
    Ok(Some(dir))
}

/// Reads a checkpoint's state and checks it against the run's model config.
pub fn read_state(dir: &Path, expected: &GptConfig) -> Result<TrainState> {
    let path = dir.join(STATE_FILE);
    let text = crate::error::read_text(&path)?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| LlmError::Checkpoint {
        path: path.clone(),
        message: format!("unreadable state ({e})"),
    })?;
    if state.format_version != FORMAT_VERSION {
        return Err(LlmError::Checkpoint {
            path,
            message: format!(
                "format version {} (this llmlab reads {FORMAT_VERSION})",
                state.format_version
            ),
        }
        .into());
    }
    if &state.model_config != expected {
        let a = serde_json::to_value(&state.model_config)?;
        let b = serde_json::to_value(expected)?;
        let diffs: Vec<String> = a
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| b.get(k.as_str()) != Some(v))
            .map(|(k, v)| {
                format!(
                    "{k}: checkpoint {v}, run {}",
                    b.get(k.as_str()).unwrap_or(&serde_json::Value::Null)
                )
            })
            .collect();
        return Err(LlmError::Checkpoint {
            path,
            message: format!("model config differs from the run's: {}", diffs.join("; ")),
        }
        .into());
    }
    Ok(state)
}

/// Loads weights and optimizer moments of a checkpoint into a model and its optimizer.
pub fn restore(dir: &Path, vs: &VarStore, opt: &mut AdamW, state: &TrainState) -> Result<()> {
    crate::weights::load_gpt_state_dict(vs, &dir.join(WEIGHTS_FILE))?;
    let path = dir.join(OPTIM_FILE);
    let t = crate::weights::read_safetensors(&path)?;
    opt.load_state_tensors(&t, state.step as i64)
        .map_err(|message| LlmError::Checkpoint { path, message })?;
    Ok(())
}
