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

/// A command whose output is piped into a reader that stops early (`llada info | head`) ends
/// quietly, as Unix tools do, instead of panicking on the failed write: SIGPIPE goes back to its
/// default action (the Rust runtime ignores it, turning every later print into a panic). Not for
/// `serve`, which writes to sockets and must outlive a client that hangs up.
fn die_quietly_on_broken_pipe() {
    #[cfg(unix)]
    // SAFETY: installs the default disposition of one signal; no handler code runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> std::process::ExitCode {
    // Never hand freed pages back to the OS: every step frees and reallocates the same large
    // buffers, and returned pages come back as page faults and zeroing.
    // SAFETY: plain option setter of the linked allocator.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let args = cli::Cli::parse();
    if !matches!(args.command, cli::Command::Serve(_)) {
        die_quietly_on_broken_pipe();
    }
    cli::init_logging(args.verbose);
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
