//! SSH to nodes with russh: key auth, host-key pinning (TOFU: the first key seen is returned
//! for the caller to pin; a later mismatch is a hard `HostKeyChanged`), per-command timeouts,
//! stdin streaming (secrets travel over stdin, never in a command line), captured exit status,
//! stdout and stderr. One session serves many commands (channels).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh::{ChannelMsg, client};

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SshError {
    #[error("ssh {addr} unreachable: {msg}")]
    Unreachable { addr: String, msg: String },
    #[error("ssh {addr}: host key changed (pinned {pinned}, offered {offered}) — possible man-in-the-middle")]
    HostKeyChanged { addr: String, pinned: String, offered: String },
    #[error("ssh {addr}: the admin key was refused")]
    AuthRefused { addr: String },
    #[error("ssh: {what} timed out after {secs}s")]
    Timeout { what: String, secs: u64 },
    #[error("ssh: {0}")]
    Protocol(String),
    /// The command printed more than `OUTPUT_CAP` bytes on one stream: a node that floods us
    /// is hostile or broken; what came is truncated and the step fails (never retried).
    #[error("ssh: `{what}` printed more than {cap} bytes; output truncated")]
    OutputTooLarge { what: String, cap: usize },
}

/// The most a command's stdout (and, separately, its stderr) may carry back. Everything the
/// deployer and the verifier read is a few KiB; a status line, a log grep, a tail.
pub const OUTPUT_CAP: usize = 1 << 20;

/// Appends `data` to `buf` up to `cap` bytes in all; false when something had to be cut.
pub fn append_capped(buf: &mut Vec<u8>, data: &[u8], cap: usize) -> bool {
    let room = cap.saturating_sub(buf.len());
    buf.extend_from_slice(&data[..data.len().min(room)]);
    data.len() <= room
}

impl SshError {
    /// Errors worth a retry (the node may not be up yet, or the link dropped).
    pub fn is_transient(&self) -> bool {
        matches!(self, SshError::Unreachable { .. } | SshError::Timeout { .. } | SshError::Protocol(_))
    }
}

/// Loads an OpenSSH private key (the account's admin key).
pub fn parse_private_key(openssh_pem: &str) -> Result<PrivateKey, SshError> {
    PrivateKey::from_openssh(openssh_pem.trim()).map_err(|_| SshError::Protocol("admin key is not an OpenSSH private key".into()))
}

/// Generates an ed25519 key pair: (private OpenSSH PEM, public `ssh-ed25519 …` line).
pub fn generate_ed25519() -> Result<(String, String), SshError> {
    let seed: [u8; 32] = rand::random();
    let pair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
    let key = PrivateKey::from(pair);
    let pem = key.to_openssh(russh::keys::ssh_key::LineEnding::LF).map_err(|e| SshError::Protocol(e.to_string()))?;
    let public = key.public_key().to_openssh().map_err(|e| SshError::Protocol(e.to_string()))?;
    Ok((pem.to_string(), public))
}

/// The SHA-256 fingerprint of an OpenSSH public key line, for logs and errors.
pub fn fingerprint(openssh_public: &str) -> String {
    PublicKey::from_openssh(openssh_public)
        .map(|k| k.fingerprint(HashAlg::Sha256).to_string())
        .unwrap_or_else(|_| "unparseable-key".into())
}

struct ClientHandler {
    pinned: Option<String>,
    seen: Arc<Mutex<Option<String>>>,
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &russh::keys::PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let offered = match key {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => key.to_openssh().unwrap_or_default(),
            russh::keys::PublicKeyOrCertificate::Certificate(c) => c.to_openssh().unwrap_or_default(),
        };
        let ok = match &self.pinned {
            Some(p) => same_key(p, &offered),
            None => true,
        };
        if let Ok(mut s) = self.seen.lock() {
            *s = Some(offered);
        }
        Ok(ok)
    }
}

/// Compares two OpenSSH public key lines by algorithm and key material (comments ignored).
fn same_key(a: &str, b: &str) -> bool {
    let t = |s: &str| s.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    t(a) == t(b)
}

/// Where and how to connect.
#[derive(Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub key: Arc<PrivateKey>,
    /// The pinned host key (OpenSSH public line); `None` learns it (TOFU).
    pub pinned: Option<String>,
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}:{}", self.user, self.host, self.port)
    }
}

/// An authenticated session.
pub struct Session {
    handle: client::Handle<ClientHandler>,
    /// The server's host key (OpenSSH public line), to pin.
    pub host_key: String,
    pub addr: String,
}

/// The result of one command.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// The last few lines of stderr, for a failure reason.
    pub fn stderr_tail(&self) -> String {
        let s = String::from_utf8_lossy(&self.stderr);
        let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
        tail.chars().take(300).collect()
    }
}

pub async fn connect(t: &Target) -> Result<Session, SshError> {
    use tracing::Instrument;
    let span = crate::trace::with_trace_id(tracing::info_span!(
        "ssh.connect",
        host = %t.host,
        port = t.port,
        user = %t.user,
        trace_id = tracing::field::Empty
    ));
    connect_traced(t).instrument(span).await
}

async fn connect_traced(t: &Target) -> Result<Session, SshError> {
    let addr = format!("{}:{}", t.host, t.port);
    let config = Arc::new(client::Config {
        inactivity_timeout: Some(Duration::from_secs(600)),
        keepalive_interval: Some(Duration::from_secs(15)),
        nodelay: true,
        ..Default::default()
    });
    let seen = Arc::new(Mutex::new(None));
    let handler = ClientHandler { pinned: t.pinned.clone(), seen: seen.clone() };
    let secs = t.connect_timeout.as_secs().max(1);
    let res = tokio::time::timeout(t.connect_timeout, client::connect(config, addr.as_str(), handler)).await;
    let offered = || seen.lock().ok().and_then(|s| s.clone());
    let mut handle = match res {
        Err(_) => return Err(SshError::Timeout { what: format!("connect to {addr}"), secs }),
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            if let (Some(p), Some(o)) = (&t.pinned, offered())
                && !same_key(p, &o)
            {
                return Err(SshError::HostKeyChanged { addr, pinned: fingerprint(p), offered: fingerprint(&o) });
            }
            return Err(SshError::Unreachable { addr, msg: e.to_string() });
        }
    };
    let key = PrivateKeyWithHashAlg::new(t.key.clone(), None);
    let auth = tokio::time::timeout(t.connect_timeout, handle.authenticate_publickey(t.user.clone(), key))
        .await
        .map_err(|_| SshError::Timeout { what: format!("auth at {addr}"), secs })?
        .map_err(|e| SshError::Unreachable { addr: addr.clone(), msg: e.to_string() })?;
    if !auth.success() {
        return Err(SshError::AuthRefused { addr });
    }
    let host_key = offered().unwrap_or_default();
    Ok(Session { handle, host_key, addr })
}

impl Session {
    /// Runs `command`, writing `stdin` (if any) and closing it, within `timeout`.
    pub async fn exec(&self, command: &str, stdin: Option<&[u8]>, timeout: Duration) -> Result<Output, SshError> {
        use tracing::Instrument;
        let what = command.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
        // The command's first words only (as in its errors); stdin (where secrets travel) never.
        let span = crate::trace::with_trace_id(tracing::info_span!(
            "ssh.exec",
            addr = %self.addr,
            command = %what,
            trace_id = tracing::field::Empty
        ));
        self.exec_traced(command, &what, stdin, timeout).instrument(span).await
    }

    async fn exec_traced(&self, command: &str, what: &str, stdin: Option<&[u8]>, timeout: Duration) -> Result<Output, SshError> {
        let fut = async {
            let mut ch = self.handle.channel_open_session().await.map_err(|e| SshError::Protocol(e.to_string()))?;
            ch.exec(true, command).await.map_err(|e| SshError::Protocol(e.to_string()))?;
            if let Some(data) = stdin {
                ch.data(data).await.map_err(|e| SshError::Protocol(e.to_string()))?;
            }
            ch.eof().await.map_err(|e| SshError::Protocol(e.to_string()))?;
            let mut out = Output { status: u32::MAX, stdout: Vec::new(), stderr: Vec::new() };
            let mut got_status = false;
            let too_large = || SshError::OutputTooLarge { what: format!("`{what}`"), cap: OUTPUT_CAP };
            while let Some(msg) = ch.wait().await {
                match msg {
                    // The guards append (up to the cap); only a cut reaches the arm's body.
                    ChannelMsg::Data { data } if !append_capped(&mut out.stdout, &data, OUTPUT_CAP) => {
                        let _ = ch.close().await;
                        return Err(too_large());
                    }
                    ChannelMsg::ExtendedData { data, ext: 1 } if !append_capped(&mut out.stderr, &data, OUTPUT_CAP) => {
                        let _ = ch.close().await;
                        return Err(too_large());
                    }
                    ChannelMsg::ExitStatus { exit_status } => {
                        out.status = exit_status;
                        got_status = true;
                    }
                    _ => {}
                }
            }
            if !got_status {
                return Err(SshError::Protocol(format!("`{what}`: channel closed without an exit status")));
            }
            Ok(out)
        };
        tokio::time::timeout(timeout, fut).await.map_err(|_| SshError::Timeout { what: format!("`{what}`"), secs: timeout.as_secs() })?
    }

    pub async fn close(self) {
        let _ = self.handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
    }
}

/// The admin keys per cloud account, from `"account=path[,account2=path2]"` (each path an
/// OpenSSH private key file, e.g. mounted from a k8s Secret). Keys are read when needed.
#[derive(Debug, Clone, Default)]
pub struct AdminKeys(std::collections::HashMap<String, std::path::PathBuf>);

impl AdminKeys {
    pub fn parse(spec: &str) -> Result<AdminKeys, SshError> {
        let mut map = std::collections::HashMap::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (acct, path) = part
                .split_once('=')
                .ok_or_else(|| SshError::Protocol(format!("admin keys: `{part}` is not account=path")))?;
            map.insert(acct.trim().to_string(), std::path::PathBuf::from(path.trim()));
        }
        Ok(AdminKeys(map))
    }

    /// The private key for `account`, or a reason naming the account (runbook step 0).
    pub fn load(&self, account: &str) -> Result<Arc<PrivateKey>, String> {
        let path = self.0.get(account).ok_or_else(|| format!("no admin SSH key is configured for cloud account {account}"))?;
        let pem = std::fs::read_to_string(path).map_err(|e| format!("admin SSH key for account {account} unreadable: {}", e.kind()))?;
        parse_private_key(&pem).map(Arc::new).map_err(|_| format!("admin SSH key for account {account} is not an OpenSSH private key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_capped() {
        let mut buf = Vec::new();
        assert!(append_capped(&mut buf, b"abc", 5));
        assert!(!append_capped(&mut buf, b"defg", 5));
        assert_eq!(buf, b"abcde");
        assert!(!append_capped(&mut buf, b"h", 5));
        assert_eq!(buf.len(), 5);
        assert!(append_capped(&mut buf, b"", 5));
    }
}
