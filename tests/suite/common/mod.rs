//! Helpers shared by the integration tests: the reference Python (cached), fixtures, tensor
//! comparison, a local HTTP stub, tiny model configs, greedy decoding.
#![allow(dead_code)]
mod http;
mod reference;

pub use http::{HttpStub, Response};
pub use reference::{run_reference_uncached, Outcome, Reference, ReferenceCache};

use anyhow::{bail, Context, Result};
use llmlab::generate::GenerateSpec;
use llmlab::models::GptConfig;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::Tensor;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The venv's Python (`LLMLAB_PYTHON`, else `.venv/bin/python` in the repository).
pub fn python() -> PathBuf {
    std::env::var_os("LLMLAB_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"))
}

/// The data mirror (`LLMLAB_DATA_MIRROR`, else `../shared/data` beside the repository).
pub fn mirror() -> PathBuf {
    std::env::var_os("LLMLAB_DATA_MIRROR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/data"))
}

pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    Ok(Tensor::read_safetensors(path)
        .with_context(|| format!("reading {}", path.display()))?
        .into_iter()
        .collect())
}

/// Fails unless `|a - b| <= atol + rtol·|b|` everywhere; reports the largest difference and
/// the first index that breaks the bound (llm.c's `check_tensor`).
pub fn assert_close(a: &Tensor, b: &Tensor, atol: f64, rtol: f64, what: &str) -> Result<()> {
    if a.size() != b.size() {
        bail!("{what}: shapes differ, {:?} vs {:?}", a.size(), b.size());
    }
    let a = a.to_kind(tch::Kind::Double).to_device(tch::Device::Cpu);
    let b = b.to_kind(tch::Kind::Double).to_device(tch::Device::Cpu);
    let diff = (&a - &b).abs();
    let max = diff.max().double_value(&[]);
    let bound = b.abs() * rtol + atol;
    let bad = diff.gt_tensor(&bound);
    let n_bad = bad.sum(tch::Kind::Int64).int64_value(&[]);
    eprintln!("{what}: max abs diff {max:.3e} over {} values", a.numel());
    if n_bad > 0 {
        let first = bad.view([-1]).nonzero().int64_value(&[0, 0]);
        bail!(
            "{what}: {n_bad} values exceed atol {atol:e} + rtol {rtol:e}; max abs diff {max:e}; first bad flat index {first}"
        );
    }
    Ok(())
}

/// Runs the built `llmlab` binary; returns (exit code, stdout, stderr).
pub fn llmlab(args: &[&str]) -> Result<(i32, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_llmlab"))
        .args(args)
        .env("LLMLAB_DATA_MIRROR", mirror())
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `llmlab run FILE --runs RUNS --device cpu` after writing `yaml` to `dir/<name>.yaml`;
/// returns (exit code, stderr).
pub fn llmlab_run(dir: &Path, runs: &Path, name: &str, yaml: &str) -> Result<(i32, String)> {
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, yaml)?;
    let (code, _, err) = llmlab(&[
        "run",
        file.to_str().context("UTF-8 path")?,
        "--runs",
        runs.to_str().context("UTF-8 path")?,
        "--device",
        "cpu",
    ])?;
    Ok((code, err))
}

/// `llmlab generate --model RUN` on a test entry of the run's `responses.json` (its
/// instruction, and its input when it has one) answers, greedily, what the run wrote as the
/// entry's `model_response`.
pub fn assert_generate_answers_as_the_run(
    run: &Path,
    entry: &serde_json::Value,
    max_new_tokens: usize,
) -> Result<()> {
    let n = max_new_tokens.to_string();
    let mut args = vec![
        "generate",
        "--model",
        run.to_str().context("UTF-8 path")?,
        "--prompt",
        entry["instruction"].as_str().context("instruction")?,
        "--max-new-tokens",
        &n,
        "--format",
        "json",
        "--device",
        "cpu",
    ];
    let input = entry["input"].as_str().unwrap_or("");
    if !input.is_empty() {
        args.extend(["--input", input]);
    }
    let (code, out, err) = llmlab(&args)?;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim())?;
    assert_eq!(v["response"], entry["model_response"], "{out}");
    Ok(())
}

/// Runs the llmlab binary with `input` on its stdin; returns (exit code, stdout, stderr).
pub fn llmlab_stdin(args: &[&str], input: &str) -> Result<(i32, String, String)> {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmlab"))
        .args(args)
        .env("LLMLAB_DATA_MIRROR", mirror())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The tests' tiny GPT: vocabulary 97, context 16, 32-dim embeddings, 4 heads, 2 blocks,
/// dropout 0.1, qkv bias, an untied head. Tests that need other numbers override fields:
/// `GptConfig { vocab_size: 61, ..tiny_gpt() }`.
pub fn tiny_gpt() -> GptConfig {
    GptConfig {
        vocab_size: 97,
        context_length: 16,
        emb_dim: 32,
        n_heads: 4,
        n_layers: 2,
        drop_rate: 0.1,
        qkv_bias: true,
        tie_weights: false,
    }
}

/// Writes the tests' tiny Llama config (SmolLM2's vocabulary, 3 blocks of 64 dims, GQA 4 query /
/// 2 KV heads, tied head) to `dir/tiny-llama.yaml`; returns its path for `LoadedLm::load`.
pub fn tiny_llama_yaml(dir: &Path) -> Result<String> {
    let p = dir.join("tiny-llama.yaml");
    std::fs::write(
        &p,
        "family: llama\nvocab_size: 49152\ncontext_length: 128\nemb_dim: 64\nn_heads: 4\nn_kv_groups: 2\nn_layers: 3\nhidden_dim: 128\nrope_base: 10000.0\nrms_eps: 1.0e-5\ntie_weights: true\n",
    )?;
    Ok(p.display().to_string())
}

/// Greedy decoding of `n` tokens (temperature 0), with or without the KV cache, without an
/// end-of-text stop (`GenerateSpec { eos_id: Some(id), ..greedy(n, true) }` adds one).
pub fn greedy(n: usize, use_cache: bool) -> GenerateSpec {
    GenerateSpec {
        max_new_tokens: n,
        temperature: 0.0,
        eos_id: None,
        use_cache,
        ..Default::default()
    }
}

pub fn gpt2_bpe_dir() -> PathBuf {
    mirror().join("gpt2-bpe")
}

/// The records of a run's `metrics.jsonl`.
pub fn metric_lines(dir: &Path) -> Result<Vec<serde_json::Value>> {
    Ok(std::fs::read_to_string(dir.join("metrics.jsonl"))?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?)
}

/// Both run folders' `metrics.jsonl` have the same number of lines and equal values under `keys`
/// on each line (a resumed run against the uninterrupted one).
pub fn assert_same_metrics(a: &Path, b: &Path, keys: &[&str], what: &str) -> Result<()> {
    let (x, y) = (metric_lines(a)?, metric_lines(b)?);
    assert_eq!(x.len(), y.len(), "{what}: metrics.jsonl lines");
    for (l, r) in x.iter().zip(&y) {
        for key in keys {
            assert_eq!(l[key], r[key], "{what}: {key}");
        }
    }
    Ok(())
}

/// `llmlab run FILE --runs RUNS EXTRA...` with the data mirror set, to spawn or wait for.
pub fn run_command(file: &Path, runs: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_llmlab"));
    c.arg("run")
        .arg(file)
        .arg("--runs")
        .arg(runs)
        .args(extra)
        .env("LLMLAB_DATA_MIRROR", mirror());
    c
}

/// A trial's `metrics.jsonl` without the wall-clock throughput (what two runs of the same trial
/// must agree on).
pub fn curve(trial: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(trial.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|mut v| {
            if let Some(o) = v.as_object_mut() {
                o.remove("tokens_per_sec");
            }
            v
        })
        .collect()
}

/// The step of a trial's latest checkpoint (0: none yet).
pub fn checkpoint_step(trial: &Path) -> u64 {
    std::fs::read_to_string(trial.join("checkpoints/latest"))
        .unwrap_or_default()
        .trim()
        .trim_start_matches("step_")
        .parse()
        .unwrap_or(0)
}

/// Requests a stop (as Ctrl-C does) after optimizer step `.0`; clears the request when dropped,
/// so that a test that fails before clearing it does not stop the runs of the tests after it
/// (they share this process).
pub struct StopAt(pub usize);

impl Drop for StopAt {
    fn drop(&mut self) {
        llmlab::signal::reset();
    }
}

impl llmlab::train::trainer::TrainEvents for StopAt {
    fn log(&mut self, _msg: &str) {}
    fn step(&mut self, step: usize, _loss: f64) {
        if step == self.0 {
            llmlab::signal::request_stop();
        }
    }
}
