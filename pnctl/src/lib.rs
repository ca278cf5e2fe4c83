//! pnctl, the operator's CLI: the dev stack (`up`, `down`, the supervisor and `stack.json`),
//! the end-to-end `demo`, and the tools that read the pipeline — `status`, `tail`, `decode`,
//! `replay`, `ledger`, `reap`, `ops` (list, show, abandon operations) — and `completions`. One module per command; `cli` parses the arguments (`main.rs` only calls
//! it). The image's multi-call binary `pnp` is its own crate (pnp/), which calls `cli`.
//!
//! Invariant: pnctl never prints a secret. It generates the dev secrets, hands them to the
//! children it starts through their environment, and otherwise only reads sealed or hashed
//! forms from NATS.

pub mod cli;
pub mod decode;
pub mod demo;
pub mod endpoints;
pub mod events;
pub mod history;
pub mod http;
pub mod ledger;
pub mod ops;
pub mod reap;
pub mod replay;
pub mod stack;
pub mod status;
pub mod tail;

use std::time::Duration;

/// Parses `180s`, `3m`, `500ms`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 180s, 3m, 500ms)"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("180s"), Ok(Duration::from_secs(180)));
        assert_eq!(parse_duration("3m"), Ok(Duration::from_secs(180)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
