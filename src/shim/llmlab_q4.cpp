// llmlab's CPU kernels for GGUF-quantized weights (issue 20): the matrix products
// `y = x · Wᵀ` of decoding with `W` held in ggml's Q4_1 and Q8_0 blocks, as llama.cpp holds them,
// for the few activation rows decoding has (one per sequence), where libtorch has no fast kernel
// (its int4 CPU kernel costs several times the bandwidth bound at batch 1 and has no 8-bit form).
//
// Blocks (ggml's `block_q4_1` / `block_q8_0`, split into arrays so each is one contiguous
// tensor): a weight row of `k` inputs is `k / 32` blocks of 32 consecutive weights.
//   Q4_1: `qs (n, k/2)` uint8, byte j of a block holding weight j (low nibble) and weight j + 16
//         (high nibble); `d`, `m` `(n, k/32)` f16; weight = q·d + m.
//   Q8_0: `qs (n, k)` int8; `d (n, k/32)` f16; weight = q·d.
// The products are computed in f32 (activations f32, weights expanded to f32 in registers, FMA),
// so they equal `x · dequant(W)ᵀ` up to the order of the sums: no activation quantization, unlike
// llama.cpp's Q8_1 dot products.
//
// The AVX-512 functions carry their own target attribute: the library builds for any x86-64 and
// the Rust side calls them only after checking the CPU (`is_x86_feature_detected!`), keeping
// libtorch's int4 path as the fallback. Dequantization (for prompts, where a GEMM on the
// dequantized weight wins) is plain C++.
//
// Conventions as llmlab_shim.cpp: tensor handles are `torch::Tensor*`; NULL or a malloc'd error.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <vector>
#include <cstdlib>
#include <cstring>
#include <exception>

#include "llmlab_protect.h"
#include <stdexcept>
#include <string>
#include <type_traits>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t QK = 32;  // weights per block

// Throws when `ok` is false; the message is only built then (the decode step checks its
// tensors 30 times a token).
#define EXPECT(ok, what)                                                                 \
  do {                                                                                   \
    if (!(ok)) throw std::invalid_argument(std::string("llmlab q4 kernel: ") + (what)); \
  } while (0)

void expect_tensor(const at::Tensor &t, at::ScalarType kind, int64_t rows, int64_t cols,
                   const std::string &name) {
  EXPECT(t.device().is_cpu(), std::string(name) + " is not on the CPU");
  EXPECT(t.scalar_type() == kind, std::string(name) + " has dtype " +
                                      std::string(c10::toString(t.scalar_type())) + ", expected " +
                                      std::string(c10::toString(kind)));
  EXPECT(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols,
         std::string(name) + " has shape " + c10::str(t.sizes()) + ", expected [" +
             std::to_string(rows) + ", " + std::to_string(cols) + "]");
  EXPECT(t.is_contiguous(), std::string(name) + " is not contiguous");
}

// The shapes every product checks: x (b, k) f32, y (b, n) f32, scales (n, k/32) f16.
struct Shapes {
  int64_t b, n, k, nb;
};

Shapes check_common(const at::Tensor &x, const at::Tensor &d, const at::Tensor &y, int64_t n) {
  EXPECT(x.dim() == 2, "x must be 2-d (rows, in), got " + c10::str(x.sizes()));
  const int64_t b = x.size(0), k = x.size(1);
  EXPECT(k % QK == 0, "in = " + std::to_string(k) + " is not a multiple of 32");
  expect_tensor(x, at::kFloat, b, k, "x");
  expect_tensor(d, at::kHalf, n, k / QK, "d");
  expect_tensor(y, at::kFloat, b, n, "y");
  return {b, n, k, k / QK};
}

inline float half_bits_to_float(uint16_t h) {
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

const uint16_t *half_bits(const at::Tensor &t) {
  return reinterpret_cast<const uint16_t *>(t.data_ptr<at::Half>());
}

// Output rows per task of the thread pool: enough work to pay for a hand-off.
constexpr int64_t GRAIN = 16;

// Runs f() on `threads` threads of the pool at once (a share of a counter's work each: see
// parallel_chunks and Phases), or once with one.
template <class F>
void on_threads(int64_t threads, const F &f) {
  if (threads <= 1)
    f();
  else
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { f(); });
}

// f(begin, end) over [0, n) in chunks of `chunk` that the pool's threads take in turn as they
// finish (an atomic counter), not in one static share each: on this VM one thread is often
// slower than the other, and a static split left the faster one waiting a third of the time.
// Each index is computed by one thread with the same arithmetic, so results do not depend on
// the schedule.
template <class F>
void parallel_chunks(int64_t n, int64_t chunk, const F &f) {
  const int64_t chunks = (n + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  on_threads(std::min<int64_t>(at::get_num_threads(), chunks), [&] {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;)
      f(c * chunk, std::min(n, (c + 1) * chunk));
  });
}

// The instruction sets the f32-activation kernels come in, as tags that pick an overload:
// every kernel below has an AVX-512 form and an AVX2 form (AVX2, FMA, F16C: the x86-64 CPUs
// of the last decade without AVX-512, where llama.cpp runs its AVX2 code), and the code that
// calls them (ranges of rows, the fused decode step) is a template over the tag.
struct Avx512 {
  static constexpr int code = 0;
};
struct Avx2 {
  static constexpr int code = 1;
};

#if defined(__x86_64__)
#define LLMLAB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))

// One weight row (`nb` blocks) against R activation rows (stride `ldx`): y[r * ldy] = x_r · w.
// Two accumulators per activation row (the two halves of a block) keep the FMA chains short;
// with one activation row, two blocks per step give four.
template <int R>
LLMLAB_AVX512 inline void q41_row(Avx512, const float *x, int64_t ldx, const uint8_t *qs,
                                  const uint16_t *d, const uint16_t *m, int64_t nb, float *y,
                                  int64_t ldy) {
  const __m128i low = _mm_set1_epi8(0x0F);
  constexpr int U = R == 1 ? 2 : 1;  // blocks per step
  __m512 acc[R][2 * U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < 2 * U; ++u) acc[r][u] = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + U <= nb; b += U) {
    for (int u = 0; u < U; ++u) {
      const int64_t bb = b + u;
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i *>(qs + bb * 16));
      const __m128i lo = _mm_and_si128(bytes, low);
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
      const __m512 dv = _mm512_set1_ps(_cvtsh_ss(d[bb]));
      const __m512 mv = _mm512_set1_ps(_cvtsh_ss(m[bb]));
      const __m512 w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), dv, mv);
      const __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), dv, mv);
      for (int r = 0; r < R; ++r) {
        const float *xr = x + r * ldx + bb * QK;
        acc[r][2 * u] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc[r][2 * u]);
        acc[r][2 * u + 1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc[r][2 * u + 1]);
      }
    }
  }
  for (; b < nb; ++b) {  // an odd last block when U = 2
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i *>(qs + b * 16));
    const __m128i lo = _mm_and_si128(bytes, low);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
    const __m512 dv = _mm512_set1_ps(_cvtsh_ss(d[b]));
    const __m512 mv = _mm512_set1_ps(_cvtsh_ss(m[b]));
    const __m512 w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), dv, mv);
    const __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), dv, mv);
    for (int r = 0; r < R; ++r) {
      const float *xr = x + r * ldx + b * QK;
      acc[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m512 s = _mm512_add_ps(acc[r][0], acc[r][1]);
    for (int u = 1; u < U; ++u)
      s = _mm512_add_ps(s, _mm512_add_ps(acc[r][2 * u], acc[r][2 * u + 1]));
    y[r * ldy] = _mm512_reduce_add_ps(s);
  }
}

// Q8_0: weight = q·d; one block of R activation rows into accumulator u.
template <int R, int U>
LLMLAB_AVX512 inline void q80_block(const float *x, int64_t ldx, const int8_t *qs,
                                    const uint16_t *d, int64_t bb, __m512 (&acc)[R][U], int u) {
  const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i *>(qs + bb * QK));
  const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i *>(qs + bb * QK + 16));
  const __m512 dv = _mm512_set1_ps(_cvtsh_ss(d[bb]));
  const __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)), dv);
  const __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c)), dv);
  for (int r = 0; r < R; ++r) {
    const float *xr = x + r * ldx + bb * QK;
    acc[r][u] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc[r][u]);
    acc[r][u] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc[r][u]);
  }
}

template <int R>
LLMLAB_AVX512 inline void q80_row(Avx512, const float *x, int64_t ldx, const int8_t *qs,
                                  const uint16_t *d, int64_t nb, float *y, int64_t ldy) {
  constexpr int U = R == 1 ? 2 : 1;  // blocks per step (independent accumulators)
  __m512 acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + U <= nb; b += U)
    for (int u = 0; u < U; ++u) q80_block<R, U>(x, ldx, qs, d, b + u, acc, u);
  for (; b < nb; ++b) q80_block<R, U>(x, ldx, qs, d, b, acc, 0);
  for (int r = 0; r < R; ++r) {
    __m512 s = acc[r][0];
    for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[r][u]);
    y[r * ldy] = _mm512_reduce_add_ps(s);
  }
}

// Blocks [begin, end) of a Q4_1 weight, dequantized into w (32 floats a block).
LLMLAB_AVX512 void q41_dequant_blocks(Avx512, const uint8_t *qs, const uint16_t *d, const uint16_t *m,
                                      int64_t begin, int64_t end, float *w) {
  const __m128i low = _mm_set1_epi8(0x0F);
  for (int64_t i = begin; i < end; ++i) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i *>(qs + i * 16));
    const __m512 dv = _mm512_set1_ps(_cvtsh_ss(d[i]));
    const __m512 mv = _mm512_set1_ps(_cvtsh_ss(m[i]));
    const __m128i lo = _mm_and_si128(bytes, low);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
    _mm512_storeu_ps(w + i * QK,
                     _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), dv, mv));
    _mm512_storeu_ps(w + i * QK + 16,
                     _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), dv, mv));
  }
}

// Calls f(j, r, R) for weight rows j in [begin, end) and groups of R <= 8 activation rows
// starting at r (R a std::integral_constant): activation rows in chunks of 32, so a prompt's
// chunk stays in L2 while every weight row passes over it, and within a chunk eight at a time
// (one weight row, at most 768 bytes here, stays in L1 while its groups reread it).
template <int R>
using Rows = std::integral_constant<int, R>;

template <typename F>
inline void for_row_groups(int64_t b, int64_t begin, int64_t end, F &&f) {
  constexpr int64_t CHUNK = 32;
  for (int64_t r0 = 0; r0 < b; r0 += CHUNK) {
    const int64_t r1 = std::min(b, r0 + CHUNK);
    for (int64_t j = begin; j < end; ++j) {
      int64_t r = r0;
      for (; r + 8 <= r1; r += 8) f(j, r, Rows<8>{});
      switch (r1 - r) {
        case 7: f(j, r, Rows<7>{}); break;
        case 6: f(j, r, Rows<6>{}); break;
        case 5: f(j, r, Rows<5>{}); break;
        case 4: f(j, r, Rows<4>{}); break;
        case 3: f(j, r, Rows<3>{}); break;
        case 2: f(j, r, Rows<2>{}); break;
        case 1: f(j, r, Rows<1>{}); break;
        default: break;
      }
    }
  }
}

// A Q4_1 weight's blocks as raw pointers (shapes checked by the caller).
struct Q41 {
  const uint8_t *qs;
  const uint16_t *d, *m;
  int64_t n;
};

// Output rows [begin, end) of y (rows, w.n) = x (rows, k) · Wᵀ.
template <class I>
void q41_range(const float *xp, int64_t rows, int64_t k, const Q41 &w, float *yp, int64_t begin,
               int64_t end) {
  const int64_t nb = k / QK, n = w.n;
  for_row_groups(rows, begin, end, [&](int64_t j, int64_t r, auto R) {
    q41_row<decltype(R)::value>(I{}, xp + r * k, k, w.qs + j * (k / 2), w.d + j * nb, w.m + j * nb,
                                nb, yp + r * n + j, n);
  });
}

// y (rows, w.n) = x (rows, k) · Wᵀ, output rows split over the thread pool.
template <class I>
void q41_mm(const float *xp, int64_t rows, int64_t k, const Q41 &w, float *yp) {
  at::parallel_for(0, w.n, GRAIN, [&](int64_t begin, int64_t end) {
    q41_range<I>(xp, rows, k, w, yp, begin, end);
  });
}

// y (rows, n) = x (rows, k) · Wᵀ with W in Q8_0 blocks (qs (n, k), d (n, k/32)).
template <class I>
void q80_mm(const float *xp, int64_t rows, int64_t k, const int8_t *qs, const uint16_t *d,
            int64_t n, float *yp) {
  const int64_t nb = k / QK;
  at::parallel_for(0, n, GRAIN, [&](int64_t begin, int64_t end) {
    for_row_groups(rows, begin, end, [&](int64_t j, int64_t r, auto R) {
      q80_row<decltype(R)::value>(I{}, xp + r * k, k, qs + j * k, d + j * nb, nb, yp + r * n + j, n);
    });
  });
}

// One f32 weight row (`k` floats, k a multiple of 16) against R activation rows.
template <int R>
LLMLAB_AVX512 inline void f32_row(Avx512, const float *x, int64_t ldx, const float *w, int64_t k, float *y,
                                  int64_t ldy) {
  constexpr int U = R == 1 ? 2 : 1;  // independent accumulators per activation row
  __m512 acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 * U <= k; i += 16 * U)
    for (int u = 0; u < U; ++u) {
      const __m512 wv = _mm512_loadu_ps(w + i + 16 * u);
      for (int r = 0; r < R; ++r)
        acc[r][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * ldx + i + 16 * u), acc[r][u]);
    }
  for (; i < k; i += 16) {
    const __m512 wv = _mm512_loadu_ps(w + i);
    for (int r = 0; r < R; ++r)
      acc[r][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * ldx + i), acc[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    __m512 s = acc[r][0];
    for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[r][u]);
    y[r * ldy] = _mm512_reduce_add_ps(s);
  }
}

// Output rows [begin, end) of y (rows, n) = x (rows, k) · Wᵀ, W dense f32 (n, k).
template <class I>
void f32_range(const float *xp, int64_t rows, int64_t k, const float *w, int64_t n, float *yp,
               int64_t begin, int64_t end) {
  for_row_groups(rows, begin, end, [&](int64_t j, int64_t r, auto R) {
    f32_row<decltype(R)::value>(I{}, xp + r * k, k, w + j * k, k, yp + r * n + j, n);
  });
}

// y (rows, n) = x (rows, k) · Wᵀ with a dense f32 W (n, k), k a multiple of 16.
template <class I>
void f32_mm(const float *xp, int64_t rows, int64_t k, const float *w, int64_t n, float *yp) {
  at::parallel_for(0, n, GRAIN, [&](int64_t begin, int64_t end) {
    f32_range<I>(xp, rows, k, w, n, yp, begin, end);
  });
}

// ---- Interleaved blocks and 8-bit activations (AVX-512 VNNI; llama.cpp's arithmetic) ----
//
// The "x16" layouts hold 16 weight rows side by side, so that one `vpdpbusd` multiplies four
// consecutive weights of each of 16 rows by the same four activation bytes and the 16 sums land
// in the 16 lanes of the output: no horizontal sums, and one instruction does 64 products.
//   Q4_1x16: `qs (n/16, nb·256)` uint8: for group g and block b, 4 vectors of 64 bytes; vector
//            t, lane j holds GGUF's bytes 4t..4t+3 of row 16g+j's block b (so its low nibbles are
//            weights 4t..4t+3 and its high nibbles weights 16+4t..16+4t+3);
//            `d`, `m (n/16, nb·16)` f16: lane j of block b is row 16g+j's scale and minimum.
//   Q8_0x16: `qs (n/16, nb·512)` uint8: 8 vectors of 64 bytes, vector t lane j holding row
//            16g+j's codes 4t..4t+3 plus 128 (vpdpbusd multiplies unsigned by signed bytes);
//            `d (n/16, nb·16)` f16. Its weight is (u - 128)·d: a Q4_1-like minimum of -128·d.
// The activations are quantized per row and block of 32, with `A` bits:
//   A = 8, llama.cpp's Q8_1: `da = max|x| / 127`, `qa = round(x / da)` (to nearest even);
//   A = 16: `da = max|x| / 16383` and `qa = 128·hi + lo` with `hi = qa >> 7` (-128..127) and
//   `lo = qa & 127`, both bytes, so one block costs two `vpdpbusd` passes (the first shifted left
//   by 7 in the int32 lanes, exactly) and the activations keep 15 bits: the error of a product is
//   about 1e-4 relative to its inputs' sizes, near f32's, where 8 bits cost about 1e-2.
// With `sa = da · Σ qa` the product is x · w ≈ Σ_b (d_b · da_b · Σ_i u_i qa_i + m_b · sa_b).
// The f32-activation kernels above stay the exact path (LLMLAB_Q4_KERNEL=avx512).
#define LLMLAB_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))

// Rows of `x (rows, k)` quantized per block of 32 (see above).
// Block-major: block b of row r at (b · rows + r), so that a kernel reads the same block of
// all its rows at fixed offsets from one pointer.
struct QAct {
  int64_t rows = 0;
  std::vector<int8_t> hi, lo;  // (k / 32, rows, 32); `lo` only for 16 bits (AVX-512)
  std::vector<int16_t> q16;    // (k / 32, rows, 32): the 16-bit codes whole (AVX2)
  std::vector<float> d, s;     // (k / 32, rows)

  // Room for `rows` rows of up to `k` inputs of `bits` (kept: growing only).
  void prepare(int64_t rows_, int64_t k, int bits) {
    rows = rows_;
    hi.resize(std::max<size_t>(hi.size(), rows * k));
    if (bits == 16) lo.resize(std::max<size_t>(lo.size(), rows * k));
    if (bits == 16) q16.resize(std::max<size_t>(q16.size(), rows * k));
    d.resize(std::max<size_t>(d.size(), rows * k / QK));
    s.resize(std::max<size_t>(s.size(), rows * k / QK));
  }
};

// Row r `x (k)` into `a` (prepared for it).
template <int A>
LLMLAB_VNNI void quantize_row(Avx512, const float *x, int64_t r, int64_t k, QAct &a) {
  constexpr float LEVELS = A == 8 ? 127.f : 16383.f;
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t blk = 0; blk < k / QK; ++blk) {
    const __m512 x0 = _mm512_loadu_ps(x + blk * QK), x1 = _mm512_loadu_ps(x + blk * QK + 16);
    const int64_t o = blk * a.rows + r;  // block-major
    const float amax = _mm512_reduce_max_ps(
        _mm512_max_ps(_mm512_and_ps(x0, sign), _mm512_and_ps(x1, sign)));
    const float id = amax > 0.f ? LEVELS / amax : 0.f;
    __m512i q[2];
    q[0] = _mm512_cvt_roundps_epi32(_mm512_mul_ps(x0, _mm512_set1_ps(id)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q[1] = _mm512_cvt_roundps_epi32(_mm512_mul_ps(x1, _mm512_set1_ps(id)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    for (int h = 0; h < 2; ++h) {
      __m128i *hi = reinterpret_cast<__m128i *>(a.hi.data() + o * QK + 16 * h);
      if constexpr (A == 8) {
        _mm_storeu_si128(hi, _mm512_cvtsepi32_epi8(q[h]));
      } else {
        _mm_storeu_si128(hi, _mm512_cvtsepi32_epi8(_mm512_srai_epi32(q[h], 7)));
        _mm_storeu_si128(reinterpret_cast<__m128i *>(a.lo.data() + o * QK + 16 * h),
                         _mm512_cvtsepi32_epi8(_mm512_and_si512(q[h], _mm512_set1_epi32(127))));
      }
    }
    a.d[o] = amax / LEVELS;
    a.s[o] = a.d[o] * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q[0], q[1])));
  }
}

// Row r with the activation bits chosen at run time (8 or 16).
template <class I>
void quantize_row_bits(int bits, const float *x, int64_t r, int64_t k, QAct &a) {
  if (bits == 8)
    quantize_row<8>(I{}, x, r, k, a);
  else
    quantize_row<16>(I{}, x, r, k, a);
}

// acc += w (u8) · the 4 bytes at `p` (s8) broadcast to the 16 lanes, as one instruction with
// an embedded broadcast operand at a fixed offset from the block's pointer (compilers emit a
// separate vpbroadcastd, one more instruction per product).
LLMLAB_VNNI inline __m512i dpbusd_bcst(__m512i acc, __m512i w, const int8_t *p) {
  asm("vpdpbusd %2%{1to16%}, %1, %0"
      : "+v"(acc)
      : "v"(w), "m"(*reinterpret_cast<const int32_t *>(p)));
  return acc;
}

// One group of 16 weight rows (BITS 4: Q4_1x16, 8: Q8_0x16) against R activation rows of A
// bits: y[r * ldy + j] for j < 16. `qs`, `d`, `m` point at the group's first block.
template <int BITS, int A, int R>
LLMLAB_VNNI inline void x16_group(Avx512, const QAct &a, int64_t r0, int64_t k, const uint8_t *qs,
                                  const uint16_t *d, const uint16_t *m, float *y, int64_t ldy) {
  const int64_t nb = k / QK;
  constexpr int64_t BLOCK_BYTES = BITS == 4 ? 256 : 512;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t *blk = qs + b * BLOCK_BYTES;
    __m512i w[8];
    if constexpr (BITS == 4) {
      for (int t = 0; t < 4; ++t) {
        const __m512i v = _mm512_loadu_si512(blk + 64 * t);
        w[t] = _mm512_and_si512(v, low);
        w[t + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
    } else {
      for (int t = 0; t < 8; ++t) w[t] = _mm512_loadu_si512(blk + 64 * t);
    }
    const __m512 dv =
        _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(d + b * 16)));
    const __m512 mv =
        BITS == 4
            ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(m + b * 16)))
            : _mm512_mul_ps(dv, _mm512_set1_ps(-128.f));
    // The R rows' sums side by side (R independent dependency chains), 4 bytes of each row's
    // block broadcast to the 16 lanes per step.
    __m512i sum[R];
    for (int r = 0; r < R; ++r) sum[r] = _mm512_setzero_si512();
    const int64_t at = b * a.rows + r0;  // row r0 + r's block b: at + r (block-major)
    const int8_t *hi = a.hi.data() + at * QK;
    for (int t = 0; t < 8; ++t)
      for (int r = 0; r < R; ++r) sum[r] = dpbusd_bcst(sum[r], w[t], hi + r * QK + 4 * t);
    if constexpr (A == 16) {
      const int8_t *lo = a.lo.data() + at * QK;
      for (int r = 0; r < R; ++r) sum[r] = _mm512_slli_epi32(sum[r], 7);
      for (int t = 0; t < 8; ++t)
        for (int r = 0; r < R; ++r) sum[r] = dpbusd_bcst(sum[r], w[t], lo + r * QK + 4 * t);
    }
    for (int r = 0; r < R; ++r) {
      const int64_t i = at + r;
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r]),
                               _mm512_mul_ps(dv, _mm512_set1_ps(a.d[i])), acc[r]);
      acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(a.s[i]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * ldy, acc[r]);
}

// Groups [begin, end) of 16 output rows of y (rows, n) = a · Wᵀ (W in an x16 layout, BITS 4
// or 8 (AVX2: 4); `a` the quantized activations): activation rows 8 at a time (AVX2: 4, its 16
// registers).
template <class I, int BITS, int A>
void x16_groups(const QAct &a, int64_t rows, int64_t k, const uint8_t *qs, const uint16_t *d,
                const uint16_t *m, int64_t n, float *yp, int64_t begin, int64_t end) {
  const int64_t nb = k / QK, block_bytes = BITS == 4 ? 256 : 512;
  for (int64_t g = begin; g < end; ++g) {
    const uint8_t *q = qs + g * nb * block_bytes;
    const uint16_t *dg = d + g * nb * 16, *mg = m ? m + g * nb * 16 : nullptr;
    float *yg = yp + g * 16;
    constexpr int RMAX = std::is_same_v<I, Avx2> ? 4 : 8;
    int64_t r = 0;
    for (; r + RMAX <= rows; r += RMAX)
      x16_group<BITS, A, RMAX>(I{}, a, r, k, q, dg, mg, yg + r * n, n);
    switch (rows - r) {
      case 7: x16_group<BITS, A, 7>(I{}, a, r, k, q, dg, mg, yg + r * n, n); break;
      case 6: x16_group<BITS, A, 6>(I{}, a, r, k, q, dg, mg, yg + r * n, n); break;
      case 5: x16_group<BITS, A, 5>(I{}, a, r, k, q, dg, mg, yg + r * n, n); break;
      case 4: x16_group<BITS, A, 4>(I{}, a, r, k, q, dg, mg, yg + r * n, n); break;
      case 3: x16_group<BITS, A, 3>(I{}, a, r, k, q, dg, mg, yg + r * n, n); break;
      case 2: x16_group<BITS, A, 2>(I{}, a, r, k, q, dg, mg, yg + r * n, n); break;
      case 1: x16_group<BITS, A, 1>(I{}, a, r, k, q, dg, mg, yg + r * n, n); break;
      default: break;
    }
  }
}

// y (rows, n) = x (rows, k) · Wᵀ with W in an x16 layout (BITS 4 or 8; n a multiple of 16) and
// A-bit activations.
template <class I, int BITS, int A>
void x16_mm(const float *xp, int64_t rows, int64_t k, const uint8_t *qs, const uint16_t *d,
            const uint16_t *m, int64_t n, float *yp) {
  const int64_t groups = n / 16;
  // Kept between calls (prepare only grows it). A local reference, so that the workers
  // of parallel_for read this thread's instance, not their own.
  static thread_local QAct kept;
  QAct &a = kept;
  a.prepare(rows, k, A);
  for (int64_t r = 0; r < rows; ++r) quantize_row<A>(I{}, xp + r * k, r, k, a);
  // Chunks of 64 rows for a step's few activation rows, 16 for a prompt's many, and at most
  // ~16 chunks a thread (the output head has 3,072 groups: fewer trips to the shared counter).
  const int64_t chunk = std::max<int64_t>(rows > 8 ? 1 : 4, groups / (16 * at::get_num_threads()));
  parallel_chunks(groups, chunk, [&](int64_t begin, int64_t end) {
    x16_groups<I, BITS, A>(a, rows, k, qs, d, m, n, yp, begin, end);
  });
}

// 12 independent chains of `reps` vpdpbusd each (their sum, so that none is dropped).
LLMLAB_VNNI int vnni_chains(int64_t reps) {
  const __m512i w = _mm512_set1_epi8(3), x = _mm512_set1_epi8(1);
  __m512i acc[12];
  for (auto &a : acc) a = _mm512_setzero_si512();
  for (int64_t i = 0; i < reps; ++i)
    for (auto &a : acc) {
      a = _mm512_dpbusd_epi32(a, w, x);
      asm volatile("" : "+v"(a));  // keeps every instruction
    }
  __m512i s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_epi32(s, acc[i]);
  return _mm512_reduce_add_epi32(s);
}

// vpdpbusd instructions a second on every thread of the pool together, `vnni_chains` each:
// the arithmetic ceiling of the x16 kernels (a batch-8 step is compute-bound where a batch-1
// step is memory-bound).
double vnni_peak(int64_t reps) {
  std::atomic<int64_t> sink{0};
  const int64_t threads = at::get_num_threads();
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) sink += vnni_chains(reps);
  });
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return sink.load() == 0 ? 0.0 : 12.0 * static_cast<double>(reps * threads) / secs;
}

// x16_mm with the activation bits chosen at run time (8 or 16).
template <class I, int BITS>
void x16_mm_act(int act_bits, const float *xp, int64_t rows, int64_t k, const uint8_t *qs,
                const uint16_t *d, const uint16_t *m, int64_t n, float *yp) {
  if (act_bits == 16) return x16_mm<I, BITS, 16>(xp, rows, k, qs, d, m, n, yp);
  if constexpr (std::is_same_v<I, Avx2> && BITS == 8)
    EXPECT(false, "the AVX2 x16 kernel takes Q8_0x16 blocks with 16-bit activations only");
  else
    x16_mm<I, BITS, 8>(xp, rows, k, qs, d, m, n, yp);
}

// A projection of the fused decode step: Q4_1 blocks or a dense f32 matrix (n rows).
struct Mat {
  bool dense = false;
  int x16_act = 0;  // Q4_1x16 blocks with activations of 8 or 16 bits; 0: not x16
  const float *f = nullptr;
  const uint8_t *qs = nullptr;
  const uint16_t *d = nullptr, *m = nullptr;
  int64_t n = 0;
};

// A decoding step's product y (rows, w.n) = x (rows, k) · Wᵀ as items for its phase's threads
// (`Phases`): output rows in chunks of GRAIN, or groups of 16 rows for the x16 layouts. The x16
// kernels read `qa`, x quantized beforehand.
template <class I>
struct MatJob {
  const Mat &w;
  const float *x;
  const QAct &qa;
  int64_t rows, k;
  float *y;
  int64_t threads;  // the region's

  // x16: 4 groups an item (at batch 1 a group is ~0.2 µs of weights: smaller items cost
  // batch 1 ~6 % in trips to the shared counter), fewer when that leaves under 2 items a thread.
  int64_t chunk() const {
    return w.x16_act ? std::clamp<int64_t>(w.n / 16 / (2 * threads), 1, 4) : GRAIN;
  }
  int64_t items() const { return ((w.x16_act ? w.n / 16 : w.n) + chunk() - 1) / chunk(); }
  void run(int64_t item) const {
    const int64_t begin = item * chunk();
    if (w.x16_act) {
      const int64_t end = std::min(w.n / 16, begin + chunk());
      if (w.x16_act == 8)
        x16_groups<I, 4, 8>(qa, rows, k, w.qs, w.d, w.m, w.n, y, begin, end);
      else
        x16_groups<I, 4, 16>(qa, rows, k, w.qs, w.d, w.m, w.n, y, begin, end);
    } else if (w.dense) {
      f32_range<I>(x, rows, k, w.f, w.n, y, begin, std::min(w.n, begin + chunk()));
    } else {
      q41_range<I>(x, rows, k, Q41{w.qs, w.d, w.m, w.n}, y, begin, std::min(w.n, begin + chunk()));
    }
  }
};

// Work split into phases that the pool's threads run in one parallel region: a thread takes a
// phase's items from a shared counter, and one that finds none left waits until all of them
// are done (a second counter) before it goes on. No thread count is needed: one participant (a
// pool of one, a nested call) runs every item in order. A decoding step is ten phases a block;
// a parallel region for each (OpenMP's fork and join, and the serial work between them) left
// the second thread idle a fifth of a batch-8 step.
class Phases {
 public:
  explicit Phases(int64_t n) : c_(n) {}

  // Runs f(i) for the items i < n of phase p that this thread takes, then waits for the rest.
  template <class F>
  void run(int64_t p, int64_t n, const F &f) {
    Counter &c = c_[p];
    int64_t mine = 0;
    for (int64_t i; (i = c.next.fetch_add(1, std::memory_order_relaxed)) < n; ++mine) f(i);
    // Counted once a thread: fewer writes to the line the waiting threads read.
    if (mine) c.done.fetch_add(mine, std::memory_order_release);
    // Spin briefly (another thread's item is microseconds), then yield: when the threads
    // outnumber free cores, the one awaited may need this core.
    for (int spins = 0; c.done.load(std::memory_order_acquire) < n; ++spins)
      if (spins < 2000)
        _mm_pause();
      else
        std::this_thread::yield();
  }

 private:
  struct Counter {  // on separate cache lines: the waiting threads read `done`
    alignas(64) std::atomic<int64_t> next{0};
    alignas(64) std::atomic<int64_t> done{0};
  };
  std::vector<Counter> c_;
};

// out (rows, d) = x · rsqrt(mean(x²) + eps) · w, as libtorch's rms_norm in f32.
LLMLAB_AVX512 void rms_norm_rows(Avx512, const float *x, int64_t rows, int64_t d, const float *w,
                                 double eps, float *out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * d;
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) {
      const __m512 v = _mm512_loadu_ps(xr + i);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    float ss = _mm512_reduce_add_ps(acc);
    for (; i < d; ++i) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + static_cast<float>(eps));
    for (i = 0; i < d; ++i) out[r * d + i] = xr[i] * inv * w[i];
  }
}

// a · b over n floats, and y += alpha · x: the attention's inner loops (the compiler does not
// vectorize a float sum without reassociating it).
LLMLAB_AVX512 float dot_f32(Avx512, const float *a, const float *b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  float s = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

LLMLAB_AVX512 void axpy_f32(Avx512, float alpha, const float *x, float *y, int64_t n) {
  const __m512 av = _mm512_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// Rotates one head `v (hd)` in place (Hugging Face's rotate-half layout): the first half
// becomes x1·cos - x2·sin, the second x2·cos + x1·sin.
void rope_head(float *v, int64_t hd, const float *cos, const float *sin) {
  const int64_t h2 = hd / 2;
  for (int64_t i = 0; i < h2; ++i) {
    const float a = v[i], b = v[i + h2];
    v[i] = a * cos[i] - b * sin[i];
    v[i + h2] = b * cos[i + h2] + a * sin[i + h2];
  }
}

// ---- Attention of one new token over the cache (the decode step's) ----
//
// e^x (Cephes' expf: 2^n · e^r with r = x − n·ln 2 in two parts and a degree-6 polynomial;
// within 1 ulp of the exact value on [-87, 88], checked against double `exp` on every 7th
// float there; e^-87.3 below, inf above 88.7).
LLMLAB_AVX512 inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y =
      _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(y, n);
}

// x[i] = e^(x[i] − max x) over n floats; returns their sum, and the max in `mx`.
LLMLAB_AVX512 float softmax_numerators(float *x, int64_t n, float &mx) {
  __m512 mv = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    mv = _mm512_mask_max_ps(mv, k, mv, _mm512_maskz_loadu_ps(k, x + i));
  }
  mx = _mm512_reduce_max_ps(mv);
  const __m512 m = _mm512_set1_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), m));
    _mm512_mask_storeu_ps(x + i, k, e);
    sum = _mm512_mask_add_ps(sum, k, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// The lane sums of 16 vectors as one: lane i = Σ v[i] (45 instructions, against ~9 for each
// horizontal sum alone).
LLMLAB_AVX512 inline __m512 sum16(const __m512 *v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // 128-bit lane l: v2i and v2i+1's two partial sums each
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // lane l: v4i..v4i+3 summed over lane l's four floats
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // lanes (0+1, 2+3) of b2i, then of b2i+1
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// 16 cached floats from an f32 cache, or from an f16 one (`uint16_t` bits).
LLMLAB_AVX512 inline __m512 load16(const float *p) { return _mm512_loadu_ps(p); }
LLMLAB_AVX512 inline __m512 load16(const uint16_t *p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)));
}

// NQ query heads `q (NQ, 16·C)` that share one key/value head attend over its `n` cached
// keys and values `(n, 16·C)` (f32 or f16): out (NQ, 16·C) = softmax(q·kᵀ·scale) · v. Every
// key and value is loaded once for the NQ heads, the heads' queries and outputs stay in
// registers, and the exponentials are vectorized. `sc` holds NQ·n floats. With `ml` (not
// NULL), head h's softmax max and sum go to ml[2h] and ml[2h + 1], for the fused step to
// combine slices of the keys.
template <int C, int NQ, class KV>
LLMLAB_AVX512 void attend(const float *q, const KV *keys, const KV *vals, int64_t n,
                          float scale, float *out, float *sc, float *ml) {
  constexpr int64_t HD = 16 * C;
  __m512 qv[NQ][C];
  for (int h = 0; h < NQ; ++h)
    for (int c = 0; c < C; ++c) qv[h][c] = _mm512_loadu_ps(q + h * HD + 16 * c);
  // Scores 16 keys at a time: 16 lane-wise products per head, then one transposing sum.
  for (int64_t t0 = 0; t0 < n; t0 += 16) {
    const int64_t m = std::min<int64_t>(16, n - t0);
    for (int h = 0; h < NQ; ++h) {
      __m512 acc[16];
      for (int u = 0; u < 16; ++u) {
        if (u >= m) {
          acc[u] = _mm512_setzero_ps();
          continue;
        }
        const KV *key = keys + (t0 + u) * HD;
        acc[u] = _mm512_mul_ps(qv[h][0], load16(key));
        for (int c = 1; c < C; ++c)
          acc[u] = _mm512_fmadd_ps(qv[h][c], load16(key + 16 * c), acc[u]);
      }
      _mm512_mask_storeu_ps(sc + h * n + t0, static_cast<__mmask16>((1u << m) - 1),
                            _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale)));
    }
  }
  float inv[NQ];
  for (int h = 0; h < NQ; ++h) {
    float mx;
    const float total = softmax_numerators(sc + h * n, n, mx);
    inv[h] = 1.f / total;
    if (ml) ml[2 * h] = mx, ml[2 * h + 1] = total;
  }
  __m512 acc[NQ][C];
  for (int h = 0; h < NQ; ++h)
    for (int c = 0; c < C; ++c) acc[h][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    __m512 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = load16(vals + t * HD + 16 * c);
    for (int h = 0; h < NQ; ++h) {
      const __m512 p = _mm512_set1_ps(sc[h * n + t]);
      for (int c = 0; c < C; ++c) acc[h][c] = _mm512_fmadd_ps(p, vv[c], acc[h][c]);
    }
  }
  for (int h = 0; h < NQ; ++h)
    for (int c = 0; c < C; ++c)
      _mm512_storeu_ps(out + h * HD + 16 * c, _mm512_mul_ps(acc[h][c], _mm512_set1_ps(inv[h])));
}

// `nq` heads with `attend`, at most 4 at a time (2 for head size 128: the registers).
template <int C, class KV>
void attend_heads(const float *q, int64_t nq, const KV *keys, const KV *vals, int64_t n,
                  float scale, float *out, float *sc, float *ml) {
  constexpr int64_t HD = 16 * C, MAXQ = C >= 8 ? 2 : 4;
  for (int64_t h = 0; h < nq; h += MAXQ) {
    const float *qh = q + h * HD;
    float *oh = out + h * HD, *mlh = ml ? ml + 2 * h : nullptr;
    switch (std::min(MAXQ, nq - h)) {
      case 1: attend<C, 1, KV>(qh, keys, vals, n, scale, oh, sc, mlh); break;
      case 2: attend<C, 2, KV>(qh, keys, vals, n, scale, oh, sc, mlh); break;
      case 3: attend<C, 3, KV>(qh, keys, vals, n, scale, oh, sc, mlh); break;
      default: attend<C, 4, KV>(qh, keys, vals, n, scale, oh, sc, mlh); break;
    }
  }
}

// out = silu(g) · u = g / (1 + e^-g) · u over n floats.
LLMLAB_AVX512 void silu_mul(Avx512, const float *g, const float *u, int64_t n, float *out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 gv = _mm512_maskz_loadu_ps(k, g + i);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    _mm512_mask_storeu_ps(
        out + i, k,
        _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e)),
                      _mm512_maskz_loadu_ps(k, u + i)));
  }
}

// Whether `attend_heads` has a kernel for head size `hd` (16, 32, 64 or 128).
bool attend_fits(int64_t hd) { return hd == 16 || hd == 32 || hd == 64 || hd == 128; }

template <class KV>
void attend_any(Avx512, int64_t hd, const float *q, int64_t nq, const KV *keys, const KV *vals,
                int64_t n, float scale, float *out, float *sc, float *ml) {
  switch (hd) {
    case 16: attend_heads<1>(q, nq, keys, vals, n, scale, out, sc, ml); break;
    case 32: attend_heads<2>(q, nq, keys, vals, n, scale, out, sc, ml); break;
    case 64: attend_heads<4>(q, nq, keys, vals, n, scale, out, sc, ml); break;
    default: attend_heads<8>(q, nq, keys, vals, n, scale, out, sc, ml); break;
  }
}

// n floats into f16 bits (round to nearest even), n a multiple of 16.
LLMLAB_AVX512 void to_half(Avx512, const float *x, int64_t n, uint16_t *out) {
  for (int64_t i = 0; i < n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(out + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
}

// ---- The same kernels in AVX2 (8 floats a vector; no masks: scalar tails) ----
#define LLMLAB_AVX2 __attribute__((target("avx2,fma,f16c")))

LLMLAB_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

LLMLAB_AVX2 inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// y[r · ldy] = the sum of the lanes of row r's U accumulators (the row kernels' last step).
template <int R, int U>
LLMLAB_AVX2 inline void store_sums(const __m256 (&acc)[R][U], float *y, int64_t ldy) {
  for (int r = 0; r < R; ++r) {
    __m256 s = acc[r][0];
    for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[r][u]);
    y[r * ldy] = hsum(s);
  }
}

// The low 8 bytes of v (unsigned or signed) as floats.
LLMLAB_AVX2 inline __m256 u8_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
LLMLAB_AVX2 inline __m256 s8_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

// A Q4_1 block's 32 weights as 4 vectors: w[0], w[1] the low nibbles (weights 0..15), w[2],
// w[3] the high ones (16..31).
LLMLAB_AVX2 inline void q41_weights(const uint8_t *qs, uint16_t d, uint16_t m, __m256 (&w)[4]) {
  const __m128i low = _mm_set1_epi8(0x0F);
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i *>(qs));
  const __m128i lo = _mm_and_si128(bytes, low), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
  const __m256 dv = _mm256_set1_ps(_cvtsh_ss(d)), mv = _mm256_set1_ps(_cvtsh_ss(m));
  w[0] = _mm256_fmadd_ps(u8_ps(lo), dv, mv);
  w[1] = _mm256_fmadd_ps(u8_ps(_mm_unpackhi_epi64(lo, lo)), dv, mv);
  w[2] = _mm256_fmadd_ps(u8_ps(hi), dv, mv);
  w[3] = _mm256_fmadd_ps(u8_ps(_mm_unpackhi_epi64(hi, hi)), dv, mv);
}

// As the AVX-512 q41_row: one weight row against R activation rows, U accumulators a row
// (16 registers: 4 for one row, 2 for two, 1 from three on).
template <int R>
LLMLAB_AVX2 inline void q41_row(Avx2, const float *x, int64_t ldx, const uint8_t *qs,
                                const uint16_t *d, const uint16_t *m, int64_t nb, float *y,
                                int64_t ldy) {
  constexpr int U = R == 1 ? 4 : R == 2 ? 2 : 1;
  __m256 acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256 w[4];
    q41_weights(qs + b * 16, d[b], m[b], w);
    for (int r = 0; r < R; ++r) {
      const float *xr = x + r * ldx + b * QK;
      for (int i = 0; i < 4; ++i)
        acc[r][i % U] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xr + 8 * i), acc[r][i % U]);
    }
  }
  store_sums<R, U>(acc, y, ldy);
}

template <int R>
LLMLAB_AVX2 inline void q80_row(Avx2, const float *x, int64_t ldx, const int8_t *qs,
                                const uint16_t *d, int64_t nb, float *y, int64_t ldy) {
  constexpr int U = R == 1 ? 4 : R == 2 ? 2 : 1;
  __m256 acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i *>(qs + b * QK));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i *>(qs + b * QK + 16));
    const __m256 dv = _mm256_set1_ps(_cvtsh_ss(d[b]));
    const __m256 w[4] = {_mm256_mul_ps(s8_ps(a), dv),
                         _mm256_mul_ps(s8_ps(_mm_unpackhi_epi64(a, a)), dv),
                         _mm256_mul_ps(s8_ps(c), dv),
                         _mm256_mul_ps(s8_ps(_mm_unpackhi_epi64(c, c)), dv)};
    for (int r = 0; r < R; ++r) {
      const float *xr = x + r * ldx + b * QK;
      for (int i = 0; i < 4; ++i)
        acc[r][i % U] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xr + 8 * i), acc[r][i % U]);
    }
  }
  store_sums<R, U>(acc, y, ldy);
}

LLMLAB_AVX2 void q41_dequant_blocks(Avx2, const uint8_t *qs, const uint16_t *d, const uint16_t *m,
                                    int64_t begin, int64_t end, float *w) {
  for (int64_t i = begin; i < end; ++i) {
    __m256 v[4];
    q41_weights(qs + i * 16, d[i], m[i], v);
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(w + i * QK + 8 * j, v[j]);
  }
}

// One f32 weight row (k a multiple of 16) against R activation rows.
template <int R>
LLMLAB_AVX2 inline void f32_row(Avx2, const float *x, int64_t ldx, const float *w, int64_t k,
                                float *y, int64_t ldy) {
  constexpr int U = R == 1 ? 4 : R == 2 ? 2 : 1;
  __m256 acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 * U <= k; i += 8 * U)
    for (int u = 0; u < U; ++u) {
      const __m256 wv = _mm256_loadu_ps(w + i + 8 * u);
      for (int r = 0; r < R; ++r)
        acc[r][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * ldx + i + 8 * u), acc[r][u]);
    }
  for (; i < k; i += 8) {
    const __m256 wv = _mm256_loadu_ps(w + i);
    for (int r = 0; r < R; ++r)
      acc[r][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * ldx + i), acc[r][0]);
  }
  store_sums<R, U>(acc, y, ldy);
}

LLMLAB_AVX2 float dot_f32(Avx2, const float *a, const float *b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

LLMLAB_AVX2 void axpy_f32(Avx2, float alpha, const float *x, float *y, int64_t n) {
  const __m256 av = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

LLMLAB_AVX2 void rms_norm_rows(Avx2, const float *x, int64_t rows, int64_t d, const float *w,
                               double eps, float *out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * d;
    const float ss = dot_f32(Avx2{}, xr, xr, d);
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + static_cast<float>(eps));
    for (int64_t i = 0; i < d; ++i) out[r * d + i] = xr[i] * inv * w[i];
  }
}

// e^x as the AVX-512 exp_ps, 2^n put into the exponent bits (x clamped to [-87.3, 88.3], where
// n stays within the normal exponents).
LLMLAB_AVX2 inline __m256 exp_ps(Avx2, __m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y =
      _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

LLMLAB_AVX2 void silu_mul(Avx2, const float *g, const float *u, int64_t n, float *out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 e = exp_ps(Avx2{}, _mm256_sub_ps(_mm256_setzero_ps(), gv));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e)),
                                            _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

// n floats into f16 bits (round to nearest even), n a multiple of 8.
LLMLAB_AVX2 void to_half(Avx2, const float *x, int64_t n, uint16_t *out) {
  for (int64_t i = 0; i < n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i *>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
}

// 8 cached floats from an f32 cache or an f16 one.
LLMLAB_AVX2 inline __m256 load8(const float *p) { return _mm256_loadu_ps(p); }
LLMLAB_AVX2 inline __m256 load8(const uint16_t *p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
}

// The lane sums of 8 vectors as one: lane i = Σ v[i].
LLMLAB_AVX2 inline __m256 sum8(const __m256 *v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // a: v0..v3's sums over their low 128-bit halves, then over their high ones; b: v4..v7's.
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// x[i] = e^(x[i] − max x) over n floats; returns their sum, and the max in `mx`.
LLMLAB_AVX2 float softmax_numerators(Avx2, float *x, int64_t n, float &mx) {
  __m256 mv = _mm256_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + t));
  mx = hmax(mv);
  for (; t < n; ++t) mx = std::max(mx, x[t]);
  __m256 sum = _mm256_setzero_ps();
  for (t = 0; t + 8 <= n; t += 8) {
    const __m256 e = exp_ps(Avx2{}, _mm256_sub_ps(_mm256_loadu_ps(x + t), _mm256_set1_ps(mx)));
    _mm256_storeu_ps(x + t, e);
    sum = _mm256_add_ps(sum, e);
  }
  float total = hsum(sum);
  for (; t < n; ++t) total += (x[t] = std::exp(x[t] - mx));
  return total;
}

// As the AVX-512 `attend`, NQ ≤ 3 heads of 8·C: scores 8 keys at a time (8 lane-wise
// products, then one transposing sum), the values' products in slices of 4 vectors a head (the
// NQ heads' accumulators in 12 of the 16 registers), each value read once for the heads; `ml`
// as there.
template <int C, int NQ, class KV>
LLMLAB_AVX2 void attend(Avx2, const float *q, const KV *keys, const KV *vals, int64_t n,
                        float scale, float *out, float *sc, float *ml) {
  constexpr int64_t HD = 8 * C;
  constexpr int W = C < 4 ? C : 4;  // vectors of a slice
  for (int64_t t0 = 0; t0 < n; t0 += 8) {
    const int64_t m = std::min<int64_t>(8, n - t0);
    for (int h = 0; h < NQ; ++h) {
      __m256 acc[8];
      for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
      if (m == 8) {
        for (int c = 0; c < C; ++c) {
          const __m256 qv = _mm256_loadu_ps(q + h * HD + 8 * c);
          for (int u = 0; u < 8; ++u)
            acc[u] = _mm256_fmadd_ps(qv, load8(keys + (t0 + u) * HD + 8 * c), acc[u]);
        }
      } else {  // the last keys
        for (int64_t u = 0; u < m; ++u)
          for (int c = 0; c < C; ++c)
            acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * HD + 8 * c),
                                     load8(keys + (t0 + u) * HD + 8 * c), acc[u]);
      }
      const __m256 s = _mm256_mul_ps(sum8(acc), _mm256_set1_ps(scale));
      if (m == 8) {
        _mm256_storeu_ps(sc + h * n + t0, s);
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, s);
        std::copy(tmp, tmp + m, sc + h * n + t0);
      }
    }
  }
  float inv[NQ];
  for (int h = 0; h < NQ; ++h) {
    float mx;
    const float total = softmax_numerators(Avx2{}, sc + h * n, n, mx);
    inv[h] = 1.f / total;
    if (ml) ml[2 * h] = mx, ml[2 * h + 1] = total;
  }
  for (int c0 = 0; c0 < C; c0 += W) {
    __m256 acc[NQ][W];
    for (int h = 0; h < NQ; ++h)
      for (int c = 0; c < W; ++c) acc[h][c] = _mm256_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      __m256 p[NQ];
      for (int h = 0; h < NQ; ++h) p[h] = _mm256_broadcast_ss(sc + h * n + t);
      for (int c = 0; c < W; ++c) {
        const __m256 v = load8(vals + t * HD + 8 * (c0 + c));
        for (int h = 0; h < NQ; ++h) acc[h][c] = _mm256_fmadd_ps(p[h], v, acc[h][c]);
      }
    }
    for (int h = 0; h < NQ; ++h)
      for (int c = 0; c < W; ++c)
        _mm256_storeu_ps(out + h * HD + 8 * (c0 + c), _mm256_mul_ps(acc[h][c], _mm256_set1_ps(inv[h])));
  }
}

template <int C, class KV>
void attend_heads(Avx2, const float *q, int64_t nq, const KV *keys, const KV *vals, int64_t n,
                  float scale, float *out, float *sc, float *ml) {
  constexpr int64_t HD = 8 * C;
  for (int64_t h = 0; h < nq; h += 3) {
    const float *qh = q + h * HD;
    float *oh = out + h * HD, *mlh = ml ? ml + 2 * h : nullptr;
    switch (std::min<int64_t>(3, nq - h)) {
      case 1: attend<C, 1, KV>(Avx2{}, qh, keys, vals, n, scale, oh, sc, mlh); break;
      case 2: attend<C, 2, KV>(Avx2{}, qh, keys, vals, n, scale, oh, sc, mlh); break;
      default: attend<C, 3, KV>(Avx2{}, qh, keys, vals, n, scale, oh, sc, mlh); break;
    }
  }
}

// `nq` query heads `q (nq, hd)` sharing one key/value head attend over its `n` cached keys and
// values (f32 or f16; hd 16, 32, 64 or 128: `attend_fits`): out (nq, hd) = softmax(q·kᵀ·scale)·v.
// `sc` holds nq·n floats.
template <class KV>
void attend_any(Avx2, int64_t hd, const float *q, int64_t nq, const KV *keys, const KV *vals,
                int64_t n, float scale, float *out, float *sc, float *ml) {
  switch (hd) {
    case 16: attend_heads<2>(Avx2{}, q, nq, keys, vals, n, scale, out, sc, ml); break;
    case 32: attend_heads<4>(Avx2{}, q, nq, keys, vals, n, scale, out, sc, ml); break;
    case 64: attend_heads<8>(Avx2{}, q, nq, keys, vals, n, scale, out, sc, ml); break;
    default: attend_heads<16>(Avx2{}, q, nq, keys, vals, n, scale, out, sc, ml); break;
  }
}

// ---- The x16 kernels in AVX2: `vpmaddubsw` and `vpmaddwd` for `vpdpbusd` ----
//
// Eight weight rows a vector (half a group). With 8-bit activations `vpmaddubsw` multiplies each
// row's 4 weight bytes by the 4 broadcast activation bytes and adds pairs into 16-bit lanes (at
// most 2 · 15 · 128, so no saturation with 4-bit weights), `vpmaddwd` by ones adds the pairs
// into the row's 32-bit lane. With 16-bit activations the weights are widened to 16 bits and
// `vpmaddwd` multiplies them by the whole codes. Either way these are the integer sums of
// `vpdpbusd`, so the products equal the AVX-512 VNNI kernel's bit for bit (the float steps are
// the same, lane by lane).

// 32 int32 codes (4 vectors, each within -128..127) as 32 bytes in order (the packs
// interleave the 128-bit lanes; the permutation puts them back).
LLMLAB_AVX2 inline __m256i codes_bytes(const __m256i (&q)[4]) {
  const __m256i b =
      _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  return _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Row r `x (k)` into `a`, as the AVX-512 quantize_row (the same codes, scales and sums).
template <int A>
LLMLAB_AVX2 void quantize_row(Avx2, const float *x, int64_t r, int64_t k, QAct &a) {
  constexpr float LEVELS = A == 8 ? 127.f : 16383.f;
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t blk = 0; blk < k / QK; ++blk) {
    __m256 xv[4];
    __m256 mx = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      xv[i] = _mm256_loadu_ps(x + blk * QK + 8 * i);
      mx = _mm256_max_ps(mx, _mm256_and_ps(xv[i], sign));
    }
    const int64_t o = blk * a.rows + r;  // block-major
    const float amax = hmax(mx);
    const float id = amax > 0.f ? LEVELS / amax : 0.f;
    __m256i q[4];
    __m256i sum = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) {  // round to nearest even (the MXCSR default)
      q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(xv[i], _mm256_set1_ps(id)));
      sum = _mm256_add_epi32(sum, q[i]);
    }
    if constexpr (A == 8) {
      _mm256_storeu_si256(reinterpret_cast<__m256i *>(a.hi.data() + o * QK), codes_bytes(q));
    } else {  // whole, for `vpmaddwd` (the packs interleave 64-bit quarters: put them back)
      __m256i *q16 = reinterpret_cast<__m256i *>(a.q16.data() + o * QK);
      for (int h = 0; h < 2; ++h)
        _mm256_storeu_si256(q16 + h, _mm256_permute4x64_epi64(
                                         _mm256_packs_epi32(q[2 * h], q[2 * h + 1]), 0xD8));
    }
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    a.d[o] = amax / LEVELS;
    a.s[o] = a.d[o] * static_cast<float>(_mm_cvtsi128_si32(s));
  }
}

// A half group's block (`blk`, its first byte in the x16 block): the 32 weights of 8 rows as
// 8 vectors, w[i] holding each row's weights 4i..4i+3.
LLMLAB_AVX2 inline void x16_weights(const uint8_t *blk, __m256i (&w)[8]) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int t = 0; t < 4; ++t) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk + 64 * t));
    w[t] = _mm256_and_si256(v, low);
    w[t + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
  }
}

// sum[r] += the 8 rows' integer products of the block `w` by row r's 32 activation bytes
// (`act + r · QK`). `vpmaddubsw` leaves pairs of products in 16-bit lanes; the 8 steps' add up
// to 16 products of at most 15 · 128 (30,720: no overflow) before `vpmaddwd` widens them.
template <int R>
LLMLAB_AVX2 inline void x16_pass(const __m256i (&w)[8], const int8_t *act, __m256i (&sum)[R]) {
  for (int r = 0; r < R; ++r) {
    __m256i pairs = _mm256_setzero_si256();
    for (int i = 0; i < 8; ++i) {
      const __m256i a =
          _mm256_set1_epi32(*reinterpret_cast<const int32_t *>(act + r * QK + 4 * i));
      pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(w[i], a));
    }
    sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
}

// sA[r], sB[r] += the products of 8 rows' weights (16-bit lanes: rows 0-3 of the half group in
// `w0`, rows 4-7 in `w1`, 4 consecutive weights a row) by row r's 4 activation codes at
// `act + r · QK` (16-bit, broadcast): `vpmaddwd` leaves each row's sum in two int32 lanes (its
// weights 0-1 and 2-3).
template <int R>
LLMLAB_AVX2 inline void madd_step(__m256i w0, __m256i w1, const int16_t *act, __m256i (&sA)[R],
                                  __m256i (&sB)[R]) {
  for (int r = 0; r < R; ++r) {
    const __m256i a = _mm256_set1_epi64x(*reinterpret_cast<const int64_t *>(act + r * QK));
    sA[r] = _mm256_add_epi32(sA[r], _mm256_madd_epi16(w0, a));
    sB[r] = _mm256_add_epi32(sB[r], _mm256_madd_epi16(w1, a));
    // Kept in registers as running sums: otherwise the compiler reassociates the block's 64
    // additions into a tree over all its products and spills them to the stack.
    asm("" : "+x"(sA[r]), "+x"(sB[r]));
  }
}

// 16 bytes (4 rows' 4 bytes of an x16 vector) as 16-bit lanes.
LLMLAB_AVX2 inline __m256i bytes_u16(const uint8_t *p) {
  return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
}

// As the AVX-512 x16_group, a half group (8 rows) at a time: the same integer sums per row and
// block (exact), then the same float steps. 8-bit activations (Q4_1x16 only: `vpmaddubsw`'s
// 16-bit pairs would saturate on 8-bit codes) take `vpmaddubsw` on the bytes `hi`; 16-bit ones
// take `vpmaddwd` on the whole codes `q16`, one instruction per 16 products where splitting them
// into two bytes costs two `vpmaddubsw` and their widening, and for Q8_0x16 too.
template <int BITS, int A, int R>
LLMLAB_AVX2 inline void x16_group(Avx2, const QAct &a, int64_t r0, int64_t k, const uint8_t *qs,
                                  const uint16_t *d, const uint16_t *m, float *y, int64_t ldy) {
  static_assert(BITS == 4 || A == 16, "8-bit activations take Q4_1x16 blocks in AVX2");
  const int64_t nb = k / QK;
  constexpr int64_t BLOCK_BYTES = BITS == 4 ? 256 : 512;
  // vphaddd leaves the rows of a half group in the lanes 0 1 4 5 2 3 6 7: the scales are read
  // in that order, and the sums put back in order when stored.
  const __m256i order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
  const __m256i low = _mm256_set1_epi16(0x0F);
  for (int half = 0; half < 2; ++half) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t *blk = qs + b * BLOCK_BYTES + 32 * half;
      const int64_t at = b * a.rows + r0;
      __m256i sum[R];
      __m256 dv = _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i *>(d + b * 16 + 8 * half)));
      __m256 mv;
      if constexpr (A == 8) {
        __m256i w[8];
        x16_weights(blk, w);
        for (int r = 0; r < R; ++r) sum[r] = _mm256_setzero_si256();
        x16_pass<R>(w, a.hi.data() + at * QK, sum);
      } else {
        __m256i sA[R], sB[R];
        for (int r = 0; r < R; ++r) sA[r] = sB[r] = _mm256_setzero_si256();
        const int16_t *act = a.q16.data() + at * QK;
        if constexpr (BITS == 4) {  // a byte's low nibble is weight 4t + i, its high 16 + 4t + i
          for (int t = 0; t < 4; ++t) {
            const __m256i v0 = bytes_u16(blk + 64 * t), v1 = bytes_u16(blk + 64 * t + 16);
            madd_step<R>(_mm256_and_si256(v0, low), _mm256_and_si256(v1, low), act + 4 * t, sA,
                         sB);
            madd_step<R>(_mm256_srli_epi16(v0, 4), _mm256_srli_epi16(v1, 4), act + 16 + 4 * t,
                         sA, sB);
          }
        } else {
          for (int t = 0; t < 8; ++t)
            madd_step<R>(bytes_u16(blk + 64 * t), bytes_u16(blk + 64 * t + 16), act + 4 * t, sA,
                         sB);
        }
        for (int r = 0; r < R; ++r) sum[r] = _mm256_hadd_epi32(sA[r], sB[r]);
        dv = _mm256_permutevar8x32_ps(dv, order);
      }
      if constexpr (BITS == 4) {
        mv = _mm256_cvtph_ps(
            _mm_loadu_si128(reinterpret_cast<const __m128i *>(m + b * 16 + 8 * half)));
        if constexpr (A == 16) mv = _mm256_permutevar8x32_ps(mv, order);
      } else {
        mv = _mm256_mul_ps(dv, _mm256_set1_ps(-128.f));
      }
      for (int r = 0; r < R; ++r) {
        const int64_t i = at + r;
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]),
                                 _mm256_mul_ps(dv, _mm256_set1_ps(a.d[i])), acc[r]);
        acc[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(a.s[i]), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 out = A == 16 ? _mm256_permutevar8x32_ps(acc[r], order) : acc[r];
      _mm256_storeu_ps(y + r * ldy + 8 * half, out);
    }
  }
}

// Whether this CPU runs the kernels of `isa` (Avx512::code or Avx2::code): checked at every
// entry, so that a wrong choice is an error rather than an illegal instruction.
bool isa_runs(int isa) {
  __builtin_cpu_init();
  if (isa == Avx512::code)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
  return isa == Avx2::code && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

void expect_isa(int isa) {
  EXPECT(isa == Avx512::code || isa == Avx2::code,
         "isa must be 0 (AVX-512) or 1 (AVX2), got " + std::to_string(isa));
  EXPECT(isa_runs(isa), std::string("this CPU lacks ") +
                            (isa == Avx512::code ? "AVX-512 F/BW/VL/DQ" : "AVX2, FMA or F16C"));
}

// As expect_isa, for the x16 kernels: AVX-512 VNNI's, or AVX2's.
void expect_x16_isa(int isa) {
  expect_isa(isa);
  EXPECT(isa == Avx2::code || __builtin_cpu_supports("avx512vnni"), "this CPU lacks AVX-512 VNNI");
}

#endif

}  // namespace

extern "C" {

// 1 when this build has the AVX-512 kernels (an x86-64 build); the CPU check is the caller's.
int llmlab_q_kernels_built() {
#if defined(__x86_64__)
  return 1;
#else
  return 0;
#endif
}

// vpdpbusd instructions a second on the pool's threads (`vnni_peak`), into `out`, measured
// over `reps` rounds (12 instructions each; ~70 ms at 1e7 on this Zen 4). Needs AVX-512 VNNI
// (the caller's check).
char *llmlab_vnni_peak(int64_t reps, double *out) {
  LLMLAB_PROTECT({
#if defined(__x86_64__)
    EXPECT(reps > 0, "reps must be positive");
    *out = vnni_peak(reps);
#else
    throw std::runtime_error("llmlab vnni peak: built without the x86-64 AVX-512 kernels");
#endif
  })
}

// y (b, n) = x (b, k) · Wᵀ with W in Q4_1 blocks: qs (n, k/2) uint8, d and m (n, k/32) f16,
// by the kernels of `isa` (`isa_runs`).
char *llmlab_q4_1_mm(int isa, const at::Tensor *x_, const at::Tensor *qs_, const at::Tensor *d_,
                     const at::Tensor *m_, at::Tensor *y_) {
  LLMLAB_PROTECT({
#if defined(__x86_64__)
    expect_isa(isa);
    const at::Tensor &x = *x_, &qs = *qs_, &d = *d_, &m = *m_, &y = *y_;
    EXPECT(qs.dim() == 2, "qs must be 2-d (out, in / 2)");
    const int64_t n = qs.size(0);
    const Shapes s = check_common(x, d, y, n);
    expect_tensor(qs, at::kByte, n, s.k / 2, "qs");
    expect_tensor(m, at::kHalf, n, s.nb, "m");
    const Q41 w{qs.data_ptr<uint8_t>(), half_bits(d), half_bits(m), n};
    if (isa == Avx512::code)
      q41_mm<Avx512>(x.data_ptr<float>(), s.b, s.k, w, y.data_ptr<float>());
    else
      q41_mm<Avx2>(x.data_ptr<float>(), s.b, s.k, w, y.data_ptr<float>());
#else
    throw std::runtime_error("llmlab q4 kernel: built without the x86-64 AVX-512 kernels");
#endif
  })
}

// y (b, n) = x (b, k) · Wᵀ with W in Q8_0 blocks: qs (n, k) int8, d (n, k/32) f16 (`isa` as
// above).
char *llmlab_q8_0_mm(int isa, const at::Tensor *x_, const at::Tensor *qs_, const at::Tensor *d_,
                     at::Tensor *y_) {
  LLMLAB_PROTECT({
#if defined(__x86_64__)
    expect_isa(isa);
    const at::Tensor &x = *x_, &qs = *qs_, &d = *d_, &y = *y_;
    EXPECT(qs.dim() == 2, "qs must be 2-d (out, in)");
    const int64_t n = qs.size(0);
    const Shapes s = check_common(x, d, y, n);
    expect_tensor(qs, at::kChar, n, s.k, "qs");
    const auto mm = isa == Avx512::code ? q80_mm<Avx512> : q80_mm<Avx2>;
    mm(x.data_ptr<float>(), s.b, s.k, qs.data_ptr<int8_t>(), half_bits(d), n, y.data_ptr<float>());
#else
    throw std::runtime_error("llmlab q8 kernel: built without the x86-64 AVX-512 kernels");
#endif
  })
}

// y (b, n) = x (b, k) · Wᵀ with a dense f32 W (n, k), k a multiple of 16 (decoding's head;
// `isa` as above).
char *llmlab_f32_mm(int isa, const at::Tensor *x_, const at::Tensor *w_, at::Tensor *y_) {
  LLMLAB_PROTECT({
#if defined(__x86_64__)
    expect_isa(isa);
    const at::Tensor &x = *x_, &w = *w_, &y = *y_;
    EXPECT(x.dim() == 2 && w.dim() == 2, "x and w must be 2-d");
    const int64_t b = x.size(0), k = x.size(1), n = w.size(0);
    EXPECT(k % 16 == 0, "in = " + std::to_string(k) + " is not a multiple of 16");
    expect_tensor(x, at::kFloat, b, k, "x");
    expect_tensor(w, at::kFloat, n, k, "w");
    expect_tensor(y, at::kFloat, b, n, "y");
    const auto mm = isa == Avx512::code ? f32_mm<Avx512> : f32_mm<Avx2>;
    mm(x.data_ptr<float>(), b, k, w.data_ptr<float>(), n, y.data_ptr<float>());
#else
    throw std::runtime_error("llmlab f32 kernel: built without the x86-64 AVX-512 kernels");
#endif
  })
}

// w (n, k) f32 = the Q4_1 weight (qs, d, m), for prompts' GEMMs, by the kernels of `isa`.
char *llmlab_q4_1_dequant(int isa, const at::Tensor *qs_, const at::Tensor *d_, const at::Tensor *m_,
                          at::Tensor *w_) {
  LLMLAB_PROTECT({
    const at::Tensor &qs = *qs_, &d = *d_, &m = *m_, &w = *w_;
    EXPECT(w.dim() == 2, "w must be 2-d (out, in)");
    const int64_t n = w.size(0), k = w.size(1), nb = k / QK;
    EXPECT(k % QK == 0, "in = " + std::to_string(k) + " is not a multiple of 32");
    expect_tensor(w, at::kFloat, n, k, "w");
    expect_tensor(qs, at::kByte, n, k / 2, "qs");
    expect_tensor(d, at::kHalf, n, nb, "d");
    expect_tensor(m, at::kHalf, n, nb, "m");
    const uint8_t *qp = qs.data_ptr<uint8_t>();
    const uint16_t *dp = half_bits(d), *mp = half_bits(m);
    float *wp = w.data_ptr<float>();
#if defined(__x86_64__)
    expect_isa(isa);
#endif
    at::parallel_for(0, n * nb, 256, [&](int64_t begin, int64_t end) {
#if defined(__x86_64__)
      if (isa == Avx512::code)
        q41_dequant_blocks(Avx512{}, qp, dp, mp, begin, end, wp);
      else
        q41_dequant_blocks(Avx2{}, qp, dp, mp, begin, end, wp);
#else
      for (int64_t i = begin; i < end; ++i) {
        const float dd = half_bits_to_float(dp[i]), mm = half_bits_to_float(mp[i]);
        const uint8_t *q = qp + i * 16;
        float *out = wp + i * QK;
        for (int j = 0; j < 16; ++j) {
          out[j] = static_cast<float>(q[j] & 0x0F) * dd + mm;
          out[j + 16] = static_cast<float>(q[j] >> 4) * dd + mm;
        }
      }
#endif
    });
  })
}

// w (n, k) f32 = the Q8_0 weight (qs, d).
char *llmlab_q8_0_dequant(const at::Tensor *qs_, const at::Tensor *d_, at::Tensor *w_) {
  LLMLAB_PROTECT({
    const at::Tensor &qs = *qs_, &d = *d_, &w = *w_;
    EXPECT(w.dim() == 2, "w must be 2-d (out, in)");
    const int64_t n = w.size(0), k = w.size(1), nb = k / QK;
    EXPECT(k % QK == 0, "in = " + std::to_string(k) + " is not a multiple of 32");
    expect_tensor(w, at::kFloat, n, k, "w");
    expect_tensor(qs, at::kChar, n, k, "qs");
    expect_tensor(d, at::kHalf, n, nb, "d");
    const int8_t *qp = qs.data_ptr<int8_t>();
    const uint16_t *dp = half_bits(d);
    float *wp = w.data_ptr<float>();
    at::parallel_for(0, n * nb, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float dd = half_bits_to_float(dp[i]);
        for (int j = 0; j < QK; ++j) wp[i * QK + j] = static_cast<float>(qp[i * QK + j]) * dd;
      }
    });
  })
}

}  // extern "C"

// The x16 layouts (see `x16_group`): `bits` 4 (Q4_1x16: qs, d, m) or 8 (Q8_0x16: qs, d; m NULL).
// Shapes: qs16 (n/16, nb·256 or nb·512) uint8, d16 and m16 (n/16, nb·16) f16.
namespace {
struct X16 {
  int64_t n, nb, block_bytes;
};

X16 check_x16(int bits, const at::Tensor &qs16, const at::Tensor &d16, const at::Tensor *m16,
              int64_t n, int64_t k) {
  EXPECT(bits == 4 || bits == 8, "bits must be 4 or 8, got " + std::to_string(bits));
  EXPECT(n % 16 == 0, "out = " + std::to_string(n) + " is not a multiple of 16");
  EXPECT(k % QK == 0, "in = " + std::to_string(k) + " is not a multiple of 32");
  const int64_t nb = k / QK, block_bytes = bits == 4 ? 256 : 512;
  expect_tensor(qs16, at::kByte, n / 16, nb * block_bytes, "qs16");
  expect_tensor(d16, at::kHalf, n / 16, nb * 16, "d16");
  EXPECT((bits == 4) == (m16 != nullptr), "m16 is given exactly for 4 bits");
  if (m16) expect_tensor(*m16, at::kHalf, n / 16, nb * 16, "m16");
  return {n, nb, block_bytes};
}
}  // namespace

extern "C" {

// Repacks GGUF-layout blocks into the x16 layout: bits 4 from Q4_1 (qs (n, k/2) uint8, d, m
// (n, k/32) f16), bits 8 from Q8_0 (qs (n, k) int8, d; m NULL). n is a multiple of 16.
char *llmlab_x16_pack(int bits, const at::Tensor *qs_, const at::Tensor *d_, const at::Tensor *m_,
                      at::Tensor *qs16_, at::Tensor *d16_, at::Tensor *m16_) {
  LLMLAB_PROTECT({
    const at::Tensor &qs = *qs_, &d = *d_;
    EXPECT(qs.dim() == 2, "qs must be 2-d");
    const int64_t n = qs.size(0), k = qs.size(1) * (bits == 4 ? 2 : 1);
    const X16 x = check_x16(bits, *qs16_, *d16_, m16_, n, k);
    expect_tensor(qs, bits == 4 ? at::kByte : at::kChar, n, bits == 4 ? k / 2 : k, "qs");
    expect_tensor(d, at::kHalf, n, x.nb, "d");
    EXPECT((m_ != nullptr) == (m16_ != nullptr), "m and m16 go together");
    if (m_) expect_tensor(*m_, at::kHalf, n, x.nb, "m");
    const uint8_t *src = static_cast<const uint8_t *>(qs.data_ptr());
    uint8_t *dst = qs16_->data_ptr<uint8_t>();
    const uint16_t *dp = half_bits(d), *mp = m_ ? half_bits(*m_) : nullptr;
    uint16_t *d16 = reinterpret_cast<uint16_t *>(d16_->data_ptr<at::Half>());
    uint16_t *m16 = m16_ ? reinterpret_cast<uint16_t *>(m16_->data_ptr<at::Half>()) : nullptr;
    const int64_t row_bytes = bits == 4 ? k / 2 : k, blk = bits == 4 ? 16 : 32;
    const uint8_t offset = bits == 4 ? 0 : 128;
    for (int64_t g = 0; g < n / 16; ++g)
      for (int64_t b = 0; b < x.nb; ++b) {
        uint8_t *out = dst + (g * x.nb + b) * x.block_bytes;
        for (int64_t t = 0; t < blk / 4; ++t)
          for (int64_t j = 0; j < 16; ++j)
            for (int64_t i = 0; i < 4; ++i)
              out[t * 64 + j * 4 + i] =
                  static_cast<uint8_t>(src[(16 * g + j) * row_bytes + b * blk + 4 * t + i] + offset);
        for (int64_t j = 0; j < 16; ++j) {
          d16[(g * x.nb + b) * 16 + j] = dp[(16 * g + j) * x.nb + b];
          if (m16) m16[(g * x.nb + b) * 16 + j] = mp[(16 * g + j) * x.nb + b];
        }
      }
  })
}

// y (b, n) = x (b, k) · Wᵀ with W in an x16 layout, the activations quantized to `act_bits`
// (8 or 16) per block of 32, by the kernels of `isa`: AVX-512 VNNI's `vpdpbusd` (the caller
// checks the CPU has it), or AVX2's `vpmaddubsw` / `vpmaddwd` (the same integer sums; Q8_0x16
// with 16-bit activations only).
char *llmlab_x16_mm(int isa, int bits, int act_bits, const at::Tensor *x_, const at::Tensor *qs16_,
                    const at::Tensor *d16_, const at::Tensor *m16_, at::Tensor *y_) {
  LLMLAB_PROTECT({
#if defined(__x86_64__)
    const at::Tensor &x = *x_, &y = *y_;
    EXPECT(x.dim() == 2 && y.dim() == 2, "x and y must be 2-d");
    EXPECT(act_bits == 8 || act_bits == 16,
           "act_bits must be 8 or 16, got " + std::to_string(act_bits));
    const int64_t b = x.size(0), k = x.size(1), n = y.size(1);
    check_x16(bits, *qs16_, *d16_, m16_, n, k);
    expect_tensor(x, at::kFloat, b, k, "x");
    expect_tensor(y, at::kFloat, b, n, "y");
    const uint8_t *qs = qs16_->data_ptr<uint8_t>();
    const uint16_t *d = half_bits(*d16_), *m = m16_ ? half_bits(*m16_) : nullptr;
    expect_x16_isa(isa);
    const auto mm = isa == Avx2::code ? (bits == 4 ? x16_mm_act<Avx2, 4> : x16_mm_act<Avx2, 8>)
                    : bits == 4       ? x16_mm_act<Avx512, 4>
                                      : x16_mm_act<Avx512, 8>;
    mm(act_bits, x.data_ptr<float>(), b, k, qs, d, m, n, y.data_ptr<float>());
#else
    throw std::runtime_error("llmlab x16 kernel: built without the x86-64 AVX-512 kernels");
#endif
  })
}

// w (n, k) f32 = the weight an x16 layout holds (exactly the GGUF blocks' values).
char *llmlab_x16_dequant(int bits, const at::Tensor *qs16_, const at::Tensor *d16_,
                         const at::Tensor *m16_, at::Tensor *w_) {
  LLMLAB_PROTECT({
    const at::Tensor &w = *w_;
    EXPECT(w.dim() == 2, "w must be 2-d (out, in)");
    const int64_t n = w.size(0), k = w.size(1);
    const X16 x = check_x16(bits, *qs16_, *d16_, m16_, n, k);
    expect_tensor(w, at::kFloat, n, k, "w");
    const uint8_t *qs = qs16_->data_ptr<uint8_t>();
    const uint16_t *d = half_bits(*d16_), *m = m16_ ? half_bits(*m16_) : nullptr;
    float *wp = w.data_ptr<float>();
    at::parallel_for(0, n / 16, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g)
        for (int64_t b = 0; b < x.nb; ++b) {
          const uint8_t *blk = qs + (g * x.nb + b) * x.block_bytes;
          for (int64_t j = 0; j < 16; ++j) {
            const float dd = half_bits_to_float(d[(g * x.nb + b) * 16 + j]);
            float *out = wp + (16 * g + j) * k + b * QK;
            if (bits == 4) {
              const float mm = half_bits_to_float(m[(g * x.nb + b) * 16 + j]);
              for (int64_t e = 0; e < 16; ++e) {
                const uint8_t byte = blk[(e / 4) * 64 + j * 4 + e % 4];
                out[e] = static_cast<float>(byte & 0x0F) * dd + mm;
                out[e + 16] = static_cast<float>(byte >> 4) * dd + mm;
              }
            } else {
              for (int64_t e = 0; e < QK; ++e)
                out[e] = static_cast<float>(static_cast<int>(blk[(e / 4) * 64 + j * 4 + e % 4]) -
                                            128) *
                         dd;
            }
          }
        }
    });
  })
}

}  // extern "C"

extern "C" {

// One decoding step of a Llama model's blocks (Q4_1 or dense f32 weights), for `b` rows each
// continuing its own sequence (llmlab's `LlamaBlock::forward_rows` and the single-sequence
// decode step, fused). Per block:
//   h = rms_norm(x, norm1); q, k, v = h · W_qkvᵀ; RoPE on q and k at each row's position;
//   k, v written into the block's caches at (row, head, pos); each query head attends over its
//   row's keys 0..=pos with its key/value head (grouped-query); x += ctx · W_outᵀ;
//   h = rms_norm(x, norm2); g, u = h · W_gate_upᵀ; x += (silu(g) · u) · W_downᵀ.
// `x (b, d)` f32 is updated in place; `w` holds 14 handles a block: norm1, norm2 (d) f32, then
// for W_qkv, W_out, W_gate_up (gate rows first) and W_down three handles each, by `layout`:
// 0 the Q4_1 blocks (qs, d, m); 1 the dense f32 matrix and two unused handles; 2 and 3 the
// Q4_1x16 blocks (qs16, d16, m16) with 16- and 8-bit activations. `kc`, `vc` hold a block's
// caches each, `(rows >= b, kv, capacity, hd)` f32, or f16 (half the bytes a step reads; head
// sizes 16, 32, 64 and 128), all alike; `pos (b)` int64 (each < capacity); `cos`, `sin`
// `(positions, hd)` f32. The whole step is one parallel region (`Phases`). `isa` picks the
// kernels (`isa_runs`); the x16 layouts with AVX-512 need VNNI (the caller's check).
char *llmlab_llama_decode(at::Tensor *x_, const at::Tensor *const *w, int64_t n_blocks,
                          int isa, int layout, at::Tensor *const *kc_, at::Tensor *const *vc_,
                          const at::Tensor *pos_, const at::Tensor *cos_, const at::Tensor *sin_,
                          int64_t n_heads, int64_t n_kv, double eps) {
  LLMLAB_PROTECT({
#if defined(__x86_64__)
    at::Tensor &x = *x_;
    const at::Tensor &pos = *pos_, &cos = *cos_, &sin = *sin_;
    EXPECT(layout >= 0 && layout <= 3, "layout must be 0..3, got " + std::to_string(layout));
    if (layout >= 2)
      expect_x16_isa(isa);
    else
      expect_isa(isa);
    EXPECT(n_blocks > 0, "no blocks");
    EXPECT(x.dim() == 2, "x must be 2-d (rows, emb)");
    const int64_t b = x.size(0), d = x.size(1);
    expect_tensor(x, at::kFloat, b, d, "x");
    const at::Tensor &kc0 = *kc_[0];
    EXPECT(kc0.dim() == 4, "the caches must be 4-d");
    const int64_t cap = kc0.size(2), hd = kc0.size(3);
    const bool half = kc0.scalar_type() == at::kHalf;
    EXPECT(kc0.size(0) >= b && kc0.size(1) == n_kv && n_kv > 0 && n_heads % n_kv == 0,
           "cache shape " + c10::str(kc0.sizes()) + " does not fit " + std::to_string(b) +
               " rows of " + std::to_string(n_kv) + " key/value heads");
    EXPECT(kc0.scalar_type() == at::kFloat || half, "the caches must be f32 or f16");
    for (int64_t l = 0; l < n_blocks; ++l)
      for (const at::Tensor *c : {kc_[l], vc_[l]})
        EXPECT(c->sizes() == kc0.sizes() && c->scalar_type() == kc0.scalar_type() &&
                   c->is_contiguous() && c->device().is_cpu(),
               "block " + std::to_string(l) + "'s caches must be contiguous CPU tensors like " +
                   "block 0's key cache " + c10::str(kc0.sizes()));
    EXPECT(!half || attend_fits(hd),
           "an f16 cache needs a head size of 16, 32, 64 or 128, got " + std::to_string(hd));
    EXPECT(pos.dim() == 1 && pos.size(0) == b && pos.scalar_type() == at::kLong &&
               pos.is_contiguous(),
           "pos must be (rows,) int64");
    expect_tensor(cos, at::kFloat, cos.size(0), hd, "cos");
    expect_tensor(sin, at::kFloat, cos.size(0), hd, "sin");
    const int64_t dq = n_heads * hd, dkv = n_kv * hd, nqkv = dq + 2 * dkv;
    EXPECT(w[8]->dim() == 2, "gate_up must be 2-d");
    const int64_t gu_rows = w[8]->size(0) * (layout >= 2 ? 16 : 1);  // x16: groups of 16 rows
    EXPECT(gu_rows % 2 == 0, "gate_up must have an even row count");
    const int64_t hidden = gu_rows / 2;
    const int act = layout == 2 ? 16 : layout == 3 ? 8 : 0;  // x16 activation bits
    auto mat = [&](const at::Tensor *const *t, int64_t n, int64_t k, const char *name) {
      Mat out;
      out.n = n;
      out.dense = layout == 1;
      out.x16_act = act;
      if (act) {
        check_x16(4, *t[0], *t[1], t[2], n, k);
        out.qs = t[0]->data_ptr<uint8_t>();
        out.d = half_bits(*t[1]);
        out.m = half_bits(*t[2]);
      } else if (out.dense) {
        EXPECT(k % 16 == 0, std::string(name) + ": in = " + std::to_string(k) +
                                " is not a multiple of 16");
        expect_tensor(*t[0], at::kFloat, n, k, name);
        out.f = t[0]->data_ptr<float>();
      } else {
        expect_tensor(*t[0], at::kByte, n, k / 2, std::string(name) + " qs");
        expect_tensor(*t[1], at::kHalf, n, k / QK, std::string(name) + " d");
        expect_tensor(*t[2], at::kHalf, n, k / QK, std::string(name) + " m");
        out.qs = t[0]->data_ptr<uint8_t>();
        out.d = half_bits(*t[1]);
        out.m = half_bits(*t[2]);
      }
      return out;
    };
    struct Block {
      const float *n1, *n2;
      Mat qkv, out, gu, down;
      char *kp, *vp;  // the caches' elements: f32, or f16 bits (`half`)
    };
    // Kept between calls; a local reference, so that the workers read this thread's instance.
    static thread_local std::vector<Block> kept_blocks;
    std::vector<Block> &blocks = kept_blocks;
    blocks.resize(n_blocks);
    for (int64_t l = 0; l < n_blocks; ++l) {
      const at::Tensor *const *bw = w + 14 * l;
      for (int i = 0; i < 2; ++i)
        EXPECT(bw[i]->dim() == 1 && bw[i]->size(0) == d && bw[i]->scalar_type() == at::kFloat &&
                   bw[i]->is_contiguous() && bw[i]->device().is_cpu(),
               std::string(i == 0 ? "norm1" : "norm2") + " must be a contiguous (emb,) f32 tensor");
      blocks[l] = Block{bw[0]->data_ptr<float>(),
                        bw[1]->data_ptr<float>(),
                        mat(bw + 2, nqkv, d, "qkv"),
                        mat(bw + 5, d, dq, "out"),
                        mat(bw + 8, 2 * hidden, d, "gate_up"),
                        mat(bw + 11, d, hidden, "down"),
                        static_cast<char *>(kc_[l]->data_ptr()),
                        static_cast<char *>(vc_[l]->data_ptr())};
    }
    const int64_t *p = pos.data_ptr<int64_t>();
    for (int64_t r = 0; r < b; ++r)
      EXPECT(p[r] >= 0 && p[r] < cap && p[r] < cos.size(0),
             "position " + std::to_string(p[r]) + " outside the cache (" + std::to_string(cap) +
                 ") or the RoPE tables");
    float *xp = x.data_ptr<float>();
    const int64_t kv_bytes = half ? 2 : 4;
    const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
    const int64_t kv_row = n_kv * cap * hd;  // elements per cache row

    // The step's buffers, kept between calls (allocating them each step cost page faults and
    // zero-filling).
    struct Scratch {
      std::vector<float> h, qkv, ctx, gu, y, part, ml;
      QAct qa;
    };
    static thread_local Scratch scratch;
    auto buf = [](std::vector<float> &v, int64_t n) {
      if (static_cast<int64_t>(v.size()) < n) v.resize(n);
      return v.data();
    };
    float *h = buf(scratch.h, b * std::max(d, hidden)), *qkv = buf(scratch.qkv, b * nqkv),
          *ctx = buf(scratch.ctx, b * dq), *gu = buf(scratch.gu, b * 2 * hidden),
          *y = buf(scratch.y, b * d);
    QAct &qa = scratch.qa;
    if (act) qa.prepare(b, std::max({d, dq, hidden}), act);
    auto add = [](const float *from, int64_t n, float *to) {
      for (int64_t i = 0; i < n; ++i) to[i] += from[i];
    };

    // The rest with the kernels of the instruction set `I`.
    auto step = [&](auto isa_tag) {
    using I = decltype(isa_tag);
    auto quantize = [&](const float *row, int64_t r, int64_t k) {
      if (act) quantize_row_bits<I>(act, row, r, k, qa);
    };
    // Row r's RoPE, and its keys and values into the block's caches.
    auto rope_and_cache = [&](const Block &B, int64_t r) {
      float *row = qkv + r * nqkv;
      const float *c = cp + p[r] * hd, *s = sp + p[r] * hd;
      for (int64_t i = 0; i < n_heads + n_kv; ++i) rope_head(row + i * hd, hd, c, s);
      for (int64_t j = 0; j < n_kv; ++j) {
        const int64_t at_pos = r * kv_row + (j * cap + p[r]) * hd;
        if (half) {
          to_half(I{}, row + dq + j * hd, hd, reinterpret_cast<uint16_t *>(B.kp) + at_pos);
          to_half(I{}, row + dq + dkv + j * hd, hd, reinterpret_cast<uint16_t *>(B.vp) + at_pos);
        } else {
          std::memcpy(reinterpret_cast<float *>(B.kp) + at_pos, row + dq + j * hd,
                      hd * sizeof(float));
          std::memcpy(reinterpret_cast<float *>(B.vp) + at_pos, row + dq + dkv + j * hd,
                      hd * sizeof(float));
        }
      }
    };
    // Attention: with a kernel for the head size, a task per row and key/value head with its
    // query heads together (each key read once for the group); per query head when that
    // leaves too few tasks for the threads (batch 1). A row with more than SPLIT keys is cut
    // into slices of SPLIT keys, a task per row, key/value head and slice (the group's heads
    // together), and the slices' softmaxes are combined after (`combine`): the keys are read
    // once, and the threads share one long row. The slices sit at fixed positions, so a row's
    // result depends on its own length only (not on the batch or the threads). Without a
    // kernel for the head size, a task per row and query head.
    constexpr int64_t SPLIT = 256;
    const int64_t group = n_heads / n_kv, threads = at::get_num_threads();
    const float scale = 1.f / std::sqrt(static_cast<float>(hd));
    const bool fits = attend_fits(hd);
    auto slices_of = [&](int64_t r) { return p[r] / SPLIT + 1; };  // ceil((p[r] + 1) / SPLIT)
    int64_t slices = 1;
    for (int64_t r = 0; fits && r < b; ++r) slices = std::max(slices, slices_of(r));
    const bool split = slices > 1;
    const int64_t per_task = split || b * n_kv >= 4 * threads ? group : 1;
    const int64_t tasks_per_kv = split ? slices : group / per_task;
    const int64_t n_tasks = fits ? b * n_kv * tasks_per_kv : b * n_heads;
    // Per (row, key/value head, slice): the group's outputs (each normalized over its slice)
    // and their softmaxes' max and sum (`attend`'s `ml`).
    float *part = split ? buf(scratch.part, b * n_kv * slices * group * hd) : nullptr;
    float *mls = split ? buf(scratch.ml, b * n_kv * slices * group * 2) : nullptr;
    auto attend_task = [&](const Block &B, int64_t t) {
      static thread_local std::vector<float> sc;  // this thread's scores, kept
      if (fits) {
        const int64_t r = t / (n_kv * tasks_per_kv), j = t / tasks_per_kv % n_kv,
                      u = t % tasks_per_kv;  // the slice (split), or the group's u-th task
        const int64_t i = j * group + (split ? 0 : u * per_task), k0 = split ? u * SPLIT : 0;
        const int64_t n_keys = split ? std::min(SPLIT, p[r] + 1 - k0) : p[r] + 1;
        if (n_keys <= 0) return;  // a slice past this row's keys
        if (static_cast<int64_t>(sc.size()) < per_task * n_keys) sc.resize(per_task * n_keys);
        const int64_t at = (r * kv_row + (j * cap + k0) * hd) * kv_bytes;
        const float *q = qkv + r * nqkv + i * hd;
        const int64_t slot = (r * n_kv + j) * slices + u;
        float *out = split ? part + slot * group * hd : ctx + r * dq + i * hd;
        float *ml = split ? mls + slot * group * 2 : nullptr;
        if (half)
          attend_any(I{}, hd, q, per_task, reinterpret_cast<const uint16_t *>(B.kp + at),
                     reinterpret_cast<const uint16_t *>(B.vp + at), n_keys, scale, out, sc.data(),
                     ml);
        else
          attend_any(I{}, hd, q, per_task, reinterpret_cast<const float *>(B.kp + at),
                     reinterpret_cast<const float *>(B.vp + at), n_keys, scale, out, sc.data(), ml);
        return;
      }
      const int64_t r = t / n_heads, i = t % n_heads, j = i / group, n_keys = p[r] + 1;
      const float *q = qkv + r * nqkv + i * hd;
      const float *keys = reinterpret_cast<const float *>(B.kp) + r * kv_row + j * cap * hd;
      const float *vals = reinterpret_cast<const float *>(B.vp) + r * kv_row + j * cap * hd;
      if (static_cast<int64_t>(sc.size()) < n_keys) sc.resize(n_keys);
      float mx = -INFINITY;
      for (int64_t t2 = 0; t2 < n_keys; ++t2) {
        sc[t2] = dot_f32(I{}, q, keys + t2 * hd, hd) * scale;
        mx = std::max(mx, sc[t2]);
      }
      float sum = 0.f;
      for (int64_t t2 = 0; t2 < n_keys; ++t2) {
        sc[t2] = std::exp(sc[t2] - mx);
        sum += sc[t2];
      }
      float *out = ctx + r * dq + i * hd;
      std::fill(out, out + hd, 0.f);
      for (int64_t t2 = 0; t2 < n_keys; ++t2) axpy_f32(I{}, sc[t2] / sum, vals + t2 * hd, out, hd);
    };
    // Row r's heads from their slices: out = Σ w_s · o_s / Σ w_s, w_s = sum_s · e^(max_s − max),
    // the softmax over all the keys (one slice: its output as it is).
    auto combine = [&](int64_t r) {
      const int64_t n_sl = slices_of(r);
      for (int64_t i = 0; i < n_heads; ++i) {
        const int64_t first = ((r * n_kv + i / group) * slices) * group + i % group;
        auto o_s = [&](int64_t s) { return part + (first + s * group) * hd; };
        auto ml_s = [&](int64_t s) { return mls + (first + s * group) * 2; };
        float *out = ctx + r * dq + i * hd;
        if (n_sl == 1) {
          std::memcpy(out, o_s(0), hd * sizeof(float));
          continue;
        }
        float mx = -INFINITY, total = 0.f;
        for (int64_t s = 0; s < n_sl; ++s) mx = std::max(mx, ml_s(s)[0]);
        std::fill(out, out + hd, 0.f);
        for (int64_t s = 0; s < n_sl; ++s) {
          const float w = ml_s(s)[1] * std::exp(ml_s(s)[0] - mx);
          total += w;
          axpy_f32(I{}, w, o_s(s), out, hd);
        }
        for (int64_t e = 0; e < hd; ++e) out[e] /= total;
      }
    };

    // Ten phases a block, each waiting for the one before; the residual of a block's down
    // projection is added in the next block's first phase (or the last one). The per-row phases
    // are little work: a range of rows an item, an item a thread.
    Phases phases(10 * n_blocks + 1);
    const int64_t row_items = std::min(b, threads);
    on_threads(threads, [&] {
      int64_t ph = 0;
      auto each_row = [&](const auto &f) {
        phases.run(ph++, row_items, [&](int64_t i) {
          for (int64_t r = i * b / row_items; r < (i + 1) * b / row_items; ++r) f(r);
        });
      };
      auto product = [&](const Mat &m, const float *in, int64_t k, float *out) {
        const MatJob<I> job{m, in, qa, b, k, out, threads};
        phases.run(ph++, job.items(), [&](int64_t i) { job.run(i); });
      };
      for (int64_t l = 0; l < n_blocks; ++l) {
        const Block &B = blocks[l];
        each_row([&](int64_t r) {
          if (l > 0) add(y + r * d, d, xp + r * d);
          rms_norm_rows(I{}, xp + r * d, 1, d, B.n1, eps, h + r * d);
          quantize(h + r * d, r, d);
        });
        product(B.qkv, h, d, qkv);
        each_row([&](int64_t r) { rope_and_cache(B, r); });
        phases.run(ph++, n_tasks, [&](int64_t t) { attend_task(B, t); });
        if (act || split)
          each_row([&](int64_t r) {
            if (split) combine(r);
            quantize(ctx + r * dq, r, dq);
          });
        product(B.out, ctx, dq, y);
        each_row([&](int64_t r) {
          add(y + r * d, d, xp + r * d);
          rms_norm_rows(I{}, xp + r * d, 1, d, B.n2, eps, h + r * d);
          quantize(h + r * d, r, d);
        });
        product(B.gu, h, d, gu);
        each_row([&](int64_t r) {
          const float *g = gu + r * 2 * hidden;
          silu_mul(I{}, g, g + hidden, hidden, h + r * hidden);
          quantize(h + r * hidden, r, hidden);
        });
        product(B.down, h, hidden, y);
      }
      each_row([&](int64_t r) { add(y + r * d, d, xp + r * d); });
    });
    };
    if (isa == Avx512::code)
      step(Avx512{});
    else
      step(Avx2{});
#else
    throw std::runtime_error("llmlab q4 kernel: built without the x86-64 AVX-512 kernels");
#endif
  })
}

}  // extern "C"
