//! The model. See `docs/SEMANTICS.md` for the contract every method implements.

use crate::errno::Result;
use crate::params::Params;
use crate::types::*;

/// Accounting of one snapshot's difference storage, for invariant checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct StorageStats {
    /// Sectors the storage has (v3: sum of appended ranges; newest: file size).
    pub capacity_sectors: u64,
    /// Sectors handed out, including wasted extent tails (v3).
    pub filled_sectors: u64,
    /// Sectors asked for (v3: informational; newest: the allocation bound).
    pub requested_sectors: u64,
    /// Set once the storage ran out; permanent.
    pub overflow: bool,
    /// Low-space flag (v3: request outstanding; newest: growth failed or limit reached).
    pub low_space: bool,
}

/// The whole blksnap state, sequential.
pub struct Model {
    // implementation-defined
}

impl Model {
    /// A model with sanitised `params`, ids drawn from `IdGen::new(id_seed)` (snapshot ids and
    /// generation ids share one sequence, in call order), the clock at 0.
    pub fn new(params: Params, id_seed: u64) -> Result<Model> { todo!() }
    /// Current (sanitised) parameters.
    pub fn params(&self) -> Params { todo!() }
    /// Replace the parameters (sanitised; EINVAL if invalid). Applies to later attaches, takes,
    /// allocations and threshold checks; existing CBT and chunk layouts keep their shifts.
    pub fn set_params(&mut self, params: Params) -> Result<()> { todo!() }
    /// The clock, ns.
    pub fn now_ns(&self) -> u64 { todo!() }
    /// Move the clock forward.
    pub fn advance_clock(&mut self, ns: u64) { todo!() }

    /// Register a disk of `capacity_bytes` (multiple of 512) whose io_min is `io_min_sectors`.
    pub fn add_disk(&mut self, dev: DeviceId, capacity_bytes: u64, io_min_sectors: u64) -> Result<()> { todo!() }
    /// BLKFILTER_ATTACH.
    pub fn attach(&mut self, dev: DeviceId) -> Result<()> { todo!() }
    /// BLKFILTER_DETACH.
    pub fn detach(&mut self, dev: DeviceId) -> Result<()> { todo!() }
    /// ctl cbtinfo.
    pub fn cbt_info(&self, dev: DeviceId) -> Result<CbtInfo> { todo!() }
    /// ctl cbtmap.
    pub fn cbt_map(&self, dev: DeviceId, offset: u32, length: u32) -> Result<Vec<u8>> { todo!() }
    /// ctl cbtdirty.
    pub fn cbt_dirty(&mut self, dev: DeviceId, ranges: &[SectorRange]) -> Result<()> { todo!() }
    /// ctl snapshotadd.
    pub fn snapshot_add(&mut self, id: SnapshotId, dev: DeviceId) -> Result<()> { todo!() }
    /// ctl snapshotinfo.
    pub fn snapshot_info(&self, dev: DeviceId) -> Result<SnapshotInfo> { todo!() }

    /// SNAPSHOT_CREATE. `initial_capacity_sectors` is the File storage's current size (ignored for
    /// Ranges).
    pub fn snapshot_create(&mut self, mode: StorageMode, initial_capacity_sectors: u64) -> Result<SnapshotId> { todo!() }
    /// SNAPSHOT_DESTROY.
    pub fn snapshot_destroy(&mut self, id: SnapshotId) -> Result<()> { todo!() }
    /// SNAPSHOT_APPEND_STORAGE: `ranges` on storage backend number `backend`, whose size is
    /// `backend_capacity_sectors`.
    pub fn snapshot_append_storage(&mut self, id: SnapshotId, backend: u32, backend_capacity_sectors: u64, ranges: &[SectorRange]) -> Result<()> { todo!() }
    /// SNAPSHOT_TAKE.
    pub fn snapshot_take(&mut self, id: SnapshotId) -> Result<()> { todo!() }
    /// SNAPSHOT_COLLECT.
    pub fn snapshot_collect(&self) -> Vec<SnapshotId> { todo!() }
    /// SNAPSHOT_WAIT_EVENT.
    pub fn wait_event(&mut self, id: SnapshotId, timeout_ms: u32) -> Result<Event> { todo!() }
    /// Storage accounting of a snapshot (ESRCH if unknown).
    pub fn storage_stats(&self, id: SnapshotId) -> Result<StorageStats> { todo!() }

    /// Read the origin.
    pub fn read(&mut self, dev: DeviceId, offset_bytes: u64, len_bytes: u64) -> Result<Vec<u8>> { todo!() }
    /// Write the origin.
    pub fn write(&mut self, dev: DeviceId, offset_bytes: u64, data: &[u8]) -> Result<()> { todo!() }
    /// Discard on the origin (= write zeroes).
    pub fn discard(&mut self, dev: DeviceId, offset_bytes: u64, len_bytes: u64) -> Result<()> { todo!() }
    /// Write zeroes on the origin.
    pub fn write_zeroes(&mut self, dev: DeviceId, offset_bytes: u64, len_bytes: u64) -> Result<()> { todo!() }
    /// Read the snapshot image of `dev`.
    pub fn image_read(&mut self, dev: DeviceId, offset_bytes: u64, len_bytes: u64) -> Result<Vec<u8>> { todo!() }
    /// Write the snapshot image of `dev`.
    pub fn image_write(&mut self, dev: DeviceId, offset_bytes: u64, data: &[u8]) -> Result<()> { todo!() }
    /// Make the next I/O of `kind` on `target` fail with `errno`.
    pub fn fail_next(&mut self, target: FaultTarget, kind: IoKind, errno: crate::Errno) { todo!() }
}
