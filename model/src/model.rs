//! The model. See `docs/SEMANTICS.md` for the contract every method implements.
//!
//! Readings of the contract where it is silent (the engine must read it the same way):
//! * Growing a File storage (at create or after an allocation) counts as one storage *write* for
//!   fault injection: the contract says a growth can fail but names no I/O kind for it.
//! * A failed create (ENOMEM, ENOSPC, growth error) draws no snapshot id.
//! * An origin read of length 0 still performs its one origin read (the contract lists no
//!   `n = 0` shortcut for origin reads, unlike writes and image I/O).
//! * A failed origin write leaves the device content unchanged, but the CBT marks and the COW
//!   copies made before it stay ("nothing changes" is read as "no data changes").
//! * Append checks: too many ranges → EINVAL, then each range → EINVAL, then the per-snapshot
//!   range limit → ENOMEM. Add-disk checks: EINVAL, EALREADY, ENOMEM. Create checks ENOMEM first.
//! * `cbt_info` saturates a block size or block count that does not fit the ABI's u32.
//! * An image read that fails returns EIO whatever the injected errno was; an image write whose
//!   allocation or storage write fails corrupts the diff area with the *original* errno and
//!   returns EIO.

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
            Segment { chunk, start_sector: start, end_sector: end, whole: (start, end) == (chunk_start, chunk_end) }
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
    faults: BTreeMap<FaultKey, VecDeque<Errno>>,
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
    pub fn add_disk(&mut self, dev: DeviceId, capacity_bytes: u64, io_min_sectors: u64) -> Result<()> {
        if capacity_bytes % SECTOR_SIZE_BYTES != 0 {
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
    pub fn snapshot_create(&mut self, mode: StorageMode, initial_capacity_sectors: u64) -> Result<SnapshotId> {
        if self.snapshots.len() >= MAX_SNAPSHOTS {
            bail!(ENOMEM, "too many snapshots");
        }
        let minimum = self.params.diff_storage_minimum_sectors;
        let storage = match mode {
            StorageMode::Ranges => DiffStorage {
                // Empty; the low-space request for the first portion is outstanding at once.
                stats: StorageStats { requested_sectors: minimum, low_space: true, ..StorageStats::default() },
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
            self.push_event(self.snapshots.len() - 1, EventKind::LowFreeSpace { requested_sectors: minimum });
        }
        Ok(id)
    }

    /// Create-time sizing of a File storage whose current size is `capacity_sectors`.
    fn sized_file_storage(&mut self, limit_sectors: u64, growable: bool, capacity_sectors: u64) -> Result<DiffStorage> {
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
    pub fn snapshot_append_storage(&mut self, id: SnapshotId, backend: u32, backend_capacity_sectors: u64, ranges: &[SectorRange]) -> Result<()> {
        let si = self.snap_index(id).ok_or_else(no_snapshot)?;
        let storage = &mut self.snapshots[si].storage;
        let StorageKind::Ranges(state) = &mut storage.kind else {
            bail!(EINVAL, "a File storage cannot be appended to");
        };
        if ranges.len() > MAX_RANGES_PER_CALL {
            bail!(EINVAL, "too many ranges in one append");
        }
        check_append(state.appended.get(&backend), backend_capacity_sectors, ranges)?;
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
        if matches!(snap.storage.kind, StorageKind::Ranges(_)) && snap.storage.stats.capacity_sectors == 0 {
            bail!(EFAULT, "the snapshot has no difference storage");
        }
        for mi in 0..self.snapshots[si].members.len() {
            let dev = self.snapshots[si].members[mi].dev;
            let disk = self.disks.get_mut(&dev).expect("a member's disk is registered");
            let chunks = chunk_layout(&self.params, disk.capacity_bytes() / SECTOR_SIZE_BYTES, disk.io_min_sectors);
            disk.tracker.as_mut().expect("a member has a tracker").switch(&mut self.ids);
            let area = DiffArea { chunks, stored: BTreeSet::new(), image: disk.data.clone(), error: None };
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
    fn origin_write(&mut self, dev: DeviceId, offset_bytes: u64, len_bytes: u64, data: Option<&[u8]>) -> Result<()> {
        check_io_range(offset_bytes, len_bytes, self.disk(dev)?.capacity_bytes())?;
        if len_bytes == 0 {
            return Ok(());
        }
        let (first_sector, count_sectors) = (offset_bytes / SECTOR_SIZE_BYTES, len_bytes / SECTOR_SIZE_BYTES);
        if let Some(t) = self.disk_mut(dev)?.tracker.as_mut() {
            t.mark_write(first_sector, count_sectors);
        }
        if let Some(loc) = self.live_area(dev) {
            self.copy_on_write(loc, first_sector, count_sectors);
        }
        // The origin write happens even when the COW failed; its own failure changes no data.
        self.io(FaultTarget::Origin(dev), IoKind::Write)?;
        let target = &mut self.disk_mut(dev)?.data[sector_bytes(first_sector, first_sector + count_sectors)];
        match data {
            Some(bytes) => target.copy_from_slice(bytes),
            None => target.fill(0),
        }
        Ok(())
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
    pub fn image_read(&mut self, dev: DeviceId, offset_bytes: u64, len_bytes: u64) -> Result<Vec<u8>> {
        let loc = self.image_loc(dev, offset_bytes, len_bytes)?;
        if len_bytes == 0 {
            return Ok(Vec::new());
        }
        let (first_sector, count_sectors) = (offset_bytes / SECTOR_SIZE_BYTES, len_bytes / SECTOR_SIZE_BYTES);
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
        Ok(self.area_at(loc).image[sector_bytes(first_sector, first_sector + count_sectors)].to_vec())
    }
    /// Write the snapshot image of `dev`.
    pub fn image_write(&mut self, dev: DeviceId, offset_bytes: u64, data: &[u8]) -> Result<()> {
        let len_bytes = data.len() as u64;
        let loc = self.image_loc(dev, offset_bytes, len_bytes)?;
        if len_bytes == 0 {
            return Ok(());
        }
        let (first_sector, count_sectors) = (offset_bytes / SECTOR_SIZE_BYTES, len_bytes / SECTOR_SIZE_BYTES);
        self.tracker_mut(dev)?.mark_both(first_sector, count_sectors);
        let chunks = self.area_at(loc).chunks;
        for seg in segments(&chunks, first_sector, count_sectors) {
            self.image_write_segment(loc, seg)?;
            let source = sector_bytes(seg.start_sector - first_sector, seg.end_sector - first_sector);
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
            self.allocate(loc.snap, sectors).and_then(|()| self.io(FaultTarget::Storage, IoKind::Write))
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
        self.faults.entry(fault_key(target, kind)).or_default().push_back(errno);
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
fn check_append(existing: Option<&BTreeMap<u64, u64>>, backend_capacity_sectors: u64, ranges: &[SectorRange]) -> Result<()> {
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
            // Existing ranges are disjoint, so only the last one starting before `end` can
            // reach past `start`.
            if existing.range(..end).next_back().is_some_and(|(_, &e_end)| e_end > start) {
                bail!(EINVAL, "a storage range overlaps one appended earlier");
            }
        }
    }
    Ok(())
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
        self.snapshots[loc.snap].members[loc.member].area.as_mut().expect("a taken member has a diff area")
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
        match self.faults.get_mut(&fault_key(target, kind)).and_then(VecDeque::pop_front) {
            Some(errno) => Err(Error::new(errno, "injected I/O fault")),
            None => Ok(()),
        }
    }

    /// Growing a File storage: one storage write for fault injection (see the top of the file).
    fn grow_storage(&mut self) -> Result<()> {
        self.io(FaultTarget::Storage, IoKind::Write)
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
    fn allocate_file(&mut self, si: usize, count_sectors: u64, limit_sectors: u64, growable: bool) -> Result<()> {
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
            let target = stats.capacity_sectors + minimum.min(limit_sectors - stats.capacity_sectors);
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
