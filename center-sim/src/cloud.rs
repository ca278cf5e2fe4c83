//! The simulated cloud: two accounts with one catalogue (regions, plans with included transfer
//! and price, images) — a Lightsail-like one and a Vultr-like one, each with its own default
//! keypair and its images' own login user (`login_user`) — instances that boot after
//! `bootDelayMs` onto distinct loopback addresses, a provider firewall in front of them (the
//! `providerFirewall` knob: only 22/tcp open until `open_cloud_instance_ports`), and deletion.
//! Instance names are not unique, as at a real provider: a second live instance with one name
//! is allowed and recorded as a violation.
//!
//! Never: reuse a live instance's address, or hand out an address whose SSH ports are taken.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use kit::center::{CloudAccount, CloudImage, CloudInstance, CloudPlan, CloudRegion};
use russh::keys::PublicKey;
use serde::Serialize;

use crate::mcp::ToolError;
use crate::node::Host;
use crate::sim::{Sim, Violation};
use crate::{new_id, rfc3339};

pub const ACCOUNT_NAME: &str = "sim-lightsail";
pub const PROVIDER: &str = "lightsail";
pub const DEFAULT_KEY_NAME: &str = "pn-admin";
/// The second account: another provider behind the same Center (an alternate provider).
pub const ALT_ACCOUNT_NAME: &str = "sim-vultr";
pub const ALT_PROVIDER: &str = "vultr";
pub const ALT_DEFAULT_KEY_NAME: &str = "pn-admin-vultr";

/// (account, provider, default key name), in `list_cloud_accounts` order.
pub const ACCOUNTS: &[(&str, &str, &str)] = &[(ACCOUNT_NAME, PROVIDER, DEFAULT_KEY_NAME), (ALT_ACCOUNT_NAME, ALT_PROVIDER, ALT_DEFAULT_KEY_NAME)];

/// The user an instance's image lets in with the account's key — the world's truth, kept
/// apart from Pnp's own table (`kit::cloud::login_user`) so that the two are checked against
/// each other rather than copied:
///
/// | provider | Ubuntu | Debian | where it comes from |
/// |---|---|---|---|
/// | `lightsail` (AWS) | `ubuntu` | `admin` | AWS's default user names for Lightsail blueprints and EC2 AMIs |
/// | `vultr` (as Hetzner, DigitalOcean) | `root` | `root` | their images install the account's key for root |
/// | any other (plain cloud-init images) | `ubuntu` | `debian` | the images' cloud-init `default_user` |
///
/// On an image whose user is not root, root's `authorized_keys` carries cloud-init's
/// `disable_root` command: the key is accepted and every command answers "Please login as the
/// user … rather than the user root" with exit 142.
pub fn login_user(provider: &str, os: &str) -> &'static str {
    match (provider, os) {
        ("vultr" | "hetzner" | "digitalocean", _) => "root",
        ("lightsail", "debian") => "admin",
        (_, "debian") => "debian",
        _ => "ubuntu",
    }
}

/// The admin user `provision-node.sh` makes from root's keys when it runs in a root session
/// (images that let only root in), before it sets `PermitRootLogin no`: its `ADMIN_USER`.
/// Kept apart from Pnp's `kit::cloud::ADMIN_USER`, like the table above.
pub const PREP_ADMIN_USER: &str = "pnadmin";

/// The provider of an account (empty for an unknown one).
pub fn provider_of(account: &str) -> &'static str {
    ACCOUNTS.iter().find(|a| a.0 == account).map(|a| a.1).unwrap_or("")
}

const TIB: u64 = 1 << 40;
const GIB: u64 = 1 << 30;

pub const REGIONS: &[(&str, &str)] = &[
    ("ap-southeast-1", "Singapore"),
    ("ap-northeast-1", "Tokyo"),
    ("eu-central-1", "Frankfurt"),
    ("us-west-2", "Oregon"),
    ("us-east-1", "Virginia"),
    ("sa-east-1", "São Paulo"),
];

/// The region that has only the small plan.
const PLANLESS_REGION: &str = "sa-east-1";

struct PlanSpec {
    id: &'static str,
    transfer_bytes: u64,
    price_monthly: f64,
    cpus: u32,
    memory_mb: u32,
}

const PLANS: &[PlanSpec] = &[
    PlanSpec { id: "small_1tb", transfer_bytes: TIB, price_monthly: 5.0, cpus: 1, memory_mb: 1024 },
    PlanSpec { id: "medium_2tb", transfer_bytes: 2 * TIB, price_monthly: 10.0, cpus: 2, memory_mb: 2048 },
    PlanSpec { id: "large_3tb", transfer_bytes: 3 * TIB, price_monthly: 20.0, cpus: 2, memory_mb: 4096 },
    PlanSpec { id: "xlarge_5tb", transfer_bytes: 5 * TIB, price_monthly: 40.0, cpus: 2, memory_mb: 8192 },
];

const NANO: PlanSpec = PlanSpec { id: "nano_512g", transfer_bytes: 512 * GIB, price_monthly: 3.5, cpus: 2, memory_mb: 512 };

/// (id, name, os, version)
pub const IMAGES: &[(&str, &str, &str, &str)] = &[
    ("ubuntu-20-04", "Ubuntu 20.04 LTS", "ubuntu", "20.04"),
    ("ubuntu-22-04", "Ubuntu 22.04 LTS", "ubuntu", "22.04"),
    ("ubuntu-24-04", "Ubuntu 24.04 LTS", "ubuntu", "24.04"),
    ("debian-12", "Debian 12", "debian", "12"),
];

pub fn accounts() -> Vec<CloudAccount> {
    ACCOUNTS
        .iter()
        .map(|(name, provider, key)| CloudAccount { account_name: (*name).into(), provider: (*provider).into(), default_key_name: Some((*key).into()) })
        .collect()
}

pub fn check_account(account: &str) -> Result<(), ToolError> {
    if ACCOUNTS.iter().any(|a| a.0 == account) { Ok(()) } else { Err(ToolError::not_found(format!("cloud account {account:?} not found"))) }
}

pub fn check_region(region: &str) -> Result<(), ToolError> {
    if REGIONS.iter().any(|(id, _)| *id == region) { Ok(()) } else { Err(ToolError::not_found(format!("region {region:?} not found"))) }
}

pub fn regions() -> Vec<CloudRegion> {
    REGIONS.iter().map(|(id, name)| CloudRegion { id: (*id).into(), name: (*name).into(), available: true }).collect()
}

fn plan_wire(p: &PlanSpec, regions: Vec<String>) -> CloudPlan {
    CloudPlan {
        id: p.id.into(),
        transfer_bytes: p.transfer_bytes,
        price_monthly: p.price_monthly,
        cpus: p.cpus,
        memory_mb: p.memory_mb,
        regions,
    }
}

/// The plans that can be created in `region`.
pub fn plans_in(region: &str) -> Vec<CloudPlan> {
    if region == PLANLESS_REGION {
        return vec![plan_wire(&NANO, vec![PLANLESS_REGION.into()])];
    }
    let everywhere: Vec<String> = REGIONS.iter().map(|(id, _)| *id).filter(|id| *id != PLANLESS_REGION).map(String::from).collect();
    PLANS.iter().map(|p| plan_wire(p, everywhere.clone())).collect()
}

pub fn images() -> Vec<CloudImage> {
    IMAGES
        .iter()
        .map(|(id, name, os, version)| CloudImage { id: (*id).into(), name: (*name).into(), os: (*os).into(), version: (*version).into() })
        .collect()
}

pub fn image_os(image_id: &str) -> Option<(&'static str, &'static str)> {
    IMAGES.iter().find(|i| i.0 == image_id).map(|i| (i.2, i.3))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceStatus {
    Pending,
    Running,
    Deleted,
}

impl InstanceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Pending => "pending",
            InstanceStatus::Running => "running",
            InstanceStatus::Deleted => "deleted",
        }
    }
}

/// One instance, with the emulated host behind it.
pub struct Instance {
    pub seq: u64,
    pub id: String,
    pub name: String,
    pub status: InstanceStatus,
    pub ipv4: Option<Ipv4Addr>,
    pub region: String,
    pub plan: String,
    pub image_id: String,
    /// The cloud account it was created in (its key and login user come from there).
    pub account: String,
    pub created_ms: i64,
    pub deleted_ms: Option<i64>,
    pub traffic_used_bytes: u64,
    /// The provider firewall's open ports (`"22/tcp"`), whether or not `providerFirewall` is on.
    pub firewall: BTreeSet<String>,
    /// Connections the firewall refused.
    pub firewall_refused: u32,
    pub host: Host,
}

impl Instance {
    pub fn live(&self) -> bool {
        self.status != InstanceStatus::Deleted
    }

    /// The user this instance's image lets in (see [`login_user`]).
    pub fn login_user(&self) -> &'static str {
        login_user(provider_of(&self.account), image_os(&self.image_id).map(|o| o.0).unwrap_or(""))
    }

    pub fn to_wire(&self) -> CloudInstance {
        CloudInstance {
            id: self.id.clone(),
            name: self.name.clone(),
            status: self.status.as_str().into(),
            ipv4: self.ipv4.map(|ip| ip.to_string()),
            account_name: self.account.clone(),
            region: self.region.clone(),
            plan: self.plan.clone(),
            image_id: self.image_id.clone(),
            traffic_used_bytes: self.traffic_used_bytes,
            created_at: Some(rfc3339(self.created_ms)),
        }
    }

    pub fn to_admin(&self) -> AdminInstance {
        AdminInstance {
            id: self.id.clone(),
            name: self.name.clone(),
            status: self.status.as_str(),
            ipv4: self.ipv4.map(|ip| ip.to_string()),
            region: self.region.clone(),
            plan: self.plan.clone(),
            image_id: self.image_id.clone(),
            created_at: rfc3339(self.created_ms),
            deleted_at: self.deleted_ms.map(rfc3339),
            prep_runs: self.host.prep_runs,
            hardened: self.host.hardened,
            containers_up: self.host.containers_up,
            up_runs: self.host.up_runs,
            ssh_port: self.host.listener.as_ref().map(|l| l.port),
            ssh_ports: self.host.listener.iter().chain(self.host.fresh_listener.iter()).map(|l| l.port).collect(),
            account: self.account.clone(),
            login_user: self.login_user(),
            admin_user: self.host.admin_user.clone(),
            root_logins_refused: self.host.root_logins_refused,
            firewall: self.firewall.iter().cloned().collect(),
            firewall_refused: self.firewall_refused,
            cloud_init: self.host.cloud_init.as_str(),
            hardened_login_at: self.host.hardened_login_ms.map(rfc3339),
            port22_closed_at: self.host.port22_closed_ms.map(rfc3339),
            hardened_login_ms: self.host.hardened_login_ms,
            port22_closed_ms: self.host.port22_closed_ms,
            host_key: self.host.host_public_key(),
            traffic_used_bytes: self.traffic_used_bytes,
            rx_bytes: self.host.nic.rx,
            tx_bytes: self.host.nic.tx,
            boot_id: self.host.nic.boot_id.clone(),
        }
    }
}

/// `GET /admin/instances` items.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdminInstance {
    pub id: String,
    pub name: String,
    pub status: &'static str,
    pub ipv4: Option<String>,
    pub region: String,
    pub plan: String,
    pub image_id: String,
    pub created_at: String,
    pub deleted_at: Option<String>,
    pub prep_runs: u32,
    pub hardened: bool,
    pub containers_up: bool,
    pub up_runs: u32,
    pub ssh_port: Option<u16>,
    /// Every port sshd listens on now (the fresh one stays open after a Pnp prep until the
    /// deployer closes 22).
    pub ssh_ports: Vec<u16>,
    pub account: String,
    /// The user the image lets in.
    pub login_user: &'static str,
    /// The admin the prep left (`null` before the prep): the only way in with root refused.
    pub admin_user: Option<String>,
    /// Root logins refused after the prep (`PermitRootLogin no`).
    pub root_logins_refused: u32,
    /// The provider firewall's open ports.
    pub firewall: Vec<String>,
    pub firewall_refused: u32,
    /// `done` or `error` (`cloudInitErrorRate`).
    pub cloud_init: &'static str,
    /// The first login on the hardened port (from outside: every client is).
    pub hardened_login_at: Option<String>,
    /// When 22 was closed on the node (the deployer's close-22 script).
    pub port22_closed_at: Option<String>,
    /// The same two times in ms since the epoch (for comparing).
    pub hardened_login_ms: Option<i64>,
    pub port22_closed_ms: Option<i64>,
    pub host_key: String,
    pub traffic_used_bytes: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub boot_id: String,
}

/// Hands out loopback addresses from `--ip-start` upward, never one a live instance holds.
#[derive(Debug)]
pub struct IpAllocator {
    start: u32,
    next: u32,
    in_use: HashSet<Ipv4Addr>,
}

/// How many candidates one allocation tries before giving up.
const MAX_TRIES: usize = 512;
const LAST: u32 = u32::from_be_bytes([127, 255, 255, 254]);

impl IpAllocator {
    pub fn new(start: Ipv4Addr) -> IpAllocator {
        let s = u32::from(start);
        IpAllocator { start: s, next: s, in_use: HashSet::new() }
    }

    /// The first usable candidate for which `take` succeeds (it binds the ports), moving the
    /// cursor past it. Skips addresses in use, network/broadcast-looking ones, and those `take`
    /// refuses (a port is taken there); wraps around to the start once.
    pub fn allocate<T>(&mut self, mut take: impl FnMut(Ipv4Addr) -> Option<T>) -> Option<(Ipv4Addr, T)> {
        let mut cur = self.next;
        let mut tries = 0;
        let mut wrapped = false;
        while tries < MAX_TRIES {
            if cur > LAST {
                if wrapped {
                    return None;
                }
                wrapped = true;
                cur = self.start;
            }
            let ip = Ipv4Addr::from(cur);
            cur += 1;
            let last_octet = ip.octets()[3];
            if last_octet == 0 || last_octet == 255 || self.in_use.contains(&ip) {
                continue;
            }
            tries += 1;
            if let Some(t) = take(ip) {
                self.in_use.insert(ip);
                self.next = cur;
                return Some((ip, t));
            }
        }
        self.next = cur;
        None
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        self.in_use.remove(&ip);
    }
}

/// Binds `ip:fresh` (kept: the instance's sshd) after checking `ip:hardened` is free too.
pub fn bind_ports(ip: Ipv4Addr, fresh: u16, hardened: u16) -> Option<TcpListener> {
    let l = TcpListener::bind(SocketAddr::from((ip, fresh))).ok()?;
    if hardened != fresh {
        drop(TcpListener::bind(SocketAddr::from((ip, hardened))).ok()?);
    }
    l.set_nonblocking(true).ok()?;
    Some(l)
}

/// Every instance ever created, in creation order by `seq`.
pub struct Cloud {
    pub instances: BTreeMap<String, Instance>,
    seq: u64,
    pub ips: IpAllocator,
    /// Each account's default keypair (public half) where it differs from the simulator's
    /// admin key (`--account-public-key-file ACCOUNT=PATH`); an account not named here uses
    /// the admin key.
    pub account_keys: BTreeMap<String, PublicKey>,
}

/// The real port a simulated SSH port plays: the fresh port is 22, the hardened one 1022.
pub fn real_port(sim_port: u16, fresh: u16, hardened: u16) -> u16 {
    if sim_port == fresh {
        22
    } else if sim_port == hardened {
        1022
    } else {
        sim_port
    }
}

/// A port rule as the firewall keeps it: `"1022/tcp"`.
pub fn port_rule(port: u16, protocol: &str) -> String {
    format!("{port}/{protocol}")
}

impl Cloud {
    pub fn new(ip_start: Ipv4Addr) -> Cloud {
        Cloud { instances: BTreeMap::new(), seq: 0, ips: IpAllocator::new(ip_start), account_keys: BTreeMap::new() }
    }

    pub fn ordered(&self) -> Vec<&Instance> {
        let mut v: Vec<&Instance> = self.instances.values().collect();
        v.sort_by_key(|i| i.seq);
        v
    }

    pub fn live_by_ip(&self, ip: Ipv4Addr) -> Option<&Instance> {
        self.instances.values().find(|i| i.live() && i.ipv4 == Some(ip))
    }

    /// The newest live instance named `name`.
    pub fn live_by_name(&self, name: &str) -> Option<&Instance> {
        self.ordered().into_iter().rev().find(|i| i.live() && i.name == name)
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }
}

/// Arguments of `create_cloud_instance`.
pub struct CreateArgs {
    pub account_name: String,
    pub region: String,
    pub plan: String,
    pub image_id: String,
    pub name: String,
}

impl Sim {
    /// The key `account`'s instances accept: its own (`--account-public-key-file`), else the
    /// admin key.
    pub fn account_key(&self, account: &str) -> PublicKey {
        self.st().cloud.account_keys.get(account).cloned().unwrap_or_else(|| self.admin_key.clone())
    }

    /// `open_cloud_instance_ports`: adds `ports` (`(port, "tcp"|"udp")`) to the instance's
    /// provider firewall; answers every port now open. Idempotent.
    pub fn open_instance_ports(&self, id: &str, ports: &[(u16, String)]) -> Result<Vec<String>, ToolError> {
        if ports.is_empty() || ports.len() > 64 {
            return Err(ToolError::bad_request("ports must list 1 to 64 ports"));
        }
        for (port, proto) in ports {
            if *port == 0 || !matches!(proto.as_str(), "tcp" | "udp") {
                return Err(ToolError::bad_request("each port needs a port 1-65535 and a protocol tcp or udp"));
            }
        }
        let mut st = self.st();
        let inst = st.cloud.instances.get_mut(id).filter(|i| i.live()).ok_or_else(|| ToolError::not_found(format!("instance {id} not found")))?;
        for (port, proto) in ports {
            inst.firewall.insert(port_rule(*port, proto));
        }
        tracing::info!(instance = %id, ports = ?inst.firewall, "provider firewall opened");
        Ok(inst.firewall.iter().cloned().collect())
    }

    pub fn create_instance(&self, a: CreateArgs) -> Result<CloudInstance, ToolError> {
        check_account(&a.account_name)?;
        check_region(&a.region)?;
        if !plans_in(&a.region).iter().any(|p| p.id == a.plan) {
            return Err(ToolError::rejected(format!("plan {:?} is not offered in {}", a.plan, a.region)));
        }
        if image_os(&a.image_id).is_none() {
            return Err(ToolError::rejected(format!("image {:?} not found", a.image_id)));
        }
        let name = a.name.trim();
        if name.is_empty() || name.len() > 255 {
            return Err(ToolError::bad_request("name must be 1 to 255 characters"));
        }
        let now = kit::now_ms();
        let mut st = self.st();
        if st.faults.create_fail_accounts.contains(&a.account_name) || st.dice_roll(|f| f.create_fail_rate) {
            return Err(ToolError::unavailable("plan unavailable"));
        }
        let (lo, hi) = (st.faults.boot_delay_ms, st.faults.boot_delay_max_ms);
        let boot_delay = if hi > lo { st.dice.between(lo, hi) } else { lo };
        let duplicate = st.cloud.live_by_name(name).map(|i| i.id.clone());
        let seq = st.cloud.next_seq();
        let id = new_id("i");
        let inst = Instance {
            seq,
            id: id.clone(),
            name: name.to_string(),
            status: InstanceStatus::Pending,
            ipv4: None,
            region: a.region,
            plan: a.plan,
            image_id: a.image_id,
            account: a.account_name,
            created_ms: now,
            deleted_ms: None,
            traffic_used_bytes: 0,
            firewall: [port_rule(22, "tcp")].into_iter().collect(),
            firewall_refused: 0,
            host: Host::new(self.root.child_token()),
        };
        let wire = inst.to_wire();
        st.cloud.instances.insert(id.clone(), inst);
        if let Some(other) = duplicate {
            st.violate(Violation::new("duplicate_instance", format!("a second live instance named {name} (first: {other})")).on(&id, name));
        }
        drop(st);
        tracing::info!(instance = %id, name, "instance created");
        let sim = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(boot_delay)).await;
            sim.boot(&id);
        });
        Ok(wire)
    }

    /// The boot timer fired: give the instance an address and start its sshd.
    fn boot(&self, id: &str) {
        let (fresh, hardened) = (self.cfg.ssh_port_fresh, self.cfg.ssh_port_hardened);
        let mut st = self.st();
        let no_ip = st.dice_roll(|f| f.no_ip_rate);
        let cloud_init_error = st.dice_roll(|f| f.cloud_init_error_rate);
        let st = &mut *st;
        let Some(inst) = st.cloud.instances.get_mut(id) else { return };
        if inst.status != InstanceStatus::Pending {
            return;
        }
        inst.status = InstanceStatus::Running;
        inst.host.boot();
        if cloud_init_error {
            tracing::warn!(instance = %id, "cloud-init failed on this instance (injected)");
            inst.host.cloud_init = crate::node::CloudInit::Error;
        }
        if no_ip {
            tracing::warn!(instance = %id, "instance running without an ipv4 (injected)");
            return;
        }
        let Some((ip, listener)) = st.cloud.ips.allocate(|ip| bind_ports(ip, fresh, hardened)) else {
            tracing::error!(instance = %id, "no free loopback address with free SSH ports");
            return;
        };
        inst.ipv4 = Some(ip);
        tracing::info!(instance = %id, %ip, "instance running");
        match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => crate::node::ssh::serve(self.clone(), inst, l, fresh, crate::node::host::exec),
            Err(e) => tracing::error!(instance = %id, error = %e, "sshd could not start"),
        }
    }

    pub fn get_instance(&self, id: &str) -> Result<CloudInstance, ToolError> {
        let st = self.st();
        match st.cloud.instances.get(id) {
            Some(i) if i.live() => Ok(i.to_wire()),
            _ => Err(ToolError::not_found(format!("instance {id} not found"))),
        }
    }

    pub fn list_instances(&self, name: Option<&str>) -> Vec<CloudInstance> {
        let st = self.st();
        st.cloud.ordered().into_iter().filter(|i| i.live() && name.is_none_or(|n| i.name == n)).map(Instance::to_wire).collect()
    }

    /// Deletes an instance: its sshd, sessions and containers stop, its disk goes. Deleting a
    /// deleted instance succeeds again (a reaper may retry); an unknown id is 404.
    pub fn delete_instance(&self, id: &str) -> Result<CloudInstance, ToolError> {
        let now = kit::now_ms();
        let mut st = self.st();
        let st = &mut *st;
        let Some(inst) = st.cloud.instances.get_mut(id) else {
            return Err(ToolError::not_found(format!("instance {id} not found")));
        };
        if inst.live() {
            inst.status = InstanceStatus::Deleted;
            inst.deleted_ms = Some(now);
            inst.host.shut_down();
            let name = inst.name.clone();
            if let Some(ip) = inst.ipv4 {
                st.cloud.ips.release(ip);
            }
            if st.cloud.live_by_name(&name).is_none() {
                let _ = std::fs::remove_dir_all(self.disk_dir(&name));
            }
            tracing::info!(instance = %id, "instance deleted");
        }
        let inst = st.cloud.instances.get(id).map(Instance::to_wire).unwrap_or_default();
        Ok(inst)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn allocator_skips_taken_and_used_addresses() {
        let mut a = IpAllocator::new(Ipv4Addr::new(127, 0, 1, 1));
        let (ip1, _) = a.allocate(Some).unwrap();
        assert_eq!(ip1, Ipv4Addr::new(127, 0, 1, 1));
        // .2 has a port taken: skipped.
        let (ip2, _) = a.allocate(|ip| (ip != Ipv4Addr::new(127, 0, 1, 2)).then_some(())).unwrap();
        assert_eq!(ip2, Ipv4Addr::new(127, 0, 1, 3));
        a.release(ip1);
        let (ip3, _) = a.allocate(|_| Some(())).unwrap();
        assert_eq!(ip3, Ipv4Addr::new(127, 0, 1, 4), "the cursor moves on; released addresses are not reused at once");
    }

    #[test]
    fn allocator_skips_octet_0_and_255_and_wraps() {
        let mut a = IpAllocator::new(Ipv4Addr::new(127, 255, 255, 253));
        assert_eq!(a.allocate(|_| Some(())).unwrap().0, Ipv4Addr::new(127, 255, 255, 253));
        assert_eq!(a.allocate(|_| Some(())).unwrap().0, Ipv4Addr::new(127, 255, 255, 254));
        assert!(a.allocate(|_| Some(())).is_none(), "everything from the start is in use");
        a.release(Ipv4Addr::new(127, 255, 255, 253));
        assert_eq!(a.allocate(|_| Some(())).unwrap().0, Ipv4Addr::new(127, 255, 255, 253));

        let mut b = IpAllocator::new(Ipv4Addr::new(127, 0, 1, 254));
        assert_eq!(b.allocate(|_| Some(())).unwrap().0, Ipv4Addr::new(127, 0, 1, 254));
        assert_eq!(b.allocate(|_| Some(())).unwrap().0, Ipv4Addr::new(127, 0, 2, 1));
    }

    #[test]
    fn allocator_gives_up_when_nothing_binds() {
        let mut a = IpAllocator::new(Ipv4Addr::new(127, 0, 1, 1));
        assert!(a.allocate(|_| None::<()>).is_none());
    }

    #[test]
    fn real_binds_skip_a_taken_port() {
        let held = TcpListener::bind("127.0.93.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let mut a = IpAllocator::new(Ipv4Addr::new(127, 0, 93, 1));
        let (ip, _l) = a.allocate(|ip| bind_ports(ip, port, port)).unwrap();
        assert_eq!(ip, Ipv4Addr::new(127, 0, 93, 2));
    }

    #[test]
    fn catalogue() {
        assert_eq!(plans_in("sa-east-1").len(), 1);
        assert_eq!(plans_in("sa-east-1")[0].transfer_bytes, 512 * GIB);
        let sg = plans_in("ap-southeast-1");
        assert_eq!(sg.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(), ["small_1tb", "medium_2tb", "large_3tb", "xlarge_5tb"]);
        assert!(!sg[0].regions.contains(&"sa-east-1".to_string()));
        assert_eq!(images().len(), 4);
        assert_eq!(image_os("debian-12"), Some(("debian", "12")));
        assert_eq!(accounts().iter().map(|a| (a.account_name.as_str(), a.provider.as_str())).collect::<Vec<_>>(), [
            ("sim-lightsail", "lightsail"),
            ("sim-vultr", "vultr")
        ]);
        assert!(check_account("sim-vultr").is_ok() && check_account("nope").is_err());
    }

    #[test]
    fn login_users_per_provider_and_image() {
        assert_eq!(login_user("lightsail", "ubuntu"), "ubuntu");
        assert_eq!(login_user("lightsail", "debian"), "admin");
        assert_eq!(login_user("vultr", "ubuntu"), "root");
        assert_eq!(login_user("vultr", "debian"), "root");
        assert_eq!(login_user("openstack", "debian"), "debian");
        assert_eq!(login_user("openstack", "ubuntu"), "ubuntu");
        assert_eq!(provider_of("sim-vultr"), "vultr");
        assert_eq!((real_port(2222, 2222, 10022), real_port(10022, 2222, 10022), real_port(443, 2222, 10022)), (22, 1022, 443));
        assert_eq!(port_rule(443, "udp"), "443/udp");
    }
}
