//! Reads the Prometheus summaries the services export on `/metrics` (kit's recorder renders
//! histograms as summaries: quantiles over a rolling ~60 s window, plus lifetime `_sum` and
//! `_count`). Only what the benchmarks need: one metric's quantiles, sum and count per `stage`.

use std::collections::BTreeMap;

/// One stage's summary as scraped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// quantile → seconds (e.g. "0.99" → 0.012).
    pub quantiles: BTreeMap<String, f64>,
    pub sum: f64,
    pub count: u64,
}

impl Summary {
    pub fn q(&self, q: &str) -> Option<f64> {
        self.quantiles.get(q).copied().filter(|v| v.is_finite())
    }
}

/// The summaries of `metric` in `text`, by the value of their `stage` label.
pub fn summaries(text: &str, metric: &str) -> BTreeMap<String, Summary> {
    let mut out: BTreeMap<String, Summary> = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, labels, value)) = split_sample(line) else { continue };
        let Ok(v) = value.parse::<f64>() else { continue };
        let stage = label(labels, "stage").unwrap_or_default();
        if name == metric {
            if let Some(q) = label(labels, "quantile") {
                out.entry(stage).or_default().quantiles.insert(q, v);
            }
        } else if name.strip_suffix("_sum") == Some(metric) {
            out.entry(stage).or_default().sum = v;
        } else if name.strip_suffix("_count") == Some(metric) {
            out.entry(stage).or_default().count = v.max(0.0) as u64;
        }
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
    use super::*;

    const TEXT: &str = r#"# TYPE pn_stage_pickup_seconds summary
pn_stage_pickup_seconds{stage="cloud",quantile="0"} 0.001
pn_stage_pickup_seconds{stage="cloud",quantile="0.5"} 0.004
pn_stage_pickup_seconds{stage="cloud",quantile="0.99"} 0.0125
pn_stage_pickup_seconds_sum{stage="cloud"} 0.75
pn_stage_pickup_seconds_count{stage="cloud"} 150
pn_handler_seconds{stage="cloud",quantile="0.99"} 1.5
pn_handler_seconds_sum{stage="cloud"} 90
pn_handler_seconds_count{stage="cloud"} 150
pn_center_errors_total{tool="x"} 3
"#;

    #[test]
    fn summaries_are_read_per_stage() {
        let s = summaries(TEXT, "pn_stage_pickup_seconds");
        let c = &s["cloud"];
        assert_eq!(c.q("0.99"), Some(0.0125));
        assert_eq!(c.q("0.5"), Some(0.004));
        assert_eq!(c.count, 150);
        assert!((c.sum - 0.75).abs() < 1e-12);
        assert_eq!(s.len(), 1);
        let h = summaries(TEXT, "pn_handler_seconds");
        assert_eq!(h["cloud"].q("0.99"), Some(1.5));
        assert_eq!(h["cloud"].count, 150);
        assert!(summaries("garbage {\n}", "x").is_empty());
    }
}
