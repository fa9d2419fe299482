//! Preference tuning with DPO (book ch07/04 `train_model_dpo_simple`): each step one policy
//! forward pass over a batch's chosen and rejected responses, the reference's log-probabilities
//! from the cache (or a live reference pass), the book's loss; evaluation every `eval_freq`
//! steps on `eval_iter` batches of the training and validation pairs, with the figures before
//! the first step (`initial.json`); then the final figures on every pair, and the policy's and
//! the reference's responses to the test entries. Resumable as every fine-tuning task.
use super::data::{collate, encode, EncodedPair, PairSplits};
use super::loss::{dpo_loss, policy_logps, DpoFigures, ReferenceLogps, Split};
use super::spec::{DpoSpec, Logprobs};
use crate::error::{read_text, write_atomic};
use crate::finetune::{self, batches, FinetuneRun, Method};
use crate::instruct::data::write_splits;
use crate::instruct::train::{generation_spec, load_model, respond, save_language_model};
use crate::prompt::Prompter;
use crate::resolve::LoadedLm;
use crate::train::trainer::TrainEvents;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;
use tch::Device;

/// One line of `metrics.jsonl` at each evaluation: where the run is, and the figures of the
/// training and validation batches evaluated (`train_loss`, `val_reward_margin`, …; see
/// [`DpoFigures`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DpoEval {
    pub step: usize,
    pub epoch: usize,
    pub tokens_seen: usize,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_sec: f64,
    #[serde(flatten)]
    pub figures: BTreeMap<String, f64>,
}

/// The last line of `metrics.jsonl`: the figures on every training and validation pair.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DpoFinal {
    pub step: usize,
    pub train: DpoFigures,
    pub val: DpoFigures,
    /// Validation figures before the first step (its `eval_iter` batches).
    pub initial_val_loss: f64,
    pub val_loss: f64,
    pub val_reward_margin: f64,
    pub val_reward_accuracy: f64,
    pub train_loss: f64,
    pub train_reward_margin: f64,
    /// Pairs whose chosen and rejected responses are the same (no signal), in all splits.
    pub identical_pairs: usize,
    pub test_responses: usize,
    /// Wall time of training over every process that ran it.
    pub train_seconds: f64,
}

/// What a finished run reports.
pub type DpoOutcome = finetune::Outcome<DpoEval, DpoFinal>;

/// `train_loss`, `train_chosen_reward`, … of both splits, as a `metrics.jsonl` record holds them.
fn flat(train: &DpoFigures, val: &DpoFigures) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (s, f) in [("train", train), ("val", val)] {
        let v = serde_json::to_value(f).unwrap_or_default();
        for (k, x) in v.as_object().into_iter().flatten() {
            out.insert(format!("{s}_{k}"), x.as_f64().unwrap_or(f64::NAN));
        }
    }
    out
}

/// A model ready for DPO, its encoded pairs and its reference.
struct Prepared {
    lm: LoadedLm,
    prompter: Prompter,
    splits: PairSplits,
    train: Vec<EncodedPair>,
    val: Vec<EncodedPair>,
    pad_id: i64,
    max_len: usize,
}

fn prepare(spec: &DpoSpec, device: Device, events: &mut dyn TrainEvents) -> Result<Prepared> {
    let pairs = spec.data.read()?;
    let splits = spec.data.split(&pairs, spec.seed);
    let keys = "data.split and data.max_*";
    finetune::check_splits(splits.train.len(), splits.val.len(), "pairs", keys)?;
    let (lm, prompter) = load_model(
        &spec.model,
        &spec.finetune,
        spec.data.prompt_style,
        spec.seed,
        device,
    )?;
    let max_len = spec
        .data
        .allowed_max_length
        .min(lm.context_length() as usize);
    let encode_split = |pairs: &[super::data::Pair], name: &str| -> Result<Vec<EncodedPair>> {
        let enc = encode(&lm, &prompter, pairs, spec.data.mask_prompt)?;
        // A response cut away entirely by the truncation has no log-probability.
        let empty = enc
            .iter()
            .filter(|p| {
                p.chosen.len().min(max_len) <= p.masked.max(1)
                    || p.rejected.len().min(max_len) <= p.masked.max(1)
            })
            .count();
        if empty > 0 {
            return Err(crate::error::LlmError::Usage(format!(
                "{empty} {name} pairs have no response tokens within data.allowed_max_length = {} tokens; raise it",
                max_len
            ))
            .into());
        }
        Ok(enc)
    };
    let train = encode_split(&splits.train, "training")?;
    let val = encode_split(&splits.val, "validation")?;
    if splits.identical > 0 {
        events.log(&format!(
            "{} pairs have the same chosen and rejected response (they carry no signal)",
            splits.identical
        ));
    }
    Ok(Prepared {
        pad_id: lm.pad_id(),
        lm,
        prompter,
        splits,
        train,
        val,
        max_len,
    })
}

/// The book's `compute_dpo_loss_loader` in eval mode: the mean figures of the first
/// `max_batches` batches (all when `None`) of `pairs` in file order.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    p: &Prepared,
    reference: &ReferenceLogps,
    split: Split,
    batch_size: usize,
    max_batches: Option<usize>,
    how: Logprobs,
    beta: f64,
) -> DpoFigures {
    let _g = tch::no_grad_guard();
    let pairs = if split == Split::Train {
        &p.train
    } else {
        &p.val
    };
    let bs = batches(pairs.len(), batch_size, false, false, 0, 0);
    let n = max_batches.unwrap_or(bs.len()).min(bs.len());
    let figures: Vec<DpoFigures> = bs[..n]
        .iter()
        .map(|idx| {
            let b = collate(
                &idx.iter().map(|&i| &pairs[i]).collect::<Vec<_>>(),
                p.pad_id,
                Some(p.max_len),
            );
            let policy = policy_logps(&p.lm, &b, how, false);
            let refs = reference.logps(&p.lm, split, idx, &b, how);
            dpo_loss(&policy, &refs, beta).1
        })
        .collect();
    DpoFigures::mean(&figures)
}

/// Runs (or resumes, or reports as finished) the DPO run `spec` describes in `run_dir`.
pub fn run(
    spec: &DpoSpec,
    run_dir: &Path,
    device: Device,
    restart: bool,
    events: &mut dyn TrainEvents,
) -> Result<DpoOutcome> {
    spec.validate()?;
    if let Some(done) = finetune::open(spec, spec.train.threads, run_dir, restart, events)? {
        return Ok(done);
    }
    let p = prepare(spec, device, events)?;
    write_splits(run_dir, &p.splits.entries())?;
    let (t, d) = (&spec.train, &spec.dpo);
    let lora = spec.finetune.method == Method::Lora;
    let reference = ReferenceLogps::new(
        d.reference,
        &p.lm,
        lora,
        &spec.model.name,
        spec.model.dropout,
        (&p.train, &p.val),
        (p.pad_id, Some(p.max_len)),
        t.batch_size,
        run_dir,
        &mut |m| events.log(m),
    )?;
    let trained = crate::finetune::set_trainable(
        &p.lm,
        spec.finetune.trainable,
        spec.finetune.method,
        None,
        None,
    );
    let mut run = FinetuneRun::start(
        run_dir,
        trained,
        t,
        spec.seed,
        device,
        p.train.len(),
        events,
    )?;
    let eval = |split, n| evaluate(&p, &reference, split, t.batch_size, n, d.logprobs, d.beta);
    let initial_path = run_dir.join("initial.json");
    let initial: (DpoFigures, DpoFigures) = match read_text(&initial_path)
        .ok()
        .filter(|_| run.resumed)
        .and_then(|s| serde_json::from_str(&s).ok())
    {
        Some(i) => i,
        None => {
            let i = (
                eval(Split::Train, Some(t.eval_iter)),
                eval(Split::Val, Some(t.eval_iter)),
            );
            write_atomic(&initial_path, serde_json::to_string(&i)?.as_bytes())?;
            run.events.log(&format!(
                "Before training: Train loss {:.3}, Val loss {:.3}, Train reward margins {:.3}, Val reward margins {:.3}",
                i.0.loss, i.1.loss, i.0.reward_margin, i.1.reward_margin
            ));
            let mut scalars = i.0.scalars("train", d.beta);
            scalars.extend(i.1.scalars("val", d.beta));
            let s: Vec<(&str, f64)> = scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            run.events.scalars(0, &s);
            i
        }
    };
    let (n_trained, n_total) = run.parameter_counts(&p.lm.vs);
    run.events.log(&format!(
        "{} train / {} val / {} test pairs, prompt style {}, beta {}, {} log-probabilities, {} reference, {n_trained} of {n_total} parameters trained ({})",
        p.splits.train.len(),
        p.splits.val.len(),
        p.splits.test.len(),
        spec.data.prompt_style.name(),
        d.beta,
        serde_yaml::to_string(&d.logprobs)?.trim(),
        serde_yaml::to_string(&d.reference)?.trim(),
        spec.finetune.method.name(),
    ));
    let sample_spec = generation_spec(
        &spec.generation,
        spec.seed,
        &p.lm,
        spec.generation.max_new_tokens.min(50),
    );
    run.begin();
    for epoch in run.epochs() {
        let order = batches(p.train.len(), t.batch_size, true, true, spec.seed, epoch);
        for g in run.groups(epoch) {
            let grad_norm = run.step(&order, epoch, g, |idx| {
                let b = collate(
                    &idx.iter().map(|&i| &p.train[i]).collect::<Vec<_>>(),
                    p.pad_id,
                    Some(p.max_len),
                );
                let policy = policy_logps(&p.lm, &b, d.logprobs, true);
                let refs = reference.logps(&p.lm, Split::Train, idx, &b, d.logprobs);
                // The book counts the chosen rows' tokens as seen.
                Ok((Some(dpo_loss(&policy, &refs, d.beta).0), b.pairs * b.cols))
            })?;
            if run.eval_due() {
                let (tr, va) = (
                    eval(Split::Train, Some(t.eval_iter)),
                    eval(Split::Val, Some(t.eval_iter)),
                );
                let rec = DpoEval {
                    step: run.state.step,
                    epoch: epoch + 1,
                    tokens_seen: run.state.seen,
                    lr: run.lr(),
                    grad_norm,
                    tokens_per_sec: run.throughput(),
                    figures: flat(&tr, &va),
                };
                let mut more = tr.scalars("train", d.beta);
                more.extend(va.scalars("val", d.beta));
                more.retain(|(k, _)| k != "train/loss" && k != "val/loss");
                more.push(("train/tokens_per_sec".into(), rec.tokens_per_sec));
                let more: Vec<(&str, f64)> = more.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                run.record_eval(
                    epoch,
                    rec,
                    (tr.loss, va.loss),
                    grad_norm,
                    &more,
                    &format!(
                        ", Train reward margins {:.3}, Val reward margins {:.3}",
                        tr.reward_margin, va.reward_margin
                    ),
                )?;
            }
            if run.epoch_done(g) {
                let sample = respond(&p.lm, &p.prompter, &p.splits.val[0].entry, &sample_spec)?;
                run.events
                    .log(&format!("Sample after epoch {}: {sample:?}", epoch + 1));
                run.events.sample(run.state.step, epoch + 1, &sample);
            }
            run.end_step(g)?;
        }
    }
    let train_seconds = run.train_seconds();
    let (train, val) = (eval(Split::Train, None), eval(Split::Val, None));

    // The policy's and the reference's responses to the test entries (the book prints both).
    let mut n_responses = 0;
    if spec.generation.responses && !p.splits.test.is_empty() {
        let gen = generation_spec(
            &spec.generation,
            spec.seed,
            &p.lm,
            spec.generation.max_new_tokens,
        );
        let t0 = Instant::now();
        let mut out = Vec::with_capacity(p.splits.test.len());
        let reference_model = match &reference {
            ReferenceLogps::Copy(m) => Some(m.as_ref()),
            _ if !lora => None,
            _ => Some(&p.lm),
        };
        for pair in &p.splits.test {
            let e = &pair.entry;
            let mut rec = e.raw.clone();
            if let Some(r) = reference_model {
                let answer =
                    crate::nn::lora::without_adapters(|| respond(r, &p.prompter, e, &gen))?;
                rec.insert("reference_response".into(), answer.into());
            }
            rec.insert(
                "model_response".into(),
                respond(&p.lm, &p.prompter, e, &gen)?.into(),
            );
            out.push(serde_json::Value::Object(rec));
            if crate::signal::interrupted() {
                return Err(run.interrupted().into());
            }
        }
        write_atomic(
            &run_dir.join("responses.json"),
            serde_json::to_string_pretty(&out)?.as_bytes(),
        )?;
        n_responses = out.len();
        run.events.log(&format!(
            "{n_responses} test responses in {:.1}s -> {}",
            t0.elapsed().as_secs_f64(),
            run_dir.join("responses.json").display()
        ));
    }
    let result = DpoFinal {
        step: run.state.step,
        train,
        val,
        initial_val_loss: initial.1.loss,
        val_loss: val.loss,
        val_reward_margin: val.reward_margin,
        val_reward_accuracy: val.reward_accuracy,
        train_loss: train.loss,
        train_reward_margin: train.reward_margin,
        identical_pairs: p.splits.identical,
        test_responses: n_responses,
        train_seconds,
    };
    run.events.log(&format!(
        "Final: Train loss {:.3}, Val loss {:.3} (before: {:.3}), Train reward margins {:.3}, Val reward margins {:.3}, Val reward accuracy {:.1}%",
        train.loss,
        val.loss,
        initial.1.loss,
        train.reward_margin,
        val.reward_margin,
        val.reward_accuracy * 100.0
    ));
    let mut scalars = train.scalars("final/train", d.beta);
    scalars.extend(val.scalars("final/val", d.beta));
    let scalars: Vec<(&str, f64)> = scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let groups = run.groups_per_epoch();
    let style = p.prompter.style;
    run.finish(result, &scalars, |evals, trained| {
        save_language_model(
            run_dir,
            &spec.task,
            &spec.model.name,
            &spec.finetune,
            style,
            trained,
        )?;
        let fig = |r: &DpoEval, k: &str| r.figures.get(k).copied().unwrap_or(f64::NAN);
        // The book's loss and reward-margin figures.
        finetune::plot_curves(
            evals,
            groups,
            run_dir,
            &spec.name,
            "Tokens seen",
            |r: &DpoEval| (r.step, r.tokens_seen),
            &[
                ("loss.png", "DPO loss", &|r: &DpoEval| {
                    (fig(r, "train_loss"), fig(r, "val_loss"))
                }),
                ("reward_margins.png", "reward margin", &|r: &DpoEval| {
                    (fig(r, "train_reward_margin"), fig(r, "val_reward_margin"))
                }),
            ],
        )
    })
}
