//! I/O behind one narrow trait. The engine reads and writes originals and difference storage
//! only through [`BlockDev`]; implementations are in-memory ([`MemDev`]), file ([`FileDev`],
//! pread/pwrite) and fault-injecting ([`FaultDev`], a wrapper).
//!
//! Contract for every implementation: `offset + len <= len_bytes()` is the caller's duty (the
//! engine checks before calling); an I/O past the end returns EIO, never panics. Calls may come
//! from many threads at once; writes to disjoint ranges must not serialise on one lock when the
//! medium allows parallelism (the memory device is sharded for this reason).

use blksnap_model::Result;

mod fault;
mod file;
mod mem;

pub use fault::{Fault, FaultDev, FaultPlan, FaultSpec};
pub use file::FileDev;
pub use mem::MemDev;

/// A shared handle to a device.
pub type Dev = crate::sync::StdArc<dyn BlockDev>;

/// A block device or file the engine reads and writes.
pub trait BlockDev: Send + Sync {
    /// Current size in bytes.
    fn len_bytes(&self) -> u64;
    /// Fill `buf` from `offset_bytes`.
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<()>;
    /// Write `buf` at `offset_bytes`.
    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> Result<()>;
    /// Write `len_bytes` zero bytes at `offset_bytes` (discard and write-zeroes). Counts as one
    /// write for fault injection.
    fn write_zeroes_at(&self, offset_bytes: u64, len_bytes: u64) -> Result<()>;
    /// Make completed writes durable.
    fn flush(&self) -> Result<()>;
    /// Whether [`BlockDev::set_len`] can grow it (a regular file: yes; a block device: no).
    fn can_grow(&self) -> bool {
        false
    }
    /// Grow (or shrink) to `len_bytes`. Fixed-size devices return EOPNOTSUPP.
    fn set_len(&self, len_bytes: u64) -> Result<()> {
        let _ = len_bytes;
        Err(blksnap_model::Error::new(
            blksnap_model::Errno::EOPNOTSUPP,
            "this backend has a fixed size",
        ))
    }
}
