//! Downloading Hugging Face checkpoints: OpenAI's GPT-2 (book ch05 §5.5 loads the same tensors
//! from TensorFlow files; safetensors needs no TensorFlow), SmolLM2 and Llama 3.x.
//!
//! `gpt2-small|medium|large|xl` map to `openai-community/gpt2[-medium|-large|-xl]`, `smollm2-*` to
//! `HuggingFaceTB/SmolLM2-*`, `llama-3.*` to `meta-llama/Llama-3.*` (gated: set `HF_TOKEN`). Files
//! go to `<cache>/models/<name>/` through a temp file that is hashed while it streams; the
//! weights' sha256 must equal the one the hub announces for the file (`X-Linked-Etag`, its LFS
//! object id), else nothing is kept. Sharded weights are fetched from the list in
//! `model.safetensors.index.json`. `HF_ENDPOINT` changes the server; with `LLMLAB_DATA_MIRROR`
//! set, the files are read from `<mirror>/<name>/` instead, like the data sets.
use crate::data::registry::{cache_root, mirror_root};
use crate::error::{temp_path, LlmError};
use anyhow::Result;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub const GPT2_MODELS: &[(&str, &str)] = &[
    ("gpt2-small", "openai-community/gpt2"),
    ("gpt2-medium", "openai-community/gpt2-medium"),
    ("gpt2-large", "openai-community/gpt2-large"),
    ("gpt2-xl", "openai-community/gpt2-xl"),
];
const FILES: &[&str] = &["config.json", "model.safetensors"];

/// Llama-family checkpoints: (name, repository). Their folders load with `hf:DIR`.
pub const LLAMA_MODELS: &[(&str, &str)] = &[
    ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M"),
    (
        "smollm2-135m-instruct-hf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    ("smollm2-360m", "HuggingFaceTB/SmolLM2-360M"),
    (
        "smollm2-360m-instruct",
        "HuggingFaceTB/SmolLM2-360M-Instruct",
    ),
    ("smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B"),
    (
        "smollm2-1.7b-instruct",
        "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    ),
    ("llama-3.2-1b", "meta-llama/Llama-3.2-1B"),
    ("llama-3.2-1b-instruct", "meta-llama/Llama-3.2-1B-Instruct"),
    ("llama-3.2-3b", "meta-llama/Llama-3.2-3B"),
    ("llama-3.2-3b-instruct", "meta-llama/Llama-3.2-3B-Instruct"),
    ("llama-3.1-8b", "meta-llama/Llama-3.1-8B"),
    ("llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct"),
];
const LLAMA_FILES: &[&str] = &["config.json", "tokenizer.json", "tokenizer_config.json"];

/// Every model name `llmlab download` knows.
pub fn model_names() -> Vec<String> {
    GPT2_MODELS
        .iter()
        .chain(LLAMA_MODELS)
        .map(|(n, _)| n.to_string())
        .collect()
}

/// Makes a GPT-2 or Llama-family checkpoint available locally; returns its folder.
pub fn download_model(name: &str) -> Result<PathBuf> {
    if GPT2_MODELS.iter().any(|(n, _)| *n == name) {
        return download_gpt2(name);
    }
    download_llama_with(name, mirror_root().as_deref(), &cache_root(), &endpoint())
}

pub fn download_llama_with(
    name: &str,
    mirror: Option<&Path>,
    cache: &Path,
    endpoint: &str,
) -> Result<PathBuf> {
    let repo = LLAMA_MODELS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, r)| *r)
        .ok_or_else(|| LlmError::Unknown {
            what: "model to download",
            name: name.into(),
            expected: model_names(),
        })?;
    let base = match mirror {
        Some(m) if m.join(name).join("config.json").is_file() => return Ok(m.join(name)),
        _ => cache.join("models").join(name),
    };
    for f in LLAMA_FILES {
        let dst = base.join(f);
        if !dst.is_file() {
            fetch_to(&format!("{endpoint}/{repo}/resolve/main/{f}"), &dst, false)?;
        }
    }
    let single = base.join("model.safetensors");
    let index = base.join("model.safetensors.index.json");
    if single.is_file() {
        return Ok(base);
    }
    if !index.is_file() {
        match fetch_to(
            &format!("{endpoint}/{repo}/resolve/main/model.safetensors"),
            &single,
            true,
        ) {
            Ok(()) => return Ok(base),
            Err(e) if e.to_string().contains("404") => fetch_to(
                &format!("{endpoint}/{repo}/resolve/main/model.safetensors.index.json"),
                &index,
                false,
            )?,
            Err(e) => return Err(e),
        }
    }
    for shard in crate::weights::llama::hf_weight_files(&base)? {
        if !shard.is_file() {
            let f = shard
                .file_name()
                .and_then(|f| f.to_str())
                .unwrap_or_default();
            fetch_to(&format!("{endpoint}/{repo}/resolve/main/{f}"), &shard, true)?;
        }
    }
    Ok(base)
}

fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .unwrap_or_else(|_| "https://huggingface.co".into())
        .trim_end_matches('/')
        .to_string()
}

/// Makes GPT-2 weights available locally; returns the folder (`gpt2:DIR` loads it).
pub fn download_gpt2(name: &str) -> Result<PathBuf> {
    download_gpt2_with(name, mirror_root().as_deref(), &cache_root(), &endpoint())
}

pub fn download_gpt2_with(
    name: &str,
    mirror: Option<&Path>,
    cache: &Path,
    endpoint: &str,
) -> Result<PathBuf> {
    let repo = GPT2_MODELS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, r)| *r)
        .ok_or_else(|| LlmError::Unknown {
            what: "GPT-2 model",
            name: name.into(),
            expected: GPT2_MODELS.iter().map(|(n, _)| n.to_string()).collect(),
        })?;
    if let Some(m) = mirror {
        let dir = m.join(name);
        for f in FILES {
            if !dir.join(f).is_file() {
                return Err(LlmError::Io {
                    path: dir.join(f),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("{name} is not in the mirror {}", m.display()),
                    ),
                }
                .into());
            }
        }
        return Ok(dir);
    }
    let dir = cache.join("models").join(name);
    for f in FILES {
        let dst = dir.join(f);
        if dst.is_file() {
            continue;
        }
        let url = format!("{endpoint}/{repo}/resolve/main/{f}");
        fetch_to(&url, &dst, *f == "model.safetensors")?;
    }
    Ok(dir)
}

/// Streams `url` into `dst` (temp file, then rename). With `need_sha`, the hub's announced
/// sha256 must be present and match.
fn fetch_to(url: &str, dst: &Path, need_sha: bool) -> Result<()> {
    let err = |message: String| LlmError::Download {
        url: url.into(),
        message,
    };
    let mut req = ureq::get(url);
    if let Ok(token) = std::env::var("HF_TOKEN") {
        req = req.header("Authorization", &format!("Bearer {token}"));
    }
    let resp = req.call().map_err(|e| {
        let hint = if e.to_string().contains("401") || e.to_string().contains("403") {
            " (a gated repository: accept its licence on the hub and set HF_TOKEN)"
        } else {
            ""
        };
        err(format!("{e}{hint}"))
    })?;
    let announced = ["x-linked-etag", "etag"]
        .iter()
        .filter_map(|h| resp.headers().get(*h))
        .filter_map(|v| v.to_str().ok())
        .map(|v| {
            v.trim_start_matches("W/")
                .trim_matches('"')
                .to_ascii_lowercase()
        })
        .find(|v| v.len() == 64 && v.chars().all(|c| c.is_ascii_hexdigit()));
    if need_sha && announced.is_none() {
        return Err(err("the server announced no sha256 for the file (X-Linked-Etag); refusing unverified weights".into()).into());
    }
    if let Some(dir) = dst.parent() {
        std::fs::create_dir_all(dir).map_err(|source| LlmError::Io {
            path: dir.into(),
            source,
        })?;
    }
    let tmp = temp_path(dst);
    let result = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp).map_err(|source| LlmError::Io {
            path: tmp.clone(),
            source,
        })?;
        let mut body = resp.into_body();
        let mut reader = body.as_reader();
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader.read(&mut buf).map_err(|e| err(e.to_string()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            f.write_all(&buf[..n]).map_err(|source| LlmError::Io {
                path: tmp.clone(),
                source,
            })?;
        }
        f.sync_all().map_err(|source| LlmError::Io {
            path: tmp.clone(),
            source,
        })?;
        let found: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if let Some(expected) = &announced {
            if need_sha && &found != expected {
                return Err(LlmError::Checksum {
                    url: url.into(),
                    expected: expected.clone(),
                    found,
                }
                .into());
            }
        }
        std::fs::rename(&tmp, dst).map_err(|source| LlmError::Io {
            path: dst.into(),
            source,
        })?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
