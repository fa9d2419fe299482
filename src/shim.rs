//! Safe wrappers over `src/shim/llmlab_shim.cpp`, the C++ shim for what tch 0.24 does not bind
//! (issue 3): libtorch's fused AdamW kernel (`at::_fused_adamw_`, PyTorch's
//! `torch.optim.AdamW(fused=True)`) and autocast with a chosen dtype per device type (tch's
//! `tch::autocast` only toggles CUDA autocast with its default fp16).
//!
//! It also binds libtorch's distributed engine, c10d (`src/shim/llmlab_dist.cpp`, issue 19): a
//! `TCPStore` rendezvous and a `ProcessGroupGloo` whose all-reduce, broadcast and barrier
//! [`ProcessGroup`] wraps.
//!
//! And it holds llmlab's own CPU kernels for GGUF-quantized weights (`src/shim/llmlab_q4.cpp`,
//! issue 20): `y = x Wᵀ` with `W` in Q4_1 or Q8_0 blocks, and their dequantization
//! ([`crate::nn::quant`] owns the layout and the dispatch).
//!
//! The only `unsafe` of the crate besides `device::keep_freed_memory`: each block passes tch
//! tensor handles (`*const C_tensor`, a `torch::Tensor*`) that outlive the call, and every shim
//! function returns NULL or an error string that [`check`] copies and frees.
#![allow(unsafe_code)]

use crate::device::Precision;
use crate::error::LlmError;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::marker::PhantomData;
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn llmlab_free_error(err: *mut c_char);
    fn llmlab_fused_adamw(
        params: *const *const C_tensor,
        grads: *const *const C_tensor,
        exp_avgs: *const *const C_tensor,
        exp_avg_sqs: *const *const C_tensor,
        state_steps: *const *const C_tensor,
        n: usize,
        step: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> *mut c_char;
    fn llmlab_autocast_get(device: c_int, enabled: *mut c_int, dtype: *mut c_int) -> *mut c_char;
    fn llmlab_autocast_set(device: c_int, enabled: c_int, dtype: c_int) -> *mut c_char;
    fn llmlab_autocast_increment_nesting(depth: *mut c_int) -> *mut c_char;
    fn llmlab_autocast_decrement_nesting(depth: *mut c_int) -> *mut c_char;
    fn llmlab_autocast_clear_cache() -> *mut c_char;
    fn llmlab_dist_init_gloo(
        addr: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        iface: *const c_char,
        bind_host: *const c_char,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn llmlab_dist_init_nccl(
        addr: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn llmlab_nccl_built() -> c_int;
    fn llmlab_dist_free(group: *mut c_void);
    fn llmlab_dist_allreduce_sum(
        group: *mut c_void,
        ts: *const *const C_tensor,
        n: usize,
    ) -> *mut c_char;
    fn llmlab_dist_broadcast(
        group: *mut c_void,
        ts: *const *const C_tensor,
        n: usize,
        root: c_int,
    ) -> *mut c_char;
    fn llmlab_dist_barrier(group: *mut c_void) -> *mut c_char;
    fn llmlab_dist_reducer_new(
        group: *mut c_void,
        params: *const *const C_tensor,
        n: usize,
        sizes: *const usize,
        nb: usize,
        world: c_int,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn llmlab_dist_reducer_arm(handle: *mut c_void);
    fn llmlab_dist_reducer_finish(handle: *mut c_void) -> *mut c_char;
    fn llmlab_dist_reducer_free(handle: *mut c_void);
    fn llmlab_q_kernels_built() -> c_int;
    fn llmlab_vnni_peak(reps: i64, out: *mut f64) -> *mut c_char;
    fn llmlab_f32_mm(
        isa: c_int,
        x: *const C_tensor,
        w: *const C_tensor,
        y: *mut C_tensor,
    ) -> *mut c_char;
    fn llmlab_llama_decode(
        x: *mut C_tensor,
        w: *const *const C_tensor,
        n_blocks: i64,
        isa: c_int,
        layout: c_int,
        k_caches: *const *mut C_tensor,
        v_caches: *const *mut C_tensor,
        pos: *const C_tensor,
        cos: *const C_tensor,
        sin: *const C_tensor,
        n_heads: i64,
        n_kv: i64,
        eps: f64,
    ) -> *mut c_char;
    fn llmlab_profile_start(path: *const c_char, out: *mut *mut c_void) -> *mut c_char;
    fn llmlab_profile_stop(profile: *mut c_void) -> *mut c_char;
    fn llmlab_q4_1_mm(
        isa: c_int,
        x: *const C_tensor,
        qs: *const C_tensor,
        d: *const C_tensor,
        m: *const C_tensor,
        y: *mut C_tensor,
    ) -> *mut c_char;
    fn llmlab_q8_0_mm(
        isa: c_int,
        x: *const C_tensor,
        qs: *const C_tensor,
        d: *const C_tensor,
        y: *mut C_tensor,
    ) -> *mut c_char;
    fn llmlab_q4_1_dequant(
        isa: c_int,
        qs: *const C_tensor,
        d: *const C_tensor,
        m: *const C_tensor,
        w: *mut C_tensor,
    ) -> *mut c_char;
    fn llmlab_q8_0_dequant(
        qs: *const C_tensor,
        d: *const C_tensor,
        w: *mut C_tensor,
    ) -> *mut c_char;
    fn llmlab_x16_pack(
        bits: c_int,
        qs: *const C_tensor,
        d: *const C_tensor,
        m: *const C_tensor,
        qs16: *mut C_tensor,
        d16: *mut C_tensor,
        m16: *mut C_tensor,
    ) -> *mut c_char;
    fn llmlab_x16_mm(
        isa: c_int,
        bits: c_int,
        act_bits: c_int,
        x: *const C_tensor,
        qs16: *const C_tensor,
        d16: *const C_tensor,
        m16: *const C_tensor,
        y: *mut C_tensor,
    ) -> *mut c_char;
    fn llmlab_x16_dequant(
        bits: c_int,
        qs16: *const C_tensor,
        d16: *const C_tensor,
        m16: *const C_tensor,
        w: *mut C_tensor,
    ) -> *mut c_char;
}

/// Turns a shim return value into a `Result`, freeing the error string.
fn check(err: *mut c_char, op: &'static str) -> Result<(), LlmError> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string malloc'd by the shim; we copy it
    // and hand it back to the shim's `free` exactly once.
    let message = unsafe {
        let m = CStr::from_ptr(err).to_string_lossy().into_owned();
        llmlab_free_error(err);
        m
    };
    Err(LlmError::Torch { op, message })
}

/// The tensors of one fused AdamW step, index-aligned: parameter i, its gradient, its two
/// moments and its step tensor (a float scalar on the parameter's device).
pub struct FusedAdamWTensors<'a> {
    pub params: &'a [&'a Tensor],
    pub grads: &'a [&'a Tensor],
    pub exp_avgs: &'a [&'a Tensor],
    pub exp_avg_sqs: &'a [&'a Tensor],
    pub state_steps: &'a [&'a Tensor],
}

/// AdamW's hyper-parameters for one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// One AdamW update of every parameter in place with libtorch's fused kernel
/// (`at::_fused_adamw_`, amsgrad and maximize off, no grad scaler). `step` is the step count
/// after this update (t in the bias corrections); the shim writes it into every `state_steps`
/// tensor first, since the kernel reads the count from there and never increments it.
pub fn fused_adamw_step(t: &FusedAdamWTensors, step: i64, h: AdamWHyper) -> Result<(), LlmError> {
    let n = t.params.len();
    for (what, len) in [
        ("grads", t.grads.len()),
        ("exp_avgs", t.exp_avgs.len()),
        ("exp_avg_sqs", t.exp_avg_sqs.len()),
        ("state_steps", t.state_steps.len()),
    ] {
        if len != n {
            return Err(LlmError::Torch {
                op: "_fused_adamw_",
                message: format!("{n} params but {len} {what}"),
            });
        }
    }
    let ptrs = |ts: &[&Tensor]| ts.iter().map(|x| x.as_ptr()).collect::<Vec<_>>();
    let (p, g, m, v, s) = (
        ptrs(t.params),
        ptrs(t.grads),
        ptrs(t.exp_avgs),
        ptrs(t.exp_avg_sqs),
        ptrs(t.state_steps),
    );
    let _no_grad = tch::no_grad_guard();
    // SAFETY: the five arrays hold `n` handles each, borrowed from live `Tensor`s for the
    // whole call; the shim only reads the handles (it updates the tensors' data in place).
    let err = unsafe {
        llmlab_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            n,
            step as f64,
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
        )
    };
    check(err, "_fused_adamw_")
}

fn device_code(device: Device) -> Result<c_int, LlmError> {
    match device {
        Device::Cpu => Ok(0),
        Device::Cuda(_) => Ok(1),
        other => Err(LlmError::Usage(format!(
            "autocast is supported on cpu and cuda, not {other:?}"
        ))),
    }
}

fn kind_code(kind: Kind) -> Result<c_int, LlmError> {
    match kind {
        Kind::Float => Ok(0),
        Kind::BFloat16 => Ok(1),
        Kind::Half => Ok(2),
        other => Err(LlmError::Usage(format!(
            "autocast dtype must be bf16, f16 or f32, not {other:?}"
        ))),
    }
}

fn code_kind(code: c_int) -> Option<Kind> {
    match code {
        0 => Some(Kind::Float),
        1 => Some(Kind::BFloat16),
        2 => Some(Kind::Half),
        _ => None,
    }
}

/// Whether autocast is on for `device`'s type in this thread, and its lower-precision dtype
/// (`None` if it is one the shim does not name).
pub fn autocast_state(device: Device) -> Result<(bool, Option<Kind>), LlmError> {
    let d = device_code(device)?;
    let (mut enabled, mut dtype) = (0, -1);
    // SAFETY: both out-pointers point at live locals.
    check(
        unsafe { llmlab_autocast_get(d, &mut enabled, &mut dtype) },
        "autocast state",
    )?;
    Ok((enabled != 0, code_kind(dtype)))
}

/// Sets the flag and dtype code (negative: keep the dtype).
fn set_autocast(d: c_int, enabled: bool, dtype: c_int) -> Result<(), LlmError> {
    // SAFETY: plain values; the shim validates the codes.
    check(
        unsafe { llmlab_autocast_set(d, c_int::from(enabled), dtype) },
        "set autocast",
    )
}

/// Autocast on for one device type while the guard lives (`torch.autocast(device_type,
/// dtype)`): ops on the autocast lists run in `dtype` (matmuls, linear layers), precision-
/// sensitive ones (softmax, log-softmax, losses, norms) in f32. Dropping the guard restores
/// the previous enabled flag and dtype, also when the guarded code returned an error or
/// panicked, and clears the cast-weight cache when the outermost guard ends (weights change
/// at the next optimizer step). Autocast state is per thread, so the guard is `!Send`.
#[must_use = "autocast is off again as soon as the guard is dropped"]
pub struct AutocastGuard {
    device: c_int,
    prev_enabled: bool,
    prev_dtype: c_int,
    _not_send: PhantomData<*const ()>,
}

impl AutocastGuard {
    pub fn new(device: Device, dtype: Kind) -> Result<Self, LlmError> {
        let d = device_code(device)?;
        let k = kind_code(dtype)?;
        let (mut prev_enabled, mut prev_dtype) = (0, -1);
        // SAFETY: both out-pointers point at live locals.
        check(
            unsafe { llmlab_autocast_get(d, &mut prev_enabled, &mut prev_dtype) },
            "autocast state",
        )?;
        set_autocast(d, true, k)?;
        let mut depth = 0;
        // SAFETY: the out-pointer points at a live local.
        check(
            unsafe { llmlab_autocast_increment_nesting(&mut depth) },
            "autocast nesting",
        )?;
        Ok(Self {
            device: d,
            prev_enabled: prev_enabled != 0,
            prev_dtype,
            _not_send: PhantomData,
        })
    }
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        // Errors cannot propagate out of drop; these calls only fail on invalid codes, which
        // `new` has ruled out, so each result is checked (freeing any message) and dropped.
        let mut depth = 0;
        // SAFETY: the out-pointer points at a live local.
        let nested = check(
            unsafe { llmlab_autocast_decrement_nesting(&mut depth) },
            "autocast nesting",
        );
        if nested.is_ok() && depth == 0 {
            // SAFETY: no arguments.
            let _ = check(unsafe { llmlab_autocast_clear_cache() }, "autocast cache");
        }
        // An unknown previous dtype (-1) leaves the dtype as is; the flag is restored anyway.
        let _ = set_autocast(self.device, self.prev_enabled, self.prev_dtype);
    }
}

/// Runs `f` under autocast on `device`'s type at `precision` (see [`AutocastGuard`]);
/// `Precision::Fp32` runs it as is.
pub fn with_autocast<T>(
    device: Device,
    precision: Precision,
    f: impl FnOnce() -> T,
) -> Result<T, LlmError> {
    match precision.autocast_kind() {
        None => Ok(f()),
        Some(k) => {
            let _guard = AutocastGuard::new(device, k)?;
            Ok(f())
        }
    }
}

/// Where a gloo process group binds its sockets on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlooBind {
    /// A network interface (`GLOO_SOCKET_IFNAME`).
    Interface(String),
    /// An address or host name of this machine (e.g. `127.0.0.1` for local ranks).
    Host(String),
    /// The address the machine's host name resolves to (c10d's default).
    Default,
}

/// One rank's membership of a c10d process group (`ProcessGroupGloo`, CPU tensors). Rank 0
/// runs the `TCPStore` server at `addr:port`; every wait gives up after the timeout with an
/// error instead of hanging (a dead peer usually shows up sooner, as a closed connection).
pub struct ProcessGroup {
    ptr: *mut c_void,
}

/// The collective engine of a [`ProcessGroup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// `ProcessGroupGloo`, CPU tensors, its sockets bound as given.
    Gloo(GlooBind),
    /// `ProcessGroupNCCL`, CUDA tensors (see [`nccl_built`]).
    Nccl,
}

impl ProcessGroup {
    pub fn join(
        backend: &Backend,
        addr: &str,
        port: u16,
        rank: usize,
        world: usize,
        timeout: std::time::Duration,
    ) -> Result<Self, LlmError> {
        let c = |s: &str| {
            CString::new(s).map_err(|_| LlmError::Usage(format!("{s:?} contains a NUL byte")))
        };
        let addr_c = c(addr)?;
        let (port, rank, world) = (c_int::from(port), rank as c_int, world as c_int);
        let timeout_ms = timeout.as_millis() as i64;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: the strings are NUL-terminated and outlive the call; `ptr` receives a group
        // the shim allocated, which `Drop` frees exactly once.
        let (err, what) = match backend {
            Backend::Gloo(bind) => {
                let (iface, host) = match bind {
                    GlooBind::Interface(i) => (Some(c(i)?), None),
                    GlooBind::Host(h) => (None, Some(c(h)?)),
                    GlooBind::Default => (None, None),
                };
                let opt = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
                let err = unsafe {
                    llmlab_dist_init_gloo(
                        addr_c.as_ptr(),
                        port,
                        rank,
                        world,
                        timeout_ms,
                        opt(&iface),
                        opt(&host),
                        &mut ptr,
                    )
                };
                (err, "c10d rendezvous (TCPStore + ProcessGroupGloo)")
            }
            Backend::Nccl => {
                let err = unsafe {
                    llmlab_dist_init_nccl(addr_c.as_ptr(), port, rank, world, timeout_ms, &mut ptr)
                };
                (err, "c10d rendezvous (TCPStore + ProcessGroupNCCL)")
            }
        };
        check(err, what)?;
        Ok(Self { ptr })
    }

    /// In-place sum of each tensor over the ranks (the collectives run concurrently).
    pub fn allreduce_sum(&self, ts: &[&Tensor]) -> Result<(), LlmError> {
        let p: Vec<_> = ts.iter().map(|t| t.as_ptr()).collect();
        // SAFETY: `p` holds handles of live tensors for the whole call.
        check(
            unsafe { llmlab_dist_allreduce_sum(self.ptr, p.as_ptr(), p.len()) },
            "c10d all-reduce",
        )
    }

    /// In-place broadcast of each tensor from rank `root`.
    pub fn broadcast(&self, ts: &[&Tensor], root: usize) -> Result<(), LlmError> {
        let p: Vec<_> = ts.iter().map(|t| t.as_ptr()).collect();
        // SAFETY: as in `allreduce_sum`.
        check(
            unsafe { llmlab_dist_broadcast(self.ptr, p.as_ptr(), p.len(), root as c_int) },
            "c10d broadcast",
        )
    }

    pub fn barrier(&self) -> Result<(), LlmError> {
        // SAFETY: `self.ptr` is a live group.
        check(unsafe { llmlab_dist_barrier(self.ptr) }, "c10d barrier")
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: the group was allocated by `llmlab_dist_init_gloo` and is freed once.
        unsafe { llmlab_dist_free(self.ptr) }
    }
}

impl ProcessGroup {
    /// DDP's reducer over `buckets` of parameters (leaves that require grad), listed in the
    /// order backward reaches them: once [`GradReducer::arm`]ed, each bucket's all-reduce starts
    /// on gloo's threads as soon as backward has accumulated the last of its gradients, while
    /// backward goes on. The parameters carry its autograd hooks until it is dropped.
    pub fn reducer(
        &self,
        buckets: &[Vec<Tensor>],
        world: usize,
    ) -> Result<GradReducer<'_>, LlmError> {
        let p: Vec<_> = buckets.iter().flatten().map(|t| t.as_ptr()).collect();
        let sizes: Vec<usize> = buckets.iter().map(Vec::len).collect();
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: `p` holds handles of live tensors (the reducer keeps its own references) and
        // `sizes` adds up to `p.len()` (the shim checks); `ptr` receives a reducer that `Drop`
        // frees once, before the group it points to (the borrow of `self`).
        let err = unsafe {
            llmlab_dist_reducer_new(
                self.ptr,
                p.as_ptr(),
                p.len(),
                sizes.as_ptr(),
                sizes.len(),
                world as c_int,
                &mut ptr,
            )
        };
        check(err, "c10d gradient reducer")?;
        Ok(GradReducer {
            ptr,
            _group: std::marker::PhantomData,
        })
    }
}

/// See [`ProcessGroup::reducer`].
pub struct GradReducer<'a> {
    ptr: *mut c_void,
    _group: std::marker::PhantomData<&'a ProcessGroup>,
}

impl GradReducer<'_> {
    /// The next backward is the step's last: reduce its gradients as they become ready.
    pub fn arm(&self) {
        // SAFETY: `self.ptr` is a live reducer.
        unsafe { llmlab_dist_reducer_arm(self.ptr) }
    }

    /// After that backward: starts the buckets still waiting (parameters without a gradient),
    /// waits for every all-reduce and writes each gradient's mean over the ranks back.
    pub fn finish(&self) -> Result<(), LlmError> {
        // SAFETY: `self.ptr` is a live reducer.
        check(
            unsafe { llmlab_dist_reducer_finish(self.ptr) },
            "c10d all-reduce",
        )
    }
}

impl Drop for GradReducer<'_> {
    fn drop(&mut self) {
        // SAFETY: allocated by `llmlab_dist_reducer_new`, freed once; removes the hooks.
        unsafe { llmlab_dist_reducer_free(self.ptr) }
    }
}

/// Whether this build has ProcessGroupNCCL (build.rs found the CUDA runtime and NCCL headers).
pub fn nccl_built() -> bool {
    // SAFETY: a constant query.
    unsafe { llmlab_nccl_built() != 0 }
}

/// Whether this build has the Q4_1/Q8_0 kernels (an x86-64 build); whether the CPU can run them
/// is [`crate::nn::quant::QuantKernel`]'s check.
pub fn q_kernels_built() -> bool {
    // SAFETY: takes and returns plain integers.
    unsafe { llmlab_q_kernels_built() != 0 }
}

/// `vpdpbusd` instructions a second on every thread of the pool together (12 independent chains
/// a thread, `reps` rounds): the arithmetic ceiling of the VNNI kernels, as the bandwidth is
/// batch 1's. The caller checks the CPU has AVX-512 VNNI.
pub fn vnni_peak(reps: i64) -> Result<f64, LlmError> {
    let mut out = 0.0;
    // SAFETY: writes one f64 into `out`.
    let err = unsafe { llmlab_vnni_peak(reps, &mut out) };
    check(err, "vnni peak")?;
    Ok(out)
}

/// The instruction set the shim's f32-activation kernels run in (its `isa` codes): each kernel
/// has an AVX-512 and an AVX2 (with FMA and F16C) form. The shim refuses one the CPU lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512 = 0,
    Avx2 = 1,
}

/// `y (b, n) = x (b, k) · Wᵀ`, `W` in Q4_1 blocks: `qs (n, k/2)` uint8, `d`, `m` `(n, k/32)` f16;
/// `x` and `y` contiguous f32 on the CPU.
pub fn q4_1_mm(
    isa: Isa,
    x: &Tensor,
    qs: &Tensor,
    d: &Tensor,
    m: &Tensor,
    y: &mut Tensor,
) -> Result<(), LlmError> {
    // SAFETY: the handles are borrowed from live tensors for the call; the shim checks their
    // dtypes, shapes and contiguity before reading them and writes only into `y`.
    let err = unsafe {
        llmlab_q4_1_mm(
            isa as c_int,
            x.as_ptr(),
            qs.as_ptr(),
            d.as_ptr(),
            m.as_ptr(),
            y.as_mut_ptr(),
        )
    };
    check(err, "q4_1 matmul")
}

/// `y (b, n) = x (b, k) · Wᵀ`, `W` in Q8_0 blocks: `qs (n, k)` int8, `d (n, k/32)` f16.
pub fn q8_0_mm(
    isa: Isa,
    x: &Tensor,
    qs: &Tensor,
    d: &Tensor,
    y: &mut Tensor,
) -> Result<(), LlmError> {
    // SAFETY: as `q4_1_mm`.
    let err = unsafe {
        llmlab_q8_0_mm(
            isa as c_int,
            x.as_ptr(),
            qs.as_ptr(),
            d.as_ptr(),
            y.as_mut_ptr(),
        )
    };
    check(err, "q8_0 matmul")
}

/// `w (n, k)` f32 = the Q4_1 weight `(qs, d, m)`.
pub fn q4_1_dequant(
    isa: Isa,
    qs: &Tensor,
    d: &Tensor,
    m: &Tensor,
    w: &mut Tensor,
) -> Result<(), LlmError> {
    // SAFETY: as `q4_1_mm`.
    let err = unsafe {
        llmlab_q4_1_dequant(
            isa as c_int,
            qs.as_ptr(),
            d.as_ptr(),
            m.as_ptr(),
            w.as_mut_ptr(),
        )
    };
    check(err, "q4_1 dequantize")
}

/// `w (n, k)` f32 = the Q8_0 weight `(qs, d)`.
pub fn q8_0_dequant(qs: &Tensor, d: &Tensor, w: &mut Tensor) -> Result<(), LlmError> {
    // SAFETY: as `q4_1_mm`.
    let err = unsafe { llmlab_q8_0_dequant(qs.as_ptr(), d.as_ptr(), w.as_mut_ptr()) };
    check(err, "q8_0 dequantize")
}

/// Blocks in the shim's interleaved "x16" layout (16 weight rows side by side, for integer
/// activations; see `src/shim/llmlab_q4.cpp`): `bits` 4 from Q4_1 (`qs16 (n/16, k/32·256)`
/// uint8, `d16`, `m16 (n/16, k/32·16)` f16) or 8 from Q8_0 (`qs16 (n/16, k/32·512)`, `d16`; no
/// `m16`), multiplied by activations quantized to `act_bits` (8 or 16) with the kernels of
/// `isa`: AVX-512 VNNI, or AVX2 (Q8_0 with 16-bit activations only).
pub struct X16<'a> {
    pub isa: Isa,
    pub bits: i32,
    pub act_bits: i32,
    pub qs16: &'a Tensor,
    pub d16: &'a Tensor,
    pub m16: Option<&'a Tensor>,
}

impl X16<'_> {
    fn m16_ptr(&self) -> *const C_tensor {
        self.m16.map_or(std::ptr::null(), Tensor::as_ptr)
    }
}

/// Fills x16 tensors (allocated with their shapes; `bits` 4 or 8) from GGUF-layout blocks: Q4_1
/// `(qs (n, k/2) uint8, d, Some(m))` into `(qs16, d16, Some(m16))`, or Q8_0 `(qs (n, k) int8, d,
/// None)` into `(qs16, d16, None)`.
pub fn x16_pack(
    bits: i32,
    (qs, d, m): (&Tensor, &Tensor, Option<&Tensor>),
    (qs16, d16, m16): (&mut Tensor, &mut Tensor, Option<&mut Tensor>),
) -> Result<(), LlmError> {
    // SAFETY: as `q4_1_mm`; the shim writes only into the x16 tensors, which it checks first.
    let err = unsafe {
        llmlab_x16_pack(
            bits,
            qs.as_ptr(),
            d.as_ptr(),
            m.map_or(std::ptr::null(), Tensor::as_ptr),
            qs16.as_mut_ptr(),
            d16.as_mut_ptr(),
            m16.map_or(std::ptr::null_mut(), |t| t.as_mut_ptr()),
        )
    };
    check(err, "x16 repack")
}

/// `y (b, n) = x (b, k) · Wᵀ`, `W` in an x16 layout, the activations quantized to `w.act_bits`
/// per block of 32 (the shim refuses an instruction set the CPU lacks).
pub fn x16_mm(x: &Tensor, w: &X16, y: &mut Tensor) -> Result<(), LlmError> {
    // SAFETY: as `q4_1_mm`.
    let err = unsafe {
        llmlab_x16_mm(
            w.isa as c_int,
            w.bits,
            w.act_bits,
            x.as_ptr(),
            w.qs16.as_ptr(),
            w.d16.as_ptr(),
            w.m16_ptr(),
            y.as_mut_ptr(),
        )
    };
    check(err, "x16 matmul")
}

/// `w (n, k)` f32 = the weight an x16 layout holds.
pub fn x16_dequant(x16: &X16, w: &mut Tensor) -> Result<(), LlmError> {
    // SAFETY: as `q4_1_mm`.
    let err = unsafe {
        llmlab_x16_dequant(
            x16.bits,
            x16.qs16.as_ptr(),
            x16.d16.as_ptr(),
            x16.m16_ptr(),
            w.as_mut_ptr(),
        )
    };
    check(err, "x16 dequantize")
}

/// libtorch's operator profiler (the legacy `RecordProfile`): while it lives, every operator
/// this thread dispatches is recorded with its CPU time; dropping it writes a chrome://tracing
/// JSON file (`llmlab bench generate --profile`).
pub struct OpProfile {
    handle: *mut c_void,
}

impl OpProfile {
    pub fn start(path: &std::path::Path) -> Result<Self, LlmError> {
        // libtorch opens the file without reporting a failure: create it here, naming the path.
        std::fs::File::create(path).map_err(|e| LlmError::BadFile {
            path: path.to_path_buf(),
            message: format!("cannot create the profile trace: {e}"),
        })?;
        let c = CString::new(path.to_string_lossy().as_bytes()).map_err(|_| LlmError::Torch {
            op: "profile",
            message: format!("{}: a path with a NUL byte", path.display()),
        })?;
        let mut handle = std::ptr::null_mut();
        // SAFETY: `c` outlives the call; the shim writes a new RecordProfile's address.
        check(
            unsafe { llmlab_profile_start(c.as_ptr(), &mut handle) },
            "profile",
        )?;
        Ok(Self { handle })
    }
}

impl Drop for OpProfile {
    fn drop(&mut self) {
        // SAFETY: `handle` came from `llmlab_profile_start` and is freed exactly once here.
        let err = unsafe { llmlab_profile_stop(self.handle) };
        if let Err(e) = check(err, "profile") {
            eprintln!("warning: {e}");
        }
    }
}

/// A projection of the fused decoding step: Q4_1 blocks `(qs, d, m)`, a dense f32 `(out, in)`,
/// or Q4_1x16 blocks `(qs16, d16, m16)` with activations of `act_bits` (16 or 8).
#[derive(Clone, Copy)]
pub enum DecodeWeight<'a> {
    Q41([&'a Tensor; 3]),
    Dense(&'a Tensor),
    Q41x16 {
        blocks: [&'a Tensor; 3],
        act_bits: i32,
    },
}

impl DecodeWeight<'_> {
    /// The shim's `layout` code (0 Q4_1, 1 dense f32, 2 and 3 Q4_1x16 with 16- and 8-bit
    /// activations).
    pub fn layout(&self) -> i32 {
        self.handles().0
    }

    /// The shim's `layout` code, and the three handles it reads.
    fn handles(&self) -> (c_int, [*const C_tensor; 3]) {
        match self {
            Self::Q41(t) => (0, t.map(Tensor::as_ptr)),
            Self::Dense(t) => (1, [t.as_ptr(); 3]),
            Self::Q41x16 { blocks, act_bits } => (
                if *act_bits == 8 { 3 } else { 2 },
                blocks.map(Tensor::as_ptr),
            ),
        }
    }
}

/// A Llama block's decoding step (`llmlab_llama_decode`): the tensors it reads. The four
/// projections share one layout (all Q4_1, all dense f32 or all Q4_1x16 with the same
/// activation bits).
pub struct LlamaDecodeBlock<'a> {
    /// `(emb,)` f32 each.
    pub norm1: &'a Tensor,
    pub norm2: &'a Tensor,
    /// The fused q/k/v, the output, the fused gate/up (gate rows first) and the down projections.
    pub qkv: DecodeWeight<'a>,
    pub out: DecodeWeight<'a>,
    pub gate_up: DecodeWeight<'a>,
    pub down: DecodeWeight<'a>,
}

/// `y (b, n) = x (b, k) · Wᵀ` with a dense f32 `W (n, k)` (`k` a multiple of 16) by llmlab's
/// kernel: decoding's output head.
pub fn f32_mm(isa: Isa, x: &Tensor, w: &Tensor, y: &mut Tensor) -> Result<(), LlmError> {
    // SAFETY: as `q4_1_mm`.
    let err = unsafe { llmlab_f32_mm(isa as c_int, x.as_ptr(), w.as_ptr(), y.as_mut_ptr()) };
    check(err, "f32 matmul")
}

/// One fused decoding step of a Llama model's blocks (Q4_1 or dense f32 weights) for `b` rows,
/// each at its own position `pos (b,)` int64: `x (b, emb)` f32 is updated in place and each
/// row's key and value are written into its block's `caches` (key and value `(rows >= b, n_kv,
/// capacity, head_dim)` f32 or f16, one pair a block) at its position; `cos`, `sin`
/// `(positions, head_dim)` f32 (see `src/shim/llmlab_q4.cpp`). The whole step is one parallel
/// region of the thread pool, with the kernels of `isa` (Q4_1x16 blocks need [`Isa::Avx512`]).
#[allow(clippy::too_many_arguments)]
pub fn llama_decode(
    isa: Isa,
    x: &mut Tensor,
    blocks: &[LlamaDecodeBlock],
    caches: &mut [(&mut Tensor, &mut Tensor)],
    pos: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    n_heads: i64,
    n_kv: i64,
    eps: f64,
) -> Result<(), LlmError> {
    if blocks.is_empty() || blocks.len() != caches.len() {
        return Err(LlmError::Usage(format!(
            "llama decode step: {} blocks and {} caches (one pair a block, at least one)",
            blocks.len(),
            caches.len()
        )));
    }
    let layout = blocks[0].qkv.handles().0;
    let mut w = Vec::with_capacity(14 * blocks.len());
    for block in blocks {
        w.extend([block.norm1.as_ptr(), block.norm2.as_ptr()]);
        for p in [block.qkv, block.out, block.gate_up, block.down] {
            let (l, handles) = p.handles();
            if l != layout {
                return Err(LlmError::Usage(
                    "llama decode step: every projection must share one layout".into(),
                ));
            }
            w.extend(handles);
        }
    }
    let (k, v): (Vec<_>, Vec<_>) = caches
        .iter_mut()
        .map(|(k, v)| (k.as_mut_ptr(), v.as_mut_ptr()))
        .unzip();
    // SAFETY: every handle is borrowed from a live tensor for the call; the shim checks dtypes,
    // shapes, contiguity and positions before touching data, and writes only into `x` and the
    // caches, which are borrowed mutably.
    let err = unsafe {
        llmlab_llama_decode(
            x.as_mut_ptr(),
            w.as_ptr(),
            blocks.len() as i64,
            isa as c_int,
            layout,
            k.as_ptr(),
            v.as_ptr(),
            pos.as_ptr(),
            cos.as_ptr(),
            sin.as_ptr(),
            n_heads,
            n_kv,
            eps,
        )
    };
    check(err, "llama decode step")
}
