//! The `llmlab` binary: parse the command line, run the library, map errors to exit codes.
use clap::Parser;

fn main() {
    llmlab::device::keep_freed_memory();
    let cli = llmlab::cli::Cli::parse();
    if let Err(err) = llmlab::cli::commands::run(cli) {
        eprintln!("error: {err:#}");
        let code = err
            .chain()
            .find_map(|e| e.downcast_ref::<llmlab::LlmError>())
            .map_or(1, llmlab::LlmError::exit_code);
        std::process::exit(code);
    }
}
