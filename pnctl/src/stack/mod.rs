//! The dev stack: `pnctl up` (foreground or `--detach`), `pnctl down`, the supervisor that keeps
//! nats-server, center-sim and the five services alive, and `./.pn/stack.json`, the one place
//! that says where everything runs.
//!
//! The supervisor owns its children: each runs in its own process group (a terminal's Ctrl-C
//! reaches only pnctl, which then stops them in order), a child that dies is restarted with
//! back-off and its new pid written to stack.json. Secrets reach children only through their
//! environment — never argv, never a log line. `down` signals the supervisor recorded in
//! stack.json and nothing else; it never kills processes by name.
//!
//! By concern: `file` (stack.json), `secrets` (the data dir's layout, the dev secrets), `bins`
//! (where the programs are), `specs` (each child's command, environment and health check,
//! nats-server's config among them), `supervise` (one child's life: start, restart, stop),
//! `procs` (pids, signals, log tails), `ports` (the ports a stack uses), `lock` (one stack per
//! data dir), `up` (the foreground supervisor), `detach` (`up --detach` and `down`); this file
//! is the index: the stack's names and tunables, and what the rest of pnctl may use.

use std::time::Duration;

mod bins;
mod detach;
mod file;
mod lock;
mod ports;
mod procs;
mod secrets;
mod specs;
mod supervise;
mod up;

pub use bins::*;
pub use detach::*;
pub use file::*;
use lock::*;
use ports::*;
pub use procs::*;
pub use secrets::*;
use specs::*;
use supervise::*;
pub use up::*;

/// The five pipeline services, by crate (= binary) name.
pub const SERVICES: [&str; 5] = ["svc-claimer", "svc-cloud", "svc-deployer", "svc-verifier", "svc-meter"];
pub const NATS: &str = "nats-server";
/// The services that get the seal key (they seal or unseal the claim token and node secret).
pub const SEAL_KEY_USERS: [&str; 2] = ["svc-claimer", "svc-deployer"];
pub const CENTER_SIM: &str = "center-sim";
/// The dev stack's ingress at Center's host: forwards to center-sim, mirrors `/slave/usage`
/// to the meter (Traefik's mirroring in production).
pub const INGRESS: &str = "pn-ingress";

const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A child that ran this long before dying gets the short back-off again.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// SIGTERM → SIGKILL grace for a child (kit's services give their consumers 25 s to drain).
const CHILD_GRACE: Duration = Duration::from_secs(30);
/// A child that exits this often while the stack starts is broken, not flaky.
const START_CRASHES: u32 = 3;
