//! The control plane end to end on any host: the daemon with the null front end (no block
//! devices), its socket, and the protocol — every request kind, errors, version mismatch,
//! malformed frames, access rules.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use blksnap_engine::{Engine, EngineConfig};
use blksnap_proto::{
    encode, read_frame, Dev, EventKindW, Range, Reply, Request, RequestFrame, Storage,
    PROTOCOL_VERSION,
};
use blksnap_service::control::{allowed, peer_cred, peer_groups, Limits, Peer};
use blksnap_service::{Client, Config, Daemon, NullFrontend};

struct Fixture {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    socket: std::path::PathBuf,
    daemon: Arc<Daemon>,
    devs: Vec<Dev>,
}

fn fixture(n: usize) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let socket = dir.join("run/control");
    let daemon = common::serve_null(&socket, &dir);
    let mut devs = Vec::new();
    for i in 0..n {
        let backing = dir.join(format!("b{i}.img"));
        std::fs::File::create(&backing).unwrap().set_len(8 << 20).unwrap();
        devs.push(daemon.add_origin(&backing, true).unwrap().into());
    }
    Fixture { _dir: tmp, dir, socket, daemon, devs }
}

#[test]
fn every_request_over_the_socket() {
    let f = fixture(2);
    let mut c = Client::connect(&f.socket).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&f.socket).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    assert!(matches!(
        c.req(Request::Version).unwrap(),
        Reply::Version { protocol: PROTOCOL_VERSION, .. }
    ));
    let Reply::Devices(list) = c.req(Request::ListDevices).unwrap() else { panic!() };
    assert_eq!(list.len(), 2);
    let (a, b) = (f.devs[0], f.devs[1]);

    // filter and CBT
    let e = c.call(Request::Attach { dev: a }).unwrap().unwrap_err();
    assert_eq!(e.errno, 114); // EALREADY
    let Reply::CbtInfo(info) = c.req(Request::CbtInfo { dev: a }).unwrap() else { panic!() };
    assert_eq!(info.device_capacity_bytes, 8 << 20);
    c.req(Request::CbtDirty { dev: a, ranges: vec![Range { offset: 0, count: 8 }] }).unwrap();
    let Reply::CbtMap(map) =
        c.req(Request::CbtMap { dev: a, offset: 0, length: info.block_count }).unwrap()
    else {
        panic!()
    };
    assert_eq!(map.len(), info.block_count as usize);
    c.req(Request::Detach { dev: b }).unwrap();
    assert_eq!(c.call(Request::CbtInfo { dev: b }).unwrap().unwrap_err().errno, 2);
    c.req(Request::Attach { dev: b }).unwrap();

    // snapshot life cycle on a file storage
    let storage = f.dir.join("diff.img");
    std::fs::File::create(&storage).unwrap().set_len(4 << 20).unwrap();
    let Reply::Created(id) = c
        .req(Request::SnapshotCreate {
            storage: Storage::File { path: storage.display().to_string(), limit_sectors: 8192 },
        })
        .unwrap()
    else {
        panic!()
    };
    c.req(Request::SnapshotAdd { id, dev: a }).unwrap();
    c.req(Request::SnapshotAdd { id, dev: b }).unwrap();
    assert_eq!(c.call(Request::Detach { dev: a }).unwrap().unwrap_err().errno, 16); // EBUSY
    c.req(Request::SnapshotTake { id }).unwrap();
    let Reply::SnapshotInfo { error_code, image, .. } =
        c.req(Request::SnapshotInfo { dev: a }).unwrap()
    else {
        panic!()
    };
    assert_eq!((error_code, image), (0, Some(a)));
    let Reply::Devices(list) = c.req(Request::ListDevices).unwrap() else { panic!() };
    assert_eq!(list.len(), 4, "two origins and two images");
    assert_eq!(c.req(Request::SnapshotCollect).unwrap(), Reply::Snapshots(vec![id]));
    let Reply::Stats(s) = c.req(Request::StorageStats { id }).unwrap() else { panic!() };
    assert_eq!(s.capacity_sectors, 8192);
    // no event yet: ENOENT after the timeout
    assert_eq!(c.call(Request::WaitEvent { id, timeout_ms: 10 }).unwrap().unwrap_err().errno, 2);
    c.req(Request::SnapshotDestroy { id }).unwrap();
    assert_eq!(c.call(Request::SnapshotTake { id }).unwrap().unwrap_err().errno, 3); // ESRCH
    let Reply::Devices(list) = c.req(Request::ListDevices).unwrap() else { panic!() };
    assert_eq!(list.len(), 2, "images gone");
    c.req(Request::Detach { dev: a }).unwrap();

    // v3 ranges storage: create queues a low-space event, append, take
    let Reply::Created(id) = c.req(Request::SnapshotCreate { storage: Storage::Ranges }).unwrap()
    else {
        panic!()
    };
    let Reply::Event(ev) = c.req(Request::WaitEvent { id, timeout_ms: 0 }).unwrap() else {
        panic!()
    };
    assert!(matches!(ev.kind, EventKindW::LowFreeSpace { .. }));
    c.req(Request::SnapshotAppend {
        id,
        path: storage.display().to_string(),
        ranges: vec![Range { offset: 0, count: 8192 }],
    })
    .unwrap();
    // The same file's ranges: again in this snapshot → EINVAL, in another live one → EBUSY
    // (the daemon opens one file once, so the engine sees both appends on one backend).
    let again = Request::SnapshotAppend {
        id,
        path: storage.display().to_string(),
        ranges: vec![Range { offset: 100, count: 8 }],
    };
    assert_eq!(c.call(again).unwrap().unwrap_err().errno, 22); // EINVAL
    let Reply::Created(other) =
        c.req(Request::SnapshotCreate { storage: Storage::Ranges }).unwrap()
    else {
        panic!()
    };
    let crossing = Request::SnapshotAppend {
        id: other,
        path: storage.display().to_string(),
        ranges: vec![Range { offset: 100, count: 8 }],
    };
    assert_eq!(c.call(crossing).unwrap().unwrap_err().errno, 16); // EBUSY
    c.req(Request::SnapshotDestroy { id: other }).unwrap();
    c.req(Request::SnapshotAdd { id, dev: b }).unwrap();
    c.req(Request::SnapshotTake { id }).unwrap();
    // a waiter is woken by destroy with ESRCH
    let sock = f.socket.clone();
    let waiter = std::thread::spawn(move || {
        let mut c2 = Client::connect(&sock).unwrap();
        c2.call(Request::WaitEvent { id, timeout_ms: 60_000 }).unwrap()
    });
    std::thread::sleep(std::time::Duration::from_millis(100));
    c.req(Request::SnapshotDestroy { id }).unwrap();
    assert_eq!(waiter.join().unwrap().unwrap_err().errno, 3);

    // invalid fields are refused before any work
    let e = c
        .call(Request::SnapshotAppend { id, path: "relative".into(), ranges: vec![] })
        .unwrap()
        .unwrap_err();
    assert_eq!(e.errno, 22);
    f.daemon.shutdown();
    assert_eq!(f.daemon.engine().live().snapshots, 0);
}

#[test]
fn add_and_remove_devices() {
    let f = fixture(0);
    let mut c = Client::connect(&f.socket).unwrap();
    let backing = f.dir.join("added.img");
    std::fs::File::create(&backing).unwrap().set_len(4 << 20).unwrap();
    let path = backing.display().to_string();
    let Reply::Device(d) =
        c.req(Request::AddDevice { backing: path.clone(), attach: false }).unwrap()
    else {
        panic!()
    };
    assert_eq!(d.capacity_bytes, 4 << 20);
    assert_eq!(d.backing, path);
    let e = c.call(Request::AddDevice { backing: path.clone(), attach: true }).unwrap();
    assert_eq!(e.unwrap_err().errno, 114, "EALREADY: served already");
    let e = c.call(Request::AddDevice { backing: "/nonexistent".into(), attach: true }).unwrap();
    assert_eq!(e.unwrap_err().errno, 2);
    // in a snapshot: EBUSY; after destroy: removed, tracker gone, number free
    c.req(Request::Attach { dev: d.dev }).unwrap();
    let Reply::Created(id) = c.req(Request::SnapshotCreate { storage: Storage::Ranges }).unwrap()
    else {
        panic!()
    };
    c.req(Request::SnapshotAdd { id, dev: d.dev }).unwrap();
    let e = c.call(Request::RemoveDevice { dev: d.dev }).unwrap();
    assert_eq!(e.unwrap_err().errno, 16, "EBUSY");
    c.req(Request::SnapshotDestroy { id }).unwrap();
    c.req(Request::RemoveDevice { dev: d.dev }).unwrap();
    let e = c.call(Request::RemoveDevice { dev: d.dev }).unwrap();
    assert_eq!(e.unwrap_err().errno, 19, "ENODEV");
    let Reply::Devices(list) = c.req(Request::ListDevices).unwrap() else { panic!() };
    assert!(list.is_empty());
    assert_eq!(f.daemon.engine().live().trackers, 0);
    // a v1 client is still served, without the v2 requests
    let mut s = UnixStream::connect(&f.socket).unwrap();
    s.write_all(&encode(&RequestFrame { version: 1, request: Request::ListDevices }).unwrap())
        .unwrap();
    let body = read_frame(&mut s).unwrap().unwrap();
    assert!(blksnap_proto::decode_response(&body).unwrap().result.is_ok());
}

#[test]
fn bad_version_and_malformed_frames_close_the_connection() {
    let f = fixture(0);
    let mut s = UnixStream::connect(&f.socket).unwrap();
    let frame = RequestFrame { version: PROTOCOL_VERSION + 1, request: Request::Version };
    s.write_all(&encode(&frame).unwrap()).unwrap();
    let body = read_frame(&mut s).unwrap().unwrap();
    let resp = blksnap_proto::decode_response(&body).unwrap();
    assert_eq!(resp.version, PROTOCOL_VERSION);
    assert_eq!(resp.result.unwrap_err().errno, 22);
    assert!(read_frame(&mut s).unwrap().is_none(), "closed after a version mismatch");

    let mut s = UnixStream::connect(&f.socket).unwrap();
    s.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap();
    let body = read_frame(&mut s).unwrap().unwrap();
    assert!(blksnap_proto::decode_response(&body).unwrap().result.is_err());
    assert!(read_frame(&mut s).unwrap().is_none());

    let mut s = UnixStream::connect(&f.socket).unwrap();
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    let body = read_frame(&mut s).unwrap().unwrap();
    assert!(blksnap_proto::decode_response(&body).unwrap().result.is_err());
}

#[test]
fn access_rules() {
    let f = fixture(0);
    let s = UnixStream::connect(&f.socket).unwrap();
    let me = peer_cred(&s).unwrap();
    assert_eq!(me.pid as u32, std::process::id());
    // SO_PEERGROUPS: the kernel's list, the same as this process's own.
    let mut mine = vec![0 as libc::gid_t; 65_536];
    // SAFETY: a writable buffer of that many gid_t.
    let n = unsafe { libc::getgroups(mine.len() as libc::c_int, mine.as_mut_ptr()) };
    mine.truncate(n.max(0) as usize);
    let mut theirs = peer_groups(&s).unwrap();
    mine.sort_unstable();
    theirs.sort_unstable();
    assert_eq!(theirs, mine);
    let user = Peer { pid: 1, uid: 1000, gid: 1000 };
    assert!(allowed(&Peer { pid: 1, uid: 0, gid: 0 }, &[], None));
    assert!(!allowed(&user, &[], None));
    assert!(allowed(&user, &[], Some(1000)), "primary group");
    assert!(allowed(&user, &[27, 4242], Some(4242)), "supplementary group");
    assert!(!allowed(&user, &[27], Some(4242)));
}

/// A daemon with no devices behind a control server with `limits`: its directory and socket.
fn served_with(limits: Limits) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("control");
    let frontend = Box::new(NullFrontend::default());
    common::serve_with(&socket, tmp.path(), EngineConfig::default(), frontend, Some(limits));
    (tmp, socket)
}

/// libblksnap's client mode keeps idle connections: one the daemon closed for idling is skipped,
/// not failed, and the request goes through on a new one.
#[test]
fn libblksnap_reconnects_after_the_daemon_drops_an_idle_connection() {
    use blksnap_ffi::instance::{Config as LibConfig, Instance};
    use blksnap_model::Profile;
    let (_tmp, socket) = served_with(Limits {
        max_connections: 4,
        idle_timeout: std::time::Duration::from_millis(200),
        ..Limits::default()
    });
    let lib = LibConfig::parse(&format!("socket={}", socket.display())).unwrap();
    let inst = Instance::new(Profile::Newest, lib).unwrap();
    assert_eq!(inst.engine.snapshot_collect().unwrap(), vec![]);
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert_eq!(inst.engine.snapshot_collect().unwrap(), vec![], "a fresh connection after idling");
}

/// The connection limit answers EAGAIN and serves the others; an idle peer is dropped.
#[test]
fn connection_limit_and_idle_timeout() {
    let (_tmp, socket) = served_with(Limits {
        max_connections: 2,
        idle_timeout: std::time::Duration::from_millis(300),
        ..Limits::default()
    });
    let mut first = Client::connect(&socket).unwrap();
    let mut second = Client::connect(&socket).unwrap();
    assert!(first.call(Request::Version).unwrap().is_ok());
    assert!(second.call(Request::Version).unwrap().is_ok());
    // The third is refused with EAGAIN (and its message names the limit).
    let mut third = UnixStream::connect(&socket).unwrap();
    let body = read_frame(&mut third).unwrap().expect("an answer before the close");
    let err = blksnap_proto::decode_response(&body).unwrap().result.unwrap_err();
    assert_eq!(err.errno, blksnap_model::Errno::EAGAIN.code());
    assert!(err.message.contains("max_connections = 2"), "{}", err.message);
    // Idle past the timeout: both are dropped, and their slots come back.
    std::thread::sleep(std::time::Duration::from_millis(900));
    assert!(first.call(Request::Version).is_err(), "an idle connection is closed");
    let mut again = Client::connect(&socket).unwrap();
    assert!(again.call(Request::Version).unwrap().is_ok(), "the slots were released");
    // A partial frame counts as idle too: two bytes of a length, then nothing.
    let mut slow = UnixStream::connect(&socket).unwrap();
    slow.write_all(&[8, 0]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(900));
    slow.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    let closed = std::io::Read::read_to_end(&mut slow, &mut rest);
    assert!(closed.is_ok(), "the server closed a stalled partial frame: {closed:?}");
    drop(second);
}

#[test]
fn libblksnap_client_mode_finds_devices_served_after_it_opened() {
    use blksnap_ffi::instance::{Config as LibConfig, Instance};
    use blksnap_model::{DeviceId, Profile};
    let f = fixture(1);
    let cfg = LibConfig::parse(&format!("socket={}", f.socket.display())).unwrap();
    let inst = Instance::new(Profile::Newest, cfg).unwrap();
    assert_eq!(inst.devices().len(), 1, "the daemon's origins at open");
    // Served after the handle opened (e.g. `blksnap attach` of a new backing).
    let backing = f.dir.join("later.img");
    std::fs::File::create(&backing).unwrap().set_len(8 << 20).unwrap();
    let later: Dev = f.daemon.add_origin(&backing, true).unwrap().into();
    let id = DeviceId::from(later);
    let device = inst.device_by_id(id).expect("found by re-reading the daemon's list");
    assert_eq!(device.id, id);
    assert_eq!(inst.devices().len(), 2);
    assert_eq!(inst.engine.cbt_info(id).unwrap().device_capacity_bytes, 8 << 20);
    // A number the daemon does not serve stays unknown (one re-read, no error).
    assert!(inst.device_by_id(DeviceId::new(4000, 1)).is_none());
}

#[test]
fn a_backing_is_one_origin_by_any_path_and_racing_adds_have_one_winner() {
    let f = fixture(0);
    let backing = f.dir.join("one.img");
    std::fs::File::create(&backing).unwrap().set_len(4 << 20).unwrap();
    let id = f.daemon.add_origin(&backing, true).unwrap();
    // a hard link, a symlink and a second spelling of the path are the same backing
    let hard = f.dir.join("hard.img");
    std::fs::hard_link(&backing, &hard).unwrap();
    let soft = f.dir.join("soft.img");
    std::os::unix::fs::symlink(&backing, &soft).unwrap();
    let dotted = f.dir.join(".").join("one.img");
    for other in [&hard, &soft, &dotted] {
        let e = f.daemon.add_origin(other, true).unwrap_err();
        assert_eq!(e.errno, blksnap_model::Errno::EALREADY, "{}", other.display());
    }
    // not a file or a block device
    let e = f.daemon.add_origin(&f.dir, true).unwrap_err();
    assert_eq!(e.errno, blksnap_model::Errno::EINVAL);
    // removed: the claim is released, any path may add it again
    f.daemon.remove_origin(id).unwrap();
    let id = f.daemon.add_origin(&hard, false).unwrap();
    f.daemon.remove_origin(id).unwrap();
    // racing adds of one backing by different paths: exactly one wins, every loser EALREADY
    for round in 0..20 {
        let paths = [backing.clone(), hard.clone(), soft.clone(), dotted.clone()];
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> =
                paths.iter().map(|p| s.spawn(|| f.daemon.add_origin(p, true))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let won: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(won.len(), 1, "round {round}: {results:?}");
        for r in &results {
            if let Err(e) = r {
                assert_eq!(e.errno, blksnap_model::Errno::EALREADY, "round {round}");
            }
        }
        assert_eq!(f.daemon.list().len(), 1);
        f.daemon.remove_origin(*won[0]).unwrap();
    }
    assert!(f.daemon.list().is_empty());
    assert_eq!(f.daemon.engine().live().trackers, 0);
}

#[test]
fn a_take_whose_image_cannot_be_served_is_rolled_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let socket = dir.join("control");
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let frontend = Box::new(NullFrontend::failing_images(fail.clone()));
    let daemon = common::serve_with(&socket, dir, EngineConfig::default(), frontend, None);
    let backing = dir.join("b.img");
    std::fs::File::create(&backing).unwrap().set_len(8 << 20).unwrap();
    let dev: Dev = daemon.add_origin(&backing, true).unwrap().into();
    let storage = dir.join("diff.img");
    std::fs::File::create(&storage).unwrap().set_len(8 << 20).unwrap();
    let mut c = Client::connect(&socket).unwrap();
    let create = |c: &mut Client| {
        let Reply::Created(id) = c
            .req(Request::SnapshotCreate {
                storage: Storage::File {
                    path: storage.display().to_string(),
                    limit_sectors: (8 << 20) / 512,
                },
            })
            .unwrap()
        else {
            panic!()
        };
        c.req(Request::SnapshotAdd { id, dev }).unwrap();
        id
    };
    let id = create(&mut c);
    let e = c.call(Request::SnapshotTake { id }).unwrap().unwrap_err();
    assert_eq!(e.errno, 12, "ENOMEM, the image's error");
    // nothing half-taken: the snapshot is gone, the device is in no snapshot, no image
    let Reply::Snapshots(ids) = c.req(Request::SnapshotCollect).unwrap() else { panic!() };
    assert!(ids.is_empty(), "{ids:?}");
    let Reply::Devices(list) = c.req(Request::ListDevices).unwrap() else { panic!() };
    assert_eq!(list.len(), 1, "only the origin: {list:?}");
    assert_eq!(daemon.engine().live().snapshots, 0);
    // the device can be in a new snapshot, which takes once images can be served
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    let id = create(&mut c);
    c.req(Request::SnapshotTake { id }).unwrap();
    c.req(Request::SnapshotDestroy { id }).unwrap();
    daemon.remove_origin(dev.into()).unwrap();
}

/// A WaitEvent whose client hangs up takes no event: the event goes to the next waiter. (Before,
/// the hung-up client's request thread took it and the write of the reply failed: lost.)
#[test]
fn events_are_not_lost_to_a_client_that_hung_up() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let socket = dir.join("control");
    let mut params = blksnap_model::Params::default();
    params.set("diff_storage_minimum_sectors", 1024).unwrap();
    let config = EngineConfig::new(params, None, blksnap_engine::clock::Clock::monotonic());
    let daemon = common::serve_with(&socket, dir, config, Box::new(NullFrontend::default()), None);
    let backing = dir.join("b.img");
    std::fs::File::create(&backing).unwrap().set_len(8 << 20).unwrap();
    let dev: Dev = daemon.add_origin(&backing, true).unwrap().into();
    let storage = dir.join("ranges.img");
    std::fs::File::create(&storage).unwrap().set_len(1 << 20).unwrap();
    let mut c = Client::connect(&socket).unwrap();
    let Reply::Created(id) = c.req(Request::SnapshotCreate { storage: Storage::Ranges }).unwrap()
    else {
        panic!()
    };
    // the create's low-space request
    let Reply::Event(_) = c.req(Request::WaitEvent { id, timeout_ms: 0 }).unwrap() else {
        panic!()
    };
    c.req(Request::SnapshotAppend {
        id,
        path: storage.display().to_string(),
        ranges: vec![Range { offset: 0, count: 1024 }],
    })
    .unwrap();
    c.req(Request::SnapshotAdd { id, dev }).unwrap();
    c.req(Request::SnapshotTake { id }).unwrap();
    // A waits long, and hangs up before anything happens
    let mut a = UnixStream::connect(&socket).unwrap();
    a.write_all(
        &encode(&RequestFrame {
            version: PROTOCOL_VERSION,
            request: Request::WaitEvent { id, timeout_ms: 20_000 },
        })
        .unwrap(),
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    drop(a);
    std::thread::sleep(std::time::Duration::from_millis(300));
    // the first copy-on-write fills half the 1024 sectors: a low-space event
    daemon.engine().write(dev.into(), 0, &[7u8; 4096]).unwrap();
    let t = std::time::Instant::now();
    let r = c.req(Request::WaitEvent { id, timeout_ms: 3000 });
    assert!(
        matches!(
            r,
            Ok(Reply::Event(blksnap_proto::EventW { kind: EventKindW::LowFreeSpace { .. }, .. }))
        ),
        "{r:?} after {:?}",
        t.elapsed()
    );
    // an event kept for a hung-up client reaches a waiter that is already waiting
    let ev =
        blksnap_proto::EventW { time_ns: 1, kind: EventKindW::NoSpace { requested_sectors: 9 } };
    let d = daemon.clone();
    let keeper = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        d.requeue_event(id.into(), ev);
    });
    let r = c.req(Request::WaitEvent { id, timeout_ms: 5000 }).unwrap();
    keeper.join().unwrap();
    assert_eq!(r, Reply::Event(ev));
    c.req(Request::SnapshotDestroy { id }).unwrap();
    daemon.requeue_event(id.into(), ev); // destroyed: nothing kept
    let e = c.call(Request::WaitEvent { id, timeout_ms: 0 }).unwrap().unwrap_err();
    assert_eq!(e.errno, 3, "ESRCH: nothing kept for a destroyed snapshot");
}

/// The restore rule for a file backing, on any host (null front end): a clean restart keeps the
/// generation; a write while the daemon is down, even with the mtime set back, starts a new one
/// (ctime); a clean restart after that keeps the new one.
#[test]
fn a_file_written_while_the_daemon_is_down_gets_a_new_generation() {
    use blksnap_service::config::DeviceConfig;
    use blksnap_service::StateDir;
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let backing = dir.join("disk.img");
    std::fs::File::create(&backing).unwrap().set_len(8 << 20).unwrap();
    let cfg = Config {
        socket: dir.join("control"),
        link_dir: dir.to_path_buf(),
        state_dir: dir.join("state"),
        devices: vec![DeviceConfig { backing: backing.clone(), attach: true }],
        ..Config::default()
    };
    // one daemon's life: start (restoring what it can), optionally write, clean stop; returns
    // the generation it ran with
    let life = |write: bool| {
        let engine = Arc::new(Engine::new(EngineConfig::default()).unwrap());
        let sd = StateDir::open(&cfg.state_dir).unwrap();
        let d = Daemon::with_state(engine, Box::new(NullFrontend::default()), cfg.clone(), sd);
        let ids = d.add_configured().unwrap();
        if write {
            d.engine().write(ids[0], 1 << 20, &[5u8; 4096]).unwrap();
        }
        let generation = d.engine().cbt_info(ids[0]).unwrap().generation_id;
        d.shutdown();
        generation
    };
    let g1 = life(true);
    assert_eq!(life(false), g1, "a clean restart keeps the generation");
    // written behind the daemon's back, mtime set back to what it was
    let f = std::fs::OpenOptions::new().write(true).open(&backing).unwrap();
    let mtime = f.metadata().unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    f.write_all_at(b"offline", 4 << 20).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    let g2 = life(false);
    assert_ne!(g2, g1, "an offline write with the mtime set back kept the generation");
    assert_eq!(life(false), g2, "a clean restart after it keeps the new generation");
}

/// A WaitEvent's deadline follows the engine's clock: with the jump-on-wait test clock (fuzzing,
/// the simulations) a long timeout is one engine call, not minutes of real time spent in 100 ms
/// slices (found by the control_protocol fuzz target: a 295 s wait timed libFuzzer out).
#[test]
fn wait_event_deadline_follows_the_engine_clock() {
    use blksnap_engine::Clock;
    use blksnap_model::Params;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = Config {
        socket: tmp.path().join("control"),
        link_dir: tmp.path().into(),
        state_dir: tmp.path().join("state"),
        ..Config::default()
    };
    let config = EngineConfig::new(Params::small(), Some(1), Clock::manual(true));
    let engine = Arc::new(Engine::new(config).unwrap());
    let daemon = Daemon::new(engine.clone(), Box::new(NullFrontend::default()), cfg);
    let id = match daemon.handle(Request::SnapshotCreate { storage: Storage::Ranges }).unwrap() {
        Reply::Created(id) => id,
        other => panic!("{other:?}"),
    };
    // The queued low-space event first, then nothing for 295 s of engine time.
    assert!(matches!(daemon.handle(Request::WaitEvent { id, timeout_ms: 0 }), Ok(Reply::Event(_))));
    let started = std::time::Instant::now();
    let r = daemon.handle(Request::WaitEvent { id, timeout_ms: 294_896 });
    assert_eq!(r.unwrap_err().errno, blksnap_model::Errno::ENOENT.code());
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
    assert!(engine.now_ns() >= 294_896 * 1_000_000, "the engine's clock jumped to the deadline");
    daemon.shutdown();
}
