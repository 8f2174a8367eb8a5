//! Every pair of engine operations raced under shuttle, each outcome checked against the model.
//!
//! From two starting states (a snapshot created and not taken; the same snapshot taken), each
//! unordered pair of the operations below (a pair includes an operation with itself) runs in two
//! threads. The two results and the whole observable state afterwards (CBT info and map and
//! snapshot info of every disk, the snapshot list, storage accounting, the image and origin data)
//! must equal what the model gives for one of the two sequential orders: the engine's operations
//! are linearizable, not merely free of panics and deadlocks (a deadlock fails the schedule, and
//! the lock-order check fails an inversion even on a schedule that does not deadlock).
//!
//! Run: `RUSTFLAGS="--cfg blksnap_shuttle" CARGO_TARGET_DIR=target/shuttle cargo test --release
//! -p blksnap-engine --test shuttle_pairs`. `BLKSNAP_SHUTTLE_PAIR_ITERATIONS` sets the schedules
//! per strategy and pair (default 40: 2 phases x 253 pairs x 80 schedules = 40,480).
#![cfg(blksnap_shuttle)]

use blksnap_engine::io::{Dev, MemDev};
use blksnap_engine::sync::{thread, Arc, StdArc};
use blksnap_engine::{Clock, Engine, EngineConfig, StorageSpec};
use blksnap_model::{
    DeviceId, Model, Params, Result, SectorRange, SnapshotId, StorageMode, SECTOR_SIZE_BYTES,
};

const D0: DeviceId = DeviceId::new(7, 0);
const D1: DeviceId = DeviceId::new(7, 1);
const CHUNK: u64 = 4096;
const D0_BYTES: u64 = 2 * CHUNK;
const D1_BYTES: u64 = CHUNK;
/// The v3 storage backend: 64 sectors, of which the setup appends 16 and `Append` 16 more.
const BACKEND_SECTORS: u64 = 64;
const SEED: u64 = 1;

/// The raced operations (D0 is in the snapshot S, D1 is attached beside it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PairOp {
    Attach1,
    Detach1,
    RemoveDisk1,
    Create,
    Add1,
    Take,
    Destroy,
    Append,
    Write0,
    ImageRead0,
    ImageWrite0,
    /// An image discard of chunk 1 whole (zeroed in the storage without an origin read), the
    /// chunk `ImageWrite0` and `Discard0` touch. One chunk: a request over two chunks is
    /// atomic per chunk only, as a block device's (a whole-image read racing it may see one
    /// chunk zeroed and not the other), which pairs of sequential orders cannot express.
    ImageZeroes0,
    CbtMap0,
    WaitEvent,
    Info0,
    CbtExport0,
    CbtDirty0,
    Discard0,
    Read0,
    Collect,
    AddDisk2,
    /// A write through `try_write_begin` (the ublk queue's asynchronous path): with a ticket the
    /// caller writes the backing itself, without one it falls back to `write` — the model's
    /// write either way.
    TicketWrite0,
}

const OPS: [PairOp; 22] = [
    PairOp::Attach1,
    PairOp::Detach1,
    PairOp::RemoveDisk1,
    PairOp::Create,
    PairOp::Add1,
    PairOp::Take,
    PairOp::Destroy,
    PairOp::Append,
    PairOp::Write0,
    PairOp::ImageRead0,
    PairOp::ImageWrite0,
    PairOp::ImageZeroes0,
    PairOp::CbtMap0,
    PairOp::WaitEvent,
    PairOp::Info0,
    PairOp::CbtExport0,
    PairOp::CbtDirty0,
    PairOp::Discard0,
    PairOp::Read0,
    PairOp::Collect,
    PairOp::AddDisk2,
    PairOp::TicketWrite0,
];

/// A disk that `AddDisk2` registers.
const D2: DeviceId = DeviceId::new(7, 2);

/// A result as compared: the value's Debug form, or the errno (messages may differ).
fn show<T: std::fmt::Debug>(r: Result<T>) -> String {
    match r {
        Ok(v) => format!("ok {v:?}"),
        Err(e) => format!("err {:?}", e.errno),
    }
}

/// Data as compared and printed: run-length encoded (`16x4096 153x512 ...`).
fn bytes(r: Result<Vec<u8>>) -> String {
    show(r.map(|data| {
        let mut runs: Vec<(u8, usize)> = Vec::new();
        for b in data {
            match runs.last_mut() {
                Some((v, n)) if *v == b => *n += 1,
                _ => runs.push((b, 1)),
            }
        }
        runs.iter().map(|(v, n)| format!("{v}x{n}")).collect::<Vec<_>>().join(" ")
    }))
}

fn params() -> Params {
    Params::small()
}

/// The engine side of the starting state; returns the engine, S and the v3 backend.
fn engine_setup(taken: bool) -> (Arc<Engine>, SnapshotId, Dev) {
    let config = EngineConfig::new(params(), Some(SEED), Clock::manual(true));
    let e = Arc::new(Engine::new(config).unwrap());
    e.add_disk(D0, StdArc::new(MemDev::new(D0_BYTES)), 1).unwrap();
    e.add_disk(D1, StdArc::new(MemDev::new(D1_BYTES)), 1).unwrap();
    e.write(D0, 0, &vec![0x10; D0_BYTES as usize]).unwrap();
    e.write(D1, 0, &vec![0x20; D1_BYTES as usize]).unwrap();
    e.attach(D0).unwrap();
    e.attach(D1).unwrap();
    let backend: Dev = StdArc::new(MemDev::new(BACKEND_SECTORS * SECTOR_SIZE_BYTES));
    let s = e.snapshot_create(StorageSpec::Ranges).unwrap();
    e.snapshot_add(s, D0).unwrap();
    e.snapshot_append_storage(s, backend.clone(), &[SectorRange::new(0, 16)]).unwrap();
    if taken {
        e.snapshot_take(s).unwrap();
    }
    (e, s, backend)
}

/// The model side of the same starting state.
fn model_setup(taken: bool) -> (Model, SnapshotId) {
    let mut m = Model::new(params(), SEED).unwrap();
    m.add_disk(D0, D0_BYTES, 1).unwrap();
    m.add_disk(D1, D1_BYTES, 1).unwrap();
    m.write(D0, 0, &vec![0x10; D0_BYTES as usize]).unwrap();
    m.write(D1, 0, &vec![0x20; D1_BYTES as usize]).unwrap();
    m.attach(D0).unwrap();
    m.attach(D1).unwrap();
    let s = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
    m.snapshot_add(s, D0).unwrap();
    m.snapshot_append_storage(s, 0, BACKEND_SECTORS, &[SectorRange::new(0, 16)]).unwrap();
    if taken {
        m.snapshot_take(s).unwrap();
    }
    (m, s)
}

const FILE_LIMIT_SECTORS: u64 = 256;

fn run_engine(e: &Engine, s: SnapshotId, backend: &Dev, op: PairOp) -> String {
    match op {
        PairOp::Attach1 => show(e.attach(D1)),
        PairOp::Detach1 => show(e.detach(D1)),
        PairOp::RemoveDisk1 => show(e.remove_disk(D1)),
        PairOp::Create => {
            let backend = StdArc::new(MemDev::growable(0, 1 << 24));
            show(
                e.snapshot_create(StorageSpec::File { backend, limit_sectors: FILE_LIMIT_SECTORS }),
            )
        }
        PairOp::Add1 => show(e.snapshot_add(s, D1)),
        PairOp::Take => show(e.snapshot_take(s)),
        PairOp::Destroy => show(e.snapshot_destroy(s)),
        PairOp::Append => {
            show(e.snapshot_append_storage(s, backend.clone(), &[SectorRange::new(16, 16)]))
        }
        PairOp::Write0 => show(e.write(D0, 512, &[0x99; 512])),
        PairOp::TicketWrite0 => show(e.try_write_begin(D0, 1024, 512).and_then(|t| match t {
            Some(ticket) => ticket.backend().write_at(&[0x77; 512], 1024),
            None => e.write(D0, 1024, &[0x77; 512]),
        })),
        PairOp::ImageRead0 => {
            let mut buf = vec![0u8; D0_BYTES as usize];
            bytes(e.image_read(D0, 0, &mut buf).map(|()| buf))
        }
        PairOp::ImageWrite0 => show(e.image_write(D0, CHUNK, &[0x33; 512])),
        PairOp::ImageZeroes0 => show(e.image_write_zeroes(D0, CHUNK, CHUNK)),
        PairOp::CbtMap0 => {
            let mut buf = Vec::new();
            let count = e.cbt_info(D0).map(|i| i.block_count).unwrap_or(0);
            bytes(e.cbt_map(D0, 0, count, &mut buf).map(|()| buf))
        }
        PairOp::WaitEvent => show(e.wait_event(s, 0).map(|ev| ev.kind)),
        PairOp::Info0 => show(e.snapshot_info(D0)),
        PairOp::CbtExport0 => show(
            e.cbt_export(D0).map(|c| (c.write_map, c.read_map, c.active, c.previous, c.generation)),
        ),
        PairOp::CbtDirty0 => show(e.cbt_dirty(D0, &[SectorRange::new(8, 8)])),
        PairOp::Discard0 => show(e.discard(D0, CHUNK, 1024)),
        PairOp::Read0 => {
            let mut buf = vec![0u8; D0_BYTES as usize];
            bytes(e.read(D0, 0, &mut buf).map(|()| buf))
        }
        PairOp::Collect => show(Ok(e.snapshot_collect())),
        PairOp::AddDisk2 => show(e.add_disk(D2, StdArc::new(MemDev::new(D1_BYTES)), 1)),
    }
}

fn run_model(m: &mut Model, s: SnapshotId, op: PairOp) -> String {
    match op {
        PairOp::Attach1 => show(m.attach(D1)),
        PairOp::Detach1 => show(m.detach(D1)),
        PairOp::RemoveDisk1 => show(m.remove_disk(D1)),
        PairOp::Create => show(m.snapshot_create(
            StorageMode::File { limit_sectors: FILE_LIMIT_SECTORS, growable: true },
            0,
        )),
        PairOp::Add1 => show(m.snapshot_add(s, D1)),
        PairOp::Take => show(m.snapshot_take(s)),
        PairOp::Destroy => show(m.snapshot_destroy(s)),
        PairOp::Append => {
            show(m.snapshot_append_storage(s, 0, BACKEND_SECTORS, &[SectorRange::new(16, 16)]))
        }
        PairOp::Write0 => show(m.write(D0, 512, &[0x99; 512])),
        PairOp::ImageRead0 => bytes(m.image_read(D0, 0, D0_BYTES)),
        PairOp::ImageWrite0 => show(m.image_write(D0, CHUNK, &[0x33; 512])),
        PairOp::ImageZeroes0 => show(m.image_write(D0, CHUNK, &[0; CHUNK as usize])),
        PairOp::CbtMap0 => {
            let count = m.cbt_info(D0).map(|i| i.block_count).unwrap_or(0);
            bytes(m.cbt_map(D0, 0, count))
        }
        PairOp::WaitEvent => show(m.wait_event(s, 0).map(|ev| ev.kind)),
        PairOp::Info0 => show(m.snapshot_info(D0)),
        PairOp::CbtExport0 => show(m.cbt_export(D0)),
        PairOp::CbtDirty0 => show(m.cbt_dirty(D0, &[SectorRange::new(8, 8)])),
        PairOp::Discard0 => show(m.discard(D0, CHUNK, 1024)),
        PairOp::Read0 => bytes(m.read(D0, 0, D0_BYTES)),
        PairOp::Collect => show(Ok(m.snapshot_collect())),
        PairOp::AddDisk2 => show(m.add_disk(D2, D1_BYTES, 1)),
        PairOp::TicketWrite0 => show(m.write(D0, 1024, &[0x77; 512])),
    }
}

/// Everything observable afterwards, on the engine (the snapshots `ids` of both sides match).
fn engine_state(e: &Engine, ids: &[SnapshotId]) -> Vec<String> {
    let mut out = Vec::new();
    for (d, len) in [(D0, D0_BYTES), (D1, D1_BYTES), (D2, D1_BYTES)] {
        out.push(show(e.cbt_info(d)));
        let count = e.cbt_info(d).map(|i| i.block_count).unwrap_or(0);
        let mut map = Vec::new();
        out.push(bytes(e.cbt_map(d, 0, count, &mut map).map(|()| map)));
        out.push(show(e.snapshot_info(d)));
        let mut buf = vec![0u8; len as usize];
        out.push(bytes(e.image_read(d, 0, &mut buf).map(|()| buf.clone())));
        out.push(bytes(e.read(d, 0, &mut buf).map(|()| buf)));
    }
    out.push(format!("{:?}", e.snapshot_collect()));
    for id in ids {
        out.push(show(e.storage_stats(*id)));
    }
    out
}

fn model_state(m: &mut Model, ids: &[SnapshotId]) -> Vec<String> {
    let mut out = Vec::new();
    for (d, len) in [(D0, D0_BYTES), (D1, D1_BYTES), (D2, D1_BYTES)] {
        out.push(show(m.cbt_info(d)));
        let count = m.cbt_info(d).map(|i| i.block_count).unwrap_or(0);
        out.push(bytes(m.cbt_map(d, 0, count)));
        out.push(show(m.snapshot_info(d)));
        out.push(bytes(m.image_read(d, 0, len)));
        out.push(bytes(m.read(d, 0, len)));
    }
    out.push(format!("{:?}", m.snapshot_collect()));
    for id in ids {
        out.push(show(m.storage_stats(*id)));
    }
    out
}

/// The sequential outcome of `first` then `second` on the model: (result of a, result of b,
/// state), with a and b in the caller's order.
fn model_outcome(
    taken: bool,
    a: PairOp,
    b: PairOp,
    a_first: bool,
) -> (String, String, Vec<String>) {
    let (mut m, s) = model_setup(taken);
    let (ra, rb) = if a_first {
        let ra = run_model(&mut m, s, a);
        (ra, run_model(&mut m, s, b))
    } else {
        let rb = run_model(&mut m, s, b);
        (run_model(&mut m, s, a), rb)
    };
    let ids = ids_of(&m.snapshot_collect(), s);
    (ra, rb, model_state(&mut m, &ids))
}

/// The snapshot ids whose accounting is compared: S and whatever exists.
fn ids_of(alive: &[SnapshotId], s: SnapshotId) -> Vec<SnapshotId> {
    let mut ids = vec![s];
    ids.extend(alive.iter().filter(|id| **id != s));
    ids
}

fn race(taken: bool, a: PairOp, b: PairOp) {
    let (e, s, backend) = engine_setup(taken);
    let (e1, backend1) = (e.clone(), backend.clone());
    let t = thread::spawn(move || run_engine(&e1, s, &backend1, b));
    let ra = run_engine(&e, s, &backend, a);
    let rb = t.join().unwrap();
    let state = engine_state(&e, &ids_of(&e.snapshot_collect(), s));
    let got = (ra, rb, state);
    let orders = [model_outcome(taken, a, b, true), model_outcome(taken, a, b, false)];
    if !orders.contains(&got) {
        panic!(
            "{a:?} || {b:?} ({}): not linearizable\n engine:  {got:?}\n model a;b: {:?}\n model \
             b;a: {:?}",
            if taken { "taken" } else { "created" },
            orders[0],
            orders[1]
        );
    }
}

fn iterations() -> usize {
    std::env::var("BLKSNAP_SHUTTLE_PAIR_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(40)
}

fn raced_pairs(taken: bool) {
    let mut pairs = 0;
    for (i, a) in OPS.iter().enumerate() {
        for b in &OPS[i..] {
            let (a, b) = (*a, *b);
            let mut config = shuttle::Config::new();
            config.stack_size = 1 << 20;
            let random = shuttle::scheduler::RandomScheduler::new(iterations());
            shuttle::Runner::new(random, config.clone()).run(move || race(taken, a, b));
            let pct = shuttle::scheduler::PctScheduler::new(2, iterations());
            shuttle::Runner::new(pct, config).run(move || race(taken, a, b));
            pairs += 1;
        }
    }
    eprintln!(
        "shuttle pairs ({}): {pairs} pairs x {} schedules, each linearizable against the model",
        if taken { "taken" } else { "created" },
        2 * iterations()
    );
}

#[test]
fn every_pair_races_linearizably_before_the_take() {
    raced_pairs(false);
}

#[test]
fn every_pair_races_linearizably_after_the_take() {
    raced_pairs(true);
}
