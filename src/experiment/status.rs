//! A trial's `status.json` ([`RunStatus`], the one every run folder has): `finished`, or
//! `failed` with its error. The tasks write `finished` as a run ends, the runners `failed`; the
//! runners, `llmlab run --dry-run` and `llmlab report` read it.
use crate::train::{RunDir, RunStatus};
use anyhow::Result;
use std::path::Path;

/// What `status.json` of the trial in `dir` says; `None` when it has none it can read (the trial
/// then runs).
pub fn read_status(dir: &Path) -> Option<RunStatus> {
    RunDir::at(dir).status().ok().flatten()
}

/// Whether the trial in `dir` recorded this status.
pub(crate) fn has_status(dir: &Path, status: &str) -> bool {
    read_status(dir).is_some_and(|s| s.status == status)
}

/// Whether the trial in `dir` has nothing left to do: it finished, and it holds the results of
/// the experiment's `evaluate:` block (an evaluation added after it finished still runs).
pub(crate) fn is_done(dir: &Path, evaluate: &[crate::eval::suite::Evaluation]) -> bool {
    has_status(dir, "finished") && crate::eval::suite::EvalResults::complete(dir, evaluate)
}

/// Records that the trial in `dir` (created if missing) failed with `error`.
pub(crate) fn write_failed(dir: &Path, error: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    RunDir::at(dir).write_status(&RunStatus::failed(error))
}
