//! # blksnap-engine
#![warn(missing_docs)]

pub mod io;
pub mod sync;
