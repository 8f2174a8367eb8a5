//! Section 7: scaling with 1, 2 and 4 writer threads (std threads, one engine), on distinct and
//! on shared chunks.

use std::sync::Barrier;
use std::time::Instant;

use blksnap_engine::Engine;
use blksnap_model::{DeviceId, Params, Result};

use crate::setup::{layout, Env, Kind, Rig};
use crate::util::{self, median, Rng, Table, KIB, MIB};
use crate::writes::{geomean, one_per_chunk, random_4k, sequential_1m, Op};
use crate::{Config, Goals};

pub const THREADS: [usize; 3] = [1, 2, 4];

/// Slices of one job: the thread counts alternate slice by slice.
const SLICES: usize = 6;

/// Runs one op list per thread, all released at once by a barrier; the wall time from the first
/// thread's start to the last thread's end (each thread reads the clock itself, so a
/// descheduled main thread cannot shorten the measurement).
fn run(engine: &Engine, dev: DeviceId, jobs: &[Vec<Op>], data: &[u8]) -> Result<f64> {
    let barrier = Barrier::new(jobs.len());
    let spans = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|ops| {
                let barrier = &barrier;
                s.spawn(move || -> Result<(Instant, Instant)> {
                    barrier.wait();
                    let start = Instant::now();
                    for op in ops {
                        engine.write(dev, op.off, &data[..op.len])?;
                    }
                    Ok((start, Instant::now()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("writer thread panicked"))
            .collect::<Result<Vec<_>>>()
    })?;
    let start = spans.iter().map(|s| s.0).min().expect("at least one thread");
    let end = spans.iter().map(|s| s.1).max().expect("at least one thread");
    Ok((end - start).as_secs_f64())
}

#[derive(Clone, Copy, PartialEq)]
enum State {
    Pass,
    Rewrite,
    First,
}

#[derive(Clone, Copy, PartialEq)]
enum Sharing {
    Distinct,
    Shared,
}

const CASES: [(State, Sharing); 6] = [
    (State::Pass, Sharing::Distinct),
    (State::Pass, Sharing::Shared),
    (State::Rewrite, Sharing::Distinct),
    (State::Rewrite, Sharing::Shared),
    (State::First, Sharing::Distinct),
    (State::First, Sharing::Shared),
];

/// Op lists per thread for one slice. Steady (pass-through, rewrite): `ops` random 4 KiB writes
/// in total; distinct = thread i writes in the i-th of `n` equal regions, shared = every thread
/// writes in the same 8 chunks. First write: one 4 KiB write into each chunk of `chunks`;
/// distinct = the chunks dealt round-robin, shared = every thread walks all of them in the same
/// order (each chunk is copied once, by whoever gets its permit first; the others wait).
fn jobs(
    cfg: &Config,
    rng: &mut Rng,
    state: State,
    sharing: Sharing,
    n: usize,
    ops: usize,
    chunks: &[u64],
) -> Vec<Vec<Op>> {
    let layout = layout(&Params::default(), cfg.disk_bytes);
    let chunk = layout.chunk_size_bytes();
    match (state, sharing) {
        (State::First, Sharing::Distinct) => (0..n)
            .map(|i| {
                let mine: Vec<u64> = chunks.iter().copied().skip(i).step_by(n).collect();
                one_per_chunk(rng, &mine, &layout)
            })
            .collect(),
        (State::First, Sharing::Shared) => (0..n)
            .map(|i| {
                chunks
                    .iter()
                    .map(|&c| Op { off: c * chunk + i as u64 * 4 * KIB, len: 4096 })
                    .collect()
            })
            .collect(),
        (_, Sharing::Distinct) => {
            let region = cfg.disk_bytes / n as u64;
            (0..n)
                .map(|i| {
                    let from = i as u64 * region;
                    random_4k(rng, ops / n, from, from + region)
                })
                .collect()
        }
        (_, Sharing::Shared) => (0..n).map(|_| random_4k(rng, ops / n, 0, 8 * chunk)).collect(),
    }
}

/// Per case and thread count: slice times; per case and thread count > 1: per-repetition
/// medians of the per-slice speedups.
struct Samples {
    times: Vec<Vec<Vec<f64>>>,
    speedups: Vec<Vec<Vec<f64>>>,
}

fn measure(env: &Env, kind: Kind, cfg: &Config) -> Result<Samples> {
    let layout = layout(&Params::default(), cfg.disk_bytes);
    let data = Rng::new(13).bytes(MIB as usize);
    let mut rig = Rig::new(env, kind, cfg.disk_bytes, Params::default())?;
    let mut s = Samples {
        times: vec![vec![Vec::new(); THREADS.len()]; CASES.len()],
        speedups: vec![vec![Vec::new(); THREADS.len()]; CASES.len()],
    };
    let slice_ops = cfg.rand_ops / 2;
    for rep in 0..cfg.reps + usize::from(cfg.warmup) {
        let keep = !cfg.warmup || rep > 0;
        let mut rng = Rng::new(100 + rep as u64);
        for (ci, &(state, sharing)) in CASES.iter().enumerate() {
            match state {
                State::Pass => rig.detached()?,
                State::Rewrite => {
                    rig.taken()?;
                    for op in sequential_1m(cfg.disk_bytes) {
                        rig.engine.write(rig.dev, op.off, &data[..op.len])?;
                    }
                }
                State::First => {
                    rig.taken()?;
                }
            }
            // First writes: every (slice, thread count) gets its own New chunks.
            let mut chunks: Vec<u64> = (0..layout.chunk_count).collect();
            rng.shuffle(&mut chunks);
            let groups: Vec<&[u64]> =
                chunks.chunks(chunks.len() / (SLICES * THREADS.len())).collect();
            let mut per_slice = vec![Vec::new(); THREADS.len()];
            for slice in 0..SLICES {
                let mut t = [0.0; 3];
                for k in 0..THREADS.len() {
                    let ti = (k + slice + rep) % THREADS.len();
                    let group = groups[slice * THREADS.len() + ti];
                    let jobs = jobs(cfg, &mut rng, state, sharing, THREADS[ti], slice_ops, group);
                    t[ti] = run(&rig.engine, rig.dev, &jobs, &data)?;
                }
                for (ti, speedups) in per_slice.iter_mut().enumerate() {
                    speedups.push(t[0] / t[ti]);
                    if keep {
                        s.times[ci][ti].push(t[ti]);
                    }
                }
            }
            if keep {
                for (out, slices) in s.speedups[ci].iter_mut().zip(&per_slice) {
                    out.push(median(slices));
                }
            }
        }
    }
    rig.drop_snapshot()?;
    Ok(s)
}

pub fn section(env: &Env, cfg: &Config, _goals: &mut Goals) -> Result<Table> {
    let layout = layout(&Params::default(), cfg.disk_bytes);
    let mut t = Table::new(
        format!(
            "7. Writer threads: time of one slice of work and speedup over 1 thread ({} cores; medians)",
            crate::nproc(),
        ),
        &["backend", "state", "chunks", "1 thread", "2 threads", "4 threads", "speedup 2 / 4"],
    );
    let slice_ops = cfg.rand_ops / 2;
    let first_chunks = layout.chunk_count as usize / (SLICES * THREADS.len());
    for kind in Kind::ALL {
        crate::progress(&format!("threads on {}", kind.name()));
        let s = measure(env, kind, cfg)?;
        for (ci, &(state, sharing)) in CASES.iter().enumerate() {
            let m: Vec<f64> = s.times[ci].iter().map(|v| median(v)).collect();
            let sp: Vec<f64> = s.speedups[ci].iter().map(|v| geomean(v)).collect();
            t.row(vec![
                kind.name().to_string(),
                match state {
                    State::Pass => format!("pass-through, {slice_ops} × 4 KiB random"),
                    State::Rewrite => {
                        format!("rewrite of copied chunks, {slice_ops} × 4 KiB random")
                    }
                    State::First => {
                        format!("first write, 4 KiB into each of {first_chunks} chunks")
                    }
                },
                match sharing {
                    Sharing::Distinct => "distinct".to_string(),
                    Sharing::Shared => "shared".to_string(),
                },
                util::dur(m[0]),
                util::dur(m[1]),
                util::dur(m[2]),
                format!("{:.2}× / {:.2}×", sp[1], sp[2]),
            ]);
        }
    }
    t.note(format!(
        "* One slice of work is split among the threads. Distinct: each thread writes its own \
         region (steady) or its own share of the chunks (first write). Shared: steady writes \
         all land in the same 8 chunks (2 MiB); first writes walk the same chunks in the same \
         order in every thread, each writing its own 4 KiB block, so each copy is done once and \
         the other threads wait on its permit (shared first-write slices write n × as many \
         bytes). The thread counts alternate slice by slice ({SLICES} slices per repetition); \
         speedup = median per-slice ratio of each repetition, geometric mean over the \
         repetitions. With 2 cores, 4 threads cannot beat 2, and other jobs share the cores."
    ));
    Ok(t)
}
