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
