//! Perplexity of a text with a strided sliding window (book ch05 §5.1.2 defines perplexity as
//! `exp(cross-entropy)`; the window is Hugging Face's guide "Perplexity of fixed-length models",
//! <https://huggingface.co/docs/transformers/perplexity>).
//!
//! The text's tokens (with the model's BOS token when it expects one, as `generate` encodes a
//! prompt) are read in windows of `max_length` tokens whose starts move by `stride`:
//! `begin = 0, stride, 2·stride, …`, `end = min(begin + max_length, seq_len)`, stopping after the
//! window that reaches the end. Each window scores only the targets no earlier window scored:
//! with `trg_len = end - prev_end`, the labels of its first `n - trg_len` positions are -100.
//!
//! **What is counted** — exactly what the guide's current code computes. The model shifts the
//! labels inside (logit `j - 1` predicts label `j`), so label 0 of a window is never scored: the
//! first window scores `trg_len - 1` targets, every later one all its `trg_len` targets (its
//! label 0 is already -100 when `stride < max_length`). The guide nonetheless weights every
//! window's mean loss by `num_valid_tokens - batch_size = trg_len - 1`:
//!
//! ```text
//! nll    = Σ_w mean_w · (trg_len_w - 1) / Σ_w (trg_len_w - 1)
//! tokens = Σ_w (trg_len_w - 1) = seq_len - windows
//! perplexity = exp(nll)
//! ```
//!
//! so `nll` is a weighted mean of the windows' mean losses, not the plain mean over the
//! `seq_len - 1` targets (every target but the first is scored exactly once). With a stride well
//! below max_length the two differ little, but at stride 1 every later window has weight 0 and
//! the guide's figure is the first window's alone. We report the guide's `perplexity`, `nll`
//! and `tokens`, and beside them `exact_nll`, the plain mean over the `scored_tokens =
//! seq_len - 1` targets. One deliberate difference: a window that scores nothing (a last window of one
//! token, when `seq_len - 1` is a multiple of the stride and the previous window ended there)
//! has weight 0 in both, but the guide's `0 · NaN` makes its result NaN; here it adds nothing.
use crate::data::Registry;
use crate::error::{read_text, LlmError};
use crate::resolve::LoadedLm;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

/// One window of the slide: tokens `begin..end`, of which the last `trg_len` are targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub begin: usize,
    pub end: usize,
    pub trg_len: usize,
}

impl Window {
    pub fn len(&self) -> usize {
        self.end - self.begin
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.begin
    }

    /// Label positions (inside the window) the model's shifted loss scores: `first..len`.
    pub fn first_scored(&self) -> usize {
        (self.len() - self.trg_len).max(1)
    }

    /// The guide's weight of this window's mean loss (`num_valid_tokens - batch_size`).
    pub fn weight(&self) -> usize {
        self.trg_len - 1
    }
}

/// The guide's windows over `seq_len` tokens (`1 <= stride <= max_length`, checked by
/// [`PerplexitySpec::validate`]).
pub fn windows(seq_len: usize, max_length: usize, stride: usize) -> Vec<Window> {
    let mut out = Vec::new();
    let mut prev_end = 0;
    let mut begin = 0;
    while begin < seq_len {
        let end = (begin + max_length).min(seq_len);
        out.push(Window {
            begin,
            end,
            trg_len: end - prev_end,
        });
        prev_end = end;
        if end == seq_len {
            break;
        }
        begin += stride;
    }
    out
}

/// Window settings (`llmlab eval perplexity`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerplexitySpec {
    /// Tokens per window (default: the model's context length).
    #[serde(default)]
    pub max_length: Option<usize>,
    /// How far each window's start moves (default: half of max_length, the guide's 512 of 1024).
    #[serde(default)]
    pub stride: Option<usize>,
    /// Windows of equal length per forward pass (default 1).
    #[serde(default)]
    pub batch_size: Option<usize>,
}

impl PerplexitySpec {
    /// `(max_length, stride, batch_size)` for a model of context `context_length`, or a usage
    /// error naming the option.
    pub fn resolve(&self, context_length: usize) -> Result<(usize, usize, usize), LlmError> {
        let max_length = self.max_length.unwrap_or(context_length);
        if max_length < 2 || max_length > context_length {
            return Err(LlmError::Usage(format!(
                "--max-length {max_length}: expected 2..={context_length} (the model's context length)"
            )));
        }
        let stride = self.stride.unwrap_or((max_length / 2).max(1));
        if stride == 0 || stride > max_length {
            return Err(LlmError::Usage(format!(
                "--stride {stride}: expected 1..={max_length} (--max-length); a longer stride would skip tokens"
            )));
        }
        let batch = self.batch_size.unwrap_or(1);
        if batch == 0 {
            return Err(LlmError::Usage("--batch-size 0: expected >= 1".into()));
        }
        Ok((max_length, stride, batch))
    }
}

/// What `llmlab eval perplexity` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerplexityResult {
    /// `exp(nll)`.
    pub perplexity: f64,
    /// The guide's average negative log-likelihood per token (nats; see the module doc).
    pub nll: f64,
    /// The guide's token count, `Σ (trg_len - 1)` = text tokens - windows.
    pub tokens: usize,
    /// The mean negative log-likelihood over every target the windows score, each once.
    pub exact_nll: f64,
    /// Targets scored: text tokens - 1.
    pub scored_tokens: usize,
    /// Tokens of the text (with BOS if the model adds one).
    pub text_tokens: usize,
    pub windows: usize,
    pub max_length: usize,
    pub stride: usize,
}

/// The text of a registered data set that is one text file (the-verdict, tinyshakespeare,
/// middlemarch); any other name is an error listing those.
pub fn dataset_text(name: &str) -> Result<String> {
    let reg = Registry::builtin()?;
    let is_text = |d: &crate::data::registry::Dataset| {
        d.files.len() == 1 && d.files[0].path.ends_with(".txt")
    };
    let texts: Vec<String> = reg
        .datasets
        .iter()
        .filter(|(_, d)| is_text(d))
        .map(|(n, _)| n.clone())
        .collect();
    match reg.datasets.get(name) {
        Some(d) if is_text(d) => {
            let dir = reg.fetch(name)?;
            Ok(read_text(&dir.join(&d.files[0].path))?)
        }
        _ => Err(LlmError::Unknown {
            what: "text data set",
            name: name.into(),
            expected: texts,
        }
        .into()),
    }
}

/// The perplexity of `text` under `lm` (eval mode, no gradients); `progress(done, total)` hears
/// about every batch of windows.
pub fn perplexity(
    lm: &LoadedLm,
    text: &str,
    spec: &PerplexitySpec,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PerplexityResult> {
    let context = usize::try_from(lm.context_length()).unwrap_or(usize::MAX);
    let (max_length, stride, batch) = spec.resolve(context)?;
    let ids = lm.encode_prompt(text)?;
    perplexity_of_ids(lm, &ids, max_length, stride, batch, progress)
}

/// [`perplexity`] of token ids with resolved settings.
pub fn perplexity_of_ids(
    lm: &LoadedLm,
    ids: &[i64],
    max_length: usize,
    stride: usize,
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PerplexityResult> {
    if ids.len() < 2 {
        return Err(LlmError::Usage(format!(
            "the text has {} token(s); perplexity needs at least 2 (a context and a target)",
            ids.len()
        ))
        .into());
    }
    let device = lm.vs.device();
    let ws = windows(ids.len(), max_length, stride);
    let (mut nll_sum, mut n_tokens) = (0f64, 0usize);
    let (mut exact_sum, mut scored_tokens) = (0f64, 0usize);
    let mut done = 0;
    let _g = tch::no_grad_guard();
    // Consecutive windows of one length go through the model together (all but the last one
    // are max_length long).
    for group in ws.chunk_by(|a, b| a.len() == b.len()) {
        for chunk in group.chunks(batch) {
            let n = chunk[0].len();
            let rows: Vec<i64> = chunk
                .iter()
                .flat_map(|w| ids[w.begin..w.end].iter().copied())
                .collect();
            let b = chunk.len() as i64;
            let input = Tensor::from_slice(&rows)
                .view([b, n as i64])
                .to_device(device); // (b, n)
            let logits = lm.forward_logits(&input); // (b, n, vocab)
            let v = logits.size()[2];
            // Logit j - 1 predicts label j: (b·(n - 1), vocab) against (b·(n - 1),).
            let pred = logits.narrow(1, 0, n as i64 - 1).reshape([-1, v]);
            let target = input.narrow(1, 1, n as i64 - 1).reshape([-1]);
            let nll = pred
                .to_kind(Kind::Float)
                .cross_entropy_loss::<Tensor>(&target, None, Reduction::None, -100, 0.0)
                .view([b, n as i64 - 1]) // (b, n - 1): label j at column j - 1
                .to_kind(Kind::Double)
                .to_device(tch::Device::Cpu);
            let nll: Vec<f64> = Vec::try_from(nll.reshape([-1]))?;
            for (r, w) in chunk.iter().enumerate() {
                let row = &nll[r * (n - 1)..(r + 1) * (n - 1)];
                let scored = &row[w.first_scored() - 1..];
                if !scored.is_empty() {
                    let sum = scored.iter().sum::<f64>();
                    nll_sum += sum / scored.len() as f64 * w.weight() as f64;
                    exact_sum += sum;
                    scored_tokens += scored.len();
                }
                n_tokens += w.weight();
            }
            done += chunk.len();
            progress(done, ws.len());
        }
    }
    if n_tokens == 0 {
        return Err(LlmError::Usage(format!(
            "no token was scored ({} tokens, max_length {max_length}, stride {stride})",
            ids.len()
        ))
        .into());
    }
    let nll = nll_sum / n_tokens as f64;
    Ok(PerplexityResult {
        perplexity: nll.exp(),
        nll,
        tokens: n_tokens,
        exact_nll: exact_sum / scored_tokens as f64,
        scored_tokens,
        text_tokens: ids.len(),
        windows: ws.len(),
        max_length,
        stride,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guide's loop by hand: 10 tokens, windows of 4 moved by 3.
    #[test]
    fn windows_follow_the_guide() {
        let w = windows(10, 4, 3);
        let t: Vec<(usize, usize, usize)> = w.iter().map(|w| (w.begin, w.end, w.trg_len)).collect();
        assert_eq!(t, vec![(0, 4, 4), (3, 7, 3), (6, 10, 3)]);
        // First window: labels 1..4 scored (3), weight 3; later: labels 1..4 scored (3), weight 2.
        assert_eq!((w[0].first_scored(), w[0].weight()), (1, 3));
        assert_eq!((w[1].first_scored(), w[1].weight()), (1, 2));
        let tokens: usize = w.iter().map(Window::weight).sum();
        assert_eq!(tokens, 10 - w.len());
        // stride = max_length: disjoint windows; a last window of one token scores nothing.
        let w = windows(9, 4, 4);
        let t: Vec<(usize, usize, usize)> = w.iter().map(|w| (w.begin, w.end, w.trg_len)).collect();
        assert_eq!(t, vec![(0, 4, 4), (4, 8, 4), (8, 9, 1)]);
        assert_eq!((w[2].first_scored(), w[2].weight()), (1, 0));
        // A text shorter than one window: one window.
        assert_eq!(
            windows(3, 8, 4),
            vec![Window {
                begin: 0,
                end: 3,
                trg_len: 3
            }]
        );
    }

    #[test]
    fn bad_settings_name_the_flag() {
        let s = |m, st| PerplexitySpec {
            max_length: m,
            stride: st,
            batch_size: None,
        };
        assert_eq!(
            s(None, None).resolve(1024).expect("present"),
            (1024, 512, 1)
        );
        let e = s(Some(2048), None)
            .resolve(1024)
            .expect_err("an error")
            .to_string();
        assert!(e.contains("--max-length 2048") && e.contains("1024"), "{e}");
        let e = s(Some(16), Some(17))
            .resolve(1024)
            .expect_err("an error")
            .to_string();
        assert!(e.contains("--stride 17"), "{e}");
        let e = s(Some(16), Some(0))
            .resolve(1024)
            .expect_err("an error")
            .to_string();
        assert!(e.contains("--stride 0"), "{e}");
    }
}
