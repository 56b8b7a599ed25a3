//! The `pinacle-ingress` binary: parse the command line, run it. Synchronous on purpose: Pingora
//! builds its own runtimes.

use clap::Parser;

/// jemalloc: an idle keep-alive connection costs ~41 KiB resident instead of ~100 KiB with
/// glibc's malloc (Pingora reserves large per-connection buffers it rarely fills); measured with
/// 1,000 idle connections, see the README's speed section.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    pinacle_ingress::cli::run(pinacle_ingress::cli::Cli::parse())
}
