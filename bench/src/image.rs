//! Section 3: reading the snapshot image against reading the backing directly, and image writes
//! of whole chunks (no origin read) against partial ones.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use blksnap_engine::io::{Dev, MemDev};
use blksnap_engine::StorageSpec;
use blksnap_model::{DeviceId, Params, Result};

use crate::setup::{engine, layout, CountingDev, Env, Kind, Rig, IO_MIN_SECTORS};
use crate::util::{self, median, rate, ratio, Rng, Table, GIB, KIB, MIB};
use crate::writes::{geomean, random_4k, sequential_1m, Op};
use crate::{Config, Goals};

/// Per-round samples (bytes/s for reads, seconds per chunk for writes) and per-repetition
/// medians of the paired ratios.
#[derive(Default)]
struct Samples {
    /// Image reads of untouched chunks (served from the origin) and of copied chunks (served
    /// from the storage), direct reads of the origin at the same kind of offsets.
    img_seq_new: Vec<f64>,
    dir_seq_new: Vec<f64>,
    img_seq_cop: Vec<f64>,
    dir_seq_cop: Vec<f64>,
    img_rand_new: Vec<f64>,
    dir_rand_new: Vec<f64>,
    img_rand_cop: Vec<f64>,
    dir_rand_cop: Vec<f64>,
    full: Vec<f64>,
    full_min: Vec<f64>,
    partial: Vec<f64>,
    partial_min: Vec<f64>,
    /// Per repetition: image/direct throughput (seq new, seq copied, rand new, rand copied);
    /// image/minimum time (full, partial).
    per_rep: [Vec<f64>; 6],
}

impl Samples {
    fn ratio(&self, i: usize) -> f64 {
        geomean(&self.per_rep[i])
    }
}

fn image_reads(rig: &Rig<'_>, ops: &[Op], buf: &mut [u8]) -> Result<f64> {
    let t = Instant::now();
    for op in ops {
        rig.engine.image_read(rig.dev, op.off, &mut buf[..op.len])?;
    }
    Ok(t.elapsed().as_secs_f64())
}

fn direct_reads(dev: &Dev, ops: &[Op], buf: &mut [u8]) -> Result<f64> {
    let t = Instant::now();
    for op in ops {
        dev.read_at(&mut buf[..op.len], op.off)?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Image reads against direct reads of `direct` at the same kind of offsets, in rounds of two batches (each variant its
/// own batch, so neither reads what the other just cached); returns (image, direct) bytes/s
/// per round and the median image/direct ratio.
fn reads(
    rig: &Rig<'_>,
    direct: &Dev,
    ops: &[Op],
    batch: usize,
    rep: usize,
    buf: &mut [u8],
    out: (&mut Vec<f64>, &mut Vec<f64>),
) -> Result<f64> {
    let mut ratios = Vec::new();
    let batches: Vec<&[Op]> = ops.chunks(batch).collect();
    for (k, round) in batches.chunks_exact(2).enumerate() {
        let (ib, db) = (round[(k + rep) % 2], round[(k + rep + 1) % 2]);
        let (ti, td) = if k % 2 == 0 {
            let ti = image_reads(rig, ib, buf)?;
            (ti, direct_reads(direct, db, buf)?)
        } else {
            let td = direct_reads(direct, db, buf)?;
            (image_reads(rig, ib, buf)?, td)
        };
        let bytes = crate::writes::bytes(ib) as f64;
        out.0.push(bytes / ti);
        out.1.push(bytes / td);
        ratios.push(td / ti);
    }
    Ok(median(&ratios))
}

fn measure(env: &Env, kind: Kind, cfg: &Config) -> Result<Samples> {
    let params = Params::default();
    let layout = layout(&params, cfg.disk_bytes);
    let chunk = layout.chunk_size_bytes();
    let cb = chunk as usize;
    let mut rig = Rig::new(env, kind, cfg.disk_bytes, params)?;
    let data = Rng::new(11).bytes(cb.max(MIB as usize));
    let mut buf = vec![0u8; MIB as usize];
    // The first half of the disk is copied before the reads (the image serves it from the
    // storage), the second half is not (served from the origin).
    let half = cfg.disk_bytes / 2;
    let seq: Vec<Op> = sequential_1m(cfg.disk_bytes);
    let (seq_cop, seq_new) = seq.split_at(seq.len() / 2);
    let mut rng = Rng::new(5);
    let rand_cop = random_4k(&mut rng, cfg.rand_ops / 2, 0, half);
    let rand_new = random_4k(&mut rng, cfg.rand_ops / 2, half, cfg.disk_bytes);
    let mut s = Samples::default();
    for rep in 0..cfg.reps + usize::from(cfg.warmup) {
        rig.taken()?;
        for c in 0..layout.chunk_count / 2 {
            rig.engine.write(rig.dev, c * chunk, &data[..4096])?;
        }
        // The first half was copied in ascending chunk order from sector 0 of the storage, so a
        // copied chunk lives at its own offset there: direct reads of the storage at the same
        // offsets return exactly what the image does.
        let storage = rig.storage.clone().expect("a taken snapshot has a storage");
        let origin = rig.disk.clone();
        let (sn, sc) =
            ((&mut s.img_seq_new, &mut s.dir_seq_new), (&mut s.img_seq_cop, &mut s.dir_seq_cop));
        let (rn, rc) = (
            (&mut s.img_rand_new, &mut s.dir_rand_new),
            (&mut s.img_rand_cop, &mut s.dir_rand_cop),
        );
        let r = [
            reads(&rig, &origin, seq_new, 2, rep, &mut buf, sn)?,
            reads(&rig, &storage, seq_cop, 2, rep, &mut buf, sc)?,
            reads(&rig, &origin, &rand_new, 256, rep, &mut buf, rn)?,
            reads(&rig, &storage, &rand_cop, 256, rep, &mut buf, rc)?,
        ];
        // Writes into New chunks of a fresh snapshot: whole chunks, 4 KiB pieces, and their
        // minimums on a fresh storage; rounds of four batches of 4 chunks, one per variant.
        rig.taken()?;
        let storage = env.storage(kind, 4 * GIB)?;
        storage.set_len(GIB)?;
        let mut bump = 0u64;
        let mut cbuf = vec![0u8; cb];
        let mut chunks: Vec<u64> = (0..layout.chunk_count).collect();
        Rng::new(17 + rep as u64).shuffle(&mut chunks);
        let batches: Vec<&[u64]> = chunks.chunks(4).collect();
        let (mut r_full, mut r_part) = (Vec::new(), Vec::new());
        for (k, round) in batches.chunks_exact(4).enumerate() {
            let mut t = [0.0; 4];
            for j in 0..4 {
                let v = (j + k) % 4;
                let batch = round[(v + k + rep) % 4];
                let start = Instant::now();
                for &c in batch {
                    match v {
                        0 => rig.engine.image_write(rig.dev, c * chunk, &data[..cb])?,
                        1 => {
                            storage.write_at(&data[..cb], bump)?;
                            bump += chunk;
                        }
                        2 => rig.engine.image_write(rig.dev, c * chunk + 8 * KIB, &data[..4096])?,
                        _ => {
                            rig.disk.read_at(&mut cbuf, c * chunk)?;
                            cbuf[8 * KIB as usize..12 * KIB as usize]
                                .copy_from_slice(&data[..4096]);
                            storage.write_at(&cbuf, bump)?;
                            bump += chunk;
                        }
                    }
                }
                t[v] = start.elapsed().as_secs_f64() / batch.len() as f64;
            }
            s.full.push(t[0]);
            s.full_min.push(t[1]);
            s.partial.push(t[2]);
            s.partial_min.push(t[3]);
            r_full.push(t[0] / t[1]);
            r_part.push(t[2] / t[3]);
        }
        rig.drop_snapshot()?;
        if cfg.warmup && rep == 0 {
            s = Samples::default();
            continue;
        }
        for (i, x) in r.iter().enumerate() {
            s.per_rep[i].push(*x);
        }
        s.per_rep[4].push(median(&r_full));
        s.per_rep[5].push(median(&r_part));
    }
    Ok(s)
}

/// Origin reads per chunk of full-chunk and of partial image writes, counted on a wrapper.
fn origin_reads_per_chunk() -> Result<(f64, f64)> {
    let params = Params::default();
    let disk_bytes = 16 * MIB;
    let layout = layout(&params, disk_bytes);
    let chunk = layout.chunk_size_bytes();
    let counting = Arc::new(CountingDev {
        inner: Arc::new(MemDev::new(disk_bytes)),
        reads: Default::default(),
    });
    let engine = engine(params);
    let dev = DeviceId::new(251, 1);
    engine.add_disk(dev, counting.clone(), IO_MIN_SECTORS)?;
    engine.attach(dev)?;
    let storage: Dev = Arc::new(MemDev::growable(0, 2 * GIB));
    let id =
        engine.snapshot_create(StorageSpec::File { backend: storage, limit_sectors: 4 << 21 })?;
    engine.snapshot_add(id, dev)?;
    engine.snapshot_take(id)?;
    let data = vec![0x5au8; chunk as usize];
    let half = layout.chunk_count / 2;
    let before = counting.reads.load(Ordering::Relaxed);
    for c in 0..half {
        engine.image_write(dev, c * chunk, &data)?;
    }
    let mid = counting.reads.load(Ordering::Relaxed);
    for c in half..layout.chunk_count {
        engine.image_write(dev, c * chunk + 512, &data[..4096])?;
    }
    let after = counting.reads.load(Ordering::Relaxed);
    engine.snapshot_destroy(id)?;
    let n = half as f64;
    Ok(((mid - before) as f64 / n, (after - mid) as f64 / (layout.chunk_count - half) as f64))
}

pub fn section(env: &Env, cfg: &Config, goals: &mut Goals) -> Result<Table> {
    let layout = layout(&Params::default(), cfg.disk_bytes);
    let chunk = layout.chunk_size_bytes();
    let mut per_kind = Vec::new();
    for kind in Kind::ALL {
        crate::progress(&format!("image on {}", kind.name()));
        per_kind.push(measure(env, kind, cfg)?);
    }
    let (full_reads, partial_reads) = origin_reads_per_chunk()?;
    let mut t = Table::new(
        format!(
            "3. Snapshot image I/O vs the backing ({} disk; medians of {})",
            util::size(cfg.disk_bytes),
            cfg.reps
        ),
        &[
            "operation",
            "MemDev image",
            "MemDev direct",
            "image / direct",
            "FileDev image",
            "FileDev direct",
            "image / direct",
        ],
    );
    type Get = fn(&Samples) -> (&Vec<f64>, &Vec<f64>);
    let rows: [(&str, Get, bool); 6] = [
        (
            "sequential read, 1 MiB, untouched chunks (from the origin)",
            |t| (&t.img_seq_new, &t.dir_seq_new),
            true,
        ),
        (
            "sequential read, 1 MiB, copied chunks (from the storage)",
            |t| (&t.img_seq_cop, &t.dir_seq_cop),
            true,
        ),
        ("random read, 4 KiB, untouched chunks", |t| (&t.img_rand_new, &t.dir_rand_new), true),
        ("random read, 4 KiB, copied chunks", |t| (&t.img_rand_cop, &t.dir_rand_cop), true),
        ("full-chunk write into New chunks (time per chunk)", |t| (&t.full, &t.full_min), false),
        ("4 KiB write into New chunks (time per chunk)", |t| (&t.partial, &t.partial_min), false),
    ];
    for (i, (label, get, is_rate)) in rows.into_iter().enumerate() {
        let mut cells = vec![label.to_string()];
        for (kind, samples) in Kind::ALL.iter().zip(&per_kind) {
            let (img, dir) = get(samples);
            let (img, dir) = (median(img), median(dir));
            let r = samples.ratio(i);
            if is_rate {
                cells.push(rate(img as u64, 1.0));
                cells.push(rate(dir as u64, 1.0));
            } else {
                cells.push(util::dur(img));
                cells.push(util::dur(dir));
            }
            cells.push(ratio(r));
            if i < 2 {
                let what = if i == 0 { "untouched chunks" } else { "copied chunks" };
                goals.add(
                    format!("image sequential read ≥ 0.90× direct read ({what})"),
                    *kind,
                    ratio(r),
                    r >= 0.90,
                );
            }
        }
        t.row(cells);
    }
    goals.add(
        "full-chunk image write reads no origin".into(),
        Kind::Mem,
        format!("{full_reads:.0} origin reads per chunk ({partial_reads:.0} for partial)"),
        full_reads == 0.0,
    );
    t.note(format!(
        "* Reads: a snapshot whose first half ({} chunks) is copied — the image reads it from \
         the storage — and whose second half is untouched — read from the origin; direct = `read_at` on the \
         backend that holds the bytes (the storage at the copied chunk's location, the origin \
         for untouched chunks). Timed in rounds (one batch per variant, distinct offsets, order \
         rotating); ratio = median per-round ratio of each repetition, geometric mean over the \
         repetitions. Read ratios are throughput (image / direct, higher is better); write \
         ratios are time (image / minimum, lower is better). The image reads in one piece per \
         chunk, the direct read 1 MiB at once: on MemDev the smaller copies are the faster \
         ones here, hence image reads above 1.0×.",
        util::size(chunk)
    ));
    t.note(format!(
        "* Writes: every chunk of a fresh snapshot, shared out among the four variants. Minimum of a full-chunk write = one {} storage \
         write; of a partial write = read the chunk from the origin, patch, write it to the \
         storage. Counted on a wrapper device: a full-chunk image write reads the origin \
         {full_reads:.0} times per chunk, a partial one {partial_reads:.0} time(s).",
        util::size(chunk)
    ));
    Ok(t)
}
