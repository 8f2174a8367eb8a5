//! The model. See `docs/SEMANTICS.md` for the contract every method implements.
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

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Range;

use crate::bail;
use crate::errno::{Errno, Error, Result};
use crate::formulas::{cbt_layout, chunk_layout, CbtLayout, ChunkLayout};
use crate::limits::{
    EVENT_QUEUE_CAPACITY, MAX_DEVICES_PER_SNAPSHOT, MAX_DISKS, MAX_RANGES_PER_CALL, MAX_SNAPSHOTS,
    MAX_STORAGE_RANGES,
};
use crate::params::{Params, SECTOR_SHIFT, SECTOR_SIZE_BYTES};
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

/// Nanoseconds per millisecond, for `wait_event` timeouts.
const NS_PER_MS: u64 = 1_000_000;

/// A device's change tracker: the CBT maps and their numbers.
#[derive(Clone, Debug)]
struct Tracker {
    layout: CbtLayout,
    /// Device capacity when the tracker was made (disks never resize here).
    capacity_bytes: u64,
    write_map: Vec<u8>,
    read_map: Vec<u8>,
    previous: u8,
    active: u8,
    generation: Uuid,
}

impl Tracker {
    fn new(layout: CbtLayout, capacity_bytes: u64, generation: Uuid) -> Tracker {
        let len = to_usize(layout.block_count);
        Tracker {
            layout,
            capacity_bytes,
            write_map: vec![0; len],
            read_map: vec![0; len],
            previous: 0,
            active: 1,
            generation,
        }
    }

    /// Sectors the maps cover: `block_count << k` (may exceed the capacity by a partial block).
    fn coverage_sectors(&self) -> u64 {
        self.layout.block_count.saturating_mul(self.layout.block_sectors())
    }

    /// An origin write: `write_map` with `active`.
    fn mark_write(&mut self, first_sector: u64, count_sectors: u64) {
        mark_map(&mut self.write_map, &self.layout, first_sector, count_sectors, self.active);
    }

    /// An image write or cbtdirty: `write_map` with `active` and `read_map` with `previous`.
    fn mark_both(&mut self, first_sector: u64, count_sectors: u64) {
        self.mark_write(first_sector, count_sectors);
        mark_map(&mut self.read_map, &self.layout, first_sector, count_sectors, self.previous);
    }

    /// The switch at take; a wrap of `active` past 255 draws a new generation from `ids`.
    fn switch(&mut self, ids: &mut IdGen) {
        self.previous = self.active;
        if self.active == u8::MAX {
            // active would be 256: restart numbering in a new generation; read_map stays stale.
            self.active = 1;
            self.write_map.fill(0);
            self.generation = ids.next_id();
        } else {
            self.active += 1;
            self.read_map.copy_from_slice(&self.write_map);
        }
    }
}

/// `map[i] = max(map[i], number)` for every block touched by `[first, first + count)` sectors.
/// The caller has checked the range lies inside the map's coverage and `count > 0`.
fn mark_map(map: &mut [u8], layout: &CbtLayout, first_sector: u64, count_sectors: u64, number: u8) {
    let k = layout.block_shift - SECTOR_SHIFT;
    let first_block = first_sector >> k;
    let last_block = (first_sector + count_sectors - 1) >> k;
    for byte in &mut map[to_usize(first_block)..=to_usize(last_block)] {
        *byte = (*byte).max(number);
    }
}

/// A registered disk.
#[derive(Clone, Debug)]
struct Disk {
    data: Vec<u8>,
    io_min_sectors: u64,
    tracker: Option<Tracker>,
}

impl Disk {
    fn capacity_bytes(&self) -> u64 {
        self.data.len() as u64
    }
}

/// A member device's state once its snapshot is taken: chunks, the image, the failure.
#[derive(Clone, Debug)]
struct DiffArea {
    chunks: ChunkLayout,
    /// Chunks copied to the storage (STORED); every other chunk is NEW.
    stored: BTreeSet<u64>,
    /// The image: the device content at take, plus image writes.
    image: Vec<u8>,
    /// The first failure; once set the area is corrupted for good.
    error: Option<Errno>,
}

/// One device of a snapshot, in add order.
#[derive(Clone, Debug)]
struct Member {
    dev: DeviceId,
    /// `Some` from the take on.
    area: Option<DiffArea>,
}

/// One appended v3 extent; only its size matters to the accounting.
#[derive(Clone, Copy, Debug)]
struct Extent {
    count_sectors: u64,
    used_sectors: u64,
}

/// v3 storage: extents in append order and, per backend, what was appended (start → end).
#[derive(Clone, Debug, Default)]
struct RangesStorage {
    extents: Vec<Extent>,
    /// Index of the first extent not yet moved past.
    cursor: usize,
    appended: BTreeMap<u32, BTreeMap<u64, u64>>,
}

#[derive(Clone, Debug)]
enum StorageKind {
    Ranges(RangesStorage),
    File { limit_sectors: u64, growable: bool },
}

#[derive(Clone, Debug)]
struct DiffStorage {
    stats: StorageStats,
    kind: StorageKind,
}

#[derive(Clone, Debug)]
struct Snapshot {
    id: SnapshotId,
    members: Vec<Member>,
    taken: bool,
    storage: DiffStorage,
    events: VecDeque<Event>,
    /// Events dropped because the queue was full (the contract counts them).
    dropped_events: u64,
}

/// Where a member lives: snapshot index (creation order) and member index (add order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Loc {
    snap: usize,
    member: usize,
}

/// Fault-queue key: `Some(dev)` for an origin, `None` for the storage; `true` for writes.
type FaultKey = (Option<DeviceId>, bool);

/// What an injected fault does to the I/O it hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectedFault {
    /// The I/O fails with this errno and changes nothing.
    Error(Errno),
    /// A torn write: the first `sectors_written` sectors reach the device (all of it if the
    /// write is shorter), then the write fails with `errno`. Other I/O behaves as `Error`.
    Torn {
        /// 512-byte sectors written before the failure.
        sectors_written: u64,
        /// What the caller sees.
        errno: Errno,
    },
}

impl InjectedFault {
    /// The errno the failed I/O returns.
    pub fn errno(self) -> Errno {
        match self {
            InjectedFault::Error(errno) | InjectedFault::Torn { errno, .. } => errno,
        }
    }

    fn into_error(self) -> Error {
        Error::new(self.errno(), "injected I/O fault")
    }
}

/// What a counted fault waits for: an I/O of a target and kind, or a File-storage growth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CountedKey {
    Io(FaultKey),
    Growth,
}

/// A counted fault: fires on the matching event after `skip` more have passed.
#[derive(Clone, Copy, Debug)]
struct Counted {
    key: CountedKey,
    skip: u64,
    fault: InjectedFault,
}

fn fault_key(target: FaultTarget, kind: IoKind) -> FaultKey {
    let dev = match target {
        FaultTarget::Origin(dev) => Some(dev),
        FaultTarget::Storage => None,
    };
    (dev, kind == IoKind::Write)
}

/// The part of a request that falls in one chunk, in sectors.
#[derive(Clone, Copy, Debug)]
struct Segment {
    chunk: u64,
    start_sector: u64,
    end_sector: u64,
    /// The segment covers the whole chunk (a short last chunk included).
    whole: bool,
}

/// The chunk segments of `[first, first + count)` sectors, ascending (`count > 0`).
fn segments(chunks: &ChunkLayout, first_sector: u64, count_sectors: u64) -> Vec<Segment> {
    let end_sector = first_sector + count_sectors;
    let first_chunk = chunks.chunk_of_sector(first_sector);
    let last_chunk = chunks.chunk_of_sector(end_sector - 1);
    (first_chunk..=last_chunk)
        .map(|chunk| {
            let chunk_start = chunks.first_sector_of(chunk);
            let chunk_end = chunk_start + chunks.sectors_of(chunk);
            let start = first_sector.max(chunk_start);
            let end = end_sector.min(chunk_end);
            Segment {
                chunk,
                start_sector: start,
                end_sector: end,
                whole: (start, end) == (chunk_start, chunk_end),
            }
        })
        .collect()
}

fn to_usize(x: u64) -> usize {
    usize::try_from(x).expect("the model holds everything in memory, so sizes fit usize")
}

/// Byte range of `[first, end)` sectors, for indexing a device or image vector.
fn sector_bytes(start_sector: u64, end_sector: u64) -> Range<usize> {
    to_usize(start_sector * SECTOR_SIZE_BYTES)..to_usize(end_sector * SECTOR_SIZE_BYTES)
}

fn sat_u32(x: u64) -> u32 {
    u32::try_from(x).unwrap_or(u32::MAX)
}

fn eio() -> Error {
    Error::new(Errno::EIO, "image I/O failed")
}

/// The whole blksnap state, sequential.
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

    /// Register a disk of `capacity_bytes` (multiple of 512) whose io_min is `io_min_sectors`.
    pub fn add_disk(
        &mut self,
        dev: DeviceId,
        capacity_bytes: u64,
        io_min_sectors: u64,
    ) -> Result<()> {
        if !capacity_bytes.is_multiple_of(SECTOR_SIZE_BYTES) {
            bail!(EINVAL, "a disk's capacity must be a multiple of 512 bytes");
        }
        if self.disks.contains_key(&dev) {
            bail!(EALREADY, "this device number is already registered");
        }
        if self.disks.len() >= MAX_DISKS {
            bail!(ENOMEM, "too many disks");
        }
        let len = usize::try_from(capacity_bytes)
            .map_err(|_| Error::new(Errno::ENOMEM, "the disk does not fit in memory"))?;
        self.disks.insert(dev, Disk { data: vec![0; len], io_min_sectors, tracker: None });
        Ok(())
    }
    /// BLKFILTER_ATTACH.
    pub fn attach(&mut self, dev: DeviceId) -> Result<()> {
        let params = self.params;
        let disk = self.disks.get_mut(&dev).ok_or_else(no_disk)?;
        if disk.tracker.is_some() {
            bail!(EALREADY, "the device already has a tracker");
        }
        let capacity_bytes = disk.capacity_bytes();
        let layout = cbt_layout(&params, capacity_bytes / SECTOR_SIZE_BYTES);
        disk.tracker = Some(Tracker::new(layout, capacity_bytes, self.ids.next_id()));
        Ok(())
    }
    /// BLKFILTER_DETACH.
    pub fn detach(&mut self, dev: DeviceId) -> Result<()> {
        self.tracker(dev)?;
        if self.member_loc(dev).is_some() {
            bail!(EBUSY, "the device is a member of a snapshot");
        }
        self.disk_mut(dev)?.tracker = None;
        Ok(())
    }
    /// ctl cbtinfo.
    pub fn cbt_info(&self, dev: DeviceId) -> Result<CbtInfo> {
        let t = self.tracker(dev)?;
        Ok(CbtInfo {
            device_capacity_bytes: t.capacity_bytes,
            block_size_bytes: sat_u32(t.layout.block_size_bytes()),
            block_count: sat_u32(t.layout.block_count),
            generation_id: t.generation,
            changes_number: t.previous,
        })
    }
    /// ctl cbtmap.
    pub fn cbt_map(&self, dev: DeviceId, offset: u32, length: u32) -> Result<Vec<u8>> {
        let t = self.tracker(dev)?;
        let (offset, length) = (u64::from(offset), u64::from(length));
        let count = t.layout.block_count;
        if offset > count || length > count - offset {
            bail!(ENODATA, "the requested part of the CBT map is out of bounds");
        }
        Ok(t.read_map[to_usize(offset)..to_usize(offset + length)].to_vec())
    }
    /// ctl cbtdirty.
    pub fn cbt_dirty(&mut self, dev: DeviceId, ranges: &[SectorRange]) -> Result<()> {
        let coverage_sectors = self.tracker(dev)?.coverage_sectors();
        if ranges.len() > MAX_RANGES_PER_CALL {
            bail!(EINVAL, "too many ranges in one cbtdirty call");
        }
        // Validate everything first: the call is all-or-nothing.
        for r in ranges.iter().filter(|r| r.count > 0) {
            match r.end() {
                Some(end) if end <= coverage_sectors => {}
                _ => bail!(EINVAL, "a cbtdirty range overflows or ends past the CBT map"),
            }
        }
        let t = self.tracker_mut(dev)?;
        for r in ranges.iter().filter(|r| r.count > 0) {
            t.mark_both(r.offset, r.count);
        }
        Ok(())
    }
    /// ctl snapshotadd.
    pub fn snapshot_add(&mut self, id: SnapshotId, dev: DeviceId) -> Result<()> {
        self.tracker(dev)?;
        let si = self.snap_index(id).ok_or_else(no_snapshot)?;
        if let Some(loc) = self.member_loc(dev) {
            if loc.snap == si {
                bail!(EALREADY, "the device is already in this snapshot");
            }
            bail!(EBUSY, "the device is in another snapshot");
        }
        let snap = &mut self.snapshots[si];
        if snap.taken {
            bail!(EBUSY, "devices cannot be added to a taken snapshot");
        }
        if snap.members.len() >= MAX_DEVICES_PER_SNAPSHOT {
            bail!(ENOMEM, "too many devices in one snapshot");
        }
        snap.members.push(Member { dev, area: None });
        Ok(())
    }
    /// ctl snapshotinfo.
    pub fn snapshot_info(&self, dev: DeviceId) -> Result<SnapshotInfo> {
        self.tracker(dev)?;
        let area = self.member_loc(dev).and_then(|loc| self.area(loc));
        Ok(SnapshotInfo {
            error_code: area.and_then(|a| a.error).map_or(0, |e| -e.code()),
            image: area.map(|_| dev),
        })
    }

    /// SNAPSHOT_CREATE. `initial_capacity_sectors` is the File storage's current size (ignored for
    /// Ranges).
    pub fn snapshot_create(
        &mut self,
        mode: StorageMode,
        initial_capacity_sectors: u64,
    ) -> Result<SnapshotId> {
        if self.snapshots.len() >= MAX_SNAPSHOTS {
            bail!(ENOMEM, "too many snapshots");
        }
        let minimum = self.params.diff_storage_minimum_sectors;
        let storage = match mode {
            StorageMode::Ranges => DiffStorage {
                // Empty; the low-space request for the first portion is outstanding at once.
                stats: StorageStats {
                    requested_sectors: minimum,
                    low_space: true,
                    ..StorageStats::default()
                },
                kind: StorageKind::Ranges(RangesStorage::default()),
            },
            StorageMode::File { limit_sectors, growable } => {
                self.sized_file_storage(limit_sectors, growable, initial_capacity_sectors)?
            }
        };
        let id = self.ids.next_id();
        self.snapshots.push(Snapshot {
            id,
            members: Vec::new(),
            taken: false,
            storage,
            events: VecDeque::new(),
            dropped_events: 0,
        });
        if mode == StorageMode::Ranges {
            self.push_event(
                self.snapshots.len() - 1,
                EventKind::LowFreeSpace { requested_sectors: minimum },
            );
        }
        Ok(id)
    }

    /// Create-time sizing of a File storage whose current size is `capacity_sectors`.
    fn sized_file_storage(
        &mut self,
        limit_sectors: u64,
        growable: bool,
        capacity_sectors: u64,
    ) -> Result<DiffStorage> {
        let minimum = self.params.diff_storage_minimum_sectors;
        let mut stats = StorageStats {
            capacity_sectors,
            requested_sectors: capacity_sectors,
            ..StorageStats::default()
        };
        let big_enough = capacity_sectors > self.params.low_space_threshold_sectors();
        if !big_enough && capacity_sectors != limit_sectors {
            if capacity_sectors > limit_sectors {
                bail!(ENOSPC, "the storage is already larger than its limit");
            }
            if growable {
                let target = capacity_sectors + minimum.min(limit_sectors - capacity_sectors);
                self.grow_storage()?;
                stats.capacity_sectors = target;
                stats.requested_sectors = target;
            }
        }
        Ok(DiffStorage { stats, kind: StorageKind::File { limit_sectors, growable } })
    }

    /// SNAPSHOT_DESTROY.
    pub fn snapshot_destroy(&mut self, id: SnapshotId) -> Result<()> {
        let si = self
            .snap_index(id)
            .ok_or_else(|| Error::new(Errno::ENODEV, "no snapshot with this id to destroy"))?;
        // Members, images, storage and queued events go with it; trackers and CBT stay.
        self.snapshots.remove(si);
        Ok(())
    }
    /// SNAPSHOT_APPEND_STORAGE: `ranges` on storage backend number `backend`, whose size is
    /// `backend_capacity_sectors`.
    pub fn snapshot_append_storage(
        &mut self,
        id: SnapshotId,
        backend: u32,
        backend_capacity_sectors: u64,
        ranges: &[SectorRange],
    ) -> Result<()> {
        let si = self.snap_index(id).ok_or_else(no_snapshot)?;
        // A range another live snapshot already holds on the same backend: the two images would
        // overwrite each other's pre-images (checked after this snapshot's own EINVAL rules).
        let in_use_elsewhere = |r: &SectorRange| {
            self.snapshots.iter().enumerate().any(|(i, other)| {
                let StorageKind::Ranges(o) = &other.storage.kind else { return false };
                i != si && o.appended.get(&backend).is_some_and(|m| overlaps_any(m, r))
            })
        };
        let crossing = ranges.iter().filter(|r| r.count > 0).any(in_use_elsewhere);
        let storage = &mut self.snapshots[si].storage;
        let StorageKind::Ranges(state) = &mut storage.kind else {
            bail!(EINVAL, "a File storage cannot be appended to");
        };
        if ranges.len() > MAX_RANGES_PER_CALL {
            bail!(EINVAL, "too many ranges in one append");
        }
        check_append(state.appended.get(&backend), backend_capacity_sectors, ranges)?;
        if crossing {
            bail!(EBUSY, "a storage range is in use by another snapshot");
        }
        let new_count = ranges.iter().filter(|r| r.count > 0).count();
        if state.extents.len() + new_count > MAX_STORAGE_RANGES {
            bail!(ENOMEM, "too many storage ranges in one snapshot");
        }
        let appended = state.appended.entry(backend).or_default();
        for r in ranges.iter().filter(|r| r.count > 0) {
            state.extents.push(Extent { count_sectors: r.count, used_sectors: 0 });
            appended.insert(r.offset, r.offset + r.count);
            storage.stats.capacity_sectors = storage.stats.capacity_sectors.saturating_add(r.count);
        }
        storage.stats.low_space = false;
        Ok(())
    }
    /// SNAPSHOT_TAKE.
    pub fn snapshot_take(&mut self, id: SnapshotId) -> Result<()> {
        let si = self.snap_index(id).ok_or_else(no_snapshot)?;
        let snap = &self.snapshots[si];
        if snap.taken {
            bail!(EALREADY, "the snapshot is already taken");
        }
        if snap.members.is_empty() {
            bail!(ENODEV, "the snapshot has no devices");
        }
        if matches!(snap.storage.kind, StorageKind::Ranges(_))
            && snap.storage.stats.capacity_sectors == 0
        {
            bail!(EFAULT, "the snapshot has no difference storage");
        }
        for mi in 0..self.snapshots[si].members.len() {
            let dev = self.snapshots[si].members[mi].dev;
            let disk = self.disks.get_mut(&dev).expect("a member's disk is registered");
            let chunks = chunk_layout(
                &self.params,
                disk.capacity_bytes() / SECTOR_SIZE_BYTES,
                disk.io_min_sectors,
            );
            disk.tracker.as_mut().expect("a member has a tracker").switch(&mut self.ids);
            let area =
                DiffArea { chunks, stored: BTreeSet::new(), image: disk.data.clone(), error: None };
            self.snapshots[si].members[mi].area = Some(area);
        }
        self.snapshots[si].taken = true;
        Ok(())
    }
    /// SNAPSHOT_COLLECT.
    pub fn snapshot_collect(&self) -> Vec<SnapshotId> {
        self.snapshots.iter().map(|s| s.id).collect()
    }
    /// SNAPSHOT_WAIT_EVENT.
    pub fn wait_event(&mut self, id: SnapshotId, timeout_ms: u32) -> Result<Event> {
        let si = self.snap_index(id).ok_or_else(no_snapshot)?;
        if let Some(event) = self.snapshots[si].events.pop_front() {
            return Ok(event);
        }
        // Nothing queued: the simulated waiter sleeps out its whole timeout.
        self.advance_clock(u64::from(timeout_ms) * NS_PER_MS);
        bail!(ENOENT, "no event arrived within the timeout");
    }
    /// Storage accounting of a snapshot (ESRCH if unknown).
    pub fn storage_stats(&self, id: SnapshotId) -> Result<StorageStats> {
        let si = self.snap_index(id).ok_or_else(no_snapshot)?;
        Ok(self.snapshots[si].storage.stats)
    }

    /// Read the origin.
    pub fn read(&mut self, dev: DeviceId, offset_bytes: u64, len_bytes: u64) -> Result<Vec<u8>> {
        check_io_range(offset_bytes, len_bytes, self.disk(dev)?.capacity_bytes())?;
        if len_bytes == 0 {
            return Ok(Vec::new());
        }
        self.io(FaultTarget::Origin(dev), IoKind::Read)?;
        let range = to_usize(offset_bytes)..to_usize(offset_bytes + len_bytes);
        Ok(self.disk(dev)?.data[range].to_vec())
    }
    /// Write the origin.
    pub fn write(&mut self, dev: DeviceId, offset_bytes: u64, data: &[u8]) -> Result<()> {
        self.origin_write(dev, offset_bytes, data.len() as u64, Some(data))
    }
    /// Discard on the origin (= write zeroes).
    pub fn discard(&mut self, dev: DeviceId, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        self.origin_write(dev, offset_bytes, len_bytes, None)
    }
    /// Write zeroes on the origin.
    pub fn write_zeroes(&mut self, dev: DeviceId, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        self.origin_write(dev, offset_bytes, len_bytes, None)
    }

    /// An origin write of `data`, or of zeroes when `data` is `None`.
    fn origin_write(
        &mut self,
        dev: DeviceId,
        offset_bytes: u64,
        len_bytes: u64,
        data: Option<&[u8]>,
    ) -> Result<()> {
        check_io_range(offset_bytes, len_bytes, self.disk(dev)?.capacity_bytes())?;
        if len_bytes == 0 {
            return Ok(());
        }
        let (first_sector, count_sectors) =
            (offset_bytes / SECTOR_SIZE_BYTES, len_bytes / SECTOR_SIZE_BYTES);
        if let Some(t) = self.disk_mut(dev)?.tracker.as_mut() {
            t.mark_write(first_sector, count_sectors);
        }
        if let Some(loc) = self.live_area(dev) {
            self.copy_on_write(loc, first_sector, count_sectors);
        }
        // The origin write happens even when the COW failed; its own failure changes no data,
        // except the prefix a torn write lets through.
        let fault = self.io_fault(FaultTarget::Origin(dev), IoKind::Write);
        let landed_sectors = match fault {
            None => count_sectors,
            Some(InjectedFault::Error(_)) => 0,
            Some(InjectedFault::Torn { sectors_written, .. }) => sectors_written.min(count_sectors),
        };
        let target = &mut self.disk_mut(dev)?.data
            [sector_bytes(first_sector, first_sector + landed_sectors)];
        match data {
            Some(bytes) => target.copy_from_slice(&bytes[sector_bytes(0, landed_sectors)]),
            None => target.fill(0),
        }
        match fault {
            Some(f) => Err(f.into_error()),
            None => Ok(()),
        }
    }

    /// Saves the pre-image of every NEW chunk the write touches; the first failure corrupts the
    /// diff area and stops the COW (the origin write goes on regardless).
    fn copy_on_write(&mut self, loc: Loc, first_sector: u64, count_sectors: u64) {
        let chunks = self.area_at(loc).chunks;
        for seg in segments(&chunks, first_sector, count_sectors) {
            if self.area_at(loc).stored.contains(&seg.chunk) {
                continue;
            }
            if let Err(e) = self.copy_chunk(loc, seg.chunk) {
                self.corrupt(loc, e.errno);
                return;
            }
        }
    }

    /// COW of one NEW chunk: read it from the origin, allocate, write it to the storage.
    fn copy_chunk(&mut self, loc: Loc, chunk: u64) -> Result<()> {
        let dev = self.snapshots[loc.snap].members[loc.member].dev;
        self.io(FaultTarget::Origin(dev), IoKind::Read)?;
        let sectors = self.area_at(loc).chunks.sectors_of(chunk);
        self.allocate(loc.snap, sectors)?;
        self.io(FaultTarget::Storage, IoKind::Write)?;
        self.area_at_mut(loc).stored.insert(chunk);
        Ok(())
    }

    /// Read the snapshot image of `dev`.
    pub fn image_read(
        &mut self,
        dev: DeviceId,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<Vec<u8>> {
        let loc = self.image_loc(dev, offset_bytes, len_bytes)?;
        if len_bytes == 0 {
            return Ok(Vec::new());
        }
        let (first_sector, count_sectors) =
            (offset_bytes / SECTOR_SIZE_BYTES, len_bytes / SECTOR_SIZE_BYTES);
        let chunks = self.area_at(loc).chunks;
        for seg in segments(&chunks, first_sector, count_sectors) {
            // The data lives in the storage once STORED, on the origin while NEW.
            let target = if self.area_at(loc).stored.contains(&seg.chunk) {
                FaultTarget::Storage
            } else {
                FaultTarget::Origin(dev)
            };
            self.io(target, IoKind::Read).map_err(|_| eio())?;
        }
        Ok(self.area_at(loc).image[sector_bytes(first_sector, first_sector + count_sectors)]
            .to_vec())
    }
    /// Write the snapshot image of `dev`.
    pub fn image_write(&mut self, dev: DeviceId, offset_bytes: u64, data: &[u8]) -> Result<()> {
        let len_bytes = data.len() as u64;
        let loc = self.image_loc(dev, offset_bytes, len_bytes)?;
        if len_bytes == 0 {
            return Ok(());
        }
        let (first_sector, count_sectors) =
            (offset_bytes / SECTOR_SIZE_BYTES, len_bytes / SECTOR_SIZE_BYTES);
        self.tracker_mut(dev)?.mark_both(first_sector, count_sectors);
        let chunks = self.area_at(loc).chunks;
        for seg in segments(&chunks, first_sector, count_sectors) {
            self.image_write_segment(loc, seg)?;
            let source =
                sector_bytes(seg.start_sector - first_sector, seg.end_sector - first_sector);
            let target = sector_bytes(seg.start_sector, seg.end_sector);
            self.area_at_mut(loc).image[target].copy_from_slice(&data[source]);
        }
        Ok(())
    }

    /// The I/O of one image-write segment; EIO on failure (corrupting the area when the storage
    /// side failed).
    fn image_write_segment(&mut self, loc: Loc, seg: Segment) -> Result<()> {
        let dev = self.snapshots[loc.snap].members[loc.member].dev;
        let stored = self.area_at(loc).stored.contains(&seg.chunk);
        let result = if stored {
            self.io(FaultTarget::Storage, IoKind::Write)
        } else {
            if !seg.whole {
                // The rest of the chunk must come from the origin; that failure is not the
                // storage's fault, so no corruption.
                self.io(FaultTarget::Origin(dev), IoKind::Read).map_err(|_| eio())?;
            }
            let sectors = self.area_at(loc).chunks.sectors_of(seg.chunk);
            self.allocate(loc.snap, sectors)
                .and_then(|()| self.io(FaultTarget::Storage, IoKind::Write))
        };
        if let Err(e) = result {
            self.corrupt(loc, e.errno);
            return Err(eio());
        }
        self.area_at_mut(loc).stored.insert(seg.chunk);
        Ok(())
    }

    /// Make the next I/O of `kind` on `target` fail with `errno`.
    pub fn fail_next(&mut self, target: FaultTarget, kind: IoKind, errno: crate::Errno) {
        self.fail_next_fault(target, kind, InjectedFault::Error(errno));
    }
    /// Make the next write on `target` a torn write: its first `sectors_written` sectors land,
    /// then it fails with `errno` (queued with the [`Model::fail_next`] write faults, in order).
    pub fn fail_next_torn(&mut self, target: FaultTarget, sectors_written: u64, errno: Errno) {
        self.fail_next_fault(target, IoKind::Write, InjectedFault::Torn { sectors_written, errno });
    }
    /// Make the next I/O of `kind` on `target` fail with `fault`.
    pub fn fail_next_fault(&mut self, target: FaultTarget, kind: IoKind, fault: InjectedFault) {
        self.faults.entry(fault_key(target, kind)).or_default().push_back(fault);
    }
    /// Let `skip` I/Os of `kind` on `target` pass from now on, then fail the next one with
    /// `fault`, ahead of any [`Model::fail_next`] fault (the engine's pinned `fail_at`).
    pub fn fail_nth(&mut self, target: FaultTarget, kind: IoKind, skip: u64, fault: InjectedFault) {
        let key = CountedKey::Io(fault_key(target, kind));
        self.counted.push(Counted { key, skip, fault });
    }
    /// Let `skip` File-storage growths pass from now on, then fail the next one with `errno`,
    /// ahead of any [`Model::fail_next_growth`] fault.
    pub fn fail_nth_growth(&mut self, skip: u64, errno: Errno) {
        let fault = InjectedFault::Error(errno);
        self.counted.push(Counted { key: CountedKey::Growth, skip, fault });
    }
    /// Faults armed and not fired yet (queued, counted and growth faults).
    pub fn pending_faults(&self) -> usize {
        self.faults.values().map(VecDeque::len).sum::<usize>()
            + self.growth_faults.len()
            + self.counted.len()
    }
    /// Make the next growth of a File storage (at create or after an allocation, any snapshot)
    /// fail with `errno`. Mirrors the engine's `FaultPlan::fail_set_len` on the storage plan.
    pub fn fail_next_growth(&mut self, errno: crate::Errno) {
        self.growth_faults.push_back(errno);
    }
}

fn no_disk() -> Error {
    Error::new(Errno::ENODEV, "no disk with this device number")
}

fn no_snapshot() -> Error {
    Error::new(Errno::ESRCH, "no snapshot with this id")
}

/// The append rules for one backend: every non-empty range inside the backend, and no overlap
/// with another range of the call or with `existing` (start → end) ranges.
fn check_append(
    existing: Option<&BTreeMap<u64, u64>>,
    backend_capacity_sectors: u64,
    ranges: &[SectorRange],
) -> Result<()> {
    let mut new: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for r in ranges.iter().filter(|r| r.count > 0) {
        match r.end() {
            Some(end) if end <= backend_capacity_sectors => new.push((r.offset, end)),
            _ => bail!(EINVAL, "a storage range overflows or ends past its backend"),
        }
    }
    new.sort_unstable();
    if new.windows(2).any(|w| w[1].0 < w[0].1) {
        bail!(EINVAL, "two ranges of one append overlap");
    }
    if let Some(existing) = existing {
        for &(start, end) in &new {
            if overlaps_any(existing, &SectorRange::new(start, end - start)) {
                bail!(EINVAL, "a storage range overlaps one appended earlier");
            }
        }
    }
    Ok(())
}

/// Whether `r` (count > 0, validated) overlaps one of the disjoint `[start, end)` ranges.
fn overlaps_any(existing: &BTreeMap<u64, u64>, r: &SectorRange) -> bool {
    let end = r.offset.saturating_add(r.count);
    // Existing ranges are disjoint, so only the last one starting before `end` can reach past
    // the start.
    existing.range(..end).next_back().is_some_and(|(_, &e_end)| e_end > r.offset)
}

/// Private helpers: lookups, fault consumption, allocation, events.
impl Model {
    fn disk(&self, dev: DeviceId) -> Result<&Disk> {
        self.disks.get(&dev).ok_or_else(no_disk)
    }

    fn disk_mut(&mut self, dev: DeviceId) -> Result<&mut Disk> {
        self.disks.get_mut(&dev).ok_or_else(no_disk)
    }

    /// ENODEV for an unknown disk, ENOENT when no filter is attached.
    fn tracker(&self, dev: DeviceId) -> Result<&Tracker> {
        self.disk(dev)?.tracker.as_ref().ok_or_else(no_tracker)
    }

    fn tracker_mut(&mut self, dev: DeviceId) -> Result<&mut Tracker> {
        self.disk_mut(dev)?.tracker.as_mut().ok_or_else(no_tracker)
    }

    fn snap_index(&self, id: SnapshotId) -> Option<usize> {
        self.snapshots.iter().position(|s| s.id == id)
    }

    /// The snapshot membership of `dev`, if any (a device is in at most one snapshot).
    fn member_loc(&self, dev: DeviceId) -> Option<Loc> {
        self.snapshots.iter().enumerate().find_map(|(snap, s)| {
            s.members.iter().position(|m| m.dev == dev).map(|member| Loc { snap, member })
        })
    }

    fn area(&self, loc: Loc) -> Option<&DiffArea> {
        self.snapshots[loc.snap].members[loc.member].area.as_ref()
    }

    /// The diff area at `loc`, which the caller knows exists (the snapshot is taken).
    fn area_at(&self, loc: Loc) -> &DiffArea {
        self.area(loc).expect("a taken member has a diff area")
    }

    fn area_at_mut(&mut self, loc: Loc) -> &mut DiffArea {
        self.snapshots[loc.snap].members[loc.member]
            .area
            .as_mut()
            .expect("a taken member has a diff area")
    }

    /// The member whose origin writes need COW: in a taken snapshot, diff area not corrupted.
    fn live_area(&self, dev: DeviceId) -> Option<Loc> {
        let loc = self.member_loc(dev)?;
        self.area(loc).is_some_and(|a| a.error.is_none()).then_some(loc)
    }

    /// The image checks shared by reads and writes, in contract order: ENODEV, EINVAL, EIO.
    fn image_loc(&self, dev: DeviceId, offset_bytes: u64, len_bytes: u64) -> Result<Loc> {
        let capacity_bytes = self.disk(dev)?.capacity_bytes();
        let loc = self
            .member_loc(dev)
            .filter(|loc| self.area(*loc).is_some())
            .ok_or_else(|| Error::new(Errno::ENODEV, "the device has no snapshot image"))?;
        check_io_range(offset_bytes, len_bytes, capacity_bytes)?;
        if self.area_at(loc).error.is_some() {
            bail!(EIO, "the image's difference area is corrupted");
        }
        Ok(loc)
    }

    /// One I/O on `target`: fails with the oldest queued fault of that kind, consuming it.
    fn io(&mut self, target: FaultTarget, kind: IoKind) -> Result<()> {
        match self.io_fault(target, kind) {
            Some(fault) => Err(fault.into_error()),
            None => Ok(()),
        }
    }

    /// One I/O on `target`: the fault it takes, if any (a counted one first, else the oldest
    /// queued one), consumed.
    fn io_fault(&mut self, target: FaultTarget, kind: IoKind) -> Option<InjectedFault> {
        let key = fault_key(target, kind);
        self.tick_counted(CountedKey::Io(key))
            .or_else(|| self.faults.get_mut(&key).and_then(VecDeque::pop_front))
    }

    /// Counts one event of `key` against the counted faults: the oldest one due fires (and any
    /// other due one expires, as a pinned rule of the engine whose op has passed); the others
    /// of this key count down.
    fn tick_counted(&mut self, key: CountedKey) -> Option<InjectedFault> {
        let mut fired = None;
        self.counted.retain_mut(|c| {
            if c.key != key {
                return true;
            }
            if c.skip == 0 {
                fired = fired.or(Some(c.fault));
                return false;
            }
            c.skip -= 1;
            true
        });
        fired
    }

    /// Growing a File storage: fails with a counted growth fault or the oldest queued growth
    /// fault, consuming it.
    fn grow_storage(&mut self) -> Result<()> {
        if let Some(fault) = self.tick_counted(CountedKey::Growth) {
            return Err(fault.into_error());
        }
        match self.growth_faults.pop_front() {
            Some(errno) => Err(Error::new(errno, "injected storage growth fault")),
            None => Ok(()),
        }
    }

    /// Allocate `count_sectors` of the storage of snapshot `si` for one chunk.
    fn allocate(&mut self, si: usize, count_sectors: u64) -> Result<()> {
        let storage = &self.snapshots[si].storage;
        if storage.stats.overflow {
            bail!(ENOSPC, "the difference storage has overflowed");
        }
        match storage.kind {
            StorageKind::Ranges(_) => self.allocate_ranges(si, count_sectors),
            StorageKind::File { limit_sectors, growable } => {
                self.allocate_file(si, count_sectors, limit_sectors, growable)
            }
        }
    }

    /// v3: first fit in append order, wasting the tails moved past; then the threshold check.
    fn allocate_ranges(&mut self, si: usize, count_sectors: u64) -> Result<()> {
        let minimum = self.params.diff_storage_minimum_sectors;
        // Half the step, rounded down to a page (8 sectors).
        let threshold_sectors = (minimum / 2) & !7;
        let storage = &mut self.snapshots[si].storage;
        let StorageKind::Ranges(state) = &mut storage.kind else {
            unreachable!("allocate_ranges on a File storage");
        };
        let stats = &mut storage.stats;
        loop {
            let Some(extent) = state.extents.get_mut(state.cursor) else {
                stats.overflow = true;
                bail!(ENOSPC, "the difference storage is full");
            };
            let left = extent.count_sectors - extent.used_sectors;
            if left >= count_sectors {
                extent.used_sectors += count_sectors;
                stats.filled_sectors += count_sectors;
                break;
            }
            extent.used_sectors = extent.count_sectors;
            stats.filled_sectors += left;
            state.cursor += 1;
        }
        if !stats.low_space && stats.capacity_sectors - stats.filled_sectors <= threshold_sectors {
            stats.low_space = true;
            stats.requested_sectors = stats.capacity_sectors + minimum;
            self.push_event(si, EventKind::LowFreeSpace { requested_sectors: minimum });
        }
        Ok(())
    }

    /// newest: bump allocation bounded by `requested`; then growth or NoSpace at the threshold.
    fn allocate_file(
        &mut self,
        si: usize,
        count_sectors: u64,
        limit_sectors: u64,
        growable: bool,
    ) -> Result<()> {
        let minimum = self.params.diff_storage_minimum_sectors;
        let half_sectors = self.params.low_space_threshold_sectors();
        let stats = &mut self.snapshots[si].storage.stats;
        if stats.filled_sectors.saturating_add(count_sectors) > stats.requested_sectors {
            stats.overflow = true;
            bail!(ENOSPC, "the difference storage is full");
        }
        stats.filled_sectors += count_sectors;
        if stats.low_space || stats.requested_sectors - stats.filled_sectors > half_sectors {
            return Ok(());
        }
        stats.low_space = true;
        if !growable {
            // A block device cannot grow and says nothing: overflow will come.
            return Ok(());
        }
        if stats.capacity_sectors < limit_sectors {
            let target =
                stats.capacity_sectors + minimum.min(limit_sectors - stats.capacity_sectors);
            // A failed growth leaves the flag set: no retry, overflow comes later.
            if self.grow_storage().is_ok() {
                let stats = &mut self.snapshots[si].storage.stats;
                stats.capacity_sectors = target;
                stats.requested_sectors = target;
                stats.low_space = false;
            }
            return Ok(());
        }
        let requested_sectors = stats.requested_sectors;
        self.push_event(si, EventKind::NoSpace { requested_sectors });
        Ok(())
    }

    /// Queue an event on snapshot `si`, stamped now; a full queue drops it and counts the drop.
    fn push_event(&mut self, si: usize, kind: EventKind) {
        let time_ns = self.clock_ns;
        let snap = &mut self.snapshots[si];
        if snap.events.len() >= EVENT_QUEUE_CAPACITY {
            snap.dropped_events += 1;
            return;
        }
        snap.events.push_back(Event { time_ns, kind });
    }

    /// First error wins: record it and queue one Corrupted event; later errors are ignored.
    fn corrupt(&mut self, loc: Loc, errno: Errno) {
        let area = self.area_at_mut(loc);
        if area.error.is_some() {
            return;
        }
        area.error = Some(errno);
        let device = self.snapshots[loc.snap].members[loc.member].dev;
        self.push_event(loc.snap, EventKind::Corrupted { device, errno });
    }
}

fn no_tracker() -> Error {
    Error::new(Errno::ENOENT, "no blksnap filter is attached to the device")
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;
    const D1: DeviceId = DeviceId::new(8, 0);
    const D2: DeviceId = DeviceId::new(8, 16);
    const UNKNOWN: DeviceId = DeviceId::new(99, 99);
    const SEED: u64 = 7;
    /// Params::small(): 4 KiB chunks = 8 sectors.
    const CHUNK_BYTES: u64 = 4 * KIB;
    const CHUNK_SECTORS: u64 = 8;
    /// Params::small(): storage step 64 sectors, threshold 32.
    const MINIMUM_SECTORS: u64 = 64;

    fn model() -> Model {
        Model::new(Params::small(), SEED).unwrap()
    }

    fn errno<T: core::fmt::Debug>(r: Result<T>) -> Errno {
        r.unwrap_err().errno
    }

    /// A registered, attached disk filled with a pattern derived from `seed`; clean CBT maps.
    fn disk(m: &mut Model, dev: DeviceId, bytes: u64, seed: u8) {
        m.add_disk(dev, bytes, 8).unwrap();
        // Filled before the attach, so the CBT maps start all zero.
        m.write(dev, 0, &pattern(bytes, seed)).unwrap();
        m.attach(dev).unwrap();
    }

    fn pattern(len_bytes: u64, seed: u8) -> Vec<u8> {
        (0..len_bytes)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect()
    }

    /// A v3 snapshot of `devs` with `storage_sectors` appended on backend 0, taken, its create
    /// event drained.
    fn v3_taken(m: &mut Model, devs: &[DeviceId], storage_sectors: u64) -> SnapshotId {
        let id = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        assert!(matches!(m.wait_event(id, 0).unwrap().kind, EventKind::LowFreeSpace { .. }));
        m.snapshot_append_storage(id, 0, 1 << 30, &[SectorRange::new(0, storage_sectors)]).unwrap();
        for &dev in devs {
            m.snapshot_add(id, dev).unwrap();
        }
        m.snapshot_take(id).unwrap();
        id
    }

    /// A newest-style snapshot of `devs` on a File storage, taken.
    fn file_taken(
        m: &mut Model,
        devs: &[DeviceId],
        limit_sectors: u64,
        growable: bool,
        initial_sectors: u64,
    ) -> SnapshotId {
        let id = m
            .snapshot_create(StorageMode::File { limit_sectors, growable }, initial_sectors)
            .unwrap();
        for &dev in devs {
            m.snapshot_add(id, dev).unwrap();
        }
        m.snapshot_take(id).unwrap();
        id
    }

    fn events(m: &mut Model, id: SnapshotId) -> Vec<EventKind> {
        std::iter::from_fn(|| m.wait_event(id, 0).ok()).map(|e| e.kind).collect()
    }

    /// Dirty one byte in every chunk `first..first + n` of `dev` (one COW each).
    fn touch_chunks(m: &mut Model, dev: DeviceId, first: u64, n: u64) {
        for c in first..first + n {
            m.write(dev, c * CHUNK_BYTES, &[0xEE; 512]).unwrap();
        }
    }

    fn corrupted(device: DeviceId, errno: Errno) -> EventKind {
        EventKind::Corrupted { device, errno }
    }

    // ---- parameters, clock, disks ----

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
    fn add_disk_errors() {
        let mut m = model();
        assert_eq!(errno(m.add_disk(D1, 513, 8)), Errno::EINVAL);
        m.add_disk(D1, 64 * KIB, 8).unwrap();
        assert_eq!(errno(m.add_disk(D1, 64 * KIB, 8)), Errno::EALREADY);
        assert_eq!(errno(m.add_disk(D1, 1, 8)), Errno::EINVAL, "EINVAL is checked first");
        for i in 1..MAX_DISKS as u32 {
            m.add_disk(DeviceId::new(1, i), 0, 8).unwrap();
        }
        assert_eq!(errno(m.add_disk(D2, 0, 8)), Errno::ENOMEM);
    }

    #[test]
    fn new_disk_reads_zeroes_and_keeps_writes() {
        let mut m = model();
        m.add_disk(D1, 64 * KIB, 8).unwrap();
        assert_eq!(m.read(D1, 0, 1024).unwrap(), vec![0; 1024]);
        m.write(D1, 512, &[7; 512]).unwrap();
        assert_eq!(m.read(D1, 512, 512).unwrap(), vec![7; 512]);
        assert_eq!(m.read(D1, 0, 0).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn every_operation_on_an_unknown_disk_is_enodev() {
        let mut m = model();
        let id = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        assert_eq!(errno(m.attach(UNKNOWN)), Errno::ENODEV);
        assert_eq!(errno(m.detach(UNKNOWN)), Errno::ENODEV);
        assert_eq!(errno(m.cbt_info(UNKNOWN)), Errno::ENODEV);
        assert_eq!(errno(m.cbt_map(UNKNOWN, 0, 0)), Errno::ENODEV);
        assert_eq!(errno(m.cbt_dirty(UNKNOWN, &[])), Errno::ENODEV);
        assert_eq!(errno(m.snapshot_add(id, UNKNOWN)), Errno::ENODEV);
        assert_eq!(errno(m.snapshot_info(UNKNOWN)), Errno::ENODEV);
        assert_eq!(errno(m.read(UNKNOWN, 0, 0)), Errno::ENODEV);
        assert_eq!(errno(m.write(UNKNOWN, 0, &[])), Errno::ENODEV);
        assert_eq!(errno(m.discard(UNKNOWN, 0, 0)), Errno::ENODEV);
        assert_eq!(errno(m.write_zeroes(UNKNOWN, 0, 0)), Errno::ENODEV);
        assert_eq!(errno(m.image_read(UNKNOWN, 0, 0)), Errno::ENODEV);
        assert_eq!(errno(m.image_write(UNKNOWN, 0, &[])), Errno::ENODEV);
    }

    #[test]
    fn origin_io_geometry_is_checked() {
        let mut m = model();
        m.add_disk(D1, 64 * KIB, 8).unwrap();
        assert_eq!(errno(m.read(D1, 1, 512)), Errno::EINVAL);
        assert_eq!(errno(m.read(D1, 0, 100)), Errno::EINVAL);
        assert_eq!(errno(m.read(D1, 64 * KIB, 512)), Errno::EINVAL);
        assert_eq!(errno(m.write(D1, 64 * KIB - 512, &[0; 1024])), Errno::EINVAL);
        assert_eq!(errno(m.discard(D1, 512, 3)), Errno::EINVAL);
        assert_eq!(errno(m.write_zeroes(D1, u64::MAX - 511, 1024)), Errno::EINVAL);
        m.write(D1, 64 * KIB, &[]).unwrap();
    }

    #[test]
    fn discard_and_write_zeroes_write_zeroes() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        m.discard(D1, 0, 1024).unwrap();
        m.write_zeroes(D1, 4096, 512).unwrap();
        assert_eq!(m.read(D1, 0, 1024).unwrap(), vec![0; 1024]);
        assert_eq!(m.read(D1, 4096, 512).unwrap(), vec![0; 512]);
        assert_eq!(m.read(D1, 1024, 512).unwrap(), pattern(64 * KIB, 1)[1024..1536].to_vec());
    }

    // ---- trackers ----

    #[test]
    fn attach_detach_rules() {
        let mut m = model();
        m.add_disk(D1, 64 * KIB, 8).unwrap();
        assert_eq!(errno(m.detach(D1)), Errno::ENOENT);
        m.attach(D1).unwrap();
        assert_eq!(errno(m.attach(D1)), Errno::EALREADY);
        let first = m.cbt_info(D1).unwrap().generation_id;
        m.write(D1, 0, &[1; 512]).unwrap();
        m.detach(D1).unwrap();
        assert_eq!(errno(m.cbt_info(D1)), Errno::ENOENT);
        m.attach(D1).unwrap();
        let info = m.cbt_info(D1).unwrap();
        assert_ne!(info.generation_id, first, "a new attach is a new generation");
        assert_eq!(m.tracker(D1).unwrap().write_map, vec![0; 16], "maps start zeroed");
    }

    #[test]
    fn detach_of_a_member_is_ebusy_until_destroy() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        let id = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        m.snapshot_add(id, D1).unwrap();
        assert_eq!(errno(m.detach(D1)), Errno::EBUSY, "member of an untaken snapshot");
        m.snapshot_append_storage(id, 0, 1024, &[SectorRange::new(0, 64)]).unwrap();
        m.snapshot_take(id).unwrap();
        assert_eq!(errno(m.detach(D1)), Errno::EBUSY, "member of a taken snapshot");
        m.snapshot_destroy(id).unwrap();
        m.detach(D1).unwrap();
    }

    #[test]
    fn ctls_without_a_tracker_are_enoent() {
        let mut m = model();
        m.add_disk(D1, 64 * KIB, 8).unwrap();
        let id = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        assert_eq!(errno(m.cbt_info(D1)), Errno::ENOENT);
        assert_eq!(errno(m.cbt_map(D1, 0, 0)), Errno::ENOENT);
        assert_eq!(errno(m.cbt_dirty(D1, &[])), Errno::ENOENT);
        assert_eq!(errno(m.snapshot_add(id, D1)), Errno::ENOENT);
        assert_eq!(
            errno(m.snapshot_add(Uuid::default(), D1)),
            Errno::ENOENT,
            "ENOENT before ESRCH"
        );
        assert_eq!(errno(m.snapshot_info(D1)), Errno::ENOENT);
        // Origin I/O needs no tracker.
        m.write(D1, 0, &[1; 512]).unwrap();
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

    #[test]
    fn cbt_info_reports_the_layout() {
        let mut m = model();
        disk(&mut m, D1, 66 * KIB, 1);
        let info = m.cbt_info(D1).unwrap();
        assert_eq!(info.device_capacity_bytes, 66 * KIB);
        assert_eq!(info.block_size_bytes, 4096);
        assert_eq!(info.block_count, 17, "a partial last block counts");
        assert_eq!(info.changes_number, 0);
    }

    // ---- CBT ----

    #[test]
    fn origin_writes_mark_the_write_map_only() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        // Sectors 9..17 touch blocks 1 and 2 (8 sectors per block).
        m.write(D1, 9 * 512, &[1; 8 * 512]).unwrap();
        m.discard(D1, 40 * 512, 512).unwrap();
        m.write_zeroes(D1, 127 * 512, 512).unwrap();
        m.write(D1, 0, &[]).unwrap();
        let t = m.tracker(D1).unwrap();
        let mut expected = vec![0u8; 16];
        for b in [1, 2, 5, 15] {
            expected[b] = 1;
        }
        assert_eq!(t.write_map, expected);
        assert_eq!(m.cbt_map(D1, 0, 16).unwrap(), vec![0; 16], "the read map waits for a take");
    }

    #[test]
    fn cbt_map_bounds_are_enodata() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        assert_eq!(m.cbt_map(D1, 0, 16).unwrap().len(), 16);
        assert_eq!(m.cbt_map(D1, 16, 0).unwrap(), Vec::<u8>::new());
        assert_eq!(m.cbt_map(D1, 10, 6).unwrap().len(), 6);
        assert_eq!(errno(m.cbt_map(D1, 17, 0)), Errno::ENODATA);
        assert_eq!(errno(m.cbt_map(D1, 10, 7)), Errno::ENODATA);
        assert_eq!(errno(m.cbt_map(D1, 0, u32::MAX)), Errno::ENODATA);
        assert_eq!(errno(m.cbt_map(D1, u32::MAX, u32::MAX)), Errno::ENODATA);
    }

    #[test]
    fn take_switches_the_cbt_and_freezes_the_read_map() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        let generation = m.cbt_info(D1).unwrap().generation_id;
        m.write(D1, 0, &[1; 512]).unwrap();
        let id = v3_taken(&mut m, &[D1], 64);
        let info = m.cbt_info(D1).unwrap();
        assert_eq!((info.changes_number, info.generation_id), (1, generation));
        assert_eq!(m.cbt_map(D1, 0, 2).unwrap(), vec![1, 0]);
        m.write(D1, 4096, &[1; 512]).unwrap();
        assert_eq!(m.cbt_map(D1, 0, 2).unwrap(), vec![1, 0], "writes after take do not show");
        assert_eq!(m.tracker(D1).unwrap().write_map[..2], [1, 2]);
        m.snapshot_destroy(id).unwrap();
        v3_taken(&mut m, &[D1], 64);
        assert_eq!(m.cbt_info(D1).unwrap().changes_number, 2);
        assert_eq!(m.cbt_map(D1, 0, 2).unwrap(), vec![1, 2]);
    }

    /// One take of a fresh single-device snapshot, destroyed at once.
    fn take_once(m: &mut Model, dev: DeviceId) {
        let id = m
            .snapshot_create(StorageMode::File { limit_sectors: 1 << 20, growable: true }, 1 << 20)
            .unwrap();
        m.snapshot_add(id, dev).unwrap();
        m.snapshot_take(id).unwrap();
        m.snapshot_destroy(id).unwrap();
    }

    #[test]
    fn cbt_wraps_at_the_255th_take() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        let generation = m.cbt_info(D1).unwrap().generation_id;
        for _ in 0..253 {
            take_once(&mut m, D1);
        }
        m.write(D1, 2 * 4096, &[1; 512]).unwrap(); // write_map[2] = 254
        take_once(&mut m, D1); // take #254
        let t = m.tracker(D1).unwrap();
        assert_eq!((t.previous, t.active, t.generation), (254, 255, generation));
        assert_eq!(m.cbt_map(D1, 2, 2).unwrap(), vec![254, 0]);
        m.write(D1, 3 * 4096, &[1; 512]).unwrap(); // write_map[3] = 255
        take_once(&mut m, D1); // take #255: wrap
        let t = m.tracker(D1).unwrap();
        assert_eq!((t.previous, t.active), (255, 1));
        assert_ne!(t.generation, generation, "a wrap is a new generation");
        assert_eq!(t.write_map, vec![0; 16], "the write map is zeroed");
        assert_eq!(m.cbt_map(D1, 2, 2).unwrap(), vec![254, 0], "the read map is stale");
        assert_eq!(m.cbt_info(D1).unwrap().changes_number, 255);
        m.write(D1, 5 * 4096, &[1; 512]).unwrap(); // write_map[5] = 1
        take_once(&mut m, D1); // take #256
        let t = m.tracker(D1).unwrap();
        assert_eq!((t.previous, t.active), (1, 2));
        let mut expected = vec![0u8; 16];
        expected[5] = 1;
        assert_eq!(m.cbt_map(D1, 0, 16).unwrap(), expected, "a fresh copy after the wrap");
    }

    #[test]
    fn cbt_wrap_draws_the_next_id_in_sequence() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1); // id 0
        for _ in 0..254 {
            take_once(&mut m, D1); // ids 1..=254
        }
        take_once(&mut m, D1); // create draws id 255, the wrap id 256
        assert_eq!(m.cbt_info(D1).unwrap().generation_id, IdGen::nth(SEED, 256));
    }

    #[test]
    fn cbt_dirty_marks_both_maps() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        v3_taken(&mut m, &[D1], 64); // previous 1, active 2
        m.cbt_dirty(D1, &[SectorRange::new(8, 9), SectorRange::new(u64::MAX, 0)]).unwrap();
        let t = m.tracker(D1).unwrap();
        assert_eq!(t.read_map[..4], [0, 1, 1, 0]);
        assert_eq!(t.write_map[..4], [0, 2, 2, 0]);
        assert_eq!(m.cbt_map(D1, 0, 4).unwrap(), vec![0, 1, 1, 0]);
    }

    #[test]
    fn cbt_dirty_is_all_or_nothing() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        v3_taken(&mut m, &[D1], 64);
        let before = m.tracker(D1).unwrap().clone();
        let unchanged = |m: &Model| {
            let t = m.tracker(D1).unwrap();
            t.read_map == before.read_map && t.write_map == before.write_map
        };
        let too_many = vec![SectorRange::new(0, 1); MAX_RANGES_PER_CALL + 1];
        assert_eq!(errno(m.cbt_dirty(D1, &too_many)), Errno::EINVAL);
        // Coverage is 16 blocks x 8 sectors = 128 sectors.
        assert_eq!(
            errno(m.cbt_dirty(D1, &[SectorRange::new(0, 8), SectorRange::new(120, 9)])),
            Errno::EINVAL
        );
        assert_eq!(
            errno(m.cbt_dirty(D1, &[SectorRange::new(0, 8), SectorRange::new(u64::MAX, 2)])),
            Errno::EINVAL
        );
        assert!(unchanged(&m), "a rejected call applies no range");
        m.cbt_dirty(D1, &[SectorRange::new(120, 8)]).unwrap();
        m.cbt_dirty(D1, &vec![SectorRange::new(0, 1); MAX_RANGES_PER_CALL]).unwrap();
        m.cbt_dirty(D1, &[]).unwrap();
        assert_eq!(m.cbt_map(D1, 0, 16).unwrap()[15], 1);
    }

    #[test]
    fn cbt_dirty_coverage_includes_a_partial_last_block() {
        let mut m = model();
        disk(&mut m, D1, 66 * KIB, 1); // 132 sectors, 17 blocks = 136 sectors of coverage
        m.cbt_dirty(D1, &[SectorRange::new(132, 4)]).unwrap();
        assert_eq!(errno(m.cbt_dirty(D1, &[SectorRange::new(132, 5)])), Errno::EINVAL);
    }

    #[test]
    fn image_writes_mark_both_maps() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        v3_taken(&mut m, &[D1], 128);
        m.image_write(D1, 3 * 4096 + 512, &[9; 512]).unwrap();
        let t = m.tracker(D1).unwrap();
        assert_eq!((t.read_map[3], t.write_map[3]), (1, 2));
        assert_eq!(m.cbt_map(D1, 3, 1).unwrap(), vec![1]);
    }

    // ---- snapshots ----

    #[test]
    fn snapshot_add_checks_in_order() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        disk(&mut m, D2, 64 * KIB, 2);
        let a = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        let b = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        assert_eq!(errno(m.snapshot_add(Uuid::default(), D1)), Errno::ESRCH);
        m.snapshot_add(a, D1).unwrap();
        assert_eq!(errno(m.snapshot_add(a, D1)), Errno::EALREADY);
        assert_eq!(errno(m.snapshot_add(b, D1)), Errno::EBUSY, "in another snapshot");
        m.snapshot_append_storage(a, 0, 1024, &[SectorRange::new(0, 64)]).unwrap();
        m.snapshot_take(a).unwrap();
        assert_eq!(
            errno(m.snapshot_add(a, D1)),
            Errno::EALREADY,
            "EALREADY before the taken check"
        );
        assert_eq!(errno(m.snapshot_add(a, D2)), Errno::EBUSY, "the snapshot is taken");
        m.snapshot_add(b, D2).unwrap();
    }

    #[test]
    fn snapshot_add_limit_is_enomem() {
        let mut m = model();
        let id = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        for i in 0..=MAX_DEVICES_PER_SNAPSHOT as u32 {
            let dev = DeviceId::new(2, i);
            m.add_disk(dev, 0, 8).unwrap();
            m.attach(dev).unwrap();
            let r = m.snapshot_add(id, dev);
            if (i as usize) < MAX_DEVICES_PER_SNAPSHOT {
                r.unwrap();
            } else {
                assert_eq!(errno(r), Errno::ENOMEM);
            }
        }
    }

    #[test]
    fn snapshot_create_limit_is_enomem_and_draws_no_id() {
        let mut m = model();
        let file = StorageMode::File { limit_sectors: 0, growable: false };
        for _ in 0..MAX_SNAPSHOTS {
            m.snapshot_create(file, 0).unwrap();
        }
        assert_eq!(errno(m.snapshot_create(StorageMode::Ranges, 0)), Errno::ENOMEM);
        let first = m.snapshot_collect()[0];
        m.snapshot_destroy(first).unwrap();
        assert_eq!(m.snapshot_create(file, 0).unwrap(), IdGen::nth(SEED, MAX_SNAPSHOTS as u64));
    }

    #[test]
    fn snapshot_take_checks_in_order() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        assert_eq!(errno(m.snapshot_take(Uuid::default())), Errno::ESRCH);
        let id = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        assert_eq!(errno(m.snapshot_take(id)), Errno::ENODEV, "no devices");
        m.snapshot_add(id, D1).unwrap();
        assert_eq!(errno(m.snapshot_take(id)), Errno::EFAULT, "no storage");
        m.snapshot_append_storage(id, 0, 1024, &[SectorRange::new(5, 0)]).unwrap();
        assert_eq!(errno(m.snapshot_take(id)), Errno::EFAULT, "empty ranges add nothing");
        assert_eq!(m.snapshot_info(D1).unwrap().image, None, "a failed take makes no image");
        m.snapshot_append_storage(id, 0, 1024, &[SectorRange::new(0, 8)]).unwrap();
        m.snapshot_take(id).unwrap();
        assert_eq!(errno(m.snapshot_take(id)), Errno::EALREADY);
        assert_eq!(m.cbt_info(D1).unwrap().changes_number, 1, "one switch per take");
    }

    #[test]
    fn file_storage_take_needs_no_capacity() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        let id = file_taken(&mut m, &[D1], 0, false, 0);
        assert_eq!(m.snapshot_info(D1).unwrap().image, Some(D1));
        // The first COW overflows at once.
        m.write(D1, 0, &[1; 512]).unwrap();
        assert_eq!(events(&mut m, id), vec![corrupted(D1, Errno::ENOSPC)]);
    }

    #[test]
    fn destroy_collect_and_wait() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        assert_eq!(errno(m.snapshot_destroy(Uuid::default())), Errno::ENODEV);
        let a = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        let b = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        let c = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        assert_eq!(m.snapshot_collect(), vec![a, b, c], "creation order");
        m.snapshot_add(b, D1).unwrap();
        m.snapshot_append_storage(b, 0, 1024, &[SectorRange::new(0, 64)]).unwrap();
        m.snapshot_take(b).unwrap();
        m.snapshot_destroy(b).unwrap();
        assert_eq!(m.snapshot_collect(), vec![a, c]);
        assert_eq!(errno(m.snapshot_destroy(b)), Errno::ENODEV);
        assert_eq!(errno(m.wait_event(b, 10)), Errno::ESRCH, "the queue is closed");
        assert_eq!(errno(m.storage_stats(b)), Errno::ESRCH);
        assert_eq!(errno(m.snapshot_take(b)), Errno::ESRCH);
        assert_eq!(errno(m.snapshot_append_storage(b, 0, 1024, &[])), Errno::ESRCH);
        assert_eq!(errno(m.snapshot_add(b, D1)), Errno::ESRCH);
        // The tracker survives; the image is gone; the device is free again.
        assert_eq!(m.cbt_info(D1).unwrap().changes_number, 1);
        assert_eq!(m.snapshot_info(D1).unwrap(), SnapshotInfo { error_code: 0, image: None });
        assert_eq!(errno(m.image_read(D1, 0, 512)), Errno::ENODEV);
        m.snapshot_add(c, D1).unwrap();
    }

    #[test]
    fn wait_event_pops_in_order_and_times_out() {
        let mut m = model();
        m.advance_clock(5);
        let id = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        assert_eq!(errno(m.wait_event(Uuid::default(), 0)), Errno::ESRCH);
        let e = m.wait_event(id, 1000).unwrap();
        assert_eq!(
            e,
            Event {
                time_ns: 5,
                kind: EventKind::LowFreeSpace { requested_sectors: MINIMUM_SECTORS }
            }
        );
        assert_eq!(m.now_ns(), 5, "an event returns at once");
        assert_eq!(errno(m.wait_event(id, 250)), Errno::ENOENT);
        assert_eq!(m.now_ns(), 5 + 250 * NS_PER_MS, "the timeout is slept out");
        assert_eq!(errno(m.wait_event(id, 0)), Errno::ENOENT);
        assert_eq!(m.now_ns(), 5 + 250 * NS_PER_MS);
    }

    #[test]
    fn event_queue_drops_the_newest_when_full() {
        let mut m = model();
        let id = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        for n in 1..=EVENT_QUEUE_CAPACITY as u64 {
            m.push_event(0, EventKind::NoSpace { requested_sectors: n });
        }
        assert_eq!(m.snapshots[0].events.len(), EVENT_QUEUE_CAPACITY);
        assert_eq!(m.snapshots[0].dropped_events, 1);
        let kinds = events(&mut m, id);
        assert_eq!(kinds.len(), EVENT_QUEUE_CAPACITY);
        assert_eq!(kinds[0], EventKind::LowFreeSpace { requested_sectors: MINIMUM_SECTORS });
        assert_eq!(
            kinds[EVENT_QUEUE_CAPACITY - 1],
            EventKind::NoSpace { requested_sectors: EVENT_QUEUE_CAPACITY as u64 - 1 }
        );
    }

    #[test]
    fn snapshot_info_reports_image_and_error() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        assert_eq!(m.snapshot_info(D1).unwrap(), SnapshotInfo { error_code: 0, image: None });
        let id = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        m.snapshot_add(id, D1).unwrap();
        assert_eq!(m.snapshot_info(D1).unwrap().image, None, "not taken yet");
        m.snapshot_append_storage(id, 0, 1024, &[SectorRange::new(0, 8)]).unwrap();
        m.snapshot_take(id).unwrap();
        assert_eq!(m.snapshot_info(D1).unwrap(), SnapshotInfo { error_code: 0, image: Some(D1) });
        touch_chunks(&mut m, D1, 0, 2); // the second chunk overflows
        assert_eq!(m.snapshot_info(D1).unwrap(), SnapshotInfo { error_code: -28, image: Some(D1) });
    }

    // ---- difference storage: v3 ranges ----

    #[test]
    fn v3_create_requests_the_first_portion() {
        let mut m = model();
        let id = m.snapshot_create(StorageMode::Ranges, 12345).unwrap();
        let stats = m.storage_stats(id).unwrap();
        assert_eq!(
            stats,
            StorageStats {
                requested_sectors: MINIMUM_SECTORS,
                low_space: true,
                ..StorageStats::default()
            }
        );
        assert_eq!(
            events(&mut m, id),
            vec![EventKind::LowFreeSpace { requested_sectors: MINIMUM_SECTORS }]
        );
    }

    #[test]
    fn append_rules() {
        let mut m = model();
        let id = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        let r = SectorRange::new;
        let too_many = vec![r(0, 0); MAX_RANGES_PER_CALL + 1];
        assert_eq!(errno(m.snapshot_append_storage(id, 0, 1000, &too_many)), Errno::EINVAL);
        assert_eq!(
            errno(m.snapshot_append_storage(id, 0, 1000, &[r(0, 8), r(995, 6)])),
            Errno::EINVAL,
            "past the backend"
        );
        assert_eq!(
            errno(m.snapshot_append_storage(id, 0, u64::MAX, &[r(u64::MAX, 1)])),
            Errno::EINVAL,
            "overflow"
        );
        assert_eq!(
            errno(m.snapshot_append_storage(id, 0, 1000, &[r(100, 8), r(0, 8), r(104, 1)])),
            Errno::EINVAL,
            "overlap in one call"
        );
        assert_eq!(m.storage_stats(id).unwrap().capacity_sectors, 0, "nothing appended");
        m.snapshot_append_storage(id, 0, 1000, &[r(100, 8), r(0, 8), r(u64::MAX, 0), r(108, 2)])
            .unwrap();
        assert_eq!(m.storage_stats(id).unwrap().capacity_sectors, 18);
        assert_eq!(
            errno(m.snapshot_append_storage(id, 0, 1000, &[r(200, 8), r(7, 2)])),
            Errno::EINVAL,
            "overlap with an earlier append"
        );
        assert_eq!(errno(m.snapshot_append_storage(id, 0, 1000, &[r(90, 11)])), Errno::EINVAL);
        assert_eq!(
            errno(m.snapshot_append_storage(id, 0, 1000, &[r(50, 100)])),
            Errno::EINVAL,
            "covers an earlier range"
        );
        m.snapshot_append_storage(id, 0, 1000, &[r(8, 92), r(110, 1)]).unwrap();
        m.snapshot_append_storage(id, 1, 1000, &[r(0, 8)]).unwrap();
        assert_eq!(m.storage_stats(id).unwrap().capacity_sectors, 18 + 93 + 8);
        let file = m
            .snapshot_create(StorageMode::File { limit_sectors: 100, growable: true }, 100)
            .unwrap();
        assert_eq!(errno(m.snapshot_append_storage(file, 0, 1000, &[r(0, 8)])), Errno::EINVAL);
        assert_eq!(errno(m.snapshot_append_storage(Uuid::default(), 0, 1000, &[])), Errno::ESRCH);
    }

    #[test]
    fn append_overlap_across_live_snapshots_is_ebusy() {
        let mut m = model();
        let a = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        let b = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        m.snapshot_append_storage(a, 0, 1000, &[SectorRange::new(0, 8)]).unwrap();
        let err = m.snapshot_append_storage(b, 0, 1000, &[SectorRange::new(4, 8)]).unwrap_err();
        assert_eq!(err.errno, Errno::EBUSY);
        // Per-snapshot rules come first: a range past the backend is EINVAL even if it overlaps.
        let err = m.snapshot_append_storage(b, 0, 8, &[SectorRange::new(4, 8)]).unwrap_err();
        assert_eq!(err.errno, Errno::EINVAL);
        // Another backend, or the range freed by a destroy, is fine.
        m.snapshot_append_storage(b, 1, 1000, &[SectorRange::new(0, 8)]).unwrap();
        m.snapshot_destroy(a).unwrap();
        m.snapshot_append_storage(b, 0, 1000, &[SectorRange::new(0, 8)]).unwrap();
    }

    #[test]
    fn append_range_limit_is_enomem() {
        let mut m = model();
        let id = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        let calls = (MAX_STORAGE_RANGES / MAX_RANGES_PER_CALL) as u64;
        for call in 0..calls {
            let base = call * MAX_RANGES_PER_CALL as u64;
            let ranges: Vec<_> =
                (0..MAX_RANGES_PER_CALL as u64).map(|i| SectorRange::new(base + i, 1)).collect();
            m.snapshot_append_storage(id, 0, u64::MAX, &ranges).unwrap();
        }
        let one_more = [SectorRange::new(u64::MAX - 1, 1)];
        assert_eq!(errno(m.snapshot_append_storage(id, 0, u64::MAX, &one_more)), Errno::ENOMEM);
        m.snapshot_append_storage(id, 0, u64::MAX, &[SectorRange::new(u64::MAX - 1, 0)]).unwrap();
    }

    #[test]
    fn append_clears_the_low_space_flag() {
        let mut m = model();
        let id = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        m.snapshot_append_storage(id, 0, 1000, &[SectorRange::new(0, 0)]).unwrap();
        assert!(!m.storage_stats(id).unwrap().low_space, "cleared even with nothing appended");
    }

    #[test]
    fn v3_threshold_event_after_allocations() {
        let mut m = model();
        disk(&mut m, D1, 1024 * KIB, 1);
        let id = v3_taken(&mut m, &[D1], 128);
        // Threshold 32: 128 - 8n <= 32 first holds after the 12th chunk.
        touch_chunks(&mut m, D1, 0, 11);
        assert_eq!(events(&mut m, id), vec![]);
        assert!(!m.storage_stats(id).unwrap().low_space);
        m.advance_clock(77);
        touch_chunks(&mut m, D1, 0, 12); // chunks 0..11 are STORED: one new COW
        let e = m.wait_event(id, 0).unwrap();
        assert_eq!(
            e,
            Event {
                time_ns: 77,
                kind: EventKind::LowFreeSpace { requested_sectors: MINIMUM_SECTORS }
            }
        );
        let stats = m.storage_stats(id).unwrap();
        assert_eq!(
            stats,
            StorageStats {
                capacity_sectors: 128,
                filled_sectors: 96,
                requested_sectors: 192,
                overflow: false,
                low_space: true
            }
        );
        touch_chunks(&mut m, D1, 12, 2);
        assert_eq!(events(&mut m, id), vec![], "one event per flag cycle");
        m.snapshot_append_storage(id, 0, 1 << 30, &[SectorRange::new(1000, 64)]).unwrap();
        assert!(!m.storage_stats(id).unwrap().low_space);
        touch_chunks(&mut m, D1, 14, 1); // 192 - 120 = 72 > 32: quiet
        assert_eq!(events(&mut m, id), vec![]);
        touch_chunks(&mut m, D1, 15, 5); // 192 - 160 = 32: the next request
        assert_eq!(
            events(&mut m, id),
            vec![EventKind::LowFreeSpace { requested_sectors: MINIMUM_SECTORS }]
        );
        assert_eq!(m.storage_stats(id).unwrap().requested_sectors, 192 + MINIMUM_SECTORS);
    }

    #[test]
    fn v3_threshold_is_rounded_to_a_page() {
        let mut m =
            Model::new(Params { diff_storage_minimum_sectors: 24, ..Params::small() }, SEED)
                .unwrap();
        assert_eq!(m.params().diff_storage_minimum_sectors, 24);
        disk(&mut m, D1, 64 * KIB, 1);
        let id = v3_taken(&mut m, &[D1], 24);
        // Threshold = 12 rounded down to 8: 24 - 8 = 16 > 8, 24 - 16 = 8 <= 8.
        touch_chunks(&mut m, D1, 0, 1);
        assert_eq!(events(&mut m, id), vec![]);
        touch_chunks(&mut m, D1, 1, 1);
        assert_eq!(events(&mut m, id), vec![EventKind::LowFreeSpace { requested_sectors: 24 }]);
    }

    #[test]
    fn v3_extent_tails_are_wasted() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        let id = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        m.snapshot_append_storage(
            id,
            0,
            1000,
            &[SectorRange::new(0, 12), SectorRange::new(100, 8), SectorRange::new(200, 3)],
        )
        .unwrap();
        m.snapshot_add(id, D1).unwrap();
        m.snapshot_take(id).unwrap();
        touch_chunks(&mut m, D1, 0, 1);
        assert_eq!(m.storage_stats(id).unwrap().filled_sectors, 8);
        touch_chunks(&mut m, D1, 1, 1); // 4 left in the first extent: wasted
        assert_eq!(m.storage_stats(id).unwrap().filled_sectors, 20);
        touch_chunks(&mut m, D1, 2, 1); // the 3-sector extent is too small: wasted, then overflow
        let stats = m.storage_stats(id).unwrap();
        assert_eq!((stats.filled_sectors, stats.capacity_sectors, stats.overflow), (23, 23, true));
    }

    #[test]
    fn v3_overflow_corrupts_each_device_once() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        disk(&mut m, D2, 64 * KIB, 2);
        let id = v3_taken(&mut m, &[D1, D2], 16);
        touch_chunks(&mut m, D1, 0, 2); // fills the storage
        assert_eq!(
            events(&mut m, id),
            vec![EventKind::LowFreeSpace { requested_sectors: MINIMUM_SECTORS }]
        );
        touch_chunks(&mut m, D1, 2, 3); // overflow on the first, then no COW at all
        touch_chunks(&mut m, D2, 0, 2);
        assert_eq!(
            events(&mut m, id),
            vec![corrupted(D1, Errno::ENOSPC), corrupted(D2, Errno::ENOSPC)]
        );
        let stats = m.storage_stats(id).unwrap();
        assert!(stats.overflow);
        assert_eq!(stats.filled_sectors, 16);
        // The origin keeps working and holds every write.
        let mut expected = pattern(64 * KIB, 1);
        for c in 0..5 {
            expected[(c * CHUNK_BYTES) as usize..][..512].fill(0xEE);
        }
        assert!(m.read(D1, 0, 64 * KIB).unwrap() == expected);
        m.write(D1, 10 * CHUNK_BYTES, &[3; 4096]).unwrap();
        // The images are dead; appending does not revive the storage.
        assert_eq!(errno(m.image_read(D1, 0, 512)), Errno::EIO);
        assert_eq!(errno(m.image_write(D2, 0, &[0; 512])), Errno::EIO);
        assert_eq!(errno(m.image_read(D1, 0, 0)), Errno::EIO, "EIO before the empty shortcut");
        assert_eq!(errno(m.image_read(D1, 1, 512)), Errno::EINVAL, "EINVAL before EIO");
        assert_eq!(m.snapshot_info(D2).unwrap().error_code, -Errno::ENOSPC.code());
        m.snapshot_append_storage(id, 0, 1 << 30, &[SectorRange::new(1000, 64)]).unwrap();
        assert!(m.storage_stats(id).unwrap().overflow, "overflow is permanent");
        assert_eq!(events(&mut m, id), vec![]);
    }

    #[test]
    fn overflow_of_one_device_spares_another_that_needs_no_chunk() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        disk(&mut m, D2, 64 * KIB, 2);
        let id = v3_taken(&mut m, &[D1, D2], 8);
        touch_chunks(&mut m, D2, 0, 1);
        touch_chunks(&mut m, D1, 0, 1);
        assert_eq!(
            events(&mut m, id),
            vec![
                EventKind::LowFreeSpace { requested_sectors: MINIMUM_SECTORS },
                corrupted(D1, Errno::ENOSPC)
            ]
        );
        touch_chunks(&mut m, D2, 0, 1); // already STORED: no allocation, no corruption
        assert_eq!(m.snapshot_info(D2).unwrap().error_code, 0);
        assert_eq!(m.image_read(D2, 0, 4096).unwrap(), pattern(64 * KIB, 2)[..4096].to_vec());
    }

    // ---- difference storage: newest file ----

    fn file_stats(
        m: &mut Model,
        limit_sectors: u64,
        growable: bool,
        initial_sectors: u64,
    ) -> Result<StorageStats> {
        let id =
            m.snapshot_create(StorageMode::File { limit_sectors, growable }, initial_sectors)?;
        assert_eq!(events(m, id), vec![], "a File create queues no event");
        m.storage_stats(id)
    }

    fn sized(capacity_sectors: u64, requested_sectors: u64) -> StorageStats {
        StorageStats { capacity_sectors, requested_sectors, ..StorageStats::default() }
    }

    #[test]
    fn file_create_sizing() {
        let mut m = model();
        // Half the step is 32 sectors.
        assert_eq!(file_stats(&mut m, 1000, true, 40).unwrap(), sized(40, 40), "big enough");
        assert_eq!(
            file_stats(&mut m, 10, true, 40).unwrap(),
            sized(40, 40),
            "big enough beats the limit"
        );
        assert_eq!(file_stats(&mut m, 16, true, 16).unwrap(), sized(16, 16), "at the limit");
        assert_eq!(file_stats(&mut m, 1000, true, 8).unwrap(), sized(72, 72), "grown by one step");
        assert_eq!(
            file_stats(&mut m, 50, true, 8).unwrap(),
            sized(50, 50),
            "grown up to the limit"
        );
        assert_eq!(
            file_stats(&mut m, 1000, true, 32).unwrap(),
            sized(96, 96),
            "exactly half still grows"
        );
        assert_eq!(
            file_stats(&mut m, 1000, false, 8).unwrap(),
            sized(8, 8),
            "a block device never grows"
        );
        let before = m.snapshot_collect().len();
        assert_eq!(errno(file_stats(&mut m, 10, true, 20)), Errno::ENOSPC);
        assert_eq!(errno(file_stats(&mut m, 10, false, 32)), Errno::ENOSPC);
        assert_eq!(m.snapshot_collect().len(), before, "no snapshot");
        // Seven snapshots drew ids 0..=6; the failures drew none.
        assert_eq!(file_stats(&mut m, 0, false, 0).unwrap(), sized(0, 0));
        assert_eq!(*m.snapshot_collect().last().unwrap(), IdGen::nth(SEED, 7));
    }

    #[test]
    fn file_create_growth_failure_fails_the_create() {
        let mut m = model();
        m.fail_next(FaultTarget::Storage, IoKind::Write, Errno::EIO);
        m.fail_next_growth(Errno::EFBIG);
        assert_eq!(errno(file_stats(&mut m, 1000, true, 8)), Errno::EFBIG);
        assert!(m.snapshot_collect().is_empty());
        assert_eq!(file_stats(&mut m, 1000, true, 8).unwrap(), sized(72, 72), "consumed");
        m.fail_next_growth(Errno::EFBIG);
        assert_eq!(file_stats(&mut m, 1000, true, 40).unwrap(), sized(40, 40), "no growth");
        assert_eq!(file_stats(&mut m, 1000, false, 8).unwrap(), sized(8, 8), "not growable");
        assert_eq!(m.growth_faults.len(), 1, "still queued");
        assert_eq!(m.faults[&(None, true)].len(), 1, "a write fault never reaches a growth");
    }

    #[test]
    fn growth_takes_no_storage_write_fault() {
        let mut m = model();
        disk(&mut m, D1, 256 * KIB, 1);
        let id = file_taken(&mut m, &[D1], 1000, true, 8); // 72
        touch_chunks(&mut m, D1, 0, 4);
        // The 5th allocation grows the file; the queued write fault hits the chunk's write.
        m.fail_next(FaultTarget::Storage, IoKind::Write, Errno::EIO);
        touch_chunks(&mut m, D1, 4, 1);
        assert_eq!(m.storage_stats(id).unwrap().capacity_sectors, 136, "the growth succeeded");
        assert_eq!(events(&mut m, id), vec![corrupted(D1, Errno::EIO)]);
    }

    #[test]
    fn file_growth_then_no_space_once_then_overflow() {
        let mut m = model();
        disk(&mut m, D1, 256 * KIB, 1);
        let id = file_taken(&mut m, &[D1], 200, true, 8); // grown to 72 at create
                                                          // 72 - 8n <= 32 at n = 5: grow to 136.
        touch_chunks(&mut m, D1, 0, 5);
        assert_eq!(
            m.storage_stats(id).unwrap(),
            StorageStats {
                capacity_sectors: 136,
                filled_sectors: 40,
                requested_sectors: 136,
                overflow: false,
                low_space: false
            }
        );
        // 136 - 8n <= 32 at n = 13: grow to the limit.
        touch_chunks(&mut m, D1, 5, 8);
        assert_eq!(
            m.storage_stats(id).unwrap(),
            StorageStats {
                capacity_sectors: 200,
                filled_sectors: 104,
                requested_sectors: 200,
                overflow: false,
                low_space: false
            }
        );
        assert_eq!(events(&mut m, id), vec![]);
        // 200 - 8n <= 32 at n = 21: at the limit, NoSpace.
        m.advance_clock(9);
        touch_chunks(&mut m, D1, 13, 8);
        assert_eq!(
            m.wait_event(id, 0).unwrap(),
            Event { time_ns: 9, kind: EventKind::NoSpace { requested_sectors: 200 } }
        );
        assert!(m.storage_stats(id).unwrap().low_space);
        // n = 25 fills 200 exactly; the 26th chunk overflows.
        touch_chunks(&mut m, D1, 21, 4);
        assert_eq!(events(&mut m, id), vec![], "NoSpace fires once");
        assert_eq!(m.snapshot_info(D1).unwrap().error_code, 0);
        touch_chunks(&mut m, D1, 25, 2);
        assert_eq!(events(&mut m, id), vec![corrupted(D1, Errno::ENOSPC)]);
        let stats = m.storage_stats(id).unwrap();
        assert_eq!((stats.filled_sectors, stats.overflow, stats.low_space), (200, true, true));
    }

    #[test]
    fn file_growth_failure_keeps_the_flag_and_overflows_later() {
        let mut m = model();
        disk(&mut m, D1, 256 * KIB, 1);
        let id = file_taken(&mut m, &[D1], 1000, true, 8); // 72
        touch_chunks(&mut m, D1, 0, 4);
        // The 5th allocation tries to grow and fails; the chunk's own write succeeds.
        m.fail_next_growth(Errno::EFBIG);
        touch_chunks(&mut m, D1, 4, 1);
        let stats = m.storage_stats(id).unwrap();
        assert_eq!(
            (stats.capacity_sectors, stats.requested_sectors, stats.low_space),
            (72, 72, true)
        );
        assert_eq!(m.snapshot_info(D1).unwrap().error_code, 0);
        touch_chunks(&mut m, D1, 5, 4); // 9 chunks = 72 sectors: full, no retry, no event
        assert_eq!(events(&mut m, id), vec![]);
        touch_chunks(&mut m, D1, 9, 1);
        assert_eq!(events(&mut m, id), vec![corrupted(D1, Errno::ENOSPC)]);
    }

    #[test]
    fn non_growable_storage_never_emits_no_space() {
        let mut m = model();
        disk(&mut m, D1, 256 * KIB, 1);
        let id = file_taken(&mut m, &[D1], 1000, false, 100);
        touch_chunks(&mut m, D1, 0, 9); // 100 - 72 = 28 <= 32: the flag, silently
        let stats = m.storage_stats(id).unwrap();
        assert_eq!(
            (stats.capacity_sectors, stats.requested_sectors, stats.low_space),
            (100, 100, true)
        );
        touch_chunks(&mut m, D1, 9, 3); // 96 used
        assert_eq!(events(&mut m, id), vec![]);
        touch_chunks(&mut m, D1, 12, 1); // 104 > 100
        assert_eq!(events(&mut m, id), vec![corrupted(D1, Errno::ENOSPC)]);
        assert_eq!(m.storage_stats(id).unwrap().filled_sectors, 96);
    }

    #[test]
    fn params_changes_apply_to_later_allocations() {
        let mut m = model();
        disk(&mut m, D1, 256 * KIB, 1);
        let id = file_taken(&mut m, &[D1], 10_000, true, 8); // 72
        m.set_params(Params { diff_storage_minimum_sectors: 128, ..Params::small() }).unwrap();
        // Half is now 64: 72 - 8 = 64 triggers growth by 128.
        touch_chunks(&mut m, D1, 0, 1);
        assert_eq!(m.storage_stats(id).unwrap().capacity_sectors, 200);
    }

    // ---- data path ----

    #[test]
    fn image_reads_show_the_content_at_take() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        disk(&mut m, D2, 66 * KIB, 2);
        let at_take_1 = pattern(64 * KIB, 1);
        let at_take_2 = pattern(66 * KIB, 2);
        v3_taken(&mut m, &[D1, D2], 1024);
        m.write(D1, 0, &pattern(64 * KIB, 3)).unwrap();
        m.discard(D2, 4096, 8192).unwrap();
        m.write_zeroes(D2, 64 * KIB, 2 * KIB).unwrap(); // the short last chunk
        assert!(m.read(D1, 0, 64 * KIB).unwrap() == pattern(64 * KIB, 3));
        assert!(m.image_read(D1, 0, 64 * KIB).unwrap() == at_take_1);
        assert!(m.image_read(D2, 0, 66 * KIB).unwrap() == at_take_2);
        assert_eq!(m.image_read(D2, 4096 + 512, 1024).unwrap(), at_take_2[4608..5632].to_vec());
        assert_eq!(m.image_read(D1, 512, 0).unwrap(), Vec::<u8>::new());
        assert_eq!(errno(m.image_read(D1, 64 * KIB, 512)), Errno::EINVAL);
        assert_eq!(errno(m.image_write(D1, 512, &[0; 100])), Errno::EINVAL);
        let area = m.area_at(m.member_loc(D2).unwrap());
        assert_eq!(area.stored, [1, 2, 16].into_iter().collect(), "COW of touched chunks only");
        assert_eq!(area.chunks.last_chunk_sectors, 4);
    }

    #[test]
    fn no_image_without_a_taken_snapshot() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        assert_eq!(errno(m.image_read(D1, 0, 512)), Errno::ENODEV);
        let id = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        m.snapshot_add(id, D1).unwrap();
        assert_eq!(errno(m.image_write(D1, 0, &[0; 512])), Errno::ENODEV);
        assert_eq!(errno(m.image_read(D1, 1, 0)), Errno::ENODEV, "ENODEV before EINVAL");
        // Writes to a member of an untaken snapshot need no COW.
        m.write(D1, 0, &[5; 512]).unwrap();
        assert_eq!(m.storage_stats(id).unwrap().filled_sectors, 0);
    }

    #[test]
    fn image_writes_persist_and_do_not_touch_the_origin() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        let id = v3_taken(&mut m, &[D1], 1024);
        let mut image = pattern(64 * KIB, 1);
        // Unaligned, spanning chunks 0..=2 (partial, whole, partial).
        m.image_write(D1, 3 * KIB, &[0xAB; 7 * 1024]).unwrap();
        image[3 * 1024..10 * 1024].fill(0xAB);
        m.image_write(D1, 3 * KIB, &[]).unwrap();
        // A STORED chunk is overwritten in place.
        m.image_write(D1, 0, &[0xCD; 512]).unwrap();
        image[..512].fill(0xCD);
        // Then the origin changes the chunk again: no new COW.
        m.write(D1, 0, &[1; 4096]).unwrap();
        assert!(m.image_read(D1, 0, 64 * KIB).unwrap() == image);
        assert_eq!(m.read(D1, 0, 512).unwrap(), vec![1; 512]);
        assert!(
            m.read(D1, 4 * KIB, 6 * KIB).unwrap() == pattern(64 * KIB, 1)[4 * 1024..10 * 1024],
            "image writes leave the origin alone"
        );
        assert_eq!(
            m.storage_stats(id).unwrap().filled_sectors,
            3 * CHUNK_SECTORS,
            "each chunk allocated once"
        );
    }

    #[test]
    fn full_chunk_image_write_reads_nothing_from_the_origin() {
        let mut m = model();
        disk(&mut m, D1, 66 * KIB, 1);
        v3_taken(&mut m, &[D1], 1024);
        m.fail_next(FaultTarget::Origin(D1), IoKind::Read, Errno::EIO);
        m.image_write(D1, 4096, &[1; 4096]).unwrap();
        m.image_write(D1, 64 * KIB, &[2; 2048]).unwrap(); // the whole short last chunk
                                                          // The fault is still queued: a partial write consumes it and fails.
        assert_eq!(errno(m.image_write(D1, 8192, &[3; 512])), Errno::EIO);
        assert_eq!(
            m.snapshot_info(D1).unwrap().error_code,
            0,
            "an origin read failure is not corruption"
        );
        assert!(!m.area_at(m.member_loc(D1).unwrap()).stored.contains(&2), "the chunk stays NEW");
        m.image_write(D1, 8192, &[3; 512]).unwrap();
        assert_eq!(m.image_read(D1, 4096, 4608).unwrap(), [vec![1; 4096], vec![3; 512]].concat());
        assert_eq!(m.image_read(D1, 64 * KIB, 2048).unwrap(), vec![2; 2048]);
    }

    #[test]
    fn image_write_segments_before_a_failure_stay_written() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        let id = v3_taken(&mut m, &[D1], 1024);
        m.fail_next(FaultTarget::Origin(D1), IoKind::Read, Errno::EIO);
        // Chunk 0 whole (no origin read), chunk 1 partial (takes the fault).
        assert_eq!(errno(m.image_write(D1, 0, &[7; 4096 + 512])), Errno::EIO);
        let mut image = pattern(64 * KIB, 1);
        image[..4096].fill(7);
        assert_eq!(m.image_read(D1, 0, 8192).unwrap(), image[..8192].to_vec());
        assert_eq!(m.storage_stats(id).unwrap().filled_sectors, CHUNK_SECTORS);
        assert_eq!(m.cbt_map(D1, 0, 2).unwrap(), vec![1, 1], "the CBT was marked first");
    }

    #[test]
    fn image_write_storage_failure_corrupts() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        let id = v3_taken(&mut m, &[D1], 1024);
        m.image_write(D1, 0, &[1; 512]).unwrap();
        m.fail_next(FaultTarget::Storage, IoKind::Write, Errno::ENOMEM);
        assert_eq!(errno(m.image_write(D1, 0, &[2; 512])), Errno::EIO, "a STORED chunk's write");
        assert_eq!(events(&mut m, id), vec![corrupted(D1, Errno::ENOMEM)]);
        assert_eq!(m.snapshot_info(D1).unwrap().error_code, -Errno::ENOMEM.code());
        assert_eq!(errno(m.image_read(D1, 0, 512)), Errno::EIO);
        // COW stops; origin writes go on.
        m.write(D1, 8192, &[3; 512]).unwrap();
        assert_eq!(m.storage_stats(id).unwrap().filled_sectors, CHUNK_SECTORS);
    }

    #[test]
    fn image_write_new_chunk_storage_failure_corrupts() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        let id = v3_taken(&mut m, &[D1], 1024);
        m.fail_next(FaultTarget::Storage, IoKind::Write, Errno::EIO);
        assert_eq!(errno(m.image_write(D1, 0, &[2; 4096])), Errno::EIO);
        assert_eq!(events(&mut m, id), vec![corrupted(D1, Errno::EIO)]);
        assert_eq!(
            m.storage_stats(id).unwrap().filled_sectors,
            CHUNK_SECTORS,
            "allocated before the write"
        );
    }

    #[test]
    fn image_write_allocation_failure_corrupts() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        let id = file_taken(&mut m, &[D1], 0, false, 0);
        assert_eq!(errno(m.image_write(D1, 0, &[2; 4096])), Errno::EIO);
        assert_eq!(events(&mut m, id), vec![corrupted(D1, Errno::ENOSPC)]);
    }

    #[test]
    fn image_read_failures_are_eio_without_corruption() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        let id = v3_taken(&mut m, &[D1], 1024);
        m.write(D1, 0, &[1; 512]).unwrap(); // chunk 0 STORED
                                            // A storage-read fault only hits a STORED chunk.
        m.fail_next(FaultTarget::Storage, IoKind::Read, Errno::ENOMEM);
        assert_eq!(m.image_read(D1, 4096, 512).unwrap(), pattern(64 * KIB, 1)[4096..4608].to_vec());
        assert_eq!(errno(m.image_read(D1, 0, 8192)), Errno::EIO);
        m.fail_next(FaultTarget::Origin(D1), IoKind::Read, Errno::EIO);
        assert_eq!(m.image_read(D1, 0, 512).unwrap(), pattern(64 * KIB, 1)[..512].to_vec());
        assert_eq!(errno(m.image_read(D1, 0, 8192)), Errno::EIO, "chunk 1 is NEW");
        assert_eq!(events(&mut m, id), vec![]);
        assert_eq!(m.snapshot_info(D1).unwrap().error_code, 0);
        assert_eq!(m.image_read(D1, 0, 8192).unwrap(), pattern(64 * KIB, 1)[..8192].to_vec());
    }

    #[test]
    fn cow_origin_read_fault_corrupts_but_the_write_succeeds() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        disk(&mut m, D2, 64 * KIB, 2);
        let id = v3_taken(&mut m, &[D1, D2], 1024);
        m.fail_next(FaultTarget::Origin(D1), IoKind::Read, Errno::EIO);
        m.write(D1, 0, &[9; 8192]).unwrap();
        assert_eq!(m.read(D1, 0, 8192).unwrap(), vec![9; 8192]);
        assert_eq!(events(&mut m, id), vec![corrupted(D1, Errno::EIO)]);
        assert_eq!(m.storage_stats(id).unwrap().filled_sectors, 0, "the COW stopped at once");
        assert_eq!(errno(m.image_read(D1, 0, 512)), Errno::EIO);
        assert_eq!(m.snapshot_info(D1).unwrap().error_code, -Errno::EIO.code());
        // Later faults and writes add no event; the other device is unaffected.
        m.fail_next(FaultTarget::Origin(D1), IoKind::Read, Errno::ENOMEM);
        m.write(D1, 8192, &[9; 512]).unwrap();
        assert_eq!(
            errno(m.read(D1, 0, 512)),
            Errno::ENOMEM,
            "no COW took the fault; the plain read does"
        );
        assert_eq!(m.read(D1, 8192, 512).unwrap(), vec![9; 512]);
        m.write(D2, 0, &[9; 512]).unwrap();
        assert_eq!(m.image_read(D2, 0, 512).unwrap(), pattern(64 * KIB, 2)[..512].to_vec());
        assert_eq!(events(&mut m, id), vec![]);
    }

    #[test]
    fn cow_stops_at_the_first_failure() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        let id = v3_taken(&mut m, &[D1], 1024);
        m.write(D1, 4096, &[0; 512]).unwrap(); // chunk 1 STORED
                                               // Chunks 0, 2, 3 are NEW; chunk 2's storage write fails.
        m.fail_next(FaultTarget::Storage, IoKind::Write, Errno::EIO);
        m.fail_next(FaultTarget::Storage, IoKind::Write, Errno::EIO);
        m.write(D1, 0, &[4; 4 * 4096]).unwrap();
        // Chunk 0 took the first fault; the second is left for later.
        let area = m.area_at(m.member_loc(D1).unwrap());
        assert_eq!(area.stored, [1].into_iter().collect());
        assert_eq!(area.error, Some(Errno::EIO));
        assert_eq!(m.storage_stats(id).unwrap().filled_sectors, 2 * CHUNK_SECTORS);
        assert_eq!(m.faults[&(None, true)].len(), 1);
        assert_eq!(m.read(D1, 0, 4 * 4096).unwrap(), vec![4; 4 * 4096]);
    }

    #[test]
    fn failed_origin_write_changes_no_data() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        let id = v3_taken(&mut m, &[D1], 1024);
        m.fail_next(FaultTarget::Origin(D1), IoKind::Write, Errno::EIO);
        assert_eq!(errno(m.write(D1, 0, &[9; 512])), Errno::EIO);
        assert_eq!(m.read(D1, 0, 512).unwrap(), pattern(64 * KIB, 1)[..512].to_vec());
        // The COW and the CBT mark made before the write stay.
        assert_eq!(m.storage_stats(id).unwrap().filled_sectors, CHUNK_SECTORS);
        assert_eq!(m.tracker(D1).unwrap().write_map[0], 2);
        assert_eq!(events(&mut m, id), vec![]);
        m.fail_next(FaultTarget::Origin(D1), IoKind::Write, Errno::EIO);
        assert_eq!(errno(m.discard(D1, 0, 512)), Errno::EIO, "a discard is one origin write");
        m.fail_next(FaultTarget::Origin(D1), IoKind::Write, Errno::EIO);
        m.write(D1, 0, &[]).unwrap();
        assert_eq!(errno(m.write_zeroes(D1, 0, 512)), Errno::EIO, "an empty write does no I/O");
    }

    #[test]
    fn faults_are_per_target_and_kind_in_fifo_order() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        disk(&mut m, D2, 64 * KIB, 2);
        m.fail_next(FaultTarget::Origin(D1), IoKind::Read, Errno::EIO);
        m.fail_next(FaultTarget::Origin(D1), IoKind::Read, Errno::ENOMEM);
        m.fail_next(FaultTarget::Storage, IoKind::Read, Errno::EPERM);
        m.write(D1, 0, &[1; 512]).unwrap();
        m.read(D2, 0, 512).unwrap();
        assert_eq!(m.read(D1, 0, 0).unwrap(), Vec::<u8>::new(), "an empty read does no I/O");
        assert_eq!(errno(m.read(D1, 0, 512)), Errno::EIO);
        assert_eq!(errno(m.read(D1, 0, 512)), Errno::ENOMEM);
        m.read(D1, 0, 512).unwrap();
        assert_eq!(errno(m.read(D1, 1, 512)), Errno::EINVAL, "a rejected read does no I/O");
    }

    // ---- torn and counted faults ----

    #[test]
    fn torn_origin_write_leaves_a_prefix_and_fails() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        let id = v3_taken(&mut m, &[D1], 1024);
        let before = m.read(D1, 0, 4 * 512).unwrap();
        m.fail_next_torn(FaultTarget::Origin(D1), 2, Errno::EIO);
        assert_eq!(errno(m.write(D1, 0, &[9; 4 * 512])), Errno::EIO);
        let after = m.read(D1, 0, 4 * 512).unwrap();
        assert_eq!(after[..1024], [9; 1024]);
        assert_eq!(after[1024..], before[1024..]);
        // The COW before the write happened: the image still shows the content at take.
        assert_eq!(m.image_read(D1, 0, 2048).unwrap(), pattern(64 * KIB, 1)[..2048].to_vec());
        // Longer than the write: all of it lands, the error is still returned; zero fills too.
        m.fail_next_torn(FaultTarget::Origin(D1), 100, Errno::ENOSPC);
        assert_eq!(errno(m.discard(D1, 512, 512)), Errno::ENOSPC);
        assert_eq!(m.read(D1, 512, 512).unwrap(), vec![0; 512]);
        assert_eq!(events(&mut m, id), vec![]);
    }

    #[test]
    fn torn_storage_write_corrupts_like_an_error() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        let id = v3_taken(&mut m, &[D1], 1024);
        m.fail_next_torn(FaultTarget::Storage, 3, Errno::EIO);
        m.write(D1, 0, &[1; 512]).unwrap();
        assert_eq!(events(&mut m, id), vec![corrupted(D1, Errno::EIO)]);
        assert_eq!(errno(m.image_read(D1, 0, 512)), Errno::EIO);
    }

    #[test]
    fn counted_faults_skip_then_fire_first() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        m.fail_next(FaultTarget::Origin(D1), IoKind::Read, Errno::ENOMEM);
        m.fail_nth(FaultTarget::Origin(D1), IoKind::Read, 1, InjectedFault::Error(Errno::EIO));
        assert_eq!(m.pending_faults(), 2);
        // The first read is counted (skip 1 -> 0) and takes the queued fault.
        assert_eq!(errno(m.read(D1, 0, 512)), Errno::ENOMEM);
        assert_eq!(errno(m.read(D1, 0, 512)), Errno::EIO, "the counted one is due");
        m.read(D1, 0, 512).unwrap();
        m.fail_nth(FaultTarget::Origin(D1), IoKind::Write, 0, InjectedFault::Error(Errno::EIO));
        m.fail_nth(FaultTarget::Origin(D1), IoKind::Write, 0, InjectedFault::Error(Errno::EPERM));
        assert_eq!(errno(m.write(D1, 0, &[1; 512])), Errno::EIO);
        m.write(D1, 0, &[1; 512]).unwrap();
        assert_eq!(m.pending_faults(), 0, "a second rule due on the same I/O expires");
        // Growth: the second growth fails.
        m.snapshot_create(StorageMode::File { limit_sectors: 1000, growable: true }, 0).unwrap();
        m.fail_nth_growth(0, Errno::EFBIG);
        assert_eq!(
            errno(m.snapshot_create(StorageMode::File { limit_sectors: 1000, growable: true }, 0)),
            Errno::EFBIG
        );
    }
}
