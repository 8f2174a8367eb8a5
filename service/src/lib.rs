//! # blksnap-service: `blksnapd`
//!
//! The blksnap engine served to the host: every tracked device is a ublk block device in front
//! of a backing file or block device ([`ublk`], feature `ublk`), every snapshot image another
//! one, and clients drive it over a Unix control socket ([`control`]) with the versioned
//! protocol of `blksnap-proto`. [`daemon::Daemon`] owns the engine and the bookkeeping;
//! [`config`] reads the TOML configuration; [`cli`] is the `blksnap` command line.
#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod freeze;
pub mod nbd;
#[doc(hidden)]
pub mod sim;
pub mod state;
pub mod sync;
#[cfg(feature = "ublk")]
pub mod ublk;

pub use config::Config;
pub use control::{Client, ControlServer};
pub use daemon::{Daemon, Frontend, NullFrontend, OriginStart};
pub use state::StateDir;
