//! The data sets the book uses (ch02, ch05, ch06, ch07, MMLU), with canonical URLs and checksums.
//!
//! Resolution order for `fetch(NAME)`:
//! 1. `LLMLAB_DATA_MIRROR=DIR`: files are read from `DIR/<folder>/` (laid out like
//!    `../shared/data`), checksummed, and that folder is returned. No network is touched.
//! 2. the cache (`LLMLAB_CACHE`, else `$XDG_CACHE_HOME/llmlab`, else `~/.cache/llmlab`):
//!    `data/<name>/` when every file is there with the right checksum;
//! 3. download: each URL (or archive) goes to a temp file, is checksummed (members after
//!    unpacking), then renamed into the cache; a mismatch or failure leaves no partial file and
//!    names the URL, the expected and the found checksum.
use crate::error::LlmError;
use anyhow::{Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

const BUILTIN: &str = include_str!("../../configs/data/registry.yaml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    pub datasets: BTreeMap<String, Dataset>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dataset {
    pub description: String,
    /// Sub-folder name in a mirror; defaults to the data set's name.
    #[serde(default)]
    pub folder: Option<String>,
    /// When the files come packed in one archive.
    #[serde(default)]
    pub archive: Option<Archive>,
    pub files: Vec<DataFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Archive {
    pub url: String,
    pub kind: ArchiveKind,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ArchiveKind {
    Zip,
    Tar,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataFile {
    /// Path relative to the data set's folder.
    pub path: String,
    /// Direct URL (for files not in an archive).
    #[serde(default)]
    pub url: Option<String>,
    /// Member name inside the archive.
    #[serde(default)]
    pub member: Option<String>,
    pub sha256: String,
}

/// Hex sha256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, LlmError> {
    let io = |source| LlmError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The cache root: `LLMLAB_CACHE`, `$XDG_CACHE_HOME/llmlab` or `~/.cache/llmlab`.
pub fn cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("LLMLAB_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("llmlab");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("llmlab")
}

/// The offline mirror folder, if `LLMLAB_DATA_MIRROR` is set.
pub fn mirror_root() -> Option<PathBuf> {
    std::env::var_os("LLMLAB_DATA_MIRROR")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
}

impl Dataset {
    pub fn folder_name<'a>(&'a self, name: &'a str) -> &'a str {
        self.folder.as_deref().unwrap_or(name)
    }
}

impl Registry {
    /// The registry compiled into the binary (`configs/data/registry.yaml`).
    pub fn builtin() -> Result<Self> {
        Self::from_yaml(BUILTIN, "configs/data/registry.yaml")
    }

    pub fn from_yaml(text: &str, origin: &str) -> Result<Self> {
        serde_yaml::from_str(text).map_err(|e| {
            LlmError::Config {
                origin: origin.into(),
                message: e.to_string(),
            }
            .into()
        })
    }

    pub fn get(&self, name: &str) -> Result<&Dataset, LlmError> {
        self.datasets.get(name).ok_or_else(|| LlmError::Unknown {
            what: "data set",
            name: name.into(),
            expected: self.datasets.keys().cloned().collect(),
        })
    }

    /// Makes the data set available locally and returns its folder.
    pub fn fetch(&self, name: &str) -> Result<PathBuf> {
        self.fetch_with(name, mirror_root().as_deref(), &cache_root())
    }

    /// [`Registry::fetch`] with explicit mirror and cache folders (tests use this).
    pub fn fetch_with(&self, name: &str, mirror: Option<&Path>, cache: &Path) -> Result<PathBuf> {
        let ds = self.get(name)?;
        if let Some(mirror) = mirror {
            let dir = mirror.join(ds.folder_name(name));
            for f in &ds.files {
                let p = dir.join(&f.path);
                if !p.is_file() {
                    return Err(LlmError::Io {
                        path: p,
                        source: std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            format!(
                                "data set '{name}' is not in the mirror LLMLAB_DATA_MIRROR={}",
                                mirror.display()
                            ),
                        ),
                    }
                    .into());
                }
                let found = sha256_file(&p)?;
                if found != f.sha256 {
                    return Err(LlmError::Checksum {
                        url: p.display().to_string(),
                        expected: f.sha256.clone(),
                        found,
                    }
                    .into());
                }
            }
            return Ok(dir);
        }
        let dir = cache.join("data").join(name);
        let mut missing = Vec::new();
        for f in &ds.files {
            let p = dir.join(&f.path);
            if !(p.is_file() && sha256_file(&p)? == f.sha256) {
                missing.push(f);
            }
        }
        if missing.is_empty() {
            return Ok(dir);
        }
        match &ds.archive {
            None => {
                for f in missing {
                    let url = f.url.as_deref().ok_or_else(|| LlmError::Config {
                        origin: "data registry".into(),
                        message: format!("file '{}' of data set '{name}' has no url", f.path),
                    })?;
                    let bytes = download(url)?;
                    let found = sha256_hex(&bytes);
                    if found != f.sha256 {
                        return Err(LlmError::Checksum {
                            url: url.into(),
                            expected: f.sha256.clone(),
                            found,
                        }
                        .into());
                    }
                    crate::error::write_atomic(&dir.join(&f.path), &bytes)?;
                }
            }
            Some(archive) => {
                let bytes = download(&archive.url)?;
                let members = unpack(&bytes, archive.kind)
                    .with_context(|| format!("unpacking {}", archive.url))?;
                // Check every member first, so a bad archive writes nothing.
                let mut checked = Vec::new();
                for f in missing {
                    let member = f.member.as_deref().unwrap_or(&f.path);
                    let data = members.get(member).ok_or_else(|| LlmError::Download {
                        url: archive.url.clone(),
                        message: format!("archive has no member '{member}'"),
                    })?;
                    let found = sha256_hex(data);
                    if found != f.sha256 {
                        return Err(LlmError::Checksum {
                            url: format!("{} (member {member})", archive.url),
                            expected: f.sha256.clone(),
                            found,
                        }
                        .into());
                    }
                    checked.push((f, data));
                }
                for (f, data) in checked {
                    crate::error::write_atomic(&dir.join(&f.path), data)?;
                }
            }
        }
        Ok(dir)
    }
}

/// Downloads a URL into memory, through a temp file that is removed on any failure.
fn download(url: &str) -> Result<Vec<u8>, LlmError> {
    let err = |message: String| LlmError::Download {
        url: url.into(),
        message,
    };
    let resp = ureq::get(url).call().map_err(|e| {
        let offline = matches!(e, ureq::Error::Io(_) | ureq::Error::HostNotFound);
        err(if offline {
            format!("{e} (offline? set LLMLAB_DATA_MIRROR to a folder holding the file, or put it in the cache)")
        } else {
            e.to_string()
        })
    })?;
    let mut body = resp.into_body();
    let mut bytes = Vec::new();
    body.as_reader()
        .read_to_end(&mut bytes)
        .map_err(|e| err(e.to_string()))?;
    Ok(bytes)
}

/// Unpacks an archive held in memory into member name → bytes.
fn unpack(bytes: &[u8], kind: ArchiveKind) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    match kind {
        ArchiveKind::Zip => {
            let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))?;
            for i in 0..zip.len() {
                let mut f = zip.by_index(i)?;
                if f.is_file() {
                    let mut data = Vec::new();
                    f.read_to_end(&mut data)?;
                    out.insert(f.name().to_string(), data);
                }
            }
        }
        ArchiveKind::Tar => {
            let mut ar = tar::Archive::new(std::io::Cursor::new(bytes));
            for entry in ar.entries()? {
                let mut e = entry?;
                if e.header().entry_type().is_file() {
                    let name = e
                        .path()?
                        .to_string_lossy()
                        .trim_start_matches("./")
                        .to_string();
                    let mut data = Vec::new();
                    e.read_to_end(&mut data)?;
                    out.insert(name, data);
                }
            }
        }
    }
    Ok(out)
}
