//! The life of a fine-tuning run, the same for every task: the run folder ([`RunDir`], as
//! pretraining's: `config.yaml` checked or written, `--restart`, a finished run reported from its
//! `metrics.jsonl`), the optimizer over the trained tensors, resuming from the last checkpoint,
//! the optimizer step with gradient accumulation and clipping, evaluation records, checkpoints
//! (at every epoch end, on Ctrl-C/SIGTERM, and every [`set_checkpoint_minutes`] minutes inside an
//! epoch) and the finish (final record, `status.json`). A task's own loop stays explicit, in the book's order:
//!
//! ```text
//! if let Some(done) = open(spec, threads, dir, restart, events)? { return Ok(done); }
//! /* load the model and data, choose what trains */
//! let mut run = FinetuneRun::start(dir, trained, &spec.train, seed, device, rows, events)?;
//! for epoch in run.epochs() {
//!     let order = batches(rows, batch_size, true, true, seed, epoch);
//!     for g in run.groups(epoch) {
//!         let grad_norm = run.step(&order, g, |b| /* the task's loss of batch b */)?;
//!         if run.eval_due() { /* evaluate */ run.record_eval(epoch, rec, losses, grad_norm, ..)?; }
//!         run.end_step(g)?; // checkpoint when due; stops here on Ctrl-C
//!     }
//! }
//! run.finish(result, &final_scalars, |evals, trained| /* save the model, plot */)
//! ```
use super::checkpoint;
use super::spec::{TrainArgs, TrainDefaults};
use crate::error::{write_atomic, LlmError};
use crate::train::optim::AdamW;
use crate::train::run_dir::{self, RunDir};
use crate::train::trainer::{append_line, seed_for_step, truncate_jsonl, TrainEvents};
use anyhow::Result;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
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

/// What a fine-tuning run reports: its evaluation records, its final record, and whether it
/// had finished before this call (and was only reported).
#[derive(Debug, Clone)]
pub struct Outcome<E, F> {
    pub evals: Vec<E>,
    pub result: F,
    pub already_finished: bool,
}

/// Opens a run: sets the thread count, prepares the folder ([`RunDir::open`] with the spec's
/// resolved YAML; the config must match) and, when the run had finished, reports it (`Some`:
/// nothing more to do) from its `metrics.jsonl`: the lines that parse as `E`, and the last one
/// that parses as `F`.
pub fn open<E: DeserializeOwned, F: DeserializeOwned, S: Serialize>(
    spec: &S,
    threads: Option<usize>,
    run_dir: &Path,
    restart: bool,
    events: &mut dyn TrainEvents,
) -> Result<Option<Outcome<E, F>>> {
    crate::device::set_threads(threads);
    let yaml = serde_yaml::to_string(spec)?;
    let run = RunDir::open(run_dir, &yaml, restart, &[], None, "folder")?;
    if !run.finished()? {
        return Ok(None);
    }
    let evals = run.read_records()?;
    let result = run
        .read_records::<F>()?
        .pop()
        .ok_or_else(|| LlmError::BadFile {
            path: run.metrics_path(),
            message: "a finished run without its final record".into(),
        })?;
    events.log(&format!(
        "{} already finished (pass --restart to train again)",
        run_dir.display()
    ));
    Ok(Some(Outcome {
        evals,
        result,
        already_finished: true,
    }))
}

/// Where a run stands (a checkpoint's `state`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LoopState {
    pub step: usize,
    pub epoch: usize,
    /// The next batch group of `epoch`.
    pub next_group: usize,
    /// What the task counts as seen: examples (classification) or tokens (instruction tuning).
    #[serde(alias = "examples_seen", alias = "tokens_seen")]
    pub seen: usize,
    /// Seconds spent training before this checkpoint, over every process that ran it (so a
    /// resumed run reports its whole training time).
    #[serde(default)]
    pub train_seconds: f64,
}

/// A fine-tuning run in progress (see the module docs for the loop it serves). `E` is the
/// task's evaluation record, `F` its final record (lines of `metrics.jsonl`).
pub struct FinetuneRun<'a, E, F> {
    pub dir: PathBuf,
    pub trained: Vec<(String, Tensor)>,
    pub state: LoopState,
    pub events: &'a mut dyn TrainEvents,
    /// The evaluation records so far (those before a resume included).
    pub evals: Vec<E>,
    /// Whether this process resumed from a checkpoint.
    pub resumed: bool,
    opt: AdamW,
    fused: bool,
    seed: u64,
    epochs: usize,
    grad_accum: usize,
    eval_freq: usize,
    lr: f64,
    max_grad_norm: Option<f64>,
    groups_per_epoch: usize,
    clock: CheckpointTimer,
    since_eval: (Instant, usize),
    _final: PhantomData<F>,
}

impl<'a, E: Serialize + DeserializeOwned, F: Serialize + DeserializeOwned> FinetuneRun<'a, E, F> {
    /// Sets up the optimizer over `trained` and resumes from the run's checkpoint if it has one
    /// (else starts `metrics.jsonl` afresh). `rows` is the number of training rows; an epoch is
    /// `rows / batch_size` batches (the last partial one dropped, as the book's loader does),
    /// `grad_accum_steps` batches a step.
    pub fn start<D: TrainDefaults>(
        dir: &Path,
        trained: Vec<(String, Tensor)>,
        args: &TrainArgs<D>,
        seed: u64,
        device: Device,
        rows: usize,
        events: &'a mut dyn TrainEvents,
    ) -> Result<Self> {
        let groups_per_epoch = (rows / args.batch_size).div_ceil(args.grad_accum_steps);
        if groups_per_epoch == 0 {
            return Err(LlmError::Usage(format!(
                "{rows} training examples are fewer than one batch of {}; lower train.batch_size",
                args.batch_size
            ))
            .into());
        }
        let mut opt = AdamW::over(&trained, args.weight_decay);
        let metrics = dir.join(run_dir::METRICS);
        let mut state = LoopState::default();
        let mut evals = Vec::new();
        let loaded: Option<LoopState> =
            checkpoint::load(dir, &trained, &mut opt, &mut |m| events.log(m))?;
        let resumed = loaded.is_some();
        if let Some(s) = loaded {
            state = s;
            evals = resume_metrics::<E, F>(&metrics, state.step)?;
            events.log(&format!(
                "resuming at step {} (epoch {})",
                state.step,
                state.epoch + 1
            ));
        } else {
            let _ = std::fs::remove_file(&metrics);
        }
        events.resume_after(state.step);
        Ok(Self {
            dir: dir.to_path_buf(),
            trained,
            since_eval: (Instant::now(), state.seen),
            clock: CheckpointTimer::start(state.train_seconds),
            state,
            events,
            evals,
            resumed,
            opt,
            fused: args.fused_adamw.resolve(device),
            seed,
            epochs: args.epochs,
            grad_accum: args.grad_accum_steps,
            eval_freq: args.eval_freq,
            lr: args.lr,
            max_grad_norm: args.max_grad_norm,
            groups_per_epoch,
            _final: PhantomData,
        })
    }

    /// How many parameters train, of how many.
    pub fn parameter_counts(&self, vs: &tch::nn::VarStore) -> (i64, i64) {
        let count = |ts: &mut dyn Iterator<Item = &Tensor>| ts.map(|t| t.numel() as i64).sum();
        (
            count(&mut self.trained.iter().map(|(_, t)| t)),
            count(&mut vs.variables().values()),
        )
    }

    pub fn groups_per_epoch(&self) -> usize {
        self.groups_per_epoch
    }

    /// Starts the progress report and the training clock.
    pub fn begin(&mut self) {
        self.events
            .start(self.state.step, self.groups_per_epoch * self.epochs);
        self.clock = CheckpointTimer::start(self.state.train_seconds);
        self.since_eval = (Instant::now(), self.state.seen);
    }

    /// The epochs still to run.
    pub fn epochs(&self) -> std::ops::Range<usize> {
        self.state.epoch..self.epochs
    }

    /// The batch groups of `epoch` still to run.
    pub fn groups(&self, epoch: usize) -> std::ops::Range<usize> {
        let first = if epoch == self.state.epoch {
            self.state.next_group
        } else {
            0
        };
        first..self.groups_per_epoch
    }

    /// One optimizer step over group `g` of the epoch's batch `order` (`grad_accum_steps`
    /// batches): dropout reseeded from `(seed, step)`, gradients zeroed, each batch's loss
    /// (from `loss_of`: the loss, `None` for a batch with nothing to learn, and how much it adds
    /// to `seen`) divided by the group size and backpropagated, the norm clipped, AdamW applied.
    /// A NaN or infinite loss stops the run. Returns the gradient norm before clipping.
    pub fn step(
        &mut self,
        order: &[Vec<usize>],
        epoch: usize,
        g: usize,
        mut loss_of: impl FnMut(&[usize]) -> Result<(Option<Tensor>, usize)>,
    ) -> Result<f64> {
        let lo = g * self.grad_accum;
        let hi = (lo + self.grad_accum).min(order.len());
        let n = (hi - lo) as f64;
        seed_for_step(self.seed, self.state.step);
        self.opt.zero_grad();
        let mut step_loss = 0.0;
        for b in &order[lo..hi] {
            let (loss, seen) = loss_of(b)?;
            self.state.seen += seen;
            if let Some(loss) = loss {
                step_loss += crate::train::finite_loss(&loss, self.state.step, epoch)? / n;
                (loss / n).backward();
            }
        }
        let grad_norm = self.opt.clip_grad_norm(self.max_grad_norm);
        self.opt.update(self.lr, self.fused)?;
        self.state.step += 1;
        self.state.epoch = epoch;
        self.state.next_group = g + 1;
        self.events.step(self.state.step, step_loss);
        Ok(grad_norm)
    }

    /// Whether the step just taken is one to evaluate after (the first, then every `eval_freq`).
    pub fn eval_due(&self) -> bool {
        (self.state.step - 1).is_multiple_of(self.eval_freq)
    }

    /// The learning rate.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// What was seen per second since the last evaluation (and starts counting again).
    pub fn throughput(&mut self) -> f64 {
        let secs = self.since_eval.0.elapsed().as_secs_f64().max(1e-9);
        let per_sec = (self.state.seen - self.since_eval.1) as f64 / secs;
        self.since_eval = (Instant::now(), self.state.seen);
        per_sec
    }

    /// Records the evaluation after the step just taken in `epoch` (0-based): `rec` as a
    /// `metrics.jsonl` line; the book's log line ("Ep 1 (Step 000000): Train loss …, Val loss …")
    /// followed by `more_text`; TensorBoard's `train/loss`, `val/loss`, the task's `more`
    /// scalars, `train/lr` and `train/grad_norm`.
    pub fn record_eval(
        &mut self,
        epoch: usize,
        rec: E,
        (train_loss, val_loss): (f64, f64),
        grad_norm: f64,
        more: &[(&str, f64)],
        more_text: &str,
    ) -> Result<()> {
        self.events.log(&format!(
            "Ep {} (Step {:06}): Train loss {train_loss:.3}, Val loss {val_loss:.3}{more_text}",
            epoch + 1,
            self.state.step - 1,
        ));
        append_line(
            &self.dir.join(run_dir::METRICS),
            &serde_json::to_string(&rec)?,
        )?;
        let mut scalars = vec![("train/loss", train_loss), ("val/loss", val_loss)];
        scalars.extend_from_slice(more);
        scalars.extend([("train/lr", self.lr), ("train/grad_norm", grad_norm)]);
        self.events.scalars(self.state.step, &scalars);
        self.evals.push(rec);
        Ok(())
    }

    /// Whether group `g` is the last of its epoch.
    pub fn epoch_done(&self, g: usize) -> bool {
        g + 1 == self.groups_per_epoch
    }

    /// After group `g`: a checkpoint at the end of an epoch, when one is due, or when a stop
    /// was requested (Ctrl-C, SIGTERM), which then ends the run with [`LlmError::Interrupted`].
    pub fn end_step(&mut self, g: usize) -> Result<()> {
        let epoch_done = self.epoch_done(g);
        if epoch_done {
            self.state.epoch += 1;
            self.state.next_group = 0;
        }
        let stop = crate::signal::interrupted();
        if epoch_done || stop || self.clock.due() {
            self.state.train_seconds = self.clock.train_seconds();
            checkpoint::save(&self.dir, &self.trained, &self.opt, &self.state)?;
            self.clock.saved();
        }
        if stop {
            return Err(self.interrupted().into());
        }
        Ok(())
    }

    /// The error that ends a run stopped by Ctrl-C (its last checkpoint resumes it).
    pub fn interrupted(&self) -> LlmError {
        LlmError::Interrupted {
            step: self.state.step,
            dir: self.dir.clone(),
        }
    }

    /// Seconds of training over every process that ran this run.
    pub fn train_seconds(&self) -> f64 {
        self.clock.train_seconds()
    }

    /// Ends the run: the final record and scalars, then `save` (the task's model and plots,
    /// given the evaluation records and the trained tensors), then `status.json` says finished
    /// and the checkpoints go.
    pub fn finish(
        self,
        result: F,
        scalars: &[(&str, f64)],
        save: impl FnOnce(&[E], &[(String, Tensor)]) -> Result<()>,
    ) -> Result<Outcome<E, F>> {
        self.events.scalars(self.state.step, scalars);
        append_line(
            &self.dir.join(run_dir::METRICS),
            &serde_json::to_string(&result)?,
        )?;
        save(&self.evals, &self.trained)?;
        RunDir::at(&self.dir).finish(Some(self.state.step))?;
        let _ = std::fs::remove_dir_all(self.dir.join(run_dir::CHECKPOINTS));
        Ok(Outcome {
            evals: self.evals,
            result,
            already_finished: false,
        })
    }
}
