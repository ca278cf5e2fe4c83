//! `pnctl decode`: one message body on stdin (a `pn.v1.Event`), its JSON on stdout. Works as
//! the nats CLI's translator: `nats stream view PN_OPS --translate 'pnctl decode'`.
//! Anything that is not an event is an error (exit 1) — never a panic, never partial output.

use std::io::Read;

use anyhow::{Context, bail};

/// Reads all of `input` and returns the event's JSON text.
pub fn decode(mut input: impl Read, pretty: bool) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    input.read_to_end(&mut buf).context("read stdin")?;
    if buf.is_empty() {
        bail!("nothing on stdin: pipe one pn.v1.Event body into `pnctl decode`");
    }
    let body = proto::Event::from_bytes(&buf)
        .map_err(|e| anyhow::anyhow!("stdin ({} bytes) is not a pn.v1.Event: {e}", buf.len()))?;
    let v = crate::events::to_json(&body);
    Ok(if pretty { serde_json::to_string_pretty(&v)? } else { v.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{Body, Event, OpFailed};

    #[test]
    fn events_decode_and_garbage_does_not() {
        let bytes = Event::new(Body::Failed(OpFailed { operation_id: "op-1".into(), reason: "r".into(), ..Default::default() })).to_bytes();
        let out = decode(&bytes[..], false).unwrap_or_else(|e| panic!("{e:#}"));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        assert_eq!(v["event"], "failed");
        assert_eq!(v["body"]["operationId"], "op-1");
        assert!(decode(&b"\xff\xff\xffnot protobuf"[..], false).is_err());
        assert!(decode(&b""[..], false).is_err());
    }
}
