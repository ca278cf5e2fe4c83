//! Where the operator commands find the stack: `./.pn/stack.json` written by `pnctl up`, or
//! explicit `--nats-url` / `--meter-url` / `--center-url` flags (which win). Also the small
//! HTTP and NATS client helpers the commands share.
//!
//! Never starts anything: a missing stack is a clear error naming `pnctl up` and the flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::stack::StackFile;

/// The URLs a command may need; each is optional until a command asks for it.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    pub data_dir: PathBuf,
    pub nats_url: Option<String>,
    pub meter_url: Option<String>,
    pub center_url: Option<String>,
}

impl Endpoints {
    /// Reads `<data_dir>/stack.json` when present; flags override what it says.
    pub fn resolve(
        data_dir: &Path,
        nats_url: Option<String>,
        meter_url: Option<String>,
        center_url: Option<String>,
    ) -> Endpoints {
        let stack = StackFile::read(data_dir).ok();
        let from = |f: fn(&StackFile) -> &String| stack.as_ref().map(f).filter(|s| !s.is_empty()).cloned();
        Endpoints {
            data_dir: data_dir.to_path_buf(),
            nats_url: nats_url.or_else(|| from(|s| &s.nats_url)),
            meter_url: meter_url.or_else(|| from(|s| &s.meter_url)),
            center_url: center_url.or_else(|| from(|s| &s.center_url)),
        }
    }

    fn missing(&self, what: &str, flag: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "no {what}: {} has no running stack (start one with `pnctl up --detach`) and {flag} was not given",
            self.data_dir.join("stack.json").display()
        )
    }

    pub fn nats(&self) -> anyhow::Result<&str> {
        self.nats_url.as_deref().ok_or_else(|| self.missing("NATS URL", "--nats-url"))
    }

    pub fn meter(&self) -> anyhow::Result<&str> {
        self.meter_url.as_deref().ok_or_else(|| self.missing("meter URL", "--meter-url"))
    }

    pub fn center(&self) -> anyhow::Result<&str> {
        self.center_url.as_deref().ok_or_else(|| self.missing("center URL", "--center-url"))
    }

    /// Connects to NATS and returns the client and its JetStream context.
    pub async fn connect(&self) -> anyhow::Result<(async_nats::Client, async_nats::jetstream::Context)> {
        connect_nats(self.nats()?).await
    }
}

pub async fn connect_nats(url: &str) -> anyhow::Result<(async_nats::Client, async_nats::jetstream::Context)> {
    let opts = async_nats::ConnectOptions::new().name("pnctl").connection_timeout(Duration::from_secs(3));
    let client = tokio::time::timeout(Duration::from_secs(5), opts.connect(url))
        .await
        .map_err(|_| anyhow::anyhow!("NATS at {url} did not answer within 5s (is the stack up? `pnctl up`)"))?
        .with_context(|| format!("cannot reach NATS at {url} (is the stack up? `pnctl up`)"))?;
    let js = async_nats::jetstream::new(client.clone());
    Ok((client, js))
}

/// A plain HTTP client for loopback calls (sim admin, meter, ops endpoints).
pub fn http() -> anyhow::Result<reqwest::Client> {
    kit::init_crypto();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .context("http client")
}

/// GET `url`: the status and the body as JSON (`Null` when it is not JSON).
pub async fn get_json(http: &reqwest::Client, url: &str) -> anyhow::Result<(u16, Value)> {
    let resp = http.get(url).send().await.with_context(|| format!("GET {url}"))?;
    let status = resp.status().as_u16();
    let text = resp.text().await.with_context(|| format!("GET {url}: reading the body"))?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

/// POST a JSON body; fails on a non-2xx status with the server's words.
pub async fn post_json(http: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<Value> {
    let resp = http.post(url).json(body).send().await.with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("POST {url}: {status}: {}", text.chars().take(300).collect::<String>());
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// True when GET `url` answers 2xx within the client's timeout.
pub async fn answers(http: &reqwest::Client, url: &str) -> bool {
    matches!(http.get(url).timeout(Duration::from_secs(2)).send().await, Ok(r) if r.status().is_success())
}
