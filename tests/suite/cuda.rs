//! CUDA checks, ignored on machines without a GPU (CI); `scripts/gpu_check.sh` runs them with
//! `--ignored` on a GPU machine.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report
use crate::common;

use anyhow::Result;
use llmlab::generate::generate;
use llmlab::models::{GptConfig, GptModel};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn cuda() -> Device {
    assert!(tch::Cuda::is_available(), "libtorch sees no CUDA device");
    Device::Cuda(0)
}

/// The same weights give the same logits on CUDA as on the CPU (f32; TF32 is off by default in
/// libtorch), and greedy decoding with the KV cache gives the same tokens.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_matches_cpu() -> Result<()> {
    let dev = cuda();
    tch::manual_seed(0);
    let cfg = GptConfig {
        vocab_size: 500,
        context_length: 64,
        emb_dim: 128,
        n_layers: 3,
        drop_rate: 0.0,
        ..common::tiny_gpt()
    };
    let cpu_vs = VarStore::new(Device::Cpu);
    let cpu = GptModel::new(&cpu_vs.root(), &cfg);
    let mut gpu_vs = VarStore::new(dev);
    let gpu = GptModel::new(&gpu_vs.root(), &cfg);
    gpu_vs.copy(&cpu_vs)?;
    let x = Tensor::randint(500, [2, 40], (Kind::Int64, Device::Cpu));
    let a = tch::no_grad(|| cpu.forward_t(&x, false));
    let b = tch::no_grad(|| gpu.forward_t(&x.to_device(dev), false)).to_device(Device::Cpu);
    common::assert_close(&b, &a, 1e-3, 1e-3, "cuda vs cpu logits")?;
    let spec = common::greedy(30, true);
    assert_eq!(
        generate(&cpu, &[1, 2, 3], &spec)?.ids,
        generate(&gpu, &[1, 2, 3], &spec)?.ids
    );
    Ok(())
}

/// `llmlab pretrain --device cuda` runs a short pretraining on the GPU and lowers the loss.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_pretrain_runs() -> Result<()> {
    cuda();
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("run");
    let (code, _, err) = common::llmlab(&[
        "pretrain",
        "--config",
        "gpt-mini",
        "--context-length",
        "64",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--eval-freq",
        "2",
        "--lr",
        "1e-3",
        "--device",
        "cuda",
        "--out",
        out.to_str().unwrap(),
    ])?;
    assert_eq!(code, 0, "{err}");
    let m = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    let first: serde_json::Value = serde_json::from_str(m.lines().next().unwrap())?;
    let last: serde_json::Value = serde_json::from_str(m.lines().last().unwrap())?;
    assert!(
        last["train_loss"].as_f64().unwrap() < first["train_loss"].as_f64().unwrap() - 1.0,
        "{m}"
    );
    Ok(())
}

/// bf16 autocast + fused AdamW on CUDA: ten steps of gpt-mini (context 64) on one fixed batch
/// lower the loss (finite every step; the last below the first by 1.0); parameters, gradients
/// and both moments stay f32; and the fused kernel's update equals the plain one on CUDA for
/// the same gradients (1e-6 abs + 1e-5 rel).
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_bf16_fused_training_smoke() -> Result<()> {
    use llmlab::device::Precision;
    use llmlab::shim::{autocast_state, with_autocast};
    use llmlab::train::optim::{AdamW, AdamWConfig};
    let dev = cuda();
    tch::manual_seed(0);
    let mut cfg = GptConfig::load("gpt-mini")?;
    cfg.context_length = 64;
    cfg.drop_rate = 0.0;
    let vs = VarStore::new(dev);
    let model = GptModel::new(&vs.root(), &cfg);
    let mut named: Vec<_> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let plain_params: Vec<(String, Tensor)> = named
        .iter()
        .map(|(n, p)| (n.clone(), p.detach().copy().set_requires_grad(true)))
        .collect();
    let mut opt = AdamW::new(named, AdamWConfig::default());
    let mut plain = AdamW::new(plain_params, AdamWConfig::default());
    let x = Tensor::randint(cfg.vocab_size, [4, 64], (Kind::Int64, dev));
    let y = x.roll([-1], [1]);
    let mut losses = Vec::new();
    for step in 0..10 {
        opt.zero_grad();
        let loss = with_autocast(dev, Precision::Bf16, || {
            assert!(autocast_state(dev).unwrap().0);
            llmlab::train::calc_loss_batch(&model, &x, &y, true)
        })?;
        assert_eq!(loss.kind(), Kind::Float);
        loss.backward();
        if step == 0 {
            // The plain optimizer gets the same gradients once, then both step.
            plain.zero_grad();
            for ((_, q), (_, p)) in plain.params().iter().zip(opt.params()) {
                (q * p.grad()).sum(Kind::Float).backward();
            }
            plain.step(1e-3);
            opt.step_fused(1e-3)?;
            for ((name, q), (_, p)) in plain.params().iter().zip(opt.params()) {
                common::assert_close(p, q, 1e-6, 1e-5, &format!("fused vs plain on cuda {name}"))?;
            }
        } else {
            opt.step_fused(1e-3)?;
        }
        losses.push(loss.double_value(&[]));
    }
    assert!(!autocast_state(dev)?.0, "autocast off after the guard");
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(losses[9] < losses[0] - 1.0, "{losses:?}");
    for (name, p) in opt.params() {
        assert_eq!(
            (p.kind(), p.grad().kind()),
            (Kind::Float, Kind::Float),
            "{name}"
        );
    }
    for (key, t) in opt.state_tensors() {
        assert_eq!(t.kind(), Kind::Float, "{key}");
    }
    Ok(())
}

/// `llmlab pretrain --precision bf16 --fused-adamw true` on CUDA runs and lowers the loss.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_pretrain_bf16_fused_runs() -> Result<()> {
    cuda();
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("run");
    let (code, stdout, err) = common::llmlab(&[
        "pretrain",
        "--config",
        "gpt-mini",
        "--context-length",
        "64",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--eval-freq",
        "2",
        "--lr",
        "1e-3",
        "--device",
        "cuda",
        "--precision",
        "bf16",
        "--fused-adamw",
        "true",
        "--out",
        out.to_str().unwrap(),
    ])?;
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("bf16 autocast, fused AdamW"), "{stdout}");
    let m = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    let first: serde_json::Value = serde_json::from_str(m.lines().next().unwrap())?;
    let last: serde_json::Value = serde_json::from_str(m.lines().last().unwrap())?;
    assert!(
        last["train_loss"].as_f64().unwrap() < first["train_loss"].as_f64().unwrap() - 1.0,
        "{m}"
    );
    Ok(())
}

/// The NCCL path of data-parallel training (issue 19) as a group of one on one GPU: the
/// rendezvous, a broadcast, the loss all-reduce and the overlapping gradient reducer run on
/// CUDA tensors, and with one rank every gradient stays what backward gave (the mean of one).
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_nccl_group_of_one_reduces_gradients() -> Result<()> {
    use llmlab::dist::{free_port, Dist, DistEnv};
    let dev = cuda();
    assert!(llmlab::shim::nccl_built(), "this build has no NCCL");
    let env = DistEnv {
        rank: 0,
        world: 1,
        master_addr: "127.0.0.1".into(),
        master_port: free_port()?,
        source: "test",
    };
    let dist = Dist::join(&env, std::time::Duration::from_secs(30), dev)?;
    assert!((dist.mean_f64(3.25)? - 3.25).abs() < 1e-12);
    tch::manual_seed(0);
    let cfg = GptConfig {
        drop_rate: 0.0,
        ..common::tiny_gpt()
    };
    let vs = VarStore::new(dev);
    let model = GptModel::new(&vs.root(), &cfg);
    let params: Vec<Tensor> = vs.trainable_variables();
    let before: Vec<Tensor> = params.iter().map(|p| p.copy()).collect();
    dist.broadcast(&params)?;
    for (p, b) in params.iter().zip(&before) {
        assert!(p.equal(b), "a broadcast from the only rank changes nothing");
    }
    let x = Tensor::randint(cfg.vocab_size, [2, 16], (Kind::Int64, dev));
    let loss = |m: &GptModel| {
        m.forward_t(&x, false)
            .pow_tensor_scalar(2)
            .mean(Kind::Float)
    };
    loss(&model).backward();
    let plain: Vec<Tensor> = params.iter().map(|p| p.grad().copy()).collect();
    for p in &params {
        let _ = p.grad().zero_();
    }
    let reducer = dist
        .overlap_reducer(&params)?
        .expect("a group has a reducer");
    reducer.arm();
    loss(&model).backward();
    dist.finish_reduce(&reducer)?;
    for (p, g) in params.iter().zip(&plain) {
        common::assert_close(&p.grad(), g, 1e-6, 1e-6, "reduced gradient")?;
    }
    Ok(())
}
