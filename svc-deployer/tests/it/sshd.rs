//! The deployer against a real OpenSSH sshd on loopback: the commands it sends must work on a
//! real shell, files must land with the right content and mode, and no process on this
//! machine may ever carry a secret in its command line. A stand-in `sudo` and `docker` come
//! first on the sshd session's PATH, and the prep script is a harmless stand-in: the real
//! provision-node.sh must never run on this machine.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::{Instance, InstanceReady, Operation, subjects};
use secrecy::{ExposeSecret, SecretString};
use testkit::{Nats, Proc, free_port, rand_hex, wait_tcp};

use crate::helpers::*;

struct Sshd {
    _proc: Proc,
    port: u16,
    host_public: String,
    log: PathBuf,
}

fn must_be_root() -> String {
    let out = Command::new("id").arg("-un").output().expect("run id");
    let user = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let uid = Command::new("id").arg("-u").output().expect("run id -u");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "the sshd test needs root (sshd must switch users and own its privilege-separation dir); \
         run the tests as root, e.g. in CI"
    );
    user
}

fn write_exec(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn start_sshd(dir: &Path, authorized_public: &str, bin_dir: &Path) -> Sshd {
    let sshd = Path::new("/usr/sbin/sshd");
    assert!(sshd.exists(), "/usr/sbin/sshd is not installed (apt-get install openssh-server; scripts/bootstrap does it)");
    let host_key = dir.join("ssh_host_ed25519_key");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&host_key)
        .status()
        .expect("ssh-keygen (openssh-client) must be installed");
    assert!(st.success(), "ssh-keygen failed");
    let host_public = std::fs::read_to_string(dir.join("ssh_host_ed25519_key.pub")).unwrap();
    let authorized = dir.join("authorized_keys");
    std::fs::write(&authorized, format!("{authorized_public}\n")).unwrap();
    // The privilege-separation directory sshd insists on.
    std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");
    let port = free_port();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\n\
             ListenAddress 127.0.0.1\n\
             HostKey {hk}\n\
             PidFile {pid}\n\
             AuthorizedKeysFile {auth}\n\
             UsePAM no\n\
             PermitRootLogin prohibit-password\n\
             StrictModes no\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\n\
             X11Forwarding no\n\
             PrintMotd no\n\
             UseDNS no\n\
             LogLevel VERBOSE\n\
             MaxSessions 64\n\
             # Stand-ins first on PATH; SHLVL=1 keeps bash from sourcing ~/.bashrc for ssh\n\
             # commands (a clean, fast shell whatever the test user's start-up files do).\n\
             SetEnv PATH={bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin SHLVL=1\n",
            hk = host_key.display(),
            pid = dir.join("sshd.pid").display(),
            auth = authorized.display(),
            bin = bin_dir.display(),
        ),
    )
    .unwrap();
    let t = Command::new(sshd).arg("-t").arg("-f").arg(&config).output().unwrap();
    assert!(t.status.success(), "sshd rejects the test config: {}", String::from_utf8_lossy(&t.stderr));
    let log = dir.join("sshd.log");
    let proc = Proc::spawn_logged("sshd", Command::new(sshd).args(["-D", "-e", "-f"]).arg(&config), &log).expect("start sshd");
    wait_tcp(([127, 0, 0, 1], port).into(), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("sshd did not start: {e}\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
    Sshd { _proc: proc, port, host_public, log }
}

/// Samples every process's command line until stopped; returns the distinct ones seen.
struct CmdlineSampler {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<BTreeSet<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CmdlineSampler {
    fn start() -> CmdlineSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let (s, v) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok(rd) = std::fs::read_dir("/proc") else { return };
                for e in rd.flatten() {
                    let name = e.file_name();
                    if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                        continue;
                    }
                    if let Ok(raw) = std::fs::read(e.path().join("cmdline"))
                        && !raw.is_empty()
                    {
                        v.lock().unwrap().insert(String::from_utf8_lossy(&raw).replace('\0', " "));
                    }
                }
            }
        });
        CmdlineSampler { stop, seen, thread: Some(thread) }
    }

    fn finish(mut self) -> BTreeSet<String> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn deploys_over_real_openssh_without_secrets_on_any_command_line() {
    let user = must_be_root();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let admin = AdminKey::create(dir).unwrap();

    // Stand-ins: `sudo` runs its arguments (after a short pause, so the sampler sees each
    // command); `docker` records where and how it was called.
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let docker_log = dir.join("docker.log");
    write_exec(&bin.join("sudo"), "#!/bin/sh\nsleep 0.1\nexec \"$@\"\n");
    write_exec(&bin.join("docker"), &format!("#!/bin/sh\nprintf '%s|%s\\n' \"$PWD\" \"$*\" >> {}\n", docker_log.display()));
    let prep_log = dir.join("prep.log");
    let prep = dir.join("prep-standin.sh");
    std::fs::write(&prep, format!("echo \"prep as uid $(id -u)\" >> {}\nsleep 1\n", prep_log.display())).unwrap();

    let prep_state = dir.join("var/lib/pnp/prep");
    let sshd = start_sshd(dir, &admin.public, &bin);
    let deploy_dir = dir.join("apps/kaitu-slave");
    let nats = Nats::start().unwrap();
    let bus = Bus::connect(&nats).await.unwrap();
    let seal = Seal::new();
    // The provider the deployer checks the instance with: a Hetzner API stand-in that shows
    // this sshd's address as the instance `pn-<sub>`.
    let sub = format!("it{}", rand_hex(4));
    let instance_id = format!("{}", 40_000 + rand::random::<u16>() as u32);
    let api = hetzner_stub("hz-read-token-0123", vec![(instance_id.clone(), format!("pn-{sub}"), "127.0.0.1".into())]).await.unwrap();
    let mut cfg = DeployerConfig::new(&nats, &dir.join("data"), "http://127.0.0.1:9", &seal);
    cfg.set("PN_SSH__ADMIN_KEYS", format!("hetzner={}", admin.private_path.display()))
        .set("PN_PROVIDER", "hetzner")
        .set("PN_HETZNER__API_URL", api)
        .set("PN_HETZNER__TOKEN", "hz-read-token-0123")
        .set("PN_SSH__USER", user)
        .set("PN_SSH__FRESH_PORT", sshd.port.to_string())
        .set("PN_SSH__HARDENED_PORT", sshd.port.to_string())
        .set("PN_DEPLOY_DIR", deploy_dir.display().to_string())
        .set("PN_PREP_SCRIPT", prep.display().to_string())
        .set("PN_SSH__PREP_STATE_DIR", prep_state.display().to_string())
        // The stand-in prep takes 1 s: longer than this, so the operation parks, the session
        // closes, and the prep must live on detached under real sshd.
        .set("PN_SSH__PREP_INLINE_WAIT_MS", "300")
        .set("PN_SSH__PREP_POLL_MS", "200")
        .set("PN_SUDO", "sudo");
    let sampler = CmdlineSampler::start();
    let mut d = Deployer::start(&cfg).unwrap();

    let claim = SecretString::from(format!("clm_{}", rand_hex(20)));
    let op_id = format!("op-{}", rand_hex(6));
    let ir = InstanceReady {
        op: Some(Operation {
            operation_id: op_id.clone(),
            sub_id: sub.clone(),
            region: "jp".into(),
            traffic_total_bytes: 3 << 29,
            ip_type: "non-residential".into(),
            center_url: "https://center.example".into(),
            domain: "node.example.com".into(),
            sealed_claim_token: seal.key.seal_str(&claim),
            holder: "it".into(),
            claimed_at_ms: kit::now_ms(),
            claim_attempt: 1,
            queued_at_ms: 0,
        }),
        instance: Some(Instance {
            instance_id: instance_id.clone(),
            name: format!("pn-{sub}"),
            ipv4: "127.0.0.1".into(),
            account: "hetzner".into(),
            ..Default::default()
        }),
        ready_at_ms: kit::now_ms(),
    };
    bus.publish_instance(&ir, &format!("{op_id}.cloud.1")).await.unwrap();
    let nd = bus.wait_deployed(&op_id, PATIENCE).await.unwrap_or_else(|e| {
        panic!("{e}\n--- deployer\n{}\n--- sshd\n{}", d.log_text(), std::fs::read_to_string(&sshd.log).unwrap_or_default())
    });
    d.assert_alive();

    // .env: every variable, mode 600.
    let env_path = deploy_dir.join(".env");
    let mode = std::fs::metadata(&env_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, ".env must be mode 600");
    let env = parse_env(&std::fs::read_to_string(&env_path).unwrap());
    let secret = env["K2_NODE_SECRET"].clone();
    assert_eq!(secret.len(), 64);
    assert_eq!(nd.node_secret_sha256, sha256_hex_text(&secret));
    assert_eq!(env["K2_PRIVATE_CLAIM"], claim.expose_secret());
    assert_eq!(env["K2_CENTER_URL"], "https://center.example");
    assert_eq!(env["K2_DOMAIN"], "node.example.com");
    assert_eq!(env["K2_NODE_TRAFFIC_LIMIT_GB"], "1", "runbook: trafficTotalBytes / 1024³, a whole number");
    assert_eq!(env["K2_NODE_NAME"], format!("pn-{sub}"));
    assert_eq!(env["K2_NODE_REGION"], "jp");
    assert_eq!(env["K2_IP_TYPE"], "non_residential");
    assert_eq!(env["K2_VERSION"], svc_deployer::settings::DEFAULT_K2_VERSION);
    assert_eq!(env.len(), 9, "exactly the runbook's variables: {:?}", env.keys().collect::<Vec<_>>());

    // The stack files as embedded.
    let read = |f: &str| std::fs::read(deploy_dir.join(f)).unwrap();
    assert_eq!(read("docker-compose.yml"), svc_deployer::stack::DOCKER_COMPOSE_YML.as_bytes());
    assert_eq!(read("users"), b"");
    assert_eq!(read("auto-update.sh"), svc_deployer::stack::AUTO_UPDATE_SH.as_bytes());
    assert_eq!(read("k2s-crash-monitor.sh"), svc_deployer::stack::CRASH_MONITOR_SH.as_bytes());

    // The prep ran once, as root; docker was called in the deploy dir with pull then up -d.
    let preps = std::fs::read_to_string(&prep_log).unwrap();
    assert_eq!(preps.lines().collect::<Vec<_>>(), vec!["prep as uid 0"]);
    // It ran detached, from the launcher's root-only state dir, and finished with 0.
    assert_eq!(std::fs::read_to_string(prep_state.join("rc")).unwrap().trim(), "0");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&prep_state).unwrap().permissions().mode() & 0o777, 0o700);
    assert!(d.metric("pn_handler_parks_total").await.unwrap() >= 1.0, "the 1 s prep should have parked the operation");
    let dd = deploy_dir.display().to_string();
    let docker_calls = |n| {
        let text = std::fs::read_to_string(&docker_log).unwrap();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        assert_eq!(lines.len(), n, "{lines:?}");
        lines
    };
    assert_eq!(
        docker_calls(2),
        vec![format!("{dd}|compose -f docker-compose.yml pull"), format!("{dd}|compose -f docker-compose.yml up -d")]
    );
    assert!(same_key(&nd.host_key, &sshd.host_public), "the pinned key is sshd's host key");
    assert_eq!(nd.ssh_port, u32::from(sshd.port));

    // A replay: the same secret, no second prep, pull + up -d again.
    let seq = bus.publish_replay(&op_id).await.unwrap();
    bus.wait_acked(subjects::REPLAY_STREAM, "svc-deployer-replay", seq, PATIENCE).await.unwrap();
    assert_eq!(bus.count(subjects::FAILED, &op_id).await, 0, "{}", d.log_text());
    assert_eq!(parse_env(&std::fs::read_to_string(&env_path).unwrap())["K2_NODE_SECRET"], secret);
    assert_eq!(std::fs::read_to_string(&prep_log).unwrap().lines().count(), 1);
    let calls = docker_calls(4);
    assert!(calls.iter().all(|c| !c.contains(" down") && !c.ends_with("down")), "never down: {calls:?}");

    // No process ever had a secret in its command line; the sampler did see the commands.
    let seen = sampler.finish();
    assert!(seen.iter().any(|c| c.contains("bash -s")), "the sampler never saw the prep running ({} cmdlines)", seen.len());
    for c in &seen {
        assert!(!c.contains(claim.expose_secret()), "the claim token was on a command line");
        assert!(!c.contains(&secret), "the node secret was on a command line");
    }
    // Nor in the logs or the deployer's state.
    let log = d.log_text();
    assert!(!log.contains(claim.expose_secret()) && !log.contains(&secret), "a secret is in the deployer's log");
    let sshd_log = std::fs::read_to_string(&sshd.log).unwrap_or_default();
    assert!(!sshd_log.contains(claim.expose_secret()) && !sshd_log.contains(&secret), "a secret is in sshd's log");
    let hits = files_containing(&dir.join("data/svc-deployer"), &[claim.expose_secret(), &secret]);
    assert!(hits.is_empty(), "plaintext secret in the deployer's state: {hits:?}");
}

/// A node that floods us: a command's output is captured up to `kit::ssh::OUTPUT_CAP`, then cut
/// and the command fails with `OutputTooLarge` (the deployer fails the step, never retries it).
#[tokio::test]
async fn a_flood_of_output_is_cut_at_the_cap() {
    let user = must_be_root();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let admin = AdminKey::create(dir).unwrap();
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let sshd = start_sshd(dir, &admin.public, &bin);
    let key = Arc::new(kit::ssh::parse_private_key(&std::fs::read_to_string(&admin.private_path).unwrap()).unwrap());
    let target = kit::ssh::Target {
        host: "127.0.0.1".into(),
        port: sshd.port,
        user,
        key,
        pinned: Some(sshd.host_public.clone()),
        connect_timeout: Duration::from_secs(10),
    };
    let s = kit::ssh::connect(&target).await.unwrap();
    let small = s.exec("head -c 1000 /dev/zero | tr '\\0' x", None, Duration::from_secs(20)).await.unwrap();
    assert_eq!(small.stdout.len(), 1000);
    let cap = kit::ssh::OUTPUT_CAP;
    for cmd in [format!("head -c {} /dev/zero", cap * 3), format!("head -c {} /dev/zero >&2", cap + 1)] {
        match s.exec(&cmd, None, Duration::from_secs(60)).await {
            Err(kit::ssh::SshError::OutputTooLarge { cap: c, .. }) => assert_eq!(c, cap),
            other => panic!("{cmd}: expected OutputTooLarge, got {:?}", other.map(|o| (o.status, o.stdout.len(), o.stderr.len()))),
        }
    }
    // Exactly the cap is still fine, and the session keeps serving after a cut.
    let at_cap = s.exec(&format!("head -c {cap} /dev/zero"), None, Duration::from_secs(60)).await.unwrap();
    assert_eq!(at_cap.stdout.len(), cap);
    let _ = std::fs::read_to_string(&sshd.log);
}
