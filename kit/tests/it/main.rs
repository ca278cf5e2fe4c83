//! kit against a real nats-server with JetStream: streams, dedup, redelivery, progress acks,
//! poison → pn.op.failed; and the redaction guarantee for every type holding a secret.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::StreamExt;
use kit::bus::{Bus, ConsumerSpec, HandleError, Incoming, LoopConfig, Meta, run_loop};
use proto::{Body, Event, OpClaimed, Operation, Stage, subjects};
use testkit::{Nats, eventually};
use tokio_util::sync::CancellationToken;

async fn bus(n: &Nats) -> Bus {
    let b = Bus::connect(&n.url(), "kit-test", Duration::from_secs(10)).await.unwrap();
    b.ensure_streams().await.unwrap();
    b
}

fn claimed(op: &str) -> Body {
    Body::Claimed(OpClaimed { op: Some(Operation { operation_id: op.into(), sub_id: "s1".into(), ..Default::default() }) })
}

async fn count(b: &Bus, stream: &str, filter: &str) -> u64 {
    let mut s = b.js.get_stream(stream).await.unwrap();
    let info = s.info().await.unwrap();
    if filter.is_empty() {
        return info.state.messages;
    }
    let c = s
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig { filter_subject: filter.into(), ..Default::default() })
        .await
        .unwrap();
    let mut c = c;
    c.info().await.unwrap().num_pending
}

#[tokio::test]
async fn streams_and_consumers_exist_and_start_twice_is_harmless() {
    let n = Nats::start().unwrap();
    let b = bus(&n).await;
    b.ensure_streams().await.unwrap();
    for s in [subjects::OPS_STREAM, subjects::REPLAY_STREAM, subjects::METER_STREAM] {
        b.js.get_stream(s).await.unwrap();
    }
    let cfg = LoopConfig::new(Stage::Cloud, 4, Duration::from_secs(5));
    let spec = ConsumerSpec::ops("t-claimed", subjects::CLAIMED, &cfg);
    b.consumer(&spec).await.unwrap();
    b.consumer(&spec).await.unwrap();
    let mut s = b.js.get_stream(subjects::OPS_STREAM).await.unwrap();
    let info = s.info().await.unwrap();
    assert_eq!(info.config.subjects, vec!["pn.op.>".to_string()]);
    assert!(b.streams_present().await);
    let names: Vec<String> = s.consumer_names().collect::<Vec<_>>().await.into_iter().map(Result::unwrap).collect();
    assert_eq!(names, vec!["t-claimed".to_string()]);
}

#[tokio::test]
async fn same_msg_id_is_stored_once_with_readable_headers() {
    let n = Nats::start().unwrap();
    let b = bus(&n).await;
    let meta = Meta::outcome("op-1", "s1", Stage::Claim, 1);
    for _ in 0..3 {
        b.publish(subjects::op_event(subjects::CLAIMED, "op-1"), claimed("op-1"), &meta).await.unwrap();
    }
    let meta2 = Meta::outcome("op-1", "s1", Stage::Claim, 2);
    b.publish(subjects::op_event(subjects::CLAIMED, "op-1"), claimed("op-1"), &meta2).await.unwrap();
    assert_eq!(count(&b, subjects::OPS_STREAM, "").await, 2);
    let s = b.js.get_stream(subjects::OPS_STREAM).await.unwrap();
    let m = s.get_raw_message(1).await.unwrap();
    assert_eq!(m.headers.get("Nats-Msg-Id").unwrap().as_str(), "op-1.claim.1");
    assert_eq!(m.headers.get("Pn-Op").unwrap().as_str(), "op-1");
    assert_eq!(m.headers.get("Pn-Stage").unwrap().as_str(), "claim");
    assert_eq!(m.headers.get("Content-Type").unwrap().as_str(), "application/protobuf; proto=pn.v1.OpClaimed");
    assert!(m.headers.get("traceparent").unwrap().as_str().starts_with("00-"));
    assert!(matches!(Event::from_bytes(&m.payload), Ok(Body::Claimed(_))));
}

#[tokio::test]
async fn unacked_message_is_redelivered_and_progress_acks_hold_it() {
    let n = Nats::start().unwrap();
    let b = bus(&n).await;
    let ack_wait = Duration::from_millis(900);
    // A handler that takes 3× AckWait: with progress acks it must run exactly once.
    let mut cfg = LoopConfig::new(Stage::Cloud, 2, ack_wait);
    cfg.max_deliver = 5;
    let consumer = b.consumer(&ConsumerSpec::ops("slow", subjects::CLAIMED, &cfg)).await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let c2 = calls.clone();
    let handler = move |_m: Incoming| {
        let c = c2.clone();
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(2700)).await;
            Ok::<(), HandleError>(())
        }
    };
    let token = CancellationToken::new();
    let t = tokio::spawn(run_loop(b.clone(), consumer, cfg.clone(), Arc::new(handler), token.clone().cancelled_owned()));
    b.publish(subjects::op_event(subjects::CLAIMED, "op-slow"), claimed("op-slow"), &Meta::outcome("op-slow", "s", Stage::Claim, 1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "progress acks must keep the slow message from redelivery");
    token.cancel();
    t.await.unwrap();

    // Without any ack (a raw consumer that never acks), the server redelivers after AckWait.
    let raw = b.consumer(&ConsumerSpec::ops("raw", subjects::CLAIMED, &cfg)).await.unwrap();
    let mut msgs = raw.fetch().max_messages(1).expires(Duration::from_secs(2)).messages().await.unwrap();
    let first = msgs.next().await.unwrap().unwrap();
    assert_eq!(first.info().unwrap().delivered, 1);
    drop(msgs);
    tokio::time::sleep(ack_wait + Duration::from_millis(300)).await;
    let mut again = raw.fetch().max_messages(1).expires(Duration::from_secs(3)).messages().await.unwrap();
    let second = again.next().await.unwrap().unwrap();
    assert_eq!(second.info().unwrap().delivered, 2);
}

#[tokio::test]
async fn a_message_that_keeps_failing_ends_in_pn_op_failed() {
    let n = Nats::start().unwrap();
    let b = bus(&n).await;
    let mut cfg = LoopConfig::new(Stage::Deploy, 2, Duration::from_secs(5));
    cfg.max_deliver = 3;
    let consumer = b.consumer(&ConsumerSpec::ops("failing", subjects::CLAIMED, &cfg)).await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let c2 = calls.clone();
    let handler = move |m: Incoming| {
        let c = c2.clone();
        async move {
            m.decode()?;
            c.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(HandleError::retry("node unreachable", Duration::from_millis(100)))
        }
    };
    let token = CancellationToken::new();
    let t = tokio::spawn(run_loop(b.clone(), consumer, cfg, Arc::new(handler), token.clone().cancelled_owned()));
    b.publish(subjects::op_event(subjects::CLAIMED, "op-bad"), claimed("op-bad"), &Meta::outcome("op-bad", "s", Stage::Claim, 1))
        .await
        .unwrap();
    // Garbage with an operation id in its subject is poison: it fails at once.
    b.js.publish(subjects::op_event(subjects::CLAIMED, "op-garbage"), vec![0xff, 0x01, 0x02].into()).await.unwrap().await.unwrap();
    let s = b.js.get_stream(subjects::OPS_STREAM).await.unwrap();
    let bb = b.clone();
    let failed = eventually("pn.op.failed.op-bad", Duration::from_secs(15), || {
        let s = s.clone();
        async move { s.get_last_raw_message_by_subject("pn.op.failed.op-bad").await.ok() }
    })
    .await
    .unwrap();
    let Ok(Body::Failed(f)) = Event::from_bytes(&failed.payload) else { panic!("not an OpFailed") };
    assert_eq!(f.stage, "deploy");
    assert!(f.reason.contains("node unreachable"), "{}", f.reason);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let g = eventually("pn.op.failed.op-garbage", Duration::from_secs(10), || {
        let s = s.clone();
        async move { s.get_last_raw_message_by_subject("pn.op.failed.op-garbage").await.ok() }
    })
    .await
    .unwrap();
    let Ok(Body::Failed(g)) = Event::from_bytes(&g.payload) else { panic!("not an OpFailed") };
    assert!(g.reason.contains("undecodable"), "{}", g.reason);
    token.cancel();
    t.await.unwrap();
    drop(bb);
}

#[tokio::test]
async fn a_reports_only_consumer_never_fails_an_operation() {
    let n = Nats::start().unwrap();
    let b = bus(&n).await;
    let mut stage_cfg = LoopConfig::new(Stage::Claim, 2, Duration::from_secs(5));
    stage_cfg.max_deliver = 2;
    // The durable existed as a stage consumer (delivery limit 2); reports-only lifts the limit.
    b.consumer(&ConsumerSpec::ops("reports", subjects::CLAIMED, &stage_cfg)).await.unwrap();
    let cap = Duration::from_millis(400);
    let cfg = stage_cfg.clone().reports_only(cap);
    let mut consumer = b.consumer(&ConsumerSpec::ops("reports", subjects::CLAIMED, &cfg)).await.unwrap();
    assert_eq!(consumer.info().await.unwrap().config.max_deliver, -1);

    const RETRIES: usize = 6;
    let seen: Arc<std::sync::Mutex<Vec<(String, i64, std::time::Instant)>>> = Arc::default();
    let s2 = seen.clone();
    let handler = move |m: Incoming| {
        let seen = s2.clone();
        async move {
            let op = m.subject_op_id().unwrap_or("").to_string();
            let retries = {
                let mut s = seen.lock().unwrap();
                s.push((op.clone(), m.delivered, std::time::Instant::now()));
                s.iter().filter(|(o, _, _)| *o == op).count()
            };
            m.decode()?;
            match op.as_str() {
                "op-center-down" if retries < RETRIES => Err(HandleError::retry("center: transient: HTTP 503", Duration::from_millis(50))),
                "op-hopeless" => Err(HandleError::fail("this report cannot be made")),
                _ => Ok(()),
            }
        }
    };
    let token = CancellationToken::new();
    let t = tokio::spawn(run_loop(b.clone(), consumer.clone(), cfg, Arc::new(handler), token.clone().cancelled_owned()));
    for op in ["op-center-down", "op-hopeless"] {
        b.publish(subjects::op_event(subjects::CLAIMED, op), claimed(op), &Meta::outcome(op, "s", Stage::Claim, 1)).await.unwrap();
    }
    // Garbage is terminated too, without a publish.
    b.js.publish(subjects::op_event(subjects::CLAIMED, "op-garbage"), vec![0xff, 0x01].into()).await.unwrap().await.unwrap();
    let calls = |op: &str| seen.lock().unwrap().iter().filter(|(o, _, _)| o == op).count();
    eventually("the retried report succeeds past max_deliver", Duration::from_secs(30), || async {
        (calls("op-center-down") >= RETRIES).then_some(())
    })
    .await
    .unwrap();
    eventually("the consumer has nothing left", Duration::from_secs(10), || {
        let mut c = consumer.clone();
        async move {
            let i = c.info().await.ok()?;
            (i.num_ack_pending == 0 && i.num_pending == 0).then_some(())
        }
    })
    .await
    .unwrap();
    // Let any wrongly nak'ed message come back before judging.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(calls("op-center-down"), RETRIES, "retried past the stage's max_deliver of 2, then acked once");
    assert_eq!(calls("op-hopeless"), 1, "a Fail is terminated, not redelivered");
    assert_eq!(calls("op-garbage"), 1, "poison is terminated, not redelivered");
    assert_eq!(count(&b, subjects::OPS_STREAM, "pn.op.failed.>").await, 0, "a reports-only consumer never publishes pn.op.failed");
    // Each redelivery came no sooner than its back-off (doubling from 100 ms, capped at 400 ms).
    let tries: Vec<(i64, std::time::Instant)> =
        seen.lock().unwrap().iter().filter(|(o, _, _)| o == "op-center-down").map(|(_, d, at)| (*d, *at)).collect();
    assert_eq!(tries.iter().map(|(d, _)| *d).collect::<Vec<_>>(), (1..=RETRIES as i64).collect::<Vec<_>>());
    for w in tries.windows(2) {
        let want = kit::bus::retry_backoff(Duration::from_millis(50), w[0].0, cap);
        let gap = w[1].1 - w[0].1;
        assert!(gap + Duration::from_millis(30) >= want, "delivery {} came {gap:?} after the previous one; back-off {want:?}", w[1].0);
    }
    token.cancel();
    t.await.unwrap();
}

#[tokio::test]
async fn nothing_that_holds_a_secret_prints_it() {
    use secrecy::SecretString;
    let secret = "sekrit-claim-token-0123456789";
    let common = kit::config::Common {
        center_token: Some(SecretString::from(secret)),
        seal_key: Some(SecretString::from(secret)),
        ..Default::default()
    };
    let key = kit::seal::SealKey::parse(&kit::seal::SealKey::generate_hex()).unwrap();
    let sealed = key.seal_str(&SecretString::from(secret));
    let identity: kit::center::Identity =
        serde_json::from_value(serde_json::json!({"claimToken": secret, "centerUrl": "http://c", "domain": ""})).unwrap();
    let op = Operation { sealed_claim_token: sealed.clone(), ..Default::default() };
    let rendered = [
        format!("{common:?}"),
        format!("{key:?}"),
        format!("{identity:?}"),
        format!("{op:?}"),
        serde_json::to_string(&op).unwrap(),
        format!("{:?}", Event::new(Body::Claimed(OpClaimed { op: Some(op.clone()) })).to_bytes()),
        String::from_utf8_lossy(&sealed).into_owned(),
    ];
    // tracing fields: capture a formatted event holding the same values.
    let buf = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let b2 = buf.clone();
    let sub = tracing_subscriber::fmt().with_writer(move || Writer(b2.clone())).json().finish();
    tracing::subscriber::with_default(sub, || {
        tracing::info!(?common, ?identity, ?key, "boot");
    });
    let logged = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
    assert!(logged.contains("boot"));
    for r in rendered.iter().chain(std::iter::once(&logged)) {
        assert!(!r.contains(secret), "secret leaked in: {r}");
    }
}

struct Writer(Arc<std::sync::Mutex<Vec<u8>>>);
impl std::io::Write for Writer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
