//! svc-meter (being written).
