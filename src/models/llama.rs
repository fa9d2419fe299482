//! The Llama family (the book's bonus material that turns GPT into Llama 2/3): RMSNorm instead of
//! LayerNorm, rotary position embeddings instead of learned ones (theta from the config, with
//! Llama-3.1-style frequency scaling), a SwiGLU feed-forward, grouped-query attention (any number
//! of key/value heads) and a tied or separate output head. SmolLM2 and Llama 3.x are this model.
//!
//! Parameter paths follow the book's Llama code: `tok_emb.weight`,
//! `trf_blocks.{i}.att.{W_query,W_key,W_value,out_proj}.weight`, `trf_blocks.{i}.ff.{fc1,fc2,fc3}.weight`
//! (gate, up, down), `trf_blocks.{i}.{norm1,norm2}.weight`, `final_norm.weight`, `out_head.weight`.
//! [`crate::weights::llama`] maps GGUF and Hugging Face names onto them.
use crate::error::LlmError;
use crate::nn::attention::{causal_mask, decode_attention, KvCache, RowPositions};
use crate::nn::quant::{int4_unsupported, Int4Linear, Q41Linear, Q80Linear, QuantKernel};
use crate::nn::Linear;
use crate::shim::{DecodeWeight, Isa, LlamaDecodeBlock};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// Llama 3.1 RoPE frequency scaling (`rope_type: llama3` in Hugging Face configs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_context_length: i64,
}

/// Architecture hyper-parameters; keys follow the book's `LLAMA32_CONFIG`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    /// Always `llama` (tells a Llama config file from a GPT one).
    pub family: String,
    pub vocab_size: i64,
    pub context_length: i64,
    pub emb_dim: i64,
    pub n_heads: i64,
    /// Key/value heads (grouped-query attention); `n_heads` for plain multi-head attention.
    pub n_kv_groups: i64,
    pub n_layers: i64,
    /// Width of the SwiGLU feed-forward.
    pub hidden_dim: i64,
    /// Per-head dimension; `emb_dim / n_heads` when absent.
    #[serde(default)]
    pub head_dim: Option<i64>,
    pub rope_base: f64,
    #[serde(default)]
    pub rope_freq: Option<RopeScaling>,
    #[serde(default = "default_eps")]
    pub rms_eps: f64,
    /// Share `tok_emb.weight` with the output head.
    pub tie_weights: bool,
    /// Dropout after the embeddings, the attention and the feed-forward (0 in the released
    /// models; a fine-tuning knob).
    #[serde(default)]
    pub drop_rate: f64,
}

fn default_eps() -> f64 {
    1e-5
}

const PRESETS: &[(&str, &str)] = &[
    (
        "smollm2-135m",
        include_str!("../../configs/models/smollm2-135m.yaml"),
    ),
    (
        "smollm2-360m",
        include_str!("../../configs/models/smollm2-360m.yaml"),
    ),
    (
        "smollm2-1.7b",
        include_str!("../../configs/models/smollm2-1.7b.yaml"),
    ),
    (
        "llama-3.2-1b",
        include_str!("../../configs/models/llama-3.2-1b.yaml"),
    ),
    (
        "llama-3.2-3b",
        include_str!("../../configs/models/llama-3.2-3b.yaml"),
    ),
    (
        "llama-3.1-8b",
        include_str!("../../configs/models/llama-3.1-8b.yaml"),
    ),
];

impl LlamaConfig {
    pub fn preset_names() -> Vec<String> {
        PRESETS.iter().map(|(n, _)| n.to_string()).collect()
    }

    pub fn preset(name: &str) -> Result<Self> {
        let text = super::preset_text(PRESETS, "Llama config preset", name)?;
        Self::from_yaml(text, &format!("preset {name}"))
    }

    pub fn from_yaml(text: &str, origin: &str) -> Result<Self> {
        let cfg: LlamaConfig = serde_yaml::from_str(text).map_err(|e| LlmError::Config {
            origin: origin.into(),
            message: e.to_string(),
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Whether a YAML text describes a Llama-family model (`family: llama`).
    pub fn is_llama_yaml(text: &str) -> bool {
        serde_yaml::from_str::<serde_yaml::Value>(text)
            .ok()
            .and_then(|v| {
                v.get("family")
                    .and_then(|f| f.as_str())
                    .map(|f| f == "llama")
            })
            .unwrap_or(false)
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or(self.emb_dim / self.n_heads.max(1))
    }

    pub fn validate(&self, origin: &str) -> Result<(), LlmError> {
        let err = |message: String| LlmError::Config {
            origin: origin.into(),
            message,
        };
        if self.family != "llama" {
            return Err(err(format!("family = '{}': expected 'llama'", self.family)));
        }
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("context_length", self.context_length),
            ("emb_dim", self.emb_dim),
            ("n_heads", self.n_heads),
            ("n_kv_groups", self.n_kv_groups),
            ("n_layers", self.n_layers),
            ("hidden_dim", self.hidden_dim),
        ] {
            if v < 1 {
                return Err(err(format!("{key} = {v}: expected a positive integer")));
            }
        }
        if self.n_heads % self.n_kv_groups != 0 {
            return Err(err(format!(
                "n_heads = {} is not a multiple of n_kv_groups = {}",
                self.n_heads, self.n_kv_groups
            )));
        }
        match self.head_dim {
            Some(h) if h < 2 || h % 2 != 0 => {
                return Err(err(format!(
                    "head_dim = {h}: expected an even integer >= 2 (RoPE rotates pairs)"
                )))
            }
            None if self.emb_dim % self.n_heads != 0 || (self.emb_dim / self.n_heads) % 2 != 0 => {
                return Err(err(format!(
                    "emb_dim / n_heads = {} / {} must be an even integer (or set head_dim)",
                    self.emb_dim, self.n_heads
                )))
            }
            _ => {}
        }
        if !(self.rope_base > 0.0 && self.rope_base.is_finite()) {
            return Err(err(format!(
                "rope_base = {}: expected a positive number",
                self.rope_base
            )));
        }
        if self.rms_eps.is_nan() || self.rms_eps <= 0.0 {
            return Err(err(format!("rms_eps = {}: expected > 0", self.rms_eps)));
        }
        if !(0.0..1.0).contains(&self.drop_rate) {
            return Err(err(format!(
                "drop_rate = {}: expected a value in [0, 1)",
                self.drop_rate
            )));
        }
        if let Some(r) = &self.rope_freq {
            if !(r.factor >= 1.0
                && r.high_freq_factor > r.low_freq_factor
                && r.low_freq_factor > 0.0)
                || r.original_context_length < 1
            {
                return Err(err(format!(
                    "rope_freq = {r:?}: expected factor >= 1, 0 < low_freq_factor < high_freq_factor, original_context_length >= 1"
                )));
            }
        }
        Ok(())
    }

    /// Parameter count from the config alone.
    pub fn num_params(&self) -> i64 {
        let (d, hd) = (self.emb_dim, self.head_dim());
        let att = d * hd * self.n_heads * 2 + d * hd * self.n_kv_groups * 2;
        let ff = 3 * d * self.hidden_dim;
        let block = att + ff + 2 * d;
        let head = if self.tie_weights {
            0
        } else {
            self.vocab_size * d
        };
        self.vocab_size * d + self.n_layers * block + d + head
    }

    /// RoPE inverse frequencies `(head_dim / 2,)` in f32, as Hugging Face computes them
    /// (including the Llama 3.1 scaling); `factors` divides them (GGUF's `rope_freqs.weight`).
    pub fn inv_freq(&self, factors: Option<&[f32]>) -> Vec<f32> {
        let hd = self.head_dim();
        let mut inv: Vec<f32> = (0..hd / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / hd as f32;
                1.0 / (self.rope_base as f32).powf(exponent)
            })
            .collect();
        if let Some(r) = &self.rope_freq {
            let old = r.original_context_length as f64;
            let low_wavelen = old / r.low_freq_factor;
            let high_wavelen = old / r.high_freq_factor;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f as f64;
                let scaled = if wavelen > low_wavelen {
                    *f as f64 / r.factor
                } else {
                    *f as f64
                };
                let medium = (high_wavelen..=low_wavelen).contains(&wavelen);
                *f = if medium {
                    let smooth = (old / wavelen - r.low_freq_factor)
                        / (r.high_freq_factor - r.low_freq_factor);
                    ((1.0 - smooth) * scaled / r.factor + smooth * scaled) as f32
                } else {
                    scaled as f32
                };
            }
        }
        if let Some(fs) = factors {
            for (f, s) in inv.iter_mut().zip(fs) {
                *f /= *s;
            }
        }
        inv
    }
}

/// Root-mean-square normalisation with a learned scale (`weight`), libtorch's fused `rms_norm`.
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
    dim: i64,
}

impl RmsNorm {
    pub fn new(p: &nn::Path, dim: i64, eps: f64) -> Self {
        Self {
            weight: p.ones("weight", &[dim]),
            eps,
            dim,
        }
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.rms_norm([self.dim], Some(&self.weight), self.eps)
    }
}

/// Precomputed `cos`/`sin` tables `(positions, head_dim)` (Hugging Face's rotate-half layout:
/// the frequencies repeat for both halves).
#[derive(Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(inv_freq: &[f32], positions: i64, device: Device) -> Self {
        let inv = Tensor::from_slice(inv_freq);
        let pos = Tensor::arange(positions, (Kind::Float, Device::Cpu));
        let freqs = pos.unsqueeze(1).matmul(&inv.unsqueeze(0)); // (n, hd/2)
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        Self {
            cos: emb.cos().to_device(device),
            sin: emb.sin().to_device(device),
        }
    }

    pub fn positions(&self) -> i64 {
        self.cos.size()[0]
    }

    /// Keeps the tables in `kind` (the model's dtype), so applying them converts nothing.
    pub fn set_kind(&mut self, kind: Kind) {
        self.cos = self.cos.to_kind(kind);
        self.sin = self.sin.to_kind(kind);
    }

    /// Rotates `x` `(b, h, n, hd)` whose tokens sit at positions `start..start + n`.
    pub fn apply(&self, x: &Tensor, start: i64) -> Tensor {
        let n = x.size()[2];
        let cos = self.cos.narrow(0, start, n);
        let sin = self.sin.narrow(0, start, n);
        Self::rotate(x, &cos, &sin)
    }

    /// Rotates `x` `(b, h, 1, hd)` whose row `b` sits at position `pos[b]`.
    pub fn apply_rows(&self, x: &Tensor, pos: &Tensor) -> Tensor {
        let (b, _, _, hd) = x.size4().expect("4-d (b, h, 1, head_dim)");
        let cos = self.cos.index_select(0, pos).view([b, 1, 1, hd]);
        let sin = self.sin.index_select(0, pos).view([b, 1, 1, hd]);
        Self::rotate(x, &cos, &sin)
    }

    /// `x · cos + rotate_half(x) · sin` with tables that broadcast over `x`.
    fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let hd = x.size()[3];
        let cos = cos.to_kind(x.kind());
        let sin = sin.to_kind(x.kind());
        let x1 = x.narrow(-1, 0, hd / 2);
        let x2 = x.narrow(-1, hd / 2, hd / 2);
        let rotated = Tensor::cat(&[&x2.neg(), &x1], -1);
        x * cos + rotated * sin
    }
}

/// How eval mode multiplies by the blocks' linear weights (see
/// [`LlamaModel::prepare_for_inference`] and [`LlamaModel::prepare_for_inference_q4`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockWeights {
    /// The variables themselves (fused q/k/v and gate/up views), in their dtype.
    Dense,
    /// 4-bit codes in groups of `group` inputs with a scale and a minimum ([`Int4Linear`]).
    Int4 { group: i64 },
    /// GGUF's Q4_1 blocks run by one of llmlab's kernels ([`Q41Linear::for_kernel`]): `avx2` or
    /// `avx512` (f32 activations), or `vnni` and `vnni8` (the blocks interleaved, 16- or 8-bit
    /// activations).
    Q41 { kernel: QuantKernel },
}

/// A projection `x Wᵀ` as eval mode runs it: a dense weight `(out, in)` (the variable, or a fused
/// tensor the variables are views of) or its 4-bit quantisation.
#[derive(Debug)]
pub enum Projection {
    Dense(Tensor),
    Int4(Int4Linear),
    Q41(Q41Linear),
}

impl Projection {
    fn new(w: Tensor, weights: BlockWeights) -> Self {
        match weights {
            BlockWeights::Dense => Self::Dense(w),
            BlockWeights::Int4 { group } => Self::Int4(Int4Linear::quantize(&w, group)),
            BlockWeights::Q41 { kernel } => Self::Q41(Q41Linear::quantize(&w).for_kernel(kernel)),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Self::Dense(w) => x.linear::<Tensor>(w, None),
            Self::Int4(q) => q.forward(x),
            Self::Q41(q) => q.forward(x),
        }
    }

    /// Bytes of a quantized projection's codes and scales; 0 for a dense one.
    fn quantized_bytes(&self) -> i64 {
        match self {
            Self::Dense(_) => 0,
            Self::Int4(q) => q.num_bytes(),
            Self::Q41(q) => q.num_bytes(),
        }
    }

    /// `vpdpbusd` instructions per activation row (VNNI kernels only; else 0).
    fn vnni_dots(&self) -> i64 {
        match self {
            Self::Q41(q) => q.vnni_dots(),
            _ => 0,
        }
    }
}

/// Grouped-query attention: `n_heads` query heads share `n_kv_groups` key/value heads.
#[derive(Debug)]
pub struct GroupedQueryAttention {
    pub w_query: Linear,
    pub w_key: Linear,
    pub w_value: Linear,
    pub out_proj: Linear,
    pub n_heads: i64,
    pub n_kv: i64,
    pub head_dim: i64,
    /// `false` lets every token attend to every other one (a classification ablation).
    pub causal: bool,
    /// `[W_query; W_key; W_value]` in one tensor whose rows the three weights are views of
    /// (see [`LlamaModel::prepare_for_inference`]), or its 4-bit form; used in eval mode: one
    /// matmul instead of three.
    qkv: Option<Projection>,
    /// `out_proj` as eval mode runs it.
    out: Option<Projection>,
}

/// Concatenates `weights` along the rows into one tensor and makes each weight a view of its
/// rows: same storage, so in-place updates of either are seen by both.
fn fuse_rows(weights: &mut [&mut Tensor]) -> Tensor {
    let _g = tch::no_grad_guard();
    let parts: Vec<Tensor> = weights.iter().map(|w| w.detach()).collect();
    let fused = Tensor::cat(&parts, 0);
    let mut start = 0;
    for w in weights.iter_mut() {
        let rows = w.size()[0];
        w.set_data(&fused.narrow(0, start, rows));
        start += rows;
    }
    fused
}

fn plain_linear(p: nn::Path, i: i64, o: i64) -> Linear {
    crate::nn::layers::linear(p, i, o, false)
}

impl GroupedQueryAttention {
    pub fn new(p: &nn::Path, cfg: &LlamaConfig) -> Self {
        let (d, hd) = (cfg.emb_dim, cfg.head_dim());
        Self {
            w_query: plain_linear(p / "W_query", d, cfg.n_heads * hd),
            w_key: plain_linear(p / "W_key", d, cfg.n_kv_groups * hd),
            w_value: plain_linear(p / "W_value", d, cfg.n_kv_groups * hd),
            out_proj: plain_linear(p / "out_proj", cfg.n_heads * hd, d),
            n_heads: cfg.n_heads,
            n_kv: cfg.n_kv_groups,
            head_dim: hd,
            causal: true,
            qkv: None,
            out: None,
        }
    }

    fn prepare(&mut self, weights: BlockWeights) {
        let qkv = fuse_rows(&mut [
            &mut self.w_query.ws,
            &mut self.w_key.ws,
            &mut self.w_value.ws,
        ]);
        self.qkv = Some(Projection::new(qkv, weights));
        self.out = Some(Projection::new(self.out_proj.ws.shallow_clone(), weights));
    }

    /// Queries `(b, n_heads, n, head_dim)`, keys and values `(b, n_kv, n, head_dim)` of `x`
    /// `(b, n, emb_dim)`, before RoPE.
    fn heads_qkv(&self, x: &Tensor, train: bool) -> (Tensor, Tensor, Tensor) {
        let (b, n, _) = x.size3().expect("3-d input (b, num_tokens, emb_dim)");
        // (b, n, h·head_dim) → (b, n, h, head_dim) → (b, h, n, head_dim): h = n_heads for the
        // queries, n_kv (fewer) for keys and values, which grouped-query attention shares.
        let heads = |t: &Tensor, h: i64| t.view([b, n, h, self.head_dim]).transpose(1, 2);
        let adapted = [&self.w_query, &self.w_key, &self.w_value]
            .iter()
            .any(|l| l.lora.is_some());
        match (&self.qkv, train || adapted) {
            (Some(w), false) => {
                let (dq, dkv) = (self.n_heads * self.head_dim, self.n_kv * self.head_dim);
                let parts = w.forward(x).split_with_sizes([dq, dkv, dkv], -1);
                (
                    heads(&parts[0], self.n_heads),
                    heads(&parts[1], self.n_kv),
                    heads(&parts[2], self.n_kv),
                )
            }
            _ => (
                heads(&self.w_query.forward_t(x, train), self.n_heads),
                heads(&self.w_key.forward_t(x, train), self.n_kv),
                heads(&self.w_value.forward_t(x, train), self.n_kv),
            ),
        }
    }

    /// Heads merged and projected: `(b, n_heads, n, head_dim)` → `(b, n, emb_dim)`.
    fn merge_heads(&self, ctx: &Tensor, train: bool) -> Tensor {
        let (b, _, n, _) = ctx.size4().expect("4-d context (b, n_heads, n, head_dim)");
        // (b, n_heads, n, head_dim) → (b, n, n_heads, head_dim) → (b, n, n_heads·head_dim)
        let ctx = ctx
            .transpose(1, 2)
            .contiguous()
            .view([b, n, self.n_heads * self.head_dim]);
        match (&self.out, train || self.out_proj.lora.is_some()) {
            (Some(o), false) => o.forward(&ctx),
            _ => self.out_proj.forward_t(&ctx, train),
        }
    }

    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        cache: Option<&mut KvCache>,
        train: bool,
    ) -> Tensor {
        let n = x.size()[1];
        let (q, k, v) = self.heads_qkv(x, train);
        let start = cache.as_ref().map_or(0, |c| c.len());
        let q = rope.apply(&q, start);
        let k = rope.apply(&k, start);
        // Llama has no attention dropout (the block's drop_rate acts after the attention).
        let p = 0.0;
        // With `enable_gqa` SDPA lets each group of n_heads / n_kv query heads attend to one
        // key/value head: q (b, n_heads, n, d), k and v (b, n_kv, n_keys, d), no copies.
        let gqa = self.n_kv != self.n_heads;
        let ctx = match cache {
            None => Tensor::scaled_dot_product_attention::<Tensor>(
                &q,
                &k,
                &v,
                None,
                p,
                self.causal,
                None,
                gqa,
            ),
            Some(c) => {
                let (k_all, v_all) = c.append(&k, &v);
                if n == 1 {
                    // One query at the end sees every cached key: no mask needed.
                    decode_attention(&q, &k_all, &v_all, None)
                } else {
                    let allowed = causal_mask(n, k_all.size()[2], x.device()).logical_not();
                    Tensor::scaled_dot_product_attention(
                        &q,
                        &k_all,
                        &v_all,
                        Some(allowed),
                        p,
                        false,
                        None,
                        gqa,
                    )
                }
            }
        };
        self.merge_heads(&ctx, train)
    }

    /// One new token per row, `x` `(b, 1, emb_dim)`, each row continuing its own sequence in
    /// the rows of `cache` at the positions of `rows` (continuous batching; eval mode).
    pub fn forward_rows(
        &self,
        x: &Tensor,
        rope: &Rope,
        cache: &mut KvCache,
        rows: &RowPositions,
    ) -> Tensor {
        let (q, k, v) = self.heads_qkv(x, false);
        let q = rope.apply_rows(&q, &rows.pos);
        let k = rope.apply_rows(&k, &rows.pos);
        let (k_all, v_all) = cache.write_rows(&k, &v, rows);
        let ctx = decode_attention(&q, &k_all, &v_all, Some(&rows.bias));
        self.merge_heads(&ctx, false)
    }
}

/// SwiGLU feed-forward: `fc3(silu(fc1(x)) * fc2(x))`.
#[derive(Debug)]
pub struct SwiGlu {
    pub fc1: Linear,
    pub fc2: Linear,
    pub fc3: Linear,
    /// `[fc1; fc2]` fused like the attention's `qkv`.
    gate_up: Option<Projection>,
    /// `fc3` as eval mode runs it.
    down: Option<Projection>,
}

impl SwiGlu {
    pub fn new(p: &nn::Path, cfg: &LlamaConfig) -> Self {
        Self {
            fc1: plain_linear(p / "fc1", cfg.emb_dim, cfg.hidden_dim),
            fc2: plain_linear(p / "fc2", cfg.emb_dim, cfg.hidden_dim),
            fc3: plain_linear(p / "fc3", cfg.hidden_dim, cfg.emb_dim),
            gate_up: None,
            down: None,
        }
    }

    fn prepare(&mut self, weights: BlockWeights) {
        let gate_up = fuse_rows(&mut [&mut self.fc1.ws, &mut self.fc2.ws]);
        self.gate_up = Some(Projection::new(gate_up, weights));
        self.down = Some(Projection::new(self.fc3.ws.shallow_clone(), weights));
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let adapted = [&self.fc1, &self.fc2, &self.fc3]
            .iter()
            .any(|l| l.lora.is_some());
        match (&self.gate_up, &self.down, train || adapted) {
            (Some(w), Some(down), false) => {
                let gu = w.forward(x).chunk(2, -1);
                down.forward(&(gu[0].silu() * &gu[1]))
            }
            _ => self.fc3.forward_t(
                &(self.fc1.forward_t(x, train).silu() * self.fc2.forward_t(x, train)),
                train,
            ),
        }
    }
}

#[derive(Debug)]
pub struct LlamaBlock {
    pub att: GroupedQueryAttention,
    pub ff: SwiGlu,
    pub norm1: RmsNorm,
    pub norm2: RmsNorm,
    drop_rate: f64,
}

impl LlamaBlock {
    pub fn new(p: &nn::Path, cfg: &LlamaConfig) -> Self {
        Self {
            att: GroupedQueryAttention::new(&(p / "att"), cfg),
            ff: SwiGlu::new(&(p / "ff"), cfg),
            norm1: RmsNorm::new(&(p / "norm1"), cfg.emb_dim, cfg.rms_eps),
            norm2: RmsNorm::new(&(p / "norm2"), cfg.emb_dim, cfg.rms_eps),
            drop_rate: cfg.drop_rate,
        }
    }

    /// The linear layers LoRA can adapt: the attention's (query, key, value, output) and the
    /// SwiGLU feed-forward network's (gate, up, down).
    pub fn linears(&mut self) -> ([&mut Linear; 4], Vec<&mut Linear>) {
        let a = &mut self.att;
        (
            [
                &mut a.w_query,
                &mut a.w_key,
                &mut a.w_value,
                &mut a.out_proj,
            ],
            vec![&mut self.ff.fc1, &mut self.ff.fc2, &mut self.ff.fc3],
        )
    }

    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        cache: Option<&mut KvCache>,
        train: bool,
    ) -> Tensor {
        let h = self
            .att
            .forward(&self.norm1.forward(x), rope, cache, train)
            .dropout(self.drop_rate, train);
        let x = x + h;
        let h = self
            .ff
            .forward_t(&self.norm2.forward(&x), train)
            .dropout(self.drop_rate, train);
        x + h
    }

    /// The tensors of llmlab's fused decoding step ([`crate::shim::llama_decode`]): `Some`
    /// when every projection runs [`Q41Linear`] or every one is a dense f32 CPU matrix, the
    /// norms are f32, and no layer has a LoRA adapter.
    fn decode_step(&self) -> Option<LlamaDecodeBlock<'_>> {
        fn weight(p: &Option<Projection>) -> Option<DecodeWeight<'_>> {
            match p {
                Some(Projection::Q41(q)) => Some(q.decode_weight()),
                Some(Projection::Dense(w))
                    if w.kind() == Kind::Float && w.device() == Device::Cpu =>
                {
                    Some(DecodeWeight::Dense(w))
                }
                _ => None,
            }
        }
        let (a, f) = (&self.att, &self.ff);
        let adapted = [
            &a.w_query,
            &a.w_key,
            &a.w_value,
            &a.out_proj,
            &f.fc1,
            &f.fc2,
            &f.fc3,
        ]
        .iter()
        .any(|l| l.lora.is_some());
        let f32_norms = [&self.norm1.weight, &self.norm2.weight]
            .iter()
            .all(|w| w.kind() == Kind::Float);
        if adapted || !f32_norms {
            return None;
        }
        let step = LlamaDecodeBlock {
            norm1: &self.norm1.weight,
            norm2: &self.norm2.weight,
            qkv: weight(&a.qkv)?,
            out: weight(&a.out)?,
            gate_up: weight(&f.gate_up)?,
            down: weight(&f.down)?,
        };
        let kinds = [step.qkv, step.out, step.gate_up, step.down].map(|w| w.layout());
        kinds.iter().all(|&d| d == kinds[0]).then_some(step)
    }

    /// One new token per row at the positions of `rows` (see [`GroupedQueryAttention::forward_rows`]).
    pub fn forward_rows(
        &self,
        x: &Tensor,
        rope: &Rope,
        cache: &mut KvCache,
        rows: &RowPositions,
    ) -> Tensor {
        let x = x + self
            .att
            .forward_rows(&self.norm1.forward(x), rope, cache, rows);
        let h = self.ff.forward_t(&self.norm2.forward(&x), false);
        x + h
    }
}

/// `LLMLAB_KV_CACHE`: `f16` or `f32`, the dtype llmlab's q4 kernels keep the KV cache in; unset,
/// f16 where `default_half` (the VNNI kernels, whose integer activations are approximate
/// already; llama.cpp's default too), f32 for the exact `avx512` and `avx2` kernels. f16 needs a head size
/// the attention kernel has: by default other head sizes keep f32, asked for it is an error.
fn kv_cache_half(head_dim: i64, default_half: bool) -> Result<bool, LlmError> {
    match std::env::var("LLMLAB_KV_CACHE").as_deref() {
        Err(_) | Ok("") => Ok(default_half && kv_head_dim_fits(head_dim).is_ok()),
        Ok("f32") => Ok(false),
        Ok("f16") => kv_head_dim_fits(head_dim).map(|()| true),
        Ok(other) => Err(LlmError::Usage(format!(
            "LLMLAB_KV_CACHE={other:?}: expected f32 or f16"
        ))),
    }
}

/// Whether the shim's attention kernel reads an f16 cache for this head size (its
/// `attend_fits`).
fn kv_head_dim_fits(head_dim: i64) -> Result<(), LlmError> {
    if [16, 32, 64, 128].contains(&head_dim) {
        Ok(())
    } else {
        Err(LlmError::Usage(format!(
            "an f16 KV cache: the attention kernel reads f16 caches for head sizes 16, 32, 64 and 128, this model's is {head_dim} (LLMLAB_KV_CACHE)"
        )))
    }
}

/// A Llama-family decoder.
#[derive(Debug)]
pub struct LlamaModel {
    pub cfg: LlamaConfig,
    pub tok_emb: nn::Embedding,
    pub trf_blocks: Vec<LlamaBlock>,
    pub final_norm: RmsNorm,
    /// `None` when tied to `tok_emb`.
    pub out_head: Option<Linear>,
    /// The output head in Q8_0 blocks (`--dtype q4` with llmlab's kernels), which eval mode's
    /// [`Self::logits`] uses instead of the dense one.
    head_q8: Option<Q80Linear>,
    /// Decoding runs llmlab's kernels of this instruction set (the fused block step, the head's
    /// kernel): set by `prepare_for_inference*` when [`QuantKernel::select`] gives one of them.
    decode_isa: Option<Isa>,
    /// Decoding caches keys and values in f16 (llmlab's VNNI q4 kernels, unless `LLMLAB_KV_CACHE=f32`):
    /// half the bytes each step reads, which at long contexts or large batches outweigh the
    /// weights.
    kv_half: bool,
    rope: Rope,
}

/// One KV cache per layer (keys/values of the `n_kv_groups` heads only).
#[derive(Debug)]
pub struct LlamaCache {
    pub layers: Vec<KvCache>,
}

impl LlamaCache {
    pub fn len(&self) -> i64 {
        self.layers.first().map_or(0, KvCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(KvCache::reset);
    }
}

impl LlamaModel {
    /// Fresh variables under `p`; `rope_factors` are GGUF's optional per-frequency divisors.
    pub fn new(p: &nn::Path, cfg: &LlamaConfig, rope_factors: Option<&[f32]>) -> Self {
        let emb_cfg = nn::EmbeddingConfig {
            ws_init: crate::nn::layers::init_or_skip(nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            }),
            ..Default::default()
        };
        let trf = p / "trf_blocks";
        Self {
            cfg: cfg.clone(),
            tok_emb: nn::embedding(p / "tok_emb", cfg.vocab_size, cfg.emb_dim, emb_cfg),
            trf_blocks: (0..cfg.n_layers)
                .map(|i| LlamaBlock::new(&(&trf / i), cfg))
                .collect(),
            final_norm: RmsNorm::new(&(p / "final_norm"), cfg.emb_dim, cfg.rms_eps),
            out_head: (!cfg.tie_weights)
                .then(|| plain_linear(p / "out_head", cfg.emb_dim, cfg.vocab_size)),
            head_q8: None,
            decode_isa: None,
            kv_half: false,
            rope: Rope::new(&cfg.inv_freq(rope_factors), cfg.context_length, p.device()),
        }
    }

    pub fn device(&self) -> Device {
        self.tok_emb.ws.device()
    }

    /// Token ids `(b, n)` → hidden states after `final_norm`; with a cache the tokens continue
    /// the cached sequence.
    pub fn hidden_cached(
        &self,
        idx: &Tensor,
        cache: Option<&mut LlamaCache>,
        train: bool,
    ) -> Tensor {
        let cache = match cache {
            Some(c) if !train && idx.size().get(1) == Some(&1) && self.fused_decode() => {
                // One decoding step: every row at the cache's length.
                let (b, len) = (idx.size()[0], c.len());
                let pos = Tensor::full([b], len, (Kind::Int64, Device::Cpu));
                let h = self.decode_fused(idx, c, &pos);
                c.layers.iter_mut().for_each(|l| l.advance(1));
                return h;
            }
            other => other,
        };
        let mut x = self.tok_emb.forward(idx).dropout(self.cfg.drop_rate, train);
        match cache {
            None => {
                for b in &self.trf_blocks {
                    x = b.forward(&x, &self.rope, None, train);
                }
            }
            Some(c) => {
                for (b, layer) in self.trf_blocks.iter().zip(c.layers.iter_mut()) {
                    x = b.forward(&x, &self.rope, Some(layer), train);
                }
            }
        }
        self.final_norm.forward(&x)
    }

    /// Hidden states `(b, 1, emb)` of one new token per row `idx` `(b, 1)`, row `b` continuing
    /// its own sequence in row `b` of `cache` at position `rows.pos[b]` (continuous batching).
    pub fn hidden_rows(&self, idx: &Tensor, cache: &mut LlamaCache, rows: &RowPositions) -> Tensor {
        if self.fused_decode() {
            return self.decode_fused(idx, cache, &rows.pos);
        }
        let mut x = self.tok_emb.forward(idx);
        for (b, layer) in self.trf_blocks.iter().zip(cache.layers.iter_mut()) {
            x = b.forward_rows(&x, &self.rope, layer, rows);
        }
        self.final_norm.forward(&x)
    }

    /// Whether decoding steps run llmlab's fused block kernel ([`Self::decode_fused`]): llmlab's
    /// kernels chosen at `prepare_for_inference*`, f32 activations on the CPU (`--dtype q4`, or
    /// f32), and no LoRA adapters.
    pub fn fused_decode(&self) -> bool {
        self.decode_isa.is_some()
            && self.tok_emb.ws.kind() == Kind::Float
            && self.device() == Device::Cpu
            && self.trf_blocks.iter().all(|b| b.decode_step().is_some())
    }

    /// Hidden states `(b, 1, emb)` of one new token per row `idx (b, 1)` at positions `pos (b,)`,
    /// all blocks in one call of the shim's fused step (Q4_1 or f32 weights: norms, projections,
    /// RoPE, cache writes, attention, SwiGLU and residuals in one C++ function and one parallel
    /// region: [`crate::shim::llama_decode`]) instead of ~70 libtorch operators a block. The
    /// caller counts the cached positions.
    fn decode_fused(&self, idx: &Tensor, cache: &mut LlamaCache, pos: &Tensor) -> Tensor {
        let b = idx.size()[0];
        let mut x = self
            .tok_emb
            .forward(&idx.view([b]))
            .to_kind(Kind::Float)
            .contiguous();
        let steps: Vec<_> = self
            .trf_blocks
            .iter()
            .map(|blk| blk.decode_step().expect("fused_decode checked every block"))
            .collect();
        let mut caches: Vec<_> = cache.layers.iter_mut().map(|l| l.buffers()).collect();
        crate::shim::llama_decode(
            self.decode_isa.expect("fused_decode checked the kernels"),
            &mut x,
            &steps,
            &mut caches,
            pos,
            &self.rope.cos,
            &self.rope.sin,
            self.cfg.n_heads,
            self.cfg.n_kv_groups,
            self.cfg.rms_eps,
        )
        .expect("the fused q4 step's tensors are the model's own (shapes checked by the shim)");
        self.final_norm.forward(&x).view([b, 1, -1])
    }

    /// Keeps decoding's KV cache in f16 (`true`) or in the activations' dtype; f16 needs the
    /// fused decoding step ([`Self::fused_decode`]) and a head size of 16, 32, 64 or 128. Caches
    /// made before keep their dtype. `prepare_for_inference_q4` sets it from `LLMLAB_KV_CACHE`.
    pub fn set_kv_cache_half(&mut self, half: bool) -> Result<(), LlmError> {
        if half && !self.fused_decode() {
            return Err(LlmError::Usage(
                "an f16 KV cache needs llmlab's fused decoding step (--dtype q4 or f32 on a CPU with AVX-512 or AVX2)".into(),
            ));
        }
        if half {
            kv_head_dim_fits(self.cfg.head_dim())?;
        }
        self.kv_half = half;
        Ok(())
    }

    /// Sets the dropout rate (embeddings and every block).
    pub fn set_drop_rate(&mut self, p: f64) {
        self.cfg.drop_rate = p;
        for b in &mut self.trf_blocks {
            b.drop_rate = p;
        }
    }

    /// Token embeddings (with the embedding dropout when training): the input of block 0.
    pub fn embed(&self, idx: &Tensor, train: bool) -> Tensor {
        self.tok_emb.forward(idx).dropout(self.cfg.drop_rate, train)
    }

    /// Runs block `i` (no cache) on `x`.
    pub fn block_forward(&self, i: usize, x: &Tensor, train: bool) -> Tensor {
        self.trf_blocks[i].forward(x, &self.rope, None, train)
    }

    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        if let Some(h) = &self.head_q8 {
            return h.forward(hidden);
        }
        let w = self.out_head.as_ref().map_or(&self.tok_emb.ws, |h| &h.ws);
        if let Some(isa) = self.decode_isa {
            if !hidden.requires_grad() && w.kind() == Kind::Float {
                if let Some(y) = crate::nn::quant::f32_decode_matmul(hidden, w, isa) {
                    return y;
                }
            }
        }
        match &self.out_head {
            Some(h) => h.forward(hidden),
            None => hidden.matmul(&self.tok_emb.ws.tr()),
        }
    }

    pub fn forward_t(&self, idx: &Tensor, train: bool) -> Tensor {
        self.logits(&self.hidden_cached(idx, None, train))
    }

    /// An empty cache for `batch` sequences of up to `capacity` tokens (at most the context).
    pub fn new_cache(&self, batch: i64, capacity: i64) -> LlamaCache {
        let kind = if self.kv_half && self.fused_decode() {
            Kind::Half
        } else {
            self.tok_emb.ws.kind()
        };
        let cap = capacity.clamp(1, self.cfg.context_length);
        LlamaCache {
            layers: (0..self.cfg.n_layers)
                .map(|_| {
                    KvCache::new(
                        batch,
                        self.cfg.n_kv_groups,
                        cap,
                        self.cfg.head_dim(),
                        kind,
                        self.device(),
                    )
                })
                .collect(),
        }
    }

    /// Inference set-up: the RoPE tables in the weights' dtype, and the q/k/v and gate/up
    /// projections fused into one matmul each (eval mode only). The separate weights become views
    /// of the fused ones, so training later still updates what inference reads; call it again
    /// after changing the dtype.
    pub fn prepare_for_inference(&mut self) {
        self.prepare_for_inference_with(QuantKernel::select().unwrap_or(QuantKernel::Torch));
    }

    /// [`Self::prepare_for_inference`] with decoding's f32 kernels those of `kernel` (its
    /// instruction set; `torch`: libtorch's operators), which must be available.
    pub fn prepare_for_inference_with(&mut self, kernel: QuantKernel) {
        assert!(
            kernel.available(),
            "{} is not available here",
            kernel.name()
        );
        self.head_q8 = None;
        self.kv_half = false;
        self.decode_isa = kernel.isa();
        self.prepare_blocks(BlockWeights::Dense);
    }

    /// Weight-only 4-bit inference (`--dtype q4`): every linear layer of every block (the fused
    /// q/k/v, `out_proj`, the fused gate/up, `fc3`) is quantised from its current values to 4-bit
    /// codes in groups of [`Q4_GROUP`](crate::nn::quant::Q4_GROUP) inputs with a scale and a
    /// minimum. Call it while the weights are still f32: on a Q4_1 GGUF file's weights the codes
    /// are the file's own. Eval mode only: the codes are a snapshot.
    ///
    /// The kernels ([`QuantKernel::select`]):
    /// * `vnni` (llmlab's, the default where the CPU has AVX-512 VNNI, and on AVX2 CPUs without
    ///   AVX-512, where AVX2 instructions give the same integer sums): the file's Q4_1 blocks
    ///   and a Q8_0 output head ([`Q80Linear`], as GGUF files store `token_embd`), interleaved 16
    ///   rows at a time and multiplied by 15-bit integer activations; norms and attention in f32,
    ///   the KV cache in f16 (`LLMLAB_KV_CACHE=f32` keeps f32). `vnni8`: the same with 8-bit
    ///   activations, llama.cpp's arithmetic;
    /// * `avx512` (where the CPU has AVX-512 without VNNI): the same blocks in GGUF's layout
    ///   ([`Q41Linear`]) multiplied by f32 activations, exact;
    /// * `avx2` (asked for with `LLMLAB_Q4_KERNEL=avx2`; CPUs with AVX2, FMA and F16C): the `avx512` arithmetic
    ///   in vectors of 8;
    /// * `torch` (libtorch's int4 kernel, any CPU; the fallback): [`Int4Linear`], then `vs` is
    ///   cast to bf16, so the activations, the norms and the embedding/output head run in bf16.
    pub fn prepare_for_inference_q4(&mut self, vs: &mut nn::VarStore) -> Result<(), LlmError> {
        self.prepare_for_inference_q4_with(vs, QuantKernel::select()?)
    }

    /// [`Self::prepare_for_inference_q4`] with a chosen kernel (which must be available).
    pub fn prepare_for_inference_q4_with(
        &mut self,
        vs: &mut nn::VarStore,
        kernel: QuantKernel,
    ) -> Result<(), LlmError> {
        let group = crate::nn::quant::Q4_GROUP;
        let inputs = [
            self.cfg.emb_dim,
            self.cfg.n_heads * self.cfg.head_dim(),
            self.cfg.hidden_dim,
        ];
        if let Some(why) = inputs
            .iter()
            .find_map(|&k| int4_unsupported(k, group, self.device()))
        {
            return Err(LlmError::Usage(format!(
                "--dtype q4: {why}; use f32 or bf16"
            )));
        }
        match kernel {
            QuantKernel::Avx2 | QuantKernel::Avx512 | QuantKernel::Vnni | QuantKernel::Vnni8 => {
                if !kernel.available() {
                    return Err(LlmError::Usage(format!(
                        "--dtype q4: the {} kernel was asked for on a CPU without it",
                        kernel.name()
                    )));
                }
                let act_bits = kernel.act_bits().unwrap_or(32);
                vs.set_kind(Kind::Float);
                self.prepare_blocks(BlockWeights::Q41 { kernel });
                let head = self.out_head.as_ref().map_or(&self.tok_emb.ws, |h| &h.ws);
                self.head_q8 = Some(Q80Linear::quantize(head).for_kernel(kernel));
                self.decode_isa = kernel.isa();
                self.kv_half = kv_cache_half(self.cfg.head_dim(), act_bits < 32)?;
            }
            QuantKernel::Torch => {
                self.prepare_blocks(BlockWeights::Int4 { group });
                self.head_q8 = None;
                self.decode_isa = None;
                self.kv_half = false;
                vs.set_kind(Kind::BFloat16);
                self.rope.set_kind(Kind::BFloat16);
            }
        }
        Ok(())
    }

    fn prepare_blocks(&mut self, weights: BlockWeights) {
        let kind = self.tok_emb.ws.kind();
        self.rope.set_kind(kind);
        for b in &mut self.trf_blocks {
            b.att.prepare(weights);
            b.ff.prepare(weights);
        }
    }

    /// How eval mode runs the blocks' linear layers: `None` before any `prepare_for_inference*`.
    pub fn block_weights(&self) -> Option<BlockWeights> {
        self.trf_blocks
            .first()
            .and_then(|b| b.att.qkv.as_ref())
            .map(|p| match p {
                Projection::Dense(_) => BlockWeights::Dense,
                Projection::Int4(q) => BlockWeights::Int4 { group: q.group },
                Projection::Q41(q) => BlockWeights::Q41 { kernel: q.kernel() },
            })
    }

    /// Bytes of the blocks' 4-bit weights (codes and scales) after
    /// [`Self::prepare_for_inference_q4`]; 0 while the blocks run dense weights.
    pub fn int4_bytes(&self) -> i64 {
        self.projections().map(Projection::quantized_bytes).sum()
    }

    /// The blocks' inference projections (fused q/k/v, output, fused gate/up, down), where
    /// `prepare_for_inference*` made them.
    fn projections(&self) -> impl Iterator<Item = &Projection> {
        self.trf_blocks
            .iter()
            .flat_map(|b| [&b.att.qkv, &b.att.out, &b.ff.gate_up, &b.ff.down])
            .flatten()
    }

    /// `vpdpbusd` instructions a decoded token costs (blocks and head) with the VNNI kernels; 0
    /// without them. Divided into [`crate::shim::vnni_peak`], the batch-size-free arithmetic
    /// ceiling of decoding (tokens/s).
    pub fn vnni_dots_per_token(&self) -> i64 {
        let blocks: i64 = self.projections().map(Projection::vnni_dots).sum();
        blocks + self.head_q8.as_ref().map_or(0, Q80Linear::vnni_dots)
    }

    /// Bytes of the Q8_0 output head, when eval mode runs it (see [`Self::logits`]).
    pub fn head_q8_bytes(&self) -> Option<i64> {
        self.head_q8.as_ref().map(Q80Linear::num_bytes)
    }

    /// Number of positions the RoPE tables cover.
    pub fn rope_positions(&self) -> i64 {
        self.rope.positions()
    }
}

/// Creates a model in a fresh `VarStore` on `device`.
pub fn build(
    cfg: &LlamaConfig,
    device: Device,
    rope_factors: Option<&[f32]>,
) -> (nn::VarStore, LlamaModel) {
    let vs = nn::VarStore::new(device);
    let model = LlamaModel::new(&vs.root(), cfg, rope_factors);
    (vs, model)
}

/// Reads a Llama config YAML file (`family: llama`).
pub fn load_config_file(path: &Path) -> Result<LlamaConfig> {
    let text = crate::error::read_text(path)?;
    LlamaConfig::from_yaml(&text, &path.display().to_string())
}
