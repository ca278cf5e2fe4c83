//! `pnctl bench footprint`: each service's idle RSS in a fresh dev stack, its start-to-ready
//! time (spawn → `/readyz` 200, a second instance started against that stack with its own empty
//! state dir and ops port), and the image size. There is no Docker engine and no musl target
//! here, so the image size is an estimate: the one binary the image copies — the multi-call
//! `pnp`, as `cargo build --profile image -p pnp --bin pnp` makes it (target/image/pnp; the
//! release-profile `pnp` when that is missing, said so) — plus the distroless static base
//! (≈ 2 MiB), and the report says so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use secrecy::ExposeSecret;
use serde::Serialize;

use super::{BenchStack, bin_dir, mib, percentile, procfs, r3, table};
use pnctl::stack::{self, SERVICES};

/// The one binary deploy/Dockerfile copies into the image.
/// gcr.io/distroless/static-debian12 (no libc, no shell): about 2 MiB.
const DISTROLESS_STATIC_BYTES: u64 = 2 << 20;

#[derive(Debug, Clone, clap::Args)]
pub struct FootprintArgs {
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Start-to-ready measurements per service.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Keep the temporary data dir after the run.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FootprintReport {
    /// VmRSS of each service in an idle, ready stack (median of 3 samples).
    pub idle_rss_bytes: BTreeMap<String, u64>,
    /// Median spawn → `/readyz` 200 of each service.
    pub start_to_ready_ms: BTreeMap<String, f64>,
    pub start_to_ready_max_ms: BTreeMap<String, f64>,
    /// Size of each binary the image holds, as built.
    pub binary_bytes: BTreeMap<String, u64>,
    /// Whether every one of them is stripped (no .symtab).
    pub stripped: bool,
    /// Σ binaries + the distroless static base: an estimate, not a built image.
    pub image_bytes_estimate: u64,
    pub bin_dir: String,
    pub load_average: String,
}

pub async fn main(args: &FootprintArgs, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let r = run(args, data_dir).await?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let mut rows = vec![vec!["service".to_string(), "idle RSS".into(), "start→ready p50".into(), "max".into()]];
    for s in SERVICES {
        rows.push(vec![
            s.to_string(),
            r.idle_rss_bytes.get(s).map(|b| mib(*b)).unwrap_or_else(|| "-".into()),
            r.start_to_ready_ms.get(s).map(|m| format!("{m:.1} ms")).unwrap_or_else(|| "-".into()),
            r.start_to_ready_max_ms.get(s).map(|m| format!("{m:.1} ms")).unwrap_or_else(|| "-".into()),
        ]);
    }
    println!("pnctl bench footprint ({} runs per service); machine {}; load average {}", args.runs, procfs::machine(), r.load_average);
    println!("{}", table(&rows));
    let mut rows = vec![vec!["binary".to_string(), "size".into()]];
    for (b, n) in &r.binary_bytes {
        rows.push(vec![b.clone(), mib(*n)]);
    }
    println!("\nbinaries in {} ({}):", r.bin_dir, if r.stripped { "all stripped" } else { "NOT all stripped" });
    println!("{}", table(&rows));
    println!(
        "image size estimate: {} = the binary + ≈2 MiB distroless static base (no Docker engine or musl target here: not a built image)",
        mib(r.image_bytes_estimate)
    );
    let worst_rss = r.idle_rss_bytes.values().copied().max().unwrap_or(0);
    let worst_ready = r.start_to_ready_ms.values().copied().fold(0.0, f64::max);
    println!(
        "goals: idle RSS ≤ 15 MiB: {} (worst {}); start-to-ready ≤ 100 ms: {} (worst p50 {worst_ready:.1} ms); image ≤ 30 MiB: {}",
        if worst_rss <= 15 << 20 { "met" } else { "MISSED" },
        mib(worst_rss),
        if worst_ready <= 100.0 { "met" } else { "MISSED" },
        if r.image_bytes_estimate <= 30 << 20 { "met" } else { "MISSED" },
    );
    Ok(())
}

pub async fn run(args: &FootprintArgs, data_dir: Option<PathBuf>) -> anyhow::Result<FootprintReport> {
    let load_average = procfs::loadavg();
    let stack = BenchStack::start(data_dir, &[]).await?;
    let res = tokio::select! {
        r = measure(args, &stack) => r,
        _ = stack::stop_signal() => Err(anyhow::anyhow!("interrupted")),
    };
    let stopped = stack.stop(args.keep || res.is_err()).await;
    let (idle_rss_bytes, start_to_ready_ms, start_to_ready_max_ms) = res?;
    stopped?;
    let release = bin_dir()?;
    // The image's profile puts `pnp` in target/image/, next to target/release/.
    let image = release.parent().map(|t| t.join("image")).unwrap_or_else(|| release.clone());
    let (dir, label) = if image.join("pnp").is_file() { (image, "pnp (image profile)") } else { (release, "pnp (release profile, NOT the image's)") };
    let mut binary_bytes = BTreeMap::new();
    let p = dir.join("pnp");
    let len = std::fs::metadata(&p)
        .with_context(|| format!("{} (build it with `cargo build --profile image -p pnp --bin pnp`)", p.display()))?
        .len();
    binary_bytes.insert(label.to_string(), len);
    let stripped = !has_symtab(&p).unwrap_or(true);
    let image_bytes_estimate = binary_bytes.values().sum::<u64>() + DISTROLESS_STATIC_BYTES;
    Ok(FootprintReport {
        idle_rss_bytes,
        start_to_ready_ms,
        start_to_ready_max_ms,
        binary_bytes,
        stripped,
        image_bytes_estimate,
        bin_dir: dir.display().to_string(),
        load_average,
    })
}

type Measured = (BTreeMap<String, u64>, BTreeMap<String, f64>, BTreeMap<String, f64>);

async fn measure(args: &FootprintArgs, stack: &BenchStack) -> anyhow::Result<Measured> {
    // Idle: the stack is ready; give the services a few seconds of nothing to do.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let procs = stack.services();
    let mut samples: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for i in 0..3 {
        if i > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        for (n, b) in super::rss(&procs) {
            samples.entry(n).or_default().push(b);
        }
    }
    let idle = samples
        .into_iter()
        .map(|(n, mut v)| {
            v.sort_unstable();
            (n, v[v.len() / 2])
        })
        .collect();

    let secrets = stack::ensure_secrets(&stack.dir.join("secrets"))?;
    let http = pnctl::endpoints::http()?;
    let mut p50 = BTreeMap::new();
    let mut max = BTreeMap::new();
    for name in SERVICES {
        let mut times = Vec::new();
        for _ in 0..args.runs.max(1) {
            times.push(start_to_ready(name, stack, &secrets, &http).await?);
        }
        times.sort_by(f64::total_cmp);
        p50.insert(name.to_string(), r3(percentile(&times, 0.5)));
        max.insert(name.to_string(), r3(times.last().copied().unwrap_or(0.0)));
    }
    Ok((idle, p50, max))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Spawns a second instance of `name` against the stack (its own empty state dir and ports)
/// and times spawn → `/readyz` 200; then stops it.
async fn start_to_ready(name: &str, stack: &BenchStack, secrets: &stack::Secrets, http: &reqwest::Client) -> anyhow::Result<f64> {
    let state = stack.dir.join("footprint").join(format!("{name}-{}", hex::encode(rand::random::<[u8; 3]>())));
    std::fs::create_dir_all(&state)?;
    let ops_port = free_port()?;
    let mut cmd = tokio::process::Command::new(stack::find_bin(name)?);
    cmd.env("PN_NATS_URL", &stack.file.nats_url)
        .env("PN_CENTER_URL", &stack.file.center_url)
        .env("PN_DATA_DIR", &state)
        .env("PN_OPS_LISTEN", format!("127.0.0.1:{ops_port}"))
        .env("PN_LOG_FORMAT", "json")
        .env("PN_CENTER_TOKEN", secrets.center_token.expose_secret())
        .env("PN_NATS_USER", name)
        .env("PN_NATS_PASSWORD", secrets.nats_password(name)?.expose_secret())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    if stack::SEAL_KEY_USERS.contains(&name) {
        cmd.env("PN_SEAL_KEY", secrets.seal_key.expose_secret());
    }
    match name {
        "svc-deployer" | "svc-verifier" => {
            cmd.env("PN_SSH__ADMIN_KEYS", format!("sim-lightsail={}", secrets.admin_key.display()));
        }
        "svc-meter" => {
            cmd.env("PN_LISTEN", format!("127.0.0.1:{}", free_port()?));
        }
        _ => {}
    }
    let url = format!("http://127.0.0.1:{ops_port}/readyz");
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("start {name}"))?;
    let ready = loop {
        if let Ok(r) = http.get(&url).timeout(Duration::from_millis(500)).send().await
            && r.status().is_success()
        {
            break Some(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(20) {
            break None;
        }
        if let Ok(Some(st)) = child.try_wait() {
            anyhow::bail!("{name} exited before it was ready ({st})");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
    }
    if tokio::time::timeout(Duration::from_secs(30), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
    let _ = std::fs::remove_dir_all(&state);
    let ready = ready.ok_or_else(|| anyhow::anyhow!("{name} was not ready within 20 s"))?;
    Ok(ready.as_secs_f64() * 1000.0)
}

/// Whether an ELF64 file has a `.symtab` section (i.e. is not stripped).
fn has_symtab(path: &Path) -> anyhow::Result<bool> {
    let data = std::fs::read(path)?;
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |o: usize| data.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let u64_at = |o: usize| data.get(o..o + 8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(|b| u64::from_le_bytes(b) as usize);
    anyhow::ensure!(data.get(..5) == Some(&[0x7f, b'E', b'L', b'F', 2][..]), "{} is not an ELF64 file", path.display());
    let bad = || anyhow::anyhow!("{}: malformed ELF header", path.display());
    let shoff = u64_at(0x28).ok_or_else(bad)?;
    let shentsize = u16_at(0x3A).ok_or_else(bad)?;
    let shnum = u16_at(0x3C).ok_or_else(bad)?;
    let shstrndx = u16_at(0x3E).ok_or_else(bad)?;
    let strtab_off = u64_at(shoff + shstrndx * shentsize + 0x18).ok_or_else(bad)?;
    for i in 0..shnum {
        let sh = shoff + i * shentsize;
        let name_off = u32_at(sh).ok_or_else(bad)?;
        let name = data.get(strtab_off + name_off..).unwrap_or_default();
        if name.starts_with(b".symtab\0") {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_test_binary_is_an_elf_the_checker_reads() {
        let exe = std::env::current_exe().unwrap_or_default();
        assert!(has_symtab(&exe).is_ok());
        let not_elf = std::env::temp_dir().join(format!("pnctl-not-elf-{}", std::process::id()));
        let _ = std::fs::write(&not_elf, b"hello");
        assert!(has_symtab(&not_elf).is_err());
        let _ = std::fs::remove_file(&not_elf);
    }
}
