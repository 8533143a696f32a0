//! The segment log (being written).
