//! The `tollgate` binary: parses the command line and maps failure to exit code 1.

use clap::Parser;

/// mimalloc: fewer bytes per small allocation than glibc's malloc (cached records are many small
/// strings) and faster on the request path's header work; see BENCHMARKS.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = tollgate::cli::Cli::parse();
    if cli.may_die_of_sigpipe() {
        // A command whose output is piped into `head` ends quietly when the reader goes away, as
        // Unix tools do (Rust ignores SIGPIPE, so printing would panic); the servers keep
        // ignoring it, a closed connection being an error to handle, not a reason to stop.
        sigpipe::reset();
    }
    if let Err(e) = tollgate::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
