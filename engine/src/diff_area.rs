//! The diff area (kernel: `diff_area.c`): one per device of a taken snapshot. It owns the
//! device's chunk map, does the copy-on-write for origin writes and serves the image.
//!
//! Ownership: the device gate holds one reference while the snapshot is taken; every chunk
//! permit holds one; every in-flight image request holds one (temporary holder). So the diff
//! area outlives all I/O that touches it, even when the snapshot is destroyed mid-I/O. It holds a
//! reference on the difference storage (the kernel did not until its newest version: the storage
//! could be freed under a completion).
//!
//! Lock order inside: chunk map (RwLock, held only to look up or insert) → chunk permits in
//! ascending index → storage state → event queue. The map lock is never held while waiting for a
//! permit or doing I/O.

use core::hash::BuildHasherDefault;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;

use blksnap_model::formulas::ChunkLayout;
use blksnap_model::params::SECTOR_SHIFT;
use blksnap_model::{DeviceId, Errno, Error, Event, EventKind, Result};

use crate::chunk::{Chunk, ChunkPermit, ChunkState};
use crate::diff_buffer::DiffBufferPool;
use crate::diff_storage::DiffStorage;
use crate::io::Dev;
use crate::kref::{Kref, LiveObjects, ObjKind};
use crate::stored_map::StoredMap;
use crate::sync::atomic::{AtomicBool, Ordering};
use crate::sync::{Arc, LockRank, Mutex, RwLock};

/// A deterministic hasher: iteration order never matters here, but shuttle flags per-process
/// random seeds as uncontrolled nondeterminism.
type ChunkMap = HashMap<u64, Kref<Chunk>, BuildHasherDefault<DefaultHasher>>;

/// One device's copy-on-write state for one snapshot.
pub struct DiffArea {
    device: DeviceId,
    origin: Dev,
    layout: ChunkLayout,
    chunks: RwLock<ChunkMap>,
    /// Which chunks are Stored, without a lock (the origin write fast path).
    stored: StoredMap,
    storage: StoragePin,
    corrupted: AtomicBool,
    /// The first error; set once (first error wins).
    error: Mutex<Option<Errno>>,
    /// Set after a successful take, cleared first at teardown: new image I/O is refused.
    image_open: AtomicBool,
    /// Chunk-sized buffers for copies (bounded: see [`DiffBufferPool`]).
    buffers: DiffBufferPool,
    live: Arc<LiveObjects>,
}

/// The diff area's hold on the storage: a counted reference (bug builds may restore
/// upstream's raw pointer).
enum StoragePin {
    Owned(Kref<DiffStorage>),
    #[cfg(blksnap_bugs)]
    Unowned(crate::kref::Unowned<DiffStorage>),
}

impl core::ops::Deref for StoragePin {
    type Target = DiffStorage;
    fn deref(&self) -> &DiffStorage {
        match self {
            StoragePin::Owned(k) => k,
            #[cfg(blksnap_bugs)]
            StoragePin::Unowned(u) => u.get(),
        }
    }
}

/// What an image write puts into one segment.
#[derive(Clone, Copy)]
enum Piece<'a> {
    /// These bytes (the segment's length).
    Bytes(&'a [u8]),
    /// Zeroes over the segment.
    Zeroes,
}

/// A piece of a request that falls in one chunk.
#[derive(Clone, Copy, Debug)]
struct Segment {
    chunk: u64,
    /// Byte offset inside the chunk.
    in_chunk_bytes: u64,
    /// Byte offset inside the request buffer.
    in_request_bytes: usize,
    len_bytes: usize,
}

impl DiffArea {
    /// A diff area for `device` (capacity and io_min fix the chunk layout).
    pub fn new(
        device: DeviceId,
        origin: Dev,
        layout: ChunkLayout,
        storage: Kref<DiffStorage>,
        live: &Arc<LiveObjects>,
    ) -> Kref<DiffArea> {
        #[cfg(blksnap_bugs)]
        let storage = if storage.shared().injected(crate::bugs::Bug::StorageUnpinned) {
            StoragePin::Unowned(crate::kref::Unowned::of(&storage))
        } else {
            StoragePin::Owned(storage)
        };
        #[cfg(not(blksnap_bugs))]
        let storage = StoragePin::Owned(storage);
        let area = DiffArea {
            device,
            origin,
            layout,
            chunks: RwLock::new(LockRank::ChunkMap, ChunkMap::default()),
            stored: StoredMap::new(layout.chunk_count),
            storage,
            corrupted: AtomicBool::new(false),
            error: Mutex::new(LockRank::DiffAreaError, None),
            image_open: AtomicBool::new(false),
            // Sized by the largest chunk that exists (chunk 0: a whole chunk, or the whole
            // device when it is smaller than one chunk), not by the chunk size: a small device
            // with a huge chunk size must not ask for a chunk-sized buffer (found by fuzzing).
            buffers: DiffBufferPool::new(if layout.chunk_count == 0 {
                0
            } else {
                (layout.sectors_of(0) << SECTOR_SHIFT) as usize
            }),
            live: live.clone(),
        };
        Kref::new(area, ObjKind::DiffArea, live)
    }

    /// The stored-chunk bits.
    pub fn stored_map(&self) -> &StoredMap {
        &self.stored
    }

    /// The chunk layout.
    pub fn layout(&self) -> ChunkLayout {
        self.layout
    }

    /// Whether the diff area failed (fast path, no lock).
    pub fn is_corrupted(&self) -> bool {
        self.corrupted.load(Ordering::Acquire)
    }

    /// The first error, if any.
    pub fn error(&self) -> Option<Errno> {
        *self.error.lock()
    }

    /// Record a failure: the first one wins and emits one `Corrupted` event.
    pub fn set_corrupted(&self, errno: Errno) {
        let mut error = self.error.lock();
        if error.is_some() {
            return;
        }
        *error = Some(errno);
        self.corrupted.store(true, Ordering::Release);
        drop(error);
        let time_ns = self.storage.now_ns();
        self.storage
            .events
            .push(Event { time_ns, kind: EventKind::Corrupted { device: self.device, errno } });
    }

    /// Whether the image accepts I/O: opened by the take, not closed by the teardown, and its
    /// snapshot not destroyed (still in the engine's list: [`DiffStorage::mark_destroyed`]).
    pub fn image_open(&self) -> bool {
        self.image_open.load(Ordering::Acquire) && !self.storage.is_destroyed()
    }

    /// Open (after a successful take) or close (first step of teardown) the image.
    pub fn set_image_open(&self, open: bool) {
        self.image_open.store(open, Ordering::Release);
    }

    /// Chunk metadata records alive in this area.
    pub fn chunks_allocated(&self) -> usize {
        self.chunks.read().len()
    }

    fn lookup(&self, index: u64) -> Option<Kref<Chunk>> {
        self.chunks.read().get(&index).cloned()
    }

    /// The metadata of chunk `index`, created on first use.
    pub fn chunk(&self, index: u64) -> Kref<Chunk> {
        self.get_or_insert(index)
    }

    fn get_or_insert(&self, index: u64) -> Kref<Chunk> {
        debug_assert!(index < self.layout.chunk_count);
        if let Some(c) = self.lookup(index) {
            return c;
        }
        // A lost insert race keeps the winner's chunk.
        let mut map = self.chunks.write();
        map.entry(index)
            .or_insert_with(|| Kref::new(Chunk::new(), ObjKind::Chunk, &self.live))
            .clone()
    }

    fn chunk_bytes(&self, index: u64) -> u64 {
        self.layout.sectors_of(index) << SECTOR_SHIFT
    }

    fn chunk_offset_bytes(&self, index: u64) -> u64 {
        self.layout.first_sector_of(index) << SECTOR_SHIFT
    }

    fn segments(&self, offset_bytes: u64, len_bytes: usize) -> impl Iterator<Item = Segment> + '_ {
        let chunk_shift = self.layout.chunk_shift;
        let mut pos = 0usize;
        core::iter::from_fn(move || {
            if pos >= len_bytes {
                return None;
            }
            let abs = offset_bytes + pos as u64;
            let chunk = abs >> chunk_shift;
            let in_chunk_bytes = abs - (chunk << chunk_shift);
            let room = self.chunk_bytes(chunk) - in_chunk_bytes;
            let len = room.min((len_bytes - pos) as u64) as usize;
            let seg = Segment { chunk, in_chunk_bytes, in_request_bytes: pos, len_bytes: len };
            pos += len;
            Some(seg)
        })
    }

    /// Whether every chunk of `[first_sector, first_sector + sectors)` is stored already (an
    /// origin write there needs no copy-on-write). Stored is final: true stays true.
    pub fn range_stored(&self, first_sector: u64, sectors: u64) -> bool {
        debug_assert!(sectors > 0);
        let first = self.layout.chunk_of_sector(first_sector);
        let last = self.layout.chunk_of_sector(first_sector + sectors - 1);
        (first..=last).all(|index| self.stored.is_set(index))
    }

    /// Copy-on-write for an origin write of `[first_sector, first_sector + sectors)`: every New
    /// chunk it touches is copied to the storage before this returns (the synchronous COW rule:
    /// the caller writes the origin only afterwards). A failure corrupts the diff area and stops
    /// copying; the origin write proceeds regardless (break the snapshot, never the origin).
    pub fn copy_on_write(this: &Kref<DiffArea>, first_sector: u64, sectors: u64) {
        debug_assert!(sectors > 0);
        let first = this.layout.chunk_of_sector(first_sector);
        let last = this.layout.chunk_of_sector(first_sector + sectors - 1);
        for index in first..=last {
            if this.is_corrupted() {
                return;
            }
            if this.stored.is_set(index) {
                continue;
            }
            let permit = ChunkPermit::acquire(this.clone(), this.get_or_insert(index), index);
            if !matches!(permit.state(), ChunkState::New) {
                continue;
            }
            if let Err(e) = this.copy_chunk(&permit, None) {
                permit.set_failed();
                this.set_corrupted(e.errno);
                return;
            }
        }
    }

    /// Store chunk `permit.index()`'s pre-image: from `content` if given (a whole-chunk image
    /// write), else read from the origin. Then New → Stored.
    fn copy_chunk(&self, permit: &ChunkPermit, content: Option<&[u8]>) -> Result<()> {
        let index = permit.index();
        match content {
            Some(d) => self.store_new(permit, d),
            None => {
                // The read fills every byte handed out: no clearing of a reused buffer.
                let mut buf = self.buffers.take(self.chunk_bytes(index) as usize);
                self.origin.read_at(&mut buf, self.chunk_offset_bytes(index))?;
                self.store_new(permit, &buf)
            }
        }
    }

    fn store_new(&self, permit: &ChunkPermit, data: &[u8]) -> Result<()> {
        debug_assert_eq!(data.len() as u64, self.chunk_bytes(permit.index()));
        let location = self.storage.alloc(self.layout.sectors_of(permit.index()))?;
        location.backend.write_at(data, location.byte_offset(0))?;
        permit.set_stored(location);
        Ok(())
    }

    /// Read the image. EIO once corrupted or on a failed read; ENODEV if the image was closed
    /// (snapshot destroyed) while the read was in flight.
    pub fn image_read(this: &Kref<DiffArea>, offset_bytes: u64, buf: &mut [u8]) -> Result<()> {
        if this.is_corrupted() {
            return Err(Error::new(Errno::EIO, "the snapshot image is corrupted"));
        }
        for seg in this.segments(offset_bytes, buf.len()) {
            let out = &mut buf[seg.in_request_bytes..seg.in_request_bytes + seg.len_bytes];
            Self::read_segment(this, seg, out)?;
        }
        Ok(())
    }

    fn read_segment(this: &Kref<DiffArea>, seg: Segment, out: &mut [u8]) -> Result<()> {
        let eio = |_| Error::new(Errno::EIO, "reading the snapshot image failed");
        let origin_offset = this.chunk_offset_bytes(seg.chunk) + seg.in_chunk_bytes;
        if this.lookup(seg.chunk).is_none() {
            // Optimistic read of an untouched chunk, without creating metadata for it. Valid if
            // the chunk is still untouched afterwards: a writer inserts the chunk before copying
            // it and writes the origin only after that, so an absent chunk after our read means
            // no origin write to it started before our read finished.
            this.origin.read_at(out, origin_offset).map_err(eio)?;
            if this.lookup(seg.chunk).is_none() {
                return this.origin_read_still_valid();
            }
        }
        let chunk = this.get_or_insert(seg.chunk);
        let permit = ChunkPermit::acquire(this.clone(), chunk, seg.chunk);
        match permit.state() {
            ChunkState::New => {
                this.origin.read_at(out, origin_offset).map_err(eio)?;
                this.origin_read_still_valid()
            }
            ChunkState::Stored(loc) => {
                loc.backend.read_at(out, loc.byte_offset(0) + seg.in_chunk_bytes).map_err(eio)
            }
            ChunkState::Failed => Err(Error::new(Errno::EIO, "chunk failed")),
        }
    }

    /// After reading an uncopied chunk from the origin: the data is the pre-take content only if
    /// copy-on-write was still guarding the origin when the read finished. Two things end that
    /// guard, and origin writes bypass copy-on-write only after they observe one of them:
    /// - teardown closes the image before it unpublishes the diff area (found by shuttle);
    /// - a failed copy sets `corrupted` before any writer skips copying (`copy_on_write` and
    ///   `Engine::write_data` test it first). A read that returned such a write therefore sees
    ///   the flag here: the writer's load of it happens before its origin write, which happens
    ///   before our read returned it, and the flag never goes back to false (found by review:
    ///   a backup racing an overflow recorded post-take blocks as success).
    ///
    /// Invariant: an image read returns the content at take plus image writes, or an error.
    fn origin_read_still_valid(&self) -> Result<()> {
        #[cfg(blksnap_bugs)]
        let check_corrupted =
            !self.storage.shared().injected(crate::bugs::Bug::ReadIgnoresCorruption);
        #[cfg(not(blksnap_bugs))]
        let check_corrupted = true;
        if check_corrupted && self.is_corrupted() {
            return Err(Error::new(Errno::EIO, "the snapshot became corrupted during the read"));
        }
        if self.image_open() {
            Ok(())
        } else {
            Err(Error::new(Errno::ENODEV, "the snapshot was destroyed during the read"))
        }
    }

    /// Write the image (CBT marking is the caller's). EIO once corrupted or on failure.
    pub fn image_write(this: &Kref<DiffArea>, offset_bytes: u64, data: &[u8]) -> Result<()> {
        if this.is_corrupted() {
            return Err(Error::new(Errno::EIO, "the snapshot image is corrupted"));
        }
        for seg in this.segments(offset_bytes, data.len()) {
            let piece = &data[seg.in_request_bytes..seg.in_request_bytes + seg.len_bytes];
            Self::write_segment(this, seg, Piece::Bytes(piece))?;
        }
        Ok(())
    }

    /// Zero `len_bytes` of the image at `offset_bytes` (an image's discard or write-zeroes; CBT
    /// marking is the caller's). The result is that of [`DiffArea::image_write`] of zeroes, and
    /// so is every error, but no zero buffer is written: a chunk the range covers wholly is
    /// stored (if it was not) without reading the origin, and its storage range is zeroed by
    /// the storage's `write_zeroes_at` (a punched hole on a file); a partly covered chunk not
    /// stored yet is copied from the origin with the covered part zeroed, as a write would.
    /// EIO once corrupted or on failure.
    pub fn image_write_zeroes(
        this: &Kref<DiffArea>,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<()> {
        if this.is_corrupted() {
            return Err(Error::new(Errno::EIO, "the snapshot image is corrupted"));
        }
        // Segments count in usize (a request buffer's index); a range no address space could
        // hold as a buffer only exists on 32-bit hosts, where it is refused rather than cut.
        let len = usize::try_from(len_bytes)
            .map_err(|_| Error::new(Errno::EINVAL, "image write-zeroes range too large"))?;
        for seg in this.segments(offset_bytes, len) {
            Self::write_segment(this, seg, Piece::Zeroes)?;
        }
        Ok(())
    }

    fn write_segment(this: &Kref<DiffArea>, seg: Segment, piece: Piece<'_>) -> Result<()> {
        let eio = |_| Error::new(Errno::EIO, "writing the snapshot image failed");
        let chunk = this.get_or_insert(seg.chunk);
        let permit = ChunkPermit::acquire(this.clone(), chunk, seg.chunk);
        let whole = seg.len_bytes as u64 == this.chunk_bytes(seg.chunk);
        match permit.state() {
            ChunkState::Stored(loc) => {
                let at = loc.byte_offset(0) + seg.in_chunk_bytes;
                let r = match piece {
                    Piece::Bytes(b) => loc.backend.write_at(b, at),
                    Piece::Zeroes => loc.backend.write_zeroes_at(at, seg.len_bytes as u64),
                };
                r.map_err(|e| this.fail_stored(e)).map_err(eio)
            }
            ChunkState::Failed => Err(Error::new(Errno::EIO, "chunk failed")),
            // A whole-chunk write replaces the pre-image: no origin read.
            ChunkState::New if whole => {
                let r = match piece {
                    Piece::Bytes(b) => this.copy_chunk(&permit, Some(b)),
                    Piece::Zeroes => this.store_zeroes(&permit),
                };
                r.map_err(|e| this.fail(&permit, e)).map_err(eio)
            }
            ChunkState::New => {
                let mut buf = this.buffers.take(this.chunk_bytes(seg.chunk) as usize);
                this.origin.read_at(&mut buf, this.chunk_offset_bytes(seg.chunk)).map_err(eio)?;
                let part = &mut buf[seg.in_chunk_bytes as usize..][..seg.len_bytes];
                match piece {
                    Piece::Bytes(b) => part.copy_from_slice(b),
                    Piece::Zeroes => part.fill(0),
                }
                this.store_new(&permit, &buf).map_err(|e| this.fail(&permit, e)).map_err(eio)
            }
        }
    }

    /// Store chunk `permit.index()` as all zeroes: its new storage range is zeroed in place
    /// (the range may hold an earlier snapshot's data: a reused file, appended extents).
    fn store_zeroes(&self, permit: &ChunkPermit) -> Result<()> {
        let sectors = self.layout.sectors_of(permit.index());
        let location = self.storage.alloc(sectors)?;
        location.backend.write_zeroes_at(location.byte_offset(0), sectors << SECTOR_SHIFT)?;
        permit.set_stored(location);
        Ok(())
    }

    fn fail(&self, permit: &ChunkPermit, e: Error) -> Error {
        permit.set_failed();
        self.set_corrupted(e.errno);
        e
    }

    fn fail_stored(&self, e: Error) -> Error {
        self.set_corrupted(e.errno);
        e
    }
}

#[cfg(all(test, not(any(blksnap_loom, blksnap_shuttle))))]
mod tests {
    use super::*;
    use crate::diff_storage::StorageSpec;
    use crate::io::MemDev;
    use crate::kref::ObjKind;
    use crate::sync::StdArc;
    use crate::{Clock, Shared};
    use blksnap_model::formulas::chunk_layout;
    use blksnap_model::Params;

    const CHUNK: usize = 4096;

    /// A diff area over a 4-chunk origin filled with 0xaa, with a growable file storage; the
    /// image is not open yet (as between the publication and the end of a take).
    fn area() -> Kref<DiffArea> {
        let shared = Arc::new(Shared::new(Params::small(), Clock::manual(true), 1).unwrap());
        let backend: Dev = StdArc::new(MemDev::growable(0, 1 << 20));
        let spec = StorageSpec::File { backend, limit_sectors: 1024 };
        let storage = DiffStorage::new(spec, shared.clone()).unwrap();
        let storage = Kref::new(storage, ObjKind::DiffStorage, shared.live());
        let layout = chunk_layout(&shared.params(), (4 * CHUNK as u64) >> SECTOR_SHIFT, 1);
        assert_eq!(layout.chunk_size_bytes(), CHUNK as u64);
        let origin: Dev = StdArc::new(MemDev::new(4 * CHUNK as u64));
        origin.write_at(&[0xaa; 4 * CHUNK], 0).unwrap();
        DiffArea::new(DeviceId::new(7, 0), origin, layout, storage, shared.live())
    }

    #[test]
    fn an_origin_read_is_valid_only_while_the_image_is_open() {
        let area = area();
        assert!(!area.image_open());
        let mut buf = [0u8; 512];
        let closed = DiffArea::image_read(&area, 0, &mut buf).unwrap_err();
        assert_eq!(closed.errno, Errno::ENODEV, "not open yet: as if destroyed mid-read");
        area.set_image_open(true);
        assert!(area.image_open());
        DiffArea::image_read(&area, 0, &mut buf).unwrap();
        assert_eq!(buf, [0xaa; 512]);
        area.set_image_open(false);
        assert!(!area.image_open());
        // Both paths of an uncopied chunk: untouched (optimistic) and touched but New.
        let _chunk = area.chunk(1);
        for offset in [0, CHUNK as u64] {
            let err = DiffArea::image_read(&area, offset, &mut buf).unwrap_err();
            assert_eq!(err.errno, Errno::ENODEV, "closed at offset {offset}");
        }
    }

    #[test]
    fn an_origin_read_finishing_after_a_failed_copy_is_an_error() {
        // The race of issue 11, its last step made sequential: the read of an uncopied chunk has
        // returned from the origin, and a copy failed meanwhile (copying stopped, so the origin
        // may already hold a post-take write). The re-check must fail the read with EIO.
        let area = area();
        area.set_image_open(true);
        area.origin_read_still_valid().unwrap();
        area.set_corrupted(Errno::ENOSPC);
        assert_eq!(area.origin_read_still_valid().unwrap_err().errno, Errno::EIO);
        assert_eq!(area.error(), Some(Errno::ENOSPC));
        area.set_image_open(false);
        assert_eq!(area.origin_read_still_valid().unwrap_err().errno, Errno::EIO, "EIO first");
    }

    #[test]
    fn chunk_metadata_is_created_lazily_and_once() {
        let area = area();
        area.set_image_open(true);
        assert_eq!(area.layout().chunk_count, 4);
        assert_eq!(area.chunks_allocated(), 0, "a take costs nothing per chunk");
        let mut buf = vec![0u8; 4 * CHUNK];
        DiffArea::image_read(&area, 0, &mut buf).unwrap();
        assert_eq!(area.chunks_allocated(), 0, "reading untouched chunks creates no metadata");
        DiffArea::copy_on_write(&area, (CHUNK as u64 >> SECTOR_SHIFT) + 1, 1);
        DiffArea::copy_on_write(&area, CHUNK as u64 >> SECTOR_SHIFT, 2);
        assert_eq!(area.chunks_allocated(), 1, "one chunk copied, once");
        DiffArea::copy_on_write(&area, 0, (4 * CHUNK as u64) >> SECTOR_SHIFT);
        assert_eq!(area.chunks_allocated(), 4);
        assert!((0..4).all(|i| area.stored_map().is_set(i)));
    }
}
