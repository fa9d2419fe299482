//! The integration tests, in one test binary: each test binary links libtorch, so one binary
//! instead of one per file builds and links once. A file's tests are its module's
//! (`cargo test --release classify::` runs `tests/suite/classify.rs`); `common` holds the shared
//! helpers.
//!
//! The tests share one process, so process-global state set by one test is seen by the next.
//! Run them with `--test-threads=1` (as `make test` does): some set such state while they run.
//! What is global, and how the tests keep it from leaking:
//! - the stop flag of `llmlab::signal` (Ctrl-C): [`common::StopAt`] sets it and clears it
//!   again when dropped, also when the test fails;
//! - `llmlab::finetune::set_checkpoint_minutes`: the test that changes it restores the default;
//! - `LLMLAB_DATA_MIRROR`: set by some tests, always to [`common::mirror`] (what the others pass
//!   to their child processes);
//! - libtorch's random generator: every test whose numbers depend on it seeds it first
//!   (`tch::manual_seed`, or a model load that seeds it);
//! - libtorch's thread count: no test changes it in this process (runs that set `threads` are
//!   separate `llmlab` processes);
//! - the `serve` tests' shared server (an engine thread holding SmolLM2-135M in f32, idle once
//!   they are done) lives until the process ends.
mod common;

mod classify;
mod cli;
mod cuda;
mod data;
mod ddp;
mod dpo;
mod eval;
mod experiment;
mod generate;
mod gguf;
mod instruct;
mod llama;
mod model;
mod preferences;
mod reference_cache;
mod runner;
mod serve;
mod serve_engine;
mod serve_page;
mod slurm;
mod tensorboard;
mod tokenizer;
mod train;
