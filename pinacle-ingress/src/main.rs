//! The `pinacle-ingress` binary: parse the command line, run it. Synchronous on purpose: Pingora
//! builds its own runtimes.

use clap::Parser;

fn main() -> std::process::ExitCode {
    pinacle_ingress::cli::run(pinacle_ingress::cli::Cli::parse())
}
