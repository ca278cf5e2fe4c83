//! svc-meter against real parts: a testkit stack (real nats-server, real center-sim) with the
//! real `svc-meter` binary configured only by `PN_*`; deployments published on PN_OPS, reports
//! over HTTP (directly, and through Center's `/slave/usage` ingress).
//! Needs `cargo build -p center-sim` (scripts/test builds every binary first).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod helpers;

use std::time::Duration;

use anyhow::Result;
use helpers::*;
use proto::QuotaState;
use serde_json::Value;
use testkit::eventually;
use serde_json::json;

const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_billed_published_and_the_cutoff_hides_the_node() -> Result<()> {
    // A long interval: only the immediate first usage can be on the stream during this test.
    let meter = Meter::start(&[("PN_USAGE_INTERVAL_MS", "600000")]).await?;
    let bus = &meter.bus;
    let n = TestNode::new();
    meter.register_at_center(&n).await?;
    meter.deploy(&n, 1_000_000).await?;

    // Pre-deployment traffic (the OS prep) is the baseline, not the customer's. Reports come in
    // through Center's ingress, as the sidecar sends them.
    let v = meter.ok_via_center(&n, 700_000, 300_000, "boot-1", 1).await?;
    assert_eq!((v["outcome"].as_str(), v["usedBytes"].as_u64()), (Some("baseline"), Some(0)), "{v}");
    let v = meter.ok_via_center(&n, 800_000, 310_000, "boot-1", 2).await?;
    assert_eq!((v["outcome"].as_str(), v["deltaBytes"].as_u64()), (Some("counted"), Some(110_000)), "{v}");

    // The first non-zero usage goes out at once, despite the 10-minute interval.
    let first = eventually("first usage on meter.usage", PATIENCE, || async {
        last(bus, &proto::subjects::meter_usage(&n.name)).await.and_then(|b| usage_of(&b).cloned())
    })
    .await?;
    assert_eq!((first.used_bytes, first.delta_bytes, first.sold_bytes), (110_000, 110_000, 1_000_000));

    let u = meter.usage(&n.name).await?;
    assert_eq!(u["usedBytes"], 110_000);
    assert_eq!(u["soldBytes"], 1_000_000);
    assert_eq!(u["state"], "ok");
    assert_eq!(u["reports"], 2);
    assert_eq!(u["epochs"].as_array().map(Vec::len), Some(1));
    assert_eq!(u["lastReport"]["rxBytes"], 800_000);
    assert_eq!(u["lastReport"]["bootId"], "boot-1");
    // Admission says admitted or not, and nothing about the state, usage or quota.
    assert_eq!(meter.admission(&n.name).await?, (200, serde_json::json!({"node": n.name, "admitted": true})));

    // 80 %: warn (still admitted).
    meter.ok(&n, 1_490_000, 320_000, "boot-1", 3).await?;
    let (s, v) = meter.admission(&n.name).await?;
    assert_eq!((s, v), (200, serde_json::json!({"node": n.name, "admitted": true})), "warn is not disclosed");
    assert_eq!(meter.usage(&n.name).await?["state"], "warn");
    let q = eventually("quota warn event", PATIENCE, || async {
        last(bus, &proto::subjects::meter_quota(&n.name)).await.and_then(|b| quota_of(&b).cloned()).filter(|q| q.to == QuotaState::Warn as i32)
    })
    .await?;
    assert_eq!(q.from, QuotaState::Ok as i32);

    // Coalesced: the second non-zero usage is not published before the interval.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let msgs = all(bus, &proto::subjects::meter_usage(&n.name)).await?;
    assert_eq!(msgs.len(), 1, "later usage must wait for the interval");

    // 95 %: cutoff → 402, meter.quota to=CUTOFF, Center told to hide the node.
    let v = meter.ok(&n, 1_630_000, 320_000, "boot-1", 4).await?;
    assert_eq!(v["usedBytes"], 950_000);
    assert_eq!(v["state"], "cutoff");
    let (s, v) = meter.admission(&n.name).await?;
    assert_eq!(s, 402, "{v}");
    assert_eq!(v, serde_json::json!({"node": n.name, "admitted": false}), "no used or sold bytes in the public answer");
    let q = eventually("quota cutoff event", PATIENCE, || async {
        last(bus, &proto::subjects::meter_quota(&n.name)).await.and_then(|b| quota_of(&b).cloned()).filter(|q| q.to == QuotaState::Cutoff as i32)
    })
    .await?;
    assert_eq!((q.from, q.used_bytes, q.sold_bytes), (QuotaState::Warn as i32, 950_000, 1_000_000));
    eventually("hidden at Center", PATIENCE, || async { (meter.hidden_at_center(&n.name).await == Some(true)).then_some(()) }).await?;
    eventually("hidden recorded in the ledger", PATIENCE, || async {
        meter.usage(&n.name).await.ok().filter(|u| u["hiddenAtCenter"] == true).map(|_| ())
    })
    .await?;
    // Traffic past the cutoff is still billed (it happened).
    let v = meter.ok(&n, 1_700_000, 320_000, "boot-1", 5).await?;
    assert_eq!(v["usedBytes"], 1_020_000);

    // An operator raises the quota: admitted again, Center told to show it.
    let (s, v) = meter.set_quota(&n.name, 10_000_000).await?;
    assert_eq!((s, v["state"].as_str()), (200, Some("ok")), "{v}");
    assert_eq!(meter.admission(&n.name).await?.0, 200);
    eventually("shown again at Center", PATIENCE, || async { (meter.hidden_at_center(&n.name).await == Some(false)).then_some(()) }).await?;
    let changes = eventually("three quota events", PATIENCE, || async {
        all(bus, &proto::subjects::meter_quota(&n.name)).await.ok().filter(|m| m.len() == 3)
    })
    .await?;
    let ids: Vec<&str> = changes.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, [format!("{}.quota.1", n.name), format!("{}.quota.2", n.name), format!("{}.quota.3", n.name)]);
    assert_eq!(quota_of(&changes[2].1).map(|q| (q.from, q.to)), Some((QuotaState::Cutoff as i32, QuotaState::Ok as i32)));

    // The node secret is nowhere: not in a log, a stream, a sled file.
    assert!(!meter.log().contains(&n.secret), "the node secret must never be logged");
    let findings = meter.stack.secret_findings().await?;
    assert!(findings.is_empty(), "secrets found: {findings:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_usage_carries_the_summed_delta() -> Result<()> {
    let meter = Meter::start(&[("PN_USAGE_INTERVAL_MS", "400")]).await?;
    let bus = &meter.bus;
    let n = TestNode::new();
    meter.deploy(&n, u64::MAX / 2).await?;
    meter.ok(&n, 0, 0, "b", 0).await?;
    let mut total = 0;
    for i in 1..=30u64 {
        meter.ok(&n, i * 1000, i * 10, "b", i as i64).await?;
        total += 1010;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let msgs = eventually("usage messages summing to the ledger", PATIENCE, || async {
        let msgs = all(bus, &proto::subjects::meter_usage(&n.name)).await.ok()?;
        let used = msgs.last().and_then(|(_, b)| usage_of(b)).map(|u| u.used_bytes);
        (used == Some(total)).then_some(msgs)
    })
    .await?;
    let sum: u64 = msgs.iter().filter_map(|(_, b)| usage_of(b)).map(|u| u.delta_bytes).sum();
    assert_eq!(sum, total, "the deltas of the usage messages add up to the ledger");
    assert!(msgs.len() < 30, "30 reports must be coalesced, got {} messages", msgs.len());
    let ids: std::collections::HashSet<&String> = msgs.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), msgs.len(), "msg ids are unique");
    assert_eq!(meter.used(&n.name).await?, total);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_neither_loses_nor_double_counts() -> Result<()> {
    let mut meter = Meter::start(&[]).await?;
    let n = TestNode::new();
    meter.deploy(&n, 1 << 40).await?;

    meter.ok(&n, 1000, 1000, "b1", 1).await?;
    meter.ok(&n, 3000, 1000, "b1", 2).await?;
    assert_eq!(meter.used(&n.name).await?, 2000);
    // Reboot: counters restart from 0 under a new boot id; they count from 0.
    let v = meter.ok(&n, 500, 0, "b2", 3).await?;
    assert_eq!((v["outcome"].as_str(), v["deltaBytes"].as_u64(), v["epoch"].as_u64()), (Some("new_epoch"), Some(500), Some(1)));
    // The same report again adds nothing.
    assert_eq!(meter.ok(&n, 500, 0, "b2", 3).await?["outcome"], "repeat");
    // A late report from the previous boot adds nothing.
    assert_eq!(meter.ok(&n, 3000, 1000, "b1", 2).await?["outcome"], "stale");
    // A NIC reset without a reboot (counter went down): a new epoch counting from 0.
    let v = meter.ok(&n, 100, 50, "b2", 4).await?;
    assert_eq!((v["outcome"].as_str(), v["deltaBytes"].as_u64()), (Some("new_epoch"), Some(150)));
    meter.ok(&n, 200, 50, "b2", 5).await?;
    assert_eq!(meter.used(&n.name).await?, 2000 + 500 + 150 + 100);
    let u = meter.usage(&n.name).await?;
    let epochs = u["epochs"].as_array().cloned().unwrap_or_default();
    assert_eq!(epochs.len(), 3);
    assert_eq!(epochs.iter().map(|e| e["countedBytes"].as_u64().unwrap()).sum::<u64>(), 2750);
    assert_eq!(epochs[1]["bootId"], "b2");

    // The ledger survives a restart as it was.
    meter.restart().await?;
    assert_eq!(meter.used(&n.name).await?, 2750);
    assert_eq!(meter.ok(&n, 200, 50, "b2", 5).await?["outcome"], "repeat");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_all_look_the_same() -> Result<()> {
    let meter = Meter::start(&[]).await?;
    let n = TestNode::new();
    meter.deploy(&n, 1 << 30).await?;
    let body = r#"{"rxBytes":1,"txBytes":1,"bootId":"b"}"#;

    let wrong_secret = svc_meter::auth::basic_header(n.ip, &testkit::rand_hex(32));
    let unknown_ip = svc_meter::auth::basic_header(std::net::Ipv4Addr::new(192, 0, 2, 77), &n.secret);
    let cases: Vec<Option<String>> = vec![
        Some(wrong_secret),
        Some(unknown_ip),
        None,
        Some("Basic !!!".into()),
        Some(format!("Bearer {}", n.secret)),
        Some(svc_meter::auth::basic_header(n.ip, "")),
    ];
    let mut bodies = Vec::new();
    for auth in &cases {
        let (s, text) = meter.post_raw(auth.as_deref(), body).await?;
        assert_eq!(s, 401, "{auth:?}: {text}");
        bodies.push(text);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "every 401 has the same body: {bodies:?}");
    // Nothing was billed or recorded by the refused attempts; the right secret works.
    assert_eq!(meter.usage(&n.name).await?["reports"], 0);
    assert_eq!(meter.ok(&n, 1, 1, "b", 1).await?["outcome"], "baseline");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_a_clear_4xx() -> Result<()> {
    let meter =
        Meter::start(&[("PN_MIN_REPORT_INTERVAL_MS", "60000"), ("PN_MAX_LINK_BYTES_PER_SEC", "1000"), ("PN_REQUEST_TIMEOUT_MS", "700")]).await?;
    let n = TestNode::new();
    meter.deploy(&n, 1 << 30).await?;
    let auth = n.auth();

    // 400: malformed JSON and bad fields (rejected before the rate limit counts them).
    for body in ["{", "[]", r#"{"rxBytes":-1,"txBytes":0,"bootId":"b"}"#, r#"{"rxBytes":1,"txBytes":0,"bootId":""}"#, r#"{"rxBytes":1,"txBytes":0,"bootId":"b","at":"soon"}"#] {
        let (s, text) = meter.post_raw(Some(&auth), body).await?;
        assert_eq!(s, 400, "{body}: {text}");
        assert!(text.contains("bad_request"), "{text}");
    }
    // 413: over the body limit, with a length and chunked.
    let big = format!(r#"{{"rxBytes":1,"txBytes":1,"bootId":"{}"}}"#, "x".repeat(5000));
    let (s, text) = meter.post_raw(Some(&auth), big.clone()).await?;
    assert_eq!(s, 413, "{text}");
    assert!(text.contains("payload_too_large"), "{text}");
    assert_eq!(raw_http(meter.url(), &chunked_request(&auth, &big)).await?.split(' ').nth(1), Some("413"));

    // The first valid report is accepted; the next one within the interval is 429.
    assert_eq!(meter.ok(&n, 0, 0, "b", 1).await?["outcome"], "baseline");
    let (s, v) = meter.report(&n, 10, 10, "b", 2).await?;
    assert_eq!(s, 429, "{v}");
    assert!(v["retryAfterMs"].as_u64().is_some_and(|ms| ms > 0 && ms <= 60_000), "{v}");

    // 408: a client that stops sending its body.
    let slow = format!("POST /slave/usage HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 100\r\n\r\n{{\"rx");
    assert_eq!(raw_http(meter.url(), &slow).await?.split(' ').nth(1), Some("408"));

    // Unknown or unusable node names on the query APIs are 404, never a panic.
    for path in ["/v1/admission/pn-nope", "/v1/admission/a.b"] {
        assert_eq!(meter.get(path).await?.0, 404, "{path}");
    }
    for path in ["/v1/nodes/%2e%2e/usage", "/v1/nodes/pn-nope/usage"] {
        assert_eq!(meter.internal_get(path).await?.0, 404, "{path}");
    }
    assert_eq!(meter.set_quota("pn-nope", 5).await?.0, 404);
    assert_eq!(meter.set_quota(&n.name, 0).await?.0, 400);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impossible_jump_is_refused_not_billed() -> Result<()> {
    let meter = Meter::start(&[("PN_MAX_LINK_BYTES_PER_SEC", "1000")]).await?;
    let n = TestNode::new();
    meter.deploy(&n, 1 << 30).await?;
    meter.ok(&n, 0, 0, "b", 1).await?;
    let (s, v) = meter.report(&n, 1_000_000_000, 0, "b", 2).await?;
    assert_eq!(s, 422, "{v}");
    assert_eq!(meter.used(&n.name).await?, 0);
    assert_eq!(meter.ok(&n, 500, 0, "b", 3).await?["deltaBytes"], 500);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_deployment_with_a_bigger_quota_lifts_the_cutoff() -> Result<()> {
    let meter = Meter::start(&[("PN_COUNT_MODES__HETZNER", "tx")]).await?;
    let bus = &meter.bus;
    let n = TestNode::new();
    meter.register_at_center(&n).await?;
    let t0 = kit::now_ms();
    deploy(bus, &n, 10_000, t0, "hetzner", 1).await?;
    meter.wait_known(&n.name).await?;
    meter.ok(&n, 0, 0, "b", 1).await?;
    // tx only for this provider: 50 000 rx bytes are free.
    let v = meter.ok(&n, 50_000, 9_500, "b", 2).await?;
    assert_eq!((v["usedBytes"].as_u64(), v["state"].as_str()), (Some(9_500), Some("cutoff")), "{v}");
    assert_eq!(meter.usage(&n.name).await?["countMode"], "tx");
    assert_eq!(meter.admission(&n.name).await?.0, 402);
    eventually("hidden at Center", PATIENCE, || async { (meter.hidden_at_center(&n.name).await == Some(true)).then_some(()) }).await?;

    // The same deployment redelivered changes nothing; a later one with more quota lifts it.
    deploy(bus, &n, 10_000, t0, "hetzner", 2).await?;
    deploy(bus, &n, 1_000_000, t0 + 1000, "hetzner", 3).await?;
    eventually("admitted again", PATIENCE, || async { meter.admission(&n.name).await.ok().filter(|(s, _)| *s == 200).map(|_| ()) }).await?;
    eventually("shown again at Center", PATIENCE, || async { (meter.hidden_at_center(&n.name).await == Some(false)).then_some(()) }).await?;
    let q = eventually("quota event back to ok", PATIENCE, || async {
        last(bus, &proto::subjects::meter_quota(&n.name)).await.and_then(|b| quota_of(&b).cloned()).filter(|q| q.to == QuotaState::Ok as i32)
    })
    .await?;
    assert_eq!((q.from, q.sold_bytes), (QuotaState::Cutoff as i32, 1_000_000));
    // An older deployment arriving late does not undo the raise.
    deploy(bus, &n, 10_000, t0 - 5000, "hetzner", 4).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(meter.usage(&n.name).await?["soldBytes"], 1_000_000);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hide_intent_survives_center_failures_and_a_crash() -> Result<()> {
    let mut meter = Meter::start(&[]).await?;
    let n = TestNode::new();
    meter.register_at_center(&n).await?;
    meter.deploy(&n, 1000).await?;
    // Center answers every MCP call with "unavailable".
    meter.stack.faults(json!({"centerErrorRate": 1.0})).await?;
    meter.ok(&n, 0, 0, "b", 1).await?;
    meter.ok(&n, 990, 0, "b", 2).await?;
    assert_eq!(meter.admission(&n.name).await?.0, 402, "admission does not wait for Center");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(meter.hidden_at_center(&n.name).await, Some(false));
    assert_eq!(meter.usage(&n.name).await?["hiddenAtCenter"], false);

    // Crash with the intent undelivered; Center recovers; the restarted meter delivers it.
    meter.kill();
    meter.stack.faults(json!({"centerErrorRate": 0.0})).await?;
    meter.restart().await?;
    eventually("hidden at Center after the restart", PATIENCE, || async {
        (meter.hidden_at_center(&n.name).await == Some(true)).then_some(())
    })
    .await?;
    eventually("hidden recorded", PATIENCE, || async { meter.usage(&n.name).await.ok().filter(|u| u["hiddenAtCenter"] == true).map(|_| ()) }).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_report_is_lost_in_a_crash() -> Result<()> {
    let mut meter = Meter::start(&[]).await?;
    let nodes: Vec<TestNode> = (0..6).map(|_| TestNode::new()).collect();
    for n in &nodes {
        deploy(&meter.bus, n, u64::MAX / 2, kit::now_ms(), "lightsail", 1).await?;
    }
    for n in &nodes {
        meter.wait_known(&n.name).await?;
    }
    const BASE: u64 = 1_000_000;

    // Several tasks stream reports (one node each); each remembers what was acknowledged and
    // what it last sent.
    let mut tasks = Vec::new();
    for n in nodes.clone() {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
        let url = format!("{}/slave/usage", meter.url());
        tasks.push(tokio::spawn(async move {
            let mut acked = None::<u64>;
            let mut sent = None::<(u64, i64)>;
            let mut rx = BASE;
            for i in 0..100_000i64 {
                let body = serde_json::json!({"rxBytes": rx, "txBytes": rx / 2, "bootId": "b", "at": at(i)}).to_string();
                sent = Some((rx, i));
                let r = http.post(&url).header("authorization", n.auth()).body(body).send().await;
                match r {
                    Ok(r) if r.status().is_success() => acked = Some(rx),
                    Ok(r) => panic!("unexpected {}", r.status()),
                    Err(_) => break,
                }
                rx += 1000;
            }
            (n, acked, sent)
        }));
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    meter.kill();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await?);
    }
    meter.restart().await?;

    let billed = |rx: u64| (rx - BASE) + (rx / 2 - BASE / 2);
    let mut acked_total = 0;
    for (n, acked, sent) in &results {
        let acked = acked.expect("some reports were acknowledged before the kill");
        let (sent_rx, sent_i) = sent.unwrap();
        let used = meter.used(&n.name).await?;
        assert!(used >= billed(acked), "{}: used {used} < acknowledged {}", n.name, billed(acked));
        assert!(used <= billed(sent_rx), "{}: used {used} > sent {}", n.name, billed(sent_rx));
        acked_total += billed(acked);
        // The sidecar reports its (cumulative) counters again: now the ledger is exact,
        // whether or not the in-flight report had reached the disk.
        meter.ok(n, sent_rx, sent_rx / 2, "b", sent_i).await?;
        assert_eq!(meter.used(&n.name).await?, billed(sent_rx), "{}", n.name);
    }
    assert!(acked_total > 0);
    Ok(())
}

#[test]
fn any_request_gets_a_4xx_or_2xx_and_never_kills_the_meter() -> Result<()> {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (meter, node) = rt.block_on(async {
        // The per-source budget of failed authentications off: every request reaches parsing
        // (that limit is tested in testkit/tests/forged_events.rs).
        let meter = Meter::start(&[("PN_AUTH_FAIL_BURST", "0")]).await?;
        let n = TestNode::new();
        meter.deploy(&n, 1 << 40).await?;
        anyhow::Ok((meter, n))
    })?;

    let good_auth = node.auth();
    let header = prop_oneof![
        Just(Some(good_auth.clone())),
        Just(None),
        "[ -~]{0,80}".prop_map(Some),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| Some(format!("Basic {}", base64_encode(&b)))),
    ];
    let body = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        (any::<u64>(), any::<u64>(), "[ -~]{0,20}", any::<bool>()).prop_map(|(rx, tx, boot, snake)| {
            if snake {
                serde_json::json!({"rx_bytes": rx, "tx_bytes": tx, "boot_id": boot}).to_string()
            } else {
                serde_json::json!({"rxBytes": rx, "txBytes": tx, "bootId": boot, "at": at((rx % 1000) as i64)}).to_string()
            }
        }),
        "[{}\\[\\]\":,0-9a-zA-Z_ -]{0,120}",
    ];
    let mut runner = TestRunner::new(Config { cases: 200, failure_persistence: None, ..Config::default() });
    runner
        .run(&(header, body), |(h, b)| {
            let (s, text) = rt.block_on(meter.post_raw(h.as_deref(), b.clone())).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!([200, 400, 401, 413, 422].contains(&s), "status {s} for {h:?} {b:?}: {text}");
            if s != 200 {
                let v: Value = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(format!("non-JSON error body {text:?}: {e}")))?;
                prop_assert!(v["error"].is_string());
            }
            Ok(())
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    rt.block_on(async {
        assert_eq!(meter.get("/healthz").await?.0, 200, "the meter is still up");
        assert!(meter.usage(&node.name).await?["usedBytes"].is_u64());
        anyhow::Ok(())
    })?;
    rt.block_on(async move { drop(meter) });
    Ok(())
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A chunked POST of `body` to /slave/usage.
fn chunked_request(auth: &str, body: &str) -> String {
    let mut req = format!("POST /slave/usage HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
    for chunk in body.as_bytes().chunks(1000) {
        req.push_str(&format!("{:x}\r\n{}\r\n", chunk.len(), String::from_utf8_lossy(chunk)));
    }
    req.push_str("0\r\n\r\n");
    req
}

/// Sends raw bytes to the meter and returns the response's status line.
async fn raw_http(base: &str, request: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(request.as_bytes()).await?;
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    Ok(text.lines().next().unwrap_or("").to_string())
}
