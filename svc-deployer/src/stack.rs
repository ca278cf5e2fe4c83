//! The files the deployer ships to a node, from the project's `deploy/node/`: embedded at
//! build time so the binary is self-contained and a node always gets the stack this build
//! was tested with. Only the OS prep script can be swapped (`PN_PREP_SCRIPT`), for tests
//! against a real sshd where the real `provision-node.sh` must never run.

use std::path::Path;

pub const PROVISION_NODE_SH: &str = include_str!("../../deploy/node/provision-node.sh");
pub const DOCKER_COMPOSE_YML: &str = include_str!("../../deploy/node/docker-compose.yml");
pub const AUTO_UPDATE_SH: &str = include_str!("../../deploy/node/auto-update.sh");
pub const CRASH_MONITOR_SH: &str = include_str!("../../deploy/node/k2s-crash-monitor.sh");

/// The stack as the deployer sends it.
#[derive(Debug, Clone)]
pub struct Stack {
    pub prep_script: Vec<u8>,
    /// `(file name in the deploy dir, content)`, in upload order; `.env` is not among them.
    pub files: Vec<(&'static str, Vec<u8>)>,
}

impl Stack {
    /// The embedded stack, with the prep script read from `prep_override` when given.
    pub fn load(prep_override: Option<&Path>) -> std::io::Result<Stack> {
        let prep_script = match prep_override {
            Some(p) => std::fs::read(p).map_err(|e| std::io::Error::new(e.kind(), format!("prep_script {}: {e}", p.display())))?,
            None => PROVISION_NODE_SH.as_bytes().to_vec(),
        };
        Ok(Stack {
            prep_script,
            files: vec![
                ("docker-compose.yml", DOCKER_COMPOSE_YML.as_bytes().to_vec()),
                // Empty: the node authenticates users remotely through Center (runbook step 6).
                ("users", Vec::new()),
                ("auto-update.sh", AUTO_UPDATE_SH.as_bytes().to_vec()),
                ("k2s-crash-monitor.sh", CRASH_MONITOR_SH.as_bytes().to_vec()),
            ],
        })
    }
}
