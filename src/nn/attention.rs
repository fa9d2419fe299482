//! Attention, book ch03: from simple self-attention to efficient multi-head attention.
//!
//! Variable names follow the book (`W_query`, `W_key`, `W_value`, `out_proj`) so a state dict of
//! the book's modules loads without renaming. Every variant computes the same function as the
//! ones before it for matching weights (tested in `tests/attention.rs`).
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// Book §3.4.1 `SelfAttention_v1`: raw weight matrices, `x @ W` (`(d_in, d_out)`), no mask.
#[derive(Debug)]
pub struct SelfAttentionV1 {
    pub w_query: Tensor,
    pub w_key: Tensor,
    pub w_value: Tensor,
}

impl SelfAttentionV1 {
    pub fn new(p: &nn::Path, d_in: i64, d_out: i64) -> Self {
        let init = nn::Init::Uniform { lo: 0.0, up: 1.0 }; // torch.rand as in the book
        Self {
            w_query: p.var("W_query", &[d_in, d_out], init),
            w_key: p.var("W_key", &[d_in, d_out], init),
            w_value: p.var("W_value", &[d_in, d_out], init),
        }
    }

    /// `x`: `(num_tokens, d_in)` → `(num_tokens, d_out)`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let keys = x.matmul(&self.w_key);
        let queries = x.matmul(&self.w_query);
        let values = x.matmul(&self.w_value);
        let d_k = *keys.size().last().unwrap_or(&1) as f64;
        let attn_scores = queries.matmul(&keys.transpose(-2, -1));
        let attn_weights = (attn_scores / d_k.sqrt()).softmax(-1, keys.kind());
        attn_weights.matmul(&values)
    }
}

/// Book §3.4.2 `SelfAttention_v2`: `nn.Linear` projections (weights stored `(d_out, d_in)`).
#[derive(Debug)]
pub struct SelfAttentionV2 {
    pub w_query: crate::nn::layers::Linear,
    pub w_key: crate::nn::layers::Linear,
    pub w_value: crate::nn::layers::Linear,
}

fn proj(p: &nn::Path, name: &str, d_in: i64, d_out: i64, bias: bool) -> crate::nn::layers::Linear {
    crate::nn::layers::linear(p / name, d_in, d_out, bias)
}

impl SelfAttentionV2 {
    pub fn new(p: &nn::Path, d_in: i64, d_out: i64, qkv_bias: bool) -> Self {
        Self {
            w_query: proj(p, "W_query", d_in, d_out, qkv_bias),
            w_key: proj(p, "W_key", d_in, d_out, qkv_bias),
            w_value: proj(p, "W_value", d_in, d_out, qkv_bias),
        }
    }

    /// `x`: `(num_tokens, d_in)` → `(num_tokens, d_out)`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let keys = self.w_key.forward(x);
        let queries = self.w_query.forward(x);
        let values = self.w_value.forward(x);
        let d_k = *keys.size().last().unwrap_or(&1) as f64;
        let attn_weights =
            (queries.matmul(&keys.transpose(-2, -1)) / d_k.sqrt()).softmax(-1, keys.kind());
        attn_weights.matmul(&values)
    }
}

/// Upper-triangular boolean mask (`true` above the diagonal = future positions to hide), as the
/// book's registered `mask` buffer; computed on the fly, never a parameter.
pub(crate) fn causal_mask(n_q: i64, n_k: i64, device: tch::Device) -> Tensor {
    // For a query block that ends at the last key (KV cache), row i sits at key position n_k-n_q+i.
    Tensor::ones([n_q, n_k], (Kind::Bool, device)).triu(n_k - n_q + 1)
}

/// Book §3.5 `CausalAttention`: single head with causal mask and dropout on the weights.
#[derive(Debug)]
pub struct CausalAttention {
    pub w_query: crate::nn::layers::Linear,
    pub w_key: crate::nn::layers::Linear,
    pub w_value: crate::nn::layers::Linear,
    pub dropout: f64,
}

impl CausalAttention {
    pub fn new(p: &nn::Path, d_in: i64, d_out: i64, dropout: f64, qkv_bias: bool) -> Self {
        Self {
            w_query: proj(p, "W_query", d_in, d_out, qkv_bias),
            w_key: proj(p, "W_key", d_in, d_out, qkv_bias),
            w_value: proj(p, "W_value", d_in, d_out, qkv_bias),
            dropout,
        }
    }

    /// `x`: `(b, num_tokens, d_in)` → `(b, num_tokens, d_out)`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let n = x.size()[1];
        let keys = self.w_key.forward(x);
        let queries = self.w_query.forward(x);
        let values = self.w_value.forward(x);
        let d_k = *keys.size().last().unwrap_or(&1) as f64;
        let attn_scores = queries
            .matmul(&keys.transpose(1, 2))
            .masked_fill(&causal_mask(n, n, x.device()), f64::NEG_INFINITY);
        let attn_weights = (attn_scores / d_k.sqrt())
            .softmax(-1, keys.kind())
            .dropout(self.dropout, train);
        attn_weights.matmul(&values)
    }
}

/// Book §3.6.1 `MultiHeadAttentionWrapper`: independent causal heads, outputs concatenated.
#[derive(Debug)]
pub struct MultiHeadAttentionWrapper {
    pub heads: Vec<CausalAttention>,
}

impl MultiHeadAttentionWrapper {
    pub fn new(
        p: &nn::Path,
        d_in: i64,
        d_out: i64,
        num_heads: i64,
        dropout: f64,
        qkv_bias: bool,
    ) -> Self {
        let heads = (0..num_heads)
            .map(|i| CausalAttention::new(&(p / "heads" / i), d_in, d_out, dropout, qkv_bias))
            .collect();
        Self { heads }
    }

    /// `(b, n, d_in)` → `(b, n, num_heads * d_out)`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let outs: Vec<Tensor> = self.heads.iter().map(|h| h.forward_t(x, train)).collect();
        Tensor::cat(&outs, -1)
    }
}

/// Which kernel computes softmax(QKᵀ/√d)V in [`MultiHeadAttention`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionImpl {
    /// Explicit matmul, mask, softmax, dropout, matmul: the book's code.
    Manual,
    /// libtorch's fused `scaled_dot_product_attention` (default; same outputs).
    Sdpa,
}

/// Book §3.6.2 `MultiHeadAttention`: one projection for all heads, split into heads, attention,
/// heads merged, output projection. The three projections keep the book's names; at run time
/// they are applied as one `(3·d_out, d_in)` matmul (one qkv projection).
#[derive(Debug)]
pub struct MultiHeadAttention {
    pub w_query: crate::nn::layers::Linear,
    pub w_key: crate::nn::layers::Linear,
    pub w_value: crate::nn::layers::Linear,
    pub out_proj: crate::nn::layers::Linear,
    pub d_out: i64,
    pub num_heads: i64,
    pub head_dim: i64,
    pub dropout: f64,
    pub imp: AttentionImpl,
    /// `false` lets every token attend to every other one (a classification ablation).
    pub causal: bool,
}

impl MultiHeadAttention {
    pub fn new(
        p: &nn::Path,
        d_in: i64,
        d_out: i64,
        num_heads: i64,
        dropout: f64,
        qkv_bias: bool,
    ) -> Self {
        assert!(
            d_out % num_heads == 0,
            "d_out must be divisible by num_heads (checked by config validation)"
        );
        Self {
            w_query: proj(p, "W_query", d_in, d_out, qkv_bias),
            w_key: proj(p, "W_key", d_in, d_out, qkv_bias),
            w_value: proj(p, "W_value", d_in, d_out, qkv_bias),
            out_proj: proj(p, "out_proj", d_out, d_out, true),
            d_out,
            num_heads,
            head_dim: d_out / num_heads,
            dropout,
            imp: AttentionImpl::Sdpa,
            causal: true,
        }
    }

    /// Queries, keys and values in one matmul: `(b, n, d_in)` → three `(b, n, d_out)`.
    fn qkv(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        let w = Tensor::cat(&[&self.w_query.ws, &self.w_key.ws, &self.w_value.ws], 0); // (3·d_out, d_in)
        let b = match (&self.w_query.bs, &self.w_key.bs, &self.w_value.bs) {
            (Some(q), Some(k), Some(v)) => Some(Tensor::cat(&[q, k, v], 0)),
            _ => None,
        };
        let qkv = x.linear(&w, b.as_ref()); // (b, n, 3·d_out)
        let parts = qkv.split(self.d_out, -1);
        let mut it = parts.into_iter();
        match (it.next(), it.next(), it.next()) {
            (Some(q), Some(k), Some(v)) => (q, k, v),
            _ => unreachable!("split of 3·d_out by d_out gives three parts"),
        }
    }

    /// `(b, n, d_out)` → `(b, num_heads, n, head_dim)`.
    fn split_heads(&self, t: &Tensor) -> Tensor {
        let (b, n, _) = t.size3().expect("3-d activations");
        t.view([b, n, self.num_heads, self.head_dim])
            .transpose(1, 2)
    }

    /// `x`: `(b, num_tokens, d_in)` → `(b, num_tokens, d_out)`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_cached(x, None, train)
    }

    /// Queries, keys and values of `x` `(b, n, d_in)`, split into heads: three
    /// `(b, num_heads, n, head_dim)`.
    fn heads_qkv(&self, x: &Tensor, train: bool) -> (Tensor, Tensor, Tensor) {
        let (mut q, mut k, mut v) = self.qkv(x);
        // LoRA adapters (appendix E) add their low-rank updates to the fused projection.
        for (t, lin) in [
            (&mut q, &self.w_query),
            (&mut k, &self.w_key),
            (&mut v, &self.w_value),
        ] {
            if let Some(l) = &lin.lora {
                *t = l.add_delta(t.shallow_clone(), x, train);
            }
        }
        (
            self.split_heads(&q),
            self.split_heads(&k),
            self.split_heads(&v),
        )
    }

    /// Heads merged and projected: `(b, num_heads, n, head_dim)` → `(b, n, d_out)`.
    fn merge_heads(&self, ctx: &Tensor, train: bool) -> Tensor {
        let (b, _, n, _) = ctx
            .size4()
            .expect("4-d context (b, num_heads, n, head_dim)");
        let ctx = ctx.transpose(1, 2).contiguous().view([b, n, self.d_out]);
        self.out_proj.forward_t(&ctx, train)
    }

    /// As [`forward_t`](Self::forward_t); with a cache, the keys/values of `x` are appended to
    /// it and the queries attend over everything cached so far (book ch04 KV-cache bonus).
    pub fn forward_cached(&self, x: &Tensor, cache: Option<&mut KvCache>, train: bool) -> Tensor {
        let (q, k, v) = self.heads_qkv(x, train);
        let ctx = match cache {
            None => self.attend(&q, &k, &v, train), // (b, num_heads, n, head_dim)
            Some(c) => {
                let (k_all, v_all) = c.append(&k, &v);
                self.attend(&q, &k_all, &v_all, train)
            }
        };
        self.merge_heads(&ctx, train)
    }

    /// One new token per row, `x` `(b, 1, d_in)`, each row continuing its own sequence in the
    /// rows of `cache` at the positions of `rows` (continuous batching; eval mode).
    pub fn forward_rows(&self, x: &Tensor, cache: &mut KvCache, rows: &RowPositions) -> Tensor {
        let (q, k, v) = self.heads_qkv(x, false);
        let (k_all, v_all) = cache.write_rows(&k, &v, rows);
        let ctx = decode_attention(&q, &k_all, &v_all, Some(&rows.bias));
        self.merge_heads(&ctx, false)
    }

    /// Causal attention of `q` `(b, h, n_q, hd)` over `k`, `v` `(b, h, n_k, hd)`, where the
    /// queries are the last `n_q` positions of the `n_k` keys.
    pub fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, train: bool) -> Tensor {
        let n_q = q.size()[2];
        let n_k = k.size()[2];
        let p = if train { self.dropout } else { 0.0 };
        if !self.causal {
            return match self.imp {
                AttentionImpl::Sdpa => Tensor::scaled_dot_product_attention::<Tensor>(
                    q, k, v, None, p, false, None, false,
                ),
                AttentionImpl::Manual => (q.matmul(&k.transpose(2, 3))
                    / (self.head_dim as f64).sqrt())
                .softmax(-1, q.kind())
                .dropout(self.dropout, train)
                .matmul(v),
            };
        }
        match self.imp {
            // One query at the end (a decoding step) sees every key: no mask needed.
            AttentionImpl::Sdpa if n_q == 1 && !train => decode_attention(q, k, v, None),
            AttentionImpl::Sdpa => {
                if n_q == n_k {
                    Tensor::scaled_dot_product_attention::<Tensor>(
                        q, k, v, None, p, true, None, false,
                    )
                } else {
                    // is_causal aligns the mask top-left; with a cache the queries sit at the end.
                    let allowed = causal_mask(n_q, n_k, q.device()).logical_not();
                    Tensor::scaled_dot_product_attention(
                        q,
                        k,
                        v,
                        Some(allowed),
                        p,
                        false,
                        None,
                        false,
                    )
                }
            }
            AttentionImpl::Manual => {
                let attn_scores = q
                    .matmul(&k.transpose(2, 3))
                    .masked_fill(&causal_mask(n_q, n_k, q.device()), f64::NEG_INFINITY);
                let attn_weights = (attn_scores / (self.head_dim as f64).sqrt())
                    .softmax(-1, q.kind())
                    .dropout(self.dropout, train);
                attn_weights.matmul(v)
            }
        }
    }
}

/// One decoding step of a batch whose rows sit at different positions of their own sequences
/// (continuous batching: a server's requests join and leave the batch independently). Row `b`'s
/// new token sits at position `pos[b]` and attends to that row's keys `0..=pos[b]`.
#[derive(Debug)]
pub struct RowPositions {
    /// `(b,)` int64.
    pub pos: Tensor,
    /// Keys the batch's attention spans: `max(pos) + 1`.
    pub n_keys: i64,
    /// `(b, 1, 1, n_keys)` f32, added to the attention scores: 0 where key `j` is visible to row
    /// `b` (`j <= pos[b]`), -inf elsewhere.
    pub bias: Tensor,
}

impl RowPositions {
    pub fn new(pos: &[i64], device: tch::Device) -> Self {
        let b = pos.len() as i64;
        let n_keys = pos.iter().max().map_or(1, |&m| m + 1);
        let p = Tensor::from_slice(pos).to_device(device);
        let hidden = Tensor::arange(n_keys, (Kind::Int64, device))
            .view([1, n_keys])
            .gt_tensor(&p.view([b, 1]))
            .view([b, 1, 1, n_keys]);
        let bias = Tensor::zeros([b, 1, 1, n_keys], (Kind::Float, device))
            .masked_fill(&hidden, f64::NEG_INFINITY);
        Self {
            pos: p,
            n_keys,
            bias,
        }
    }
}

/// Attention of one new query per row (a decoding step): `q (b, h, 1, hd)` over `k`, `v`
/// `(b, kv, n_k, hd)`, where `kv` divides `h` (grouped-query attention: query head `i` reads
/// key/value head `i / (h / kv)`, as `scaled_dot_product_attention(enable_gqa)`), plus an
/// optional additive `bias` broadcasting to `(b, 1, 1, n_k)` (0 or -inf). Returns
/// `(b, h, 1, hd)`.
///
/// Four operators (scale, matmul, softmax, matmul; the query heads of a group share one
/// matmul against their key head) where libtorch's CPU `scaled_dot_product_attention` runs its
/// flash-attention kernel, whose set-up costs about 0.3 ms a call at this shape: a third of a
/// SmolLM2 token's time (issue 20's profile). Same arithmetic up to the order of the sums.
pub fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Tensor {
    let (b, h, n, hd) = q.size4().expect("4-d queries (b, h, 1, head_dim)");
    assert_eq!(n, 1, "decode_attention takes one query per row");
    let kv = k.size()[1];
    let q = (q * (1.0 / (hd as f64).sqrt())).reshape([b, kv, h / kv, hd]);
    let scores = q.matmul(&k.transpose(-2, -1)); // (b, kv, h / kv, n_k)
    let scores = match bias {
        Some(bias) => scores + bias.to_kind(q.kind()),
        None => scores,
    };
    scores
        .softmax(-1, q.kind())
        .matmul(v)
        .reshape([b, h, 1, hd])
}

/// Pre-allocated keys and values of one attention layer: `(b, num_heads, capacity, head_dim)`
/// buffers filled up to `len`, so decoding a token copies one row instead of re-allocating.
#[derive(Debug)]
pub struct KvCache {
    k: Tensor,
    v: Tensor,
    len: i64,
}

impl KvCache {
    pub fn new(
        b: i64,
        num_heads: i64,
        capacity: i64,
        head_dim: i64,
        kind: Kind,
        device: tch::Device,
    ) -> Self {
        Self {
            k: Tensor::zeros([b, num_heads, capacity, head_dim], (kind, device)),
            v: Tensor::zeros([b, num_heads, capacity, head_dim], (kind, device)),
            len: 0,
        }
    }

    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> i64 {
        self.k.size()[2]
    }

    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Forgets every position from `len` on (a shared prompt prefix stays; what followed it is
    /// overwritten by the next append).
    pub fn truncate(&mut self, len: i64) {
        self.len = self.len.min(len.max(0));
    }

    /// A new cache of `batch` rows and `capacity` positions whose first `len` positions hold, in
    /// every row, row 0 of this one: one prefix computed once, then continued by a batch.
    pub fn broadcast(&self, len: i64, batch: i64, capacity: i64) -> Self {
        let len = len.min(self.len);
        let size = self.k.size(); // (b, h, capacity, hd)
        let opts = (self.k.kind(), self.k.device());
        let out = Self {
            k: Tensor::zeros([batch, size[1], capacity, size[3]], opts),
            v: Tensor::zeros([batch, size[1], capacity, size[3]], opts),
            len,
        };
        if len > 0 {
            let src = |t: &Tensor| t.narrow(0, 0, 1).narrow(2, 0, len); // (1, h, len, hd)
            out.k.narrow(2, 0, len).copy_(&src(&self.k));
            out.v.narrow(2, 0, len).copy_(&src(&self.v));
        }
        out
    }

    /// Rows of the buffers.
    pub fn rows(&self) -> i64 {
        self.k.size()[0]
    }

    /// Room for `capacity` positions per row (never less than now), keeping what is cached.
    pub fn grow(&mut self, capacity: i64) {
        let size = self.k.size(); // (b, h, capacity, hd)
        if capacity <= size[2] {
            return;
        }
        let opts = (self.k.kind(), self.k.device());
        for t in [&mut self.k, &mut self.v] {
            let bigger = Tensor::zeros([size[0], size[1], capacity, size[3]], opts);
            bigger.narrow(2, 0, size[2]).copy_(t);
            *t = bigger;
        }
    }

    /// Copies the first `len` positions of row `from` of `src` into row `to` of this cache
    /// (a prompt computed alone joins a batch; a finished row's place is taken by another).
    pub fn copy_row(&mut self, to: i64, src: &KvCache, from: i64, len: i64) {
        if len == 0 {
            return;
        }
        let part = |t: &Tensor, row: i64| t.narrow(0, row, 1).narrow(2, 0, len);
        part(&self.k, to).copy_(&part(&src.k, from));
        part(&self.v, to).copy_(&part(&src.v, from));
    }

    /// Moves row `from`'s first `len` positions to row `to` within this cache.
    pub fn move_row(&mut self, from: i64, to: i64, len: i64) {
        if len == 0 || from == to {
            return;
        }
        for t in [&self.k, &self.v] {
            t.narrow(0, to, 1)
                .narrow(2, 0, len)
                .copy_(&t.narrow(0, from, 1).narrow(2, 0, len));
        }
    }

    /// Writes each row's new key and value `(b, h, 1, hd)` at its position in the first `b`
    /// rows; returns views `(b, h, n_keys, hd)` of those rows.
    pub(crate) fn write_rows(
        &mut self,
        k: &Tensor,
        v: &Tensor,
        rows: &RowPositions,
    ) -> (Tensor, Tensor) {
        let b = k.size()[0];
        assert!(
            rows.n_keys <= self.capacity() && b <= self.rows(),
            "KV cache too small for the batch (the engine grows it first)"
        );
        let row_ids = Tensor::arange(b, (Kind::Int64, k.device()));
        // Advanced indices on dims 0 and 2 (row, position): the values are (b, h, hd).
        let idx = [Some(row_ids), None, Some(rows.pos.shallow_clone())];
        let kind = self.k.kind();
        let _ = self
            .k
            .index_put_(&idx, &k.squeeze_dim(2).to_kind(kind), false);
        let _ = self
            .v
            .index_put_(&idx, &v.squeeze_dim(2).to_kind(kind), false);
        // In the new keys' dtype (a no-op unless the cache is kept in another, e.g. f16).
        let view = |t: &Tensor| {
            t.narrow(0, 0, b)
                .narrow(2, 0, rows.n_keys)
                .to_kind(k.kind())
        };
        (view(&self.k), view(&self.v))
    }

    /// The dtype the keys and values are kept in.
    pub fn buffers_kind(&self) -> Kind {
        self.k.kind()
    }

    /// The key and value buffers `(rows, heads, capacity, head_dim)`, for a kernel that writes
    /// them in place (then [`Self::advance`]).
    pub(crate) fn buffers(&mut self) -> (&mut Tensor, &mut Tensor) {
        (&mut self.k, &mut self.v)
    }

    /// Counts `n` more positions as cached (written through [`Self::buffers`]).
    pub(crate) fn advance(&mut self, n: i64) {
        assert!(self.len + n <= self.capacity(), "KV cache overflow");
        self.len += n;
    }

    /// Writes `k`, `v` `(b, h, n, hd)` after the cached positions; returns views of all of them.
    pub(crate) fn append(&mut self, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let n = k.size()[2];
        assert!(
            self.len + n <= self.capacity(),
            "KV cache overflow (the caller re-prefills at capacity)"
        );
        self.k.narrow(2, self.len, n).copy_(k);
        self.v.narrow(2, self.len, n).copy_(v);
        self.len += n;
        // In the new keys' dtype (a no-op unless the cache is kept in another, e.g. f16).
        let all = |t: &Tensor| t.narrow(2, 0, self.len).to_kind(k.kind());
        (all(&self.k), all(&self.v))
    }
}
