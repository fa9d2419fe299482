//! Chapter 5 / appendix D training: AdamW, clipping and the schedule against PyTorch; resumable,
//! repeatable runs; clear errors for bad checkpoints and diverging losses.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report
use crate::common;

use anyhow::Result;
use llmlab::models::{GptConfig, GptModel};
use llmlab::train::optim::{AdamW, AdamWConfig};
use llmlab::train::schedule::{Schedule, ScheduleKind};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Five training steps of our loss + AdamW + clip_grad_norm + warm-up/cosine schedule equal
/// torch.optim.AdamW on the book's GPTModel from the same weights and batches: the first step's
/// gradients, every loss, every gradient norm, every rate, and the final weights.
#[test]
fn adamw_steps_match_pytorch() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = common::Reference::script("gen_train.py")
        .arg("--out")
        .output(dir.path())
        .args(["--steps", "5"])
        .run()?;
    let meta: serde_json::Value = serde_json::from_str(&out)?;
    let cfg: GptConfig = serde_json::from_value(meta["cfg"].clone())?;
    let t = common::read_tensors(&dir.path().join("train.safetensors"))?;
    let vs = VarStore::new(Device::Cpu);
    let model = GptModel::new(&vs.root(), &cfg);
    llmlab::weights::load_gpt_state_dict(&vs, &dir.path().join("weights.safetensors"))?;
    let mut named: Vec<_> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut opt = AdamW::new(
        named,
        AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        },
    );
    let sched = Schedule {
        kind: ScheduleKind::Cosine,
        warmup_steps: 2,
        initial_lr: meta["initial_lr"].as_f64().unwrap(),
        min_lr: meta["min_lr"].as_f64().unwrap(),
    };
    let want_losses: Vec<f64> = Vec::try_from(&t["losses"])?;
    let want_norms: Vec<f64> = Vec::try_from(&t["grad_norms"])?;
    let want_lrs: Vec<f64> = Vec::try_from(&t["lrs"])?;
    for step in 0..5 {
        let lr = sched.lr(step, 5, 1e-3);
        assert!(
            (lr - want_lrs[step]).abs() < 1e-12,
            "lr at step {step}: {lr} vs {}",
            want_lrs[step]
        );
        opt.zero_grad();
        let loss = llmlab::train::calc_loss_batch(
            &model,
            &t[&format!("inputs_{step}")],
            &t[&format!("targets_{step}")],
            true,
        );
        loss.backward();
        if step == 0 {
            for (name, p) in opt.params() {
                common::assert_close(
                    &p.grad(),
                    &t[&format!("grads_0.{name}")],
                    1e-6,
                    1e-4,
                    &format!("grad {name}"),
                )?;
            }
        }
        let norm = opt.clip_grad_norm(Some(0.5));
        let l = loss.double_value(&[]);
        assert!(
            (l - want_losses[step]).abs() < 1e-5,
            "loss at step {step}: {l} vs {}",
            want_losses[step]
        );
        assert!(
            (norm - want_norms[step]).abs() < 1e-4 * want_norms[step],
            "grad norm at step {step}: {norm} vs {}",
            want_norms[step]
        );
        opt.step(lr);
    }
    for (name, p) in opt.params() {
        common::assert_close(
            p,
            &t[&format!("final.{name}")],
            1e-5,
            1e-4,
            &format!("final {name}"),
        )?;
    }
    Ok(())
}

/// Appendix D's schedule: linear warm-up from initial_lr, peak at the end of warm-up, cosine to
/// min_lr at the last step.
#[test]
fn schedule_warms_up_then_decays() {
    let s = Schedule {
        kind: ScheduleKind::Cosine,
        warmup_steps: 20,
        initial_lr: 1e-4,
        min_lr: 1e-5,
    };
    assert_eq!(s.lr(0, 100, 1e-3), 1e-4);
    assert!((s.lr(10, 100, 1e-3) - 5.5e-4).abs() < 1e-12);
    assert!((s.lr(20, 100, 1e-3) - 1e-3).abs() < 1e-12);
    assert!((s.lr(60, 100, 1e-3) - (1e-5 + (1e-3 - 1e-5) * 0.5)).abs() < 1e-12);
    assert!((s.lr(100, 100, 1e-3) - 1e-5).abs() < 1e-12);
    let c = Schedule::default();
    assert_eq!(c.lr(0, 10, 4e-4), 4e-4);
    assert_eq!(c.lr(9, 10, 4e-4), 4e-4);
}

const TINY_RUN: &str = "name: tiny
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
  grad_accum_steps: 2
  max_grad_norm: 1.0
  checkpoint_every: 2
  threads: 2
  schedule: {kind: cosine, warmup_steps: 3, initial_lr: 1.0e-4, min_lr: 1.0e-5}
generate: {prompt: Every effort moves you, max_new_tokens: 6, temperature: 1.0, top_k: 20}
";

fn run_cli(file: &Path, out: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_llmlab"))
        .args([
            "pretrain",
            file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ])
        .env("LLMLAB_DATA_MIRROR", common::mirror())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn llmlab")
}

/// step, train loss, val loss, lr, grad norm, tokens seen.
type CurvePoint = (u64, f64, f64, f64, f64, u64);

/// The reproducible part of metrics.jsonl (everything but wall-clock throughput).
fn curve(run: &Path) -> Result<Vec<CurvePoint>> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl"))?;
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            Ok((
                v["step"].as_u64().unwrap_or(0),
                f("train_loss"),
                f("val_loss"),
                f("lr"),
                f("grad_norm"),
                v["tokens_seen"].as_u64().unwrap_or(0),
            ))
        })
        .collect()
}

/// Two CPU runs with the same seed give bit-for-bit the same curve and samples; a run killed
/// mid-epoch (SIGKILL) and started again resumes from its last checkpoint and ends with the same
/// metrics.jsonl as the uninterrupted run.
#[test]
fn killed_run_resumes_to_the_uninterrupted_curve() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("tiny.yaml");
    std::fs::write(&file, TINY_RUN)?;
    let (a, b, k) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("killed"),
    );
    for run in [&a, &b] {
        let out = run_cli(&file, run).wait_with_output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let full = curve(&a)?;
    assert!(full.len() >= 4, "{full:?}");
    assert_eq!(full, curve(&b)?, "same seed, same curve");
    assert_eq!(
        std::fs::read_to_string(a.join("samples.jsonl"))?,
        std::fs::read_to_string(b.join("samples.jsonl"))?
    );

    // Kill once a mid-epoch checkpoint exists and at least one more eval was written after it.
    let mut child = run_cli(&file, &k);
    let started = std::time::Instant::now();
    loop {
        let ckpt = std::fs::read_to_string(k.join("checkpoints/latest")).unwrap_or_default();
        let lines = std::fs::read_to_string(k.join("metrics.jsonl"))
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if ckpt.trim() >= "step_00000002" && lines >= 2 {
            break;
        }
        if let Some(status) = child.try_wait()? {
            panic!("the run ended ({status}) before it could be killed");
        }
        assert!(
            started.elapsed().as_secs() < 300,
            "no checkpoint after 300 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill()?;
    child.wait()?;
    assert!(!k.join("status.json").exists(), "killed before the end");
    let out = run_cli(&file, &k).wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("resuming from"), "{stdout}");
    assert_eq!(
        curve(&k)?,
        full,
        "resumed curve equals the uninterrupted one"
    );
    // The samples after the resume point equal the uninterrupted run's.
    let last = |p: &Path| {
        std::fs::read_to_string(p.join("samples.jsonl"))
            .map(|s| s.lines().last().unwrap_or("").to_string())
    };
    assert_eq!(last(&k)?, last(&a)?);
    assert!(
        a.join("losses.png").is_file()
            && a.join("model.safetensors").is_file()
            && a.join("model.yaml").is_file()
    );
    // Running a finished run again does nothing.
    let out = run_cli(&file, &a).wait_with_output()?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("already finished"));
    // The run folder's model generates, from the folder and from the weights file.
    for m in [a.clone(), a.join("model.safetensors")] {
        let (code, out, err) = common::llmlab(&[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "Every effort",
            "--max-new-tokens",
            "3",
            "--format",
            "json",
        ])?;
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("\"ids\""));
    }
    Ok(())
}

/// A checkpoint whose model config differs names the differing key; a truncated optimizer file
/// names the file; neither panics.
#[test]
fn bad_checkpoints_are_clear_errors() -> Result<()> {
    use llmlab::train::checkpoint;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("tiny.yaml");
    std::fs::write(&file, TINY_RUN.replace("epochs: 2", "epochs: 1"))?;
    let run = dir.path().join("r");
    let out = run_cli(&file, &run).wait_with_output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ckpt = checkpoint::latest(&run)?.expect("a checkpoint");
    let mut cfg: GptConfig =
        serde_yaml::from_str(&std::fs::read_to_string(ckpt.join("model.yaml"))?)?;
    cfg.n_layers = 3;
    let msg = format!("{:#}", checkpoint::read_state(&ckpt, &cfg).unwrap_err());
    assert!(msg.contains("n_layers: checkpoint 2, run 3"), "{msg}");
    cfg.n_layers = 2;
    let state = checkpoint::read_state(&ckpt, &cfg)?;
    let vs = VarStore::new(Device::Cpu);
    let _m = GptModel::new(&vs.root(), &cfg);
    let mut named: Vec<_> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut opt = AdamW::new(named, AdamWConfig::default());
    checkpoint::restore(&ckpt, &vs, &mut opt, &state)?;
    let optim = ckpt.join("optimizer.safetensors");
    let bytes = std::fs::read(&optim)?;
    std::fs::write(&optim, &bytes[..bytes.len() / 3])?;
    let msg = format!(
        "{:#}",
        checkpoint::restore(&ckpt, &vs, &mut opt, &state).unwrap_err()
    );
    assert!(msg.contains("optimizer.safetensors"), "{msg}");
    // Checkpoint format 2: a manifest of checksums, so a resume notices the cut-short file,
    // says so, and continues from the checkpoint before it.
    assert_eq!(state.format_version, checkpoint::FORMAT_VERSION);
    assert!(ckpt.join(checkpoint::MANIFEST).is_file());
    let older = checkpoint::candidates(&run)?
        .into_iter()
        .nth(1)
        .expect("an older checkpoint (keep_checkpoints: 2)");
    std::fs::remove_file(run.join("status.json"))?;
    let out = run_cli(&file, &run).wait_with_output()?;
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        log.contains(&format!("checkpoint {} is unusable", ckpt.display()))
            && log.contains("optimizer.safetensors has")
            && log.contains(&format!("resuming from {}", older.display())),
        "{log}"
    );
    // Resuming the CLI run with a changed config is refused, naming the folder.
    std::fs::remove_file(run.join("status.json"))?;
    std::fs::write(&file, TINY_RUN.replace("epochs: 2", "epochs: 3"))?;
    let out = run_cli(&file, &run).wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("different config") && err.contains("--restart"),
        "{err}"
    );
    Ok(())
}

/// A diverging run stops with a clear message instead of training on NaN.
#[test]
fn nan_loss_stops_the_run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("nan.yaml");
    std::fs::write(
        &file,
        TINY_RUN
            .replace("lr: 1.0e-3", "lr: 1.0e+30")
            .replace("max_grad_norm: 1.0", "max_grad_norm: 1.0e+30")
            .replace(
                "kind: cosine, warmup_steps: 3",
                "kind: constant, warmup_steps: 0",
            ),
    )?;
    let out = run_cli(&file, &dir.path().join("r")).wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("training loss became") && err.contains("lower train.lr"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    Ok(())
}

/// Every shipped experiment file parses and validates.
#[test]
fn shipped_experiments_validate() -> Result<()> {
    for e in std::fs::read_dir(common::repo().join("experiments"))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "yaml") {
            let exp = llmlab::experiment::Experiment::load(&p, &[])?;
            // continue_shakespeare.yaml and dpo_after_instruct.yaml start from another
            // experiment's run folder: its files exist only after that run.
            let text = std::fs::read_to_string(&p)?;
            let reads_a_run = text.contains("init_from: runs/") || text.contains("run: runs/");
            let trials = llmlab::experiment::prepare::prepare_with(&exp, !reads_a_run)?;
            assert!(!trials.is_empty(), "{}", p.display());
        }
    }
    Ok(())
}

/// Continued pretraining: a run that starts from another run's weights (`init_from`) begins at
/// that run's loss, not at a fresh model's ~ln(vocab).
#[test]
fn init_from_continues_from_the_weights() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let base_file = dir.path().join("base.yaml");
    std::fs::write(
        &base_file,
        TINY_RUN
            .replace("epochs: 2", "epochs: 3")
            .replace("checkpoint_every: 2", "checkpoint_every: 0"),
    )?;
    let base = dir.path().join("base");
    let out = run_cli(&base_file, &base).wait_with_output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let base_last = curve(&base)?.last().copied().unwrap();
    let cont = TINY_RUN
        .replace("  preset: gpt-mini\n  overrides: {context_length: 32, emb_dim: 64, n_heads: 2, n_layers: 2, drop_rate: 0.1}", &format!("  init_from: {}", base.display()))
        .replace("epochs: 2", "epochs: 1")
        .replace("lr: 1.0e-3", "lr: 1.0e-5");
    let cont_file = dir.path().join("cont.yaml");
    std::fs::write(&cont_file, cont)?;
    let out = run_cli(&cont_file, &dir.path().join("cont")).wait_with_output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = curve(&dir.path().join("cont"))?[0];
    assert!(
        base_last.1 < 9.0,
        "the base run learned something (fresh ~10.8): {base_last:?}"
    );
    assert!(
        (first.1 - base_last.1).abs() < 0.5,
        "continued run starts at the base's loss: {first:?} vs {base_last:?}"
    );
    Ok(())
}

/// Leaf tensors (requires_grad) holding copies of `init.<name>` of a reference file.
fn leaf_params(t: &BTreeMap<String, Tensor>, names: &[String]) -> Vec<(String, Tensor)> {
    names
        .iter()
        .map(|n| {
            let p = t[&format!("init.{n}")].copy().set_requires_grad(true);
            (n.clone(), p)
        })
        .collect()
}

/// Gives every parameter exactly the gradient `grad_<step>.<name>` (backward of sum(p·g)).
fn set_grads(opt: &mut AdamW, t: &BTreeMap<String, Tensor>, step: usize) {
    opt.zero_grad();
    let loss = opt
        .params()
        .iter()
        .filter_map(|(n, p)| Some((p, t.get(&format!("grad_{step}.{n}"))?)))
        .map(|(p, g)| (p * g).sum(Kind::Float))
        .reduce(|a, b| a + b)
        .unwrap();
    loss.backward();
}

/// The fused AdamW path (libtorch's `_fused_adamw_` through the shim) equals the plain path and
/// `torch.optim.AdamW(fused=True)`: five steps with weight decay 0.1, betas (0.9, 0.95) and a
/// changing rate on random tensors and gradients. Parameters and both moments agree within
/// 1e-6 abs + 1e-5 rel between our two paths, and within 1e-7 abs with PyTorch's fused run (the
/// same kernel on the same inputs). A parameter that never gets a gradient is left untouched.
#[test]
fn fused_adamw_matches_plain_and_pytorch() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = common::Reference::script("gen_fused_adamw.py")
        .arg("--out")
        .output(dir.path())
        .run()?;
    let meta: serde_json::Value = serde_json::from_str(&out)?;
    let t = common::read_tensors(&dir.path().join("fused_adamw.safetensors"))?;
    let names: Vec<String> = serde_json::from_value(meta["names"].clone())?;
    let cfg = AdamWConfig {
        beta1: meta["beta1"].as_f64().unwrap(),
        beta2: meta["beta2"].as_f64().unwrap(),
        eps: meta["eps"].as_f64().unwrap(),
        weight_decay: meta["weight_decay"].as_f64().unwrap(),
    };
    let lrs: Vec<f64> = Vec::try_from(&t["lrs"])?;
    let frozen_init = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
    let with_frozen = |mut v: Vec<(String, Tensor)>| {
        v.push(("no_grad".into(), frozen_init.copy().set_requires_grad(true)));
        v
    };
    let mut plain = AdamW::new(with_frozen(leaf_params(&t, &names)), cfg);
    let mut fused = AdamW::new(with_frozen(leaf_params(&t, &names)), cfg);
    for (step, &lr) in lrs.iter().enumerate() {
        // The extra parameter is not in the loss, so its gradient stays undefined.
        for opt in [&mut plain, &mut fused] {
            set_grads(opt, &t, step);
        }
        plain.step(lr);
        fused.step_fused(lr)?;
    }
    assert_eq!((plain.step, fused.step), (5, 5));
    let (ps, fs) = (plain.state_tensors(), fused.state_tensors());
    for ((name, p), (_, f)) in plain.params().iter().zip(fused.params()) {
        common::assert_close(f, p, 1e-6, 1e-5, &format!("fused vs plain {name}"))?;
        if name == "no_grad" {
            assert!(
                p.equal(&frozen_init) && f.equal(&frozen_init),
                "no grad, no update"
            );
            continue;
        }
        common::assert_close(
            f,
            &t[&format!("final.{name}")],
            1e-7,
            0.0,
            &format!("fused vs PyTorch {name}"),
        )?;
        common::assert_close(
            p,
            &t[&format!("final.{name}")],
            1e-6,
            1e-5,
            &format!("plain vs PyTorch {name}"),
        )?;
    }
    for ((key, a), (_, b)) in ps.iter().zip(&fs) {
        common::assert_close(b, a, 1e-6, 1e-5, &format!("fused vs plain {key}"))?;
        if !key.ends_with(".no_grad") {
            common::assert_close(b, &t[key], 1e-7, 0.0, &format!("fused vs PyTorch {key}"))?;
        }
    }
    Ok(())
}

/// Simulates a crash after checkpoint `step`: the run is unfinished and `latest` points there.
fn rewind_to(run: &Path, step: usize) -> Result<()> {
    std::fs::remove_file(run.join("status.json"))?;
    std::fs::write(run.join("checkpoints/latest"), format!("step_{step:08}"))?;
    Ok(())
}

/// Curves equal up to float rounding (the fused and plain AdamW round differently).
fn assert_curves_close(a: &[CurvePoint], b: &[CurvePoint], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (p, q) in a.iter().zip(b) {
        assert_eq!((p.0, p.3, p.5), (q.0, q.3, q.5), "{what}: step, lr, tokens");
        for (x, y) in [(p.1, q.1), (p.2, q.2), (p.4, q.4)] {
            assert!(
                (x - y).abs() <= 1e-4 * y.abs().max(1.0),
                "{what}: {p:?} vs {q:?}"
            );
        }
    }
}

/// `train.fused_adamw: true` trains on the CPU to the plain run's curve (within 1e-4 relative:
/// the kernels round differently), and checkpoints are interchangeable: a fused run resumed
/// with `fused_adamw: false` and a plain run resumed with `true` both continue from their last
/// checkpoint (config.yaml may differ in that key only) and end on the same curve.
#[test]
fn fused_and_plain_adamw_resume_each_others_checkpoints() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let yaml = |fused: bool| {
        TINY_RUN.replace("epochs: 2", "epochs: 1").replace(
            "  threads: 2\n",
            &format!("  threads: 2\n  keep_checkpoints: 100\n  fused_adamw: {fused}\n"),
        )
    };
    let (ff, pf) = (dir.path().join("fused.yaml"), dir.path().join("plain.yaml"));
    std::fs::write(&ff, yaml(true))?;
    std::fs::write(&pf, yaml(false))?;
    let (fr, pr) = (dir.path().join("fused"), dir.path().join("plain"));
    for (file, run) in [(&ff, &fr), (&pf, &pr)] {
        let out = run_cli(file, run).wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let which = if file == &ff {
            "fused AdamW"
        } else {
            "plain AdamW"
        };
        assert!(stdout.contains(which), "{stdout}");
    }
    let (fused_curve, plain_curve) = (curve(&fr)?, curve(&pr)?);
    assert!(fused_curve.len() >= 3, "{fused_curve:?}");
    assert_curves_close(&fused_curve, &plain_curve, "fused vs plain run");
    assert!(
        std::fs::read_to_string(fr.join("config.yaml"))?.contains("fused_adamw: true"),
        "config.yaml records the setting"
    );

    // Each run resumes from step 4 with the other implementation.
    for (run, other_file, want) in [(&fr, &pf, &fused_curve), (&pr, &ff, &plain_curve)] {
        rewind_to(run, 4)?;
        let out = run_cli(other_file, run).wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("resuming from") && stdout.contains("train.fused_adamw differs"),
            "{stdout}"
        );
        let resumed = curve(run)?;
        assert_curves_close(&resumed, want, "resumed with the other AdamW");
        // Up to the checkpoint the metrics are the original run's, bit for bit.
        let kept: Vec<_> = want.iter().filter(|p| p.0 <= 4).collect();
        assert_eq!(
            resumed.iter().filter(|p| p.0 <= 4).collect::<Vec<_>>(),
            kept
        );
    }
    Ok(())
}

/// bf16 autocast on the CPU through the shim's guard: inside it, matmul and linear outputs are
/// bf16 while parameters stay f32, and the model's loss is f32 and within 0.05 of the fp32
/// loss (bf16 keeps ~3 significant digits; the loss is ~ln(vocab) ≈ 6.9); its gradients are
/// f32. Dropping the guard, also after an error or a panic inside `with_autocast`, restores the
/// previous state (nested guards restore the outer dtype).
#[test]
fn bf16_autocast_guard_on_cpu() -> Result<()> {
    use llmlab::device::Precision;
    use llmlab::shim::{autocast_state, with_autocast, AutocastGuard};
    let cpu = Device::Cpu;
    assert!(!autocast_state(cpu)?.0, "autocast starts off");
    tch::manual_seed(3);
    let cfg = GptConfig {
        vocab_size: 1000,
        context_length: 32,
        emb_dim: 64,
        drop_rate: 0.0,
        qkv_bias: false,
        ..common::tiny_gpt()
    };
    let vs = VarStore::new(cpu);
    let model = GptModel::new(&vs.root(), &cfg);
    let x = Tensor::randint(1000, [2, 32], (Kind::Int64, cpu));
    let y = Tensor::randint(1000, [2, 32], (Kind::Int64, cpu));
    let a = Tensor::randn([8, 16], (Kind::Float, cpu));
    let w = Tensor::randn([4, 16], (Kind::Float, cpu));
    let fp32 = llmlab::train::calc_loss_batch(&model, &x, &y, false);
    {
        let _g = AutocastGuard::new(cpu, Kind::BFloat16)?;
        assert_eq!(autocast_state(cpu)?, (true, Some(Kind::BFloat16)));
        assert_eq!(a.matmul(&w.tr()).kind(), Kind::BFloat16);
        assert_eq!(a.linear::<Tensor>(&w, None).kind(), Kind::BFloat16);
        assert_eq!(model.forward_t(&x, false).kind(), Kind::BFloat16);
        let bf16 = llmlab::train::calc_loss_batch(&model, &x, &y, false);
        assert_eq!(bf16.kind(), Kind::Float, "the loss is f32");
        let (l32, l16) = (fp32.double_value(&[]), bf16.double_value(&[]));
        assert!((l32 - l16).abs() < 0.05, "fp32 loss {l32} vs bf16 {l16}");
        assert!(l32 != l16, "bf16 did change the numbers");
        bf16.backward();
    }
    for (name, p) in vs.variables() {
        assert_eq!(
            (p.kind(), p.grad().kind()),
            (Kind::Float, Kind::Float),
            "{name}"
        );
    }
    assert!(!autocast_state(cpu)?.0, "off after the guard");
    assert_eq!(a.matmul(&w.tr()).kind(), Kind::Float);

    // Nested: the inner guard restores the outer one's dtype and keeps autocast on.
    {
        let _outer = AutocastGuard::new(cpu, Kind::Half)?;
        {
            let _inner = AutocastGuard::new(cpu, Kind::BFloat16)?;
            assert_eq!(autocast_state(cpu)?, (true, Some(Kind::BFloat16)));
        }
        assert_eq!(autocast_state(cpu)?, (true, Some(Kind::Half)));
    }
    assert!(!autocast_state(cpu)?.0);
    // An error or a panic inside leaves autocast off, and fp32 does not touch the state.
    let r: Result<Result<(), String>, _> =
        with_autocast(cpu, Precision::Bf16, || Err("boom".to_string()));
    assert!(r?.is_err());
    assert!(!autocast_state(cpu)?.0);
    let caught = std::panic::catch_unwind(|| {
        let _ = with_autocast(cpu, Precision::Bf16, || panic!("inside autocast"));
    });
    assert!(caught.is_err());
    assert!(!autocast_state(cpu)?.0, "off after a panic");
    let k = with_autocast(cpu, Precision::Fp32, || a.matmul(&w.tr()).kind())?;
    assert_eq!(k, Kind::Float);
    Ok(())
}

/// `train.precision` and `train.fused_adamw` accept only their values, with an error naming the
/// key and the accepted values; defaults are left out of the resolved config (older run folders
/// resume unchanged) and set values round-trip.
#[test]
fn precision_and_fused_adamw_keys_are_validated() -> Result<()> {
    use llmlab::device::Precision;
    use llmlab::train::spec::FusedAdamW;
    use llmlab::train::PretrainSpec;
    let with = |extra: &str| TINY_RUN.replace("  threads: 2\n", &format!("  threads: 2\n{extra}"));
    for (extra, key, accepted) in [
        ("  precision: fp16\n", "train.precision", "fp32"),
        (
            "  fused_adamw: maybe\n",
            "train.fused_adamw",
            "auto, true or false",
        ),
        (
            "  fused_adamw: 1\n",
            "train.fused_adamw",
            "auto, true or false",
        ),
    ] {
        let msg = PretrainSpec::from_yaml(&with(extra), "t.yaml")
            .unwrap_err()
            .to_string();
        assert!(msg.contains(key) && msg.contains(accepted), "{msg}");
    }
    let default = PretrainSpec::from_yaml(TINY_RUN, "t.yaml")?;
    assert_eq!(default.train.precision, Precision::Fp32);
    assert_eq!(default.train.fused_adamw, FusedAdamW::Auto);
    assert!(default.train.fused_adamw.resolve(Device::Cpu));
    assert!(default.train.fused_adamw.resolve(Device::Cuda(0)));
    assert!(!default.train.fused_adamw.resolve(Device::Mps));
    let text = serde_yaml::to_string(&default)?;
    assert!(
        !text.contains("precision") && !text.contains("fused_adamw"),
        "{text}"
    );
    for (extra, p, f) in [
        (
            "  precision: bf16\n  fused_adamw: true\n",
            Precision::Bf16,
            FusedAdamW::On,
        ),
        ("  fused_adamw: false\n", Precision::Fp32, FusedAdamW::Off),
        ("  fused_adamw: auto\n", Precision::Fp32, FusedAdamW::Auto),
    ] {
        let s = PretrainSpec::from_yaml(&with(extra), "t.yaml")?;
        assert_eq!((s.train.precision, s.train.fused_adamw), (p, f));
        let again = PretrainSpec::from_yaml(&serde_yaml::to_string(&s)?, "again")?;
        assert_eq!(again, s);
    }
    let (code, _, err) = common::llmlab(&["pretrain", "--fused-adamw", "yes"])?;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--fused-adamw") && err.contains("auto, true, false"),
        "{err}"
    );
    Ok(())
}
