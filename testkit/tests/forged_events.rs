//! Issue #18: events are hints to check against the world, not orders; hostile report floods are
//! bounded. Real parts only: nats-server, center-sim (Center, its cloud and nodes), pn-ingress
//! and the service binaries; the forged events are published by the test with `kit::bus`, as an
//! intruder on the bus would.
//!
//! - A forged `pn.op.instance` naming a foreign IPv4 (a loopback address this test listens on)
//!   makes no connection to it and moves no secret; the operation fails with the reason.
//! - A forged `pn.op.deployed` changes no known node in the meter (its old credentials still
//!   work, its address is not taken); one the provider confirms does.
//! - The meter refuses a report from the future (422) and counts higher counters whatever
//!   their `at`.
//! - A flood of bad credentials from one source gets 429 before 401s pile up, while a good
//!   node from another source is served; wrong-secret warnings are one line per node.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kit::bus::{Bus, Meta};
use kit::center::{Center, ClientConfig, CreateInstance, McpCenter};
use proto::{Body, Event, Instance, InstanceReady, NodeDeployed, Operation, Stage, subjects};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use testkit::eventually;
use testkit::stack::Stack;

const PATIENCE: Duration = Duration::from_secs(60);
const GIB: u64 = 1 << 30;

/// Plain TCP listeners on a loopback address no instance has, on the SSH ports the deployer
/// uses, counting every connection that arrives.
struct Trap {
    ip: String,
    hits: Arc<AtomicUsize>,
}

impl Trap {
    async fn bind(ports: &[u16]) -> Trap {
        for _ in 0..50 {
            let ip = format!("127.251.{}.{}", rand::random::<u8>(), 1 + rand::random::<u8>() % 250);
            let mut ls = Vec::new();
            for p in ports {
                if let Ok(l) = tokio::net::TcpListener::bind((ip.as_str(), *p)).await {
                    ls.push(l);
                }
            }
            if ls.len() != ports.len() {
                continue;
            }
            let hits = Arc::new(AtomicUsize::new(0));
            for l in ls {
                let hits = hits.clone();
                tokio::spawn(async move {
                    while let Ok(_c) = l.accept().await {
                        hits.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
            return Trap { ip, hits };
        }
        panic!("no free loopback address for the trap");
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn bus(stack: &Stack) -> Bus {
    Bus::connect(&stack.nats.url(), "forger", Duration::from_secs(10)).await.unwrap()
}

/// The last event on `pn.op.<event>.<op>`.
async fn last(bus: &Bus, event: &str, op: &str) -> Option<Body> {
    let s = bus.js.get_stream(subjects::OPS_STREAM).await.ok()?;
    let m = s.get_last_raw_message_by_subject(&subjects::op_event(event, op)).await.ok()?;
    Event::from_bytes(&m.payload).ok()
}

fn center(stack: &Stack) -> Arc<McpCenter> {
    McpCenter::new(ClientConfig::new(&stack.center_url, Duration::from_secs(10)), secrecy::SecretString::from(stack.token.clone())).unwrap()
}

/// A running instance `name` at the sim (its cloud), through Center's tools.
async fn instance(stack: &Stack, name: &str) -> kit::center::CloudInstance {
    let c = center(stack);
    let created = c
        .create_cloud_instance(&CreateInstance {
            account_name: "sim-lightsail".into(),
            region: "ap-southeast-1".into(),
            plan: "small_1tb".into(),
            image_id: "ubuntu-22-04".into(),
            name: name.to_string(),
        })
        .await
        .unwrap();
    eventually("the instance running with an address", PATIENCE, || async {
        let i = c.get_cloud_instance(&created.id).await.ok()?;
        (i.status == "running" && i.ipv4.is_some()).then_some(i)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_forged_instance_event_connects_nowhere_and_moves_no_secret() {
    // No svc-cloud: every pn.op.instance in this stack is the test's forgery.
    let stack = Stack::builder().only(&["svc-claimer", "svc-deployer"]).start().await.unwrap();
    stack.faults(json!({"bootDelayMs": 20, "prepDelayMs": 20})).await.unwrap();
    let trap = Trap::bind(&[stack.fresh_port, stack.hardened_port]).await;
    let bus = bus(&stack).await;

    // Two operations, claimed by the real claimer (the sealed claim token is on PN_OPS).
    let mut claimed = Vec::new();
    for _ in 0..2 {
        let (op, sub) = stack.intent("sg", 100 * GIB, "residential").await.unwrap();
        let c = eventually("pn.op.claimed", PATIENCE, || async {
            match last(&bus, subjects::CLAIMED, &op).await {
                Some(Body::Claimed(c)) => c.op,
                _ => None,
            }
        })
        .await
        .unwrap();
        assert!(!c.sealed_claim_token.is_empty());
        claimed.push((op, sub, c));
    }
    // The first names an instance nobody has; the second the operation's own real instance
    // (pn-<subId> in our account), but at the foreign address.
    let real = instance(&stack, &format!("pn-{}", claimed[1].1)).await;
    let forged_ids = ["i-0f0r6ed00000001".to_string(), real.id.clone()];
    for ((op, sub, c), id) in claimed.iter().zip(&forged_ids) {
        let ir = InstanceReady {
            op: Some(c.clone()),
            instance: Some(Instance {
                instance_id: id.clone(),
                name: format!("pn-{sub}"),
                ipv4: trap.ip.clone(),
                provider: "lightsail".into(),
                account: "sim-lightsail".into(),
                ..Default::default()
            }),
            ready_at_ms: kit::now_ms(),
        };
        let meta = Meta::outcome(op, sub, Stage::Cloud, c.claim_attempt.max(1));
        bus.publish(subjects::op_event(subjects::INSTANCE, op), Body::Instance(ir), &meta).await.unwrap();
    }

    for ((op, _, _), why) in claimed.iter().zip(["does not know instance", &format!("not {}", trap.ip)]) {
        let f = eventually("pn.op.failed", PATIENCE, || async {
            match last(&bus, subjects::FAILED, op).await {
                Some(Body::Failed(f)) => Some(f),
                _ => None,
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", stack.log_tail("svc-deployer", 30)));
        assert_eq!(f.stage, "deploy");
        assert!(f.reason.contains("does not confirm the instance") && f.reason.contains(why) && f.reason.contains("nothing sent"), "{}", f.reason);
        // The claimer reported it to Center with the reason.
        let o = stack.wait_status(op, &["failed", "done"], PATIENCE).await.unwrap();
        assert_eq!(o["status"], "failed", "{o}");
        assert!(o["error"].as_str().unwrap_or("").contains("does not confirm"), "{o}");
    }

    assert_eq!(trap.hits(), 0, "the deployer connected to the forged address");
    // Nothing reached any node: the one real instance was never touched.
    let items = stack.items("/admin/instances").await.unwrap();
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!((items[0]["prepRuns"].as_u64(), items[0]["upRuns"].as_u64()), (Some(0), Some(0)), "{}", items[0]);
    assert_eq!(stack.items("/admin/violations").await.unwrap(), Vec::<Value>::new());
    let logs = stack.all_logs();
    assert!(logs.contains("the provider does not confirm the event's instance"), "the refusal is logged");
    assert_eq!(stack.secret_findings().await.unwrap(), Vec::<String>::new());
}

// ---------- the meter ----------

struct Node {
    name: String,
    ip: Ipv4Addr,
    secret: String,
}

impl Node {
    fn new() -> Node {
        let id = testkit::rand_hex(4);
        let b: [u8; 3] = rand::random();
        Node {
            name: format!("pn-f{id}"),
            ip: Ipv4Addr::new(10, b[0], b[1], b[2].max(1)),
            secret: testkit::rand_hex(32),
        }
    }
}

/// `pn.op.deployed` for `name` at `ip` with `secret`, as the deployer publishes it.
async fn deployed(bus: &Bus, name: &str, ip: &str, secret: &str, deployed_at_ms: i64, instance_id: &str, msg: &str) {
    let op = format!("op-{}", testkit::rand_hex(4));
    let ev = NodeDeployed {
        op: Some(Operation { operation_id: op.clone(), sub_id: name.trim_start_matches("pn-").into(), claim_attempt: 1, ..Default::default() }),
        instance: Some(Instance {
            instance_id: instance_id.into(),
            ipv4: ip.into(),
            provider: "lightsail".into(),
            account: "sim-lightsail".into(),
            name: name.into(),
            ..Default::default()
        }),
        node_name: name.into(),
        node_secret_sha256: Sha256::digest(secret.as_bytes()).to_vec(),
        sold_bytes: 1 << 40,
        deployed_at_ms,
        private_node: true,
        ..Default::default()
    };
    let mut meta = Meta::outcome(&op, "sub", Stage::Deploy, 1);
    meta.msg_id = format!("{op}.{msg}");
    bus.publish(subjects::op_event(subjects::DEPLOYED, &op), Body::Deployed(ev), &meta).await.unwrap();
}

/// RFC 3339 for `ms` since the epoch.
fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap();
    t.format(&time::format_description::well_known::Rfc3339).unwrap()
}

/// Posts a report to the meter from `client`; (status, JSON body, Retry-After).
async fn report(client: &reqwest::Client, url: &str, ip: Ipv4Addr, secret: &str, rx: u64, at_ms: i64) -> (u16, Value, Option<String>) {
    let r = client
        .post(format!("{url}/slave/usage"))
        .basic_auth(ip.to_string(), Some(secret))
        .json(&json!({"rxBytes": rx, "txBytes": 0, "bootId": "b1", "at": rfc3339(at_ms)}))
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    let retry = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
    (s, r.json().await.unwrap_or(Value::Null), retry)
}

async fn meter_idle(bus: &Bus) -> Option<()> {
    let s = bus.js.get_stream(subjects::OPS_STREAM).await.ok()?;
    let mut c: async_nats::jetstream::consumer::PullConsumer = s.get_consumer("svc-meter-deployed").await.ok()?;
    let i = c.info().await.ok()?;
    (i.num_pending == 0 && i.num_ack_pending == 0).then_some(())
}

async fn known(stack: &Stack, node: &str) -> bool {
    stack.meter_usage(node).await.is_ok()
}

#[tokio::test]
async fn a_forged_deployed_event_changes_no_known_node() {
    let stack = Stack::builder().only(&["svc-meter"]).env("svc-meter", "PN_MIN_REPORT_INTERVAL_MS", "0").start().await.unwrap();
    let bus = bus(&stack).await;
    let http = reqwest::Client::new();
    let url = stack.meter_url.clone();
    let n = Node::new();
    deployed(&bus, &n.name, &n.ip.to_string(), &n.secret, kit::now_ms(), "", "real").await;
    eventually("the meter knows the node", PATIENCE, || async { known(&stack, &n.name).await.then_some(()) }).await.unwrap();
    let now = kit::now_ms();
    assert_eq!(report(&http, &url, n.ip, &n.secret, 1000, now).await.0, 200);

    // The intruder's address and secret, in every way an event could carry them.
    let evil_ip = Ipv4Addr::new(10, 250, rand::random(), rand::random::<u8>().max(1));
    let evil = testkit::rand_hex(32);
    let other = instance(&stack, &format!("pn-other{}", testkit::rand_hex(3))).await;
    deployed(&bus, &n.name, &evil_ip.to_string(), &evil, i64::MAX, "", "future").await;
    deployed(&bus, &n.name, &evil_ip.to_string(), &evil, kit::now_ms() + 1000, "i-nope", "unknown-instance").await;
    deployed(&bus, &n.name, &n.ip.to_string(), &evil, kit::now_ms() + 1000, &other.id, "another-instance").await;
    deployed(&bus, &format!("pn-thief{}", testkit::rand_hex(3)), &n.ip.to_string(), &evil, kit::now_ms() + 1000, "", "steal-address").await;
    eventually("the meter consumed every deployment", PATIENCE, || meter_idle(&bus)).await.unwrap();

    let u = stack.meter_usage(&n.name).await.unwrap();
    assert_eq!(u["ipv4"], n.ip.to_string(), "{u}");
    assert_eq!(u["reports"], 1, "{u}");
    let (s, v, _) = report(&http, &url, n.ip, &n.secret, 3000, now + 1).await;
    assert_eq!((s, v["deltaBytes"].as_u64()), (200, Some(2000)), "the old credentials still authenticate: {v}");
    assert_eq!(report(&http, &url, n.ip, &evil, 4000, now + 2).await.0, 401);
    assert_eq!(report(&http, &url, evil_ip, &evil, 4000, now + 2).await.0, 401);
    let log = std::fs::read_to_string(stack.log_path("svc-meter")).unwrap();
    for why in ["deployed event from the future dropped", "deployed event not confirmed by the provider"] {
        assert!(log.contains(why), "no {why:?} in the log");
    }

    // The same change, confirmed by the provider (an instance named as the node holding the
    // address), is applied: the node moved.
    let moved = instance(&stack, &n.name).await;
    let new_ip: Ipv4Addr = moved.ipv4.clone().unwrap().parse().unwrap();
    let new_secret = testkit::rand_hex(32);
    deployed(&bus, &n.name, &new_ip.to_string(), &new_secret, kit::now_ms() + 1000, &moved.id, "confirmed").await;
    eventually("the confirmed move applied", PATIENCE, || async {
        let u = stack.meter_usage(&n.name).await.ok()?;
        (u["ipv4"] == new_ip.to_string()).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(report(&http, &url, new_ip, &new_secret, 5000, now + 3).await.0, 200);
    assert_eq!(report(&http, &url, n.ip, &n.secret, 5000, now + 4).await.0, 401);
}

#[tokio::test]
async fn the_meter_refuses_an_at_from_the_future_and_counts_higher_counters() {
    let stack = Stack::builder().only(&["svc-meter"]).env("svc-meter", "PN_MIN_REPORT_INTERVAL_MS", "0").start().await.unwrap();
    let bus = bus(&stack).await;
    let http = reqwest::Client::new();
    let url = stack.meter_url.clone();
    let n = Node::new();
    deployed(&bus, &n.name, &n.ip.to_string(), &n.secret, kit::now_ms(), "", "real").await;
    eventually("the meter knows the node", PATIENCE, || async { known(&stack, &n.name).await.then_some(()) }).await.unwrap();
    let now = kit::now_ms();
    assert_eq!(report(&http, &url, n.ip, &n.secret, 1000, now).await.1["outcome"], "baseline");

    // An hour ahead: 422 with a message that says what is wrong; nothing recorded.
    let (s, v, _) = report(&http, &url, n.ip, &n.secret, 9000, now + 3_600_000).await;
    assert_eq!(s, 422, "{v}");
    let msg = v["message"].as_str().unwrap_or("");
    assert!(msg.contains("ahead of the meter's clock") && msg.contains("node's clock"), "{v}");
    assert_eq!(stack.meter_usage(&n.name).await.unwrap()["reports"], 1);
    // A little ahead (inside PN_MAX_CLOCK_AHEAD_MS) is accepted.
    assert_eq!(report(&http, &url, n.ip, &n.secret, 1500, now + 60_000).await.1["deltaBytes"], 500);
    // The node's clock steps back an hour: higher counters still count.
    let (s, v, _) = report(&http, &url, n.ip, &n.secret, 4000, now - 3_600_000).await;
    assert_eq!((s, v["outcome"].as_str(), v["deltaBytes"].as_u64()), (200, Some("counted"), Some(2500)), "{v}");
    // A late retry (counters not higher, older `at`) is stale and bills nothing.
    let (s, v, _) = report(&http, &url, n.ip, &n.secret, 1500, now - 7_200_000).await;
    assert_eq!((s, v["outcome"].as_str(), v["usedBytes"].as_u64()), (200, Some("stale"), Some(3000)), "{v}");
}

/// A client whose connections come from `ip` (a loopback address of its own).
fn client_from(ip: Ipv4Addr) -> reqwest::Client {
    reqwest::Client::builder().local_address(IpAddr::V4(ip)).timeout(Duration::from_secs(20)).build().unwrap()
}

#[tokio::test]
async fn a_flood_of_bad_credentials_is_cut_per_source_before_any_work() {
    let stack = Stack::builder()
        .only(&["svc-meter"])
        .env("svc-meter", "PN_MIN_REPORT_INTERVAL_MS", "0")
        .env("svc-meter", "PN_AUTH_FAIL_BURST", "5")
        .env("svc-meter", "PN_AUTH_FAIL_PER_SEC", "0.05")
        .start()
        .await
        .unwrap();
    let bus = bus(&stack).await;
    let url = stack.meter_url.clone();
    let n = Node::new();
    deployed(&bus, &n.name, &n.ip.to_string(), &n.secret, kit::now_ms(), "", "real").await;
    eventually("the meter knows the node", PATIENCE, || async { known(&stack, &n.name).await.then_some(()) }).await.unwrap();
    let now = kit::now_ms();

    // One source floods: wrong secrets for the node, unknown addresses, no credentials.
    let attacker = client_from(Ipv4Addr::new(127, 0, 0, 2));
    let (mut unauthorized, mut limited) = (0, 0);
    for i in 0..60u32 {
        let r = match i % 3 {
            0 => report(&attacker, &url, n.ip, &testkit::rand_hex(32), 1, now).await,
            1 => report(&attacker, &url, Ipv4Addr::new(192, 0, 2, (i % 250) as u8 + 1), &n.secret, 1, now).await,
            _ => {
                let r = attacker.post(format!("{url}/slave/usage")).body("{}").send().await.unwrap();
                let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap_or("").to_string());
                (r.status().as_u16(), r.json().await.unwrap_or(Value::Null), retry)
            }
        };
        match r {
            (401, _, _) => unauthorized += 1,
            (429, v, retry) => {
                assert!(v["message"].as_str().unwrap_or("").contains("failed authentications"), "{v}");
                assert!(retry.is_some_and(|s| s.parse::<u64>().is_ok_and(|s| s >= 1)));
                limited += 1;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert!(unauthorized <= 6, "{unauthorized} x 401 before the source was cut off");
    assert!(limited >= 54, "{limited} x 429");
    // A good node from another source is served meanwhile.
    let node = client_from(Ipv4Addr::new(127, 0, 0, 3));
    assert_eq!(report(&node, &url, n.ip, &n.secret, 1000, now).await.1["outcome"], "baseline");
    assert_eq!(report(&node, &url, n.ip, &n.secret, 1500, now + 1).await.1["deltaBytes"], 500);

    // Many sources, each within its budget, all with wrong secrets for the node: 401 each, and
    // one warning line for the node (with the count), not one per attempt.
    for k in 10..20u8 {
        let c = client_from(Ipv4Addr::new(127, 0, 0, k));
        for _ in 0..3 {
            assert_eq!(report(&c, &url, n.ip, &testkit::rand_hex(32), 1, now).await.0, 401);
        }
    }
    let log = std::fs::read_to_string(stack.log_path("svc-meter")).unwrap();
    let lines = log.lines().filter(|l| l.contains("usage reports with a wrong secret") && l.contains(&n.name)).count();
    assert_eq!(lines, 1, "wrong-secret warnings are rate-limited per node");
    let (s, v, _) = report(&node, &url, n.ip, &n.secret, 2000, now + 2).await;
    assert_eq!((s, v["usedBytes"].as_u64()), (200, Some(1000)), "{v}");
}
