//! `--device auto|cpu|cuda|cuda:N`, thread count and seeding shared by every compute command.
use crate::error::LlmError;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

/// Compute precision of training (`train.precision`, `--precision`): `fp32` everywhere, or
/// `bf16` autocast for forward and loss (weights, gradients and AdamW state stay f32). bf16 is
/// meant for CUDA (Ampere or newer); CPU autocast to bf16 works too, mainly for testing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
}

impl Precision {
    /// The autocast dtype, or `None` for full precision.
    pub fn autocast_kind(self) -> Option<Kind> {
        match self {
            Precision::Fp32 => None,
            Precision::Bf16 => Some(Kind::BFloat16),
        }
    }

    pub fn is_fp32(&self) -> bool {
        *self == Precision::Fp32
    }
}

/// Parses a device spec. `auto` picks CUDA device 0 when libtorch sees a GPU, else the CPU.
pub fn parse_device(spec: &str) -> Result<Device, LlmError> {
    let bad = || LlmError::Unknown {
        what: "device",
        name: spec.to_string(),
        expected: vec!["auto".into(), "cpu".into(), "cuda".into(), "cuda:N".into()],
    };
    let dev = match spec.trim().to_ascii_lowercase().as_str() {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        s => match s.strip_prefix("cuda:") {
            Some(n) => Device::Cuda(n.parse::<usize>().map_err(|_| bad())?),
            None => return Err(bad()),
        },
    };
    if let Device::Cuda(i) = dev {
        let n = tch::Cuda::device_count();
        if (i as i64) >= n {
            return Err(LlmError::Usage(format!(
                "device '{spec}' asked for CUDA device {i}, but libtorch sees {n} CUDA device(s); use --device cpu or auto"
            )));
        }
    }
    Ok(dev)
}

/// Human name of a device for logs and benchmark tables.
pub fn device_name(dev: Device) -> String {
    match dev {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Seeds libtorch's CPU and CUDA generators.
pub fn seed_everything(seed: u64) {
    tch::manual_seed(seed as i64);
    if tch::Cuda::is_available() {
        tch::Cuda::manual_seed_all(seed);
    }
}

/// Sets libtorch's intra-op thread count when given.
pub fn set_threads(threads: Option<usize>) {
    if let Some(n) = threads {
        tch::set_num_threads(n as i32);
    }
}

/// The threads each of `jobs` processes gets: an equal share of `threads` (default: the
/// machine's available parallelism), at least 1.
pub fn threads_per_job(threads: Option<usize>, jobs: usize) -> usize {
    let total = threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1)
    });
    (total / jobs.max(1)).max(1)
}

/// Keeps freed heap memory in the process instead of returning it to the OS (glibc:
/// no mmap-backed allocations, a 2 GiB trim threshold). libtorch frees and re-allocates
/// large activation buffers every training step; with glibc's defaults each one is a fresh
/// mmap whose pages fault in again (PERFORMANCE.md measured ~18% of PyTorch's CPU training
/// time there). Measured here: training step 2×256 on gpt2-small, 63–69 → 87–99 tokens/s.
/// `LLMLAB_MALLOC=default` keeps glibc's behaviour.
#[allow(unsafe_code)]
pub fn keep_freed_memory() {
    if std::env::var("LLMLAB_MALLOC").is_ok_and(|v| v == "default") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets glibc allocator parameters; it is called at the start of
    // `main`, before any other thread exists, with valid parameter numbers and values.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
