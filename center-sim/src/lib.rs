//! center-sim (being written).
