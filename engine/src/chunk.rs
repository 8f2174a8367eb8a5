//! Chunks and chunk permits (kernel: `chunk.c`).
//!
//! A chunk is the unit of copy-on-write. Its metadata exists only once the chunk is touched
//! (the diff area's map is lazy), so a take costs nothing per chunk.
//!
//! The kernel protects a chunk with a binary semaphore held across asynchronous I/O and released
//! by the completion. Here that is a [`ChunkPermit`]: an owned value (Send) that can move into
//! whatever completes the I/O, and releases the chunk exactly once, when dropped — on every
//! path, success or error. A permit also holds one reference on its diff area, so a completion
//! always has a live diff area until it releases (the kernel's v4 fix of the seed's bug a).
//!
//! State machine: New → Stored (pre-image in the storage at `location`, written once, never
//! moved) or New → Failed (the diff area is then corrupted). Stored and Failed are terminal.

use crate::diff_area::DiffArea;
use crate::diff_storage::Location;
use crate::kref::Kref;
use crate::sync::{Condvar, Held, LockRank, Mutex};

/// A chunk's state.
#[derive(Clone, Debug)]
pub enum ChunkState {
    /// Not copied: the image reads the origin.
    New,
    /// Copied: the image reads and writes the storage here.
    Stored(Location),
    /// A copy failed; the diff area is corrupted.
    Failed,
}

#[derive(Debug)]
struct Slot {
    locked: bool,
    state: ChunkState,
}

/// One chunk's metadata.
#[derive(Debug)]
pub struct Chunk {
    slot: Mutex<Slot>,
    released: Condvar,
}

impl Chunk {
    /// A New, unlocked chunk.
    pub fn new() -> Chunk {
        Chunk {
            slot: Mutex::new(LockRank::ChunkSlot, Slot { locked: false, state: ChunkState::New }),
            released: Condvar::new(),
        }
    }
}

impl Default for Chunk {
    fn default() -> Chunk {
        Chunk::new()
    }
}

/// Exclusive ownership of one chunk, pinning its diff area. Dropping it releases the chunk.
pub struct ChunkPermit {
    chunk: Kref<Chunk>,
    area: Kref<DiffArea>,
    index: u64,
    /// The permit's place in the lock order (rank `ChunkPermit`, key: the chunk index); it
    /// follows the permit to whichever thread releases it.
    _held: Held,
}

impl ChunkPermit {
    /// Wait for the chunk and take it. Callers take several chunks only in ascending index order
    /// and never while holding a device gate for writing, so waits cannot form a cycle.
    pub fn acquire(area: Kref<DiffArea>, chunk: Kref<Chunk>, index: u64) -> ChunkPermit {
        let held = Held::acquire(LockRank::ChunkPermit, index);
        let mut slot = chunk.slot.lock();
        while slot.locked {
            slot = chunk.released.wait(slot);
        }
        slot.locked = true;
        drop(slot);
        ChunkPermit { chunk, area, index, _held: held }
    }

    /// The chunk index.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The pinned diff area.
    pub fn area(&self) -> &Kref<DiffArea> {
        &self.area
    }

    /// The state (only the permit holder changes it, so it is stable while held).
    pub fn state(&self) -> ChunkState {
        let slot = self.chunk.slot.lock();
        debug_assert!(slot.locked, "permit held on an unlocked chunk");
        slot.state.clone()
    }

    /// New → Stored; then the area's lock-free stored map learns it (origin writes to copied
    /// chunks skip the permit and the chunk map entirely).
    pub fn set_stored(&self, location: Location) {
        let mut slot = self.chunk.slot.lock();
        assert!(matches!(slot.state, ChunkState::New), "only a New chunk is stored, once");
        slot.state = ChunkState::Stored(location);
        drop(slot);
        self.area.stored_map().set(self.index);
    }

    /// New → Failed.
    pub fn set_failed(&self) {
        let mut slot = self.chunk.slot.lock();
        assert!(matches!(slot.state, ChunkState::New), "only a New chunk fails");
        slot.state = ChunkState::Failed;
    }
}

impl Drop for ChunkPermit {
    fn drop(&mut self) {
        let mut slot = self.chunk.slot.lock();
        assert!(slot.locked, "chunk released twice");
        slot.locked = false;
        drop(slot);
        self.chunk.released.notify_one();
        // `area` is dropped after the release: the diff area outlives the chunk's use.
    }
}

#[cfg(all(test, not(any(blksnap_loom, blksnap_shuttle))))]
mod tests {
    use super::*;
    use crate::diff_storage::{DiffStorage, StorageSpec};
    use crate::io::{Dev, MemDev};
    use crate::kref::ObjKind;
    use crate::sync::{Arc, StdArc};
    use crate::{Clock, Shared};
    use blksnap_model::formulas::chunk_layout;
    use blksnap_model::{DeviceId, Params};

    fn area() -> Kref<DiffArea> {
        let shared = Arc::new(Shared::new(Params::small(), Clock::manual(true), 1).unwrap());
        let backend: Dev = StdArc::new(MemDev::growable(0, 1 << 20));
        let spec = StorageSpec::File { backend, limit_sectors: 64 };
        let storage = DiffStorage::new(spec, shared.clone()).unwrap();
        let storage = Kref::new(storage, ObjKind::DiffStorage, shared.live());
        let layout = chunk_layout(&shared.params(), 16, 1);
        let origin: Dev = StdArc::new(MemDev::new(8192));
        DiffArea::new(DeviceId::new(7, 0), origin, layout, storage, shared.live())
    }

    #[test]
    fn a_failed_chunk_stays_failed_for_the_next_holder() {
        let area = area();
        let chunk = area.chunk(1);
        let permit = ChunkPermit::acquire(area.clone(), chunk.clone(), 1);
        assert!(matches!(permit.state(), ChunkState::New));
        permit.set_failed();
        assert!(matches!(permit.state(), ChunkState::Failed), "New → Failed");
        drop(permit);
        let next = ChunkPermit::acquire(area.clone(), chunk, 1);
        assert!(matches!(next.state(), ChunkState::Failed), "Failed is terminal");
        assert!(!area.stored_map().is_set(1), "a failed chunk is not stored");
    }
}
