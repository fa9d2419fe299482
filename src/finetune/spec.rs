//! The `train:` block every fine-tuning task shares ([`TrainArgs`], as litgpt's `TrainArgs`),
//! with each task's defaults (the book's values for its chapter) as a type parameter, and one
//! set of range checks ([`check_ranges`]). Pretraining's `train:`
//! ([`crate::train::spec::TrainSpec`]) has these keys plus its schedule, betas, precision and
//! checkpoint cadence, with no defaults for the book's required five; it stays its own struct
//! because its `config.yaml` text, which a resume compares, must not change.
use crate::train::spec::FusedAdamW;
use serde::{Deserialize, Serialize};
use std::marker::PhantomData;

/// A task's defaults for the keys a file leaves out.
pub trait TrainDefaults {
    const EPOCHS: usize;
    const EVAL_FREQ: usize;
    const EVAL_ITER: usize = 5;
    const BATCH_SIZE: usize = 8;
    const LR: f64 = 5e-5;
    const WEIGHT_DECAY: f64 = 0.1;
    fn epochs() -> usize {
        Self::EPOCHS
    }
    fn eval_freq() -> usize {
        Self::EVAL_FREQ
    }
    fn eval_iter() -> usize {
        Self::EVAL_ITER
    }
    fn batch_size() -> usize {
        Self::BATCH_SIZE
    }
    fn lr() -> f64 {
        Self::LR
    }
    fn weight_decay() -> f64 {
        Self::WEIGHT_DECAY
    }
}

/// `train:` of a fine-tuning task. The keys and their order are those of `config.yaml`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, bound = "")]
pub struct TrainArgs<D: TrainDefaults> {
    #[serde(default = "D::epochs")]
    pub epochs: usize,
    #[serde(default = "D::batch_size")]
    pub batch_size: usize,
    #[serde(default = "D::lr")]
    pub lr: f64,
    #[serde(default = "D::weight_decay")]
    pub weight_decay: f64,
    /// Evaluate every N optimizer steps (the book's `eval_freq`).
    #[serde(default = "D::eval_freq")]
    pub eval_freq: usize,
    /// Batches per evaluation (the book's `eval_iter`).
    #[serde(default = "D::eval_iter")]
    pub eval_iter: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "one")]
    pub grad_accum_steps: usize,
    /// Clip the global gradient norm to this value.
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
    /// libtorch intra-op threads (not part of a run's identity: `--threads` may change it).
    #[serde(default)]
    pub threads: Option<usize>,
    #[serde(default, skip_serializing_if = "FusedAdamW::is_auto")]
    pub fused_adamw: FusedAdamW,
    #[serde(skip)]
    _defaults: PhantomData<D>,
}

fn one() -> usize {
    1
}

impl<D: TrainDefaults> Default for TrainArgs<D> {
    fn default() -> Self {
        Self {
            epochs: D::EPOCHS,
            batch_size: D::BATCH_SIZE,
            lr: D::LR,
            weight_decay: D::WEIGHT_DECAY,
            eval_freq: D::EVAL_FREQ,
            eval_iter: D::EVAL_ITER,
            grad_accum_steps: 1,
            max_grad_norm: None,
            threads: None,
            fused_adamw: FusedAdamW::Auto,
            _defaults: PhantomData,
        }
    }
}

impl<D: TrainDefaults> Clone for TrainArgs<D> {
    fn clone(&self) -> Self {
        Self {
            fused_adamw: self.fused_adamw,
            max_grad_norm: self.max_grad_norm,
            threads: self.threads,
            _defaults: PhantomData,
            ..*self
        }
    }
}

impl<D: TrainDefaults> PartialEq for TrainArgs<D> {
    fn eq(&self, o: &Self) -> bool {
        (
            self.epochs,
            self.batch_size,
            self.lr,
            self.weight_decay,
            self.eval_freq,
            self.eval_iter,
            self.grad_accum_steps,
            self.max_grad_norm,
            self.threads,
            self.fused_adamw,
        ) == (
            o.epochs,
            o.batch_size,
            o.lr,
            o.weight_decay,
            o.eval_freq,
            o.eval_iter,
            o.grad_accum_steps,
            o.max_grad_norm,
            o.threads,
            o.fused_adamw,
        )
    }
}

impl<D: TrainDefaults> std::fmt::Debug for TrainArgs<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainArgs")
            .field("epochs", &self.epochs)
            .field("batch_size", &self.batch_size)
            .field("lr", &self.lr)
            .field("weight_decay", &self.weight_decay)
            .field("eval_freq", &self.eval_freq)
            .field("eval_iter", &self.eval_iter)
            .field("grad_accum_steps", &self.grad_accum_steps)
            .field("max_grad_norm", &self.max_grad_norm)
            .field("threads", &self.threads)
            .field("fused_adamw", &self.fused_adamw)
            .finish()
    }
}

impl<D: TrainDefaults> TrainArgs<D> {
    /// The first out-of-range value, as a message starting with its key.
    pub fn problem(&self) -> Option<String> {
        check_ranges(&Ranges {
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            weight_decay: self.weight_decay,
            eval_freq: self.eval_freq,
            eval_iter: self.eval_iter,
            grad_accum_steps: self.grad_accum_steps,
            max_grad_norm: self.max_grad_norm,
        })
    }
}

/// The keys every `train:` block has, for [`check_ranges`].
pub struct Ranges {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub eval_freq: usize,
    pub eval_iter: usize,
    pub grad_accum_steps: usize,
    pub max_grad_norm: Option<f64>,
}

/// The first out-of-range value of a `train:` block, as a message starting with its key.
pub fn check_ranges(r: &Ranges) -> Option<String> {
    if r.epochs == 0 {
        return Some("train.epochs: 0: expected at least 1".into());
    }
    if r.batch_size == 0 {
        return Some("train.batch_size: 0: expected at least 1".into());
    }
    if !(r.lr.is_finite() && r.lr > 0.0) {
        return Some(format!("train.lr: {}: expected a number > 0", r.lr));
    }
    if !(r.weight_decay.is_finite() && r.weight_decay >= 0.0) {
        return Some(format!(
            "train.weight_decay: {}: expected a number >= 0",
            r.weight_decay
        ));
    }
    if r.eval_freq == 0 || r.eval_iter == 0 || r.grad_accum_steps == 0 {
        return Some(
            "train.eval_freq, train.eval_iter and train.grad_accum_steps: expected at least 1"
                .into(),
        );
    }
    if let Some(g) = r.max_grad_norm {
        if !(g.is_finite() && g > 0.0) {
            return Some(format!("train.max_grad_norm: {g}: expected a number > 0"));
        }
    }
    None
}
