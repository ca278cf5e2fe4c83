//! `pnctl tail`: the live event feed, decoded — `pn.op.>` (PN_OPS), `meter.>` (PN_METER)
//! and replay requests on `pn.replay.>` — one line (or one JSON object) per event.
//! Read-only: ephemeral ordered consumers and a plain subscription, nothing durable.

use std::pin::Pin;

use anyhow::Context;
use async_nats::jetstream::consumer::DeliverPolicy;
use futures::{Stream, StreamExt};
use proto::{Event, subjects};
use serde_json::json;

use crate::endpoints::Endpoints;
use crate::events;

#[derive(Debug, Clone, Default)]
pub struct TailOptions {
    /// Start at the beginning of the streams instead of now.
    pub all: bool,
    /// Stop after this many events.
    pub count: Option<usize>,
    pub json: bool,
}

/// One line of the feed.
struct Item {
    subject: String,
    published_ms: i64,
    payload: bytes::Bytes,
    replay: bool,
}

type Feed = Pin<Box<dyn Stream<Item = Item> + Send>>;

async fn stream_feed(js: &async_nats::jetstream::Context, stream: &str, filter: &str, all: bool) -> anyhow::Result<Feed> {
    let consumer = crate::endpoints::ordered_consumer(js, stream, filter, if all { DeliverPolicy::All } else { DeliverPolicy::New }).await?;
    let msgs = consumer.messages().await.with_context(|| format!("read {stream}"))?;
    Ok(Box::pin(msgs.filter_map(|m| async move {
        let m = m.ok()?;
        let published_ms = m.info().map(|i| (i.published.unix_timestamp_nanos() / 1_000_000) as i64).unwrap_or_else(|_| kit::now_ms());
        Some(Item { subject: m.subject.to_string(), published_ms, payload: m.payload.clone(), replay: false })
    })))
}

/// Runs until `count` events were shown or the process is interrupted.
pub async fn run(ep: &Endpoints, opts: &TailOptions) -> anyhow::Result<()> {
    let (client, js) = ep.connect().await?;
    let ops = stream_feed(&js, subjects::OPS_STREAM, subjects::OPS_ALL, opts.all).await?;
    let meter = stream_feed(&js, subjects::METER_STREAM, subjects::METER_ALL, opts.all).await?;
    // PN_REPLAY is a work queue (its consumers take the messages); a plain subscription sees
    // the requests as they are published without taking them.
    let replays = client.subscribe(subjects::REPLAY_ALL).await.context("subscribe pn.replay.>")?;
    let replays: Feed = Box::pin(replays.map(|m| Item {
        subject: m.subject.to_string(),
        published_ms: kit::now_ms(),
        payload: m.payload,
        replay: true,
    }));
    let mut feed = futures::stream::select_all([ops, meter, replays]);
    if !opts.json {
        eprintln!("following pn.op.>, meter.> and pn.replay.> (Ctrl-C stops)");
    }
    let mut shown = 0usize;
    let mut stop = std::pin::pin!(crate::stack::stop_signal());
    loop {
        if opts.count.is_some_and(|c| shown >= c) {
            return Ok(());
        }
        let item = tokio::select! {
            i = feed.next() => match i { Some(i) => i, None => return Ok(()) },
            _ = &mut stop => return Ok(()),
        };
        println!("{}", render(&item, opts.json));
        shown += 1;
    }
}

fn render(item: &Item, json_out: bool) -> String {
    let at = events::rfc3339_ms(item.published_ms);
    if item.replay {
        let op = String::from_utf8_lossy(&item.payload).trim().to_string();
        return if json_out {
            json!({ "subject": item.subject, "at": at, "event": "replay", "operationId": op }).to_string()
        } else {
            format!("{at}  {:<9} {} op={op}", "replay", item.subject)
        };
    }
    match Event::from_bytes(&item.payload) {
        Ok(body) => {
            if json_out {
                let mut v = events::to_json(&body);
                if let serde_json::Value::Object(m) = &mut v {
                    m.insert("subject".into(), json!(item.subject));
                    m.insert("at".into(), json!(at));
                }
                v.to_string()
            } else {
                format!("{at}  {}", events::summary(&body))
            }
        }
        Err(e) => {
            if json_out {
                json!({ "subject": item.subject, "at": at, "event": "undecodable", "error": e.to_string() }).to_string()
            } else {
                format!("{at}  undecodable on {}: {e}", item.subject)
            }
        }
    }
}
