//! svc-deployer (being written).
