//! Reads the Prometheus histograms the services export on `/metrics` (kit's recorder renders
//! every `*_seconds` series as a histogram: cumulative `_bucket{le=…}` counts, `_sum` and
//! `_count`, all over the process's lifetime). A run's figures are the difference of two scrapes
//! — the run and only the run — and its quantiles are read off the difference's buckets, with
//! linear interpolation inside a bucket, as Prometheus's `histogram_quantile` does.

use std::collections::BTreeMap;

/// One stage's histogram as scraped: cumulative counts by upper bound (`le`), sum, count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// (upper bound in seconds, cumulative count), ascending; `+Inf` last.
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    /// What was observed since `base` (a process restarted in between counts from zero).
    pub fn since(&self, base: &Histogram) -> Histogram {
        if self.count < base.count {
            return self.clone();
        }
        let before = |le: f64| base.buckets.iter().find(|(b, _)| *b == le).map(|(_, c)| *c).unwrap_or(0);
        Histogram {
            buckets: self.buckets.iter().map(|(le, c)| (*le, c.saturating_sub(before(*le)))).collect(),
            sum: (self.sum - base.sum).max(0.0),
            count: self.count - base.count,
        }
    }

    /// The `q` quantile (0..=1) in seconds, interpolated inside its bucket; `None` when empty.
    /// A quantile in the `+Inf` bucket is reported as the largest finite bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last().map(|(_, c)| *c).unwrap_or(0);
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        for s in self.steps() {
            if (s.at as f64) >= rank && s.at > s.below {
                if s.le.is_infinite() {
                    return Some(s.lo);
                }
                let within = (rank - s.below as f64) / (s.at - s.below) as f64;
                return Some(s.lo + (s.le - s.lo) * within.clamp(0.0, 1.0));
            }
        }
        Some(self.steps().last().map(|s| s.top()).unwrap_or(0.0))
    }

    /// The upper bound of the highest non-empty bucket: the most a sample can have been.
    pub fn max_bound(&self) -> Option<f64> {
        self.steps().filter(|s| s.at > s.below).last().map(|s| s.top())
    }

    /// The buckets from the lowest up, each with the finite bound below it and the cumulative
    /// counts below it and at its top.
    fn steps(&self) -> impl Iterator<Item = Step> + '_ {
        let (mut lo, mut below) = (0.0, 0u64);
        self.buckets.iter().map(move |&(le, at)| {
            let s = Step { lo, le, below, at };
            if le.is_finite() {
                lo = le;
            }
            below = at;
            s
        })
    }
}

/// One bucket of a [`Histogram`]: `(lo, le]`, `below` samples under it, `at` up to its top.
struct Step {
    lo: f64,
    le: f64,
    below: u64,
    at: u64,
}

impl Step {
    /// Its top, or for `+Inf` the largest finite bound.
    fn top(&self) -> f64 {
        if self.le.is_finite() { self.le } else { self.lo }
    }
}

/// The histograms of `metric` in `text`, by the value of their `stage` label.
pub fn histograms(text: &str, metric: &str) -> BTreeMap<String, Histogram> {
    let mut out: BTreeMap<String, Histogram> = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, labels, value)) = split_sample(line) else { continue };
        let Ok(v) = value.parse::<f64>() else { continue };
        let stage = label(labels, "stage").unwrap_or_default();
        if name.strip_suffix("_bucket") == Some(metric) {
            let le = match label(labels, "le").as_deref() {
                Some("+Inf") => f64::INFINITY,
                Some(s) => match s.parse::<f64>() {
                    Ok(le) => le,
                    Err(_) => continue,
                },
                None => continue,
            };
            out.entry(stage).or_default().buckets.push((le, v.max(0.0) as u64));
        } else if name.strip_suffix("_sum") == Some(metric) {
            out.entry(stage).or_default().sum = v;
        } else if name.strip_suffix("_count") == Some(metric) {
            out.entry(stage).or_default().count = v.max(0.0) as u64;
        }
    }
    for h in out.values_mut() {
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// `name{labels} value` → (name, labels, value); labels may be empty.
fn split_sample(line: &str) -> Option<(&str, &str, &str)> {
    match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            let value = line.get(close + 1..)?.split_whitespace().next()?;
            Some((&line[..open], &line[open + 1..close], value))
        }
        None => {
            let mut it = line.split_whitespace();
            Some((it.next()?, "", it.next()?))
        }
    }
}

/// The value of `key="…"` in a label set (no escapes are used by our labels).
fn label(labels: &str, key: &str) -> Option<String> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const BEFORE: &str = r#"# TYPE pn_stage_pickup_seconds histogram
pn_stage_pickup_seconds_bucket{stage="cloud",le="0.005"} 10
pn_stage_pickup_seconds_bucket{stage="cloud",le="0.01"} 10
pn_stage_pickup_seconds_bucket{stage="cloud",le="0.1"} 10
pn_stage_pickup_seconds_bucket{stage="cloud",le="+Inf"} 10
pn_stage_pickup_seconds_sum{stage="cloud"} 0.02
pn_stage_pickup_seconds_count{stage="cloud"} 10
"#;
    const AFTER: &str = r#"# TYPE pn_stage_pickup_seconds histogram
pn_stage_pickup_seconds_bucket{stage="cloud",le="0.005"} 10
pn_stage_pickup_seconds_bucket{stage="cloud",le="0.01"} 60
pn_stage_pickup_seconds_bucket{stage="cloud",le="0.1"} 109
pn_stage_pickup_seconds_bucket{stage="cloud",le="+Inf"} 110
pn_stage_pickup_seconds_sum{stage="cloud"} 1.02
pn_stage_pickup_seconds_count{stage="cloud"} 110
pn_handler_seconds_bucket{stage="cloud",le="1"} 3
pn_handler_seconds_bucket{stage="cloud",le="+Inf"} 3
pn_handler_seconds_sum{stage="cloud"} 1.5
pn_handler_seconds_count{stage="cloud"} 3
pn_center_errors_total{tool="x"} 3
"#;

    #[test]
    fn a_run_is_the_difference_of_two_scrapes() {
        let b = &histograms(BEFORE, "pn_stage_pickup_seconds")["cloud"];
        let a = &histograms(AFTER, "pn_stage_pickup_seconds")["cloud"];
        let run = a.since(b);
        assert_eq!(run.count, 100);
        assert!((run.sum - 1.0).abs() < 1e-9);
        // 50 samples in (0.005, 0.01], 49 in (0.01, 0.1], 1 above 0.1.
        let p50 = run.quantile(0.5).unwrap();
        assert!((p50 - 0.01).abs() < 1e-9, "{p50}");
        let p25 = run.quantile(0.25).unwrap();
        assert!((p25 - 0.0075).abs() < 1e-9, "{p25}");
        let p99 = run.quantile(0.99).unwrap();
        assert!((p99 - 0.1).abs() < 1e-9, "{p99}");
        assert_eq!(run.max_bound(), Some(0.1), "the +Inf bucket reports the largest finite bound");
        assert_eq!(histograms(AFTER, "pn_handler_seconds")["cloud"].count, 3);
        assert_eq!(Histogram::default().quantile(0.5), None);
        assert!(histograms("garbage {\n}", "x").is_empty());
        // A restarted process (count went down) counts from zero.
        assert_eq!(b.since(a).count, 10);
    }
}
