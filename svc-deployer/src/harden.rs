//! The two checks around the OS prep that keep a node reachable and sound (seed 001 §3.c, §3.f):
//!
//! - Before the prep: `cloud-init status` on the node. `status: error` means the instance came
//!   up broken (a provider's cloud-init failed); nothing is done on it and svc-cloud is asked to
//!   replace it (`pn.op.rebuild`). `running` waits (parked); `done`, `disabled`, a degraded
//!   `done` (exit 2) or no cloud-init at all go on.
//! - After the prep: the prep keeps sshd on 22 as well as on the hardened port (the launcher
//!   runs `provision-node.sh` with `PN_SSH_KEEP_22=1`), because only a connection from outside
//!   proves that the provider's firewall lets the hardened port in. The deployer connects to
//!   the hardened port from outside; only over that session does it send the close-22 script,
//!   which takes `Port 22` out of the hardening drop-in, restarts sshd, checks the hardened
//!   port answers locally and closes 22 in UFW (putting the previous configuration back if
//!   anything fails). A node whose hardened port never answers keeps 22 open and the operation
//!   fails with that reason: reachable, never locked out.
//!
//! Never: a secret in these scripts (they carry none), or a close of 22 over a session that is
//! not on the hardened port.

use kit::ssh::Output;

/// First line of the close-22 script (center-sim recognises it).
pub const CLOSE_22_MARK: &str = "# pnp:close-22";

/// What `provision-node.sh` writes into its sshd drop-in while it keeps 22 open.
pub const KEEP_22_LINE: &str = "# pnp:keep-22";

/// The close-22 script. The hardened port is the node's own, read from the drop-in (the
/// deployer may reach it through another number: a NAT, a port forward). A no-op (`nothing to
/// close`) on a host whose hardening drop-in does not carry the keep-22 line: it never touches
/// an sshd that `provision-node.sh` did not configure.
pub fn close_22_script() -> Vec<u8> {
    format!(
        r#"{CLOSE_22_MARK} v1
set -u
dropin=/etc/ssh/sshd_config.d/00-pn-hardening.conf
closed=/var/lib/pnp/ssh-22-closed
answers() {{
  local line
  line=$(timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" && IFS= read -r -t 4 l <&3 && printf "%s" "$l"' pnp-probe "$1" 2>/dev/null || true)
  case "$line" in SSH-2.0-*) return 0 ;; *) return 1 ;; esac
}}
if [ ! -f "$dropin" ] || ! grep -q '^{KEEP_22_LINE}' "$dropin"; then
  echo "pnp-close-22: nothing to close"
  exit 0
fi
port=$(awk '$1 == "Port" && $2 != "22" {{ print $2; exit }}' "$dropin")
[ -n "$port" ] || {{ echo "pnp-close-22: no hardened port in $dropin; 22 kept" >&2; exit 3; }}
answers "$port" || {{ echo "pnp-close-22: sshd does not answer on $port here; 22 kept" >&2; exit 3; }}
backup=$(mktemp)
cp -p "$dropin" "$backup"
restore() {{
  cp -p "$backup" "$dropin"
  rm -f "$backup" "$closed"
  systemctl restart ssh.service >/dev/null 2>&1 || true
}}
sed -i -e '/^Port 22$/d' -e '/^{KEEP_22_LINE}/d' "$dropin"
if ! sshd -t; then restore; echo "pnp-close-22: sshd rejected the configuration without 22; 22 kept" >&2; exit 1; fi
mkdir -p "${{closed%/*}}"
: > "$closed"
if ! systemctl restart ssh.service; then restore; echo "pnp-close-22: sshd did not restart; 22 kept" >&2; exit 1; fi
ok=0
for _ in $(seq 1 40); do
  if answers "$port"; then ok=1; break; fi
  sleep 0.5
done
if [ "$ok" != 1 ]; then restore; echo "pnp-close-22: sshd does not answer on $port after the restart; 22 kept" >&2; exit 1; fi
rm -f "$backup"
if command -v ufw >/dev/null 2>&1 && ufw status | grep -qE '^22/tcp[[:space:]]'; then
  ufw delete allow 22/tcp >/dev/null
fi
echo "pnp-close-22: closed"
"#
    )
    .into_bytes()
}

/// What `cloud-init status` told about the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloudInit {
    /// Done (also disabled, degraded-done, or no cloud-init on the host): go on.
    Fine,
    /// Still running: look again later.
    Running,
    /// It failed: the instance is broken; the text says how.
    Broken(String),
}

/// Reads the answer of `cloud-init status` (cloud-init ≥ 23.4 exits 1 on `error`, 2 on a
/// degraded `done`; older ones exit 0 and say it).
pub fn cloud_init_verdict(out: &Output) -> CloudInit {
    let text = out.stdout_str();
    let status = text.lines().find_map(|l| l.trim().strip_prefix("status:")).map(str::trim).unwrap_or("");
    match (out.status, status) {
        (_, "error") => CloudInit::Broken(format!("cloud-init status: error (exit {})", out.status)),
        (_, "running" | "not started" | "not run") => CloudInit::Running,
        // No cloud-init on this host (a VM, a test host): nothing to wait for.
        (127, _) => CloudInit::Fine,
        (0 | 2, _) => CloudInit::Fine,
        // Another answer without a status: not a verdict on the instance.
        (_, "") => CloudInit::Fine,
        (s, other) => CloudInit::Broken(format!("cloud-init status: {} (exit {s})", other.chars().take(40).collect::<String>())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn out(status: u32, stdout: &str) -> Output {
        Output { status, stdout: stdout.as_bytes().to_vec(), stderr: Vec::new() }
    }

    #[test]
    fn cloud_init_answers() {
        assert_eq!(cloud_init_verdict(&out(0, "status: done\n")), CloudInit::Fine);
        assert_eq!(cloud_init_verdict(&out(2, "status: done\n")), CloudInit::Fine);
        assert_eq!(cloud_init_verdict(&out(0, "status: disabled\n")), CloudInit::Fine);
        assert_eq!(cloud_init_verdict(&out(0, "status: running\n")), CloudInit::Running);
        assert_eq!(cloud_init_verdict(&out(127, "")), CloudInit::Fine);
        assert!(matches!(cloud_init_verdict(&out(1, "status: error\n")), CloudInit::Broken(r) if r.contains("error")));
        assert!(matches!(cloud_init_verdict(&out(0, "\nstatus: error\nextended_status: error - done\n")), CloudInit::Broken(_)));
    }

    #[test]
    fn the_close_script_is_marked_guarded_and_parses() {
        let s = String::from_utf8(close_22_script()).unwrap();
        assert!(s.starts_with(CLOSE_22_MARK));
        assert!(s.contains("nothing to close") && s.contains("restore") && s.contains("$2 != \"22\""));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.sh");
        std::fs::write(&f, &s).unwrap();
        let st = std::process::Command::new("bash").arg("-n").arg(&f).status().unwrap();
        assert!(st.success(), "bash -n");
    }
}
