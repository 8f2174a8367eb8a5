//! The seeded deterministic simulation (`blksnap-sim`) and the fault sweep.
//!
//! One `u64` seed drives a small PRNG ([`Rng`], splitmix64) that chooses the disks and a workload
//! over them: a lifecycle prefix (attach, create, add, append, take), then weighted random
//! operations — origin writes, discards, write-zeroes and reads, image reads and writes, waits,
//! takes, destroys, storage appends, parameter changes and faults (EIO/ENOSPC on chosen I/Os of
//! origins and storage, growth failures, torn writes) — with a lifecycle driver that keeps taken
//! snapshots around long enough to fill and overflow their storage.
//!
//! [`Checker`] applies each operation through the [`Harness`] (engine vs model, every result,
//! then the whole observable state) and then checks what the comparison cannot see, against its
//! own oracle (the device bytes below the fault layer, a frozen copy of each image):
//! * an origin write that returned Ok left exactly its data; one that failed left a prefix of it
//!   (a torn write) and the old data after it: never silent loss;
//! * origin reads return the device bytes; image reads return the frozen copy plus image writes
//!   (a failed image write may have landed per sector, either version is accepted);
//! * storage accounting: filled ≤ max(capacity, requested), filled and capacity never shrink,
//!   overflow is terminal;
//! * a diff-area error never changes once set (first error wins);
//! * events: FIFO with non-decreasing times no later than the clock, at most one `Corrupted` per
//!   device per snapshot and it carries the device's error, none lost (drained at the end);
//! * CBT: read-map values never decrease between takes; each take switches once
//!   (`changes_number` + 1, 255 → new generation and numbering from 1); every block written since
//!   the previous take (origin, image, cbtdirty) has the new number after a non-wrapping take;
//! * live objects: one snapshot and one storage per alive snapshot, one tracker per attached
//!   disk, one diff area per member of a taken snapshot, chunks within the chunk counts; and zero
//!   of everything after the teardown.
//!
//! Every step prints one trace line (`step op -> result`); the trace's FNV hash is the run's
//! fingerprint (`--check-determinism` compares two runs).
//!
//! [`sweep`] runs a fixed workload once to number the engine's I/Os, then once per I/O with that
//! I/O failing (EIO; and torn, for writes) on both sides, under the same checks.

mod checker;
mod sweep;

pub use checker::{Checker, Injection};
pub use sweep::*;

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::io::Write;
use std::time::Instant;

use blksnap_model::{DeviceId, Errno, EventKind, IoKind, SectorRange, SnapshotId};

use crate::{DiskSetup, IoTotals, Op, StorageKind, APPEND_BACKENDS, APPEND_BACKEND_SECTORS};

/// Trace lines kept for a failure report.
pub const TRACE_TAIL: usize = 20;

// ---- PRNG ---------------------------------------------------------------------------------------

/// splitmix64: tiny, fast, and the whole state is the seed.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// One element of a non-empty slice.
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }

    /// An index drawn with the given weights (not all zero).
    pub fn weighted(&mut self, weights: &[u64]) -> usize {
        let mut x = self.below(weights.iter().sum());
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        unreachable!("x < sum of weights")
    }
}

// ---- statistics ---------------------------------------------------------------------------------

/// What a run did, for the report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Operations by kind: (succeeded, failed).
    pub ops: BTreeMap<&'static str, (u64, u64)>,
    /// Bytes written to origins by successful writes (discard and write-zeroes included).
    pub origin_bytes_written: u64,
    /// Bytes read from origins by successful reads.
    pub origin_bytes_read: u64,
    /// Bytes written to images by successful image writes.
    pub image_bytes_written: u64,
    /// Bytes read from images by successful image reads.
    pub image_bytes_read: u64,
    /// Snapshots created.
    pub snapshots_created: u64,
    /// Snapshots taken.
    pub snapshots_taken: u64,
    /// Snapshots destroyed (the teardown's not included).
    pub snapshots_destroyed: u64,
    /// Most snapshots alive at once.
    pub max_alive: usize,
    /// Events popped, by kind.
    pub events: BTreeMap<&'static str, u64>,
    /// Faults armed, by kind.
    pub faults_armed: BTreeMap<String, u64>,
    /// Storages seen overflowing.
    pub overflows: u64,
    /// Diff areas seen corrupted.
    pub corruptions: u64,
    /// Origin writes that failed after a torn prefix landed (prefix checked).
    pub torn_origin_writes: u64,
    /// Takes whose CBT switch was checked, and of them the ones that wrapped.
    pub cbt_switches: (u64, u64),
    /// Invariant checks of the checker's own (model comparisons are counted by the harness).
    pub invariant_checks: u64,
    /// Steps that ended with a working image (a taken snapshot with a healthy diff area).
    pub steps_with_live_image: u64,
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Attach { .. } => "attach",
        Op::Detach { .. } => "detach",
        Op::CbtInfo { .. } => "cbt_info",
        Op::CbtMap { .. } => "cbt_map",
        Op::CbtDirty { .. } => "cbt_dirty",
        Op::Create { .. } => "create",
        Op::Destroy { .. } => "destroy",
        Op::Append { .. } => "append_storage",
        Op::Add { .. } => "add",
        Op::Take { .. } => "take",
        Op::Collect => "collect",
        Op::Info { .. } => "snapshot_info",
        Op::WaitEvent { .. } => "wait_event",
        Op::Read { .. } => "read",
        Op::Write { .. } => "write",
        Op::Discard { .. } => "discard",
        Op::WriteZeroes { .. } => "write_zeroes",
        Op::ImageRead { .. } => "image_read",
        Op::ImageWrite { .. } => "image_write",
        Op::ImageWriteZeroes { .. } => "image_write_zeroes",
        Op::Fault { .. } => "fault",
        Op::TornFault { .. } => "torn_fault",
        Op::FailGrowth { .. } => "fail_growth",
        Op::SetStorageMinimum { .. } => "set_storage_minimum",
        Op::SetShifts { .. } => "set_shifts",
        Op::AdvanceClock { .. } => "advance_clock",
    }
}

fn event_name(kind: &EventKind) -> &'static str {
    match kind {
        EventKind::LowFreeSpace { .. } => "low_free_space",
        EventKind::Corrupted { .. } => "corrupted",
        EventKind::NoSpace { .. } => "no_space",
    }
}

// ---- the generator ------------------------------------------------------------------------------

/// What the simulation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// The seed.
    pub seed: u64,
    /// Operations to generate (the end-of-run drain and image reads come on top).
    pub steps: u64,
    /// Disks (1–4); `None` lets the seed choose.
    pub devices: Option<usize>,
}

/// A planned lifecycle step, resolved when it runs (the new snapshot's index is known only
/// once its create succeeded).
#[derive(Clone, Debug)]
enum Planned {
    Op(Op),
    Create(StorageKind),
    Add(usize),
    Append,
    Take,
    Destroy,
}

/// A run's outcome.
#[derive(Clone, Debug)]
pub struct Report {
    /// The configuration (devices resolved).
    pub config: SimConfig,
    /// Disks: (sectors, io_min sectors).
    pub disks: Vec<(u64, u64)>,
    /// Operations applied (generated plus the end-of-run ones).
    pub ops_applied: u64,
    /// Statistics.
    pub stats: Stats,
    /// The engine's I/O.
    pub io: IoTotals,
    /// Engine fault rules fired, and left armed at the end.
    pub faults_fired: u64,
    /// Rules armed but never reached.
    pub faults_pending: usize,
    /// Model comparisons made by the harness.
    pub comparisons: u64,
    /// The trace's fingerprint.
    pub trace_hash: u64,
    /// Wall time in seconds.
    pub wall_secs: f64,
}

/// A failed run.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The configuration (devices resolved).
    pub config: SimConfig,
    /// The step that failed (1-based).
    pub step: u64,
    /// What went wrong.
    pub message: String,
    /// The last trace lines.
    pub tail: Vec<String>,
}

impl SimConfig {
    /// The command that replays this run.
    pub fn replay_command(&self) -> String {
        let mut cmd = format!(
            "cargo run --release -p blksnap-sim-tests --bin blksnap-sim -- --seed {} --steps {}",
            self.seed, self.steps
        );
        if let Some(d) = self.devices {
            let _ = write!(cmd, " --devices {d}");
        }
        cmd
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "SIMULATION FAILED: seed {} at step {}", self.config.seed, self.step)?;
        writeln!(f, "  {}", self.message)?;
        writeln!(f, "last {} trace lines:", self.tail.len())?;
        for line in &self.tail {
            writeln!(f, "  {line}")?;
        }
        write!(f, "replay: {}", self.config.replay_command())
    }
}

/// The seeded workload generator driving a [`Checker`].
pub struct Sim {
    rng: Rng,
    /// The checker (harness, oracle, trace).
    pub c: Checker,
    config: SimConfig,
    disks: Vec<(u64, u64)>,
    plan: VecDeque<Planned>,
    plan_target: Option<SnapshotId>,
    /// Owner of each sector of each append backend, so alive snapshots never share storage.
    owner: Vec<Vec<Option<SnapshotId>>>,
}

const DISK_SECTORS: [u64; 7] = [8, 64, 75, 131, 200, 256, 256];

/// One step in this many starts a take storm (about 1,300 steps).
const TAKE_STORM_ODDS: u64 = 10_000;

impl Sim {
    /// A simulation of `config`, its trace to `trace_out`.
    pub fn new(config: SimConfig, trace_out: Option<Box<dyn Write + Send>>) -> Sim {
        let mut rng = Rng::new(config.seed);
        let devices = config.devices.unwrap_or_else(|| rng.range(1, 4) as usize).clamp(1, 4);
        let config = SimConfig { devices: Some(devices), ..config };
        let disks: Vec<(u64, u64)> = (0..devices)
            .map(|_| (rng.pick(&DISK_SECTORS), if rng.chance(80) { 1 } else { 16 }))
            .collect();
        let setups: Vec<DiskSetup> = disks
            .iter()
            .enumerate()
            .map(|(i, &(sectors, io_min_sectors))| DiskSetup {
                id: DeviceId::new(7, i as u32),
                sectors,
                io_min_sectors,
            })
            .collect();
        let id_seed = rng.next_u64();
        let c = Checker::new(&setups, id_seed, trace_out);
        let owner = vec![vec![None; APPEND_BACKEND_SECTORS as usize]; APPEND_BACKENDS];
        Sim { rng, c, config, disks, plan: VecDeque::new(), plan_target: None, owner }
    }

    /// Run to the end: the report, or the first failure.
    pub fn run(mut self) -> Result<Report, Failure> {
        let start = Instant::now();
        let result = self.run_inner();
        self.c.flush_trace();
        let wall_secs = start.elapsed().as_secs_f64();
        match result {
            Ok(()) => Ok(Report {
                config: self.config,
                disks: self.disks.clone(),
                ops_applied: self.c.h.ops_applied,
                stats: self.c.stats.clone(),
                io: self.c.h.io_totals(),
                faults_fired: self.c.h.faults_fired(),
                faults_pending: self.c.h.faults_pending(),
                comparisons: self.c.h.checks,
                trace_hash: self.c.trace_hash(),
                wall_secs,
            }),
            Err(message) => Err(Failure {
                config: self.config,
                step: self.c.h.ops_applied,
                message,
                tail: self.c.tail(),
            }),
        }
    }

    fn run_inner(&mut self) -> Result<(), String> {
        self.run_steps(self.config.steps)?;
        self.c.finish()
    }

    /// The lifecycle prefix (on the first call) and then `steps` generated steps, each applied
    /// to both sides and checked by the oracle; no end-of-run drain.
    pub fn run_steps(&mut self, steps: u64) -> Result<(), String> {
        if self.c.h.ops_applied == 0 {
            let disks = self.disks.clone();
            self.c.trace(format!("seed {} disks {disks:?}", self.config.seed));
            self.setup();
        }
        for _ in 0..steps {
            let op = self.next_op();
            self.c.step(&op)?;
            self.after(&op)?;
        }
        Ok(())
    }

    /// A round's focus: a disk (preferring members of healthy snapshots) and an 8-sector window.
    pub fn round_focus(&mut self) -> (usize, u64) {
        let disk = self.pick_disk();
        let windows = self.c.disk_sectors(disk).div_ceil(8);
        (disk, 8 * self.rng.below(windows))
    }

    /// One operation for a concurrent round (`crate::concurrent`): drawn like any step, except
    /// what configures rather than operates (faults, parameters, the clock) and storage appends
    /// (whose ownership bookkeeping needs each result before the next op). Waits do not block.
    ///
    /// Data and change-map requests are cut to one 2 KiB-aligned piece (the smallest CBT block;
    /// chunks are at least 4 KiB): like a block device, the engine makes no promise that two
    /// overlapping requests in flight at once see each other whole (a multi-chunk write may be
    /// half visible to a concurrent read, a cbtmap read may see one racing mark and not an
    /// earlier one), only that each block or chunk is — which is what the model can then check.
    ///
    /// Races need a shared target: three data requests in four go to the round's `focus` (a disk
    /// and an 8-sector window, inside one chunk), where copy-on-write, image reads and writes
    /// and change tracking of one chunk meet.
    pub fn concurrent_op(&mut self, focus: (usize, u64)) -> Op {
        const PIECE_SECTORS: u64 = 4;
        let piece = |sector: u64, sectors: u64| {
            let start = sector - sector % PIECE_SECTORS;
            let end = (start + PIECE_SECTORS).min(sector + sectors);
            (sector, end.saturating_sub(sector).min(sectors))
        };
        loop {
            let mut op = self.random_op();
            if self.rng.chance(75) {
                let cap = self.c.disk_sectors(focus.0);
                let sector = (focus.1 + PIECE_SECTORS * self.rng.below(2)).min(cap - 1);
                let sectors = self.rng.range(1, PIECE_SECTORS).min(cap - sector);
                match &mut op {
                    Op::Write { disk, sector: s, sectors: n, .. }
                    | Op::Discard { disk, sector: s, sectors: n }
                    | Op::WriteZeroes { disk, sector: s, sectors: n }
                    | Op::Read { disk, sector: s, sectors: n }
                    | Op::ImageRead { disk, sector: s, sectors: n }
                    | Op::ImageWrite { disk, sector: s, sectors: n, .. }
                    | Op::ImageWriteZeroes { disk, sector: s, sectors: n } => {
                        (*disk, *s, *n) = (focus.0, sector, sectors);
                    }
                    _ => {}
                }
            }
            let op = match op {
                Op::Write { disk, sector, sectors, seed } => {
                    let (sector, sectors) = piece(sector, sectors);
                    Op::Write { disk, sector, sectors, seed }
                }
                Op::Discard { disk, sector, sectors } => {
                    let (sector, sectors) = piece(sector, sectors);
                    Op::Discard { disk, sector, sectors }
                }
                Op::WriteZeroes { disk, sector, sectors } => {
                    let (sector, sectors) = piece(sector, sectors);
                    Op::WriteZeroes { disk, sector, sectors }
                }
                Op::Read { disk, sector, sectors } => {
                    let (sector, sectors) = piece(sector, sectors);
                    Op::Read { disk, sector, sectors }
                }
                Op::ImageRead { disk, sector, sectors } => {
                    let (sector, sectors) = piece(sector, sectors);
                    Op::ImageRead { disk, sector, sectors }
                }
                Op::ImageWrite { disk, sector, sectors, seed } => {
                    let (sector, sectors) = piece(sector, sectors);
                    Op::ImageWrite { disk, sector, sectors, seed }
                }
                Op::ImageWriteZeroes { disk, sector, sectors } => {
                    let (sector, sectors) = piece(sector, sectors);
                    Op::ImageWriteZeroes { disk, sector, sectors }
                }
                Op::CbtMap { disk, offset, length } => {
                    Op::CbtMap { disk, offset, length: length.min(1) }
                }
                Op::CbtDirty { disk, ranges } => {
                    let ranges = ranges
                        .into_iter()
                        .take(1)
                        .map(|r| {
                            let (offset, count) = piece(r.offset, r.count);
                            SectorRange::new(offset, count)
                        })
                        .collect();
                    Op::CbtDirty { disk, ranges }
                }
                op => op,
            };
            match op {
                Op::Fault { .. }
                | Op::TornFault { .. }
                | Op::FailGrowth { .. }
                | Op::SetStorageMinimum { .. }
                | Op::SetShifts { .. }
                | Op::AdvanceClock { .. }
                | Op::Append { .. } => continue,
                Op::WaitEvent { snap, .. } => return Op::WaitEvent { snap, timeout_ms: 0 },
                op => return op,
            }
        }
    }

    /// The lifecycle prefix: every disk attached, one or two snapshots over them, taken.
    fn setup(&mut self) {
        let n = self.c.disks();
        self.plan.extend((0..n).map(|disk| Planned::Op(Op::Attach { disk })));
        let k = if n > 1 && self.rng.chance(50) { 2 } else { 1 };
        // Disks spread over k snapshots: snapshot j gets disks j, j + k, ...
        for j in 0..k {
            let storage = self.storage_kind();
            self.plan.push_back(Planned::Create(storage));
            self.plan.extend((j..n).step_by(k).map(Planned::Add));
            self.plan.push_back(Planned::Append);
            self.plan.push_back(Planned::Take);
        }
    }

    fn storage_kind(&mut self) -> StorageKind {
        if self.rng.chance(40) {
            StorageKind::Ranges
        } else {
            StorageKind::File {
                initial_sectors: self.rng.pick(&[0, 8, 24, 40, 100, 256]),
                limit_sectors: self.rng.pick(&[0, 16, 48, 96, 200, 400, 1000, 2000]),
                growable: self.rng.chance(80),
            }
        }
    }

    /// Bookkeeping the generator needs from an operation's result.
    fn after(&mut self, op: &Op) -> Result<(), String> {
        let ok = self.c.h.last.errno.is_none();
        match op {
            Op::Create { .. } if ok && self.plan_target == Some(SnapshotId::default()) => {
                self.plan_target = self.c.h.snapshots.last().copied();
            }
            Op::Create { .. } if self.plan_target == Some(SnapshotId::default()) => {
                // The planned create failed: drop the rest of the plan.
                self.plan.clear();
                self.plan_target = None;
            }
            Op::Append { snap, backend, ranges } if ok => {
                let id = self.c.h.snapshot_id(*snap);
                let owner = &mut self.owner[backend % APPEND_BACKENDS];
                for r in ranges.iter().filter(|r| r.count > 0) {
                    for s in r.offset..r.offset + r.count {
                        if owner[s as usize].is_some_and(|o| o != id) {
                            // Two alive snapshots sharing storage corrupt each other: the
                            // contract leaves that to the user, so the workload must not.
                            return Err(format!(
                                "workload error: backend {backend} sector {s} appended to two \
                                 alive snapshots"
                            ));
                        }
                        owner[s as usize] = Some(id);
                    }
                }
            }
            Op::Destroy { snap } if ok => {
                let id = self.c.h.snapshot_id(*snap);
                for owner in &mut self.owner {
                    for o in owner.iter_mut().filter(|o| **o == Some(id)) {
                        *o = None;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn next_op(&mut self) -> Op {
        loop {
            if let Some(p) = self.plan.pop_front() {
                if let Some(op) = self.resolve(p) {
                    return op;
                }
                continue;
            }
            self.plan_target = None;
            let alive = self.c.alive();
            let healthy = alive.iter().any(|id| self.c.is_healthy(*id));
            if self.rng.below(TAKE_STORM_ODDS) == 0 {
                self.plan_take_storm();
                continue;
            }
            if (!healthy && self.rng.chance(20)) || (alive.len() < 2 && self.rng.chance(1)) {
                self.plan_lifecycle();
                continue;
            }
            // A snapshot whose every diff area failed has shown what it can: retire it now and
            // then, so the disks go to a new one.
            let dead: Vec<SnapshotId> = alive
                .iter()
                .copied()
                .filter(|id| self.c.is_taken(*id) && !self.c.is_healthy(*id))
                .collect();
            if !dead.is_empty() && self.rng.chance(3) {
                let id = self.rng.pick(&dead);
                return Op::Destroy { snap: self.c.index_of(id) };
            }
            return self.random_op();
        }
    }

    fn resolve(&mut self, p: Planned) -> Option<Op> {
        let target = self.plan_target.filter(|id| *id != SnapshotId::default());
        match p {
            Planned::Op(op) => Some(op),
            Planned::Create(storage) => {
                self.plan_target = Some(SnapshotId::default());
                Some(Op::Create { storage })
            }
            Planned::Add(disk) => Some(Op::Add { snap: self.c.index_of(target?), disk }),
            Planned::Append => {
                let id = target?;
                self.c.is_ranges(id).then(|| self.append_op(id, true))
            }
            Planned::Take => Some(Op::Take { snap: self.c.index_of(target?) }),
            Planned::Destroy => Some(Op::Destroy { snap: self.c.index_of(target?) }),
        }
    }

    /// A take storm: 260 quick snapshots of one free disk (create, add, write, take, destroy),
    /// so its CBT numbering wraps past 255 and the wrap's rules (new generation, numbering from
    /// 1, stale read map) are checked.
    fn plan_take_storm(&mut self) {
        let n = self.c.disks();
        let free: Vec<usize> = (0..n).filter(|&d| self.c.snapshot_of(d).is_none()).collect();
        if free.is_empty() {
            return;
        }
        let disk = self.rng.pick(&free);
        if !self.c.is_attached(disk) {
            self.plan.push_back(Planned::Op(Op::Attach { disk }));
        }
        let sectors = self.c.disk_sectors(disk);
        let storage =
            StorageKind::File { initial_sectors: 2 * sectors, limit_sectors: 0, growable: false };
        for _ in 0..260 {
            let (sector, count) = self.io_range(disk);
            let seed = self.rng.next_u64() as u8;
            self.plan.push_back(Planned::Create(storage));
            self.plan.push_back(Planned::Add(disk));
            self.plan.push_back(Planned::Op(Op::Write { disk, sector, sectors: count, seed }));
            self.plan.push_back(Planned::Take);
            self.plan.push_back(Planned::Destroy);
        }
    }

    /// Create a snapshot over some free disks (attaching them first), append storage, take.
    fn plan_lifecycle(&mut self) {
        let n = self.c.disks();
        let free: Vec<usize> = (0..n).filter(|&d| self.c.snapshot_of(d).is_none()).collect();
        if free.is_empty() {
            // Everything is busy: make room, retiring a snapshot that is not healthy if any.
            let alive = self.c.alive();
            let victim = alive.iter().find(|id| !self.c.is_healthy(**id)).or(alive.first());
            if let Some(&id) = victim {
                let snap = self.c.index_of(id);
                self.plan.push_back(Planned::Op(Op::Destroy { snap }));
            }
            return;
        }
        let count = self.rng.range(1, free.len() as u64) as usize;
        let start = self.rng.below(free.len() as u64) as usize;
        let chosen: Vec<usize> = (0..count).map(|i| free[(start + i) % free.len()]).collect();
        for &d in &chosen {
            if !self.c.is_attached(d) {
                self.plan.push_back(Planned::Op(Op::Attach { disk: d }));
            }
        }
        let storage = self.storage_kind();
        self.plan.push_back(Planned::Create(storage));
        self.plan.extend(chosen.into_iter().map(Planned::Add));
        self.plan.push_back(Planned::Append);
        self.plan.push_back(Planned::Take);
    }

    /// Append ranges of one backend to snapshot `id`: free (or its own) sectors only, so that
    /// alive snapshots never share storage; now and then an invalid one.
    fn append_op(&mut self, id: SnapshotId, generous: bool) -> Op {
        let snap = self.c.index_of(id);
        let backend = self.rng.below(APPEND_BACKENDS as u64) as usize;
        let mut ranges = Vec::new();
        let wanted = self.rng.range(1, 3);
        for _ in 0..wanted {
            let count = if generous {
                self.rng.pick(&[48, 64, 96, 128])
            } else {
                let any = self.rng.range(1, 64);
                self.rng.pick(&[0, 8, 16, 24, 32, 40, 64, any])
            };
            if !generous && self.rng.chance(5) {
                // Past the backend's end, or over a range of its own: EINVAL, nothing appended.
                ranges.push(SectorRange::new(APPEND_BACKEND_SECTORS - 8, 40));
                continue;
            }
            for _ in 0..8 {
                let offset = self.rng.below(APPEND_BACKEND_SECTORS - count.min(511));
                let fits = (offset..offset + count).all(|s| {
                    self.owner[backend].get(s as usize).is_some_and(|o| o.is_none())
                        && !ranges
                            .iter()
                            .any(|r: &SectorRange| r.offset <= s && s < r.offset + r.count)
                });
                if fits {
                    ranges.push(SectorRange::new(offset, count));
                    break;
                }
            }
        }
        Op::Append { snap, backend, ranges }
    }

    fn pick_snap(&mut self) -> usize {
        let alive = self.c.alive();
        let len = self.c.h.snapshots.len();
        if !alive.is_empty() && self.rng.chance(90) {
            let id = self.rng.pick(&alive);
            self.c.index_of(id)
        } else if len > 0 && self.rng.chance(60) {
            self.rng.below(len as u64) as usize
        } else {
            2 * len + self.rng.below(4) as usize
        }
    }

    /// A disk, preferring members of healthy taken snapshots (where the interesting I/O is).
    fn pick_disk(&mut self) -> usize {
        let n = self.c.disks();
        if self.rng.chance(80) {
            let busy: Vec<usize> = (0..n)
                .filter(|&d| self.c.snapshot_of(d).is_some_and(|id| self.c.is_healthy(id)))
                .collect();
            if !busy.is_empty() {
                return self.rng.pick(&busy);
            }
        }
        self.rng.below(n as u64) as usize
    }

    fn io_range(&mut self, d: usize) -> (u64, u64) {
        let cap = self.c.disk_sectors(d);
        match self.rng.below(100) {
            0..=3 => (self.rng.below(cap + 16), self.rng.below(40)),
            4..=5 => (self.rng.below(cap + 1), 0),
            6..=19 => {
                let chunk = self.rng.below(cap.div_ceil(8)) * 8;
                (chunk, (8 * self.rng.range(1, 3)).min(cap - chunk))
            }
            20..=21 => (0, cap),
            _ => {
                let sector = self.rng.below(cap);
                (sector, self.rng.range(1, 24).min(cap - sector))
            }
        }
    }

    fn errno(&mut self) -> Errno {
        self.rng.pick(&[
            Errno::EIO,
            Errno::EIO,
            Errno::EIO,
            Errno::EIO,
            Errno::ENOSPC,
            Errno::ENOMEM,
        ])
    }

    fn random_op(&mut self) -> Op {
        const WEIGHTS: [u64; 25] = [
            200, // 0 write
            20,  // 1 discard
            20,  // 2 write zeroes
            50,  // 3 read
            120, // 4 image read
            80,  // 5 image write
            60,  // 6 wait event
            15,  // 7 take
            6,   // 8 create
            15,  // 9 add
            8,   // 10 destroy
            35,  // 11 append
            8,   // 12 attach
            6,   // 13 detach
            5,   // 14 cbt info
            10,  // 15 cbt map
            10,  // 16 cbt dirty
            10,  // 17 info
            5,   // 18 collect
            10,  // 19 fault
            5,   // 20 torn fault
            3,   // 21 growth fault
            6,   // 22 set storage minimum or shifts
            10,  // 23 advance clock
            5,   // 24 whole-image read
        ];
        let n = self.c.disks();
        match self.rng.weighted(&WEIGHTS) {
            0 => {
                let disk = self.pick_disk();
                let (sector, sectors) = self.io_range(disk);
                Op::Write { disk, sector, sectors, seed: self.rng.next_u64() as u8 }
            }
            1 => {
                let disk = self.pick_disk();
                let (sector, sectors) = self.io_range(disk);
                Op::Discard { disk, sector, sectors }
            }
            2 => {
                let disk = self.pick_disk();
                let (sector, sectors) = self.io_range(disk);
                Op::WriteZeroes { disk, sector, sectors }
            }
            3 => {
                let disk = self.pick_disk();
                let (sector, sectors) = self.io_range(disk);
                Op::Read { disk, sector, sectors }
            }
            4 => {
                let disk = self.pick_disk();
                let (sector, sectors) = self.io_range(disk);
                Op::ImageRead { disk, sector, sectors }
            }
            5 => {
                let disk = self.pick_disk();
                let (sector, sectors) = self.io_range(disk);
                // A third of the image writes are image discards (write-zeroes), chosen by the
                // seed already drawn: no extra draw, so every seed generates the same sequence
                // of operations as before image discards existed.
                match self.rng.next_u64() as u8 {
                    seed if seed % 3 == 0 => Op::ImageWriteZeroes { disk, sector, sectors },
                    seed => Op::ImageWrite { disk, sector, sectors, seed },
                }
            }
            6 => Op::WaitEvent {
                snap: self.pick_snap(),
                timeout_ms: self.rng.pick(&[0, 0, 0, 10, 100, 1000]),
            },
            7 => Op::Take { snap: self.pick_snap() },
            8 => Op::Create { storage: self.storage_kind() },
            9 => Op::Add { snap: self.pick_snap(), disk: self.rng.below(n as u64) as usize },
            10 => {
                // Destroys come more often when many snapshots pile up.
                let alive = self.c.alive().len();
                if alive < 3 && self.rng.chance(50) {
                    return Op::Collect;
                }
                Op::Destroy { snap: self.pick_snap() }
            }
            11 => {
                let alive = self.c.alive();
                if alive.is_empty() || self.rng.chance(10) {
                    // Any snapshot index (maybe destroyed or unknown): a range nobody owns, or
                    // one past the backend's end.
                    let snap = self.pick_snap();
                    let backend = self.rng.below(2) as usize;
                    let free = self.owner[backend][..8].iter().all(Option::is_none);
                    let range = if free {
                        SectorRange::new(0, 8)
                    } else {
                        SectorRange::new(APPEND_BACKEND_SECTORS - 4, 8)
                    };
                    Op::Append { snap, backend, ranges: vec![range] }
                } else {
                    let id = self.rng.pick(&alive);
                    self.append_op(id, false)
                }
            }
            12 => Op::Attach { disk: self.rng.below(n as u64) as usize },
            13 => Op::Detach { disk: self.rng.below(n as u64) as usize },
            14 => Op::CbtInfo { disk: self.rng.below(n as u64) as usize },
            15 => {
                let disk = self.rng.below(n as u64) as usize;
                let blocks = self.c.disk_sectors(disk).div_ceil(8) as u32;
                let offset = self.rng.below(u64::from(blocks) + 2) as u32;
                let length = self.rng.below(u64::from(blocks) + 2) as u32;
                Op::CbtMap { disk, offset, length }
            }
            16 => {
                let disk = self.rng.below(n as u64) as usize;
                let cap = self.c.disk_sectors(disk);
                let ranges = (0..self.rng.range(0, 3))
                    .map(|_| SectorRange::new(self.rng.below(cap + 8), self.rng.below(30)))
                    .collect();
                Op::CbtDirty { disk, ranges }
            }
            17 => Op::Info { disk: self.rng.below(n as u64) as usize },
            18 => Op::Collect,
            19 => {
                let target = self.rng.chance(50).then(|| self.pick_disk());
                let kind = if self.rng.chance(50) { IoKind::Read } else { IoKind::Write };
                Op::Fault { target, kind, errno: self.errno() }
            }
            20 => {
                let target = self.rng.chance(60).then(|| self.pick_disk());
                Op::TornFault {
                    target,
                    sectors_written: self.rng.below(16),
                    errno: self.rng.pick(&[Errno::EIO, Errno::EIO, Errno::ENOSPC]),
                }
            }
            21 => Op::FailGrowth {
                errno: self.rng.pick(&[Errno::ENOSPC, Errno::ENOSPC, Errno::EIO, Errno::EFBIG]),
            },
            22 if self.rng.chance(70) => {
                Op::SetStorageMinimum { sectors: self.rng.pick(&[16, 64, 64, 100, 256]) }
            }
            22 => Op::SetShifts {
                chunk_minimum_shift: self.rng.pick(&[12, 12, 13, 14]),
                tracking_block_minimum_shift: self.rng.pick(&[12, 12, 13, 11]),
            },
            23 => Op::AdvanceClock { ns: self.rng.below(2_000_000_000) },
            _ => {
                let disk = self.pick_disk();
                Op::ImageRead { disk, sector: 0, sectors: self.c.disk_sectors(disk) }
            }
        }
    }
}

/// Run `config`; trace lines to `trace_out`.
pub fn run(config: SimConfig, trace_out: Option<Box<dyn Write + Send>>) -> Result<Report, Failure> {
    Sim::new(config, trace_out).run()
}

impl Report {
    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let st = &self.stats;
        let _ = writeln!(s, "blksnap-sim report");
        let _ = writeln!(s, "  seed            {}", self.config.seed);
        let _ = writeln!(
            s,
            "  steps           {} generated, {} applied (with the end-of-run drain and image reads)",
            self.config.steps, self.ops_applied
        );
        let disks: Vec<String> =
            self.disks.iter().map(|(s, m)| format!("{s} sectors/io_min {m}")).collect();
        let _ = writeln!(s, "  devices         {} [{}]", self.disks.len(), disks.join(", "));
        let (ok, failed) = st.ops.values().fold((0, 0), |(a, b), (o, f)| (a + o, b + f));
        let _ = writeln!(s, "  operations      {} ok, {} failed", ok, failed);
        for (name, (o, f)) in &st.ops {
            let _ = writeln!(s, "    {name:<20} {o:>7} ok {f:>6} failed");
        }
        let _ = writeln!(
            s,
            "  bytes           origin written {} read {}; image written {} read {}",
            st.origin_bytes_written,
            st.origin_bytes_read,
            st.image_bytes_written,
            st.image_bytes_read
        );
        let names = ["read", "write", "write_zeroes", "set_len", "flush"];
        for (t, target) in ["origin", "storage"].iter().enumerate() {
            let parts: Vec<String> = (0..5)
                .filter(|&o| self.io.calls[t][o] > 0)
                .map(|o| {
                    format!(
                        "{} {} ({} B, {} failed)",
                        names[o], self.io.calls[t][o], self.io.bytes[t][o], self.io.failed[t][o]
                    )
                })
                .collect();
            let _ = writeln!(s, "  engine I/O      {target:<8} {}", parts.join(", "));
        }
        let _ = writeln!(
            s,
            "  snapshots       {} created, {} taken, {} destroyed, at most {} alive",
            st.snapshots_created, st.snapshots_taken, st.snapshots_destroyed, st.max_alive
        );
        let _ = writeln!(
            s,
            "  storage         {} overflowed, {} diff areas corrupted",
            st.overflows, st.corruptions
        );
        let events: Vec<String> = st.events.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(s, "  events          {}", events.join(", "));
        let armed: u64 = st.faults_armed.values().sum();
        let _ = writeln!(
            s,
            "  faults          {armed} armed, {} fired, {} never reached; {} origin writes torn",
            self.faults_fired, self.faults_pending, st.torn_origin_writes
        );
        for (k, v) in &st.faults_armed {
            let _ = writeln!(s, "    {k:<24} {v:>6}");
        }
        let _ = writeln!(
            s,
            "  depth           {} steps ended with a working image ({:.0}%)",
            st.steps_with_live_image,
            100.0 * st.steps_with_live_image as f64 / self.ops_applied.max(1) as f64
        );
        let _ = writeln!(
            s,
            "  CBT             {} switches checked ({} wrapped)",
            st.cbt_switches.0, st.cbt_switches.1
        );
        let _ = writeln!(
            s,
            "  checks          {} engine-vs-model comparisons, {} invariant checks, all held",
            self.comparisons, st.invariant_checks
        );
        let _ = writeln!(s, "  trace hash      {:016x}", self.trace_hash);
        let _ = writeln!(s, "  wall time       {:.2} s", self.wall_secs);
        let _ = write!(s, "  replay          {}", self.config.replay_command());
        s
    }
}
