//! The `hetzner` provider (`kit::cloud::hetzner`) against an HTTP stub built from the Hetzner
//! Cloud API's documented request and response shapes (docs.hetzner.cloud: servers,
//! server_types, images, ssh_keys, firewalls). Hetzner cannot be reached from here; the stub
//! checks what we send as strictly as the API would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use secrecy::SecretString;
use serde_json::{Value, json};
use kit::cloud::hetzner::{Hetzner, HetznerSettings};
use kit::cloud::{Port, PortsOpened, Provider, ProviderError};

const TOKEN: &str = "hcloud-test-token-0123456789";
const PUBKEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOr7o6ZYkD6O3h4b9yX1lGd0e0q0m0d0l0W0S0a0b0c0 admin@pn";

#[derive(Default)]
struct Cloud {
    servers: Vec<Value>,
    next_id: u64,
    created_bodies: Vec<Value>,
    fail_next_create: Option<(u16, &'static str)>,
    ssh_keys: Vec<Value>,
    key_posts: usize,
    firewalls: Vec<Value>,
    /// Every firewall write: (path, body).
    firewall_writes: Vec<(String, Value)>,
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
    // ssh_keys: ids or names of keys the project holds (the API refuses unknown ones).
    for k in body["ssh_keys"].as_array().cloned().unwrap_or_default() {
        if !c.ssh_keys.iter().any(|x| x["id"] == k || x["name"] == k) {
            return (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"error": {"code": "invalid_input", "message": "ssh key not found"}})));
        }
    }
    c.next_id += 1;
    let id = c.next_id;
    let srv = server(id, body["name"].as_str().unwrap(), &body);
    c.servers.push(srv.clone());
    // Without an SSH key Hetzner sets a root password (and mails it).
    let root_password = if body["ssh_keys"].as_array().is_some_and(|a| !a.is_empty()) { Value::Null } else { json!("mailed-root-password") };
    c.created_bodies.push(body);
    (StatusCode::CREATED, Json(json!({"server": srv, "action": {"id": 1, "command": "create_server", "status": "running"}, "next_actions": [], "root_password": root_password})))
}

async fn list_keys(State(s): State<S>, h: HeaderMap, Query(q): Query<std::collections::HashMap<String, String>>) -> (StatusCode, Json<Value>) {
    if !authorized(&h) {
        return unauthorized();
    }
    let c = s.lock().unwrap();
    // Pages of two, so the client must follow `next_page`.
    let page: usize = q.get("page").and_then(|p| p.parse().ok()).unwrap_or(1).max(1);
    let items: Vec<Value> = c.ssh_keys.iter().skip((page - 1) * 2).take(2).cloned().collect();
    let next = if page * 2 < c.ssh_keys.len() { json!(page + 1) } else { Value::Null };
    (StatusCode::OK, Json(json!({"ssh_keys": items, "meta": {"pagination": {"page": page, "per_page": 2, "next_page": next, "total_entries": c.ssh_keys.len()}}})))
}

async fn create_key(State(s): State<S>, h: HeaderMap, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    if !authorized(&h) {
        return unauthorized();
    }
    let mut c = s.lock().unwrap();
    c.key_posts += 1;
    let (Some(name), Some(pk)) = (body["name"].as_str(), body["public_key"].as_str()) else {
        return (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"error": {"code": "invalid_input", "message": "name and public_key are required"}})));
    };
    let material = |k: &str| k.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    if c.ssh_keys.iter().any(|k| k["name"] == name || material(k["public_key"].as_str().unwrap_or("")) == material(pk)) {
        return (StatusCode::CONFLICT, Json(json!({"error": {"code": "uniqueness_error", "message": "SSH key with the same name or fingerprint already exists"}})));
    }
    let id = 9000 + c.ssh_keys.len() as u64;
    let key = json!({"id": id, "name": name, "fingerprint": "b7:2f:30:a0:2f:6c:58:6c:21:04:58:61:ba:06:3b:2c", "public_key": pk, "labels": body["labels"], "created": "2026-11-25T10:00:00+00:00"});
    c.ssh_keys.push(key.clone());
    (StatusCode::CREATED, Json(json!({"ssh_key": key})))
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

/// A rule as the API checks it: direction, protocol, a port (or range) for tcp/udp, and
/// source IPs for inbound rules.
fn valid_rule(r: &Value) -> bool {
    let dir_ok = matches!(r["direction"].as_str(), Some("in" | "out"));
    let proto = r["protocol"].as_str().unwrap_or("");
    let proto_ok = matches!(proto, "tcp" | "udp" | "icmp" | "esp" | "gre");
    let port_ok = match proto {
        "tcp" | "udp" => r["port"].as_str().is_some_and(|p| p.split('-').all(|n| n.parse::<u16>().is_ok_and(|n| n > 0))),
        _ => r.get("port").is_none_or(Value::is_null),
    };
    let src_ok = r["direction"] != "in" || r["source_ips"].as_array().is_some_and(|a| !a.is_empty() && a.iter().all(|c| c.as_str().is_some_and(|c| c.contains('/'))));
    dir_ok && proto_ok && port_ok && src_ok
}

fn invalid(msg: &str) -> (StatusCode, Json<Value>) {
    (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"error": {"code": "invalid_input", "message": msg}})))
}

fn action(cmd: &str) -> Value {
    json!({"id": 1, "command": cmd, "status": "running", "progress": 0, "started": "2026-11-25T10:00:00+00:00", "finished": null, "resources": [], "error": null})
}

/// `apply_to` entries: servers that exist.
fn apply_targets(c: &Cloud, apply: &Value) -> Result<Vec<u64>, (StatusCode, Json<Value>)> {
    let mut out = Vec::new();
    for a in apply.as_array().ok_or_else(|| invalid("apply_to must be an array"))? {
        let id = (a["type"] == "server").then(|| a["server"]["id"].as_u64()).flatten().ok_or_else(|| invalid("apply_to: type server with server.id"))?;
        if !c.servers.iter().any(|s| s["id"] == id) {
            return Err((StatusCode::NOT_FOUND, Json(json!({"error": {"code": "not_found", "message": "server not found"}}))));
        }
        out.push(id);
    }
    Ok(out)
}

async fn list_firewalls(State(s): State<S>, h: HeaderMap, Query(q): Query<std::collections::HashMap<String, String>>) -> (StatusCode, Json<Value>) {
    if !authorized(&h) {
        return unauthorized();
    }
    let c = s.lock().unwrap();
    let items: Vec<Value> = c.firewalls.iter().filter(|f| q.get("name").is_none_or(|n| f["name"] == n.as_str())).cloned().collect();
    (StatusCode::OK, Json(json!({"firewalls": items, "meta": {"pagination": {"page": 1, "per_page": 25, "previous_page": null, "next_page": null, "last_page": 1, "total_entries": items.len()}}})))
}

async fn create_firewall(State(s): State<S>, h: HeaderMap, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    if !authorized(&h) {
        return unauthorized();
    }
    let mut c = s.lock().unwrap();
    let Some(name) = body["name"].as_str().filter(|n| !n.is_empty()) else { return invalid("name is required") };
    if c.firewalls.iter().any(|f| f["name"] == name) {
        return (StatusCode::CONFLICT, Json(json!({"error": {"code": "uniqueness_error", "message": "name is already used"}})));
    }
    let rules = body["rules"].as_array().cloned().unwrap_or_default();
    if !rules.iter().all(valid_rule) {
        return invalid("invalid rule");
    }
    let targets = match apply_targets(&c, body.get("apply_to").unwrap_or(&json!([]))) {
        Ok(t) => t,
        Err(e) => return e,
    };
    let id = 900 + c.firewalls.len() as u64;
    let applied: Vec<Value> = targets.iter().map(|t| json!({"type": "server", "server": {"id": t}})).collect();
    let fw = json!({"id": id, "name": name, "labels": body["labels"], "rules": rules, "applied_to": applied, "created": "2026-11-25T10:00:00+00:00"});
    c.firewalls.push(fw.clone());
    c.firewall_writes.push(("/firewalls".into(), body.clone()));
    (StatusCode::CREATED, Json(json!({"firewall": fw, "actions": [action("apply_firewall")]})))
}

async fn firewall_action(State(s): State<S>, h: HeaderMap, Path((id, act)): Path<(u64, String)>, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    if !authorized(&h) {
        return unauthorized();
    }
    let mut c = s.lock().unwrap();
    let Some(i) = c.firewalls.iter().position(|f| f["id"] == id) else {
        return (StatusCode::NOT_FOUND, Json(json!({"error": {"code": "not_found", "message": "firewall not found"}})));
    };
    match act.as_str() {
        "set_rules" => {
            let Some(rules) = body["rules"].as_array().filter(|r| r.iter().all(valid_rule)).cloned() else { return invalid("invalid rules") };
            c.firewalls[i]["rules"] = json!(rules);
        }
        "apply_to_resources" => {
            let targets = match apply_targets(&c, &body["apply_to"]) {
                Ok(t) => t,
                Err(e) => return e,
            };
            for t in targets {
                let applied = c.firewalls[i]["applied_to"].as_array().cloned().unwrap_or_default();
                if applied.iter().any(|a| a["server"]["id"] == t) {
                    return invalid("firewall_already_applied").pipe_code("firewall_already_applied");
                }
                c.firewalls[i]["applied_to"].as_array_mut().unwrap().push(json!({"type": "server", "server": {"id": t}}));
            }
        }
        _ => return (StatusCode::NOT_FOUND, Json(json!({"error": {"code": "not_found", "message": "no such action"}}))),
    }
    c.firewall_writes.push((format!("/firewalls/{id}/actions/{act}"), body));
    (StatusCode::CREATED, Json(json!({"actions": [action(&act)]})))
}

trait PipeCode {
    fn pipe_code(self, code: &str) -> Self;
}

impl PipeCode for (StatusCode, Json<Value>) {
    fn pipe_code(mut self, code: &str) -> Self {
        self.1.0["error"]["code"] = json!(code);
        self
    }
}

async fn stub() -> (String, S) {
    let state: S = Arc::new(Mutex::new(Cloud::default()));
    let app = axum::Router::new()
        .route("/v1/firewalls", get(list_firewalls).post(create_firewall))
        .route("/v1/firewalls/{id}/actions/{act}", axum::routing::post(firewall_action))
        .route("/v1/servers", get(list_servers).post(create_server))
        .route("/v1/servers/{id}", get(get_server).delete(delete_server))
        .route("/v1/server_types", get(server_types))
        .route("/v1/images", get(images))
        .route("/v1/ssh_keys", get(list_keys).post(create_key))
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
        ..Default::default()
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
    // Seed 001 §3.a: cloud-init makes the admin user with the key and passwordless sudo.
    let admin = format!("users:\n  - name: {}\n", kit::cloud::ADMIN_USER);
    let rest = ud.split_once(&admin).map(|(_, r)| r).unwrap_or_else(|| panic!("no admin user: {ud}"));
    for want in ["    sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n", "    lock_passwd: true\n", &format!("    ssh_authorized_keys:\n      - {PUBKEY}\n")] {
        assert!(rest.contains(want), "{want:?} not in {ud}");
    }
    assert_eq!(body["labels"]["managed-by"], "pnp");
    // The admin key is registered once and named in the create call: no root password.
    let (keys, posts) = {
        let st = state.lock().unwrap();
        (st.ssh_keys.clone(), st.key_posts)
    };
    assert_eq!((keys.len(), posts), (1, 1));
    assert_eq!(keys[0]["public_key"], PUBKEY);
    assert_eq!(body["ssh_keys"], json!([keys[0]["id"]]), "{body}");
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
        ..Default::default()
    });
    assert!(r.is_err());
    let r = Hetzner::new(&HetznerSettings { token: None, admin_public_key: PUBKEY.into(), ..Default::default() });
    assert!(r.is_err());
}

#[tokio::test]
async fn hetzner_reuses_a_registered_admin_key_and_never_gets_a_root_password() {
    let (url, state) = stub().await;
    {
        // The project already holds the key (another comment, another name), behind a page
        // of other keys.
        let mut st = state.lock().unwrap();
        for (i, k) in ["ssh-ed25519 AAAAother1 a", "ssh-rsa AAAAother2 b", "ssh-ed25519 AAAAother3 c"].iter().enumerate() {
            st.ssh_keys.push(json!({"id": 100 + i, "name": format!("k{i}"), "public_key": k}));
        }
        let ours = format!("{} someone@laptop", PUBKEY.split_whitespace().take(2).collect::<Vec<_>>().join(" "));
        st.ssh_keys.push(json!({"id": 777, "name": "ops-admin", "public_key": ours}));
    }
    let p = provider(&url, TOKEN);
    let c = p.choose("fsn1", 1).await.unwrap();
    p.create(&c, "pn-s3").await.unwrap();
    p.create(&c, "pn-s4").await.unwrap();
    let st = state.lock().unwrap();
    assert_eq!(st.key_posts, 0, "a key the project holds is not registered again");
    assert_eq!(st.created_bodies.len(), 2);
    for b in &st.created_bodies {
        assert_eq!(b["ssh_keys"], json!([777]), "{b}");
    }
}

#[tokio::test]
async fn hetzner_key_name_taken_by_another_key_is_a_permanent_error() {
    let (url, state) = stub().await;
    state.lock().unwrap().ssh_keys.push(json!({"id": 5, "name": "pnp-admin", "public_key": "ssh-ed25519 AAAAsomeoneelse x"}));
    let p = provider(&url, TOKEN);
    let c = p.choose("fsn1", 1).await.unwrap();
    let e = p.create(&c, "pn-s5").await.unwrap_err();
    assert!(matches!(&e, ProviderError::Permanent(m) if m.contains("PN_HETZNER__ADMIN_KEY_NAME")), "{e:?}");
    assert!(state.lock().unwrap().created_bodies.is_empty(), "no server without the admin key");
}

#[tokio::test]
async fn a_reader_confirms_instances_and_cannot_create() {
    use kit::cloud::{Claim, Confirmation, confirm_instance};
    let (url, _state) = stub().await;
    let p = provider(&url, TOKEN);
    let c = p.choose("fsn1", 1).await.unwrap();
    let v = p.create(&c, "pn-s6").await.unwrap();
    let ip = v.ipv4.clone().unwrap();
    let reader = Hetzner::reader(&HetznerSettings { api_url: url.clone(), token: Some(SecretString::from(TOKEN)), ..Default::default() }).unwrap();
    assert!(matches!(reader.create(&c, "pn-s7").await, Err(ProviderError::Permanent(_))));
    let claim = |id: &'static str, name: &'static str, ipv4: &'static str| Claim { instance_id: id, name, ipv4, account: "hetzner" };
    let id: &'static str = Box::leak(v.id.clone().into_boxed_str());
    let ip: &'static str = Box::leak(ip.into_boxed_str());
    assert!(matches!(confirm_instance(&reader, &claim(id, "pn-s6", ip)).await, Confirmation::Confirmed(ref x) if x.id == id));
    for (bad, what) in [
        (claim(id, "pn-s6", "127.250.0.9"), "IPv4"),
        (claim(id, "pn-other", ip), "named"),
        (claim("424242", "pn-s6", ip), "does not know"),
        (Claim { account: "someone-else", ..claim(id, "pn-s6", ip) }, "account"),
        (claim("../servers", "pn-s6", ip), "not one a provider issues"),
    ] {
        match confirm_instance(&reader, &bad).await {
            Confirmation::Mismatch(why) => assert!(why.contains(what), "{why}"),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    let wrong = Hetzner::reader(&HetznerSettings { api_url: url, token: Some(SecretString::from("wrong-token-0000000000")), ..Default::default() }).unwrap();
    assert!(matches!(confirm_instance(&wrong, &claim(id, "pn-s6", ip)).await, Confirmation::Unanswered(_)));
}

#[tokio::test]
async fn hetzner_opens_ports_with_one_firewall_and_never_drops_22() {
    let (url, state) = stub().await;
    let p = provider(&url, TOKEN);
    let c = p.choose("fsn1", 1 << 30).await.unwrap();
    let a = p.create(&c, "pn-fw1").await.unwrap();
    let b = p.create(&c, "pn-fw2").await.unwrap();
    let ports = Port::parse_list("1022/tcp,443/tcp,443/udp").unwrap();

    // First server: the firewall is created with 22 and the asked ports, applied to it.
    assert_eq!(p.open_ports(&a.id, &ports).await.unwrap(), PortsOpened::Opened);
    let (fw, writes) = {
        let st = state.lock().unwrap();
        (st.firewalls.clone(), st.firewall_writes.clone())
    };
    assert_eq!(fw.len(), 1);
    assert_eq!(fw[0]["name"], "pnp-node");
    let rules: Vec<(String, String)> = fw[0]["rules"].as_array().unwrap().iter().map(|r| (r["protocol"].as_str().unwrap().into(), r["port"].as_str().unwrap().into())).collect();
    let want: Vec<(String, String)> = [("tcp", "22"), ("tcp", "1022"), ("tcp", "443"), ("udp", "443")].iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    assert_eq!(rules, want, "22 first, then what was asked");
    assert!(fw[0]["rules"].as_array().unwrap().iter().all(|r| r["direction"] == "in" && r["source_ips"] == json!(["0.0.0.0/0", "::/0"])));
    assert_eq!(fw[0]["applied_to"], json!([{"type": "server", "server": {"id": a.id.parse::<u64>().unwrap()}}]));
    assert_eq!(writes.len(), 1);

    // Second server: the same firewall, applied to it too; the rules are not rewritten.
    assert_eq!(p.open_ports(&b.id, &ports).await.unwrap(), PortsOpened::Opened);
    let writes = state.lock().unwrap().firewall_writes.clone();
    assert_eq!(writes.len(), 2);
    assert_eq!(writes[1].0, "/firewalls/900/actions/apply_to_resources");
    // Idempotent: nothing written when everything is in place.
    assert_eq!(p.open_ports(&a.id, &ports).await.unwrap(), PortsOpened::Opened);
    assert_eq!(state.lock().unwrap().firewall_writes.len(), 2);

    // A firewall someone narrowed to one port: the union comes back, 22 included.
    state.lock().unwrap().firewalls[0]["rules"] = json!([{"direction": "in", "protocol": "tcp", "port": "1000-1100", "source_ips": ["0.0.0.0/0"]}]);
    assert_eq!(p.open_ports(&a.id, &[Port::tcp(8443)]).await.unwrap(), PortsOpened::Opened);
    let (fw, writes) = {
        let st = state.lock().unwrap();
        (st.firewalls.clone(), st.firewall_writes.clone())
    };
    assert_eq!(writes.last().unwrap().0, "/firewalls/900/actions/set_rules");
    let ports_now: Vec<&str> = fw[0]["rules"].as_array().unwrap().iter().map(|r| r["port"].as_str().unwrap()).collect();
    assert_eq!(ports_now, ["1000-1100", "22", "8443"], "the range covers nothing asked; 22 and 8443 added, the old rule kept");

    // An unknown server is NotFound; a non-numeric id never reaches the API.
    assert!(matches!(p.open_ports("424242", &ports).await, Err(ProviderError::NotFound(_))));
    assert!(matches!(p.open_ports("../x", &ports).await, Err(ProviderError::NotFound(_))));
    // Our user-data makes the admin user (seed 001 §3.a); root is shut out by the prep.
    assert_eq!(p.login_user(&a).await.unwrap(), kit::cloud::ADMIN_USER, "the deployer logs in as the admin cloud-init made");
}
