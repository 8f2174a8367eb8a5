//! The deterministic simulation of the daemon (`blksnapd-sim`), as `blksnap-sim` checks the
//! engine: a seeded workload of several clients' requests through [`Daemon::handle_for`] (the
//! entry the control socket uses), origin writes through the engine's write path (the one the
//! ublk front end uses), crashes at random points — the daemon is dropped without its clean
//! stop: only the state directory and the backing files survive — clean stops and restarts
//! from the same state directory, faults on the state directory (ENOSPC, a crash tearing a
//! write, a torn or corrupted state file, a backing written while no daemon ran), all on the
//! host with the null front end. An oracle keeps the expected state; after every step:
//!
//! * the daemon's devices (origins by backing, images) and the engine's snapshots are the
//!   oracle's, and the engine's live objects match them (no leaked device or snapshot);
//! * every request was applied wholly or not at all (the whole observable state is compared
//!   after each request, failed or not; duplicate adds fail with EALREADY, removing a device
//!   in a snapshot with EBUSY, a take whose image cannot be served leaves no snapshot);
//! * each tracker's generation and numbers are the oracle's and its maps mark every block
//!   written (and every `CbtDirty` range) since the last take in the write map and those of the
//!   interval before it in the read map;
//! * the state directory holds only what its format defines (`running`, `devices`, and
//!   `cbt-*.state` of stopped devices; no temporary file);
//! * after a restart, each configured device's map either is the one saved at the stop — same
//!   generation, and then it must be exactly the saved state, so it marks every block written
//!   since the last take — or has a generation never seen before (fresh, `changes_number` 0);
//!   it must be the saved one when nothing could have changed it (clean stop, no fault, no
//!   offline write);
//! * an event taken by a client that hung up is given to the next waiter of its snapshot.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use blksnap_engine::cbt::CbtState;
use blksnap_engine::{Clock, Engine, EngineConfig};
use blksnap_model::{DeviceId, Params, SnapshotId, Uuid};
use blksnap_proto::{EventW, Range, Reply, Request, Role, Storage};

use crate::config::{Config, DeviceConfig};
use crate::daemon::{Daemon, NullFrontend};
use crate::state::{Faults, StateDir, DEVICES, MARKER};

/// Backing files: the first `CONFIGURED` are in the configuration, the others are served
/// only at run time (AddDevice).
const BACKINGS: usize = 5;
const CONFIGURED: usize = 4;
/// Backing size: 64 CBT blocks of 64 KiB.
const BACKING_BYTES: u64 = 4 << 20;
const BLOCK_SHIFT: u32 = 16;
const STORAGE_FILES: usize = 3;
const STORAGE_BYTES: u64 = 16 << 20;
const CLIENTS: usize = 3;

const EALREADY: i32 = 114;
const EBUSY: i32 = 16;

/// What to run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The seed: the whole run follows from it.
    pub seed: u64,
    /// Steps.
    pub steps: u64,
    /// Print every step.
    pub trace: bool,
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Steps run.
    pub steps: u64,
    /// Requests sent, and how many succeeded.
    pub requests: u64,
    /// Requests that succeeded.
    pub requests_ok: u64,
    /// Origin writes.
    pub writes: u64,
    /// Crashes between requests (the daemon dropped).
    pub crashes: u64,
    /// Crashes during a request (a state-directory change torn, the daemon then dropped).
    pub crashes_in_request: u64,
    /// Crashes during a clean stop (at a random state-directory change).
    pub crashes_in_stop: u64,
    /// Clean stops.
    pub clean_stops: u64,
    /// Restarts (each a new daemon on the same state directory).
    pub restarts: u64,
    /// ENOSPC injected into a state-directory write.
    pub enospc: u64,
    /// Starts refused (the marker could not be written) and retried.
    pub starts_refused: u64,
    /// State files torn or corrupted while no daemon ran.
    pub torn_files: u64,
    /// Backings written while no daemon ran.
    pub offline_writes: u64,
    /// Maps restored after a restart (same generation, checked equal to the saved state).
    pub maps_restored: u64,
    /// New generations after a restart.
    pub new_generations: u64,
    /// Takes rolled back (an image device could not be served).
    pub takes_rolled_back: u64,
    /// Events requeued for a client that hung up, and later delivered to the next waiter.
    pub events_requeued: u64,
    /// Full state checks passed.
    pub checks: u64,
    /// FNV-1a hash of the trace: equal for two runs of one seed (determinism).
    pub trace_hash: u64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "  steps            {}", self.steps)?;
        writeln!(f, "  requests         {} ({} ok)", self.requests, self.requests_ok)?;
        writeln!(f, "  origin writes    {}", self.writes)?;
        writeln!(
            f,
            "  crashes          {} between requests, {} in a request, {} in a clean stop",
            self.crashes, self.crashes_in_request, self.crashes_in_stop
        )?;
        writeln!(f, "  clean stops      {}", self.clean_stops)?;
        writeln!(
            f,
            "  restarts         {} ({} starts refused and retried)",
            self.restarts, self.starts_refused
        )?;
        writeln!(
            f,
            "  faults           {} ENOSPC, {} torn state files, {} offline writes",
            self.enospc, self.torn_files, self.offline_writes
        )?;
        writeln!(
            f,
            "  after restarts   {} maps restored, {} new generations",
            self.maps_restored, self.new_generations
        )?;
        writeln!(
            f,
            "  requests         {} takes rolled back, {} events requeued",
            self.takes_rolled_back, self.events_requeued
        )?;
        writeln!(f, "  checks           {}", self.checks)?;
        write!(f, "  trace hash       {:016x}", self.trace_hash)
    }
}

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> Option<T> {
        if v.is_empty() {
            None
        } else {
            Some(v[self.below(v.len() as u64) as usize])
        }
    }
}

/// The oracle's tracker of one device.
#[derive(Clone, Debug)]
struct Track {
    generation: Uuid,
    active: u8,
    previous: u8,
    /// Blocks written since the last take (write map at `active`).
    since: BTreeSet<u64>,
    /// Blocks written in the interval before the last take (read map at `previous`); `None`
    /// after a wrap (the read map is stale on purpose then).
    last: Option<BTreeSet<u64>>,
}

#[derive(Clone, Debug)]
struct ODev {
    backing: usize,
    track: Option<Track>,
}

#[derive(Clone, Debug)]
struct OSnap {
    id: SnapshotId,
    members: Vec<DeviceId>,
    taken: bool,
}

/// The expected state of a running daemon.
#[derive(Default)]
struct Oracle {
    devs: BTreeMap<DeviceId, ODev>,
    snaps: Vec<OSnap>,
    /// Events requeued for a snapshot (front first).
    kept: HashMap<SnapshotId, std::collections::VecDeque<EventW>>,
}

impl Oracle {
    fn served(&self, backing: usize) -> Option<DeviceId> {
        self.devs.iter().find(|(_, d)| d.backing == backing).map(|(id, _)| *id)
    }
    fn in_snapshot(&self, dev: DeviceId) -> bool {
        self.snaps.iter().any(|s| s.members.contains(&dev))
    }
}

struct Sim {
    cfg: SimConfig,
    rng: Rng,
    root: PathBuf,
    state_dir: PathBuf,
    config: Config,
    faults: Arc<Faults>,
    fail_images: Arc<AtomicBool>,
    daemon: Option<Daemon>,
    incarnation: u64,
    o: Oracle,
    seen: HashSet<Uuid>,
    /// The state files of run-time devices (no configured device consumes them).
    lingering: BTreeSet<String>,
    report: Report,
    step: u64,
}

type Res<T = ()> = Result<T, String>;

fn backing_path(root: &Path, i: usize) -> PathBuf {
    root.join(format!("b{i}.img"))
}

fn blocks(off: u64, len: u64) -> impl Iterator<Item = u64> {
    (off >> BLOCK_SHIFT)..=((off + len - 1) >> BLOCK_SHIFT)
}

/// Runs the simulation; `Err` describes the first failure (with the step).
pub fn run(cfg: &SimConfig) -> Result<Report, String> {
    static RUN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    // On tmpfs when there is one: the state directory is fsynced at every change.
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
    let root = base.join(format!(
        "blksnapd-sim-{}-{}-{}",
        std::process::id(),
        cfg.seed,
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("storage")).map_err(|e| format!("temp dir: {e}"))?;
    let result = run_in(cfg, &root);
    let _ = std::fs::remove_dir_all(&root);
    result
}

fn run_in(cfg: &SimConfig, root: &Path) -> Result<Report, String> {
    let mut rng = Rng(cfg.seed ^ 0x5eed_da3e_0000_0001);
    let mut devices = Vec::new();
    for i in 0..BACKINGS {
        let p = backing_path(root, i);
        std::fs::File::create(&p)
            .and_then(|f| f.set_len(BACKING_BYTES))
            .map_err(|e| format!("backing: {e}"))?;
        if i < CONFIGURED {
            // Device 2 is configured without attach (a saved tracker still comes back).
            devices.push(DeviceConfig { backing: p, attach: i != 2 || rng.chance(20) });
        }
    }
    for i in 0..STORAGE_FILES {
        std::fs::File::create(root.join(format!("s{i}.img")))
            .and_then(|f| f.set_len(STORAGE_BYTES))
            .map_err(|e| format!("storage: {e}"))?;
    }
    let state_dir = root.join("state");
    let config = Config {
        socket: root.join("control"),
        link_dir: root.to_path_buf(),
        state_dir: state_dir.clone(),
        freeze: false,
        devices,
        ..Config::default()
    };
    let mut sim = Sim {
        cfg: cfg.clone(),
        rng,
        root: root.to_path_buf(),
        state_dir,
        config,
        faults: Arc::new(Faults::default()),
        fail_images: Arc::new(AtomicBool::new(false)),
        daemon: None,
        incarnation: 0,
        o: Oracle::default(),
        seen: HashSet::new(),
        lingering: BTreeSet::new(),
        report: Report { trace_hash: 0xcbf2_9ce4_8422_2325, ..Report::default() },
        step: 0,
    };
    // The saved trackers of run-time devices: a start consumes only the configured devices'
    // files, so theirs stay (used if the device is configured later; the witness keeps that
    // safe). Allowed.
    for b in CONFIGURED..BACKINGS {
        let f = file_name(&sim.cbt_file(b));
        sim.lingering.insert(f);
    }
    sim.restart(&BTreeMap::new(), &RestartCause::First)?;
    sim.check()?;
    for step in 1..=cfg.steps {
        sim.step = step;
        sim.one_step().map_err(|e| format!("step {step}: {e}"))?;
        sim.check().map_err(|e| format!("step {step}: {e}"))?;
        sim.report.steps = step;
    }
    // The end: a clean stop and a last restart, checked like any other.
    sim.step = cfg.steps + 1;
    sim.stop_and_restart(true).map_err(|e| format!("final restart: {e}"))?;
    sim.check().map_err(|e| format!("final restart: {e}"))?;
    if let Some(d) = sim.daemon.take() {
        d.shutdown();
    }
    Ok(sim.report)
}

/// Why a restart happens, and what the oracle expects of each device's map.
enum RestartCause {
    First,
    /// The daemon was dropped (or its state-directory writes stopped at a crash fault).
    Crash,
    /// A clean stop; `failed` are backings whose state file could not be written (ENOSPC),
    /// `dirty` backings whose map cannot be trusted (offline write, torn file).
    Clean {
        failed: BTreeSet<usize>,
        dirty: BTreeSet<usize>,
    },
}

impl Sim {
    fn d(&self) -> &Daemon {
        self.daemon.as_ref().expect("a running daemon")
    }

    /// Records a step in the trace hash (the temporary directory's name left out, so two runs
    /// of one seed hash alike) and prints it when tracing.
    fn trace(&mut self, what: impl FnOnce() -> String) {
        let line = timeless(&what().replace(&self.root.display().to_string(), "$ROOT"));
        for b in self.step.to_le_bytes().iter().chain(line.as_bytes()) {
            self.report.trace_hash =
                (self.report.trace_hash ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
        if self.cfg.trace {
            println!("{:>6} {line}", self.step);
        }
    }

    fn new_generation(&mut self, g: Uuid, what: &str) -> Res {
        if !self.seen.insert(g) {
            return Err(format!("{what}: generation {g:?} is not new"));
        }
        Ok(())
    }

    /// A fresh tracker as the engine has it now (after attach / restart with a new generation).
    fn fresh_track(&mut self, id: DeviceId, what: &str) -> Res<Track> {
        let st =
            self.d().engine().cbt_export(id).map_err(|e| format!("{what}: no tracker: {e:?}"))?;
        self.new_generation(st.generation, what)?;
        if st.active != 1 || st.previous != 0 || st.write_map.iter().any(|b| *b != 0) {
            return Err(format!("{what}: a new generation that is not fresh: {st:?}"));
        }
        Ok(Track {
            generation: st.generation,
            active: 1,
            previous: 0,
            since: BTreeSet::new(),
            last: Some(BTreeSet::new()),
        })
    }

    fn one_step(&mut self) -> Res {
        let r = self.rng.below(1000);
        match r {
            0..=14 => {
                self.trace(|| "crash".into());
                self.report.crashes += 1;
                self.crash_and_restart()
            }
            15..=24 => {
                // A crash during the next request that changes the state directory.
                self.faults.arm(0, true, self.rng.below(64) as usize);
                self.request()?;
                if self.faults.dead() {
                    self.trace(|| "crash in the request".into());
                    self.report.crashes_in_request += 1;
                    self.crash_and_restart()
                } else {
                    self.faults.reset();
                    Ok(())
                }
            }
            25..=44 => self.stop_and_restart(false),
            45..=399 => self.write(),
            _ => self.request(),
        }
    }

    fn write(&mut self) -> Res {
        let devs: Vec<DeviceId> = self.o.devs.keys().copied().collect();
        let Some(id) = self.rng.pick(&devs) else { return Ok(()) };
        let sectors = BACKING_BYTES >> 9;
        let off = self.rng.below(sectors) << 9;
        let len = ((1 + self.rng.below(512)) << 9).min(BACKING_BYTES - off);
        let fill = self.rng.next() as u8;
        let data = vec![fill; len as usize];
        self.trace(|| format!("write {id} {off}+{len}"));
        self.report.writes += 1;
        let result = self.d().engine().write(id, off, &data);
        if let Err(e) = result {
            return Err(format!("origin write {id} {off}+{len}: {e:?}"));
        }
        if let Some(t) = self.o.devs.get_mut(&id).and_then(|d| d.track.as_mut()) {
            t.since.extend(blocks(off, len));
        }
        Ok(())
    }

    fn snap(&mut self, taken: Option<bool>) -> Option<SnapshotId> {
        let ids: Vec<SnapshotId> = self
            .o
            .snaps
            .iter()
            .filter(|s| taken.is_none_or(|t| s.taken == t))
            .map(|s| s.id)
            .collect();
        if self.rng.chance(5) {
            return Some(Uuid([0xee; 16])); // unknown
        }
        self.rng.pick(&ids)
    }

    fn dev(&mut self) -> DeviceId {
        let devs: Vec<DeviceId> = self.o.devs.keys().copied().collect();
        match self.rng.pick(&devs) {
            Some(d) if !self.rng.chance(5) => d,
            _ => DeviceId::new(240, 999),
        }
    }

    fn request(&mut self) -> Res {
        let client = self.rng.below(CLIENTS as u64);
        let kind = self.rng.below(100);
        let req = match kind {
            0..=6 => {
                let b = self.rng.below(BACKINGS as u64) as usize;
                let attach = self.rng.chance(70);
                Request::AddDevice {
                    backing: backing_path(&self.root, b).display().to_string(),
                    attach,
                }
            }
            7..=11 => Request::RemoveDevice { dev: self.dev().into() },
            12..=15 => Request::Attach { dev: self.dev().into() },
            16..=18 => Request::Detach { dev: self.dev().into() },
            19..=28 => {
                let storage = if self.rng.chance(50) {
                    Storage::Ranges
                } else {
                    Storage::File {
                        path: self.root.join("storage").display().to_string(),
                        limit_sectors: (1 + self.rng.below(8)) * 1024,
                    }
                };
                Request::SnapshotCreate { storage }
            }
            29..=36 => {
                let Some(id) = self.snap(None) else { return Ok(()) };
                let file = self.rng.below(STORAGE_FILES as u64);
                let offset = self.rng.below(STORAGE_BYTES >> 9 >> 11) << 11;
                Request::SnapshotAppend {
                    id: id.into(),
                    path: self.root.join(format!("s{file}.img")).display().to_string(),
                    ranges: vec![Range { offset, count: 2048 }],
                }
            }
            37..=48 => {
                let Some(id) = self.snap(Some(false)) else { return Ok(()) };
                Request::SnapshotAdd { id: id.into(), dev: self.dev().into() }
            }
            49..=60 => {
                let Some(id) = self.snap(Some(false)) else { return Ok(()) };
                Request::SnapshotTake { id: id.into() }
            }
            61..=70 => {
                let Some(id) = self.snap(None) else { return Ok(()) };
                Request::SnapshotDestroy { id: id.into() }
            }
            71..=82 => {
                let Some(id) = self.snap(None) else { return Ok(()) };
                let timeout_ms = if self.rng.chance(50) { 0 } else { 500 };
                Request::WaitEvent { id: id.into(), timeout_ms }
            }
            83..=86 => {
                let dev = self.dev();
                let offset = self.rng.below(BACKING_BYTES >> 9);
                let count = (1 + self.rng.below(256)).min((BACKING_BYTES >> 9) - offset);
                Request::CbtDirty { dev: dev.into(), ranges: vec![Range { offset, count }] }
            }
            87..=90 => Request::CbtInfo { dev: self.dev().into() },
            91..=93 => Request::CbtMap { dev: self.dev().into(), offset: 0, length: 64 },
            94..=96 => Request::SnapshotInfo { dev: self.dev().into() },
            _ => Request::ListDevices,
        };
        self.send(client as usize, req)
    }

    fn send(&mut self, client: usize, req: Request) -> Res {
        // A take whose image devices fail to start (ENOMEM from the null front end).
        let failing = matches!(req, Request::SnapshotTake { .. }) && self.rng.chance(10);
        self.fail_images.store(failing, Ordering::SeqCst);
        // A client that hangs up (30%; always for a wait with a timeout: the daemon's deadline
        // is real time, so only a client that is gone returns at once from such a wait, after
        // its first slice).
        let hang_up =
            self.rng.chance(30) || matches!(req, Request::WaitEvent { timeout_ms: 1.., .. });
        let before = self.observe()?;
        let shown = format!("{req:?}");
        // A client that hangs up: a wait notices it (and stops) between its slices.
        let result = self.d().handle_for(req.clone(), &|| hang_up);
        self.fail_images.store(false, Ordering::SeqCst);
        self.report.requests += 1;
        let shown_result = format!("{result:?}");
        self.trace(|| {
            let how = if failing {
                " (images fail)"
            } else if hang_up {
                " (hangs up)"
            } else {
                ""
            };
            format!("client {client}: {shown}{how} -> {shown_result}")
        });
        let ok = result.is_ok();
        if ok {
            self.report.requests_ok += 1;
        }
        let errno = result.as_ref().err().map(|e| e.errno);
        // A take rolled back when its image could not be served: the engine switched (it
        // cannot un-take), then the snapshot was destroyed.
        let mut rolled_back = false;
        match (req, result) {
            (Request::AddDevice { backing, attach }, r) => {
                let b = (0..BACKINGS)
                    .find(|i| backing_path(&self.root, *i).display().to_string() == backing)
                    .expect("a sim backing");
                let served = self.o.served(b).is_some();
                match r {
                    Ok(Reply::Device(entry)) => {
                        if served {
                            return Err(format!(
                                "{shown}: a second add of a served backing succeeded"
                            ));
                        }
                        let id: DeviceId = entry.dev.into();
                        self.o.devs.insert(id, ODev { backing: b, track: None });
                        if attach {
                            let t = self.fresh_track(id, &shown)?;
                            self.o.devs.get_mut(&id).expect("inserted").track = Some(t);
                        }
                    }
                    Ok(other) => return Err(format!("{shown}: reply {other:?}")),
                    Err(e) if served && e.errno != EALREADY => {
                        return Err(format!(
                            "{shown}: a duplicate add failed with {e:?}, not EALREADY"
                        ))
                    }
                    Err(e) if !served => return Err(format!("{shown}: failed: {e:?}")),
                    Err(_) => {}
                }
            }
            (Request::RemoveDevice { dev }, r) => {
                let id: DeviceId = dev.into();
                let busy = self.o.in_snapshot(id);
                match r {
                    Ok(_) if busy => {
                        return Err(format!("{shown}: removed a device in a snapshot"))
                    }
                    Ok(_) => {
                        self.o.devs.remove(&id);
                    }
                    Err(e) if busy && e.errno != EBUSY => {
                        return Err(format!(
                            "{shown}: {e:?}, not EBUSY, for a device in a snapshot"
                        ))
                    }
                    Err(_) => {}
                }
            }
            (Request::Attach { dev }, Ok(_)) => {
                let id: DeviceId = dev.into();
                let t = self.fresh_track(id, &shown)?;
                if let Some(d) = self.o.devs.get_mut(&id) {
                    d.track = Some(t);
                }
            }
            (Request::Detach { dev }, Ok(_)) => {
                if let Some(d) = self.o.devs.get_mut(&dev.into()) {
                    d.track = None;
                }
            }
            (Request::CbtDirty { dev, ranges }, Ok(_)) => {
                if let Some(t) = self.o.devs.get_mut(&dev.into()).and_then(|d| d.track.as_mut()) {
                    for r in ranges {
                        let bs: Vec<u64> = blocks(r.offset << 9, r.count << 9).collect();
                        t.since.extend(bs.iter().copied());
                        if let Some(l) = t.last.as_mut() {
                            l.extend(bs);
                        }
                    }
                }
            }
            (Request::SnapshotCreate { .. }, Ok(Reply::Created(id))) => {
                self.o.snaps.push(OSnap { id: id.into(), members: Vec::new(), taken: false });
            }
            (Request::SnapshotAdd { id, dev }, Ok(_)) => {
                let id: SnapshotId = id.into();
                if let Some(s) = self.o.snaps.iter_mut().find(|s| s.id == id) {
                    s.members.push(dev.into());
                }
            }
            (Request::SnapshotTake { id }, r) => {
                let id: SnapshotId = id.into();
                let known = self.o.snaps.iter().find(|s| s.id == id).cloned();
                let switched = match (&r, &known) {
                    (Ok(_), Some(_)) => true,
                    (Err(e), Some(s)) if failing && !s.members.is_empty() && e.errno == 12 => {
                        // Checked against the oracle after the step, not against `before`.
                        rolled_back = true;
                        self.report.takes_rolled_back += 1;
                        self.o.snaps.retain(|s| s.id != id);
                        self.o.kept.remove(&id);
                        true
                    }
                    (Ok(_), None) => return Err(format!("{shown}: an unknown snapshot taken")),
                    _ => false,
                };
                if switched {
                    let s = known.expect("known");
                    if let Some(os) = self.o.snaps.iter_mut().find(|x| x.id == id) {
                        os.taken = true;
                    }
                    for m in &s.members {
                        self.switch(*m, &shown)?;
                    }
                }
            }
            (Request::SnapshotDestroy { id }, Ok(_)) => {
                let id: SnapshotId = id.into();
                self.o.snaps.retain(|s| s.id != id);
                self.o.kept.remove(&id);
            }
            (Request::WaitEvent { id, .. }, r) => {
                let id: SnapshotId = id.into();
                let expected = self.o.kept.get_mut(&id).and_then(|q| q.pop_front());
                match (r, expected) {
                    (Ok(Reply::Event(ev)), Some(want)) if ev != want => {
                        return Err(format!("{shown}: got {ev:?}, the requeued event was {want:?}"))
                    }
                    (Err(e), Some(want)) => {
                        return Err(format!("{shown}: {e:?}, the requeued event {want:?} lost"))
                    }
                    (Ok(Reply::Event(ev)), _) if hang_up => {
                        // The client hung up before reading the reply (the control server's
                        // path when the reply cannot be written).
                        self.d().requeue_event(id, ev);
                        self.o.kept.entry(id).or_default().push_front(ev);
                        self.report.events_requeued += 1;
                    }
                    _ => {}
                }
            }
            (Request::CbtInfo { dev }, r) => {
                let tracked = self.o.devs.get(&dev.into()).and_then(|d| d.track.as_ref());
                match (r, tracked) {
                    (Ok(Reply::CbtInfo(i)), Some(t)) => {
                        if i.generation_id.0 != t.generation.0 || i.changes_number != t.previous {
                            return Err(format!("{shown}: {i:?}, expected {t:?}"));
                        }
                    }
                    (Err(_), None) => {}
                    (r, t) => return Err(format!("{shown}: {r:?}, tracker expected: {t:?}")),
                }
            }
            _ => {}
        }
        // Wholly or not at all: a failed request changed nothing; any request leaves the
        // state the oracle expects (checked by `check` after the step).
        if !ok && !rolled_back {
            let after = self.observe()?;
            if after != before {
                return Err(format!(
                    "{shown} failed ({errno:?}) but changed the state:\n  before {before:?}\n  after  {after:?}"
                ));
            }
        }
        Ok(())
    }

    /// A take switched `dev`'s tracker: check the numbers and move the oracle's sets.
    fn switch(&mut self, dev: DeviceId, what: &str) -> Res {
        let Some(t) = self.o.devs.get_mut(&dev).and_then(|d| d.track.as_mut()) else {
            return Ok(());
        };
        let st = self.daemon.as_ref().expect("daemon").engine().cbt_export(dev);
        let st = st.map_err(|e| format!("{what}: {dev}: tracker gone: {e:?}"))?;
        if st.generation != t.generation {
            // The wrap: a new generation, the live map cleared.
            if t.active != 255 {
                return Err(format!("{what}: {dev}: new generation without a wrap: {t:?}"));
            }
            t.generation = st.generation;
            t.since.clear();
            t.last = None;
            t.active = st.active;
            t.previous = st.previous;
            let g = st.generation;
            return self.new_generation(g, what);
        }
        if st.previous != t.active || st.active != t.active + 1 {
            return Err(format!(
                "{what}: {dev}: numbers {}/{} after a take, expected {}/{}",
                st.active,
                st.previous,
                t.active + 1,
                t.active
            ));
        }
        t.previous = st.previous;
        t.active = st.active;
        t.last = Some(std::mem::take(&mut t.since));
        Ok(())
    }

    /// The observable state (for the all-or-nothing comparison of failed requests).
    fn observe(&self) -> Res<String> {
        let d = self.d();
        let mut list: Vec<String> = d.list().iter().map(|e| format!("{e:?}")).collect();
        list.sort();
        let mut snaps: Vec<String> =
            d.engine().snapshot_collect().iter().map(|s| format!("{s:?}")).collect();
        snaps.sort();
        let mut cbt = Vec::new();
        for id in self.o.devs.keys() {
            let info = d.engine().cbt_info(*id).ok();
            let membership = d.engine().snapshot_info(*id).ok().map(|i| (i.error_code, i.image));
            cbt.push(format!("{id}: {info:?} {membership:?}"));
        }
        Ok(format!("{list:?} {snaps:?} {cbt:?} {:?}", d.engine().live()))
    }

    /// Everything the oracle knows, compared with the daemon.
    fn check(&mut self) -> Res {
        let d = self.d();
        let list = d.list();
        let mut origins = BTreeMap::new();
        let mut images = BTreeSet::new();
        for e in &list {
            match e.role {
                Role::Origin => {
                    origins.insert(DeviceId::from(e.dev), e.backing.clone());
                }
                Role::Image { of } => {
                    images.insert(DeviceId::from(of));
                }
            }
        }
        let want: BTreeMap<DeviceId, String> = self
            .o
            .devs
            .iter()
            .map(|(id, od)| (*id, backing_path(&self.root, od.backing).display().to_string()))
            .collect();
        if origins != want {
            return Err(format!("devices {origins:?}, expected {want:?}"));
        }
        let want_images: BTreeSet<DeviceId> = self
            .o
            .snaps
            .iter()
            .filter(|s| s.taken)
            .flat_map(|s| s.members.iter().copied())
            .collect();
        if images != want_images {
            return Err(format!("images of {images:?}, expected of {want_images:?}"));
        }
        let mut snaps = d.engine().snapshot_collect();
        snaps.sort();
        let mut want_snaps: Vec<SnapshotId> = self.o.snaps.iter().map(|s| s.id).collect();
        want_snaps.sort();
        if snaps != want_snaps {
            return Err(format!("snapshots {snaps:?}, expected {want_snaps:?}"));
        }
        let live = d.engine().live();
        let tracked = self.o.devs.values().filter(|d| d.track.is_some()).count();
        if live.snapshots != want_snaps.len() || live.trackers != tracked {
            return Err(format!(
                "live engine objects {live:?}: expected {} snapshots, {tracked} trackers",
                want_snaps.len()
            ));
        }
        for (id, od) in &self.o.devs {
            let st = d.engine().cbt_export(*id);
            match (&od.track, st) {
                (None, Err(_)) => {}
                (None, Ok(_)) => return Err(format!("{id}: tracked, expected untracked")),
                (Some(_), Err(e)) => {
                    return Err(format!("{id}: untracked ({e:?}), expected tracked"))
                }
                (Some(t), Ok(st)) => check_marks(*id, t, &st)?,
            }
        }
        // The state directory of a running daemon: its marker, its device map, and the saved
        // trackers of run-time devices no configured device consumes; nothing else.
        for name in dir_names(&self.state_dir)? {
            let ok = name == MARKER || name == DEVICES || self.lingering.contains(&name);
            if !ok {
                return Err(format!(
                    "stray file {name:?} in the state directory of a running daemon"
                ));
            }
        }
        if !self.state_dir.join(MARKER).exists() {
            return Err("a running daemon without its marker".into());
        }
        self.report.checks += 1;
        Ok(())
    }

    fn crash_and_restart(&mut self) -> Res {
        drop(self.daemon.take());
        self.o = Oracle::default();
        self.while_down(false, &mut BTreeSet::new())?;
        self.restart(&BTreeMap::new(), &RestartCause::Crash)
    }

    /// A clean stop (possibly hit by a fault), a gap, a restart.
    fn stop_and_restart(&mut self, plain: bool) -> Res {
        let mut before: BTreeMap<usize, (ODev, CbtState)> = BTreeMap::new();
        for (id, od) in &self.o.devs {
            if od.track.is_some() {
                let st = self.d().engine().cbt_export(*id).map_err(|e| format!("export: {e:?}"))?;
                before.insert(od.backing, (od.clone(), st));
            }
        }
        // Faults: ENOSPC at one change of the stop, or a crash at one.
        let changes = self.o.snaps.len() as u64 + before.len() as u64 + 2;
        let fault = if plain { 0 } else { self.rng.below(10) };
        let at = self.rng.below(changes);
        let keep = self.rng.below(200) as usize;
        match fault {
            0..=1 => {
                self.faults.arm(at, false, keep);
            }
            2 => self.faults.arm(at, true, keep),
            _ => {}
        }
        self.trace(|| format!("clean stop (fault {fault}, at change {at})"));
        let d = self.daemon.take().expect("running");
        d.shutdown();
        drop(d);
        let hit = self.faults.hit();
        let dead = self.faults.dead();
        let mut failed = BTreeSet::new();
        if let Some(p) = &hit {
            if dead {
                self.report.crashes_in_stop += 1;
            } else {
                self.report.enospc += 1;
            }
            for b in before.keys() {
                if *p == self.cbt_file(*b) {
                    failed.insert(*b);
                }
            }
        }
        self.faults.reset();
        self.o = Oracle::default();
        if dead {
            self.while_down(false, &mut BTreeSet::new())?;
            return self.restart(&BTreeMap::new(), &RestartCause::Crash);
        }
        self.report.clean_stops += 1;
        // What a clean stop leaves: the saved trackers (those not failed), nothing else.
        let names = dir_names(&self.state_dir)?;
        let want: BTreeSet<String> = before
            .keys()
            .filter(|b| !failed.contains(b))
            .map(|b| file_name(&self.cbt_file(*b)))
            .collect();
        let names: BTreeSet<String> =
            names.into_iter().filter(|n| !self.lingering.contains(n) || want.contains(n)).collect();
        if names != want {
            return Err(format!(
                "after a clean stop the state directory holds {names:?}, expected {want:?}"
            ));
        }
        let mut dirty = BTreeSet::new();
        if !plain {
            self.while_down(true, &mut dirty)?;
        }
        let saved: BTreeMap<usize, (ODev, CbtState)> =
            before.into_iter().filter(|(b, _)| !failed.contains(b)).collect();
        self.restart(&saved, &RestartCause::Clean { failed, dirty })
    }

    fn cbt_file(&self, b: usize) -> PathBuf {
        let canonical = std::fs::canonicalize(backing_path(&self.root, b)).unwrap_or_default();
        StateDir::cbt_path_in(&self.state_dir, &canonical.display().to_string())
    }

    /// While no daemon runs: maybe write a backing directly, maybe tear a saved state file.
    fn while_down(&mut self, clean: bool, dirty: &mut BTreeSet<usize>) -> Res {
        if self.rng.chance(25) {
            let b = self.rng.below(CONFIGURED as u64) as usize;
            let off = self.rng.below(BACKING_BYTES - 4096);
            let byte = self.rng.next() as u8;
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(backing_path(&self.root, b))
                .map_err(|e| format!("offline write: {e}"))?;
            f.write_all_at(&[byte; 4096], off).map_err(|e| format!("offline write: {e}"))?;
            self.trace(|| format!("offline write of backing {b} at {off}"));
            self.report.offline_writes += 1;
            dirty.insert(b);
        }
        if clean && self.rng.chance(15) {
            let b = self.rng.below(CONFIGURED as u64) as usize;
            let path = self.cbt_file(b);
            if let Ok(mut bytes) = std::fs::read(&path) {
                if self.rng.chance(50) {
                    let n = self.rng.below(bytes.len() as u64) as usize;
                    bytes.truncate(n);
                } else {
                    let i = self.rng.below(bytes.len() as u64) as usize;
                    bytes[i] ^= 1 << self.rng.below(8);
                }
                std::fs::write(&path, &bytes).map_err(|e| format!("tear: {e}"))?;
                self.trace(|| format!("tore the state file of backing {b}"));
                self.report.torn_files += 1;
                dirty.insert(b);
            }
        }
        Ok(())
    }

    /// Starts a daemon on the state directory and checks each configured device's map against
    /// what was saved.
    fn restart(&mut self, saved: &BTreeMap<usize, (ODev, CbtState)>, cause: &RestartCause) -> Res {
        self.faults.reset(); // a new process
                             // Sometimes the disk is full when the daemon starts: the marker cannot be written, the
                             // start is refused (and retried, as systemd would).
        if self.rng.chance(5) {
            self.faults.arm(0, false, self.rng.below(8) as usize);
            if StateDir::open_with_faults(&self.state_dir, Some(self.faults.clone())).is_ok() {
                return Err("a start whose marker could not be written was not refused".into());
            }
            self.report.enospc += 1;
            self.report.starts_refused += 1;
            self.faults.reset();
        }
        self.incarnation += 1;
        let sd = StateDir::open_with_faults(&self.state_dir, Some(self.faults.clone()))
            .map_err(|e| format!("state dir: {e}"))?;
        let params = Params::default();
        let engine = Engine::new(EngineConfig::new(
            params,
            Some(self.cfg.seed.wrapping_mul(1000).wrapping_add(self.incarnation)),
            Clock::manual(true),
        ))
        .map_err(|e| format!("engine: {e:?}"))?;
        let frontend = NullFrontend::failing_images(self.fail_images.clone());
        let d = Daemon::with_state(Arc::new(engine), Box::new(frontend), self.config.clone(), sd);
        let ids = d.add_configured().map_err(|e| format!("start: {e}"))?;
        self.daemon = Some(d);
        self.report.restarts += 1;
        self.trace(|| format!("restart {} devices", ids.len()));
        for (b, id) in ids.into_iter().enumerate() {
            let attach = self.config.devices[b].attach;
            let st = self.d().engine().cbt_export(id).ok();
            let prev = saved.get(&b);
            let expect_restored = match cause {
                RestartCause::Clean { failed, dirty } => {
                    prev.is_some() && !failed.contains(&b) && !dirty.contains(&b)
                }
                _ => false,
            };
            let what = format!("restart: configured device {b}");
            let track = match (st, prev) {
                (None, _) if expect_restored || attach => {
                    return Err(format!("{what}: not tracked"));
                }
                (None, _) => None,
                (Some(st), Some((od, then))) if st.generation == then.generation => {
                    // The same generation: the saved state, exactly (which marks every block
                    // written since the last take), and only when nothing can have changed it.
                    let t = od.track.clone().expect("tracked");
                    if st != *then {
                        return Err(format!("{what}: same generation, another map:\n  saved {then:?}\n  now   {st:?}"));
                    }
                    check_marks(id, &t, &st)?;
                    if !expect_restored {
                        return Err(format!("{what}: the saved map came back after a gap that may have changed the backing"));
                    }
                    self.report.maps_restored += 1;
                    Some(t)
                }
                (Some(_), _) => {
                    if expect_restored {
                        return Err(format!(
                            "{what}: a new generation after a clean stop with nothing changed"
                        ));
                    }
                    self.report.new_generations += 1;
                    Some(self.fresh_track(id, &what)?)
                }
            };
            self.o.devs.insert(id, ODev { backing: b, track });
        }
        Ok(())
    }
}

/// The tracker's numbers and maps against the oracle's: every block written since the last take
/// is marked in the write map, every block of the interval before it in the read map.
fn check_marks(id: DeviceId, t: &Track, st: &CbtState) -> Res {
    if st.generation != t.generation || st.active != t.active || st.previous != t.previous {
        return Err(format!(
            "{id}: tracker {:?} {}/{}, expected {:?} {}/{}",
            st.generation, st.active, st.previous, t.generation, t.active, t.previous
        ));
    }
    for b in &t.since {
        if st.write_map.get(*b as usize).is_none_or(|v| *v < t.active) {
            return Err(format!(
                "{id}: block {b} written since the last take is not marked (write map {:?})",
                st.write_map
            ));
        }
    }
    if let Some(last) = &t.last {
        for b in last {
            if st.read_map.get(*b as usize).is_none_or(|v| *v < t.previous) {
                return Err(format!(
                    "{id}: block {b} written before the last take is not in the read map {:?}",
                    st.read_map
                ));
            }
        }
    }
    Ok(())
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn dir_names(dir: &Path) -> Res<BTreeSet<String>> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
}

/// `line` without the numbers after `time_ns: ` (an event's time comes from the engine's
/// clock, which a waiter moves to its deadline: not part of what the seed decides).
fn timeless(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(i) = rest.find("time_ns: ") {
        out.push_str(&rest[..i + 9]);
        rest = rest[i + 9..].trim_start_matches(|c: char| c.is_ascii_digit());
        out.push('_');
    }
    out.push_str(rest);
    out
}
