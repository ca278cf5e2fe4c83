//! Quota states `ok → warn → cutoff` as a pure function of used and sold bytes. Exact integer
//! arithmetic (ratios in parts per million, products in u128), so 95 % means 95 %, not
//! 94.99999 % after a float rounding. No I/O here.

use serde::{Deserialize, Serialize};

/// Where a node stands against its sold quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum State {
    #[default]
    Ok,
    Warn,
    Cutoff,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ok => "ok",
            State::Warn => "warn",
            State::Cutoff => "cutoff",
        }
    }

    pub fn to_proto(self) -> proto::QuotaState {
        match self {
            State::Ok => proto::QuotaState::Ok,
            State::Warn => proto::QuotaState::Warn,
            State::Cutoff => proto::QuotaState::Cutoff,
        }
    }
}

const PPM: u128 = 1_000_000;

/// The warn and cutoff thresholds, as parts per million of the sold quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    warn_ppm: u128,
    cutoff_ppm: u128,
}

impl Thresholds {
    /// From ratios such as 0.8 and 0.95 (validated by `Settings::validate`).
    pub fn new(warn_ratio: f64, cutoff_ratio: f64) -> Thresholds {
        let ppm = |r: f64| (r.clamp(0.0, 100.0) * PPM as f64).round() as u128;
        Thresholds { warn_ppm: ppm(warn_ratio), cutoff_ppm: ppm(cutoff_ratio) }
    }

    /// The state for `used` of `sold` bytes. A node sold nothing is cut off (fail closed:
    /// the meter is a cost gate).
    pub fn state(&self, used: u64, sold: u64) -> State {
        let used = used as u128 * PPM;
        let sold = sold as u128;
        if used >= self.cutoff_ppm * sold {
            State::Cutoff
        } else if used >= self.warn_ppm * sold {
            State::Warn
        } else {
            State::Ok
        }
    }
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds::new(0.8, 0.95)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_boundaries_are_inclusive_and_exact() {
        let t = Thresholds::default();
        assert_eq!(t.state(0, 1000), State::Ok);
        assert_eq!(t.state(799, 1000), State::Ok);
        assert_eq!(t.state(800, 1000), State::Warn);
        assert_eq!(t.state(949, 1000), State::Warn);
        assert_eq!(t.state(950, 1000), State::Cutoff);
        assert_eq!(t.state(u64::MAX, u64::MAX), State::Cutoff);
        // 1 TiB sold: one byte under 95 % is still warn.
        let sold = 1u64 << 40;
        let at95 = (sold as u128 * 95).div_ceil(100) as u64;
        assert_eq!(t.state(at95 - 1, sold), State::Warn);
        assert_eq!(t.state(at95, sold), State::Cutoff);
        assert_eq!(t.state(0, 0), State::Cutoff);
    }

    proptest! {
        #[test]
        fn state_is_monotonic_in_usage(sold in 1u64.., a in any::<u64>(), b in any::<u64>()) {
            let t = Thresholds::default();
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(t.state(lo, sold) <= t.state(hi, sold));
        }
    }
}
