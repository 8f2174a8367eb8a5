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
//! * one configured backing is presented as a block device (its identity only the write
//!   witness: kernel counters moved by offline writes, a boot id changed by a reboot, a diskseq
//!   by a re-attached loop device): its map comes back only when the witness is unchanged;
//! * an event taken by a client that hung up is given to the next waiter of its snapshot;
//! * the front end's devices, which outlive a daemon as ublk devices do (the null front end's
//!   [`NullDevices`]), are exactly the daemon's: a clean stop leaves every origin device (by
//!   default) or none (`remove_devices_on_stop`) and never an image, and the next start takes
//!   each configured one over as the same device (after a crash too) and deletes the rest.
//!
//! Parts: the generator of clients' requests and origin writes with the oracle's bookkeeping
//! ([`workload`]), the oracle and the checks after every step ([`checker`]), and crashes, clean
//! stops, faults on the state directory and restarts ([`restart`]).

mod checker;
mod restart;
mod workload;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use blksnap_model::{DeviceId, Uuid};

use crate::config::{Config, DeviceConfig};
use crate::daemon::{Daemon, NullDevices};
use crate::state::{Faults, Witness};

use checker::{Oracle, Track};
use restart::RestartCause;
use workload::Rng;

/// Backing files: the first `CONFIGURED` are in the configuration, the others are served
/// only at run time (AddDevice).
const BACKINGS: usize = 5;
const CONFIGURED: usize = 4;
/// The configured backing presented as a block device (`Faults::set_block_witness`): its
/// identity has no times, only the write witness — kernel counters, diskseq, boot id — can show
/// it was not written while no daemon ran.
const BLOCK_BACKING: usize = 3;
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
    /// Reboots and re-attached loop devices (the block device's witness reset) while no daemon
    /// ran.
    pub witness_resets: u64,
    /// Maps restored after a restart (same generation, checked equal to the saved state).
    pub maps_restored: u64,
    /// New generations after a restart.
    pub new_generations: u64,
    /// Clean stops that left the origin devices for the next daemon (the default).
    pub stops_keeping: u64,
    /// Devices a restarted daemon took over (left by a clean stop or a crash).
    pub devices_taken_over: u64,
    /// Devices left by a crash at a state-directory write, not in the device map (deleted).
    pub orphans: u64,
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
        writeln!(
            f,
            "  clean stops      {} ({} keeping the devices)",
            self.clean_stops, self.stops_keeping
        )?;
        writeln!(
            f,
            "  devices          {} taken over by the next daemon, {} orphans deleted",
            self.devices_taken_over, self.orphans
        )?;
        writeln!(
            f,
            "  restarts         {} ({} starts refused and retried)",
            self.restarts, self.starts_refused
        )?;
        writeln!(
            f,
            "  faults           {} ENOSPC, {} torn state files, {} offline writes, {} \
             block-device witness resets",
            self.enospc, self.torn_files, self.offline_writes, self.witness_resets
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

struct Sim {
    cfg: SimConfig,
    rng: Rng,
    root: PathBuf,
    state_dir: PathBuf,
    config: Config,
    faults: Arc<Faults>,
    fail_images: Arc<AtomicBool>,
    /// The front end's devices, which outlive a daemon (ublk user recovery's model).
    devices: Arc<NullDevices>,
    /// The devices of configured backings the last daemon left, which the next must take over.
    left: BTreeMap<usize, DeviceId>,
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
        devices: Arc::new(NullDevices::default()),
        left: BTreeMap::new(),
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
    let witness = Witness { boot_id: "sim-boot".into(), diskseq: 1, counters: vec![0; 4] };
    sim.faults.set_block_witness(&sim.canonical(BLOCK_BACKING), witness);
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
                self.crash_and_restart(false)
            }
            15..=24 => {
                // A crash during the next request that changes the state directory.
                self.faults.arm(0, true, self.rng.below(64) as usize);
                self.request()?;
                if self.faults.dead() {
                    self.trace(|| "crash in the request".into());
                    self.report.crashes_in_request += 1;
                    self.crash_and_restart(true)
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
