//! Test harnesses shared by the differential tests, the seeded simulation and the checkers.
//!
//! [`Harness`] drives the model and the engine (single-threaded) with the same [`Op`]s over
//! equivalent devices and compares every observable result: return codes, bytes read from
//! devices and images, cbtinfo/cbtmap bytes, snapshot info, storage accounting and events.

use blksnap_engine::io::{Dev, Fault, FaultDev, FaultPlan, MemDev};
use blksnap_engine::sync::{Arc, StdArc};
use blksnap_engine::{Clock, Engine, EngineConfig, LiveCounts, StorageSpec};
use blksnap_model::{
    DeviceId, Errno, FaultTarget, IoKind, Model, Params, Result, SectorRange, SnapshotId,
    StorageMode, Uuid, SECTOR_SIZE_BYTES,
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
    Attach { disk: usize },
    Detach { disk: usize },
    CbtInfo { disk: usize },
    CbtMap { disk: usize, offset: u32, length: u32 },
    CbtDirty { disk: usize, ranges: Vec<SectorRange> },
    Create { storage: StorageKind },
    Destroy { snap: usize },
    Append { snap: usize, backend: usize, ranges: Vec<SectorRange> },
    Add { snap: usize, disk: usize },
    Take { snap: usize },
    Collect,
    Info { disk: usize },
    WaitEvent { snap: usize, timeout_ms: u32 },
    Read { disk: usize, sector: u64, sectors: u64 },
    Write { disk: usize, sector: u64, sectors: u64, seed: u8 },
    Discard { disk: usize, sector: u64, sectors: u64 },
    WriteZeroes { disk: usize, sector: u64, sectors: u64 },
    ImageRead { disk: usize, sector: u64, sectors: u64 },
    ImageWrite { disk: usize, sector: u64, sectors: u64, seed: u8 },
    Fault { target: Option<usize>, kind: IoKind, errno: Errno },
    FailGrowth { errno: Errno },
    SetStorageMinimum { sectors: u64 },
    AdvanceClock { ns: u64 },
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

/// Sectors of each v3 storage backend (append targets).
pub const APPEND_BACKEND_SECTORS: u64 = 512;
/// Number of v3 storage backends.
pub const APPEND_BACKENDS: usize = 2;

/// The model and the engine side by side.
pub struct Harness {
    /// The specification.
    pub model: Model,
    /// The implementation.
    pub engine: Engine,
    disks: Vec<DeviceId>,
    disk_plans: Vec<Arc<FaultPlan>>,
    storage_plan: Arc<FaultPlan>,
    append_backends: Vec<Dev>,
    /// Every id created so far (destroyed ones stay: they must then be unknown to both).
    pub snapshots: Vec<SnapshotId>,
    /// Operations applied.
    pub ops_applied: u64,
    /// Comparisons made (each one an invariant that held).
    pub checks: u64,
}

/// A mismatch between model and engine: the test fails with this text.
pub type Mismatch = String;

fn data_of(sectors: u64, seed: u8) -> Vec<u8> {
    let len = (sectors * SECTOR_SIZE_BYTES) as usize;
    (0..len).map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 9) as u8).collect()
}

impl Harness {
    /// A harness with `disks`, parameters `params`, ids seeded with `seed`.
    pub fn new(params: Params, disks: &[DiskSetup], seed: u64) -> Harness {
        let mut model = Model::new(params, seed).expect("valid params");
        let config = EngineConfig { params, id_seed: Some(seed), clock: Clock::manual(true) };
        let engine = Engine::new(config).expect("valid params");
        let mut disk_plans = Vec::new();
        for d in disks {
            let plan = FaultPlan::shared();
            let mem: Dev = StdArc::new(MemDev::new(d.sectors * SECTOR_SIZE_BYTES));
            let dev: Dev = StdArc::new(FaultDev::new(mem, plan.clone()));
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
                StdArc::new(FaultDev::new(mem, storage_plan.clone())) as Dev
            })
            .collect();
        Harness {
            model,
            engine,
            disks: disks.iter().map(|d| d.id).collect(),
            disk_plans,
            storage_plan,
            append_backends,
            snapshots: Vec::new(),
            ops_applied: 0,
            checks: 0,
        }
    }

    fn disk(&self, i: usize) -> DeviceId {
        self.disks[i % self.disks.len()]
    }

    fn snap(&self, i: usize) -> SnapshotId {
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
        let equal = match (m, e) {
            (Ok(a), Ok(b)) => a == b,
            (Err(a), Err(b)) => a.errno == b.errno,
            _ => false,
        };
        if equal {
            Ok(())
        } else {
            Err(format!("{what}: model {m:?} vs engine {e:?}"))
        }
    }

    fn storage_spec(kind: StorageKind, plan: &Arc<FaultPlan>) -> (StorageMode, u64, StorageSpec) {
        match kind {
            StorageKind::Ranges => (StorageMode::Ranges, 0, StorageSpec::Ranges),
            StorageKind::File { initial_sectors, limit_sectors, growable } => {
                let len = initial_sectors * SECTOR_SIZE_BYTES;
                let mem: Dev = if growable {
                    StdArc::new(MemDev::growable(len, u64::MAX / 2))
                } else {
                    StdArc::new(MemDev::new(len))
                };
                let dev: Dev = StdArc::new(FaultDev::new(mem, plan.clone()));
                let mode = StorageMode::File { limit_sectors, growable };
                (mode, initial_sectors, StorageSpec::File { backend: dev, limit_sectors })
            }
        }
    }

    /// Apply `op` to both sides and compare. Returns the first mismatch.
    pub fn apply(&mut self, op: &Op) -> std::result::Result<(), Mismatch> {
        self.ops_applied += 1;
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
                let (mode, initial, spec) = Self::storage_spec(storage, &self.storage_plan);
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
                self.same(&what, &m, &e)
            }
            Op::Read { disk, sector, sectors } => {
                let d = self.disk(disk);
                let (off, len) = (sector * SECTOR_SIZE_BYTES, sectors * SECTOR_SIZE_BYTES);
                let m = self.model.read(d, off, len);
                let mut buf = vec![0u8; len as usize];
                let e = self.engine.read(d, off, &mut buf).map(|()| buf);
                self.same(&what, &m, &e)
            }
            Op::Write { disk, sector, sectors, seed } => {
                let d = self.disk(disk);
                let data = data_of(sectors, seed);
                let off = sector * SECTOR_SIZE_BYTES;
                let (m, e) = (self.model.write(d, off, &data), self.engine.write(d, off, &data));
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
                Ok(())
            }
            Op::FailGrowth { errno } => {
                self.model.fail_next_growth(errno);
                self.storage_plan.fail_set_len(errno);
                Ok(())
            }
            Op::SetStorageMinimum { sectors } => {
                let p = Params { diff_storage_minimum_sectors: sectors, ..self.model.params() };
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
        for s in self.snapshots.clone() {
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
