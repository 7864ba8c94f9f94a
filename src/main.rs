//! The `llada` command: parses arguments, calls the library, prints results.

mod cli;

/// mimalloc keeps freed pages for reuse: the engine allocates and frees many large tensors per
/// step, which with the system allocator means fresh zeroed pages (page faults) every time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

/// `mi_option_purge_delay` in mimalloc v3 (libmimalloc-sys 0.1.49, pinned in Cargo.toml).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Loading a model frees a dense copy of every weight after packing it: return those pages to the
/// OS while `load` runs (purge at once), then go back to keeping freed pages for the run.
pub fn while_loading<T>(load: impl FnOnce() -> T) -> T {
    // SAFETY: plain option setters and a collection call of the linked allocator.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    let out = load();
    unsafe {
        libmimalloc_sys::mi_collect(true);
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
    }
    out
}

fn main() -> std::process::ExitCode {
    // Never hand freed pages back to the OS: every step frees and reallocates the same large
    // buffers, and returned pages come back as page faults and zeroing.
    // SAFETY: plain option setter of the linked allocator.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
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
