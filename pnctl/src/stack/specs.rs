//! What each child of the stack is: program, arguments, environment (its secrets apart), log,
//! ports and health check — nats-server's config and authorization, center-sim, pn-ingress and
//! the five services.

use std::fs::{self};

use anyhow::Context;
use secrecy::SecretString;


use super::*;

pub(super) fn build_specs(layout: &Layout, secrets: &Secrets, ports: &Ports) -> anyhow::Result<Vec<ChildSpec>> {
    let nats_conf = layout.nats.join("nats.conf");
    // One identity per service and the operator's, no anonymous client (kit::nats_auth); the
    // passwords reach nats-server through its environment, never this file.
    fs::write(
        &nats_conf,
        format!(
            "# written by pnctl up\n{}",
            kit::nats_auth::server_config(&format!("127.0.0.1:{}", ports.nats), &layout.nats.join("js"), &kit::nats_auth::all())
        ),
    )
    .with_context(|| format!("write {}", nats_conf.display()))?;
    let nats_passwords: Vec<(String, SecretString)> =
        secrets.nats.iter().map(|(user, pw)| (kit::nats_auth::password_var(user), pw.clone())).collect();
    let nats_url = format!("nats://127.0.0.1:{}", ports.nats);
    let center_url = format!("http://127.0.0.1:{}", ports.center);
    let meter_url = format!("http://127.0.0.1:{}", ports.meter);
    let ingress_url = format!("http://127.0.0.1:{}", ports.ingress);

    let mut specs = vec![
        ChildSpec {
            name: NATS.into(),
            program: find_nats_server()?,
            args: vec!["-c".into(), nats_conf.display().to_string()],
            env: vec![],
            secret_env: nats_passwords,
            log: layout.log(NATS),
            ports: vec![(ports.nats, "nats".into())],
            health: Health::Tcp(ports.nats),
        },
        ChildSpec {
            name: CENTER_SIM.into(),
            program: find_bin(CENTER_SIM)?,
            args: vec![
                "--listen".into(),
                format!("127.0.0.1:{}", ports.center),
                "--data-dir".into(),
                layout.sim.display().to_string(),
                // The claims hand the nodes the ingress's URL: their reports pass it, and it
                // mirrors them to the meter.
                "--public-url".into(),
                ingress_url.clone(),
                "--admin-public-key-file".into(),
                secrets.admin_pub.display().to_string(),
                "--ssh-port-fresh".into(),
                ports.ssh_fresh.to_string(),
                "--ssh-port-hardened".into(),
                ports.ssh_hardened.to_string(),
            ],
            env: vec![("PN_LOG_FORMAT".into(), "json".into())],
            secret_env: vec![("PN_CENTER_TOKEN".into(), secrets.center_token.clone())],
            log: layout.log(CENTER_SIM),
            ports: vec![(ports.center, "center-sim".into())],
            health: Health::Http(vec![format!("{center_url}/admin/faults")]),
        },
        ChildSpec {
            name: INGRESS.into(),
            program: find_bin(INGRESS)?,
            args: vec![
                "--listen".into(),
                format!("127.0.0.1:{}", ports.ingress),
                "--upstream".into(),
                center_url.clone(),
                "--mirror".into(),
                meter_url.clone(),
            ],
            env: vec![("PN_LOG_FORMAT".into(), "json".into())],
            secret_env: vec![],
            log: layout.log(INGRESS),
            ports: vec![(ports.ingress, "pn-ingress".into())],
            // Forwarded to center-sim: the router and what is behind it answer.
            health: Health::Http(vec![format!("{ingress_url}/healthz"), format!("{ingress_url}/_pn_ingress/stats")]),
        },
    ];
    for name in SERVICES {
        let ops_port = ports.ops.get(name).copied().unwrap_or(0);
        let ops_url = format!("http://127.0.0.1:{ops_port}");
        let mut env: Vec<(String, String)> = vec![
            ("PN_NATS_URL".into(), nats_url.clone()),
            ("PN_NATS_USER".into(), name.to_string()),
            ("PN_CENTER_URL".into(), center_url.clone()),
            ("PN_DATA_DIR".into(), layout.data.display().to_string()),
            ("PN_OPS_LISTEN".into(), format!("127.0.0.1:{ops_port}")),
            ("PN_LOG_FORMAT".into(), "json".into()),
        ];
        let mut health = vec![format!("{ops_url}/readyz")];
        let mut listen = vec![(ops_port, format!("{name} ops"))];
        let ssh = || {
            vec![
                ("PN_SSH__ADMIN_KEYS".to_string(), format!("sim-lightsail={}", secrets.admin_key.display())),
                ("PN_SSH__FRESH_PORT".to_string(), ports.ssh_fresh.to_string()),
                ("PN_SSH__HARDENED_PORT".to_string(), ports.ssh_hardened.to_string()),
            ]
        };
        match name {
            "svc-claimer" => env.push(("PN_POLL_INTERVAL_MS".into(), "500".into())),
            "svc-cloud" => env.push(("PN_REAP_GRACE_MS".into(), "5000".into())),
            "svc-deployer" => env.extend(ssh()),
            "svc-verifier" => {
                env.extend(ssh());
                env.push(("PN_DEADLINE_MS".into(), "120000".into()));
            }
            "svc-meter" => {
                env.push(("PN_LISTEN".into(), format!("127.0.0.1:{}", ports.meter)));
                env.push(("PN_INTERNAL_LISTEN".into(), format!("127.0.0.1:{}", ports.meter_internal)));
                listen.push((ports.meter_internal, "svc-meter internal".into()));
                env.push(("PN_USAGE_INTERVAL_MS".into(), "2000".into()));
                health.push(format!("{meter_url}/healthz"));
                listen.push((ports.meter, "svc-meter ingest".into()));
            }
            _ => {}
        }
        // Each service's own NATS password; the seal key only where something is sealed or
        // unsealed; the meter's internal token only in the meter.
        let mut secret_env = vec![
            ("PN_CENTER_TOKEN".to_string(), secrets.center_token.clone()),
            ("PN_NATS_PASSWORD".to_string(), secrets.nats_password(name)?),
        ];
        if SEAL_KEY_USERS.contains(&name) {
            secret_env.push(("PN_SEAL_KEY".into(), secrets.seal_key.clone()));
        }
        if name == "svc-meter" {
            secret_env.push(("PN_INTERNAL_TOKEN".into(), secrets.meter_internal_token.clone()));
        }
        // The operator token only where a mutating ops route is (reap confirm, abandon).
        if kit::ops::OPS_TOKEN_USERS.contains(&name) {
            secret_env.push(("PN_OPS_TOKEN".into(), secrets.ops_token.clone()));
        }
        specs.push(ChildSpec {
            name: name.into(),
            program: find_bin(name)?,
            args: vec![],
            env,
            secret_env,
            log: layout.log(name),
            ports: listen,
            health: Health::Http(health),
        });
    }
    Ok(specs)
}
