//! `llmlab run` end to end: a two-trial sweep, read back by the real TensorBoard; Ctrl-C (SIGINT) mid-trial stops after writing
//! state (exit 130), a SIGKILL loses nothing either, and running the file again resumes to exactly
//! the metrics and TensorBoard curves of an uninterrupted run (CPU); finished trials are not
//! rerun; a failing trial is recorded and the sweep goes on. `--jobs N` gives the results of a
//! sequential run, records failures the same way, and stops on Ctrl-C with every trial resumable.
//!
//! Equal results need equal threads per trial: libtorch's CPU reductions split work by thread
//! count, which moves the last bits of the losses (measured: `--threads 1` and `--threads 2`
//! differ in the 7th significant digit). A `--jobs N` trial runs on `max(1, threads / N)`
//! threads, so `--threads 2 --jobs 2` is compared with `--threads 1`; then the trial runs the
//! same operations in a fresh process, and the numbers are bit-equal.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report
use crate::common;

use anyhow::Result;
use std::path::Path;
use std::process::{Child, Command, Stdio};

const SWEEP: &str = "name: tiny-sweep
seed: 7
model:
  preset: gpt-mini
  overrides: {context_length: 32, emb_dim: 64, n_heads: 2, n_layers: 2, drop_rate: 0.1}
data: {dataset: the-verdict, train_ratio: 0.9}
train:
  epochs: 2
  batch_size: 4
  lr: 1.0e-3
  eval_freq: 3
  eval_iter: 2
  checkpoint_every: 10
generate: {max_new_tokens: 5}
sweep:
  train.lr: [1.0e-3, 5.0e-4]
";

fn spawn(file: &Path, runs: &Path) -> Child {
    spawn_with(file, runs, &["--threads", "1"])
}

fn spawn_with(file: &Path, runs: &Path, extra: &[&str]) -> Child {
    common::run_command(file, runs, extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn llmlab")
}

/// The steps of a trial's evaluations so far.
fn eval_steps(trial: &Path) -> Vec<u64> {
    common::curve(trial)
        .iter()
        .map(|m| m["step"].as_u64().unwrap())
        .collect()
}

/// Waits until the trial has a checkpoint and 2 evaluations.
fn wait_mid_trial(child: &mut Child, trial: &Path) -> Result<()> {
    wait_for(child, trial, |ckpt, evals| ckpt > 0 && evals.len() >= 2)
}

/// Waits until `done(checkpoint step, evaluation steps)` holds for the trial.
fn wait_for(child: &mut Child, trial: &Path, done: impl Fn(u64, &[u64]) -> bool) -> Result<()> {
    let t0 = std::time::Instant::now();
    loop {
        if done(common::checkpoint_step(trial), &eval_steps(trial)) {
            return Ok(());
        }
        if let Some(s) = child.try_wait()? {
            panic!("the sweep ended ({s}) before it could be interrupted");
        }
        assert!(t0.elapsed().as_secs() < 300, "no checkpoint after 300 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn interrupted_sweeps_resume_to_the_uninterrupted_metrics() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("sweep.yaml");
    std::fs::write(&file, SWEEP)?;
    let (full, cut) = (dir.path().join("full"), dir.path().join("cut"));
    let out = spawn(&file, &full).wait_with_output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let slugs = ["lr-0.001", "lr-0.0005"];
    for s in slugs {
        assert!(common::curve(&full.join("tiny-sweep").join(s)).len() >= 4);
    }
    let tb_full = check_tensorboard(&full.join("tiny-sweep"), &slugs)?;
    let summary = std::fs::read_to_string(full.join("tiny-sweep/summary.csv"))?;
    assert!(
        summary.starts_with("trial,train.lr,status,train_loss,val_loss"),
        "{summary}"
    );
    assert_eq!(summary.lines().count(), 3);
    // The target metric (val_loss by default) against the swept axis, as a PNG.
    let png = std::fs::read(full.join("tiny-sweep/val_loss_by_train.lr.png"))?;
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(u32::from_be_bytes(png[16..20].try_into()?), 800, "width");

    // Ctrl-C in the first trial: exit 130, state saved, not finished.
    let t1 = cut.join("tiny-sweep").join(slugs[0]);
    // `llmlab report` tells a running trial from an interrupted one.
    let status_of = |slug: &str| -> Result<String> {
        let (code, out, err) =
            common::llmlab(&["report", cut.join("tiny-sweep").to_str().unwrap()])?;
        assert_eq!(code, 0, "{err}");
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(slug))
            .unwrap_or_else(|| panic!("{slug} in the report: {out}"));
        Ok(["finished", "running", "interrupted"]
            .into_iter()
            .find(|s| line.split_whitespace().any(|w| w == *s))
            .unwrap_or("?")
            .to_string())
    };
    let mut child = spawn(&file, &cut);
    wait_mid_trial(&mut child, &t1)?;
    send_signal(child.id(), "-STOP"); // held mid-trial while the report looks
    let running = status_of(slugs[0]);
    send_signal(child.id(), "-CONT");
    assert_eq!(running?, "running");
    send_sigint(child.id());
    let out = child.wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted at step"), "{err}");
    assert!(!t1.join("status.json").exists());
    assert_eq!(status_of(slugs[0])?, "interrupted");
    assert!(
        !cut.join("tiny-sweep").join(slugs[1]).exists(),
        "the sweep stopped"
    );

    // SIGKILL in the second trial after the first finished, once two evaluations past the last
    // checkpoint are logged: the resumed run computes them again (every 10 steps a checkpoint,
    // every 3 an evaluation; the first is in TensorBoard, as it is logged before the second).
    let t2 = cut.join("tiny-sweep").join(slugs[1]);
    let mut child = spawn(&file, &cut);
    wait_for(&mut child, &t2, |ckpt, evals| {
        ckpt > 0 && evals.iter().filter(|&&s| s > ckpt).count() >= 2
    })?;
    child.kill()?;
    child.wait()?;
    assert!(std::fs::read_to_string(t1.join("status.json"))?.contains("finished"));
    assert_eq!(status_of(slugs[0])?, "finished");
    assert_eq!(
        status_of(slugs[1])?,
        "interrupted",
        "killed: no process runs it"
    );
    let ckpt = common::checkpoint_step(&t2);
    let killed: serde_json::Value = serde_json::from_str(&common::run_reference_uncached(
        "tb_read.py",
        &[cut.join("tiny-sweep").to_str().unwrap()],
    )?)?;
    let logged = killed["runs"][slugs[1]]["scalars"]["val/loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(
        logged > ckpt,
        "the killed run logged step {logged} past its checkpoint at step {ckpt}"
    );

    // Again: the first trial is skipped, the second resumes; both equal the uninterrupted run.
    let out = spawn(&file, &cut).wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("{}: finished before, skipped", slugs[0])),
        "{err}"
    );
    assert!(err.contains("resuming from"), "{err}");
    for s in slugs {
        assert_eq!(
            common::curve(&cut.join("tiny-sweep").join(s)),
            common::curve(&full.join("tiny-sweep").join(s)),
            "{s}: resumed metrics equal the uninterrupted ones"
        );
    }
    // TensorBoard shows one point per step, the uninterrupted run's points (tokens/s aside).
    let tb_cut = check_tensorboard(&cut.join("tiny-sweep"), &slugs)?;
    for s in slugs {
        let (full_tags, cut_tags) = (
            tb_full["runs"][s]["scalars"].as_object().unwrap(),
            tb_cut["runs"][s]["scalars"].as_object().unwrap(),
        );
        assert_eq!(
            cut_tags.keys().collect::<Vec<_>>(),
            full_tags.keys().collect::<Vec<_>>()
        );
        for (tag, points) in cut_tags {
            let steps = |p: &serde_json::Value| -> Vec<u64> {
                p.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x[0].as_u64().unwrap())
                    .collect()
            };
            assert_eq!(steps(points), steps(&full_tags[tag]), "{s} {tag}: steps");
            if tag != "train/tokens_per_sec" {
                assert_eq!(points, &full_tags[tag], "{s} {tag}: values");
            }
        }
    }

    // Trials that fail at run time (a text shorter than one window) are recorded; the sweep goes
    // on and exits with 1; the report lists them.
    let text_file = dir.path().join("text.txt");
    std::fs::write(&text_file, "too short")?;
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        SWEEP
            .replace("name: tiny-sweep", "name: bad-sweep")
            .replace(
                "data: {dataset: the-verdict, train_ratio: 0.9}",
                &format!("data: {{path: {}}}", text_file.display()),
            ),
    )?;
    let out = spawn(&bad, &cut).wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("2 of 2 trial(s) failed"), "{err}");
    let status = std::fs::read_to_string(cut.join("bad-sweep/lr-0.001/status.json"))?;
    assert!(
        status.contains("\"failed\"") && status.contains("fewer than one window"),
        "{status}"
    );
    let (code, report, _) = common::llmlab(&["report", cut.join("bad-sweep").to_str().unwrap()])?;
    assert_eq!(code, 0);
    assert_eq!(report.matches("failed").count(), 2, "{report}");
    Ok(())
}

/// SIGINT to a child process, as Ctrl-C sends it.
fn send_sigint(pid: u32) {
    send_signal(pid, "-INT");
}

fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {signal} {pid}");
}

/// The real `tensorboard` package reads the sweep (tests/reference/tb_read.py): each trial's
/// scalars equal its metrics.jsonl by tag and step, every tag's steps strictly increase, its
/// samples are there as text, and the HParams dashboard's backend lists every trial with its
/// `train.lr`, one session start, its status and metrics. Returns what tb_read.py read.
fn check_tensorboard(exp_dir: &Path, slugs: &[&str]) -> Result<serde_json::Value> {
    let out = common::run_reference_uncached("tb_read.py", &[exp_dir.to_str().unwrap()])?;
    let tb: serde_json::Value = serde_json::from_str(&out)?;
    let infos = tb["experiment"]["hparam_infos"].as_array().unwrap();
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0]["name"], "train.lr");
    let metric_tags: Vec<&str> = tb["experiment"]["metric_infos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"]["tag"].as_str().unwrap())
        .collect();
    assert_eq!(metric_tags, ["val/loss", "train/loss"]);
    let groups = tb["session_groups"]["session_groups"].as_array().unwrap();
    assert_eq!(groups.len(), slugs.len());
    for (slug, lr) in slugs.iter().zip([1.0e-3, 5.0e-4]) {
        let metrics = common::curve(&exp_dir.join(slug));
        let run = &tb["runs"][*slug];
        for (tag, points) in run["scalars"].as_object().unwrap() {
            let steps: Vec<u64> = points
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p[0].as_u64().unwrap())
                .collect();
            assert!(
                steps.windows(2).all(|w| w[0] < w[1]),
                "{slug} {tag}: steps {steps:?}"
            );
        }
        assert_eq!(
            run["hparams"]["_hparams_/session_start_info"]["_events"], 1,
            "{slug}: one session"
        );
        for (tag, key) in [
            ("train/loss", "train_loss"),
            ("val/loss", "val_loss"),
            ("train/lr", "lr"),
        ] {
            let got: Vec<(u64, f32)> = run["scalars"][tag]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap() as f32))
                .collect();
            let want: Vec<(u64, f32)> = metrics
                .iter()
                .map(|m| (m["step"].as_u64().unwrap(), m[key].as_f64().unwrap() as f32))
                .collect();
            // f32 on both sides; serde_json's fast float parsing may be 1 ulp off in f64.
            assert_eq!(got.len(), want.len(), "{slug} {tag}");
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    g.0 == w.0 && (g.1 - w.1).abs() <= 1e-6 * w.1.abs(),
                    "{slug} {tag}: {g:?} vs {w:?}"
                );
            }
        }
        let samples = run["text"]["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 2, "one sample per epoch");
        assert!(samples[0][1]
            .as_str()
            .unwrap()
            .starts_with("epoch 1: Every effort moves you"));
        let g = groups.iter().find(|g| g["name"] == *slug).unwrap();
        assert_eq!(g["hparams"]["train.lr"].as_f64().unwrap(), lr);
        assert_eq!(g["sessions"][0]["status"], "STATUS_SUCCESS");
        let last_val = metrics.last().unwrap()["val_loss"].as_f64().unwrap() as f32;
        let val = g["metric_values"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"]["tag"] == "val/loss")
            .unwrap();
        let shown = val["value"].as_f64().unwrap() as f32;
        assert!(
            (shown - last_val).abs() <= 1e-6 * last_val.abs(),
            "{slug}: dashboard metric {shown} vs {last_val}"
        );
    }
    Ok(tb)
}

/// A sweep of tiny trials on the first 1,500 characters of the-verdict (a few steps each).
fn parallel_sweep(
    dir: &Path,
    name: &str,
    epochs: usize,
    sweep: &str,
) -> Result<std::path::PathBuf> {
    let text = std::fs::read_to_string(common::mirror().join("the-verdict/the-verdict.txt"))?;
    let short = dir.join("short.txt");
    std::fs::write(&short, text.chars().take(1500).collect::<String>())?;
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &file,
        format!(
            "name: {name}
model:
  preset: gpt-mini
  overrides: {{context_length: 16, emb_dim: 32, n_heads: 2, n_layers: 1, drop_rate: 0.1}}
data: {{path: {}, train_ratio: 0.9}}
train: {{epochs: {epochs}, batch_size: 4, lr: 1.0e-3, eval_freq: 2, eval_iter: 1, checkpoint_every: 2}}
generate: {{max_new_tokens: 3}}
{sweep}",
            short.display()
        ),
    )?;
    Ok(file)
}

/// Every trial folder's curve, by slug.
fn curves(exp_dir: &Path) -> Vec<(String, Vec<serde_json::Value>)> {
    let mut out: Vec<_> = std::fs::read_dir(exp_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() && !p.file_name().unwrap().to_str().unwrap().starts_with('.'))
        .map(|p| {
            (
                p.file_name().unwrap().to_str().unwrap().to_string(),
                common::curve(&p),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Four trials and one that fails at run time (a batch larger than the data): `--jobs 2` on two
/// threads gives, trial by trial, the metrics of a sequential run on one thread (bit for bit),
/// runs two trials at once, records the failure the same way and writes the same report.
#[test]
fn parallel_trials_give_the_sequential_results() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = parallel_sweep(
        dir.path(),
        "jobs",
        2,
        "sweep:
  mode: zip
  axes:
    train.lr: [1.0e-3, 5.0e-4, 1.0e-3, 5.0e-4, 1.0e-3]
    seed: [1, 1, 2, 2, 3]
    train.batch_size: [4, 4, 2, 2, 64]
",
    )?;
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let seq = spawn_with(&file, &one, &["--threads", "1"]).wait_with_output()?;
    let par = spawn_with(&file, &two, &["--threads", "2", "--jobs", "2"]).wait_with_output()?;
    let (seq_err, par_err) = (
        String::from_utf8_lossy(&seq.stderr),
        String::from_utf8_lossy(&par.stderr),
    );
    for (out, err) in [(&seq, &seq_err), (&par, &par_err)] {
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("1 of 5 trial(s) failed"), "{err}");
    }
    // Two processes at once, one thread each, output in the trial's log.txt.
    let first_end = par_err.find(": finished in").unwrap();
    for (i, slug) in [
        "lr-0.001_seed-1_batch_size-4",
        "lr-0.0005_seed-1_batch_size-4",
    ]
    .iter()
    .enumerate()
    {
        let started = par_err
            .find(&format!("[{}/5] {slug}: ", i + 1))
            .unwrap_or_else(|| panic!("{par_err}"));
        assert!(started < first_end, "{par_err}");
        assert!(
            par_err.contains(&format!("{slug}: started: train.lr=")),
            "{par_err}"
        );
        let log = std::fs::read_to_string(two.join("jobs").join(slug).join("log.txt"))?;
        assert!(log.contains("--threads\" \"1\" \"--trial\""), "{log}");
    }
    assert!(
        par_err.contains("FAILED: the training split has"),
        "{par_err}"
    );
    let (a, b) = (curves(&one.join("jobs")), curves(&two.join("jobs")));
    assert_eq!(a.len(), 5);
    assert_eq!(a, b, "per-trial metrics of --jobs 2 and of one by one");
    assert!(a.iter().filter(|(_, c)| c.len() >= 4).count() == 4);
    for f in ["summary.csv", "summary.md", "experiment.json"] {
        assert_eq!(
            std::fs::read_to_string(one.join("jobs").join(f))?,
            std::fs::read_to_string(two.join("jobs").join(f))?,
            "{f}"
        );
    }
    assert_eq!(seq.stdout, par.stdout, "the summary table");
    // summary.md is a well-formed Markdown table: a header, its separator, one row per trial,
    // all with the same number of cells.
    let md = std::fs::read_to_string(one.join("jobs/summary.md"))?;
    let lines: Vec<&str> = md.lines().filter(|l| l.starts_with('|')).collect();
    assert_eq!(lines.len(), 2 + 5, "{md}");
    let cells = |l: &str| l.matches('|').count();
    assert!(lines.iter().all(|l| cells(l) == cells(lines[0])), "{md}");
    assert!(
        lines[1]
            .split('|')
            .skip(1)
            .all(|c| c.is_empty() || c.trim() == "---"),
        "{md}"
    );
    let failed = "jobs/lr-0.001_seed-3_batch_size-64/status.json";
    assert_eq!(
        std::fs::read_to_string(one.join(failed))?,
        std::fs::read_to_string(two.join(failed))?
    );

    // --jobs 0 is a usage error, before anything runs.
    let (code, _, err) = common::llmlab(&["run", file.to_str().unwrap(), "--jobs", "0"])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--jobs 0: give the number of trials"), "{err}");
    Ok(())
}

/// Ctrl-C to a `--jobs 2` sweep reaches both trials (each saves its state and exits 130; the
/// sweep exits 130 and records no failure); running the file again resumes them to the metrics
/// of an uninterrupted sequential run.
#[test]
fn ctrl_c_stops_parallel_trials_which_resume_to_the_same_metrics() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = parallel_sweep(
        dir.path(),
        "stop",
        6,
        "sweep: {train.lr: [1.0e-3, 5.0e-4]}\n",
    )?;
    let (full, cut) = (dir.path().join("full"), dir.path().join("cut"));
    let out = spawn_with(&file, &full, &["--threads", "1"]).wait_with_output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let slugs = ["lr-0.001", "lr-0.0005"];
    let mut child = spawn_with(&file, &cut, &["--threads", "2", "--jobs", "2"]);
    for s in slugs {
        wait_for(&mut child, &cut.join("stop").join(s), |ckpt, _| ckpt > 0)?;
    }
    send_sigint(child.id());
    let out = child.wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted; "), "{err}");
    let mut stopped = 0;
    for s in slugs {
        let t = cut.join("stop").join(s);
        let log = std::fs::read_to_string(t.join("log.txt"))?;
        match std::fs::read_to_string(t.join("status.json")) {
            Ok(status) => assert!(status.contains("finished"), "{s}: {status}"),
            Err(_) => {
                assert!(log.contains("interrupted at step"), "{s}: {log}");
                assert!(err.contains(s), "{err}");
                stopped += 1;
            }
        }
    }
    assert!(stopped > 0, "a trial was running at Ctrl-C: {err}");
    let out = spawn_with(&file, &cut, &["--threads", "2", "--jobs", "2"]).wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(curves(&cut.join("stop")), curves(&full.join("stop")));
    for s in slugs {
        let log = std::fs::read_to_string(cut.join("stop").join(s).join("log.txt"))?;
        assert!(log.contains("resuming from"), "{s}: {log}");
    }
    Ok(())
}

/// A finished trial whose settings changed since is not silently skipped: the run stops before
/// anything starts, names the trial folder and the changed key; `--restart` runs it again.
#[test]
fn changed_settings_of_finished_trials_are_an_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("g.yaml");
    std::fs::write(
        &file,
        "name: g\ntask: generate\nmodel: gpt-mini\nprompts: [\"Every effort moves you\"]\ngenerate: {max_new_tokens: 3, samples: 1}\nsweep:\n  generate.temperature: [0.0, 1.0]\n",
    )?;
    let runs = dir.path().join("runs");
    let (f, r) = (file.to_str().expect("UTF-8"), runs.to_str().expect("UTF-8"));
    let (code, _, err) = common::llmlab(&["run", f, "--runs", r])?;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = common::llmlab(&["run", f, "--runs", r])?;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("finished before, skipped"), "{err}");
    let (code, _, err) =
        common::llmlab(&["run", f, "--runs", r, "--set", "generate.max_new_tokens=4"])?;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("2 trial folder(s) hold results of other settings")
            && err.contains("temperature-0.0/config.yaml (generate.max_new_tokens: 3 -> 4)")
            && err.contains("--restart"),
        "{err}"
    );
    let (code, _, err) = common::llmlab(&[
        "run",
        f,
        "--runs",
        r,
        "--set",
        "generate.max_new_tokens=4",
        "--restart",
    ])?;
    assert_eq!(code, 0, "{err}");
    Ok(())
}

/// A trial run by hand (`--trial`) before any run of the whole file records the sweep's trials,
/// so `llmlab report` shows it beside the trials that have not run.
#[test]
fn a_trial_run_alone_can_be_reported() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("sweep.yaml");
    std::fs::write(&file, SWEEP.replace("  epochs: 2\n", "  epochs: 1\n"))?;
    let runs = dir.path().join("runs");
    let out = spawn_with(&file, &runs, &["--threads", "1", "--trial", "1"]).wait_with_output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exp = runs.join("tiny-sweep");
    let (code, report, err) = common::llmlab(&["report", exp.to_str().unwrap_or_default()])?;
    assert_eq!(code, 0, "{err}");
    let line = |slug: &str| {
        report
            .lines()
            .find(|l| l.starts_with(slug))
            .unwrap_or_default()
            .to_string()
    };
    assert!(line("lr-0.0005").contains("finished"), "{report}");
    assert!(
        !line("lr-0.001").is_empty() && !line("lr-0.001").contains("finished"),
        "{report}"
    );
    Ok(())
}
