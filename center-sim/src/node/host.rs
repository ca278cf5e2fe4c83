//! The emulated host's commands: runs a parsed command line ([`super::shell`]) against the
//! instance's state the way a fresh Ubuntu/Debian cloud host would (`cloud-init status`, the
//! prep script over stdin, `sudo tee`/`mkdir`/`chmod` inside the deploy dir, `docker compose …
//! pull/up -d` checked as compose and a registry would, `docker logs`, the deployer's close-22
//! script). Unknown commands exit 127, as bash would.
//!
//! Never: run anything for real, or write outside the deploy dir (refused and recorded).

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::shell::{Command, ComposeAction, Grep, Parsed, parse, secret_assignment};
use super::{CloudInit, DEPLOY_DIR, ENV_PATH, in_deploy_dir, inspect_env, normalize, parse_env, write_disk};
use super::ssh::{self, Output};
use crate::cloud::{PREP_ADMIN_USER, image_os};
use crate::sim::{Sim, Violation};


fn ok(stdout: impl Into<Vec<u8>>) -> Output {
    Output { stdout: stdout.into(), stderr: Vec::new(), status: 0 }
}

fn ok_err(stderr: impl Into<Vec<u8>>) -> Output {
    Output { stdout: Vec::new(), stderr: stderr.into(), status: 0 }
}

fn fail(status: u32, stderr: impl Into<String>) -> Output {
    let mut e: String = stderr.into();
    e.push('\n');
    Output { stdout: Vec::new(), stderr: e.into_bytes(), status }
}

fn home(user: &str) -> String {
    if user == "root" { "/root".into() } else { format!("/home/{user}") }
}

fn parent_of(path: &str) -> String {
    match path.rsplit_once('/') {
        Some(("", _)) => "/".into(),
        Some((p, _)) => p.into(),
        None => "/".into(),
    }
}

const PREP_STEPS: &[&str] = &[
    "timezone Asia/Singapore",
    "remove snapd",
    "swap 2G",
    "docker ce",
    "ipv6",
    "bbr",
    "docker daemon.json",
    "ufw-docker",
    "deploy dir /apps/kaitu-slave",
    "sysctl",
    "limits",
    "ssh port -> hardened",
    "journald persistence",
    "crash monitor",
    "auto-update cron",
    "done",
];

/// The host's side of an exec request: what [`ssh::serve`] runs for each command.
pub fn exec(sim: Sim, id: String, user: String, port: u16, raw: String, stdin: Vec<u8>) -> ssh::Running {
    Box::pin(async move { execute(&sim, &id, &user, port, &raw, stdin).await })
}

/// Runs one command on instance `id` as `user`, with `stdin`, on a connection to the
/// simulated sshd port `port`.
pub async fn execute(sim: &Sim, id: &str, user: &str, port: u16, raw: &str, stdin: Vec<u8>) -> Output {
    let p = parse(raw);
    let Some(life) = guard_command_line(sim, id, raw, &p) else {
        return fail(255, "connection to host lost");
    };
    let root = user == "root" || p.sudo;
    let cwd = p.cwd.clone().unwrap_or_else(|| home(user));
    let input = p.heredoc.clone().unwrap_or(stdin);
    match &p.cmd {
        Command::True => ok(""),
        Command::CloudInitStatus => cloud_init_status(sim, id),
        Command::Prep => prep(sim, id, user, root, port, input, life).await,
        Command::Mkdir { paths } => mkdir(sim, id, root, &cwd, paths),
        Command::Tee { path, append } => tee(sim, id, root, &cwd, path, *append, input, p.stdout_null),
        Command::Chmod { mode, paths } => chmod(sim, id, root, &cwd, mode, paths),
        Command::Compose { project_dir, file, action } => {
            compose(sim, id, p.sudo, project_dir.as_deref().unwrap_or(&cwd), file.as_deref(), action)
        }
        Command::Logs { tail, container, grep } => logs(sim, id, p.sudo, *tail, container, grep.as_ref()),
        Command::Unknown(w) => fail(127, format!("bash: line 1: {w}: command not found")),
    }
}

/// Records the command line's guardrail breaches; returns the instance's life token, or `None`
/// when the instance is gone.
fn guard_command_line(sim: &Sim, id: &str, raw: &str, p: &Parsed) -> Option<CancellationToken> {
    let mut st = sim.st();
    let (name, life) = st.cloud.instances.get(id).filter(|i| i.live()).map(|i| (i.name.clone(), i.host.life.clone()))?;
    if let Some(kind) = st.find_secret(raw).or_else(|| secret_assignment(raw)) {
        st.violate(Violation::new("secret_on_command_line", format!("a {kind} appeared in an exec command line")).on(id, &name));
    }
    if matches!(p.cmd, Command::Compose { action: ComposeAction::Down, .. }) {
        st.violate(Violation::new("down", "docker compose down was run (use pull + up -d)").on(id, &name));
    }
    Some(life)
}

/// Marks the deployer's detached-prep launcher script (`bash -s` on stdin): start the prep in
/// the background, or report the one already started, and return at once.
pub const PREP_START_MARK: &str = "# pnp:prep-start";
/// Marks the deployer's status script: report the detached prep's state.
pub const PREP_STATUS_MARK: &str = "# pnp:prep-status";
/// On the launcher's first line: the prep keeps sshd on 22 as well as on the hardened port,
/// until the deployer's close-22 script (Pnp's prep; a plain prep closes 22 itself).
pub const KEEP_22_MARK: &str = "keep-22";
/// Marks the deployer's close-22 script: sshd stops listening on 22 (sent once 1022 answered
/// from outside).
pub const CLOSE_22_MARK: &str = "# pnp:close-22";

/// `cloud-init status`: `status: done` (exit 0), or `status: error` (exit 1) under the
/// `cloudInitErrorRate` fault.
fn cloud_init_status(sim: &Sim, id: &str) -> Output {
    let st = sim.st();
    let Some(inst) = st.cloud.instances.get(id).filter(|i| i.live()) else { return fail(255, "connection to host lost") };
    match inst.host.cloud_init {
        CloudInit::Done => ok("status: done\n"),
        CloudInit::Error => Output { stdout: b"status: error\n".to_vec(), stderr: Vec::new(), status: 1 },
    }
}

async fn prep(sim: &Sim, id: &str, user: &str, root: bool, port: u16, script: Vec<u8>, life: CancellationToken) -> Output {
    if script.iter().all(u8::is_ascii_whitespace) {
        return ok("");
    }
    if !root {
        return fail(1, "provision-node.sh: must be run as root");
    }
    // The deployer's scripts carry their mark as the first line; only that line is read.
    let first = script.split(|b| *b == b'\n').find(|l| !l.iter().all(u8::is_ascii_whitespace)).unwrap_or_default();
    let first = String::from_utf8_lossy(first);
    let first = first.trim_start();
    if first.starts_with(PREP_STATUS_MARK) {
        return prep_status(sim, id);
    }
    if first.starts_with(CLOSE_22_MARK) {
        return close_22(sim, id, port);
    }
    if first.starts_with(PREP_START_MARK) {
        let keep_22 = first.split_whitespace().any(|w| w == KEEP_22_MARK);
        return prep_start(sim, id, user, keep_22, life);
    }
    run_prep(sim, id, user, false, life).await
}

/// The deployer's close-22 script: sshd stops listening on the fresh port (22). Sent over a
/// session on the hardened port, it proves 1022 answers from outside; sent otherwise while
/// nobody ever logged in on 1022, it is recorded as `closed_22_blind` (the node may be locked
/// out behind a firewall that does not let 1022 in).
fn close_22(sim: &Sim, id: &str, port: u16) -> Output {
    let hardened = sim.cfg.ssh_port_hardened;
    let mut st = sim.st();
    let Some(inst) = st.cloud.instances.get_mut(id).filter(|i| i.live()) else { return fail(255, "connection to host lost") };
    if !inst.host.hardened {
        return fail(3, "pnp-close-22: sshd does not answer on the hardened port; 22 kept");
    }
    let blind = port != hardened && inst.host.hardened_login_ms.is_none();
    let (name, was_open) = (inst.name.clone(), inst.host.fresh_listener.is_some());
    if let Some(l) = inst.host.fresh_listener.take() {
        l.stop.cancel();
    }
    if inst.host.port22_closed_ms.is_none() {
        inst.host.port22_closed_ms = Some(kit::now_ms());
    }
    if blind && was_open {
        st.violate(Violation::new("closed_22_blind", "port 22 was closed before the hardened port answered from outside").on(id, &name));
    }
    ok(if was_open { "pnp-close-22: closed\n" } else { "pnp-close-22: already closed\n" })
}

/// Starts the prep as a job of the host (it outlives the session, ends with the instance).
fn prep_start(sim: &Sim, id: &str, user: &str, keep_22: bool, life: CancellationToken) -> Output {
    {
        let mut st = sim.st();
        let Some(inst) = st.cloud.instances.get_mut(id).filter(|i| i.live()) else {
            return fail(255, "connection to host lost");
        };
        match &inst.host.prep_job {
            Some(j) if j.result.is_none() => return ok("pnp-prep: running\n"),
            Some(j) if j.result.as_ref().is_some_and(|r| r.rc == 0) => return ok("pnp-prep: done\n"),
            _ => {}
        }
        inst.host.prep_job = Some(super::PrepJob { started: std::time::Instant::now(), result: None });
    }
    let (sim, id, user) = (sim.clone(), id.to_string(), user.to_string());
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let out = run_prep(&sim, &id, &user, keep_22, life).await;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        let tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
        let mut st = sim.st();
        if let Some(job) = st.cloud.instances.get_mut(&id).and_then(|i| i.host.prep_job.as_mut()) {
            job.result = Some(super::PrepResult { rc: out.status, ms: started.elapsed().as_millis() as u64, tail });
        }
    });
    ok("pnp-prep: started\n")
}

/// What the status script prints: `absent`, `running ms=N`, or `done rc=R ms=N` + the log tail.
fn prep_status(sim: &Sim, id: &str) -> Output {
    let st = sim.st();
    let Some(inst) = st.cloud.instances.get(id).filter(|i| i.live()) else {
        return fail(255, "connection to host lost");
    };
    match &inst.host.prep_job {
        None => ok("pnp-prep: absent\n"),
        Some(j) => match &j.result {
            None => ok(format!("pnp-prep: running ms={}\n", j.started.elapsed().as_millis())),
            Some(r) => ok(format!("pnp-prep: done rc={} ms={}\n{}\n", r.rc, r.ms, r.tail)),
        },
    }
}

/// The releases `provision-node.sh` supports.
const PREP_OS: &[(&str, &[&str])] = &[("ubuntu", &["20.04", "22.04", "24.04"]), ("debian", &["12", "13"])];

/// The prep itself: the fault knobs' delay and failure, then SSH moves to the hardened port
/// (and, with `keep_22`, stays on the fresh one too until the close-22 script), root may no
/// longer log in (`PermitRootLogin no`) and the node's admin is the session's `user` — or,
/// for a root session, the user `provision-node.sh` makes from root's keys
/// ([`PREP_ADMIN_USER`]).
async fn run_prep(sim: &Sim, id: &str, user: &str, keep_22: bool, life: CancellationToken) -> Output {
    let (delay, fails, os) = {
        let mut st = sim.st();
        let delay = st.faults.prep_delay_ms;
        let fails = st.dice_roll(|f| f.prep_fail_rate);
        let Some(inst) = st.cloud.instances.get_mut(id) else { return fail(255, "connection to host lost") };
        inst.host.prep_runs += 1;
        (delay, fails, image_os(&inst.image_id).unwrap_or(("unknown", "")))
    };
    if !PREP_OS.iter().any(|(o, vs)| *o == os.0 && vs.contains(&os.1)) {
        return fail(1, format!("provision-node.sh: Ubuntu 20.04/22.04/24.04 or Debian 12/13 only (this host runs {} {})", os.0, os.1));
    }
    tokio::select! {
        _ = life.cancelled() => return fail(255, "connection to host lost"),
        _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
    }
    if fails {
        return fail(
            100,
            "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 1432 (unattended-upgr)\nprovision-node.sh: step 4/16 (docker ce) failed",
        );
    }
    let mut st = sim.st();
    let hardened_port = sim.cfg.ssh_port_hardened;
    let Some(inst) = st.cloud.instances.get_mut(id).filter(|i| i.live()) else {
        return fail(255, "connection to host lost");
    };
    inst.host.stop_containers();
    inst.host.hardened = true;
    inst.host.admin_user = Some(if user == "root" { PREP_ADMIN_USER.to_string() } else { user.to_string() });
    inst.host.dirs.insert("/apps".into());
    inst.host.dirs.insert(DEPLOY_DIR.into());
    if inst.host.listener.as_ref().is_some_and(|l| l.port != hardened_port) {
        let Some(ip) = inst.ipv4 else { return fail(1, "sshd: no address") };
        let bound = std::net::TcpListener::bind(SocketAddr::from((ip, hardened_port)))
            .and_then(|l| l.set_nonblocking(true).map(|_| l))
            .and_then(tokio::net::TcpListener::from_std);
        match bound {
            Ok(l) => {
                if let Some(old) = inst.host.listener.take() {
                    if keep_22 && inst.host.port22_closed_ms.is_none() {
                        inst.host.fresh_listener = Some(old);
                    } else {
                        old.stop.cancel();
                    }
                }
                ssh::serve(sim.clone(), inst, l, hardened_port, exec);
            }
            Err(e) => return fail(1, format!("sshd: cannot bind port {hardened_port}: {e}")),
        }
    }
    let out: String = PREP_STEPS.iter().enumerate().map(|(i, s)| format!("[{}/{}] {s}\n", i + 1, PREP_STEPS.len())).collect();
    ok(out)
}

/// Refuses a write outside the deploy dir, recording it.
fn outside(sim: &Sim, id: &str, what: &str, path: &str) -> Output {
    let mut st = sim.st();
    let name = st.cloud.instances.get(id).map(|i| i.name.clone()).unwrap_or_default();
    st.violate(Violation::new("write_outside_deploy_dir", format!("{what} {path}")).on(id, &name));
    fail(1, format!("{what}: {path}: Permission denied (center-sim refuses writes outside {DEPLOY_DIR}/)"))
}

fn mkdir(sim: &Sim, id: &str, root: bool, cwd: &str, paths: &[String]) -> Output {
    for raw in paths {
        let Some(abs) = normalize(raw, cwd) else { return fail(1, format!("mkdir: cannot create directory '{raw}'")) };
        let is_ancestor = format!("{DEPLOY_DIR}/").starts_with(&format!("{}/", abs.trim_end_matches('/')));
        if !(abs == DEPLOY_DIR || in_deploy_dir(&abs) || is_ancestor) {
            return outside(sim, id, "mkdir", &abs);
        }
        if !root {
            return fail(1, format!("mkdir: cannot create directory '{abs}': Permission denied"));
        }
        let mut st = sim.st();
        let Some(inst) = st.cloud.instances.get_mut(id) else { return fail(255, "connection to host lost") };
        let mut d = abs.clone();
        while d != "/" {
            inst.host.dirs.insert(d.clone());
            d = parent_of(&d);
        }
        if in_deploy_dir(&abs) {
            let rel = abs.strip_prefix(DEPLOY_DIR).unwrap_or_default().trim_start_matches('/');
            let disk = sim.disk_dir(&inst.name).join(rel);
            let _ = std::fs::create_dir_all(disk);
        }
    }
    ok("")
}

#[allow(clippy::too_many_arguments)]
fn tee(sim: &Sim, id: &str, root: bool, cwd: &str, path: &str, append: bool, data: Vec<u8>, quiet: bool) -> Output {
    let Some(abs) = normalize(path, cwd) else { return fail(1, format!("tee: {path}: No such file or directory")) };
    if !in_deploy_dir(&abs) {
        return outside(sim, id, "tee", &abs);
    }
    if !root {
        return fail(1, format!("tee: {abs}: Permission denied"));
    }
    let mut st = sim.st();
    let st = &mut *st;
    let Some(inst) = st.cloud.instances.get_mut(id) else { return fail(255, "connection to host lost") };
    if !inst.host.dirs.contains(&parent_of(&abs)) {
        return fail(1, format!("tee: {abs}: No such file or directory"));
    }
    let content = match (append, inst.host.files.get(&abs)) {
        (true, Some(old)) => [old.as_slice(), data.as_slice()].concat(),
        _ => data.clone(),
    };
    let rel = abs.strip_prefix(DEPLOY_DIR).unwrap_or_default().to_string();
    if let Err(e) = write_disk(&sim.disk_dir(&inst.name), &rel, &content) {
        tracing::warn!(instance = %id, path = %abs, error = %e, "node disk write failed");
        return fail(1, format!("tee: {abs}: I/O error"));
    }
    inst.host.files.insert(abs.clone(), content.clone());
    let name = inst.name.clone();
    if abs == ENV_PATH {
        inspect_env(st, id, &name, &content);
    }
    if quiet { ok("") } else { ok(data) }
}

fn valid_mode(mode: &str) -> bool {
    let octal = (3..=4).contains(&mode.len()) && mode.chars().all(|c| ('0'..='7').contains(&c));
    let symbolic = mode.split(',').all(|part| {
        let rest = part.trim_start_matches(['u', 'g', 'o', 'a']);
        let mut cs = rest.chars();
        matches!(cs.next(), Some('+' | '-' | '=')) && cs.clone().count() > 0 && cs.all(|c| "rwxXst".contains(c))
    });
    octal || symbolic
}

fn chmod(sim: &Sim, id: &str, root: bool, cwd: &str, mode: &str, paths: &[String]) -> Output {
    if !valid_mode(mode) {
        return fail(1, format!("chmod: invalid mode: '{mode}'"));
    }
    for raw in paths {
        let Some(abs) = normalize(raw, cwd) else { return fail(1, format!("chmod: cannot access '{raw}'")) };
        if !(in_deploy_dir(&abs) || abs == DEPLOY_DIR) {
            return outside(sim, id, "chmod", &abs);
        }
        if !root {
            return fail(1, format!("chmod: changing permissions of '{abs}': Operation not permitted"));
        }
        let st = sim.st();
        let Some(inst) = st.cloud.instances.get(id) else { return fail(255, "connection to host lost") };
        // The shell expands an unquoted glob; with no match bash passes it through literally.
        let exists = if abs.contains(['*', '?']) {
            inst.host.files.keys().any(|f| glob_match(&abs, f))
        } else {
            inst.host.files.contains_key(&abs) || inst.host.dirs.contains(&abs)
        };
        if !exists {
            return fail(1, format!("chmod: cannot access '{abs}': No such file or directory"));
        }
    }
    ok("")
}

/// `*` and `?` matching within one path (`*` does not cross `/`).
fn glob_match(pattern: &str, path: &str) -> bool {
    fn go(p: &[char], s: &[char]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some('*'), _) => go(&p[1..], s) || (s.first().is_some_and(|c| *c != '/') && go(p, &s[1..])),
            (Some('?'), Some(c)) if *c != '/' => go(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &s[1..]),
            _ => false,
        }
    }
    let (p, s): (Vec<char>, Vec<char>) = (pattern.chars().collect(), path.chars().collect());
    go(&p, &s)
}

fn docker_missing(sudo: bool) -> Output {
    if sudo { fail(1, "sudo: docker: command not found") } else { fail(127, "bash: line 1: docker: command not found") }
}

/// The stack's containers come up: k2s logs its start, the sidecar starts with `env`.
fn start_containers(sim: &Sim, inst: &mut crate::cloud::Instance, env: Vec<u8>, noise: u64) {
    inst.host.containers_up = true;
    inst.host.log_k2s("k2s starting");
    inst.host.log_k2s("server ready listen=:443");
    inst.host.k2s_log.noise(noise);
    super::sidecar::start(sim, inst, env);
}

fn compose(sim: &Sim, id: &str, sudo: bool, dir: &str, file: Option<&str>, action: &ComposeAction) -> Output {
    let mut st = sim.st();
    let noise = st.faults.log_noise_lines;
    let Some(inst) = st.cloud.instances.get_mut(id) else { return fail(255, "connection to host lost") };
    if !inst.host.hardened {
        return docker_missing(sudo);
    }
    let file = file.unwrap_or("docker-compose.yml");
    let Some(abs) = normalize(file, dir) else { return fail(1, format!("open {file}: no such file or directory")) };
    let Some(text) = inst.host.files.get(&abs).cloned() else {
        return fail(1, format!("open {abs}: no such file or directory"));
    };
    // compose reads `.env` from the project directory: the compose file's.
    let project_dir = parent_of(&abs);
    let dot_env = inst.host.files.get(&format!("{}/.env", project_dir.trim_end_matches('/'))).cloned().unwrap_or_default();
    let project = if matches!(action, ComposeAction::Pull | ComposeAction::UpDetached) {
        let dir_name = project_dir.rsplit('/').next().unwrap_or("").to_string();
        match super::compose::load(&text, &parse_env(&String::from_utf8_lossy(&dot_env)), &dir_name) {
            Ok(p) => p,
            Err(r) => {
                let mut e = r.message;
                e.push('\n');
                return Output { stdout: Vec::new(), stderr: e.into_bytes(), status: r.status };
            }
        }
    } else {
        Vec::new()
    };
    let container = |svc: &str| project.iter().find(|s| s.name == svc).map(|s| s.container.clone()).unwrap_or_else(|| svc.to_string());
    match action {
        ComposeAction::Pull => {
            let lines: String = project.iter().map(|s| format!(" {} Pulled\n", s.name)).collect();
            ok_err(lines)
        }
        ComposeAction::UpDetached => {
            inst.host.up_runs += 1;
            let names = (container("k2s"), container("k2-sidecar"));
            let renamed = inst.host.container_names.as_ref().is_some_and(|n| *n != names);
            inst.host.container_names = Some(names.clone());
            let env = inst.host.files.get(ENV_PATH).cloned().unwrap_or_default();
            let (k, sc) = (&names.0, &names.1);
            let out = if !inst.host.containers_up {
                inst.host.containers_created = true;
                start_containers(sim, inst, env, noise);
                format!(" Container {k}  Started\n Container {sc}  Started\n")
            } else if renamed || inst.host.sidecar.as_ref().is_some_and(|s| s.env != env) {
                // compose recreates a container whose configuration changed.
                inst.host.stop_containers();
                start_containers(sim, inst, env, noise);
                format!(" Container {k}  Recreated\n Container {sc}  Recreated\n Container {k}  Started\n Container {sc}  Started\n")
            } else {
                format!(" Container {k}  Running\n Container {sc}  Running\n")
            };
            ok_err(out)
        }
        ComposeAction::Down => {
            inst.host.stop_containers();
            ok_err(" Container k2-sidecar  Removed\n Container k2s  Removed\n")
        }
        ComposeAction::UpForeground => fail(1, "center-sim: only `up -d` is emulated"),
        ComposeAction::Other(v) => fail(1, format!("center-sim: `docker compose {v}` is not emulated")),
    }
}

fn logs(sim: &Sim, id: &str, sudo: bool, tail: Option<usize>, container: &str, grep: Option<&Grep>) -> Output {
    let st = sim.st();
    let Some(inst) = st.cloud.instances.get(id) else { return fail(255, "connection to host lost") };
    let (k2s, sidecar) = inst.host.container_names.clone().unwrap_or_else(|| ("k2s".into(), "k2-sidecar".into()));
    let log = match container {
        _ if !inst.host.hardened || !inst.host.containers_created => None,
        c if c == k2s => Some(&inst.host.k2s_log),
        c if c == sidecar => Some(&inst.host.sidecar_log),
        _ => None,
    };
    let Some(log) = log else {
        let err = if inst.host.hardened {
            fail(1, format!("Error response from daemon: No such container: {container}"))
        } else {
            docker_missing(sudo)
        };
        // docker's complaint goes to grep's stdin (`2>&1`), which finds nothing in it.
        return match grep {
            Some(_) => Output { status: 1, ..Output::default() },
            None => err,
        };
    };
    let skip = tail.map(|n| log.len().saturating_sub(n as u64)).unwrap_or(0);
    let Some(g) = grep else { return ok(log.tail_text(tail.map(|n| n as u64))) };
    let (mut out, mut found) = (String::new(), 0);
    log.visit(skip, |l| {
        if g.matches(l) {
            out.push_str(l);
            out.push('\n');
            found += 1;
        }
        found < g.max
    });
    Output { stdout: out.into_bytes(), stderr: Vec::new(), status: if found > 0 { 0 } else { 1 } }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::node::shell::parse;

    fn cmd(s: &str) -> Command {
        parse(s).cmd
    }

    #[test]
    fn cloud_init_status_and_the_deployers_scripts() {
        assert_eq!(cmd("cloud-init status"), Command::CloudInitStatus);
        assert_eq!(cmd("cloud-init status --wait --long"), Command::CloudInitStatus);
        assert_eq!(cmd("cloud-init status --format json"), Command::Unknown("cloud-init".into()));
        assert_eq!(cmd("cloud-init clean"), Command::Unknown("cloud-init".into()));
        assert_eq!(home("admin"), "/home/admin");
        assert_eq!(home("root"), "/root");
    }

    #[test]
    fn container_logs_keep_their_start_and_their_end() {
        let mut log = crate::node::ContainerLog::default();
        log.push("k2s starting");
        log.push("server ready listen=:443");
        log.noise(100_000);
        log.push("last line");
        assert_eq!(log.len(), 100_003);
        let tail = log.tail_text(Some(3));
        let lines: Vec<&str> = tail.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].ends_with("(filler 99999/100000)"), "{}", lines[0]);
        assert!(lines[2].ends_with("last line"));
        assert!(!log.tail_text(Some(20)).contains("server ready"));
        let mut seen = Vec::new();
        log.visit(0, |l| {
            if l.contains("server ready") {
                seen.push(l.to_string());
            }
            seen.is_empty()
        });
        assert_eq!(seen.len(), 1);
        // Thousands of later lines: the first ones stay.
        for i in 0..5000 {
            log.push(&format!("DIAG: usage-reporter-cycle-ok {i}"));
        }
        let all = log.tail_text(None);
        assert!(all.contains("server ready listen=:443") && all.contains("cycle-ok 4999"));
        assert!(!all.contains("cycle-ok 100\n"), "the middle is dropped");
    }

    #[test]
    fn globs() {
        assert!(glob_match("/apps/kaitu-slave/*.sh", "/apps/kaitu-slave/auto-update.sh"));
        assert!(!glob_match("/apps/kaitu-slave/*.sh", "/apps/kaitu-slave/.env"));
        assert!(!glob_match("/apps/*.sh", "/apps/kaitu-slave/a.sh"));
        assert!(glob_match("/a/?.sh", "/a/b.sh"));
    }

    #[test]
    fn modes() {
        assert!(valid_mode("600") && valid_mode("0755") && valid_mode("+x") && valid_mode("u+rw,go-rwx"));
        assert!(!valid_mode("999") && !valid_mode("x") && !valid_mode("+"));
    }
}
