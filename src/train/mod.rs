//! Training (book ch05 and appendix D): loss over batches and loaders, AdamW, learning-rate
//! schedules, resumable checkpoints, the run folder's life (shared with fine-tuning and the
//! experiment runners) and the pretraining loop.
pub mod checkpoint;
pub mod optim;
pub mod run_dir;
pub mod schedule;
pub mod spec;
pub mod trainer;

use crate::data::DataLoader;
use crate::error::LlmError;
use crate::models::GptModel;
use tch::{Device, Kind, Tensor};

pub use run_dir::{RunDir, RunStatus};
pub use spec::PretrainSpec;
pub use trainer::{pretrain, pretrain_dist, EvalRecord, RunOutcome};

/// Book `calc_loss_batch`: mean cross-entropy of logits `(b, n, V)` against targets `(b, n)`.
/// Under bf16 autocast the logits come out bf16; they are widened to f32 first so the loss
/// (and the gradient it starts) is computed in f32.
pub fn calc_loss_batch(model: &GptModel, input: &Tensor, target: &Tensor, train: bool) -> Tensor {
    let mut logits = model.forward_t(input, train);
    if matches!(logits.kind(), Kind::BFloat16 | Kind::Half) {
        logits = logits.to_kind(Kind::Float);
    }
    let v = logits.size()[2];
    logits
        .view([-1, v])
        .cross_entropy_for_logits(&target.view([-1]))
}

/// Book `calc_loss_loader`: mean batch loss over the first `num_batches` batches (all if
/// `None`) of the loader's epoch-0 order; NaN for an empty loader, as in the book.
pub fn calc_loss_loader(
    model: &GptModel,
    loader: &DataLoader,
    num_batches: Option<usize>,
    device: Device,
) -> f64 {
    let n = num_batches.map_or(loader.num_batches(), |k| k.min(loader.num_batches()));
    if n == 0 {
        return f64::NAN;
    }
    let _g = tch::no_grad_guard();
    let total: f64 = loader
        .iter_epoch(0, device)
        .take(n)
        .map(|(x, y)| calc_loss_batch(model, &x, &y, false).double_value(&[]))
        .sum();
    total / n as f64
}

/// The value of a training batch's loss, or the error that stops the run when it is NaN or
/// infinite; `step` and `epoch` are the 0-based counters of the step being taken.
pub fn finite_loss(loss: &Tensor, step: usize, epoch: usize) -> Result<f64, LlmError> {
    let v = loss.double_value(&[]);
    if v.is_finite() {
        return Ok(v);
    }
    Err(LlmError::Usage(format!(
        "training loss became {v} at step {} (epoch {}); lower train.lr or set train.max_grad_norm",
        step + 1,
        epoch + 1
    )))
}

/// Perplexity of a mean cross-entropy loss (book §5.1.2).
pub fn perplexity(loss: f64) -> f64 {
    loss.exp()
}
