//! `pn-bench`: the benchmarks (see the library). The operator runs them as `pnctl bench …`,
//! which runs this binary (found next to pnctl) with the same arguments.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Benchmarks on a dev stack of their own: pipeline, footprint, meter.
#[derive(Debug, Parser)]
#[command(name = "pnctl bench", version)]
struct Cli {
    /// Keep the benchmark's stack in this directory (default: a fresh temporary one, removed
    /// at the end).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    what: pn_bench::BenchCmd,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    pnctl::cli::run_tool(async move { pn_bench::run(&cli.what, cli.data_dir.clone()).await.map(|()| ExitCode::SUCCESS) })
}
