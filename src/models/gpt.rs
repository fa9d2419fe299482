//! GPT model (book ch04; mirrors `llms_from_scratch.ch04.GPTModel`).
//!
//! Parameter paths equal the reference state_dict keys one for one: `tok_emb.weight`,
//! `pos_emb.weight`, `trf_blocks.{i}.att.W_query.weight`, `trf_blocks.{i}.ff.layers.0.weight`,
//! `trf_blocks.{i}.norm1.scale`, `final_norm.shift`, `out_head.weight`, …
use crate::error::LlmError;
use crate::nn::attention::{KvCache, RowPositions};
use crate::nn::Linear;
use crate::nn::{AttentionImpl, FeedForward, LayerNorm, MultiHeadAttention};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// Architecture hyper-parameters; keys match the book's `GPT_CONFIG_124M`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    pub vocab_size: i64,
    pub context_length: i64,
    pub emb_dim: i64,
    pub n_heads: i64,
    pub n_layers: i64,
    pub drop_rate: f64,
    pub qkv_bias: bool,
    /// Share `tok_emb.weight` with the output head (book §4.6 weight tying).
    #[serde(default)]
    pub tie_weights: bool,
}

/// Presets shipped in `configs/models/` (compiled in so the binary works from any folder).
const PRESETS: &[(&str, &str)] = &[
    (
        "gpt2-small",
        include_str!("../../configs/models/gpt2-small.yaml"),
    ),
    (
        "gpt2-medium",
        include_str!("../../configs/models/gpt2-medium.yaml"),
    ),
    (
        "gpt2-large",
        include_str!("../../configs/models/gpt2-large.yaml"),
    ),
    ("gpt2-xl", include_str!("../../configs/models/gpt2-xl.yaml")),
    (
        "gpt-mini",
        include_str!("../../configs/models/gpt-mini.yaml"),
    ),
];

impl GptConfig {
    /// Names of the built-in presets.
    pub fn preset_names() -> Vec<String> {
        PRESETS.iter().map(|(n, _)| n.to_string()).collect()
    }

    /// A built-in preset by name (`gpt2-small`, …, `gpt-mini`).
    pub fn preset(name: &str) -> Result<Self> {
        let text = super::preset_text(PRESETS, "model config preset", name)?;
        Self::from_yaml(text, &format!("preset {name}"))
    }

    /// A preset name or a path to a YAML file with the same keys.
    pub fn load(spec: &str) -> Result<Self> {
        let p = Path::new(spec);
        if p.is_file() {
            let text = crate::error::read_text(p)?;
            return Self::from_yaml(&text, &p.display().to_string());
        }
        if spec.ends_with(".yaml") || spec.ends_with(".yml") {
            return Err(LlmError::Io {
                path: p.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "config file not found"),
            }
            .into());
        }
        Self::preset(spec)
    }

    pub fn from_yaml(text: &str, origin: &str) -> Result<Self> {
        let cfg: GptConfig = serde_yaml::from_str(text).map_err(|e| LlmError::Config {
            origin: origin.into(),
            message: e.to_string(),
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Parameter count computed from the config alone (no allocation): embeddings, per block
    /// 4·d² (+3·d with qkv bias) + d for attention, 8·d² + 5·d for the feed-forward, 4·d for the
    /// two norms; the final norm; the output head unless tied.
    pub fn num_params(&self) -> i64 {
        let d = self.emb_dim;
        let att = 4 * d * d + d + if self.qkv_bias { 3 * d } else { 0 };
        let block = att + 8 * d * d + 5 * d + 4 * d;
        let head = if self.tie_weights {
            0
        } else {
            self.vocab_size * d
        };
        self.vocab_size * d + self.context_length * d + self.n_layers * block + 2 * d + head
    }

    /// Checks the ranges a model needs; every loader runs it.
    pub fn validate(&self, origin: &str) -> Result<(), LlmError> {
        let err = |message: String| LlmError::Config {
            origin: origin.into(),
            message,
        };
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("context_length", self.context_length),
            ("emb_dim", self.emb_dim),
            ("n_heads", self.n_heads),
            ("n_layers", self.n_layers),
        ] {
            if v < 1 {
                return Err(err(format!("{key} = {v}: expected a positive integer")));
            }
        }
        if self.emb_dim % self.n_heads != 0 {
            return Err(err(format!(
                "emb_dim = {} is not divisible by n_heads = {}",
                self.emb_dim, self.n_heads
            )));
        }
        if !(0.0..1.0).contains(&self.drop_rate) {
            return Err(err(format!(
                "drop_rate = {}: expected a value in [0, 1)",
                self.drop_rate
            )));
        }
        Ok(())
    }
}

/// Book §4.5 `TransformerBlock`: pre-LayerNorm attention and feed-forward, each with a shortcut.
#[derive(Debug)]
pub struct TransformerBlock {
    pub att: MultiHeadAttention,
    pub ff: FeedForward,
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
    pub drop_rate: f64,
}

impl TransformerBlock {
    pub fn new(p: &nn::Path, cfg: &GptConfig) -> Self {
        Self {
            att: MultiHeadAttention::new(
                &(p / "att"),
                cfg.emb_dim,
                cfg.emb_dim,
                cfg.n_heads,
                cfg.drop_rate,
                cfg.qkv_bias,
            ),
            ff: FeedForward::new(&(p / "ff"), cfg.emb_dim),
            norm1: LayerNorm::new(&(p / "norm1"), cfg.emb_dim),
            norm2: LayerNorm::new(&(p / "norm2"), cfg.emb_dim),
            drop_rate: cfg.drop_rate,
        }
    }

    /// `(b, n, emb_dim)` → `(b, n, emb_dim)`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_cached(x, None, train)
    }

    /// One new token per row at the positions of `rows` (see [`MultiHeadAttention::forward_rows`]).
    pub fn forward_rows(&self, x: &Tensor, cache: &mut KvCache, rows: &RowPositions) -> Tensor {
        let x = x + self.att.forward_rows(&self.norm1.forward(x), cache, rows);
        let h = self.ff.forward_t(&self.norm2.forward(&x), false);
        x + h
    }

    /// The linear layers LoRA can adapt: the attention's (query, key, value, output) and the
    /// feed-forward network's.
    pub fn linears(&mut self) -> ([&mut Linear; 4], Vec<&mut Linear>) {
        let a = &mut self.att;
        (
            [
                &mut a.w_query,
                &mut a.w_key,
                &mut a.w_value,
                &mut a.out_proj,
            ],
            vec![&mut self.ff.fc1, &mut self.ff.fc2],
        )
    }

    /// As [`forward_t`](Self::forward_t), appending to a KV cache when one is given.
    pub fn forward_cached(&self, x: &Tensor, cache: Option<&mut KvCache>, train: bool) -> Tensor {
        let h = self
            .att
            .forward_cached(&self.norm1.forward(x), cache, train)
            .dropout(self.drop_rate, train);
        let x = x + h; // shortcut
        let h = self
            .ff
            .forward_t(&self.norm2.forward(&x), train)
            .dropout(self.drop_rate, train);
        x + h
    }
}

/// Book §4.6 `GPTModel`.
#[derive(Debug)]
pub struct GptModel {
    pub cfg: GptConfig,
    pub tok_emb: nn::Embedding,
    pub pos_emb: nn::Embedding,
    pub trf_blocks: Vec<TransformerBlock>,
    pub final_norm: LayerNorm,
    /// `None` when tied to `tok_emb`.
    pub out_head: Option<crate::nn::Linear>,
}

impl GptModel {
    /// Creates the model's variables under `p` (fresh random weights; load a checkpoint after).
    pub fn new(p: &nn::Path, cfg: &GptConfig) -> Self {
        let emb_cfg = nn::EmbeddingConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            }, // torch.nn.Embedding's N(0, 1)
            ..Default::default()
        };
        let trf = p / "trf_blocks";
        Self {
            cfg: cfg.clone(),
            tok_emb: nn::embedding(p / "tok_emb", cfg.vocab_size, cfg.emb_dim, emb_cfg),
            pos_emb: nn::embedding(p / "pos_emb", cfg.context_length, cfg.emb_dim, emb_cfg),
            trf_blocks: (0..cfg.n_layers)
                .map(|i| TransformerBlock::new(&(&trf / i), cfg))
                .collect(),
            final_norm: LayerNorm::new(&(p / "final_norm"), cfg.emb_dim),
            out_head: (!cfg.tie_weights).then(|| {
                crate::nn::layers::linear(p / "out_head", cfg.emb_dim, cfg.vocab_size, false)
            }),
        }
    }

    /// Switches every block between the fused SDPA kernel and the book's explicit attention.
    pub fn set_attention_impl(&mut self, imp: AttentionImpl) {
        for b in &mut self.trf_blocks {
            b.att.imp = imp;
        }
    }

    /// Token ids `(b, n)` → hidden states after `final_norm`, `(b, n, emb_dim)`.
    pub fn hidden_t(&self, in_idx: &Tensor, train: bool) -> Tensor {
        self.hidden_cached(in_idx, None, train)
    }

    /// As [`hidden_t`](Self::hidden_t); with a cache the tokens continue the cached sequence
    /// (their positions start at the cache length).
    pub fn hidden_cached(
        &self,
        in_idx: &Tensor,
        cache: Option<&mut GptCache>,
        train: bool,
    ) -> Tensor {
        let (_b, n) = in_idx.size2().expect("in_idx is (batch, num_tokens)");
        let start = cache.as_ref().map_or(0, |c| c.len());
        let tok_embeds = self.tok_emb.forward(in_idx); // (b, n, emb_dim)
        let pos = Tensor::arange_start(start, start + n, (Kind::Int64, in_idx.device()));
        let pos_embeds = self.pos_emb.forward(&pos); // (n, emb_dim)
        let mut x = (tok_embeds + pos_embeds).dropout(self.cfg.drop_rate, train);
        match cache {
            None => {
                for block in &self.trf_blocks {
                    x = block.forward_t(&x, train);
                }
            }
            Some(c) => {
                for (block, layer) in self.trf_blocks.iter().zip(c.layers.iter_mut()) {
                    x = block.forward_cached(&x, Some(layer), train);
                }
            }
        }
        self.final_norm.forward(&x)
    }

    /// Token plus position embeddings (with dropout when training): the input of block 0.
    pub fn embed(&self, in_idx: &Tensor, train: bool) -> Tensor {
        let n = in_idx.size()[1];
        let pos = Tensor::arange(n, (Kind::Int64, in_idx.device()));
        (self.tok_emb.forward(in_idx) + self.pos_emb.forward(&pos))
            .dropout(self.cfg.drop_rate, train)
    }

    /// Hidden states `(b, 1, emb)` of one new token per row `idx` `(b, 1)`, row `b` continuing
    /// its own sequence in row `b` of `cache` at position `rows.pos[b]` (continuous batching).
    pub fn hidden_rows(&self, idx: &Tensor, cache: &mut GptCache, rows: &RowPositions) -> Tensor {
        let b = idx.size()[0];
        let mut x = self.tok_emb.forward(idx) + self.pos_emb.forward(&rows.pos.view([b, 1]));
        for (block, layer) in self.trf_blocks.iter().zip(cache.layers.iter_mut()) {
            x = block.forward_rows(&x, layer, rows);
        }
        self.final_norm.forward(&x)
    }

    /// An empty KV cache for `batch` sequences of up to `context_length` tokens.
    pub fn new_cache(&self, batch: i64) -> GptCache {
        let kind = self.tok_emb.ws.kind();
        let dev = self.tok_emb.ws.device();
        let h = self.cfg.n_heads;
        GptCache {
            layers: (0..self.cfg.n_layers)
                .map(|_| {
                    KvCache::new(
                        batch,
                        h,
                        self.cfg.context_length,
                        self.cfg.emb_dim / h,
                        kind,
                        dev,
                    )
                })
                .collect(),
        }
    }

    /// Projects hidden states to vocabulary logits.
    pub fn logits(&self, h: &Tensor) -> Tensor {
        match &self.out_head {
            Some(head) => head.forward(h),
            None => h.linear::<Tensor>(&self.tok_emb.ws, None),
        }
    }

    /// Token ids `(b, n)` → logits `(b, n, vocab_size)`.
    pub fn forward_t(&self, in_idx: &Tensor, train: bool) -> Tensor {
        self.logits(&self.hidden_t(in_idx, train))
    }
}

/// One [`KvCache`] per transformer block.
#[derive(Debug)]
pub struct GptCache {
    pub layers: Vec<KvCache>,
}

impl GptCache {
    /// Number of cached positions.
    pub fn len(&self) -> i64 {
        self.layers.first().map_or(0, KvCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> i64 {
        self.layers.first().map_or(0, KvCache::capacity)
    }

    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(KvCache::reset);
    }
}

/// Parameter count and f32 footprint of a variable store (book §4.6).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ParamStats {
    pub total_params: i64,
    /// Parameters without the output head: the "weight tying" count the book prints.
    pub params_without_out_head: i64,
    pub size_mb_f32: f64,
}

impl ParamStats {
    /// From the config alone (no weights allocated; works for gpt2-xl on a laptop).
    pub fn from_config(cfg: &GptConfig) -> Self {
        let total = cfg.num_params();
        let without_head = GptConfig {
            tie_weights: true,
            ..cfg.clone()
        }
        .num_params();
        Self {
            total_params: total,
            params_without_out_head: without_head,
            size_mb_f32: total as f64 * 4.0 / (1024.0 * 1024.0),
        }
    }
}

/// Counts the variables of a real model.
pub fn param_stats(vs: &nn::VarStore) -> ParamStats {
    let vars = vs.variables();
    let total: i64 = vars.values().map(|t| t.numel() as i64).sum();
    let head: i64 = vars
        .iter()
        .filter(|(k, _)| k.starts_with("out_head."))
        .map(|(_, t)| t.numel() as i64)
        .sum();
    ParamStats {
        total_params: total,
        params_without_out_head: total - head,
        size_mb_f32: total as f64 * 4.0 / (1024.0 * 1024.0),
    }
}

/// Book §4.7 `generate_text_simple`: greedy decoding, recomputing the whole context each step.
/// `idx` is `(b, n)`; returns `(b, n + max_new_tokens)`.
pub fn generate_text_simple(
    model: &GptModel,
    idx: &Tensor,
    max_new_tokens: i64,
    context_size: i64,
) -> Tensor {
    let _guard = tch::no_grad_guard();
    let mut idx = idx.shallow_clone();
    for _ in 0..max_new_tokens {
        let n = idx.size()[1];
        let idx_cond = idx.narrow(1, (n - context_size).max(0), n.min(context_size));
        let logits = model.forward_t(&idx_cond, false);
        let last = logits.select(1, -1); // (b, vocab_size)
        let idx_next = last.argmax(-1, true); // (b, 1)
        idx = Tensor::cat(&[idx, idx_next], 1);
    }
    idx
}
