//! # blksnap-model: the executable specification
//!
//! A sequential, obviously-right model of the blksnap module: trackers and CBT, snapshots,
//! difference storage accounting, events, and device and image data. No threads, no I/O: devices
//! are byte vectors and faults are told to it. The contract it implements is
//! `docs/SEMANTICS.md`; the engine implements the same, and the differential tests hold the two
//! to it. The shared vocabulary (errno, parameters, formulas, ids) lives here so that both use
//! one definition.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod errno;
pub mod formulas;
pub mod limits;
pub mod model;
pub mod params;
pub mod types;

pub use errno::{Errno, Error, Result};
pub use model::{InjectedFault, Model, StorageStats};
pub use params::{Params, SECTOR_SIZE_BYTES};
pub use types::*;
