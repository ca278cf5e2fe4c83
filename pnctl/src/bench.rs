//! `pnctl bench`: load and failure benchmarks against the dev stack (owned by the lead; not
//! written yet). Until then it refuses clearly rather than pretending to measure.

/// Runs a benchmark; for now always the error "not implemented yet".
pub async fn run(args: &[String]) -> anyhow::Result<()> {
    let what = if args.is_empty() { String::new() } else { format!(" {}", args.join(" ")) };
    anyhow::bail!("pnctl bench{what}: not implemented yet")
}
