//! The binary as a user drives it: outputs, and bad input giving clear errors, non-zero exits and
//! never a panic.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report
use crate::common;

use anyhow::Result;

fn no_panic(stderr: &str) {
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
}

#[test]
fn tokenize_prints_ids_as_text_and_json() -> Result<()> {
    let (code, out, err) =
        common::llmlab(&["tokenize", "--text", "Hello, world. Is this-- a test?"])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "15496 11 995 13 1148 428 438 257 1332 30");
    let (code, out, _) =
        common::llmlab(&["tokenize", "--text", "Hi<|endoftext|>", "--format", "json"])?;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["ids"], serde_json::json!([17250, 50256]));
    Ok(())
}

#[test]
fn model_info_prints_the_books_numbers() -> Result<()> {
    let (code, out, err) = common::llmlab(&["model-info", "--config", "gpt2-small"])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("Total number of parameters: 163009536"),
        "{out}"
    );
    assert!(out.contains("considering weight tying: 124412160"), "{out}");
    assert!(out.contains("Total size of the model: 621.83 MB"), "{out}");
    Ok(())
}

#[test]
fn data_list_names_every_data_set() -> Result<()> {
    let (code, out, _) = common::llmlab(&["data", "list", "--format", "json"])?;
    assert_eq!(code, 0);
    let v: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    let names: Vec<&str> = v.iter().filter_map(|d| d["name"].as_str()).collect();
    for n in [
        "the-verdict",
        "sms-spam-collection",
        "instruction-data",
        "preference-data",
        "gpt2-bpe",
        "mmlu",
        "tinyshakespeare",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    let (code, out, _) = common::llmlab(&["data", "fetch", "the-verdict"])?;
    assert_eq!(code, 0);
    assert!(std::path::Path::new(out.trim())
        .join("the-verdict.txt")
        .is_file());
    Ok(())
}

#[test]
fn missing_file_is_a_clear_error() -> Result<()> {
    let (code, _, err) = common::llmlab(&["tokenize", "--file", "/nonexistent/story.txt"])?;
    assert_eq!(code, 1);
    assert!(
        err.contains("/nonexistent/story.txt") && err.contains("No such file"),
        "{err}"
    );
    no_panic(&err);
    Ok(())
}

#[test]
fn non_utf8_file_is_a_clear_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("latin1.txt");
    std::fs::write(&p, b"caf\xe9 au lait")?;
    let (code, _, err) = common::llmlab(&["tokenize", "--file", p.to_str().unwrap()])?;
    assert_eq!(code, 1);
    assert!(
        err.contains("latin1.txt") && err.contains("not valid UTF-8") && err.contains("offset 3"),
        "{err}"
    );
    no_panic(&err);
    // The readme of the SMS data set is Latin-1 too: the same clear error.
    let readme = common::mirror().join("sms-spam-collection/readme");
    let (code, _, err) = common::llmlab(&[
        "pretrain",
        "--data",
        readme.to_str().unwrap(),
        "--device",
        "cpu",
        "--out",
        dir.path().join("run").to_str().unwrap(),
    ])?;
    assert_eq!(code, 1);
    assert!(err.contains("not valid UTF-8"), "{err}");
    Ok(())
}

#[test]
fn text_shorter_than_one_window_is_a_clear_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("short.txt");
    std::fs::write(&p, "Every effort moves you.")?;
    let (code, _, err) = common::llmlab(&[
        "pretrain",
        "--data",
        p.to_str().unwrap(),
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--out",
        dir.path().join("run").to_str().unwrap(),
    ])?;
    assert_eq!(code, 1);
    assert!(err.contains("fewer than one window"), "{err}");
    no_panic(&err);
    Ok(())
}

#[test]
fn unknown_preset_and_bad_values_exit_with_2() -> Result<()> {
    let (code, _, err) = common::llmlab(&["model-info", "--config", "gpt5-huge"])?;
    assert_eq!(code, 2);
    assert!(
        err.contains("gpt5-huge") && err.contains("gpt2-small, gpt2-medium"),
        "{err}"
    );
    no_panic(&err);
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("bad.yaml");
    std::fs::write(&p, "vocab_size: 100\ncontext_length: 8\nemb_dim: 30\nn_heads: 4\nn_layers: 1\ndrop_rate: 0.0\nqkv_bias: false\n")?;
    let (code, _, err) = common::llmlab(&["model-info", "--config", p.to_str().unwrap()])?;
    assert_eq!(code, 2);
    assert!(
        err.contains("bad.yaml") && err.contains("emb_dim = 30 is not divisible by n_heads = 4"),
        "{err}"
    );
    std::fs::write(&p, "vocab_size: 100\nembed_dim: 32\n")?;
    let (code, _, err) = common::llmlab(&["model-info", "--config", p.to_str().unwrap()])?;
    assert_eq!(code, 2);
    assert!(
        err.contains("unknown field `embed_dim`") && err.contains("emb_dim"),
        "{err}"
    );
    let (code, _, err) = common::llmlab(&["pretrain", "--device", "tpu"])?;
    assert_eq!(code, 2);
    assert!(err.contains("'tpu'") && err.contains("cuda:N"), "{err}");
    let (code, _, err) = common::llmlab(&["data", "fetch", "wikitext"])?;
    assert_eq!(code, 2);
    assert!(
        err.contains("wikitext") && err.contains("the-verdict"),
        "{err}"
    );
    Ok(())
}

/// `make run`'s path: a few epochs of a small GPT on the-verdict lower the loss and print text.
#[test]
fn pretrain_lowers_the_loss_and_saves() -> Result<()> {
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
        "--eval-iter",
        "2",
        "--lr",
        "1e-3",
        "--sample-tokens",
        "5",
        "--device",
        "cpu",
        "--threads",
        "2",
        "--out",
        out.to_str().unwrap(),
    ])?;
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("Every effort moves you"), "{stdout}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    let losses: Vec<f64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .map(|v| v["train_loss"].as_f64().unwrap_or(f64::NAN))
        })
        .collect::<Result<_, _>>()?;
    assert!(losses.len() >= 3, "{metrics}");
    assert!(
        losses[0] > 9.0 && losses[0] < 12.0,
        "starts near ln(50257) = 10.8: {losses:?}"
    );
    assert!(
        *losses.last().unwrap() < losses[0] - 1.5,
        "loss falls: {losses:?}"
    );
    assert!(out.join("model.safetensors").is_file() && out.join("config.yaml").is_file());
    Ok(())
}
