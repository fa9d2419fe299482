//! Weight-only 4-bit linear layers for inference (not in the book; llama.cpp's Q4_1 scheme run
//! by libtorch's int4 CPU kernel).
//!
//! A weight `W (out, in)` is cut into groups of `group` consecutive inputs; each group keeps a
//! scale `d = (max - min) / 15`, a minimum `m = min` and 4-bit codes `q = round((w - m) / d)` in
//! `0..=15`, so `w ≈ q d + m`: GGUF's Q4_1 formula (llama.cpp `quantize_row_q4_1_ref`). On weights
//! dequantized from a Q4_1 file (group 32) the min/max of every block are `m` and `15 d + m`, so
//! quantising them again gives the file's codes, scales and minima back.
//!
//! The matmul is `torch._weight_int4pack_mm_for_cpu`: codes packed two per byte
//! (`_convert_weight_to_int4pack_for_cpu`), a `(in / group, out, 2)` table of `(scale, zero)` in
//! the activations' dtype and `w = (q - 8) · scale + zero`; Q4_1 maps onto it with
//! `scale = d, zero = m + 8 d`. The kernel reads a quarter of bf16's bytes per weight (plus the
//! table) and is fast only with bf16 activations (with f32 ones it is ~10x slower than an f32
//! matmul on an AVX-512 EPYC), so [`Int4Linear::forward`] runs in bf16.
use crate::error::LlmError;
use crate::shim::Isa;
use tch::{Device, Kind, Tensor};

/// Group size of GGUF's Q4_0/Q4_1 blocks, and what `--dtype q4` uses.
pub const Q4_GROUP: i64 = 32;

/// Group sizes libtorch's int4 CPU kernel takes.
const KERNEL_GROUPS: [i64; 4] = [32, 64, 128, 256];

/// libtorch packs the output rows in tiles of 16.
const ROW_TILE: i64 = 16;

/// Asymmetric 4-bit quantisation of `w (out, in)` in groups of `group` consecutive inputs,
/// computed in f32. Returns the codes `q (out, in)` (int32, `0..=15`) and the per-group scale `d`
/// and minimum `m`, both `(out, in / group)` f32, with `w ≈ q d + m`. A constant group gets
/// `d = 0` and codes 0.
pub fn quantize_q4(w: &Tensor, group: i64) -> (Tensor, Tensor, Tensor) {
    let (n, k) = w.size2().expect("a 2-d weight (out, in)");
    assert!(
        group > 0 && k % group == 0,
        "in = {k} is not a multiple of the group size {group}"
    );
    let _g = tch::no_grad_guard();
    let g = w.to_kind(Kind::Float).reshape([n, k / group, group]); // (out, groups, group)
    let min = g.amin(-1, true); // (out, groups, 1)
    let max = g.amax(-1, true);
    let d = (&max - &min) / 15.0;
    let safe_d = d.where_scalarother(&d.gt(0.0), 1.0);
    let q = ((&g - &min) / safe_d)
        .round()
        .clamp(0.0, 15.0)
        .to_kind(Kind::Int)
        .reshape([n, k]);
    (q, d.squeeze_dim(-1), min.squeeze_dim(-1))
}

/// `q d + m` in f32 `(out, in)`: the weight [`quantize_q4`]'s output stands for.
pub fn dequantize_q4(q: &Tensor, d: &Tensor, m: &Tensor, group: i64) -> Tensor {
    let (n, k) = q.size2().expect("2-d codes (out, in)");
    let q = q.to_kind(Kind::Float).reshape([n, k / group, group]);
    (q * d.unsqueeze(-1) + m.unsqueeze(-1)).reshape([n, k])
}

/// Why libtorch's int4 CPU kernel cannot hold a weight with `in_dim` inputs in groups of
/// `group` on `device`, or `None` when it can (any `out_dim`: rows are padded to 16).
pub fn int4_unsupported(in_dim: i64, group: i64, device: Device) -> Option<String> {
    if device != Device::Cpu {
        return Some(format!(
            "4-bit weights run on the CPU only (libtorch's int4 CPU kernel), not on {device:?}"
        ));
    }
    if !KERNEL_GROUPS.contains(&group) {
        return Some(format!(
            "group size {group}: the int4 kernel takes 32, 64, 128 or 256"
        ));
    }
    if in_dim % group != 0 {
        return Some(format!(
            "a linear layer with {in_dim} inputs: not a multiple of the group size {group}"
        ));
    }
    None
}

/// `y = x Wᵀ` with `W (out, in)` held as 4-bit codes (see the module doc); no bias.
#[derive(Debug)]
pub struct Int4Linear {
    /// The codes in libtorch's CPU int4 layout: `(out_padded, in / 2)` uint8.
    packed: Tensor,
    /// `(in / group, out_padded, 2)` bf16: `scale = d`, `zero = m + 8 d` per group and row.
    scales_and_zeros: Tensor,
    pub in_dim: i64,
    pub out_dim: i64,
    pub group: i64,
}

impl Int4Linear {
    /// Quantises `w (out, in)` (any float dtype; the statistics are taken in f32) in groups of
    /// `group` inputs. Check [`int4_unsupported`] first: this panics where it says no.
    pub fn quantize(w: &Tensor, group: i64) -> Self {
        let (n, k) = w.size2().expect("a 2-d weight (out, in)");
        if let Some(why) = int4_unsupported(k, group, w.device()) {
            panic!("Int4Linear::quantize: {why}");
        }
        let _g = tch::no_grad_guard();
        let (q, d, m) = quantize_q4(w, group);
        // Zero rows up to a multiple of 16 (scale and zero 0: they multiply to 0, cut off after).
        let pad = (ROW_TILE - n % ROW_TILE) % ROW_TILE;
        let (q, d, m) = if pad == 0 {
            (q, d, m)
        } else {
            let rows = |t: &Tensor| {
                let z = Tensor::zeros([pad, t.size()[1]], (t.kind(), t.device()));
                Tensor::cat(&[t, &z], 0)
            };
            (rows(&q), rows(&d), rows(&m))
        };
        let zero = &m + &d * 8.0;
        let scales_and_zeros = Tensor::stack(&[&d, &zero], -1) // (out_padded, groups, 2)
            .transpose(0, 1)
            .contiguous()
            .to_kind(Kind::BFloat16); // (groups, out_padded, 2)
        Self {
            // CPU packing ignores inner_k_tiles (it is the CUDA layout's knob); 2 is valid.
            packed: q
                .contiguous()
                .internal_convert_weight_to_int4pack_for_cpu(2),
            scales_and_zeros,
            in_dim: k,
            out_dim: n,
            group,
        }
    }

    /// `x (..., in)` → `(..., out)` in bf16 (`x` is converted to bf16 first).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut shape = x.size();
        let x2 = x
            .to_kind(Kind::BFloat16)
            .reshape([-1, self.in_dim])
            .contiguous(); // (rows, in): the kernel takes 2-d contiguous input
        let y = x2.internal_weight_int4pack_mm_for_cpu(
            &self.packed,
            self.group,
            &self.scales_and_zeros,
        ); // (rows, out_padded)
        let y = if y.size()[1] == self.out_dim {
            y
        } else {
            y.narrow(1, 0, self.out_dim)
        };
        if let Some(last) = shape.last_mut() {
            *last = self.out_dim;
        }
        y.reshape(shape)
    }

    /// Bytes the layer reads per matmul (codes plus the scale/zero table).
    pub fn num_bytes(&self) -> i64 {
        self.packed.numel() as i64 + 2 * self.scales_and_zeros.numel() as i64
    }
}

/// Which kernel multiplies by quantized weights on the CPU ([`QuantKernel::select`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKernel {
    /// libtorch's int4 kernel ([`Int4Linear`], bf16 activations): any CPU, and the reference.
    Torch,
    /// llmlab's Q4_1/Q8_0 kernels in AVX2 (with FMA and F16C: x86-64 CPUs without AVX-512),
    /// the arithmetic of [`Self::Avx512`] in vectors of 8.
    Avx2,
    /// llmlab's AVX-512 Q4_1/Q8_0 kernels ([`Q41Linear`], [`Q80Linear`], f32 activations): the
    /// file's weights, exact arithmetic.
    Avx512,
    /// The same blocks interleaved 16 rows at a time and multiplied by 15-bit integer
    /// activations with AVX-512 VNNI ([`Q41Linear::interleaved`]): less than half the
    /// instructions of `avx512` for about 1e-4 relative error per product. Without VNNI, in AVX2
    /// (`vpmaddwd`: the same integer sums, the same blocks' products).
    Vnni,
    /// As [`Self::Vnni`] with 8-bit activations, llama.cpp's arithmetic (its Q8_1): half the
    /// instructions again, for about 1e-2 relative error per product. In AVX2 (`vpmaddubsw`) the
    /// Q8_0 head keeps 16-bit activations (8-bit weight codes would saturate its 16-bit pairs).
    Vnni8,
}

impl QuantKernel {
    /// The variable that overrides the choice: `auto` (default), `torch`, `avx2`, `avx512`,
    /// `vnni` or `vnni8`.
    pub const ENV: &'static str = "LLMLAB_Q4_KERNEL";

    /// Whether this CPU and build can run [`Self::Avx2`] (AVX2, FMA, F16C).
    pub fn avx2_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            crate::shim::q_kernels_built()
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Whether this CPU and build can run [`Self::Avx512`] (AVX-512 F/BW/VL/DQ, F16C, FMA).
    pub fn avx512_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            crate::shim::q_kernels_built()
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("f16c")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Whether this CPU and build can run [`Self::Vnni`] (the above and AVX-512 VNNI).
    pub fn vnni_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            Self::avx512_available() && std::arch::is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// [`Self::Vnni`] where the CPU has AVX-512 VNNI, else [`Self::Avx512`] where it has
    /// AVX-512, else [`Self::Vnni`] in AVX2 (twice `avx2`'s speed on a Zen 3), else
    /// [`Self::Torch`]; `LLMLAB_Q4_KERNEL` overrides (asking for a kernel the CPU cannot run is
    /// an error, as is an unknown value).
    pub fn select() -> Result<Self, LlmError> {
        let value = std::env::var(Self::ENV).unwrap_or_default();
        let kernel = match value.as_str() {
            "" | "auto" => {
                return Ok(if Self::vnni_available() {
                    Self::Vnni
                } else if Self::avx512_available() {
                    Self::Avx512
                } else if Self::avx2_available() {
                    Self::Vnni
                } else {
                    Self::Torch
                })
            }
            "torch" => Self::Torch,
            "avx2" => Self::Avx2,
            "avx512" => Self::Avx512,
            "vnni" => Self::Vnni,
            "vnni8" => Self::Vnni8,
            other => {
                return Err(LlmError::Usage(format!(
                    "{}={other:?}: expected auto, torch, avx2, avx512, vnni or vnni8",
                    Self::ENV
                )))
            }
        };
        if kernel.available() {
            return Ok(kernel);
        }
        let lacks = match kernel {
            Self::Avx2 => "AVX2, FMA or F16C",
            Self::Avx512 => "AVX-512 F/BW/VL/DQ",
            _ => "AVX-512 VNNI and AVX2",
        };
        Err(LlmError::Usage(format!(
            "{}={value}: this CPU (or build) lacks {lacks}; use auto or torch",
            Self::ENV
        )))
    }

    /// Whether this kernel can run here (see [`Self::select`]).
    pub fn available(self) -> bool {
        match self {
            Self::Torch => true,
            Self::Avx2 => Self::avx2_available(),
            Self::Avx512 => Self::avx512_available(),
            Self::Vnni | Self::Vnni8 => Self::vnni_available() || Self::avx2_available(),
        }
    }

    /// The bits the kernel keeps of each activation: 32 (f32) for `avx2` and `avx512`, 16 or 8
    /// for the VNNI kernels; `None` for `torch` (bf16 activations).
    pub fn act_bits(self) -> Option<u8> {
        match self {
            Self::Torch => None,
            Self::Avx2 | Self::Avx512 => Some(32),
            Self::Vnni => Some(16),
            Self::Vnni8 => Some(8),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Torch => "torch",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
            Self::Vnni => "vnni",
            Self::Vnni8 => "vnni8",
        }
    }

    /// The instruction set this kernel runs in on this CPU (its products, and the norms,
    /// attention and f32 products of the fused decoding step): the VNNI kernels in AVX-512
    /// where the CPU has VNNI, else in AVX2 (`vpmaddwd`, `vpmaddubsw`: the same integer sums); `None` for
    /// `torch`.
    pub fn isa(self) -> Option<Isa> {
        match self {
            Self::Torch => None,
            Self::Avx2 => Some(Isa::Avx2),
            Self::Avx512 => Some(Isa::Avx512),
            Self::Vnni | Self::Vnni8 if Self::vnni_available() => Some(Isa::Avx512),
            Self::Vnni | Self::Vnni8 => Some(Isa::Avx2),
        }
    }

    /// Whether this CPU and build run the shim's kernels of `isa`.
    pub fn isa_available(isa: Isa) -> bool {
        match isa {
            Isa::Avx512 => Self::avx512_available(),
            Isa::Avx2 => Self::avx2_available(),
        }
    }

    /// The kernel that multiplies GGUF-layout blocks by f32 activations on this CPU:
    /// [`Self::Avx512`] where it runs, else [`Self::Avx2`] (which the shim refuses on a CPU
    /// without it).
    pub fn f32_default() -> Self {
        if Self::avx512_available() {
            Self::Avx512
        } else {
            Self::Avx2
        }
    }
}

/// Above this many activation rows (a prompt, not decoding) a quantized layer dequantizes its
/// weight and runs libtorch's f32 GEMM, which beats the row kernels from there on.
pub const GEMM_ROWS: i64 = 64;

/// Codes of GGUF's 32-weight blocks (see the module doc: llama.cpp's Q4_1 and Q8_0).
const QK: i64 = 32;

/// `x (..., in)` → `(..., out)` in f32 through a layer llmlab's kernels run: up to
/// [`GEMM_ROWS`] rows (decoding) by its `kernel` (`x (rows, in)` contiguous f32 into `y (rows, out)`), more (a
/// prompt) by libtorch's GEMM on its `dequantize`d weight.
fn kernel_forward(
    x: &Tensor,
    (in_dim, out_dim): (i64, i64),
    dequantize: impl FnOnce() -> Tensor,
    kernel: impl FnOnce(&Tensor, &mut Tensor) -> Result<(), LlmError>,
) -> Tensor {
    let mut shape = x.size();
    if let Some(last) = shape.last_mut() {
        *last = out_dim;
    }
    let x2 = x.to_kind(Kind::Float).reshape([-1, in_dim]).contiguous();
    let rows = x2.size()[0];
    if rows > GEMM_ROWS {
        return x2.matmul(&dequantize().tr()).reshape(shape);
    }
    let mut y = Tensor::empty([rows, out_dim], (Kind::Float, Device::Cpu));
    kernel(&x2, &mut y).expect("a layer's own weights have the shapes the kernel checks");
    y.reshape(shape)
}

/// `vpdpbusd` instructions (64 products each) an activation row costs an `(out, in)` layer
/// interleaved for `act_bits` activations: two passes for 16 bits, one for 8; 0 for the f32
/// kernels (32 bits), which do not use them.
fn vnni_dots(out: i64, inputs: i64, act_bits: u8, isa: Isa) -> i64 {
    match (isa, act_bits) {
        (Isa::Avx2, _) => 0, // vpmaddwd / vpmaddubsw, no vpdpbusd
        (_, 16) => out * inputs / 32,
        (_, 8) => out * inputs / 64,
        _ => 0,
    }
}

/// How `kernel` runs a layer held in GGUF's layout: its instruction set, and the activation bits
/// to interleave the blocks for (`None`: f32 activations, GGUF's layout kept).
fn kernel_layout(kernel: QuantKernel, layer: &str) -> (Isa, Option<u8>) {
    match (kernel.isa(), kernel.act_bits()) {
        (Some(isa), Some(32)) => (isa, None),
        (Some(isa), bits) => (isa, bits),
        _ => panic!("for_kernel: {} has no {layer} layer", kernel.name()),
    }
}

/// Whether a layer whose activations have `from` bits (32: GGUF's layout) and `out` rows is
/// interleaved for `to`-bit activations (8 or 16): only from GGUF's layout, `out` a multiple of 16.
fn can_interleave(from: u8, to: u8, out: i64) -> bool {
    assert!(to == 8 || to == 16, "act_bits {to}: 8 or 16");
    from == 32 && out % 16 == 0
}

/// Uninitialised x16 tensors for an `(out, in)` weight: the codes `(out / 16, in / 32 ·
/// block_bytes)` uint8 and a per-lane f16 table `(out / 16, in / 32 · 16)`.
fn x16_empty(out: i64, inputs: i64, block_bytes: i64) -> (Tensor, Tensor) {
    let (g, nb) = (out / 16, inputs / QK);
    (
        Tensor::empty([g, nb * block_bytes], (Kind::Uint8, Device::Cpu)),
        Tensor::empty([g, nb * 16], (Kind::Half, Device::Cpu)),
    )
}

/// `y = x Wᵀ` with `W (out, in)` in GGUF's Q4_1 blocks as llama.cpp stores them (4-bit codes,
/// f16 scale and minimum per 32 inputs), run by llmlab's AVX-512 or AVX2 kernel in f32; no bias.
#[derive(Debug)]
pub struct Q41Linear {
    /// `(out, in / 2)` uint8: byte j of a block holds weight j (low nibble) and j + 16 (high);
    /// interleaved, `(out / 16, in / 32 · 256)` (see [`Self::interleaved`]).
    qs: Tensor,
    /// `(out, in / 32)` f16 scale `d` and minimum `m`: `w = q d + m`; interleaved `(out / 16,
    /// in / 32 · 16)`.
    d: Tensor,
    m: Tensor,
    /// Bits of the activations the blocks are multiplied by: 32 (f32) in GGUF's layout, 16 or 8
    /// in the shim's x16 layout ([`Self::interleaved`]).
    act_bits: u8,
    /// The instruction set the f32-activation kernels run in (GGUF's layout; the x16 layout is
    /// AVX-512 VNNI's).
    isa: Isa,
    pub in_dim: i64,
    pub out_dim: i64,
}

/// The instruction set of [`QuantKernel::f32_default`].
fn default_isa() -> Isa {
    QuantKernel::f32_default()
        .isa()
        .expect("an llmlab kernel has an instruction set")
}

impl Q41Linear {
    /// Quantises `w (out, in)` (`in` a multiple of 32) with [`quantize_q4`] in groups of 32;
    /// on weights dequantized from a Q4_1 file the blocks are the file's own.
    pub fn quantize(w: &Tensor) -> Self {
        let (n, k) = w.size2().expect("a 2-d weight (out, in)");
        let _g = tch::no_grad_guard();
        let (q, d, m) = quantize_q4(&w.to_device(Device::Cpu), QK);
        let q = q.view([n, k / QK, 2, 16]);
        let qs = (q.select(2, 0) + q.select(2, 1) * 16)
            .to_kind(Kind::Uint8)
            .reshape([n, k / 2]);
        Self {
            qs,
            d: d.to_kind(Kind::Half).contiguous(),
            m: m.to_kind(Kind::Half).contiguous(),
            act_bits: 32,
            isa: default_isa(),
            in_dim: k,
            out_dim: n,
        }
    }

    /// The layer as `kernel` runs it: `avx2` or `avx512` in GGUF's layout, `vnni` and `vnni8`
    /// interleaved ([`Self::interleaved`]). From GGUF's layout only.
    pub fn for_kernel(self, kernel: QuantKernel) -> Self {
        assert!(self.act_bits == 32, "for_kernel: from GGUF's layout");
        let (isa, bits) = kernel_layout(kernel, "Q4_1");
        let layer = Self { isa, ..self };
        match bits {
            Some(bits) => layer.interleaved(bits),
            None => layer,
        }
    }

    /// The kernel that runs the layer ([`Self::for_kernel`]).
    pub fn kernel(&self) -> QuantKernel {
        match (self.act_bits, self.isa) {
            (8, _) => QuantKernel::Vnni8,
            (16, _) => QuantKernel::Vnni,
            (_, Isa::Avx512) => QuantKernel::Avx512,
            (_, Isa::Avx2) => QuantKernel::Avx2,
        }
    }

    /// The same blocks interleaved 16 output rows at a time, multiplied from then on by
    /// activations quantized to `act_bits` (16 or 8) in the layer's instruction set: AVX-512
    /// VNNI or AVX2 ([`QuantKernel::Vnni`], [`QuantKernel::Vnni8`], [`Self::for_kernel`]; the
    /// shim refuses one the CPU lacks). The weight is unchanged (the
    /// repacking is lossless); a layer whose `out` is not a multiple of 16 stays as it is.
    pub fn interleaved(self, act_bits: u8) -> Self {
        if !can_interleave(self.act_bits, act_bits, self.out_dim) {
            return self;
        }
        let (mut qs16, mut d16) = x16_empty(self.out_dim, self.in_dim, 256);
        let mut m16 = d16.empty_like();
        crate::shim::x16_pack(
            4,
            (&self.qs, &self.d, Some(&self.m)),
            (&mut qs16, &mut d16, Some(&mut m16)),
        )
        .expect("Q41Linear's own blocks have the shapes the repacking checks");
        Self {
            qs: qs16,
            d: d16,
            m: m16,
            act_bits,
            ..self
        }
    }

    /// Bits of the activations the layer multiplies by: 32 (f32, GGUF's layout), 16 or 8
    /// ([`Self::interleaved`]).
    pub fn act_bits(&self) -> u8 {
        self.act_bits
    }

    fn x16(&self) -> crate::shim::X16<'_> {
        crate::shim::X16 {
            isa: self.isa,
            bits: 4,
            act_bits: self.act_bits.into(),
            qs16: &self.qs,
            d16: &self.d,
            m16: Some(&self.m),
        }
    }

    /// The weight the blocks stand for, `(out, in)` f32.
    pub fn dequantize(&self) -> Tensor {
        let mut w = Tensor::empty([self.out_dim, self.in_dim], (Kind::Float, Device::Cpu));
        if self.act_bits < 32 {
            crate::shim::x16_dequant(&self.x16(), &mut w)
        } else {
            crate::shim::q4_1_dequant(self.isa, &self.qs, &self.d, &self.m, &mut w)
        }
        .expect("Q41Linear's own blocks have the shapes the kernel checks");
        w
    }

    /// `x (..., in)` → `(..., out)` in f32.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        kernel_forward(
            x,
            (self.in_dim, self.out_dim),
            || self.dequantize(),
            |x, y| {
                if self.act_bits < 32 {
                    crate::shim::x16_mm(x, &self.x16(), y)
                } else {
                    crate::shim::q4_1_mm(self.isa, x, &self.qs, &self.d, &self.m, y)
                }
            },
        )
    }

    /// Bytes the layer reads per product (codes, scales and minima).
    pub fn num_bytes(&self) -> i64 {
        (self.qs.numel() + 2 * self.d.numel() + 2 * self.m.numel()) as i64
    }

    /// `vpdpbusd` instructions per activation row (0 unless interleaved for AVX-512 VNNI).
    pub fn vnni_dots(&self) -> i64 {
        vnni_dots(self.out_dim, self.in_dim, self.act_bits, self.isa)
    }

    /// The blocks, for the shim's fused kernels.
    pub(crate) fn decode_weight(&self) -> crate::shim::DecodeWeight<'_> {
        let blocks = [&self.qs, &self.d, &self.m];
        if self.act_bits < 32 {
            crate::shim::DecodeWeight::Q41x16 {
                blocks,
                act_bits: self.act_bits.into(),
            }
        } else {
            crate::shim::DecodeWeight::Q41(blocks)
        }
    }
}

/// `y = x Wᵀ` with `W (out, in)` in GGUF's Q8_0 blocks (int8 codes and an f16 scale per 32
/// inputs, `w = q d`, `d = max|w| / 127`), run by llmlab's AVX-512 or AVX2 kernel in f32: the tied
/// output head of a quantized model, as GGUF files store `token_embd`.
#[derive(Debug)]
pub struct Q80Linear {
    /// `(out, in)` int8.
    qs: Tensor,
    /// `(out, in / 32)` f16; interleaved (see [`Q41Linear::interleaved`]) `qs (out / 16, in / 32
    /// · 512)` uint8 holding `q + 128` and `d (out / 16, in / 32 · 16)`.
    d: Tensor,
    /// As [`Q41Linear`]'s: 32 in GGUF's layout, 16 or 8 interleaved.
    act_bits: u8,
    /// As [`Q41Linear`]'s.
    isa: Isa,
    pub in_dim: i64,
    pub out_dim: i64,
}

impl Q80Linear {
    /// Quantises `w (out, in)` (`in` a multiple of 32) in blocks of 32 (llama.cpp's
    /// `quantize_row_q8_0_ref`); on weights dequantized from a Q8_0 file the blocks are the file's.
    pub fn quantize(w: &Tensor) -> Self {
        let (n, k) = w.size2().expect("a 2-d weight (out, in)");
        assert!(k % QK == 0, "in = {k} is not a multiple of 32");
        let _g = tch::no_grad_guard();
        let g = w
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .reshape([n, k / QK, QK]);
        let d = g.abs().amax(-1, true) / 127.0;
        // The codes are taken against the scale as stored (f16), as llama.cpp's reference does
        // with its f32 `id = 1/d` before storing `d` in f16.
        let d = d.to_kind(Kind::Half).to_kind(Kind::Float);
        let safe = d.where_scalarother(&d.gt(0.0), 1.0);
        let qs = (&g / safe)
            .round()
            .clamp(-127.0, 127.0)
            .to_kind(Kind::Int8)
            .reshape([n, k]);
        Self {
            qs,
            d: d.squeeze_dim(-1).to_kind(Kind::Half).contiguous(),
            act_bits: 32,
            isa: default_isa(),
            in_dim: k,
            out_dim: n,
        }
    }

    /// The layer as `kernel` runs it, as [`Q41Linear::for_kernel`] (in AVX2 with 16-bit
    /// activations for both VNNI kernels: [`Self::interleaved`]).
    pub fn for_kernel(self, kernel: QuantKernel) -> Self {
        assert!(self.act_bits == 32, "for_kernel: from GGUF's layout");
        let (isa, bits) = kernel_layout(kernel, "Q8_0");
        let layer = Self { isa, ..self };
        match bits {
            Some(bits) => layer.interleaved(bits),
            None => layer,
        }
    }

    /// The blocks interleaved for `act_bits` activations, as [`Q41Linear::interleaved`]; in
    /// AVX2 always for 16-bit ones (the shim's AVX2 kernel multiplies 8-bit codes by 16-bit
    /// activations with `vpmaddwd`: `vpmaddubsw` would saturate on them).
    pub fn interleaved(self, act_bits: u8) -> Self {
        if !can_interleave(self.act_bits, act_bits, self.out_dim) {
            return self;
        }
        let act_bits = if self.isa == Isa::Avx2 { 16 } else { act_bits };
        let (mut qs16, mut d16) = x16_empty(self.out_dim, self.in_dim, 512);
        crate::shim::x16_pack(8, (&self.qs, &self.d, None), (&mut qs16, &mut d16, None))
            .expect("Q80Linear's own blocks have the shapes the repacking checks");
        Self {
            qs: qs16,
            d: d16,
            act_bits,
            ..self
        }
    }

    /// As [`Q41Linear::act_bits`] (16 where AVX2 interleaves it for 8).
    pub fn act_bits(&self) -> u8 {
        self.act_bits
    }

    fn x16(&self) -> crate::shim::X16<'_> {
        crate::shim::X16 {
            isa: self.isa,
            bits: 8,
            act_bits: self.act_bits.into(),
            qs16: &self.qs,
            d16: &self.d,
            m16: None,
        }
    }

    /// The weight the blocks stand for, `(out, in)` f32.
    pub fn dequantize(&self) -> Tensor {
        let mut w = Tensor::empty([self.out_dim, self.in_dim], (Kind::Float, Device::Cpu));
        if self.act_bits < 32 {
            crate::shim::x16_dequant(&self.x16(), &mut w)
        } else {
            crate::shim::q8_0_dequant(&self.qs, &self.d, &mut w)
        }
        .expect("Q80Linear's own blocks have the shapes the kernel checks");
        w
    }

    /// `x (..., in)` → `(..., out)` in f32.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        kernel_forward(
            x,
            (self.in_dim, self.out_dim),
            || self.dequantize(),
            |x, y| {
                if self.act_bits < 32 {
                    crate::shim::x16_mm(x, &self.x16(), y)
                } else {
                    crate::shim::q8_0_mm(self.isa, x, &self.qs, &self.d, y)
                }
            },
        )
    }

    /// Bytes the layer reads per product (codes and scales).
    pub fn num_bytes(&self) -> i64 {
        (self.qs.numel() + 2 * self.d.numel()) as i64
    }

    /// `vpdpbusd` instructions per activation row (0 unless interleaved for AVX-512 VNNI).
    pub fn vnni_dots(&self) -> i64 {
        vnni_dots(self.out_dim, self.in_dim, self.act_bits, self.isa)
    }
}

/// `x (..., in) · Wᵀ` for a dense f32 `W (out, in)` by llmlab's kernel of `isa` when it applies
/// (at most [`GEMM_ROWS`] rows, f32 CPU tensors, `in` a multiple of 16, the CPU has `isa`): decoding's
/// output head, where libtorch's matrix-vector product reads the 113 MB SmolLM2 head at about
/// 10 GB/s. `None` when it does not apply (use libtorch). No autograd: inference only.
pub fn f32_decode_matmul(x: &Tensor, w: &Tensor, isa: Isa) -> Option<Tensor> {
    let (n, k) = w.size2().ok()?;
    let rows = x.numel() as i64 / k.max(1);
    let applies = rows <= GEMM_ROWS
        && k % 16 == 0
        && x.kind() == Kind::Float
        && w.kind() == Kind::Float
        && x.device() == Device::Cpu
        && w.device() == Device::Cpu
        && w.is_contiguous()
        && QuantKernel::isa_available(isa);
    if !applies {
        return None;
    }
    Some(kernel_forward(
        x,
        (k, n),
        || w.shallow_clone(),
        |x, y| crate::shim::f32_mm(isa, x, w, y),
    ))
}
