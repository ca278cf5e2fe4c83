//! The node stack files in `deploy/node/`: the compose file parses and pins what the runbook
//! requires; every shell script passes shellcheck and never runs `down`.

use std::path::PathBuf;
use std::process::Command;

use serde_yaml::Value;

fn node_dir() -> PathBuf {
    testkit::workspace_root().join("deploy/node")
}

fn compose() -> Value {
    let text = std::fs::read_to_string(node_dir().join("docker-compose.yml")).unwrap();
    assert_eq!(text, svc_deployer::stack::DOCKER_COMPOSE_YML, "the binary embeds deploy/node/docker-compose.yml");
    serde_yaml::from_str(&text).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence().map(|s| s.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

#[test]
fn compose_defines_both_services_pinned_by_k2_version() {
    let c = compose();
    let services = c["services"].as_mapping().unwrap();
    let names: Vec<&str> = services.keys().filter_map(Value::as_str).collect();
    assert_eq!(names, vec!["k2s", "k2-sidecar"]);
    for name in names {
        let s = &c["services"][name];
        assert_eq!(s["container_name"].as_str(), Some(name), "container_name of {name}");
        let image = s["image"].as_str().unwrap();
        // `<repo>:${K2_VERSION…}`: the tag is the variable and nothing else.
        let (repo, tag) = image.split_once(':').unwrap();
        assert!(!repo.is_empty() && !repo.contains('$'), "{name}: image {image}");
        assert!(tag.starts_with("${K2_VERSION") && tag.ends_with('}') && tag.matches('}').count() == 1, "{name}: image {image} must be pinned by K2_VERSION");
        assert!(!image.contains("latest"), "{name}: never :latest ({image})");
        // .env is compose's (interpolation) only: a shared env_file would hand every
        // container the node secret and the claim.
        assert!(s.get("env_file").is_none(), "{name}: no env_file; each container names its variables");
        assert_eq!(s["restart"].as_str(), Some("unless-stopped"));
    }
}

/// `environment:` as `NAME → value` (the list form `NAME=value`).
fn env_of(v: &Value) -> std::collections::BTreeMap<String, String> {
    strings(v).iter().map(|e| e.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).unwrap_or((e.clone(), String::new()))).collect()
}

#[test]
fn the_sidecar_carries_the_claim_and_reads_the_host_nic() {
    let c = compose();
    let sidecar = &c["services"]["k2-sidecar"];
    assert!(strings(&sidecar["environment"]).contains(&"K2_PRIVATE_CLAIM=${K2_PRIVATE_CLAIM:-}".to_string()));
    // The host's counters: /proc/net/dev is per network namespace, so the sidecar runs in the
    // host's (a bridge-networked container would see its own veth), and the runbook's path
    // is mounted from there — the one file, not the host's whole /proc.
    assert_eq!(sidecar["network_mode"].as_str(), Some("host"), "the sidecar must read the HOST NIC's counters");
    assert!(sidecar.get("networks").is_none() && sidecar.get("ports").is_none(), "host networking: no networks, no published ports");
    let vols = strings(&sidecar["volumes"]);
    assert!(vols.contains(&"/proc/net/dev:/host/proc/net/dev:ro".to_string()), "{vols:?}");
    assert!(!vols.iter().any(|v| v.starts_with("/proc:") || v.starts_with("/:")), "never the host's whole /proc or root: {vols:?}");
    let k2s = &c["services"]["k2s"];
    assert!(strings(&k2s["volumes"]).iter().any(|v| v.starts_with("./users:") && v.ends_with(":ro")), "users file mounted");
    assert!(k2s.get("network_mode").is_none(), "k2s stays on its bridge network (ports 443 published)");
}

#[test]
fn the_node_secret_and_the_claim_reach_only_the_sidecar() {
    let c = compose();
    let sidecar = env_of(&c["services"]["k2-sidecar"]["environment"]);
    let k2s = env_of(&c["services"]["k2s"]["environment"]);
    // Runbook step 5's consumers: the sidecar uses all but K2_VERSION (image tags, compose's
    // own); k2s (k2v4-slave) only K2_CENTER_URL.
    let sidecar_vars = [
        "K2_NODE_SECRET",
        "K2_PRIVATE_CLAIM",
        "K2_CENTER_URL",
        "K2_DOMAIN",
        "K2_NODE_TRAFFIC_LIMIT_GB",
        "K2_NODE_NAME",
        "K2_NODE_REGION",
        "K2_IP_TYPE",
    ];
    assert_eq!(sidecar.keys().map(String::as_str).collect::<Vec<_>>().len(), sidecar_vars.len(), "{sidecar:?}");
    for v in sidecar_vars {
        let val = sidecar.get(v).unwrap_or_else(|| panic!("the sidecar lacks {v}"));
        assert!(val.starts_with(&format!("${{{v}")) && val.ends_with('}') && val.matches('$').count() == 1, "{v} must come from .env's {v}: {val}");
    }
    assert!(sidecar["K2_NODE_SECRET"].starts_with("${K2_NODE_SECRET:?"), "compose refuses to start without the node secret");
    assert_eq!(k2s.keys().map(String::as_str).collect::<Vec<_>>(), vec!["K2_CENTER_URL"], "k2s gets K2_CENTER_URL only");
    assert!(k2s["K2_CENTER_URL"].starts_with("${K2_CENTER_URL"));
    // And no other way into k2s: no env_file anywhere, no secret named in its service at all.
    let k2s_text = serde_yaml::to_string(&c["services"]["k2s"]).unwrap();
    for secret in ["K2_NODE_SECRET", "K2_PRIVATE_CLAIM"] {
        assert!(!k2s_text.contains(secret), "{secret} reaches k2s:\n{k2s_text}");
    }
    // Every variable compose interpolates is one the deployer writes into .env.
    let text = svc_deployer::stack::DOCKER_COMPOSE_YML;
    let written = [sidecar_vars.as_slice(), &["K2_VERSION"]].concat();
    for part in text.split("${").skip(1) {
        let var: String = part.chars().take_while(|ch| ch.is_ascii_alphanumeric() || *ch == '_').collect();
        assert!(written.contains(&var.as_str()), "compose uses ${{{var}}}, which .env does not carry");
    }
}

#[test]
fn shell_scripts_pass_shellcheck_and_never_run_down() {
    let shellcheck = ["/usr/bin/shellcheck"].into_iter().map(PathBuf::from).find(|p| p.exists()).or_else(|| testkit::which("shellcheck"));
    let shellcheck = shellcheck.expect("shellcheck is not installed (apt-get install shellcheck; scripts/bootstrap does it)");
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(node_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sh"))
        .collect();
    scripts.sort();
    let names: Vec<String> = scripts.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["auto-update.sh", "k2s-crash-monitor.sh", "provision-node.sh"]);
    let out = Command::new(&shellcheck).args(&scripts).output().unwrap();
    assert!(out.status.success(), "shellcheck:\n{}", String::from_utf8_lossy(&out.stdout));
    for p in &scripts {
        let text = std::fs::read_to_string(p).unwrap();
        let code: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with('#')).collect();
        assert!(!code.iter().any(|l| l.contains("compose") && l.contains(" down")), "{} runs down", p.display());
        assert!(text.starts_with("#!/usr/bin/env bash\n"), "{} needs a bash shebang", p.display());
    }
    for (embedded, file) in [
        (svc_deployer::stack::PROVISION_NODE_SH, "provision-node.sh"),
        (svc_deployer::stack::AUTO_UPDATE_SH, "auto-update.sh"),
        (svc_deployer::stack::CRASH_MONITOR_SH, "k2s-crash-monitor.sh"),
    ] {
        assert_eq!(std::fs::read_to_string(node_dir().join(file)).unwrap(), embedded);
    }
}

#[test]
fn the_prep_script_covers_the_runbook_steps() {
    let text = svc_deployer::stack::PROVISION_NODE_SH;
    for needle in [
        // The OS gate: Ubuntu (and, since the node VM work, Debian) by /etc/os-release's ID.
        "OS_ID=${ID:-unknown}",
        "    ubuntu)",
        "id -u",
        "Asia/Singapore",
        "snapd",
        "swapon",
        "docker-ce",
        "disable_ipv6 = 0",
        "tcp_congestion_control = bbr",
        "/etc/docker/daemon.json",
        "ufw --force enable",
        "BEGIN UFW AND DOCKER",
        "SSH_PORT=1022",
        "Storage=persistent",
        "k2s-crash-monitor.sh",
        "auto-update.sh",
        "DEPLOY_DIR=/apps/kaitu-slave",
    ] {
        assert!(text.contains(needle), "provision-node.sh lacks {needle}");
    }
}
