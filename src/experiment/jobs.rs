//! `llmlab run --jobs N`: up to N trials at once, each in a process of its own that runs
//! [`super::runner::run`] for one trial (`--trial SLUG`), so its folder is the one a
//! sequential run writes.
use super::events::{self, Progress};
use super::runner::{experiment_dir, Outcome, RunOptions, TrialResult};
use super::status::{has_status, read_status};
use super::task::TaskSpec;
use super::{Experiment, Trial};
use crate::error::LlmError;
use anyhow::Result;
use std::path::Path;

/// How [`run_parallel`] starts the process of one trial.
pub struct Launch<'a> {
    /// Trials running at once (at least 1).
    pub jobs: usize,
    /// `CUDA_VISIBLE_DEVICES` values to spread the processes over, one GPU each (round robin
    /// over the job slots); empty: the variable is left alone. See [`visible_gpus`].
    pub gpus: Vec<String>,
    /// The command line that runs the trial with this slug, on this many threads, and nothing
    /// else (`llmlab run FILE --trial SLUG --threads K ...`).
    pub command: &'a dyn Fn(&str, usize) -> std::process::Command,
}

/// The GPUs a `--jobs` sweep hands out one per process: with `--device auto|cuda` on a machine
/// where libtorch sees several CUDA devices, their `CUDA_VISIBLE_DEVICES` names (the entries of
/// an inherited `CUDA_VISIBLE_DEVICES`, else `0..n`); otherwise none (a single GPU is shared, an
/// explicit `cuda:N` is kept as given).
pub fn visible_gpus(device: &str) -> Vec<String> {
    if device != "auto" && device != "cuda" {
        return Vec::new();
    }
    let n = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
    if n < 2 {
        return Vec::new();
    }
    match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .take(n)
            .collect(),
        _ => (0..n).map(|i| i.to_string()).collect(),
    }
}

/// A trial's process while it runs.
struct Running {
    index: usize,
    slot: usize,
    child: std::process::Child,
    started: std::time::Instant,
}

/// Runs up to `launch.jobs` trials at once, each in a process of its own (see [`Launch`]) that
/// writes its output to `<trial>/log.txt`; this process shows the sweep's progress and a line
/// per trial as it starts and ends. Finished trials are skipped as in [`super::runner::run`];
/// each process resumes, restarts or records its trial exactly as that does, so the folders (and, with the
/// same threads per trial, the numbers) are those of a sequential run. A trial whose process
/// ends without recording its outcome (a crash) is recorded as failed. Ctrl-C passes on to the
/// running trials (each saves its state), starts no more, and ends with
/// [`LlmError::SweepInterrupted`].
pub fn run_parallel(
    exp: &Experiment,
    trials: &[(Trial, TaskSpec)],
    opts: &RunOptions,
    launch: &Launch,
) -> Result<Vec<TrialResult>> {
    let root = experiment_dir(exp, opts)?;
    let progress = Progress::new(trials.len());
    if let Err(e) = events::write_tb_experiment(exp, &root) {
        progress.log(&format!("TensorBoard: {e:#}"));
    }
    let jobs = launch.jobs.max(1);
    let threads = crate::device::threads_per_job(opts.threads, jobs);
    let n = trials.len();
    let label = |i: usize| format!("[{}/{n}] {}", i + 1, trials[i].0.slug);
    let mut results: Vec<Option<TrialResult>> = vec![None; n];
    let mut pending = std::collections::VecDeque::new();
    for (i, (trial, _)) in trials.iter().enumerate() {
        let dir = root.join(&trial.slug);
        if !opts.restart && super::status::is_done(&dir, &exp.evaluate) {
            progress.log(&format!("{}: finished before, skipped", label(i)));
            results[i] = Some(TrialResult {
                slug: trial.slug.clone(),
                dir,
                outcome: Outcome::Skipped,
            });
        } else {
            pending.push_back(i);
        }
    }
    let done = |results: &[Option<TrialResult>]| results.iter().flatten().count() as u64;
    progress.sweep.set_position(done(&results));
    let mut running: Vec<Running> = Vec::new();
    let mut free_slots: Vec<usize> = (0..jobs).rev().collect();
    let mut stopped: Vec<String> = Vec::new();
    loop {
        while !crate::signal::interrupted() && running.len() < jobs {
            let Some(i) = pending.pop_front() else { break };
            let slot = free_slots
                .pop()
                .expect("a free slot while fewer than jobs run");
            let gpu = (!launch.gpus.is_empty()).then(|| &launch.gpus[slot % launch.gpus.len()]);
            let trial = &trials[i].0;
            let dir = root.join(&trial.slug);
            let rerun_failed = has_status(&dir, "failed");
            match spawn_trial(launch, &trial.slug, threads, gpu, &dir) {
                Ok(child) => {
                    progress.log(&format!(
                        "{}: started: {} ({threads} thread{}{}; log: {})",
                        label(i),
                        events::start_text(trial, rerun_failed),
                        if threads == 1 { "" } else { "s" },
                        gpu.map(|g| format!(", GPU {g}")).unwrap_or_default(),
                        dir.join("log.txt").display()
                    ));
                    running.push(Running {
                        index: i,
                        slot,
                        child,
                        started: std::time::Instant::now(),
                    });
                }
                Err(e) => {
                    free_slots.push(slot);
                    let msg = format!("{e:#}");
                    progress.failed(&label(i), &dir, &msg);
                    results[i] = Some(TrialResult {
                        slug: trial.slug.clone(),
                        dir,
                        outcome: Outcome::Failed(msg),
                    });
                }
            }
        }
        let mut k = 0;
        while k < running.len() {
            let status = match crate::signal::try_wait_child(&mut running[k].child) {
                Ok(None) => {
                    k += 1;
                    continue;
                }
                Ok(Some(status)) => Ok(status),
                Err(e) => Err(e),
            };
            let r = running.swap_remove(k);
            free_slots.push(r.slot);
            let trial = &trials[r.index].0;
            let dir = root.join(&trial.slug);
            let secs = r.started.elapsed().as_secs_f64();
            let outcome = match status {
                Ok(s) if s.success() && has_status(&dir, "finished") => {
                    let metrics = metrics_text(&dir);
                    progress.log(&format!(
                        "{}: finished in {secs:.0}s{}{metrics}",
                        label(r.index),
                        if metrics.is_empty() { "" } else { ": " },
                    ));
                    Some(Outcome::Finished)
                }
                // The trial recorded its failure (exit 1, status.json with the error).
                Ok(s) if s.code() == Some(1) && has_status(&dir, "failed") => {
                    let msg = read_status(&dir).and_then(|t| t.error).unwrap_or_default();
                    progress.log(&format!("{}: FAILED: {msg}", label(r.index)));
                    Some(Outcome::Failed(msg))
                }
                // Ctrl-C (ours, passed on, or one sent to the trial itself): it saved its state.
                Ok(s) if s.code() == Some(130) || crate::signal::interrupted() => {
                    if !crate::signal::interrupted() {
                        progress.log(&format!(
                            "{}: interrupted; stopping the sweep",
                            label(r.index)
                        ));
                        crate::signal::stop_children();
                    }
                    stopped.push(trial.slug.clone());
                    None
                }
                other => {
                    let how = match other {
                        Ok(s) => format!("its process ended ({s})"),
                        Err(e) => format!("waiting for its process failed ({e})"),
                    };
                    let msg = format!(
                        "{how} without recording an outcome{}; see {}",
                        last_line(&dir.join("log.txt"))
                            .map(|l| format!(": {l}"))
                            .unwrap_or_default(),
                        dir.join("log.txt").display()
                    );
                    progress.failed(&label(r.index), &dir, &msg);
                    Some(Outcome::Failed(msg))
                }
            };
            if let Some(outcome) = outcome {
                results[r.index] = Some(TrialResult {
                    slug: trial.slug.clone(),
                    dir,
                    outcome,
                });
            }
        }
        if running.is_empty() && (pending.is_empty() || crate::signal::interrupted()) {
            break;
        }
        progress.sweep.set_position(done(&results));
        let mut names: Vec<&str> = running
            .iter()
            .map(|r| trials[r.index].0.slug.as_str())
            .collect();
        names.sort_unstable();
        progress
            .sweep
            .set_message(format!("running: {}", names.join(", ")));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    progress.sweep.finish_and_clear();
    if crate::signal::interrupted() {
        return Err(LlmError::SweepInterrupted { stopped, dir: root }.into());
    }
    Ok(results.into_iter().flatten().collect())
}

/// Starts one trial's process: output appended to `<trial>/log.txt`, a process group of its own
/// (the terminal's Ctrl-C reaches only this process, which passes it on once), and on Linux a
/// SIGINT when this process dies, so a killed sweep leaves no trial running unattended.
fn spawn_trial(
    launch: &Launch,
    slug: &str,
    threads: usize,
    gpu: Option<&String>,
    dir: &Path,
) -> Result<std::process::Child> {
    use std::io::Write;
    std::fs::create_dir_all(dir).map_err(|source| LlmError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let log_path = dir.join("log.txt");
    let io = |source| LlmError::Io {
        path: log_path.clone(),
        source,
    };
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io)?;
    let mut cmd = (launch.command)(slug, threads);
    if let Some(g) = gpu {
        cmd.env("CUDA_VISIBLE_DEVICES", g);
    }
    writeln!(
        log,
        "--- {}{cmd:?}",
        gpu.map(|g| format!("CUDA_VISIBLE_DEVICES={g} "))
            .unwrap_or_default()
    )
    .map_err(io)?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(io)?)
        .stderr(log);
    crate::signal::detach(&mut cmd);
    let child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start the trial's process ({e})"))?;
    crate::signal::add_child(child.id());
    Ok(child)
}

/// A finished trial's final metrics as a log line reads them: `val_loss 1.2345, step 12`.
pub(crate) fn metrics_text(dir: &Path) -> String {
    super::report::final_metrics(dir)
        .iter()
        .map(|(k, v)| {
            if v.fract() == 0.0 && v.abs() < 1e15 {
                format!("{k} {v:.0}")
            } else {
                format!("{k} {v:.4}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The last non-empty line of a log file.
fn last_line(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
}
