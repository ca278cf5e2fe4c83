//! Cumulative NIC counters → billable deltas, with epochs. Pure: no clock, no I/O; the caller
//! passes the server time. This is the one place that decides how many bytes a report bills.
//!
//! Rules: the first report ever is the baseline (traffic before it — the OS prep — is not the
//! customer's); a repeat bills nothing; a new boot id, or a counter that went down, starts an
//! epoch that counts from 0 (a reboot resets NIC counters); a jump faster than the link allows
//! is refused. Stale (billing nothing) is a report from a boot already left, one from before
//! the current epoch began (its `at` is older than the epoch's first report: a late retry from
//! before a NIC reset), and one whose counters are *not higher* than the last accepted ones
//! while its `at` is not newer (a late retry). A report whose counters are higher counts,
//! whatever its `at` says: a node clock that stepped back (or an `at` once accepted from the
//! future) cannot make later traffic stale. Never a negative delta, never a byte billed twice.

use serde::{Deserialize, Serialize};

use crate::settings::CountMode;

/// Epochs kept in detail; older ones are folded into `earlier_*` (a hostile node could
/// otherwise grow its record with every report).
pub const MAX_EPOCHS: usize = 16;
/// Boot ids of folded epochs remembered, so that a late report from one is still stale.
pub const MAX_RETIRED_BOOT_IDS: usize = 64;

/// One parsed report, as far as billing is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading<'a> {
    pub rx: u64,
    pub tx: u64,
    pub boot_id: &'a str,
    /// The node's own timestamp (`at`), milliseconds since the epoch, when it sent one.
    pub at_ms: Option<i64>,
}

/// A stretch of monotonic counters: one boot, or the part of a boot after a NIC reset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Epoch {
    pub index: u32,
    pub boot_id: String,
    /// Server time of the epoch's first report.
    pub started_at_ms: i64,
    /// Counters the epoch counts from: the baseline for the first epoch, 0 after.
    pub start_rx: u64,
    pub start_tx: u64,
    pub last_rx: u64,
    pub last_tx: u64,
    /// The node's `at` of the last accepted report in this epoch.
    pub last_at_ms: Option<i64>,
    /// For an epoch begun by a NIC reset (same boot as the one before): the node's `at` of the
    /// report that began it. A report of this boot that is older belongs to an earlier epoch
    /// (stale, even with counters above this epoch's). None for a baseline or a reboot.
    #[serde(default)]
    pub first_at_ms: Option<i64>,
    pub counted_bytes: u64,
    pub reports: u64,
}

/// A node's usage: the billed total and the epochs it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub used_bytes: u64,
    /// Accepted reports (baseline, counted and repeats; not stale or refused ones).
    pub reports: u64,
    /// Most recent last; at most `MAX_EPOCHS`.
    pub epochs: Vec<Epoch>,
    pub earlier_epochs: u32,
    pub earlier_bytes: u64,
    pub retired_boot_ids: Vec<String>,
    /// Server time of the last accepted report.
    pub last_accepted_ms: Option<i64>,
}

/// What a report did to the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The first report: it only sets the starting point.
    Baseline,
    /// Counters moved on; `delta` bytes billed (0 when only uncounted bytes moved).
    Counted { delta: u64, new_epoch: bool },
    /// The same counters again: nothing billed.
    Repeat,
    /// Older than what is known (late retry, previous boot): ignored.
    Stale,
}

impl Outcome {
    pub fn delta(self) -> u64 {
        match self {
            Outcome::Counted { delta, .. } => delta,
            _ => 0,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Baseline => "baseline",
            Outcome::Counted { new_epoch: true, .. } => "new_epoch",
            Outcome::Counted { .. } => "counted",
            Outcome::Repeat => "repeat",
            Outcome::Stale => "stale",
        }
    }
}

/// A report the meter refuses to bill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("counter jump of rx {rx} / tx {tx} bytes exceeds the {allowed} bytes the link could carry since the last report")]
    Jump { rx: u64, tx: u64, allowed: u64 },
}

impl Usage {
    /// Applies one report at server time `now_ms`. On `Err` nothing changed.
    pub fn apply(&mut self, r: &Reading<'_>, mode: CountMode, now_ms: i64, max_link_bytes_per_sec: u64) -> Result<Outcome, Refusal> {
        let Some(cur) = self.epochs.last() else {
            self.epochs.push(Epoch {
                index: 0,
                boot_id: r.boot_id.to_string(),
                started_at_ms: now_ms,
                start_rx: r.rx,
                start_tx: r.tx,
                last_rx: r.rx,
                last_tx: r.tx,
                last_at_ms: r.at_ms,
                first_at_ms: None,
                counted_bytes: 0,
                reports: 1,
            });
            self.reports = 1;
            self.last_accepted_ms = Some(now_ms);
            return Ok(Outcome::Baseline);
        };

        let (drx, dtx, new_epoch) = if r.boot_id != cur.boot_id {
            if self.knows_old_boot(r.boot_id) {
                return Ok(Outcome::Stale);
            }
            (r.rx, r.tx, true)
        } else {
            // From before the NIC reset that began this epoch: its bytes are in an earlier
            // epoch's count already.
            if let (Some(at), Some(first)) = (r.at_ms, cur.first_at_ms)
                && at < first
            {
                return Ok(Outcome::Stale);
            }
            let older = |strict: bool| matches!((r.at_ms, cur.last_at_ms), (Some(at), Some(last)) if at < last || (!strict && at == last));
            let same = r.rx == cur.last_rx && r.tx == cur.last_tx;
            let higher = r.rx >= cur.last_rx && r.tx >= cur.last_tx && !same;
            // Counters not higher and `at` not newer: a late retry of an older report.
            if (same && older(true)) || (!same && !higher && older(false)) {
                return Ok(Outcome::Stale);
            }
            if same {
                let at = r.at_ms;
                if let Some(cur) = self.epochs.last_mut() {
                    cur.last_at_ms = cur.last_at_ms.max(at);
                    cur.reports = cur.reports.saturating_add(1);
                }
                self.reports = self.reports.saturating_add(1);
                self.last_accepted_ms = Some(now_ms);
                return Ok(Outcome::Repeat);
            }
            if r.rx < cur.last_rx || r.tx < cur.last_tx {
                // A NIC reset without a reboot: the new counters are traffic since the reset.
                (r.rx, r.tx, true)
            } else {
                (r.rx - cur.last_rx, r.tx - cur.last_tx, false)
            }
        };

        let elapsed_ms = self.last_accepted_ms.map_or(0, |t| now_ms.saturating_sub(t).max(0)) as u128;
        let allowed = (max_link_bytes_per_sec as u128 * (elapsed_ms + 1000) / 1000).min(u64::MAX as u128) as u64;
        if drx > allowed || dtx > allowed {
            return Err(Refusal::Jump { rx: drx, tx: dtx, allowed });
        }

        let delta = mode.count(drx, dtx);
        let reset = r.boot_id == cur.boot_id;
        if new_epoch {
            let index = cur.index.saturating_add(1);
            self.epochs.push(Epoch {
                index,
                boot_id: r.boot_id.to_string(),
                started_at_ms: now_ms,
                start_rx: 0,
                start_tx: 0,
                last_rx: r.rx,
                last_tx: r.tx,
                last_at_ms: r.at_ms,
                first_at_ms: if reset { r.at_ms } else { None },
                counted_bytes: delta,
                reports: 1,
            });
            self.fold_old_epochs();
        } else if let Some(cur) = self.epochs.last_mut() {
            cur.last_rx = r.rx;
            cur.last_tx = r.tx;
            cur.last_at_ms = cur.last_at_ms.max(r.at_ms);
            cur.counted_bytes = cur.counted_bytes.saturating_add(delta);
            cur.reports = cur.reports.saturating_add(1);
        }
        self.used_bytes = self.used_bytes.saturating_add(delta);
        self.reports = self.reports.saturating_add(1);
        self.last_accepted_ms = Some(now_ms);
        Ok(Outcome::Counted { delta, new_epoch })
    }

    /// A boot id of an epoch before the current one.
    fn knows_old_boot(&self, boot_id: &str) -> bool {
        let n = self.epochs.len().saturating_sub(1);
        self.epochs[..n].iter().any(|e| e.boot_id == boot_id) || self.retired_boot_ids.iter().any(|b| b == boot_id)
    }

    fn fold_old_epochs(&mut self) {
        while self.epochs.len() > MAX_EPOCHS {
            let old = self.epochs.remove(0);
            self.earlier_epochs = self.earlier_epochs.saturating_add(1);
            self.earlier_bytes = self.earlier_bytes.saturating_add(old.counted_bytes);
            let still_listed = self.epochs.iter().any(|e| e.boot_id == old.boot_id);
            if !still_listed && !self.retired_boot_ids.contains(&old.boot_id) {
                self.retired_boot_ids.push(old.boot_id);
                if self.retired_boot_ids.len() > MAX_RETIRED_BOOT_IDS {
                    self.retired_boot_ids.remove(0);
                }
            }
        }
    }

    /// Forgets node times later than `limit_ms` (an `at` accepted from the future before
    /// such reports were refused): they must not make the node's next reports look old.
    pub fn forget_future(&mut self, limit_ms: i64) {
        for e in &mut self.epochs {
            e.last_at_ms = e.last_at_ms.map(|t| t.min(limit_ms));
            e.first_at_ms = e.first_at_ms.map(|t| t.min(limit_ms));
        }
    }

    /// The index of the current epoch (0 before any report).
    pub fn current_epoch(&self) -> u32 {
        self.epochs.last().map_or(0, |e| e.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LINK: u64 = u64::MAX;

    fn rd(rx: u64, tx: u64, boot: &str, at: i64) -> Reading<'_> {
        Reading { rx, tx, boot_id: boot, at_ms: Some(at) }
    }

    #[test]
    fn baseline_then_deltas_then_reboot() {
        let mut u = Usage::default();
        let m = CountMode::RxTx;
        assert_eq!(u.apply(&rd(1000, 500, "b1", 1), m, 0, LINK), Ok(Outcome::Baseline));
        assert_eq!(u.used_bytes, 0, "pre-deployment traffic is not billed");
        assert_eq!(u.apply(&rd(1100, 600, "b1", 2), m, 1, LINK), Ok(Outcome::Counted { delta: 200, new_epoch: false }));
        assert_eq!(u.apply(&rd(1100, 600, "b1", 2), m, 2, LINK), Ok(Outcome::Repeat));
        assert_eq!(u.apply(&rd(50, 25, "b2", 3), m, 3, LINK), Ok(Outcome::Counted { delta: 75, new_epoch: true }));
        assert_eq!(u.used_bytes, 275);
        // A late retry from the previous boot bills nothing.
        assert_eq!(u.apply(&rd(1100, 600, "b1", 2), m, 4, LINK), Ok(Outcome::Stale));
        // A NIC reset without a reboot.
        assert_eq!(u.apply(&rd(10, 5, "b2", 4), m, 5, LINK), Ok(Outcome::Counted { delta: 15, new_epoch: true }));
        // A late report from before the NIC reset (its `at` is older than the reset's) is
        // stale even though its counters are above the new epoch's.
        assert_eq!(u.apply(&rd(50, 25, "b2", 3), m, 6, LINK), Ok(Outcome::Stale));
        assert_eq!(u.used_bytes, 290);
        assert_eq!(u.epochs.len(), 3);
        assert_eq!(u.epochs.iter().map(|e| e.counted_bytes).sum::<u64>(), 290);
        assert_eq!(u.reports, 5);
    }

    #[test]
    fn tx_mode_counts_egress_only() {
        let mut u = Usage::default();
        let m = CountMode::Tx;
        u.apply(&rd(0, 0, "b", 1), m, 0, LINK).ok();
        assert_eq!(u.apply(&rd(900, 100, "b", 2), m, 1, LINK), Ok(Outcome::Counted { delta: 100, new_epoch: false }));
        assert_eq!(u.used_bytes, 100);
    }

    #[test]
    fn a_jump_faster_than_the_link_is_refused_and_changes_nothing() {
        let mut u = Usage::default();
        u.apply(&rd(0, 0, "b", 1), CountMode::RxTx, 0, 1000).ok();
        let before = u.clone();
        // 10 s later a 1000 B/s link can carry 11 000 bytes (one second of slack).
        let r = u.apply(&rd(11_001, 0, "b", 2), CountMode::RxTx, 10_000, 1000);
        assert_eq!(r, Err(Refusal::Jump { rx: 11_001, tx: 0, allowed: 11_000 }));
        assert_eq!(u, before);
        assert_eq!(u.apply(&rd(11_000, 0, "b", 2), CountMode::RxTx, 10_000, 1000), Ok(Outcome::Counted { delta: 11_000, new_epoch: false }));
        // After a reboot the new counter is checked the same way.
        assert!(u.apply(&rd(5000, 0, "c", 3), CountMode::RxTx, 10_100, 1000).is_err());
    }

    #[test]
    fn reports_without_at_fall_back_to_counters() {
        let mut u = Usage::default();
        let r = |rx| Reading { rx, tx: 0, boot_id: "b", at_ms: None };
        u.apply(&r(10), CountMode::RxTx, 0, LINK).ok();
        assert_eq!(u.apply(&r(30), CountMode::RxTx, 1, LINK).map(Outcome::delta), Ok(20));
        assert_eq!(u.apply(&r(5), CountMode::RxTx, 2, LINK).map(Outcome::delta), Ok(5));
        assert_eq!(u.used_bytes, 25);
    }

    #[test]
    fn many_reboots_keep_the_record_bounded_and_the_total_exact() {
        let mut u = Usage::default();
        let boots: Vec<String> = (0..200).map(|i| format!("boot-{i}")).collect();
        u.apply(&rd(0, 0, &boots[0], 0), CountMode::RxTx, 0, LINK).ok();
        for (i, b) in boots.iter().enumerate().skip(1) {
            assert_eq!(u.apply(&rd(7, 0, b, i as i64), CountMode::RxTx, i as i64, LINK).map(Outcome::delta), Ok(7));
        }
        assert_eq!(u.used_bytes, 7 * 199);
        assert!(u.epochs.len() <= MAX_EPOCHS);
        assert!(u.retired_boot_ids.len() <= MAX_RETIRED_BOOT_IDS);
        assert_eq!(u.earlier_bytes + u.epochs.iter().map(|e| e.counted_bytes).sum::<u64>(), u.used_bytes);
        // A recently retired boot is still recognised as stale.
        assert_eq!(u.apply(&rd(99, 0, &boots[150], 1), CountMode::RxTx, 1000, LINK), Ok(Outcome::Stale));
    }

    #[test]
    fn higher_counters_count_whatever_the_at_says() {
        let m = CountMode::RxTx;
        let mut u = Usage::default();
        u.apply(&rd(100, 100, "b", 10_000), m, 0, LINK).ok();
        // The node's clock steps back an hour: the traffic still counts.
        assert_eq!(u.apply(&rd(150, 100, "b", 10_000 - 3_600_000), m, 1, LINK), Ok(Outcome::Counted { delta: 50, new_epoch: false }));
        // A late retry of an older report (lower counters, older `at`) is stale; so is the same
        // counters again with an older `at`; the same `at` again is a repeat.
        assert_eq!(u.apply(&rd(120, 100, "b", 5_000), m, 2, LINK), Ok(Outcome::Stale));
        assert_eq!(u.apply(&rd(150, 100, "b", 9_000), m, 3, LINK), Ok(Outcome::Stale));
        assert_eq!(u.apply(&rd(150, 100, "b", 10_000), m, 4, LINK), Ok(Outcome::Repeat));
        assert_eq!(u.used_bytes, 50);
    }

    #[test]
    fn an_at_from_the_future_once_accepted_does_not_make_later_traffic_stale() {
        let m = CountMode::RxTx;
        let mut u = Usage::default();
        u.apply(&rd(0, 0, "b", 1_000), m, 0, LINK).ok();
        assert_eq!(u.apply(&rd(10, 0, "b", i64::MAX), m, 1, LINK).map(Outcome::delta), Ok(10));
        for (i, rx) in [20u64, 35, 70].into_iter().enumerate() {
            let out = u.apply(&rd(rx, 0, "b", 2_000 + i as i64), m, 2 + i as i64, LINK);
            assert!(matches!(out, Ok(Outcome::Counted { new_epoch: false, .. })), "{out:?}");
        }
        assert_eq!(u.used_bytes, 70);
        // What the meter does with a ledger written before such `at`s were refused.
        u.forget_future(5_000);
        assert!(u.epochs.iter().all(|e| e.last_at_ms <= Some(5_000)));
        // A NIC reset is seen again once the stored `at` is sane.
        assert_eq!(u.apply(&rd(5, 0, "b", 6_000), m, 9, LINK), Ok(Outcome::Counted { delta: 5, new_epoch: true }));
    }

    #[test]
    fn a_reboot_with_a_clock_ahead_does_not_stall_billing() {
        let m = CountMode::RxTx;
        let mut u = Usage::default();
        u.apply(&rd(0, 0, "b1", 1_000), m, 0, LINK).ok();
        // After the reboot the clock runs 3 minutes ahead, then NTP steps it back.
        assert_eq!(u.apply(&rd(10, 0, "b2", 200_000), m, 1, LINK).map(Outcome::delta), Ok(10));
        assert_eq!(u.apply(&rd(25, 0, "b2", 30_000), m, 2, LINK).map(Outcome::delta), Ok(15));
        assert_eq!(u.used_bytes, 25);
    }

    // ---- property: billed = true traffic since the baseline ----

    #[derive(Debug, Clone)]
    enum Step {
        Traffic(u32, u32),
        Report,
        /// The last report sent, sent again.
        Repeat,
        /// Some earlier report, arriving late.
        Late(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u32..5_000_000, 0u32..5_000_000).prop_map(|(a, b)| Step::Traffic(a, b)),
            3 => Just(Step::Report),
            1 => Just(Step::Repeat),
            1 => any::<usize>().prop_map(Step::Late),
        ]
    }

    /// Each epoch: whether it starts with a reboot (new boot id) or a NIC reset (same boot id,
    /// counters back to 0), and what happens in it.
    fn epochs() -> impl Strategy<Value = Vec<(bool, Vec<Step>)>> {
        prop::collection::vec((any::<bool>(), prop::collection::vec(step(), 0..12)), 1..10)
    }

    #[derive(Clone)]
    struct Sent {
        rx: u64,
        tx: u64,
        boot: String,
        at: i64,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn billed_total_is_the_true_traffic_since_the_baseline(plan in epochs(), tx_only in any::<bool>()) {
            let mode = if tx_only { CountMode::Tx } else { CountMode::RxTx };
            let mut u = Usage::default();
            let (mut rx, mut tx) = (0u64, 0u64);
            let mut boot_n = 0u32;
            let mut clock = 0i64;
            let mut history: Vec<Sent> = Vec::new();
            let mut expected = 0u64;
            let mut previous_used = 0u64;

            let mut send = |s: &Sent, u: &mut Usage, clock: &mut i64| -> Result<(), TestCaseError> {
                *clock += 1000;
                let r = Reading { rx: s.rx, tx: s.tx, boot_id: &s.boot, at_ms: Some(s.at) };
                let out = u.apply(&r, mode, *clock, LINK);
                prop_assert!(out.is_ok(), "refused: {out:?}");
                prop_assert!(u.used_bytes >= previous_used, "usage went down");
                previous_used = u.used_bytes;
                Ok(())
            };

            for (i, (reboot, steps)) in plan.iter().enumerate() {
                if i > 0 {
                    rx = 0;
                    tx = 0;
                    if *reboot {
                        boot_n += 1;
                    } else if !history.is_empty() {
                        // A NIC reset is only visible if a report shows the lower counters
                        // before new traffic overtakes the old values.
                        clock += 1;
                        let s = Sent { rx, tx, boot: format!("b{boot_n}"), at: clock };
                        send(&s, &mut u, &mut clock)?;
                        history.push(s);
                    }
                }
                let boot = format!("b{boot_n}");
                for st in steps.iter().chain(std::iter::once(&Step::Report)) {
                    match st {
                        Step::Traffic(a, b) => {
                            rx += u64::from(*a);
                            tx += u64::from(*b);
                            if !history.is_empty() {
                                expected += mode.count(u64::from(*a), u64::from(*b));
                            }
                        }
                        Step::Report => {
                            clock += 1;
                            let s = Sent { rx, tx, boot: boot.clone(), at: clock };
                            send(&s, &mut u, &mut clock)?;
                            history.push(s);
                        }
                        Step::Repeat => {
                            if let Some(s) = history.last().cloned() {
                                send(&s, &mut u, &mut clock)?;
                            }
                        }
                        Step::Late(k) => {
                            if !history.is_empty() {
                                let s = history[k % history.len()].clone();
                                send(&s, &mut u, &mut clock)?;
                            }
                        }
                    }
                }
            }
            prop_assert_eq!(u.used_bytes, expected);
            prop_assert_eq!(u.earlier_bytes + u.epochs.iter().map(|e| e.counted_bytes).sum::<u64>(), u.used_bytes);
        }

        /// Within one boot that never reset its NIC, a report whose counters are higher than
        /// the last accepted ones is never stale, whatever the node's `at` (a clock stepping
        /// around, an `at` from the far future or past): it bills exactly the increase.
        #[test]
        fn higher_counters_are_never_stale(steps in prop::collection::vec((0u64..1_000_000, 0u64..1_000_000, any::<i64>(), any::<bool>()), 1..40)) {
            let mut u = Usage::default();
            u.apply(&Reading { rx: 0, tx: 0, boot_id: "b", at_ms: Some(0) }, CountMode::RxTx, 0, LINK).ok();
            let (mut rx, mut tx, mut billed) = (0u64, 0u64, 0u64);
            for (i, (a, b, at, with_at)) in steps.into_iter().enumerate() {
                let (nrx, ntx) = (rx + a, tx + b);
                let r = Reading { rx: nrx, tx: ntx, boot_id: "b", at_ms: with_at.then_some(at) };
                let out = u.apply(&r, CountMode::RxTx, i as i64 + 1, LINK);
                if a + b == 0 {
                    prop_assert!(matches!(out, Ok(Outcome::Repeat | Outcome::Stale)), "{out:?}");
                } else {
                    prop_assert_eq!(out, Ok(Outcome::Counted { delta: a + b, new_epoch: false }));
                    billed += a + b;
                }
                (rx, tx) = (nrx, ntx);
            }
            prop_assert_eq!(u.used_bytes, billed);
        }
    }
}
