//! Llama-family weights into [`LlamaModel`]: GGUF files (llama.cpp's names, quantized tensors,
//! the Q/K row permutation undone) and Hugging Face folders (`config.json` + `model.safetensors`
//! or shards listed in `model.safetensors.index.json`).
//!
//! Both go through one name table from the book's parameter names to the file's. Loading is
//! strict: every model variable must be filled and every file tensor used (or explicitly
//! ignored), and the error names the tensors that don't fit.
use super::gguf::GgufFile;
use crate::error::LlmError;
use crate::models::llama::{LlamaConfig, LlamaModel, RopeScaling};
use anyhow::Result;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Which file format a name table is for.
#[derive(Clone, Copy, PartialEq)]
enum Format {
    Gguf,
    HuggingFace,
}

/// The file's name for a book parameter name, or `None` when the table has no entry.
fn file_name(book: &str, format: Format) -> Option<String> {
    let globals: &[(&str, &str, &str)] = &[
        (
            "tok_emb.weight",
            "token_embd.weight",
            "model.embed_tokens.weight",
        ),
        (
            "final_norm.weight",
            "output_norm.weight",
            "model.norm.weight",
        ),
        ("out_head.weight", "output.weight", "lm_head.weight"),
    ];
    let pick = |g: &str, h: &str| match format {
        Format::Gguf => g.to_string(),
        Format::HuggingFace => h.to_string(),
    };
    if let Some((_, g, h)) = globals.iter().find(|(b, _, _)| *b == book) {
        return Some(pick(g, h));
    }
    let rest = book.strip_prefix("trf_blocks.")?;
    let (layer, local) = rest.split_once('.')?;
    let per_layer: &[(&str, &str, &str)] = &[
        (
            "att.W_query.weight",
            "attn_q.weight",
            "self_attn.q_proj.weight",
        ),
        (
            "att.W_key.weight",
            "attn_k.weight",
            "self_attn.k_proj.weight",
        ),
        (
            "att.W_value.weight",
            "attn_v.weight",
            "self_attn.v_proj.weight",
        ),
        (
            "att.out_proj.weight",
            "attn_output.weight",
            "self_attn.o_proj.weight",
        ),
        ("ff.fc1.weight", "ffn_gate.weight", "mlp.gate_proj.weight"),
        ("ff.fc2.weight", "ffn_up.weight", "mlp.up_proj.weight"),
        ("ff.fc3.weight", "ffn_down.weight", "mlp.down_proj.weight"),
        ("norm1.weight", "attn_norm.weight", "input_layernorm.weight"),
        (
            "norm2.weight",
            "ffn_norm.weight",
            "post_attention_layernorm.weight",
        ),
    ];
    let (_, g, h) = per_layer.iter().find(|(b, _, _)| *b == local)?;
    Some(pick(
        &format!("blk.{layer}.{g}"),
        &format!("model.layers.{layer}.{h}"),
    ))
}

/// Undoes llama.cpp's permutation of the Q/K rows (its converter interleaves the two rotary
/// halves of each head; Hugging Face and this model keep them apart).
fn unpermute(w: &Tensor, n_head: i64) -> Tensor {
    let (rows, cols) = w.size2().expect("2-d projection");
    w.view([n_head, rows / n_head / 2, 2, cols])
        .transpose(1, 2)
        .reshape([rows, cols])
}

/// The model config stored in a GGUF file's metadata (`general.architecture` must be `llama`).
pub fn config_from_gguf(g: &GgufFile) -> Result<LlamaConfig> {
    let arch = g.get_str("general.architecture")?;
    if arch != "llama" {
        return Err(LlmError::BadFile {
            path: g.path.clone(),
            message: format!(
                "general.architecture = '{arch}': llmlab runs 'llama' GGUF files (Llama 2/3, SmolLM2, ...)"
            ),
        }
        .into());
    }
    let key = |k: &str| format!("{arch}.{k}");
    let n_heads = g.get_i64(&key("attention.head_count"))?;
    let emb_dim = g.get_i64(&key("embedding_length"))?;
    let vocab_size = match g.get(&key("vocab_size")) {
        Some(v) => v.as_i64().unwrap_or(0),
        None => g.get_strings("tokenizer.ggml.tokens")?.len() as i64,
    };
    let head_dim = match g.get(&key("attention.key_length")).and_then(|v| v.as_i64()) {
        Some(h) if h != emb_dim / n_heads => Some(h),
        _ => None,
    };
    let cfg = LlamaConfig {
        family: "llama".into(),
        vocab_size,
        context_length: g.get_i64(&key("context_length"))?,
        emb_dim,
        n_heads,
        n_kv_groups: match g.get(&key("attention.head_count_kv")) {
            Some(_) => g.get_i64(&key("attention.head_count_kv"))?,
            None => n_heads,
        },
        n_layers: g.get_i64(&key("block_count"))?,
        hidden_dim: g.get_i64(&key("feed_forward_length"))?,
        head_dim,
        rope_base: match g.get(&key("rope.freq_base")) {
            Some(_) => g.get_f64(&key("rope.freq_base"))?,
            None => 10_000.0,
        },
        rope_freq: None, // llama.cpp stores Llama 3.1 scaling as the rope_freqs.weight tensor
        rms_eps: g.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
        tie_weights: g.tensor_info("output.weight").is_none(),
        drop_rate: 0.0,
    };
    cfg.validate(&g.path.display().to_string())?;
    Ok(cfg)
}

/// Loads a GGUF Llama: the file's config, its weights dequantized to f32 (then `kind`).
pub fn load_gguf(path: &Path, device: Device) -> Result<(VarStore, LlamaModel, GgufFile)> {
    let g = GgufFile::open(path)?;
    let cfg = config_from_gguf(&g)?;
    load_gguf_with(g, cfg, device)
}

/// As [`load_gguf`] with a given config (e.g. with dropout or a shorter context set).
pub fn load_gguf_with(
    g: GgufFile,
    cfg: LlamaConfig,
    device: Device,
) -> Result<(VarStore, LlamaModel, GgufFile)> {
    let factors: Option<Vec<f32>> = match g.tensor_info("rope_freqs.weight") {
        Some(_) => Some(Vec::<f32>::try_from(
            g.tensor_f32("rope_freqs.weight")?.flatten(0, -1),
        )?),
        None => None,
    };
    let vs = VarStore::new(device);
    // Every variable comes from the file (`load_into` refuses a missing one).
    let model =
        crate::nn::layers::without_init(|| LlamaModel::new(&vs.root(), &cfg, factors.as_deref()));
    let mut tensors = BTreeMap::new();
    let vars = vs.variables();
    for name in vars.keys() {
        let Some(file) = file_name(name, Format::Gguf) else {
            continue;
        };
        if g.tensor_info(&file).is_none() {
            continue; // reported as missing by load_into
        }
        let mut t = g.tensor_f32(&file)?;
        if name.ends_with("att.W_query.weight") {
            t = unpermute(&t, cfg.n_heads);
        } else if name.ends_with("att.W_key.weight") {
            t = unpermute(&t, cfg.n_kv_groups);
        }
        tensors.insert(name.clone(), t);
    }
    // File tensors no variable asked for are errors, except the RoPE factors used above.
    let wanted: std::collections::BTreeSet<String> = vars
        .keys()
        .filter_map(|v| file_name(v, Format::Gguf))
        .collect();
    for t in &g.tensors {
        if t.name != "rope_freqs.weight" && !wanted.contains(&t.name) {
            tensors.insert(
                format!("{} (GGUF)", t.name),
                Tensor::zeros([1], (Kind::Float, Device::Cpu)),
            );
        }
    }
    super::load_into(&vs, &tensors, &g.path, |_| false)?;
    Ok((vs, model, g))
}

/// The keys of a Hugging Face Llama `config.json` that llmlab reads.
#[derive(Debug, Deserialize)]
struct HfLlamaConfig {
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: i64,
    hidden_size: i64,
    intermediate_size: i64,
    num_attention_heads: i64,
    #[serde(default)]
    num_key_value_heads: Option<i64>,
    num_hidden_layers: i64,
    #[serde(default)]
    head_dim: Option<i64>,
    #[serde(default = "default_ctx")]
    max_position_embeddings: i64,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    rope_theta: Option<f64>,
    /// transformers < 5.
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    /// transformers >= 5 (`rope_theta`, `rope_type`, and the scaling keys in one object).
    #[serde(default)]
    rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    hidden_act: Option<String>,
}

fn default_ctx() -> i64 {
    2048
}
fn default_eps() -> f64 {
    1e-6
}

/// The book-style config of a Hugging Face Llama folder.
pub fn hf_config(dir: &Path) -> Result<LlamaConfig> {
    let path = dir.join("config.json");
    let text = crate::error::read_text(&path)?;
    let origin = path.display().to_string();
    let bad = |m: String| LlmError::Config {
        origin: origin.clone(),
        message: m,
    };
    let hf: HfLlamaConfig = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if let Some(t) = hf.model_type.as_deref().filter(|t| *t != "llama") {
        return Err(bad(format!(
            "model_type = '{t}': llmlab reads 'llama' folders here (SmolLM2, Llama 2/3)"
        ))
        .into());
    }
    if hf.attention_bias || hf.mlp_bias {
        return Err(bad("attention_bias / mlp_bias = true is not supported".into()).into());
    }
    if let Some(act) = hf.hidden_act.as_deref().filter(|a| *a != "silu") {
        return Err(bad(format!("hidden_act = '{act}': expected 'silu'")).into());
    }
    let rope = hf.rope_parameters.as_ref().or(hf.rope_scaling.as_ref());
    let num =
        |v: Option<&serde_json::Value>, k: &str| v.and_then(|r| r.get(k)).and_then(|x| x.as_f64());
    let rope_base = hf
        .rope_theta
        .or_else(|| num(hf.rope_parameters.as_ref(), "rope_theta"))
        .unwrap_or(10_000.0);
    let rope_type = rope
        .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let rope_freq = match rope_type {
        "default" => None,
        "llama3" => {
            let need =
                |k: &str| num(rope, k).ok_or_else(|| bad(format!("rope_type llama3 needs '{k}'")));
            Some(RopeScaling {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_context_length: need("original_max_position_embeddings")? as i64,
            })
        }
        other => {
            return Err(bad(format!(
                "rope_type = '{other}' is not supported (expected 'default' or 'llama3')"
            ))
            .into())
        }
    };
    let cfg = LlamaConfig {
        family: "llama".into(),
        vocab_size: hf.vocab_size,
        context_length: hf.max_position_embeddings,
        emb_dim: hf.hidden_size,
        n_heads: hf.num_attention_heads,
        n_kv_groups: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
        n_layers: hf.num_hidden_layers,
        hidden_dim: hf.intermediate_size,
        head_dim: hf
            .head_dim
            .filter(|&h| h != hf.hidden_size / hf.num_attention_heads.max(1)),
        rope_base,
        rope_freq,
        rms_eps: hf.rms_norm_eps,
        tie_weights: hf.tie_word_embeddings,
        drop_rate: 0.0,
    };
    cfg.validate(&origin)?;
    Ok(cfg)
}

/// The safetensors files of a Hugging Face folder: `model.safetensors`, or the shards named in
/// `model.safetensors.index.json`.
pub fn hf_weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(LlmError::Io {
            path: single,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "neither model.safetensors nor model.safetensors.index.json is in the folder",
            ),
        }
        .into());
    }
    let text = crate::error::read_text(&index)?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| LlmError::BadFile {
        path: index.clone(),
        message: format!("not valid JSON ({e})"),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| LlmError::BadFile {
            path: index.clone(),
            message: "no 'weight_map' object".into(),
        })?;
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(|f| f.as_str())
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Loads a Hugging Face Llama folder (weights converted to f32).
pub fn load_hf(dir: &Path, device: Device) -> Result<(VarStore, LlamaModel)> {
    let cfg = hf_config(dir)?;
    load_hf_with(dir, cfg, device)
}

pub fn load_hf_with(
    dir: &Path,
    cfg: LlamaConfig,
    device: Device,
) -> Result<(VarStore, LlamaModel)> {
    let vs = VarStore::new(device);
    // Every variable comes from the files (`load_into` refuses a missing one).
    let model = crate::nn::layers::without_init(|| LlamaModel::new(&vs.root(), &cfg, None));
    let mut file_tensors = BTreeMap::new();
    for f in hf_weight_files(dir)? {
        file_tensors.extend(super::read_safetensors(&f)?);
    }
    let mut tensors = BTreeMap::new();
    let vars = vs.variables();
    for name in vars.keys() {
        if let Some(t) = file_name(name, Format::HuggingFace).and_then(|f| file_tensors.remove(&f))
        {
            // bf16/f16 files: widen here (tch reads bf16 safetensors as such; copy_ would too,
            // but an explicit f32 keeps the model's dtype the documented one).
            tensors.insert(name.clone(), t.to_kind(Kind::Float));
        }
    }
    // A tied checkpoint may still carry lm_head.weight (a copy of the embeddings): ignore it.
    if cfg.tie_weights {
        file_tensors.remove("lm_head.weight");
    }
    for (k, t) in file_tensors {
        if !k.ends_with("rotary_emb.inv_freq") {
            tensors.insert(format!("{k} (file)"), t);
        }
    }
    super::load_into(&vs, &tensors, dir, |_| false)?;
    Ok((vs, model))
}
