//! The plain HTTP helpers every command uses (loopback calls to the sim's admin API, the meter,
//! the services' ops listeners). No knowledge of the stack, so that `stack` and `endpoints` both
//! use it without depending on each other.

use std::time::Duration;

use anyhow::{Context, bail};
use secrecy::SecretString;
use serde_json::Value;

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

/// Like [`get_json`], with `Authorization: Bearer <token>` (the meter's internal API).
pub async fn get_json_bearer(http: &reqwest::Client, url: &str, token: &SecretString) -> anyhow::Result<(u16, Value)> {
    use secrecy::ExposeSecret;
    let resp = http.get(url).bearer_auth(token.expose_secret()).send().await.with_context(|| format!("GET {url}"))?;
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
