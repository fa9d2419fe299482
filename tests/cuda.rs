//! CUDA checks, ignored on machines without a GPU (CI); `scripts/gpu_check.sh` runs them with
//! `--ignored` on a GPU machine.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod common;

use anyhow::Result;
use llmlab::generate::{generate, GenerateSpec};
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
        n_heads: 4,
        n_layers: 3,
        drop_rate: 0.0,
        qkv_bias: true,
        tie_weights: false,
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
    let spec = GenerateSpec {
        max_new_tokens: 30,
        eos_id: None,
        ..Default::default()
    };
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
