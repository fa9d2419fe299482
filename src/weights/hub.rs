//! Downloading OpenAI's GPT-2 weights in Hugging Face format (book ch05 §5.5 loads the same
//! tensors from TensorFlow files; safetensors needs no TensorFlow).
//!
//! `gpt2-small|medium|large|xl` map to `openai-community/gpt2[-medium|-large|-xl]`. Files go to
//! `<cache>/models/<name>/` through a temp file that is hashed while it streams; the weights'
//! sha256 must equal the one the hub announces for the file (`X-Linked-Etag`, its LFS object id),
//! else nothing is kept. `HF_ENDPOINT` changes the server; with `LLMLAB_DATA_MIRROR` set, the
//! files are read from `<mirror>/<name>/` instead, like the data sets.
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
    let resp = ureq::get(url).call().map_err(|e| err(e.to_string()))?;
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
