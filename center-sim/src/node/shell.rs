//! The command-line parser of the simulated host's shell: exactly the command lines the
//! deployer and verifier send (`cd DIR &&`, `sudo`, `> /dev/null`, a here-document, and
//! `docker logs … | grep -F -m N -e PAT…`), parsed into a [`Command`]. It never fails: what it
//! does not understand is `Command::Unknown` (the host answers exit 127, as bash would).


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
    pub fn matches(&self, line: &str) -> bool {
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
pub(super) fn secret_assignment(raw: &str) -> Option<&'static str> {
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
}
