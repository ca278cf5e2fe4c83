//! svc-deployer's integration tests: against center-sim's nodes (real SSH protocol), against
//! a real OpenSSH sshd on loopback, and checks of the node stack files it ships.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod helpers;
mod sim;
mod sshd;
mod stack_files;
