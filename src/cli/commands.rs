//! What each subcommand does: parse nothing, validate at the boundary, call the library.
use super::*;
use crate::data::{registry::Registry, tokenizer::train_bpe, BpeTokenizer};
use crate::device::{device_name, parse_device, set_threads};
use crate::error::{read_text, LlmError};
use crate::models::{gpt::ParamStats, GptConfig, GptModel};
use crate::nn::AttentionImpl;
use anyhow::Result;
use std::path::Path;
use std::time::Instant;

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Data { action } => data(action),
        Command::Tokenize(a) => tokenize(a),
        Command::TrainTokenizer(a) => train_tokenizer(a),
        Command::ModelInfo(a) => model_info(a),
        Command::Pretrain(a) => pretrain(a),
        Command::Bench(a) => bench(a),
    }
}

fn data(action: DataAction) -> Result<()> {
    let reg = Registry::builtin()?;
    match action {
        DataAction::List { format } => {
            if format == Format::Json {
                let list: Vec<_> = reg
                    .datasets
                    .iter()
                    .map(|(name, ds)| {
                        serde_json::json!({
                            "name": name,
                            "description": ds.description,
                            "files": ds.files.len(),
                            "url": ds.archive.as_ref().map(|a| a.url.clone())
                                .or_else(|| ds.files.first().and_then(|f| f.url.clone())),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for (name, ds) in &reg.datasets {
                    let url = ds
                        .archive
                        .as_ref()
                        .map(|a| a.url.as_str())
                        .or_else(|| ds.files.first().and_then(|f| f.url.as_deref()))
                        .unwrap_or("");
                    println!(
                        "{name:<22} {:>4} file(s)  {}\n{:<22} {url}",
                        ds.files.len(),
                        ds.description,
                        ""
                    );
                }
                match crate::data::registry::mirror_root() {
                    Some(m) => println!("\nmirror: LLMLAB_DATA_MIRROR={}", m.display()),
                    None => println!(
                        "\ncache: {}",
                        crate::data::registry::cache_root().join("data").display()
                    ),
                }
            }
        }
        DataAction::Fetch { name } => {
            let dir = reg.fetch(&name)?;
            println!("{}", dir.display());
        }
    }
    Ok(())
}

fn tokenize(a: TokenizeArgs) -> Result<()> {
    let text = match (&a.text, &a.file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => read_text(f)?,
        (None, None) => {
            return Err(LlmError::Usage("give --text TEXT or --file PATH".into()).into())
        }
    };
    let tok = BpeTokenizer::load(&a.tokenizer)?;
    let ids = tok.encode(&text)?;
    match a.format {
        Format::Json => println!("{}", serde_json::json!({ "ids": ids })),
        Format::Text => println!(
            "{}",
            ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
        ),
    }
    Ok(())
}

fn train_tokenizer(a: TrainTokenizerArgs) -> Result<()> {
    if a.vocab_size < 257 {
        return Err(LlmError::Usage(format!(
            "--vocab-size {} is too small: a byte-level BPE needs at least 257 (256 bytes + <|endoftext|>)",
            a.vocab_size
        ))
        .into());
    }
    let tok = train_bpe(&a.files, a.vocab_size, a.min_frequency)?;
    tok.save(&a.out)?;
    println!(
        "wrote {} (vocabulary of {} tokens)",
        a.out.display(),
        tok.vocab_size()
    );
    Ok(())
}

fn model_info(a: ModelInfoArgs) -> Result<()> {
    let cfg = GptConfig::load(&a.config)?;
    let st = ParamStats::from_config(&cfg);
    match a.format {
        Format::Json => println!("{}", serde_json::json!({ "config": a.config, "stats": st })),
        Format::Text => {
            println!("config: {}", a.config);
            println!("Total number of parameters: {}", st.total_params);
            println!(
                "Number of trainable parameters considering weight tying: {}",
                st.params_without_out_head
            );
            println!("Total size of the model: {:.2} MB", st.size_mb_f32);
        }
    }
    Ok(())
}

/// Resolves `--data`: a registered data set (its first file) or a text file.
fn data_text(spec: &str) -> Result<String> {
    let p = Path::new(spec);
    if p.is_file() {
        return Ok(read_text(p)?);
    }
    let reg = Registry::builtin()?;
    if reg.datasets.contains_key(spec) {
        let dir = reg.fetch(spec)?;
        let first = &reg.get(spec)?.files[0].path;
        return Ok(read_text(&dir.join(first))?);
    }
    Err(LlmError::Io {
        path: p.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "not a file and not a registered data set ({})",
                reg.datasets.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        ),
    }
    .into())
}

fn pretrain(a: PretrainArgs) -> Result<()> {
    let device = parse_device(&a.compute.device)?;
    set_threads(a.compute.threads);
    let mut cfg = GptConfig::load(&a.config)?;
    if let Some(c) = a.context_length {
        cfg.context_length = c;
    }
    cfg.validate("--context-length")?;
    let text = data_text(&a.data)?;
    let tok = BpeTokenizer::gpt2()?;
    let spec = crate::train::SimpleTrainSpec {
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        weight_decay: a.weight_decay,
        eval_freq: a.eval_freq,
        eval_iter: a.eval_iter,
        train_ratio: 0.9,
        seed: a.seed,
        start_context: a.prompt.clone(),
        sample_tokens: a.sample_tokens,
    };
    println!(
        "pretraining {} ({} layers, emb {}, context {}) on {} ({} characters), device {}",
        a.config,
        cfg.n_layers,
        cfg.emb_dim,
        cfg.context_length,
        a.data,
        text.chars().count(),
        device_name(device)
    );
    let t0 = Instant::now();
    let (vs, _model, result) =
        crate::train::pretrain_simple(&cfg, &text, &tok, &spec, device, |l| println!("{l}"))?;
    println!("training took {:.1} s", t0.elapsed().as_secs_f64());
    if let Some(out) = &a.out {
        crate::weights::save_safetensors(&vs, &out.join("model.safetensors"))?;
        crate::error::write_atomic(
            &out.join("config.yaml"),
            serde_yaml::to_string(&cfg)?.as_bytes(),
        )?;
        let lines: String = result
            .evals
            .iter()
            .map(|e| serde_json::to_string(e).map(|s| s + "\n"))
            .collect::<Result<_, _>>()?;
        crate::error::write_atomic(&out.join("metrics.jsonl"), lines.as_bytes())?;
        println!(
            "saved model.safetensors, config.yaml and metrics.jsonl in {}",
            out.display()
        );
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    match a.what {
        BenchWhat::Forward {
            config,
            batch,
            seq,
            warmup,
            iters,
            manual_attention,
            compute,
        } => {
            let device = parse_device(&compute.device)?;
            set_threads(compute.threads);
            let cfg = GptConfig::load(&config)?;
            if seq > cfg.context_length {
                return Err(LlmError::Usage(format!(
                    "--seq {seq} exceeds the context_length {} of {config}",
                    cfg.context_length
                ))
                .into());
            }
            crate::device::seed_everything(123);
            let vs = tch::nn::VarStore::new(device);
            let mut model = GptModel::new(&vs.root(), &cfg);
            if manual_attention {
                model.set_attention_impl(AttentionImpl::Manual);
            }
            let x = tch::Tensor::randint(cfg.vocab_size, [batch, seq], (tch::Kind::Int64, device));
            let _g = tch::no_grad_guard();
            let sync = || {
                if let tch::Device::Cuda(i) = device {
                    tch::Cuda::synchronize(i as i64);
                }
            };
            for _ in 0..warmup {
                let _ = model.forward_t(&x, false);
            }
            sync();
            let mut times = Vec::with_capacity(iters);
            for _ in 0..iters {
                let t = Instant::now();
                let _ = model.forward_t(&x, false);
                sync();
                times.push(t.elapsed().as_secs_f64());
            }
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            let tokens = (batch * seq) as f64;
            println!(
                "{}",
                serde_json::json!({
                    "impl": "llmlab", "config": config, "batch": batch, "seq": seq,
                    "threads": tch::get_num_threads(), "device": device_name(device),
                    "median_s": median, "tokens_per_s": tokens / median,
                    "min_s": times[0], "max_s": times[times.len() - 1],
                })
            );
        }
    }
    Ok(())
}
