//! The seed's two bugs as scenarios with real threads (std backend).
//!
//! a) April 2023 review: destroying a snapshot whose image is mounted and written freed the diff
//!    area under in-flight chunk I/O (use-after-free in the store completion).
//! b) April 2023 review: a device of a taken snapshot added to a second snapshot was linked into
//!    both; destroying both corrupted the list.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use blksnap_engine::io::{Dev, MemDev};
use blksnap_engine::sync::StdArc;
use blksnap_engine::{Clock, Engine, EngineConfig, LiveCounts, StorageSpec};
use blksnap_model::{DeviceId, Errno, Params};

const KIB: u64 = 1024;
const DISK_BYTES: u64 = 512 * KIB;
const D0: DeviceId = DeviceId::new(7, 0);

fn engine() -> Arc<Engine> {
    let config = EngineConfig::new(Params::small(), None, Clock::monotonic());
    Arc::new(Engine::new(config).unwrap())
}

fn mem(len: u64) -> Dev {
    StdArc::new(MemDev::new(len))
}

fn file_storage() -> StorageSpec {
    StorageSpec::File { backend: StdArc::new(MemDev::growable(0, 1 << 30)), limit_sectors: 1 << 21 }
}

/// Deterministic per-thread offsets without a random crate: an LCG.
fn next_offset(state: &mut u64) -> u64 {
    *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*state >> 33) % (DISK_BYTES / 4096)) * 4096
}

#[test]
fn seed_bug_a_destroy_while_image_and_origin_are_under_io() {
    for round in 0..20u64 {
        let e = engine();
        e.add_disk(D0, mem(DISK_BYTES), 1).unwrap();
        e.attach(D0).unwrap();
        e.write(D0, 0, &vec![0x11; DISK_BYTES as usize]).unwrap();
        let id = e.snapshot_create(file_storage()).unwrap();
        e.snapshot_add(id, D0).unwrap();
        e.snapshot_take(id).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let ok_ops = Arc::new(AtomicU64::new(0));
        let mut workers = Vec::new();
        for t in 0..3u64 {
            let (e, stop, ok_ops) = (e.clone(), stop.clone(), ok_ops.clone());
            workers.push(thread::spawn(move || {
                let mut rng = round * 7 + t + 1;
                let mut buf = vec![0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let off = next_offset(&mut rng);
                    let r = match t {
                        0 => e.write(D0, off, &[0x22; 4096]),
                        1 => e.image_write(D0, off, &[0x33; 4096]),
                        _ => e.image_read(D0, off, &mut buf).map(|()| {
                            assert!(buf.iter().all(|b| *b == 0x11) || buf.iter().all(|b| *b == 0x33),
                                "the image shows pre-take data or image writes, never origin writes");
                        }),
                    };
                    match r {
                        Ok(()) => {
                            ok_ops.fetch_add(1, Ordering::Relaxed);
                        }
                        // After destroy, image I/O fails cleanly; the origin never fails.
                        Err(err) => assert!(t > 0 && err.errno == Errno::ENODEV, "{err}"),
                    }
                }
            }));
        }
        while ok_ops.load(Ordering::Relaxed) < 50 {
            thread::yield_now();
        }
        e.snapshot_destroy(id).unwrap();
        thread::sleep(std::time::Duration::from_millis(2));
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(e.live(), LiveCounts { trackers: 1, ..LiveCounts::default() });
        let mut buf = vec![0u8; DISK_BYTES as usize];
        e.read(D0, 0, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0x11 || *b == 0x22), "origin holds only origin data");
    }
}

#[test]
fn seed_bug_b_device_in_two_snapshots_racing_adds_and_destroys() {
    for _round in 0..50 {
        let e = engine();
        e.add_disk(D0, mem(64 * KIB), 1).unwrap();
        e.attach(D0).unwrap();
        let s1 = e.snapshot_create(file_storage()).unwrap();
        let s2 = e.snapshot_create(file_storage()).unwrap();
        let adders: Vec<_> = [s1, s2]
            .into_iter()
            .map(|s| {
                let e = e.clone();
                thread::spawn(move || e.snapshot_add(s, D0))
            })
            .collect();
        let results: Vec<_> = adders.into_iter().map(|h| h.join().unwrap()).collect();
        let wins = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(wins, 1, "exactly one snapshot gets the device: {results:?}");
        let loser = results.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert_eq!(loser.errno, Errno::EBUSY);
        let winner = if results[0].is_ok() { s1 } else { s2 };
        e.snapshot_take(winner).unwrap();
        let destroyers: Vec<_> = [s1, s2]
            .into_iter()
            .map(|s| {
                let e = e.clone();
                thread::spawn(move || e.snapshot_destroy(s))
            })
            .collect();
        for d in destroyers {
            d.join().unwrap().unwrap();
        }
        assert_eq!(e.live(), LiveCounts { trackers: 1, ..LiveCounts::default() });
        e.detach(D0).unwrap();
        assert_eq!(e.live(), LiveCounts::default());
    }
}
