//! The diff area of a member device once its snapshot is taken: its chunks (NEW or STORED), the
//! copy-on-write of origin writes, the image's reads and writes, and corruption (first error
//! wins, one `Corrupted` event). The engine implements the same rules in `diff_area.rs` and
//! `chunk.rs`. This specifies docs/SEMANTICS.md "Data path" (copy-on-write and "Image I/O").

use std::collections::BTreeSet;

use crate::bail;
use crate::errno::{Errno, Error, Result};
use crate::formulas::ChunkLayout;
use crate::params::SECTOR_SIZE_BYTES;
use crate::types::*;

use super::{sector_bytes, Loc, Model};

/// A member device's state once its snapshot is taken: chunks, the image, the failure.
#[derive(Clone, Debug)]
pub(super) struct DiffArea {
    pub(super) chunks: ChunkLayout,
    /// Chunks copied to the storage (STORED); every other chunk is NEW.
    pub(super) stored: BTreeSet<u64>,
    /// The image: the device content at take, plus image writes.
    pub(super) image: Vec<u8>,
    /// The first failure; once set the area is corrupted for good.
    pub(super) error: Option<Errno>,
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

fn eio() -> Error {
    Error::new(Errno::EIO, "image I/O failed")
}

impl Model {
    /// Saves the pre-image of every NEW chunk the write touches; the first failure corrupts the
    /// diff area and stops the COW (the origin write goes on regardless).
    pub(super) fn copy_on_write(&mut self, loc: Loc, first_sector: u64, count_sectors: u64) {
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

    pub(super) fn area(&self, loc: Loc) -> Option<&DiffArea> {
        self.snapshots[loc.snap].members[loc.member].area.as_ref()
    }

    /// The diff area at `loc`, which the caller knows exists (the snapshot is taken).
    pub(super) fn area_at(&self, loc: Loc) -> &DiffArea {
        self.area(loc).expect("a taken member has a diff area")
    }

    pub(super) fn area_at_mut(&mut self, loc: Loc) -> &mut DiffArea {
        self.snapshots[loc.snap].members[loc.member]
            .area
            .as_mut()
            .expect("a taken member has a diff area")
    }

    /// The member whose origin writes need COW: in a taken snapshot, diff area not corrupted.
    pub(super) fn live_area(&self, dev: DeviceId) -> Option<Loc> {
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

#[cfg(test)]
mod tests {
    use super::super::test_support::*;

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
}
