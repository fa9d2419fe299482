//! One fine-tuning layer for every task (book ch06 classification, ch07 instruction tuning,
//! appendix E LoRA; DPO and evaluation build on it too):
//!
//! - what trains: [`Trainable`] (the book's `--trainable_layers` words) and [`Method`] (full or
//!   LoRA), one predicate over parameter names ([`set_trainable`]);
//! - the shared `train:` settings with each task's defaults ([`spec::TrainArgs`]);
//! - the run's life: folder, resume, optimizer step, evaluation records, checkpoints, finish
//!   ([`run::FinetuneRun`]);
//! - the checkpoint format, versioned and checksummed ([`checkpoint`]);
//! - the book's batch order ([`batches`]).
//!
//! Each task keeps its own loop, in the book's order, in its `train.rs`.
pub mod checkpoint;
pub mod run;
pub mod spec;

pub use crate::models::trainable::{Method, Trainable};
pub use run::{
    open, set_checkpoint_minutes, FinetuneRun, LoopState, Outcome, DEFAULT_CHECKPOINT_MINUTES,
};
pub use spec::{TrainArgs, TrainDefaults};

use crate::plot::{plot_values, LossPoint};
use crate::resolve::LoadedLm;
use anyhow::Result;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::Path;
use tch::Tensor;

/// Marks what `strategy` with `method` trains (`requires_grad`) and freezes everything else;
/// returns the trained variables, sorted by name. `head` names the task's new head (always
/// trained), `replaced` a head it replaces (never trained); see [`Trainable::trains`].
pub fn set_trainable(
    lm: &LoadedLm,
    strategy: Trainable,
    method: Method,
    head: Option<&str>,
    replaced: Option<&str>,
) -> Vec<(String, Tensor)> {
    let n = lm.model.n_layers();
    let mut out = Vec::new();
    for (name, t) in lm.vs.variables() {
        let on = strategy.trains(method, &name, n, head, replaced);
        let _ = t.set_requires_grad(on);
        if on {
            out.push((name, t));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Batches of example indices for one epoch, as the book's `DataLoader`: shuffled (seeded by
/// `(seed, epoch)`) when `shuffle`, the last partial batch dropped when `drop_last`.
pub fn batches(
    n: usize,
    batch_size: usize,
    shuffle: bool,
    drop_last: bool,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng =
            StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64));
        order.shuffle(&mut rng);
    }
    let mut out: Vec<Vec<usize>> = order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    if drop_last && out.last().is_some_and(|b| b.len() < batch_size) {
        out.pop();
    }
    out
}

/// A run needs at least one training and one validation example; the error names the data
/// keys (`keys`) that shrink the splits.
pub fn check_splits(train: usize, val: usize, what: &str, keys: &str) -> Result<()> {
    if train == 0 || val == 0 {
        return Err(crate::error::LlmError::Usage(format!(
            "the data gives {train} training and {val} validation {what}; need at least one of each (check {keys})"
        ))
        .into());
    }
    Ok(())
}

/// One figure of a run's curves: its file, its y-axis label, and the `(train, validation)`
/// values of an evaluation record.
pub type Curve<'a, E> = (&'a str, &'a str, &'a dyn Fn(&E) -> (f64, f64));

/// Writes each of `curves` as a PNG in `dir` (the book's loss and accuracy figures): the values
/// against the epoch, with what was seen (`at(record)` = `(step, seen)`) on the top axis.
pub fn plot_curves<E>(
    evals: &[E],
    steps_per_epoch: usize,
    dir: &Path,
    title: &str,
    seen_label: &str,
    at: impl Fn(&E) -> (usize, usize),
    curves: &[Curve<E>],
) -> Result<()> {
    for (file, label, values) in curves {
        let pts: Vec<LossPoint> = evals
            .iter()
            .map(|r| {
                let ((step, seen), (train, val)) = (at(r), values(r));
                LossPoint {
                    epoch: step as f64 / steps_per_epoch.max(1) as f64,
                    tokens_seen: seen as f64,
                    train_loss: train,
                    val_loss: val,
                }
            })
            .collect();
        plot_values(&pts, &dir.join(file), title, label, seen_label)?;
    }
    Ok(())
}
