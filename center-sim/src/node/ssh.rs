//! Each instance's sshd (a russh server): only the image's login user (`cloud::login_user`)
//! with its account's key — root on an image whose user is not root gets cloud-init's
//! "Please login as the user …" and exit 142; after the prep root is refused outright
//! (`PermitRootLogin no`) and the admin the prep left gets in — behind the provider firewall (the
//! `providerFirewall` knob), and a parser + interpreter for exactly the commands the deployer
//! and verifier send, behaving like a fresh Ubuntu/Debian cloud host (`cloud-init status`,
//! prep script over stdin, `sudo tee`, `docker compose … pull/up -d` checked as compose and a
//! registry would, `docker logs`, the deployer's close-22 script). Unknown commands exit 127,
//! as bash would.
//!
//! Never: run anything for real, or write outside the deploy dir (refused and recorded).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelId, Disconnect, MethodKind, MethodSet};
use tokio_util::sync::CancellationToken;

use super::{CloudInit, DEPLOY_DIR, ENV_PATH, Listener, in_deploy_dir, inspect_env, normalize, parse_env, write_disk};
use crate::cloud::{Instance, PREP_ADMIN_USER, image_os, real_port};
use crate::sim::{Sim, Violation};

/// Largest stdin a command may receive (the prep script and stack files are far smaller).
const MAX_STDIN: usize = 16 << 20;
/// What a fresh Ubuntu host's sshd announces.
const SERVER_ID: &str = "SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13.5";

// ---------- the command parser ----------

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ComposeAction {
    Pull,
    UpDetached,
    UpForeground,
    Down,
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    True,
    /// `cloud-init status [--wait] [--long]`.
    CloudInitStatus,
    /// `bash -s`: the prep script on stdin.
    Prep,
    Mkdir {
        paths: Vec<String>,
    },
    Tee {
        path: String,
        append: bool,
    },
    Chmod {
        mode: String,
        paths: Vec<String>,
    },
    Compose {
        project_dir: Option<String>,
        file: Option<String>,
        action: ComposeAction,
    },
    Logs {
        tail: Option<usize>,
        container: String,
        /// `| grep -F -m N -e PAT…`: only the matching lines, at most `max`.
        grep: Option<Grep>,
    },
    /// Not understood; holds the first word for the error message.
    Unknown(String),
}

/// The one filter `docker logs` may be piped into: `grep -F -m N -e PAT [-e PAT…]` (fixed
/// strings, at most `max` matching lines; exit 1 when none matched).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grep {
    pub max: usize,
    pub patterns: Vec<String>,
}

impl Grep {
    fn matches(&self, line: &str) -> bool {
        self.patterns.iter().any(|p| line.contains(p.as_str()))
    }
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// From a leading `cd DIR &&`.
    pub cwd: Option<String>,
    pub sudo: bool,
    /// stdout goes to `/dev/null`.
    pub stdout_null: bool,
    /// The body of a `<<DELIM` here-document (stands in for stdin).
    pub heredoc: Option<Vec<u8>>,
    pub cmd: Command,
}

impl Parsed {
    /// Whether the command reads stdin (so it runs once the client sends EOF).
    pub fn needs_stdin(&self) -> bool {
        self.heredoc.is_none() && matches!(self.cmd, Command::Prep | Command::Tee { .. })
    }
}

fn unknown(word: &str) -> Command {
    Command::Unknown(word.chars().take(64).collect())
}

/// Parses one exec command line. Never fails: what it does not understand is `Unknown`.
pub fn parse(raw: &str) -> Parsed {
    let (line, heredoc) = split_heredoc(raw);
    let mut p = Parsed { cwd: None, sudo: false, stdout_null: false, heredoc, cmd: Command::Unknown(String::new()) };
    if line.contains('\n') {
        p.cmd = unknown(line.split_whitespace().next().unwrap_or(""));
        return p;
    }
    let mut segs: Vec<&str> = line.split("&&").map(str::trim).collect();
    if segs.len() == 2
        && let Some(t) = tokenize(segs[0])
        && t.len() == 2
        && t[0] == "cd"
    {
        p.cwd = Some(t[1].clone());
        segs.remove(0);
    }
    let Some(mut tokens) = (segs.len() == 1).then(|| tokenize(segs[0])).flatten() else {
        p.cmd = unknown(line.split_whitespace().next().unwrap_or(""));
        return p;
    };
    // One pipe, and only `docker logs … | grep -F -m N -e PAT…` (checked below).
    let mut grep = None;
    if let Some(bar) = tokens.iter().position(|t| t == "|") {
        let right = tokens.split_off(bar);
        match parse_grep(&right[1..]) {
            Some(g) => grep = Some(g),
            None => {
                p.cmd = unknown("|");
                return p;
            }
        }
    }
    let mut words: Vec<String> = Vec::new();
    let mut it = tokens.into_iter();
    while let Some(t) = it.next() {
        match t.as_str() {
            ">" | "1>" => {
                let target = it.next().unwrap_or_default();
                p.stdout_null |= target == "/dev/null";
            }
            "2>" | "&>" => {
                let target = it.next().unwrap_or_default();
                p.stdout_null |= t == "&>" && target == "/dev/null";
            }
            "2>&1" | "2>/dev/null" => {}
            ">/dev/null" | "1>/dev/null" | "&>/dev/null" => p.stdout_null = true,
            "|" | "||" | ";" | "&" | "<" => {
                p.cmd = unknown(&t);
                return p;
            }
            _ => words.push(t),
        }
    }
    if words.first().is_some_and(|w| w == "sudo") {
        p.sudo = true;
        words.remove(0);
        while words.first().is_some_and(|w| matches!(w.as_str(), "-n" | "-E" | "-H")) {
            words.remove(0);
        }
    }
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    p.cmd = match w.as_slice() {
        ["true"] => Command::True,
        ["cloud-init", "status", flags @ ..] if flags.iter().all(|f| matches!(*f, "--wait" | "-w" | "--long" | "-l")) => Command::CloudInitStatus,
        ["bash", "-s", ..] => Command::Prep,
        ["mkdir", rest @ ..] => {
            let paths: Vec<String> = rest.iter().filter(|a| !a.starts_with('-')).map(|s| s.to_string()).collect();
            if paths.is_empty() { unknown("mkdir") } else { Command::Mkdir { paths } }
        }
        ["tee", rest @ ..] => {
            let append = rest.iter().any(|a| *a == "-a" || *a == "--append");
            let paths: Vec<&&str> = rest.iter().filter(|a| !a.starts_with('-')).collect();
            match paths.as_slice() {
                [one] => Command::Tee { path: one.to_string(), append },
                _ => unknown("tee"),
            }
        }
        ["chmod", mode, paths @ ..] if !paths.is_empty() => {
            Command::Chmod { mode: mode.to_string(), paths: paths.iter().map(|s| s.to_string()).collect() }
        }
        ["docker", "compose", rest @ ..] | ["docker-compose", rest @ ..] => parse_compose(rest),
        ["docker", "logs", rest @ ..] => parse_logs(rest),
        [first, ..] => unknown(first),
        [] => unknown(""),
    };
    if let Some(g) = grep {
        match &mut p.cmd {
            Command::Logs { grep, .. } => *grep = Some(g),
            _ => p.cmd = unknown("|"),
        }
    }
    p
}

/// `grep -F -m N -e PAT [-e PAT…]`, exactly: every flag required, nothing else accepted.
fn parse_grep(words: &[String]) -> Option<Grep> {
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    let ["grep", "-F", "-m", n, rest @ ..] = w.as_slice() else { return None };
    let max: usize = n.parse().ok().filter(|m| *m >= 1)?;
    let mut patterns = Vec::new();
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        match (*flag, it.next()) {
            ("-e", Some(pat)) if !pat.is_empty() => patterns.push(pat.to_string()),
            _ => return None,
        }
    }
    (!patterns.is_empty()).then_some(Grep { max, patterns })
}

fn parse_compose(args: &[&str]) -> Command {
    let mut file = None;
    let mut project_dir = None;
    let mut i = 0;
    while i < args.len() {
        match args[i] {
            "-f" | "--file" => {
                file = args.get(i + 1).map(|s| s.to_string());
                i += 2;
            }
            "--project-directory" => {
                project_dir = args.get(i + 1).map(|s| s.to_string());
                i += 2;
            }
            "-p" | "--project-name" | "--env-file" => i += 2,
            a if a.starts_with('-') => i += 1,
            verb => {
                let rest = &args[i + 1..];
                let action = match verb {
                    "pull" => ComposeAction::Pull,
                    "down" => ComposeAction::Down,
                    "up" if rest.iter().any(|a| *a == "-d" || *a == "--detach") => ComposeAction::UpDetached,
                    "up" => ComposeAction::UpForeground,
                    other => ComposeAction::Other(other.chars().take(32).collect()),
                };
                return Command::Compose { project_dir, file, action };
            }
        }
    }
    Command::Compose { project_dir, file, action: ComposeAction::Other(String::new()) }
}

fn parse_logs(args: &[&str]) -> Command {
    let mut tail = None;
    let mut container = None;
    let mut i = 0;
    while i < args.len() {
        let a = args[i];
        if a == "--tail" || a == "-n" {
            match args.get(i + 1).map(|n| n.parse::<usize>()) {
                Some(Ok(n)) => tail = Some(n),
                Some(Err(_)) if args.get(i + 1) == Some(&"all") => tail = None,
                _ => return unknown("docker"),
            }
            i += 2;
        } else if let Some(n) = a.strip_prefix("--tail=") {
            tail = if n == "all" { None } else { Some(n.parse().unwrap_or(0)) };
            i += 1;
        } else if a.starts_with('-') {
            i += 1;
        } else {
            if container.is_some() {
                return unknown("docker");
            }
            container = Some(a.to_string());
            i += 1;
        }
    }
    match container {
        Some(container) => Command::Logs { tail, container, grep: None },
        None => unknown("docker"),
    }
}

/// Splits a `<<DELIM` here-document off the command: (the first line without it, the body).
fn split_heredoc(raw: &str) -> (String, Option<Vec<u8>>) {
    let (first, rest) = match raw.split_once('\n') {
        Some((f, r)) => (f, Some(r)),
        None => (raw, None),
    };
    let Some(pos) = first.find("<<").filter(|p| !first[*p..].starts_with("<<<")) else {
        return (raw.to_string(), None);
    };
    let after = first[pos + 2..].trim_start();
    let strip_tabs = after.starts_with('-');
    let after = after.trim_start_matches('-').trim_start();
    let delim_tok = after.split_whitespace().next().unwrap_or("");
    let delim = delim_tok.trim_matches(|c| c == '\'' || c == '"').to_string();
    let cmd_line = format!("{} {}", &first[..pos], after[delim_tok.len()..].trim()).trim().to_string();
    let mut body = String::new();
    for line in rest.unwrap_or("").split('\n') {
        let l = if strip_tabs { line.trim_start_matches('\t') } else { line };
        if l == delim {
            break;
        }
        body.push_str(l);
        body.push('\n');
    }
    (cmd_line, Some(body.into_bytes()))
}

/// Shell-like words: whitespace separates, quotes group, backslash escapes. `None` on an
/// unterminated quote.
fn tokenize(s: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '\'' => break,
                        c => cur.push(c),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => cur.push(chars.next()?),
                        c => cur.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                cur.push(chars.next()?);
            }
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            // Unquoted `;` and `|` are operators even without spaces around them.
            ';' | '|' => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
                out.push(c.to_string());
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    Some(out)
}

/// A secret-looking assignment on the command line (`K2_NODE_SECRET=…` with a value).
fn secret_assignment(raw: &str) -> Option<&'static str> {
    for (key, kind) in [("K2_NODE_SECRET=", "K2_NODE_SECRET value"), ("K2_PRIVATE_CLAIM=", "K2_PRIVATE_CLAIM value")] {
        for (i, _) in raw.match_indices(key) {
            let mut cs = raw[i + key.len()..].chars();
            let has_value = match cs.next() {
                Some(q @ ('\'' | '"')) => cs.next().is_some_and(|c| c != q),
                Some(c) => !c.is_whitespace(),
                None => false,
            };
            if has_value {
                return Some(kind);
            }
        }
    }
    None
}

// ---------- the interpreter ----------

/// What a command printed and its exit status.
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: u32,
}

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
                serve(sim.clone(), inst, l, hardened_port);
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
                inst.host.containers_up = true;
                inst.host.containers_created = true;
                inst.host.log_k2s("k2s starting");
                inst.host.log_k2s("server ready listen=:443");
                inst.host.k2s_log.noise(noise);
                super::sidecar::start(sim, inst, env);
                format!(" Container {k}  Started\n Container {sc}  Started\n")
            } else if renamed || inst.host.sidecar.as_ref().is_some_and(|s| s.env != env) {
                // compose recreates a container whose configuration changed.
                inst.host.stop_containers();
                inst.host.containers_up = true;
                inst.host.log_k2s("k2s starting");
                inst.host.log_k2s("server ready listen=:443");
                inst.host.k2s_log.noise(noise);
                super::sidecar::start(sim, inst, env);
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

// ---------- the server ----------

/// Starts `inst`'s sshd on `listener` (its `port`), replacing nothing: the caller stops the old one.
pub fn serve(sim: Sim, inst: &mut Instance, listener: tokio::net::TcpListener, port: u16) {
    let stop = inst.host.life.child_token();
    inst.host.listener = Some(Listener { port, stop: stop.clone() });
    let id = inst.id.clone();
    let life = inst.host.life.clone();
    tokio::spawn(async move {
        loop {
            let (sock, _) = tokio::select! {
                _ = stop.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!(instance = %id, error = %e, "sshd accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Some(config) = connection_config(&sim, &id) else { break };
            if !firewall_lets_in(&sim, &id, port) {
                // The provider's firewall: the connection never reaches the host.
                drop(sock);
                continue;
            }
            if sim.st().dice_roll(|f| f.ssh_drop_rate) {
                drop(sock);
                continue;
            }
            let handler = Conn { sim: sim.clone(), id: id.clone(), port, user: String::new(), restricted: None, chans: HashMap::new() };
            let life = life.clone();
            tokio::spawn(async move {
                let _ = sock.set_nodelay(true);
                let Ok(session) = server::run_stream(config, sock, handler).await else { return };
                let handle = session.handle();
                tokio::select! {
                    _ = life.cancelled() => {
                        let _ = handle.disconnect(Disconnect::ByApplication, "host going down".into(), "en".into()).await;
                    }
                    _ = session => {}
                }
            });
        }
        // Dropping the listener closes the port: new connections are refused.
    });
}

/// Whether the provider firewall lets a connection to `port` (a simulated sshd port) in;
/// counts the refusals.
fn firewall_lets_in(sim: &Sim, id: &str, port: u16) -> bool {
    let (fresh, hardened) = (sim.cfg.ssh_port_fresh, sim.cfg.ssh_port_hardened);
    let mut st = sim.st();
    if !st.faults.provider_firewall {
        return true;
    }
    let Some(inst) = st.cloud.instances.get_mut(id) else { return false };
    let rule = crate::cloud::port_rule(real_port(port, fresh, hardened), "tcp");
    let open = inst.firewall.contains(&rule);
    if !open {
        inst.firewall_refused += 1;
        tracing::info!(instance = %id, port = %rule, "provider firewall refused a connection");
    }
    open
}

/// A fresh server config with the instance's current host key (a rekey affects new connections).
fn connection_config(sim: &Sim, id: &str) -> Option<Arc<server::Config>> {
    let st = sim.st();
    let inst = st.cloud.instances.get(id).filter(|i| i.live())?;
    Some(Arc::new(server::Config {
        server_id: russh::SshId::Standard(SERVER_ID.into()),
        keys: vec![inst.host.host_key.clone()],
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(200),
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: Some(Duration::from_secs(900)),
        nodelay: true,
        ..Default::default()
    }))
}

#[derive(Default)]
struct Pending {
    command: Option<String>,
    stdin: Vec<u8>,
    started: bool,
}

struct Conn {
    sim: Sim,
    id: String,
    /// The simulated sshd port this connection came in on.
    port: u16,
    user: String,
    /// Logged in as root on an image whose user is this one: every command is refused as
    /// cloud-init's `disable_root` does.
    restricted: Option<&'static str>,
    chans: HashMap<ChannelId, Pending>,
}

/// How a login is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Login {
    Accept,
    /// root with the right key on an image whose user is the one named: in, but restricted.
    RootRestricted(&'static str),
    Reject,
}

impl Conn {
    fn login(&self, user: &str, key: &russh::keys::PublicKey) -> Login {
        let (account, image_user, prepared, admin) = {
            let st = self.sim.st();
            match st.cloud.instances.get(&self.id) {
                Some(i) => (i.account.clone(), i.login_user(), i.host.hardened, i.host.admin_user.clone()),
                None => return Login::Reject,
            }
        };
        if key.key_data() != self.sim.account_key(&account).key_data() {
            return Login::Reject;
        }
        // After the prep: `PermitRootLogin no` (sshd refuses root, key or not); the admin the
        // prep left (the session's user, or the one it made for a root session) gets in.
        if prepared && user == "root" {
            let mut st = self.sim.st();
            if let Some(i) = st.cloud.instances.get_mut(&self.id) {
                i.host.root_logins_refused += 1;
            }
            return Login::Reject;
        }
        if admin.as_deref() == Some(user) || user == image_user {
            Login::Accept
        } else if user == "root" {
            Login::RootRestricted(image_user)
        } else {
            Login::Reject
        }
    }

    fn start(&mut self, channel: ChannelId, session: &Session) {
        let Some(p) = self.chans.get_mut(&channel) else { return };
        let Some(command) = p.command.clone().filter(|_| !p.started) else { return };
        p.started = true;
        let stdin = std::mem::take(&mut p.stdin);
        let (sim, id, user, port, handle) = (self.sim.clone(), self.id.clone(), self.user.clone(), self.port, session.handle());
        let restricted = self.restricted;
        tokio::spawn(async move {
            let out = match restricted {
                // cloud-init's disable_root: root's key runs this instead of any command.
                Some(u) => Output {
                    stdout: format!("Please login as the user \"{u}\" rather than the user \"root\".\n\n").into_bytes(),
                    stderr: Vec::new(),
                    status: 142,
                },
                None => execute(&sim, &id, &user, port, &command, stdin).await,
            };
            if !out.stdout.is_empty() {
                let _ = handle.data(channel, out.stdout).await;
            }
            if !out.stderr.is_empty() {
                let _ = handle.extended_data(channel, 1, out.stderr).await;
            }
            let _ = handle.exit_status_request(channel, out.status).await;
            let _ = handle.eof(channel).await;
            let _ = handle.close(channel).await;
        });
    }
}

impl server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_publickey_offered(&mut self, user: &str, offer: server::PublicKeyOffer<'_>) -> Result<Auth, Self::Error> {
        Ok(if self.login(user, offer.public_key) == Login::Reject { Auth::reject() } else { Auth::Accept })
    }

    async fn auth_publickey(&mut self, user: &str, key: server::VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        let login = self.login(user, key.public_key);
        if login == Login::Reject {
            return Ok(Auth::reject());
        }
        self.user = user.to_string();
        if let Login::RootRestricted(u) = login {
            self.restricted = Some(u);
        } else if self.port == self.sim.cfg.ssh_port_hardened {
            let mut st = self.sim.st();
            if let Some(inst) = st.cloud.instances.get_mut(&self.id)
                && inst.host.hardened_login_ms.is_none()
            {
                inst.host.hardened_login_ms = Some(kit::now_ms());
            }
        }
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.chans.insert(channel.id(), Pending::default());
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(&mut self, channel: ChannelId, data: &[u8], session: &mut Session) -> Result<(), Self::Error> {
        if self.sim.st().dice_roll(|f| f.ssh_drop_rate) {
            // The link dropped before the command ran.
            return Err(russh::Error::Disconnect);
        }
        session.channel_success(channel)?;
        let command = String::from_utf8_lossy(data).into_owned();
        let needs_stdin = parse(&command).needs_stdin();
        let p = self.chans.entry(channel).or_default();
        p.command = Some(command);
        if !needs_stdin {
            self.start(channel, session);
        }
        Ok(())
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn data(&mut self, channel: ChannelId, data: &[u8], _session: &mut Session) -> Result<(), Self::Error> {
        if let Some(p) = self.chans.get_mut(&channel)
            && p.stdin.len() + data.len() <= MAX_STDIN
        {
            p.stdin.extend_from_slice(data);
        }
        Ok(())
    }

    async fn channel_eof(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        self.start(channel, session);
        Ok(())
    }

    async fn channel_close(&mut self, channel: ChannelId, _session: &mut Session) -> Result<(), Self::Error> {
        self.chans.remove(&channel);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn cmd(s: &str) -> Command {
        parse(s).cmd
    }

    #[test]
    fn the_deployers_commands() {
        assert_eq!(cmd("true"), Command::True);
        let p = parse("sudo bash -s");
        assert_eq!((p.cmd.clone(), p.sudo, p.needs_stdin()), (Command::Prep, true, true));
        assert_eq!(cmd("sudo mkdir -p /apps/kaitu-slave"), Command::Mkdir { paths: vec!["/apps/kaitu-slave".into()] });
        let p = parse("sudo tee /apps/kaitu-slave/.env > /dev/null");
        assert_eq!(p.cmd, Command::Tee { path: "/apps/kaitu-slave/.env".into(), append: false });
        assert!(p.stdout_null && p.sudo && p.needs_stdin());
        let p = parse("sudo tee -a '/apps/kaitu-slave/users' >/dev/null");
        assert_eq!(p.cmd, Command::Tee { path: "/apps/kaitu-slave/users".into(), append: true });
        assert!(p.stdout_null);
        assert_eq!(
            cmd("sudo chmod 600 /apps/kaitu-slave/.env"),
            Command::Chmod { mode: "600".into(), paths: vec!["/apps/kaitu-slave/.env".into()] }
        );
        let p = parse("cd /apps/kaitu-slave && sudo docker compose -f docker-compose.yml up -d");
        assert_eq!(p.cwd.as_deref(), Some("/apps/kaitu-slave"));
        assert_eq!(
            p.cmd,
            Command::Compose { project_dir: None, file: Some("docker-compose.yml".into()), action: ComposeAction::UpDetached }
        );
        assert_eq!(
            cmd("cd /apps/kaitu-slave && docker compose -f docker-compose.yml pull"),
            Command::Compose { project_dir: None, file: Some("docker-compose.yml".into()), action: ComposeAction::Pull }
        );
        assert_eq!(
            cmd("cd /apps/kaitu-slave && sudo docker compose -f docker-compose.yml down"),
            Command::Compose { project_dir: None, file: Some("docker-compose.yml".into()), action: ComposeAction::Down }
        );
        assert!(matches!(cmd("docker-compose down"), Command::Compose { action: ComposeAction::Down, .. }));
        assert_eq!(cmd("sudo docker logs --tail 20 k2s 2>&1"), Command::Logs { tail: Some(20), container: "k2s".into(), grep: None });
        assert_eq!(cmd("docker logs --tail=80 k2-sidecar"), Command::Logs { tail: Some(80), container: "k2-sidecar".into(), grep: None });
        assert_eq!(cmd("docker logs k2s"), Command::Logs { tail: None, container: "k2s".into(), grep: None });
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
    fn the_verifiers_log_greps() {
        let p = parse("sudo docker logs k2s 2>&1 | grep -F -m 1 -e 'server ready'");
        assert!(p.sudo);
        let g = Grep { max: 1, patterns: vec!["server ready".into()] };
        assert_eq!(p.cmd, Command::Logs { tail: None, container: "k2s".into(), grep: Some(g) });
        let p = parse("docker logs k2-sidecar 2>&1 | grep -F -m 5 -e 'Registration completed' -e usage-reporter-start");
        let g = Grep { max: 5, patterns: vec!["Registration completed".into(), "usage-reporter-start".into()] };
        assert_eq!(p.cmd, Command::Logs { tail: None, container: "k2-sidecar".into(), grep: Some(g) });
        // Strict: only that form.
        for bad in [
            "docker logs k2s | grep ready",
            "docker logs k2s | grep -F -e ready",
            "docker logs k2s | grep -F -m 0 -e ready",
            "docker logs k2s | grep -F -m x -e ready",
            "docker logs k2s | grep -F -m 1 -e ready -v",
            "docker logs k2s | grep -F -m 1 -e ready -e",
            "docker logs k2s | grep -F -m 1 -e ''",
            "docker logs k2s | grep -F -m 1",
            "docker logs k2s | grep -F -m 1 -e a | grep -F -m 1 -e b",
            "cat /etc/shadow | grep -F -m 1 -e root",
            "docker logs k2s | sh",
            "docker logs k2s |",
        ] {
            assert_eq!(cmd(bad), Command::Unknown("|".into()), "{bad}");
        }
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
    fn heredocs_are_split_off() {
        let p = parse("sudo tee /apps/kaitu-slave/.env > /dev/null <<'ENVEOF'\nA=1\nB=2\nENVEOF");
        assert_eq!(p.cmd, Command::Tee { path: "/apps/kaitu-slave/.env".into(), append: false });
        assert_eq!(p.heredoc.as_deref(), Some(&b"A=1\nB=2\n"[..]));
        assert!(p.stdout_null && !p.needs_stdin());
        let p = parse("cat <<EOF\nx\nEOF");
        assert_eq!(p.cmd, Command::Unknown("cat".into()));
    }

    #[test]
    fn what_it_does_not_understand() {
        assert_eq!(cmd("rm -rf /"), Command::Unknown("rm".into()));
        assert_eq!(cmd("docker logs --tail 20 k2s | grep ready"), Command::Unknown("|".into()));
        assert_eq!(cmd("true; true"), Command::Unknown(";".into()));
        assert_eq!(cmd("echo 'unterminated"), Command::Unknown("echo".into()));
        assert_eq!(cmd(""), Command::Unknown("".into()));
        assert_eq!(cmd("a && b && c"), Command::Unknown("a".into()));
        assert_eq!(cmd("sudo tee"), Command::Unknown("tee".into()));
        assert_eq!(cmd("docker logs --tail x k2s"), Command::Unknown("docker".into()));
        assert_eq!(cmd("line1\nline2"), Command::Unknown("line1".into()));
    }

    #[test]
    fn tokenizer_handles_quotes_and_escapes() {
        assert_eq!(tokenize(r#"a "b c" 'd e' f\ g"#).unwrap(), ["a", "b c", "d e", "f g"]);
        assert_eq!(tokenize("").unwrap(), Vec::<String>::new());
        assert_eq!(tokenize("a;b|'c;d'").unwrap(), ["a", ";", "b", "|", "c;d"]);
        assert_eq!(tokenize("''").unwrap(), [""]);
        assert!(tokenize("\"x").is_none());
    }

    #[test]
    fn secret_assignments_are_spotted() {
        assert_eq!(secret_assignment("echo K2_NODE_SECRET=abc"), Some("K2_NODE_SECRET value"));
        assert_eq!(secret_assignment("K2_PRIVATE_CLAIM=\"x\" foo"), Some("K2_PRIVATE_CLAIM value"));
        assert_eq!(secret_assignment("K2_PRIVATE_CLAIM= foo"), None);
        assert_eq!(secret_assignment("grep K2_NODE_SECRET .env"), None);
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
