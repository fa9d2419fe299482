//! Micro-benchmarks (`llmlab bench`; `make bench` runs them beside their PyTorch twins,
//! `tests/reference/bench.py`): forward-pass, training-step and decoding tokens/s, each beside
//! nanoGPT's model FLOPs utilisation (`estimate_mfu` in karpathy/nanoGPT `model.py`, after PaLM
//! appendix B) and, for decoding, the memory bandwidth its weights take.
//!
//! Correctness lives in the tests; here: warm up, synchronize, time, report the median.
use crate::device::{device_name, seed_everything, Precision};
use crate::error::LlmError;
use crate::generate::GenerateSpec;
use crate::models::{AnyModel, CausalLm, GptConfig, GptModel};
use crate::nn::AttentionImpl;
use crate::resolve::{InferenceDtype, LoadedLm};
use crate::shim::with_autocast;
use crate::train::spec::FusedAdamW;
use anyhow::Result;
use serde::Serialize;
use std::time::Instant;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// Model and input shape of a throughput benchmark.
#[derive(Debug, Clone)]
pub struct Shape {
    /// A GPT preset or config file (fresh weights, seeded).
    pub config: String,
    pub batch: i64,
    pub seq: i64,
    /// Untimed runs first.
    pub warmup: usize,
    /// Timed runs (the median is reported).
    pub iters: usize,
}

/// A decoding benchmark: greedy, batch 1, after a prompt of `prompt_tokens`.
#[derive(Debug, Clone)]
pub struct Decode {
    /// A GPT preset or config file (fresh weights), unless `model` is given.
    pub config: String,
    /// A model name as `llmlab generate --model` takes it.
    pub model: Option<String>,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub use_cache: bool,
    pub iters: usize,
    pub dtype: InferenceDtype,
    /// After the timed runs, one more under libtorch's operator profiler, written here as a
    /// chrome://tracing file.
    pub profile: Option<std::path::PathBuf>,
    /// Also decode this many copies of the prompt together (one batched step per token, as the
    /// server's continuous batching runs them) and report their total tokens/s; 1: not.
    pub batch: i64,
}

/// The FLOP/s MFU is a fraction of.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Peak {
    pub tflops: f64,
    /// `--peak-tflops`, or how it was measured.
    pub source: String,
}

/// Square matmul size of the measured peak: big enough to reach the device's matmul rate,
/// small enough to take well under a second.
fn peak_matmul_size(device: Device) -> i64 {
    match device {
        Device::Cuda(_) => 8192,
        _ => 1024,
    }
}

impl Peak {
    /// `given` TFLOP/s (`--peak-tflops`, e.g. a datasheet's dense peak: A100 bf16 312, H100/H200
    /// SXM bf16 989 and fp32 67), else measured: the best of 5 timed square matmuls in `kind` on
    /// `device` (after one untimed), the rate the device reaches on what a transformer is mostly
    /// made of. nanoGPT divides by the A100's datasheet 312 TFLOP/s; a measured peak also
    /// works on a CPU, whose datasheet rarely says.
    pub fn new(given: Option<f64>, device: Device, kind: Kind) -> Self {
        if let Some(tflops) = given {
            return Self {
                tflops,
                source: "--peak-tflops".into(),
            };
        }
        let n = peak_matmul_size(device);
        let a = Tensor::randn([n, n], (kind, device));
        let b = Tensor::randn([n, n], (kind, device));
        let mut best = f64::INFINITY;
        for i in 0..6 {
            let s = time_once(device, || {
                let _ = a.matmul(&b);
            });
            if i > 0 {
                best = best.min(s);
            }
        }
        Self {
            tflops: 2.0 * (n as f64).powi(3) / best.max(1e-12) / 1e12,
            source: format!("measured: {} matmul {n}x{n}, best of 5", kind_name(kind)),
        }
    }
}

fn kind_name(kind: Kind) -> String {
    match kind {
        Kind::Float => "f32".into(),
        Kind::BFloat16 => "bf16".into(),
        Kind::Half => "f16".into(),
        other => format!("{other:?}"),
    }
}

/// A rate in GFLOP/s below 1 TFLOP/s (CPUs), else in TFLOP/s.
fn rate_text(tflops: f64) -> String {
    if tflops < 1.0 {
        format!("{:.1} GFLOP/s", tflops * 1e3)
    } else {
        format!("{tflops:.1} TFLOP/s")
    }
}

/// FLOPs of a model per token, nanoGPT's way: `2 N` for the matmuls of a forward pass (`N`: the
/// weights the matmuls read; not the embedding tables, but the output head even when it is tied
/// to them) plus `4 L H Q T` for attention (scores and weighted values over `T` positions, `L`
/// layers of `H` query heads of width `Q`); a training step is three times a forward pass
/// (nanoGPT's `6 N + 12 L H Q T`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlopModel {
    pub matmul_params: f64,
    /// `L · H · Q`.
    pub attention_width: f64,
}

impl FlopModel {
    /// From a model's variables (no `pos_emb`; `tok_emb` only as a tied head, when there is no
    /// `out_head`) and its `layers` blocks of `heads_width` (`H · Q`) query width.
    pub fn new(vs: &VarStore, layers: usize, heads_width: i64) -> Self {
        let vars = vs.variables();
        let all: f64 = vars.values().map(|t| t.numel() as f64).sum();
        let table = |name: &str| vars.get(name).map_or(0.0, |t| t.numel() as f64);
        let embedding = if vars.contains_key("out_head.weight") {
            table("tok_emb.weight")
        } else {
            0.0 // tied: the token table is the output head's matmul too
        };
        Self {
            matmul_params: all - embedding - table("pos_emb.weight"),
            attention_width: layers as f64 * heads_width as f64,
        }
    }

    /// [`Self::new`] for either family.
    pub fn of(vs: &VarStore, model: &AnyModel) -> Self {
        let heads_width = match model {
            AnyModel::Gpt(m) => m.cfg.emb_dim,
            AnyModel::Llama(m) => m.cfg.n_heads * m.cfg.head_dim(),
        };
        Self::new(vs, model.n_layers(), heads_width)
    }

    /// FLOPs of one token's forward pass attending to `context` positions.
    pub fn forward(&self, context: f64) -> f64 {
        2.0 * self.matmul_params + 4.0 * self.attention_width * context
    }

    /// FLOPs of one token's forward and backward pass.
    pub fn train(&self, context: f64) -> f64 {
        3.0 * self.forward(context)
    }
}

/// Achieved model FLOP/s and their fraction of the peak.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Utilisation {
    pub flops_per_token: f64,
    /// Achieved TFLOP/s: `flops_per_token · tokens/s`.
    pub tflops: f64,
    pub peak_tflops: f64,
    /// Where `peak_tflops` comes from.
    pub peak: String,
    /// Model FLOPs utilisation: `tflops / peak_tflops`.
    pub mfu: f64,
}

impl Utilisation {
    pub fn new(flops_per_token: f64, tokens_per_s: f64, peak: &Peak) -> Self {
        let tflops = flops_per_token * tokens_per_s / 1e12;
        Self {
            flops_per_token,
            tflops,
            peak_tflops: peak.tflops,
            peak: peak.source.clone(),
            mfu: tflops / peak.tflops,
        }
    }
}

/// Bytes of weights one decoding step reads: every variable in its dtype, except that the
/// embedding tables give one row each (a tied output head reads the token table whole), and a
/// model with quantized blocks reads their codes and scales instead of the blocks' matrices (and a Q8_0
/// output head its blocks instead of the token table).
pub fn weight_bytes_per_token(vs: &VarStore, model: &AnyModel) -> f64 {
    let (int4, head_q8) = match model {
        AnyModel::Llama(m) => (m.int4_bytes(), m.head_q8_bytes()),
        AnyModel::Gpt(_) => (0, None),
    };
    let vars = vs.variables();
    let tied = !vars.contains_key("out_head.weight");
    let bytes = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as f64;
    let mut total = (int4 + head_q8.unwrap_or(0)) as f64;
    for (name, t) in &vars {
        let row = bytes(t) / t.size()[0].max(1) as f64;
        total += match name.as_str() {
            "out_head.weight" if head_q8.is_some() => 0.0,
            "tok_emb.weight" if tied && head_q8.is_none() => bytes(t) + row,
            "tok_emb.weight" | "pos_emb.weight" => row,
            n if int4 > 0 && n.starts_with("trf_blocks.") && t.dim() == 2 => 0.0,
            _ => bytes(t),
        };
    }
    total
}

/// A throughput benchmark's result: one JSON line (`make bench` reads `tokens_per_s`).
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    #[serde(rename = "impl")]
    pub implementation: &'static str,
    /// `forward` or `train`.
    pub what: &'static str,
    pub config: String,
    pub batch: i64,
    pub seq: i64,
    pub threads: i32,
    pub device: String,
    pub median_s: f64,
    pub tokens_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    /// Whether the fused AdamW kernel ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fused_adamw: Option<bool>,
    #[serde(flatten)]
    pub utilisation: Utilisation,
}

/// A decoding benchmark's result.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeReport {
    #[serde(rename = "impl")]
    pub implementation: &'static str,
    pub what: &'static str,
    pub config: String,
    pub kv_cache: bool,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub dtype: &'static str,
    pub threads: i32,
    pub device: String,
    /// Decode steps per second (median over the runs).
    pub tokens_per_s: f64,
    /// Prompt tokens per second of the prompt pass (median).
    pub prompt_tokens_per_s: f64,
    /// Of decoding, at the mean context of the decoded tokens (with or without the cache: the
    /// model FLOPs, not the recomputation).
    #[serde(flatten)]
    pub utilisation: Utilisation,
    /// The prompt pass's MFU (attention over the whole prompt, as nanoGPT counts it).
    pub prompt_mfu: f64,
    pub weight_bytes_per_token: f64,
    /// Weights read per second while decoding: `weight_bytes_per_token · tokens_per_s`.
    pub gb_per_s: f64,
    /// Sequences decoded together for `batch_tokens_per_s` (`--batch`).
    pub batch: i64,
    /// Total decode tokens/s of `batch` sequences decoded together (median), when `batch > 1`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_tokens_per_s: Option<f64>,
    /// With the VNNI kernels: `vpdpbusd` instructions a token costs, the rate this machine's
    /// threads issue them at (measured), and their quotient, the tokens/s no batch size can
    /// pass (batch 1 is bound by the bandwidth, batches by this).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vnni_dots_per_token: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vnni_dots_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compute_bound_tokens_per_s: Option<f64>,
}

/// Median of timings (sorted in place).
fn median(times: &mut [f64]) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Seconds `f` takes, synchronizing CUDA so the time covers the kernels.
fn time_once(device: Device, f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    if let Device::Cuda(d) = device {
        tch::Cuda::synchronize(d as i64);
    }
    t.elapsed().as_secs_f64()
}

/// Runs `f` `warmup + iters` times and returns the median seconds of the timed runs.
fn time_median(device: Device, warmup: usize, iters: usize, mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..warmup + iters.max(1))
        .map(|_| time_once(device, &mut f))
        .skip(warmup)
        .collect();
    median(&mut times)
}

/// A GPT with fresh (seeded) weights and a random `(batch, seq)` input.
fn setup(shape: &Shape, device: Device) -> Result<(VarStore, GptModel, Tensor)> {
    let cfg = GptConfig::load(&shape.config)?;
    seed_everything(123);
    let vs = VarStore::new(device);
    let model = GptModel::new(&vs.root(), &cfg);
    if shape.seq > cfg.context_length {
        return Err(LlmError::Usage(format!(
            "--seq {} exceeds the context_length {} of {}",
            shape.seq, cfg.context_length, shape.config
        ))
        .into());
    }
    let x = Tensor::randint(
        cfg.vocab_size,
        [shape.batch, shape.seq],
        (Kind::Int64, device),
    );
    Ok((vs, model, x))
}

/// The FLOP model of a bare GPT.
fn gpt_flops(vs: &VarStore, model: &GptModel) -> FlopModel {
    FlopModel::new(vs, model.trf_blocks.len(), model.cfg.emb_dim)
}

fn throughput(
    what: &'static str,
    shape: &Shape,
    device: Device,
    median_s: f64,
    flops_per_token: f64,
    peak: &Peak,
) -> Throughput {
    let tokens_per_s = (shape.batch * shape.seq) as f64 / median_s;
    Throughput {
        implementation: "llmlab",
        what,
        config: shape.config.clone(),
        batch: shape.batch,
        seq: shape.seq,
        threads: tch::get_num_threads(),
        device: device_name(device),
        median_s,
        tokens_per_s,
        precision: None,
        fused_adamw: None,
        utilisation: Utilisation::new(flops_per_token, tokens_per_s, peak),
    }
}

/// Forward-pass tokens/s of a fresh GPT (eval mode, no grad); `manual_attention`: the book's
/// explicit attention instead of the fused SDPA kernel. `peak`: `--peak-tflops` (else measured
/// in f32).
pub fn forward(
    shape: &Shape,
    manual_attention: bool,
    device: Device,
    peak: Option<f64>,
) -> Result<Throughput> {
    let (vs, mut model, x) = setup(shape, device)?;
    if manual_attention {
        model.set_attention_impl(AttentionImpl::Manual);
    }
    let med = {
        let _g = tch::no_grad_guard();
        time_median(device, shape.warmup, shape.iters, || {
            let _ = model.forward_t(&x, false);
        })
    };
    let flops = gpt_flops(&vs, &model).forward(shape.seq as f64);
    let peak = Peak::new(peak, device, Kind::Float);
    Ok(throughput("forward", shape, device, med, flops, &peak))
}

/// Training tokens/s of a fresh GPT: forward + backward + AdamW step (train mode, the config's
/// dropout). `peak`: `--peak-tflops` (else measured in the precision's dtype).
pub fn train(
    shape: &Shape,
    precision: Precision,
    fused_adamw: FusedAdamW,
    device: Device,
    peak: Option<f64>,
) -> Result<Throughput> {
    let (vs, model, x) = setup(shape, device)?;
    let y = x.roll([1], [1]); // any targets of the right shape
    let mut named: Vec<_> = vs.variables().into_iter().collect();
    named.sort_by(|p, q| p.0.cmp(&q.0));
    let mut opt = crate::train::optim::AdamW::new(named, Default::default());
    let fused = fused_adamw.resolve(device);
    let mut failed = None;
    let med = time_median(device, shape.warmup, shape.iters, || {
        opt.zero_grad();
        let step = with_autocast(device, precision, || {
            crate::train::calc_loss_batch(&model, &x, &y, true)
        })
        .and_then(|loss| {
            loss.backward();
            opt.update(4e-4, fused)
        });
        if let Err(e) = step {
            failed.get_or_insert(e);
        }
    });
    if let Some(e) = failed {
        return Err(e.into());
    }
    let flops = gpt_flops(&vs, &model).train(shape.seq as f64);
    let kind = precision.autocast_kind().unwrap_or(Kind::Float);
    let peak = Peak::new(peak, device, kind);
    let mut r = throughput("train", shape, device, med, flops, &peak);
    r.precision = Some(precision);
    r.fused_adamw = Some(fused);
    Ok(r)
}

/// Greedy decoding tokens/s after a prompt, batch 1, with or without the KV cache; the prompt
/// pass's tokens/s beside it. `peak`: `--peak-tflops` (else measured in the activations' dtype:
/// f32, or bf16 for `--dtype bf16|q4`).
pub fn decode(b: &Decode, device: Device, peak: Option<f64>) -> Result<DecodeReport> {
    let spec = GenerateSpec {
        max_new_tokens: b.new_tokens,
        eos_id: None,
        use_cache: b.use_cache,
        ..GenerateSpec::default()
    };
    let warm = GenerateSpec {
        max_new_tokens: 4,
        ..spec.clone()
    };
    let (label, mut lm) = match &b.model {
        Some(m) => (m.clone(), LoadedLm::load(m, device)?),
        None => {
            seed_everything(123);
            (b.config.clone(), LoadedLm::fresh_gpt(&b.config, device)?)
        }
    };
    lm.set_dtype(b.dtype)?;
    let vocab = lm.vocab_size();
    let prompt: Vec<i64> = (0..b.prompt_tokens as i64)
        .map(|i| (i * 7919) % vocab)
        .collect();
    lm.generate_stream(&prompt, &warm, |_| true)?;
    let mut decode_rates = Vec::with_capacity(b.iters);
    let mut prefill = Vec::with_capacity(b.iters);
    for _ in 0..b.iters {
        let g = lm.generate_stream(&prompt, &spec, |_| true)?;
        // The first new token comes from the prompt pass; the rest are decode steps.
        decode_rates.push((g.ids.len().saturating_sub(1)) as f64 / g.decode_seconds.max(1e-9));
        prefill.push(b.prompt_tokens as f64 / g.prompt_seconds.max(1e-9));
    }
    let (tokens_per_s, prompt_tokens_per_s) = (median(&mut decode_rates), median(&mut prefill));
    let batch_tokens_per_s = if b.batch > 1 {
        let mut rates = (0..b.iters)
            .map(|_| batched_decode(&lm.model, &prompt, b.batch, b.new_tokens))
            .collect::<Vec<_>>();
        Some(median(&mut rates))
    } else {
        None
    };
    if let Some(path) = &b.profile {
        let _profile = crate::shim::OpProfile::start(path)?;
        lm.generate_stream(&prompt, &spec, |_| true)?;
    }
    let flops = FlopModel::of(&lm.vs, &lm.model);
    let peak = Peak::new(peak, device, b.dtype.kind().unwrap_or(Kind::BFloat16));
    // Decode step i (1-based) attends to the prompt and i new tokens.
    let mean_context = b.prompt_tokens as f64 + b.new_tokens as f64 / 2.0;
    let prompt_util = Utilisation::new(
        flops.forward(b.prompt_tokens as f64),
        prompt_tokens_per_s,
        &peak,
    );
    let weight_bytes = weight_bytes_per_token(&lm.vs, &lm.model);
    let dots = match &lm.model {
        AnyModel::Llama(m) if device == Device::Cpu => m.vnni_dots_per_token() as f64,
        _ => 0.0,
    };
    let dots_per_s = if dots > 0.0 {
        Some(crate::shim::vnni_peak(10_000_000)?)
    } else {
        None
    };
    Ok(DecodeReport {
        implementation: "llmlab",
        what: "generate",
        config: label,
        kv_cache: b.use_cache,
        prompt_tokens: b.prompt_tokens,
        new_tokens: b.new_tokens,
        dtype: b.dtype.name(),
        threads: tch::get_num_threads(),
        device: device_name(device),
        tokens_per_s,
        prompt_tokens_per_s,
        utilisation: Utilisation::new(flops.forward(mean_context), tokens_per_s, &peak),
        prompt_mfu: prompt_util.mfu,
        weight_bytes_per_token: weight_bytes,
        gb_per_s: weight_bytes * tokens_per_s / 1e9,
        batch: b.batch,
        batch_tokens_per_s,
        vnni_dots_per_token: (dots > 0.0).then_some(dots),
        vnni_dots_per_s: dots_per_s,
        compute_bound_tokens_per_s: dots_per_s.map(|r| r / dots),
    })
}

/// Greedy decoding of `batch` copies of `prompt` together: one prompt pass over the batch, then
/// `new_tokens - 1` batched steps (every row one token); returns the steps' total tokens/s.
fn batched_decode(model: &AnyModel, prompt: &[i64], batch: i64, new_tokens: usize) -> f64 {
    fn run<M: CausalLm>(m: &M, prompt: &[i64], batch: i64, new_tokens: usize) -> f64 {
        let _g = tch::no_grad_guard();
        let n = prompt.len() as i64;
        let mut cache = m.new_cache(batch, n + new_tokens as i64);
        let idx = Tensor::from_slice(prompt)
            .view([1, n])
            .expand([batch, n], false)
            .contiguous()
            .to_device(m.device());
        let mut next = m
            .forward_last_logits_cached(&idx, &mut cache)
            .argmax(-1, false)
            .view([batch, 1]);
        let t0 = Instant::now();
        for _ in 1..new_tokens {
            next = m
                .forward_last_logits_cached(&next, &mut cache)
                .argmax(-1, false)
                .view([batch, 1]);
        }
        let _ = next.int64_value(&[0, 0]); // waits for the device
        (batch as f64 * new_tokens.saturating_sub(1) as f64) / t0.elapsed().as_secs_f64()
    }
    match model {
        AnyModel::Gpt(m) => run(m, prompt, batch, new_tokens),
        AnyModel::Llama(m) => run(m, prompt, batch, new_tokens),
    }
}

impl Throughput {
    /// The result for a reader: what ran, tokens/s, achieved TFLOP/s and MFU.
    pub fn text(&self) -> String {
        let mut setup = format!("{} threads", self.threads);
        if let (Some(p), Some(f)) = (self.precision, self.fused_adamw) {
            let p = if p.is_fp32() { "fp32" } else { "bf16" };
            setup += &format!(", {p}, {} AdamW", if f { "fused" } else { "plain" });
        }
        format!(
            "{} {} on {} ({setup}): batch {} x seq {}, median {:.4} s\n{:.1} tokens/s, {}",
            self.what,
            self.config,
            self.device,
            self.batch,
            self.seq,
            self.median_s,
            self.tokens_per_s,
            self.utilisation.text()
        )
    }
}

impl DecodeReport {
    /// The result for a reader: decode and prompt tokens/s, MFU and weight bandwidth.
    pub fn text(&self) -> String {
        format!(
            "generate {} on {} ({} threads, {}, {}): {} new tokens after {}\ndecode {:.1} tokens/s, {}, weights {:.2} GB/s ({:.1} MB per token)\nprompt {:.1} tokens/s, MFU {:.2}%",
            self.config,
            self.device,
            self.threads,
            self.dtype,
            if self.kv_cache { "KV cache" } else { "no cache" },
            self.new_tokens,
            self.prompt_tokens,
            self.tokens_per_s,
            self.utilisation.text(),
            self.gb_per_s,
            self.weight_bytes_per_token / 1e6,
            self.prompt_tokens_per_s,
            self.prompt_mfu * 100.0
        ) + &self.batch_tokens_per_s.map_or(String::new(), |t| {
            format!(
                "\nbatch {}: {t:.1} tokens/s in all ({:.2}x batch 1)",
                self.batch,
                t / self.tokens_per_s
            )
        })
    }
}

impl Utilisation {
    fn text(&self) -> String {
        format!(
            "{}, MFU {:.2}% of {} ({})",
            rate_text(self.tflops),
            self.mfu * 100.0,
            rate_text(self.peak_tflops),
            self.peak
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// nanoGPT's count, 6N + 12·L·H·Q·T, with N the parameters less the embedding tables (the
    /// book's GPT has its own out_head; nanoGPT's wte is its head).
    #[test]
    fn flop_model_matches_nanogpt() {
        let cfg = GptConfig::load("gpt-mini").expect("preset");
        let vs = VarStore::new(Device::Cpu);
        let model = GptModel::new(&vs.root(), &cfg);
        let f = gpt_flops(&vs, &model);
        let total: f64 = vs.variables().values().map(|t| t.numel() as f64).sum();
        let wte = (cfg.vocab_size * cfg.emb_dim) as f64;
        let wpe = (cfg.context_length * cfg.emb_dim) as f64;
        assert_eq!(f.matmul_params, total - wte - wpe);
        let (l, h, q, t) = (4.0, 4.0, 64.0, 128.0);
        assert_eq!(f.train(t), 6.0 * f.matmul_params + 12.0 * l * h * q * t);
        assert_eq!(f.forward(t) * 3.0, f.train(t));
        let any = AnyModel::Gpt(model);
        assert_eq!(FlopModel::of(&vs, &any), f);
        // Weights read per decoded token: all but the tables, one row of each (f32).
        let bytes = weight_bytes_per_token(&vs, &any);
        assert_eq!(bytes, 4.0 * (total - wte - wpe + 2.0 * cfg.emb_dim as f64));
    }

    /// The VNNI kernels' ceiling: an instruction rate a CPU can have (an optimized-away loop
    /// would be far above, a broken count far below).
    #[test]
    fn vnni_peak_is_a_plausible_instruction_rate() {
        if !crate::nn::quant::QuantKernel::vnni_available() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
            return;
        }
        let threads = tch::get_num_threads() as f64;
        let rate = crate::shim::vnni_peak(200_000).expect("vnni peak");
        assert!(
            rate > 1e8 * threads && rate < 2e10 * threads,
            "{rate:e} vpdpbusd/s on {threads} threads"
        );
    }

    #[test]
    fn utilisation_is_achieved_over_peak() {
        let peak = Peak::new(Some(2.0), Device::Cpu, Kind::Float);
        let u = Utilisation::new(1e9, 500.0, &peak);
        assert!((u.tflops - 0.5).abs() < 1e-12 && (u.mfu - 0.25).abs() < 1e-12);
        assert_eq!(u.peak, "--peak-tflops");
    }
}
