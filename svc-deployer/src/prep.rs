//! The OS prep as a job that runs on the node by itself (runbook step 4), so no session, task
//! or handler slot is held for the minutes it takes: a launcher script starts
//! `provision-node.sh` detached (`setsid`, output to a log, exit status and times to files in
//! a root-only state dir) and returns at once; a status script reads those files. Both go
//! through the runbook's script-pipe form (`sudo bash -s`, the script on stdin); neither
//! carries a secret (the prep script has none).
//!
//! The launcher is idempotent: a prep that is running or finished with 0 is never started a
//! second time, so a redelivery, a replay or a restarted deployer can send it again safely.
//!
//! Never: a second prep while one runs; anything but this module's fixed text and the
//! embedded script in what is sent.

use base64::Engine;

/// First line of the launcher (center-sim recognises it; a human reading `ps` does too).
pub const START_MARK: &str = "# pnp:prep-start";
/// First line of the status script.
pub const STATUS_MARK: &str = "# pnp:prep-status";
/// On the launcher's first line: the prep it starts keeps sshd on 22 until the deployer's
/// close-22 script (`PN_SSH_KEEP_22=1`; `harden.rs`).
pub const KEEP_22: &str = "keep-22";

/// The launcher for `script`, keeping its state in `state_dir` on the node.
pub fn start_script(state_dir: &str, script: &[u8]) -> Vec<u8> {
    let dir = crate::remote::shell_word(state_dir);
    let b64 = base64::engine::general_purpose::STANDARD.encode(script);
    let mut wrapped = String::with_capacity(b64.len() + b64.len() / 76 + 1);
    for chunk in b64.as_bytes().chunks(76) {
        wrapped.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        wrapped.push('\n');
    }
    format!(
        r#"{START_MARK} v1 {KEEP_22}
set -u
d={dir}
umask 077
mkdir -p "$d" || exit 70
if [ -f "$d/rc" ] && [ "$(cat "$d/rc")" = 0 ]; then echo "pnp-prep: done"; exit 0; fi
if [ ! -f "$d/rc" ] && [ -f "$d/pid" ] && kill -0 "$(cat "$d/pid")" 2>/dev/null; then echo "pnp-prep: running"; exit 0; fi
rm -f "$d/rc" "$d/end"
base64 -d > "$d/provision-node.sh" <<'PNP_PREP_B64' || exit 71
{wrapped}PNP_PREP_B64
date +%s%3N > "$d/start"
setsid bash -c 'd=$1; PN_SSH_KEEP_22=1 bash "$d/provision-node.sh" > "$d/log" 2>&1; rc=$?; date +%s%3N > "$d/end"; echo "$rc" > "$d/rc.tmp"; mv "$d/rc.tmp" "$d/rc"' pnp-prep "$d" < /dev/null > /dev/null 2>&1 &
echo $! > "$d/pid"
echo "pnp-prep: started"
"#
    )
    .into_bytes()
}

/// The status script for the prep kept in `state_dir`.
pub fn status_script(state_dir: &str) -> Vec<u8> {
    let dir = crate::remote::shell_word(state_dir);
    format!(
        r#"{STATUS_MARK} v1
d={dir}
now=$(date +%s%3N)
start=$(cat "$d/start" 2>/dev/null || echo "$now")
if [ -f "$d/rc" ]; then
  end=$(cat "$d/end" 2>/dev/null || echo "$now")
  echo "pnp-prep: done rc=$(cat "$d/rc") ms=$((end - start))"
  tail -n 20 "$d/log" 2>/dev/null
elif [ -f "$d/pid" ] && kill -0 "$(cat "$d/pid")" 2>/dev/null; then
  echo "pnp-prep: running ms=$((now - start))"
else
  echo "pnp-prep: absent"
fi
"#
    )
    .into_bytes()
}

/// What the status script said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrepStatus {
    /// Never started here, or the node lost it (a reboot): start it.
    Absent,
    Running { ms: u64 },
    Done { rc: u32, ms: u64, tail: String },
}

/// Parses the status script's output; anything else is an error naming what came back.
pub fn parse_status(stdout: &str) -> Result<PrepStatus, String> {
    let mut lines = stdout.lines();
    let first = lines.next().unwrap_or("").trim();
    let Some(rest) = first.strip_prefix("pnp-prep: ") else {
        return Err(format!("unexpected prep status: {:?}", first.chars().take(80).collect::<String>()));
    };
    let mut words = rest.split_whitespace();
    let verb = words.next().unwrap_or("");
    let field = |words: &[&str], key: &str| -> Option<u64> {
        words.iter().find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('='))).and_then(|v| v.parse().ok())
    };
    let rest: Vec<&str> = words.collect();
    match verb {
        "absent" => Ok(PrepStatus::Absent),
        "running" => Ok(PrepStatus::Running { ms: field(&rest, "ms").unwrap_or(0) }),
        "done" => {
            let rc = field(&rest, "rc").ok_or_else(|| format!("prep status without an exit code: {:?}", first.chars().take(80).collect::<String>()))?;
            let tail: Vec<&str> = lines.collect();
            Ok(PrepStatus::Done { rc: u32::try_from(rc).unwrap_or(u32::MAX), ms: field(&rest, "ms").unwrap_or(0), tail: tail.join("\n") })
        }
        _ => Err(format!("unexpected prep status: {:?}", first.chars().take(80).collect::<String>())),
    }
}

/// When a parked operation's prep should be looked at again: just after preps have been
/// taking (`expected_ms`, learned; a quarter poll late, so a look does not land a hair before
/// the end) — one look for a prep on time — then, if it is late, after as long as it is late:
/// the lateness doubles between looks (0.5, 1, 2, 4 … s), so an overdue prep is polled ever
/// less often while a slightly late one costs little. Bounded by `[poll_ms, 5 min]`.
pub fn next_check_ms(running_ms: u64, expected_ms: u64, poll_ms: u64) -> u64 {
    let poll = poll_ms.max(100);
    let wait = if running_ms < expected_ms { expected_ms - running_ms + poll / 4 } else { running_ms - expected_ms };
    wait.clamp(poll, 300_000.max(poll))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn statuses_parse() {
        assert_eq!(parse_status("pnp-prep: absent\n").unwrap(), PrepStatus::Absent);
        assert_eq!(parse_status("pnp-prep: running ms=1500\n").unwrap(), PrepStatus::Running { ms: 1500 });
        assert_eq!(
            parse_status("pnp-prep: done rc=100 ms=20\nE: lock\nstep 4 failed\n").unwrap(),
            PrepStatus::Done { rc: 100, ms: 20, tail: "E: lock\nstep 4 failed".into() }
        );
        assert!(parse_status("").is_err());
        assert!(parse_status("bash: line 1: base64: command not found").is_err());
        assert!(parse_status("pnp-prep: done ms=3").is_err());
    }

    #[test]
    fn the_next_check_comes_when_preps_end_then_backs_off() {
        assert_eq!(next_check_ms(5_000, 120_000, 500), 115_125);
        assert_eq!(next_check_ms(119_900, 120_000, 500), 500);
        assert_eq!(next_check_ms(120_100, 120_000, 500), 500);
        assert_eq!(next_check_ms(124_000, 120_000, 500), 4_000);
        assert_eq!(next_check_ms(200_000, 120_000, 500), 80_000);
        assert_eq!(next_check_ms(10_000_000, 120_000, 500), 300_000);
    }

    #[test]
    fn the_launcher_carries_the_script_and_no_quote_breaks_out() {
        let s = String::from_utf8(start_script("/var/lib/pnp/prep", b"echo 'hi'\nPNP_PREP_B64\n")).unwrap();
        assert!(s.starts_with(START_MARK));
        assert_eq!(s.matches("\nPNP_PREP_B64\n").count(), 1, "the payload cannot end the here-document");
        let s = String::from_utf8(start_script("/tmp/a b", b"x")).unwrap();
        assert!(s.contains("d='/tmp/a b'\n"));
    }

    proptest! {
        #[test]
        fn any_output_parses_or_errors(s in "\\PC{0,200}") {
            let _ = parse_status(&s);
        }
    }
}
