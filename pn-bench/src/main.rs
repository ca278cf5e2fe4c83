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
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pnctl: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        if std::env::var_os("RUST_LOG").is_some() {
            kit::telemetry::init(kit::config::LogFormat::Human);
        }
        kit::init_crypto();
        match pn_bench::run(&cli.what, cli.data_dir.clone()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pnctl: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}
