//! svc-claimer (being written).
