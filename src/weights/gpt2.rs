//! Hugging Face GPT-2 checkpoints (`config.json` + `model.safetensors`, the openai-community
//! layout) into the book's GPT (ch05 §5.5, `load_weights_into_gpt`).
//!
//! One declarative table maps every Hugging Face tensor to the book's name, with the transposes
//! Conv1D needs (its weights are stored `(in, out)`) and the split of the fused `c_attn` into
//! `W_query`/`W_key`/`W_value`. Loading fails, naming keys, unless every model variable was
//! filled and every file tensor was used or explicitly ignored.
use crate::error::LlmError;
use crate::models::gpt::GptConfig;
use anyhow::Result;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use tch::nn::VarStore;
use tch::Tensor;

/// The keys of a GPT-2 `config.json` that llmlab reads.
#[derive(Debug, Deserialize)]
struct HfGpt2Config {
    vocab_size: i64,
    n_positions: i64,
    n_embd: i64,
    n_layer: i64,
    n_head: i64,
    #[serde(default = "default_pdrop")]
    resid_pdrop: f64,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
    #[serde(default)]
    activation_function: Option<String>,
    #[serde(default = "default_true")]
    tie_word_embeddings: bool,
    #[serde(default)]
    n_inner: Option<i64>,
    #[serde(default = "default_true")]
    scale_attn_weights: bool,
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: bool,
}

fn default_pdrop() -> f64 {
    0.1
}
fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}

/// The book's config for a Hugging Face GPT-2 folder (`qkv_bias: true`, tied head by default).
pub fn hf_config(dir: &Path) -> Result<GptConfig> {
    let path = dir.join("config.json");
    let text = crate::error::read_text(&path)?;
    let bad = |m: String| LlmError::Config {
        origin: path.display().to_string(),
        message: m,
    };
    let hf: HfGpt2Config = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if let Some(act) = hf.activation_function.as_deref() {
        if act != "gelu_new" && act != "gelu_pytorch_tanh" {
            return Err(bad(format!(
                "activation_function '{act}' is not GPT-2's tanh GELU (gelu_new)"
            ))
            .into());
        }
    }
    if (hf.layer_norm_epsilon - 1e-5).abs() > 1e-12 {
        return Err(bad(format!(
            "layer_norm_epsilon {} differs from the book's 1e-5",
            hf.layer_norm_epsilon
        ))
        .into());
    }
    if !hf.scale_attn_weights || hf.scale_attn_by_inverse_layer_idx {
        return Err(bad(
            "attention scaling other than 1/sqrt(head_dim) is not the book's GPT".into(),
        )
        .into());
    }
    if hf.n_inner.is_some_and(|n| n != 4 * hf.n_embd) {
        return Err(bad("n_inner must be 4 * n_embd (the book's feed-forward)".into()).into());
    }
    let cfg = GptConfig {
        vocab_size: hf.vocab_size,
        context_length: hf.n_positions,
        emb_dim: hf.n_embd,
        n_heads: hf.n_head,
        n_layers: hf.n_layer,
        drop_rate: hf.resid_pdrop,
        qkv_bias: true,
        tie_weights: hf.tie_word_embeddings,
    };
    cfg.validate(&path.display().to_string())?;
    Ok(cfg)
}

/// How one Hugging Face tensor becomes book tensors.
enum Rule {
    /// Same values under a new name.
    Copy(&'static str),
    /// Conv1D weight `(in, out)` → Linear weight `(out, in)`.
    Transpose(&'static str),
    /// Fused `c_attn` weight `(in, 3·out)` → three transposed Linear weights.
    SplitTransposeQkv,
    /// Fused `c_attn` bias `(3·out)` → three biases.
    SplitQkvBias,
}

/// Per-block table: Hugging Face suffix → rule (book names relative to `trf_blocks.{i}.`).
const BLOCK_TABLE: &[(&str, Rule)] = &[
    ("ln_1.weight", Rule::Copy("norm1.scale")),
    ("ln_1.bias", Rule::Copy("norm1.shift")),
    ("attn.c_attn.weight", Rule::SplitTransposeQkv),
    ("attn.c_attn.bias", Rule::SplitQkvBias),
    ("attn.c_proj.weight", Rule::Transpose("att.out_proj.weight")),
    ("attn.c_proj.bias", Rule::Copy("att.out_proj.bias")),
    ("ln_2.weight", Rule::Copy("norm2.scale")),
    ("ln_2.bias", Rule::Copy("norm2.shift")),
    ("mlp.c_fc.weight", Rule::Transpose("ff.layers.0.weight")),
    ("mlp.c_fc.bias", Rule::Copy("ff.layers.0.bias")),
    ("mlp.c_proj.weight", Rule::Transpose("ff.layers.2.weight")),
    ("mlp.c_proj.bias", Rule::Copy("ff.layers.2.bias")),
];

/// Top-level table.
const TOP_TABLE: &[(&str, &str)] = &[
    ("wte.weight", "tok_emb.weight"),
    ("wpe.weight", "pos_emb.weight"),
    ("ln_f.weight", "final_norm.scale"),
    ("ln_f.bias", "final_norm.shift"),
    ("lm_head.weight", "out_head.weight"),
];

/// Old buffers some GPT-2 files carry; recomputed by llmlab.
fn ignored(key: &str) -> bool {
    key.ends_with(".attn.bias") || key.ends_with(".attn.masked_bias")
}

/// Renames Hugging Face GPT-2 tensors to the book's names (pure; tested on its own).
pub fn convert(
    hf: BTreeMap<String, Tensor>,
    cfg: &GptConfig,
) -> Result<BTreeMap<String, Tensor>, String> {
    let mut out = BTreeMap::new();
    let mut unused = Vec::new();
    for (key, t) in hf {
        let key = key.strip_prefix("transformer.").unwrap_or(&key).to_string();
        if ignored(&key) {
            continue;
        }
        if let Some((_, book)) = TOP_TABLE.iter().find(|(k, _)| *k == key) {
            if *book == "out_head.weight" && cfg.tie_weights {
                continue; // tied: the head is tok_emb
            }
            out.insert(book.to_string(), t);
            continue;
        }
        let Some(rest) = key.strip_prefix("h.") else {
            unused.push(key);
            continue;
        };
        let Some((layer, suffix)) = rest.split_once('.') else {
            unused.push(key);
            continue;
        };
        let Some((_, rule)) = BLOCK_TABLE.iter().find(|(k, _)| *k == suffix) else {
            unused.push(key);
            continue;
        };
        let p = format!("trf_blocks.{layer}.");
        match rule {
            Rule::Copy(n) => {
                out.insert(format!("{p}{n}"), t);
            }
            Rule::Transpose(n) => {
                out.insert(format!("{p}{n}"), t.tr().contiguous());
            }
            Rule::SplitTransposeQkv => {
                let parts = t.split(cfg.emb_dim, 1);
                for (n, part) in ["W_query", "W_key", "W_value"].iter().zip(parts) {
                    out.insert(format!("{p}att.{n}.weight"), part.tr().contiguous());
                }
            }
            Rule::SplitQkvBias => {
                let parts = t.split(cfg.emb_dim, 0);
                for (n, part) in ["W_query", "W_key", "W_value"].iter().zip(parts) {
                    out.insert(format!("{p}att.{n}.bias"), part.contiguous());
                }
            }
        }
    }
    if !unused.is_empty() {
        return Err(format!(
            "tensors with no mapping to the book's GPT: {}",
            unused.join(", ")
        ));
    }
    Ok(out)
}

/// Loads `DIR/model.safetensors` of a Hugging Face GPT-2 into a model built with [`hf_config`].
pub fn load_hf_gpt2(vs: &VarStore, dir: &Path) -> Result<()> {
    let cfg = hf_config(dir)?;
    let path = dir.join("model.safetensors");
    let hf = crate::weights::read_safetensors(&path)?;
    let book = convert(hf, &cfg).map_err(|message| LlmError::Checkpoint {
        path: path.clone(),
        message,
    })?;
    crate::weights::load_into(vs, &book, &path, |_| false)
}
