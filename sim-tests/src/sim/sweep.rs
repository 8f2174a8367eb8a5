//! The fault sweep: a fixed workload, then once per I/O with that I/O failing (see `sim`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use blksnap_engine::io::Fault;
use blksnap_model::{DeviceId, Errno, IoKind, SectorRange, SECTOR_SIZE_BYTES};

use crate::{DiskSetup, IoOp, IoRecord, IoTarget, Op, StorageKind};

use super::*;

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
        // Image discards: partial + whole chunks on the Ranges storage (New), and whole chunks
        // of which one was stored by the writes above (file storage).
        ImageWriteZeroes { disk: 2, sector: 4, sectors: 28 },
        ImageWriteZeroes { disk: 0, sector: 8, sectors: 24 },
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
