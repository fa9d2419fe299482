//! A run folder's life, the same for every task that trains or samples: open it for a run's
//! settings (`--restart` clears it; `config.yaml` is written, or checked so a resume never mixes
//! two runs' settings), tell whether it finished, read its `metrics.jsonl`, and record the
//! finish in `status.json`. Pretraining, every fine-tuning task, the `generate` task and the
//! experiment runners (which read `status.json` to skip or retry a trial) all go through
//! [`RunDir`] and [`RunStatus`], so they agree on what "finished" means.
//!
//! ```text
//! runs/<name>/
//!   config.yaml     the resolved settings of the run in this folder
//!   metrics.jsonl   one JSON record a line (evaluations, then a task's final record)
//!   status.json     {"status":"finished","steps":N} once it ended; {"status":"failed",...}
//!   checkpoints/    what a resume starts from
//! ```
use crate::error::{read_text, write_atomic, LlmError};
use anyhow::Result;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The run's resolved settings (YAML).
pub const CONFIG: &str = "config.yaml";
/// Where the run stands once it stopped ([`RunStatus`]).
pub const STATUS: &str = "status.json";
/// The run's records, one JSON object a line.
pub const METRICS: &str = "metrics.jsonl";
/// The folder of the run's checkpoints.
pub const CHECKPOINTS: &str = "checkpoints";

/// What `status.json` says: `finished` (with the optimizer steps taken, for a training run) or
/// `failed` (with the error). A run in progress or stopped by Ctrl-C has none, which is what
/// lets a rerun resume it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStatus {
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RunStatus {
    /// The status of a run that ended; `steps`: the optimizer steps a training run took.
    pub fn finished(steps: Option<usize>) -> Self {
        Self {
            status: "finished".into(),
            steps,
            error: None,
        }
    }

    /// The status of a run that stopped with `error`.
    pub fn failed(error: &str) -> Self {
        Self {
            status: "failed".into(),
            steps: None,
            error: Some(error.to_string()),
        }
    }

    /// Whether the run ended (and so has its results).
    pub fn is_finished(&self) -> bool {
        self.status == "finished"
    }
}

/// A run folder (see the module docs). [`RunDir::open`] starts (or resumes) a run in it;
/// [`RunDir::at`] names one without touching it (to read its status, or to finish a run opened
/// earlier in this process).
#[derive(Debug, Clone)]
pub struct RunDir {
    dir: PathBuf,
    config_rewritten: bool,
}

impl RunDir {
    /// Prepares `dir` (created if missing) for the run whose resolved settings are `resolved`
    /// (YAML). `restart` first removes `config.yaml`, `status.json`, `metrics.jsonl`, the
    /// task's own `also_clear` files and `checkpoints/`, so the run starts over. A missing
    /// `config.yaml` is written; an existing one must hold `resolved`, or a config that
    /// `same_run` accepts (another way of running the same run, e.g. another AdamW kernel),
    /// which is then rewritten to `resolved` (see [`RunDir::config_rewritten`]). Anything else
    /// is a usage error naming the folder and its `config.yaml`: resuming with other settings
    /// would mix two runs in one folder. `another` ends that message ("or choose another
    /// `another`"): how the user names a different folder (`--out` on the command line).
    pub fn open(
        dir: &Path,
        resolved: &str,
        restart: bool,
        also_clear: &[&str],
        same_run: Option<&dyn Fn(&str) -> bool>,
        another: &str,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| LlmError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut run = Self::at(dir);
        if restart {
            for f in [CONFIG, STATUS, METRICS].iter().chain(also_clear) {
                let _ = std::fs::remove_file(dir.join(f));
            }
            let _ = std::fs::remove_dir_all(dir.join(CHECKPOINTS));
        }
        let config_path = run.config_path();
        if !config_path.is_file() {
            write_atomic(&config_path, resolved.as_bytes())?;
            return Ok(run);
        }
        let before = read_text(&config_path)?;
        if before == resolved {
            return Ok(run);
        }
        if same_run.is_some_and(|same| same(&before)) {
            // config.yaml records the settings in use from now on.
            write_atomic(&config_path, resolved.as_bytes())?;
            run.config_rewritten = true;
            return Ok(run);
        }
        Err(LlmError::Usage(format!(
            "{} holds a run with a different config ({}); resume it with the same settings, pass --restart to start over, or choose another {another}",
            dir.display(),
            config_path.display()
        ))
        .into())
    }

    /// The run folder `dir` as it is: no checks, nothing written.
    pub fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            config_rewritten: false,
        }
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Its `config.yaml`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG)
    }

    /// Its `metrics.jsonl`.
    pub fn metrics_path(&self) -> PathBuf {
        self.dir.join(METRICS)
    }

    /// Whether [`RunDir::open`] replaced a `config.yaml` that `same_run` accepted (the caller
    /// says so: the run resumes with a setting other than the one it started with).
    pub fn config_rewritten(&self) -> bool {
        self.config_rewritten
    }

    /// What `status.json` says; `None` when there is none, or when it is not a status (edited
    /// by hand: the writes are atomic), which every reader takes as "not finished". An error
    /// only when the file is there but cannot be read.
    pub fn status(&self) -> Result<Option<RunStatus>> {
        let path = self.dir.join(STATUS);
        if !path.is_file() {
            return Ok(None);
        }
        Ok(serde_json::from_str(&read_text(&path)?).ok())
    }

    /// Whether the run in this folder finished (a rerun only reports it).
    pub fn finished(&self) -> Result<bool> {
        Ok(self.status()?.is_some_and(|s| s.is_finished()))
    }

    /// The lines of `metrics.jsonl` that parse as `T` (a task writes records of more than one
    /// kind there: evaluations, then its final record); an error when the file is missing.
    pub fn read_records<T: DeserializeOwned>(&self) -> Result<Vec<T>> {
        Ok(read_text(&self.metrics_path())?
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// Writes `status.json` atomically (a reader never sees half a status).
    pub fn write_status(&self, status: &RunStatus) -> Result<()> {
        write_atomic(
            &self.dir.join(STATUS),
            serde_json::to_string(status)?.as_bytes(),
        )?;
        Ok(())
    }

    /// Records that the run ended, after `steps` optimizer steps for a training run: the last
    /// thing a run writes, so a folder that says finished has all its results.
    pub fn finish(&self, steps: Option<usize>) -> Result<()> {
        self.write_status(&RunStatus::finished(steps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, file: &str, text: &str) {
        std::fs::write(dir.join(file), text).expect("write");
    }

    fn usage_message(e: &anyhow::Error) -> String {
        match e.downcast_ref::<LlmError>() {
            Some(LlmError::Usage(m)) => m.clone(),
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    /// A new folder is created with its config; reopening with the same settings keeps it.
    #[test]
    fn open_writes_the_config_then_accepts_the_same_one() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("runs").join("a");
        let run = RunDir::open(&dir, "lr: 1\n", false, &[], None, "--out")?;
        assert_eq!(std::fs::read_to_string(run.config_path())?, "lr: 1\n");
        assert!(!run.finished()?);
        let again = RunDir::open(&dir, "lr: 1\n", false, &[], None, "--out")?;
        assert!(!again.config_rewritten());
        Ok(())
    }

    #[test]
    fn restart_clears_the_run_and_keeps_other_files() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path();
        for f in [CONFIG, STATUS, METRICS, "samples.jsonl", "train.csv"] {
            write(dir, f, "old");
        }
        std::fs::create_dir_all(dir.join(CHECKPOINTS).join("last"))?;
        write(&dir.join(CHECKPOINTS).join("last"), "state.json", "{}");
        let run = RunDir::open(dir, "lr: 2\n", true, &["samples.jsonl"], None, "folder")?;
        assert_eq!(std::fs::read_to_string(run.config_path())?, "lr: 2\n");
        for gone in [STATUS, METRICS, "samples.jsonl", CHECKPOINTS] {
            assert!(!dir.join(gone).exists(), "{gone} left after --restart");
        }
        assert!(dir.join("train.csv").is_file(), "a task's other file went");
        Ok(())
    }

    /// Other settings are refused with a message naming the folder, its config.yaml and the
    /// ways out; the config is left as it was.
    #[test]
    fn config_drift_is_refused() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path();
        RunDir::open(dir, "lr: 1\n", false, &[], None, "folder")?;
        let never = |_: &str| false;
        for (same_run, another) in [
            (None, "folder"),
            (Some(&never as &dyn Fn(&str) -> bool), "--out"),
        ] {
            let e = RunDir::open(dir, "lr: 2\n", false, &[], same_run, another)
                .expect_err("other settings refused");
            assert_eq!(
                usage_message(&e),
                format!(
                    "{} holds a run with a different config ({}); resume it with the same settings, pass --restart to start over, or choose another {another}",
                    dir.display(),
                    dir.join("config.yaml").display()
                )
            );
        }
        assert_eq!(std::fs::read_to_string(dir.join(CONFIG))?, "lr: 1\n");
        Ok(())
    }

    /// A config `same_run` accepts is replaced by the new settings, and the caller is told.
    #[test]
    fn accepted_drift_rewrites_the_config() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path();
        write(dir, CONFIG, "lr: 1\nkernel: a\n");
        let seen = std::cell::RefCell::new(String::new());
        let same = |before: &str| {
            *seen.borrow_mut() = before.to_string();
            before.starts_with("lr: 1\n")
        };
        let run = RunDir::open(dir, "lr: 1\nkernel: b\n", false, &[], Some(&same), "--out")?;
        assert!(run.config_rewritten());
        assert_eq!(*seen.borrow(), "lr: 1\nkernel: a\n");
        assert_eq!(
            std::fs::read_to_string(dir.join(CONFIG))?,
            "lr: 1\nkernel: b\n"
        );
        Ok(())
    }

    #[test]
    fn finish_and_finished_round_trip() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let run = RunDir::open(tmp.path(), "x: 1\n", false, &[], None, "folder")?;
        assert_eq!(run.status()?, None);
        run.finish(Some(12))?;
        let text = std::fs::read_to_string(tmp.path().join(STATUS))?;
        assert_eq!(text, r#"{"status":"finished","steps":12}"#);
        assert!(RunDir::at(tmp.path()).finished()?);
        assert_eq!(run.status()?, Some(RunStatus::finished(Some(12))));
        run.finish(None)?;
        let text = std::fs::read_to_string(tmp.path().join(STATUS))?;
        assert_eq!(text, r#"{"status":"finished"}"#);
        // --restart forgets it.
        let run = RunDir::open(tmp.path(), "x: 1\n", true, &[], None, "folder")?;
        assert!(!run.finished()?);
        Ok(())
    }

    /// A failed run, and a status.json that is no status, are not finished.
    #[test]
    fn failed_and_unreadable_statuses_are_not_finished() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let run = RunDir::at(tmp.path());
        run.write_status(&RunStatus::failed("the \"finished\" word is no status"))?;
        let text = std::fs::read_to_string(tmp.path().join(STATUS))?;
        assert!(text.starts_with(r#"{"status":"failed","error":"#), "{text}");
        assert!(!run.finished()?);
        write(tmp.path(), STATUS, "{\"finished\"");
        assert_eq!(run.status()?, None);
        assert!(!run.finished()?);
        Ok(())
    }

    /// metrics.jsonl holds records of several kinds: each reader takes the lines of its own.
    #[test]
    fn read_records_keeps_the_lines_of_one_kind() -> Result<()> {
        #[derive(Debug, PartialEq, Deserialize)]
        struct Eval {
            step: usize,
        }
        #[derive(Debug, PartialEq, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Final {
            accuracy: f64,
        }
        let tmp = tempfile::tempdir()?;
        let run = RunDir::at(tmp.path());
        assert!(run.read_records::<Eval>().is_err(), "no metrics.jsonl");
        write(
            tmp.path(),
            METRICS,
            "{\"step\":1}\n{\"step\":3}\nnot json\n{\"accuracy\":0.5}\n",
        );
        let evals: Vec<Eval> = run.read_records()?;
        assert_eq!(evals, [Eval { step: 1 }, Eval { step: 3 }]);
        assert_eq!(run.read_records::<Final>()?, [Final { accuracy: 0.5 }]);
        Ok(())
    }
}
