//! `llmlab run FILE --backend slurm`: the trials of a sweep as one Slurm job array.
//!
//! Submitting writes `runs/<experiment>/slurm/sweep.sbatch` (plain and commented, so a user can
//! adapt it and `sbatch` it by hand) and submits it with `--array` listing the trials that are
//! not finished — the skip/resume rules of a local run ([`super::status::is_done`]). Array task
//! `i` runs `llmlab run FILE --trial i`: `i` is the trial's position in
//! `runs/<experiment>/experiment.json`, so the indexes stay the same from one submission to the
//! next. Each task runs on `SLURM_CPUS_PER_TASK` threads and the GPUs Slurm gives it
//! (`CUDA_VISIBLE_DEVICES`). Its output goes to `slurm/<job>_<index>.out`.
//!
//! The latest submission is recorded in `slurm/array.json` (job id, index → trial); `llmlab
//! report` overlays what `squeue` (queued, running) and, where accounting is on, `sacct` (tasks
//! that ended without a word from llmlab) say about it on the trial folders' own status.
//! `--wait` polls `squeue` until the array is done and ends like a local run. A cancelled task
//! (`scancel`) gets SIGTERM, which llmlab handles as Ctrl-C: the trial saves its state and
//! submitting again resumes it.
use super::events::Progress;
use super::report::ExperimentRecord;
use super::runner::{Outcome, TrialResult};
use super::status::{has_status, is_done, read_status};
use crate::error::LlmError;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What each array task asks Slurm for (`llmlab run --backend slurm` flags).
#[derive(Debug, Clone, Default)]
pub struct SlurmOptions {
    /// `--partition`.
    pub partition: Option<String>,
    /// `--time` (HH:MM:SS, or Slurm's other forms such as D-HH:MM:SS).
    pub time: Option<String>,
    /// `--cpus-per-task` (and the trial's threads).
    pub cpus_per_trial: usize,
    /// `--gres=gpu:N` (0: none).
    pub gpus_per_trial: usize,
    /// `--mem` (e.g. 8G).
    pub mem: Option<String>,
    /// `%K` on `--array`: at most this many tasks at once.
    pub array_parallelism: Option<usize>,
    /// Extra `#SBATCH` lines, as given (`--sbatch-arg=--qos=short`).
    pub sbatch_args: Vec<String>,
}

impl SlurmOptions {
    /// Checks the values before anything is written; errors name the flag and the value.
    pub fn validate(&self) -> Result<(), LlmError> {
        let usage = |m: String| Err(LlmError::Usage(m));
        if self.cpus_per_trial == 0 {
            return usage("--cpus-per-trial 0: each trial needs at least 1 CPU".into());
        }
        if self.array_parallelism == Some(0) {
            return usage(
                "--array-parallelism 0: give how many trials may run at once, at least 1".into(),
            );
        }
        if let Some(p) = &self.partition {
            if p.is_empty() || p.contains(char::is_whitespace) {
                return usage(format!(
                    "--partition '{p}': expected a partition name (see sinfo)"
                ));
            }
        }
        if let Some(t) = &self.time {
            if !valid_time(t) {
                return usage(format!(
                    "--time {t}: expected HH:MM:SS (or MM:SS, D-HH:MM:SS, D-HH), e.g. 02:00:00"
                ));
            }
        }
        if let Some(m) = &self.mem {
            let digits = m.trim_end_matches(['K', 'M', 'G', 'T']);
            if digits.is_empty()
                || !digits.chars().all(|c| c.is_ascii_digit())
                || m.len() - digits.len() > 1
            {
                return usage(format!(
                    "--mem {m}: expected a size in megabytes or with a unit K, M, G or T, e.g. 8G"
                ));
            }
        }
        for a in &self.sbatch_args {
            if !a.starts_with('-') || a.contains('\n') {
                return usage(format!(
                    "--sbatch-arg {a:?}: expected one sbatch option, e.g. --sbatch-arg=--qos=short"
                ));
            }
        }
        Ok(())
    }
}

/// Slurm's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (digits only).
fn valid_time(t: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.len() <= 4 && s.chars().all(|c| c.is_ascii_digit());
    let (days, rest) = match t.split_once('-') {
        Some((d, r)) => (Some(d), r),
        None => (None, t),
    };
    if days.is_some_and(|d| !digits(d)) {
        return false;
    }
    let parts: Vec<&str> = rest.split(':').collect();
    parts.iter().all(|p| digits(p)) && (1..=3).contains(&parts.len())
}

/// The command line every array task runs, minus its threads and trial: the running binary and
/// the experiment file (absolute), with the submission's `--set`s, folders and device.
#[derive(Debug, Clone)]
pub struct TaskCommand {
    pub exe: PathBuf,
    /// Arguments after the binary: `run /abs/FILE --runs /abs/runs --device auto ...`.
    pub args: Vec<String>,
    /// The submission's working directory (the tasks' too).
    pub cwd: PathBuf,
}

/// The latest submission of an experiment (`slurm/array.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Submission {
    pub job_id: String,
    /// Array index → trial slug, the tasks submitted.
    pub tasks: Vec<(usize, String)>,
    /// Seconds since the Unix epoch when sbatch accepted the array.
    pub submitted_at: f64,
    pub script: PathBuf,
}

/// `runs/<experiment>/slurm/`.
pub fn slurm_dir(exp_dir: &Path) -> PathBuf {
    exp_dir.join("slurm")
}

/// A program on the PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// `sbatch` from the PATH, or an error that names the flag and what to do.
pub fn find_sbatch() -> Result<PathBuf, LlmError> {
    on_path("sbatch").ok_or_else(|| {
        LlmError::Usage(
            "--backend slurm: no `sbatch` on the PATH; run on a Slurm login node, add Slurm's \
             client tools to the PATH, start a one-node cluster with `scripts/slurm-local.sh \
             start`, or run the trials here (drop --backend slurm; --jobs N runs N at once)"
                .into(),
        )
    })
}

/// The trials a submission runs, as (index in the record, slug): those not done, or all of
/// them with `restart`.
pub fn pending(
    exp_dir: &Path,
    rec: &ExperimentRecord,
    evaluate: &[crate::eval::suite::Evaluation],
    restart: bool,
) -> Vec<(usize, String)> {
    rec.trials
        .iter()
        .enumerate()
        .filter(|(_, (slug, _))| restart || !is_done(&exp_dir.join(slug), evaluate))
        .map(|(i, (slug, _))| (i, slug.clone()))
        .collect()
}

/// `--array`'s value: runs of consecutive indexes as ranges (`0-2,5`), then `%K`.
pub fn array_spec(indexes: &[usize], parallelism: Option<usize>) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < indexes.len() {
        let mut j = i;
        while j + 1 < indexes.len() && indexes[j + 1] == indexes[j] + 1 {
            j += 1;
        }
        parts.push(if j == i {
            indexes[i].to_string()
        } else {
            format!("{}-{}", indexes[i], indexes[j])
        });
        i = j + 1;
    }
    let mut s = parts.join(",");
    if let Some(k) = parallelism {
        s.push_str(&format!("%{k}"));
    }
    s
}

/// A word for bash: as is when it is plain, else in single quotes.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The text of `sweep.sbatch`.
pub fn script(
    rec: &ExperimentRecord,
    exp_dir: &Path,
    tasks: &[(usize, String)],
    opts: &SlurmOptions,
    cmd: &TaskCommand,
) -> String {
    let out_dir = slurm_dir(exp_dir);
    let mut s = String::new();
    s.push_str("#!/bin/bash\n");
    s.push_str(&format!(
        "# The trials of llmlab experiment `{}` as one Slurm job array, written by\n\
         # `llmlab run --backend slurm`. Array task i runs `llmlab run FILE --trial i`: trial i of\n\
         # {} (0-based). Submitting this file again by hand runs the same\n\
         # tasks; llmlab skips a trial that finished and resumes one that saved a checkpoint.\n",
        rec.name,
        exp_dir.join("experiment.json").display()
    ));
    s.push_str("#\n# index  trial\n");
    for (i, (slug, _)) in rec.trials.iter().enumerate() {
        let submitted = tasks.iter().any(|(j, _)| *j == i);
        s.push_str(&format!(
            "#   {i:>3}  {slug}{}\n",
            if submitted {
                ""
            } else {
                "  (done: not in --array)"
            }
        ));
    }
    let indexes: Vec<usize> = tasks.iter().map(|(i, _)| *i).collect();
    s.push_str("#\n");
    s.push_str(&format!("#SBATCH --job-name=llmlab-{}\n", rec.name));
    s.push_str("# The trials to run; %K after the list: at most K at once.\n");
    s.push_str(&format!(
        "#SBATCH --array={}\n",
        array_spec(&indexes, opts.array_parallelism)
    ));
    s.push_str("# One log per task: <job id>_<array index>.out.\n");
    s.push_str(&format!(
        "#SBATCH --output={}\n",
        out_dir.join("%A_%a.out").display()
    ));
    s.push_str(&format!("#SBATCH --chdir={}\n", cmd.cwd.display()));
    s.push_str("# The submitting shell's environment (LLMLAB_DATA_MIRROR, LLMLAB_CACHE, ...).\n");
    s.push_str("#SBATCH --export=ALL\n");
    s.push_str("#SBATCH --ntasks=1\n");
    s.push_str(&format!(
        "#SBATCH --cpus-per-task={}\n",
        opts.cpus_per_trial
    ));
    if opts.gpus_per_trial > 0 {
        s.push_str(&format!("#SBATCH --gres=gpu:{}\n", opts.gpus_per_trial));
    }
    if let Some(p) = &opts.partition {
        s.push_str(&format!("#SBATCH --partition={p}\n"));
    }
    if let Some(t) = &opts.time {
        s.push_str(&format!("#SBATCH --time={t}\n"));
    }
    if let Some(m) = &opts.mem {
        s.push_str(&format!("#SBATCH --mem={m}\n"));
    }
    for a in &opts.sbatch_args {
        s.push_str(&format!("#SBATCH {a}\n"));
    }
    s.push_str("\nset -euo pipefail\n");
    s.push_str(
        "# Threads: the CPUs Slurm gave this task. GPUs: Slurm sets CUDA_VISIBLE_DEVICES to this\n\
         # task's, and --device auto picks the first. `exec`: scancel's SIGTERM reaches llmlab\n\
         # itself, which saves the trial's state and exits (submitting again resumes it).\n",
    );
    // One option and its value a line: `run FILE`, `--runs DIR`, `--set KEY=VALUE`, ...
    let mut line = format!("exec {}", shell_quote(&cmd.exe.display().to_string()));
    let mut i = 0;
    while i < cmd.args.len() {
        line.push_str(" \\\n    ");
        line.push_str(&shell_quote(&cmd.args[i]));
        if cmd.args.get(i + 1).is_some_and(|v| !v.starts_with("--")) {
            line.push(' ');
            line.push_str(&shell_quote(&cmd.args[i + 1]));
            i += 1;
        }
        i += 1;
    }
    line.push_str(&format!(
        " \\\n    --threads \"${{SLURM_CPUS_PER_TASK:-{}}}\" \\\n    --trial \"$SLURM_ARRAY_TASK_ID\"\n",
        opts.cpus_per_trial
    ));
    s.push_str(&line);
    s
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The latest submission recorded in `exp_dir`, if any.
pub fn read_submission(exp_dir: &Path) -> Option<Submission> {
    let text = std::fs::read_to_string(slurm_dir(exp_dir).join("array.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// What `squeue` says of a job array's tasks: array index → state (PENDING, RUNNING, ...).
/// `None` when squeue is missing or fails; an array squeue no longer knows is empty.
pub fn squeue(job_id: &str) -> Option<BTreeMap<usize, String>> {
    let squeue = on_path("squeue")?;
    let out = Command::new(squeue)
        .args(["-h", "-r", "-j", job_id, "-o", "%K %T"])
        .output()
        .ok()?;
    if !out.status.success() {
        // A job purged from the controller's memory (MinJobAge after it ended).
        let err = String::from_utf8_lossy(&out.stderr);
        return err.contains("Invalid job id").then(BTreeMap::new);
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (k, state) = l.trim().split_once(' ')?;
                Some((k.parse().ok()?, state.trim().to_string()))
            })
            .collect(),
    )
}

/// What `sacct` says of the tasks that ended: array index → state (COMPLETED, CANCELLED, ...).
/// Empty without accounting.
fn sacct(job_id: &str) -> BTreeMap<usize, String> {
    let Some(sacct) = on_path("sacct") else {
        return BTreeMap::new();
    };
    let Ok(out) = Command::new(sacct)
        .args(["-n", "-P", "-X", "-j", job_id, "-o", "JobID,State"])
        .output()
    else {
        return BTreeMap::new();
    };
    if !out.status.success() {
        return BTreeMap::new();
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (id, state) = l.split_once('|')?;
            let index = id.rsplit_once('_')?.1.parse().ok()?;
            let state = state.split_whitespace().next()?.to_string();
            Some((index, state))
        })
        .collect()
}

/// A Slurm job state as a trial status: queued, running, or (a task that ended) failed or
/// interrupted; `None` for the states that leave the trial's own record in charge.
fn trial_status(state: &str) -> Option<&'static str> {
    match state {
        "PENDING" | "CONFIGURING" | "REQUEUED" | "REQUEUE_HOLD" | "RESV_DEL_HOLD" => Some("queued"),
        "RUNNING" | "COMPLETING" | "SUSPENDED" | "STAGE_OUT" | "SIGNALING" => Some("running"),
        "FAILED" | "OUT_OF_MEMORY" | "NODE_FAIL" | "BOOT_FAIL" => Some("failed"),
        "CANCELLED" | "TIMEOUT" | "PREEMPTED" | "DEADLINE" => Some("interrupted"),
        _ => None,
    }
}

/// The status `llmlab report` shows for the trials of the latest submission, from Slurm:
/// queued and running (squeue) override the folders' status; a task that ended failed or
/// cancelled (sacct) only fills in for a trial that recorded nothing (not run, interrupted).
/// `file_status` is what the trial folder says.
pub fn overlay(exp_dir: &Path, file_status: &mut BTreeMap<String, String>) {
    let Some(sub) = read_submission(exp_dir) else {
        return;
    };
    let live = squeue(&sub.job_id).unwrap_or_default();
    let ended = if sub.tasks.iter().all(|(i, _)| live.contains_key(i)) {
        BTreeMap::new()
    } else {
        sacct(&sub.job_id)
    };
    for (index, slug) in &sub.tasks {
        let Some(current) = file_status.get_mut(slug) else {
            continue;
        };
        if let Some(s) = live.get(index).and_then(|s| trial_status(s)) {
            if s == "queued" || s == "running" {
                *current = s.to_string();
            }
        } else if let Some(s) = ended.get(index).and_then(|s| trial_status(s)) {
            if (s == "failed" || s == "interrupted")
                && (current == "not run" || current == "interrupted")
            {
                *current = s.to_string();
            }
        }
    }
}

/// Submits the array: refuses while the previous array of the experiment still has tasks in the
/// queue; writes `slurm/sweep.sbatch`, runs `sbatch --parsable` and records `slurm/array.json`.
/// `None` when every trial is done (nothing is submitted).
pub fn submit(
    exp_dir: &Path,
    rec: &ExperimentRecord,
    tasks: &[(usize, String)],
    opts: &SlurmOptions,
    cmd: &TaskCommand,
) -> Result<Option<Submission>> {
    let sbatch = find_sbatch()?;
    if tasks.is_empty() {
        return Ok(None);
    }
    if let Some(prev) = read_submission(exp_dir) {
        if let Some(live) = squeue(&prev.job_id).filter(|l| !l.is_empty()) {
            return Err(LlmError::Usage(format!(
                "--backend slurm: job array {} of experiment {} still has {} task(s) queued or \
                 running (squeue -j {}); wait for it (llmlab report {}) or cancel it (scancel {}) \
                 before submitting again",
                prev.job_id,
                rec.name,
                live.len(),
                prev.job_id,
                exp_dir.display(),
                prev.job_id
            ))
            .into());
        }
    }
    let dir = slurm_dir(exp_dir);
    std::fs::create_dir_all(&dir).map_err(crate::error::io_at(&dir))?;
    let path = dir.join("sweep.sbatch");
    crate::error::write_atomic(&path, script(rec, exp_dir, tasks, opts, cmd).as_bytes())?;
    let out = Command::new(&sbatch)
        .arg("--parsable")
        .arg(&path)
        .current_dir(&cmd.cwd)
        .output()
        .map_err(|e| anyhow::anyhow!("--backend slurm: cannot run {} ({e})", sbatch.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "--backend slurm: sbatch refused {} ({}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // `--parsable`: "<job id>" or "<job id>;<cluster>".
    let stdout = String::from_utf8_lossy(&out.stdout);
    let job_id = stdout
        .trim()
        .split(';')
        .next()
        .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--backend slurm: sbatch printed no job id (stdout: {:?})",
                stdout.trim()
            )
        })?
        .to_string();
    let sub = Submission {
        job_id,
        tasks: tasks.to_vec(),
        submitted_at: now_secs(),
        script: path,
    };
    crate::error::write_atomic(
        &dir.join("array.json"),
        serde_json::to_string_pretty(&sub)?.as_bytes(),
    )?;
    Ok(Some(sub))
}

/// Waits until no task of the array is queued or running, logging each trial as it starts and
/// ends; returns every trial's outcome (the ones not submitted: skipped), as a local run does.
/// A trial whose task ended without recording finished or failed (cancelled, out of time) comes
/// back as [`Outcome::Failed`] saying so; its saved state resumes on the next submission.
/// Ctrl-C stops the waiting, not the array.
pub fn wait(exp_dir: &Path, rec: &ExperimentRecord, sub: &Submission) -> Result<Vec<TrialResult>> {
    let n = rec.trials.len();
    let progress = Progress::new(n);
    let label = |i: usize| format!("[{}/{n}] {}", i + 1, rec.trials[i].0);
    let mut state: BTreeMap<usize, &'static str> = BTreeMap::new();
    let mut outcomes: BTreeMap<usize, Outcome> = BTreeMap::new();
    let mut failures = 0;
    progress.sweep.set_position((n - sub.tasks.len()) as u64);
    loop {
        if crate::signal::interrupted() {
            progress.sweep.finish_and_clear();
            return Err(LlmError::Usage(format!(
                "stopped waiting; job array {} goes on (llmlab report {} shows it; scancel {} \
                 stops it, each trial saving its state)",
                sub.job_id,
                exp_dir.display(),
                sub.job_id
            ))
            .into());
        }
        let Some(live) = squeue(&sub.job_id) else {
            failures += 1;
            if failures > 30 {
                anyhow::bail!(
                    "--wait: squeue -j {} fails; the array may still run (llmlab report {})",
                    sub.job_id,
                    exp_dir.display()
                );
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
            continue;
        };
        failures = 0;
        for (index, slug) in &sub.tasks {
            if outcomes.contains_key(index) {
                continue;
            }
            let dir = exp_dir.join(slug);
            match live.get(index).and_then(|s| trial_status(s)) {
                Some(s @ ("queued" | "running")) => {
                    if state.get(index) != Some(&s) {
                        if s == "running" {
                            progress.log(&format!(
                                "{}: running (task {}_{index})",
                                label(*index),
                                sub.job_id
                            ));
                        }
                        state.insert(*index, s);
                    }
                }
                _ => {
                    let log = slurm_dir(exp_dir).join(format!("{}_{index}.out", sub.job_id));
                    let outcome = if has_status(&dir, "finished") {
                        let metrics = super::jobs::metrics_text(&dir);
                        progress.log(&format!(
                            "{}: finished{}{metrics}",
                            label(*index),
                            if metrics.is_empty() { "" } else { ": " }
                        ));
                        Outcome::Finished
                    } else if has_status(&dir, "failed") {
                        let msg = read_status(&dir).and_then(|t| t.error).unwrap_or_default();
                        progress.log(&format!("{}: FAILED: {msg}", label(*index)));
                        Outcome::Failed(msg)
                    } else {
                        let msg = format!(
                            "its Slurm task {}_{index} ended before the trial finished \
                             (cancelled, out of time, or see {}); submit again to resume it",
                            sub.job_id,
                            log.display()
                        );
                        progress.log(&format!("{}: interrupted: {msg}", label(*index)));
                        Outcome::Failed(msg)
                    };
                    outcomes.insert(*index, outcome);
                    progress.sweep.inc(1);
                }
            }
        }
        if outcomes.len() == sub.tasks.len() {
            break;
        }
        let running: Vec<&str> = sub
            .tasks
            .iter()
            .filter(|(i, _)| state.get(i) == Some(&"running") && !outcomes.contains_key(i))
            .map(|(_, s)| s.as_str())
            .collect();
        progress.sweep.set_message(format!(
            "job {}: running: {}",
            sub.job_id,
            running.join(", ")
        ));
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    progress.sweep.finish_and_clear();
    Ok(rec
        .trials
        .iter()
        .enumerate()
        .map(|(i, (slug, _))| TrialResult {
            slug: slug.clone(),
            dir: exp_dir.join(slug),
            outcome: outcomes.remove(&i).unwrap_or(Outcome::Skipped),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_specs_and_times() {
        assert_eq!(array_spec(&[0, 1, 2, 5], None), "0-2,5");
        assert_eq!(array_spec(&[1, 3], Some(2)), "1,3%2");
        assert_eq!(array_spec(&[4], None), "4");
        for t in ["02:00:00", "30", "10:00", "1-00", "2-12:30:00"] {
            assert!(valid_time(t), "{t}");
        }
        for t in ["", "2h", "1-", "1:2:3:4", "a:00"] {
            assert!(!valid_time(t), "{t}");
        }
        assert_eq!(shell_quote("/a/b.yaml"), "/a/b.yaml");
        assert_eq!(shell_quote("train.lr=1e-3"), "train.lr=1e-3");
        assert_eq!(shell_quote("it's x"), "'it'\\''s x'");
    }

    #[test]
    fn options_are_checked() {
        let ok = SlurmOptions {
            cpus_per_trial: 1,
            mem: Some("8G".into()),
            time: Some("01:00:00".into()),
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        let bad = |o: SlurmOptions, flag: &str| {
            let e = o
                .validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.starts_with(flag), "{e}");
        };
        bad(
            SlurmOptions {
                mem: Some("8GB".into()),
                ..ok.clone()
            },
            "--mem 8GB",
        );
        bad(
            SlurmOptions {
                time: Some("1h".into()),
                ..ok.clone()
            },
            "--time 1h",
        );
        bad(
            SlurmOptions {
                cpus_per_trial: 0,
                ..ok.clone()
            },
            "--cpus-per-trial 0",
        );
        bad(
            SlurmOptions {
                sbatch_args: vec!["qos=x".into()],
                ..ok
            },
            "--sbatch-arg",
        );
    }
}
