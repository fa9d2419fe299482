//! Chapters 3–4: attention variants and the GPT model against the book's PyTorch code (ours, in
//! tests/reference/book_gpt.py) loaded with the same weights.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report
use crate::common;

use anyhow::Result;
use llmlab::models::{generate_text_simple, param_stats, GptConfig, GptModel};
use llmlab::nn::attention::*;
use llmlab::nn::layers::{gelu, gelu_explicit, LayerNorm};
use std::collections::BTreeMap;
use std::path::Path;
use tch::nn::{Module, VarStore};
use tch::{Device, Kind, Tensor};

fn fixture(cfg: &GptConfig, seq: i64) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let cfg_json = serde_json::to_string(&serde_json::json!({
        "vocab_size": cfg.vocab_size, "context_length": cfg.context_length, "emb_dim": cfg.emb_dim,
        "n_heads": cfg.n_heads, "n_layers": cfg.n_layers, "drop_rate": cfg.drop_rate, "qkv_bias": cfg.qkv_bias,
    }))?;
    let seq = seq.to_string();
    common::Reference::script("gen_gpt.py")
        .arg("--out")
        .output(dir.path())
        .args(["--config", &cfg_json, "--seq", &seq])
        .run()?;
    Ok(dir)
}

fn load_gpt(cfg: &GptConfig, dir: &Path) -> Result<(VarStore, GptModel)> {
    let vs = VarStore::new(Device::Cpu);
    let model = GptModel::new(&vs.root(), cfg);
    llmlab::weights::load_gpt_state_dict(&vs, &dir.join("weights.safetensors"))?;
    Ok((vs, model))
}

/// Our GptModel gives the reference GPTModel's logits (f32, max abs diff < 1e-4) for the same
/// weights, with the fused attention and with the book's explicit attention, and the same greedy
/// continuation (generate_text_simple).
fn check_gpt_parity(cfg: &GptConfig, seq: i64) -> Result<()> {
    let dir = fixture(cfg, seq)?;
    let io = common::read_tensors(&dir.path().join("io.safetensors"))?;
    let (_vs, mut model) = load_gpt(cfg, dir.path())?;
    let _g = tch::no_grad_guard();
    for imp in [AttentionImpl::Sdpa, AttentionImpl::Manual] {
        model.set_attention_impl(imp);
        let logits = model.forward_t(&io["in_idx"], false);
        common::assert_close(
            &logits,
            &io["logits"],
            1e-4,
            0.0,
            &format!("logits ({imp:?})"),
        )?;
    }
    model.set_attention_impl(AttentionImpl::Sdpa);
    let gen = generate_text_simple(&model, &io["in_idx"], 8, cfg.context_length);
    assert_eq!(
        Vec::<i64>::try_from(gen.view([-1]))?,
        Vec::<i64>::try_from(io["generated"].view([-1]))?
    );
    Ok(())
}

#[test]
fn gpt_tiny_logits_match_reference() -> Result<()> {
    check_gpt_parity(&common::tiny_gpt(), 7)?;
    check_gpt_parity(
        &GptConfig {
            qkv_bias: false,
            n_layers: 3,
            ..common::tiny_gpt()
        },
        16,
    )
}

#[test]
fn gpt2_small_shaped_logits_match_reference() -> Result<()> {
    check_gpt_parity(&GptConfig::preset("gpt2-small")?, 12)
}

/// Book §4.6: 163,009,536 parameters, 124,412,160 without the output head, 621.83 MB in f32;
/// with weight tying the model really has 124,412,160 parameters.
#[test]
fn parameter_counts_equal_the_books() -> Result<()> {
    let cfg = GptConfig::preset("gpt2-small")?;
    let vs = VarStore::new(Device::Cpu);
    let _m = GptModel::new(&vs.root(), &cfg);
    let st = param_stats(&vs);
    assert_eq!(st.total_params, 163_009_536);
    assert_eq!(st.params_without_out_head, 124_412_160);
    assert_eq!(format!("{:.2}", st.size_mb_f32), "621.83");
    let vs = VarStore::new(Device::Cpu);
    let _m = GptModel::new(
        &vs.root(),
        &GptConfig {
            tie_weights: true,
            ..cfg
        },
    );
    assert_eq!(param_stats(&vs).total_params, 124_412_160);
    // The book's exercise 4.2 numbers for the larger presets (with the output head).
    // The analytic count equals the real variables' count (with and without qkv bias, tied or
    // not), and gives the book's exercise 4.2 numbers for the larger presets.
    for c in [
        cfg.clone(),
        common::tiny_gpt(),
        GptConfig {
            tie_weights: true,
            ..common::tiny_gpt()
        },
    ] {
        let vs = VarStore::new(Device::Cpu);
        let _m = GptModel::new(&vs.root(), &c);
        assert_eq!(c.num_params(), param_stats(&vs).total_params, "{c:?}");
    }
    for (name, want) in [
        ("gpt2-medium", 406_212_608i64),
        ("gpt2-large", 838_220_800),
        ("gpt2-xl", 1_637_792_000),
    ] {
        assert_eq!(GptConfig::preset(name)?.num_params(), want, "{name}");
    }
    Ok(())
}

fn sub(t: &BTreeMap<String, Tensor>, prefix: &str) -> BTreeMap<String, Tensor> {
    t.iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(prefix)
                .map(|s| (s.to_string(), v.shallow_clone()))
        })
        .collect()
}

/// Every ch03 attention module equals the book's on the same weights, and the variants equal each
/// other: v1 with v2's transposed weights, the wrapper's heads vs one multi-head module, the
/// fused SDPA path vs the explicit one.
#[test]
fn attention_variants_match_reference_and_each_other() -> Result<()> {
    let dir = fixture(&common::tiny_gpt(), 4)?;
    let t = common::read_tensors(&dir.path().join("attention.safetensors"))?;
    let origin = dir.path().join("attention.safetensors");
    let x = &t["x"];
    let _g = tch::no_grad_guard();
    let (d_in, d_out, heads) = (6, 4, 2);

    let vs = VarStore::new(Device::Cpu);
    let sa1 = SelfAttentionV1::new(&vs.root(), d_in, d_out);
    llmlab::weights::load_into(&vs, &sub(&t, "sa1."), &origin, |_| false)?;
    common::assert_close(
        &sa1.forward(&x.get(0)),
        &t["sa1_out"],
        1e-6,
        1e-5,
        "SelfAttention_v1",
    )?;

    let vs = VarStore::new(Device::Cpu);
    let sa2 = SelfAttentionV2::new(&vs.root(), d_in, d_out, false);
    llmlab::weights::load_into(&vs, &sub(&t, "sa2."), &origin, |_| false)?;
    common::assert_close(
        &sa2.forward(&x.get(0)),
        &t["sa2_out"],
        1e-6,
        1e-5,
        "SelfAttention_v2",
    )?;
    // v1 with v2's weights transposed computes v2.
    let vs = VarStore::new(Device::Cpu);
    let v1 = SelfAttentionV1::new(&vs.root(), d_in, d_out);
    let w: BTreeMap<String, Tensor> = ["W_query", "W_key", "W_value"]
        .iter()
        .map(|n| (n.to_string(), t[&format!("sa2.{n}.weight")].tr()))
        .collect();
    llmlab::weights::load_into(&vs, &w, &origin, |_| false)?;
    common::assert_close(
        &v1.forward(&x.get(0)),
        &t["sa2_out"],
        1e-6,
        1e-5,
        "v1 with v2 weights",
    )?;

    let vs = VarStore::new(Device::Cpu);
    let ca = CausalAttention::new(&vs.root(), d_in, d_out, 0.0, true);
    llmlab::weights::load_into(&vs, &sub(&t, "ca."), &origin, |_| false)?;
    common::assert_close(
        &ca.forward_t(x, false),
        &t["ca_out"],
        1e-6,
        1e-5,
        "CausalAttention",
    )?;

    let vs = VarStore::new(Device::Cpu);
    let wrap = MultiHeadAttentionWrapper::new(&vs.root(), d_in, d_out, heads, 0.0, false);
    llmlab::weights::load_into(&vs, &sub(&t, "wrap."), &origin, |_| false)?;
    let wrap_out = wrap.forward_t(x, false);
    common::assert_close(
        &wrap_out,
        &t["wrap_out"],
        1e-6,
        1e-5,
        "MultiHeadAttentionWrapper",
    )?;

    let vs = VarStore::new(Device::Cpu);
    let mut mha = MultiHeadAttention::new(&vs.root(), d_in, d_out * heads, heads, 0.0, true);
    llmlab::weights::load_into(&vs, &sub(&t, "mha."), &origin, |_| false)?;
    for imp in [AttentionImpl::Sdpa, AttentionImpl::Manual] {
        mha.imp = imp;
        common::assert_close(
            &mha.forward_t(x, false),
            &t["mha_out"],
            1e-6,
            1e-5,
            &format!("MultiHeadAttention {imp:?}"),
        )?;
    }

    // The wrapper's heads stacked into one multi-head module (identity out_proj) give the same output.
    let vs = VarStore::new(Device::Cpu);
    let mut stacked = MultiHeadAttention::new(&vs.root(), d_in, d_out * heads, heads, 0.0, false);
    let mut w = BTreeMap::new();
    for n in ["W_query", "W_key", "W_value"] {
        let parts: Vec<Tensor> = (0..heads)
            .map(|h| t[&format!("wrap.heads.{h}.{n}.weight")].shallow_clone())
            .collect();
        w.insert(format!("{n}.weight"), Tensor::cat(&parts, 0));
    }
    w.insert(
        "out_proj.weight".into(),
        Tensor::eye(d_out * heads, (Kind::Float, Device::Cpu)),
    );
    w.insert(
        "out_proj.bias".into(),
        Tensor::zeros([d_out * heads], (Kind::Float, Device::Cpu)),
    );
    llmlab::weights::load_into(&vs, &w, &origin, |_| false)?;
    for imp in [AttentionImpl::Sdpa, AttentionImpl::Manual] {
        stacked.imp = imp;
        common::assert_close(
            &stacked.forward_t(x, false),
            &wrap_out,
            1e-6,
            1e-5,
            "wrapper vs multi-head",
        )?;
    }
    Ok(())
}

/// With dropout in training mode, SDPA and the explicit path keep the causal structure: the first
/// position's output depends only on the first token.
#[test]
fn attention_is_causal() -> Result<()> {
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let mha = MultiHeadAttention::new(&vs.root(), 8, 8, 2, 0.0, false);
    let x = Tensor::randn([1, 5, 8], (Kind::Float, Device::Cpu));
    let y = x.copy();
    let _ = y.narrow(1, 3, 2).fill_(7.0);
    let (a, b) = (mha.forward_t(&x, false), mha.forward_t(&y, false));
    common::assert_close(
        &a.narrow(1, 0, 3),
        &b.narrow(1, 0, 3),
        1e-6,
        0.0,
        "past positions unaffected by the future",
    )?;
    assert!(
        (a.narrow(1, 3, 2) - b.narrow(1, 3, 2))
            .abs()
            .max()
            .double_value(&[])
            > 1e-3
    );
    Ok(())
}

/// The fused layer norm and GELU compute the book's formulas.
#[test]
fn fused_layer_norm_and_gelu_equal_book_formulas() -> Result<()> {
    tch::manual_seed(1);
    let vs = VarStore::new(Device::Cpu);
    let ln = LayerNorm::new(&vs.root(), 16);
    tch::no_grad(|| {
        let _ = ln.scale.shallow_clone().uniform_(0.5, 1.5);
        let _ = ln.shift.shallow_clone().uniform_(-0.5, 0.5);
    });
    let x = Tensor::randn([3, 4, 16], (Kind::Float, Device::Cpu)) * 3.0;
    common::assert_close(
        &ln.forward(&x),
        &ln.forward_explicit(&x),
        1e-5,
        1e-5,
        "layer norm",
    )?;
    let out = ln.forward(&x);
    common::assert_close(
        &out.mean_dim(-1, false, Kind::Float),
        &ln.shift
            .mean_dim(-1, false, Kind::Float)
            .expand([3, 4], false),
        0.6,
        0.0,
        "mean",
    )?;
    let g = Tensor::linspace(-6.0, 6.0, 101, (Kind::Float, Device::Cpu));
    common::assert_close(&gelu(&g), &gelu_explicit(&g), 1e-6, 1e-5, "gelu")?;
    Ok(())
}

/// A checkpoint with a wrong shape or a missing tensor is a clear error naming the tensor.
#[test]
fn mismatched_weights_name_the_tensor() -> Result<()> {
    let dir = fixture(&common::tiny_gpt(), 4)?;
    let vs = VarStore::new(Device::Cpu);
    let _m = GptModel::new(
        &vs.root(),
        &GptConfig {
            emb_dim: 64,
            ..common::tiny_gpt()
        },
    );
    let err = llmlab::weights::load_gpt_state_dict(&vs, &dir.path().join("weights.safetensors"))
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("tok_emb.weight") && msg.contains("[97, 32]") && msg.contains("[97, 64]"),
        "{msg}"
    );
    let vs = VarStore::new(Device::Cpu);
    let _m = GptModel::new(
        &vs.root(),
        &GptConfig {
            n_layers: 3,
            ..common::tiny_gpt()
        },
    );
    let msg = format!(
        "{:#}",
        llmlab::weights::load_gpt_state_dict(&vs, &dir.path().join("weights.safetensors"))
            .unwrap_err()
    );
    assert!(
        msg.contains("missing tensor 'trf_blocks.2.att.W_query.weight'"),
        "{msg}"
    );
    let bad = dir.path().join("truncated.safetensors");
    let bytes = std::fs::read(dir.path().join("weights.safetensors"))?;
    std::fs::write(&bad, &bytes[..bytes.len() / 2])?;
    let msg = format!(
        "{:#}",
        llmlab::weights::load_gpt_state_dict(&vs, &bad).unwrap_err()
    );
    assert!(msg.contains("truncated.safetensors"), "{msg}");
    Ok(())
}

/// save then load round-trips every variable exactly.
#[test]
fn save_then_load_round_trips() -> Result<()> {
    let cfg = common::tiny_gpt();
    let vs = VarStore::new(Device::Cpu);
    let m = GptModel::new(&vs.root(), &cfg);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("m.safetensors");
    llmlab::weights::save_safetensors(&vs, &path)?;
    let vs2 = VarStore::new(Device::Cpu);
    let m2 = GptModel::new(&vs2.root(), &cfg);
    llmlab::weights::load_safetensors(&vs2, &path)?;
    let x = Tensor::from_slice(&[1i64, 2, 3, 4]).view([1, 4]);
    assert!(m.forward_t(&x, false).equal(&m2.forward_t(&x, false)));
    Ok(())
}

/// Fresh weights follow PyTorch's defaults, so runs train like the book's: Linear weights
/// uniform in ±1/√in_dim (std = bound/√3), embeddings N(0, 1), LayerNorm scale 1 and shift 0.
#[test]
fn fresh_weights_follow_pytorch_init() -> Result<()> {
    tch::manual_seed(0);
    let cfg = GptConfig {
        emb_dim: 256,
        n_heads: 4,
        n_layers: 1,
        vocab_size: 1000,
        ..common::tiny_gpt()
    };
    let vs = VarStore::new(Device::Cpu);
    let _m = GptModel::new(&vs.root(), &cfg);
    let v = vs.variables();
    for (name, fan_in) in [
        ("trf_blocks.0.att.W_query.weight", 256.0),
        ("trf_blocks.0.ff.layers.2.weight", 1024.0),
        ("out_head.weight", 256.0),
        ("trf_blocks.0.ff.layers.0.bias", 256.0),
    ] {
        let t = &v[name];
        let bound = 1.0 / f64::sqrt(fan_in);
        let max = t.abs().max().double_value(&[]);
        let std = t.std(false).double_value(&[]);
        assert!(
            max <= bound && max > 0.95 * bound,
            "{name}: max {max} vs bound {bound}"
        );
        if t.numel() > 10_000 {
            assert!(
                (std / (bound / 3f64.sqrt()) - 1.0).abs() < 0.05,
                "{name}: std {std}"
            );
        }
    }
    let emb_std = v["tok_emb.weight"].std(false).double_value(&[]);
    assert!((emb_std - 1.0).abs() < 0.02, "tok_emb std {emb_std}");
    assert_eq!(
        v["trf_blocks.0.norm1.scale"]
            .mean(Kind::Float)
            .double_value(&[]),
        1.0
    );
    Ok(())
}
