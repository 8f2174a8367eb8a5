//! Test harnesses shared by the differential tests, the seeded simulation and the checkers.
//!
//! [`Harness`] drives the model and the engine (single-threaded) with the same [`Op`]s over
//! equivalent devices and compares every observable result: return codes, bytes read from
//! devices and images, cbtinfo/cbtmap bytes, snapshot info, storage accounting and events.
//!
//! Every engine-side device is wrapped in a [`LogDev`] that counts (and on request records) each
//! I/O with the op that issued it, so the simulation can report I/O totals and the fault sweep
//! can fail exactly the k-th I/O on both sides. [`Harness::last`] keeps the result of the last
//! operation for the simulation's own invariants and trace.

pub mod concurrent;
pub mod sim;

use std::sync::Mutex;

use blksnap_engine::io::{BlockDev, Dev, Fault, FaultDev, FaultPlan, MemDev};
use blksnap_engine::sync::{Arc, StdArc};
use blksnap_engine::{Clock, Engine, EngineConfig, LiveCounts, StorageSpec};
use blksnap_model::{
    DeviceId, Errno, Event, FaultTarget, InjectedFault, IoKind, Model, Params, Result, SectorRange,
    SnapshotId, StorageMode, Uuid, SECTOR_SIZE_BYTES,
};

/// How a test snapshot's storage is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageKind {
    /// v3 ranges (appended later with [`Op::Append`]).
    Ranges,
    /// newest: a file of `initial_sectors` growable to `limit_sectors`, or a fixed block device.
    File {
        /// Size at create.
        initial_sectors: u64,
        /// The limit.
        limit_sectors: u64,
        /// A regular file (true) or a block device (false).
        growable: bool,
    },
}

/// One operation, applied to both sides. Snapshot and device references are indices, resolved
/// modulo what exists (an index past the created snapshots names an unknown id).
#[derive(Clone, Debug)]
#[allow(missing_docs)]
pub enum Op {
    Attach {
        disk: usize,
    },
    Detach {
        disk: usize,
    },
    CbtInfo {
        disk: usize,
    },
    CbtMap {
        disk: usize,
        offset: u32,
        length: u32,
    },
    CbtDirty {
        disk: usize,
        ranges: Vec<SectorRange>,
    },
    Create {
        storage: StorageKind,
    },
    Destroy {
        snap: usize,
    },
    Append {
        snap: usize,
        backend: usize,
        ranges: Vec<SectorRange>,
    },
    Add {
        snap: usize,
        disk: usize,
    },
    Take {
        snap: usize,
    },
    Collect,
    Info {
        disk: usize,
    },
    WaitEvent {
        snap: usize,
        timeout_ms: u32,
    },
    Read {
        disk: usize,
        sector: u64,
        sectors: u64,
    },
    Write {
        disk: usize,
        sector: u64,
        sectors: u64,
        seed: u8,
    },
    Discard {
        disk: usize,
        sector: u64,
        sectors: u64,
    },
    WriteZeroes {
        disk: usize,
        sector: u64,
        sectors: u64,
    },
    ImageRead {
        disk: usize,
        sector: u64,
        sectors: u64,
    },
    ImageWrite {
        disk: usize,
        sector: u64,
        sectors: u64,
        seed: u8,
    },
    /// An image's discard / write-zeroes (`Engine::image_write_zeroes`); the model's answer is
    /// its `image_write` of zeroes.
    ImageWriteZeroes {
        disk: usize,
        sector: u64,
        sectors: u64,
    },
    Fault {
        target: Option<usize>,
        kind: IoKind,
        errno: Errno,
    },
    /// The next write on the target (an origin, or the storage for `None`) is torn: its first
    /// `sectors_written` sectors land, then it fails with `errno`.
    TornFault {
        target: Option<usize>,
        sectors_written: u64,
        errno: Errno,
    },
    FailGrowth {
        errno: Errno,
    },
    SetStorageMinimum {
        sectors: u64,
    },
    /// New chunk and CBT block minimum shifts (later attaches and takes use them).
    SetShifts {
        chunk_minimum_shift: u32,
        tracking_block_minimum_shift: u32,
    },
    AdvanceClock {
        ns: u64,
    },
}

/// Which device an I/O went to: an origin (disk index) or any storage backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IoTarget {
    /// The origin of disk `i` (harness order).
    Origin(usize),
    /// A difference-storage backend (File storages and append backends share one plan).
    Storage,
}

/// The calls of [`BlockDev`] that a [`FaultPlan`] counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IoOp {
    /// `read_at`.
    Read,
    /// `write_at`.
    Write,
    /// `write_zeroes_at` (a write for fault injection).
    WriteZeroes,
    /// `set_len` (a File storage's growth).
    SetLen,
    /// `flush`.
    Flush,
}

impl IoOp {
    /// Every op, in report order.
    pub const ALL: [IoOp; 5] =
        [IoOp::Read, IoOp::Write, IoOp::WriteZeroes, IoOp::SetLen, IoOp::Flush];

    /// The fault-injection kind of a read or write; `None` for `set_len` and `flush`.
    pub fn kind(self) -> Option<IoKind> {
        match self {
            IoOp::Read => Some(IoKind::Read),
            IoOp::Write | IoOp::WriteZeroes => Some(IoKind::Write),
            IoOp::SetLen | IoOp::Flush => None,
        }
    }
}

/// One I/O the engine issued, as a [`LogDev`] saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoRecord {
    /// The harness operation that issued it ([`Harness::ops_applied`] during it, 1-based).
    pub step: u64,
    /// Where it went.
    pub target: IoTarget,
    /// What it was.
    pub op: IoOp,
    /// Its index in the target's [`FaultPlan`] (what [`FaultPlan::fail_at`] takes).
    pub plan_index: u64,
    /// Bytes asked for (0 for `flush`; the new length for `set_len`).
    pub len_bytes: u64,
    /// Whether it failed (injected or not).
    pub failed: bool,
}

/// I/O totals per target kind (`[origin, storage]`) and op ([`IoOp::ALL`] order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoTotals {
    /// Calls.
    pub calls: [[u64; 5]; 2],
    /// Bytes of the calls that succeeded (reads and writes only).
    pub bytes: [[u64; 5]; 2],
    /// Calls that failed.
    pub failed: [[u64; 5]; 2],
}

#[derive(Debug, Default)]
struct IoLogState {
    step: u64,
    recording: bool,
    records: Vec<IoRecord>,
    totals: IoTotals,
}

/// The I/O log shared by every [`LogDev`] of one harness.
#[derive(Debug, Default)]
pub struct IoLog {
    state: Mutex<IoLogState>,
}

impl IoLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, IoLogState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn note(&self, target: IoTarget, op: IoOp, plan_index: u64, len_bytes: u64, failed: bool) {
        let mut st = self.lock();
        let (t, o) = (usize::from(target == IoTarget::Storage), op as usize);
        st.totals.calls[t][o] += 1;
        if failed {
            st.totals.failed[t][o] += 1;
        } else if matches!(op, IoOp::Read | IoOp::Write | IoOp::WriteZeroes) {
            st.totals.bytes[t][o] += len_bytes;
        }
        if st.recording {
            let step = st.step;
            st.records.push(IoRecord { step, target, op, plan_index, len_bytes, failed });
        }
    }
}

/// A device wrapper that tells the [`IoLog`] about every counted call it passes to the
/// [`FaultDev`] below it, with the plan index that call gets.
pub struct LogDev {
    inner: Dev,
    plan: Arc<FaultPlan>,
    target: IoTarget,
    log: StdArc<IoLog>,
}

impl LogDev {
    fn call<T>(&self, op: IoOp, len_bytes: u64, f: impl FnOnce() -> Result<T>) -> Result<T> {
        // Single-threaded harness: the index read here is the one the plan gives this call.
        let plan_index = self.plan.ops_seen();
        let r = f();
        self.log.note(self.target, op, plan_index, len_bytes, r.is_err());
        r
    }
}

impl BlockDev for LogDev {
    fn len_bytes(&self) -> u64 {
        self.inner.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<()> {
        let len = buf.len() as u64;
        self.call(IoOp::Read, len, || self.inner.read_at(buf, offset_bytes))
    }
    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> Result<()> {
        self.call(IoOp::Write, buf.len() as u64, || self.inner.write_at(buf, offset_bytes))
    }
    fn write_zeroes_at(&self, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        self.call(IoOp::WriteZeroes, len_bytes, || {
            self.inner.write_zeroes_at(offset_bytes, len_bytes)
        })
    }
    fn flush(&self) -> Result<()> {
        self.call(IoOp::Flush, 0, || self.inner.flush())
    }
    fn can_grow(&self) -> bool {
        self.inner.can_grow()
    }
    fn set_len(&self, len_bytes: u64) -> Result<()> {
        self.call(IoOp::SetLen, len_bytes, || self.inner.set_len(len_bytes))
    }
}

/// What the last [`Harness::apply`] returned (both sides agreed on it, or it was the mismatch).
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// One short line: `Ok`, `Ok(value)`, `Ok(#hash)` for long values, `Err(ERRNO)`, `armed`.
    pub summary: String,
    /// The errno, if the operation failed.
    pub errno: Option<Errno>,
    /// The bytes a successful `Read` or `ImageRead` returned.
    pub bytes: Option<Vec<u8>>,
    /// The event a successful `WaitEvent` returned.
    pub event: Option<Event>,
}

/// FNV-1a, for short stable digests in traces.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

fn summarize<T: std::fmt::Debug>(r: &Result<T>) -> String {
    match r {
        Ok(v) => {
            let text = format!("{v:?}");
            if text == "()" {
                "Ok".to_string()
            } else if text.len() > 64 {
                format!("Ok(#{:016x})", fnv1a(text.as_bytes()))
            } else {
                format!("Ok({text})")
            }
        }
        Err(e) => format!("Err({:?})", e.errno),
    }
}

/// Two long texts cut to a window around their first difference (short ones stay whole).
fn clip_pair(a: &str, b: &str) -> (String, String) {
    const LIMIT: usize = 240;
    if a.len() <= LIMIT && b.len() <= LIMIT {
        return (a.to_string(), b.to_string());
    }
    let first_diff = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    let clip = |t: &str| {
        let mut start = first_diff.saturating_sub(60).min(t.len());
        while !t.is_char_boundary(start) {
            start -= 1;
        }
        let mut end = (first_diff + 120).min(t.len());
        while !t.is_char_boundary(end) {
            end += 1;
        }
        format!("[{} chars, differing from char {first_diff}] …{}…", t.len(), &t[start..end])
    };
    (clip(a), clip(b))
}

fn to_model_fault(fault: Fault) -> InjectedFault {
    match fault {
        Fault::Error(errno) => InjectedFault::Error(errno),
        Fault::Torn { sectors_written, errno } => InjectedFault::Torn { sectors_written, errno },
    }
}

/// A disk of the harness.
pub struct DiskSetup {
    /// Its id.
    pub id: DeviceId,
    /// Capacity in sectors.
    pub sectors: u64,
    /// io_min in sectors.
    pub io_min_sectors: u64,
}

/// [`Harness::check_state`] compares the storage of every alive snapshot and of this many of the
/// most recently created ids.
pub const RECENT_IDS_CHECKED: usize = 16;

/// Sectors of each v3 storage backend (append targets).
pub const APPEND_BACKEND_SECTORS: u64 = 512;
/// Number of v3 storage backends.
pub const APPEND_BACKENDS: usize = 2;

/// The model and the engine side by side.
pub struct Harness {
    /// The specification.
    pub model: Model,
    /// The implementation.
    pub engine: StdArc<Engine>,
    pub(crate) disks: Vec<DeviceId>,
    disk_plans: Vec<Arc<FaultPlan>>,
    pub(crate) storage_plan: Arc<FaultPlan>,
    append_backends: Vec<Dev>,
    /// The origins' memory, under the fault and log layers: read without counting an I/O.
    origin_mem: Vec<Dev>,
    pub(crate) io_log: StdArc<IoLog>,
    /// The result of the last [`Harness::apply`].
    pub last: Outcome,
    /// Every id created so far (destroyed ones stay: they must then be unknown to both).
    pub snapshots: Vec<SnapshotId>,
    /// Operations applied.
    pub ops_applied: u64,
    /// Comparisons made (each one an invariant that held).
    pub checks: u64,
}

/// A mismatch between model and engine: the test fails with this text.
pub type Mismatch = String;

/// The bytes an `Op::Write` or `Op::ImageWrite` of `sectors` with `seed` writes.
pub fn data_of(sectors: u64, seed: u8) -> Vec<u8> {
    let len = (sectors * SECTOR_SIZE_BYTES) as usize;
    (0..len).map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 9) as u8).collect()
}

/// The bytes an `Op::ImageWriteZeroes` of `sectors` writes, as the model is told them.
pub fn zeroes_of(sectors: u64) -> Vec<u8> {
    vec![0; (sectors * SECTOR_SIZE_BYTES) as usize]
}

/// An origin write the way `seed` picks: odd seeds take the ublk queue's asynchronous path
/// (`Engine::try_write_begin`; with a ticket the caller writes the backing itself, as the queue
/// does, without one `Engine::write`), even seeds `Engine::write`. The model's write either way:
/// the two paths must be indistinguishable.
pub fn engine_write(
    e: &Engine,
    dev: DeviceId,
    offset_bytes: u64,
    data: &[u8],
    seed: u8,
) -> Result<()> {
    if seed.is_multiple_of(2) {
        return e.write(dev, offset_bytes, data);
    }
    match e.try_write_begin(dev, offset_bytes, data.len() as u64)? {
        Some(ticket) => ticket.backend().write_at(data, offset_bytes),
        None => e.write(dev, offset_bytes, data),
    }
}

impl Harness {
    /// A harness with `disks`, parameters `params`, ids seeded with `seed`.
    pub fn new(params: Params, disks: &[DiskSetup], seed: u64) -> Harness {
        let mut model = Model::new(params, seed).expect("valid params");
        let config = EngineConfig { params, id_seed: Some(seed), clock: Clock::manual(true) };
        let engine = StdArc::new(Engine::new(config).expect("valid params"));
        let io_log = StdArc::new(IoLog::default());
        let mut disk_plans = Vec::new();
        let mut origin_mem = Vec::new();
        for (i, d) in disks.iter().enumerate() {
            let plan = FaultPlan::shared();
            let mem: Dev = StdArc::new(MemDev::new(d.sectors * SECTOR_SIZE_BYTES));
            origin_mem.push(mem.clone());
            let dev = Self::logged(mem, &plan, IoTarget::Origin(i), &io_log);
            engine.add_disk(d.id, dev, d.io_min_sectors).expect("add disk");
            model
                .add_disk(d.id, d.sectors * SECTOR_SIZE_BYTES, d.io_min_sectors)
                .expect("add disk");
            disk_plans.push(plan);
        }
        let storage_plan = FaultPlan::shared();
        let append_backends = (0..APPEND_BACKENDS)
            .map(|_| {
                let mem: Dev = StdArc::new(MemDev::new(APPEND_BACKEND_SECTORS * SECTOR_SIZE_BYTES));
                Self::logged(mem, &storage_plan, IoTarget::Storage, &io_log)
            })
            .collect();
        Harness {
            model,
            engine,
            disks: disks.iter().map(|d| d.id).collect(),
            disk_plans,
            storage_plan,
            append_backends,
            origin_mem,
            io_log,
            last: Outcome::default(),
            snapshots: Vec::new(),
            ops_applied: 0,
            checks: 0,
        }
    }

    /// `mem` under a fault layer on `plan`, under a log layer.
    fn logged(mem: Dev, plan: &Arc<FaultPlan>, target: IoTarget, log: &StdArc<IoLog>) -> Dev {
        let inner: Dev = StdArc::new(FaultDev::new(mem, plan.clone()));
        StdArc::new(LogDev { inner, plan: plan.clone(), target, log: log.clone() })
    }

    fn disk(&self, i: usize) -> DeviceId {
        self.disks[i % self.disks.len()]
    }

    /// The id of disk index `i` (modulo the disk count, as in [`Op`]s).
    pub fn disk_id(&self, i: usize) -> DeviceId {
        self.disk(i)
    }

    /// Number of disks.
    pub fn disk_count(&self) -> usize {
        self.disks.len()
    }

    /// The snapshot id that snapshot index `i` names in an [`Op`] (possibly an unknown one).
    pub fn snapshot_id(&self, i: usize) -> SnapshotId {
        self.snap(i)
    }

    /// `len_bytes` of disk `i`'s origin at `offset_bytes`, read below the fault layer: no I/O is
    /// counted and no fault fires. Panics past the end.
    pub fn peek_origin(&self, i: usize, offset_bytes: u64, len_bytes: u64) -> Vec<u8> {
        let mut buf = vec![0u8; len_bytes as usize];
        self.origin_mem[i % self.origin_mem.len()]
            .read_at(&mut buf, offset_bytes)
            .expect("a peek inside the origin");
        buf
    }

    /// Start (or stop) recording every I/O in [`Harness::io_records`].
    pub fn record_io(&mut self, on: bool) {
        self.io_log.lock().recording = on;
    }

    /// The I/Os recorded so far, in issue order.
    pub fn io_records(&self) -> Vec<IoRecord> {
        self.io_log.lock().records.clone()
    }

    /// I/O totals since the harness was made.
    pub fn io_totals(&self) -> IoTotals {
        self.io_log.lock().totals
    }

    /// Engine-side fault rules that fired so far (every plan).
    pub fn faults_fired(&self) -> u64 {
        self.disk_plans.iter().chain([&self.storage_plan]).map(|p| p.faults_fired()).sum()
    }

    /// Engine-side fault rules still armed (every plan).
    pub fn faults_pending(&self) -> usize {
        self.disk_plans.iter().chain([&self.storage_plan]).map(|p| p.pending()).sum()
    }

    /// Withdraw every armed fault on both sides.
    pub fn clear_faults(&mut self) {
        self.model.clear_faults();
        for plan in self.disk_plans.iter().chain([&self.storage_plan]) {
            plan.clear();
        }
    }

    /// Fail, on both sides, the I/O that `rec` describes in a rerun of the same operations:
    /// the engine's plan pins `fault` to `rec.plan_index`; the model lets `ordinal` earlier I/Os
    /// of the same target and kind in the same operation pass (`set_len` → a growth fault).
    /// Call it before the operation `rec.step` is applied; a `flush` has no model side.
    pub fn fail_io(&mut self, rec: &IoRecord, ordinal: u64, fault: Fault) {
        let (plan, target) = match rec.target {
            IoTarget::Origin(i) => (&self.disk_plans[i], FaultTarget::Origin(self.disks[i])),
            IoTarget::Storage => (&self.storage_plan, FaultTarget::Storage),
        };
        plan.fail_at(rec.plan_index, fault);
        match rec.op.kind() {
            Some(kind) => self.model.fail_nth(target, kind, ordinal, to_model_fault(fault)),
            None if rec.op == IoOp::SetLen => self.model.fail_nth_growth(ordinal, fault.errno()),
            None => {}
        }
    }

    pub(crate) fn snap(&self, i: usize) -> SnapshotId {
        if self.snapshots.is_empty() || i >= self.snapshots.len() * 2 {
            // An id nobody created.
            return Uuid([0xee; 16]);
        }
        self.snapshots[i % self.snapshots.len()]
    }

    fn same<T: PartialEq + std::fmt::Debug>(
        &mut self,
        what: &str,
        m: &Result<T>,
        e: &Result<T>,
    ) -> std::result::Result<(), Mismatch> {
        self.checks += 1;
        if self.last.summary.is_empty() {
            self.last.summary = summarize(m);
            self.last.errno = m.as_ref().err().map(|e| e.errno);
        }
        let equal = match (m, e) {
            (Ok(a), Ok(b)) => a == b,
            (Err(a), Err(b)) => a.errno == b.errno,
            _ => false,
        };
        if equal {
            Ok(())
        } else {
            let (m, e) = clip_pair(&format!("{m:?}"), &format!("{e:?}"));
            Err(format!("{what}: model {m} vs engine {e}"))
        }
    }

    /// The model's storage mode and initial sectors for `kind`.
    pub(crate) fn model_storage(kind: StorageKind) -> (StorageMode, u64) {
        match kind {
            StorageKind::Ranges => (StorageMode::Ranges, 0),
            StorageKind::File { initial_sectors, limit_sectors, growable } => {
                (StorageMode::File { limit_sectors, growable }, initial_sectors)
            }
        }
    }

    /// The engine's storage for `kind`: a memory file under the storage fault plan and the log.
    pub(crate) fn engine_storage(
        kind: StorageKind,
        plan: &Arc<FaultPlan>,
        log: &StdArc<IoLog>,
    ) -> StorageSpec {
        match kind {
            StorageKind::Ranges => StorageSpec::Ranges,
            StorageKind::File { initial_sectors, limit_sectors, growable } => {
                let len = initial_sectors * SECTOR_SIZE_BYTES;
                let mem: Dev = if growable {
                    StdArc::new(MemDev::growable(len, u64::MAX / 2))
                } else {
                    StdArc::new(MemDev::new(len))
                };
                let backend = Self::logged(mem, plan, IoTarget::Storage, log);
                StorageSpec::File { backend, limit_sectors }
            }
        }
    }

    /// Apply `op` to both sides and compare. Returns the first mismatch.
    pub fn apply(&mut self, op: &Op) -> std::result::Result<(), Mismatch> {
        self.ops_applied += 1;
        self.io_log.lock().step = self.ops_applied;
        self.last = Outcome::default();
        let what = format!("{op:?}");
        match op.clone() {
            Op::Attach { disk } => {
                let d = self.disk(disk);
                let (m, e) = (self.model.attach(d), self.engine.attach(d));
                self.same(&what, &m, &e)
            }
            Op::Detach { disk } => {
                let d = self.disk(disk);
                let (m, e) = (self.model.detach(d), self.engine.detach(d));
                self.same(&what, &m, &e)
            }
            Op::CbtInfo { disk } => {
                let d = self.disk(disk);
                let (m, e) = (self.model.cbt_info(d), self.engine.cbt_info(d));
                self.same(&what, &m, &e)
            }
            Op::CbtMap { disk, offset, length } => {
                let d = self.disk(disk);
                let m = self.model.cbt_map(d, offset, length);
                let mut buf = Vec::new();
                let e = self.engine.cbt_map(d, offset, length, &mut buf).map(|()| buf);
                self.same(&what, &m, &e)
            }
            Op::CbtDirty { disk, ranges } => {
                let d = self.disk(disk);
                let (m, e) = (self.model.cbt_dirty(d, &ranges), self.engine.cbt_dirty(d, &ranges));
                self.same(&what, &m, &e)
            }
            Op::Create { storage } => {
                let (mode, initial) = Self::model_storage(storage);
                let spec = Self::engine_storage(storage, &self.storage_plan, &self.io_log);
                let m = self.model.snapshot_create(mode, initial);
                let e = self.engine.snapshot_create(spec);
                if let Ok(id) = &m {
                    self.snapshots.push(*id);
                }
                self.same(&what, &m, &e)
            }
            Op::Destroy { snap } => {
                let s = self.snap(snap);
                let (m, e) = (self.model.snapshot_destroy(s), self.engine.snapshot_destroy(s));
                self.same(&what, &m, &e)
            }
            Op::Append { snap, backend, ranges } => {
                let s = self.snap(snap);
                let b = backend % APPEND_BACKENDS;
                let m = self.model.snapshot_append_storage(
                    s,
                    b as u32,
                    APPEND_BACKEND_SECTORS,
                    &ranges,
                );
                let e = self.engine.snapshot_append_storage(
                    s,
                    self.append_backends[b].clone(),
                    &ranges,
                );
                self.same(&what, &m, &e)
            }
            Op::Add { snap, disk } => {
                let (s, d) = (self.snap(snap), self.disk(disk));
                let (m, e) = (self.model.snapshot_add(s, d), self.engine.snapshot_add(s, d));
                self.same(&what, &m, &e)
            }
            Op::Take { snap } => {
                let s = self.snap(snap);
                let (m, e) = (self.model.snapshot_take(s), self.engine.snapshot_take(s));
                self.same(&what, &m, &e)
            }
            Op::Collect => {
                let (m, e) = (self.model.snapshot_collect(), self.engine.snapshot_collect());
                self.same(&what, &Ok(m), &Ok(e))
            }
            Op::Info { disk } => {
                let d = self.disk(disk);
                let (m, e) = (self.model.snapshot_info(d), self.engine.snapshot_info(d));
                self.same(&what, &m, &e)
            }
            Op::WaitEvent { snap, timeout_ms } => {
                let s = self.snap(snap);
                let m = self.model.wait_event(s, timeout_ms);
                let e = self.engine.wait_event(s, timeout_ms);
                self.last.event = m.as_ref().ok().cloned();
                self.same(&what, &m, &e)
            }
            Op::Read { disk, sector, sectors } => {
                let d = self.disk(disk);
                let (off, len) = (sector * SECTOR_SIZE_BYTES, sectors * SECTOR_SIZE_BYTES);
                let m = self.model.read(d, off, len);
                let mut buf = vec![0u8; len as usize];
                let e = self.engine.read(d, off, &mut buf).map(|()| buf);
                self.last.bytes = m.as_ref().ok().cloned();
                self.same(&what, &m, &e)
            }
            Op::Write { disk, sector, sectors, seed } => {
                let d = self.disk(disk);
                let data = data_of(sectors, seed);
                let off = sector * SECTOR_SIZE_BYTES;
                let m = self.model.write(d, off, &data);
                let e = engine_write(&self.engine, d, off, &data, seed);
                self.same(&what, &m, &e)
            }
            Op::Discard { disk, sector, sectors } => {
                let d = self.disk(disk);
                let (off, len) = (sector * SECTOR_SIZE_BYTES, sectors * SECTOR_SIZE_BYTES);
                let (m, e) = (self.model.discard(d, off, len), self.engine.discard(d, off, len));
                self.same(&what, &m, &e)
            }
            Op::WriteZeroes { disk, sector, sectors } => {
                let d = self.disk(disk);
                let (off, len) = (sector * SECTOR_SIZE_BYTES, sectors * SECTOR_SIZE_BYTES);
                let m = self.model.write_zeroes(d, off, len);
                let e = self.engine.write_zeroes(d, off, len);
                self.same(&what, &m, &e)
            }
            Op::ImageRead { disk, sector, sectors } => {
                let d = self.disk(disk);
                let (off, len) = (sector * SECTOR_SIZE_BYTES, sectors * SECTOR_SIZE_BYTES);
                let m = self.model.image_read(d, off, len);
                let mut buf = vec![0u8; len as usize];
                let e = self.engine.image_read(d, off, &mut buf).map(|()| buf);
                self.last.bytes = m.as_ref().ok().cloned();
                self.same(&what, &m, &e)
            }
            Op::ImageWrite { disk, sector, sectors, seed } => {
                let d = self.disk(disk);
                let data = data_of(sectors, seed);
                let off = sector * SECTOR_SIZE_BYTES;
                let m = self.model.image_write(d, off, &data);
                let e = self.engine.image_write(d, off, &data);
                self.same(&what, &m, &e)
            }
            Op::ImageWriteZeroes { disk, sector, sectors } => {
                let d = self.disk(disk);
                let (off, len) = (sector * SECTOR_SIZE_BYTES, sectors * SECTOR_SIZE_BYTES);
                let m = self.model.image_write(d, off, &zeroes_of(sectors));
                let e = self.engine.image_write_zeroes(d, off, len);
                self.same(&what, &m, &e)
            }
            Op::Fault { target, kind, errno } => {
                match target {
                    Some(i) => {
                        let i = i % self.disks.len();
                        self.model.fail_next(FaultTarget::Origin(self.disks[i]), kind, errno);
                        self.disk_plans[i].fail_next(kind, Fault::Error(errno));
                    }
                    None => {
                        self.model.fail_next(FaultTarget::Storage, kind, errno);
                        self.storage_plan.fail_next(kind, Fault::Error(errno));
                    }
                }
                self.last.summary = "armed".to_string();
                Ok(())
            }
            Op::TornFault { target, sectors_written, errno } => {
                let fault = Fault::Torn { sectors_written, errno };
                match target {
                    Some(i) => {
                        let i = i % self.disks.len();
                        let dev = self.disks[i];
                        self.model.fail_next_torn(FaultTarget::Origin(dev), sectors_written, errno);
                        self.disk_plans[i].fail_next(IoKind::Write, fault);
                    }
                    None => {
                        self.model.fail_next_torn(FaultTarget::Storage, sectors_written, errno);
                        self.storage_plan.fail_next(IoKind::Write, fault);
                    }
                }
                self.last.summary = "armed".to_string();
                Ok(())
            }
            Op::FailGrowth { errno } => {
                self.model.fail_next_growth(errno);
                self.storage_plan.fail_set_len(errno);
                self.last.summary = "armed".to_string();
                Ok(())
            }
            Op::SetStorageMinimum { sectors } => {
                let p = Params { diff_storage_minimum_sectors: sectors, ..self.model.params() };
                let (m, e) = (self.model.set_params(p), self.engine.set_params(p));
                self.same(&what, &m, &e)?;
                self.same("params after set", &Ok(self.model.params()), &Ok(self.engine.params()))
            }
            Op::SetShifts { chunk_minimum_shift, tracking_block_minimum_shift } => {
                let p = Params {
                    chunk_minimum_shift,
                    tracking_block_minimum_shift,
                    ..self.model.params()
                };
                let (m, e) = (self.model.set_params(p), self.engine.set_params(p));
                self.same(&what, &m, &e)?;
                self.same("params after set", &Ok(self.model.params()), &Ok(self.engine.params()))
            }
            Op::AdvanceClock { ns } => {
                self.model.advance_clock(ns);
                self.engine.advance_clock(ns);
                self.same("clock", &Ok(self.model.now_ns()), &Ok(self.engine.now_ns()))
            }
        }
    }

    /// Compare every piece of observable state that needs no I/O: CBT info and snapshot info of
    /// every disk, storage accounting of every snapshot id, the snapshot list.
    pub fn check_state(&mut self) -> std::result::Result<(), Mismatch> {
        for d in self.disks.clone() {
            let (m, e) = (self.model.cbt_info(d), self.engine.cbt_info(d));
            self.same(&format!("state cbt_info {d}"), &m, &e)?;
            if let Ok(info) = m {
                let m = self.model.cbt_map(d, 0, info.block_count);
                let mut buf = Vec::new();
                let e = self.engine.cbt_map(d, 0, info.block_count, &mut buf).map(|()| buf);
                self.same(&format!("state cbt_map {d}"), &m, &e)?;
            }
            let (m, e) = (self.model.snapshot_info(d), self.engine.snapshot_info(d));
            self.same(&format!("state snapshot_info {d}"), &m, &e)?;
        }
        // Every alive id, and the most recent ids (destroyed ones must be unknown to both): all
        // of them would make long simulations quadratic, and collect covers the rest.
        let mut ids = self.model.snapshot_collect();
        let recent = self.snapshots.len().saturating_sub(RECENT_IDS_CHECKED);
        ids.extend(
            self.snapshots[recent..].iter().filter(|id| !ids.contains(id)).collect::<Vec<_>>(),
        );
        for s in ids {
            let (m, e) = (self.model.storage_stats(s), self.engine.storage_stats(s));
            self.same(&format!("state storage_stats {s}"), &m, &e)?;
        }
        let (m, e) = (self.model.snapshot_collect(), self.engine.snapshot_collect());
        self.same("state collect", &Ok(m), &Ok(e))?;
        Ok(())
    }

    /// Destroy every snapshot and detach every disk on both sides; the engine must then hold
    /// no live object.
    pub fn teardown(&mut self) -> std::result::Result<(), Mismatch> {
        for s in self.snapshots.clone() {
            let (m, e) = (self.model.snapshot_destroy(s), self.engine.snapshot_destroy(s));
            self.same("teardown destroy", &m, &e)?;
        }
        for d in self.disks.clone() {
            let (m, e) = (self.model.detach(d), self.engine.detach(d));
            self.same("teardown detach", &m, &e)?;
        }
        let live = self.engine.live();
        if live != LiveCounts::default() {
            return Err(format!("objects alive after teardown: {live:?}"));
        }
        Ok(())
    }
}
