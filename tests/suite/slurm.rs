//! `llmlab run --backend slurm`: a sweep as one Slurm job array, on the one-node cluster of
//! `scripts/slurm-local.sh` (started here when it is not up; without it the array test prints a
//! line with SKIPPED and passes). The array gives, trial by trial, the metrics of the same sweep
//! run here with the same threads per trial (`--threads 2 --jobs 2`: one thread a trial, as
//! `--cpus-per-trial 1`); submitting again skips the finished trials; a task cancelled mid-trial
//! (`scancel`: SIGTERM) leaves its trial interrupted with a checkpoint, and submitting again
//! resumes it to the uninterrupted metrics.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report
use crate::common;

use anyhow::Result;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Four tiny trials (gpt-mini cut to one block of 32 dims) on the first 3,000 characters of
/// the-verdict: 20 steps each, a checkpoint every 2.
fn sweep(dir: &Path) -> Result<PathBuf> {
    let text = std::fs::read_to_string(common::mirror().join("the-verdict/the-verdict.txt"))?;
    let short = dir.join("short.txt");
    std::fs::write(&short, text.chars().take(3000).collect::<String>())?;
    let file = dir.join("arr.yaml");
    std::fs::write(
        &file,
        format!(
            "name: arr
model:
  preset: gpt-mini
  overrides: {{context_length: 16, emb_dim: 32, n_heads: 2, n_layers: 1, drop_rate: 0.1}}
data: {{path: {}, train_ratio: 0.9}}
train: {{epochs: 2, batch_size: 4, lr: 1.0e-3, eval_freq: 2, eval_iter: 1, checkpoint_every: 2}}
generate: {{max_new_tokens: 3}}
sweep: {{train.lr: [1.0e-3, 5.0e-4], seed: [1, 2]}}
",
            short.display()
        ),
    )?;
    Ok(file)
}

const SLUGS: [&str; 4] = [
    "lr-0.001_seed-1",
    "lr-0.001_seed-2",
    "lr-0.0005_seed-1",
    "lr-0.0005_seed-2",
];

/// `llmlab run FILE --runs RUNS EXTRA...`, waited for.
fn run(file: &Path, runs: &Path, extra: &[&str]) -> Result<Output> {
    Ok(common::run_command(file, runs, extra)
        .stdin(Stdio::null())
        .output()?)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The one-node cluster is up (started by scripts/slurm-local.sh when it is not); `false`, with
/// a loud line, when it cannot start.
fn cluster(test: &str) -> bool {
    let script = common::repo().join("scripts/slurm-local.sh");
    let out = Command::new("bash").arg(&script).arg("start").output();
    match out {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            eprintln!(
                "SKIPPED slurm::{test}: the one-node Slurm cluster could not start (scripts/slurm-local.sh start: {}): {}",
                o.status,
                text(&o.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!(
                "SKIPPED slurm::{test}: cannot run {}: {e}",
                script.display()
            );
            false
        }
    }
}

/// The trial's status in `llmlab report`.
fn report_status(exp_dir: &Path, slug: &str) -> Result<String> {
    let (code, out, err) = common::llmlab(&["report", exp_dir.to_str().unwrap()])?;
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(slug))
        .unwrap_or_else(|| panic!("{slug} in the report: {out}"));
    Ok(line.split_whitespace().nth(3).unwrap_or("?").to_string())
}

/// `kill SIGNAL PID` (a trial process this test's array started; it may have exited already).
fn signal(pid: &str, sig: &str) {
    let _ = Command::new("kill").args([sig, pid]).status();
}

/// Whether squeue still lists a task of the job.
fn queued(job: &str) -> bool {
    Command::new("squeue")
        .args(["-h", "-j", job])
        .output()
        .map(|o| o.status.success() && !o.stdout.is_empty())
        .unwrap_or(false)
}

#[test]
fn slurm_flags_are_checked_and_a_missing_sbatch_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = sweep(dir.path())?;
    let runs = dir.path().join("runs");
    let f = file.to_str().unwrap();
    let r = runs.to_str().unwrap();
    // No sbatch on the PATH: a usage error naming the flag, before anything is written.
    let empty = dir.path().join("empty-bin");
    std::fs::create_dir(&empty)?;
    let out = Command::new(env!("CARGO_BIN_EXE_llmlab"))
        .args(["run", f, "--runs", r, "--backend", "slurm"])
        .env("PATH", &empty)
        .env("LLMLAB_DATA_MIRROR", common::mirror())
        .output()?;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--backend slurm: no `sbatch` on the PATH"),
        "{err}"
    );
    assert!(!runs.join("arr/slurm").exists());
    for (args, expected) in [
        (vec!["--partition", "gpu"], "--partition: a Slurm option"),
        (vec!["--wait"], "--wait: a Slurm option"),
        (
            vec!["--backend", "slurm", "--jobs", "2"],
            "--jobs 2: with --backend slurm",
        ),
        (
            vec!["--backend", "slurm", "--mem", "8GB"],
            "--mem 8GB: expected",
        ),
        (
            vec!["--backend", "slurm", "--time", "2h"],
            "--time 2h: expected",
        ),
        (
            vec!["--backend", "slurm", "--threads", "2"],
            "--threads 2: with --backend slurm",
        ),
        (
            vec!["--trial", "4"],
            "--trial 4: the experiment has 4 trial(s), indexes 0 to 3",
        ),
        (vec!["--trial", "lr-9"], "--trial lr-9: "),
    ] {
        let mut all = vec!["run", f, "--runs", r];
        all.extend(&args);
        let (code, _, err) = common::llmlab(&all)?;
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    // --dry-run lists each trial's index, the one `--trial` and the array take.
    let (code, out, _) = common::llmlab(&["run", f, "--dry-run"])?;
    assert_eq!(code, 0);
    for (i, s) in SLUGS.iter().enumerate() {
        assert!(out.contains(&format!("{i}  {s}")), "{out}");
    }
    Ok(())
}

#[test]
fn an_array_gives_the_local_metrics_skips_finished_trials_and_resumes_a_cancelled_task(
) -> Result<()> {
    if !cluster(
        "an_array_gives_the_local_metrics_skips_finished_trials_and_resumes_a_cancelled_task",
    ) {
        return Ok(());
    }
    let t0 = std::time::Instant::now();
    let dir = tempfile::tempdir()?;
    let file = sweep(dir.path())?;
    let (local, array, cut) = (
        dir.path().join("local"),
        dir.path().join("array"),
        dir.path().join("cut"),
    );
    let out = run(&file, &local, &["--threads", "2", "--jobs", "2"])?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    eprintln!("local --jobs 2: {:.1}s", t0.elapsed().as_secs_f64());

    // The array, waited for: the job id on stdout, then the summary; the local metrics.
    let t1 = std::time::Instant::now();
    let out = run(
        &file,
        &array,
        &["--backend", "slurm", "--cpus-per-trial", "1", "--wait"],
    )?;
    let (stdout, err) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{err}");
    eprintln!("slurm array --wait: {:.1}s", t1.elapsed().as_secs_f64());
    let job = stdout.lines().next().unwrap().trim().to_string();
    assert!(job.chars().all(|c| c.is_ascii_digit()), "{stdout}");
    assert!(
        err.contains(&format!("submitted job array {job} (4 task(s): 0-3)")),
        "{err}"
    );
    let exp = array.join("arr");
    let script = std::fs::read_to_string(exp.join("slurm/sweep.sbatch"))?;
    assert!(script.contains("#SBATCH --array=0-3\n"), "{script}");
    assert!(script.contains("#SBATCH --cpus-per-task=1\n"), "{script}");
    assert!(
        script.contains("--trial \"$SLURM_ARRAY_TASK_ID\""),
        "{script}"
    );
    for (i, s) in SLUGS.iter().enumerate() {
        assert!(common::curve(&exp.join(s)).len() >= 5, "{s}");
        assert_eq!(
            common::curve(&exp.join(s)),
            common::curve(&local.join("arr").join(s)),
            "{s}: the array's metrics equal the local run's"
        );
        let log = std::fs::read_to_string(exp.join(format!("slurm/{job}_{i}.out")))?;
        assert!(log.contains(s), "{s}: {log}");
        assert!(stdout.contains(s), "the summary lists {s}: {stdout}");
    }
    assert_eq!(report_status(&exp, SLUGS[0])?, "finished");

    // Submitting again: every trial is finished, nothing is submitted.
    let out = run(&file, &array, &["--backend", "slurm"])?;
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("nothing to submit"), "{err}");
    assert_eq!(err.matches("finished before, skipped").count(), 4, "{err}");

    // One task at a time; trial 0 cancelled once it has a checkpoint, the others still queued.
    let out = run(
        &file,
        &cut,
        &["--backend", "slurm", "--array-parallelism", "1"],
    )?;
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let job = text(&out.stdout).trim().to_string();
    let exp = cut.join("arr");
    let t = exp.join(SLUGS[0]);
    let wait0 = std::time::Instant::now();
    while common::checkpoint_step(&t) == 0 {
        assert!(wait0.elapsed().as_secs() < 120, "no checkpoint in 120 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Held (SIGSTOP) while the report and a second submission look, so it is still mid-trial
    // when scancel's SIGTERM comes; SIGCONT after that lets it save its state.
    let pid = std::fs::read_to_string(t.join(".running"))?
        .trim()
        .to_string();
    signal(&pid, "-STOP");
    assert_eq!(report_status(&exp, SLUGS[0])?, "running");
    assert_eq!(report_status(&exp, SLUGS[1])?, "queued");
    // A second submission while the array runs is refused.
    let (code, _, err) = common::llmlab(&[
        "run",
        file.to_str().unwrap(),
        "--runs",
        cut.to_str().unwrap(),
        "--backend",
        "slurm",
    ])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("scancel {job}")), "{err}");
    let status = Command::new("scancel").arg(&job).status()?;
    assert!(status.success());
    std::thread::sleep(std::time::Duration::from_millis(500));
    signal(&pid, "-CONT");
    let wait1 = std::time::Instant::now();
    while queued(&job) {
        assert!(wait1.elapsed().as_secs() < 60, "job {job} still queued");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(exp.join(format!("slurm/{job}_0.out")))?;
    assert!(log.contains("interrupted at step"), "{log}");
    assert!(!t.join("status.json").exists(), "{log}");
    assert!(common::checkpoint_step(&t) > 0);
    assert_eq!(report_status(&exp, SLUGS[0])?, "interrupted");
    assert_eq!(report_status(&exp, SLUGS[1])?, "not");

    // Submitting again resumes trial 0 and runs the rest: the uninterrupted metrics.
    let out = run(&file, &cut, &["--backend", "slurm", "--wait"])?;
    let (stdout, err) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{err}");
    let job = stdout.lines().next().unwrap().trim().to_string();
    let log = std::fs::read_to_string(exp.join(format!("slurm/{job}_0.out")))?;
    assert!(log.contains("resuming from"), "{log}");
    for s in SLUGS {
        assert_eq!(
            common::curve(&exp.join(s)),
            common::curve(&local.join("arr").join(s)),
            "{s}: resumed metrics equal the uninterrupted ones"
        );
    }
    eprintln!("slurm test: {:.1}s", t0.elapsed().as_secs_f64());
    Ok(())
}
