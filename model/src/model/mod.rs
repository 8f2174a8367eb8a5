//! The model. See `docs/SEMANTICS.md` for the contract every method implements.
//!
//! The model is split by concept like the engine (`engine/src`), with one `impl Model` block
//! per file, so the specification of a rule sits next to the engine module that implements it:
//! * `mod.rs`: the state, construction, parameters and clock (engine: `engine.rs`).
//! * `device.rs`: disks, origin reads and writes (engine: `tracker.rs`'s disks and `engine.rs`'s
//!   I/O path; SEMANTICS "Disks and the filter", "Data path").
//! * `cbt.rs`: trackers, attach and detach, the CBT maps, their numbers and the wrap, the CBT
//!   ctls (engine: `tracker.rs`, `cbt.rs`; SEMANTICS "Disks and the filter", "CBT").
//! * `snapshot.rs`: create, add, take, collect, info, destroy (engine: `snapshot.rs`; SEMANTICS
//!   "Snapshots").
//! * `diff_area.rs`: chunks, copy-on-write, image reads and writes, corruption (engine:
//!   `diff_area.rs`, `chunk.rs`; SEMANTICS "Data path").
//! * `diff_storage.rs`: append, allocation and accounting of v3 ranges and newest files, low
//!   space, overflow (engine: `diff_storage.rs`; SEMANTICS "Difference storage").
//! * `event_queue.rs`: events and waits (engine: `event_queue.rs`; SEMANTICS "Events").
//! * `faults.rs`: injected I/O faults, torn writes, counted faults, growth failures (engine:
//!   `io/fault.rs`; SEMANTICS "Data path").
//!
//! Readings of the contract where it is silent (checked against the engine's choices):
//! * Growing a File storage (at create or after an allocation) is no read or write: `fail_next`
//!   never reaches it. Its failures come from a queue of their own, [`Model::fail_next_growth`],
//!   the model's side of the engine's `FaultPlan::fail_set_len` on the storage.
//! * A failed create (ENOMEM, ENOSPC, growth error) draws no snapshot id.
//! * An origin read of length 0 is Ok and does no I/O, like every other `n = 0` request.
//! * A failed origin write leaves the device content unchanged, but the CBT marks and the COW
//!   copies made before it stay ("nothing changes" is read as "no data changes").
//! * Append checks: too many ranges → EINVAL, then each range → EINVAL, then the per-snapshot
//!   range limit → ENOMEM. Add-disk checks: EINVAL, EALREADY, ENOMEM. Create checks ENOMEM first.
//! * `cbt_info` saturates a block size or block count that does not fit the ABI's u32.
//! * An image read that fails returns EIO whatever the injected errno was; an image write whose
//!   allocation or storage write fails corrupts the diff area with the *original* errno and
//!   returns EIO.
//! * A torn write ([`InjectedFault::Torn`], the model's side of the engine's `Fault::Torn`) is a
//!   failed write whose first sectors reached the device. Only the origin's data shows it: a torn
//!   origin write leaves the first `sectors_written` sectors of the new data (or zeroes) on the
//!   device and returns the errno. A torn storage write is a failed storage write (the diff area
//!   is corrupted, so nobody reads what landed); any other torn I/O is a plain failure.
//! * Counted faults ([`Model::fail_nth`], [`Model::fail_nth_growth`]) mirror the engine's pinned
//!   `FaultPlan::fail_at`: they skip `skip` matching I/Os (or growths) from the call on, then fire
//!   on the next one, before any [`Model::fail_next`] fault of the same target and kind.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;

use crate::errno::{Errno, Result};
use crate::params::{Params, SECTOR_SIZE_BYTES};
use crate::types::*;

mod cbt;
mod device;
mod diff_area;
mod diff_storage;
mod event_queue;
mod faults;
mod snapshot;
#[cfg(test)]
mod test_support;

pub use diff_storage::StorageStats;
pub use faults::InjectedFault;

use device::Disk;
use faults::{Counted, FaultKey};
use snapshot::Snapshot;

/// Where a member lives: snapshot index (creation order) and member index (add order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Loc {
    snap: usize,
    member: usize,
}

fn to_usize(x: u64) -> usize {
    usize::try_from(x).expect("the model holds everything in memory, so sizes fit usize")
}

/// Byte range of `[first, end)` sectors, for indexing a device or image vector.
fn sector_bytes(start_sector: u64, end_sector: u64) -> Range<usize> {
    to_usize(start_sector * SECTOR_SIZE_BYTES)..to_usize(end_sector * SECTOR_SIZE_BYTES)
}

/// The whole blksnap state, sequential.
#[derive(Clone)]
pub struct Model {
    params: Params,
    ids: IdGen,
    clock_ns: u64,
    disks: BTreeMap<DeviceId, Disk>,
    /// Alive snapshots in creation order (the collect order).
    snapshots: Vec<Snapshot>,
    faults: BTreeMap<FaultKey, VecDeque<InjectedFault>>,
    /// Errnos for the next File-storage growths, oldest first.
    growth_faults: VecDeque<Errno>,
    /// Counted faults, oldest first.
    counted: Vec<Counted>,
}

impl Model {
    /// A model with sanitised `params`, ids drawn from `IdGen::new(id_seed)` (snapshot ids and
    /// generation ids share one sequence, in call order), the clock at 0.
    pub fn new(params: Params, id_seed: u64) -> Result<Model> {
        Ok(Model {
            params: params.sanitized()?,
            ids: IdGen::new(id_seed),
            clock_ns: 0,
            disks: BTreeMap::new(),
            snapshots: Vec::new(),
            faults: BTreeMap::new(),
            growth_faults: VecDeque::new(),
            counted: Vec::new(),
        })
    }

    /// Current (sanitised) parameters.
    pub fn params(&self) -> Params {
        self.params
    }

    /// Replace the parameters (sanitised; EINVAL if invalid). Applies to later attaches, takes,
    /// allocations and threshold checks; existing CBT and chunk layouts keep their shifts.
    pub fn set_params(&mut self, params: Params) -> Result<()> {
        self.params = params.sanitized()?;
        Ok(())
    }

    /// The clock, ns.
    pub fn now_ns(&self) -> u64 {
        self.clock_ns
    }

    /// Move the clock forward.
    pub fn advance_clock(&mut self, ns: u64) {
        self.clock_ns = self.clock_ns.saturating_add(ns);
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;

    #[test]
    fn params_are_sanitised_and_validated() {
        let bad = Params { chunk_maximum_shift: 70, ..Params::small() };
        assert_eq!(Model::new(bad, 0).err().unwrap().errno, Errno::EINVAL);
        let mut m = model();
        assert_eq!(m.params(), Params::small());
        assert_eq!(errno(m.set_params(bad)), Errno::EINVAL);
        assert_eq!(m.params(), Params::small(), "a rejected set changes nothing");
        m.set_params(Params { chunk_minimum_shift: 10, ..Params::small() }).unwrap();
        assert_eq!(m.params().chunk_minimum_shift, 12, "raised to the page shift");
    }

    #[test]
    fn clock_advances_and_saturates() {
        let mut m = model();
        assert_eq!(m.now_ns(), 0);
        m.advance_clock(5);
        assert_eq!(m.now_ns(), 5);
        m.advance_clock(u64::MAX);
        assert_eq!(m.now_ns(), u64::MAX);
    }

    #[test]
    fn ids_share_one_sequence_in_call_order() {
        let mut m = model();
        m.add_disk(D1, 64 * KIB, 8).unwrap();
        m.add_disk(D2, 64 * KIB, 8).unwrap();
        m.attach(D1).unwrap();
        let id = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        m.attach(D2).unwrap();
        assert_eq!(m.cbt_info(D1).unwrap().generation_id, IdGen::nth(SEED, 0));
        assert_eq!(id, IdGen::nth(SEED, 1));
        assert_eq!(m.cbt_info(D2).unwrap().generation_id, IdGen::nth(SEED, 2));
    }
}
