//! The engine: the registry of disks and snapshots, and every operation of the contract
//! (docs/SEMANTICS.md). No globals (the kernel's global snapshot list and filter registry are
//! fields), no hidden threads: all work runs in the caller's thread.
//!
//! # Lock order (outermost first)
//! 0. `appends` — serialises storage appends across snapshots.
//! 1. `snapshots` (global list) — held only to look up, insert or remove; destroy nests the
//!    two below in it (push to `retiring`; the destroyed snapshot's `state`, see
//!    `snapshot_destroy`).
//!    1a. `retiring` — destroyed snapshots whose teardown runs; held only to push, look up,
//!    remove.
//! 2. `disks` (registry) — likewise.
//! 3. a snapshot's `state` — add, take, destroy.
//! 4. device gates, write side, in ascending device order — attach, detach, take switch,
//!    teardown; read side — origin writes, CBT ctls, image request start.
//!    4a. a disk's write-ticket count — counted under the read side (`try_write_begin`), and
//!    every write section waits for it to reach zero before it changes anything (a take does
//!    so after it holds all its gates). Tickets end without any lock but this one, so that wait
//!    ends when the ticket holders' writes complete.
//! 5. a tracker's `owner` — leaf.
//!
//! I/O side (inside a gate read section): chunk map → chunk permits (ascending) → storage state
//! → event queue. A gate is never taken for writing while holding a chunk permit, and a
//! snapshot lock is never taken while holding a gate.
//!
//! This order is enforced, not only stated: every lock has a `sync::LockRank` (the same order,
//! with the leaves spelled out), and test and checker builds panic on any acquisition out of
//! order, on every schedule, whether or not that schedule deadlocks.

use std::collections::BTreeMap;

use blksnap_model::limits::{MAX_DISKS, MAX_RANGES_PER_CALL, MAX_SNAPSHOTS};
use blksnap_model::params::SECTOR_SHIFT;
use blksnap_model::types::check_io_range;
use blksnap_model::{
    CbtInfo, DeviceId, Errno, Error, Event, Params, Result, SectorRange, SnapshotId, SnapshotInfo,
    StorageStats,
};

use crate::cbt::CbtMap;
use crate::clock::Clock;
use crate::diff_area::DiffArea;
use crate::diff_storage::{DiffStorage, StorageSpec};
use crate::io::Dev;
use crate::kref::{Kref, LiveCounts, ObjKind};
use crate::snapshot::{SnapState, Snapshot};
use crate::sync::{Arc, LockRank, Mutex, RwLock};
use crate::tracker::{Disk, Gate, Tracker, WriteTicket};
use crate::Shared;

/// How to build an engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Module parameters (sanitised at construction).
    pub params: Params,
    /// Seed of the id sequence; `None` draws one from the OS (production).
    pub id_seed: Option<u64>,
    /// The clock.
    pub clock: Clock,
    /// Bug builds: an upstream bug to restore (see `crate::bugs`).
    #[cfg(blksnap_bugs)]
    pub bug: Option<crate::bugs::Bug>,
}

impl EngineConfig {
    /// A configuration with these parts (no restored bug in bug builds).
    pub fn new(params: Params, id_seed: Option<u64>, clock: Clock) -> EngineConfig {
        EngineConfig {
            params,
            id_seed,
            clock,
            #[cfg(blksnap_bugs)]
            bug: None,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> EngineConfig {
        EngineConfig::new(Params::default(), None, Clock::monotonic())
    }
}

/// The blksnap engine.
pub struct Engine {
    shared: Arc<Shared>,
    disks: RwLock<BTreeMap<DeviceId, Arc<Disk>>>,
    snapshots: RwLock<Vec<Kref<Snapshot>>>,
    /// Snapshots gone from the list whose teardown has not finished (see [`Engine::settle`]).
    retiring: Mutex<Vec<Kref<Snapshot>>>,
    /// Serialises storage appends (see `snapshot_append_storage`). Outermost.
    appends: Mutex<()>,
}

/// Data of an origin write.
#[derive(Clone, Copy)]
enum WriteData<'a> {
    Bytes(&'a [u8]),
    Zeroes(u64),
}

impl WriteData<'_> {
    fn len_bytes(&self) -> u64 {
        match self {
            WriteData::Bytes(b) => b.len() as u64,
            WriteData::Zeroes(n) => *n,
        }
    }
}

impl Engine {
    /// A new engine with no disks and no snapshots.
    pub fn new(config: EngineConfig) -> Result<Engine> {
        let seed = config.id_seed.unwrap_or_else(|| {
            let r = uuid::Uuid::new_v4().as_u64_pair();
            r.0 ^ r.1
        });
        #[allow(unused_mut)]
        let mut shared = Shared::new(config.params, config.clock, seed)?;
        #[cfg(blksnap_bugs)]
        {
            shared.bug = config.bug;
        }
        Ok(Engine {
            shared: Arc::new(shared),
            disks: RwLock::new(LockRank::Disks, BTreeMap::new()),
            snapshots: RwLock::new(LockRank::Snapshots, Vec::new()),
            retiring: Mutex::new(LockRank::Retiring, Vec::new()),
            appends: Mutex::new(LockRank::Appends, ()),
        })
    }

    /// Current parameters.
    pub fn params(&self) -> Params {
        self.shared.params()
    }

    /// Replace the parameters (sanitised; EINVAL if invalid).
    pub fn set_params(&self, params: Params) -> Result<()> {
        *self.shared.params.write() = params.sanitized()?;
        Ok(())
    }

    /// The engine's clock (monotonic in production, manual in tests).
    pub fn clock(&self) -> &Clock {
        self.shared.clock()
    }

    /// The clock reading, ns.
    pub fn now_ns(&self) -> u64 {
        self.shared.clock.now_ns()
    }

    /// Move a manual clock forward and wake every event waiter so it re-reads it. No effect on
    /// a monotonic clock.
    pub fn advance_clock(&self, ns: u64) {
        if let Clock::Manual(m) = &self.shared.clock {
            m.advance(ns);
        }
        for s in self.snapshots.read().iter() {
            s.storage.events.kick();
        }
    }

    /// Live engine objects per kind.
    pub fn live(&self) -> LiveCounts {
        self.shared.live.counts()
    }

    // ---- disks and the filter ----------------------------------------------------------------

    /// Register a disk served from `backend` (its length, a multiple of 512, is the capacity).
    pub fn add_disk(&self, dev: DeviceId, backend: Dev, io_min_sectors: u64) -> Result<()> {
        let capacity_bytes = backend.len_bytes();
        if !capacity_bytes.is_multiple_of(1 << SECTOR_SHIFT) {
            return Err(Error::new(Errno::EINVAL, "disk capacity must be a multiple of 512"));
        }
        let mut disks = self.disks.write();
        if disks.contains_key(&dev) {
            return Err(Error::new(Errno::EALREADY, "the disk is already registered"));
        }
        if disks.len() >= MAX_DISKS {
            return Err(Error::new(Errno::ENOMEM, "too many disks"));
        }
        let disk = Disk {
            id: dev,
            backend,
            capacity_bytes,
            io_min_sectors: io_min_sectors.max(1),
            gate: RwLock::keyed(
                LockRank::Gate,
                (u64::from(dev.major) << 32) | u64::from(dev.minor),
                Gate::default(),
            ),
            tickets: Default::default(),
        };
        disks.insert(dev, Arc::new(disk));
        Ok(())
    }

    /// Unregister a disk (its block device is going away): EBUSY while it is in a snapshot;
    /// its tracker, if any, goes with it. ENODEV if not registered.
    pub fn remove_disk(&self, dev: DeviceId) -> Result<()> {
        self.settle(dev);
        let disk = self.disk(dev)?;
        let mut gate = disk.gate_write()?;
        if gate.tracker.as_ref().is_some_and(|t| t.owner.lock().is_some()) {
            return Err(Error::new(Errno::EBUSY, "the device is in a snapshot: destroy it first"));
        }
        let tracker = gate.tracker.take();
        gate.removed = true;
        drop(gate);
        self.disks.write().remove(&dev);
        drop(tracker);
        Ok(())
    }

    /// The snapshot whose member `dev` is (created or taken), if any. ENODEV if not registered,
    /// ENOENT without a tracker.
    pub fn member_of(&self, dev: DeviceId) -> Result<Option<SnapshotId>> {
        self.settle(dev);
        let (_disk, tracker) = self.tracker(dev)?;
        let owner = *tracker.owner.lock();
        Ok(owner)
    }

    /// Capacity of a registered disk in bytes.
    pub fn disk_capacity_bytes(&self, dev: DeviceId) -> Result<u64> {
        Ok(self.disk(dev)?.capacity_bytes)
    }

    /// Waits, if `dev`'s owner is a snapshot already gone from the list, until that snapshot's
    /// teardown has released its members. Whoever saw the destroy (its success, a second
    /// destroy's ENODEV, a collect without it) must then see the device in no snapshot: add,
    /// detach, remove_disk and member_of call this first, holding no lock. The teardown holds
    /// the snapshot's state lock from before the snapshot left the list until its members are
    /// released, so taking that lock once is the wait. An owner that becomes retiring after
    /// the look here belongs to a destroy concurrent with the caller: either answer is one of
    /// a sequential order's.
    fn settle(&self, dev: DeviceId) {
        #[cfg(blksnap_bugs)]
        if self.shared.injected(crate::bugs::Bug::DestroyReleasesMembersLate) {
            return;
        }
        let owner = self.disk(dev).ok().and_then(|disk| {
            let gate = disk.gate_read().ok()?;
            let owner = gate.tracker.as_ref().and_then(|t| *t.owner.lock());
            owner
        });
        let Some(id) = owner else { return };
        let retiring = self.retiring.lock().iter().find(|s| s.id == id).cloned();
        if let Some(snapshot) = retiring {
            drop(snapshot.state.lock());
        }
    }

    fn disk(&self, dev: DeviceId) -> Result<Arc<Disk>> {
        self.disks.read().get(&dev).cloned().ok_or(Error::new(Errno::ENODEV, "no such disk"))
    }

    fn tracker(&self, dev: DeviceId) -> Result<(Arc<Disk>, Kref<Tracker>)> {
        let disk = self.disk(dev)?;
        let tracker = disk.gate_read()?.tracker.clone();
        let tracker = tracker.ok_or(Error::new(Errno::ENOENT, "no filter attached"))?;
        Ok((disk, tracker))
    }

    /// BLKFILTER_ATTACH: start tracking (new CBT, new generation).
    pub fn attach(&self, dev: DeviceId) -> Result<()> {
        let disk = self.disk(dev)?;
        let mut gate = disk.gate_write()?;
        if gate.tracker.is_some() {
            return Err(Error::new(Errno::EALREADY, "the filter is already attached"));
        }
        let cbt =
            CbtMap::new(&self.shared.params(), disk.capacity_sectors(), self.shared.next_id());
        let tracker = Tracker { device: dev, cbt, owner: Mutex::new(LockRank::TrackerOwner, None) };
        gate.tracker = Some(Kref::new(tracker, ObjKind::Tracker, &self.shared.live));
        Ok(())
    }

    /// Attach with a CBT saved by [`Engine::cbt_export`] (a clean restart keeps incremental
    /// backups working). EINVAL if the state does not fit the disk; EALREADY if attached.
    pub fn attach_with_cbt(&self, dev: DeviceId, state: &crate::cbt::CbtState) -> Result<()> {
        let disk = self.disk(dev)?;
        let cbt = CbtMap::from_state(state, disk.capacity_sectors())?;
        let mut gate = disk.gate_write()?;
        if gate.tracker.is_some() {
            return Err(Error::new(Errno::EALREADY, "the filter is already attached"));
        }
        let tracker = Tracker { device: dev, cbt, owner: Mutex::new(LockRank::TrackerOwner, None) };
        gate.tracker = Some(Kref::new(tracker, ObjKind::Tracker, &self.shared.live));
        Ok(())
    }

    /// The CBT of `dev`, whole, taken with the device frozen (for persisting at a clean stop).
    pub fn cbt_export(&self, dev: DeviceId) -> Result<crate::cbt::CbtState> {
        let disk = self.disk(dev)?;
        let gate = disk.gate_write()?;
        let tracker =
            gate.tracker.as_ref().ok_or(Error::new(Errno::ENOENT, "no filter attached"))?;
        Ok(tracker.cbt.state())
    }

    /// BLKFILTER_DETACH: stop tracking. EBUSY while the device is in a snapshot.
    pub fn detach(&self, dev: DeviceId) -> Result<()> {
        self.settle(dev);
        let disk = self.disk(dev)?;
        let mut gate = disk.gate_write()?;
        let Some(tracker) = &gate.tracker else {
            return Err(Error::new(Errno::ENOENT, "no filter attached"));
        };
        if tracker.owner.lock().is_some() {
            return Err(Error::new(Errno::EBUSY, "the device is in a snapshot: destroy it first"));
        }
        let tracker = gate.tracker.take();
        drop(gate);
        drop(tracker);
        Ok(())
    }

    /// ctl cbtinfo.
    pub fn cbt_info(&self, dev: DeviceId) -> Result<CbtInfo> {
        let disk = self.disk(dev)?;
        let gate = disk.gate_read()?;
        let tracker =
            gate.tracker.as_ref().ok_or(Error::new(Errno::ENOENT, "no filter attached"))?;
        Ok(tracker.cbt.info())
    }

    /// ctl cbtmap into `out` (cleared first).
    pub fn cbt_map(
        &self,
        dev: DeviceId,
        offset: u32,
        length: u32,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let disk = self.disk(dev)?;
        let gate = disk.gate_read()?;
        let tracker =
            gate.tracker.as_ref().ok_or(Error::new(Errno::ENOENT, "no filter attached"))?;
        tracker.cbt.read_map(offset, length, out)
    }

    /// ctl cbtdirty (all-or-nothing).
    pub fn cbt_dirty(&self, dev: DeviceId, ranges: &[SectorRange]) -> Result<()> {
        let disk = self.disk(dev)?;
        let gate = disk.gate_read()?;
        let tracker =
            gate.tracker.as_ref().ok_or(Error::new(Errno::ENOENT, "no filter attached"))?;
        if ranges.len() > MAX_RANGES_PER_CALL {
            return Err(Error::new(Errno::EINVAL, "too many ranges in one call"));
        }
        tracker.cbt.mark_dirty(ranges)
    }

    /// ctl snapshotadd.
    pub fn snapshot_add(&self, id: SnapshotId, dev: DeviceId) -> Result<()> {
        self.settle(dev);
        let (disk, tracker) = self.tracker(dev)?;
        let snapshot = self.snapshot(id)?;
        #[cfg(blksnap_bugs)]
        if self.shared.injected(crate::bugs::Bug::AbbaAddTake) {
            // v3–v7: the ctl ran inside the device's queue usage and then took the snapshot
            // lock, while TAKE holds the snapshot lock and freezes the queue.
            // (The lock order is what matters: the add itself follows below.)
            let queue_usage = disk.gate.read();
            let snapshot_lock = snapshot.state.lock();
            drop(snapshot_lock);
            drop(queue_usage);
        }
        snapshot.add(&disk, tracker)
    }

    /// ctl snapshotinfo.
    pub fn snapshot_info(&self, dev: DeviceId) -> Result<SnapshotInfo> {
        let disk = self.disk(dev)?;
        let gate = disk.gate_read()?;
        if gate.tracker.is_none() {
            return Err(Error::new(Errno::ENOENT, "no filter attached"));
        }
        let Some(area) = gate.diff_area.as_ref().filter(|a| a.image_open()) else {
            return Ok(SnapshotInfo { error_code: 0, image: None });
        };
        let error_code = area.error().map_or(0, |e| -e.code());
        Ok(SnapshotInfo { error_code, image: Some(dev) })
    }

    // ---- snapshots -------------------------------------------------------------------------

    fn snapshot(&self, id: SnapshotId) -> Result<Kref<Snapshot>> {
        #[cfg(blksnap_bugs)]
        if self.shared.injected(crate::bugs::Bug::GetFromZero) {
            // The reference is taken after the list lock is gone: a destroy can put the last
            // reference in between.
            let raw = {
                let list = self.snapshots.read();
                list.iter().find(|s| s.id == id).map(crate::kref::Unowned::of)
            };
            return raw.map(|r| r.upgrade()).ok_or(Error::new(Errno::ESRCH, "no such snapshot"));
        }
        let list = self.snapshots.read();
        let found = list.iter().find(|s| s.id == id).cloned();
        found.ok_or(Error::new(Errno::ESRCH, "no such snapshot"))
    }

    /// SNAPSHOT_CREATE.
    pub fn snapshot_create(&self, spec: StorageSpec) -> Result<SnapshotId> {
        if self.snapshots.read().len() >= MAX_SNAPSHOTS {
            return Err(Error::new(Errno::ENOMEM, "too many snapshots"));
        }
        let storage = DiffStorage::new(spec, self.shared.clone())?;
        let storage = Kref::new(storage, ObjKind::DiffStorage, &self.shared.live);
        // The id is drawn under the list lock, so ids and the creation order (collect) agree
        // for racing creates, as they do one after another (found by the shuttle pair matrix).
        let mut list = self.snapshots.write();
        if list.len() >= MAX_SNAPSHOTS {
            return Err(Error::new(Errno::ENOMEM, "too many snapshots"));
        }
        let id = self.shared.next_id();
        let snapshot = Snapshot {
            id,
            storage,
            state: Mutex::new(LockRank::SnapshotState, SnapState::default()),
        };
        list.push(Kref::new(snapshot, ObjKind::Snapshot, &self.shared.live));
        Ok(id)
    }

    /// SNAPSHOT_DESTROY.
    pub fn snapshot_destroy(&self, id: SnapshotId) -> Result<()> {
        let mut list = self.snapshots.write();
        let pos = list.iter().position(|s| s.id == id);
        let pos = pos.ok_or(Error::new(Errno::ENODEV, "no such snapshot"))?;
        let snapshot = list.remove(pos);
        // Gone from the list and its images closed in one step (the teardown that unpublishes
        // them follows): whoever sees it gone sees no image either.
        #[cfg(blksnap_bugs)]
        let close_now = !self.shared.injected(crate::bugs::Bug::DestroyClosesImagesLate);
        #[cfg(not(blksnap_bugs))]
        let close_now = true;
        if close_now {
            snapshot.storage.mark_destroyed();
        }
        // Its members are released only by the teardown: listed as retiring, with the state
        // lock the teardown runs under taken before the list lock goes, so `settle` can wait
        // for the release. (Under the list lock, the state lock waits at most for a take or an
        // add of this snapshot in progress; neither takes the list lock.)
        self.retiring.lock().push(snapshot.clone());
        #[cfg(blksnap_bugs)]
        if !close_now {
            // as it was: the list let go first, the teardown then takes the snapshot lock
            drop(list);
            snapshot.teardown(snapshot.state.lock());
            self.retiring.lock().retain(|s| s.id != id);
            return Ok(());
        }
        let state = snapshot.state.lock();
        drop(list);
        snapshot.teardown(state);
        self.retiring.lock().retain(|s| s.id != id);
        Ok(())
    }

    /// SNAPSHOT_APPEND_STORAGE (v3).
    pub fn snapshot_append_storage(
        &self,
        id: SnapshotId,
        backend: Dev,
        ranges: &[SectorRange],
    ) -> Result<()> {
        // Appends are serialised: the overlap check reads other snapshots' storages, then this
        // one's is changed; two appends could otherwise check each other crosswise.
        let _appends = self.appends.lock();
        let snapshot = self.snapshot(id)?;
        let others: Vec<Kref<Snapshot>> =
            self.snapshots.read().iter().filter(|s| s.id != id).cloned().collect();
        let in_use_elsewhere =
            |r: &SectorRange| others.iter().any(|o| o.storage.holds(&backend, r));
        snapshot.storage.append(backend.clone(), ranges, &in_use_elsewhere)
    }

    /// SNAPSHOT_TAKE.
    pub fn snapshot_take(&self, id: SnapshotId) -> Result<()> {
        self.snapshot(id)?.take(&self.shared)
    }

    /// SNAPSHOT_COLLECT: ids in creation order.
    pub fn snapshot_collect(&self) -> Vec<SnapshotId> {
        self.snapshots.read().iter().map(|s| s.id).collect()
    }

    /// SNAPSHOT_WAIT_EVENT. The waiter holds a snapshot reference for the whole wait; destroy
    /// wakes it with ESRCH.
    pub fn wait_event(&self, id: SnapshotId, timeout_ms: u32) -> Result<Event> {
        let snapshot = self.snapshot(id)?;
        snapshot.storage.events.wait(timeout_ms, &self.shared.clock)
    }

    /// Storage accounting of a snapshot.
    pub fn storage_stats(&self, id: SnapshotId) -> Result<StorageStats> {
        Ok(self.snapshot(id)?.storage.stats())
    }

    // ---- data path -------------------------------------------------------------------------

    /// Read the origin.
    pub fn read(&self, dev: DeviceId, offset_bytes: u64, buf: &mut [u8]) -> Result<()> {
        let disk = self.disk(dev)?;
        check_io_range(offset_bytes, buf.len() as u64, disk.capacity_bytes)?;
        if buf.is_empty() {
            return Ok(());
        }
        disk.backend.read_at(buf, offset_bytes)
    }

    /// Write the origin (CBT, then copy-on-write, then the write).
    pub fn write(&self, dev: DeviceId, offset_bytes: u64, data: &[u8]) -> Result<()> {
        self.write_data(dev, offset_bytes, WriteData::Bytes(data))
    }

    /// Discard on the origin: a write of zeroes (deterministic content; COW and CBT as a write).
    pub fn discard(&self, dev: DeviceId, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        self.write_data(dev, offset_bytes, WriteData::Zeroes(len_bytes))
    }

    /// Write zeroes on the origin.
    pub fn write_zeroes(&self, dev: DeviceId, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        self.write_data(dev, offset_bytes, WriteData::Zeroes(len_bytes))
    }

    fn write_data(&self, dev: DeviceId, offset_bytes: u64, data: WriteData<'_>) -> Result<()> {
        let disk = self.disk(dev)?;
        let len_bytes = data.len_bytes();
        check_io_range(offset_bytes, len_bytes, disk.capacity_bytes)?;
        if len_bytes == 0 {
            return Ok(());
        }
        let range = SectorRange::new(offset_bytes >> SECTOR_SHIFT, len_bytes >> SECTOR_SHIFT);
        let gate = disk.gate_read()?;
        if let Some(tracker) = &gate.tracker {
            // Inside the capacity checked above, so inside the map.
            tracker.cbt.mark_write(range)?;
        }
        if let Some(area) = &gate.diff_area {
            if !area.is_corrupted() {
                DiffArea::copy_on_write(area, range.offset, range.count);
            }
        }
        let result = match data {
            WriteData::Bytes(b) => disk.backend.write_at(b, offset_bytes),
            WriteData::Zeroes(n) => disk.backend.write_zeroes_at(offset_bytes, n),
        };
        drop(gate);
        result
    }

    /// The asynchronous origin write's first half, for a caller that must never block (a ublk
    /// queue thread): if the disk's gate is free for reading right now and the write needs no
    /// copy-on-write (no snapshot, a corrupted one, or every chunk stored already), marks the
    /// CBT and returns a [`WriteTicket`]; the caller then writes `len_bytes` at `offset_bytes`
    /// to the disk's backing itself and drops the ticket when that write has completed (every
    /// gate write section — a take — waits for it). `Ok(None)`: nothing was done, use
    /// [`Engine::write`]. Errors as `write`'s range and disk checks.
    pub fn try_write_begin(
        &self,
        dev: DeviceId,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<Option<WriteTicket>> {
        let disk = self.disk(dev)?;
        check_io_range(offset_bytes, len_bytes, disk.capacity_bytes)?;
        if len_bytes == 0 {
            return Ok(None);
        }
        let range = SectorRange::new(offset_bytes >> SECTOR_SHIFT, len_bytes >> SECTOR_SHIFT);
        let Some(gate) = disk.gate.try_read() else {
            return Ok(None);
        };
        if gate.removed {
            return Err(Error::new(Errno::ENODEV, "the disk was removed"));
        }
        if let Some(area) = &gate.diff_area {
            if !area.is_corrupted() && !area.range_stored(range.offset, range.count) {
                return Ok(None);
            }
        }
        if let Some(tracker) = &gate.tracker {
            tracker.cbt.mark_write(range)?;
        }
        let ticket = WriteTicket::new(disk.clone(), &gate);
        drop(gate);
        Ok(Some(ticket))
    }

    /// Flush the origin's backing.
    pub fn flush(&self, dev: DeviceId) -> Result<()> {
        self.disk(dev)?.backend.flush()
    }

    fn image(
        &self,
        dev: DeviceId,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<(Arc<Disk>, Kref<DiffArea>)> {
        let disk = self.disk(dev)?;
        let area = disk.open_image().ok_or(Error::new(Errno::ENODEV, "no snapshot image"))?;
        check_io_range(offset_bytes, len_bytes, disk.capacity_bytes)?;
        Ok((disk, area))
    }

    /// Read the snapshot image of `dev`.
    pub fn image_read(&self, dev: DeviceId, offset_bytes: u64, buf: &mut [u8]) -> Result<()> {
        let (_disk, area) = self.image(dev, offset_bytes, buf.len() as u64)?;
        if area.is_corrupted() {
            return Err(Error::new(Errno::EIO, "the snapshot image is corrupted"));
        }
        if buf.is_empty() {
            return Ok(());
        }
        DiffArea::image_read(&area, offset_bytes, buf)
    }

    /// Write the snapshot image of `dev` (marks both CBT maps first).
    pub fn image_write(&self, dev: DeviceId, offset_bytes: u64, data: &[u8]) -> Result<()> {
        let (disk, area) = self.image(dev, offset_bytes, data.len() as u64)?;
        if area.is_corrupted() {
            return Err(Error::new(Errno::EIO, "the snapshot image is corrupted"));
        }
        if data.is_empty() {
            return Ok(());
        }
        let range =
            SectorRange::new(offset_bytes >> SECTOR_SHIFT, data.len() as u64 >> SECTOR_SHIFT);
        if let Some(tracker) = &disk.gate.read().tracker {
            tracker.cbt.mark_both(range)?;
        }
        #[cfg(blksnap_bugs)]
        if self.shared.injected(crate::bugs::Bug::SeedADiffAreaUnpinned) {
            // v3: image I/O holds no reference; each chunk's work finds the area by pointer.
            let raw = crate::kref::Unowned::of(&area);
            drop(area);
            let chunk_bytes = raw.get().layout().chunk_size_bytes() as usize;
            for (i, piece) in data.chunks(chunk_bytes).enumerate() {
                let area = raw.upgrade();
                DiffArea::image_write(&area, offset_bytes + (i * chunk_bytes) as u64, piece)?;
            }
            return Ok(());
        }
        DiffArea::image_write(&area, offset_bytes, data)
    }

    /// Discard or write zeroes on the snapshot image of `dev`: afterwards the range reads as
    /// zeroes, exactly as after [`Engine::image_write`] of zeroes (both CBT maps marked first,
    /// the same checks and errors), without zero buffers: chunks the range covers wholly are
    /// zeroed in the difference storage by its `write_zeroes_at` (see
    /// [`DiffArea::image_write_zeroes`]).
    pub fn image_write_zeroes(
        &self,
        dev: DeviceId,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<()> {
        let (disk, area) = self.image(dev, offset_bytes, len_bytes)?;
        if area.is_corrupted() {
            return Err(Error::new(Errno::EIO, "the snapshot image is corrupted"));
        }
        if len_bytes == 0 {
            return Ok(());
        }
        let range = SectorRange::new(offset_bytes >> SECTOR_SHIFT, len_bytes >> SECTOR_SHIFT);
        if let Some(tracker) = &disk.gate.read().tracker {
            tracker.cbt.mark_both(range)?;
        }
        DiffArea::image_write_zeroes(&area, offset_bytes, len_bytes)
    }
}
