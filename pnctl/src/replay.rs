//! `pnctl replay <stage> <operationId>`: asks one stage to re-run an operation from its own
//! state — a JetStream publish to `pn.replay.<stage>` whose payload is the plain operation id
//! (the same thing `nats pub pn.replay.<stage> <id>` does). It never touches a stage's state.

use anyhow::{Context, bail};
use proto::{Stage, subjects};
use serde_json::json;

use crate::endpoints::Endpoints;

/// The stages that take replays (the meter has no replay: its ledger is the record).
pub const REPLAYABLE: [Stage; 4] = [Stage::Claim, Stage::Cloud, Stage::Deploy, Stage::Verify];

pub fn parse_stage(s: &str) -> anyhow::Result<Stage> {
    match Stage::parse(s) {
        Some(st) if REPLAYABLE.contains(&st) => Ok(st),
        _ => bail!("stage must be one of claim, cloud, deploy, verify (got {s:?})"),
    }
}

pub async fn run(ep: &Endpoints, stage: &str, operation_id: &str, json_out: bool) -> anyhow::Result<()> {
    let stage = parse_stage(stage)?;
    if !subjects::is_token(operation_id) {
        bail!("{operation_id:?} is not an operation id (letters, digits, '-' and '_' only)");
    }
    let (_c, js) = ep.connect().await?;
    let subject = subjects::replay(stage);
    let ack = js
        .publish(subject.clone(), operation_id.to_string().into())
        .await
        .with_context(|| format!("publish to {subject}"))?
        .await
        .with_context(|| format!("{subject}: no JetStream ack (does the PN_REPLAY stream exist?)"))?;
    if json_out {
        println!(
            "{}",
            json!({ "subject": subject, "operationId": operation_id, "stage": stage.as_str(), "stream": ack.stream, "seq": ack.sequence })
        );
    } else {
        println!("replay of {operation_id} requested at stage {stage} ({subject}, {} seq {})", ack.stream, ack.sequence);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pipeline_stages_replay() {
        for s in ["claim", "cloud", "deploy", "verify"] {
            assert!(parse_stage(s).is_ok(), "{s}");
        }
        for s in ["meter", "x", ""] {
            assert!(parse_stage(s).is_err(), "{s}");
        }
    }
}
