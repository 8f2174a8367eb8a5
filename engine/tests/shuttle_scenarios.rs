//! shuttle scenarios: the whole engine, 2–4 threads, many sampled schedules (random and PCT).
//!
//! Run: `RUSTFLAGS="--cfg blksnap_shuttle" CARGO_TARGET_DIR=target/shuttle cargo test --release
//! -p blksnap-engine --test shuttle_scenarios`. `BLKSNAP_SHUTTLE_ITERATIONS` sets the
//! iterations per strategy (default 1000); a failing schedule is printed by shuttle and can be
//! replayed with `BLKSNAP_SHUTTLE_SCHEDULE=<schedule> cargo test ... <name>`.
#![cfg(blksnap_shuttle)]

mod common;

use blksnap_engine::io::{Dev, Fault, FaultDev, FaultPlan, MemDev};
use blksnap_engine::sync::{thread, Arc, StdArc};
use blksnap_engine::{Clock, Engine, EngineConfig, LiveCounts, StorageSpec};
use blksnap_model::{DeviceId, Errno, EventKind, IoKind, Params, SectorRange};

const D0: DeviceId = DeviceId::new(7, 0);
const D1: DeviceId = DeviceId::new(7, 1);
const CHUNK: usize = 4096;

/// Random + PCT, each `iterations()` times; or replay a schedule from the environment.
fn check<F: Fn() + Send + Sync + 'static>(f: F) {
    if let Ok(schedule) = std::env::var("BLKSNAP_SHUTTLE_SCHEDULE") {
        shuttle::replay(f, &schedule);
        return;
    }
    let f = std::sync::Arc::new(f);
    let iterations = iterations();
    let mut config = shuttle::Config::new();
    config.stack_size = 1 << 20;
    let f1 = f.clone();
    let runner =
        shuttle::Runner::new(shuttle::scheduler::RandomScheduler::new(iterations), config.clone());
    runner.run(move || f1());
    let runner = shuttle::Runner::new(shuttle::scheduler::PctScheduler::new(3, iterations), config);
    runner.run(move || f());
}

fn iterations() -> usize {
    std::env::var("BLKSNAP_SHUTTLE_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
}

fn engine() -> Arc<Engine> {
    let config = EngineConfig::new(Params::small(), Some(1), Clock::manual(true));
    Arc::new(Engine::new(config).unwrap())
}

fn mem(len: usize) -> Dev {
    StdArc::new(MemDev::new(len as u64))
}

fn file_storage(limit_sectors: u64) -> StorageSpec {
    StorageSpec::File { backend: StdArc::new(MemDev::growable(0, 1 << 24)), limit_sectors }
}

/// A disk of `chunks` 4 KiB chunks filled with `fill`, attached.
fn disk(e: &Engine, dev: DeviceId, chunks: usize, fill: u8) {
    e.add_disk(dev, mem(chunks * CHUNK), 1).unwrap();
    e.write(dev, 0, &vec![fill; chunks * CHUNK]).unwrap();
    e.attach(dev).unwrap();
}

fn snapshot_of(e: &Engine, devs: &[DeviceId], storage: StorageSpec) -> blksnap_model::SnapshotId {
    let id = e.snapshot_create(storage).unwrap();
    for d in devs {
        e.snapshot_add(id, *d).unwrap();
    }
    id
}

fn assert_only_trackers_left(e: &Engine, trackers: usize) {
    assert_eq!(e.live(), LiveCounts { trackers, ..LiveCounts::default() });
}

/// The seed's bug a: origin writers, image readers and writers, destroy in the middle.
#[test]
fn destroy_while_image_and_origin_are_under_io() {
    check(|| {
        let e = engine();
        disk(&e, D0, 2, 0x11);
        let id = snapshot_of(&e, &[D0], file_storage(1 << 10));
        e.snapshot_take(id).unwrap();
        let e1 = e.clone();
        let origin = thread::spawn(move || {
            for c in 0..2u64 {
                e1.write(D0, c * CHUNK as u64, &[0x22; 512]).unwrap();
            }
        });
        let e2 = e.clone();
        let image_w = thread::spawn(move || {
            let r = e2.image_write(D0, 512, &[0x33; 512]);
            assert!(r.is_ok() || r.unwrap_err().errno == Errno::ENODEV);
        });
        let e3 = e.clone();
        let image_r = thread::spawn(move || {
            let mut buf = [0u8; 512];
            match e3.image_read(D0, CHUNK as u64, &mut buf) {
                Ok(()) => assert!(buf.iter().all(|b| *b == 0x11), "image shows pre-take data"),
                Err(err) => assert_eq!(err.errno, Errno::ENODEV),
            }
        });
        e.snapshot_destroy(id).unwrap();
        for t in [origin, image_w, image_r] {
            t.join().unwrap();
        }
        assert_only_trackers_left(&e, 1);
    });
}

/// The seed's bug b: a device of a taken snapshot offered to a second one, both destroyed
/// concurrently with the add.
#[test]
fn device_in_two_snapshots() {
    check(|| {
        let e = engine();
        disk(&e, D0, 1, 0);
        let s1 = snapshot_of(&e, &[D0], file_storage(1 << 10));
        e.snapshot_take(s1).unwrap();
        let s2 = e.snapshot_create(file_storage(1 << 10)).unwrap();
        let e1 = e.clone();
        let adder = thread::spawn(move || e1.snapshot_add(s2, D0).map_err(|x| x.errno));
        let e2 = e.clone();
        let destroyer = thread::spawn(move || e2.snapshot_destroy(s1).unwrap());
        destroyer.join().unwrap();
        let added = adder.join().unwrap();
        assert!(added.is_ok() || added == Err(Errno::EBUSY), "{added:?}");
        e.snapshot_destroy(s2).unwrap();
        assert_only_trackers_left(&e, 1);
    });
}

/// Two takes of one snapshot: exactly one switches.
#[test]
fn take_races_take() {
    check(|| {
        let e = engine();
        disk(&e, D0, 1, 0);
        let id = snapshot_of(&e, &[D0], file_storage(1 << 10));
        let e1 = e.clone();
        let t = thread::spawn(move || e1.snapshot_take(id).map_err(|x| x.errno));
        let mine = e.snapshot_take(id).map_err(|x| x.errno);
        let theirs = t.join().unwrap();
        let mut results = [mine, theirs];
        results.sort();
        assert_eq!(results, [Ok(()), Err(Errno::EALREADY)]);
        assert_eq!(e.cbt_info(D0).unwrap().changes_number, 1, "one switch per take");
        e.snapshot_destroy(id).unwrap();
    });
}

/// add ‖ take: the device is either in the take (image exists) or refused with EBUSY.
#[test]
fn add_races_take() {
    check(|| {
        let e = engine();
        disk(&e, D0, 1, 0);
        disk(&e, D1, 1, 0);
        let id = snapshot_of(&e, &[D0], file_storage(1 << 10));
        let e1 = e.clone();
        let adder = thread::spawn(move || e1.snapshot_add(id, D1).map_err(|x| x.errno));
        e.snapshot_take(id).unwrap();
        let added = adder.join().unwrap();
        let info = e.snapshot_info(D1).unwrap();
        match added {
            Ok(()) => assert_eq!(info.image, Some(D1), "added before the take: switched too"),
            Err(errno) => {
                assert_eq!(errno, Errno::EBUSY);
                assert_eq!(info.image, None);
                assert_eq!(e.cbt_info(D1).unwrap().changes_number, 0, "never switched");
            }
        }
        e.snapshot_destroy(id).unwrap();
        assert_only_trackers_left(&e, 2);
    });
}

/// Two devices overflow one tiny storage concurrently: each device corrupted once, origins
/// intact.
#[test]
fn overflow_under_concurrent_writes() {
    check(|| {
        let e = engine();
        disk(&e, D0, 2, 0x10);
        disk(&e, D1, 2, 0x20);
        // One chunk of room (8 sectors) for four chunks of demand.
        let storage =
            StorageSpec::File { backend: StdArc::new(MemDev::new(4096)), limit_sectors: 8 };
        let id = snapshot_of(&e, &[D0, D1], storage);
        e.snapshot_take(id).unwrap();
        let writers: Vec<_> = [D0, D1]
            .into_iter()
            .map(|d| {
                let e = e.clone();
                thread::spawn(move || e.write(d, 0, &vec![0x99; 2 * CHUNK]).unwrap())
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let mut corrupted = Vec::new();
        while let Ok(ev) = e.wait_event(id, 0) {
            if let EventKind::Corrupted { device, errno } = ev.kind {
                assert_eq!(errno, Errno::ENOSPC);
                corrupted.push(device);
            }
        }
        corrupted.sort();
        corrupted.dedup();
        assert!(!corrupted.is_empty(), "four chunks cannot fit in one");
        for d in [D0, D1] {
            let mut buf = vec![0u8; 2 * CHUNK];
            e.read(d, 0, &mut buf).unwrap();
            assert!(buf.iter().all(|b| *b == 0x99), "the origin keeps every write");
            let info = e.snapshot_info(d).unwrap();
            assert_eq!(info.error_code != 0, corrupted.contains(&d), "one event per failed device");
        }
        e.snapshot_destroy(id).unwrap();
        assert_only_trackers_left(&e, 2);
    });
}

/// v3 storage appended while copy-on-write consumes it.
#[test]
fn append_races_cow() {
    check(|| {
        let e = engine();
        disk(&e, D0, 3, 0x44);
        let id = snapshot_of(&e, &[D0], StorageSpec::Ranges);
        let backend = mem(64 * 512);
        e.snapshot_append_storage(id, backend.clone(), &[SectorRange::new(0, 8)]).unwrap();
        e.snapshot_take(id).unwrap();
        let e1 = e.clone();
        let writer = thread::spawn(move || e1.write(D0, 0, &vec![0x55; 3 * CHUNK]).unwrap());
        let e2 = e.clone();
        let appender = thread::spawn(move || {
            e2.snapshot_append_storage(id, backend, &[SectorRange::new(8, 16)]).unwrap()
        });
        writer.join().unwrap();
        appender.join().unwrap();
        let stats = e.storage_stats(id).unwrap();
        assert!(stats.filled_sectors <= stats.capacity_sectors);
        let corrupted = e.snapshot_info(D0).unwrap().error_code != 0;
        // Either the append came in time for all three chunks, or the snapshot overflowed.
        assert_eq!(corrupted, stats.overflow);
        if !corrupted {
            let mut buf = vec![0u8; 3 * CHUNK];
            e.image_read(D0, 0, &mut buf).unwrap();
            assert!(buf.iter().all(|b| *b == 0x44));
        }
        e.snapshot_destroy(id).unwrap();
    });
}

/// newest storage growing while two writers copy.
#[test]
fn growth_races_cow() {
    check(|| {
        let e = engine();
        disk(&e, D0, 4, 0x66);
        // Starts at 0, grows by 64 sectors (8 chunks) at a time up to 128.
        let id = snapshot_of(&e, &[D0], file_storage(128));
        e.snapshot_take(id).unwrap();
        let writers: Vec<_> = [0u64, 2]
            .into_iter()
            .map(|c| {
                let e = e.clone();
                thread::spawn(move || {
                    e.write(D0, c * CHUNK as u64, &vec![0x77; 2 * CHUNK]).unwrap()
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let mut buf = vec![0u8; 4 * CHUNK];
        e.image_read(D0, 0, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0x66));
        let stats = e.storage_stats(id).unwrap();
        assert_eq!(stats.filled_sectors, 32, "each chunk stored once");
        e.snapshot_destroy(id).unwrap();
        assert_only_trackers_left(&e, 1);
    });
}

/// wait_event racing destroy, with a second waiter and an event in flight.
#[test]
fn wait_event_races_destroy() {
    check(|| {
        let e = engine();
        let id = e.snapshot_create(StorageSpec::Ranges).unwrap(); // queues LowFreeSpace
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let e = e.clone();
                thread::spawn(move || e.wait_event(id, 50).map_err(|x| x.errno))
            })
            .collect();
        e.snapshot_destroy(id).unwrap();
        let results: Vec<_> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
        assert!(results.iter().filter(|r| r.is_ok()).count() <= 1, "one event, one taker");
        for r in &results {
            assert!(matches!(r, Ok(_) | Err(Errno::ESRCH) | Err(Errno::ENOENT)), "{r:?}");
        }
        assert_eq!(e.live(), LiveCounts::default());
    });
}

/// Issue 11's race (see `common::image_read_racing_corruption`).
#[test]
fn image_read_racing_corruption() {
    check(|| common::image_read_racing_corruption(common::config()));
}

/// The asynchronous write path racing a take (see `common::write_ticket_racing_take`).
#[test]
fn write_ticket_racing_take() {
    check(|| common::write_ticket_racing_take(common::config()));
}

/// Two destroys racing (see `common::destroy_racing_destroy`).
#[test]
fn destroy_racing_destroy() {
    check(|| common::destroy_racing_destroy(common::config()));
}

// ---- the blind classes of issue 11: rules that only matter under concurrency ----------------

/// Two copies fail at once with different errors: the diff area keeps one of them, reports it
/// in `snapshot_info`, and emits exactly one `Corrupted` event carrying the same errno.
#[test]
fn two_copies_fail_at_once_first_error_wins() {
    check(|| {
        let e = engine();
        disk(&e, D0, 2, 0x10);
        let plan = FaultPlan::shared();
        let id = snapshot_of(&e, &[D0], common::faulty_file_storage(&plan, 64));
        e.snapshot_take(id).unwrap();
        plan.fail_next(IoKind::Write, Fault::Error(Errno::EIO));
        plan.fail_next(IoKind::Write, Fault::Error(Errno::ENOSPC));
        let writers: Vec<_> = [0u64, 1]
            .into_iter()
            .map(|c| {
                let e = e.clone();
                thread::spawn(move || e.write(D0, c * CHUNK as u64, &[0x99; 512]).unwrap())
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let mut corrupted = Vec::new();
        while let Ok(ev) = e.wait_event(id, 0) {
            if let EventKind::Corrupted { device, errno } = ev.kind {
                assert_eq!(device, D0);
                corrupted.push(errno);
            }
        }
        assert_eq!(corrupted.len(), 1, "one Corrupted event per device: {corrupted:?}");
        let kept = e.snapshot_info(D0).unwrap().error_code;
        assert_eq!(kept, -corrupted[0].code(), "the kept error is the one reported");
        let mut buf = [0u8; 512];
        assert_eq!(e.image_read(D0, 0, &mut buf).unwrap_err().errno, Errno::EIO);
        e.snapshot_destroy(id).unwrap();
        assert_only_trackers_left(&e, 1);
    });
}

/// Destroy wakes *every* blocked waiter: two waiters with a clock that never times out (only a
/// wake-up can end their wait), no event queued. A destroy that woke one would hang the other.
#[test]
fn destroy_wakes_every_blocked_waiter() {
    check(|| {
        let config = EngineConfig::new(Params::small(), Some(1), Clock::manual(false));
        let e = Arc::new(Engine::new(config).unwrap());
        let id = e.snapshot_create(file_storage(1 << 10)).unwrap();
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let e = e.clone();
                thread::spawn(move || e.wait_event(id, 1000).map_err(|x| x.errno))
            })
            .collect();
        e.snapshot_destroy(id).unwrap();
        for w in waiters {
            let r = w.join().unwrap();
            assert!(matches!(r, Err(Errno::ESRCH) | Err(Errno::ENOENT)), "{r:?}");
        }
        assert_eq!(e.live(), LiveCounts::default());
    });
}

/// The take is one step for a racing writer: the write is in the image exactly when the change
/// map this take hands out (the read map, copied at the switch) marks its block with this take's
/// number; a write after the take is marked only in the write map, for the next take.
#[test]
fn take_is_atomic_for_a_racing_write_seen_through_the_image() {
    check(|| {
        let e = engine();
        disk(&e, D0, 2, 0x10);
        let id = snapshot_of(&e, &[D0], file_storage(1 << 10));
        let before = e.cbt_info(D0).unwrap().changes_number;
        let e1 = e.clone();
        let writer = thread::spawn(move || e1.write(D0, CHUNK as u64, &[0x77; 512]).unwrap());
        e.snapshot_take(id).unwrap();
        writer.join().unwrap();
        let info = e.cbt_info(D0).unwrap();
        assert_eq!(info.changes_number, before.wrapping_add(1), "one switch");
        let mut map = Vec::new();
        e.cbt_map(D0, 0, info.block_count, &mut map).unwrap();
        let block = (CHUNK as u64 / u64::from(info.block_size_bytes)) as usize;
        let mut image = [0u8; 512];
        e.image_read(D0, CHUNK as u64, &mut image).unwrap();
        let in_image = image.iter().all(|b| *b == 0x77);
        assert!(in_image || image.iter().all(|b| *b == 0x10), "one whole write or none");
        let marked_for_this_take = map[block] == info.changes_number;
        assert_eq!(
            in_image, marked_for_this_take,
            "image and change map disagree about the write's side of the take (map {})",
            map[block]
        );
        e.snapshot_destroy(id).unwrap();
    });
}

/// Two origin writers to one chunk and an image reader: whichever writer copies, the other
/// waits for the copy (a copy-on-write that skipped a busy chunk would write the origin before
/// the pre-image is stored). The image shows only pre-take data.
#[test]
fn writers_of_one_busy_chunk_wait_for_its_copy() {
    check(|| {
        let e = engine();
        disk(&e, D0, 1, 0x10);
        let id = snapshot_of(&e, &[D0], file_storage(1 << 10));
        e.snapshot_take(id).unwrap();
        let writers: Vec<_> = [0u64, 1]
            .into_iter()
            .map(|sector| {
                let e = e.clone();
                thread::spawn(move || e.write(D0, sector * 512, &[0x99; 512]).unwrap())
            })
            .collect();
        let mut buf = vec![0u8; CHUNK];
        e.image_read(D0, 0, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0x10), "the image shows a post-take write");
        for w in writers {
            w.join().unwrap();
        }
        e.image_read(D0, 0, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0x10), "the image shows a post-take write");
        e.snapshot_destroy(id).unwrap();
    });
}

/// Faults × concurrency: a storage fault of each kind (EIO, ENOSPC, torn) and an origin read
/// fault fire at a schedule-dependent point while origin writers, an image writer and image
/// readers run and a destroy races their tail. Every image read returns the content at take
/// plus image writes, or an error — never anything else.
#[test]
fn faults_fire_while_image_and_origin_io_and_destroy_race() {
    let faults = [
        (true, Fault::Error(Errno::EIO)),
        (true, Fault::Error(Errno::ENOSPC)),
        (true, Fault::Torn { sectors_written: 3, errno: Errno::EIO }),
        (false, Fault::Error(Errno::EIO)),
    ];
    for (on_storage, fault) in faults {
        check(move || faulty_image_io(on_storage, fault));
    }
}

fn faulty_image_io(on_storage: bool, fault: Fault) {
    const CHUNKS: usize = 3;
    let e = engine();
    let origin_plan = FaultPlan::shared();
    let origin: Dev = StdArc::new(FaultDev::new(mem(CHUNKS * CHUNK), origin_plan.clone()));
    e.add_disk(D0, origin, 1).unwrap();
    for c in 0..CHUNKS {
        e.write(D0, (c * CHUNK) as u64, &[0x10 + c as u8; CHUNK]).unwrap();
    }
    e.attach(D0).unwrap();
    let storage_plan = FaultPlan::shared();
    let id = snapshot_of(&e, &[D0], common::faulty_file_storage(&storage_plan, 1 << 10));
    e.snapshot_take(id).unwrap();
    if on_storage {
        storage_plan.fail_next(IoKind::Write, fault);
    } else {
        origin_plan.fail_next(IoKind::Read, fault);
    }
    // The image writer owns sector 1 of chunk 2: it reads 0x12 or 0x33 there.
    let expected = |sector: usize, byte: u8| {
        let pre = 0x10 + (sector * 512 / CHUNK) as u8;
        byte == pre || (sector == 2 * CHUNK / 512 + 1 && byte == 0x33)
    };
    let e1 = e.clone();
    let origin_writer = thread::spawn(move || {
        for c in 0..CHUNKS {
            // An origin read fault fails the copy, never the origin write.
            e1.write(D0, (c * CHUNK) as u64 + 512, &[0x99; 512]).unwrap();
        }
    });
    let e2 = e.clone();
    let image_writer = thread::spawn(move || {
        let r = e2.image_write(D0, (2 * CHUNK + 512) as u64, &[0x33; 512]);
        assert!(r.is_ok() || matches!(r.unwrap_err().errno, Errno::EIO | Errno::ENODEV));
    });
    let e3 = e.clone();
    let image_reader = thread::spawn(move || {
        for c in 0..CHUNKS {
            let mut buf = vec![0u8; CHUNK];
            match e3.image_read(D0, (c * CHUNK) as u64, &mut buf) {
                Ok(()) => {
                    for (i, sector) in buf.chunks(512).enumerate() {
                        let s = c * CHUNK / 512 + i;
                        assert!(
                            sector.iter().all(|b| expected(s, *b) && *b == sector[0]),
                            "image sector {s} holds {:#x}: neither the content at take nor an \
                             image write",
                            sector[0]
                        );
                    }
                }
                Err(err) => assert!(matches!(err.errno, Errno::EIO | Errno::ENODEV), "{err}"),
            }
        }
    });
    origin_writer.join().unwrap();
    image_writer.join().unwrap();
    let destroyer = {
        let e = e.clone();
        thread::spawn(move || e.snapshot_destroy(id).unwrap())
    };
    let mut buf = vec![0u8; CHUNK];
    match e.image_read(D0, 0, &mut buf) {
        Ok(()) => assert!(buf.iter().all(|b| *b == 0x10), "image chunk 0 after the race"),
        Err(err) => assert!(matches!(err.errno, Errno::EIO | Errno::ENODEV), "{err}"),
    }
    image_reader.join().unwrap();
    destroyer.join().unwrap();
    origin_plan.clear();
    let mut origin = vec![0u8; CHUNKS * CHUNK];
    e.read(D0, 0, &mut origin).unwrap();
    for c in 0..CHUNKS {
        let at = c * CHUNK + 512;
        assert!(origin[at..at + 512].iter().all(|b| *b == 0x99), "origin keeps every write");
    }
    assert_only_trackers_left(&e, 1);
}

/// Faults under racing copies of one chunk (see `common`), each fault kind.
#[test]
fn racing_copies_of_one_chunk_meet_a_storage_fault() {
    for fault in [
        Fault::Torn { sectors_written: 3, errno: Errno::EIO },
        Fault::Error(Errno::ENOSPC),
        Fault::Error(Errno::EIO),
    ] {
        check(move || {
            common::racing_copies_of_one_chunk_meet_a_storage_fault(common::config(), fault)
        });
    }
}
