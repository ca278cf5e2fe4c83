//! Who may do what on the bus (DESIGN.md, "Safety rules" → Least privilege): one NATS identity
//! per service, allowed to publish only the subjects it owns and to use only its own durable
//! consumers; the operator's identity (`pnctl`, the `nats` CLI) for replays and JetStream
//! administration; no anonymous connection.
//!
//! This table is the one source of every nats-server `authorization` block: the dev stack's
//! (`pnctl up`), the tests' (`testkit`), and the committed `deploy/nats/auth.conf` and
//! `deploy/k8s/base/nats/auth.conf` (`testkit/tests/deploy_manifests.rs` holds them to
//! [`authorization_block`]). No password is ever written into a configuration: each user's
//! password is `$PN_NATS_PW_<USER>`, which nats-server resolves from its own environment when it
//! starts (and refuses to start when one is missing).
//!
//! What a service may publish (allow-lists; everything else is refused by the server):
//! - its own events (`pn.op.claimed.>` for svc-claimer, …; `pn.op.failed.>` for the stages
//!   whose consumer loop fails operations: svc-cloud, svc-deployer, svc-verifier — and for
//!   svc-claimer, whose consumers only report and never fail anything, for the one failure an
//!   operator asks for: `pnctl ops abandon`, after Center says the operation is not activated);
//! - for each of its durable consumers, and no other: `CONSUMER.CREATE` with the durable's name
//!   and filter in the subject (JetStream checks that they match the request), `CONSUMER.INFO`,
//!   `CONSUMER.MSG.NEXT` (fetch) and `$JS.ACK.<stream>.<durable>.>` (ack, nak, progress, term);
//!   never `CONSUMER.DELETE`;
//! - `STREAM.INFO` of the three streams (readiness) and `STREAM.CREATE` of the three streams:
//!   a create succeeds only when the stream does not exist yet (the same name with any other
//!   configuration is refused by JetStream), so a service can bring up a fresh bus but cannot
//!   change, purge or delete a stream — updates, deletes and purges need the operator;
//! - svc-verifier reads single messages of `PN_METER` (`STREAM.MSG.GET`, the latest
//!   `meter.usage.<node>`); svc-claimer those of `PN_OPS` (the latest `pn.op.claimed.<op>`, so
//!   any replica serves a claim replay or an abandon of an operation another replica claimed).
//!
//! A service subscribes only to its own reply inbox, `_INBOX_<user>.>` ([`inbox_prefix`];
//! `kit::bus::Bus::connect_as` sets that prefix), so no service sees another's fetched messages
//! or API answers. Streams and consumers: the service that owns a durable creates it (its shape
//! — ack wait, delivery limit, pending limit — comes from the service's own settings), as
//! narrowly as the JetStream API subjects allow (its name and filter); the operator (setup)
//! identity alone can update, purge or delete streams and delete consumers.

use proto::{Stage, subjects};

/// The operator's identity: `pnctl` (tail, status, replay, demo, benches) and the `nats` CLI.
pub const OPERATOR: &str = "pn-operator";

/// The five services, in pipeline order.
pub const SERVICES: [&str; 5] = ["svc-claimer", "svc-cloud", "svc-deployer", "svc-verifier", "svc-meter"];

/// A durable consumer an identity owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durable {
    pub stream: &'static str,
    pub name: String,
    pub filter: String,
}

impl Durable {
    fn ops(name: &str, event: &str) -> Durable {
        Durable { stream: subjects::OPS_STREAM, name: name.to_string(), filter: subjects::op_filter(event) }
    }

    /// `<service>-replay` on `pn.replay.<stage>` (`kit::bus::ConsumerSpec::replay`).
    fn replay(service: &str, stage: Stage) -> Durable {
        Durable { stream: subjects::REPLAY_STREAM, name: format!("{service}-replay"), filter: subjects::replay(stage) }
    }
}

/// One NATS user and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    /// Message subjects it may publish (its events).
    pub publishes: Vec<String>,
    /// The durable consumers it creates and reads.
    pub durables: Vec<Durable>,
    /// Further JetStream API subjects it needs (without the `$JS.API.` prefix).
    pub api: Vec<String>,
    /// Publish and subscribe anything (the test harness's own identity, never a service's).
    pub unrestricted: bool,
}

/// The reply-inbox prefix of `user`: `_INBOX_<user>` (what it may subscribe to).
pub fn inbox_prefix(user: &str) -> String {
    format!("_INBOX_{user}")
}

/// The environment variable nats-server reads `user`'s password from:
/// `PN_NATS_PW_<USER>` (upper case, `-` → `_`).
pub fn password_var(user: &str) -> String {
    let u: String = user.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("PN_NATS_PW_{u}")
}

impl Identity {
    fn service(user: &str, publishes: &[String], durables: Vec<Durable>) -> Identity {
        Identity { user: user.to_string(), publishes: publishes.to_vec(), durables, api: Vec::new(), unrestricted: false }
    }

    /// An identity allowed everything: only for a test harness that forges events on purpose.
    pub fn unrestricted(user: &str) -> Identity {
        Identity { user: user.to_string(), publishes: vec![">".into()], durables: Vec::new(), api: Vec::new(), unrestricted: true }
    }

    /// Every subject this identity may publish to, in a stable order.
    pub fn publish_allow(&self) -> Vec<String> {
        if self.unrestricted {
            return vec![">".into()];
        }
        let mut v = self.publishes.clone();
        if self.user == OPERATOR {
            return v;
        }
        for s in [subjects::OPS_STREAM, subjects::REPLAY_STREAM, subjects::METER_STREAM] {
            v.push(format!("$JS.API.STREAM.INFO.{s}"));
        }
        for s in [subjects::OPS_STREAM, subjects::REPLAY_STREAM, subjects::METER_STREAM] {
            v.push(format!("$JS.API.STREAM.CREATE.{s}"));
        }
        for d in &self.durables {
            v.push(format!("$JS.API.CONSUMER.CREATE.{}.{}.{}", d.stream, d.name, d.filter));
            v.push(format!("$JS.API.CONSUMER.INFO.{}.{}", d.stream, d.name));
            v.push(format!("$JS.API.CONSUMER.MSG.NEXT.{}.{}", d.stream, d.name));
            v.push(format!("$JS.ACK.{}.{}.>", d.stream, d.name));
        }
        v.extend(self.api.iter().map(|a| format!("$JS.API.{a}")));
        v
    }

    /// Every subject this identity may subscribe to.
    pub fn subscribe_allow(&self) -> Vec<String> {
        if self.unrestricted || self.user == OPERATOR { vec![">".into()] } else { vec![format!("{}.>", inbox_prefix(&self.user))] }
    }

    /// This identity's block in the server's `authorization.users` list.
    fn render(&self) -> String {
        let list = |v: Vec<String>| v.iter().map(|s| format!("            \"{s}\"\n")).collect::<String>();
        format!(
            "    {{\n      user: \"{user}\"\n      password: ${var}\n      permissions: {{\n        publish: {{\n          allow: [\n{p}          ]\n        }}\n        subscribe: {{\n          allow: [\n{s}          ]\n        }}\n      }}\n    }}\n",
            user = self.user,
            var = password_var(&self.user),
            p = list(self.publish_allow()),
            s = list(self.subscribe_allow()),
        )
    }
}

/// The five services' identities (user = service name).
pub fn services() -> Vec<Identity> {
    let ev = |e: &str| subjects::op_filter(e);
    let mut ids = vec![
        Identity::service(
            "svc-claimer",
            // failed: only an operator's abandon (svc-claimer's `operator.rs`).
            &[ev(subjects::CLAIMED), ev(subjects::FAILED)],
            vec![
                Durable::ops("svc-claimer-instance", subjects::INSTANCE),
                Durable::ops("svc-claimer-failed", subjects::FAILED),
                Durable::ops("svc-claimer-verified", subjects::VERIFIED),
                Durable::replay("svc-claimer", Stage::Claim),
            ],
        ),
        Identity::service(
            "svc-cloud",
            &[ev(subjects::INSTANCE), ev(subjects::FAILED)],
            vec![
                Durable::ops("svc-cloud-claimed", subjects::CLAIMED),
                Durable::ops("svc-cloud-failed", subjects::FAILED),
                // The deployer's requests to replace a broken instance (seed 001 §3.f).
                Durable::ops("svc-cloud-rebuild", subjects::REBUILD),
                Durable::replay("svc-cloud", Stage::Cloud),
            ],
        ),
        Identity::service(
            "svc-deployer",
            &[ev(subjects::DEPLOYED), ev(subjects::FAILED), ev(subjects::REBUILD)],
            vec![Durable::ops("svc-deployer-instance", subjects::INSTANCE), Durable::replay("svc-deployer", Stage::Deploy)],
        ),
        {
            let mut v = Identity::service(
                "svc-verifier",
                &[ev(subjects::VERIFIED), ev(subjects::DEGRADED), ev(subjects::FAILED)],
                vec![Durable::ops("svc-verifier-deployed", subjects::DEPLOYED), Durable::replay("svc-verifier", Stage::Verify)],
            );
            // The latest meter.usage.<node> (the first non-zero usage check).
            v.api.push(format!("STREAM.MSG.GET.{}", subjects::METER_STREAM));
            v
        },
        Identity::service(
            "svc-meter",
            &["meter.usage.>".into(), "meter.quota.>".into()],
            vec![Durable::ops("svc-meter-deployed", subjects::DEPLOYED)],
        ),
    ];
    // The latest pn.op.claimed.<op> (a claim replay or an abandon served by any replica).
    ids[0].api.push(format!("STREAM.MSG.GET.{}", subjects::OPS_STREAM));
    ids
}

/// The stages an operator may replay: `pn.replay.<stage>` for these, and no other subject —
/// `pn.replay.meter` is refused by the server (the meter's ledger is the record, not a stream
/// to re-run; `pnctl ledger` reads it).
pub const REPLAY_STAGES: [Stage; 4] = [Stage::Claim, Stage::Cloud, Stage::Deploy, Stage::Verify];

/// The operator: replays (`pn.replay.<stage>` of [`REPLAY_STAGES`]), the whole JetStream API (streams, consumers, message
/// reads: `pnctl tail/status/demo`, stream updates, purges), acks of its own consumers, and
/// subscribing to anything. It cannot publish pipeline events (`pn.op.>`, `meter.>`).
pub fn operator() -> Identity {
    Identity {
        user: OPERATOR.to_string(),
        publishes: REPLAY_STAGES.iter().map(|s| subjects::replay(*s)).chain(["$JS.API.>".to_string(), "$JS.ACK.>".to_string()]).collect(),
        durables: Vec::new(),
        api: Vec::new(),
        unrestricted: false,
    }
}

/// The services and the operator: every identity of a deployment.
pub fn all() -> Vec<Identity> {
    let mut v = services();
    v.push(operator());
    v
}

/// The identity of `user` among [`all`].
pub fn identity(user: &str) -> Option<Identity> {
    all().into_iter().find(|i| i.user == user)
}

/// The nats-server `authorization` block for `ids`: users with passwords from the environment
/// and their permissions; no `no_auth_user`, so a client without credentials is refused.
pub fn authorization_block(ids: &[Identity]) -> String {
    let mut s = String::from(
        "# Generated by kit::nats_auth (kit/src/nats_auth.rs); do not edit by hand — the manifests\n\
         # test compares this text with the code. Every password comes from nats-server's\n\
         # environment ($PN_NATS_PW_<USER>); there is no no_auth_user: no anonymous client.\n\
         authorization {\n  users = [\n",
    );
    for i in ids {
        s.push_str(&i.render());
    }
    s.push_str("  ]\n}\n");
    s
}

/// A whole one-server configuration: clients on `listen`, JetStream on `store_dir` with an
/// fsync before every ack, and the authorization of `ids`. What `pnctl up` writes for the dev
/// stack and `testkit::Nats` for the tests (the passwords go into nats-server's environment,
/// [`password_var`]).
pub fn server_config(listen: &str, store_dir: &std::path::Path, ids: &[Identity]) -> String {
    format!(
        "listen: {listen}\nmax_payload: 1MB\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n{}",
        store_dir.display(),
        authorization_block(ids)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_has_an_identity_with_its_own_inbox() {
        let ids = services();
        assert_eq!(ids.iter().map(|i| i.user.as_str()).collect::<Vec<_>>(), SERVICES.to_vec());
        for i in &ids {
            assert_eq!(i.subscribe_allow(), vec![format!("_INBOX_{}.>", i.user)]);
            let p = i.publish_allow();
            assert!(!p.iter().any(|s| s == ">" || s.starts_with("$JS.API.>") || s.contains("DELETE") || s.contains("UPDATE")), "{p:?}");
            assert!(!p.iter().any(|s| s.starts_with("pn.replay")), "only the operator replays: {p:?}");
            for d in &i.durables {
                assert!(d.name.starts_with(&i.user), "{} owns only its own durables: {}", i.user, d.name);
            }
        }
        // The claimer's consumers only report (kit's reports-only loop publishes nothing); it
        // publishes a failure only for an operator's abandon, and reads PN_OPS's claims.
        let claimer = &ids[0];
        let p = claimer.publish_allow();
        assert!(p.iter().any(|s| s == "pn.op.failed.>") && p.iter().any(|s| s == "$JS.API.STREAM.MSG.GET.PN_OPS"), "{p:?}");
        let meter = &ids[4];
        assert!(!meter.publish_allow().iter().any(|s| s.starts_with("pn.op.")), "the meter publishes no pipeline event");
    }

    #[test]
    fn the_operator_replays_and_administers_but_publishes_no_event() {
        let op = operator();
        let p = op.publish_allow();
        for s in ["claim", "cloud", "deploy", "verify"] {
            assert!(p.contains(&format!("pn.replay.{s}")), "{p:?}");
        }
        assert!(p.contains(&"$JS.API.>".to_string()));
        assert!(!p.iter().any(|s| s == "pn.replay.>" || s == "pn.replay.meter"), "no replay of the meter: {p:?}");
        assert!(!p.iter().any(|s| s.starts_with("pn.op") || s.starts_with("meter") || s == ">"), "{p:?}");
    }

    #[test]
    fn the_block_names_every_user_and_no_password() {
        let b = authorization_block(&all());
        for i in all() {
            assert!(b.contains(&format!("user: \"{}\"", i.user)));
            assert!(b.contains(&format!("password: ${}", password_var(&i.user))));
        }
        assert!(!b.lines().any(|l| l.trim_start().starts_with("no_auth_user")));
        assert_eq!(password_var("svc-claimer"), "PN_NATS_PW_SVC_CLAIMER");
    }
}
