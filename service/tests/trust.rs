//! The trust model (docs/SECURITY.md) on any host: a non-root principal's requests as the
//! daemon sees them (the connection's credentials are injected, so the rules are tested without
//! changing uid), descriptor passing over a real socket, and no descriptor leaks on any path.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use blksnap_engine::{Engine, EngineConfig};
use blksnap_model::Errno;
use blksnap_proto::{Dev, Range, Reply, Request, Storage};
use blksnap_service::daemon::Principal;
use blksnap_service::{Client, Config, ControlServer, Daemon, NullFrontend};

const USER: u32 = 4242;

fn user() -> Principal {
    Principal { uid: USER, gid: USER, groups: vec![] }
}

fn daemon(dir: &std::path::Path, cfg: Config) -> Arc<Daemon> {
    let cfg = Config { socket: dir.join("control"), link_dir: dir.into(), ..cfg };
    let engine = Arc::new(Engine::new(EngineConfig::default()).unwrap());
    Arc::new(Daemon::new(engine, Box::new(NullFrontend::default()), cfg))
}

fn file(dir: &std::path::Path, name: &str, len: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(len).unwrap();
    p
}

fn open(path: &std::path::Path, write: bool, flags: i32) -> OwnedFd {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(flags)
        .open(path)
        .unwrap()
        .into()
}

fn errno(r: Result<Reply, blksnap_proto::WireError>) -> Errno {
    r.expect_err("refused").errno().unwrap()
}

fn as_user(d: &Daemon, req: Request, fds: Vec<OwnedFd>) -> Result<Reply, blksnap_proto::WireError> {
    d.handle_from(req, fds, &user(), &|| false)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn a_non_root_client_never_makes_the_daemon_open_a_path() {
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon(tmp.path(), Config::default());
    let secret = file(tmp.path(), "secret", 40);
    let before = std::fs::read(&secret).unwrap();
    let path = secret.display().to_string();
    for req in [
        Request::SnapshotCreate {
            storage: Storage::File { path: path.clone(), limit_sectors: 1 << 17 },
        },
        Request::SnapshotAppend {
            id: blksnap_proto::Id([0; 16]),
            path: path.clone(),
            ranges: vec![],
        },
        Request::AddDevice { backing: path.clone(), attach: true },
    ] {
        let e = as_user(&d, req, vec![]).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::EPERM));
        assert!(e.message.contains("descriptor"), "{}", e.message);
    }
    assert_eq!(std::fs::read(&secret).unwrap(), before, "the file is untouched");
    // Root may still name paths (upstream root-run tools).
    let r = d.handle(Request::SnapshotCreate {
        storage: Storage::File { path: tmp.path().display().to_string(), limit_sectors: 8 },
    });
    assert!(matches!(r, Ok(Reply::Created(_))), "{r:?}");
}

#[test]
fn received_descriptors_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon(tmp.path(), Config::default());
    let f = file(tmp.path(), "store", 1 << 20);
    let create = || Request::SnapshotCreateFd { limit_sectors: 2048 };
    // read-only, O_PATH, O_APPEND, a directory (non-root), the wrong count
    assert_eq!(errno(as_user(&d, create(), vec![open(&f, false, 0)])), Errno::EACCES);
    assert_eq!(errno(as_user(&d, create(), vec![open(&f, false, libc::O_PATH)])), Errno::EACCES);
    assert_eq!(errno(as_user(&d, create(), vec![open(&f, true, libc::O_APPEND)])), Errno::EINVAL);
    assert_eq!(errno(as_user(&d, create(), vec![open(tmp.path(), false, 0)])), Errno::EPERM);
    assert_eq!(errno(as_user(&d, create(), vec![])), Errno::EINVAL);
    let two = vec![open(&f, true, 0), open(&f, true, 0)];
    assert_eq!(errno(as_user(&d, create(), two)), Errno::EINVAL);
    assert_eq!(errno(as_user(&d, Request::Version, vec![open(&f, true, 0)])), Errno::EINVAL);
    // a limit beyond what the filesystem leaves unprivileged users
    let huge = Request::SnapshotCreateFd { limit_sectors: u64::MAX / 1024 };
    assert_eq!(errno(as_user(&d, huge, vec![open(&f, true, 0)])), Errno::ENOSPC);
    // a served backing cannot be storage
    let backing = file(tmp.path(), "disk", 8 << 20);
    let added = d.handle_from(
        Request::AddDeviceFd { attach: true },
        vec![open(&backing, true, 0)],
        &user(),
        &|| false,
    );
    let Ok(Reply::Device(entry)) = added else { panic!("{added:?}") };
    assert_eq!(entry.backing, backing.display().to_string(), "the kernel's name of the file");
    assert_eq!(errno(as_user(&d, create(), vec![open(&backing, true, 0)])), Errno::EBUSY);
    // the same backing again, by descriptor: EALREADY
    let again = as_user(&d, Request::AddDeviceFd { attach: true }, vec![open(&backing, true, 0)]);
    assert_eq!(errno(again), Errno::EALREADY);
    // a good one; root may pass a directory
    assert!(matches!(as_user(&d, create(), vec![open(&f, true, 0)]), Ok(Reply::Created(_))));
    let dir = d.handle_from(
        create(),
        vec![open(tmp.path(), false, libc::O_DIRECTORY)],
        &Principal::root(),
        &|| false,
    );
    assert!(matches!(dir, Ok(Reply::Created(_))), "{dir:?}");
}

#[test]
fn a_user_changes_only_what_it_brought() {
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon(tmp.path(), Config::default());
    let roots: Dev = d.add_origin(&file(tmp.path(), "root.img", 8 << 20), true).unwrap().into();
    let mine = file(tmp.path(), "mine.img", 8 << 20);
    let Ok(Reply::Device(entry)) =
        as_user(&d, Request::AddDeviceFd { attach: true }, vec![open(&mine, true, 0)])
    else {
        panic!()
    };
    let Ok(Reply::Created(root_snap)) =
        d.handle(Request::SnapshotCreate { storage: Storage::Ranges })
    else {
        panic!()
    };
    let Ok(Reply::Created(my_snap)) =
        as_user(&d, Request::SnapshotCreate { storage: Storage::Ranges }, vec![])
    else {
        panic!()
    };
    // root's device and snapshot: EPERM for every change; reads are open
    for req in [
        Request::Detach { dev: roots },
        Request::CbtDirty { dev: roots, ranges: vec![Range { offset: 0, count: 8 }] },
        Request::RemoveDevice { dev: roots },
        Request::SnapshotAdd { id: my_snap, dev: roots },
        Request::SnapshotDestroy { id: root_snap },
        Request::SnapshotTake { id: root_snap },
        Request::WaitEvent { id: root_snap, timeout_ms: 0 },
    ] {
        assert_eq!(errno(as_user(&d, req.clone(), vec![])), Errno::EPERM, "{req:?}");
    }
    assert!(as_user(&d, Request::CbtInfo { dev: roots }, vec![]).is_ok());
    assert!(as_user(&d, Request::ListDevices, vec![]).is_ok());
    // data (v3 data requests): root's device refused, its own served
    let read = |dev| Request::DevRead { dev, offset_bytes: 0, len_bytes: 512 };
    assert_eq!(errno(as_user(&d, read(roots), vec![])), Errno::EPERM);
    assert_eq!(errno(as_user(&d, Request::DevFlush { dev: roots }, vec![])), Errno::EPERM);
    let mine_read = as_user(&d, read(entry.dev), vec![]);
    assert!(matches!(mine_read, Ok(Reply::Data(_))), "{mine_read:?}");
    // its own: allowed
    assert!(as_user(&d, Request::SnapshotAdd { id: my_snap, dev: entry.dev }, vec![]).is_ok());
    assert!(as_user(&d, Request::SnapshotDestroy { id: my_snap }, vec![]).is_ok());
    assert!(as_user(&d, Request::RemoveDevice { dev: entry.dev }, vec![]).is_ok());
    // root may change anything
    assert!(d.handle(Request::SnapshotDestroy { id: root_snap }).is_ok());
}

#[test]
fn snapshot_and_device_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon(tmp.path(), Config { max_snapshots: 2, max_devices: 1, ..Config::default() });
    for _ in 0..2 {
        assert!(d.handle(Request::SnapshotCreate { storage: Storage::Ranges }).is_ok());
    }
    let e = d.handle(Request::SnapshotCreate { storage: Storage::Ranges }).unwrap_err();
    assert_eq!(e.errno(), Some(Errno::ENOMEM));
    assert!(e.message.contains("max_snapshots"), "{}", e.message);
    d.add_origin(&file(tmp.path(), "a", 1 << 20), false).unwrap();
    let e = d.add_origin(&file(tmp.path(), "b", 1 << 20), false).unwrap_err();
    assert_eq!((e.errno, e.detail.contains("max_devices")), (Errno::ENOMEM, true));
}

/// Over a real socket: the client opens paths itself and passes them; what it cannot open
/// fails in the client with its errno; no descriptor leaks in the daemon on any path.
#[test]
fn descriptors_over_the_socket_and_no_leaks() {
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon(tmp.path(), Config::default());
    let server = ControlServer::bind(&tmp.path().join("control"), None).unwrap();
    std::thread::spawn(move || server.serve(d));
    let mut c = Client::connect(&tmp.path().join("control")).unwrap();
    assert!(c.req(Request::Version).is_ok());
    let baseline = open_fds();
    let backing = file(tmp.path(), "disk.img", 8 << 20);
    let store = file(tmp.path(), "store", 0);
    for _ in 0..20 {
        let Reply::Device(e) = c
            .req(Request::AddDevice { backing: backing.display().to_string(), attach: true })
            .unwrap()
        else {
            panic!()
        };
        // file storage by descriptor (the client opened it), then a directory (the client
        // creates the unnamed file in it), then errors on every path
        let s = Storage::File { path: store.display().to_string(), limit_sectors: 2048 };
        let Reply::Created(id) = c.req(Request::SnapshotCreate { storage: s }).unwrap() else {
            panic!()
        };
        let s = Storage::File { path: tmp.path().display().to_string(), limit_sectors: 2048 };
        let Reply::Created(id2) = c.req(Request::SnapshotCreate { storage: s }).unwrap() else {
            panic!()
        };
        let missing = c.call(Request::AddDevice { backing: "/nonexistent".into(), attach: true });
        assert_eq!(missing.unwrap().unwrap_err().errno(), Some(Errno::ENOENT));
        let again =
            c.call(Request::AddDevice { backing: backing.display().to_string(), attach: true });
        assert_eq!(again.unwrap().unwrap_err().errno(), Some(Errno::EALREADY));
        let bad =
            c.call_with_fds(Request::Version, &[std::fs::File::open(&store).unwrap().as_fd()]);
        assert_eq!(bad.unwrap().unwrap_err().errno(), Some(Errno::EINVAL));
        let append = Request::SnapshotAppend {
            id,
            path: backing.display().to_string(),
            ranges: vec![Range { offset: 0, count: 8 }],
        };
        assert_eq!(c.call(append).unwrap().unwrap_err().errno(), Some(Errno::EBUSY));
        for id in [id, id2] {
            c.req(Request::SnapshotDestroy { id }).unwrap();
        }
        c.req(Request::RemoveDevice { dev: e.dev }).unwrap();
    }
    // the client's and the daemon's descriptors are in this process: back to the baseline
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(open_fds(), baseline, "no descriptor leaked");
}
