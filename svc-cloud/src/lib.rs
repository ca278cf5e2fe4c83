//! svc-cloud (being written).
