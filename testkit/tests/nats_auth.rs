//! Issue #18, least privilege on the bus, against a real nats-server running the configuration
//! the dev stack runs (`kit::nats_auth::server_config`, what `pnctl up` and `testkit::Nats`
//! write): no anonymous client; every service's identity publishes only the subjects it owns
//! and touches only its own durable consumers; the JetStream API is the operator's.
//!
//! The positive side — every service can still do its whole job under these permissions — is
//! every stack test (they all run with them); `every_identity_may_publish_what_it_owns` is the
//! direct check here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use kit::bus::Bus;
use kit::nats_auth;
use proto::subjects;
use testkit::Nats;

/// What each identity owns, written out here independently of `kit::nats_auth` (so a change to
/// that table that widens a permission fails this test): event kinds under `pn.op.`, and
/// `meter.usage` / `meter.quota`.
const OWNS: [(&str, &[&str]); 6] = [
    ("svc-claimer", &["pn.op.claimed", "pn.op.failed"]),
    ("svc-cloud", &["pn.op.instance", "pn.op.failed"]),
    ("svc-deployer", &["pn.op.deployed", "pn.op.failed", "pn.op.rebuild"]),
    ("svc-verifier", &["pn.op.verified", "pn.op.degraded", "pn.op.failed"]),
    ("svc-meter", &["meter.usage", "meter.quota"]),
    ("pn-operator", &["pn.replay.claim", "pn.replay.cloud", "pn.replay.deploy", "pn.replay.verify"]),
];

/// Every message subject of the pipeline, one per kind (the last token is an operation id or a
/// node name).
fn all_subjects() -> Vec<String> {
    let mut v: Vec<String> = ["claimed", "instance", "deployed", "verified", "failed", "degraded", "rebuild"]
        .iter()
        .map(|e| subjects::op_event(e, "op-forged"))
        .collect();
    // pn.replay.meter: no one may publish it (the meter has no replay; its ledger is the record).
    v.extend(["claim", "cloud", "deploy", "verify", "meter"].iter().map(|s| format!("pn.replay.{s}")));
    v.push(subjects::meter_usage("pn-forged"));
    v.push(subjects::meter_quota("pn-forged"));
    v
}

fn owns(user: &str, subject: &str) -> bool {
    OWNS.iter().find(|(u, _)| *u == user).is_some_and(|(_, own)| own.iter().any(|o| subject == *o || subject.starts_with(&format!("{o}."))))
}

/// A raw client logged in as `user` (its reply inbox is its own, as `Bus::connect_as` sets
/// it) that records every error the server reports on the connection.
async fn raw_client(nats: &Nats, user: &str) -> (async_nats::Client, Arc<Mutex<Vec<String>>>) {
    let errors = Arc::new(Mutex::new(Vec::new()));
    let sink = errors.clone();
    let client = async_nats::ConnectOptions::new()
        .user_and_password(user.to_string(), nats.password(user).unwrap())
        .custom_inbox_prefix(nats_auth::inbox_prefix(user))
        .event_callback(move |e| {
            let sink = sink.clone();
            async move {
                if let async_nats::Event::ServerError(e) = e {
                    sink.lock().unwrap().push(e.to_string().to_lowercase());
                }
            }
        })
        .connect(nats.plain_url())
        .await
        .unwrap_or_else(|e| panic!("{user} cannot log in: {e}"));
    (client, errors)
}

async fn violations_settle(errors: &Arc<Mutex<Vec<String>>>, want: usize) -> Vec<String> {
    let _ = testkit::eventually("permission violations reported", Duration::from_secs(10), || async {
        (errors.lock().unwrap().iter().filter(|e| e.contains("permissions violation")).count() >= want).then_some(())
    })
    .await;
    errors.lock().unwrap().clone()
}

async fn harness(nats: &Nats) -> Bus {
    let bus = Bus::connect(&nats.url(), "test", Duration::from_secs(10)).await.unwrap();
    bus.apply_streams_with(1).await.unwrap();
    bus
}

/// How many messages a stream holds on exactly `subject`.
async fn count_on(bus: &Bus, subject: &str) -> u64 {
    let stream = if subject.starts_with("pn.op.") {
        subjects::OPS_STREAM
    } else if subject.starts_with("pn.replay.") {
        subjects::REPLAY_STREAM
    } else {
        subjects::METER_STREAM
    };
    let mut s = bus.js.get_stream(stream).await.unwrap();
    let info = s.info().await.unwrap();
    let mut n = 0;
    for seq in info.state.first_sequence.max(1)..=info.state.last_sequence {
        if let Ok(m) = s.get_raw_message(seq).await
            && m.subject.as_str() == subject
        {
            n += 1;
        }
    }
    n
}

#[tokio::test]
async fn an_anonymous_or_wrong_password_connection_is_refused() {
    let nats = Nats::start().unwrap();
    // No credentials at all.
    let anon = async_nats::ConnectOptions::new().connect(nats.plain_url()).await;
    let err = anon.err().map(|e| e.to_string().to_lowercase()).unwrap_or_default();
    assert!(err.contains("authorization violation"), "an anonymous client must be refused: {err:?}");
    // A service's name with a wrong password, and a user that does not exist.
    for (user, pw) in [("svc-claimer", "not-the-password"), ("nobody", "x"), ("svc-claimer", "")] {
        let r = async_nats::ConnectOptions::new().user_and_password(user.into(), pw.into()).connect(nats.plain_url()).await;
        let err = r.err().map(|e| e.to_string().to_lowercase()).unwrap_or_default();
        assert!(err.contains("authorization violation"), "{user}/{pw:?} must be refused: {err:?}");
    }
    // One identity's password does not open another's account.
    let r = async_nats::ConnectOptions::new()
        .user_and_password("svc-deployer".into(), nats.password("svc-meter").unwrap())
        .connect(nats.plain_url())
        .await;
    assert!(r.is_err(), "svc-meter's password must not log in as svc-deployer");
    // kit's own connect without credentials gives up with the server's words, naming no secret.
    let e = Bus::connect(&nats.plain_url(), "anon", Duration::from_secs(1)).await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.to_lowercase().contains("authorization violation"), "{e}");
    // The right credentials work (so the refusals above are about the credentials).
    for i in nats_auth::all() {
        Bus::connect_as(&nats.plain_url(), "t", Duration::from_secs(5), &nats.auth(&i.user))
            .await
            .unwrap_or_else(|e| panic!("{} cannot log in with its own password: {e}", i.user));
    }
}

#[tokio::test]
async fn no_identity_can_publish_a_subject_it_does_not_own() {
    let nats = Nats::start().unwrap();
    let h = harness(&nats).await;
    let ids: Vec<String> = nats_auth::all().into_iter().map(|i| i.user).collect();
    assert_eq!(ids.len(), OWNS.len(), "every identity is in this table: {ids:?}");
    let mut table = Vec::new();
    for user in &ids {
        let (client, errors) = raw_client(&nats, user).await;
        let forbidden: Vec<String> = all_subjects().into_iter().filter(|s| !owns(user, s)).collect();
        assert!(!forbidden.is_empty());
        for s in &forbidden {
            client.publish(s.clone(), "forged".into()).await.unwrap();
        }
        client.flush().await.unwrap();
        let errs = violations_settle(&errors, forbidden.len()).await;
        for s in &forbidden {
            assert!(
                errs.iter().any(|e| e.contains("permissions violation for publish") && e.contains(&s.to_lowercase())),
                "{user} publishing {s}: the server must refuse it; it reported {errs:?}"
            );
            table.push(format!("{user} ✗ {s}"));
        }
        // The connection survives a refusal: the identity keeps working.
        assert_eq!(client.connection_state(), async_nats::connection::State::Connected, "{user}");
    }
    // Nothing forged landed in any stream.
    for s in all_subjects() {
        assert_eq!(count_on(&h, &s).await, 0, "a refused publish landed on {s}");
    }
    eprintln!("refused {} (identity, subject) pairs", table.len());
    assert_eq!(table.len(), ids.len() * all_subjects().len() - OWNS.iter().map(|(_, o)| o.len()).sum::<usize>());
}

#[tokio::test]
async fn every_identity_may_publish_what_it_owns() {
    let nats = Nats::start().unwrap();
    let h = harness(&nats).await;
    for (user, _) in OWNS {
        let bus = Bus::connect_as(&nats.plain_url(), user, Duration::from_secs(5), &nats.auth(user)).await.unwrap();
        for s in all_subjects().into_iter().filter(|s| owns(user, s)) {
            // A JetStream publish: the stream's ack comes back to this identity's own inbox.
            let ack = bus.js.publish(s.clone(), format!("from {user}").into()).await.unwrap().await;
            assert!(ack.is_ok(), "{user} must be able to publish {s}: {ack:?}");
        }
    }
    // Each owned subject landed once per owner (failed: three stages and the claimer's abandon).
    assert_eq!(count_on(&h, &subjects::op_event("failed", "op-forged")).await, 4);
    assert_eq!(count_on(&h, &subjects::op_event("claimed", "op-forged")).await, 1);
    assert_eq!(count_on(&h, &subjects::meter_quota("pn-forged")).await, 1);
    assert_eq!(count_on(&h, "pn.replay.deploy").await, 1);
}

#[tokio::test]
async fn a_service_can_neither_change_the_streams_nor_touch_another_services_consumers() {
    let nats = Nats::start().unwrap();
    let h = harness(&nats).await;
    // Something in PN_OPS worth keeping, and every service's durables, created by their owners.
    h.js.publish(subjects::op_event("claimed", "op-keep"), "x".into()).await.unwrap().await.unwrap();
    for i in nats_auth::services() {
        let bus = Bus::connect_as(&nats.plain_url(), &i.user, Duration::from_secs(5), &nats.auth(&i.user)).await.unwrap();
        // Starting on an existing bus is allowed (the streams are left as they are).
        bus.ensure_streams_with(1).await.unwrap_or_else(|e| panic!("{}: {e}", i.user));
        for d in &i.durables {
            let spec = kit::bus::ConsumerSpec {
                stream: d.stream,
                durable: d.name.clone(),
                filter: d.filter.clone(),
                ack_wait: Duration::from_secs(5),
                max_deliver: 3,
                max_ack_pending: 10,
            };
            bus.consumer(&spec).await.unwrap_or_else(|e| panic!("{} cannot create its own {}: {e}", i.user, d.name));
        }
    }

    let services = nats_auth::services();
    for (k, i) in services.iter().enumerate() {
        let other = &services[(k + 1) % services.len()];
        let theirs = &other.durables[0];
        let mine = &i.durables[0];
        let (client, errors) = raw_client(&nats, &i.user).await;
        let forbidden = [
            format!("$JS.API.STREAM.DELETE.{}", subjects::OPS_STREAM),
            format!("$JS.API.STREAM.PURGE.{}", subjects::OPS_STREAM),
            format!("$JS.API.STREAM.UPDATE.{}", subjects::OPS_STREAM),
            format!("$JS.API.STREAM.MSG.DELETE.{}", subjects::OPS_STREAM),
            format!("$JS.API.STREAM.DELETE.{}", subjects::METER_STREAM),
            // Its own consumer cannot be deleted either (nor can it be re-pointed elsewhere).
            format!("$JS.API.CONSUMER.DELETE.{}.{}", mine.stream, mine.name),
            format!("$JS.API.CONSUMER.CREATE.{}.{}.pn.op.>", mine.stream, mine.name),
            // Another service's consumer: not created, read, fetched, acked or deleted.
            format!("$JS.API.CONSUMER.CREATE.{}.{}.{}", theirs.stream, theirs.name, theirs.filter),
            format!("$JS.API.CONSUMER.INFO.{}.{}", theirs.stream, theirs.name),
            format!("$JS.API.CONSUMER.MSG.NEXT.{}.{}", theirs.stream, theirs.name),
            format!("$JS.ACK.{}.{}.1.1.1.1.0", theirs.stream, theirs.name),
            format!("$JS.API.CONSUMER.DELETE.{}.{}", theirs.stream, theirs.name),
            // A new consumer of its own naming, e.g. to read everything.
            format!("$JS.API.CONSUMER.CREATE.{}.spy.pn.op.>", subjects::OPS_STREAM),
        ];
        for s in &forbidden {
            client.publish(s.clone(), "{}".into()).await.unwrap();
        }
        // Listening in: on the events, or on another identity's replies.
        let _a = client.subscribe("pn.op.>").await.unwrap();
        let _b = client.subscribe(format!("{}.>", nats_auth::inbox_prefix(&other.user))).await.unwrap();
        let _c = client.subscribe("_INBOX.>").await.unwrap();
        client.flush().await.unwrap();
        let errs = violations_settle(&errors, forbidden.len() + 3).await;
        for s in &forbidden {
            assert!(
                errs.iter().any(|e| e.contains("permissions violation for publish") && e.contains(&s.to_lowercase())),
                "{} → {s} must be refused: {errs:?}",
                i.user
            );
        }
        let subs = errs.iter().filter(|e| e.contains("permissions violation for subscription")).count();
        assert_eq!(subs, 3, "{}: listening on events or others' inboxes must be refused: {errs:?}", i.user);

        // STREAM.CREATE is allowed, but cannot change an existing stream: JetStream refuses a
        // create of the same name with another configuration.
        let bus = Bus::connect_as(&nats.plain_url(), &i.user, Duration::from_secs(5), &nats.auth(&i.user)).await.unwrap();
        let shrink = jetstream::stream::Config {
            name: subjects::OPS_STREAM.into(),
            subjects: vec![subjects::OPS_ALL.into()],
            max_age: Duration::from_secs(1),
            ..Default::default()
        };
        assert!(bus.js.create_stream(shrink).await.is_err(), "{}: a create must not change PN_OPS", i.user);
    }

    // After all that, the streams, their message and every consumer are intact.
    let mut ops = h.js.get_stream(subjects::OPS_STREAM).await.unwrap();
    let info = ops.info().await.unwrap();
    assert_eq!(info.state.messages, 1, "PN_OPS keeps its message");
    assert_eq!(info.config.max_age, kit::bus::OPS_MAX_AGE, "PN_OPS keeps its retention");
    for i in nats_auth::services() {
        for d in &i.durables {
            let s = h.js.get_stream(d.stream).await.unwrap();
            let c = s.consumer_info(&d.name).await.unwrap_or_else(|e| panic!("{} lost: {e}", d.name));
            assert_eq!(c.config.filter_subject, d.filter, "{} keeps its filter", d.name);
        }
    }
    let names: Vec<String> = {
        use futures::TryStreamExt;
        ops.consumer_names().try_collect().await.unwrap()
    };
    assert!(!names.iter().any(|n| n == "spy"), "no spy consumer: {names:?}");
}

#[tokio::test]
async fn the_operator_administers_jetstream_but_cannot_forge_an_event() {
    let nats = Nats::start().unwrap();
    let _h = harness(&nats).await;
    let (client, errors) = raw_client(&nats, nats_auth::OPERATOR).await;
    for s in all_subjects().into_iter().filter(|s| !s.starts_with("pn.replay.")) {
        client.publish(s, "forged".into()).await.unwrap();
    }
    client.flush().await.unwrap();
    let n = all_subjects().iter().filter(|s| !s.starts_with("pn.replay.")).count();
    let errs = violations_settle(&errors, n).await;
    assert_eq!(errs.iter().filter(|e| e.contains("permissions violation for publish")).count(), n, "{errs:?}");
    // The setup identity: it updates and purges streams (what no service can).
    let op = Bus::connect_as(&nats.plain_url(), "pnctl", Duration::from_secs(5), &nats.auth(nats_auth::OPERATOR)).await.unwrap();
    op.apply_streams_with(1).await.unwrap();
    let s = op.js.get_stream(subjects::REPLAY_STREAM).await.unwrap();
    s.purge().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// The meter's internal API (issue #18, item 3): the ledger and quota changes are not on the
// public port, and the internal listener wants its token.

#[tokio::test]
async fn the_meters_ledger_and_quota_api_is_internal_and_wants_its_token() {
    let stack = testkit::stack::Stack::builder().only(&["svc-meter"]).start().await.unwrap();
    // The meter runs without the seal key (it never seals or unseals anything).
    assert!(!stack.service_env("svc-meter").contains_key("PN_SEAL_KEY"));
    let http = reqwest::Client::new();
    let calls = [
        (reqwest::Method::GET, "/v1/nodes"),
        (reqwest::Method::GET, "/v1/nodes/pn-any/usage"),
        (reqwest::Method::PUT, "/v1/nodes/pn-any/quota"),
    ];
    for (m, p) in &calls {
        // Not served on the public port at all.
        let r = http.request(m.clone(), format!("{}{p}", stack.meter_url)).json(&serde_json::json!({"soldBytes": 5})).send().await.unwrap();
        assert!(matches!(r.status().as_u16(), 404 | 405), "{m} {p} on the public port: {}", r.status());
        // On the internal port: refused without the token, with a wrong one, or another scheme.
        let url = format!("{}{p}", stack.meter_internal_url);
        let wrong = "0".repeat(stack.meter_internal_token.len());
        let attempts = [
            http.request(m.clone(), &url),
            http.request(m.clone(), &url).bearer_auth(&wrong),
            http.request(m.clone(), &url).bearer_auth(""),
            http.request(m.clone(), &url).bearer_auth(format!("{}x", stack.meter_internal_token)),
            http.request(m.clone(), &url).basic_auth("operator", Some(&stack.meter_internal_token)),
            http.request(m.clone(), &url).header("Authorization", stack.meter_internal_token.clone()),
        ];
        for req in attempts {
            let r = req.json(&serde_json::json!({"soldBytes": 5})).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 401, "{m} {p} without the right token");
            let body = r.text().await.unwrap();
            assert!(!body.contains(&stack.meter_internal_token), "the 401 must not echo the token");
        }
    }
    // With the token it answers: the (empty) node list, 404 for a node it does not know.
    let r = stack.meter_internal(reqwest::Method::GET, "/v1/nodes").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["items"], serde_json::json!([]));
    let r = stack.meter_internal(reqwest::Method::PUT, "/v1/nodes/pn-any/quota").json(&serde_json::json!({"soldBytes": 5})).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    // The public port still does its job: ingest answers (401 for unknown credentials), health.
    assert_eq!(http.get(format!("{}/healthz", stack.meter_url)).send().await.unwrap().status().as_u16(), 200);
    let r = http.post(format!("{}/slave/usage", stack.meter_url)).basic_auth("203.0.113.9", Some("nope")).body("{}").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(stack.secret_findings().await.unwrap().is_empty(), "no secret (the internal token included) leaked");
}
