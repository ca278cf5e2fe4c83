//! The multi-call binary `pnp` (target/debug/pnp) runs the real programs: a service reaches
//! ready on a real nats-server whether it is picked by the first argument or by the name of a
//! link, fails exactly as its own binary does, center-sim gets its flags, and an unknown name
//! is refused with status 2.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use testkit::{Nats, Proc, eventually, free_port};

fn pnp() -> std::path::PathBuf {
    testkit::bin("pnp").unwrap()
}

/// What a service needs to start against `nats` (no Center call happens before ready).
fn service_env(nats: &Nats, data: &Path, ops_port: u16) -> BTreeMap<String, String> {
    [
        ("PN_NATS_URL", nats.url()),
        ("PN_DATA_DIR", data.display().to_string()),
        ("PN_OPS_LISTEN", format!("127.0.0.1:{ops_port}")),
        ("PN_CENTER_URL", "http://127.0.0.1:9".to_string()),
        ("PN_CENTER_TOKEN", "pnp-test-token".to_string()),
        ("PN_SEAL_KEY", testkit::rand_hex(32)),
        ("PN_LOG_FORMAT", "json".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Starts `program args` with exactly `env` (plus PATH), output to `log`.
fn spawn(program: &Path, args: &[&str], env: &BTreeMap<String, String>, log: &Path) -> Proc {
    let out = std::fs::File::create(log).unwrap();
    let child = Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    Proc { child, name: program.display().to_string() }
}

/// Waits for `/readyz` 200 on `ops_port`; the log on failure.
async fn wait_ready(p: &mut Proc, ops_port: u16, log: &Path) {
    kit::init_crypto();
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{ops_port}/readyz");
    let ready = eventually("/readyz 200", Duration::from_secs(30), || {
        let exited = p.child.try_wait().ok().flatten();
        let req = http.get(&url).timeout(Duration::from_secs(1)).send();
        async move {
            if let Some(st) = exited {
                return Some(Err(format!("exited ({st}) before ready")));
            }
            match req.await {
                Ok(r) if r.status() == 200 => Some(Ok(())),
                _ => None,
            }
        }
    })
    .await;
    let log_text = std::fs::read_to_string(log).unwrap_or_default();
    match ready {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e}:\n{log_text}"),
        Err(e) => panic!("{e}:\n{log_text}"),
    }
}

#[tokio::test]
async fn pnp_svc_meter_reaches_ready_and_stops_cleanly_on_sigterm() {
    let nats = Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ops = free_port();
    let mut env = service_env(&nats, &dir.path().join("data"), ops);
    env.insert("PN_LISTEN".into(), format!("127.0.0.1:{}", free_port()));
    let log = dir.path().join("svc-meter.log");
    let mut meter = spawn(&pnp(), &["svc-meter"], &env, &log);
    wait_ready(&mut meter, ops, &log).await;
    // svc-meter's own state directory: the program, not pnp, named it.
    assert!(dir.path().join("data/svc-meter").is_dir());
    let status = meter.terminate(Duration::from_secs(30)).expect("svc-meter did not stop on SIGTERM");
    assert!(status.success(), "svc-meter under pnp exited {status} on SIGTERM:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
}

#[tokio::test]
async fn a_link_named_svc_claimer_runs_svc_claimer() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("svc-claimer");
    std::os::unix::fs::symlink(pnp(), &link).unwrap();

    // Without configuration: the very error, and status, of the real svc-claimer binary.
    let bare = |p: &Path| Command::new(p).env_clear().stdin(Stdio::null()).output().unwrap();
    let via_link = bare(&link);
    let real = bare(&testkit::bin("svc-claimer").unwrap());
    let err = String::from_utf8_lossy(&via_link.stderr).into_owned();
    assert!(err.contains("PN_CENTER_TOKEN is missing or empty"), "{err}");
    assert_eq!(err, String::from_utf8_lossy(&real.stderr));
    assert_eq!(via_link.status.code(), Some(1));
    assert_eq!(via_link.status.code(), real.status.code());

    // With it: a running claimer.
    let nats = Nats::start().unwrap();
    let ops = free_port();
    let env = service_env(&nats, &dir.path().join("data"), ops);
    let log = dir.path().join("svc-claimer.log");
    let mut claimer = spawn(&link, &[], &env, &log);
    wait_ready(&mut claimer, ops, &log).await;
    assert!(dir.path().join("data/svc-claimer").is_dir());
}

#[test]
fn pnp_center_sim_gets_its_flags_and_prints_its_first_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = BTreeMap::new();
    env.insert("PN_CENTER_TOKEN".to_string(), "pnp-test-token".to_string());
    let child = Command::new(pnp())
        .args(["center-sim", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("sim"))
        .env_clear()
        .envs(&env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut sim = Proc { child, name: "center-sim".into() };
    let mut first = String::new();
    BufReader::new(sim.child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    let url = first.trim().strip_prefix("center-sim listening on ").unwrap_or_else(|| panic!("first line: {first:?}")).to_string();
    assert!(url.starts_with("http://127.0.0.1:") && !url.ends_with(":0"), "{url}");
    // --data-dir reached center-sim's parser: it generated the admin keypair there.
    assert!(dir.path().join("sim/.admin/id_ed25519.pub").is_file());
    sim.kill();
}

#[test]
fn pnp_refuses_unknown_programs_and_lists_them() {
    let out = Command::new(pnp()).arg("nope").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown program \"nope\"") && err.contains("svc-meter"), "{err}");
    assert!(out.stdout.is_empty());

    let out = Command::new(pnp()).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "pnp alone is a usage error");

    let out = Command::new(pnp()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for p in ["svc-claimer", "svc-cloud", "svc-deployer", "svc-verifier", "svc-meter", "center-sim", "pnctl"] {
        assert!(help.contains(p), "pnp --help does not list {p}:\n{help}");
    }

    // pnctl's own parser, with its own name.
    let out = Command::new(pnp()).args(["pnctl", "--version"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("pnctl {}", env!("CARGO_PKG_VERSION")));
}
