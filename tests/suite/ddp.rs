//! Data-parallel pretraining (book appendix A, DDP) on libtorch's c10d with gloo on the CPU:
//! two ranks of batch B train exactly as one process of batch 2B; a rank that dies or stalls
//! makes the others exit with an error instead of hanging; a two-rank run resumes.
use crate::common;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A tiny GPT without dropout on the first ~6,700 characters of the-verdict: 5 optimizer steps
/// of a global batch of 8 windows of 32 tokens, evaluated after every step.
fn tiny_run(dir: &Path, batch_size: usize) -> Result<PathBuf> {
    let text = std::fs::read_to_string(common::mirror().join("the-verdict/the-verdict.txt"))?;
    let cut: String = text.chars().take(6_700).collect();
    let data = dir.join("verdict-head.txt");
    std::fs::write(&data, cut)?;
    let file = dir.join(format!("tiny-b{batch_size}.yaml"));
    std::fs::write(
        &file,
        format!(
            "name: tiny-ddp
seed: 11
model:
  preset: gpt-mini
  overrides: {{context_length: 32, emb_dim: 64, n_heads: 2, n_layers: 2, drop_rate: 0.0}}
data: {{path: {}, train_ratio: 0.9}}
train:
  epochs: 1
  batch_size: {batch_size}
  lr: 1.0e-3
  eval_freq: 1
  eval_iter: 2
  max_grad_norm: 1.0
  checkpoint_every: 2
  keep_checkpoints: 10
  threads: 1
  schedule: {{kind: cosine, warmup_steps: 2, initial_lr: 1.0e-4, min_lr: 1.0e-5}}
generate: {{prompt: Every effort moves you, max_new_tokens: 4}}
",
            data.display()
        ),
    )?;
    Ok(file)
}

fn pretrain(file: &Path, out: &Path, extra: &[&str]) -> Result<(i32, String, String)> {
    let (f, o) = (file.to_string_lossy(), out.to_string_lossy());
    let mut args = vec!["pretrain", &f, "--out", &o, "--device", "cpu"];
    args.extend(extra);
    common::llmlab(&args)
}

fn ok(r: (i32, String, String), what: &str) -> Result<String> {
    if r.0 != 0 {
        bail!("{what} exited {}:\n{}\n{}", r.0, r.1, r.2);
    }
    Ok(r.1)
}

/// Losses, gradient norms, rates and tokens of every step within `tol` (absolute, or relative
/// to values above 1), and every final weight within `tol`.
fn assert_same_run(a: &Path, b: &Path, tol: f64, what: &str) -> Result<()> {
    let (x, y) = (common::metric_lines(a)?, common::metric_lines(b)?);
    if x.len() != y.len() || x.is_empty() {
        bail!("{what}: {} vs {} metrics lines", x.len(), y.len());
    }
    let mut worst = 0.0f64;
    for (l, r) in x.iter().zip(&y) {
        for key in ["step", "tokens_seen", "lr"] {
            if l[key] != r[key] {
                bail!("{what}: {key} differs: {l} vs {r}");
            }
        }
        for key in ["train_loss", "val_loss", "grad_norm"] {
            let (p, q) = (
                l[key].as_f64().context("a number")?,
                r[key].as_f64().context("a number")?,
            );
            let d = (p - q).abs();
            worst = worst.max(d);
            if d > tol * q.abs().max(1.0) {
                bail!("{what}: step {} {key} {p} vs {q} (diff {d:e})", l["step"]);
            }
        }
    }
    eprintln!(
        "{what}: {} steps, largest loss/grad-norm diff {worst:.3e}",
        x.len()
    );
    let (wa, wb) = (
        common::read_tensors(&a.join("model.safetensors"))?,
        common::read_tensors(&b.join("model.safetensors"))?,
    );
    if wa.keys().ne(wb.keys()) {
        bail!("{what}: the two models have different parameters");
    }
    for (name, t) in &wa {
        common::assert_close(t, &wb[name], tol, 0.0, &format!("{what}: {name}"))?;
    }
    Ok(())
}

/// Appendix A's promise: two gloo ranks with batch B each (rank r takes its half of every global
/// batch, gradients averaged before clipping) give the same losses and final weights as one
/// process with batch 2B, within 1e-5 (f32) after 5 steps.
#[test]
fn two_ranks_of_batch_b_train_as_one_process_of_batch_2b() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let t0 = Instant::now();
    ok(pretrain(&tiny_run(dir.path(), 8)?, &one, &[])?, "1 process")?;
    let t1 = Instant::now();
    let out = ok(
        pretrain(&tiny_run(dir.path(), 4)?, &two, &["--nproc", "2"])?,
        "2 ranks",
    )?;
    eprintln!(
        "1 process {:.1} s, 2 ranks {:.1} s",
        (t1 - t0).as_secs_f64(),
        t1.elapsed().as_secs_f64()
    );
    assert!(
        out.contains("[rank 0] data parallel: 2 ranks (gloo), global batch 8 = 2 × 4"),
        "{out}"
    );
    assert!(!out.contains("[rank 1] Ep"), "rank 1 stays quiet: {out}");
    let steps = common::metric_lines(&one)?.len();
    assert!(steps >= 5, "{steps} steps");
    assert_same_run(&two, &one, 1e-5, "2 ranks × 4 vs 1 × 8")?;

    // The all-reduce overlaps the step's last backward only: with 2 micro-batches of 2 a rank,
    // a reduction after the first would average a partial gradient.
    let (accum, one_accum) = (dir.path().join("accum"), dir.path().join("one-accum"));
    ok(
        pretrain(
            &tiny_run(dir.path(), 2)?,
            &accum,
            &["--nproc", "2", "--grad-accum-steps", "2"],
        )?,
        "2 ranks × 2 × 2 micro-batches",
    )?;
    ok(
        pretrain(
            &tiny_run(dir.path(), 4)?,
            &one_accum,
            &["--grad-accum-steps", "2"],
        )?,
        "1 × 4 × 2 micro-batches",
    )?;
    assert_same_run(&accum, &one_accum, 1e-5, "2 ranks × 2 × 2 vs 1 × 4 × 2")?;
    // Without the overlap (LLMLAB_DDP_OVERLAP=0: one all-reduce after backward), the same
    // numbers bit for bit: the sums are the same additions.
    let after = dir.path().join("after");
    let out = Command::new(env!("CARGO_BIN_EXE_llmlab"))
        .arg("pretrain")
        .arg(tiny_run(dir.path(), 4)?)
        .arg("--out")
        .arg(&after)
        .args(["--device", "cpu", "--nproc", "2"])
        .env("LLMLAB_DATA_MIRROR", common::mirror())
        .env("LLMLAB_DDP_OVERLAP", "0")
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_run(&after, &two, 0.0, "after backward vs overlapped")
}

/// Starts rank `rank` of 2 directly (torchrun-style variables), its stderr piped.
fn rank(file: &Path, out: &Path, rank: usize, port: u16) -> Result<Child> {
    Ok(Command::new(env!("CARGO_BIN_EXE_llmlab"))
        .args(["pretrain"])
        .arg(file)
        .arg("--out")
        .arg(out)
        .args(["--device", "cpu", "--epochs", "50"])
        .env("LLMLAB_DATA_MIRROR", common::mirror())
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("LLMLAB_DIST_TIMEOUT", "5")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?)
}

/// Waits until the run has written `lines` metrics lines.
fn wait_for_steps(out: &Path, lines: usize, ranks: &mut [Child]) -> Result<()> {
    let start = Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < lines
    {
        for r in ranks.iter_mut() {
            if let Some(status) = r.try_wait()? {
                bail!("a rank ended ({status}) before it was stopped");
            }
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("no {lines} steps after 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Waits for a process (rank 0, or the launcher) to exit, at most 60 s, and returns its stderr.
fn rank0_error(mut r0: Child, what: &str) -> Result<(Duration, String)> {
    let start = Instant::now();
    loop {
        if let Some(status) = r0.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = r0.stderr.take() {
                std::io::Read::read_to_string(&mut e, &mut err)?;
            }
            if status.success() {
                bail!("{what}: rank 0 succeeded");
            }
            return Ok((start.elapsed(), err));
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = r0.kill();
            bail!("{what}: rank 0 still running 60 s later (hangs)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A rank killed mid-run (SIGKILL: its connections close) and a rank that stalls (SIGSTOP: its
/// connections stay open; the 5 s LLMLAB_DIST_TIMEOUT must fire) both make rank 0 exit non-zero
/// within seconds, with an error that says which collective failed and why.
#[test]
fn a_killed_or_stalled_rank_makes_the_others_exit_with_an_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = tiny_run(dir.path(), 4)?;
    for signal in ["KILL", "STOP"] {
        let out = dir.path().join(signal);
        let port = llmlab::dist::free_port()?;
        let mut ranks = vec![rank(&file, &out, 0, port)?, rank(&file, &out, 1, port)?];
        wait_for_steps(&out, 2, &mut ranks)?;
        let r1 = ranks.pop().context("rank 1")?;
        let r0 = ranks.pop().context("rank 0")?;
        let pid = r1.id().to_string();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()?;
        assert!(status.success());
        let (took, err) = rank0_error(r0, signal)?;
        // Clean up rank 1 (stopped or dead) before checking.
        let mut r1 = r1;
        let _ = r1.kill();
        let _ = r1.wait();
        eprintln!(
            "SIG{signal}: rank 0 exited {took:.1?} later: {}",
            err.trim()
        );
        assert!(took < Duration::from_secs(30), "{took:?}");
        assert!(
            err.contains("rank 0 of 2: the gradient all-reduce failed")
                || err.contains("rank 0 of 2: the loss all-reduce failed"),
            "{err}"
        );
        let why = if signal == "KILL" {
            "Connection closed by peer"
        } else {
            "Timed out"
        };
        assert!(err.contains(why), "{err}");
        assert!(!err.contains("frame #"), "no C++ backtrace: {err}");
    }
    Ok(())
}

/// A two-rank run that stopped after its step-2 checkpoint resumes with two ranks to the same
/// curve and weights as the uninterrupted run; resuming it with one process is refused, since
/// the global batch would change.
#[test]
fn two_rank_runs_resume_with_two_ranks() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = tiny_run(dir.path(), 4)?;
    let (full, cut) = (dir.path().join("full"), dir.path().join("cut"));
    ok(pretrain(&file, &full, &["--nproc", "2"])?, "2 ranks")?;
    ok(pretrain(&file, &cut, &["--nproc", "2"])?, "2 ranks again")?;
    // A crash after checkpoint 2: unfinished, `latest` there, metrics of later steps stale.
    std::fs::remove_file(cut.join("status.json"))?;
    std::fs::write(cut.join("checkpoints/latest"), "step_00000002")?;
    std::fs::remove_file(cut.join("model.safetensors"))?;

    let (code, _, err) = pretrain(&file, &cut, &[])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("train.nproc"), "{err}");

    let out = ok(pretrain(&file, &cut, &["--nproc", "2"])?, "resumed")?;
    assert!(out.contains("[rank 0] resuming from"), "{out}");
    assert_same_run(&cut, &full, 1e-6, "resumed vs uninterrupted (2 ranks)")
}

/// `llmlab pretrain --nproc 2` of a long tiny run in `dir`, once its first 2 steps are logged:
/// the run folder and the launcher (stderr piped).
fn launch_two_ranks(dir: &Path) -> Result<(PathBuf, Child)> {
    let file = tiny_run(dir, 4)?;
    let out = dir.join("run");
    let mut launcher = Command::new(env!("CARGO_BIN_EXE_llmlab"))
        .arg("pretrain")
        .arg(&file)
        .arg("--out")
        .arg(&out)
        .args(["--device", "cpu", "--epochs", "50", "--nproc", "2"])
        .env("LLMLAB_DATA_MIRROR", common::mirror())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    wait_for_steps(&out, 2, std::slice::from_mut(&mut launcher))?;
    Ok((out, launcher))
}

/// `--nproc 2`: when a rank dies (SIGKILL to rank 1), the launcher stops the other rank and
/// exits non-zero naming the rank, within seconds.
#[test]
fn the_launcher_stops_the_other_ranks_when_one_dies() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_out, launcher) = launch_two_ranks(dir.path())?;
    // The launcher's children, in start order: rank 0, rank 1.
    let pid = launcher.id();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))?;
    let ranks: Vec<&str> = children.split_whitespace().collect();
    assert_eq!(ranks.len(), 2, "{children}");
    assert!(Command::new("kill")
        .args(["-KILL", ranks[1]])
        .status()?
        .success());
    let (took, err) = rank0_error(launcher, "launcher")?;
    eprintln!("launcher exited {took:.1?} later: {}", err.trim());
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert!(
        err.contains("--nproc 2: rank 1 failed (signal: 9 (SIGKILL))")
            && err.contains("stopped the other ranks"),
        "{err}"
    );
    assert!(
        !Path::new(&format!("/proc/{}", ranks[0])).exists(),
        "rank 0 ({}) still runs",
        ranks[0]
    );
    Ok(())
}

/// `--nproc 2` and Ctrl-C (SIGINT to the launcher, which passes it on): both ranks stop after
/// the same step, rank 0 saves it, and the launcher exits 130 naming the step and the run folder,
/// as a one-process run does.
#[test]
fn an_interrupted_launcher_exits_130_naming_the_saved_step() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (out, launcher) = launch_two_ranks(dir.path())?;
    assert!(Command::new("kill")
        .args(["-INT", &launcher.id().to_string()])
        .status()?
        .success());
    let done = launcher.wait_with_output()?;
    let err = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(130), "{err}");
    let saved = std::fs::read_to_string(out.join("checkpoints/latest"))?;
    let step: usize = saved.trim().trim_start_matches("step_").parse()?;
    assert!(step >= 2, "{saved}");
    assert!(
        err.contains(&format!(
            "interrupted at step {step}; the state is saved in {}",
            out.display()
        )),
        "{err}"
    );
    Ok(())
}

/// `llmlab run` with `train.nproc: 2`: the trial's process is rank 0 and starts rank 1 itself
/// (the same trial, `--trial`). A Ctrl-C mid-run stops both ranks after the same step (rank 0
/// saves it), running the file again resumes, and the trial ends with the curve and weights of
/// one process with batch 2B; rank 1 prints and records nothing, rank 0 writes the trial's
/// TensorBoard events.
#[test]
fn llmlab_run_trains_a_train_nproc_trial_as_its_ranks_and_resumes_after_ctrl_c() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let one = dir.path().join("one");
    ok(
        pretrain(&tiny_run(dir.path(), 8)?, &one, &["--epochs", "3"])?,
        "1 process",
    )?;
    let yaml = std::fs::read_to_string(tiny_run(dir.path(), 4)?)?
        .replace("name: tiny-ddp\n", "name: tiny-ddp-run\ntask: pretrain\n")
        .replace("  epochs: 1\n", "  epochs: 3\n")
        .replace("  threads: 1\n", "  nproc: 2\n");
    let file = dir.path().join("run.yaml");
    std::fs::write(&file, yaml)?;
    let runs = dir.path().join("runs");
    let trial = runs.join("tiny-ddp-run/base");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_llmlab"))
            .arg("run")
            .arg(&file)
            .arg("--runs")
            .arg(&runs)
            .args(["--device", "cpu", "--threads", "2"])
            .env("LLMLAB_DATA_MIRROR", common::mirror())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    let mut first = run()?;
    wait_for_steps(&trial, 3, std::slice::from_mut(&mut first))?;
    assert!(Command::new("kill")
        .args(["-INT", &first.id().to_string()])
        .status()?
        .success());
    let out = first.wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    let steps = common::metric_lines(&trial)?.len();
    assert!(
        steps < 15,
        "stopped early, after {steps} of 15 steps: {err}"
    );
    assert!(
        err.contains("data parallel: started ranks 1..2 of this trial (gloo, 1 thread(s) a rank)"),
        "{err}"
    );
    assert!(
        !err.contains("timed out") && !err.contains("failed"),
        "{err}"
    );

    let out = run()?.wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resuming from"), "{err}");
    assert!(!err.contains("[rank 1]"), "rank 1 stays quiet: {err}");
    let events = std::fs::read_dir(&trial)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("events.out"))
        .count();
    assert!(events >= 1, "rank 0 writes the trial's event files");
    assert_same_run(
        &trial,
        &one,
        1e-5,
        "llmlab run, 2 ranks × 4, resumed vs 1 × 8",
    )
}
