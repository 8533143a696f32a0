//! Model-checks the intake gate with [loom]: `src/intake/gate.rs` is compiled here as is, against loom's
//! atomics (it imports nothing but `super::atomic`), and the tests in `tests.rs` explore every interleaving of
//! a few producers, reservations, a worker and a closer running the protocol of `Core::push` and the
//! worker's shutdown.
//!
//! Run with `cargo test --release --manifest-path tools/model-check/Cargo.toml`.

// The gate's accessors that no test calls (`has_room`, `is_closed`, …) are not dead in the crate itself.
#![allow(dead_code)]

/// What `gate.rs` imports as `super::atomic` (the crate's `intake/mod.rs` gives it `std`'s).
mod atomic {
    pub(super) use loom::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
}

#[path = "../../../src/intake/gate.rs"]
mod gate;

#[cfg(test)]
mod tests;
