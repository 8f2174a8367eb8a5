//! Changed-block tracking (kernel: `cbt_map.c`). The kernel keeps two byte maps per device:
//! the *write map* (live; each byte the highest snapshot number during which the block was
//! written) and the *read map* (a copy of the write map made at the last take; what `cbtmap`
//! returns). The kernel copies the map at every take, under the device's freeze: O(blocks).
//!
//! Here the take is O(1). Each block is one atomic `u16` cell holding its write byte and a saved
//! read byte, and the read map is derived: right after a take every block's read value *is* its
//! write value, so the copy is deferred per block until a writer is about to raise it. The rule:
//!
//! * **Lazy epochs** (`frozen == false`): a block whose write value is below `active` has not
//!   been written since the take, so its read value is its write value; a block at `active` was,
//!   and the first raise of the epoch saved the pre-take write value into the cell's read byte.
//!   Both halves change in one compare-exchange, so no reader sees a raised write byte without
//!   its saved read byte.
//! * **Frozen epochs** (`frozen == true`): the read byte is the read value for every block and
//!   writers leave it alone — the kernel's behaviour after the generation wrap (the read map is
//!   left stale while the write map restarts from zero), and after loading a saved state whose
//!   maps are not related that way.
//!
//! Invariant (lazy epochs): every cell with write byte < `active` has a read value equal to it;
//! that is what makes the deferred copy exact.
//!
//! Concurrency: writers to different (or the same) blocks never take a lock, and a write byte
//! never decreases. The snap numbers, `frozen` and the wrap's pass over the map change only in
//! the take switch, which runs with the device gate held for writing and so excludes every
//! marker (they mark with the gate held for reading); readers of `cbtinfo`/`cbtmap` hold the
//! gate for reading too, so they see a switch whole or not at all.

use blksnap_model::formulas::{cbt_layout, CbtLayout};
use blksnap_model::params::SECTOR_SHIFT;
use blksnap_model::{CbtInfo, Errno, Error, Params, Result, SectorRange, Uuid};

use crate::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use crate::sync::{LockRank, Mutex};

/// Snap numbers run 1..=255; at 256 the map wraps and the generation changes.
const SNAP_NUMBER_WRAP: u16 = 256;

/// A block's cell: the saved read byte (high) and the write byte (low).
fn cell(read: u8, write: u8) -> u16 {
    u16::from(read) << 8 | u16::from(write)
}

fn cell_parts(cell: u16) -> (u8, u8) {
    ((cell >> 8) as u8, cell as u8)
}

/// The read value of a cell in the epoch `(active, frozen)` (module doc).
fn read_value(cell: u16, active: u8, frozen: bool) -> u8 {
    let (read, write) = cell_parts(cell);
    if !frozen && write < active {
        write
    } else {
        read
    }
}

/// One device's CBT.
#[derive(Debug)]
pub struct CbtMap {
    layout: CbtLayout,
    capacity_sectors: u64,
    /// One cell per block (module doc).
    cells: Box<[AtomicU16]>,
    /// Written only under the gate's write side; read under its read side.
    active: AtomicU8,
    /// As `active`.
    previous: AtomicU8,
    /// As `active`: the read bytes are the read map (module doc).
    frozen: AtomicBool,
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

impl CbtMap {
    /// A fresh map: zeroed, `previous = 0`, `active = 1`.
    pub fn new(params: &Params, capacity_sectors: u64, generation: Uuid) -> CbtMap {
        let layout = cbt_layout(params, capacity_sectors);
        CbtMap {
            layout,
            capacity_sectors,
            cells: (0..layout.block_count).map(|_| AtomicU16::new(0)).collect(),
            active: AtomicU8::new(1),
            previous: AtomicU8::new(0),
            frozen: AtomicBool::new(false),
            generation: Mutex::new(LockRank::CbtGeneration, generation),
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
        // Lazy only if the saved maps keep the lazy invariant; otherwise the read bytes are the
        // read map as saved (exact either way).
        let pairs = state.read_map.iter().zip(&state.write_map);
        let lazy_ok = pairs.clone().all(|(r, w)| *w >= state.active || r == w);
        Ok(CbtMap {
            layout: CbtLayout { block_shift: state.block_shift, block_count },
            capacity_sectors,
            cells: pairs.map(|(r, w)| AtomicU16::new(cell(*r, *w))).collect(),
            active: AtomicU8::new(state.active),
            previous: AtomicU8::new(state.previous),
            frozen: AtomicBool::new(!lazy_ok),
            generation: Mutex::new(LockRank::CbtGeneration, state.generation),
        })
    }

    /// The whole state. Caller holds the gate for writing, so no marker runs meanwhile.
    pub fn state(&self) -> CbtState {
        let (active, frozen) = self.epoch();
        let cells: Vec<u16> = self.cells.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        CbtState {
            block_shift: self.layout.block_shift,
            capacity_sectors: self.capacity_sectors,
            write_map: cells.iter().map(|c| cell_parts(*c).1).collect(),
            read_map: cells.iter().map(|c| read_value(*c, active, frozen)).collect(),
            active,
            previous: self.previous.load(Ordering::Relaxed),
            generation: *self.generation.lock(),
        }
    }

    /// `(active, frozen)`: stable while the caller holds the gate.
    fn epoch(&self) -> (u8, bool) {
        (self.active.load(Ordering::Relaxed), self.frozen.load(Ordering::Relaxed))
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

    /// Applies `update` to the cells of blocks `first..=last` (compare-exchange per cell).
    /// `update` returns `None` when the cell needs no change — the common case of a steady
    /// workload rewriting blocks already marked in this epoch, which then costs one plain load
    /// and leaves the cache line shared between writer cores.
    fn update(&self, first: u64, last: u64, update: impl Fn(u16) -> Option<u16>) {
        for c in &self.cells[first as usize..=last as usize] {
            let mut current = c.load(Ordering::Relaxed);
            while let Some(new) = update(current) {
                match c.compare_exchange_weak(current, new, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => break,
                    Err(seen) => current = seen,
                }
            }
        }
    }

    /// An origin write of `range` (count > 0): write bytes raised to `active` (in a lazy epoch
    /// the first raise saves the pre-take value as the read byte). Caller holds the gate for
    /// reading.
    pub fn mark_write(&self, range: SectorRange) -> Result<()> {
        let (first, last) = self.blocks_of(range)?;
        let (active, frozen) = self.epoch();
        self.update(first, last, |current| {
            let (read, write) = cell_parts(current);
            if write >= active {
                return None;
            }
            Some(cell(if frozen { read } else { write }, active))
        });
        Ok(())
    }

    /// An image write or `cbtdirty` of `range`: the write value raised to `active` and the read
    /// value to `previous` (both maps, in the kernel's terms).
    pub fn mark_both(&self, range: SectorRange) -> Result<()> {
        let (first, last) = self.blocks_of(range)?;
        let (active, frozen) = self.epoch();
        let previous = self.previous.load(Ordering::Relaxed);
        self.update(first, last, |current| {
            let (_, write) = cell_parts(current);
            let read = read_value(current, active, frozen).max(previous);
            let new = cell(read, write.max(active));
            (new != current).then_some(new)
        });
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

    /// The take switch: O(1) except at the wrap. Caller holds the gate for writing.
    /// `new_generation` is called only at the wrap (255 → 256), for the new generation id.
    pub fn switch(&self, new_generation: impl FnOnce() -> Uuid) {
        let (active, frozen) = self.epoch();
        self.previous.store(active, Ordering::Relaxed);
        let next = u16::from(active) + 1;
        if next == SNAP_NUMBER_WRAP {
            // Wrap: new generation, live map cleared, read map left stale on purpose (the
            // client sees a new generation and must do a full backup anyway): the read bytes
            // take the current read values and the epoch is frozen.
            for c in self.cells.iter() {
                let read = read_value(c.load(Ordering::Relaxed), active, frozen);
                c.store(cell(read, 0), Ordering::Relaxed);
            }
            self.active.store(1, Ordering::Relaxed);
            self.frozen.store(true, Ordering::Relaxed);
            *self.generation.lock() = new_generation();
        } else {
            // Every write byte is now below `next`: each read value is its write value, which
            // is the kernel's copy of the write map, made lazily.
            self.active.store(next as u8, Ordering::Relaxed);
            self.frozen.store(false, Ordering::Relaxed);
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
        let (active, frozen) = self.epoch();
        out.clear();
        out.extend(
            self.cells[offset as usize..(offset + length) as usize]
                .iter()
                .map(|c| read_value(c.load(Ordering::Relaxed), active, frozen)),
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

    /// The kernel's eager two-map CBT, the reference for the lazy encoding.
    struct Eager {
        write: Vec<u8>,
        read: Vec<u8>,
        active: u8,
        previous: u8,
    }

    impl Eager {
        fn switch(&mut self) {
            self.previous = self.active;
            if self.active == 255 {
                self.active = 1;
                self.write.iter_mut().for_each(|b| *b = 0);
            } else {
                self.active += 1;
                self.read.clone_from(&self.write);
            }
        }
    }

    #[test]
    fn lazy_switch_equals_the_eager_copy() {
        // 16 blocks; random writes, image writes, takes (through several wraps) and save/load
        // cycles; after every step the map and its state equal the eager reference.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut m = map();
        let mut e = Eager { write: vec![0; 16], read: vec![0; 16], active: 1, previous: 0 };
        // 4 in 10 steps are takes: Miri still sees a wrap (255 takes), the full run dozens.
        let steps = if cfg!(miri) { 700 } else { 20_000 };
        for step in 0..steps {
            let range = SectorRange::new(next(2048), 1 + next(300));
            let blocks = m.blocks_of(range);
            match next(10) {
                0..=3 => {
                    if let Ok((first, last)) = blocks {
                        for b in first..=last {
                            e.write[b as usize] = e.write[b as usize].max(e.active);
                        }
                    }
                    assert_eq!(m.mark_write(range).is_ok(), blocks.is_ok());
                }
                4 => {
                    if let Ok((first, last)) = blocks {
                        for b in first..=last {
                            e.write[b as usize] = e.write[b as usize].max(e.active);
                            e.read[b as usize] = e.read[b as usize].max(e.previous);
                        }
                    }
                    assert_eq!(m.mark_both(range).is_ok(), blocks.is_ok());
                }
                5..=8 => {
                    e.switch();
                    m.switch(|| Uuid([step as u8; 16]));
                }
                _ => m = CbtMap::from_state(&m.state(), 2048).unwrap(),
            }
            let st = m.state();
            assert_eq!((st.active, st.previous), (e.active, e.previous), "step {step}");
            assert_eq!(st.write_map, e.write, "step {step}");
            assert_eq!(st.read_map, e.read, "step {step}");
            assert_eq!(read_all(&m), e.read, "step {step}");
        }
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
