//! The deployer's inputs, one module each, dispatched by the consumer they are bound to in
//! `app.rs`: `pn.op.instance.<op>` and `pn.replay.deploy`. Each decodes, checks, and hands
//! over to `crate::deploy::Deployer`.

pub mod instance;
pub mod replay;
