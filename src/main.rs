//! The `tollgate` binary: parses the command line and maps failure to exit code 1.

use clap::Parser;

fn main() {
    let cli = tollgate::cli::Cli::parse();
    if let Err(e) = tollgate::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
