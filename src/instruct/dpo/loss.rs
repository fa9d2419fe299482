//! The DPO loss as the book computes it (`compute_logprobs`, `compute_dpo_loss`), its figures
//! under the book's names and TRL's, and the reference model's log-probabilities: cached once
//! for every pair, or computed live.
use super::data::{collate, EncodedPair, PairBatch};
use super::spec::{Logprobs, Reference};
use crate::error::{read_text, write_atomic, LlmError};
use crate::finetune::batches;
use crate::resolve::LoadedLm;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;
use tch::{Kind, Tensor};

/// Per-sequence log-probabilities of the masked-in tokens of `ids` `(rows, cols)`: their sum
/// and their count, `(rows,)` each (the book's `compute_logprobs` before its division: labels
/// are `ids[:, 1:]`, predicted by `logits[:, :-1]`, counted where `mask[:, 1:]`).
pub fn sequence_logps(lm: &LoadedLm, ids: &Tensor, mask: &Tensor, train: bool) -> (Tensor, Tensor) {
    let (rows, cols) = ids.size2().expect("2-d ids");
    let logits = lm.model.forward_t(ids, train).narrow(1, 0, cols - 1);
    let m = mask.narrow(1, 1, cols - 1);
    let labels = ids
        .narrow(1, 1, cols - 1)
        .where_self(&m, &Tensor::from(-100i64).to_device(ids.device()));
    let nll = logits
        .flatten(0, 1)
        .to_kind(Kind::Float)
        .cross_entropy_loss::<Tensor>(&labels.flatten(0, 1), None, tch::Reduction::None, -100, 0.0)
        .view([rows, cols - 1]);
    (
        -nll.sum_dim_intlist(1, false, Kind::Float),
        m.sum_dim_intlist(1, false, Kind::Float),
    )
}

/// A sequence's log-probability from its sum and count.
fn combine(sum: &Tensor, count: &Tensor, how: Logprobs) -> Tensor {
    match how {
        Logprobs::Mean => sum / count,
        Logprobs::Sum => sum.shallow_clone(),
    }
}

/// The log-probabilities of a batch's chosen and rejected responses, `(pairs,)` each.
pub struct PairLogps {
    pub chosen: Tensor,
    pub rejected: Tensor,
}

impl PairLogps {
    /// From the `(2·pairs,)` sums and counts of a [`PairBatch`]'s rows.
    fn from_rows(sum: &Tensor, count: &Tensor, how: Logprobs) -> Self {
        let lp = combine(sum, count, how);
        let n = lp.size()[0] / 2;
        Self {
            chosen: lp.narrow(0, 0, n),
            rejected: lp.narrow(0, n, n),
        }
    }
}

/// The policy's log-probabilities of a batch (one forward pass over chosen and rejected rows).
pub fn policy_logps(lm: &LoadedLm, b: &PairBatch, how: Logprobs, train: bool) -> PairLogps {
    let (ids, mask) = b.tensors(lm.vs.device());
    let (sum, count) = sequence_logps(lm, &ids, &mask, train);
    PairLogps::from_rows(&sum, &count, how)
}

/// A batch's DPO figures (means over its pairs). The book's rewards are `π − ref` (without β);
/// TRL's `rewards/*` are β times them (see [`DpoFigures::scalars`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DpoFigures {
    pub loss: f64,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
    pub reward_margin: f64,
    /// Share of pairs whose chosen reward is above the rejected one (TRL's `rewards/accuracies`).
    pub reward_accuracy: f64,
    /// Mean policy log-probability of the chosen and rejected responses (TRL's `logps/*`).
    pub logps_chosen: f64,
    pub logps_rejected: f64,
}

impl DpoFigures {
    /// The mean of per-batch figures (the book's `compute_dpo_loss_loader`).
    pub fn mean(all: &[DpoFigures]) -> DpoFigures {
        let n = all.len().max(1) as f64;
        let f = |g: fn(&DpoFigures) -> f64| all.iter().map(g).sum::<f64>() / n;
        DpoFigures {
            loss: f(|x| x.loss),
            chosen_reward: f(|x| x.chosen_reward),
            rejected_reward: f(|x| x.rejected_reward),
            reward_margin: f(|x| x.reward_margin),
            reward_accuracy: f(|x| x.reward_accuracy),
            logps_chosen: f(|x| x.logps_chosen),
            logps_rejected: f(|x| x.logps_rejected),
        }
    }

    /// `(name, value)` in both vocabularies for split `s` (`train`, `val`, `final/val`): the
    /// book's `s/loss`, `s/chosen_reward`, `s/rejected_reward`, `s/reward_margin`, and TRL's
    /// `s/rewards/chosen|rejected|margins|accuracies` (β-scaled) and `s/logps/chosen|rejected`.
    pub fn scalars(&self, s: &str, beta: f64) -> Vec<(String, f64)> {
        vec![
            (format!("{s}/loss"), self.loss),
            (format!("{s}/chosen_reward"), self.chosen_reward),
            (format!("{s}/rejected_reward"), self.rejected_reward),
            (format!("{s}/reward_margin"), self.reward_margin),
            (format!("{s}/rewards/chosen"), beta * self.chosen_reward),
            (format!("{s}/rewards/rejected"), beta * self.rejected_reward),
            (format!("{s}/rewards/margins"), beta * self.reward_margin),
            (format!("{s}/rewards/accuracies"), self.reward_accuracy),
            (format!("{s}/logps/chosen"), self.logps_chosen),
            (format!("{s}/logps/rejected"), self.logps_rejected),
        ]
    }
}

/// The book's `compute_dpo_loss`: `−log σ(β·((π_c − π_r) − (ref_c − ref_r)))`, its mean over
/// the batch (for backward) and the batch's figures.
pub fn dpo_loss(policy: &PairLogps, reference: &PairLogps, beta: f64) -> (Tensor, DpoFigures) {
    let logits = (&policy.chosen - &policy.rejected) - (&reference.chosen - &reference.rejected);
    let loss = -(logits * beta).log_sigmoid().mean(Kind::Float);
    let chosen = (&policy.chosen - &reference.chosen).detach();
    let rejected = (&policy.rejected - &reference.rejected).detach();
    let mean = |t: &Tensor| t.mean(Kind::Float).double_value(&[]);
    let figures = DpoFigures {
        loss: loss.double_value(&[]),
        chosen_reward: mean(&chosen),
        rejected_reward: mean(&rejected),
        reward_margin: mean(&(&chosen - &rejected)),
        reward_accuracy: mean(&chosen.gt_tensor(&rejected).to_kind(Kind::Float)),
        logps_chosen: mean(&policy.chosen.detach()),
        logps_rejected: mean(&policy.rejected.detach()),
    };
    (loss, figures)
}

/// The reference log-probability sums and counts of one pair: `[chosen sum, chosen count,
/// rejected sum, rejected count]`.
type RefRow = [f64; 4];

/// `reference_logps.json`: what the reference gives every training and validation pair, and
/// what it was computed from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct RefCache {
    /// The model spec, a fingerprint of its weights (a retrained run folder of the same name
    /// gives another) and a SHA-256 of the pairs' tokens, masks and truncation.
    model: String,
    #[serde(default)]
    weights: String,
    data_sha256: String,
    train: Vec<RefRow>,
    val: Vec<RefRow>,
}

/// The cache file in a run folder.
pub const REFERENCE_CACHE: &str = "reference_logps.json";

/// Which split a batch comes from (which cached rows it reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

/// Where the reference log-probabilities come from during a run.
pub enum ReferenceLogps {
    /// Read from the values computed before training.
    Cached {
        train: Vec<RefRow>,
        val: Vec<RefRow>,
    },
    /// The policy's own weights with its LoRA adapters off.
    AdaptersOff,
    /// A frozen copy of the starting model.
    Copy(Box<LoadedLm>),
}

impl ReferenceLogps {
    /// Sets up `mode` for `lm` (the model as training starts, before any update): `cached`
    /// reads `reference_logps.json` from `dir` when it holds this model's and data's values,
    /// else computes them (in batches of `batch_size`, eval mode) and writes it; `live` with
    /// LoRA turns the adapters off for the reference, and otherwise loads a second copy of
    /// `model` (the spec `lm` came from, with `dropout`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mode: Reference,
        lm: &LoadedLm,
        lora: bool,
        model: &str,
        dropout: Option<f64>,
        (train, val): (&[EncodedPair], &[EncodedPair]),
        (pad_id, max_len): (i64, Option<usize>),
        batch_size: usize,
        dir: &Path,
        log: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        match mode {
            Reference::Live if lora => Ok(Self::AdaptersOff),
            Reference::Live => {
                let mut copy = LoadedLm::load(model, lm.vs.device())?;
                if let Some(p) = dropout {
                    copy.model.set_drop_rate(p);
                }
                for (_, t) in copy.vs.variables() {
                    let _ = t.set_requires_grad(false);
                }
                Ok(Self::Copy(Box::new(copy)))
            }
            Reference::Cached => {
                let path = dir.join(REFERENCE_CACHE);
                let sha = data_sha256(train, val, pad_id, max_len);
                let weights = weights_fingerprint(lm);
                if let Ok(text) = read_text(&path) {
                    let c: RefCache =
                        serde_json::from_str(&text).map_err(|e| LlmError::BadFile {
                            path: path.clone(),
                            message: format!("not a reference cache ({e}); delete it"),
                        })?;
                    if (&c.model, &c.weights, &c.data_sha256)
                        == (&model.to_string(), &weights, &sha)
                    {
                        log(&format!(
                            "reference log-probabilities from {}",
                            path.display()
                        ));
                        return Ok(Self::Cached {
                            train: c.train,
                            val: c.val,
                        });
                    }
                }
                let t0 = std::time::Instant::now();
                let rows = |pairs: &[EncodedPair]| -> Vec<RefRow> {
                    reference_rows(lm, pairs, pad_id, max_len, batch_size)
                };
                let c = RefCache {
                    model: model.into(),
                    weights,
                    data_sha256: sha,
                    train: rows(train),
                    val: rows(val),
                };
                write_atomic(&path, serde_json::to_string(&c)?.as_bytes())?;
                log(&format!(
                    "reference log-probabilities of {} pairs in {:.1}s -> {}",
                    train.len() + val.len(),
                    t0.elapsed().as_secs_f64(),
                    path.display()
                ));
                Ok(Self::Cached {
                    train: c.train,
                    val: c.val,
                })
            }
        }
    }

    /// The reference log-probabilities of batch `b` (pairs `idx` of `split`).
    pub fn logps(
        &self,
        policy: &LoadedLm,
        split: Split,
        idx: &[usize],
        b: &PairBatch,
        how: Logprobs,
    ) -> PairLogps {
        let _g = tch::no_grad_guard();
        match self {
            Self::Cached { train, val } => {
                let rows = if split == Split::Train { train } else { val };
                let (mut sum, mut count) = (Vec::new(), Vec::new());
                for k in [0, 2] {
                    for &i in idx {
                        sum.push(rows[i][k] as f32);
                        count.push(rows[i][k + 1] as f32);
                    }
                }
                let dev = policy.vs.device();
                PairLogps::from_rows(
                    &Tensor::from_slice(&sum).to_device(dev),
                    &Tensor::from_slice(&count).to_device(dev),
                    how,
                )
            }
            Self::AdaptersOff => {
                crate::nn::lora::without_adapters(|| policy_logps(policy, b, how, false))
            }
            Self::Copy(m) => policy_logps(m, b, how, false),
        }
    }
}

/// Every pair's reference sums and counts, batched in file order as the evaluations batch them
/// (so a pair's values are computed on exactly the rows they are compared with).
fn reference_rows(
    lm: &LoadedLm,
    pairs: &[EncodedPair],
    pad_id: i64,
    max_len: Option<usize>,
    batch_size: usize,
) -> Vec<RefRow> {
    let _g = tch::no_grad_guard();
    let mut out = Vec::with_capacity(pairs.len());
    for idx in batches(pairs.len(), batch_size, false, false, 0, 0) {
        let b = collate(
            &idx.iter().map(|&i| &pairs[i]).collect::<Vec<_>>(),
            pad_id,
            max_len,
        );
        let (ids, mask) = b.tensors(lm.vs.device());
        let (sum, count) = sequence_logps(lm, &ids, &mask, false);
        let v =
            |t: Tensor| Vec::<f64>::try_from(t.to_kind(Kind::Double).to_device(tch::Device::Cpu));
        let (sum, count) = (v(sum).unwrap_or_default(), v(count).unwrap_or_default());
        let n = idx.len();
        for i in 0..n {
            out.push([sum[i], count[i], sum[n + i], count[n + i]]);
        }
    }
    out
}

/// A SHA-256 over every weight's name, shape, sum and sum of squares (f64): what tells one set
/// of weights from another without hashing their bytes. LoRA adapters are left out (they start
/// as no change).
fn weights_fingerprint(lm: &LoadedLm) -> String {
    let _g = tch::no_grad_guard();
    let mut vars: Vec<(String, Tensor)> = lm
        .vs
        .variables()
        .into_iter()
        .filter(|(n, _)| !n.contains(".lora_"))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Sha256::new();
    for (name, t) in vars {
        let t = t.to_kind(Kind::Double);
        h.update(name.as_bytes());
        for d in t.size() {
            h.update(d.to_le_bytes());
        }
        h.update(t.sum(Kind::Double).double_value(&[]).to_le_bytes());
        h.update((&t * &t).sum(Kind::Double).double_value(&[]).to_le_bytes());
    }
    format!("{:x}", h.finalize())
}

/// A SHA-256 over the pairs' tokens and masks and the collate settings.
fn data_sha256(
    train: &[EncodedPair],
    val: &[EncodedPair],
    pad_id: i64,
    max_len: Option<usize>,
) -> String {
    let mut h = Sha256::new();
    h.update(pad_id.to_le_bytes());
    h.update(max_len.unwrap_or(0).to_le_bytes());
    for (tag, pairs) in [(b"T", train), (b"V", val)] {
        h.update(tag);
        h.update((pairs.len() as u64).to_le_bytes());
        for p in pairs {
            h.update((p.masked as u64).to_le_bytes());
            for s in [&p.chosen, &p.rejected] {
                h.update((s.len() as u64).to_le_bytes());
                for t in s {
                    h.update(t.to_le_bytes());
                }
            }
        }
    }
    format!("{:x}", h.finalize())
}
