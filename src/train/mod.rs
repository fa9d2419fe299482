//! Training (book ch05 §5.1–5.2): loss over batches and loaders, and the book's simple loop.
use crate::data::{BpeTokenizer, DataLoader, GptDataset};
use crate::models::{generate_text_simple, GptConfig, GptModel};
use anyhow::Result;
use serde::Serialize;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// Book `calc_loss_batch`: mean cross-entropy of logits `(b, n, V)` against targets `(b, n)`.
pub fn calc_loss_batch(model: &GptModel, input: &Tensor, target: &Tensor, train: bool) -> Tensor {
    let logits = model.forward_t(input, train);
    let v = logits.size()[2];
    logits
        .view([-1, v])
        .cross_entropy_for_logits(&target.view([-1]))
}

/// Book `calc_loss_loader`: mean batch loss over the first `num_batches` batches (all if `None`).
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

/// Settings of the simple pretraining loop (book `train_model_simple`).
#[derive(Debug, Clone)]
pub struct SimpleTrainSpec {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub eval_freq: usize,
    pub eval_iter: usize,
    pub train_ratio: f64,
    pub seed: u64,
    pub start_context: String,
    pub sample_tokens: i64,
}

/// One evaluation point of a run.
#[derive(Debug, Clone, Serialize)]
pub struct EvalPoint {
    pub epoch: usize,
    pub step: usize,
    pub tokens_seen: usize,
    pub train_loss: f64,
    pub val_loss: f64,
}

/// Result of [`pretrain_simple`].
#[derive(Debug)]
pub struct SimpleTrainResult {
    pub evals: Vec<EvalPoint>,
    pub samples: Vec<String>,
}

/// Book ch05 §5.2: split the text 90/10, window it with `context_length`, and train with AdamW,
/// evaluating every `eval_freq` steps and printing a greedy sample after each epoch.
pub fn pretrain_simple(
    cfg: &GptConfig,
    text: &str,
    tok: &BpeTokenizer,
    spec: &SimpleTrainSpec,
    device: Device,
    mut log: impl FnMut(&str),
) -> Result<(nn::VarStore, GptModel, SimpleTrainResult)> {
    crate::device::seed_everything(spec.seed);
    let split = (spec.train_ratio * text.len() as f64) as usize;
    let split = (0..=split)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    let (train_text, val_text) = text.split_at(split);
    let ctx = cfg.context_length as usize;
    let train_ds = GptDataset::new(&tok.encode(train_text)?, ctx, ctx)?;
    let val_ds = GptDataset::new(&tok.encode(val_text)?, ctx, ctx)?;
    let train_loader = DataLoader::new(train_ds, spec.batch_size, true, true, spec.seed)?;
    let val_loader = DataLoader::new(val_ds, spec.batch_size, false, false, spec.seed)?;
    if train_loader.num_batches() == 0 {
        return Err(crate::error::LlmError::Usage(format!(
            "the training split has {} windows, fewer than one batch of {}; lower batch_size or context_length",
            train_loader.dataset.len(),
            spec.batch_size
        ))
        .into());
    }

    let vs = nn::VarStore::new(device);
    let model = GptModel::new(&vs.root(), cfg);
    let mut opt = nn::AdamW {
        wd: spec.weight_decay,
        ..Default::default()
    }
    .build(&vs, spec.lr)?;
    let mut evals = Vec::new();
    let mut samples = Vec::new();
    let (mut tokens_seen, mut step) = (0usize, 0usize);
    for epoch in 0..spec.epochs {
        for (x, y) in train_loader.iter_epoch(epoch, device) {
            let loss = calc_loss_batch(&model, &x, &y, true);
            let loss_v = loss.double_value(&[]);
            if !loss_v.is_finite() {
                anyhow::bail!("training loss became {loss_v} at step {step} (epoch {}); lower the learning rate", epoch + 1);
            }
            opt.backward_step(&loss);
            tokens_seen += x.numel();
            step += 1;
            if spec.eval_freq > 0 && step % spec.eval_freq == 0 {
                let train_loss =
                    calc_loss_loader(&model, &train_loader, Some(spec.eval_iter), device);
                let val_loss = calc_loss_loader(&model, &val_loader, Some(spec.eval_iter), device);
                log(&format!(
                    "Ep {} (Step {step:06}): Train loss {train_loss:.3}, Val loss {val_loss:.3}",
                    epoch + 1
                ));
                evals.push(EvalPoint {
                    epoch: epoch + 1,
                    step,
                    tokens_seen,
                    train_loss,
                    val_loss,
                });
            }
        }
        let sample = sample_text(&model, tok, &spec.start_context, spec.sample_tokens, device)?;
        log(&sample.replace('\n', " "));
        samples.push(sample);
    }
    Ok((vs, model, SimpleTrainResult { evals, samples }))
}

/// Book `generate_and_print_sample`: greedy continuation of a prompt.
pub fn sample_text(
    model: &GptModel,
    tok: &BpeTokenizer,
    prompt: &str,
    max_new_tokens: i64,
    device: Device,
) -> Result<String> {
    let ids: Vec<i64> = tok.encode(prompt)?.into_iter().map(i64::from).collect();
    let idx = Tensor::from_slice(&ids).view([1, -1]).to_device(device);
    let out = generate_text_simple(model, &idx, max_new_tokens, model.cfg.context_length);
    let out: Vec<i64> = Vec::try_from(out.view([-1]).to_kind(Kind::Int64).to_device(Device::Cpu))?;
    tok.decode(&out.iter().map(|&i| i as u32).collect::<Vec<_>>())
}
