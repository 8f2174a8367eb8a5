//! The difference storage (kernel: `diff_storage.c`): where chunks' pre-images go. Shared by
//! every device of a snapshot; owns the snapshot's event queue.
//!
//! Two modes (docs/SEMANTICS.md, "Difference storage"): **Ranges** (v3: extents appended by the
//! client, a `LowFreeSpace` event asks for more) and **File** (newest: one file grown by the
//! storage itself up to a limit, `NoSpace` at the limit). Both hand out each chunk's location
//! once; nothing is ever handed out twice (extents are consumed front to back, the file is a
//! bump allocator).
//!
//! Locking: `state` is a leaf except that allocation pushes events (storage → event queue) and
//! grows the file while holding it (growth is rare — once per `diff_storage_minimum` — and every
//! allocator would have to wait for it anyway).

use blksnap_model::limits::{MAX_RANGES_PER_CALL, MAX_STORAGE_RANGES};
use blksnap_model::params::SECTOR_SHIFT;
use blksnap_model::{Errno, Error, Event, EventKind, Result, SectorRange, StorageStats};

use crate::event_queue::EventQueue;
use crate::io::Dev;
use crate::sync::atomic::{AtomicBool, Ordering};
use crate::sync::Arc;
use crate::sync::{LockRank, Mutex};
use crate::Shared;

/// Where a chunk's pre-image lives.
#[derive(Clone)]
pub struct Location {
    /// The backend holding it.
    pub backend: Dev,
    /// First sector on that backend.
    pub sector: u64,
}

impl core::fmt::Debug for Location {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Location(sector {})", self.sector)
    }
}

impl Location {
    /// Byte offset of sector `delta_sectors` of this location.
    pub fn byte_offset(&self, delta_sectors: u64) -> u64 {
        (self.sector + delta_sectors) << SECTOR_SHIFT
    }
}

struct Extent {
    backend: Dev,
    range: SectorRange,
    used_sectors: u64,
}

enum Mode {
    Ranges { extents: Vec<Extent>, cursor: usize },
    File { backend: Dev, limit_sectors: u64, growable: bool },
}

struct State {
    mode: Mode,
    capacity_sectors: u64,
    filled_sectors: u64,
    requested_sectors: u64,
    low_space: bool,
    overflow: bool,
}

/// What a snapshot was created with.
#[derive(Clone)]
pub enum StorageSpec {
    /// v3: empty; the client appends ranges.
    Ranges,
    /// newest: a file (growable) or block device (fixed), at most `limit_sectors`.
    File {
        /// The storage backend.
        backend: Dev,
        /// Growth limit in sectors.
        limit_sectors: u64,
    },
}

/// A difference storage.
pub struct DiffStorage {
    state: Mutex<State>,
    /// The snapshot's events.
    pub events: EventQueue,
    shared: Arc<Shared>,
    /// Set when the snapshot leaves the engine's list (DESTROY's linearization point, under the
    /// list lock): from then on its images are closed ([`crate::diff_area::DiffArea::image_open`]
    /// is false), although the teardown that unpublishes them runs after the list lock is
    /// dropped. Without it, a second destroy could answer ENODEV (the snapshot is gone) and an
    /// image read started after that answer still succeed.
    destroyed: AtomicBool,
}

impl DiffStorage {
    /// Create with the create-time rules of the mode (v3 queues `LowFreeSpace` at once; newest
    /// sizes the file, ENOSPC when it is already over the limit).
    pub fn new(spec: StorageSpec, shared: Arc<Shared>) -> Result<DiffStorage> {
        let minimum = shared.params().diff_storage_minimum_sectors;
        let storage = match spec {
            StorageSpec::Ranges => {
                let st = State {
                    mode: Mode::Ranges { extents: Vec::new(), cursor: 0 },
                    capacity_sectors: 0,
                    filled_sectors: 0,
                    requested_sectors: minimum,
                    low_space: true,
                    overflow: false,
                };
                let events = EventQueue::for_engine(&shared);
                let s = DiffStorage {
                    state: Mutex::new(LockRank::StorageState, st),
                    events,
                    shared,
                    destroyed: AtomicBool::new(false),
                };
                s.emit(EventKind::LowFreeSpace { requested_sectors: minimum });
                s
            }
            StorageSpec::File { backend, limit_sectors } => {
                let st = size_file(backend, limit_sectors, minimum)?;
                DiffStorage {
                    state: Mutex::new(LockRank::StorageState, st),
                    events: EventQueue::for_engine(&shared),
                    shared,
                    destroyed: AtomicBool::new(false),
                }
            }
        };
        Ok(storage)
    }

    /// The snapshot left the engine's list: its images serve nothing from now on.
    pub fn mark_destroyed(&self) {
        self.destroyed.store(true, Ordering::Release);
    }

    /// Whether [`Self::mark_destroyed`] was called.
    pub fn is_destroyed(&self) -> bool {
        self.destroyed.load(Ordering::Acquire)
    }

    /// The engine context.
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// The engine clock's reading (event time labels).
    pub fn now_ns(&self) -> u64 {
        self.shared.clock.now_ns()
    }

    fn emit(&self, kind: EventKind) {
        self.events.push(Event { time_ns: self.shared.clock.now_ns(), kind });
    }

    /// Whether `range` overlaps a range of this (Ranges) storage on `backend`.
    pub fn holds(&self, backend: &Dev, range: &SectorRange) -> bool {
        let st = self.state.lock();
        let Mode::Ranges { extents, .. } = &st.mode else { return false };
        extents.iter().any(|e| {
            crate::sync::StdArc::ptr_eq(&e.backend, backend)
                && e.range.offset < range.offset.saturating_add(range.count)
                && range.offset < e.range.offset + e.range.count
        })
    }

    /// v3 APPEND_STORAGE (all-or-nothing; EINVAL for a File storage, bad or overlapping ranges;
    /// EBUSY if `in_use_elsewhere` says another snapshot holds a range).
    pub fn append(
        &self,
        backend: Dev,
        ranges: &[SectorRange],
        in_use_elsewhere: &dyn Fn(&SectorRange) -> bool,
    ) -> Result<()> {
        if ranges.len() > MAX_RANGES_PER_CALL {
            return Err(Error::new(Errno::EINVAL, "too many ranges in one call"));
        }
        let backend_sectors = backend.len_bytes() >> SECTOR_SHIFT;
        let new: Vec<SectorRange> = ranges.iter().copied().filter(|r| r.count > 0).collect();
        // Asked before this storage is locked: other storages' states rank equal to ours and
        // are never held together with it (the lock order). The answer stays true meanwhile,
        // since every change to any storage's ranges is an append, and appends are serialised.
        let busy = new.iter().any(in_use_elsewhere);
        let mut st = self.state.lock();
        let Mode::Ranges { extents, .. } = &mut st.mode else {
            return Err(Error::new(Errno::EINVAL, "a file-backed storage takes no ranges"));
        };
        validate_ranges(&new, backend_sectors, extents, &backend)?;
        if busy {
            return Err(Error::new(Errno::EBUSY, "a storage range is in use by another snapshot"));
        }
        if extents.len() + new.len() > MAX_STORAGE_RANGES {
            return Err(Error::new(Errno::ENOMEM, "too many storage ranges for one snapshot"));
        }
        let added: u64 = new.iter().map(|r| r.count).sum();
        for range in new {
            extents.push(Extent { backend: backend.clone(), range, used_sectors: 0 });
        }
        st.capacity_sectors += added;
        // An append answers the outstanding request; the next allocation re-evaluates.
        st.low_space = false;
        Ok(())
    }

    /// Capacity in sectors (TAKE refuses a Ranges storage with none).
    pub fn capacity_sectors(&self) -> u64 {
        self.state.lock().capacity_sectors
    }

    /// Whether this is a Ranges (v3) storage.
    pub fn is_ranges(&self) -> bool {
        matches!(self.state.lock().mode, Mode::Ranges { .. })
    }

    /// Accounting, for invariant checks.
    pub fn stats(&self) -> StorageStats {
        let st = self.state.lock();
        StorageStats {
            capacity_sectors: st.capacity_sectors,
            filled_sectors: st.filled_sectors,
            requested_sectors: st.requested_sectors,
            overflow: st.overflow,
            low_space: st.low_space,
        }
    }

    /// Hand out `count_sectors` for one chunk, once. ENOSPC on overflow (permanent).
    pub fn alloc(&self, count_sectors: u64) -> Result<Location> {
        assert!(count_sectors > 0, "a chunk has at least one sector");
        let params = self.shared.params();
        let mut st = self.state.lock();
        if st.overflow {
            return Err(Error::new(Errno::ENOSPC, "difference storage overflowed"));
        }
        let location = if matches!(st.mode, Mode::Ranges { .. }) {
            alloc_ranges(&mut st, count_sectors, &params, self)?
        } else {
            alloc_file(&mut st, count_sectors, &params, self)?
        };
        debug_assert!(st.filled_sectors <= st.capacity_sectors.max(st.requested_sectors));
        Ok(location)
    }
}

/// newest create-time sizing.
fn size_file(backend: Dev, limit_sectors: u64, minimum: u64) -> Result<State> {
    let growable = backend.can_grow();
    let mut capacity = backend.len_bytes() >> SECTOR_SHIFT;
    if capacity <= minimum / 2 && capacity != limit_sectors {
        if capacity > limit_sectors {
            return Err(Error::new(Errno::ENOSPC, "the storage is larger than its limit"));
        }
        if growable {
            let target = capacity + minimum.min(limit_sectors - capacity);
            backend.set_len(target << SECTOR_SHIFT)?;
            capacity = target;
        }
    }
    Ok(State {
        mode: Mode::File { backend, limit_sectors, growable },
        capacity_sectors: capacity,
        filled_sectors: 0,
        requested_sectors: capacity,
        low_space: false,
        overflow: false,
    })
}

fn validate_ranges(
    new: &[SectorRange],
    backend_sectors: u64,
    extents: &[Extent],
    backend: &Dev,
) -> Result<()> {
    let overlaps = |a: &SectorRange, b: &SectorRange| {
        a.offset < b.offset + b.count && b.offset < a.offset + a.count
    };
    for (i, r) in new.iter().enumerate() {
        match r.end() {
            Some(end) if end <= backend_sectors => {}
            _ => return Err(Error::new(Errno::EINVAL, "storage range beyond its device")),
        }
        let same_backend =
            extents.iter().filter(|e| crate::sync::StdArc::ptr_eq(&e.backend, backend));
        if new[..i].iter().any(|o| overlaps(o, r))
            || same_backend.map(|e| e.range).any(|o| overlaps(&o, r))
        {
            return Err(Error::new(Errno::EINVAL, "storage ranges overlap"));
        }
    }
    Ok(())
}

fn alloc_ranges(
    st: &mut State,
    count: u64,
    params: &blksnap_model::Params,
    storage: &DiffStorage,
) -> Result<Location> {
    let Mode::Ranges { extents, cursor } = &mut st.mode else { unreachable!() };
    let location = loop {
        let Some(extent) = extents.get_mut(*cursor) else {
            st.overflow = true;
            return Err(Error::new(Errno::ENOSPC, "difference storage has no room left"));
        };
        let left = extent.range.count - extent.used_sectors;
        if left >= count {
            let sector = extent.range.offset + extent.used_sectors;
            extent.used_sectors += count;
            st.filled_sectors += count;
            break Location { backend: extent.backend.clone(), sector };
        }
        // The tail is too short for a chunk: it is wasted and counted as filled.
        extent.used_sectors = extent.range.count;
        st.filled_sectors += left;
        *cursor += 1;
    };
    let threshold = (params.diff_storage_minimum_sectors / 2) & !7;
    if !st.low_space && st.capacity_sectors - st.filled_sectors <= threshold {
        st.low_space = true;
        st.requested_sectors = st.capacity_sectors + params.diff_storage_minimum_sectors;
        storage.emit(EventKind::LowFreeSpace {
            requested_sectors: params.diff_storage_minimum_sectors,
        });
    }
    Ok(location)
}

fn alloc_file(
    st: &mut State,
    count: u64,
    params: &blksnap_model::Params,
    storage: &DiffStorage,
) -> Result<Location> {
    let Mode::File { backend, limit_sectors, growable } = &st.mode else { unreachable!() };
    let (backend, limit, growable) = (backend.clone(), *limit_sectors, *growable);
    if st.filled_sectors + count > st.requested_sectors {
        st.overflow = true;
        return Err(Error::new(Errno::ENOSPC, "difference storage reached its size"));
    }
    let location = Location { backend: backend.clone(), sector: st.filled_sectors };
    st.filled_sectors += count;
    let minimum = params.diff_storage_minimum_sectors;
    if !st.low_space && st.requested_sectors - st.filled_sectors <= minimum / 2 {
        st.low_space = true;
        if !growable {
            // A block device cannot grow and (as upstream) emits nothing.
        } else if st.capacity_sectors < limit {
            let target = st.capacity_sectors + minimum.min(limit - st.capacity_sectors);
            if backend.set_len(target << SECTOR_SHIFT).is_ok() {
                st.capacity_sectors = target;
                st.requested_sectors = target;
                st.low_space = false;
            }
        } else {
            storage.emit(EventKind::NoSpace { requested_sectors: st.requested_sectors });
        }
    }
    Ok(location)
}
