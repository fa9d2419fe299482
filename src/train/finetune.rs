//! What every fine-tuning task (`classify`, `instruct`) does around its training loop: the run
//! folder (`config.yaml` checked or written, `--restart`, a finished run reported from its
//! `metrics.jsonl`), checkpoints of the trained tensors with their AdamW moments (written
//! atomically: a temp folder renamed over `checkpoints/last`), and the metrics a resume keeps.
//! Checkpoints are written at every epoch end, on Ctrl-C/SIGTERM, and inside a long epoch every
//! [`set_checkpoint_minutes`] minutes of training, so a killed process (SIGKILL, a lost machine)
//! loses at most that much work.
use crate::error::{read_text, write_atomic, LlmError};
use crate::train::optim::AdamW;
use crate::train::trainer::truncate_jsonl;
use anyhow::Result;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tch::{Device, Tensor};

/// Minutes of training between checkpoints inside an epoch when nothing sets them.
pub const DEFAULT_CHECKPOINT_MINUTES: f64 = 30.0;

/// Milliseconds between timed checkpoints (0: only at epoch ends and on a stop signal).
static CHECKPOINT_MILLIS: AtomicU64 = AtomicU64::new(DEFAULT_CHECKPOINT_MINUTES as u64 * 60_000);

/// Sets how many minutes of training a fine-tuning run goes between checkpoints inside an
/// epoch (`llmlab run --checkpoint-minutes`); 0 (or anything not positive) turns timed
/// checkpoints off. Like the thread count, this is not part of a run's settings: a resume may
/// use another value.
pub fn set_checkpoint_minutes(minutes: f64) {
    let millis = if minutes.is_finite() && minutes > 0.0 {
        (minutes * 60_000.0).max(1.0) as u64
    } else {
        0
    };
    CHECKPOINT_MILLIS.store(millis, Ordering::Relaxed);
}

/// A run's training clock: the training time of this process added to what its checkpoint
/// carried over, and when the next timed checkpoint is due (see [`set_checkpoint_minutes`]).
pub struct CheckpointTimer {
    started: Instant,
    seconds_before: f64,
    since: Instant,
}

impl CheckpointTimer {
    /// Starts the clock of a run that had trained `seconds_before` seconds before this process.
    pub fn start(seconds_before: f64) -> Self {
        Self {
            started: Instant::now(),
            seconds_before,
            since: Instant::now(),
        }
    }

    /// Seconds of training over every process that ran this run.
    pub fn train_seconds(&self) -> f64 {
        self.seconds_before + self.started.elapsed().as_secs_f64()
    }

    /// True once the interval has passed since the start or the last [`Self::saved`].
    pub fn due(&self) -> bool {
        let millis = CHECKPOINT_MILLIS.load(Ordering::Relaxed);
        millis > 0 && self.since.elapsed() >= Duration::from_millis(millis)
    }

    /// A checkpoint was just written: the interval starts again.
    pub fn saved(&mut self) {
        self.since = Instant::now();
    }
}

/// Maps an I/O error to [`LlmError::Io`] naming `path`.
pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LlmError + '_ {
    move |source| LlmError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A run that finished before: its evaluation records and its final record.
pub struct Finished<E, F> {
    pub evals: Vec<E>,
    pub result: F,
}

/// Prepares `run_dir` for the run whose resolved settings are `resolved` (YAML): `restart`
/// clears its state; an existing `config.yaml` must hold the same settings (else a usage error
/// naming the folder), a missing one is written. Returns the earlier result when the run had
/// finished: the `metrics.jsonl` lines that parse as `E`, and the last one that parses as `F`.
pub fn open_run_dir<E: DeserializeOwned, F: DeserializeOwned>(
    run_dir: &Path,
    resolved: &str,
    restart: bool,
) -> Result<Option<Finished<E, F>>> {
    std::fs::create_dir_all(run_dir).map_err(io(run_dir))?;
    let config_path = run_dir.join("config.yaml");
    let status_path = run_dir.join("status.json");
    let metrics_path = run_dir.join("metrics.jsonl");
    if restart {
        for p in [&config_path, &status_path, &metrics_path] {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_dir_all(run_dir.join("checkpoints"));
    }
    if config_path.is_file() {
        if read_text(&config_path)? != resolved {
            return Err(LlmError::Usage(format!(
                "{} holds a run with a different config ({}); resume it with the same settings, pass --restart to start over, or choose another folder",
                run_dir.display(),
                config_path.display()
            ))
            .into());
        }
    } else {
        write_atomic(&config_path, resolved.as_bytes())?;
    }
    if !(status_path.is_file() && read_text(&status_path)?.contains("\"finished\"")) {
        return Ok(None);
    }
    let text = read_text(&metrics_path)?;
    let evals = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let result = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<F>(l).ok())
        .ok_or_else(|| LlmError::BadFile {
            path: metrics_path.clone(),
            message: "a finished run without its final record".into(),
        })?;
    Ok(Some(Finished { evals, result }))
}

/// On resume at `step`: keeps the evaluation records (`E`) up to it in `metrics.jsonl` and drops
/// a final record (`F`) written before the stop, which the resumed run writes again.
pub fn resume_metrics<E: DeserializeOwned, F: DeserializeOwned>(
    metrics_path: &Path,
    step: usize,
) -> Result<Vec<E>> {
    let kept: Vec<String> = truncate_jsonl(metrics_path, step)?
        .into_iter()
        .filter(|l| serde_json::from_str::<F>(l).is_err())
        .collect();
    let body: String = kept.iter().map(|l| format!("{l}\n")).collect();
    write_atomic(metrics_path, body.as_bytes())?;
    Ok(kept
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Saves the trained tensors, the optimizer moments and `state` (atomically: a temp folder
/// renamed over `checkpoints/last`).
pub fn save_checkpoint<S: Serialize>(
    run_dir: &Path,
    trained: &[(String, Tensor)],
    opt: &AdamW,
    state: &S,
) -> Result<()> {
    let ck = run_dir.join("checkpoints");
    std::fs::create_dir_all(&ck).map_err(io(&ck))?;
    let tmp = ck.join(".last.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let mut named: Vec<(String, Tensor)> = trained
        .iter()
        .map(|(n, t)| (format!("param.{n}"), t.detach().to_device(Device::Cpu)))
        .collect();
    named.extend(opt.state_tensors());
    Tensor::write_safetensors(&named, tmp.join("trainable.safetensors"))?;
    write_atomic(
        &tmp.join("state.json"),
        serde_json::to_string(&(state, opt.step))?.as_bytes(),
    )?;
    let last = ck.join("last");
    let old = ck.join(".last.old");
    let _ = std::fs::remove_dir_all(&old);
    if last.exists() {
        std::fs::rename(&last, &old).map_err(io(&last))?;
    }
    std::fs::rename(&tmp, &last).map_err(io(&last))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Restores what [`save_checkpoint`] wrote into `trained` and `opt`; `None` when there is no
/// checkpoint. A missing tensor or a shape mismatch is an error naming the checkpoint.
pub fn load_checkpoint<S: DeserializeOwned>(
    run_dir: &Path,
    trained: &[(String, Tensor)],
    opt: &mut AdamW,
) -> Result<Option<S>> {
    let dir = run_dir.join("checkpoints").join("last");
    if !dir.join("state.json").is_file() {
        return Ok(None);
    }
    let bad = |m: String| LlmError::Checkpoint {
        path: dir.clone(),
        message: m,
    };
    let (state, step): (S, i64) = serde_json::from_str(&read_text(&dir.join("state.json"))?)
        .map_err(|e| bad(e.to_string()))?;
    let tensors: BTreeMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("trainable.safetensors"))
            .map_err(|e| bad(e.to_string()))?
            .into_iter()
            .collect();
    {
        let _g = tch::no_grad_guard();
        for (name, t) in trained {
            let src = tensors
                .get(&format!("param.{name}"))
                .ok_or_else(|| bad(format!("missing tensor '{name}'")))?;
            copy_checked(t, src, name).map_err(bad)?;
        }
    }
    opt.load_state_tensors(&tensors, step).map_err(bad)?;
    Ok(Some(state))
}

/// The training settings both fine-tuning tasks share, for their range checks.
pub struct TrainRanges {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub eval_freq: usize,
    pub eval_iter: usize,
    pub grad_accum_steps: usize,
    pub max_grad_norm: Option<f64>,
}

impl TrainRanges {
    /// The first out-of-range `train.*` value, as a message starting with its key.
    pub fn problem(&self) -> Option<String> {
        if self.epochs == 0 {
            return Some("train.epochs: 0: expected at least 1".into());
        }
        if self.batch_size == 0 {
            return Some("train.batch_size: 0: expected at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Some(format!("train.lr: {}: expected a number > 0", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Some(format!(
                "train.weight_decay: {}: expected a number >= 0",
                self.weight_decay
            ));
        }
        if self.eval_freq == 0 || self.eval_iter == 0 || self.grad_accum_steps == 0 {
            return Some(
                "train.eval_freq, train.eval_iter and train.grad_accum_steps: expected at least 1"
                    .into(),
            );
        }
        if let Some(g) = self.max_grad_norm {
            if !(g.is_finite() && g > 0.0) {
                return Some(format!("train.max_grad_norm: {g}: expected a number > 0"));
            }
        }
        None
    }
}

/// Copies the tensors of a saved fine-tuning result (`classifier.safetensors`,
/// `finetuned.safetensors`) into the variables of the same names in `vs`; a tensor that is not
/// a variable of the model, or has another shape, is an error naming the file. Returns how many
/// tensors were copied.
pub fn load_tensors_into(vs: &tch::nn::VarStore, file: &Path, base_model: &str) -> Result<usize> {
    let bad = |message: String| LlmError::BadFile {
        path: file.to_path_buf(),
        message,
    };
    let saved = Tensor::read_safetensors(file).map_err(|e| bad(e.to_string()))?;
    let vars = vs.variables();
    let _g = tch::no_grad_guard();
    for (name, t) in &saved {
        let dst = vars.get(name).ok_or_else(|| {
            bad(format!(
                "tensor '{name}' is not a parameter of {base_model}"
            ))
        })?;
        copy_checked(dst, t, name).map_err(bad)?;
    }
    Ok(saved.len())
}

/// Copies `src` into the variable `dst` (no gradient tracking); a shape mismatch is an error
/// naming the tensor.
fn copy_checked(dst: &Tensor, src: &Tensor, name: &str) -> Result<(), String> {
    if dst.size() != src.size() {
        return Err(format!(
            "tensor '{name}' has shape {:?}, the model's has {:?}",
            src.size(),
            dst.size()
        ));
    }
    let _g = tch::no_grad_guard();
    dst.shallow_clone().copy_(src);
    Ok(())
}
