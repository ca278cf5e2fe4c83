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
        assert_eq!(s["env_file"].as_str(), Some(".env"), "{name} reads .env");
        assert_eq!(s["restart"].as_str(), Some("unless-stopped"));
    }
}

#[test]
fn the_sidecar_carries_the_claim_and_reads_the_host_nic() {
    let c = compose();
    let sidecar = &c["services"]["k2-sidecar"];
    assert!(strings(&sidecar["environment"]).contains(&"K2_PRIVATE_CLAIM=${K2_PRIVATE_CLAIM:-}".to_string()));
    assert!(strings(&sidecar["volumes"]).contains(&"/proc/net/dev:/host/proc/net/dev:ro".to_string()));
    let k2s = &c["services"]["k2s"];
    assert!(strings(&k2s["volumes"]).iter().any(|v| v.starts_with("./users:") && v.ends_with(":ro")), "users file mounted");
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
        "ID:-}\" = ubuntu",
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
