//! Trackers and change-block tracking: attach and detach, the write and read maps, the snap
//! numbers `previous`/`active`, the switch at take and its wrap past 255, and the CBT ctls
//! (`cbt_info`, `cbt_map`, `cbt_dirty`). The engine implements the same rules in `tracker.rs`
//! (attach, detach, membership) and `cbt.rs` (the maps, with a lazy read map). This specifies
//! docs/SEMANTICS.md "Disks and the filter" (attach, detach, ctls without a filter) and "CBT".

use crate::bail;
use crate::errno::{Errno, Error, Result};
use crate::formulas::{cbt_layout, CbtLayout};
use crate::limits::MAX_RANGES_PER_CALL;
use crate::params::{SECTOR_SHIFT, SECTOR_SIZE_BYTES};
use crate::types::*;

use super::device::no_disk;
use super::{to_usize, Model};

/// A device's change tracker: the CBT maps and their numbers.
#[derive(Clone, Debug)]
pub(super) struct Tracker {
    pub(super) layout: CbtLayout,
    /// Device capacity when the tracker was made (disks never resize here).
    pub(super) capacity_bytes: u64,
    pub(super) write_map: Vec<u8>,
    pub(super) read_map: Vec<u8>,
    pub(super) previous: u8,
    pub(super) active: u8,
    pub(super) generation: Uuid,
}

/// A tracker's whole change map: (write map, read map, `active`, `previous`, generation).
pub type CbtExport = (Vec<u8>, Vec<u8>, u8, u8, Uuid);

impl Tracker {
    pub(super) fn new(layout: CbtLayout, capacity_bytes: u64, generation: Uuid) -> Tracker {
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
    pub(super) fn coverage_sectors(&self) -> u64 {
        self.layout.block_count.saturating_mul(self.layout.block_sectors())
    }

    /// An origin write: `write_map` with `active`.
    pub(super) fn mark_write(&mut self, first_sector: u64, count_sectors: u64) {
        mark_map(&mut self.write_map, &self.layout, first_sector, count_sectors, self.active);
    }

    /// An image write or cbtdirty: `write_map` with `active` and `read_map` with `previous`.
    pub(super) fn mark_both(&mut self, first_sector: u64, count_sectors: u64) {
        self.mark_write(first_sector, count_sectors);
        mark_map(&mut self.read_map, &self.layout, first_sector, count_sectors, self.previous);
    }

    /// The switch at take; a wrap of `active` past 255 draws a new generation from `ids`.
    pub(super) fn switch(&mut self, ids: &mut IdGen) {
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

fn sat_u32(x: u64) -> u32 {
    u32::try_from(x).unwrap_or(u32::MAX)
}

fn no_tracker() -> Error {
    Error::new(Errno::ENOENT, "no blksnap filter is attached to the device")
}

impl Model {
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

    /// The whole change map as a daemon persists it. The engine's `cbt_export` returns the same
    /// values.
    pub fn cbt_export(&self, dev: DeviceId) -> Result<CbtExport> {
        let t = self.tracker(dev)?;
        Ok((t.write_map.clone(), t.read_map.clone(), t.active, t.previous, t.generation))
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

    /// ENODEV for an unknown disk, ENOENT when no filter is attached.
    pub(super) fn tracker(&self, dev: DeviceId) -> Result<&Tracker> {
        self.disk(dev)?.tracker.as_ref().ok_or_else(no_tracker)
    }

    pub(super) fn tracker_mut(&mut self, dev: DeviceId) -> Result<&mut Tracker> {
        self.disk_mut(dev)?.tracker.as_mut().ok_or_else(no_tracker)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;

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
    fn cbt_info_reports_the_layout() {
        let mut m = model();
        disk(&mut m, D1, 66 * KIB, 1);
        let info = m.cbt_info(D1).unwrap();
        assert_eq!(info.device_capacity_bytes, 66 * KIB);
        assert_eq!(info.block_size_bytes, 4096);
        assert_eq!(info.block_count, 17, "a partial last block counts");
        assert_eq!(info.changes_number, 0);
    }

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
}
