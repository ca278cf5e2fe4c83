//! Runs `svc_meter::bench` from the command line (what `pnctl bench meter --json` will do):
//! `cargo run --release -p svc-meter --example bench -- NATS_URL [NODES] [CONNECTIONS] [SECONDS] [METER_URL]`.
//! Prints the report as JSON.

use std::time::Duration;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    let num = |i: usize, d: u64| arg(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let opts = svc_meter::bench::BenchOpts {
        nats_url: arg(0).unwrap_or("nats://127.0.0.1:4222").to_string(),
        nodes: num(1, 1000) as usize,
        connections: num(2, 256) as usize,
        duration: Duration::from_secs(num(3, 10)),
        meter_url: arg(4).map(str::to_string),
        ..Default::default()
    };
    let report = svc_meter::bench::run(opts).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
