//! Typed errors for what a user can get wrong (files, presets, data, checkpoints).
//!
//! Library functions return `anyhow::Result` with these as the root cause, so tests can match on
//! the kind and `main` can choose the exit code: usage errors (bad config, unknown preset) exit
//! with 2, everything else with 1.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid UTF-8 text (invalid byte at offset {offset}); convert it to UTF-8 first")]
    NotUtf8 { path: PathBuf, offset: usize },
    #[error("unknown {what} '{name}'; expected one of: {}", .expected.join(", "))]
    Unknown {
        what: &'static str,
        name: String,
        expected: Vec<String>,
    },
    #[error("invalid config {origin}: {message}")]
    Config { origin: String, message: String },
    #[error("the text has {tokens} tokens, fewer than one window needs (max_length {max_length} + 1 for the shifted target); use a longer text or a smaller max_length")]
    TextTooShort { tokens: usize, max_length: usize },
    #[error("checksum mismatch for {url}: expected sha256 {expected}, found {found}")]
    Checksum {
        url: String,
        expected: String,
        found: String,
    },
    #[error("download of {url} failed: {message}")]
    Download { url: String, message: String },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    /// A weights or model file that can't be used as it is (GGUF, config.json, ...).
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("{0}")]
    Usage(String),
    /// Ctrl-C (or SIGTERM) stopped a run after its state was written.
    #[error("interrupted at step {step}; the state is saved in {dir}: run the same command again to resume")]
    Interrupted { step: usize, dir: PathBuf },
    /// Ctrl-C stopped a `--jobs` sweep; each running trial saved its state.
    #[error("interrupted; {}: run the same command again to resume", stopped_text(.stopped, .dir))]
    SweepInterrupted { stopped: Vec<String>, dir: PathBuf },
    /// A libtorch call through llmlab's C++ shim failed (its C++ exception message).
    #[error("libtorch {op} failed: {message}")]
    Torch { op: &'static str, message: String },
}

fn stopped_text(stopped: &[String], dir: &std::path::Path) -> String {
    match stopped {
        [] => "no trial was running".into(),
        [one] => format!("trial {one} saved its state in {}", dir.join(one).display()),
        many => format!(
            "trials {} saved their state under {}",
            many.join(", "),
            dir.display()
        ),
    }
}

impl LlmError {
    /// Exit code for the command line: 2 for usage/config mistakes, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            LlmError::Unknown { .. } | LlmError::Config { .. } | LlmError::Usage(_) => 2,
            LlmError::Interrupted { .. } | LlmError::SweepInterrupted { .. } => 130,
            _ => 1,
        }
    }
}

/// Reads a whole file, naming it in the error.
/// Maps an I/O error on `path` to [`LlmError::Io`] (for `map_err`).
pub fn io_at(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> LlmError + '_ {
    move |source| LlmError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn read_bytes(path: &std::path::Path) -> Result<Vec<u8>, LlmError> {
    std::fs::read(path).map_err(|source| LlmError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a UTF-8 text file, naming the file and the first bad byte if it is not UTF-8.
pub fn read_text(path: &std::path::Path) -> Result<String, LlmError> {
    let bytes = read_bytes(path)?;
    String::from_utf8(bytes).map_err(|e| LlmError::NotUtf8 {
        path: path.to_path_buf(),
        offset: e.utf8_error().valid_up_to(),
    })
}

/// Writes `bytes` to `path` atomically: a temp file in the same folder, fsync, then rename.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<(), LlmError> {
    use std::io::Write;
    let io = |source| LlmError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(io)?;
    let tmp = temp_path(path);
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)
}

/// A sibling temp path (`.NAME.tmp.PID`) for write-then-rename.
pub fn temp_path(path: &std::path::Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}
