//! A trial's `status.json`: `finished`, or `failed` with its error. The runners write it; the
//! runners, `llmlab run --dry-run` and `llmlab report` read it.
use crate::error::write_atomic;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What `status.json` of a trial says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialStatus {
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub fn read_status(dir: &Path) -> Option<TrialStatus> {
    let text = std::fs::read_to_string(dir.join("status.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Whether the trial in `dir` recorded this status.
pub(crate) fn has_status(dir: &Path, status: &str) -> bool {
    read_status(dir).is_some_and(|s| s.status == status)
}

/// Records that the trial in `dir` (created if missing) failed with `error`.
pub(crate) fn write_failed(dir: &Path, error: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let s = TrialStatus {
        status: "failed".into(),
        error: Some(error.to_string()),
    };
    write_atomic(
        &dir.join("status.json"),
        serde_json::to_string(&s)?.as_bytes(),
    )?;
    Ok(())
}
