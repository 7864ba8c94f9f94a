//! The `llada` command: parses arguments, calls the library, prints results.

mod cli;

/// mimalloc keeps freed pages for reuse: the engine allocates and frees many large tensors per
/// step, which with the system allocator means fresh zeroed pages (page faults) every time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging(args.verbose);
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
