//! Text generation (book ch05 §5.3 and the ch04 KV-cache bonus): greedy decoding, temperature
//! scaling, top-k, top-p (nucleus), a seed, `max_new_tokens`, stop at end-of-text.
//!
//! Decoding uses the model's KV cache by default: the prompt is processed once and each new
//! token costs one position. Once the sequence outgrows the context, the cache is refilled with
//! the last `context_length` tokens before each step, which is what the no-cache path computes
//! (it crops to the same window), so both give identical greedy outputs (tested).
use crate::error::LlmError;
pub use crate::models::CausalLm;
use crate::resolve::{AnyModel, LoadedLm};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Sampling settings. `temperature` 0 means greedy (argmax), as in the book.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateSpec {
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    /// Stop when this id is produced (it is not included); GPT-2's is 50256.
    pub eos_id: Option<i64>,
    /// More ids that stop generation (a chat model's end-of-turn token).
    pub stop_ids: Vec<i64>,
    /// Use the KV cache (default); `false` recomputes the whole window for every token.
    pub use_cache: bool,
}

impl Default for GenerateSpec {
    fn default() -> Self {
        Self {
            max_new_tokens: 50,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: None,
            eos_id: Some(50256),
            stop_ids: Vec::new(),
            use_cache: true,
        }
    }
}

impl GenerateSpec {
    pub fn validate(&self) -> Result<(), LlmError> {
        let bad = |m: String| LlmError::Config {
            origin: "generation settings".into(),
            message: m,
        };
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(bad(format!(
                "temperature = {}: expected a finite value >= 0",
                self.temperature
            )));
        }
        if let Some(k) = self.top_k {
            if k < 1 {
                return Err(bad(format!("top_k = {k}: expected an integer >= 1")));
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(bad(format!("top_p = {p}: expected a value in (0, 1]")));
            }
        }
        Ok(())
    }
}

/// Book `generate`: picks the next token from the last position's logits `(b, vocab)`.
pub fn sample_next(logits: &Tensor, spec: &GenerateSpec) -> Tensor {
    let mut logits = logits.to_kind(Kind::Float);
    if let Some(k) = spec.top_k {
        let k = k.min(logits.size()[1]);
        let (top, _) = logits.topk(k, -1, true, true);
        let min_val = top.narrow(1, k - 1, 1); // (b, 1)
        logits = logits.where_self(
            &logits.ge_tensor(&min_val),
            &Tensor::from(f64::NEG_INFINITY),
        );
    }
    if spec.temperature <= 0.0 {
        return logits.argmax(-1, true); // (b, 1)
    }
    logits /= spec.temperature;
    if let Some(p) = spec.top_p.filter(|&p| p < 1.0) {
        let (sorted, idx) = logits.sort(-1, true);
        let probs = sorted.softmax(-1, Kind::Float);
        // Drop a token when the mass of the tokens before it already reaches p (keeps >= 1).
        let before = probs.cumsum(-1, Kind::Float) - &probs;
        let sorted = sorted.masked_fill(&before.ge(p), f64::NEG_INFINITY);
        logits = logits
            .full_like(f64::NEG_INFINITY)
            .scatter(-1, &idx, &sorted);
    }
    logits.softmax(-1, Kind::Float).multinomial(1, false)
}

/// Result of [`generate`]: the new token ids (prompt excluded) and timing.
#[derive(Debug, Clone)]
pub struct Generation {
    pub ids: Vec<i64>,
    pub prompt_seconds: f64,
    pub decode_seconds: f64,
    pub stopped_at_eos: bool,
}

/// Continues `prompt` (token ids, batch 1).
pub fn generate<M: CausalLm>(model: &M, prompt: &[i64], spec: &GenerateSpec) -> Result<Generation> {
    generate_stream(model, prompt, spec, |_| true)
}

/// As [`generate`], calling `on_token` with each new id as soon as it is chosen (streaming);
/// generation stops early when it returns `false`.
pub fn generate_stream<M: CausalLm>(
    model: &M,
    prompt: &[i64],
    spec: &GenerateSpec,
    mut on_token: impl FnMut(i64) -> bool,
) -> Result<Generation> {
    spec.validate()?;
    if prompt.is_empty() {
        return Err(LlmError::Usage("the prompt has no tokens".into()).into());
    }
    if let Some(&bad) = prompt.iter().find(|&&t| t < 0 || t >= model.vocab_size()) {
        return Err(LlmError::Usage(format!(
            "prompt token id {bad} is outside the model's vocabulary of {} tokens (does the tokenizer match the model?)",
            model.vocab_size()
        ))
        .into());
    }
    if let Some(seed) = spec.seed {
        crate::device::seed_everything(seed);
    }
    let _g = tch::no_grad_guard();
    let dev = model.device();
    let ctx = model.context_length();
    let mut seq: Vec<i64> = prompt.to_vec();
    let mut out = Vec::with_capacity(spec.max_new_tokens);
    let capacity = (prompt.len() + spec.max_new_tokens) as i64;
    let mut cache = spec.use_cache.then(|| model.new_cache(1, capacity));
    let window = |seq: &[i64]| {
        let start = seq.len().saturating_sub(ctx as usize);
        Tensor::from_slice(&seq[start..])
            .view([1, -1])
            .to_device(dev)
    };
    let t0 = std::time::Instant::now();
    let mut prompt_seconds = 0.0;
    let mut stopped_at_eos = false;
    // Whether the cache holds exactly `seq`'s window (false forces a refill).
    let mut cache_valid = false;
    for step in 0..spec.max_new_tokens {
        let last = match cache.as_mut() {
            None => model.forward_logits(&window(&seq)).select(1, -1),
            Some(c) => {
                if cache_valid && (seq.len() as i64) <= ctx {
                    let last = Tensor::from_slice(&seq[seq.len() - 1..])
                        .view([1, 1])
                        .to_device(dev);
                    model.forward_last_logits_cached(&last, c)
                } else {
                    M::reset_cache(c);
                    cache_valid = true;
                    model.forward_last_logits_cached(&window(&seq), c)
                }
            }
        }; // (1, vocab)
        let next = sample_next(&last, spec).int64_value(&[0, 0]);
        if step == 0 {
            prompt_seconds = t0.elapsed().as_secs_f64();
        }
        if Some(next) == spec.eos_id || spec.stop_ids.contains(&next) {
            stopped_at_eos = true;
            break;
        }
        seq.push(next);
        out.push(next);
        if !on_token(next) {
            break;
        }
        // At capacity the next step must refill from the cropped window.
        if seq.len() as i64 > ctx {
            cache_valid = false;
        }
    }
    let total = t0.elapsed().as_secs_f64();
    Ok(Generation {
        ids: out,
        prompt_seconds,
        decode_seconds: total - prompt_seconds,
        stopped_at_eos,
    })
}

impl LoadedLm {
    /// Generates from prompt ids with either family, streaming ids to `on_token`.
    pub fn generate_stream(
        &self,
        prompt: &[i64],
        spec: &GenerateSpec,
        on_token: impl FnMut(i64) -> bool,
    ) -> Result<Generation> {
        match &self.model {
            AnyModel::Gpt(m) => generate_stream(m, prompt, spec, on_token),
            AnyModel::Llama(m) => generate_stream(m, prompt, spec, on_token),
        }
    }
}
