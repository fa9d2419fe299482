//! Resumable checkpoints (nanoGPT's `ckpt.pt` fields, llm.c's versioned header): model weights,
//! AdamW moments and the loop's position, each checkpoint a folder written under a temp name and
//! renamed into place, then `latest` updated atomically. A kill at any moment leaves either the
//! previous or the new checkpoint, never a half-written one.
//!
//! Format 2 adds `manifest.json`: the sha256 of every file of the folder, written last. On
//! resume a checkpoint whose files are missing, unreadable or differ from the manifest (a disk
//! that filled up, a copy cut short) is reported and the next older one is used
//! ([`restore_newest`]). Fine-tuning checkpoints ([`crate::finetune::checkpoint`]) use the same
//! manifest. Format 1 folders (no manifest) still resume.
use crate::error::{write_atomic, LlmError};
use crate::models::GptConfig;
use crate::resolve::source::{save_model_folder, WEIGHTS_FILE};
use crate::train::optim::AdamW;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::nn::VarStore;

/// The format this llmlab writes.
pub const FORMAT_VERSION: u32 = 2;
/// The formats it reads: 1 (before manifests) and 2.
pub const READS_FORMATS: std::ops::RangeInclusive<u32> = 1..=FORMAT_VERSION;
/// The checksums of a checkpoint folder's files.
pub const MANIFEST: &str = "manifest.json";
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
    write_manifest(&tmp)?;
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

/// The optimizer steps of a run's newest checkpoint, if it has one.
pub fn latest_step(run: &Path) -> Result<Option<usize>> {
    latest(run)?
        .map(|dir| Ok(parse_state(&dir.join(STATE_FILE))?.step))
        .transpose()
}

fn parse_state(path: &Path) -> Result<TrainState> {
    let text = crate::error::read_text(path)?;
    Ok(
        serde_json::from_str(&text).map_err(|e| LlmError::Checkpoint {
            path: path.to_path_buf(),
            message: format!("unreadable state ({e})"),
        })?,
    )
}

/// Reads a checkpoint's state and checks it against the run's model config.
pub fn read_state(dir: &Path, expected: &GptConfig) -> Result<TrainState> {
    let path = dir.join(STATE_FILE);
    let state = parse_state(&path)?;
    if !READS_FORMATS.contains(&state.format_version) {
        return Err(LlmError::Checkpoint {
            path,
            message: format!(
                "format version {} (this llmlab reads {} to {})",
                state.format_version,
                READS_FORMATS.start(),
                READS_FORMATS.end()
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

/// A run's checkpoint folders, newest first: the one `latest` names, then the other
/// `step_*` folders by step, descending.
pub fn candidates(run: &Path) -> Result<Vec<PathBuf>> {
    let root = run.join("checkpoints");
    let mut steps: Vec<PathBuf> = match std::fs::read_dir(&root) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_dir()
                    && p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("step_"))
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    steps.sort();
    steps.reverse();
    let first = match latest(run) {
        Ok(d) => d,
        Err(_) if !steps.is_empty() => None, // a dangling pointer: fall back to the folders
        Err(e) => return Err(e),
    };
    if let Some(d) = first {
        steps.retain(|p| p != &d);
        steps.insert(0, d);
    }
    Ok(steps)
}

/// Resumes from the newest checkpoint that verifies against its manifest and loads; each one
/// skipped is reported through `log` with the reason. `None` when the run has no checkpoint; an
/// error (the newest one's) when none of them loads.
pub fn restore_newest(
    run: &Path,
    expected: &GptConfig,
    vs: &VarStore,
    opt: &mut AdamW,
    log: &mut dyn FnMut(&str),
) -> Result<Option<(PathBuf, TrainState)>> {
    newest_usable(&candidates(run)?, log, |dir| {
        verify_manifest(dir)?;
        let state = read_state(dir, expected)?;
        restore(dir, vs, opt, &state)?;
        Ok((dir.to_path_buf(), state))
    })
}

/// The first of `dirs` (newest first) that `load` loads; each one that fails is reported
/// through `log` with its error. `None` when `dirs` is empty; when none loads, the newest one's
/// error, with a hint to start over.
pub fn newest_usable<T>(
    dirs: &[PathBuf],
    log: &mut dyn FnMut(&str),
    mut load: impl FnMut(&Path) -> Result<T>,
) -> Result<Option<T>> {
    let mut first_err: Option<anyhow::Error> = None;
    for dir in dirs {
        match load(dir) {
            Ok(t) => return Ok(Some(t)),
            Err(e) => {
                log(&format!(
                    "checkpoint {} is unusable ({e:#}); trying the previous one",
                    dir.display()
                ));
                first_err.get_or_insert(e);
            }
        }
    }
    match (first_err, dirs.first()) {
        (Some(e), Some(newest)) => Err(e.context(format!(
            "no usable checkpoint in {}; pass --restart to start over",
            newest.parent().unwrap_or(newest).display()
        ))),
        _ => Ok(None),
    }
}

/// Writes `manifest.json` into a checkpoint folder: the size and sha256 of every other file.
/// Call it last, before the folder is renamed into place.
pub fn write_manifest(dir: &Path) -> Result<()> {
    let mut files = std::collections::BTreeMap::new();
    let rd = std::fs::read_dir(dir).map_err(|source| LlmError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if !p.is_file() || name == MANIFEST {
            continue;
        }
        let sha = crate::data::registry::sha256_file(&p)?;
        let bytes = p.metadata().map(|m| m.len()).unwrap_or(0);
        files.insert(name, serde_json::json!({"bytes": bytes, "sha256": sha}));
    }
    let doc = serde_json::json!({"format": FORMAT_VERSION, "files": files});
    write_atomic(
        &dir.join(MANIFEST),
        serde_json::to_string_pretty(&doc)?.as_bytes(),
    )?;
    Ok(())
}

/// Checks a checkpoint folder against its `manifest.json`; the error names the file that is
/// missing or differs. A folder without a manifest (format 1) passes unchecked.
pub fn verify_manifest(dir: &Path) -> Result<(), LlmError> {
    let path = dir.join(MANIFEST);
    if !path.is_file() {
        return Ok(());
    }
    let bad = |message: String| LlmError::Checkpoint {
        path: dir.to_path_buf(),
        message,
    };
    let doc: serde_json::Value = serde_json::from_str(&crate::error::read_text(&path)?)
        .map_err(|e| bad(format!("unreadable {MANIFEST} ({e})")))?;
    let format = doc.get("format").and_then(|f| f.as_u64()).unwrap_or(0) as u32;
    if !READS_FORMATS.contains(&format) {
        return Err(bad(format!(
            "format version {format} (this llmlab reads {} to {})",
            READS_FORMATS.start(),
            READS_FORMATS.end()
        )));
    }
    let files = doc
        .get("files")
        .and_then(|f| f.as_object())
        .ok_or_else(|| bad(format!("{MANIFEST} lists no files")))?;
    for (name, want) in files {
        let p = dir.join(name);
        let bytes = want.get("bytes").and_then(|b| b.as_u64());
        let len = p.metadata().map_err(|e| bad(format!("{name}: {e}")))?.len();
        if bytes.is_some_and(|b| b != len) {
            return Err(bad(format!(
                "{name} has {len} bytes, the manifest says {}",
                bytes.unwrap_or(0)
            )));
        }
        let sha = crate::data::registry::sha256_file(&p)?;
        if want.get("sha256").and_then(|s| s.as_str()) != Some(sha.as_str()) {
            return Err(bad(format!(
                "{name} does not match its sha256 in {MANIFEST}"
            )));
        }
    }
    Ok(())
}
