//! loom models: every interleaving (up to the preemption bound) of small, focused shapes.
//!
//! Run: `RUSTFLAGS="--cfg blksnap_loom" CARGO_TARGET_DIR=target/loom cargo test --release -p
//! blksnap-engine --test loom_models`. `LOOM_MAX_PREEMPTIONS` (default here: 2) bounds the
//! search; loom's own variables (LOOM_CHECKPOINT_FILE, LOOM_LOG, ...) work as documented.
#![cfg(blksnap_loom)]

mod common;

use blksnap_engine::chunk::{ChunkPermit, ChunkState};
use blksnap_engine::clock::Clock;
use blksnap_engine::diff_area::DiffArea;
use blksnap_engine::diff_buffer::DiffBufferPool;
use blksnap_engine::diff_storage::{DiffStorage, StorageSpec};
use blksnap_engine::event_queue::EventQueue;
use blksnap_engine::io::{Dev, MemDev};
use blksnap_engine::kref::{Kref, LiveCounts, LiveObjects, ObjKind};
use blksnap_engine::sync::atomic::{AtomicUsize, Ordering};
use blksnap_engine::sync::{thread, Arc, StdArc};
use blksnap_engine::{Engine, EngineConfig, Shared};
use blksnap_model::formulas::chunk_layout;
use blksnap_model::{DeviceId, Errno, Event, EventKind, Params};

/// The single entry point: loom's builder, with a default preemption bound of 2 unless the
/// environment set one.
fn model<F: Fn() + Sync + Send + 'static>(f: F) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(2);
    }
    // Count the executions (std atomics: outside the model) so the run reports its size.
    let executions = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = executions.clone();
    builder.check(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f()
    });
    let n = executions.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("loom: {n} executions explored");
    assert!(n > 1, "a model with threads explores more than one interleaving");
}

const D0: DeviceId = DeviceId::new(7, 0);

fn small_engine(jump_on_wait: bool) -> Engine {
    let config = EngineConfig::new(Params::small(), Some(1), Clock::manual(jump_on_wait));
    Engine::new(config).unwrap()
}

fn mem(len: u64) -> Dev {
    StdArc::new(MemDev::new(len))
}

fn file_storage() -> StorageSpec {
    StorageSpec::File { backend: StdArc::new(MemDev::growable(0, 1 << 20)), limit_sectors: 64 }
}

/// A value that counts its own drops, to prove the release ran exactly once.
struct DropCounter(Arc<AtomicUsize>);
impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn kref_last_put_races_release_exactly_once() {
    model(|| {
        let live = Arc::new(LiveObjects::new());
        let drops = Arc::new(AtomicUsize::new(0));
        let a = Kref::new(DropCounter(drops.clone()), ObjKind::Chunk, &live);
        let b = a.clone();
        let t = thread::spawn(move || {
            // get then put in another thread while the owner puts.
            let c = b.clone();
            drop(b);
            drop(c);
        });
        drop(a);
        t.join().unwrap();
        assert_eq!(drops.load(Ordering::SeqCst), 1, "release ran exactly once");
        assert_eq!(live.counts(), LiveCounts::default());
    });
}

/// A diff area over an 8 KiB origin (two 4 KiB chunks) with a growable file storage.
fn diff_area() -> (Arc<Shared>, Kref<DiffArea>) {
    let shared = Arc::new(Shared::new(Params::small(), Clock::manual(true), 1).unwrap());
    let storage = DiffStorage::new(file_storage(), shared.clone()).unwrap();
    let storage = Kref::new(storage, ObjKind::DiffStorage, shared.live());
    let layout = chunk_layout(&shared.params(), 16, 1);
    let area = DiffArea::new(D0, mem(8192), layout, storage, shared.live());
    area.set_image_open(true);
    (shared, area)
}

#[test]
fn chunk_permit_moves_into_a_completion_and_excludes() {
    model(|| {
        let (shared, area) = diff_area();
        let inside = Arc::new(AtomicUsize::new(0));
        let permit = ChunkPermit::acquire(area.clone(), area.chunk(0), 0);
        // The "completion" releases the permit in another thread.
        let inside1 = inside.clone();
        let completion = thread::spawn(move || {
            assert_eq!(inside1.fetch_add(1, Ordering::SeqCst), 0, "one owner at a time");
            inside1.fetch_sub(1, Ordering::SeqCst);
            drop(permit);
        });
        let (area2, inside2) = (area.clone(), inside.clone());
        let contender = thread::spawn(move || {
            let p = ChunkPermit::acquire(area2.clone(), area2.chunk(0), 0);
            assert_eq!(inside2.fetch_add(1, Ordering::SeqCst), 0, "one owner at a time");
            inside2.fetch_sub(1, Ordering::SeqCst);
            assert!(matches!(p.state(), ChunkState::New));
        });
        completion.join().unwrap();
        contender.join().unwrap();
        drop(area);
        assert_eq!(shared.live().counts(), LiveCounts::default(), "permits pinned, then released");
    });
}

#[test]
fn image_writes_to_one_chunk_lose_no_update() {
    model(|| {
        let (shared, area) = diff_area();
        let a2 = area.clone();
        // Two partial writes to the same New chunk: each loads, applies and stores under the
        // permit, so both survive.
        let t = thread::spawn(move || DiffArea::image_write(&a2, 0, &[1u8; 512]).unwrap());
        DiffArea::image_write(&area, 512, &[2u8; 512]).unwrap();
        t.join().unwrap();
        let mut buf = [0u8; 1024];
        DiffArea::image_read(&area, 0, &mut buf).unwrap();
        assert!(buf[..512].iter().all(|b| *b == 1) && buf[512..].iter().all(|b| *b == 2));
        drop(area);
        assert_eq!(shared.live().counts(), LiveCounts::default());
    });
}

#[test]
fn cow_vs_image_read_of_the_same_chunk() {
    model(|| {
        let e = Arc::new(small_engine(true));
        e.add_disk(D0, mem(4096), 1).unwrap();
        e.write(D0, 0, &[0xaa; 4096]).unwrap();
        e.attach(D0).unwrap();
        let id = e.snapshot_create(file_storage()).unwrap();
        e.snapshot_add(id, D0).unwrap();
        e.snapshot_take(id).unwrap();
        let e2 = e.clone();
        let writer = thread::spawn(move || e2.write(D0, 0, &[0xbb; 512]).unwrap());
        let mut buf = [0u8; 512];
        e.image_read(D0, 0, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0xaa), "the image never shows a post-take write");
        writer.join().unwrap();
        e.snapshot_destroy(id).unwrap();
    });
}

/// Two copies race for the pool's one free buffer: each gets a buffer of its own (the loser a
/// new one, unless the winner already gave it back), and every buffer goes back exactly once:
/// at the end the pool holds the seed plus the new ones (not lost, not returned twice),
/// whatever the interleaving of the pops and pushes.
#[test]
fn diff_buffers_two_copies_race_for_one_buffer() {
    /// Take a buffer, say whether it is new (a new one is zeroed; the seed holds 9s and a
    /// reused one the other copy's pattern), overwrite it and check nobody else wrote it.
    fn copy(pool: &DiffBufferPool, len: usize, pattern: u8) -> bool {
        let mut b = pool.take(len);
        assert_eq!(b.len(), len);
        let new = b.iter().all(|&x| x == 0);
        b.fill(pattern);
        thread::yield_now();
        assert!(b.iter().all(|&x| x == pattern), "no other copy writes this buffer");
        new
    }
    model(|| {
        let pool = Arc::new(DiffBufferPool::with_kept(64, 3));
        pool.take(64).fill(9);
        assert_eq!(pool.free_count(), 1);
        let p2 = pool.clone();
        let other = thread::spawn(move || copy(&p2, 64, 1));
        let new_here = copy(&pool, 48, 2);
        let new_there = other.join().unwrap();
        let expected = 1 + usize::from(new_here) + usize::from(new_there);
        assert_eq!(pool.free_count(), expected, "every buffer returned exactly once");
        assert!(expected <= 2, "at most one new buffer: the seed serves one copy");
    });
}

/// Copy-on-write of two chunks at once through one diff area's pool: each copy stores its own
/// chunk's pre-image (a shared or stale buffer would store the other chunk's data).
#[test]
fn racing_copies_of_two_chunks_share_the_buffer_pool() {
    model(|| {
        let e = Arc::new(small_engine(true));
        e.add_disk(D0, mem(8192), 1).unwrap();
        e.write(D0, 0, &[0xaa; 4096]).unwrap();
        e.write(D0, 4096, &[0xcc; 4096]).unwrap();
        e.attach(D0).unwrap();
        let id = e.snapshot_create(file_storage()).unwrap();
        e.snapshot_add(id, D0).unwrap();
        e.snapshot_take(id).unwrap();
        let e2 = e.clone();
        let writer = thread::spawn(move || e2.write(D0, 4096, &[0xdd; 512]).unwrap());
        e.write(D0, 0, &[0xbb; 512]).unwrap();
        writer.join().unwrap();
        let mut buf = vec![0u8; 8192];
        e.image_read(D0, 0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|b| *b == 0xaa), "chunk 0 holds its own pre-image");
        assert!(buf[4096..].iter().all(|b| *b == 0xcc), "chunk 1 holds its own pre-image");
        e.snapshot_destroy(id).unwrap();
    });
}

/// Issue 11's race, with a storage fault: a read of an uncopied chunk racing a failed
/// copy-on-write and a write that then bypasses copying returns the content at take or EIO.
#[test]
fn image_read_racing_corruption_never_returns_post_take_data() {
    model(|| common::image_read_racing_corruption(common::config()));
}

/// The asynchronous write path racing a take: the take waits for every write ticket, a write
/// after the take gets no ticket for an uncopied chunk; the image is fixed at the take.
#[test]
fn write_ticket_racing_take_never_changes_the_image() {
    model(|| common::write_ticket_racing_take(common::config()));
}

/// Two destroys racing: the one answering ENODEV never finds the image still open afterwards
/// (leaving the list closes the images).
#[test]
fn destroy_answering_enodev_leaves_no_open_image() {
    model(|| common::destroy_racing_destroy(common::config()));
}

/// Faults under racing copies: a torn storage write, then ENOSPC, meets whichever of an image
/// write and an origin write to one New chunk copies first.
#[test]
fn racing_copies_of_one_chunk_meet_a_storage_fault() {
    use blksnap_engine::io::Fault;
    for fault in
        [Fault::Torn { sectors_written: 3, errno: Errno::EIO }, Fault::Error(Errno::ENOSPC)]
    {
        model(move || {
            common::racing_copies_of_one_chunk_meet_a_storage_fault(common::config(), fault)
        });
    }
}

#[test]
fn cbt_switch_is_atomic_for_a_concurrent_writer() {
    model(|| {
        let e = Arc::new(small_engine(true));
        e.add_disk(D0, mem(4096), 1).unwrap();
        e.attach(D0).unwrap();
        let id = e.snapshot_create(file_storage()).unwrap();
        e.snapshot_add(id, D0).unwrap();
        let e2 = e.clone();
        let writer = thread::spawn(move || e2.write(D0, 0, &[1; 512]).unwrap());
        e.snapshot_take(id).unwrap();
        writer.join().unwrap();
        let mut frozen = Vec::new();
        e.cbt_map(D0, 0, 1, &mut frozen).unwrap();
        // Freeze again to read the live map: the write is in exactly one generation.
        e.snapshot_destroy(id).unwrap();
        let id2 = e.snapshot_create(file_storage()).unwrap();
        e.snapshot_add(id2, D0).unwrap();
        e.snapshot_take(id2).unwrap();
        let mut live_map = Vec::new();
        e.cbt_map(D0, 0, 1, &mut live_map).unwrap();
        match frozen[0] {
            1 => assert_eq!(live_map[0], 1, "written before the switch: number 1"),
            0 => assert_eq!(live_map[0], 2, "written after the switch: number 2"),
            v => panic!("impossible CBT value {v}"),
        }
        e.snapshot_destroy(id2).unwrap();
    });
}

#[test]
fn cbt_lazy_copy_survives_racing_markers() {
    // After a take, the first raise of a block saves its pre-take value (the deferred copy of
    // the kernel's read map). Two origin writers and an image write race on the same block:
    // whatever the order, the read value is the pre-take one raised only by the image write
    // (to `previous`), and the write value is `active`.
    use blksnap_engine::cbt::CbtMap;
    use blksnap_model::{SectorRange, Uuid};
    model(|| {
        let m = Arc::new(CbtMap::new(&Params::small(), 64, Uuid([1; 16])));
        m.mark_write(SectorRange::new(0, 1)).unwrap(); // number 1
        m.switch(|| unreachable!()); // active 2, previous 1: read value 1
        m.switch(|| unreachable!()); // active 3, previous 2: read value 1 (written in 1)
        let writers: Vec<_> = (0..2)
            .map(|_| {
                let m = m.clone();
                thread::spawn(move || m.mark_write(SectorRange::new(0, 1)).unwrap())
            })
            .collect();
        m.mark_both(SectorRange::new(0, 1)).unwrap();
        for w in writers {
            w.join().unwrap();
        }
        let mut read = Vec::new();
        m.read_map(0, 1, &mut read).unwrap();
        assert_eq!(read[0], 2, "pre-take value 1, raised to previous by the image write");
        let st = m.state();
        assert_eq!(st.write_map[0], 3);
        m.switch(|| unreachable!());
        m.read_map(0, 1, &mut read).unwrap();
        assert_eq!(read[0], 3, "the next take copies the write value");
    });
}

#[test]
fn stored_map_racing_first_sets_publish_one_page() {
    // Two writers set bits whose directory and page do not exist yet: each may allocate, one
    // publication wins, the loser frees its copy; a concurrent reader sees a bit only once it
    // is set, and both bits are set at the end (no update lost on the losing page).
    use blksnap_engine::stored_map::{StoredMap, PAGE_CHUNKS};
    model(|| {
        let map = Arc::new(StoredMap::new(2 * PAGE_CHUNKS));
        let (a, b) = (1, PAGE_CHUNKS - 1); // same page, different words
                                           // Raised by a setter just before its `set`: a reader may see a bit only after that.
        let started = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let setters: Vec<_> = [a, b]
            .into_iter()
            .enumerate()
            .map(|(i, chunk)| {
                let (map, started) = (map.clone(), started.clone());
                thread::spawn(move || {
                    started[i].store(1, Ordering::SeqCst);
                    map.set(chunk)
                })
            })
            .collect();
        // A reader racing the publication (loom checks its loads against the stores).
        if map.is_set(a) {
            assert_eq!(started[0].load(Ordering::SeqCst), 1, "a bit seen before anyone set it");
            assert!(map.is_set(a), "a bit seen set is never seen clear again");
        }
        if map.is_set(b) {
            assert_eq!(started[1].load(Ordering::SeqCst), 1, "a bit seen before anyone set it");
        }
        for s in setters {
            s.join().unwrap();
        }
        assert!(map.is_set(a) && map.is_set(b), "both bits survive the publication race");
        assert!(!map.is_set(0) && !map.is_set(PAGE_CHUNKS), "no other bit set");
        assert_eq!(map.pages_allocated(), 1, "one page published");
    });
}

#[test]
fn membership_add_add_destroy_never_double_links() {
    model(|| {
        let e = Arc::new(small_engine(true));
        e.add_disk(D0, mem(4096), 1).unwrap();
        e.attach(D0).unwrap();
        let s1 = e.snapshot_create(file_storage()).unwrap();
        let s2 = e.snapshot_create(file_storage()).unwrap();
        let e1 = e.clone();
        let t1 = thread::spawn(move || e1.snapshot_add(s1, D0).map_err(|x| x.errno));
        let e2 = e.clone();
        let t2 = thread::spawn(move || {
            let r = e2.snapshot_add(s2, D0).map_err(|x| x.errno);
            e2.snapshot_destroy(s1).unwrap();
            r
        });
        let (r1, r2) = (t1.join().unwrap(), t2.join().unwrap());
        // s1's add may also find s1 destroyed already (ESRCH).
        let ok = [r1, r2].iter().filter(|r| r.is_ok()).count();
        assert!(ok <= 1 && ok + usize::from(r1 == Err(Errno::ESRCH)) >= 1, "{r1:?} {r2:?}");
        assert!(r2.is_ok() || r2 == Err(Errno::EBUSY));
        e.snapshot_destroy(s2).unwrap();
        // Both gone: the device is free and nothing but the tracker lives.
        assert_eq!(e.live(), LiveCounts { trackers: 1, ..LiveCounts::default() });
        let s3 = e.snapshot_create(file_storage()).unwrap();
        e.snapshot_add(s3, D0).unwrap();
        e.snapshot_destroy(s3).unwrap();
    });
}

fn ev(n: u64) -> Event {
    Event { time_ns: n, kind: EventKind::NoSpace { requested_sectors: n } }
}

#[test]
fn event_push_wakes_a_waiter() {
    model(|| {
        let q = Arc::new(EventQueue::new());
        let clock = Clock::manual(false); // waits block: no timeout can fire
        let q2 = q.clone();
        let waiter = thread::spawn(move || q2.wait(1000, &clock).unwrap());
        q.push(ev(1));
        assert_eq!(waiter.join().unwrap(), ev(1), "no lost wake-up");
    });
}

#[test]
fn event_timeout_races_push_without_losing_the_event() {
    model(|| {
        let q = Arc::new(EventQueue::new());
        let clock = Clock::manual(false);
        let (q2, c2) = (q.clone(), clock.clone());
        let waiter = thread::spawn(move || q2.wait(1, &c2));
        // A timer actor fires the timeout while the event is pushed.
        let (q3, c3) = (q.clone(), clock.clone());
        let timer = thread::spawn(move || {
            if let Clock::Manual(m) = &c3 {
                m.advance(2_000_000);
            }
            q3.kick();
        });
        q.push(ev(7));
        timer.join().unwrap();
        match waiter.join().unwrap() {
            Ok(e) => assert_eq!(e, ev(7)),
            Err(e) => {
                assert_eq!(e.errno, Errno::ENOENT);
                assert_eq!(q.len(), 1, "a timed-out waiter leaves the event queued");
            }
        }
    });
}

#[test]
fn event_close_races_wait() {
    model(|| {
        let q = Arc::new(EventQueue::new());
        let q2 = q.clone();
        let waiter = thread::spawn(move || q2.wait(1000, &Clock::manual(false)));
        q.close();
        assert_eq!(waiter.join().unwrap().unwrap_err().errno, Errno::ESRCH);
    });
}

#[test]
fn two_waiters_one_event() {
    model(|| {
        let q = Arc::new(EventQueue::new());
        // Jumping clock: a waiter that would sleep times out at once, so every ordering ends.
        let clock = Clock::manual(true);
        let spawn_waiter = |q: Arc<EventQueue>, c: Clock| thread::spawn(move || q.wait(1, &c));
        let w1 = spawn_waiter(q.clone(), clock.clone());
        let w2 = spawn_waiter(q.clone(), clock.clone());
        q.push(ev(3));
        let results = [w1.join().unwrap(), w2.join().unwrap()];
        let got = results.iter().filter(|r| r.is_ok()).count();
        assert!(results.iter().all(|r| match r {
            Ok(e) => *e == ev(3),
            Err(e) => e.errno == Errno::ENOENT,
        }));
        assert_eq!(got + q.len(), 1, "the event is delivered once or still queued, never twice");
    });
}

#[test]
fn destroy_races_wait_event_on_the_engine() {
    model(|| {
        let e = Arc::new(small_engine(false));
        let id = e.snapshot_create(file_storage()).unwrap();
        let e2 = e.clone();
        let waiter = thread::spawn(move || e2.wait_event(id, 1000).map_err(|x| x.errno));
        e.snapshot_destroy(id).unwrap();
        // Either the waiter found it gone (ESRCH at lookup) or was woken by the close (ESRCH):
        // the waiter may also have been the snapshot's last owner.
        assert_eq!(waiter.join().unwrap(), Err(Errno::ESRCH));
        assert_eq!(e.live(), LiveCounts::default());
    });
}

#[test]
fn permit_released_on_the_error_path() {
    use blksnap_engine::io::{Fault, FaultDev, FaultPlan};
    use blksnap_model::IoKind;
    model(|| {
        let shared = Arc::new(Shared::new(Params::small(), Clock::manual(true), 1).unwrap());
        let plan = FaultPlan::shared();
        let backing: Dev = StdArc::new(MemDev::growable(0, 1 << 20));
        let backend: Dev = StdArc::new(FaultDev::new(backing, plan.clone()));
        let spec = StorageSpec::File { backend, limit_sectors: 64 };
        let storage = DiffStorage::new(spec, shared.clone()).unwrap();
        let storage = Kref::new(storage, ObjKind::DiffStorage, shared.live());
        let layout = chunk_layout(&shared.params(), 16, 1);
        let area = DiffArea::new(D0, mem(8192), layout, storage, shared.live());
        area.set_image_open(true);
        // The first storage write fails: whichever writer stores first gets EIO and the area is
        // corrupted; the other must still get the permit (no leak, no deadlock) and see EIO.
        plan.fail_next(IoKind::Write, Fault::Error(Errno::EIO));
        let a2 = area.clone();
        let t =
            thread::spawn(move || DiffArea::image_write(&a2, 0, &[1u8; 512]).map_err(|e| e.errno));
        let mine = DiffArea::image_write(&area, 512, &[2u8; 512]).map_err(|e| e.errno);
        let theirs = t.join().unwrap();
        assert_eq!((mine, theirs), (Err(Errno::EIO), Err(Errno::EIO)));
        assert_eq!(area.error(), Some(Errno::EIO));
        drop(area);
        assert_eq!(shared.live().counts(), LiveCounts::default(), "every permit released");
    });
}
