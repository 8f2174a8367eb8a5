//! Scenarios shared by the checkers: the same body runs under loom (every interleaving up to the
//! preemption bound), under shuttle (sampled schedules) and, in bug builds, with a bug restored
//! (`bug_injection`), so a regression test and the proof that it catches the bug are one code.
#![allow(dead_code)]

use blksnap_engine::io::{Dev, Fault, FaultDev, FaultPlan, MemDev};
use blksnap_engine::sync::{thread, Arc, StdArc};
use blksnap_engine::{Clock, Engine, EngineConfig, StorageSpec};
use blksnap_model::{DeviceId, Errno, IoKind, Params};

pub const D0: DeviceId = DeviceId::new(7, 0);
/// The chunk size of `Params::small()` for a small disk.
pub const CHUNK: usize = 4096;

/// A small engine with a manual clock that jumps on waits.
pub fn config() -> EngineConfig {
    EngineConfig::new(Params::small(), Some(1), Clock::manual(true))
}

/// A memory device of `len_bytes`.
pub fn mem(len_bytes: usize) -> Dev {
    StdArc::new(MemDev::new(len_bytes as u64))
}

/// A growable in-memory File storage behind `plan`.
pub fn faulty_file_storage(plan: &Arc<FaultPlan>, limit_sectors: u64) -> StorageSpec {
    let inner: Dev = StdArc::new(MemDev::growable(0, 1 << 20));
    StorageSpec::File { backend: StdArc::new(FaultDev::new(inner, plan.clone())), limit_sectors }
}

/// An engine with `D0` (`disk_bytes` of 0xaa, tracked) in a created, not yet taken, snapshot
/// whose storage is a growable file behind the returned fault plan.
pub fn created_snapshot(
    config: EngineConfig,
    disk_bytes: usize,
) -> (Arc<Engine>, blksnap_model::SnapshotId, Arc<FaultPlan>) {
    let e = Arc::new(Engine::new(config).unwrap());
    e.add_disk(D0, mem(disk_bytes), 1).unwrap();
    e.write(D0, 0, &vec![0xaa; disk_bytes]).unwrap();
    e.attach(D0).unwrap();
    let plan = FaultPlan::shared();
    let id = e.snapshot_create(faulty_file_storage(&plan, 64)).unwrap();
    e.snapshot_add(id, D0).unwrap();
    (e, id, plan)
}

/// The race of issue 11: an image read of an uncopied chunk in flight while a copy-on-write of
/// another chunk fails (the snapshot becomes corrupted) and a write to the read's chunk then goes
/// straight to the origin (copying has stopped). The read must return the content at take, or
/// EIO — never the post-take write as success.
pub fn image_read_racing_corruption(config: EngineConfig) {
    let (e, id, plan) = created_snapshot(config, 2 * CHUNK);
    e.snapshot_take(id).unwrap();
    // The first storage write (the copy of chunk 1) fails.
    plan.fail_next(IoKind::Write, Fault::Error(Errno::EIO));
    let e2 = e.clone();
    let writer = thread::spawn(move || {
        e2.write(D0, CHUNK as u64, &[0xbb; 512]).unwrap();
        e2.write(D0, 0, &[0xbb; 512]).unwrap();
    });
    let mut buf = [0u8; 512];
    match e.image_read(D0, 0, &mut buf) {
        Ok(()) => assert!(
            buf.iter().all(|b| *b == 0xaa),
            "an image read returned data written after the take"
        ),
        Err(err) => assert_eq!(err.errno, Errno::EIO, "{err}"),
    }
    writer.join().unwrap();
    assert_eq!(e.snapshot_info(D0).unwrap().error_code, -Errno::EIO.code());
    e.snapshot_destroy(id).unwrap();
}

/// A torn storage write (or ENOSPC) fires under whichever of two racing copies comes first: an
/// image write to a New chunk (read-modify-store) and an origin write to the same chunk (the
/// copy-on-write). Afterwards the image shows the content at take with the image write, or the
/// snapshot is corrupted with the fault's errno and reads fail — never a torn or post-take chunk;
/// the origin keeps its write either way.
pub fn racing_copies_of_one_chunk_meet_a_storage_fault(config: EngineConfig, fault: Fault) {
    let (e, id, plan) = created_snapshot(config, CHUNK);
    e.snapshot_take(id).unwrap();
    plan.fail_next(IoKind::Write, fault);
    let e2 = e.clone();
    let image_writer =
        thread::spawn(move || e2.image_write(D0, 512, &[0x33; 512]).map_err(|x| x.errno));
    e.write(D0, 1024, &[0xbb; 512]).unwrap();
    let image_write = image_writer.join().unwrap();
    let mut origin = vec![0u8; CHUNK];
    e.read(D0, 0, &mut origin).unwrap();
    assert!(origin[1024..1536].iter().all(|b| *b == 0xbb), "the origin keeps its write");
    let error_code = e.snapshot_info(D0).unwrap().error_code;
    let mut image = vec![0u8; CHUNK];
    match e.image_read(D0, 0, &mut image) {
        Ok(()) => {
            assert_eq!(error_code, 0, "a readable image belongs to a healthy snapshot");
            assert_eq!(image_write, Ok(()), "the fault hit some copy: here none failed");
            assert!(image[512..1024].iter().all(|b| *b == 0x33), "the image write");
            let rest = image[..512].iter().chain(&image[1024..]);
            assert!(rest.into_iter().all(|b| *b == 0xaa), "the content at take elsewhere");
        }
        Err(err) => {
            assert_eq!(err.errno, Errno::EIO);
            assert_eq!(error_code, -fault.errno().code(), "the fault's errno is kept");
        }
    }
    e.snapshot_destroy(id).unwrap();
}

/// The asynchronous origin write (`Engine::try_write_begin`, a ublk queue's path) racing a take:
/// a writer that got a ticket writes the backing itself and ends the ticket; the take must wait
/// for it (its write is then pre-take content), and a writer that comes after the take gets no
/// ticket for an uncopied chunk (the synchronous write copies it first). Either way the image
/// is fixed at the take: two image reads, one before the writer ends and one after, are equal.
/// A second writer makes the chunk stored after the take and then takes the ticket path.
pub fn write_ticket_racing_take(config: EngineConfig) {
    let (e, id, _plan) = created_snapshot(config, 2 * CHUNK);
    let write = |e: &Engine, offset: u64, byte: u8| {
        let data = [byte; 512];
        match e.try_write_begin(D0, offset, 512).unwrap() {
            Some(ticket) => {
                ticket.backend().write_at(&data, offset).unwrap();
                drop(ticket);
                true
            }
            None => {
                e.write(D0, offset, &data).unwrap();
                false
            }
        }
    };
    let e2 = e.clone();
    let writer = thread::spawn(move || write(&e2, 0, 0xbb));
    e.snapshot_take(id).unwrap();
    let mut first = [0u8; 512];
    e.image_read(D0, 0, &mut first).unwrap();
    assert!(first.iter().all(|b| *b == first[0]) && (first[0] == 0xaa || first[0] == 0xbb));
    writer.join().unwrap();
    let mut second = [0u8; 512];
    e.image_read(D0, 0, &mut second).unwrap();
    assert_eq!(
        first, second,
        "the image changed after the take: a write in flight landed uncopied"
    );
    // After the take: chunk 0 is stored now (copied by the write above, or by this one), so a
    // second write to it takes the ticket path and leaves the image alone.
    e.write(D0, 512, &[0xcc; 512]).unwrap();
    assert!(write(&e, 1024, 0xdd), "a write to a stored chunk needs no copy: a ticket");
    e.image_read(D0, 0, &mut second).unwrap();
    assert_eq!(first, second, "a ticket write to a stored chunk changed the image");
    let mut origin = [0u8; 512];
    e.read(D0, 1024, &mut origin).unwrap();
    assert!(origin.iter().all(|b| *b == 0xdd));
    e.snapshot_destroy(id).unwrap();
}

/// Two destroys of one taken snapshot race. The one that answers ENODEV has seen the snapshot
/// gone, so an image read it starts after that answer must fail with ENODEV too (leaving the
/// list and closing the images are one step of the winning destroy), and the device must be in
/// no snapshot (the winner's teardown, which releases the members, may still be running: the
/// engine waits for it).
pub fn destroy_racing_destroy(config: EngineConfig) {
    let (e, id, _plan) = created_snapshot(config, CHUNK);
    e.snapshot_take(id).unwrap();
    let after_destroy = move |e: &Engine| match e.snapshot_destroy(id) {
        Ok(()) => true,
        Err(err) => {
            assert_eq!(err.errno, Errno::ENODEV, "{err}");
            let mut buf = [0u8; 512];
            let read = e.image_read(D0, 0, &mut buf);
            assert!(
                matches!(&read, Err(err) if err.errno == Errno::ENODEV),
                "an image read after a destroy answered ENODEV: {read:?}"
            );
            assert_eq!(e.member_of(D0).unwrap(), None, "a member after a destroy answered ENODEV");
            false
        }
    };
    let e2 = e.clone();
    let other = thread::spawn(move || after_destroy(&e2));
    let mine = after_destroy(&e);
    let theirs = other.join().unwrap();
    assert!(mine ^ theirs, "exactly one destroy succeeds: {mine} {theirs}");
    let mut buf = [0u8; 512];
    assert_eq!(e.image_read(D0, 0, &mut buf).unwrap_err().errno, Errno::ENODEV);
}
