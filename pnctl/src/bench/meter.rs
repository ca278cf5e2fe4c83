//! `pnctl bench meter`: svc-meter's own ingest benchmark (`svc_meter::bench`): a meter started
//! in this process on a fresh ledger, N synthetic nodes reporting over keep-alive HTTP, then
//! the same load against a no-op handler. It publishes synthetic deployments, so it runs on a
//! scratch nats-server (JetStream with `sync_interval: always`, as the dev stack runs it) that
//! it starts and stops itself — never on a stack with real operations.

use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::parse_duration;
use crate::stack;

#[derive(Debug, Clone, clap::Args)]
pub struct MeterArgs {
    /// Print one JSON object (svc_meter::bench::BenchReport).
    #[arg(long)]
    pub json: bool,
    /// Synthetic nodes.
    #[arg(long, default_value_t = 1000)]
    pub nodes: usize,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 256)]
    pub connections: usize,
    /// Measured time of each phase (meter, then no-op).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Unmeasured load before each phase.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
}

/// A nats-server for this benchmark only: its own port and store, killed on drop.
struct ScratchNats {
    child: tokio::process::Child,
    dir: std::path::PathBuf,
    url: String,
}

impl ScratchNats {
    async fn start() -> anyhow::Result<ScratchNats> {
        let dir = std::env::temp_dir().join(format!("pnctl-bench-meter-{}-{}", std::process::id(), hex::encode(rand::random::<[u8; 4]>())));
        std::fs::create_dir_all(dir.join("js"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let conf = dir.join("nats.conf");
        std::fs::write(
            &conf,
            format!("listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n", dir.join("js").display()),
        )?;
        let child = tokio::process::Command::new(stack::find_nats_server()?)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start a scratch nats-server")?;
        let started = Instant::now();
        while TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(200)).is_err() {
            anyhow::ensure!(started.elapsed() < Duration::from_secs(10), "the scratch nats-server did not listen within 10 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(ScratchNats { child, dir, url: format!("nats://127.0.0.1:{port}") })
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Points fd 1 at stderr; returns the original stdout to restore.
fn redirect_stdout_to_stderr() -> Option<std::os::fd::OwnedFd> {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let saved = nix::unistd::dup(std::io::stdout()).ok()?;
    nix::unistd::dup2_stdout(std::io::stderr()).ok()?;
    Some(saved)
}

pub async fn main(args: &MeterArgs) -> anyhow::Result<()> {
    let nats = ScratchNats::start().await?;
    let opts = svc_meter::bench::BenchOpts {
        nats_url: nats.url.clone(),
        meter_url: None,
        meter_pid: None,
        nodes: args.nodes,
        connections: args.connections,
        duration: args.duration,
        warmup: args.warmup,
        node_interval: Duration::ZERO,
    };
    let load = super::procfs::loadavg();
    // The in-process meter announces its address on stdout (its start-up contract); with
    // --json, stdout must hold the report alone, so that line goes to stderr meanwhile.
    let saved = if args.json { redirect_stdout_to_stderr() } else { None };
    let res = svc_meter::bench::run(opts).await;
    if let Some(fd) = saved {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = nix::unistd::dup2_stdout(&fd);
    }
    nats.stop().await;
    let r = res?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("pnctl bench meter: machine {}; load average {load}", super::procfs::machine());
        println!("{}", serde_json::to_string_pretty(&r)?);
    }
    Ok(())
}
