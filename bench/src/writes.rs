//! Sections 1 and 2: origin write throughput in every state of the disk, and the first write's
//! copy-on-write against the physical minimum (the same bytes moved with plain calls).

use std::time::Instant;

use blksnap_engine::io::Dev;
use blksnap_engine::Engine;
use blksnap_model::formulas::ChunkLayout;
use blksnap_model::{DeviceId, Params, Result};

use crate::setup::{fill, layout, Env, Kind, Rig};
use crate::util::{self, median, rate, ratio, Rng, Table, GIB, KIB, MIB};
use crate::{Config, Goals};

/// One origin write.
#[derive(Clone, Copy, Debug)]
pub struct Op {
    pub off: u64,
    pub len: usize,
}

/// A workload: `steady` for pass-through, tracking and rewrites; `first` touches every chunk
/// exactly once while it is New (each op's chunks are all uncopied when it runs). Both are
/// timed in batches (`*_batch` ops), the compared variants alternating batch by batch.
pub struct Pattern {
    pub name: &'static str,
    pub steady: Vec<Op>,
    pub steady_batch: usize,
    pub first: Vec<Op>,
    pub first_batch: usize,
}

pub fn bytes(ops: &[Op]) -> u64 {
    ops.iter().map(|o| o.len as u64).sum()
}

/// `n` random 4 KiB-aligned writes of 4 KiB inside `[from, to)`.
pub fn random_4k(rng: &mut Rng, n: usize, from: u64, to: u64) -> Vec<Op> {
    let blocks = (to - from) / (4 * KIB);
    (0..n).map(|_| Op { off: from + rng.below(blocks) * 4 * KIB, len: 4 * KIB as usize }).collect()
}

/// One 4 KiB write at a random block of each chunk of `chunks`, in that order.
pub fn one_per_chunk(rng: &mut Rng, chunks: &[u64], layout: &ChunkLayout) -> Vec<Op> {
    let chunk = layout.chunk_size_bytes();
    chunks
        .iter()
        .map(|&c| Op { off: c * chunk + rng.below(chunk / (4 * KIB)) * 4 * KIB, len: 4096 })
        .collect()
}

/// Sequential 1 MiB writes over `[0, bytes)`.
pub fn sequential_1m(bytes: u64) -> Vec<Op> {
    (0..bytes / MIB).map(|i| Op { off: i * MIB, len: MIB as usize }).collect()
}

pub fn patterns(cfg: &Config, layout: &ChunkLayout) -> [Pattern; 2] {
    let mut rng = Rng::new(42);
    let mut chunks: Vec<u64> = (0..layout.chunk_count).collect();
    rng.shuffle(&mut chunks);
    let chunks_per_mib = (MIB / layout.chunk_size_bytes()).max(1) as usize;
    [
        Pattern {
            name: "4 KiB random",
            steady: random_4k(&mut rng, cfg.rand_ops, 0, cfg.disk_bytes),
            steady_batch: 256,
            first: one_per_chunk(&mut rng, &chunks, layout),
            first_batch: 8,
        },
        Pattern {
            name: "1 MiB sequential",
            steady: sequential_1m(cfg.disk_bytes),
            steady_batch: 4,
            first: sequential_1m(cfg.disk_bytes),
            first_batch: (8 / chunks_per_mib).max(1),
        },
    ]
}

/// Origin writes through the engine.
pub fn run(engine: &Engine, dev: DeviceId, ops: &[Op], data: &[u8]) -> Result<f64> {
    let t = Instant::now();
    for op in ops {
        engine.write(dev, op.off, &data[..op.len])?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// The physical minimum of a first write: for each op, every chunk it touches that is not
/// copied yet is read from the origin and written to the storage (bump allocation), then the
/// data is written. One reused buffer, a bitmap, no metadata.
pub struct Minimum {
    storage: Dev,
    chunk: u64,
    copied: Vec<bool>,
    buf: Vec<u8>,
    bump: u64,
}

impl Minimum {
    /// A fresh storage of `kind`, sized as the engine sizes its storage at create.
    pub fn new(env: &Env, kind: Kind, layout: &ChunkLayout) -> Result<Minimum> {
        let storage = env.storage(kind, 4 * GIB)?;
        storage.set_len(GIB)?;
        let chunk = layout.chunk_size_bytes();
        Ok(Minimum {
            storage,
            chunk,
            copied: vec![false; layout.chunk_count as usize],
            buf: vec![0u8; chunk as usize],
            bump: 0,
        })
    }

    pub fn run(&mut self, origin: &Dev, ops: &[Op], data: &[u8]) -> Result<f64> {
        let t = Instant::now();
        for op in ops {
            let first = op.off / self.chunk;
            let last = (op.off + op.len as u64 - 1) / self.chunk;
            for c in first..=last {
                if !self.copied[c as usize] {
                    origin.read_at(&mut self.buf, c * self.chunk)?;
                    self.storage.write_at(&self.buf, self.bump)?;
                    self.bump += self.chunk;
                    self.copied[c as usize] = true;
                }
            }
            origin.write_at(&data[..op.len], op.off)?;
        }
        Ok(t.elapsed().as_secs_f64())
    }
}

/// Per-batch samples (throughput in bytes/s, or seconds per chunk) and the ratios.
#[derive(Default)]
struct Samples {
    direct: Vec<f64>,
    pass: Vec<f64>,
    track: Vec<f64>,
    rewrite: Vec<f64>,
    /// Seconds per chunk copied.
    first: Vec<f64>,
    min: Vec<f64>,
    /// Throughput of the first-write batches (user bytes/s).
    first_rate: Vec<f64>,
    /// Paired per batch: tracking / pass-through throughput (for the noise figure).
    r_track: Vec<f64>,
    /// Per repetition the median of the paired per-batch ratios; geometric mean over the
    /// repetitions (throughput over pass-through; COW time over the minimum's).
    ratio_direct: f64,
    ratio_track: f64,
    ratio_rewrite: f64,
    ratio_cow: f64,
    /// Median first-write throughput over median pass-through throughput.
    ratio_first: f64,
}

/// Chunks a batch of first writes copies.
fn chunks_of(ops: &[Op], chunk: u64) -> u64 {
    ops.iter().map(|o| (o.off + o.len as u64 - 1) / chunk - o.off / chunk + 1).sum()
}

fn measure(env: &Env, kind: Kind, cfg: &Config, p: &Pattern) -> Result<Samples> {
    let params = Params::default();
    let layout = layout(&params, cfg.disk_bytes);
    // Two engine disks served from the same backend, so that every variant writes the same
    // memory (or page cache): A serves the direct calls, pass-through and tracking (the tracker
    // is attached and detached between batches) and is the minimum's origin; B holds the
    // snapshot (first writes, then — every chunk copied — rewrites). What B's writes do to A's
    // content and the reverse does not matter here.
    let shared = env.device(kind, cfg.disk_bytes)?;
    fill(&shared, 7)?;
    let mut ad = Rig::on(env, kind, shared.clone(), params)?;
    let mut bd = Rig::on(env, kind, shared, params)?;
    let data = Rng::new(9).bytes(MIB as usize);
    let mut s = Samples::default();
    let mut per_rep: [Vec<f64>; 4] = Default::default();
    for rep in 0..cfg.reps + usize::from(cfg.warmup) {
        let keep = !cfg.warmup || rep > 0;
        ad.detached()?;
        // First writes against the minimum: in pairs of batches, one each (different chunks, so
        // that neither reads what the other just cached), assignment and order alternating.
        bd.taken()?;
        let mut min = Minimum::new(env, kind, &layout)?;
        let mut r_cow = Vec::new();
        let batches: Vec<&[Op]> = p.first.chunks(p.first_batch).collect();
        for (j, pair) in batches.chunks_exact(2).enumerate() {
            let (fb, mb) = (pair[(j + rep) % 2], pair[(j + rep + 1) % 2]);
            let (tf, tm) = if j % 2 == 0 {
                let tf = run(&bd.engine, bd.dev, fb, &data)?;
                (tf, min.run(&ad.disk, mb, &data)?)
            } else {
                let tm = min.run(&ad.disk, mb, &data)?;
                (run(&bd.engine, bd.dev, fb, &data)?, tm)
            };
            let (nf, nm) = (
                chunks_of(fb, layout.chunk_size_bytes()),
                chunks_of(mb, layout.chunk_size_bytes()),
            );
            s.first.push(tf / nf as f64);
            s.min.push(tm / nm as f64);
            s.first_rate.push(bytes(fb) as f64 / tf);
            r_cow.push((tf / nf as f64) / (tm / nm as f64));
        }
        // The chunks the minimum had: copied now, untimed, for the rewrites.
        for op in sequential_1m(cfg.disk_bytes) {
            bd.engine.write(bd.dev, op.off, &data[..op.len])?;
        }
        assert_eq!(bd.engine.live().chunks as u64, layout.chunk_count, "every chunk copied");
        // Steady state: direct, pass-through, tracking, rewrite of copied chunks. In rounds of
        // four batches: each variant writes its own batch of the round (so none finds the
        // cache warmed by another's identical writes), the assignment and the order rotating
        // from round to round.
        let mut r: [Vec<f64>; 3] = Default::default();
        let batches: Vec<&[Op]> = p.steady.chunks(p.steady_batch).collect();
        for (k, round) in batches.chunks_exact(4).enumerate() {
            let mut t = [0.0; 4];
            for j in 0..4 {
                let v = (j + k) % 4;
                let batch = round[(v + k + rep) % 4];
                t[v] = match v {
                    0 => direct(&ad.disk, batch, &data)?,
                    1 => {
                        ad.detached()?;
                        run(&ad.engine, ad.dev, batch, &data)?
                    }
                    2 => {
                        ad.tracking()?;
                        run(&ad.engine, ad.dev, batch, &data)?
                    }
                    _ => run(&bd.engine, bd.dev, batch, &data)?,
                };
            }
            let b = bytes(round[0]) as f64;
            s.direct.push(b / t[0]);
            s.pass.push(b / t[1]);
            s.track.push(b / t[2]);
            s.rewrite.push(b / t[3]);
            r[0].push(t[1] / t[0]);
            r[1].push(t[1] / t[2]);
            r[2].push(t[1] / t[3]);
        }
        bd.drop_snapshot()?;
        if keep {
            per_rep[0].push(median(&r[0]));
            per_rep[1].push(median(&r[1]));
            per_rep[2].push(median(&r[2]));
            per_rep[3].push(median(&r_cow));
            s.r_track.extend(&r[1]);
        } else {
            // The warm-up's samples are dropped.
            s = Samples::default();
        }
    }
    s.ratio_direct = geomean(&per_rep[0]);
    s.ratio_track = geomean(&per_rep[1]);
    s.ratio_rewrite = geomean(&per_rep[2]);
    s.ratio_cow = geomean(&per_rep[3]);
    s.ratio_first = median(&s.first_rate) / median(&s.pass);
    Ok(s)
}

/// The same writes as plain backend calls.
fn direct(dev: &Dev, ops: &[Op], data: &[u8]) -> Result<f64> {
    let t = Instant::now();
    for op in ops {
        dev.write_at(&data[..op.len], op.off)?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// The geometric mean: the per-repetition ratios of a full rotation multiply the disks'
/// differences away.
pub fn geomean(v: &[f64]) -> f64 {
    (v.iter().map(|x| x.ln()).sum::<f64>() / v.len() as f64).exp()
}

/// Sections 1 and 2.
pub fn section(env: &Env, cfg: &Config, goals: &mut Goals) -> Result<Vec<Table>> {
    let layout = layout(&Params::default(), cfg.disk_bytes);
    let chunk = layout.chunk_size_bytes();
    let pats = patterns(cfg, &layout);
    let mut t1 = Table::new(
        format!(
            "1. Origin write throughput ({} disks, {} chunks; medians over the rounds of {} repetitions)",
            util::size(cfg.disk_bytes),
            util::size(chunk),
            cfg.reps
        ),
        &["workload", "state", "MemDev", "vs pass-through", "FileDev", "vs pass-through"],
    );
    let mut t2 = Table::new(
        format!(
            "2. First write: copy-on-write vs the physical minimum, per {} chunk copied",
            util::size(chunk)
        ),
        &[
            "workload",
            "MemDev COW",
            "MemDev minimum",
            "COW / minimum",
            "FileDev COW",
            "FileDev minimum",
            "COW / minimum",
        ],
    );
    for p in &pats {
        let mut per_kind = Vec::new();
        for kind in Kind::ALL {
            crate::progress(&format!("writes: {} on {}", p.name, kind.name()));
            per_kind.push(measure(env, kind, cfg, p)?);
        }
        type Get = fn(&Samples) -> (&Vec<f64>, f64);
        let rows: [(&str, Get); 5] = [
            ("backend call, no engine", |s| (&s.direct, s.ratio_direct)),
            ("pass-through (no tracker)", |s| (&s.pass, 1.0)),
            ("tracking (CBT only)", |s| (&s.track, s.ratio_track)),
            ("snapshot, first write (COW)", |s| (&s.first_rate, s.ratio_first)),
            ("snapshot, rewrite of copied chunks", |s| (&s.rewrite, s.ratio_rewrite)),
        ];
        for (label, get) in rows {
            let mut cells = vec![p.name.to_string(), label.to_string()];
            for (kind, s) in Kind::ALL.iter().zip(&per_kind) {
                let (rates, r) = get(s);
                cells.push(rate(median(rates) as u64, 1.0));
                cells.push(ratio(r));
                let goal = match label {
                    l if l.starts_with("tracking") => Some(("tracking ≥ 0.98× pass-through", 0.98)),
                    l if l.contains("rewrite") => {
                        Some(("rewrite of copied chunks ≥ 0.95× pass-through", 0.95))
                    }
                    _ => None,
                };
                if let Some((what, min)) = goal {
                    goals.add(format!("{what} ({})", p.name), *kind, ratio(r), r >= min);
                }
            }
            t1.row(cells);
        }
        let mut cells = vec![p.name.to_string()];
        for (kind, s) in Kind::ALL.iter().zip(&per_kind) {
            let r = s.ratio_cow;
            cells.push(util::dur(median(&s.first)));
            cells.push(util::dur(median(&s.min)));
            cells.push(ratio(r));
            goals.add(
                format!("first-write COW ≤ 1.25× the minimum ({})", p.name),
                *kind,
                ratio(r),
                r <= 1.25,
            );
        }
        t2.row(cells);
        let noise: Vec<String> = Kind::ALL
            .iter()
            .zip(&per_kind)
            .map(|(k, s)| format!("{} {:.0} %", k.name(), 100.0 * util::iqr(&s.r_track)))
            .collect();
        t1.note(format!(
            "* {}: {} measured rounds of one batch of {} writes per state; interquartile range \
             of the per-round tracking/pass-through ratio: {}.",
            p.name,
            per_kind[0].r_track.len(),
            p.steady_batch,
            noise.join(", ")
        ));
    }
    t1.note(format!(
        "* 4 KiB random: {} writes at random 4 KiB blocks for pass-through, tracking and rewrite; \
         the first-write row is one 4 KiB write into each chunk, chunks in random order (each \
         copies a whole {} chunk). 1 MiB sequential: the whole disk. Two engine disks share one \
         backend (same memory or page cache): backend call, pass-through and tracking run on \
         the first (the tracker attached and detached between batches), the snapshot on the \
         second. The states are \
         timed in rounds of one batch each (distinct offsets: none re-writes lines another \
         just cached), order and offsets rotating from round to round. A ratio is the median of \
         the per-round ratios (throughput over pass-through in the same round) of each \
         repetition, geometric mean over the repetitions. First write vs pass-through: ratio of the median \
         throughputs.",
        cfg.rand_ops,
        util::size(chunk)
    ));
    t2.note(
        "* Minimum: for each write, read every untouched chunk it covers from the origin, write \
         it to a fresh storage of the same kind (sized as the engine sizes it), write the data — \
         the same calls on the same backends, one reused buffer, no metadata. Batches of 8 \
         chunks, in pairs: one for the engine, one for the minimum (different chunks of the \
         same backend), assignment and order alternating; the ratio is the median of the \
         per-pair ratios (time per chunk) per repetition, geometric mean over the repetitions."
            .to_string(),
    );
    Ok(vec![t1, t2])
}
