//! `cbt_and_storage`: parameters, capacities and ranges at their edges.
//!
//! 1. Arbitrary [`Params`] through `sanitized()` (refused exactly when a shift is outside 9..=62
//!    or the block count is 0; idempotent otherwise).
//! 2. `count_by_shift`, `cbt_layout`, `chunk_layout`, `chunk_layout_v3` on capacities from 0 and
//!    one sector up to 2^63 and `u64::MAX` sectors and io_min up to `u64::MAX`: every layout
//!    covers the capacity exactly (`count * block ≥ capacity > (count - 1) * block`), the last
//!    chunk is short but not empty, shifts stay inside their bounds; overflow checks are on, so
//!    any overflow panics.
//! 3. A small disk with those parameters in the model/engine [`Harness`]: `cbt_dirty` of
//!    arbitrary ranges (crossing the end, overflowing, empty, too many) must be EINVAL exactly
//!    when a non-empty range overflows or ends past the map's coverage, and the maps must agree
//!    with the model, before and after a take and writes.
#![no_main]

use arbitrary::Unstructured;
use blksnap_fuzz::Rd;
use blksnap_model::formulas::{cbt_layout, chunk_layout, chunk_layout_v3, count_by_shift};
use blksnap_model::limits::MAX_RANGES_PER_CALL;
use blksnap_model::{DeviceId, Errno, Params, SectorRange};
use blksnap_sim_tests::{DiskSetup, Harness, Op, StorageKind};
use libfuzzer_sys::fuzz_target;

const SHIFT_EDGES: [u64; 10] = [9, 12, 16, 26, 40, 61, 62, 63, 64, u32::MAX as u64];
const COUNT_EDGES: [u64; 8] = [0, 1, 2, 16, 2_097_152, 1 << 40, u64::MAX, 1 << 63];
const CAPACITY_EDGES: [u64; 14] = [
    0,
    1,
    7,
    8,
    9,
    (1 << 21) + 1,
    1 << 32,
    (1 << 32) + 1,
    1 << 53,
    (1 << 53) + 1,
    1 << 63,
    (1 << 63) + 1,
    u64::MAX >> 9,
    u64::MAX,
];
const IO_MIN_EDGES: [u64; 8] = [0, 1, 8, 1 << 20, 1 << 53, (1 << 53) + 1, 1 << 63, u64::MAX];

fn shift(r: &mut Rd) -> u32 {
    let b = r.u8();
    if b < 200 {
        u32::from(b % 70)
    } else {
        r.pick(&SHIFT_EDGES) as u32
    }
}

fn value(r: &mut Rd, edges: &[u64]) -> u64 {
    match r.u8() % 4 {
        0 => r.u64(),
        1 => u64::from(r.u16()),
        _ => r.pick(edges),
    }
}

fn params(r: &mut Rd) -> Params {
    Params {
        tracking_block_minimum_shift: shift(r),
        tracking_block_maximum_count: value(r, &COUNT_EDGES),
        tracking_block_maximum_shift: shift(r),
        chunk_minimum_shift: shift(r),
        chunk_maximum_count_shift: shift(r),
        chunk_maximum_shift: shift(r),
        diff_storage_minimum_sectors: value(r, &COUNT_EDGES),
    }
}

/// `count` blocks of `2^block_sectors_shift` sectors cover `capacity` exactly.
fn covers(what: &str, capacity: u64, count: u64, block_sectors: u64) {
    let (cap, count, bs) = (u128::from(capacity), u128::from(count), u128::from(block_sectors));
    assert!(count * bs >= cap, "{what}: {count} x {bs} < {cap}");
    if count > 0 {
        assert!((count - 1) * bs < cap, "{what}: {count} x {bs} covers {cap} with a spare block");
    } else {
        assert_eq!(cap, 0, "{what}: no blocks for a capacity");
    }
}

fn formulas(p: &Params, r: &mut Rd) {
    for _ in 0..4 {
        let capacity = value(r, &CAPACITY_EDGES);
        let io_min = value(r, &IO_MIN_EDGES);
        for shift in 9..64 {
            let count = count_by_shift(capacity, shift);
            let want = u128::from(capacity).div_ceil(1u128 << (shift - 9));
            assert_eq!(u128::from(count), want, "count_by_shift({capacity}, {shift})");
        }

        let cbt = cbt_layout(p, capacity);
        let lo = p.tracking_block_minimum_shift.min(p.tracking_block_maximum_shift);
        assert!((lo..=p.tracking_block_maximum_shift.max(lo)).contains(&cbt.block_shift));
        covers("cbt_layout", capacity, cbt.block_count, cbt.block_sectors());
        if cbt.block_shift < p.tracking_block_maximum_shift && cbt.block_shift > lo {
            assert!(cbt.block_count <= p.tracking_block_maximum_count, "{cbt:?} grew too far");
        }

        for (name, l) in [
            ("chunk_layout", chunk_layout(p, capacity, io_min)),
            ("chunk_layout_v3", chunk_layout_v3(p, value(r, &COUNT_EDGES), capacity, io_min)),
        ] {
            let what = format!("{name}({capacity}, io_min {io_min}) = {l:?} with {p:?}");
            assert!((9..=62).contains(&l.chunk_shift), "{what}");
            covers(&what, capacity, l.chunk_count, l.chunk_sectors());
            assert!(l.last_chunk_sectors <= l.chunk_sectors(), "{what}");
            if l.chunk_count > 0 {
                assert!(l.last_chunk_sectors > 0, "{what}: empty last chunk");
                let last = l.chunk_count - 1;
                assert_eq!(l.sectors_of(last), l.last_chunk_sectors, "{what}");
                assert_eq!(
                    u128::from(l.first_sector_of(last)) + u128::from(l.last_chunk_sectors),
                    u128::from(capacity),
                    "{what}: chunks do not add up to the capacity"
                );
                assert_eq!(l.chunk_of_sector(capacity - 1), last, "{what}");
            } else {
                assert_eq!(l.last_chunk_sectors, 0, "{what}");
            }
        }
        let newest = chunk_layout(p, capacity, io_min);
        assert!(newest.chunk_shift >= 12, "newest chunks are at least a page");
        if io_min <= 1 << 53 {
            assert!(newest.chunk_sectors() >= io_min, "newest chunk covers io_min {io_min}");
        }
    }
}

/// Expected cbt_dirty result on a disk of `capacity` sectors (SEMANTICS.md, CBT).
fn dirty_ok(p: &Params, capacity: u64, ranges: &[SectorRange]) -> bool {
    let l = cbt_layout(p, capacity);
    let coverage = u128::from(l.block_count) << (l.block_shift - 9);
    ranges.len() <= MAX_RANGES_PER_CALL
        && ranges.iter().all(|r| {
            r.count == 0
                || r.offset.checked_add(r.count).is_some_and(|end| u128::from(end) <= coverage)
        })
}

fn ranges(r: &mut Rd, capacity: u64) -> Vec<SectorRange> {
    let b = r.u8();
    let one = |r: &mut Rd| {
        let edge = [0, 1, capacity, capacity.saturating_sub(1), capacity + 1, u64::MAX, 1 << 63];
        let offset = if r.u8() % 4 == 0 { r.pick(&edge) } else { u64::from(r.u16()) % (capacity + 9) };
        let count = if r.u8() % 4 == 0 { r.pick(&edge) } else { u64::from(r.u8()) % (capacity + 9) };
        SectorRange::new(offset, count)
    };
    match b {
        255 => {
            let x = one(r);
            vec![x; MAX_RANGES_PER_CALL + usize::from(r.u8() % 2)]
        }
        _ => (0..b % 6).map(|_| one(r)).collect(),
    }
}

fn disk_ops(p: Params, r: &mut Rd) {
    let capacity = r.pick(&[0u64, 1, 7, 8, 9, 63, 64, 65, 131, 256, 1000, 2048]);
    let io_min = r.pick(&[1u64, 8, 16, 1 << 12]);
    let disks = [DiskSetup { id: DeviceId::new(7, 0), sectors: capacity, io_min_sectors: io_min }];
    let mut h = Harness::new(p, &disks, 1);
    let run = |h: &mut Harness, op: Op| {
        if let Err(m) = h.apply(&op) {
            panic!("{op:?}: {m} (params {p:?}, capacity {capacity})");
        }
        if let Err(m) = h.check_state() {
            panic!("after {op:?}: {m} (params {p:?}, capacity {capacity})");
        }
    };
    run(&mut h, Op::Attach { disk: 0 });
    let mut taken = false;
    while r.more() {
        match r.u8() % 6 {
            0 | 1 => {
                let rs = ranges(r, capacity);
                let ok = dirty_ok(&p, capacity, &rs);
                run(&mut h, Op::CbtDirty { disk: 0, ranges: rs });
                let got = h.last.errno;
                assert!(
                    if ok { got.is_none() } else { got == Some(Errno::EINVAL) },
                    "cbt_dirty: expected ok={ok}, got {got:?} (params {p:?}, capacity {capacity})"
                );
            }
            2 => {
                let offset = r.small_or_edge(200, &[u64::from(u32::MAX), 2048, 2049]) as u32;
                let length = r.small_or_edge(200, &[u64::from(u32::MAX), 2048, 2049]) as u32;
                run(&mut h, Op::CbtMap { disk: 0, offset, length });
            }
            3 if !taken => {
                taken = true;
                let storage = StorageKind::File {
                    initial_sectors: r.pick(&[0, 8, 64]),
                    limit_sectors: r.pick(&[0, 64, 4096]),
                    growable: true,
                };
                run(&mut h, Op::Create { storage });
                run(&mut h, Op::Add { snap: 0, disk: 0 });
                run(&mut h, Op::Take { snap: 0 });
            }
            4 => {
                let sector = u64::from(r.u8()) % (capacity + 4);
                let sectors = u64::from(r.u8() % 17);
                run(&mut h, Op::Write { disk: 0, sector, sectors, seed: r.u8() });
            }
            _ => {
                let sector = u64::from(r.u8()) % (capacity + 4);
                let sectors = u64::from(r.u8() % 17);
                run(&mut h, Op::ImageRead { disk: 0, sector, sectors });
            }
        }
    }
    if let Err(m) = h.teardown() {
        panic!("teardown: {m}");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let mut r = Rd(&mut u);
    let raw = params(&mut r);
    let p = match raw.sanitized() {
        Ok(p) => p,
        Err(e) => {
            let shifts = [
                raw.tracking_block_minimum_shift,
                raw.tracking_block_maximum_shift,
                raw.chunk_minimum_shift,
                raw.chunk_maximum_shift,
            ];
            let bad = shifts.iter().any(|s| !(9..=62).contains(s))
                || raw.tracking_block_maximum_count == 0;
            assert!(bad && e.errno == Errno::EINVAL, "{raw:?} refused: {e:?}");
            return;
        }
    };
    assert_eq!(p.sanitized().ok(), Some(p), "sanitizing is idempotent");
    formulas(&p, &mut r);
    disk_ops(p, &mut r);
});
