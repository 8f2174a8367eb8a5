//! The daemon's own locks, visible to shuttle: with `RUSTFLAGS="--cfg blksnap_shuttle"` they are
//! shuttle's, so the concurrent request pairs of `service/tests/shuttle_daemon.rs` race under its
//! scheduler (with the engine's locks, which follow the same switch in `blksnap_engine::sync`);
//! otherwise std's. Only the daemon's bookkeeping (`Daemon`'s state, state directory and kept
//! events) goes through here: the data path's locks (`daemon::Target`) are held for a moment
//! with nothing that could switch threads inside, and stay std's.

#[cfg(blksnap_shuttle)]
pub use shuttle::sync::{Mutex, MutexGuard};
#[cfg(not(blksnap_shuttle))]
pub use std::sync::{Mutex, MutexGuard};
