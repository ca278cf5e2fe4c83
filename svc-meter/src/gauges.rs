//! The meter's sampled gauges (`kit::ops::spawn_sampler`), read from the ledger it holds in
//! memory (loaded whole from sled at start, so they are right after a restart):
//! - `pn_meter_nodes{state}`: private nodes by quota state — `ok`, `warn` (≥ 80 %), `cutoff`
//!   (≥ 95 %), `quota::State`'s names;
//! - `pn_relay_backlog{relay="meter-visibility"}`: nodes whose hide (at the cut-off) or show
//!   (a raised quota lifted it) has not reached Center yet (`update_node`, retried until
//!   delivered; `NodeLedger::hidden_synced`).
//!
//! `pn_meter_cutoffs_total` is counted where a ledger reaches the cut-off (`NodeLedger::evaluate`).

use std::sync::Arc;

use crate::meter::Meter;
use crate::quota::State;

/// Per-state node counts and the pending hide/show calls.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MeterCounts {
    pub ok: u64,
    pub warn: u64,
    pub cutoff: u64,
    pub visibility_pending: u64,
}

impl MeterCounts {
    pub fn add(&mut self, l: &crate::ledger::NodeLedger) {
        match l.state {
            State::Ok => self.ok += 1,
            State::Warn => self.warn += 1,
            State::Cutoff => self.cutoff += 1,
        }
        self.visibility_pending += u64::from(l.hidden_wanted() != l.hidden_synced);
    }

    pub fn set(&self) {
        for (state, n) in [(State::Ok, self.ok), (State::Warn, self.warn), (State::Cutoff, self.cutoff)] {
            metrics::gauge!("pn_meter_nodes", "state" => state.as_str()).set(n as f64);
        }
        kit::ops::relay_backlog("meter-visibility", self.visibility_pending);
    }
}

pub async fn sample(meter: Arc<Meter>) {
    let mut c = MeterCounts::default();
    for slot in meter.slots() {
        // Each node's lock is held for a field read; a report waits at most that long.
        let st = slot.st.lock().await;
        c.add(&st.ledger);
    }
    c.set();
}
