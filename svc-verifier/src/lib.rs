//! svc-verifier (being written).
