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

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use blksnap_engine::io::Fault;
use blksnap_engine::LiveCounts;
use blksnap_model::formulas::chunk_layout;
use blksnap_model::{
    CbtInfo, DeviceId, Errno, EventKind, IoKind, Params, SectorRange, SnapshotId, StorageStats,
    SECTOR_SIZE_BYTES,
};

use crate::{
    data_of, fnv1a, DiskSetup, Harness, IoOp, IoRecord, IoTarget, IoTotals, Op, StorageKind,
    APPEND_BACKENDS, APPEND_BACKEND_SECTORS,
};

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

// ---- the checker --------------------------------------------------------------------------------

/// The image oracle of one device: its content at take plus image writes. A failed image write
/// may have landed on some sectors: those accept either version until a read settles them.
#[derive(Clone, Debug)]
struct Frozen {
    data: Vec<u8>,
    alternatives: BTreeMap<u64, Vec<Vec<u8>>>,
}

/// The last CBT state seen on a device.
#[derive(Clone, Debug)]
struct CbtSeen {
    info: CbtInfo,
    map: Vec<u8>,
}

const SECTOR: usize = SECTOR_SIZE_BYTES as usize;

fn sector_slice(data: &[u8], sector: u64) -> &[u8] {
    &data[sector as usize * SECTOR..(sector as usize + 1) * SECTOR]
}

/// A fault to inject, in the sweep: before operation `rec.step`.
#[derive(Clone, Copy, Debug)]
pub struct Injection {
    /// The I/O, as numbered by the counting run.
    pub rec: IoRecord,
    /// Earlier I/Os of the same target and kind in the same operation.
    pub ordinal: u64,
    /// What happens to it.
    pub fault: Fault,
}

/// The harness plus the simulation's oracle and invariants, and the trace.
pub struct Checker {
    /// Engine and model side by side.
    pub h: Harness,
    disk_sectors: Vec<u64>,
    disk_io_min: Vec<u64>,
    /// Chunks of each disk's diff area (layout at its take).
    area_chunks: BTreeMap<usize, u64>,
    /// Alive snapshots → member disks (add order), from the operations' results.
    members: BTreeMap<SnapshotId, Vec<usize>>,
    /// Index in `h.snapshots` of each id.
    snap_index: BTreeMap<SnapshotId, usize>,
    taken: BTreeSet<SnapshotId>,
    /// Snapshots on v3 ranges storage.
    ranges: BTreeSet<SnapshotId>,
    frozen: BTreeMap<usize, Frozen>,
    cbt_seen: Vec<Option<CbtSeen>>,
    /// CBT blocks marked since the last take, per disk.
    written: Vec<BTreeSet<u64>>,
    storage_seen: BTreeMap<SnapshotId, StorageStats>,
    last_event_time: BTreeMap<SnapshotId, u64>,
    corrupted_popped: BTreeSet<(SnapshotId, DeviceId)>,
    /// Error code of each (snapshot, member) once its diff area failed.
    corrupt_seen: BTreeMap<(SnapshotId, DeviceId), i32>,
    last_now: u64,
    /// Statistics.
    pub stats: Stats,
    /// The injection the next matching step gets (sweep).
    pub injection: Option<Injection>,
    trace_out: Option<Box<dyn Write + Send>>,
    tail: VecDeque<String>,
    trace_hash: u64,
    /// Steps done, readable from a watchdog thread.
    pub heartbeat: Arc<AtomicU64>,
}

impl Checker {
    /// A checker over `disks` with `Params::small()` and ids from `seed`; trace lines go to
    /// `trace_out` if given.
    pub fn new(disks: &[DiskSetup], seed: u64, trace_out: Option<Box<dyn Write + Send>>) -> Self {
        let params = Params::small();
        let n = disks.len();
        Checker {
            h: Harness::new(params, disks, seed),
            disk_sectors: disks.iter().map(|d| d.sectors).collect(),
            disk_io_min: disks.iter().map(|d| d.io_min_sectors).collect(),
            area_chunks: BTreeMap::new(),
            members: BTreeMap::new(),
            snap_index: BTreeMap::new(),
            taken: BTreeSet::new(),
            ranges: BTreeSet::new(),
            frozen: BTreeMap::new(),
            cbt_seen: vec![None; n],
            written: vec![BTreeSet::new(); n],
            storage_seen: BTreeMap::new(),
            last_event_time: BTreeMap::new(),
            corrupted_popped: BTreeSet::new(),
            corrupt_seen: BTreeMap::new(),
            last_now: 0,
            stats: Stats::default(),
            injection: None,
            trace_out,
            tail: VecDeque::new(),
            trace_hash: fnv1a(&[]),
            heartbeat: Arc::new(AtomicU64::new(0)),
        }
    }

    /// FNV hash of every trace line so far.
    pub fn trace_hash(&self) -> u64 {
        self.trace_hash
    }

    /// The last [`TRACE_TAIL`] trace lines.
    pub fn tail(&self) -> Vec<String> {
        self.tail.iter().cloned().collect()
    }

    /// Alive snapshot ids, in creation order.
    pub fn alive(&self) -> Vec<SnapshotId> {
        self.h.model.snapshot_collect()
    }

    /// A snapshot created outside [`Checker::step`] (a concurrent round) and appended to
    /// `h.snapshots`: known to the generator from now on. The oracle's bookkeeping is not
    /// updated (rounds are checked against the model instead).
    pub fn adopt_created(&mut self, id: SnapshotId) {
        let index = self.h.snapshots.iter().rposition(|s| *s == id);
        let index = index.expect("adopted ids are in the harness's list");
        self.snap_index.insert(id, index);
        self.members.entry(id).or_default();
    }

    /// Index (for [`Op`]s) of an alive id.
    pub fn index_of(&self, id: SnapshotId) -> usize {
        self.snap_index[&id]
    }

    /// Whether snapshot `id` has v3 ranges storage.
    pub fn is_ranges(&self, id: SnapshotId) -> bool {
        self.ranges.contains(&id)
    }

    /// Whether snapshot `id` is taken and has a member whose diff area still works.
    pub fn is_healthy(&self, id: SnapshotId) -> bool {
        self.taken.contains(&id)
            && self
                .members_of(id)
                .iter()
                .any(|&d| !self.corrupt_seen.contains_key(&(id, self.h.disk_id(d))))
    }

    /// Whether snapshot `id` is taken.
    pub fn is_taken(&self, id: SnapshotId) -> bool {
        self.taken.contains(&id)
    }

    /// Member disks of an alive snapshot.
    pub fn members_of(&self, id: SnapshotId) -> &[usize] {
        self.members.get(&id).map_or(&[], Vec::as_slice)
    }

    /// Whether disk `d` has a tracker (as of the last step).
    pub fn is_attached(&self, d: usize) -> bool {
        self.cbt_seen[d].is_some()
    }

    /// The snapshot disk `d` is a member of.
    pub fn snapshot_of(&self, d: usize) -> Option<SnapshotId> {
        self.members.iter().find(|(_, m)| m.contains(&d)).map(|(id, _)| *id)
    }

    /// Sectors of disk `d`.
    pub fn disk_sectors(&self, d: usize) -> u64 {
        self.disk_sectors[d]
    }

    /// Disk count.
    pub fn disks(&self) -> usize {
        self.disk_sectors.len()
    }

    fn trace(&mut self, line: String) {
        self.trace_hash = fnv1a(line.as_bytes()) ^ self.trace_hash.rotate_left(5);
        if let Some(out) = self.trace_out.as_mut() {
            // A broken trace sink is not a reason to stop the simulation.
            let _ = writeln!(out, "{line}");
        }
        if self.tail.len() == TRACE_TAIL {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    /// Flush the trace sink.
    pub fn flush_trace(&mut self) {
        if let Some(out) = self.trace_out.as_mut() {
            let _ = out.flush();
        }
    }

    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
        self.stats.invariant_checks += 1;
        if ok {
            Ok(())
        } else {
            Err(format!("invariant violated: {}", what()))
        }
    }

    /// Apply `op` on both sides, compare, and check every invariant. One trace line.
    pub fn step(&mut self, op: &Op) -> Result<(), String> {
        let step = self.h.ops_applied + 1;
        if let Some(inj) = self.injection.filter(|inj| inj.rec.step == step) {
            self.h.fail_io(&inj.rec, inj.ordinal, inj.fault);
            self.trace(format!(
                "{step:>6} inject {:?} on {:?} {:?} #{} (plan op {})",
                inj.fault, inj.rec.target, inj.rec.op, inj.ordinal, inj.rec.plan_index
            ));
        }
        let pre = self.pre_image(op);
        let applied = self.h.apply(op);
        self.trace(format!("{step:>6} {op:?} -> {}", self.h.last.summary));
        self.heartbeat.store(step, Ordering::Relaxed);
        applied?;
        self.h.check_state().map_err(|m| format!("after the step: {m}"))?;
        let failed = self.h.last.errno.is_some();
        let counts = self.stats.ops.entry(op_name(op)).or_default();
        if failed {
            counts.1 += 1;
        } else {
            counts.0 += 1;
        }
        self.after_op(op, pre)?;
        self.after_step()
    }

    /// The origin bytes a write may change, read before it (below the fault layer).
    fn pre_image(&self, op: &Op) -> Option<Vec<u8>> {
        match *op {
            Op::Write { disk, sector, sectors, .. }
            | Op::Discard { disk, sector, sectors }
            | Op::WriteZeroes { disk, sector, sectors } => {
                let d = disk % self.disks();
                (sectors > 0 && sector.checked_add(sectors)? <= self.disk_sectors[d]).then(|| {
                    self.h.peek_origin(d, sector * SECTOR_SIZE_BYTES, sectors * SECTOR_SIZE_BYTES)
                })
            }
            _ => None,
        }
    }

    fn mark_written(&mut self, d: usize, sector: u64, sectors: u64) {
        let Some(seen) = &self.cbt_seen[d] else { return };
        if sectors == 0 {
            return;
        }
        let block_sectors = u64::from(seen.info.block_size_bytes) / SECTOR_SIZE_BYTES;
        let (first, last) = (sector / block_sectors, (sector + sectors - 1) / block_sectors);
        self.written[d].extend(first..=last);
    }

    fn after_op(&mut self, op: &Op, pre: Option<Vec<u8>>) -> Result<(), String> {
        let n = self.disks();
        let last = self.h.last.clone();
        let ok = last.errno.is_none();
        match *op {
            Op::Write { disk, sector, sectors, .. }
            | Op::Discard { disk, sector, sectors }
            | Op::WriteZeroes { disk, sector, sectors } => {
                let d = disk % n;
                let Some(old) = pre else { return Ok(()) };
                let new = match *op {
                    Op::Write { seed, .. } => data_of(sectors, seed),
                    _ => vec![0u8; old.len()],
                };
                let now = self.h.peek_origin(d, sector * SECTOR_SIZE_BYTES, old.len() as u64);
                if ok {
                    self.check(now == new, || {
                        format!("{op:?} returned Ok but the device does not hold its data")
                    })?;
                    self.stats.origin_bytes_written += new.len() as u64;
                    self.mark_written(d, sector, sectors);
                } else {
                    // Some prefix of the new data, then the old data: never anything else.
                    let landed = (0..sectors)
                        .take_while(|&s| sector_slice(&now, s) == sector_slice(&new, s))
                        .count() as u64;
                    let rest_old =
                        (landed..sectors).all(|s| sector_slice(&now, s) == sector_slice(&old, s));
                    self.check(rest_old, || {
                        format!("{op:?} failed but left data that is neither a prefix nor old")
                    })?;
                    if (0..sectors).any(|s| sector_slice(&now, s) != sector_slice(&old, s)) {
                        self.stats.torn_origin_writes += 1;
                    }
                }
            }
            Op::Read { disk, sector, sectors } => {
                if let Some(bytes) = &last.bytes {
                    let d = disk % n;
                    let dev = self.h.peek_origin(d, sector * SECTOR_SIZE_BYTES, bytes.len() as u64);
                    self.check(*bytes == dev, || {
                        format!("{op:?} returned bytes the device lacks")
                    })?;
                    self.stats.origin_bytes_read += sectors * SECTOR_SIZE_BYTES;
                }
            }
            Op::ImageRead { disk, sector, sectors } => {
                if let Some(bytes) = &last.bytes {
                    let d = disk % n;
                    self.check_image_read(d, sector, sectors, bytes)?;
                    self.stats.image_bytes_read += sectors * SECTOR_SIZE_BYTES;
                }
            }
            Op::ImageWrite { disk, sector, sectors, seed } => {
                let d = disk % n;
                let data = data_of(sectors, seed);
                if ok && sectors > 0 {
                    let frozen = self.frozen.get_mut(&d);
                    let present = frozen.is_some();
                    self.check(present, || format!("{op:?} succeeded on a device without image"))?;
                    let frozen = self.frozen.get_mut(&d).expect("checked");
                    let at = sector as usize * SECTOR;
                    frozen.data[at..at + data.len()].copy_from_slice(&data);
                    for s in sector..sector + sectors {
                        frozen.alternatives.remove(&s);
                    }
                    self.stats.image_bytes_written += data.len() as u64;
                    self.mark_written(d, sector, sectors);
                } else if last.errno == Some(Errno::EIO) {
                    if let Some(frozen) = self.frozen.get_mut(&d) {
                        // Segments before the failure stay written: either version may be there.
                        for s in sector..sector + sectors {
                            let alt = sector_slice(&data, s - sector).to_vec();
                            frozen.alternatives.entry(s).or_default().push(alt);
                        }
                    }
                    // The CBT may be marked or not (a corrupted image fails before marking): the
                    // must-be-marked set takes only what surely was.
                }
            }
            Op::CbtDirty { disk, ref ranges } if ok => {
                let d = disk % n;
                for r in ranges.clone() {
                    self.mark_written(d, r.offset, r.count);
                }
            }
            Op::WaitEvent { snap, .. } => {
                if let Some(event) = last.event {
                    let id = self.h.snapshot_id(snap);
                    self.check_event(id, event)?;
                }
            }
            Op::Create { storage } if ok => {
                let id = *self.h.snapshots.last().expect("a created id");
                if storage == StorageKind::Ranges {
                    self.ranges.insert(id);
                }
                self.snap_index.insert(id, self.h.snapshots.len() - 1);
                self.members.insert(id, Vec::new());
                self.stats.snapshots_created += 1;
            }
            Op::Add { snap, disk } if ok => {
                let id = self.h.snapshot_id(snap);
                self.members.get_mut(&id).expect("an alive snapshot").push(disk % n);
            }
            Op::Take { snap } if ok => {
                let id = self.h.snapshot_id(snap);
                self.taken.insert(id);
                self.stats.snapshots_taken += 1;
                let params = self.h.model.params();
                for d in self.members[&id].clone() {
                    let layout = chunk_layout(&params, self.disk_sectors[d], self.disk_io_min[d]);
                    self.area_chunks.insert(d, layout.chunk_count);
                    let bytes = self.disk_sectors[d] * SECTOR_SIZE_BYTES;
                    let data = self.h.peek_origin(d, 0, bytes);
                    self.frozen.insert(d, Frozen { data, alternatives: BTreeMap::new() });
                }
            }
            Op::Destroy { snap } if ok => {
                let id = self.h.snapshot_id(snap);
                for d in self.members.remove(&id).unwrap_or_default() {
                    self.frozen.remove(&d);
                }
                self.taken.remove(&id);
                self.ranges.remove(&id);
                self.storage_seen.remove(&id);
                self.stats.snapshots_destroyed += 1;
            }
            Op::Fault { target, kind, errno } => {
                let t = if target.is_some() { "origin" } else { "storage" };
                let k = if kind == IoKind::Read { "read" } else { "write" };
                *self.stats.faults_armed.entry(format!("{errno:?} {t} {k}")).or_default() += 1;
            }
            Op::TornFault { target, .. } => {
                let t = if target.is_some() { "origin" } else { "storage" };
                *self.stats.faults_armed.entry(format!("torn {t} write")).or_default() += 1;
            }
            Op::FailGrowth { errno } => {
                *self.stats.faults_armed.entry(format!("{errno:?} growth")).or_default() += 1;
            }
            _ => {}
        }
        Ok(())
    }

    fn check_image_read(
        &mut self,
        d: usize,
        sector: u64,
        sectors: u64,
        bytes: &[u8],
    ) -> Result<(), String> {
        if sectors == 0 {
            return Ok(());
        }
        let present = self.frozen.contains_key(&d);
        self.check(present, || format!("an image read of disk {d} succeeded without an image"))?;
        let frozen = self.frozen.get_mut(&d).expect("checked");
        let mut bad = None;
        for s in sector..sector + sectors {
            let got = sector_slice(bytes, s - sector);
            if got == sector_slice(&frozen.data, s) {
                frozen.alternatives.remove(&s);
                continue;
            }
            let alt_ok =
                frozen.alternatives.get(&s).is_some_and(|alts| alts.iter().any(|a| a == got));
            if alt_ok {
                let at = s as usize * SECTOR;
                frozen.data[at..at + SECTOR].copy_from_slice(got);
                frozen.alternatives.remove(&s);
            } else {
                bad = Some(s);
                break;
            }
        }
        self.check(bad.is_none(), || {
            format!("image of disk {d}: sector {} differs from the frozen copy", bad.unwrap_or(0))
        })
    }

    fn check_event(&mut self, id: SnapshotId, event: blksnap_model::Event) -> Result<(), String> {
        *self.stats.events.entry(event_name(&event.kind)).or_default() += 1;
        let now = self.h.engine.now_ns();
        let last = self.last_event_time.get(&id).copied().unwrap_or(0);
        self.check(event.time_ns <= now && event.time_ns >= last, || {
            format!("event {event:?} out of order (last {last}, now {now})")
        })?;
        self.last_event_time.insert(id, event.time_ns);
        if let EventKind::Corrupted { device, errno } = event.kind {
            let first = self.corrupted_popped.insert((id, device));
            self.check(first, || format!("a second Corrupted event for {device} in {id}"))?;
            let code = self.corrupt_seen.get(&(id, device)).copied();
            self.check(code == Some(-errno.code()), || {
                format!("Corrupted{{{device}, {errno:?}}} but the device's error is {code:?}")
            })?;
        }
        Ok(())
    }

    /// Invariants of the whole state, after every step.
    fn after_step(&mut self) -> Result<(), String> {
        let alive = self.alive();
        self.stats.max_alive = self.stats.max_alive.max(alive.len());
        let tracked: Vec<SnapshotId> = self.members.keys().copied().collect();
        let mut sorted = alive.clone();
        sorted.sort();
        self.check(sorted == tracked, || format!("alive {alive:?} but tracked {tracked:?}"))?;
        // Storage accounting.
        for &id in &alive {
            let st =
                self.h.engine.storage_stats(id).map_err(|e| format!("stats of {id}: {e:?}"))?;
            let prev = self.storage_seen.get(&id).copied();
            self.check(st.filled_sectors <= st.capacity_sectors.max(st.requested_sectors), || {
                format!("storage of {id}: filled beyond capacity and request: {st:?}")
            })?;
            if let Some(p) = prev {
                self.check(!p.overflow || st.overflow, || format!("overflow of {id} cleared"))?;
                self.check(
                    st.filled_sectors >= p.filled_sectors
                        && st.capacity_sectors >= p.capacity_sectors,
                    || format!("storage of {id} shrank: {p:?} -> {st:?}"),
                )?;
            }
            if st.overflow && !prev.is_some_and(|p| p.overflow) {
                self.stats.overflows += 1;
            }
            self.storage_seen.insert(id, st);
        }
        // Diff-area errors: first error wins, never cleared.
        for (&id, devs) in &self.members.clone() {
            for &d in devs {
                let dev = self.h.disk_id(d);
                let info = self.h.engine.snapshot_info(dev).map_err(|e| format!("info: {e:?}"))?;
                let seen = self.corrupt_seen.get(&(id, dev)).copied();
                if let Some(code) = seen {
                    self.check(info.error_code == code, || {
                        format!("{dev}: error code changed {code} -> {}", info.error_code)
                    })?;
                } else if info.error_code != 0 {
                    self.corrupt_seen.insert((id, dev), info.error_code);
                    self.stats.corruptions += 1;
                }
            }
        }
        self.check_cbt()?;
        self.check_live()?;
        if alive.iter().any(|id| self.is_healthy(*id)) {
            self.stats.steps_with_live_image += 1;
        }
        let now = self.h.engine.now_ns();
        let last_now = self.last_now;
        self.check(now >= last_now, || format!("clock went back {last_now} -> {now}"))?;
        self.last_now = now;
        Ok(())
    }

    fn check_cbt(&mut self) -> Result<(), String> {
        for d in 0..self.disks() {
            let dev = self.h.disk_id(d);
            let now = match self.h.engine.cbt_info(dev) {
                Ok(info) => {
                    let mut map = Vec::new();
                    self.h
                        .engine
                        .cbt_map(dev, 0, info.block_count, &mut map)
                        .map_err(|e| format!("cbt_map: {e:?}"))?;
                    Some(CbtSeen { info, map })
                }
                Err(_) => None,
            };
            let prev = self.cbt_seen[d].take();
            match (&prev, &now) {
                (None, Some(s)) => {
                    // A fresh attach.
                    self.written[d].clear();
                    self.check(
                        s.info.changes_number == 0 && s.map.iter().all(|b| *b == 0),
                        || format!("{dev}: a new tracker is not clean: {:?}", s.info),
                    )?;
                }
                (Some(_), None) => self.written[d].clear(),
                (Some(p), Some(s)) => {
                    let (pc, sc) = (p.info.changes_number, s.info.changes_number);
                    let same_gen = p.info.generation_id == s.info.generation_id;
                    if same_gen && pc == sc {
                        let mono = p.map.iter().zip(&s.map).all(|(a, b)| b >= a);
                        self.check(mono, || {
                            format!("{dev}: a CBT value decreased without a take")
                        })?;
                    } else {
                        // A take: exactly one switch.
                        let expect = if pc == 255 { 1 } else { pc + 1 };
                        let wrapped = expect == 255;
                        self.check(sc == expect && same_gen != wrapped, || {
                            format!("{dev}: CBT switch {pc} -> {sc}, same generation {same_gen}")
                        })?;
                        self.stats.cbt_switches.0 += 1;
                        if wrapped {
                            self.stats.cbt_switches.1 += 1;
                        } else {
                            let missed = self.written[d]
                                .iter()
                                .copied()
                                .find(|&b| s.map.get(b as usize).copied() != Some(sc));
                            self.check(missed.is_none(), || {
                                format!("{dev}: block {missed:?} written since the last take but not {sc} in the CBT")
                            })?;
                        }
                        self.written[d].clear();
                    }
                }
                (None, None) => {}
            }
            self.cbt_seen[d] = now;
        }
        Ok(())
    }

    fn check_live(&mut self) -> Result<(), String> {
        let live = self.h.engine.live();
        let alive = self.members.len();
        let attached = self.cbt_seen.iter().filter(|s| s.is_some()).count();
        let taken_members: Vec<usize> = self
            .members
            .iter()
            .filter(|(id, _)| self.taken.contains(id))
            .flat_map(|(_, m)| m.iter().copied())
            .collect();
        let chunk_bound: u64 = taken_members.iter().map(|d| self.area_chunks[d]).sum();
        let expected = LiveCounts {
            snapshots: alive,
            trackers: attached,
            diff_areas: taken_members.len(),
            diff_storages: alive,
            chunks: live.chunks,
        };
        self.check(live == expected && live.chunks as u64 <= chunk_bound, || {
            format!("live objects {live:?}, expected {expected:?} with chunks <= {chunk_bound}")
        })
    }

    /// End of a run: drain every event queue (none may be lost), read every image whole, then
    /// destroy and detach everything: nothing may stay alive.
    pub fn finish(&mut self) -> Result<(), String> {
        for id in self.alive() {
            let snap = self.index_of(id);
            for _ in 0..=blksnap_model::limits::EVENT_QUEUE_CAPACITY {
                self.step(&Op::WaitEvent { snap, timeout_ms: 0 })?;
                if self.h.last.event.is_none() {
                    break;
                }
            }
            for &(sid, dev) in self.corrupt_seen.clone().keys() {
                if sid == id {
                    let popped = self.corrupted_popped.contains(&(sid, dev));
                    self.check(popped, || {
                        format!("the Corrupted event of {dev} in {id} was lost")
                    })?;
                }
            }
        }
        for d in self.frozen.keys().copied().collect::<Vec<_>>() {
            let sectors = self.disk_sectors[d];
            self.step(&Op::ImageRead { disk: d, sector: 0, sectors })?;
        }
        self.h.teardown()?;
        self.stats.invariant_checks += 1;
        self.trace(format!("{:>6} teardown -> Ok, nothing alive", self.h.ops_applied + 1));
        Ok(())
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
                    | Op::ImageWrite { disk, sector: s, sectors: n, .. } => {
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
                Op::ImageWrite { disk, sector, sectors, seed: self.rng.next_u64() as u8 }
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

// ---- the fault sweep ----------------------------------------------------------------------------

/// The sweep's disks: (sectors, io_min).
pub const SWEEP_DISKS: [(u64, u64); 3] = [(64, 1), (75, 1), (131, 16)];

/// The sweep's fixed workload: two snapshots (a growable File and v3 ranges) over three disks,
/// taken; overwrites with COW, image reads and writes, events, overflow of the v3 storage;
/// destroy; a second snapshot on a fixed-size File over the same disks, taken, overwritten, read;
/// then plain I/O without snapshots. The end-of-run drain, image reads and teardown follow.
pub fn sweep_workload() -> Vec<Op> {
    use Op::*;
    let file = |initial_sectors, limit_sectors, growable| Create {
        storage: StorageKind::File { initial_sectors, limit_sectors, growable },
    };
    vec![
        Attach { disk: 0 },
        Attach { disk: 1 },
        Attach { disk: 2 },
        Write { disk: 0, sector: 0, sectors: 64, seed: 11 },
        file(0, 200, true),
        Add { snap: 0, disk: 0 },
        Add { snap: 0, disk: 1 },
        Create { storage: StorageKind::Ranges },
        Add { snap: 1, disk: 2 },
        Append {
            snap: 1,
            backend: 0,
            ranges: vec![SectorRange::new(0, 48), SectorRange::new(100, 40)],
        },
        Take { snap: 0 },
        Take { snap: 1 },
        Write { disk: 0, sector: 0, sectors: 16, seed: 1 },
        Write { disk: 0, sector: 4, sectors: 12, seed: 2 },
        Discard { disk: 1, sector: 8, sectors: 16 },
        WriteZeroes { disk: 2, sector: 0, sectors: 20 },
        Write { disk: 2, sector: 60, sectors: 20, seed: 3 },
        ImageRead { disk: 0, sector: 0, sectors: 64 },
        ImageWrite { disk: 0, sector: 3, sectors: 10, seed: 4 },
        ImageWrite { disk: 1, sector: 16, sectors: 8, seed: 5 },
        ImageRead { disk: 1, sector: 0, sectors: 75 },
        ImageRead { disk: 2, sector: 0, sectors: 131 },
        Read { disk: 0, sector: 0, sectors: 64 },
        Write { disk: 1, sector: 0, sectors: 75, seed: 6 },
        WaitEvent { snap: 0, timeout_ms: 0 },
        WaitEvent { snap: 1, timeout_ms: 10 },
        Write { disk: 2, sector: 0, sectors: 131, seed: 7 },
        WaitEvent { snap: 1, timeout_ms: 0 },
        WaitEvent { snap: 1, timeout_ms: 0 },
        ImageRead { disk: 2, sector: 0, sectors: 8 },
        Destroy { snap: 0 },
        file(100, 100, false),
        Add { snap: 2, disk: 0 },
        Add { snap: 2, disk: 1 },
        Take { snap: 2 },
        Write { disk: 0, sector: 8, sectors: 32, seed: 8 },
        ImageWrite { disk: 0, sector: 0, sectors: 8, seed: 9 },
        ImageRead { disk: 0, sector: 0, sectors: 64 },
        Write { disk: 1, sector: 50, sectors: 10, seed: 10 },
        CbtMap { disk: 0, offset: 0, length: 8 },
        Destroy { snap: 1 },
        Write { disk: 2, sector: 0, sectors: 8, seed: 12 },
        Read { disk: 2, sector: 0, sectors: 131 },
    ]
}

/// One sweep run's result.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepRun {
    /// Origin writes that returned an error.
    pub origin_write_errors: u64,
    /// Diff areas corrupted.
    pub corruptions: u64,
    /// Operations that returned an error.
    pub failed_ops: u64,
}

/// What the sweep did.
#[derive(Clone, Debug, Default)]
pub struct SweepReport {
    /// I/Os of the fault-free run (= values of k swept with EIO).
    pub ios: usize,
    /// Of them, writes (swept again with a torn write).
    pub writes: usize,
    /// Runs made (the counting run included).
    pub runs: usize,
    /// Runs in which an origin write failed (and was checked: prefix or old data, never loss).
    pub runs_with_origin_write_error: usize,
    /// Runs in which more diff areas were corrupted than in the fault-free run.
    pub runs_with_corruption: usize,
    /// Runs in which more operations failed than in the fault-free run (the fault surfaced).
    pub runs_with_more_errors: usize,
    /// The fault-free run.
    pub baseline: SweepRun,
    /// I/Os per (target, op) of the counting run.
    pub by_kind: BTreeMap<(IoTarget, IoOp), usize>,
    /// Failures: "k=…, fault …: message" with the trace tail.
    pub failures: Vec<String>,
}

fn sweep_setups() -> Vec<DiskSetup> {
    SWEEP_DISKS
        .iter()
        .enumerate()
        .map(|(i, &(sectors, io_min_sectors))| DiskSetup {
            id: DeviceId::new(8, i as u32),
            sectors,
            io_min_sectors,
        })
        .collect()
}

/// Runs the sweep workload once, with `injection` if given; records the I/O when asked.
pub fn sweep_run(
    injection: Option<Injection>,
    record: bool,
) -> Result<(SweepRun, Vec<IoRecord>), String> {
    let mut c = Checker::new(&sweep_setups(), 5, None);
    c.h.record_io(record);
    c.injection = injection;
    let fail = |c: &Checker, m: String| format!("{m}\n    {}", c.tail().join("\n    "));
    for op in sweep_workload() {
        c.step(&op).map_err(|m| fail(&c, m))?;
    }
    c.finish().map_err(|m| fail(&c, m))?;
    if injection.is_some() {
        // The pinned fault fired on both sides: the model and the engine saw the same I/O.
        let (fired, pending) = (c.h.faults_fired(), c.h.model.pending_faults());
        if fired != 1 || pending != 0 {
            return Err(fail(
                &c,
                format!("fault fired {fired} times in the engine, model left {pending} armed"),
            ));
        }
    }
    let origin_write_errors = ["write", "discard", "write_zeroes"]
        .iter()
        .map(|k| c.stats.ops.get(k).map_or(0, |(_, f)| *f))
        .sum();
    let failed_ops = c.stats.ops.values().map(|(_, f)| f).sum();
    let run = SweepRun { origin_write_errors, corruptions: c.stats.corruptions, failed_ops };
    Ok((run, c.h.io_records()))
}

/// The fault sweep: count the I/Os of the fixed workload, then fail each one (EIO; torn as well
/// for writes) in a run of its own. `progress(k, total)` is called before each k.
pub fn sweep(mut progress: impl FnMut(usize, usize)) -> SweepReport {
    let mut report = SweepReport::default();
    let records = match sweep_run(None, true) {
        Ok((baseline, records)) => {
            report.baseline = baseline;
            records
        }
        Err(m) => {
            report.failures.push(format!("the fault-free run failed: {m}"));
            return report;
        }
    };
    report.runs = 1;
    report.ios = records.len();
    // Ordinal of each I/O among those of its operation, target and kind.
    let mut counters: BTreeMap<(u64, IoTarget, Option<bool>, bool), u64> = BTreeMap::new();
    let mut plans = Vec::new();
    for rec in &records {
        *report.by_kind.entry((rec.target, rec.op)).or_default() += 1;
        let is_write = rec.op.kind().map(|k| k == IoKind::Write);
        let key = (rec.step, rec.target, is_write, rec.op == IoOp::SetLen);
        let ordinal = *counters.get(&key).unwrap_or(&0);
        counters.insert(key, ordinal + 1);
        let errno = if rec.op == IoOp::SetLen { Errno::ENOSPC } else { Errno::EIO };
        plans.push(Injection { rec: *rec, ordinal, fault: Fault::Error(errno) });
        if rec.op.kind() == Some(IoKind::Write) {
            report.writes += 1;
            let len_sectors = rec.len_bytes / SECTOR_SIZE_BYTES;
            let sectors_written = len_sectors.div_ceil(2);
            let fault = Fault::Torn { sectors_written, errno: Errno::EIO };
            plans.push(Injection { rec: *rec, ordinal, fault });
        }
    }
    for (k, inj) in plans.iter().enumerate() {
        progress(k, plans.len());
        report.runs += 1;
        match sweep_run(Some(*inj), false) {
            Ok((run, _)) => {
                let base = report.baseline;
                report.runs_with_origin_write_error += usize::from(run.origin_write_errors > 0);
                report.runs_with_corruption += usize::from(run.corruptions > base.corruptions);
                report.runs_with_more_errors += usize::from(run.failed_ops > base.failed_ops);
            }
            Err(m) => report.failures.push(format!(
                "k={} ({:?} {:?} at step {}), {:?}: {m}",
                k, inj.rec.target, inj.rec.op, inj.rec.step, inj.fault
            )),
        }
    }
    report
}

impl SweepReport {
    /// The human-readable summary.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "fault sweep over a fixed workload ({} disks)", SWEEP_DISKS.len());
        let kinds: Vec<String> =
            self.by_kind.iter().map(|((t, o), n)| format!("{t:?} {o:?} {n}")).collect();
        let _ = writeln!(s, "  I/Os in the fault-free run   {} ({})", self.ios, kinds.join(", "));
        let _ = writeln!(
            s,
            "  k swept                      {} with EIO, {} writes again torn; {} runs",
            self.ios, self.writes, self.runs
        );
        let _ = writeln!(
            s,
            "  runs where the fault surfaced {} (more failed operations than the fault-free run)",
            self.runs_with_more_errors
        );
        let _ = writeln!(
            s,
            "  runs with an origin-write error {} (device left old data or a prefix: checked)",
            self.runs_with_origin_write_error
        );
        let _ = writeln!(
            s,
            "  runs with an extra corruption {} (fault-free run: {} diff areas corrupted)",
            self.runs_with_corruption, self.baseline.corruptions
        );
        let _ = write!(s, "  failures                     {}", self.failures.len());
        for f in &self.failures {
            let _ = write!(s, "\n  - {f}");
        }
        s
    }
}
