//! Section 6: the CBT controls on a 1 TiB device — reading the whole map, and marking 10,000
//! ranges dirty — against the same work on a plain byte array.

use std::hint::black_box;

use blksnap_model::formulas::cbt_layout;
use blksnap_model::{DeviceId, Params, Result, SectorRange};

use crate::setup::{engine, Env, Kind, IO_MIN_SECTORS};
use crate::util::{self, median, ratio, secs, Rng, Table, TIB};
use crate::{Config, Goals};

pub const DIRTY_RANGES: usize = 10_000;

pub fn section(env: &Env, cfg: &Config, _goals: &mut Goals) -> Result<Table> {
    crate::progress("cbt controls");
    let params = Params::default();
    let bytes = TIB;
    let layout = cbt_layout(&params, bytes >> 9);
    let engine = engine(params);
    let dev = DeviceId::new(250, 0);
    engine.add_disk(dev, env.sparse(Kind::Mem, bytes)?, IO_MIN_SECTORS)?;
    engine.attach(dev)?;
    let count = layout.block_count as u32;
    let mut rng = Rng::new(3);
    let ranges: Vec<SectorRange> = (0..DIRTY_RANGES)
        .map(|_| SectorRange::new(rng.below((bytes >> 9) - 4096), 1 + rng.below(2048)))
        .collect();
    let mut out = Vec::new();
    engine.cbt_map(dev, 0, count, &mut out)?; // sizes `out` once
                                              // The plain equivalents: a byte copy of the map; max-marking two byte arrays.
    let src = vec![1u8; count as usize];
    let mut dst = vec![0u8; count as usize];
    let mut plain_w = vec![0u8; count as usize];
    let mut plain_r = vec![0u8; count as usize];
    let shift = layout.block_shift - 9;
    let (mut map, mut copy, mut dirty, mut plain) = (vec![], vec![], vec![], vec![]);
    let inner = if cfg.quick { 5 } else { 20 };
    // One untimed round first, always: it faults in the maps' pages.
    for _ in 0..=cfg.reps {
        map.push(
            secs(|| {
                for _ in 0..inner {
                    engine.cbt_map(dev, 0, count, &mut out).expect("cbtmap");
                    black_box(&out);
                }
            }) / inner as f64,
        );
        copy.push(
            secs(|| {
                for _ in 0..inner {
                    dst.copy_from_slice(black_box(&src));
                    black_box(&dst);
                }
            }) / inner as f64,
        );
        dirty.push(secs(|| engine.cbt_dirty(dev, &ranges).expect("cbtdirty")));
        plain.push(secs(|| {
            for r in black_box(&ranges) {
                let (first, last) = (r.offset >> shift, (r.offset + r.count - 1) >> shift);
                for b in first..=last {
                    let b = b as usize;
                    plain_w[b] = plain_w[b].max(2);
                    plain_r[b] = plain_r[b].max(1);
                }
            }
            black_box((&plain_w, &plain_r));
        }));
    }
    for v in [&mut map, &mut copy, &mut dirty, &mut plain] {
        v.remove(0);
    }
    let mut t = Table::new(
        format!(
            "6. CBT controls on a 1 TiB device ({} blocks of {}; medians of {})",
            count,
            util::size(layout.block_size_bytes()),
            cfg.reps
        ),
        &["operation", "engine", "plain byte array", "engine / plain"],
    );
    let (m, c) = (median(&map), median(&copy));
    t.row(vec![
        format!("cbtmap of the whole map ({})", util::size(count as u64)),
        format!("{} ({})", util::dur(m), util::rate(count as u64, m)),
        format!("{} (memcpy)", util::dur(c)),
        ratio(m / c),
    ]);
    let (d, p) = (median(&dirty), median(&plain));
    t.row(vec![
        format!("cbtdirty of {DIRTY_RANGES} ranges (1–2048 sectors)"),
        format!("{} ({:.0} ns per range)", util::dur(d), d * 1e9 / DIRTY_RANGES as f64),
        format!("{} (max-marking two arrays)", util::dur(p)),
        ratio(d / p),
    ]);
    t.note(
        "* The engine's map is one atomic `u16` cell per block (write byte + saved read byte, \
         so markers never lock and take needs no copy), and `cbtmap` derives each read value \
         from its cell, one relaxed load at a time, where the kernel's `copy_to_user` is a \
         memcpy; cbtdirty checks every range before marking any (all-or-nothing)."
            .to_string(),
    );
    Ok(t)
}
