//! The ports one stack uses: fixed ones checked, the rest picked free.

use std::collections::BTreeMap;
use std::net::TcpListener;

use anyhow::{Context, bail};

use super::*;

/// Fails naming the port and its purpose when something already listens there.
pub(super) fn ensure_free(port: u16, what: &str) -> anyhow::Result<()> {
    match TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            bail!("port 127.0.0.1:{port} ({what}) is already in use: stop what listens there or pick another port")
        }
        Err(e) => bail!("port 127.0.0.1:{port} ({what}) cannot be bound: {e}"),
    }
}

/// The ports one stack uses.
#[derive(Debug, Clone)]
pub(super) struct Ports {
    pub(super) nats: u16,
    pub(super) center: u16,
    pub(super) meter: u16,
    pub(super) meter_internal: u16,
    pub(super) ingress: u16,
    pub(super) ssh_fresh: u16,
    pub(super) ssh_hardened: u16,
    pub(super) ops: BTreeMap<&'static str, u16>,
}

impl Ports {
    /// Fixed ports are checked (a busy one is an error naming it); the rest are picked free.
    /// All are held at once while picking, so they are distinct.
    pub(super) fn pick(opts: &UpOptions) -> anyhow::Result<Ports> {
        let mut held: Vec<TcpListener> = Vec::new();
        let mut take = |fixed: Option<u16>, what: &str| -> anyhow::Result<u16> {
            let l = match fixed {
                Some(p) => {
                    ensure_free(p, what)?;
                    TcpListener::bind(("127.0.0.1", p)).with_context(|| format!("port {p} ({what})"))?
                }
                None => TcpListener::bind(("127.0.0.1", 0)).context("pick a free port")?,
            };
            let port = l.local_addr()?.port();
            held.push(l);
            Ok(port)
        };
        let nats = take(opts.nats_port, "nats")?;
        let center = take(opts.center_port, "center-sim")?;
        let meter = take(opts.meter_port, "svc-meter ingest")?;
        let meter_internal = take(None, "svc-meter internal")?;
        let ingress = take(None, "pn-ingress")?;
        let ssh_fresh = take(None, "sim ssh (fresh)")?;
        let ssh_hardened = take(None, "sim ssh (hardened)")?;
        let mut ops = BTreeMap::new();
        for s in SERVICES {
            ops.insert(s, take(None, s)?);
        }
        Ok(Ports { nats, center, meter, meter_internal, ingress, ssh_fresh, ssh_hardened, ops })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_port_is_named() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
        let e = ensure_free(port, "nats").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(&port.to_string()) && e.contains("nats") && e.contains("in use"), "{e}");
        let mut opts = UpOptions::new("/nonexistent");
        opts.nats_port = Some(port);
        let e = Ports::pick(&opts).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(&port.to_string()), "{e}");
    }
}
