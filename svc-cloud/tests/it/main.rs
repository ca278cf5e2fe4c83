//! The `hetzner` provider against an HTTP stub built from the Hetzner Cloud API's documented
//! request and response shapes (docs.hetzner.cloud: servers, server_types, images). Hetzner
//! cannot be reached from here; the stub checks what we send as strictly as the API would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use secrecy::SecretString;
use serde_json::{Value, json};
use svc_cloud::provider::hetzner::{Hetzner, HetznerSettings};
use svc_cloud::provider::{Provider, ProviderError};

const TOKEN: &str = "hcloud-test-token-0123456789";
const PUBKEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOr7o6ZYkD6O3h4b9yX1lGd0e0q0m0d0l0W0S0a0b0c0 admin@pn";

#[derive(Default)]
struct Cloud {
    servers: Vec<Value>,
    next_id: u64,
    created_bodies: Vec<Value>,
    fail_next_create: Option<(u16, &'static str)>,
}

type S = Arc<Mutex<Cloud>>;

fn authorized(h: &HeaderMap) -> bool {
    h.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {TOKEN}"))
}

fn unauthorized() -> (StatusCode, Json<Value>) {
    (StatusCode::UNAUTHORIZED, Json(json!({"error": {"code": "unauthorized", "message": "unable to authenticate"}})))
}

fn server(id: u64, name: &str, body: &Value) -> Value {
    json!({
        "id": id, "name": name, "status": "running", "created": "2026-11-25T10:00:00+00:00",
        "public_net": {"ipv4": {"id": id, "ip": format!("203.0.113.{id}"), "blocked": false, "dns_ptr": "static.example"}, "ipv6": null, "floating_ips": [], "firewalls": []},
        "server_type": {"id": 1, "name": body["server_type"], "cores": 2, "memory": 4.0, "disk": 40},
        "datacenter": {"id": 1, "name": format!("{}-dc14", body["location"].as_str().unwrap_or("")), "location": {"id": 1, "name": body["location"], "city": "Falkenstein", "country": "DE"}},
        "image": {"id": 114690387, "type": "system", "name": body["image"], "os_flavor": "ubuntu", "os_version": "24.04"},
        "labels": body["labels"], "locked": false, "protection": {"delete": false, "rebuild": false}
    })
}

async fn list_servers(State(s): State<S>, h: HeaderMap, Query(q): Query<std::collections::HashMap<String, String>>) -> (StatusCode, Json<Value>) {
    if !authorized(&h) {
        return unauthorized();
    }
    let c = s.lock().unwrap();
    let items: Vec<Value> = c.servers.iter().filter(|v| q.get("name").is_none_or(|n| v["name"] == n.as_str())).cloned().collect();
    let n = items.len();
    (StatusCode::OK, Json(json!({"servers": items, "meta": {"pagination": {"page": 1, "per_page": 25, "previous_page": null, "next_page": null, "last_page": 1, "total_entries": n}}})))
}

async fn create_server(State(s): State<S>, h: HeaderMap, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    if !authorized(&h) {
        return unauthorized();
    }
    let mut c = s.lock().unwrap();
    if let Some((st, code)) = c.fail_next_create.take() {
        return (StatusCode::from_u16(st).unwrap(), Json(json!({"error": {"code": code, "message": "server type unavailable in location"}})));
    }
    for field in ["name", "server_type", "image", "location"] {
        if !body[field].is_string() {
            return (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"error": {"code": "invalid_input", "message": format!("{field} is required")}})));
        }
    }
    c.next_id += 1;
    let id = c.next_id;
    let srv = server(id, body["name"].as_str().unwrap(), &body);
    c.servers.push(srv.clone());
    c.created_bodies.push(body);
    (StatusCode::CREATED, Json(json!({"server": srv, "action": {"id": 1, "command": "create_server", "status": "running"}, "next_actions": [], "root_password": null})))
}

async fn get_server(State(s): State<S>, h: HeaderMap, Path(id): Path<u64>) -> (StatusCode, Json<Value>) {
    if !authorized(&h) {
        return unauthorized();
    }
    let c = s.lock().unwrap();
    match c.servers.iter().find(|v| v["id"] == id) {
        Some(v) => (StatusCode::OK, Json(json!({"server": v}))),
        None => (StatusCode::NOT_FOUND, Json(json!({"error": {"code": "not_found", "message": "server not found"}}))),
    }
}

async fn delete_server(State(s): State<S>, h: HeaderMap, Path(id): Path<u64>) -> (StatusCode, Json<Value>) {
    if !authorized(&h) {
        return unauthorized();
    }
    let mut c = s.lock().unwrap();
    c.servers.retain(|v| v["id"] != id);
    (StatusCode::OK, Json(json!({"action": {"id": 2, "command": "delete_server", "status": "running"}})))
}

async fn server_types(h: HeaderMap) -> (StatusCode, Json<Value>) {
    if !authorized(&h) {
        return unauthorized();
    }
    let price = |loc: &str, gross: &str, tb: u64| json!({"location": loc, "price_hourly": {"net": "0.0050", "gross": "0.0060"}, "price_monthly": {"net": gross, "gross": gross}, "included_traffic": tb * (1u64 << 40), "price_per_tb_traffic": {"net": "1.00", "gross": "1.19"}});
    (StatusCode::OK, Json(json!({"server_types": [
        {"id": 1, "name": "cx22", "cores": 2, "memory": 4.0, "disk": 40, "deprecated": false, "architecture": "x86", "prices": [price("fsn1", "4.51", 20), price("ash", "5.99", 1)]},
        {"id": 2, "name": "cx32", "cores": 4, "memory": 8.0, "disk": 80, "deprecated": false, "architecture": "x86", "prices": [price("fsn1", "8.09", 20), price("ash", "9.99", 2)]},
        {"id": 3, "name": "cx11", "cores": 1, "memory": 2.0, "disk": 20, "deprecated": true, "architecture": "x86", "prices": [price("fsn1", "1.00", 20)]}
    ], "meta": {"pagination": {"page": 1, "per_page": 50, "total_entries": 3}}})))
}

async fn images(h: HeaderMap) -> (StatusCode, Json<Value>) {
    if !authorized(&h) {
        return unauthorized();
    }
    (StatusCode::OK, Json(json!({"images": [
        {"id": 1, "type": "system", "status": "available", "name": "debian-12", "os_flavor": "debian", "os_version": "12", "architecture": "x86"},
        {"id": 2, "type": "system", "status": "available", "name": "ubuntu-22.04", "os_flavor": "ubuntu", "os_version": "22.04", "architecture": "x86"},
        {"id": 3, "type": "system", "status": "available", "name": "ubuntu-24.04", "os_flavor": "ubuntu", "os_version": "24.04", "architecture": "x86"}
    ]})))
}

async fn stub() -> (String, S) {
    let state: S = Arc::new(Mutex::new(Cloud::default()));
    let app = axum::Router::new()
        .route("/v1/servers", get(list_servers).post(create_server))
        .route("/v1/servers/{id}", get(get_server).delete(delete_server))
        .route("/v1/server_types", get(server_types))
        .route("/v1/images", get(images))
        .with_state(state.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (format!("http://{addr}/v1"), state)
}

fn provider(url: &str, token: &str) -> Hetzner {
    Hetzner::new(&HetznerSettings {
        api_url: url.into(),
        token: Some(SecretString::from(token)),
        admin_public_key: PUBKEY.into(),
        timeout_ms: 5000,
    })
    .unwrap()
}

#[tokio::test]
async fn hetzner_chooses_creates_probes_and_deletes() {
    let (url, state) = stub().await;
    let p = provider(&url, TOKEN);
    // 950 GiB sold × headroom needs more than the 1 TiB of cx22 in ash: cx32 (2 TiB) wins there.
    let c = p.choose("ash", 1200 << 30).await.unwrap();
    assert_eq!((c.plan.as_str(), c.image.as_str()), ("cx32", "ubuntu-24.04"));
    let c = p.choose("fsn1", 1200 << 30).await.unwrap();
    assert_eq!(c.plan, "cx22", "cheapest non-deprecated type covering the quota");
    assert!(matches!(p.choose("ash", 3 << 40).await, Err(ProviderError::NoFit(_))));
    assert!(matches!(p.choose("hel1", 1).await, Err(ProviderError::NoFit(_))));

    assert!(p.find_by_name("pn-s1").await.unwrap().is_empty());
    let v = p.create(&c, "pn-s1").await.unwrap();
    assert_eq!(v.name, "pn-s1");
    assert!(v.is_running());
    assert_eq!(v.ipv4.as_deref(), Some("203.0.113.1"));
    let body = state.lock().unwrap().created_bodies[0].clone();
    let ud = body["user_data"].as_str().unwrap();
    assert!(ud.starts_with("#cloud-config"), "{ud}");
    assert!(ud.contains(PUBKEY) && !ud.contains("PRIVATE") && ud.contains("ssh_pwauth: false"), "{ud}");
    assert_eq!(body["labels"]["managed-by"], "pnp");
    let found = p.find_by_name("pn-s1").await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(p.get(&v.id).await.unwrap().id, v.id);
    p.delete(&v.id).await.unwrap();
    assert!(p.find_by_name("pn-s1").await.unwrap().is_empty());
}

#[tokio::test]
async fn hetzner_errors_are_typed_and_carry_no_token() {
    let (url, state) = stub().await;
    let p = provider(&url, TOKEN);
    let c = p.choose("fsn1", 1).await.unwrap();
    state.lock().unwrap().fail_next_create = Some((412, "resource_unavailable"));
    let e = p.create(&c, "pn-s2").await.unwrap_err();
    assert!(matches!(e, ProviderError::Transient(_)), "{e:?}");
    state.lock().unwrap().fail_next_create = Some((429, "rate_limit_exceeded"));
    assert!(matches!(p.create(&c, "pn-s2").await, Err(ProviderError::Transient(_))));
    state.lock().unwrap().fail_next_create = Some((422, "invalid_input"));
    assert!(matches!(p.create(&c, "pn-s2").await, Err(ProviderError::Permanent(_))));
    let bad = provider(&url, "wrong-token-0000000000");
    let e = bad.find_by_name("pn-s2").await.unwrap_err();
    assert!(matches!(e, ProviderError::Permanent(_)));
    assert!(!e.to_string().contains("wrong-token") && !e.to_string().contains(TOKEN), "{e}");
    assert!(matches!(p.get("999").await, Err(ProviderError::NotFound(_))));
}

#[test]
fn hetzner_refuses_a_private_key_as_the_admin_key() {
    let r = Hetzner::new(&HetznerSettings {
        api_url: "http://127.0.0.1:1/v1".into(),
        token: Some(SecretString::from(TOKEN)),
        admin_public_key: "-----BEGIN OPENSSH PRIVATE KEY-----".into(),
        timeout_ms: 1000,
    });
    assert!(r.is_err());
    let r = Hetzner::new(&HetznerSettings { token: None, admin_public_key: PUBKEY.into(), ..Default::default() });
    assert!(r.is_err());
}
