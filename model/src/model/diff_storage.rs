//! The difference storage: appending v3 ranges, sizing a newest File storage at create, and
//! the per-chunk allocation with its accounting — extents consumed front to back (v3) or a
//! bump allocator grown up to a limit (newest), the low-space flag and its `LowFreeSpace` or
//! `NoSpace` event, overflow. The engine implements the same rules in `diff_storage.rs`. This
//! specifies docs/SEMANTICS.md "Difference storage" and the append and File-create rules of
//! "Snapshots".

use std::collections::BTreeMap;

use crate::bail;
use crate::errno::Result;
use crate::limits::{MAX_RANGES_PER_CALL, MAX_STORAGE_RANGES};
use crate::types::*;

use super::snapshot::no_snapshot;
use super::Model;

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

/// One appended v3 extent; only its size matters to the accounting.
#[derive(Clone, Copy, Debug)]
pub(super) struct Extent {
    pub(super) count_sectors: u64,
    pub(super) used_sectors: u64,
}

/// v3 storage: extents in append order and, per backend, what was appended (start → end).
#[derive(Clone, Debug, Default)]
pub(super) struct RangesStorage {
    pub(super) extents: Vec<Extent>,
    /// Index of the first extent not yet moved past.
    pub(super) cursor: usize,
    pub(super) appended: BTreeMap<u32, BTreeMap<u64, u64>>,
}

#[derive(Clone, Debug)]
pub(super) enum StorageKind {
    Ranges(RangesStorage),
    File { limit_sectors: u64, growable: bool },
}

#[derive(Clone, Debug)]
pub(super) struct DiffStorage {
    pub(super) stats: StorageStats,
    pub(super) kind: StorageKind,
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

impl Model {
    /// Create-time sizing of a File storage whose current size is `capacity_sectors`.
    pub(super) fn sized_file_storage(
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

    /// Storage accounting of a snapshot (ESRCH if unknown).
    pub fn storage_stats(&self, id: SnapshotId) -> Result<StorageStats> {
        let si = self.snap_index(id).ok_or_else(no_snapshot)?;
        Ok(self.snapshots[si].storage.stats)
    }

    /// Allocate `count_sectors` of the storage of snapshot `si` for one chunk.
    pub(super) fn allocate(&mut self, si: usize, count_sectors: u64) -> Result<()> {
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
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;

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
}
