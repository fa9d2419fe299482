//! Link-time settings for libtorch (DEVELOPERS.md, "Set-up facts").
//!
//! * an rpath to the torch `lib` folder that torch-sys found (`DEP_TCH_LIBTORCH_LIB`), so the
//!   binary and the test binaries run without `LD_LIBRARY_PATH`;
//! * `libtorch_cuda.so` kept as a `DT_NEEDED` entry: the linker's `--as-needed` drops it because
//!   no symbol of it is referenced directly, and libtorch then never registers its CUDA backend.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{lib}");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
