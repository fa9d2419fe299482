//! Log-likelihoods of continuations, the way lm-evaluation-harness's `loglikelihood` requests
//! define them, batched and with a shared prompt prefix computed once.
//!
//! A request is a context and its candidate continuations (MMLU's " A" … " D", or the choice
//! texts). As lm-eval's `_encode_pair` does, whitespace that ends the context moves to the front
//! of the continuation, and the continuation's tokens are those of `encode(context + cont)` after
//! the first `len(encode(context))`: a merge across the boundary stays in the continuation. The
//! score of a continuation is the sum of the log-probabilities of its tokens, each predicted from
//! `context + the continuation's earlier tokens`.
//!
//! How it is computed: when every continuation is one token, one forward pass of the context
//! scores them all from the logits of its last position; otherwise each continuation is a row
//! of its own. Rows are batched (right-padded; padding comes after every scored position, so
//! causal attention never lets it in), and a prefix every row shares (a benchmark's header and
//! few-shot examples) is run once into a KV cache that each batch starts from
//! ([`broadcast_cache`]). Only the positions that predict a target go through the output head.
use crate::models::causal::broadcast_cache;
use crate::models::CausalLm;
use anyhow::Result;
use tch::{Kind, Tensor};

/// A context and its candidate continuations, as token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub context: Vec<i64>,
    pub continuations: Vec<Vec<i64>>,
}

/// lm-eval's `_encode_pair`: the context's trailing whitespace moves to the continuation, and the
/// continuation's tokens are what `encode(context + continuation)` has after `encode(context)`.
pub fn encode_pair(
    encode: &impl Fn(&str) -> Result<Vec<i64>>,
    context: &str,
    continuations: &[String],
) -> Result<Request> {
    let trimmed = context.trim_end();
    let moved = &context[trimmed.len()..];
    let ctx = encode(trimmed)?;
    let continuations = continuations
        .iter()
        .map(|c| {
            let whole = encode(&format!("{trimmed}{moved}{c}"))?;
            Ok(whole.get(ctx.len()..).unwrap_or_default().to_vec())
        })
        .collect::<Result<_>>()?;
    Ok(Request {
        context: ctx,
        continuations,
    })
}

/// One sequence to run: its input tokens and, per continuation it scores, the `(position,
/// target)` pairs whose log-probabilities add up to that continuation's score (the logits at
/// `position` predict `target`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub input: Vec<i64>,
    pub targets: Vec<Vec<(usize, i64)>>,
}

impl Row {
    /// Tokens the model sees for this row.
    pub fn len(&self) -> usize {
        self.input.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input.is_empty()
    }

    fn first_scored(&self) -> Option<usize> {
        self.targets.iter().flatten().map(|&(p, _)| p).min()
    }
}

impl Request {
    /// The rows that score this request: one when every continuation is a single token (the
    /// context's last position predicts each), else one per continuation, whose input is
    /// `context + continuation` without its last token (lm-eval's `inp`).
    pub fn rows(&self) -> Vec<Row> {
        let n = self.context.len();
        if self.one_row() {
            return vec![Row {
                input: self.context.clone(),
                targets: self
                    .continuations
                    .iter()
                    .map(|c| vec![(n - 1, c[0])])
                    .collect(),
            }];
        }
        self.continuations
            .iter()
            .map(|c| {
                let mut input: Vec<i64> = self.context.iter().chain(c).copied().collect();
                input.pop();
                let targets = c.iter().enumerate().map(|(i, &t)| (n + i - 1, t)).collect();
                Row {
                    input,
                    targets: vec![targets],
                }
            })
            .collect()
    }

    /// Whether one row scores every continuation (each is one token).
    fn one_row(&self) -> bool {
        !self.context.is_empty() && self.continuations.iter().all(|c| c.len() == 1)
    }

    /// How many rows [`rows`](Self::rows) makes.
    pub fn row_count(&self) -> usize {
        if self.one_row() {
            1
        } else {
            self.continuations.len()
        }
    }

    /// Tokens of the longest row: what must fit the model's context.
    pub fn longest_row(&self) -> usize {
        let n = self.context.len();
        if self.one_row() {
            return n;
        }
        self.continuations
            .iter()
            .map(|c| (n + c.len()).saturating_sub(1))
            .max()
            .unwrap_or(0)
    }
}

/// Splits each request's row scores back into one score per continuation.
fn request_scores<'a>(
    requests: impl IntoIterator<Item = &'a Request>,
    row_scores: Vec<Vec<f64>>,
) -> Vec<Vec<f64>> {
    let mut it = row_scores.into_iter();
    requests
        .into_iter()
        .map(|r| it.by_ref().take(r.row_count()).flatten().collect())
        .collect()
}

/// How many leading tokens `a` and `b` share.
fn common_prefix(a: &[i64], b: &[i64]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A model and a prompt prefix run once into a KV cache; [`score`](Self::score) continues it.
pub struct PrefixScorer<'m, M: CausalLm> {
    model: &'m M,
    prefix: Vec<i64>,
    cache: Option<M::Cache>,
}

impl<'m, M: CausalLm> PrefixScorer<'m, M> {
    /// Runs `prefix` (possibly empty) through `model` once; a prefix longer than the model's
    /// context is cut to it (rows fit the context, so they cannot share more).
    pub fn new(model: &'m M, prefix: &[i64]) -> Self {
        let _g = tch::no_grad_guard();
        let prefix = &prefix[..prefix.len().min(model.context_length().max(0) as usize)];
        let cache = (!prefix.is_empty()).then(|| {
            let mut c = model.new_cache(1, prefix.len() as i64);
            let idx = Tensor::from_slice(prefix)
                .view([1, -1])
                .to_device(model.device());
            let _ = model.hidden_cached(&idx, &mut c);
            c
        });
        Self {
            model,
            prefix: prefix.to_vec(),
            cache,
        }
    }

    /// A scorer whose cache also holds `tokens` (this one's cache is reused for the part of
    /// `tokens` that agrees with its prefix; the rest is run). Cut to the model's context.
    pub fn extended(&self, tokens: &[i64]) -> Self {
        let _g = tch::no_grad_guard();
        let model = self.model;
        let tokens = &tokens[..tokens.len().min(model.context_length().max(0) as usize)];
        let l = match &self.cache {
            Some(_) => common_prefix(tokens, &self.prefix),
            None => 0,
        };
        let cache = (!tokens.is_empty()).then(|| {
            let (n, rest) = (tokens.len() as i64, &tokens[l..]);
            let mut c = match &self.cache {
                Some(c) if l > 0 => broadcast_cache::<M>(c, l as i64, 1, n),
                _ => model.new_cache(1, n),
            };
            if !rest.is_empty() {
                let idx = Tensor::from_slice(rest)
                    .view([1, -1])
                    .to_device(model.device());
                let _ = model.hidden_cached(&idx, &mut c);
            }
            c
        });
        Self {
            model,
            prefix: tokens.to_vec(),
            cache,
        }
    }

    /// One score per continuation of every request. Requests whose continuations are single
    /// tokens are batched `batch_size` rows at a time; a request with longer continuations
    /// runs its context once into the cache ([`extended`](Self::extended)) and then its
    /// continuations as a batch that continues it, instead of the context once per choice.
    pub fn score_requests(&self, requests: &[Request], batch_size: usize) -> Result<Vec<Vec<f64>>> {
        let (one, many): (Vec<usize>, Vec<usize>) =
            (0..requests.len()).partition(|&i| requests[i].row_count() == 1);
        let mut out = vec![Vec::new(); requests.len()];
        let rows: Vec<Row> = one.iter().flat_map(|&i| requests[i].rows()).collect();
        let scores = request_scores(
            one.iter().map(|&i| &requests[i]),
            self.score(&rows, batch_size)?,
        );
        for (i, s) in one.into_iter().zip(scores) {
            out[i] = s;
        }
        for i in many {
            let r = &requests[i];
            let context = &r.context[..r.context.len().saturating_sub(1)];
            let rows = r.rows();
            let scores = self.extended(context).score(&rows, batch_size)?;
            out[i] = request_scores([r], scores).remove(0);
        }
        Ok(out)
    }

    /// The score of every target group of every row, in order, `batch_size` rows per forward
    /// pass (longest rows first, as lm-eval orders them, so a batch pads little). A row's
    /// tokens that agree with the prefix are taken from the cache; the rest are run.
    pub fn score(&self, rows: &[Row], batch_size: usize) -> Result<Vec<Vec<f64>>> {
        let _g = tch::no_grad_guard();
        let mut out: Vec<Vec<f64>> = rows.iter().map(|r| vec![0.0; r.targets.len()]).collect();
        let mut order: Vec<usize> = (0..rows.len())
            .filter(|&i| rows[i].first_scored().is_some())
            .collect();
        order.sort_by_key(|&i| std::cmp::Reverse(rows[i].len()));
        for chunk in order.chunks(batch_size.max(1)) {
            let batch: Vec<&Row> = chunk.iter().map(|&i| &rows[i]).collect();
            for (&i, scores) in chunk.iter().zip(self.score_batch(&batch)) {
                out[i] = scores;
            }
        }
        Ok(out)
    }

    /// How many leading tokens of every row of `batch` the cache can stand for: the common
    /// prefix with the cached tokens, but never a scored position (its logits are needed).
    fn reusable(&self, batch: &[&Row]) -> usize {
        batch
            .iter()
            .map(|r| common_prefix(&r.input, &self.prefix).min(r.first_scored().unwrap_or(0)))
            .min()
            .unwrap_or(0)
    }

    fn score_batch(&self, batch: &[&Row]) -> Vec<Vec<f64>> {
        let model = self.model;
        let dev = model.device();
        let l = match &self.cache {
            Some(_) => self.reusable(batch),
            None => 0,
        };
        let b = batch.len() as i64;
        let m = batch.iter().map(|r| r.len() - l).max().unwrap_or(1);
        let mut cache = match &self.cache {
            Some(c) if l > 0 => broadcast_cache::<M>(c, l as i64, b, (l + m) as i64),
            _ => model.new_cache(b, m as i64),
        };
        // (b, m): each row's tokens after the cached ones, right-padded with its last token.
        let mut flat = Vec::with_capacity(batch.len() * m);
        for r in batch {
            let rest = &r.input[l..];
            flat.extend_from_slice(rest);
            flat.extend(std::iter::repeat_n(
                *rest.last().unwrap_or(&0),
                m - rest.len(),
            ));
        }
        let idx = Tensor::from_slice(&flat).view([b, m as i64]).to_device(dev);
        let hidden = model.hidden_cached(&idx, &mut cache); // (b, m, emb)
        let emb = hidden.size()[2];
        // The positions that predict a target, as rows of the flattened (b·m, emb) states.
        let (mut at, mut tgt) = (Vec::new(), Vec::new());
        for (i, r) in batch.iter().enumerate() {
            for &(p, t) in r.targets.iter().flatten() {
                at.push((i * m + p - l) as i64);
                tgt.push(t);
            }
        }
        let picked = hidden
            .view([-1, emb])
            .index_select(0, &Tensor::from_slice(&at).to_device(dev)); // (P, emb)
        let logp = model
            .head(&picked)
            .to_kind(Kind::Float)
            .log_softmax(-1, Kind::Float)
            .gather(
                1,
                &Tensor::from_slice(&tgt).to_device(dev).view([-1, 1]),
                false,
            )
            .view([-1])
            .to_device(tch::Device::Cpu);
        let logp: Vec<f64> = Vec::<f32>::try_from(&logp)
            .unwrap_or_default()
            .into_iter()
            .map(f64::from)
            .collect();
        let mut k = 0;
        batch
            .iter()
            .map(|r| {
                r.targets
                    .iter()
                    .map(|g| {
                        let s = logp[k..k + g.len()].iter().sum();
                        k += g.len();
                        s
                    })
                    .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_token_continuations_share_one_row() {
        let r = Request {
            context: vec![5, 6, 7],
            continuations: vec![vec![1], vec![2], vec![3], vec![4]],
        };
        let rows = r.rows();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].input, vec![5, 6, 7]);
        assert_eq!(rows[0].targets[2], vec![(2, 3)]);
        let r = Request {
            context: vec![5, 6],
            continuations: vec![vec![1, 9], vec![2]],
        };
        let rows = r.rows();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].input, vec![5, 6, 1]);
        assert_eq!(rows[0].targets, vec![vec![(1, 1), (2, 9)]]);
        assert_eq!(rows[1].input, vec![5, 6]);
        assert_eq!(rows[1].targets, vec![vec![(1, 2)]]);
        assert_eq!(r.longest_row(), 3);
        let scores = request_scores(&[r], vec![vec![-1.0], vec![-2.0]]);
        assert_eq!(scores, vec![vec![-1.0, -2.0]]);
    }

    #[test]
    fn encode_pair_moves_trailing_whitespace() {
        // A toy byte tokenizer that merges " A" into one id, as BPE does.
        let enc = |s: &str| -> Result<Vec<i64>> {
            let mut out = Vec::new();
            let b = s.as_bytes();
            let mut i = 0;
            while i < b.len() {
                if b[i] == b' ' && i + 1 < b.len() && b[i + 1].is_ascii_uppercase() {
                    out.push(1000 + b[i + 1] as i64);
                    i += 2;
                } else {
                    out.push(b[i] as i64);
                    i += 1;
                }
            }
            Ok(out)
        };
        let r = encode_pair(&enc, "Answer: ", &["A".to_string()]).expect("ok");
        assert_eq!(r.context, enc("Answer:").expect("ok"));
        assert_eq!(r.continuations, vec![vec![1000 + b'A' as i64]]);
    }

    /// Batched rows with a cached prefix score exactly what one uncached forward pass per row
    /// gives (a tiny random GPT; the prefix and the rows disagree at the boundary).
    #[test]
    fn batched_prefix_scores_match_one_row_at_a_time() {
        use crate::models::{GptConfig, GptModel};
        tch::manual_seed(0);
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let cfg = GptConfig {
            vocab_size: 50,
            context_length: 32,
            emb_dim: 16,
            n_heads: 2,
            n_layers: 2,
            drop_rate: 0.0,
            qkv_bias: true,
            tie_weights: false,
        };
        let model = GptModel::new(&vs.root(), &cfg);
        let prefix = vec![1, 2, 3, 4, 5, 6];
        let requests = [
            Request {
                context: vec![1, 2, 3, 4, 5, 6, 7, 8],
                continuations: vec![vec![9], vec![10], vec![11], vec![12]],
            },
            Request {
                context: vec![1, 2, 3, 4, 5, 40, 7],
                continuations: vec![vec![9, 3, 2], vec![10]],
            },
            Request {
                context: vec![1, 2, 3],
                continuations: vec![vec![9, 3]],
            },
        ];
        let rows = requests.iter().flat_map(Request::rows).collect::<Vec<_>>();
        let scorer = PrefixScorer::new(&model, &prefix);
        let got = scorer.score(&rows, 3).expect("ok");
        let mut want_rows = Vec::new();
        for (r, g) in rows.iter().zip(&got) {
            let x = Tensor::from_slice(&r.input).view([1, -1]);
            let logp = tch::no_grad(|| model.forward_t(&x, false)).log_softmax(-1, Kind::Float);
            let mut want_row = Vec::new();
            for (group, &s) in r.targets.iter().zip(g) {
                let want: f64 = group
                    .iter()
                    .map(|&(p, t)| logp.double_value(&[0, p as i64, t]))
                    .sum();
                assert!((want - s).abs() < 1e-5, "{want} vs {s}");
                want_row.push(want);
            }
            want_rows.push(want_row);
        }
        // Per request, each context run once into an extended cache: the same scores.
        let want = request_scores(&requests, want_rows);
        let by_request = scorer.score_requests(&requests, 2).expect("ok");
        for (w, g) in want.iter().flatten().zip(by_request.iter().flatten()) {
            assert!((w - g).abs() < 1e-5, "{w} vs {g}");
        }
        assert_eq!(
            by_request.iter().map(Vec::len).collect::<Vec<_>>(),
            [4, 2, 1]
        );
    }
}
