//! Changed-block tracking (kernel: `cbt_map.c`). Two byte maps per device: `write_map` (live,
//! each byte the highest snapshot number during which the block was written) and `read_map`
//! (frozen at the last take; what `cbtmap` returns).
//!
//! Concurrency: the maps are arrays of atomic bytes and marking is `fetch_max`, so writers to
//! different (or the same) blocks never take a lock and a value never decreases. Everything that
//! changes the snap numbers or copies a map (the take switch) runs with the device gate held for
//! writing, which excludes every marker (they mark with the gate held for reading); readers of
//! `cbtinfo`/`cbtmap` hold the gate for reading too, so they see a switch whole or not at all.

use blksnap_model::formulas::{cbt_layout, CbtLayout};
use blksnap_model::params::SECTOR_SHIFT;
use blksnap_model::{CbtInfo, Errno, Error, Params, Result, SectorRange, Uuid};

use crate::sync::atomic::{AtomicU8, Ordering};
use crate::sync::Mutex;

/// Snap numbers run 1..=255; at 256 the map wraps and the generation changes.
const SNAP_NUMBER_WRAP: u16 = 256;

/// One device's CBT.
#[derive(Debug)]
pub struct CbtMap {
    layout: CbtLayout,
    capacity_sectors: u64,
    write_map: Box<[AtomicU8]>,
    read_map: Box<[AtomicU8]>,
    /// Written only under the gate's write side; read under its read side.
    active: AtomicU8,
    /// As `active`.
    previous: AtomicU8,
    generation: Mutex<Uuid>,
}

/// A CBT's whole state, for persisting it across a clean restart of the service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CbtState {
    /// log2 of the block size in bytes.
    pub block_shift: u32,
    /// Capacity in sectors the map was made for.
    pub capacity_sectors: u64,
    /// The live map.
    pub write_map: Vec<u8>,
    /// The map frozen at the last take.
    pub read_map: Vec<u8>,
    /// `snap_number_active`.
    pub active: u8,
    /// `snap_number_previous`.
    pub previous: u8,
    /// The generation id.
    pub generation: Uuid,
}

fn zeroed_map(len: u64) -> Box<[AtomicU8]> {
    (0..len).map(|_| AtomicU8::new(0)).collect()
}

impl CbtMap {
    /// A fresh map: zeroed, `previous = 0`, `active = 1`.
    pub fn new(params: &Params, capacity_sectors: u64, generation: Uuid) -> CbtMap {
        let layout = cbt_layout(params, capacity_sectors);
        CbtMap {
            layout,
            capacity_sectors,
            write_map: zeroed_map(layout.block_count),
            read_map: zeroed_map(layout.block_count),
            active: AtomicU8::new(1),
            previous: AtomicU8::new(0),
            generation: Mutex::new(generation),
        }
    }

    /// Rebuild a map from a saved state. EINVAL unless the state is self-consistent and made for
    /// `capacity_sectors` (a device that changed size gets a fresh map instead).
    pub fn from_state(state: &CbtState, capacity_sectors: u64) -> Result<CbtMap> {
        let invalid = |why| Err(Error::new(Errno::EINVAL, why));
        if state.capacity_sectors != capacity_sectors {
            return invalid("saved CBT is for another capacity");
        }
        if !(SECTOR_SHIFT..=62).contains(&state.block_shift) {
            return invalid("saved CBT block shift out of range");
        }
        let block_count =
            blksnap_model::formulas::count_by_shift(capacity_sectors, state.block_shift);
        let lens_ok = state.write_map.len() as u64 == block_count
            && state.read_map.len() as u64 == block_count;
        if !lens_ok || state.active == 0 {
            return invalid("saved CBT maps or numbers are inconsistent");
        }
        let map = |v: &[u8]| v.iter().map(|b| AtomicU8::new(*b)).collect::<Box<[AtomicU8]>>();
        Ok(CbtMap {
            layout: CbtLayout { block_shift: state.block_shift, block_count },
            capacity_sectors,
            write_map: map(&state.write_map),
            read_map: map(&state.read_map),
            active: AtomicU8::new(state.active),
            previous: AtomicU8::new(state.previous),
            generation: Mutex::new(state.generation),
        })
    }

    /// The whole state. Caller holds the gate for writing, so no marker runs meanwhile.
    pub fn state(&self) -> CbtState {
        let load = |m: &[AtomicU8]| m.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        CbtState {
            block_shift: self.layout.block_shift,
            capacity_sectors: self.capacity_sectors,
            write_map: load(&self.write_map),
            read_map: load(&self.read_map),
            active: self.active.load(Ordering::Relaxed),
            previous: self.previous.load(Ordering::Relaxed),
            generation: *self.generation.lock(),
        }
    }

    /// The block layout.
    pub fn layout(&self) -> CbtLayout {
        self.layout
    }

    /// Blocks `first..=last` covered by `range`, or EINVAL when it leaves the map.
    fn blocks_of(&self, range: SectorRange) -> Result<(u64, u64)> {
        debug_assert!(range.count > 0);
        let shift = self.layout.block_shift - SECTOR_SHIFT;
        let end = range.end().ok_or(Error::new(Errno::EINVAL, "sector range overflows"))?;
        let first = range.offset >> shift;
        let last = (end - 1) >> shift;
        if last >= self.layout.block_count {
            return Err(Error::new(Errno::EINVAL, "sector range beyond the CBT map"));
        }
        Ok((first, last))
    }

    /// Raise each block of `first..=last` to at least `number`.
    ///
    /// The plain load first is what keeps tracking cheap: a steady workload rewrites blocks that
    /// are already marked in this generation, and skipping the read-modify-write (a locked
    /// compare-exchange loop on x86) leaves the cache line shared between writer cores. It is
    /// sound because, while writers hold the gate for reading, a block's value only grows (the
    /// take switch and the wrap's clear run under the write side), so a value seen ≥ `number`
    /// stays ≥ `number`.
    fn mark(map: &[AtomicU8], first: u64, last: u64, number: u8) {
        for block in &map[first as usize..=last as usize] {
            if block.load(Ordering::Relaxed) < number {
                block.fetch_max(number, Ordering::Relaxed);
            }
        }
    }

    /// An origin write of `range` (count > 0): `write_map` with `active`. Caller holds the gate
    /// for reading.
    pub fn mark_write(&self, range: SectorRange) -> Result<()> {
        let (first, last) = self.blocks_of(range)?;
        Self::mark(&self.write_map, first, last, self.active.load(Ordering::Relaxed));
        Ok(())
    }

    /// An image write or `cbtdirty` of `range`: both maps (`active`, `previous`).
    pub fn mark_both(&self, range: SectorRange) -> Result<()> {
        let (first, last) = self.blocks_of(range)?;
        Self::mark(&self.write_map, first, last, self.active.load(Ordering::Relaxed));
        Self::mark(&self.read_map, first, last, self.previous.load(Ordering::Relaxed));
        Ok(())
    }

    /// `cbtdirty`: validate every range first, then mark all (all-or-nothing).
    pub fn mark_dirty(&self, ranges: &[SectorRange]) -> Result<()> {
        for r in ranges.iter().filter(|r| r.count > 0) {
            self.blocks_of(*r)?;
        }
        for r in ranges.iter().filter(|r| r.count > 0) {
            self.mark_both(*r)?;
        }
        Ok(())
    }

    /// The take switch. Caller holds the gate for writing. `new_generation` is called only at the
    /// wrap (255 → 256), for the new generation id.
    pub fn switch(&self, new_generation: impl FnOnce() -> Uuid) {
        let active = u16::from(self.active.load(Ordering::Relaxed));
        self.previous.store(active as u8, Ordering::Relaxed);
        let next = active + 1;
        if next == SNAP_NUMBER_WRAP {
            // Wrap: new generation, live map cleared, read map left stale on purpose (the
            // client sees a new generation and must do a full backup anyway).
            self.active.store(1, Ordering::Relaxed);
            for b in self.write_map.iter() {
                b.store(0, Ordering::Relaxed);
            }
            *self.generation.lock() = new_generation();
        } else {
            self.active.store(next as u8, Ordering::Relaxed);
            for (r, w) in self.read_map.iter().zip(self.write_map.iter()) {
                r.store(w.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        debug_assert!(self.active.load(Ordering::Relaxed) >= 1);
    }

    /// `cbtinfo`.
    pub fn info(&self) -> CbtInfo {
        CbtInfo {
            device_capacity_bytes: self.capacity_sectors << SECTOR_SHIFT,
            block_size_bytes: u32::try_from(self.layout.block_size_bytes()).unwrap_or(u32::MAX),
            block_count: u32::try_from(self.layout.block_count).unwrap_or(u32::MAX),
            generation_id: *self.generation.lock(),
            changes_number: self.previous.load(Ordering::Relaxed),
        }
    }

    /// `cbtmap`: `read_map[offset .. offset + length]`, ENODATA when out of range.
    pub fn read_map(&self, offset: u32, length: u32, out: &mut Vec<u8>) -> Result<()> {
        let count = self.layout.block_count;
        let (offset, length) = (u64::from(offset), u64::from(length));
        if offset > count || length > count - offset {
            return Err(Error::new(Errno::ENODATA, "cbtmap range beyond the map"));
        }
        out.clear();
        out.extend(
            self.read_map[offset as usize..(offset + length) as usize]
                .iter()
                .map(|b| b.load(Ordering::Relaxed)),
        );
        Ok(())
    }
}

#[cfg(all(test, not(any(blksnap_loom, blksnap_shuttle))))]
mod tests {
    use super::*;

    fn map() -> CbtMap {
        // 64 KiB blocks (128 sectors), 1 MiB device: 16 blocks.
        CbtMap::new(&Params::default(), 2048, Uuid([1; 16]))
    }

    fn read_all(m: &CbtMap) -> Vec<u8> {
        let mut v = Vec::new();
        m.read_map(0, m.layout().block_count as u32, &mut v).unwrap();
        v
    }

    #[test]
    fn reference_marking_example() {
        let m = map();
        m.mark_write(SectorRange::new(130, 8)).unwrap();
        m.mark_write(SectorRange::new(300, 10)).unwrap();
        m.switch(|| unreachable!());
        let v = read_all(&m);
        assert_eq!(&v[..4], &[0, 1, 1, 0]);
        m.mark_write(SectorRange::new(120, 16)).unwrap();
        m.switch(|| unreachable!());
        assert_eq!(&read_all(&m)[..4], &[2, 2, 1, 0]);
        assert_eq!(m.info().changes_number, 2);
    }

    #[test]
    fn out_of_range_and_overflow() {
        let m = map();
        assert_eq!(m.mark_write(SectorRange::new(2048, 1)).unwrap_err().errno, Errno::EINVAL);
        assert_eq!(m.mark_write(SectorRange::new(u64::MAX, 2)).unwrap_err().errno, Errno::EINVAL);
        let bad = [SectorRange::new(0, 1), SectorRange::new(4000, 1)];
        assert_eq!(m.mark_dirty(&bad).unwrap_err().errno, Errno::EINVAL);
        assert_eq!(read_all(&m), vec![0; 16], "all-or-nothing");
        let mut v = Vec::new();
        assert_eq!(m.read_map(17, 0, &mut v).unwrap_err().errno, Errno::ENODATA);
        assert_eq!(m.read_map(10, 7, &mut v).unwrap_err().errno, Errno::ENODATA);
        m.read_map(16, 0, &mut v).unwrap();
        assert!(v.is_empty());
    }

    #[test]
    fn wrap_at_256_changes_generation_and_keeps_read_map() {
        let m = map();
        for _ in 0..254 {
            m.mark_write(SectorRange::new(0, 1)).unwrap();
            m.switch(|| unreachable!());
        }
        assert_eq!(m.info().changes_number, 254);
        assert_eq!(read_all(&m)[0], 254);
        m.mark_write(SectorRange::new(128, 1)).unwrap();
        m.switch(|| Uuid([9; 16]));
        let info = m.info();
        assert_eq!(info.changes_number, 255);
        assert_eq!(info.generation_id, Uuid([9; 16]));
        assert_eq!(&read_all(&m)[..2], &[254, 0], "read map stale at the wrap");
        m.mark_write(SectorRange::new(256, 1)).unwrap();
        m.switch(|| unreachable!());
        assert_eq!(m.info().changes_number, 1);
        assert_eq!(&read_all(&m)[..3], &[0, 0, 1]);
    }

    #[test]
    fn state_round_trip_and_validation() {
        let m = map();
        m.mark_write(SectorRange::new(130, 8)).unwrap();
        m.switch(|| unreachable!());
        m.mark_write(SectorRange::new(0, 1)).unwrap();
        let st = m.state();
        let back = CbtMap::from_state(&st, 2048).unwrap();
        assert_eq!(back.state(), st);
        assert_eq!(back.info(), m.info());
        assert_eq!(CbtMap::from_state(&st, 4096).unwrap_err().errno, Errno::EINVAL);
        let mut bad = st.clone();
        bad.read_map.pop();
        assert_eq!(CbtMap::from_state(&bad, 2048).unwrap_err().errno, Errno::EINVAL);
        let bad = CbtState { active: 0, ..st.clone() };
        assert_eq!(CbtMap::from_state(&bad, 2048).unwrap_err().errno, Errno::EINVAL);
        let bad = CbtState { block_shift: 70, ..st };
        assert_eq!(CbtMap::from_state(&bad, 2048).unwrap_err().errno, Errno::EINVAL);
    }

    #[test]
    fn image_writes_mark_both_maps() {
        let m = map();
        m.switch(|| unreachable!());
        m.mark_both(SectorRange::new(0, 1)).unwrap();
        assert_eq!(read_all(&m)[0], 1);
        m.switch(|| unreachable!());
        assert_eq!(read_all(&m)[0], 2);
    }
}
