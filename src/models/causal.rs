//! The interface generation drives ([`CausalLm`]): logits with and without a KV cache, for
//! either family.
use crate::models::gpt::{GptCache, GptModel};
use crate::models::llama::{LlamaCache, LlamaModel};
use tch::{Device, Tensor};

/// A causal language model that generation can drive, with or without a KV cache.
pub trait CausalLm {
    type Cache;
    fn context_length(&self) -> i64;
    fn vocab_size(&self) -> i64;
    fn device(&self) -> Device;
    /// Logits `(b, n, vocab)` for token ids `(b, n)` at positions `0..n`.
    fn forward_logits(&self, idx: &Tensor) -> Tensor;
    /// An empty cache for `batch` sequences of up to `capacity` tokens (clamped to the context).
    fn new_cache(&self, batch: i64, capacity: i64) -> Self::Cache;
    /// Logits for `idx` continuing the cached sequence; the cache grows by `n`.
    fn forward_logits_cached(&self, idx: &Tensor, cache: &mut Self::Cache) -> Tensor;
    /// Logits of the last position only, `(b, vocab)`: what decoding needs; skips the output
    /// head for the other positions of a long prompt.
    fn forward_last_logits_cached(&self, idx: &Tensor, cache: &mut Self::Cache) -> Tensor {
        self.forward_logits_cached(idx, cache).select(1, -1)
    }
    fn reset_cache(cache: &mut Self::Cache);
}

impl CausalLm for LlamaModel {
    type Cache = LlamaCache;
    fn context_length(&self) -> i64 {
        self.cfg.context_length
    }
    fn vocab_size(&self) -> i64 {
        self.cfg.vocab_size
    }
    fn device(&self) -> Device {
        LlamaModel::device(self)
    }
    fn forward_logits(&self, idx: &Tensor) -> Tensor {
        self.forward_t(idx, false)
    }
    fn new_cache(&self, batch: i64, capacity: i64) -> LlamaCache {
        LlamaModel::new_cache(self, batch, capacity)
    }
    fn forward_logits_cached(&self, idx: &Tensor, cache: &mut LlamaCache) -> Tensor {
        self.logits(&self.hidden_cached(idx, Some(cache), false))
    }
    fn forward_last_logits_cached(&self, idx: &Tensor, cache: &mut LlamaCache) -> Tensor {
        let h = self.hidden_cached(idx, Some(cache), false);
        self.logits(&h.select(1, -1))
    }
    fn reset_cache(cache: &mut LlamaCache) {
        cache.reset()
    }
}

impl CausalLm for GptModel {
    type Cache = GptCache;
    fn context_length(&self) -> i64 {
        self.cfg.context_length
    }
    fn vocab_size(&self) -> i64 {
        self.cfg.vocab_size
    }
    fn device(&self) -> Device {
        self.tok_emb.ws.device()
    }
    fn forward_logits(&self, idx: &Tensor) -> Tensor {
        self.forward_t(idx, false)
    }
    fn new_cache(&self, batch: i64, _capacity: i64) -> GptCache {
        GptModel::new_cache(self, batch)
    }
    fn forward_logits_cached(&self, idx: &Tensor, cache: &mut GptCache) -> Tensor {
        self.logits(&self.hidden_cached(idx, Some(cache), false))
    }
    fn forward_last_logits_cached(&self, idx: &Tensor, cache: &mut GptCache) -> Tensor {
        let h = self.hidden_cached(idx, Some(cache), false);
        self.logits(&h.select(1, -1))
    }
    fn reset_cache(cache: &mut GptCache) {
        cache.reset()
    }
}
