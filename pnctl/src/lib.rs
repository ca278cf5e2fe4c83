//! pnctl (being written).
