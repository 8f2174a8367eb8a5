//! Differential test: proptest generates operation sequences over 1–3 devices (faults and
//! overflow included) and the engine, driven single-threaded, must agree with the model on every
//! observable result after every operation. Failures shrink and are persisted by proptest under
//! `proptest-regressions/` (committed, replayed first on every run).
//!
//! `PROPTEST_CASES` overrides the case count (CI: the default, 2,000).

use blksnap_model::{DeviceId, Errno, IoKind, Params, SectorRange};
use blksnap_sim_tests::{DiskSetup, Harness, Op, StorageKind, APPEND_BACKEND_SECTORS};
use proptest::prelude::*;

/// Largest disk in sectors (io offsets are drawn a little beyond it to hit EINVAL).
const MAX_DISK_SECTORS: u64 = 131;

fn disk_sectors() -> impl Strategy<Value = u64> {
    // 4 KiB chunks = 8 sectors: exact multiples and short last chunks.
    prop_oneof![Just(64u64), Just(75), Just(MAX_DISK_SECTORS), Just(8), Just(1)]
}

fn disks() -> impl Strategy<Value = Vec<(u64, u64)>> {
    prop::collection::vec((disk_sectors(), prop_oneof![4 => Just(1u64), 1 => Just(16)]), 1..=3)
}

fn io() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        9 => (0..MAX_DISK_SECTORS, 0u64..=24),
        1 => (0..MAX_DISK_SECTORS + 16, 0u64..=40),
    ]
}

fn ranges(max_offset: u64, max_count: u64) -> impl Strategy<Value = Vec<SectorRange>> {
    // Chunk multiples often, so thresholds are hit exactly, not only crossed.
    let count = prop_oneof![0..max_count, (0..max_count / 8).prop_map(|c| c * 8)];
    prop::collection::vec((0..max_offset, count).prop_map(|(o, c)| SectorRange::new(o, c)), 0..4)
}

fn storage() -> impl Strategy<Value = StorageKind> {
    prop_oneof![
        2 => Just(StorageKind::Ranges),
        3 => (
            prop_oneof![Just(0u64), Just(8), Just(24), Just(40), Just(100)],
            prop_oneof![Just(0u64), Just(16), Just(48), Just(96), Just(200), Just(1000)],
            prop::bool::weighted(0.8),
        )
            .prop_map(|(initial_sectors, limit_sectors, growable)| StorageKind::File {
                initial_sectors,
                limit_sectors,
                growable,
            }),
    ]
}

fn errno() -> impl Strategy<Value = Errno> {
    prop_oneof![4 => Just(Errno::EIO), 1 => Just(Errno::ENOSPC)]
}

fn op() -> impl Strategy<Value = Op> {
    let d = 0usize..3;
    let s = 0usize..6;
    prop_oneof![
        4 => d.clone().prop_map(|disk| Op::Attach { disk }),
        1 => d.clone().prop_map(|disk| Op::Detach { disk }),
        1 => d.clone().prop_map(|disk| Op::CbtInfo { disk }),
        2 => (d.clone(), 0u32..40, 0u32..40).prop_map(|(disk, offset, length)| Op::CbtMap { disk, offset, length }),
        1 => (d.clone(), ranges(MAX_DISK_SECTORS + 8, 30)).prop_map(|(disk, ranges)| Op::CbtDirty { disk, ranges }),
        3 => storage().prop_map(|storage| Op::Create { storage }),
        1 => s.clone().prop_map(|snap| Op::Destroy { snap }),
        3 => (s.clone(), 0usize..2, ranges(APPEND_BACKEND_SECTORS + 8, 64)).prop_map(|(snap, backend, ranges)| Op::Append { snap, backend, ranges }),
        4 => (s.clone(), d.clone()).prop_map(|(snap, disk)| Op::Add { snap, disk }),
        3 => s.clone().prop_map(|snap| Op::Take { snap }),
        1 => Just(Op::Collect),
        1 => d.clone().prop_map(|disk| Op::Info { disk }),
        3 => (s.clone(), prop_oneof![Just(0u32), Just(100)]).prop_map(|(snap, timeout_ms)| Op::WaitEvent { snap, timeout_ms }),
        2 => (d.clone(), io()).prop_map(|(disk, (sector, sectors))| Op::Read { disk, sector, sectors }),
        10 => (d.clone(), io(), any::<u8>()).prop_map(|(disk, (sector, sectors), seed)| Op::Write { disk, sector, sectors, seed }),
        1 => (d.clone(), io()).prop_map(|(disk, (sector, sectors))| Op::Discard { disk, sector, sectors }),
        1 => (d.clone(), io()).prop_map(|(disk, (sector, sectors))| Op::WriteZeroes { disk, sector, sectors }),
        6 => (d.clone(), io()).prop_map(|(disk, (sector, sectors))| Op::ImageRead { disk, sector, sectors }),
        5 => (d.clone(), io(), any::<u8>()).prop_map(|(disk, (sector, sectors), seed)| Op::ImageWrite { disk, sector, sectors, seed }),
        2 => (d.clone(), io()).prop_map(|(disk, (sector, sectors))| Op::ImageWriteZeroes { disk, sector, sectors }),
        2 => (prop::option::of(d.clone()), prop_oneof![Just(IoKind::Read), Just(IoKind::Write)], errno())
            .prop_map(|(target, kind, errno)| Op::Fault { target, kind, errno }),
        1 => errno().prop_map(|errno| Op::FailGrowth { errno }),
        1 => prop_oneof![Just(16u64), Just(64), Just(100), Just(256)].prop_map(|sectors| Op::SetStorageMinimum { sectors }),
        1 => (0u64..1_000_000_000).prop_map(|ns| Op::AdvanceClock { ns }),
    ]
}

/// A prefix that reaches deep states at once: every disk attached, one or two snapshots with
/// random storage, the disks spread over them, storage appended, maybe taken. Random operations
/// follow it.
fn setup() -> impl Strategy<Value = Vec<Op>> {
    (
        prop::collection::vec(storage(), 1..=2),
        prop::collection::vec(ranges(APPEND_BACKEND_SECTORS, 96), 2),
        prop::bool::weighted(0.8),
    )
        .prop_map(|(storages, appends, take)| {
            let mut ops: Vec<Op> = (0..3).map(|disk| Op::Attach { disk }).collect();
            let n = storages.len();
            ops.extend(storages.into_iter().map(|storage| Op::Create { storage }));
            ops.extend((0..3).map(|disk| Op::Add { snap: disk % n, disk }));
            for (snap, ranges) in appends.into_iter().enumerate() {
                ops.push(Op::Append { snap: snap % n, backend: snap, ranges });
            }
            if take {
                ops.extend((0..n).map(|snap| Op::Take { snap }));
            }
            ops
        })
}

fn run(disks: &[(u64, u64)], ops: &[Op], seed: u64) -> Result<(), TestCaseError> {
    let setups: Vec<DiskSetup> = disks
        .iter()
        .enumerate()
        .map(|(i, &(sectors, io_min_sectors))| DiskSetup {
            id: DeviceId::new(7, i as u32),
            sectors,
            io_min_sectors,
        })
        .collect();
    let mut h = Harness::new(Params::small(), &setups, seed);
    for (step, op) in ops.iter().enumerate() {
        h.apply(op).map_err(|m| TestCaseError::fail(format!("step {step}: {m}")))?;
        h.check_state().map_err(|m| TestCaseError::fail(format!("after step {step}: {m}")))?;
    }
    h.teardown().map_err(TestCaseError::fail)?;
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 20_000, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_model(
        disks in disks(),
        prefix in prop::option::weighted(0.7, setup()),
        ops in prop::collection::vec(op(), 1..80),
        seed in any::<u64>(),
    ) {
        let all: Vec<Op> = prefix.unwrap_or_default().into_iter().chain(ops).collect();
        run(&disks, &all, seed)?;
    }
}

/// A hand-written sequence that reaches every storage event kind, kept as a plain regression.
#[test]
fn scripted_overflow_and_growth() {
    use Op::*;
    let ops = vec![
        Attach { disk: 0 },
        Create {
            storage: StorageKind::File { initial_sectors: 0, limit_sectors: 96, growable: true },
        },
        Add { snap: 0, disk: 0 },
        Take { snap: 0 },
        Write { disk: 0, sector: 0, sectors: 131, seed: 1 },
        WaitEvent { snap: 0, timeout_ms: 0 },
        WaitEvent { snap: 0, timeout_ms: 0 },
        ImageRead { disk: 0, sector: 0, sectors: 131 },
        Create { storage: StorageKind::Ranges },
        Attach { disk: 1 },
        Add { snap: 1, disk: 1 },
        Append { snap: 1, backend: 0, ranges: vec![SectorRange::new(0, 40)] },
        Take { snap: 1 },
        Write { disk: 1, sector: 0, sectors: 64, seed: 2 },
        WaitEvent { snap: 1, timeout_ms: 0 },
        WaitEvent { snap: 1, timeout_ms: 0 },
        WaitEvent { snap: 1, timeout_ms: 0 },
        WaitEvent { snap: 1, timeout_ms: 100 },
        Destroy { snap: 0 },
        WaitEvent { snap: 0, timeout_ms: 0 },
    ];
    run(&[(MAX_DISK_SECTORS, 1), (64, 1)], &ops, 3).unwrap();
}
