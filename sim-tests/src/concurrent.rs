//! The concurrent mode of the simulation: the seeded workload split over several threads.
//!
//! A run starts like the sequential simulation: the lifecycle prefix and `prefix_steps` steps,
//! each applied to the engine and the model in lockstep and checked by the oracle ([`Sim`]).
//! Then come `rounds` concurrent rounds. In each, the generator draws `threads x ops_per_thread`
//! operations (everything the sequential workload does except configuration: faults, parameters,
//! the clock, and storage appends), each thread applies its share to the engine alone, and the
//! round is then checked against the model:
//!
//! * **linearizability**: an interleaving of the per-thread histories (each thread's order kept)
//!   must exist in which the model, applying the same operations one at a time, returns what the
//!   engine returned to every operation — errors by errno, data by content (so every image read
//!   shows the content at take plus image writes, every error comes in the model's precedence,
//!   every event popped is the one the model pops, in order);
//! * **the state afterwards**: in that interleaving, the model's whole observable state equals
//!   the engine's — CBT info and both maps' visible values of every disk (every block written since
//!   the take is marked), snapshot info (one first error per device), images and origins byte for
//!   byte, storage accounting, the snapshot list.
//!
//! The search tries interleavings depth-first (a model clone per step) and stops at the first
//! that fits; the model of that interleaving becomes the harness's model for the next round. At
//! the end every event queue is drained on both sides and compared (none lost, one `Corrupted`
//! per device, as in the model), every snapshot is destroyed and nothing may stay alive.
//!
//! Rounds start with no injected fault pending: one armed in the prefix that has not fired yet is
//! withdrawn on both sides (and counted). Under concurrency, which operation's I/O meets a fault
//! first is decided below the operations, and an operation whose first copy succeeded before
//! another's failed leaves accounting no sequential order gives; faults racing concurrent I/O are
//! checked by the shuttle scenarios instead, whose oracle allows either assignment.
//!
//! Threads come from the engine's sync facade: real threads in an ordinary build, shuttle's
//! (every schedule a different interleaving, replayable) with `--cfg blksnap_shuttle`
//! (`tests/concurrent_sim.rs`).

use blksnap_engine::sync::{thread, StdArc};
use blksnap_engine::Engine;
use blksnap_model::{DeviceId, Errno, Model, SnapshotId, SECTOR_SIZE_BYTES};

use crate::sim::{Sim, SimConfig};
use crate::{data_of, fnv1a, zeroes_of, Harness, IoLog, Op};

/// What a concurrent run does.
#[derive(Clone, Copy, Debug)]
pub struct ConcurrentConfig {
    /// The seed (disks, workload, ids), as for the sequential simulation.
    pub seed: u64,
    /// Sequential steps before the first round.
    pub prefix_steps: u64,
    /// Concurrent rounds.
    pub rounds: u32,
    /// Threads per round (2–4).
    pub threads: usize,
    /// Operations per thread and round (1–4): the search visits at most
    /// `(threads * ops)! / (ops!)^threads` interleavings.
    pub ops_per_thread: usize,
}

/// What a concurrent run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConcurrentReport {
    /// Rounds run concurrently and checked.
    pub rounds_run: u32,
    /// Rounds before which a pending injected fault was withdrawn (on both sides).
    pub faults_withdrawn: u32,
    /// Operations applied concurrently.
    pub ops: u64,
    /// Model steps the linearization search took (all rounds).
    pub search_steps: u64,
}

/// One result as compared: the value (long ones by digest) or the errno.
type Observed = std::result::Result<String, Errno>;

fn observe<T: std::fmt::Debug>(r: blksnap_model::Result<T>) -> Observed {
    r.map(|v| digest(&format!("{v:?}"))).map_err(|e| e.errno)
}

fn observe_bytes(r: blksnap_model::Result<Vec<u8>>) -> Observed {
    r.map(|v| format!("{} bytes #{:016x}", v.len(), fnv1a(&v))).map_err(|e| e.errno)
}

fn digest(text: &str) -> String {
    if text.len() > 96 {
        format!("#{:016x}", fnv1a(text.as_bytes()))
    } else {
        text.to_string()
    }
}

/// An operation with its snapshot reference resolved at the start of the round (both sides then
/// name the same snapshot whatever the interleaving creates meanwhile).
#[derive(Clone, Debug)]
struct RoundOp {
    op: Op,
    snap: SnapshotId,
}

/// What the engine side of a round needs, shareable with its threads.
#[derive(Clone)]
struct EngineSide {
    engine: StdArc<Engine>,
    disks: Vec<DeviceId>,
    storage_plan: blksnap_engine::sync::Arc<blksnap_engine::io::FaultPlan>,
    io_log: StdArc<IoLog>,
}

impl EngineSide {
    /// The result, and the id of a snapshot this operation created.
    fn apply(&self, r: &RoundOp) -> (Observed, Option<SnapshotId>) {
        if let Op::Create { storage } = r.op {
            let spec = Harness::engine_storage(storage, &self.storage_plan, &self.io_log);
            let created = self.engine.snapshot_create(spec);
            return (observe(created), created.ok());
        }
        (self.apply_other(r), None)
    }

    fn apply_other(&self, r: &RoundOp) -> Observed {
        let e = &self.engine;
        let disk = |i: usize| self.disks[i % self.disks.len()];
        let s = r.snap;
        match r.op.clone() {
            Op::Attach { disk: d } => observe(e.attach(disk(d))),
            Op::Detach { disk: d } => observe(e.detach(disk(d))),
            Op::CbtInfo { disk: d } => observe(e.cbt_info(disk(d))),
            Op::CbtMap { disk: d, offset, length } => {
                let mut buf = Vec::new();
                observe_bytes(e.cbt_map(disk(d), offset, length, &mut buf).map(|()| buf))
            }
            Op::CbtDirty { disk: d, ranges } => observe(e.cbt_dirty(disk(d), &ranges)),
            Op::Destroy { .. } => observe(e.snapshot_destroy(s)),
            Op::Add { disk: d, .. } => observe(e.snapshot_add(s, disk(d))),
            Op::Take { .. } => observe(e.snapshot_take(s)),
            Op::Collect => observe(Ok(e.snapshot_collect())),
            Op::Info { disk: d } => observe(e.snapshot_info(disk(d))),
            Op::WaitEvent { timeout_ms, .. } => observe(e.wait_event(s, timeout_ms)),
            Op::Read { disk: d, sector, sectors } => {
                let mut buf = vec![0u8; (sectors * SECTOR_SIZE_BYTES) as usize];
                observe_bytes(e.read(disk(d), sector * SECTOR_SIZE_BYTES, &mut buf).map(|()| buf))
            }
            Op::Write { disk: d, sector, sectors, seed } => {
                let data = data_of(sectors, seed);
                observe(crate::engine_write(e, disk(d), sector * SECTOR_SIZE_BYTES, &data, seed))
            }
            Op::Discard { disk: d, sector, sectors } => {
                observe(e.discard(disk(d), sector * SECTOR_SIZE_BYTES, sectors * SECTOR_SIZE_BYTES))
            }
            Op::WriteZeroes { disk: d, sector, sectors } => observe(e.write_zeroes(
                disk(d),
                sector * SECTOR_SIZE_BYTES,
                sectors * SECTOR_SIZE_BYTES,
            )),
            Op::ImageRead { disk: d, sector, sectors } => {
                let mut buf = vec![0u8; (sectors * SECTOR_SIZE_BYTES) as usize];
                let r = e.image_read(disk(d), sector * SECTOR_SIZE_BYTES, &mut buf);
                observe_bytes(r.map(|()| buf))
            }
            Op::ImageWrite { disk: d, sector, sectors, seed } => {
                observe(e.image_write(disk(d), sector * SECTOR_SIZE_BYTES, &data_of(sectors, seed)))
            }
            Op::ImageWriteZeroes { disk: d, sector, sectors } => observe(e.image_write_zeroes(
                disk(d),
                sector * SECTOR_SIZE_BYTES,
                sectors * SECTOR_SIZE_BYTES,
            )),
            other => unreachable!("not a concurrent operation: {other:?}"),
        }
    }

    /// Each disk's capacity in bytes.
    fn capacities(&self) -> Vec<u64> {
        self.disks.iter().map(|d| self.engine.disk_capacity_bytes(*d).unwrap_or(0)).collect()
    }

    /// Everything observable, for the comparison after a round.
    fn state(&self, ids: &[SnapshotId]) -> Vec<Observed> {
        let e = &self.engine;
        let mut out = Vec::new();
        for (&d, len) in self.disks.iter().zip(self.capacities()) {
            out.push(observe(e.cbt_info(d)));
            let count = e.cbt_info(d).map_or(0, |i| i.block_count);
            let mut map = Vec::new();
            out.push(observe_bytes(e.cbt_map(d, 0, count, &mut map).map(|()| map)));
            out.push(observe(e.snapshot_info(d)));
            let mut buf = vec![0u8; len as usize];
            out.push(observe_bytes(e.image_read(d, 0, &mut buf).map(|()| buf.clone())));
            out.push(observe_bytes(e.read(d, 0, &mut buf).map(|()| buf)));
        }
        out.push(observe(Ok(e.snapshot_collect())));
        out.extend(ids.iter().map(|id| observe(e.storage_stats(*id))));
        out
    }
}

fn model_apply(m: &mut Model, disks: &[DeviceId], r: &RoundOp) -> Observed {
    let disk = |i: usize| disks[i % disks.len()];
    let s = r.snap;
    match r.op.clone() {
        Op::Attach { disk: d } => observe(m.attach(disk(d))),
        Op::Detach { disk: d } => observe(m.detach(disk(d))),
        Op::CbtInfo { disk: d } => observe(m.cbt_info(disk(d))),
        Op::CbtMap { disk: d, offset, length } => observe_bytes(m.cbt_map(disk(d), offset, length)),
        Op::CbtDirty { disk: d, ranges } => observe(m.cbt_dirty(disk(d), &ranges)),
        Op::Create { storage } => {
            let (mode, initial) = Harness::model_storage(storage);
            observe(m.snapshot_create(mode, initial))
        }
        Op::Destroy { .. } => observe(m.snapshot_destroy(s)),
        Op::Add { disk: d, .. } => observe(m.snapshot_add(s, disk(d))),
        Op::Take { .. } => observe(m.snapshot_take(s)),
        Op::Collect => observe(Ok(m.snapshot_collect())),
        Op::Info { disk: d } => observe(m.snapshot_info(disk(d))),
        Op::WaitEvent { timeout_ms, .. } => observe(m.wait_event(s, timeout_ms)),
        Op::Read { disk: d, sector, sectors } => {
            observe_bytes(m.read(disk(d), sector * SECTOR_SIZE_BYTES, sectors * SECTOR_SIZE_BYTES))
        }
        Op::Write { disk: d, sector, sectors, seed } => {
            observe(m.write(disk(d), sector * SECTOR_SIZE_BYTES, &data_of(sectors, seed)))
        }
        Op::Discard { disk: d, sector, sectors } => {
            observe(m.discard(disk(d), sector * SECTOR_SIZE_BYTES, sectors * SECTOR_SIZE_BYTES))
        }
        Op::WriteZeroes { disk: d, sector, sectors } => observe(m.write_zeroes(
            disk(d),
            sector * SECTOR_SIZE_BYTES,
            sectors * SECTOR_SIZE_BYTES,
        )),
        Op::ImageRead { disk: d, sector, sectors } => observe_bytes(m.image_read(
            disk(d),
            sector * SECTOR_SIZE_BYTES,
            sectors * SECTOR_SIZE_BYTES,
        )),
        Op::ImageWrite { disk: d, sector, sectors, seed } => {
            observe(m.image_write(disk(d), sector * SECTOR_SIZE_BYTES, &data_of(sectors, seed)))
        }
        Op::ImageWriteZeroes { disk: d, sector, sectors } => {
            observe(m.image_write(disk(d), sector * SECTOR_SIZE_BYTES, &zeroes_of(sectors)))
        }
        other => unreachable!("not a concurrent operation: {other:?}"),
    }
}

fn model_state(
    m: &Model,
    disks: &[DeviceId],
    capacities: &[u64],
    ids: &[SnapshotId],
) -> Vec<Observed> {
    // Reads may consult the (empty) fault queues: a scratch copy keeps the model as it is.
    let mut m = m.clone();
    let mut out = Vec::new();
    for (&d, &len) in disks.iter().zip(capacities) {
        out.push(observe(m.cbt_info(d)));
        let count = m.cbt_info(d).map_or(0, |i| i.block_count);
        out.push(observe_bytes(m.cbt_map(d, 0, count)));
        out.push(observe(m.snapshot_info(d)));
        out.push(observe_bytes(m.image_read(d, 0, len)));
        out.push(observe_bytes(m.read(d, 0, len)));
    }
    out.push(observe(Ok(m.snapshot_collect())));
    out.extend(ids.iter().map(|id| observe(m.storage_stats(*id))));
    out
}

/// One thread's operations and what the engine returned to each.
type History = Vec<(RoundOp, Observed)>;

/// A thread's results with the ids of the snapshots it created.
type ThreadRun = (History, Vec<SnapshotId>);

/// Depth-first search for an interleaving of `histories` the model reproduces, ending in
/// `target` state; returns the model after it and the created ids in their order.
struct Search<'a> {
    histories: &'a [History],
    disks: &'a [DeviceId],
    capacities: &'a [u64],
    ids: &'a [SnapshotId],
    target: &'a [Observed],
    steps: u64,
}

impl Search<'_> {
    fn run(&mut self, m: &Model, next: &mut Vec<usize>) -> Option<Model> {
        if next.iter().zip(self.histories).all(|(n, h)| *n == h.len()) {
            let state = model_state(m, self.disks, self.capacities, self.ids);
            return (state == self.target).then(|| m.clone());
        }
        for t in 0..self.histories.len() {
            let Some((op, got)) = self.histories[t].get(next[t]) else { continue };
            let mut m2 = m.clone();
            self.steps += 1;
            if &model_apply(&mut m2, self.disks, op) != got {
                continue;
            }
            next[t] += 1;
            let found = self.run(&m2, next);
            next[t] -= 1;
            if found.is_some() {
                return found;
            }
        }
        None
    }
}

/// Run `config`: the sequential prefix, the rounds, the drain and the teardown. Any mismatch is
/// an `Err` with the round, the per-thread histories and what the engine's state was.
pub fn run(config: &ConcurrentConfig) -> Result<ConcurrentReport, String> {
    assert!((2..=4).contains(&config.threads), "2-4 threads");
    assert!((1..=4).contains(&config.ops_per_thread), "1-4 operations per thread");
    let sim_config = SimConfig { seed: config.seed, steps: 0, devices: None };
    let mut sim = Sim::new(sim_config, None);
    sim.run_steps(config.prefix_steps).map_err(|e| format!("sequential prefix: {e}"))?;
    let mut report = ConcurrentReport::default();
    for round in 0..config.rounds {
        let h = &mut sim.c.h;
        if h.faults_pending() > 0 || h.model.pending_faults() > 0 {
            h.clear_faults();
            report.faults_withdrawn += 1;
        }
        let histories = round_ops(&mut sim, config);
        let h = &mut sim.c.h;
        let side = EngineSide {
            engine: h.engine.clone(),
            disks: h.disks.clone(),
            storage_plan: h.storage_plan.clone(),
            io_log: h.io_log.clone(),
        };
        let runs = run_round(&side, histories);
        let created: Vec<SnapshotId> = runs.iter().flat_map(|(_, c)| c.iter().copied()).collect();
        let histories: Vec<History> = runs.into_iter().map(|(h, _)| h).collect();
        report.rounds_run += 1;
        report.ops += histories.iter().map(|h| h.len() as u64).sum::<u64>();
        // The ids to compare accounting for: every one known before, and every one created.
        let mut ids = h.snapshots.clone();
        ids.extend(created.iter().copied());
        let target = side.state(&ids);
        let capacities = side.capacities();
        let mut search = Search {
            histories: &histories,
            disks: &h.disks,
            capacities: &capacities,
            ids: &ids,
            target: &target,
            steps: 0,
        };
        let found = search.run(&h.model, &mut vec![0; histories.len()]);
        report.search_steps += search.steps;
        let Some(model) = found else {
            return Err(format!(
                "seed {} round {round}: no interleaving of the threads' histories is a \
                 sequential run of the model (results and final state)\n histories: \
                 {histories:#?}\n engine state: {target:?}",
                config.seed
            ));
        };
        h.model = model;
        // Ids in creation order (the model's list keeps it for the alive ones).
        let order = h.model.snapshot_collect();
        let mut created = created;
        created.sort_by_key(|id| order.iter().position(|o| o == id).unwrap_or(usize::MAX));
        h.snapshots.extend(created.iter().copied());
        h.check_state().map_err(|e| format!("seed {} round {round}: {e}", config.seed))?;
        for id in created {
            sim.c.adopt_created(id);
        }
    }
    drain_and_teardown(&mut sim.c.h).map_err(|e| format!("seed {} end: {e}", config.seed))?;
    Ok(report)
}

/// Draws the round's operations, resolving snapshot references now.
fn round_ops(sim: &mut Sim, config: &ConcurrentConfig) -> Vec<Vec<RoundOp>> {
    let focus = sim.round_focus();
    (0..config.threads)
        .map(|_| {
            (0..config.ops_per_thread)
                .map(|_| {
                    let op = sim.concurrent_op(focus);
                    let snap = match &op {
                        Op::Destroy { snap }
                        | Op::Add { snap, .. }
                        | Op::Take { snap }
                        | Op::WaitEvent { snap, .. } => sim.c.h.snap(*snap),
                        _ => SnapshotId::default(),
                    };
                    RoundOp { op, snap }
                })
                .collect()
        })
        .collect()
}

/// Runs each thread's operations on the engine (the first list on this thread).
fn run_round(side: &EngineSide, mut ops: Vec<Vec<RoundOp>>) -> Vec<ThreadRun> {
    fn run_list(side: &EngineSide, list: Vec<RoundOp>) -> ThreadRun {
        let mut created = Vec::new();
        let history = list
            .into_iter()
            .map(|r| {
                let (got, id) = side.apply(&r);
                created.extend(id);
                (r, got)
            })
            .collect();
        (history, created)
    }
    let mine = ops.remove(0);
    let others: Vec<_> = ops
        .into_iter()
        .map(|list| {
            let side = side.clone();
            thread::spawn(move || run_list(&side, list))
        })
        .collect();
    let mut runs = vec![run_list(side, mine)];
    runs.extend(others.into_iter().map(|t| t.join().expect("a round thread panicked")));
    runs
}

/// Every event queue drained on both sides (same events, in order), then the teardown.
fn drain_and_teardown(h: &mut Harness) -> Result<(), String> {
    for id in h.model.snapshot_collect() {
        for _ in 0..=blksnap_model::limits::EVENT_QUEUE_CAPACITY {
            let m = h.model.wait_event(id, 0);
            let e = h.engine.wait_event(id, 0);
            let (m, e) = (observe(m), observe(e));
            if m != e {
                return Err(format!("events of {id}: model {m:?} vs engine {e:?}"));
            }
            if m.is_err() {
                break;
            }
        }
    }
    h.teardown()
}
