//! The engine end to end on memory devices: the take / copy-on-write / image cycle, storage
//! modes, overflow, teardown with nothing left alive.

use blksnap_engine::io::{Dev, MemDev};
use blksnap_engine::sync::StdArc;
use blksnap_engine::{Clock, Engine, EngineConfig, LiveCounts, StorageSpec};
use blksnap_model::{DeviceId, Errno, EventKind, Params, SectorRange};

const KIB: u64 = 1024;
const D0: DeviceId = DeviceId::new(7, 0);
const D1: DeviceId = DeviceId::new(7, 1);

fn engine() -> Engine {
    let config = EngineConfig::new(Params::small(), Some(1), Clock::manual(true));
    Engine::new(config).unwrap()
}

fn mem(len: u64) -> Dev {
    StdArc::new(MemDev::new(len))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn read(e: &Engine, dev: DeviceId, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    e.read(dev, off, &mut b).unwrap();
    b
}

fn image(e: &Engine, dev: DeviceId, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    e.image_read(dev, off, &mut b).unwrap();
    b
}

#[test]
fn take_cow_and_image_cycle() {
    let e = engine();
    e.add_disk(D0, mem(256 * KIB), 1).unwrap();
    e.attach(D0).unwrap();
    let before = pattern(256 * KIB as usize, 1);
    e.write(D0, 0, &before).unwrap();
    let id = e
        .snapshot_create(StorageSpec::File {
            backend: StdArc::new(MemDev::growable(0, 1 << 30)),
            limit_sectors: 1 << 21,
        })
        .unwrap();
    e.snapshot_add(id, D0).unwrap();
    e.snapshot_take(id).unwrap();
    let chunks_before = e.live().chunks;
    // Overwrite part of the origin: the image keeps the pre-take content.
    e.write(D0, 6 * KIB, &pattern(10 * KIB as usize, 2)).unwrap();
    e.discard(D0, 64 * KIB, 8 * KIB).unwrap();
    assert_eq!(image(&e, D0, 0, 256 * KIB as usize), before);
    assert_ne!(read(&e, D0, 0, 256 * KIB as usize), before);
    assert_eq!(e.live().chunks - chunks_before, 3 + 2, "4 KiB chunks: 6..16 KiB and 64..72 KiB");
    // Image writes persist and mark both CBT maps.
    e.image_write(D0, 100 * KIB, &[0xab; 4096]).unwrap();
    assert_eq!(image(&e, D0, 100 * KIB, 4096), vec![0xab; 4096]);
    let mut map = Vec::new();
    let info = e.cbt_info(D0).unwrap();
    e.cbt_map(D0, 0, info.block_count, &mut map).unwrap();
    assert_eq!(map[25], 1, "image write at 100 KiB marks the read map with previous");
    let info_image = e.snapshot_info(D0).unwrap();
    assert_eq!((info_image.error_code, info_image.image), (0, Some(D0)));
    e.snapshot_destroy(id).unwrap();
    assert_eq!(e.image_read(D0, 0, &mut [0; 512]).unwrap_err().errno, Errno::ENODEV);
    assert_eq!(e.live(), LiveCounts { trackers: 1, ..LiveCounts::default() });
    e.detach(D0).unwrap();
    assert_eq!(e.live(), LiveCounts::default());
}

#[test]
fn v3_ranges_overflow_breaks_the_snapshot_not_the_origin() {
    let e = engine();
    e.add_disk(D0, mem(128 * KIB), 1).unwrap();
    e.attach(D0).unwrap();
    let id = e.snapshot_create(StorageSpec::Ranges).unwrap();
    let ev = e.wait_event(id, 100).unwrap();
    assert_eq!(ev.kind, EventKind::LowFreeSpace { requested_sectors: 64 });
    e.snapshot_add(id, D0).unwrap();
    assert_eq!(e.snapshot_take(id).unwrap_err().errno, Errno::EFAULT, "no storage yet");
    let storage = mem(64 * KIB);
    // Two chunks' worth (16 sectors) of storage.
    e.snapshot_append_storage(id, storage.clone(), &[SectorRange::new(0, 16)]).unwrap();
    let overlap = e.snapshot_append_storage(id, storage.clone(), &[SectorRange::new(8, 8)]);
    assert_eq!(overlap.unwrap_err().errno, Errno::EINVAL);
    e.snapshot_take(id).unwrap();
    let data = pattern(16 * KIB as usize, 3);
    e.write(D0, 0, &data).unwrap();
    assert_eq!(read(&e, D0, 0, data.len()), data, "the origin loses nothing");
    // Two low-space events (threshold 32 sectors: every allocation is "low"), then corrupted.
    let mut kinds = Vec::new();
    while let Ok(ev) = e.wait_event(id, 0) {
        kinds.push(ev.kind);
    }
    assert_eq!(kinds.last(), Some(&EventKind::Corrupted { device: D0, errno: Errno::ENOSPC }));
    assert_eq!(kinds.iter().filter(|k| matches!(k, EventKind::Corrupted { .. })).count(), 1);
    assert_eq!(e.image_read(D0, 0, &mut [0; 512]).unwrap_err().errno, Errno::EIO);
    assert_eq!(e.snapshot_info(D0).unwrap().error_code, -28);
    e.snapshot_destroy(id).unwrap();
    assert_eq!(e.wait_event(id, 0).unwrap_err().errno, Errno::ESRCH);
}

#[test]
fn device_in_two_snapshots_is_refused_and_both_destroy_in_either_order() {
    for destroy_first_taken in [true, false] {
        let e = engine();
        e.add_disk(D0, mem(64 * KIB), 1).unwrap();
        e.add_disk(D1, mem(64 * KIB), 1).unwrap();
        e.attach(D0).unwrap();
        e.attach(D1).unwrap();
        let file = || StorageSpec::File {
            backend: StdArc::new(MemDev::growable(0, 1 << 24)),
            limit_sectors: 1 << 14,
        };
        let s1 = e.snapshot_create(file()).unwrap();
        e.snapshot_add(s1, D0).unwrap();
        assert_eq!(e.snapshot_add(s1, D0).unwrap_err().errno, Errno::EALREADY);
        e.snapshot_take(s1).unwrap();
        let s2 = e.snapshot_create(file()).unwrap();
        assert_eq!(e.snapshot_add(s2, D0).unwrap_err().errno, Errno::EBUSY);
        e.snapshot_add(s2, D1).unwrap();
        assert_eq!(e.snapshot_add(s1, D1).unwrap_err().errno, Errno::EBUSY);
        assert_eq!(e.detach(D0).unwrap_err().errno, Errno::EBUSY);
        let (a, b) = if destroy_first_taken { (s1, s2) } else { (s2, s1) };
        e.snapshot_destroy(a).unwrap();
        e.snapshot_destroy(b).unwrap();
        assert_eq!(e.snapshot_destroy(b).unwrap_err().errno, Errno::ENODEV);
        assert_eq!(e.live(), LiveCounts { trackers: 2, ..LiveCounts::default() });
        // Both devices are free again.
        let s3 = e.snapshot_create(file()).unwrap();
        e.snapshot_add(s3, D0).unwrap();
        e.snapshot_add(s3, D1).unwrap();
        e.snapshot_destroy(s3).unwrap();
    }
}

#[test]
fn full_chunk_image_write_does_not_read_the_origin() {
    use blksnap_engine::io::{Fault, FaultDev, FaultPlan};
    use blksnap_model::IoKind;
    let e = engine();
    let plan = FaultPlan::shared();
    e.add_disk(D0, StdArc::new(FaultDev::new(mem(64 * KIB), plan.clone())), 1).unwrap();
    e.attach(D0).unwrap();
    let id = e
        .snapshot_create(StorageSpec::File {
            backend: StdArc::new(MemDev::growable(0, 1 << 24)),
            limit_sectors: 1 << 14,
        })
        .unwrap();
    e.snapshot_add(id, D0).unwrap();
    e.snapshot_take(id).unwrap();
    let reads = plan.ops_seen();
    e.image_write(D0, 8 * KIB, &[7; 4096]).unwrap();
    assert_eq!(plan.ops_seen(), reads, "a whole 4 KiB chunk: no origin I/O at all");
    plan.fail_next(IoKind::Read, Fault::Error(Errno::EIO));
    assert_eq!(
        e.image_write(D0, 16 * KIB, &[7; 512]).unwrap_err().errno,
        Errno::EIO,
        "partial: loads the origin"
    );
    assert_eq!(e.snapshot_info(D0).unwrap().error_code, 0, "a failed load does not corrupt");
    e.image_write(D0, 16 * KIB, &[7; 512]).unwrap();
    e.snapshot_destroy(id).unwrap();
}

#[test]
fn cbt_survives_a_clean_restart() {
    let disk = mem(64 * KIB);
    let e = engine();
    e.add_disk(D0, disk.clone(), 1).unwrap();
    e.attach(D0).unwrap();
    e.write(D0, 8 * KIB, &[1; 512]).unwrap();
    let id = e.snapshot_create(StorageSpec::Ranges).unwrap();
    e.snapshot_add(id, D0).unwrap();
    e.snapshot_append_storage(id, mem(64 * KIB), &[SectorRange::new(0, 128)]).unwrap();
    e.snapshot_take(id).unwrap();
    e.snapshot_destroy(id).unwrap();
    e.write(D0, 16 * KIB, &[2; 512]).unwrap();
    let saved = e.cbt_export(D0).unwrap();
    let info = e.cbt_info(D0).unwrap();
    drop(e);
    // A new engine (the restarted service) over the same disk.
    let e2 = engine();
    e2.add_disk(D0, disk, 1).unwrap();
    e2.attach_with_cbt(D0, &saved).unwrap();
    assert_eq!(e2.cbt_info(D0).unwrap(), info, "same generation and numbers");
    assert_eq!(e2.attach_with_cbt(D0, &saved).unwrap_err().errno, Errno::EALREADY);
    assert_eq!(e2.cbt_export(D0).unwrap(), saved);
    let e3 = engine();
    e3.add_disk(D0, mem(128 * KIB), 1).unwrap();
    assert_eq!(e3.attach_with_cbt(D0, &saved).unwrap_err().errno, Errno::EINVAL, "resized");
}

#[test]
fn remove_disk_refuses_a_member_and_frees_the_number() {
    let e = engine();
    e.add_disk(D0, mem(64 * KIB), 1).unwrap();
    e.attach(D0).unwrap();
    let id = e.snapshot_create(StorageSpec::Ranges).unwrap();
    e.snapshot_add(id, D0).unwrap();
    assert_eq!(e.remove_disk(D0).unwrap_err().errno, Errno::EBUSY);
    e.snapshot_destroy(id).unwrap();
    e.remove_disk(D0).unwrap();
    assert_eq!(e.remove_disk(D0).unwrap_err().errno, Errno::ENODEV);
    assert_eq!(e.cbt_info(D0).unwrap_err().errno, Errno::ENODEV);
    assert_eq!(e.live(), LiveCounts::default(), "tracker freed with the disk");
    // the number can be registered again (a new device that got the same MAJ:MIN)
    e.add_disk(D0, mem(64 * KIB), 1).unwrap();
}

/// The asynchronous write path's first half (`try_write_begin`): a ticket marks the CBT like a
/// write; none is given for an uncopied chunk of a taken snapshot (the caller writes through
/// `write`, which copies), one is for a stored chunk, a corrupted snapshot or no snapshot; range
/// and disk errors are `write`'s; a zero-length write gets none.
#[test]
fn write_tickets_mark_the_cbt_and_never_skip_a_copy() {
    let e = engine();
    e.add_disk(D0, mem(64 * KIB), 1).unwrap();
    // untracked: a ticket, nothing to mark
    let t = e.try_write_begin(D0, 0, 4096).unwrap().expect("untracked: a ticket");
    t.backend().write_at(&pattern(4096, 1), 0).unwrap();
    drop(t);
    e.attach(D0).unwrap();
    let t = e.try_write_begin(D0, 8 * KIB, 4096).unwrap().expect("tracked, no snapshot: a ticket");
    t.backend().write_at(&[7; 4096], 8 * KIB).unwrap();
    drop(t);
    e.write(D0, 16 * KIB, &[7; 4096]).unwrap();
    assert_eq!(read(&e, D0, 8 * KIB, 4096), vec![7; 4096]);
    // errors and nothing-to-do
    assert_eq!(e.try_write_begin(D0, 64 * KIB, 512).err().map(|x| x.errno), Some(Errno::EINVAL));
    assert_eq!(e.try_write_begin(D1, 0, 512).err().map(|x| x.errno), Some(Errno::ENODEV));
    assert!(e.try_write_begin(D0, 0, 0).unwrap().is_none());
    // taken: no ticket for an uncopied chunk; the write copies it, then tickets are given
    let id = e
        .snapshot_create(StorageSpec::File {
            backend: StdArc::new(MemDev::growable(0, 1 << 20)),
            limit_sectors: 1 << 11,
        })
        .unwrap();
    e.snapshot_add(id, D0).unwrap();
    e.snapshot_take(id).unwrap();
    // the take made the marks readable (the read map): the ticket's block as the write's
    let (mut map, info) = (Vec::new(), e.cbt_info(D0).unwrap());
    e.cbt_map(D0, 0, info.block_count, &mut map).unwrap();
    let block = |at: u64| map[(at / u64::from(info.block_size_bytes)) as usize];
    assert_eq!(block(8 * KIB), block(16 * KIB), "the ticket marked its block like a write");
    assert_ne!(block(8 * KIB), block(32 * KIB), "an unwritten block is not marked");
    let before = image(&e, D0, 0, 64 * KIB as usize);
    assert!(e.try_write_begin(D0, 0, 512).unwrap().is_none(), "chunk 0 is not copied yet");
    assert!(e.try_write_begin(D0, 4096 - 512, 1024).unwrap().is_none(), "spans chunk 1 too");
    e.write(D0, 0, &[9; 512]).unwrap();
    let t = e.try_write_begin(D0, 512, 512).unwrap().expect("chunk 0 is stored: a ticket");
    t.backend().write_at(&[9; 512], 512).unwrap();
    drop(t);
    assert!(e.try_write_begin(D0, 4096 - 512, 1024).unwrap().is_none(), "chunk 1 still is not");
    assert_eq!(image(&e, D0, 0, 64 * KIB as usize), before, "the image is the content at take");
    assert_eq!(read(&e, D0, 0, 1024), vec![9; 1024]);
    e.snapshot_destroy(id).unwrap();
    // no snapshot again: a ticket; and a ticket outstanding does not stop reads or a second one
    let a = e.try_write_begin(D0, 0, 512).unwrap().expect("after destroy: a ticket");
    let b = e.try_write_begin(D0, 512, 512).unwrap().expect("two tickets at once");
    drop((a, b));
    e.detach(D0).unwrap();
    e.remove_disk(D0).unwrap();
    assert_eq!(e.live(), LiveCounts::default());
}
