//! Generation (book ch05 §5.3, ch04 KV-cache bonus) and Hugging Face GPT-2 weights (§5.5).
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report
use crate::common::{self, greedy};

use anyhow::Result;
use llmlab::generate::{generate, sample_next, GenerateSpec};
use llmlab::models::{GptConfig, GptModel};
use llmlab::resolve::ModelSource;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn tiny_model(seed: i64, ctx: i64) -> (VarStore, GptModel) {
    tch::manual_seed(seed);
    let cfg = GptConfig {
        vocab_size: 61,
        context_length: ctx,
        ..common::tiny_gpt()
    };
    let vs = VarStore::new(Device::Cpu);
    let m = GptModel::new(&vs.root(), &cfg);
    (vs, m)
}

/// Greedy decoding with the KV cache gives exactly the tokens of the no-cache path and of the
/// book's generate_text_simple, also past the context length (where the window slides).
#[test]
fn kv_cache_decoding_matches_full_forward() -> Result<()> {
    let (_vs, m) = tiny_model(3, 16);
    let prompt = [5i64, 17, 3, 42, 8];
    for n in [1usize, 11, 40] {
        let cached = generate(&m, &prompt, &greedy(n, true))?.ids;
        let plain = generate(&m, &prompt, &greedy(n, false))?.ids;
        assert_eq!(cached, plain, "{n} tokens");
        let simple = llmlab::models::generate_text_simple(
            &m,
            &Tensor::from_slice(&prompt).view([1, -1]),
            n as i64,
            16,
        );
        let simple: Vec<i64> = Vec::try_from(simple.view([-1]))?;
        assert_eq!(&simple[prompt.len()..], cached.as_slice());
    }
    // The cached logits themselves equal the full forward's, position by position.
    let _g = tch::no_grad_guard();
    let ids = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, 7]).view([1, -1]);
    let full = m.forward_t(&ids, false);
    let mut cache = m.new_cache(1);
    let mut outs = vec![m.logits(&m.hidden_cached(&ids.narrow(1, 0, 3), Some(&mut cache), false))];
    for i in 3..7 {
        outs.push(m.logits(&m.hidden_cached(&ids.narrow(1, i, 1), Some(&mut cache), false)));
    }
    common::assert_close(&Tensor::cat(&outs, 1), &full, 1e-5, 1e-5, "cached logits")?;
    Ok(())
}

/// top-k 1 and a tiny top-p are greedy; a seed repeats a sample; top-k never leaves the k best.
#[test]
#[allow(clippy::approx_constant)] // 6.28 is the book's logit for "toward", not tau
fn sampling_respects_temperature_top_k_top_p_and_seed() -> Result<()> {
    let (_vs, m) = tiny_model(4, 32);
    let prompt = [1i64, 2, 3];
    let g = generate(&m, &prompt, &greedy(20, true))?.ids;
    let k1 = GenerateSpec {
        temperature: 1.5,
        top_k: Some(1),
        seed: Some(1),
        ..greedy(20, true)
    };
    assert_eq!(generate(&m, &prompt, &k1)?.ids, g);
    let p0 = GenerateSpec {
        temperature: 1.0,
        top_p: Some(1e-6),
        seed: Some(1),
        ..greedy(20, true)
    };
    assert_eq!(generate(&m, &prompt, &p0)?.ids, g);
    let hot = GenerateSpec {
        temperature: 2.0,
        seed: Some(9),
        ..greedy(30, true)
    };
    let a = generate(&m, &prompt, &hot)?.ids;
    assert_eq!(
        a,
        generate(&m, &prompt, &hot)?.ids,
        "same seed, same sample"
    );
    assert_ne!(a, g, "temperature 2 departs from greedy");
    assert_ne!(
        a,
        generate(
            &m,
            &prompt,
            &GenerateSpec {
                seed: Some(10),
                ..hot.clone()
            }
        )?
        .ids
    );

    // The book's §5.3 example: next-token logits over a 9-word vocabulary.
    let logits = Tensor::from_slice(&[4.51f32, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79])
        .view([1, 9]);
    tch::manual_seed(123);
    let mut counts = [0i64; 9];
    let spec = GenerateSpec {
        temperature: 1.0,
        top_k: Some(3),
        ..Default::default()
    };
    for _ in 0..2000 {
        counts[sample_next(&logits, &spec).int64_value(&[0, 0]) as usize] += 1;
    }
    assert!(
        counts
            .iter()
            .enumerate()
            .all(|(i, &c)| c == 0 || [0, 3, 7].contains(&i)),
        "{counts:?}"
    );
    assert!(
        counts[3] > counts[7] && counts[7] > counts[0] && counts[0] > 0,
        "{counts:?}"
    );
    // top-p 0.9 keeps "forward"(3) and "toward"(7) only: their mass is 0.57 + 0.36 >= 0.9.
    let spec = GenerateSpec {
        temperature: 1.0,
        top_p: Some(0.9),
        ..Default::default()
    };
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..500 {
        seen.insert(sample_next(&logits, &spec).int64_value(&[0, 0]));
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![3, 7]);
    assert_eq!(
        sample_next(&logits, &GenerateSpec::default()).int64_value(&[0, 0]),
        3
    );
    Ok(())
}

/// Generation stops at the end-of-text id and does not emit it.
#[test]
fn generation_stops_at_eos() -> Result<()> {
    let (_vs, m) = tiny_model(5, 32);
    let g = generate(&m, &[1, 2, 3], &greedy(10, true))?.ids;
    let eos = g[4];
    let first = g.iter().position(|&t| t == eos).unwrap();
    let spec = GenerateSpec {
        eos_id: Some(eos),
        ..greedy(10, true)
    };
    let out = generate(&m, &[1, 2, 3], &spec)?;
    assert!(out.stopped_at_eos);
    assert_eq!(out.ids, g[..first].to_vec());
    Ok(())
}

fn hf_fixture(tied: bool) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    common::Reference::script("gen_hf_gpt2.py")
        .output(dir.path())
        .args(["--tied", if tied { "1" } else { "0" }])
        .run()?;
    Ok(dir)
}

/// A tiny random GPT2LMHeadModel saved by transformers loads into the book's GPT: logits equal
/// transformers' (max abs diff < 1e-4) and the greedy continuation equals `model.generate`, token
/// for token, with and without the KV cache; tied and untied heads.
#[test]
fn hf_gpt2_matches_transformers() -> Result<()> {
    for tied in [true, false] {
        let dir = hf_fixture(tied)?;
        let io = common::read_tensors(&dir.path().join("io.safetensors"))?;
        let spec = format!("gpt2:{}", dir.path().join("model").display());
        let src = ModelSource::parse(&spec)?;
        let cfg = src.config()?;
        assert_eq!(
            (
                cfg.vocab_size,
                cfg.context_length,
                cfg.emb_dim,
                cfg.n_layers,
                cfg.tie_weights
            ),
            (211, 32, 48, 3, tied)
        );
        let (_vs, m) = src.load(Device::Cpu)?;
        let logits = tch::no_grad(|| m.forward_t(&io["ids"], false));
        common::assert_close(
            &logits,
            &io["logits"],
            1e-4,
            0.0,
            &format!("GPT-2 logits (tied {tied})"),
        )?;
        let gen: Vec<i64> = Vec::try_from(io["generated"].view([-1]))?;
        let prompt: Vec<i64> = Vec::try_from(io["ids"].get(0))?;
        for use_cache in [true, false] {
            let out = generate(&m, &prompt, &greedy(gen.len() - prompt.len(), use_cache))?.ids;
            assert_eq!(
                out,
                gen[prompt.len()..].to_vec(),
                "greedy continuation (cache {use_cache})"
            );
        }
    }
    Ok(())
}

/// A GPT-2 file with a tensor the book's model has no place for is rejected, naming it.
#[test]
fn hf_gpt2_with_unknown_tensor_is_rejected() -> Result<()> {
    let dir = hf_fixture(true)?;
    let path = dir.path().join("model/model.safetensors");
    let mut t: Vec<(String, Tensor)> = Tensor::read_safetensors(&path)?;
    t.push((
        "h.0.attn.rotary.weight".into(),
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
    ));
    Tensor::write_safetensors(&t, &path)?;
    let err = ModelSource::parse(&format!("gpt2:{}", dir.path().join("model").display()))?
        .load(Device::Cpu)
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("h.0.attn.rotary.weight"),
        "{err:#}"
    );
    Ok(())
}

/// `llmlab download` against a local stand-in for the hub: the announced sha256 is checked and
/// a mismatch keeps nothing.
#[test]
fn download_checks_the_announced_sha256() -> Result<()> {
    let body = b"not really safetensors".to_vec();
    let good = llmlab::data::registry::sha256_hex(&body);
    let b2 = body.clone();
    // Two rounds: config.json + weights with the right sha, then weights with a wrong one.
    let mut etags = [None, Some(good.clone()), None, Some("0".repeat(64))].into_iter();
    let server = common::HttpStub::serve_n(4, move |_| match etags.next().expect("4 answers") {
        None => common::Response::ok(b"{}".to_vec()),
        Some(e) => common::Response::ok(b2.clone()).header("X-Linked-Etag", &format!("\"{e}\"")),
    })?;
    let endpoint = server.url().to_string();
    let cache = tempfile::tempdir()?;
    let dir =
        llmlab::weights::hub::download_gpt2_with("gpt2-small", None, cache.path(), &endpoint)?;
    assert_eq!(std::fs::read(dir.join("model.safetensors"))?, body);
    let cache2 = tempfile::tempdir()?;
    let err =
        llmlab::weights::hub::download_gpt2_with("gpt2-small", None, cache2.path(), &endpoint)
            .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("/openai-community/gpt2/resolve/main/model.safetensors")
            && msg.contains(&"0".repeat(64)),
        "{msg}"
    );
    assert!(!cache2
        .path()
        .join("models/gpt2-small/model.safetensors")
        .exists());
    let leftovers = std::fs::read_dir(cache2.path().join("models/gpt2-small"))?.count();
    assert_eq!(leftovers, 1, "only config.json, no partial weights");
    server.join();
    let err = llmlab::weights::hub::download_gpt2_with("gpt2-huge", None, cache2.path(), &endpoint)
        .unwrap_err();
    assert!(format!("{err:#}").contains("gpt2-xl"));
    Ok(())
}

/// `llmlab generate --format json` prints prompt_ids, ids and text.
#[test]
fn generate_cli_prints_json() -> Result<()> {
    let dir = hf_fixture(true)?;
    // The tiny model's vocabulary is 211 tokens; its ids decode with the GPT-2 tokenizer.
    let model = format!("gpt2:{}", dir.path().join("model").display());
    let (code, out, err) = common::llmlab(&[
        "generate",
        "--model",
        &model,
        "--prompt",
        "!",
        "--max-new-tokens",
        "5",
        "--format",
        "json",
        "--device",
        "cpu",
    ])?;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["prompt_ids"], serde_json::json!([0]));
    assert_eq!(v["ids"].as_array().map(Vec::len), Some(5));
    assert!(v["text"].is_string());
    let (code, _, err) = common::llmlab(&[
        "generate", "--model", &model, "--prompt", "Hello", "--device", "cpu",
    ])?;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("token id 15496") && err.contains("vocabulary of 211"),
        "{err}"
    );
    let (code, _, err) =
        common::llmlab(&["generate", "--model", "no-such-model", "--prompt", "x"])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("gpt2:DIR"), "{err}");
    let (code, _, err) = common::llmlab(&[
        "generate", "--model", &model, "--prompt", "x", "--top-p", "1.5",
    ])?;
    assert_eq!(code, 2);
    assert!(err.contains("top_p = 1.5"), "{err}");
    Ok(())
}

/// One prompt builder for `generate` and `chat` (`llmlab::request`): plain text, the chat
/// template, an instruct run's prompt style (the book's `format_input` and response
/// extraction), and a chat with a single-turn Alpaca run; a model that can't is a typed error.
#[test]
fn prompt_modes_format_text_chats_and_instructions() -> Result<()> {
    use llmlab::chat::{ChatTemplate, Message};
    use llmlab::prompt::{format_input, Entry, PromptStyle};
    use llmlab::request::{build_prompt, Answer, Mode, PromptError};
    let mut lm = llmlab::resolve::LoadedLm::fresh_gpt("gpt-mini", Device::Cpu)?;
    let p = build_prompt(&lm, &Mode::Raw("Every effort"))?;
    assert_eq!((p.text.as_str(), p.stop_ids.len()), ("Every effort", 0));
    assert!(matches!(p.answer, Answer::Continuation));
    // A base model: an instruction is plain text, an input is refused, and it has no template.
    let instruction = |input| Mode::Instruction {
        instruction: "Rewrite.",
        input,
    };
    assert_eq!(build_prompt(&lm, &instruction(None))?.text, "Rewrite.");
    let err = build_prompt(&lm, &instruction(Some("It is fast."))).unwrap_err();
    assert_eq!(err, PromptError::NotInstructRun("gpt-mini".into()));
    let conv = [
        Message::new("user", "Old"),
        Message::new("assistant", "A"),
        Message::new("user", "Name a colour."),
    ];
    let template = |system| Mode::Template {
        system,
        messages: &conv[2..],
    };
    let err = build_prompt(&lm, &template(None)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "gpt-mini has no chat template llmlab knows (ChatML or Llama 3)"
    );
    // ChatML: the system message first, the generation prompt last; the generated text is the
    // answer (GPT-2's vocabulary has no <|im_end|> to stop at).
    lm.chat = Some(ChatTemplate::ChatMl {
        default_system: None,
    });
    let p = build_prompt(&lm, &template(Some("Be brief.")))?;
    assert_eq!(
        p.text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    );
    assert!(matches!(p.answer, Answer::Turn) && p.stop_ids.is_empty());
    assert_eq!(p.response(" Red "), " Red ");
    // An Alpaca instruct run: format_input, a stop at <|endoftext|>, the response extracted.
    lm.prompt_style = Some(PromptStyle::Alpaca);
    let p = build_prompt(&lm, &instruction(Some("It is fast.")))?;
    assert_eq!(
        p.text,
        format_input(&Entry::new("Rewrite.", "It is fast.", ""))
    );
    assert_eq!(p.stop_ids, vec![50256]);
    assert_eq!(
        p.response("\n\n### Response:\nIt is quick. "),
        "It is quick."
    );
    // `chat` with it answers the last message alone, after the response header; `--chat`
    // still renders the template.
    let chat = Mode::Conversation {
        system: Some("S"),
        messages: &conv,
    };
    let p = build_prompt(&lm, &chat)?;
    let alone = format_input(&Entry::new("Name a colour.", "", ""));
    assert_eq!(p.text, alone + "\n\n### Response:\n");
    assert_eq!(p.single_turn_style(), Some(PromptStyle::Alpaca));
    let p = build_prompt(&lm, &template(None))?;
    assert!(p.text.starts_with("<|im_start|>user\nName a colour."));
    assert_eq!(p.single_turn_style(), None);
    Ok(())
}
