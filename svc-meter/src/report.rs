//! The `/slave/usage` body: `{"rxBytes": u64, "txBytes": u64, "bootId": "…", "at": "RFC 3339"}`
//! (snake_case keys accepted too; unknown keys ignored). Parsed into a `UsageReport` that cannot
//! hold an invalid value; anything else is a typed `BodyError` (400 upstream), never a panic.

use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::delta::Reading;

pub const MAX_BOOT_ID_LEN: usize = 128;
pub const MAX_AT_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("body is not a JSON usage report: {0}")]
    Malformed(String),
    #[error("field {field}: {reason}")]
    Field { field: &'static str, reason: &'static str },
}

#[derive(Deserialize)]
struct Wire {
    #[serde(rename = "rxBytes", alias = "rx_bytes")]
    rx_bytes: u64,
    #[serde(rename = "txBytes", alias = "tx_bytes")]
    tx_bytes: u64,
    #[serde(rename = "bootId", alias = "boot_id")]
    boot_id: String,
    #[serde(default)]
    at: Option<String>,
}

/// A report whose `at` is further ahead of the meter's clock than allowed (422 upstream): the
/// node's clock is wrong, and a time from the future must never order billing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field at: {}s ahead of the meter's clock (at most {}s allowed); fix the node's clock", .ahead_ms / 1000, .max_ms / 1000)]
pub struct FutureAt {
    pub ahead_ms: i64,
    pub max_ms: i64,
}

/// One node report: cumulative host-NIC counters since boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageReport {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub boot_id: String,
    /// The node's `at`, as sent (validated RFC 3339).
    pub at: Option<String>,
    pub at_ms: Option<i64>,
}

impl UsageReport {
    pub fn parse(body: &[u8]) -> Result<UsageReport, BodyError> {
        let w: Wire = serde_json::from_slice(body).map_err(|e| BodyError::Malformed(clip(&e.to_string())))?;
        let boot_id = w.boot_id;
        if boot_id.is_empty() {
            return Err(BodyError::Field { field: "bootId", reason: "must not be empty" });
        }
        if boot_id.len() > MAX_BOOT_ID_LEN {
            return Err(BodyError::Field { field: "bootId", reason: "longer than 128 bytes" });
        }
        if boot_id.chars().any(char::is_control) {
            return Err(BodyError::Field { field: "bootId", reason: "contains control characters" });
        }
        let (at, at_ms) = match w.at {
            None => (None, None),
            Some(s) => {
                if s.len() > MAX_AT_LEN {
                    return Err(BodyError::Field { field: "at", reason: "longer than 64 bytes" });
                }
                let t = OffsetDateTime::parse(&s, &Rfc3339).map_err(|_| BodyError::Field { field: "at", reason: "not an RFC 3339 timestamp" })?;
                let ms = (t.unix_timestamp_nanos() / 1_000_000).clamp(i64::MIN as i128, i64::MAX as i128) as i64;
                (Some(s), Some(ms))
            }
        };
        Ok(UsageReport { rx_bytes: w.rx_bytes, tx_bytes: w.tx_bytes, boot_id, at, at_ms })
    }

    /// Refuses an `at` more than `max_ahead_ms` after `now_ms` (a report without `at` passes).
    pub fn check_at(&self, now_ms: i64, max_ahead_ms: i64) -> Result<(), FutureAt> {
        match self.at_ms {
            Some(at) if at.saturating_sub(now_ms) > max_ahead_ms => Err(FutureAt { ahead_ms: at.saturating_sub(now_ms), max_ms: max_ahead_ms }),
            _ => Ok(()),
        }
    }

    pub fn reading(&self) -> Reading<'_> {
        Reading { rx: self.rx_bytes, tx: self.tx_bytes, boot_id: &self.boot_id, at_ms: self.at_ms }
    }
}

/// serde_json's messages quote input fragments; keep them short.
fn clip(s: &str) -> String {
    s.chars().take(160).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn camel_and_snake_case() -> Result<(), BodyError> {
        let a = UsageReport::parse(br#"{"rxBytes":1,"txBytes":2,"bootId":"b","at":"2026-01-02T03:04:05.5Z"}"#)?;
        let b = UsageReport::parse(br#"{"rx_bytes":1,"tx_bytes":2,"boot_id":"b","at":"2026-01-02T03:04:05.5Z","extra":[1]}"#)?;
        assert_eq!(a, b);
        assert_eq!(a.at_ms, Some(1_767_323_045_500));
        let c = UsageReport::parse(br#"{"rxBytes":18446744073709551615,"txBytes":0,"bootId":"b"}"#)?;
        assert_eq!(c.rx_bytes, u64::MAX);
        assert_eq!(c.at, None);
        Ok(())
    }

    #[test]
    fn bad_bodies_are_typed_errors() {
        let bad: &[&[u8]] = &[
            b"",
            b"null",
            b"[]",
            b"{",
            br#"{"rxBytes":-1,"txBytes":0,"bootId":"b"}"#,
            br#"{"rxBytes":1.5,"txBytes":0,"bootId":"b"}"#,
            br#"{"rxBytes":18446744073709551616,"txBytes":0,"bootId":"b"}"#,
            br#"{"rxBytes":"1","txBytes":0,"bootId":"b"}"#,
            br#"{"txBytes":0,"bootId":"b"}"#,
            br#"{"rxBytes":1,"rx_bytes":1,"txBytes":0,"bootId":"b"}"#,
            br#"{"rxBytes":1,"txBytes":0,"bootId":""}"#,
            br#"{"rxBytes":1,"txBytes":0,"bootId":"a\nb"}"#,
            br#"{"rxBytes":1,"txBytes":0,"bootId":"b","at":"yesterday"}"#,
            br#"{"rxBytes":1,"txBytes":0,"bootId":"b","at":5}"#,
            b"\xff\xfe",
        ];
        for b in bad {
            assert!(UsageReport::parse(b).is_err(), "{}", String::from_utf8_lossy(b));
        }
        let long = format!(r#"{{"rxBytes":1,"txBytes":0,"bootId":"{}"}}"#, "x".repeat(129));
        assert_eq!(
            UsageReport::parse(long.as_bytes()).err(),
            Some(BodyError::Field { field: "bootId", reason: "longer than 128 bytes" })
        );
    }

    #[test]
    fn an_at_from_the_future_is_refused_with_a_clear_message() -> Result<(), BodyError> {
        let now = 1_767_323_045_500; // 2026-01-02T03:04:05.5Z
        let r = UsageReport::parse(br#"{"rxBytes":1,"txBytes":2,"bootId":"b","at":"2026-01-02T03:14:05.5Z"}"#)?;
        let e = r.check_at(now, 300_000).err();
        assert_eq!(e, Some(FutureAt { ahead_ms: 600_000, max_ms: 300_000 }));
        let msg = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("600s ahead") && msg.contains("300s"), "{msg}");
        assert_eq!(r.check_at(now + 300_000, 300_000), Ok(()), "exactly the allowance passes");
        let far = UsageReport::parse(br#"{"rxBytes":1,"txBytes":2,"bootId":"b","at":"9999-12-31T23:59:59Z"}"#)?;
        assert!(far.check_at(now, 300_000).is_err());
        let past = UsageReport::parse(br#"{"rxBytes":1,"txBytes":2,"bootId":"b","at":"1970-01-01T00:00:00Z"}"#)?;
        assert_eq!(past.check_at(now, 300_000), Ok(()));
        let none = UsageReport::parse(br#"{"rxBytes":1,"txBytes":2,"bootId":"b"}"#)?;
        assert_eq!(none.check_at(now, 0), Ok(()));
        Ok(())
    }

    proptest! {
        #[test]
        fn the_future_bound_is_exact(now in -1i64 << 50..1i64 << 50, at in any::<i64>(), max in 0i64..10_000_000) {
            let r = UsageReport { rx_bytes: 0, tx_bytes: 0, boot_id: "b".into(), at: None, at_ms: Some(at) };
            let ahead = i128::from(at) - i128::from(now);
            prop_assert_eq!(r.check_at(now, max).is_err(), ahead > i128::from(max));
        }

        #[test]
        fn any_bytes_parse_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = UsageReport::parse(&bytes);
        }

        #[test]
        fn any_json_shaped_body_parses_or_fails_cleanly(
            rx in prop_oneof![any::<u64>().prop_map(|v| v.to_string()), "-?[0-9]{1,25}(\\.[0-9]{1,3})?", Just("null".to_string())],
            tx in any::<u64>(),
            boot in "\\PC{0,140}",
            at in prop::option::of("[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})"),
            snake in any::<bool>(),
        ) {
            let (r, t, b) = if snake { ("rx_bytes", "tx_bytes", "boot_id") } else { ("rxBytes", "txBytes", "bootId") };
            let mut body = format!("{{\"{r}\":{rx},\"{t}\":{tx},\"{b}\":{}", serde_json::Value::String(boot.clone()));
            if let Some(at) = &at {
                body.push_str(&format!(",\"at\":\"{at}\""));
            }
            body.push('}');
            match UsageReport::parse(body.as_bytes()) {
                Ok(rep) => {
                    prop_assert_eq!(rep.rx_bytes.to_string(), rx);
                    prop_assert_eq!(rep.tx_bytes, tx);
                    prop_assert_eq!(rep.boot_id, boot);
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
}
