//! The node side on a real OS (issue #22): a Debian 13 VM (scripts/vm/vm: QEMU under software
//! emulation, booted from a debootstrap image the way a cloud image arrives) provisioned and
//! deployed by the real svc-deployer over real SSH, against a real nats-server and center-sim.
//!
//! `PN_VM_SUITE=bookworm` runs it on Debian 12 instead. Debian 12's own packages have no
//! `docker compose` v2 (docker.io 20.10 with the Python docker-compose 1.29; bookworm-backports
//! has neither a newer one), and Docker's repository, which a Debian 12 node uses in production,
//! is out of this machine's reach. So on bookworm the test runs phases 1-3 only and asserts that
//! the prep with `PN_DOCKER_SOURCE=distro` stops in its preflight with that reason, having
//! changed nothing, and that the deployer fails the operation with it; phases 4-9 are skipped
//! and the test says so.
//!
//! The whole run is bounded (`PN_VM_TEST_TIMEOUT_MIN`, 40 minutes): past that it fails with the
//! phase it was in and the same report as any failure, before nextest's own limit.
//!
//! One test, in phases, each printed with its duration:
//!  1. image + boot: the cached image, a fresh copy-on-write overlay, SSH on 22 and 1022
//!     forwarded to loopback ports;
//!  2. fixtures: the node's Docker gets a registry mirror on this machine (10.0.2.2) serving
//!     stand-in images under the real names (scripts/vm/standin-registry.py), so the node's
//!     docker-compose.yml is unchanged and no image comes from anywhere else (dockerd's
//!     other registry traffic goes to a dead proxy); a command-line sampler runs in the VM;
//!  3. deploy: the deployer pins the VM's real host key (TOFU), runs the real
//!     provision-node.sh (Docker from Debian's packages: `PN_DOCKER_SOURCE=distro`), writes
//!     `.env` and the stack, `docker compose pull` + `up -d`;
//!  4. checks on the node: port 22 closed and 1022 answering, `.env` 600 root-owned with the
//!     runbook's variables, the stack files, the containers up from the mirror, the stand-in
//!     sidecar registered at center-sim (operation done) and reporting the host NIC's counters;
//!  5. idempotence: the prep run again changes nothing and restarts nothing; a replay of the
//!     deploy does not start a second prep;
//!  6. no secret on any process command line in the VM (sampled throughout);
//!  7. the image: deploy/Dockerfile built in the VM's Docker on a local base with a prebuilt
//!     static pnp, `pnp svc-meter` run read-only as 65532 until /readyz answers;
//!  8. reboot: counters reset, the new boot's reports count from zero, nothing before is lost
//!     or counted twice;
//!  9. auto-update.sh: pins already current change nothing; a new digest whose sidecar crashes
//!     is rolled back (old pins, old containers); a good new digest is pinned and running.
//!
//! Root gets in before the prep (the admin key is put in root's authorized_keys, as images
//! that let root in have it) and is refused after it (`PermitRootLogin no`). The images are
//! pinned by digest: the deployer gets the stand-ins' digests (`PN_K2_IMAGES`).
//!
//! On failure it panics with the phase, the error, the VM's console tail, the prep log and the
//! deployer's log tail. Needs root, qemu-system-x86_64, debootstrap (scripts/bootstrap) and
//! the workspace's binaries (`cargo build --workspace --bins`); builds a static `pnp` (image
//! profile) for phase 7 when it is missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use async_nats::HeaderMap;
use kit::center::{Center, ClientConfig, CreateInstance, McpCenter};
use kit::seal::SealKey;
use proto::{Body, Event, Instance, InstanceReady, Operation, headers, subjects};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use testkit::{Nats, Proc, eventually, free_port, rand_hex, workspace_root};

const CENTER_TOKEN: &str = "node-vm-center-token";
/// The image tag the deployer pins and the stand-in registry serves.
const K2_VERSION: &str = "0.0.0-vm";
/// How often the stand-in sidecar reports usage.
const USAGE_INTERVAL_S: u64 = 4;
const DEPLOY_DIR: &str = "/apps/kaitu-slave";
const PREP_STATE: &str = "/var/lib/pnp/prep";
const SAMPLES: &str = "/var/tmp/pn-cmdlines";

/// The Debian release of the VM (scripts/vm/vm reads the same variable).
fn suite() -> String {
    std::env::var("PN_VM_SUITE").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "trixie".into())
}

/// The bound of the whole run.
fn budget() -> Duration {
    let min = std::env::var("PN_VM_TEST_TIMEOUT_MIN").ok().and_then(|m| m.parse::<u64>().ok()).unwrap_or(40);
    Duration::from_secs(min * 60)
}

fn log(msg: &str) {
    eprintln!("[node_vm {:>7.1}s] {msg}", START.get_or_init(Instant::now).elapsed().as_secs_f64());
}
static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// The phases done so far and the one running.
#[derive(Default)]
struct Phases {
    done: Vec<(String, Duration)>,
    current: Option<(String, Instant)>,
}

impl Phases {
    fn start(&mut self, name: &str) {
        self.end();
        log(&format!("== phase: {name}"));
        self.current = Some((name.to_string(), Instant::now()));
    }
    fn end(&mut self) {
        if let Some((name, t)) = self.current.take() {
            let d = t.elapsed();
            log(&format!("== phase done: {name} ({:.1}s)", d.as_secs_f64()));
            self.done.push((name, d));
        }
    }
    fn summary(&self) -> String {
        let mut s = String::from("phase durations:\n");
        for (n, d) in &self.done {
            s.push_str(&format!("  {:>7.1}s  {n}\n", d.as_secs_f64()));
        }
        s
    }
}

fn script(name: &str) -> PathBuf {
    workspace_root().join("scripts/vm").join(name)
}

/// Runs a host command; its stderr goes to the test's output; stdout is returned.
fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).stderr(Stdio::inherit()).output().with_context(|| format!("{what}: spawn"))?;
    ensure!(out.status.success(), "{what}: {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a host command without holding up the runtime (so the run's bound can fire while it
/// runs; the command is killed when the bound drops it); stderr to the test's output.
async fn run_async(cmd: &mut tokio::process::Command, what: &str) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).stderr(Stdio::inherit()).kill_on_drop(true).output().await.with_context(|| format!("{what}: spawn"))?;
    ensure!(out.status.success(), "{what}: {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn vm_cmd() -> tokio::process::Command {
    tokio::process::Command::new(script("vm"))
}

/// The VM: stopped (and its overlay dropped) on drop.
struct Vm {
    run_dir: PathBuf,
    fresh_port: u16,
    hardened_port: u16,
    user: String,
    key_path: PathBuf,
    key_text: String,
}

impl Vm {
    async fn up(run_dir: &Path) -> Result<Vm> {
        // The owner whose end stops the VM: this test process (not the short-lived script).
        let out = run_async(vm_cmd().arg("up").arg(run_dir).env("PN_VM_OWNER_PID", std::process::id().to_string()), "scripts/vm/vm up").await?;
        let kv: BTreeMap<String, String> =
            out.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let port = |k: &str| -> Result<u16> { kv.get(k).with_context(|| format!("{k} in vm up's output"))?.parse().context("port") };
        let key_path = PathBuf::from(kv.get("ADMIN_KEY").context("ADMIN_KEY")?);
        let key_text = std::fs::read_to_string(&key_path)?;
        Ok(Vm {
            run_dir: run_dir.to_path_buf(),
            fresh_port: port("SSH_PORT")?,
            hardened_port: port("HARDENED_PORT")?,
            user: kv.get("ADMIN_USER").cloned().unwrap_or_else(|| "debian".into()),
            key_path,
            key_text,
        })
    }

    async fn ssh(&self, port: u16, pinned: Option<&str>) -> Result<kit::ssh::Session> {
        self.ssh_as(&self.user, port, pinned).await
    }

    async fn ssh_as(&self, user: &str, port: u16, pinned: Option<&str>) -> Result<kit::ssh::Session> {
        let t = kit::ssh::Target {
            host: "127.0.0.1".into(),
            port,
            user: user.to_string(),
            key: Arc::new(kit::ssh::parse_private_key(&self.key_text)?),
            pinned: pinned.map(str::to_string),
            connect_timeout: Duration::from_secs(30),
        };
        Ok(kit::ssh::connect(&t).await?)
    }

    fn console_tail(&self, lines: usize) -> String {
        Command::new(script("vm"))
            .arg("console")
            .arg(&self.run_dir)
            .arg(lines.to_string())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default()
    }

    /// Whether the VM's sshd answers on the loopback port (its banner, not just a connect).
    fn banner(port: u16) -> bool {
        use std::io::Read;
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(3)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut buf = [0u8; 8];
        matches!(s.read(&mut buf), Ok(n) if n >= 4 && &buf[..4] == b"SSH-")
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = Command::new(script("vm")).arg("down").arg(&self.run_dir).status();
    }
}

/// Runs `cmd` on the node; fails with its stderr unless it exits 0.
async fn sh(s: &kit::ssh::Session, cmd: &str) -> Result<String> {
    sh_in(s, cmd, None, Duration::from_secs(600)).await
}

async fn sh_in(s: &kit::ssh::Session, cmd: &str, stdin: Option<&[u8]>, timeout: Duration) -> Result<String> {
    let out = s.exec(cmd, stdin, timeout).await?;
    if out.status != 0 {
        bail!(
            "`{}` exited {}: {}{}",
            cmd.chars().take(120).collect::<String>(),
            out.status,
            String::from_utf8_lossy(&out.stdout).chars().rev().take(1500).collect::<String>().chars().rev().collect::<String>(),
            String::from_utf8_lossy(&out.stderr).chars().rev().take(1500).collect::<String>().chars().rev().collect::<String>()
        );
    }
    Ok(out.stdout_str())
}

/// Writes `data` to `path` on the node as root with `mode`, through stdin (never a command line).
async fn put(s: &kit::ssh::Session, path: &str, mode: &str, data: &[u8]) -> Result<()> {
    sh_in(s, &format!("sudo install -m {mode} /dev/null {path} && sudo tee {path} >/dev/null"), Some(data), Duration::from_secs(300))
        .await
        .map(|_| ())
}

/// The stand-in registry (scripts/vm/standin-registry.py) on a loopback port.
struct Registry {
    _proc: Proc,
    port: u16,
    log: Arc<std::sync::Mutex<Vec<String>>>,
    /// `(variant, repository) → digest` of the stand-in images it serves.
    pins: BTreeMap<(String, String), String>,
}

impl Registry {
    fn start(busybox: &Path) -> Result<Registry> {
        let mut child = Command::new("python3")
            .arg(script("standin-registry.py"))
            .args(["serve", "--busybox"])
            .arg(busybox)
            .args(["--tag", K2_VERSION, "--listen", "127.0.0.1:0"])
            .args(["--env", "STANDIN_PUBLIC_IPV4=127.0.0.1"])
            .args(["--env", &format!("STANDIN_USAGE_INTERVAL={USAGE_INTERVAL_S}")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn standin-registry.py")?;
        let stdout = child.stdout.take().context("stdout")?;
        let proc = Proc { child, name: "standin-registry".into() };
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().context("registry printed nothing")??;
        let port: u16 = first.strip_prefix("listening on ").context("registry's first line")?.trim().parse()?;
        let mut pins = BTreeMap::new();
        for _ in 0..6 {
            let line = lines.next().context("registry's pins")??;
            let mut w = line.split_whitespace();
            let (Some("pin"), Some(variant), Some(image)) = (w.next(), w.next(), w.next()) else { bail!("registry: {line}") };
            let (repo, digest) = image.split_once('@').context("pin")?;
            pins.insert((variant.to_string(), repo.to_string()), digest.to_string());
        }
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let l = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        Ok(Registry { _proc: proc, port, log, pins })
    }

    fn pin(&self, variant: &str, repo: &str) -> String {
        self.pins.get(&(variant.to_string(), repo.to_string())).cloned().unwrap_or_default()
    }

    /// `PN_K2_IMAGES` for the deployer: the base stand-ins' digests.
    fn k2_images(&self) -> String {
        ["kaitu/k2s", "kaitu/k2-sidecar"].iter().map(|r| format!("{r}@{}", self.pin("base", r))).collect::<Vec<_>>().join(",")
    }

    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Makes the tag serve `variant` (`base`, `good`, `bad`).
    async fn serve(&self, variant: &str) -> Result<()> {
        let r = reqwest::Client::new().post(format!("http://127.0.0.1:{}/admin/tag/{variant}", self.port)).send().await?;
        ensure!(r.status().is_success(), "registry: {}", r.status());
        Ok(())
    }
}

/// `compose` with each `image:` line's digest replaced by `variant`'s stand-in digest.
fn repinned(compose: &str, registry: &Registry, variant: &str) -> String {
    compose
        .split_inclusive('\n')
        .map(|l| match (l.trim_start().strip_prefix("image: "), l.rsplit_once("@sha256:")) {
            (Some(img), Some((head, _))) => {
                let repo = img.split(':').next().unwrap_or("");
                format!("{head}@{}\n", registry.pin(variant, repo))
            }
            _ => l.to_string(),
        })
        .collect()
}

/// The manifest digests the running container `c` was made from (its image's RepoDigests).
async fn running_digests(s: &kit::ssh::Session, c: &str) -> Result<String> {
    sh(s, &format!("sudo docker image inspect -f '{{{{range .RepoDigests}}}}{{{{.}}}} {{{{end}}}}' \"$(sudo docker inspect -f '{{{{.Image}}}}' {c})\"")).await
}


/// center-sim on a loopback port, announcing itself to nodes as http://10.0.2.2:<port> (the
/// VM's view of this machine's loopback).
struct Sim {
    _proc: Proc,
    url: String,
    public_url: String,
    http: reqwest::Client,
    center: Arc<McpCenter>,
    log: PathBuf,
}

impl Sim {
    async fn start(dir: &Path, admin_pub: &Path) -> Result<Sim> {
        kit::init_crypto();
        let port = free_port();
        let public_url = format!("http://10.0.2.2:{port}");
        let log = dir.join("center-sim.log");
        let child = Command::new(testkit::bin("center-sim")?)
            .env("PN_CENTER_TOKEN", CENTER_TOKEN)
            .env("RUST_LOG", "info")
            .args(["--listen", &format!("127.0.0.1:{port}"), "--public-url", &public_url])
            .arg("--data-dir")
            .arg(dir.join("sim"))
            .arg("--admin-public-key-file")
            .arg(admin_pub)
            .args(["--ssh-port-fresh", &free_port().to_string(), "--ssh-port-hardened", &free_port().to_string()])
            // Its instances get the VM's address as seen from here (the deployer reaches the
            // VM at 127.0.0.1 on the forwarded ports; the stand-in sidecar registers as it).
            .args(["--ip-start", "127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("spawn center-sim")?;
        let proc = Proc { child, name: "center-sim".into() };
        let url = format!("http://127.0.0.1:{port}");
        testkit::wait_tcp(([127, 0, 0, 1], port).into(), Duration::from_secs(30))?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        let center = McpCenter::new(ClientConfig::new(&url, Duration::from_secs(10)), SecretString::from(CENTER_TOKEN))?;
        Ok(Sim { _proc: proc, url, public_url, http, center, log })
    }

    async fn get(&self, path: &str) -> Result<Value> {
        let r = self.http.get(format!("{}{path}", self.url)).send().await?;
        ensure!(r.status().is_success(), "center-sim GET {path}: {}", r.status());
        Ok(r.json().await?)
    }

    async fn node(&self, name: &str) -> Result<Option<Value>> {
        let v = self.get("/admin/nodes").await?;
        Ok(v["items"].as_array().and_then(|a| a.iter().find(|n| n["name"] == name).cloned()))
    }
}

/// The deployer binary as a child, configured by environment only.
struct Deployer {
    _proc: Proc,
    log: PathBuf,
}

impl Deployer {
    fn log_tail(&self, n: usize) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// SHA-256 of `s` by this machine's sha256sum (the text on its stdin).
fn sha256(s: &str) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut c = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    c.stdin.take().context("stdin")?.write_all(s.as_bytes())?;
    let out = c.wait_with_output()?;
    let hex = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_string();
    Ok(hex::decode(hex)?)
}

/// The static `pnp` for the image (PNP_FROM=prebuilt): `PN_VM_PNP` when set (a static pnp built
/// beforehand), else built here with the image profile, linked statically against glibc (no
/// musl target on these machines); cargo makes that a no-op when it is up to date. Started at
/// the beginning of the run, one job, alongside the VM's phases (a fresh clone, as in CI,
/// compiles it from scratch: minutes of fat LTO), awaited by phase 7.
async fn static_pnp() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("PN_VM_PNP") {
        log(&format!("static pnp from PN_VM_PNP: {p}"));
        return Ok(PathBuf::from(p));
    }
    let root = workspace_root();
    let target = "x86_64-unknown-linux-gnu";
    let path = root.join("target").join(target).join("image/pnp");
    log("cargo build --profile image -j1 (static pnp, in the background; fast when up to date)");
    let t = Instant::now();
    run_async(
        tokio::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .args(["build", "-q", "-j", "1", "--profile", "image", "--locked", "--target", target, "--features", "kit/mimalloc", "-p", "pnp", "--bin", "pnp"]),
        "cargo build (static pnp)",
    )
    .await?;
    log(&format!("static pnp built in {:.1}s", t.elapsed().as_secs_f64()));
    ensure!(path.exists(), "{} was not built", path.display());
    Ok(path)
}

/// `rx tx boot used` of the sidecar's `usage-reporter-cycle-ok` lines, oldest first (`used`:
/// Center's ledger in its answer).
fn usage_cycles(logs: &str) -> Vec<(u64, u64, String, Option<u64>)> {
    logs.lines()
        .filter(|l| l.contains("usage-reporter-cycle-ok"))
        .filter_map(|l| {
            let field = |k: &str| l.split_whitespace().find_map(|w| w.strip_prefix(k)).map(str::to_string);
            Some((field("rx=")?.parse().ok()?, field("tx=")?.parse().ok()?, field("boot=")?, field("used=").and_then(|u| u.parse().ok())))
        })
        .collect()
}

/// Fields drop in this order: the VM is stopped (`vm down` reads its pid file) and the
/// deployer killed before the temporary directory holding them is removed.
struct World {
    phases: Phases,
    vm: Option<Vm>,
    deployer: Option<Deployer>,
    sim_log: Option<PathBuf>,
    dir: tempfile::TempDir,
}

#[tokio::test(flavor = "multi_thread")]
async fn the_node_side_on_a_real_debian_vm() {
    let _ = START.get_or_init(Instant::now);
    let uid = Command::new("id").arg("-u").output().expect("id");
    assert_eq!(String::from_utf8_lossy(&uid.stdout).trim(), "0", "the VM test needs root (debootstrap, as in CI)");
    let mut w = World { phases: Phases::default(), vm: None, deployer: None, sim_log: None, dir: tempfile::tempdir().unwrap() };
    let budget = budget();
    let res = match tokio::time::timeout(budget, body(&mut w)).await {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!("the run's bound: still running after {} min (PN_VM_TEST_TIMEOUT_MIN)", budget.as_secs() / 60)),
    };
    w.phases.end();
    eprintln!("{}", w.phases.summary());
    if let Err(e) = res {
        let phase = w.phases.done.last().map(|p| p.0.clone()).unwrap_or_default();
        let mut report = format!("node_vm failed in phase `{phase}`: {e:#}\n");
        if let Some(vm) = &w.vm {
            report.push_str(&format!("--- VM console (tail)\n{}\n", vm.console_tail(60)));
            // The prep's own log, when the node still answers.
            for port in [vm.hardened_port, vm.fresh_port] {
                if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(40), vm.ssh(port, None)).await {
                    let tail = sh(&s, &format!("sudo tail -n 40 {PREP_STATE}/log; sudo docker ps -a 2>&1 | tail -5; echo '--- k2-sidecar'; sudo docker logs --tail 15 k2-sidecar 2>&1; sudo journalctl -n 30 --no-pager 2>&1 | grep -v -e 'sudo\\[' -e pam_unix -e sshd-session"))
                        .await
                        .unwrap_or_else(|e| format!("({e})"));
                    report.push_str(&format!("--- node (port {port}): prep log, containers, journal\n{tail}\n"));
                    break;
                }
            }
        }
        if let Some(d) = &w.deployer {
            report.push_str(&format!("--- svc-deployer (tail)\n{}\n", d.log_tail(40)));
        }
        if let Some(l) = &w.sim_log {
            let t = std::fs::read_to_string(l).unwrap_or_default();
            let lines: Vec<&str> = t.lines().collect();
            report.push_str(&format!("--- center-sim (tail)\n{}\n", lines[lines.len().saturating_sub(20)..].join("\n")));
        }
        panic!("{report}");
    }
}

async fn body(w: &mut World) -> Result<()> {
    let dir = w.dir.path().to_path_buf();

    let suite = suite();
    let bookworm = suite == "bookworm";
    log(&format!("Debian {suite}; the run's bound {} min", budget().as_secs() / 60));
    // Phase 7's static pnp, compiled while the VM works (not on Debian 12: no phase 7 there).
    let pnp_build = (!bookworm).then(|| tokio::spawn(static_pnp()));
    w.phases.start("image (debootstrap once, cached under .tools/vm)");
    let image = run_async(vm_cmd().arg("image"), "scripts/vm/vm image").await?;
    log(&format!("image: {}", image.trim()));
    let busybox = PathBuf::from(run_async(vm_cmd().arg("busybox"), "scripts/vm/vm busybox").await?.trim());

    w.phases.start("boot (QEMU TCG, fresh overlay)");
    let vm = w.vm.insert(Vm::up(&dir.join("vm")).await?);
    let (fresh_port, hardened_port) = (vm.fresh_port, vm.hardened_port);
    let vm_key_path = vm.key_path.clone();
    let admin_pub = PathBuf::from(format!("{}.pub", vm_key_path.display()));
    log(&format!("ssh 22 → 127.0.0.1:{fresh_port}, 1022 → 127.0.0.1:{hardened_port}"));

    w.phases.start("fixtures (registry mirror, center-sim, NATS, cmdline sampler)");
    let registry = Registry::start(&busybox)?;
    let sim = Sim::start(&dir, &admin_pub).await?;
    w.sim_log = Some(sim.log.clone());
    let nats = Nats::start()?;
    {
        let vm = w.vm.as_ref().unwrap();
        let s = vm.ssh(fresh_port, None).await?;
        // What the deployer pins must be the key this VM made at its first boot.
        let node_host_key = sh(&s, "cat /etc/ssh/ssh_host_ed25519_key.pub").await?;
        ensure!(same_key(&s.host_key, &node_host_key), "the test's own session saw another host key");
        // Docker (not installed yet: the prep installs it) will pull through this machine's
        // stand-in registry, and reach no other registry (a dead proxy for anything else).
        let dropin = format!(
            "[Service]\nEnvironment=\"DOCKER_OPTS=--registry-mirror=http://10.0.2.2:{}\"\n\
             Environment=HTTPS_PROXY=http://127.0.0.1:9 HTTP_PROXY=http://127.0.0.1:9 NO_PROXY=10.0.2.2\n",
            registry.port
        );
        sh(&s, "sudo mkdir -p /etc/systemd/system/docker.service.d").await?;
        // The admin key for root too, as images that let root in have it (Hetzner's with the
        // key registered): root gets in now, and must not once the prep set PermitRootLogin no.
        let admin_pub_text = std::fs::read_to_string(&admin_pub)?;
        sh(&s, "sudo install -d -m 700 /root/.ssh").await?;
        put(&s, "/root/.ssh/authorized_keys", "600", admin_pub_text.as_bytes()).await?;
        let r = vm.ssh_as("root", fresh_port, None).await.context("root with the admin key before the prep")?;
        ensure!(sh(&r, "id -u").await?.trim() == "0", "root's session is not root's");
        r.close().await;
        put(&s, "/etc/systemd/system/docker.service.d/pn-test-mirror.conf", "644", dropin.as_bytes()).await?;
        // Every process's command line, sampled until the end of phase 6.
        sh(
            &s,
            &format!(
                "sudo systemd-run --quiet --unit pn-cmdline-sampler /bin/sh -c \
                 'while :; do cat /proc/[0-9]*/cmdline 2>/dev/null | tr \"\\000\" \" \"; echo; sleep 0.3; done >> {SAMPLES}'"
            ),
        )
        .await?;
        s.close().await;
    }

    // Runbook steps 1-3 by hand: an intent at center-sim, claimed (the one-time token).
    let sub = format!("vm{}", rand_hex(3));
    let resp = sim
        .http
        .post(format!("{}/admin/intents", sim.url))
        .json(&json!({"subId": sub, "region": "sg", "trafficTotalBytes": 950u64 << 30, "ipType": "residential"}))
        .send()
        .await?;
    let v: Value = resp.json().await?;
    let op_id = v["operationId"].as_str().context("operationId")?.to_string();
    let claimed = sim.center.claim_node_operation(&op_id, "node-vm", 3600).await?;
    let identity = claimed.identity.context("claim without identity")?;
    let claim = identity.claim_token.clone();
    ensure!(identity.center_url == sim.public_url, "center-sim's centerUrl {} is not {}", identity.center_url, sim.public_url);
    // The cloud's record of the node (the deployer may check the world before a secret moves).
    let created = sim
        .center
        .create_cloud_instance(&CreateInstance {
            account_name: "sim-lightsail".into(),
            region: "ap-southeast-1".into(),
            plan: "small_1tb".into(),
            image_id: "ubuntu-22-04".into(),
            name: format!("pn-{sub}"),
        })
        .await?;
    let inst = eventually("the instance running with an ipv4", Duration::from_secs(120), || async {
        let i = sim.center.get_cloud_instance(&created.id).await.ok()?;
        (i.status == "running" && i.ipv4.is_some()).then_some(i)
    })
    .await?;
    ensure!(inst.ipv4.as_deref() == Some("127.0.0.1"), "center-sim gave the instance {:?}", inst.ipv4);

    // The prep script as sent: the real provision-node.sh with Docker from Debian's packages.
    let real_prep = std::fs::read_to_string(workspace_root().join("deploy/node/provision-node.sh"))?;
    let prep_text = format!("#!/usr/bin/env bash\nPN_DOCKER_SOURCE=distro\n{real_prep}");
    let prep_path = dir.join("provision-node.distro.sh");
    std::fs::write(&prep_path, &prep_text)?;

    let seal_hex = SealKey::generate_hex();
    let seal = SealKey::parse(&seal_hex)?;
    let data_dir = dir.join("deployer");
    std::fs::create_dir_all(&data_dir)?;
    let dlog = data_dir.join("svc-deployer.log");
    let dlog_file = std::fs::File::create(&dlog)?;
    let child = Command::new(testkit::bin("svc-deployer")?)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info,svc_deployer=debug")
        .env("PN_LOG_FORMAT", "json")
        .env("PN_NATS_URL", nats.plain_url())
        .env("PN_NATS_USER", "svc-deployer")
        .env("PN_NATS_PASSWORD", nats.password("svc-deployer").unwrap_or_default())
        .env("PN_DATA_DIR", &data_dir)
        .env("PN_CENTER_URL", &sim.url)
        .env("PN_CENTER_TOKEN", CENTER_TOKEN)
        .env("PN_SEAL_KEY", seal_hex.expose_secret())
        .env("PN_OPS_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("PN_SSH__ADMIN_KEYS", format!("{}={}", inst.account_name, vm_key_path.display()))
        .env("PN_SSH__USER", &w.vm.as_ref().unwrap().user)
        .env("PN_SSH__FRESH_PORT", fresh_port.to_string())
        .env("PN_SSH__HARDENED_PORT", hardened_port.to_string())
        .env("PN_SSH__CONNECT_TIMEOUT_MS", "20000")
        .env("PN_SSH__COMMAND_TIMEOUT_MS", "300000")
        .env("PN_SSH__PREP_TIMEOUT_MS", "2700000")
        .env("PN_SSH__PREP_EXPECTED_MS", "15000")
        .env("PN_SSH__PREP_POLL_MS", "3000")
        .env("PN_SSH__RETRY_DELAY_MS", "2000")
        // On Debian 12 the prep fails for a reason no retry changes (no compose v2): one try.
        .env("PN_SSH__STEP_ATTEMPTS", if bookworm { "1" } else { "4" })
        .env("PN_PREP_SCRIPT", &prep_path)
        .env("PN_K2_VERSION", K2_VERSION)
        // The stand-ins' digests in place of the shipped pins (another release's digests).
        .env("PN_K2_IMAGES", registry.k2_images())
        .stdin(Stdio::null())
        .stdout(dlog_file.try_clone()?)
        .stderr(dlog_file)
        .spawn()
        .context("spawn svc-deployer")?;
    w.deployer = Some(Deployer { _proc: Proc { child, name: "svc-deployer".into() }, log: dlog.clone() });

    let bus = kit::bus::Bus::connect(&nats.url(), "node-vm", Duration::from_secs(10)).await?;
    bus.ensure_streams().await?;
    let ir = InstanceReady {
        op: Some(Operation {
            operation_id: op_id.clone(),
            sub_id: sub.clone(),
            region: claimed.operation.params.region.clone(),
            traffic_total_bytes: claimed.operation.params.traffic_total_bytes,
            ip_type: claimed.operation.params.ip_type.clone(),
            center_url: identity.center_url.clone(),
            domain: identity.domain.clone(),
            sealed_claim_token: seal.seal_str(&claim),
            holder: "node-vm".into(),
            claimed_at_ms: kit::now_ms(),
            claim_attempt: 1,
            queued_at_ms: 0,
        }),
        instance: Some(Instance {
            instance_id: inst.id.clone(),
            name: inst.name.clone(),
            ipv4: "127.0.0.1".into(),
            provider: "center".into(),
            account: inst.account_name.clone(),
            provider_region: inst.region.clone(),
            plan: inst.plan.clone(),
            image: inst.image_id.clone(),
            adopted: false,
        }),
        ready_at_ms: kit::now_ms(),
    };
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, format!("{op_id}.cloud.1").as_str());
    h.insert(headers::OP, op_id.as_str());
    bus.js
        .publish_with_headers(subjects::op_event(subjects::INSTANCE, &op_id), h, Event::new(Body::Instance(ir)).to_bytes().into())
        .await?
        .await?;

    w.phases.start("deploy (TOFU, provision-node.sh for real, .env, compose pull + up -d)");
    let last = |event: &'static str| {
        let js = bus.js.clone();
        let op = op_id.clone();
        async move {
            let stream = js.get_stream(subjects::OPS_STREAM).await.ok()?;
            let m = stream.get_last_raw_message_by_subject(&subjects::op_event(event, &op)).await.ok()?;
            Event::from_bytes(&m.payload).ok()
        }
    };
    let started = Instant::now();
    let mut next_note = Duration::from_secs(60);
    let nd = loop {
        if let Some(Body::Deployed(d)) = last(subjects::DEPLOYED).await {
            break d;
        }
        if let Some(Body::Failed(f)) = last(subjects::FAILED).await {
            if bookworm {
                return debian12_refused(w, &f.reason, fresh_port).await;
            }
            bail!("the deployer failed the operation: {} (stage {})", f.reason, f.stage);
        }
        ensure!(started.elapsed() < Duration::from_secs(45 * 60), "no pn.op.deployed after {:?}", started.elapsed());
        if started.elapsed() >= next_note {
            next_note += Duration::from_secs(60);
            // Where the prep is (its log's last line), on whichever port answers.
            let vm = w.vm.as_ref().unwrap();
            let mut now = String::from("(node not reachable)");
            for port in [fresh_port, hardened_port] {
                if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(30), vm.ssh(port, None)).await {
                    now = sh(&s, &format!("sudo tail -n 1 {PREP_STATE}/log 2>/dev/null; sudo docker ps --format '{{{{.Names}}}} {{{{.Status}}}}' 2>/dev/null | tr '\\n' ' '"))
                        .await
                        .unwrap_or_default();
                    s.close().await;
                    break;
                }
            }
            log(&format!("… deploying for {:.0}s: {}", started.elapsed().as_secs_f64(), now.trim().chars().take(160).collect::<String>()));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    log(&format!("deployed; pinned host key {}", nd.host_key.split_whitespace().take(2).collect::<Vec<_>>().join(" ")));

    w.phases.start("node checks (ports, .env, stack, containers, registration, usage)");
    let vm = w.vm.as_ref().unwrap();
    // Only the pinned key gets in: a session that pins it must succeed on the hardened port.
    let s = vm.ssh(hardened_port, Some(&nd.host_key)).await.context("ssh on 1022 with the deployer's pinned key")?;
    let node_key = sh(&s, "cat /etc/ssh/ssh_host_ed25519_key.pub").await?;
    ensure!(same_key(&nd.host_key, &node_key), "pinned {} but the node's key is {}", nd.host_key, node_key);
    ensure!(nd.ssh_port == u32::from(hardened_port), "the deployer reports port {} (hardened is {hardened_port})", nd.ssh_port);
    ensure!(!Vm::banner(fresh_port), "port 22 still answers after the prep");
    let listening = sh(&s, "sudo ss -ltnH").await?;
    ensure!(!listening.lines().any(|l| l.split_whitespace().nth(3).is_some_and(|a| a.ends_with(":22"))), "something listens on 22:\n{listening}");
    let ufw = sh(&s, "sudo ufw status").await?;
    ensure!(ufw.contains("Status: active") && ufw.contains("1022/tcp") && !ufw.lines().any(|l| l.starts_with("22/tcp")), "ufw:\n{ufw}");
    let prep_log = sh(&s, &format!("sudo cat {PREP_STATE}/log")).await?;
    ensure!(sh(&s, &format!("sudo cat {PREP_STATE}/rc")).await?.trim() == "0", "prep rc");
    ensure!(prep_log.contains("Docker from distro") && prep_log.contains("step 16/16") && prep_log.contains("change(s) made"), "prep log:\n{prep_log}");
    log(&format!(
        "prep: {}",
        prep_log.lines().filter(|l| l.starts_with("[provision-node] done") || l.contains("change(s) made")).collect::<Vec<_>>().join(" | ")
    ));
    let times = sh(&s, &format!("sudo cat {PREP_STATE}/start {PREP_STATE}/end")).await?;
    let t: Vec<u64> = times.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    if t.len() == 2 {
        log(&format!("the prep itself ran {:.1}s on the node", t[1].saturating_sub(t[0]) as f64 / 1000.0));
    }
    // Root may not log in any more (the key that let it in before the prep is still there).
    let sshd_t = sh(&s, "sudo sshd -T 2>/dev/null | grep -i '^permitrootlogin'").await?;
    ensure!(sshd_t.trim() == "permitrootlogin no", "sshd -T: {sshd_t}");
    match vm.ssh_as("root", hardened_port, Some(&nd.host_key)).await {
        Err(e) => log(&format!("root refused after the prep: {e:#}")),
        Ok(r) => {
            let who = sh(&r, "id -u").await.unwrap_or_default();
            bail!("root logged in after the prep (PermitRootLogin no): id -u = {}", who.trim());
        }
    }
    let stat = sh(&s, &format!("sudo stat -c '%a %U %G' {DEPLOY_DIR}/.env")).await?;
    ensure!(stat.trim() == "600 root root", ".env is {stat}");
    let env = parse_env(&sh(&s, &format!("sudo cat {DEPLOY_DIR}/.env")).await?);
    let secret = env.get("K2_NODE_SECRET").cloned().unwrap_or_default();
    ensure!(secret.len() == 64 && secret.bytes().all(|b| b.is_ascii_hexdigit()), "K2_NODE_SECRET is not 32 random bytes in hex");
    ensure!(nd.node_secret_sha256 == sha256(&secret)?, "pn.op.deployed carries another secret's hash");
    let want: BTreeMap<&str, String> = [
        ("K2_PRIVATE_CLAIM", claim.expose_secret().to_string()),
        ("K2_CENTER_URL", sim.public_url.clone()),
        ("K2_DOMAIN", identity.domain.clone()),
        ("K2_VERSION", K2_VERSION.to_string()),
        ("K2_NODE_TRAFFIC_LIMIT_GB", "950".into()),
        ("K2_NODE_NAME", format!("pn-{sub}")),
        ("K2_NODE_REGION", "sg".into()),
        ("K2_IP_TYPE", "residential".into()),
    ]
    .into_iter()
    .collect();
    for (k, v) in &want {
        ensure!(env.get(*k) == Some(v), ".env {k} is not what the runbook says");
    }
    ensure!(env.len() == 9, ".env holds {:?}", env.keys().collect::<Vec<_>>());
    for f in ["docker-compose.yml", "auto-update.sh", "k2s-crash-monitor.sh"] {
        let on_node = sh(&s, &format!("sudo cat {DEPLOY_DIR}/{f}")).await?;
        let mut shipped = std::fs::read_to_string(workspace_root().join("deploy/node").join(f))?;
        if f == "docker-compose.yml" {
            // Pinned by digest: the deployer put the stand-ins' digests in (PN_K2_IMAGES).
            ensure!(shipped.lines().filter(|l| l.contains("image: ")).all(|l| l.contains("@sha256:")), "the shipped compose is not pinned by digest");
            shipped = repinned(&shipped, &registry, "base");
        }
        ensure!(on_node == shipped, "{DEPLOY_DIR}/{f} differs from deploy/node/{f}");
    }
    ensure!(sh(&s, &format!("sudo stat -c %s {DEPLOY_DIR}/users")).await?.trim() == "0", "users is not empty");
    let ps = sh(&s, &format!("cd {DEPLOY_DIR} && sudo docker compose -f docker-compose.yml ps --format '{{{{.Name}}}} {{{{.Image}}}} {{{{.State}}}}'")).await?;
    for c in ["k2s", "k2-sidecar"] {
        ensure!(ps.lines().any(|l| l.starts_with(&format!("{c} kaitu/{c}:{K2_VERSION}")) && l.ends_with(" running")), "{c} is not running:\n{ps}");
        let digests = running_digests(&s, c).await?;
        ensure!(digests.contains(&format!("kaitu/{c}@{}", registry.pin("base", &format!("kaitu/{c}")))), "{c} does not run its pinned digest: {digests}");
    }
    let pulled = registry.requests();
    for name in ["kaitu/k2s", "kaitu/k2-sidecar"] {
        ensure!(pulled.iter().any(|r| r.contains(&format!("/v2/{name}/manifests/")) && r.ends_with(" 200")), "{name} was not pulled through the mirror: {pulled:?}");
    }
    ensure!(sh(&s, "sudo docker logs k2s 2>&1").await?.contains("server ready"), "k2s did not log server ready");
    let sidecar_logs = eventually("the sidecar registered and reported usage twice", Duration::from_secs(240), || async {
        let l = sh(&s, "sudo docker logs k2-sidecar 2>&1").await.ok()?;
        (l.contains("Registration completed") && l.contains("usage-reporter-start") && usage_cycles(&l).len() >= 2).then_some(l)
    })
    .await
    .with_context(|| "the stand-in sidecar did not register and report")?;
    log(&format!("sidecar: {}", sidecar_logs.lines().take(3).collect::<Vec<_>>().join(" | ")));
    let op = sim.get(&format!("/admin/operations/{op_id}")).await?;
    ensure!(op["status"] == "done", "the operation is {} at center-sim, not done (the claim was carried on registration)", op["status"]);
    let node = sim.node(&format!("pn-{sub}")).await?.context("the node is not registered at center-sim")?;
    ensure!(node["class"] == "private", "node class {}", node["class"]);
    // The counters are the host NIC's: the prep's downloads (100+ MB) went through it.
    let (rx, _, _, _) = usage_cycles(&sidecar_logs).last().cloned().unwrap();
    ensure!(rx > 50 << 20, "the sidecar's rx counter ({rx}) is not the host NIC's");

    w.phases.start("idempotence (prep again: nothing changes; deploy replay: no second prep)");
    let units = "sudo systemctl show -p ActiveEnterTimestampMonotonic docker ssh; sudo docker inspect -f '{{.Name}} {{.State.StartedAt}}' k2s k2-sidecar";
    let before = sh(&s, units).await?;
    let prep_start = sh(&s, &format!("sudo cat {PREP_STATE}/start")).await?;
    let again = sh_in(&s, "sudo bash -s", Some(prep_text.as_bytes()), Duration::from_secs(900)).await?;
    ensure!(again.contains("nothing changed (already provisioned)"), "the second prep changed something:\n{again}");
    ensure!(sh(&s, units).await? == before, "the second prep restarted docker, sshd or a container");
    let seq = bus.js.publish(subjects::replay(proto::Stage::Deploy), op_id.clone().into()).await?.await?.sequence;
    eventually("the deployer to ack the replay", Duration::from_secs(600), || async {
        let st = bus.js.get_stream(subjects::REPLAY_STREAM).await.ok()?;
        let mut c: async_nats::jetstream::consumer::PullConsumer = st.get_consumer("svc-deployer-replay").await.ok()?;
        (c.info().await.ok()?.ack_floor.stream_sequence >= seq).then_some(())
    })
    .await?;
    ensure!(!matches!(last(subjects::FAILED).await, Some(Body::Failed(_))), "the replay failed the operation");
    ensure!(sh(&s, &format!("sudo cat {PREP_STATE}/start")).await? == prep_start, "the replay started a second prep");
    ensure!(parse_env(&sh(&s, &format!("sudo cat {DEPLOY_DIR}/.env")).await?).get("K2_NODE_SECRET") == Some(&secret), "the replay changed the secret");

    w.phases.start("no secret on any command line in the VM (sampled)");
    sh(&s, "sudo systemctl stop pn-cmdline-sampler").await?;
    let size = sh(&s, &format!("sudo stat -c %s {SAMPLES}")).await?;
    // The secrets go to grep on stdin, never as arguments.
    let needles = format!("{}\n{}\n", claim.expose_secret(), secret);
    let hits = s.exec(&format!("sudo grep -a -c -F -f - {SAMPLES}"), Some(needles.as_bytes()), Duration::from_secs(120)).await?;
    ensure!(hits.stdout_str().trim() == "0", "a secret was on a command line in the VM ({} sample lines hit)", hits.stdout_str().trim());
    let seen = sh(&s, &format!("sudo grep -a -c -e pnp-prep -e 'docker compose' -e k2-sidecar.sh {SAMPLES} || true")).await?;
    ensure!(seen.trim().parse::<u64>().unwrap_or(0) > 0, "the sampler never saw the prep, compose or the sidecar ({} bytes)", size.trim());
    log(&format!("{} bytes of command lines sampled, {} lines with the prep/compose/sidecar, no secret", size.trim(), seen.trim()));

    w.phases.start("image (deploy/Dockerfile in the VM's Docker, pnp svc-meter read-only as 65532)");
    let pnp = pnp_build.context("no pnp build")?.await??;
    let pnp_bytes = std::fs::read(&pnp)?;
    log(&format!("static pnp: {} bytes", pnp_bytes.len()));
    sh_in(&s, "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o Acquire::Retries=5 --no-install-recommends docker-buildx >/dev/null", None, Duration::from_secs(900)).await?;
    let base_tar = dir.join("base.tar");
    run(Command::new("python3").arg(script("standin-registry.py")).arg("base-tar").arg(&base_tar), "base-tar")?;
    sh_in(&s, "sudo docker import - pn-local/static-nonroot:vm >/dev/null", Some(&std::fs::read(&base_tar)?), Duration::from_secs(300)).await?;
    sh(&s, "sudo rm -rf /var/tmp/pnp-ctx && sudo mkdir -p /var/tmp/pnp-ctx").await?;
    put(&s, "/var/tmp/pnp-ctx/pnp", "755", &pnp_bytes).await?;
    put(&s, "/var/tmp/pnp-ctx/Dockerfile", "644", &std::fs::read(workspace_root().join("deploy/Dockerfile"))?).await?;
    let t = Instant::now();
    sh_in(
        &s,
        "cd /var/tmp/pnp-ctx && sudo DOCKER_BUILDKIT=1 docker build -q --build-arg RUNTIME_IMAGE=pn-local/static-nonroot:vm \
         --build-arg PNP_FROM=prebuilt --build-arg PNP_BINARY=pnp -t pnp:vm . 2>&1",
        None,
        Duration::from_secs(900),
    )
    .await?;
    let size = sh(&s, "sudo docker image inspect -f '{{.Size}}' pnp:vm").await?.trim().parse::<u64>()?;
    log(&format!("built pnp:vm in {:.1}s: {} bytes ({:.1} MiB)", t.elapsed().as_secs_f64(), size, size as f64 / 1048576.0));
    let cfg = sh(&s, "sudo docker image inspect -f '{{.Config.User}} {{json .Config.Cmd}}' pnp:vm").await?;
    ensure!(cfg.trim().starts_with("65532:65532 "), "image user/cmd: {cfg}");
    let ops = 19464;
    let meter_env = format!(
        "PN_NATS_URL=nats://10.0.2.2:{}\nPN_NATS_USER=svc-meter\nPN_NATS_PASSWORD={}\nPN_CENTER_URL={}\nPN_CENTER_TOKEN={CENTER_TOKEN}\n\
         PN_OPS_LISTEN=127.0.0.1:{ops}\nPN_LISTEN=127.0.0.1:19465\nPN_INTERNAL_LISTEN=127.0.0.1:19466\nRUST_LOG=info\n",
        nats.port,
        nats.password("svc-meter").unwrap_or_default(),
        sim.public_url
    );
    put(&s, "/root/pnp-meter.env", "600", meter_env.as_bytes()).await?;
    sh(
        &s,
        "sudo docker run -d --name pnp-meter --read-only --user 65532:65532 --network host --cap-drop ALL \
         --security-opt no-new-privileges --tmpfs /data:uid=65532,gid=65532,mode=0700 --env-file /root/pnp-meter.env \
         pnp:vm /usr/local/bin/pnp svc-meter >/dev/null",
    )
    .await?;
    // /readyz answers, or the container exits (then its logs say why).
    let ready = eventually("pnp svc-meter's /readyz in the VM, or its exit", Duration::from_secs(180), || async {
        let out = s.exec(&format!("curl -sf http://127.0.0.1:{ops}/readyz"), None, Duration::from_secs(30)).await.ok()?;
        if out.status == 0 {
            return Some(Ok(out.stdout_str()));
        }
        let running = sh(&s, "sudo docker inspect -f '{{.State.Running}}' pnp-meter").await.ok()?;
        (running.trim() == "false").then_some(Err(()))
    })
    .await;
    let ready = match ready {
        Ok(Ok(r)) => r,
        other => bail!(
            "pnp svc-meter never answered /readyz ({}):\n--- docker logs pnp-meter\n{}",
            if other.is_ok() { "it exited" } else { "timed out" },
            sh(&s, "sudo docker logs --tail 30 pnp-meter 2>&1").await.unwrap_or_default()
        ),
    };
    let inspect = sh(&s, "sudo docker inspect -f '{{.Config.User}} {{.HostConfig.ReadonlyRootfs}} {{.State.Running}}' pnp-meter").await?;
    ensure!(inspect.trim() == "65532:65532 true true", "pnp-meter: {inspect}");
    let who = sh(&s, "ps -o user=,args= -C pnp").await?;
    ensure!(who.contains("65532") || who.contains("nonroot"), "pnp does not run as 65532: {who}");
    log(&format!("/readyz: {}", ready.trim()));
    std::fs::write(dir.join("image-size"), size.to_string())?;
    eprintln!("IMAGE_SIZE_BYTES={size}");

    w.phases.start("reboot (counters reset; usage neither lost nor counted twice)");
    let node_name = format!("pn-{sub}");
    let boot1 = sh(&s, "cat /proc/sys/kernel/random/boot_id").await?.trim().to_string();
    let _ = s.exec("sudo systemctl reboot", None, Duration::from_secs(10)).await;
    s.close().await;
    eventually("the VM to go down", Duration::from_secs(120), || async { (!Vm::banner(hardened_port)).then_some(()) }).await?;
    run_async(vm_cmd().args(["wait-ssh"]).arg(&w.vm.as_ref().unwrap().run_dir).args(["HARDENED_PORT", "300"]), "wait for ssh after the reboot").await?;
    let s = w.vm.as_ref().unwrap().ssh(hardened_port, Some(&nd.host_key)).await.context("ssh after the reboot, same pinned key")?;
    let boot2 = sh(&s, "cat /proc/sys/kernel/random/boot_id").await?.trim().to_string();
    ensure!(boot2 != boot1, "the boot id did not change");
    // The stack comes back by itself (restart: unless-stopped) and reports the new boot. Each
    // accepted report is logged with the node's counters and Center's ledger after it (used=).
    // The ledger must follow the counters: within a boot it grows by exactly the counters'
    // growth between any two logged reports (deltas telescope, so reports that were counted
    // but never logged change nothing); across the reboot it grows by the new boot's counters
    // from zero plus the old boot's traffic after its last logged report — the reports sent at
    // shutdown, after dockerd (live-restore) stopped collecting container logs, which are
    // counted but unlogged. That tail is ≥ 0 (nothing lost) and small (a double count of a
    // boot would be tens of MB).
    let back = Instant::now();
    log("ssh answers after the reboot");
    let cycles = eventually("the sidecar back and reporting the new boot twice", Duration::from_secs(300), || async {
        let l = sh(&s, "sudo docker logs k2-sidecar 2>&1").await.ok()?;
        let cycles = usage_cycles(&l);
        (cycles.iter().filter(|c| c.2 == boot2 && c.3.is_some()).count() >= 2).then_some(cycles)
    })
    .await;
    let cycles = match cycles {
        Ok(v) => v,
        Err(e) => {
            // What the node and Center say now: is Docker up, did the containers come back,
            // what did the sidecar log this boot, what does Center hold.
            let diag = sh(
                &s,
                "systemctl is-enabled docker containerd 2>&1 | tr '\\n' ' '; echo; systemctl is-active docker containerd 2>&1 | tr '\\n' ' '; echo; \
                 sudo docker ps -a --format '{{.Names}} {{.Status}}' 2>&1; echo '--- k2-sidecar (tail)'; sudo docker logs --tail 25 k2-sidecar 2>&1; \
                 echo '--- docker (this boot)'; sudo journalctl -b -u docker -u containerd -n 30 --no-pager 2>&1",
            )
            .await
            .unwrap_or_else(|e| format!("({e})"));
            let node = sim.node(&node_name).await.ok().flatten().map(|n| n.to_string()).unwrap_or_default();
            bail!("{e:#} ({:.0}s after ssh came back)\n--- node\n{diag}\n--- center-sim's node record\n{node}", back.elapsed().as_secs_f64());
        }
    };
    log(&format!("the sidecar reported the new boot {:.1}s after ssh came back", back.elapsed().as_secs_f64()));
    let total = |c: &(u64, u64, String, Option<u64>)| c.0 + c.1;
    for boot in [&boot1, &boot2] {
        let mine: Vec<_> = cycles.iter().filter(|c| &c.2 == boot && c.3.is_some()).collect();
        for pair in mine.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            ensure!(
                b.3.unwrap() - a.3.unwrap() == total(b) - total(a),
                "boot {boot}: Center's ledger grew by {} between two reports whose counters grew by {}",
                b.3.unwrap() as i128 - a.3.unwrap() as i128,
                total(b) as i128 - total(a) as i128
            );
        }
        ensure!(mine.len() >= 2, "boot {boot}: fewer than two logged reports");
    }
    let last1 = cycles.iter().rfind(|c| c.2 == boot1 && c.3.is_some()).context("old boot's reports")?.clone();
    let first2 = cycles.iter().find(|c| c.2 == boot2 && c.3.is_some()).context("new boot's reports")?.clone();
    let latest2 = cycles.iter().rfind(|c| c.2 == boot2 && c.3.is_some()).context("new boot's reports")?.clone();
    ensure!(total(&first2) < total(&last1), "the counters did not reset ({first2:?} after, {last1:?} before)");
    let tail = first2.3.unwrap() as i128 - last1.3.unwrap() as i128 - total(&first2) as i128;
    ensure!((0..4 << 20).contains(&tail), "across the reboot Center's ledger moved by {tail} B besides the new boot's counters (lost if < 0, counted twice if large)");
    // And Center's ledger is what its answers said.
    let latest_used = latest2.3.unwrap();
    let used = eventually("Center's ledger at or past the last answer", Duration::from_secs(60), || async {
        let used = sim.node(&node_name).await.ok()??["trafficUsedBytes"].as_u64()?;
        (used >= latest_used).then_some(used)
    })
    .await?;
    log(&format!(
        "Center's ledger {used} B; across the reboot: +{} (new boot from zero) +{tail} (old boot's reports after its last logged one); counters {} -> {}",
        total(&first2),
        total(&last1),
        total(&first2)
    ));

    w.phases.start("auto-update (digest resolved at the registry; a bad image rolled back; a good one kept)");
    let update = format!("cd {DEPLOY_DIR} && sudo PN_UPDATE_SETTLE_SECONDS=15 bash ./auto-update.sh 2>&1");
    let cat_compose = format!("sudo cat {DEPLOY_DIR}/docker-compose.yml");
    let compose_now = || sh(&s, &cat_compose);
    let base = compose_now().await?;
    let out = s.exec(&update, None, Duration::from_secs(600)).await?;
    ensure!(out.status == 0 && out.stdout_str().contains("up to date"), "auto-update on current pins ({}): {}", out.status, out.stdout_str());
    ensure!(compose_now().await? == base, "auto-update changed current pins");
    registry.serve("bad").await?;
    let t = Instant::now();
    let out = s.exec(&update, None, Duration::from_secs(900)).await?;
    ensure!(out.status == 1 && out.stdout_str().contains("rolled back"), "auto-update with a crashing image ({}): {}", out.status, out.stdout_str());
    ensure!(compose_now().await? == base, "the pins were not rolled back");
    let digests = running_digests(&s, "k2-sidecar").await?;
    ensure!(digests.contains(&registry.pin("base", "kaitu/k2-sidecar")), "after the rollback the sidecar runs {digests}");
    let state = sh(&s, "sudo docker inspect -f '{{.State.Status}}' k2-sidecar").await?;
    log(&format!("bad image rolled back in {:.1}s; sidecar {}", t.elapsed().as_secs_f64(), state.trim()));
    registry.serve("good").await?;
    let t = Instant::now();
    let out = s.exec(&update, None, Duration::from_secs(900)).await?;
    ensure!(out.status == 0 && out.stdout_str().contains("done:"), "auto-update to a good image ({}): {}", out.status, out.stdout_str());
    ensure!(compose_now().await? == repinned(&base, &registry, "good"), "the pins are not the new digests");
    for c in ["k2s", "k2-sidecar"] {
        let digests = running_digests(&s, c).await?;
        ensure!(digests.contains(&registry.pin("good", &format!("kaitu/{c}"))), "{c} runs {digests} after the update");
    }
    log(&format!("updated to the new digests in {:.1}s (pull + up -d, containers up)", t.elapsed().as_secs_f64()));
    s.close().await;

    let findings = files_with(&dir.join("deployer"), &[claim.expose_secret(), &secret]);
    ensure!(findings.is_empty(), "plaintext secret in the deployer's state or log: {findings:?}");
    w.phases.end();
    Ok(())
}

/// Debian 12 with Docker from its own packages: the deployer failed the operation with the
/// prep's reason (no compose v2), and the prep stopped in its preflight, before any change:
/// no "changed:" line, no Docker, no UFW, sshd still on 22 and root still let in.
async fn debian12_refused(w: &mut World, reason: &str, fresh_port: u16) -> Result<()> {
    const WHY: &str = "has no docker compose v2 plugin among its packages";
    ensure!(reason.contains(WHY) && reason.contains("nothing was changed"), "the deployer failed the operation, but not for the missing compose v2: {reason}");
    log(&format!("the deployer failed the operation: {}", reason.chars().take(300).collect::<String>()));
    w.phases.start("debian 12: the prep refused in its preflight, nothing changed");
    let vm = w.vm.as_ref().context("vm")?;
    let s = vm.ssh(fresh_port, None).await.context("ssh on 22 after the refused prep")?;
    let prep_log = sh(&s, &format!("sudo cat {PREP_STATE}/log")).await?;
    ensure!(sh(&s, &format!("sudo cat {PREP_STATE}/rc")).await?.trim() != "0", "prep rc 0:\n{prep_log}");
    ensure!(prep_log.contains("Debian GNU/Linux 12") && prep_log.contains(WHY), "prep log:\n{prep_log}");
    ensure!(!prep_log.contains("changed:") && !prep_log.contains("step 3/16"), "the prep went past its preflight:\n{prep_log}");
    let pkgs = sh(&s, "for p in docker.io docker-compose ufw; do dpkg-query -W -f='${Status}' $p 2>/dev/null | grep -q 'install ok installed' && echo $p; done; true").await?;
    ensure!(pkgs.trim().is_empty(), "installed by the refused prep: {pkgs}");
    let listening = sh(&s, "sudo ss -ltnH").await?;
    ensure!(listening.lines().any(|l| l.split_whitespace().nth(3).is_some_and(|a| a.ends_with(":22"))), "sshd left 22:\n{listening}");
    ensure!(sh(&s, "test -e /etc/ssh/sshd_config.d/00-pn-hardening.conf && echo yes || true").await?.trim().is_empty(), "the sshd drop-in was written");
    let r = vm.ssh_as("root", fresh_port, None).await.context("root after the refused prep (PermitRootLogin untouched)")?;
    r.close().await;
    s.close().await;
    log("skipped on Debian 12: node checks, idempotence, command lines, the image, reboot and auto-update (phases 4-9) — they need `docker compose` v2, which Debian 12 has only from Docker's repository, unreachable here");
    w.phases.end();
    Ok(())
}

fn same_key(a: &str, b: &str) -> bool {
    let t = |s: &str| s.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    !t(a).is_empty() && t(a) == t(b)
}

fn files_with(dir: &Path, needles: &[&str]) -> Vec<PathBuf> {
    testkit::stack::walk(dir)
        .into_iter()
        .filter(|p| std::fs::read(p).is_ok_and(|b| needles.iter().any(|n| !n.is_empty() && b.windows(n.len()).any(|w| w == n.as_bytes()))))
        .collect()
}
