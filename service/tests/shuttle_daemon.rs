//! Concurrent request pairs of the daemon raced under shuttle, each outcome checked against the
//! sequential orders.
//!
//! A [`Daemon`] on the null front end (its image devices made to fail for the rollback case)
//! with real backing files gets two or three requests at once from shuttle threads: the
//! daemon's own locks (`blksnap_service::sync`) and the engine's (`blksnap_engine::sync`) are
//! shuttle's, so every interleaving at a lock is explored. The results (errno for an error) and
//! the state afterwards — devices and images as listed, snapshots and their members, the
//! engine's live objects, and whether every backing not served can be added again (no claim
//! leaked) — must equal what one of the sequential orders of the same requests gives on the
//! same starting state: each request all or nothing, duplicates with one winner.
//!
//! Run: `RUSTFLAGS="--cfg blksnap_shuttle" CARGO_TARGET_DIR=target/shuttle cargo test --release
//! -p blksnap-service --test shuttle_daemon`. `BLKSNAP_SHUTTLE_DAEMON_ITERATIONS` sets the
//! schedules per strategy and case (default 100: random and PCT, 8 cases).
#![cfg(blksnap_shuttle)]

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use blksnap_engine::{Clock, Engine, EngineConfig};
use blksnap_model::{DeviceId, Params};
use blksnap_proto::{Dev, Id, Range, Reply, Request, Role, Storage};
use blksnap_service::{Config, Daemon, NullFrontend};

const BACKING_BYTES: u64 = 1 << 20;

/// The files every case uses: two backings, a hard link and a symlink to the first, a hard
/// link to the second.
struct Files {
    _dir: tempfile::TempDir,
    b0: PathBuf,
    b1: PathBuf,
    b0_link: PathBuf,
    b0_sym: PathBuf,
    b1_link: PathBuf,
    /// Difference storage appended to S.
    storage: PathBuf,
    root: PathBuf,
}

fn files() -> Files {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().to_path_buf();
    let (b0, b1) = (root.join("b0.img"), root.join("b1.img"));
    for b in [&b0, &b1] {
        std::fs::File::create(b).and_then(|f| f.set_len(BACKING_BYTES)).expect("backing");
    }
    let (b0_link, b0_sym) = (root.join("b0.link"), root.join("b0.sym"));
    std::fs::hard_link(&b0, &b0_link).expect("hard link");
    std::os::unix::fs::symlink(&b0, &b0_sym).expect("symlink");
    let b1_link = root.join("b1.link");
    std::fs::hard_link(&b1, &b1_link).expect("hard link");
    let storage = root.join("storage.img");
    std::fs::File::create(&storage).and_then(|f| f.set_len(4 << 20)).expect("storage");
    Files { _dir: dir, b0, b1, b0_link, b0_sym, b1_link, storage, root }
}

/// A request of a case, by what it names in the starting state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// AddDevice of b1 by its path.
    AddB1,
    /// AddDevice of b1 by its hard link.
    AddB1Link,
    /// AddDevice of b0 by its hard link.
    AddB0Link,
    /// AddDevice of b0 by its symlink.
    AddB0Sym,
    /// SnapshotTake of S (D0 is its member).
    Take,
    /// SnapshotDestroy of S.
    Destroy,
    /// RemoveDevice of D0 (b0).
    RemoveD0,
    /// RemoveDevice of D1 (b1).
    RemoveD1,
    /// SnapshotCreate of a new snapshot.
    Create,
    /// SnapshotAdd of D1 to the empty snapshot E.
    AddD1ToE,
    /// WaitEvent of S (its low-space event of the create is queued).
    Wait,
}

/// A starting state: D0 (b0) served, tracked, member of the snapshot S (ranges storage, 4 MiB
/// of a file appended; its low-space event of the create is queued); with `d1`, D1 (b1) served
/// and tracked and the empty snapshot E.
struct Start {
    d1: bool,
    /// Image devices fail to start (a take is rolled back).
    failing_images: bool,
}

struct World {
    daemon: Arc<Daemon>,
    s: Id,
    e: Option<Id>,
    d0: Dev,
    d1: Option<Dev>,
}

fn start(f: &Files, how: &Start) -> World {
    let engine =
        Engine::new(EngineConfig::new(Params::default(), Some(1), Clock::manual(true))).unwrap();
    let fail = Arc::new(AtomicBool::new(how.failing_images));
    let config = Config {
        socket: f.root.join("control"),
        link_dir: f.root.clone(),
        state_dir: f.root.join("state"),
        image_links: Vec::new(),
        freeze: false,
        ..Config::default()
    };
    let daemon = Arc::new(Daemon::new(
        Arc::new(engine),
        Box::new(NullFrontend::failing_images(fail)),
        config,
    ));
    let d0: Dev = daemon.add_origin(&f.b0, true).unwrap().into();
    let created = |daemon: &Daemon| match daemon
        .handle(Request::SnapshotCreate { storage: Storage::Ranges })
        .unwrap()
    {
        Reply::Created(id) => id,
        other => panic!("create: {other:?}"),
    };
    let s = created(&daemon);
    daemon.handle(Request::SnapshotAdd { id: s, dev: d0 }).unwrap();
    let append = Request::SnapshotAppend {
        id: s,
        path: f.storage.display().to_string(),
        ranges: vec![Range { offset: 0, count: 8192 }],
    };
    daemon.handle(append).unwrap();
    let (mut e, mut d1) = (None, None);
    if how.d1 {
        d1 = Some(daemon.add_origin(&f.b1, true).unwrap().into());
        e = Some(created(&daemon));
    }
    World { daemon, s, e, d0, d1 }
}

fn request(f: &Files, w: &World, op: Op) -> Request {
    let add = |p: &Path| Request::AddDevice { backing: p.display().to_string(), attach: true };
    match op {
        Op::AddB1 => add(&f.b1),
        Op::AddB1Link => add(&f.b1_link),
        Op::AddB0Link => add(&f.b0_link),
        Op::AddB0Sym => add(&f.b0_sym),
        Op::Take => Request::SnapshotTake { id: w.s },
        Op::Destroy => Request::SnapshotDestroy { id: w.s },
        Op::RemoveD0 => Request::RemoveDevice { dev: w.d0 },
        Op::RemoveD1 => Request::RemoveDevice { dev: w.d1.expect("D1 in this case") },
        Op::Create => Request::SnapshotCreate { storage: Storage::Ranges },
        Op::AddD1ToE => Request::SnapshotAdd {
            id: w.e.expect("E in this case"),
            dev: w.d1.expect("D1 in this case"),
        },
        Op::Wait => Request::WaitEvent { id: w.s, timeout_ms: 50 },
    }
}

/// A result as compared: what it is (ids left out: a new snapshot's id depends on the order of
/// creations), or the errno.
fn run(f: &Files, w: &World, op: Op) -> String {
    match w.daemon.handle(request(f, w, op)) {
        Ok(Reply::Created(_)) => "created".into(),
        Ok(Reply::Device(d)) => format!("device {:?} {}", d.dev, d.backing),
        Ok(Reply::Event(ev)) => format!("event {:?}", ev.kind),
        Ok(other) => format!("{other:?}"),
        Err(e) => format!("errno {}", e.errno),
    }
}

/// The state as compared: devices and images as listed, snapshots and their members, the
/// engine's live objects; then whether each backing not served can be served (nothing left
/// claimed by a request that failed or lost a race).
fn state(f: &Files, w: &World) -> String {
    let d = &w.daemon;
    let list = d.list();
    let mut devices: Vec<String> =
        list.iter().map(|e| format!("{:?} {:?} {}", e.dev, e.role, e.backing)).collect();
    devices.sort();
    let origins: Vec<DeviceId> =
        list.iter().filter(|e| e.role == Role::Origin).map(|e| e.dev.into()).collect();
    let members: Vec<String> = origins
        .iter()
        .map(|o| format!("{o}: {:?}", d.engine().snapshot_info(*o).map(|i| i.image)))
        .collect();
    let snapshots = d.engine().snapshot_collect().len();
    let live = d.engine().live();
    let mut free = Vec::new();
    for b in [&f.b0, &f.b1] {
        // Served by any path (a link names the same inode).
        let served = list.iter().any(|e| same_file(Path::new(&e.backing), b));
        if served {
            continue;
        }
        match d.add_origin(b, false) {
            Ok(id) => {
                d.remove_origin(id).expect("remove the probe");
                free.push(format!("{} free", b.display()));
            }
            Err(e) => free.push(format!("{} NOT free: {:?}", b.display(), e.errno)),
        }
    }
    format!(
        "devices {devices:?}; members {members:?}; {snapshots} snapshots; live {} snapshots {} \
         trackers {} diff areas; {free:?}",
        live.snapshots, live.trackers, live.diff_areas
    )
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

type Outcome = (Vec<String>, String);

/// Every permutation of `ops`.
fn orders(ops: &[Op]) -> Vec<Vec<usize>> {
    if ops.len() == 1 {
        return vec![vec![0]];
    }
    let mut out = Vec::new();
    for first in 0..ops.len() {
        let rest: Vec<usize> = (0..ops.len()).filter(|i| *i != first).collect();
        let sub: Vec<Op> = rest.iter().map(|i| ops[*i]).collect();
        for tail in orders(&sub) {
            let mut order = vec![first];
            order.extend(tail.iter().map(|t| rest[*t]));
            out.push(order);
        }
    }
    out
}

/// The outcomes of the sequential orders (results in `ops` order, then the state).
fn sequential(f: &Files, how: &Start, ops: &[Op]) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    for order in orders(ops) {
        let w = start(f, how);
        let mut results = vec![String::new(); ops.len()];
        for i in order {
            results[i] = run(f, &w, ops[i]);
        }
        outcomes.push((results, state(f, &w)));
    }
    outcomes
}

/// One schedule: the requests at once, the outcome one of the sequential orders'.
fn race(f: &Arc<Files>, how: &Start, ops: &[Op]) {
    let expected = sequential(f, how, ops);
    // The cases mean what they say: run first, a take takes (or is rolled back with the
    // image's ENOMEM), a wait gets the queued event.
    for (i, op) in ops.iter().enumerate() {
        let want = match op {
            Op::Take if how.failing_images => "errno 12",
            Op::Take => "Done",
            Op::Wait => "event",
            _ => continue,
        };
        let seen = expected.iter().any(|(r, _)| r[i].starts_with(want));
        assert!(seen, "{ops:?}: no sequential order where {op:?} gives {want}: {expected:?}");
    }
    let w = Arc::new(start(f, how));
    let mut threads = Vec::new();
    for op in ops.iter().skip(1).copied() {
        let (f, w) = (f.clone(), w.clone());
        threads.push(shuttle::thread::spawn(move || run(&f, &w, op)));
    }
    let mut results = vec![run(f, &w, ops[0])];
    results.extend(threads.into_iter().map(|t| t.join().expect("request thread")));
    let got = (results, state(f, &w));
    if !expected.contains(&got) {
        panic!(
            "{ops:?}: not the outcome of any sequential order\n  got      {got:?}\n  orders   \
             {expected:#?}"
        );
    }
}

fn iterations() -> usize {
    std::env::var("BLKSNAP_SHUTTLE_DAEMON_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

/// Races `ops` under the random and the PCT scheduler.
fn check(how: Start, ops: &'static [Op]) {
    let f = Arc::new(files());
    let how = Arc::new(how);
    let mut config = shuttle::Config::new();
    config.stack_size = 1 << 20;
    let (f1, h1) = (f.clone(), how.clone());
    let random = shuttle::scheduler::RandomScheduler::new(iterations());
    shuttle::Runner::new(random, config.clone()).run(move || race(&f1, &h1, ops));
    let pct = shuttle::scheduler::PctScheduler::new(3, iterations());
    shuttle::Runner::new(pct, config).run(move || race(&f, &how, ops));
    eprintln!(
        "shuttle daemon pair {ops:?}: {} schedules, each a sequential outcome",
        2 * iterations()
    );
}

const PLAIN: Start = Start { d1: false, failing_images: false };
const WITH_D1: Start = Start { d1: true, failing_images: false };

#[test]
fn add_add_of_one_backing_by_two_paths_has_one_winner() {
    // b1 by its path and by a hard link: one is served, the other EALREADY
    check(PLAIN, &[Op::AddB1, Op::AddB1Link]);
    // b0 is served as D0: by a hard link and a symlink, both EALREADY
    check(PLAIN, &[Op::AddB0Link, Op::AddB0Sym]);
}

#[test]
fn take_destroy() {
    check(PLAIN, &[Op::Take, Op::Destroy]);
    // a take whose image cannot start is rolled back while a destroy comes
    check(Start { d1: false, failing_images: true }, &[Op::Take, Op::Destroy]);
}

#[test]
fn take_remove_of_a_member() {
    check(PLAIN, &[Op::Take, Op::RemoveD0]);
}

#[test]
fn destroy_remove() {
    check(PLAIN, &[Op::Destroy, Op::RemoveD0]);
}

#[test]
fn add_remove() {
    // the add of a served backing (by its link) against the removal of its device (refused: in
    // S) and, with S destroyed first, allowed
    check(PLAIN, &[Op::AddB0Link, Op::RemoveD0]);
    check(WITH_D1, &[Op::AddB1, Op::RemoveD1]);
}

#[test]
fn create_add_to_snapshot_remove() {
    check(WITH_D1, &[Op::Create, Op::AddD1ToE, Op::RemoveD1]);
}

#[test]
fn wait_event_destroy() {
    check(PLAIN, &[Op::Wait, Op::Destroy]);
}
