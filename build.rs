//! Build settings for libtorch (DEVELOPERS.md, "Set-up facts").
//!
//! * an rpath to the torch `lib` folder that torch-sys found (`DEP_TCH_LIBTORCH_LIB`), so the
//!   binary and the test binaries run without `LD_LIBRARY_PATH`;
//! * `libtorch_cuda.so` kept as a `DT_NEEDED` entry: the linker's `--as-needed` drops it because
//!   no symbol of it is referenced directly, and libtorch then never registers its CUDA backend;
//! * `src/shim/llmlab_shim.cpp`, the small C shim over what tch 0.24 does not bind (the fused
//!   AdamW kernel, autocast with a dtype), and `src/shim/llmlab_dist.cpp`, the c10d
//!   binding (TCPStore, ProcessGroupGloo) for data-parallel training, and `src/shim/llmlab_q4.cpp`,
//!   the Q4_1/Q8_0 matrix products of quantized decoding, compiled against the same libtorch with torch-sys's
//!   own flags (C++17, the library's `_GLIBCXX_USE_CXX11_ABI`, warnings off);
//! * `src/shim/llmlab_nccl.cpp`, ProcessGroupNCCL, with `LLMLAB_WITH_NCCL` when the venv holds
//!   the CUDA runtime and NCCL headers ([`nccl_includes`]), else a stub that says so.
use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/shim/llmlab_shim.cpp");
    println!("cargo:rerun-if-changed=src/shim/llmlab_dist.cpp");
    println!("cargo:rerun-if-changed=src/shim/llmlab_q4.cpp");
    println!("cargo:rerun-if-changed=src/shim/llmlab_nccl.cpp");
    println!("cargo:rerun-if-changed=src/shim/llmlab_dist.h");
    println!("cargo:rerun-if-changed=src/shim/llmlab_protect.h");
    println!("cargo:rerun-if-changed=src/shim/gloo_decl");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = match std::env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(lib) => lib,
        Err(_) => panic!(
            "DEP_TCH_LIBTORCH_LIB is not set: torch-sys did not report its libtorch `lib` folder, \
             so llmlab's C++ shim cannot be built. Build with torch-sys finding libtorch \
             (e.g. LIBTORCH_USE_PYTORCH=1 with the venv's python on PATH, or LIBTORCH=DIR); see README.md"
        ),
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{lib}");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    build_shim(Path::new(&lib));
}

/// `_GLIBCXX_USE_CXX11_ABI` of the libtorch torch-sys links, found the way torch-sys finds it:
/// from the Python torch package when `LIBTORCH_USE_PYTORCH` is set, else `LIBTORCH_CXX11_ABI`
/// (default 1).
fn cxx11_abi() -> String {
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    if std::env::var_os("LIBTORCH_USE_PYTORCH").is_none() {
        return std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    }
    let python = if std::env::var_os("VIRTUAL_ENV").is_some() {
        "python"
    } else {
        "python3"
    };
    let out = Command::new(python)
        .args(["-c", "import torch; print(torch._C._GLIBCXX_USE_CXX11_ABI)"])
        .output()
        .unwrap_or_else(|e| panic!("LIBTORCH_USE_PYTORCH is set but `{python}` did not run: {e}"));
    match String::from_utf8_lossy(&out.stdout).trim() {
        "True" => "1".into(),
        "False" => "0".into(),
        other => panic!(
            "`{python} -c 'import torch; print(torch._C._GLIBCXX_USE_CXX11_ABI)'` printed {other:?} ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

fn build_shim(lib: &Path) {
    let include = lib.join("../include");
    if !include.join("ATen/autocast_mode.h").is_file() {
        panic!(
            "libtorch headers not found at {} (expected beside DEP_TCH_LIBTORCH_LIB={}); llmlab's C++ shim needs them",
            include.display(),
            lib.display()
        );
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .flag("-w")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={}", cxx11_abi()))
        .flag("-DGLOG_USE_GLOG_EXPORT");
    let mut nccl = build.clone();
    match nccl_includes(lib) {
        Some(dirs) => {
            for d in dirs {
                nccl.include(d);
            }
            nccl.define("LLMLAB_WITH_NCCL", "1");
            println!("cargo:rustc-link-lib=dylib=c10_cuda");
        }
        None => println!(
            "cargo:warning=no NCCL/CUDA runtime headers in the venv: data-parallel ranks on CUDA are not built (make setup installs them)"
        ),
    }
    build
        // ATen's `parallel_for` is inline OpenMP (`AT_PARALLEL_OPENMP`): without -fopenmp the
        // shim's kernels would run on one thread. libgomp is libtorch's own (torch/lib, by rpath).
        .flag("-fopenmp")
        // The gloo names torch's ProcessGroupGloo.hpp mentions (the wheel ships no gloo headers).
        .include("src/shim/gloo_decl")
        .file("src/shim/llmlab_shim.cpp")
        .file("src/shim/llmlab_dist.cpp")
        .file("src/shim/llmlab_q4.cpp")
        .compile("llmlab_shim");
    // After the shim, which calls it (static libraries link in order).
    nccl.file("src/shim/llmlab_nccl.cpp").compile("llmlab_nccl");
    // The shim's libtorch symbols live in torch_cpu and c10 (torch-sys links them too; naming
    // them after the static library keeps the link order right).
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=gomp");
}

/// The include folders ProcessGroupNCCL.hpp needs, from the venv's nvidia packages beside torch
/// (`site-packages/nvidia/`): CUDA's runtime headers (nvidia-cuda-runtime, with nvidia-cuda-crt's
/// `crt/` and nvidia-cuda-cccl's `nv/target`) and `nccl.h` (nvidia-nccl-cu13); `None` unless all
/// are there and libtorch is a CUDA build.
fn nccl_includes(lib: &Path) -> Option<Vec<std::path::PathBuf>> {
    let nvidia = lib.join("../../nvidia");
    let cuda = nvidia.join("cu13/include");
    let nccl = nvidia.join("nccl/include");
    let needed = [
        lib.join("libtorch_cuda.so"),
        cuda.join("cuda_runtime_api.h"),
        cuda.join("crt/host_config.h"),
        cuda.join("nv/target"),
        nccl.join("nccl.h"),
    ];
    needed.iter().all(|p| p.exists()).then(|| vec![cuda, nccl])
}
