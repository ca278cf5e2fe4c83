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
fn compose_defines_both_services_pinned_by_digest() {
    let c = compose();
    let services = c["services"].as_mapping().unwrap();
    let names: Vec<&str> = services.keys().filter_map(Value::as_str).collect();
    assert_eq!(names, vec!["k2s", "k2-sidecar"]);
    for name in names {
        let s = &c["services"][name];
        assert_eq!(s["container_name"].as_str(), Some(name), "container_name of {name}");
        let image = s["image"].as_str().unwrap();
        // `<repo>:${K2_VERSION…}@sha256:<64 hex>`: the release named by the variable, the
        // image fixed by its digest (issue 18 item 5).
        let (named, digest) = image.rsplit_once('@').unwrap_or_else(|| panic!("{name}: image {image} is not pinned by digest"));
        let hex = digest.strip_prefix("sha256:").unwrap_or_else(|| panic!("{name}: {digest} is not a sha256 digest"));
        assert!(hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{name}: digest {digest}");
        let (repo, tag) = named.split_once(':').unwrap();
        assert!(!repo.is_empty() && !repo.contains('$'), "{name}: image {image}");
        assert!(tag.starts_with("${K2_VERSION") && tag.ends_with('}') && tag.matches('}').count() == 1, "{name}: image {image} must name its release by K2_VERSION");
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

/// Every `image:` line of the compose file, as written (not parsed: a comment or an anchor
/// cannot hide one), is pinned by digest, and the deployer's reading of the pins agrees.
#[test]
fn every_image_line_is_pinned_by_digest() {
    let text = svc_deployer::stack::DOCKER_COMPOSE_YML;
    let lines: Vec<&str> = text.lines().filter(|l| l.trim_start().starts_with("image:")).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for l in &lines {
        let digest = l.rsplit_once("@sha256:").map(|(_, d)| d.trim()).unwrap_or_else(|| panic!("not pinned by digest: {l}"));
        assert!(digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()), "{l}");
    }
    let pins = svc_deployer::stack::pins(text);
    assert_eq!(pins.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(), ["kaitu/k2s", "kaitu/k2-sidecar"]);
    // Another release needs its digests for every image; with them the shipped file is re-pinned.
    let mut s = svc_deployer::settings::Settings { k2_version: "1.7.0".into(), ..Default::default() };
    assert!(s.validate().unwrap_err().0.contains("k2_images"), "another release without its digests");
    let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
    s.k2_images = format!("kaitu/k2s@{},kaitu/k2-sidecar@{}", d('a'), d('b'));
    s.validate().unwrap();
    let images = svc_deployer::stack::parse_images(&s.k2_images).unwrap();
    let stack = svc_deployer::stack::Stack::load(None, &images).unwrap();
    let shipped = String::from_utf8(stack.files[0].1.clone()).unwrap();
    assert_eq!(svc_deployer::stack::pins(&shipped), vec![("kaitu/k2s".to_string(), d('a')), ("kaitu/k2-sidecar".to_string(), d('b'))]);
    s.k2_images = format!("kaitu/k2s@{}", d('a'));
    assert!(s.validate().is_err(), "one image re-pinned, the other left on the old release");
}

/// Issue 18 item 5: after the prep root may not log in, and the node keeps an admin.
#[test]
fn the_prep_forbids_root_logins_and_keeps_an_admin() {
    let text = svc_deployer::stack::PROVISION_NODE_SH;
    let dropin = text.split("write_if_changed \"$SSHD_DROPIN\"").nth(1).and_then(|t| t.split("\nEOF\n").next()).unwrap();
    assert!(dropin.lines().any(|l| l == "PermitRootLogin no"), "the hardening drop-in:\n{dropin}");
    assert!(dropin.contains("PasswordAuthentication no"));
    assert!(!text.contains("PermitRootLogin yes") && !text.contains("PermitRootLogin prohibit-password"));
    // The admin is made (or found) before sshd is touched, so a failure there locks no one out.
    let harden = text.split("\nharden_ssh() {").nth(1).unwrap();
    let (admin, sshd) = (harden.find("ensure_admin_user").unwrap(), harden.find("SSHD_BACKUP=$(mktemp)").unwrap());
    assert!(admin < sshd, "ensure_admin_user must run before the sshd configuration changes");
    assert!(text.contains(&format!("ADMIN_USER=${{PN_ADMIN_USER:-{}}}", kit::cloud::ADMIN_USER)), "the prep's admin is Pnp's ADMIN_USER");
    assert!(text.contains("NOPASSWD:ALL") && text.contains("visudo -cqf"), "passwordless sudo, checked by visudo");
    assert!(text.contains("/root/.ssh/authorized_keys ] || die"), "no key for the admin: stop before locking root out");
}

/// The body of shell function `name` in provision-node.sh (its lines up to the closing `}`).
fn shell_function(name: &str) -> String {
    let text = svc_deployer::stack::PROVISION_NODE_SH;
    let start = text.find(&format!("\n{name}() {{\n")).unwrap_or_else(|| panic!("no function {name}"));
    let rest = &text[start + 1..];
    let end = rest.find("\n}\n").unwrap();
    rest[..end + 3].to_string()
}

/// Docker's apt key is trusted only with Docker's published fingerprint; a mismatch stops the
/// prep before anything is installed from Docker's repository. Run for real with gpg: a key
/// that is not Docker's is refused; the same check passes for a key whose fingerprint it is
/// told (so it reads the primary key's fingerprint, not a subkey's or nothing).
#[test]
fn dockers_apt_key_is_checked_against_its_fingerprint() {
    let text = svc_deployer::stack::PROVISION_NODE_SH;
    assert!(text.contains("readonly DOCKER_KEY_FINGERPRINT=9DC858229FC7DD38854AE2D88D81803C0EBFCD88"));
    let ce = shell_function("install_docker_ce");
    let (check, mv) = (ce.find("if ! docker_key_ok \"${keyring}.tmp\"; then").unwrap(), ce.find("mv \"${keyring}.tmp\" \"$keyring\"").unwrap());
    assert!(check < mv, "the downloaded key is checked before it becomes the keyring");
    assert!(ce[check..mv].contains("die \""), "a mismatch is fatal");
    assert!(ce.contains("docker_key_ok \"$keyring\" || die"), "a keyring already there is checked too");
    assert!(ce.find("docker_key_ok \"$keyring\" || die").unwrap() < ce.find("apt-get \"${APT_OPTS[@]}\" install docker-ce").unwrap());

    let Some(gpg) = testkit::which("gpg") else { panic!("gpg is not installed (apt-get install gnupg)") };
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("gnupg");
    std::fs::create_dir(&home).unwrap();
    std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let made = Command::new(&gpg)
        .env("GNUPGHOME", &home)
        .args(["--batch", "--passphrase", "", "--quick-gen-key", "Not Docker <not-docker@example.invalid>", "ed25519", "sign,cert", "never"])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let sub = Command::new(&gpg).env("GNUPGHOME", &home).args(["--batch", "--with-colons", "--list-keys"]).output().unwrap();
    let colons = String::from_utf8_lossy(&sub.stdout).into_owned();
    let fpr = colons.lines().find(|l| l.starts_with("fpr:")).and_then(|l| l.split(':').nth(9)).unwrap().to_string();
    let add = Command::new(&gpg).env("GNUPGHOME", &home).args(["--batch", "--passphrase", "", "--quick-add-key", &fpr, "cv25519", "encr", "never"]).output().unwrap();
    assert!(add.status.success(), "{}", String::from_utf8_lossy(&add.stderr));
    let key = dir.path().join("key.asc");
    let exp = Command::new(&gpg).env("GNUPGHOME", &home).args(["--batch", "--armor", "--export", &fpr]).output().unwrap();
    std::fs::write(&key, &exp.stdout).unwrap();
    let check = |expected: &str| {
        let script = format!("set -u\nDOCKER_KEY_FINGERPRINT={expected}\n{}\ndocker_key_ok \"$1\"\n", shell_function("docker_key_ok"));
        Command::new("bash").arg("-c").arg(script).arg("check").arg(&key).status().unwrap().success()
    };
    assert!(!check("9DC858229FC7DD38854AE2D88D81803C0EBFCD88"), "a key that is not Docker's passed");
    assert!(check(&fpr), "the check did not read the key's own fingerprint");
    std::fs::write(&key, b"not a key").unwrap();
    assert!(!check(&fpr), "garbage passed");
}

/// provision-node.sh's OS gate, run for real (its `preflight` with an os-release file of each
/// release): Ubuntu 20.04–24.04 and Debian 12/13 go on, with either Docker source, and name
/// their codename; older releases, other distributions and an unknown Docker source stop.
#[test]
fn the_prep_accepts_ubuntu_and_debian_releases_and_refuses_others() {
    let dir = tempfile::tempdir().unwrap();
    let os_release = dir.path().join("os-release");
    let func = |name: &str| shell_function(name);
    let lib = ["log", "warn", "die", "step"]
        .iter()
        .map(|f| {
            let text = svc_deployer::stack::PROVISION_NODE_SH;
            text.lines().find(|l| l.starts_with(&format!("{f}() {{"))).unwrap_or_else(|| panic!("no one-line {f}()")).to_string()
        })
        .collect::<Vec<_>>()
        .join("\n");
    let preflight = func("preflight").replace("/etc/os-release", &os_release.display().to_string());
    let run = |release: &str, source: &str| {
        std::fs::write(&os_release, release).unwrap();
        let script = format!("set -Eeuo pipefail\nSTEP=0\nDOCKER_SOURCE={source}\n{lib}\n{preflight}\npreflight\necho \"codename=$CODENAME os=$OS_ID\"\n");
        let out = Command::new("bash").arg("-c").arg(script).output().unwrap();
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let ubuntu = |v: &str, c: &str| format!("ID=ubuntu\nVERSION_ID=\"{v}\"\nVERSION_CODENAME={c}\nUBUNTU_CODENAME={c}\nPRETTY_NAME=\"Ubuntu {v}\"\n");
    let debian = |v: &str, c: &str| format!("ID=debian\nVERSION_ID=\"{v}\"\nVERSION_CODENAME={c}\nPRETTY_NAME=\"Debian {v}\"\n");
    for (release, codename) in [
        (ubuntu("20.04", "focal"), "focal"),
        (ubuntu("22.04", "jammy"), "jammy"),
        (ubuntu("24.04", "noble"), "noble"),
        (debian("12", "bookworm"), "bookworm"),
        (debian("13", "trixie"), "trixie"),
    ] {
        for source in ["docker", "distro"] {
            let (ok, out) = run(&release, source);
            assert!(ok && out.contains(&format!("codename={codename}")), "{codename} with {source}: {out}");
        }
    }
    for (release, why) in [
        (ubuntu("18.04", "bionic"), "too old"),
        (debian("11", "bullseye"), "too old"),
        ("ID=centos\nVERSION_ID=\"9\"\nPRETTY_NAME=\"CentOS Stream 9\"\n".to_string(), "Ubuntu (20.04-24.04) or Debian (12, 13) only"),
        ("ID=debian\nVERSION_ID=\"12\"\n".to_string(), "codename"),
    ] {
        let (ok, out) = run(&release, "docker");
        assert!(!ok && out.contains(why), "{release:?} went on: {out}");
    }
    let (ok, out) = run(&debian("12", "bookworm"), "snap");
    assert!(!ok && out.contains("--docker must be docker"), "{out}");
    // A release between the tested ones goes on with a warning.
    let (ok, out) = run(&ubuntu("23.10", "mantic"), "docker");
    assert!(ok && out.contains("not one of the tested releases"), "{out}");
}

/// Docker from the distribution (`--docker=distro`) needs its compose v2 plugin, and the prep
/// picks the package by what apt offers (its `candidate` faked here with each release's
/// versions): Ubuntu's docker-compose-v2 (20.04 to 24.04 have it, in universe), Debian 13's
/// docker-compose 2.x; Debian 12 has only the Python docker-compose 1.29, so there is none and
/// the prep stops in its preflight (run for real on Debian 12 by node_vm, PN_VM_SUITE=bookworm).
#[test]
fn the_distro_docker_path_takes_compose_v2_or_refuses() {
    let pick = |candidates: &str| {
        let fake = format!("candidate() {{ case \"$1\" in {candidates} *) ;; esac; }}");
        let script = format!("set -Eeuo pipefail\n{fake}\n{}\ndistro_compose_package\n", shell_function("distro_compose_package"));
        let out = Command::new("bash").arg("-c").arg(script).output().unwrap();
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    // Versions as the releases' archives list them.
    let ubuntu = "docker-compose-v2) echo 2.24.6+ds1-0ubuntu1~22.04.1 ;; docker-compose) echo 1.29.2-1 ;;";
    let debian13 = "docker-compose) echo 2.26.1-4 ;;";
    let debian12 = "docker-compose) echo 1.29.2-3 ;;";
    assert_eq!(pick(ubuntu).as_deref(), Some("docker-compose-v2"));
    assert_eq!(pick(debian13).as_deref(), Some("docker-compose"));
    assert_eq!(pick("docker-compose) echo 1:2.30.0-1 ;;").as_deref(), Some("docker-compose"), "an epoch is not the major version");
    assert_eq!(pick(debian12), None, "Debian 12's docker-compose 1.29 (Python) has no `docker compose`");
    assert_eq!(pick(""), None, "no compose package at all");
    // The check runs before any step changes anything, after cloud-init is done (its apt-get
    // update would race cloud-init for apt's lists lock).
    let main = shell_function("main");
    let at = |name: &str| main.find(name).unwrap();
    assert!(at("flock 8") < at("wait_for_boot") && at("wait_for_boot") < at("check_docker_source"), "{main}");
    assert!(at("check_docker_source") < at("set_timezone"), "{main}");
}
