//! `control_sequences`: request *sequences* from several clients against a running dispatcher,
//! with descriptor passing.
//!
//! Per input: a daemon (in-process engine with small parameters and a jump-on-wait test clock,
//! `NullFrontend`, two origins on temp files) and 1–3 clients, each on a socketpair served by
//! the real connection loop (`serve_connection_as`, one thread each) as root or as an
//! unprivileged uid (the non-root rules: paths refused, descriptors checked, only its own
//! devices and snapshots). Then up to 48 steps, each on one client: a request built from the
//! input (every kind, ids of the snapshots created so far, devices served or not) with 0–4
//! descriptors (read-write, read-only and `O_PATH` temp files, the temp directory, `/dev/null`,
//! a served backing, a spare backing, a pipe, a fresh `O_TMPFILE`), whose answer must decode
//! and validate; or junk bytes, a truncated frame, an oversized length, a disconnect in the
//! middle of a frame, a new client. At the end a well-behaved client must still get its
//! `Version` answer, and once every client and the daemon are gone the process has exactly the
//! descriptors it had before the input (no descriptor leaks on any path).
//!
//! Paths a root client names are chosen from the temp directory's files (never elsewhere).
#![no_main]

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::Unstructured;
use blksnap_engine::{Clock, Engine, EngineConfig};
use blksnap_fuzz::{reset_file, FileEnv, Rd};
use blksnap_model::Params;
use blksnap_proto::client::Client;
use blksnap_proto::fds::MAX_FDS_PER_FRAME;
use blksnap_proto::{Dev, Id, Range, Reply, Request, Storage};
use blksnap_service::control::{serve_connection_as, Limits};
use blksnap_service::daemon::Principal;
use blksnap_service::{Config, Daemon, NullFrontend};
use libfuzzer_sys::fuzz_target;

const ORIGIN_BYTES: u64 = 1 << 20;

static ENV: OnceLock<FileEnv> = OnceLock::new();

fn env() -> &'static FileEnv {
    ENV.get_or_init(|| FileEnv::new("seq"))
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn daemon() -> (Daemon, Vec<Dev>) {
    let e = env();
    for o in &e.origins {
        reset_file(o, ORIGIN_BYTES);
    }
    reset_file(&e.storage, ORIGIN_BYTES);
    reset_file(&e.spare, ORIGIN_BYTES);
    let config =
        EngineConfig { params: Params::small(), id_seed: Some(1), clock: Clock::manual(true) };
    let engine = Arc::new(Engine::new(config).unwrap());
    let cfg = Config {
        socket: e.dir.join("control"),
        link_dir: e.dir.join("links"),
        state_dir: e.dir.join("state"),
        max_snapshots: 4,
        max_devices: 4,
        ..Config::default()
    };
    let d = Daemon::new(engine, Box::new(NullFrontend::default()), cfg);
    let devs = vec![
        d.add_origin(&e.origins[0], true).unwrap().into(),
        d.add_origin(&e.origins[1], false).unwrap().into(),
    ];
    (d, devs)
}

/// A descriptor of one of the kinds a client may pass (right or wrong).
fn descriptor(kind: usize) -> OwnedFd {
    let e = env();
    let open = |p: &PathBuf, write: bool, flags: i32| -> OwnedFd {
        OpenOptions::new().read(true).write(write).custom_flags(flags).open(p).unwrap().into()
    };
    match kind {
        0 => open(&e.storage, true, 0),
        1 => open(&e.storage, false, 0),
        2 => open(&e.storage, false, libc::O_PATH),
        3 => open(&e.dir, false, libc::O_DIRECTORY),
        4 => open(&PathBuf::from("/dev/null"), true, 0),
        5 => open(&e.origins[0], true, 0),
        6 => open(&e.spare, true, 0),
        7 => {
            let (r, _w) = std::io::pipe().unwrap();
            r.into()
        }
        8 => open(&e.storage, true, libc::O_APPEND),
        _ => OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE | libc::O_EXCL)
            .open(&e.dir)
            .unwrap()
            .into(),
    }
}

fn path(r: &mut Rd) -> String {
    let e = env();
    let p = match r.below(6) {
        0 | 1 => e.storage.clone(),
        2 => e.origins[0].clone(),
        3 => e.dir.clone(),
        4 => e.dir.join("missing.img"),
        _ => e.spare.clone(),
    };
    p.display().to_string()
}

fn ranges(r: &mut Rd) -> Vec<Range> {
    (0..r.below(4))
        .map(|_| Range {
            offset: r.small_or_edge(64, &[2048, u64::MAX, u64::MAX / 2]),
            count: r.small_or_edge(64, &[2048, 0, u64::MAX]),
        })
        .collect()
}

fn request(r: &mut Rd, created: &[Id], devs: &[Dev]) -> Request {
    let dev = match r.below(devs.len() + 2) {
        i if i < devs.len() => devs[i],
        i if i == devs.len() => Dev { major: 241, minor: 0 },
        _ => Dev { major: u32::from(r.u8()), minor: u32::from(r.u8()) },
    };
    let id = if !created.is_empty() && r.u8() < 224 {
        created[r.below(created.len())]
    } else {
        Id([r.u8(); 16])
    };
    let limit_sectors = r.small_or_edge(255, &[0, 2048, 1 << 40, u64::MAX]);
    match r.below(22) {
        0 => Request::Version,
        1 => Request::ListDevices,
        2 => Request::Attach { dev },
        3 => Request::Detach { dev },
        4 => Request::CbtInfo { dev },
        5 => Request::CbtMap { dev, offset: u32::from(r.u8()), length: u32::from(r.u16()) },
        6 => Request::CbtDirty { dev, ranges: ranges(r) },
        7 => Request::SnapshotCreate { storage: Storage::Ranges },
        8 => Request::SnapshotCreate { storage: Storage::File { path: path(r), limit_sectors } },
        9 => Request::SnapshotDestroy { id },
        10 => Request::SnapshotAppend { id, path: path(r), ranges: ranges(r) },
        11 => Request::SnapshotAdd { id, dev },
        12 => Request::SnapshotTake { id },
        13 => Request::SnapshotCollect,
        14 => Request::SnapshotInfo { dev },
        15 => Request::WaitEvent { id, timeout_ms: u32::from(r.u8()) },
        16 => Request::StorageStats { id },
        17 => Request::AddDevice { backing: path(r), attach: r.u8() & 1 == 0 },
        18 => Request::RemoveDevice { dev },
        19 => Request::SnapshotCreateFd { limit_sectors },
        20 => Request::SnapshotAppendFd { id, ranges: ranges(r) },
        _ => Request::AddDeviceFd { attach: r.u8() & 1 == 0 },
    }
}

fn limits() -> Limits {
    Limits {
        idle_timeout: Duration::from_secs(5),
        frame_timeout: Duration::from_secs(5),
        max_frame_bytes: 1 << 20,
        ..Limits::default()
    }
}

struct Conn {
    client: Option<Client>,
    raw: UnixStream,
}

fn connect(
    d: &Arc<Daemon>,
    who: Principal,
    threads: &mut Vec<std::thread::JoinHandle<()>>,
) -> Conn {
    let (a, b) = UnixStream::pair().unwrap();
    a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let d = d.clone();
    threads.push(std::thread::spawn(move || serve_connection_as(b, &d, &who, limits())));
    let raw = a.try_clone().unwrap();
    Conn { client: Some(Client::from_stream(a)), raw }
}

fn principal(r: &mut Rd) -> Principal {
    if r.u8() & 1 == 0 {
        Principal::root()
    } else {
        Principal { uid: 4242, gid: 4242, groups: vec![] }
    }
}

fuzz_target!(|data: &[u8]| {
    let baseline = open_fds();
    let mut u = Unstructured::new(data);
    let r = &mut Rd(&mut u);
    let (d, devs) = daemon();
    let d = Arc::new(d);
    let mut threads = Vec::new();
    let mut conns: Vec<Conn> =
        (0..1 + r.below(3)).map(|_| connect(&d, principal(r), &mut threads)).collect();
    let mut created: Vec<Id> = Vec::new();
    for _ in 0..48 {
        if !r.more() {
            break;
        }
        let c = r.below(conns.len());
        match r.below(10) {
            0..=5 => {
                let req = request(r, &created, &devs);
                let n =
                    if r.u8() < 200 { req.fds_expected() } else { r.below(MAX_FDS_PER_FRAME + 1) };
                let fds: Vec<OwnedFd> = (0..n).map(|_| descriptor(r.below(10))).collect();
                let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
                let Some(client) = conns[c].client.as_mut() else { continue };
                match client.call_with_fds(req, &borrowed) {
                    Ok(Ok(Reply::Created(id))) => created.push(id),
                    Ok(_) => {}
                    // the daemon closed it (an invalid request): that client is done
                    Err(_) => conns[c].client = None,
                }
            }
            6 => {
                // junk, or a length over the limit, then nothing more on this client
                let n = r.below(64);
                let mut junk = r.bytes(n);
                if r.u8() & 1 == 0 {
                    junk.splice(0..0, (2u32 << 20).to_le_bytes());
                }
                let _ = (&conns[c].raw).write_all(&junk);
                conns[c].client = None;
            }
            7 => {
                // a truncated frame, then a disconnect in the middle of it
                let _ = (&conns[c].raw).write_all(&[40, 0, 0, 0, 1, 2]);
                let who = principal(r);
                conns[c] = connect(&d, who, &mut threads);
            }
            _ => {
                let who = principal(r);
                conns[c] = connect(&d, who, &mut threads);
            }
        }
    }
    // A well-behaved client is still served.
    let mut good = connect(&d, Principal::root(), &mut threads);
    let answer = good.client.as_mut().unwrap().call(Request::Version);
    assert!(matches!(answer, Ok(Ok(Reply::Version { .. }))), "Version not answered: {answer:?}");
    drop(good);
    drop(conns);
    for t in threads {
        t.join().expect("a connection thread panicked");
    }
    let d = Arc::try_unwrap(d).unwrap_or_else(|_| panic!("the daemon is still shared"));
    d.shutdown();
    drop(d);
    assert_eq!(open_fds(), baseline, "descriptors leaked");
});
