//! The pretraining loop (book ch05 §5.2 `train_model_simple`, with appendix D's warm-up, cosine
//! decay and gradient clipping), resumable from checkpoints.
//!
//! It reads in the book's order: batch, loss, backward, clip, step; every `eval_freq` steps
//! evaluate on `eval_iter` batches of train and validation data; a sample after each epoch.
use super::checkpoint::{self, TrainState, FORMAT_VERSION};
use super::optim::{AdamW, AdamWConfig};
use super::run_dir::RunDir;
use super::spec::PretrainSpec;
use super::{calc_loss_batch, calc_loss_loader};
use crate::data::{BpeTokenizer, DataLoader, GptDataset, Registry};
use crate::dist::Dist;
use crate::error::{read_text, write_atomic, LlmError};
use crate::generate::generate;
use crate::models::GptConfig;
use crate::plot::{plot_losses, LossPoint};
use crate::resolve::ModelSource;
use crate::shim::with_autocast;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::Device;

/// The run folder's samples after each epoch, one JSON object a line.
const SAMPLES: &str = "samples.jsonl";

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: usize,
    pub epoch: usize,
    pub tokens_seen: usize,
    pub train_loss: f64,
    pub val_loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Training throughput since the previous record (wall clock; not reproducible).
    pub tokens_per_sec: f64,
}

/// What a training run tells its caller as it goes: log lines, progress, evaluations, samples.
/// A closure `FnMut(&str)` is the simplest implementation (log lines only).
pub trait TrainEvents {
    fn log(&mut self, msg: &str);
    /// The run continues after `step` (0: from the start): whatever an earlier, interrupted
    /// attempt recorded for later steps is stale (this run records them again). Called before
    /// anything is logged for the steps of this attempt.
    fn resume_after(&mut self, _step: usize) {}
    /// The run starts (or resumes at `step`) and will end at `total_steps`.
    fn start(&mut self, _step: usize, _total_steps: usize) {}
    /// An optimizer step finished with this mean micro-batch loss.
    fn step(&mut self, _step: usize, _loss: f64) {}
    fn eval(&mut self, _rec: &EvalRecord) {}
    /// The sample generated after an epoch (prompt + continuation).
    fn sample(&mut self, _step: usize, _epoch: usize, _text: &str) {}
    /// Named figures at a step (classification: losses and accuracies).
    fn scalars(&mut self, _step: usize, _values: &[(&str, f64)]) {}
}

impl<F: FnMut(&str)> TrainEvents for F {
    fn log(&mut self, msg: &str) {
        self(msg)
    }
}

/// What a finished (or resumed-and-finished) run reports.
#[derive(Debug)]
pub struct RunOutcome {
    pub run_dir: PathBuf,
    pub evals: Vec<EvalRecord>,
    pub samples: Vec<String>,
    pub resumed_from_step: Option<usize>,
    pub already_finished: bool,
    pub total_steps: usize,
}

/// The model config a spec asks for (source config + overrides), and where weights come from.
pub fn resolve_model(spec: &PretrainSpec) -> Result<(ModelSource, GptConfig)> {
    let source = match (&spec.model.init_from, &spec.model.preset) {
        (Some(init), _) => ModelSource::parse(init)?,
        (None, Some(preset)) => ModelSource::Fresh(preset.clone()),
        (None, None) => unreachable!("validated: one of preset/init_from"),
    };
    let mut cfg = source.config()?;
    spec.model.overrides.apply(&mut cfg);
    cfg.validate("model.overrides")?;
    Ok((source, cfg))
}

/// The training text a data spec names.
pub fn load_text(data: &super::spec::DataSpec) -> Result<String> {
    match (&data.dataset, &data.path) {
        (_, Some(p)) => Ok(read_text(p)?),
        (Some(name), None) => {
            let reg = Registry::builtin()?;
            let dir = reg.fetch(name)?;
            let first = &reg.get(name)?.files[0].path;
            Ok(read_text(&dir.join(first))?)
        }
        (None, None) => unreachable!("validated: one of dataset/path"),
    }
}

/// Splits at a fraction of the characters (the book's `int(train_ratio * len(text))`).
pub fn split_text(text: &str, train_ratio: f64) -> (&str, &str) {
    let n_chars = text.chars().count();
    let split_chars = (train_ratio * n_chars as f64) as usize;
    let byte = text
        .char_indices()
        .nth(split_chars)
        .map_or(text.len(), |(b, _)| b);
    text.split_at(byte)
}

pub(crate) fn seed_for_step(seed: u64, step: usize) {
    tch::manual_seed(
        (seed as i64)
            .wrapping_mul(1_000_003)
            .wrapping_add(step as i64),
    );
}

/// Keeps the lines of a JSONL file whose `step` is at most `step` (a resumed run recomputes
/// the rest); returns the kept lines.
pub(crate) fn truncate_jsonl(path: &Path, step: usize) -> Result<Vec<String>> {
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let text = read_text(path)?;
    let kept: Vec<String> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(String::from)
        .collect();
    let body: String = kept.iter().map(|l| format!("{l}\n")).collect();
    write_atomic(path, body.as_bytes())?;
    Ok(kept)
}

/// [`truncate_jsonl`] for `metrics.jsonl`, parsed.
fn truncate_metrics(path: &Path, step: usize) -> Result<Vec<EvalRecord>> {
    truncate_jsonl(path, step)?
        .iter()
        .map(|l| {
            serde_json::from_str(l).map_err(|e| {
                LlmError::Config {
                    origin: path.display().to_string(),
                    message: e.to_string(),
                }
                .into()
            })
        })
        .collect()
}

pub(crate) fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| LlmError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    writeln!(f, "{line}").map_err(|source| LlmError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    f.flush().map_err(|source| LlmError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// Whether a run folder's config.yaml differs from `spec` in `train.fused_adamw` only.
pub(crate) fn same_but_fused_adamw(before: &str, spec: &PretrainSpec) -> bool {
    let Ok(mut old) = serde_yaml::from_str::<PretrainSpec>(before) else {
        return false;
    };
    old.train.fused_adamw = spec.train.fused_adamw;
    &old == spec
}

/// A run folder trained with another `train.nproc` is refused with a message that says so (its
/// global batch, hence its curve, depends on the number of ranks).
fn refuse_other_nproc(run_dir: &Path, spec: &PretrainSpec, restart: bool) -> Result<()> {
    let path = RunDir::at(run_dir).config_path();
    if restart || !path.is_file() {
        return Ok(());
    }
    let Ok(before) = serde_yaml::from_str::<PretrainSpec>(&read_text(&path)?) else {
        return Ok(()); // RunDir::open reports the difference
    };
    if before.train.nproc == spec.train.nproc {
        return Ok(());
    }
    Err(LlmError::Usage(format!(
        "{} was trained with train.nproc {} (global batch {} × {}), this run asks for {}; resume it with --nproc {}, or pass --restart to start over",
        run_dir.display(),
        before.train.nproc,
        before.train.nproc,
        before.train.batch_size,
        spec.train.nproc,
        before.train.nproc
    ))
    .into())
}

/// Runs (or resumes, or reports as finished) a pretraining run in `run_dir`.
pub fn pretrain(
    spec: &PretrainSpec,
    run_dir: &Path,
    device: Device,
    restart: bool,
    events: &mut dyn TrainEvents,
) -> Result<RunOutcome> {
    pretrain_dist(spec, run_dir, device, restart, events, &Dist::single())
}

/// [`pretrain`] as one rank of a data-parallel group (book appendix A.9, DDP): every global
/// batch of `world × batch_size` windows is the one a single process with that batch size
/// would take, and rank r trains on its r-th slice (`DistributedSampler` semantics within the
/// batch); gradients are averaged over the ranks before clipping, so the ranks keep equal
/// weights and the run equals the single-process one with the larger batch. Rank 0 alone
/// writes the run folder (config, checkpoints, metrics, samples, the model) and reports
/// through `events`; every rank evaluates (the same numbers) so none waits on another.
pub fn pretrain_dist(
    spec: &PretrainSpec,
    run_dir: &Path,
    device: Device,
    restart: bool,
    events: &mut dyn TrainEvents,
    dist: &Dist,
) -> Result<RunOutcome> {
    spec.validate("pretrain spec")?;
    if spec.train.nproc != 1 && spec.train.nproc != dist.world {
        return Err(LlmError::Usage(format!(
            "train.nproc is {} but this process is rank {} of {}; `llmlab pretrain` starts the ranks \
             (or run it under torchrun/srun with train.nproc 1 or equal to the world size)",
            spec.train.nproc, dist.rank, dist.world
        ))
        .into());
    }
    crate::device::set_threads(spec.train.threads);
    let main = dist.is_main();
    // Rank 0 opens (or refuses) the run folder; the others wait, then read what it decided.
    let run = if main {
        refuse_other_nproc(run_dir, spec, restart)?;
        let run = RunDir::open(
            run_dir,
            &serde_yaml::to_string(spec)?,
            restart,
            &[SAMPLES],
            Some(&|before: &str| same_but_fused_adamw(before, spec)),
            "--out",
        )?;
        dist.barrier()?;
        run
    } else {
        dist.barrier()?;
        RunDir::at(run_dir)
    };
    if run.config_rewritten() {
        // train.fused_adamw picks an implementation of the same update, so a run may switch it
        // on resume; config.yaml records the setting in use from now on.
        events.log("train.fused_adamw differs from config.yaml (same update, other kernel); resuming with the new setting");
    }
    let metrics_path = run.metrics_path();
    let samples_path = run_dir.join(SAMPLES);

    let (source, cfg) = resolve_model(spec)?;
    let tok = BpeTokenizer::gpt2()?;
    if cfg.vocab_size < tok.vocab_size() as i64 {
        return Err(LlmError::Config {
            origin: "model".into(),
            message: format!(
                "vocab_size {} is smaller than the GPT-2 tokenizer's {}",
                cfg.vocab_size,
                tok.vocab_size()
            ),
        }
        .into());
    }
    if run.finished()? {
        events.log(&format!(
            "{} already finished (pass --restart to train again)",
            run_dir.display()
        ));
        return Ok(RunOutcome {
            run_dir: run_dir.into(),
            evals: run.read_records()?,
            samples: Vec::new(),
            resumed_from_step: None,
            already_finished: true,
            total_steps: 0,
        });
    }

    let text = load_text(&spec.data)?;
    let (train_text, val_text) = split_text(&text, spec.data.train_ratio);
    let ctx = cfg.context_length as usize;
    let stride = spec.data.stride.unwrap_or(ctx);
    let train_ds = GptDataset::new(&tok.encode(train_text)?, ctx, stride)?;
    let val_ds = GptDataset::new(&tok.encode(val_text)?, ctx, stride)?;
    let t = &spec.train;
    // The global batch: rank r trains on rows r·B..(r+1)·B of each (B = train.batch_size).
    let global_batch = t.batch_size * dist.world;
    let train_loader = DataLoader::new(train_ds, global_batch, true, true, spec.seed)?;
    let val_loader = DataLoader::new(val_ds, global_batch, false, false, spec.seed)?;
    let n_batches = train_loader.num_batches();
    if n_batches == 0 {
        return Err(LlmError::Usage(format!(
            "the training split has {} windows of {ctx} tokens, fewer than one batch of {global_batch}; lower batch_size or context_length",
            train_loader.dataset.len(),
        ))
        .into());
    }
    let groups_per_epoch = n_batches.div_ceil(t.grad_accum_steps);
    let total_steps = groups_per_epoch * t.epochs;

    crate::device::seed_everything(spec.seed);
    let (vs, model) = source.load_with(&cfg, device)?;
    let mut named: Vec<(String, tch::Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, v)| v.requires_grad())
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let adam_cfg = AdamWConfig {
        beta1: t.betas.0,
        beta2: t.betas.1,
        eps: t.eps,
        weight_decay: t.weight_decay,
    };
    let mut opt = AdamW::new(named, adam_cfg);
    let fused = t.fused_adamw.resolve(device);
    let precision = t.precision;

    let mut state = TrainState {
        format_version: FORMAT_VERSION,
        step: 0,
        epoch: 0,
        next_group: 0,
        tokens_seen: 0,
        seed: spec.seed,
        lr: t.lr,
        model_config: cfg.clone(),
    };
    let mut resumed_from_step = None;
    let mut evals = Vec::new();
    // Every rank reads the same checkpoint (rank 0's files); the optimizer state is then equal
    // on all ranks, and stays so since they apply the same averaged gradients.
    let restored =
        checkpoint::restore_newest(run_dir, &cfg, &vs, &mut opt, &mut |m| events.log(m))?;
    if let Some((dir, s)) = restored {
        state = s;
        if main {
            evals = truncate_metrics(&metrics_path, state.step)?;
            truncate_jsonl(&samples_path, state.step)?;
        }
        resumed_from_step = Some(state.step);
        events.log(&format!(
            "resuming from {} (step {}, epoch {})",
            dir.display(),
            state.step,
            state.epoch + 1
        ));
    } else if main {
        let _ = std::fs::remove_file(&metrics_path);
        let _ = std::fs::remove_file(&samples_path);
    }
    // DDP's constructor: every rank starts from rank 0's weights.
    dist.broadcast(
        &opt.params()
            .iter()
            .map(|(_, p)| p.shallow_clone())
            .collect::<Vec<_>>(),
    )?;
    if dist.world > 1 {
        events.log(&format!(
            "data parallel: {} ranks ({}), global batch {global_batch} = {} × {}",
            dist.world,
            if device.is_cuda() { "NCCL" } else { "gloo" },
            dist.world,
            t.batch_size
        ));
    }
    events.resume_after(state.step);

    events.log(&format!(
        "{} parameters ({} trainable), {} train / {} val windows of {ctx} tokens, {groups_per_epoch} steps per epoch, {total_steps} steps, {}, {} AdamW",
        cfg.num_params(),
        opt.params().iter().map(|(_, p)| p.numel()).sum::<usize>(),
        train_loader.dataset.len(),
        val_loader.dataset.len(),
        if precision.is_fp32() { "fp32" } else { "bf16 autocast" },
        if fused { "fused" } else { "plain" },
    ));
    // Forward + loss at the run's precision (the loss comes back f32 either way).
    let loss_at = |x: &tch::Tensor, y: &tch::Tensor| {
        with_autocast(device, precision, || calc_loss_batch(&model, x, y, true))
    };
    let eval_loss = |loader: &DataLoader| {
        with_autocast(device, precision, || {
            calc_loss_loader(&model, loader, Some(t.eval_iter), device)
        })
    };

    // DDP: the gradient all-reduce starts during the step's last backward.
    let trainable: Vec<tch::Tensor> = opt
        .params()
        .iter()
        .map(|(_, p)| p.shallow_clone())
        .collect();
    let reducer = dist.overlap_reducer(&trainable)?;
    events.start(state.step, total_steps);
    let mut samples = Vec::new();
    let mut last_time = Instant::now();
    let mut tokens_at_last = state.tokens_seen;
    // (step seconds, all-reduce seconds) of each step: the overhead data parallelism adds.
    let mut step_times: Vec<(f64, f64)> = Vec::new();
    for epoch in state.epoch..t.epochs {
        let order = train_loader.order(epoch);
        let first_group = if epoch == state.epoch {
            state.next_group
        } else {
            0
        };
        for g in first_group..groups_per_epoch {
            let lo = g * t.grad_accum_steps;
            let hi = (lo + t.grad_accum_steps).min(n_batches);
            let lr = t.schedule.lr(state.step, total_steps, t.lr);
            // Rank 0 draws the single-process run's dropout masks; the others draw their own.
            seed_for_step(
                spec.seed
                    .wrapping_add((dist.rank as u64).wrapping_mul(0x9E37_79B9)),
                state.step,
            );
            let step_start = Instant::now();
            let comm_before = dist.allreduce_secs();
            opt.zero_grad();
            let mut step_loss = 0.0;
            for b in lo..hi {
                let (x, y) = train_loader.batch_in_order(&order, b, device);
                state.tokens_seen += x.numel();
                // (global_batch, n) -> this rank's (batch_size, n)
                let (x, y) = if dist.world > 1 {
                    let at = (dist.rank * t.batch_size) as i64;
                    let b = t.batch_size as i64;
                    (x.narrow(0, at, b), y.narrow(0, at, b))
                } else {
                    (x, y)
                };
                let loss = loss_at(&x, &y)?;
                let loss_v = super::finite_loss(&loss, state.step, epoch)?;
                step_loss += loss_v / (hi - lo) as f64;
                if let (Some(r), true) = (&reducer, b + 1 == hi) {
                    r.arm();
                }
                (loss / (hi - lo) as f64).backward();
            }
            // DDP: the mean gradient over the ranks (= the gradient of the global batch's mean
            // loss), then clipping sees the same norm on every rank.
            match &reducer {
                Some(r) => dist.finish_reduce(r)?,
                None => {
                    dist.allreduce_mean(&trainable.iter().map(|p| p.grad()).collect::<Vec<_>>())?
                }
            }
            let step_loss = dist.mean_f64(step_loss)?;
            let grad_norm = opt.clip_grad_norm(t.max_grad_norm);
            opt.update(lr, fused)?;
            step_times.push((
                step_start.elapsed().as_secs_f64(),
                dist.allreduce_secs() - comm_before,
            ));
            state.step += 1;
            events.step(state.step, step_loss);
            state.lr = lr;
            state.epoch = epoch;
            state.next_group = g + 1;
            if (state.step - 1).is_multiple_of(t.eval_freq) {
                let train_loss = eval_loss(&train_loader)?;
                let val_loss = eval_loss(&val_loader)?;
                let secs = last_time.elapsed().as_secs_f64().max(1e-9);
                let rec = EvalRecord {
                    step: state.step,
                    epoch: epoch + 1,
                    tokens_seen: state.tokens_seen,
                    train_loss,
                    val_loss,
                    lr,
                    grad_norm,
                    tokens_per_sec: (state.tokens_seen - tokens_at_last) as f64 / secs,
                };
                last_time = Instant::now();
                tokens_at_last = state.tokens_seen;
                events.log(&format!(
                    "Ep {} (Step {:06}): Train loss {train_loss:.3}, Val loss {val_loss:.3}, lr {lr:.2e}, {:.0} tok/s",
                    epoch + 1,
                    state.step - 1,
                    rec.tokens_per_sec
                ));
                if main {
                    append_line(&metrics_path, &serde_json::to_string(&rec)?)?;
                }
                events.eval(&rec);
                evals.push(rec);
            }
            let epoch_done = g + 1 == groups_per_epoch;
            if epoch_done {
                state.epoch = epoch + 1;
                state.next_group = 0;
            }
            let stop = dist.any(crate::signal::interrupted())?;
            let due = (t.checkpoint_every > 0 && state.step.is_multiple_of(t.checkpoint_every))
                || epoch_done
                || stop;
            if due && main {
                checkpoint::save(run_dir, &vs, &opt, &state, t.keep_checkpoints)?;
            }
            if stop {
                return Err(LlmError::Interrupted {
                    step: state.step,
                    dir: run_dir.to_path_buf(),
                }
                .into());
            }
        }
        if !main {
            continue;
        }
        // Book `generate_and_print_sample`, seeded so a resumed run prints the same text.
        let prompt: Vec<i64> = tok
            .encode(&spec.generate.prompt)?
            .into_iter()
            .map(i64::from)
            .collect();
        let gen = generate(
            &model,
            &prompt,
            &spec
                .generate
                .settings(spec.seed.wrapping_add(state.step as u64)),
        )?;
        let mut ids = prompt.clone();
        ids.extend(&gen.ids);
        let text = tok.decode(&ids.iter().map(|&i| i as u32).collect::<Vec<_>>())?;
        events.log(&text.replace('\n', " "));
        events.sample(state.step, epoch + 1, &text);
        append_line(
            &samples_path,
            &serde_json::json!({"epoch": epoch + 1, "step": state.step, "text": text}).to_string(),
        )?;
        samples.push(text);
    }

    if dist.world > 1 && step_times.len() > 1 {
        // The first step warms up (allocations, gloo's first connections); leave it out.
        let rest = &step_times[1..];
        let n = rest.len() as f64;
        let step_ms = rest.iter().map(|t| t.0).sum::<f64>() / n * 1e3;
        let comm_ms = rest.iter().map(|t| t.1).sum::<f64>() / n * 1e3;
        events.log(&format!(
            "data parallel: the gradient all-reduce took {comm_ms:.1} ms of the {step_ms:.1} ms step ({:.1} %), mean of steps 2..{} on rank 0",
            100.0 * comm_ms / step_ms.max(1e-9),
            step_times.len()
        ));
    }
    if !main {
        return Ok(RunOutcome {
            run_dir: run_dir.into(),
            evals,
            samples,
            resumed_from_step,
            already_finished: false,
            total_steps,
        });
    }
    crate::resolve::source::save_model_folder(&vs, &cfg, run_dir)?;
    write_loss_plot(
        &evals,
        groups_per_epoch,
        &run_dir.join("losses.png"),
        &spec.name,
    )?;
    run.finish(Some(state.step))?;
    Ok(RunOutcome {
        run_dir: run_dir.into(),
        evals,
        samples,
        resumed_from_step,
        already_finished: false,
        total_steps,
    })
}

/// `losses.png`: the book's Figure 5.12 from `metrics.jsonl` records.
pub fn write_loss_plot(
    evals: &[EvalRecord],
    steps_per_epoch: usize,
    path: &Path,
    title: &str,
) -> Result<bool> {
    let points: Vec<LossPoint> = evals
        .iter()
        .map(|r| LossPoint {
            epoch: r.step as f64 / steps_per_epoch.max(1) as f64,
            tokens_seen: r.tokens_seen as f64,
            train_loss: r.train_loss,
            val_loss: r.val_loss,
        })
        .collect();
    plot_losses(&points, path, title)
}
