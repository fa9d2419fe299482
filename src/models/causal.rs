//! The interface generation drives ([`CausalLm`]): logits with and without a KV cache, for
//! either family.
use crate::models::gpt::{GptCache, GptModel};
use crate::models::llama::{LlamaCache, LlamaModel};
use crate::nn::attention::{KvCache, RowPositions};
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
    /// Logits `(b, vocab)` of one new token per row `idx` `(b, 1)`, row `b` continuing its own
    /// sequence in row `b` of `cache` at position `rows.pos[b]`: a batch whose sequences have
    /// different lengths (continuous batching). The cache's rows must hold `rows.n_keys`
    /// positions; its length counter is not used.
    fn decode_rows(&self, idx: &Tensor, cache: &mut Self::Cache, rows: &RowPositions) -> Tensor;
    fn reset_cache(cache: &mut Self::Cache);
    /// The final hidden states `(b, n, emb)` of `idx` continuing the cached sequence (the cache
    /// grows by `n`); [`head`](Self::head) turns the positions a caller needs into logits.
    fn hidden_cached(&self, idx: &Tensor, cache: &mut Self::Cache) -> Tensor;
    /// Logits `(.., vocab)` of final hidden states `(.., emb)`.
    fn head(&self, hidden: &Tensor) -> Tensor;
    /// The per-layer key/value buffers of a cache.
    fn cache_layers(cache: &Self::Cache) -> &[KvCache];
    fn cache_layers_mut(cache: &mut Self::Cache) -> &mut [KvCache];
    /// A cache from per-layer buffers (see [`KvCache::broadcast`]).
    fn cache_from_layers(layers: Vec<KvCache>) -> Self::Cache;
}

/// A cache of `batch` rows whose first `len` positions repeat row 0 of `prefix` in every row,
/// with room for `capacity` positions: a shared prompt prefix (the header and few-shot examples
/// of a benchmark) computed once and continued by a batch of different suffixes.
pub fn broadcast_cache<M: CausalLm>(
    prefix: &M::Cache,
    len: i64,
    batch: i64,
    capacity: i64,
) -> M::Cache {
    M::cache_from_layers(
        M::cache_layers(prefix)
            .iter()
            .map(|l| l.broadcast(len, batch, capacity))
            .collect(),
    )
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
    fn decode_rows(&self, idx: &Tensor, cache: &mut LlamaCache, rows: &RowPositions) -> Tensor {
        self.logits(&self.hidden_rows(idx, cache, rows).select(1, 0))
    }
    fn reset_cache(cache: &mut LlamaCache) {
        cache.reset()
    }
    fn hidden_cached(&self, idx: &Tensor, cache: &mut LlamaCache) -> Tensor {
        LlamaModel::hidden_cached(self, idx, Some(cache), false)
    }
    fn head(&self, hidden: &Tensor) -> Tensor {
        self.logits(hidden)
    }
    fn cache_layers(cache: &LlamaCache) -> &[KvCache] {
        &cache.layers
    }
    fn cache_layers_mut(cache: &mut LlamaCache) -> &mut [KvCache] {
        &mut cache.layers
    }
    fn cache_from_layers(layers: Vec<KvCache>) -> LlamaCache {
        LlamaCache { layers }
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
    fn decode_rows(&self, idx: &Tensor, cache: &mut GptCache, rows: &RowPositions) -> Tensor {
        self.logits(&self.hidden_rows(idx, cache, rows).select(1, 0))
    }
    fn reset_cache(cache: &mut GptCache) {
        cache.reset()
    }
    fn hidden_cached(&self, idx: &Tensor, cache: &mut GptCache) -> Tensor {
        GptModel::hidden_cached(self, idx, Some(cache), false)
    }
    fn head(&self, hidden: &Tensor) -> Tensor {
        self.logits(hidden)
    }
    fn cache_layers(cache: &GptCache) -> &[KvCache] {
        &cache.layers
    }
    fn cache_layers_mut(cache: &mut GptCache) -> &mut [KvCache] {
        &mut cache.layers
    }
    fn cache_from_layers(layers: Vec<KvCache>) -> GptCache {
        GptCache { layers }
    }
}
