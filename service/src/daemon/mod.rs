//! The daemon's core: owns the engine, the served devices and the snapshot bookkeeping, and
//! carries out control requests. The block-device side is a [`Frontend`]: ublk in production
//! (`crate::ublk`, feature `ublk`), or [`NullFrontend`] (no block devices, synthetic ids) for
//! tests of the control plane on hosts without the driver.
//!
//! Lock order: `state` → engine (the engine's own order below it). The daemon's locks come from
//! [`crate::sync`] (shuttle's under `--cfg blksnap_shuttle`: `tests/shuttle_daemon.rs`). The data path never takes
//! `state`: each served device holds an [`Arc<Target>`] with what it needs (engine id, backing,
//! the storage backends to flush).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::sync;
use std::time::Duration;

use blksnap_engine::io::{BlockDev, Dev, FileDev};

use blksnap_engine::{Engine, StorageSpec};
use blksnap_model::limits::EVENT_QUEUE_CAPACITY;
use blksnap_model::{DeviceId, Errno, Error, SectorRange, SnapshotId};
use blksnap_proto::{
    CbtInfoW, DeviceEntry, EventW, Reply, Request, Role, Storage, WireError, PROTOCOL_VERSION,
};

use crate::config::Config;
use crate::freeze;
use crate::state::{MapEntry, MapRole, SavedCbt, StateDir};

mod backing;
pub mod backing_io;
mod data;
mod frontend;
pub mod serve;
mod trust;

use backing::exclusive_probe;
pub use backing::{open_backing, open_storage, BackingKey};
use backing_io::BackingDev;
pub use frontend::{Frontend, NullDevices, NullFrontend, Served, Target};
pub use trust::Principal;

struct Origin {
    served: Box<dyn Served>,
    target: Arc<Target>,
    backing_path: PathBuf,
    /// Canonical backing path (the device's identity in the state directory).
    canonical: String,
    /// What the backing is, whatever the path (its claim in [`State::claims`]).
    key: BackingKey,
    /// Who added it (0: root or the configuration); only root and its owner may change it.
    owner: u32,
}

struct Image {
    served: Box<dyn Served>,
    links: Vec<PathBuf>,
    /// Its data path's view (the storage list it flushes follows appends).
    target: Arc<Target>,
}

#[derive(Default)]
struct SnapRec {
    members: Vec<DeviceId>,
    storages: Vec<Dev>,
    /// Who created it (0: root); only root and its owner may use it.
    owner: u32,
}

#[derive(Default)]
struct State {
    origins: BTreeMap<DeviceId, Origin>,
    snapshots: HashMap<SnapshotId, SnapRec>,
    images: BTreeMap<DeviceId, Image>,
    /// Every backing served or being brought up: a claim is taken (under this lock) before
    /// the backing is opened and served, and released if that fails, so that two racing adds
    /// of one backing — by any path — have exactly one winner.
    claims: std::collections::HashSet<BackingKey>,
    /// v3 storage files by (st_dev, st_ino), opened once: the engine recognises ranges of one
    /// file appended twice (to one or two live snapshots) only when they share the handle.
    storage_files: HashMap<(u64, u64), Dev>,
}

/// The daemon.
pub struct Daemon {
    engine: Arc<Engine>,
    frontend: Box<dyn Frontend>,
    config: Config,
    state: sync::Mutex<State>,
    persist: sync::Mutex<Option<StateDir>>,
    /// Events taken from a snapshot's queue for a client that hung up before it got them, by
    /// snapshot: the next WaitEvent of that snapshot gets them first (older than anything
    /// still queued in the engine, so the order is kept). Cleared when the snapshot goes.
    /// Bounded like the engine's queue ([`EVENT_QUEUE_CAPACITY`]).
    undelivered: sync::Mutex<HashMap<SnapshotId, std::collections::VecDeque<EventW>>>,
    /// NBD exports: each image while it exists, and the configured writable origins.
    nbd: Arc<crate::nbd::Exports>,
}

/// How long one slice of a WaitEvent waits in the engine before the daemon looks at its
/// client again (hung up?) and at the events kept for other waiters.
const WAIT_SLICE_MS: u32 = 100;

/// How [`Daemon::add_origin_with`] brings a device up.
#[derive(Default)]
pub struct OriginStart {
    /// Attach the tracker (fresh generation) unless `cbt` is given.
    pub attach: bool,
    /// Attach with this saved CBT (same generation as before the restart).
    pub cbt: Option<blksnap_engine::cbt::CbtState>,
    /// Recover this frontend device of the previous run instead of adding a new one.
    pub recover: Option<u32>,
    /// Who adds it (uid; 0 for root and the configuration).
    pub owner: u32,
}

/// A backing claimed for an add in progress; released when dropped unless kept (the add
/// succeeded and the origin now holds the claim).
struct Claim<'a> {
    daemon: &'a Daemon,
    key: Option<BackingKey>,
}

impl Claim<'_> {
    /// The add succeeded: the claim stays until the origin is removed.
    fn keep(mut self) {
        self.key = None;
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.daemon.state().claims.remove(&key);
        }
    }
}

impl Daemon {
    /// A daemon with no devices yet.
    pub fn new(engine: Arc<Engine>, frontend: Box<dyn Frontend>, config: Config) -> Daemon {
        Daemon {
            engine,
            frontend,
            nbd: Arc::new(crate::nbd::Exports::new(&config.nbd)),
            config,
            state: sync::Mutex::new(State::default()),
            persist: sync::Mutex::new(None),
            undelivered: sync::Mutex::new(HashMap::new()),
        }
    }

    /// A daemon that persists CBT across clean restarts and recovers devices after unclean
    /// ones, in `state` ([`crate::state`]).
    pub fn with_state(
        engine: Arc<Engine>,
        frontend: Box<dyn Frontend>,
        config: Config,
        state: StateDir,
    ) -> Daemon {
        let d = Daemon::new(engine, frontend, config);
        *d.persist.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
        d
    }

    fn persist(&self) -> sync::MutexGuard<'_, Option<StateDir>> {
        self.persist.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rewrites the device map of the state directory (if any).
    fn save_map(&self, st: &State) {
        let persist = self.persist();
        let Some(sd) = persist.as_ref() else { return };
        let mut map = Vec::new();
        for o in st.origins.values() {
            if let Some(handle) = o.served.handle() {
                map.push(MapEntry { handle, role: MapRole::Origin(o.canonical.clone()) });
            }
        }
        for i in st.images.values() {
            if let Some(handle) = i.served.handle() {
                map.push(MapEntry { handle, role: MapRole::Image });
            }
        }
        if let Err(e) = sd.save_map(&map) {
            eprintln!("blksnapd: {e}");
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The NBD exports (served by `crate::nbd::Listeners` when configured).
    pub fn nbd_exports(&self) -> &Arc<crate::nbd::Exports> {
        &self.nbd
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn state(&self) -> sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves `backing` as a tracked device (attached at once when `attach`); returns its id.
    pub fn add_origin(&self, backing: &Path, attach: bool) -> Result<DeviceId, Error> {
        self.add_origin_with(backing, OriginStart { attach, ..OriginStart::default() })
    }

    /// Serves `backing` as a tracked device, as `how` says; returns its id. All or nothing:
    /// EALREADY if this backing (by any path) is served or being added, EBUSY if a block device
    /// backing is in use elsewhere; on any failure nothing stays claimed or served.
    pub fn add_origin_with(&self, backing: &Path, how: OriginStart) -> Result<DeviceId, Error> {
        let canonical = std::fs::canonicalize(backing)
            .map_or_else(|_| backing.display().to_string(), |p| p.display().to_string());
        // Claim the backing by what it is before opening it: a duplicate is EALREADY (not the
        // EBUSY of our own O_EXCL open), and the check and the claim are one step.
        let meta = std::fs::metadata(backing).map_err(|e| {
            let errno = e.raw_os_error().and_then(Errno::from_code).unwrap_or(Errno::EIO);
            Error::new(errno, "cannot stat the backing")
        })?;
        let key = BackingKey::of(&meta)?;
        let claim = self.claim(key)?;
        let (file, opened) = open_backing(backing)?;
        if opened != key {
            return Err(Error::new(Errno::EAGAIN, "the backing path changed while being added"));
        }
        self.serve_opened(file, key, claim, backing, canonical, how)
    }

    /// Serves the opened, claimed backing `file` (named `backing`, `canonical`) as `how` says.
    fn serve_opened(
        &self,
        file: std::fs::File,
        key: BackingKey,
        claim: Claim<'_>,
        backing: &Path,
        canonical: String,
        how: OriginStart,
    ) -> Result<DeviceId, Error> {
        if self.state().origins.len() >= self.config.max_devices {
            return Err(Error::new(
                Errno::ENOMEM,
                "too many devices (max_devices in blksnapd.toml)",
            ));
        }
        let backing_dev =
            Arc::new(BackingDev::new(file, self.config.backing_direct_io, &canonical)?);
        let dev: Dev = backing_dev.clone();
        let target = Arc::new(Target {
            engine: self.engine.clone(),
            origin: RwLock::new(None),
            backing: dev.clone(),
            direct_backing: Some(backing_dev),
            storages: Mutex::new(Vec::new()),
            image_of: None,
            failed: Default::default(),
        });
        let engine = self.engine.clone();
        let t = target.clone();
        let OriginStart { attach, cbt, recover, owner } = how;
        let started = Box::new(move |id: DeviceId| {
            engine.add_disk(id, dev, 1)?;
            let tracked = match &cbt {
                Some(state) => match engine.attach_with_cbt(id, state) {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        eprintln!(
                            "blksnapd: {id}: saved CBT refused by the engine ({e:?}): tracking \
                             starts a new generation"
                        );
                        engine.attach(id)
                    }
                },
                None if attach => engine.attach(id),
                None => Ok(()),
            };
            if let Err(e) = tracked {
                // The device will not be served: leave no engine disk behind.
                let _ = engine.remove_disk(id);
                return Err(e);
            }
            *t.origin.write().unwrap_or_else(|p| p.into_inner()) = Some(id);
            Ok(())
        });
        let name = format!("blksnap-{}", backing.display());
        let served = match recover {
            Some(handle) => self.frontend.recover(handle, &name, target.clone(), started)?,
            None => self.frontend.serve(&name, target.clone(), started)?,
        };
        let id = served.dev();
        let mut st = self.state();
        claim.keep();
        self.nbd.publish_origin(id, target.clone(), backing);
        st.origins.insert(
            id,
            Origin { served, target, backing_path: backing.to_path_buf(), canonical, key, owner },
        );
        self.save_map(&st);
        Ok(id)
    }

    /// Claims `key` for an add in progress: EALREADY if it is served or being added.
    fn claim(&self, key: BackingKey) -> Result<Claim<'_>, Error> {
        let mut st = self.state();
        if let BackingKey::Block(rdev) = key {
            let dev = DeviceId::new(libc::major(rdev), libc::minor(rdev));
            if st.origins.contains_key(&dev) || st.images.values().any(|i| i.served.dev() == dev) {
                return Err(Error::new(
                    Errno::EINVAL,
                    "the backing is a device this daemon serves",
                ));
            }
        }
        if !st.claims.insert(key) {
            return Err(Error::new(
                Errno::EALREADY,
                "this backing is already served (the same device or file, by any path)",
            ));
        }
        Ok(Claim { daemon: self, key: Some(key) })
    }

    /// Serves every configured device. With a state directory: after a clean stop, each
    /// tracker comes back with its saved CBT (same generation); after an unclean one, the
    /// previous run's origin devices are recovered (same block devices, filesystems stay
    /// mounted), its image devices deleted, and every tracker starts a new generation.
    pub fn add_configured(&self) -> Result<Vec<DeviceId>, String> {
        let (unclean, map) = match self.persist().as_ref() {
            Some(sd) => (sd.unclean(), sd.load_map()),
            None => (false, Vec::new()),
        };
        if !unclean && !map.is_empty() {
            eprintln!(
                "blksnapd: the previous run stopped cleanly and left its devices: taking them over"
            );
        }
        if unclean {
            eprintln!(
                "blksnapd: the previous run did not stop cleanly: every tracker starts a new \
                 CBT generation; recovering its devices"
            );
        }
        if !map.is_empty() {
            for e in &map {
                if e.role == MapRole::Image {
                    self.frontend.remove_stale(e.handle);
                }
            }
        }
        // What the configuration names must be the administrator's (see `trusted_backing`).
        let reals = self
            .config
            .devices
            .iter()
            .map(|d| crate::config::trusted_backing(&d.backing))
            .collect::<Result<Vec<_>, String>>()?;
        // Every device of the previous run that is not taken over is deleted before any new
        // device is served: a new device may get the number of a deleted one (ublk hands out
        // the lowest free id), and a deletion after it would delete the new device (found by
        // the daemon simulation, after a crash that left a stale device map).
        let plans: Vec<OriginStart> = self
            .config
            .devices
            .iter()
            .zip(&reals)
            .map(|(d, real)| self.start_plan(real, d.attach, &map))
            .collect();
        let recovered: Vec<u32> = plans.iter().filter_map(|how| how.recover).collect();
        for e in &map {
            if matches!(e.role, MapRole::Origin(_)) && !recovered.contains(&e.handle) {
                // A device of the previous run that is not configured any more (or could not
                // be recovered: `start_plan` deleted it already).
                self.frontend.remove_stale(e.handle);
            }
        }
        let mut ids = Vec::new();
        for ((d, how), real) in self.config.devices.iter().zip(plans).zip(&reals) {
            let id = self
                .add_origin_with(real, how)
                .map_err(|e| format!("{}: {e:?}", d.backing.display()))?;
            ids.push(id);
        }
        Ok(ids)
    }

    /// How the configured device `backing` comes up (see [`Daemon::add_configured`]); logs
    /// the decision.
    fn start_plan(&self, backing: &Path, attach: bool, map: &[MapEntry]) -> OriginStart {
        let mut how = OriginStart { attach, ..OriginStart::default() };
        let persist = self.persist();
        let Some(sd) = persist.as_ref() else { return how };
        let name = backing.display();
        let capacity = FileDev::open(backing, false).map(|f| f.len_bytes()).unwrap_or(0);
        let identity = match sd.identity(backing, capacity) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("blksnapd: {name}: {e}: CBT not restored");
                return how;
            }
        };
        // A device the previous run left (a clean stop keeps them unless
        // `remove_devices_on_stop`; a crash leaves them too).
        if !map.is_empty() {
            let handle = map.iter().find_map(|e| match &e.role {
                MapRole::Origin(b) if *b == identity.backing => Some(e.handle),
                _ => None,
            });
            match handle {
                Some(h) if self.frontend.recoverable(h, capacity) => {
                    eprintln!("blksnapd: {name}: recovering its device {h} of the previous run");
                    how.recover = Some(h);
                }
                Some(h) => {
                    eprintln!("blksnapd: {name}: device {h} of the previous run cannot be recovered: a new device");
                    self.frontend.remove_stale(h);
                }
                None => {}
            }
        }
        match sd.take_cbt(&identity) {
            Ok(Some(saved)) => {
                eprintln!(
                    "blksnapd: {name}: CBT restored (generation {}, changes number {})",
                    blksnap_model::Uuid(saved.generation),
                    saved.previous
                );
                how.cbt = Some(saved.cbt());
            }
            Ok(None) if attach => {
                eprintln!("blksnapd: {name}: no saved CBT: tracking starts a new generation");
            }
            Ok(None) => {}
            Err(why) if attach => {
                eprintln!("blksnapd: {name}: saved CBT not used ({why}): tracking starts a new generation");
            }
            Err(why) => eprintln!("blksnapd: {name}: saved CBT not used ({why})"),
        }
        how
    }

    /// Served devices.
    pub fn list(&self) -> Vec<DeviceEntry> {
        let st = self.state();
        let mut out = Vec::new();
        for (id, o) in &st.origins {
            out.push(DeviceEntry {
                dev: (*id).into(),
                role: Role::Origin,
                path: o.served.path(),
                backing: o.backing_path.display().to_string(),
                capacity_bytes: o.target.capacity_bytes(),
            });
        }
        for (of, i) in &st.images {
            out.push(DeviceEntry {
                dev: i.served.dev().into(),
                role: Role::Image { of: (*of).into() },
                path: i.served.path(),
                backing: String::new(),
                capacity_bytes: self.engine.disk_capacity_bytes(*of).unwrap_or(0),
            });
        }
        out
    }

    /// Carries out one request of the current protocol version.
    pub fn handle(&self, req: Request) -> Result<Reply, WireError> {
        self.handle_for(req, &|| false)
    }

    /// As [`Daemon::handle`], for a client that `gone` says has hung up: a WaitEvent stops
    /// waiting (within [`WAIT_SLICE_MS`]) once it has, so it takes no event nobody will read.
    pub fn handle_for(&self, req: Request, gone: &dyn Fn() -> bool) -> Result<Reply, WireError> {
        self.handle_from(req, Vec::new(), &Principal::root(), gone)
    }

    /// An event a WaitEvent took for a client that then could not be given it (hung up): kept
    /// for the next waiter of the snapshot, before anything still queued.
    pub fn requeue_event(&self, id: SnapshotId, event: EventW) {
        // The check and the insertion under one lock: a destroy forgets the kept events (under
        // this lock) after the engine destroyed the snapshot, so either it removes this one or
        // this check sees the snapshot gone.
        let mut kept = self.undelivered.lock().unwrap_or_else(|p| p.into_inner());
        if !self.engine.snapshot_collect().contains(&id) {
            return; // destroyed meanwhile: its events went with it
        }
        let q = kept.entry(id).or_default();
        if q.len() < EVENT_QUEUE_CAPACITY {
            q.push_front(event);
        }
    }

    /// WaitEvent: the events kept for this snapshot first, then the engine's queue, in slices
    /// so that a hung-up client is noticed and kept events reach a waiter already waiting.
    fn wait_event(
        &self,
        id: SnapshotId,
        timeout_ms: u32,
        gone: &dyn Fn() -> bool,
    ) -> Result<Reply, Error> {
        // The deadline follows the engine's clock: real time in production; in tests, fuzzing
        // and the simulation a manual clock that jumps to a waiter's deadline, so there a wait
        // is one engine call (nothing really waits, so there is no hang-up to notice between
        // slices) instead of up to 2^32 / 100 slices that spin (a libFuzzer timeout found it).
        let real_time = matches!(self.engine.clock(), blksnap_engine::Clock::Monotonic(_));
        let deadline_ns = self.engine.now_ns().saturating_add(u64::from(timeout_ms) * 1_000_000);
        loop {
            let kept = {
                let mut kept = self.undelivered.lock().unwrap_or_else(|p| p.into_inner());
                let ev = kept.get_mut(&id).and_then(|q| q.pop_front());
                kept.retain(|_, q| !q.is_empty());
                ev
            };
            if let Some(ev) = kept {
                return Ok(Reply::Event(ev));
            }
            let left_ns = deadline_ns.saturating_sub(self.engine.now_ns());
            let left_ms = u32::try_from(left_ns.div_ceil(1_000_000)).unwrap_or(u32::MAX);
            let slice = if real_time { left_ms.min(WAIT_SLICE_MS) } else { left_ms };
            match self.engine.wait_event(id, slice) {
                Ok(ev) => return Ok(Reply::Event(ev.into())),
                Err(e) if e.errno == Errno::ENOENT && left_ms > slice && !gone() => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn forget_events(&self, id: SnapshotId) {
        self.undelivered.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }

    /// `owner`: the uid the request's new snapshot belongs to.
    pub(super) fn dispatch(
        &self,
        req: Request,
        gone: &dyn Fn() -> bool,
        owner: u32,
    ) -> Result<Reply, Error> {
        let e = &self.engine;
        Ok(match req {
            Request::WaitEvent { id, timeout_ms } => {
                self.wait_event(id.into(), timeout_ms, gone)?
            }
            Request::Version => Reply::Version {
                protocol: PROTOCOL_VERSION,
                daemon: format!("blksnapd {}", env!("CARGO_PKG_VERSION")),
            },
            Request::ListDevices => Reply::Devices(self.list()),
            req @ (Request::Attach { .. }
            | Request::Detach { .. }
            | Request::CbtInfo { .. }
            | Request::CbtMap { .. }
            | Request::CbtDirty { .. }
            | Request::SnapshotCollect
            | Request::StorageStats { .. }) => engine_reply(e, req)?,
            Request::SnapshotCreate { storage } => {
                let (spec, backends) = match storage {
                    Storage::Ranges => (StorageSpec::Ranges, Vec::new()),
                    Storage::File { path, limit_sectors } => {
                        let backend: Dev =
                            Arc::new(open_storage(&path, self.config.storage_direct_io)?);
                        (
                            StorageSpec::File { backend: backend.clone(), limit_sectors },
                            vec![backend],
                        )
                    }
                };
                let mut st = self.state();
                if st.snapshots.len() >= self.config.max_snapshots {
                    return Err(Error::new(
                        Errno::ENOMEM,
                        "too many snapshots (max_snapshots in blksnapd.toml)",
                    ));
                }
                let id = e.snapshot_create(spec)?;
                st.snapshots.insert(id, SnapRec { members: Vec::new(), storages: backends, owner });
                Reply::Created(id.into())
            }
            Request::SnapshotAppend { id, path, ranges } => {
                let mut st = self.state();
                // Handles nobody else holds any more are closed here.
                st.storage_files.retain(|_, d| Arc::strong_count(d) > 1);
                let key = std::fs::metadata(&path).ok().filter(|m| !m.is_dir()).map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    (m.dev(), m.ino())
                });
                let backend: Dev = match key.and_then(|k| st.storage_files.get(&k).cloned()) {
                    Some(open) => open,
                    None => {
                        let opened: Dev =
                            Arc::new(open_storage(&path, self.config.storage_direct_io)?);
                        if let Some(k) = key {
                            st.storage_files.insert(k, opened.clone());
                        }
                        opened
                    }
                };
                let r: Vec<SectorRange> = ranges.into_iter().map(Into::into).collect();
                self.append_storage(&mut st, id.into(), backend, &r)?;
                Reply::Done
            }
            Request::SnapshotCreateFd { .. }
            | Request::SnapshotAppendFd { .. }
            | Request::AddDeviceFd { .. } => {
                return Err(Error::new(Errno::EINVAL, "this request needs a descriptor"));
            }
            Request::SnapshotAdd { id, dev } => {
                let mut st = self.state();
                e.snapshot_add(id.into(), dev.into())?;
                if let Some(rec) = st.snapshots.get_mut(&id.into()) {
                    rec.members.push(dev.into());
                    let storages = rec.storages.clone();
                    set_storages(&st, &[dev.into()], &storages);
                }
                Reply::Done
            }
            Request::SnapshotTake { id } => {
                self.take(id.into())?;
                Reply::Done
            }
            Request::SnapshotDestroy { id } => {
                self.destroy(id.into())?;
                Reply::Done
            }
            Request::SnapshotInfo { dev } => {
                let info = e.snapshot_info(dev.into())?;
                let image_path = info.image.and_then(|o| {
                    let st = self.state();
                    let img = st.images.get(&o)?;
                    Some(
                        img.links
                            .first()
                            .map_or_else(|| img.served.path(), |l| l.display().to_string()),
                    )
                });
                Reply::SnapshotInfo {
                    error_code: info.error_code,
                    image: info.image.map(Into::into),
                    image_path,
                }
            }
            Request::AddDevice { backing, attach } => {
                let id = self.add_origin(Path::new(&backing), attach)?;
                let entry = self.list().into_iter().find(|d| d.dev == id.into());
                Reply::Device(entry.ok_or(Error::new(Errno::ENODEV, "device gone"))?)
            }
            Request::RemoveDevice { dev } => {
                self.remove_origin(dev.into())?;
                Reply::Done
            }
            req @ (Request::DevRead { .. }
            | Request::DevWrite { .. }
            | Request::DevDiscard { .. }
            | Request::DevWriteZeroes { .. }
            | Request::DevFlush { .. }) => self.data(req)?,
        })
    }

    /// Appends ranges of `backend` to the snapshot `id` (engine first) and lets its devices
    /// flush the new storage.
    fn append_storage(
        &self,
        st: &mut State,
        id: SnapshotId,
        backend: Dev,
        ranges: &[SectorRange],
    ) -> Result<(), Error> {
        self.engine.snapshot_append_storage(id, backend.clone(), ranges)?;
        if let Some(rec) = st.snapshots.get_mut(&id) {
            rec.storages.push(backend);
            let members = rec.members.clone();
            let storages = rec.storages.clone();
            set_storages(st, &members, &storages);
        }
        Ok(())
    }

    /// Stops serving the origin `dev`: ENODEV if not served; EBUSY — checked before anything
    /// is changed — while it is in a snapshot, or while its block device is mounted or held
    /// exclusively (a filesystem, device-mapper, an `O_EXCL` opener; plain opens cannot be seen
    /// and are not refused). Its tracker is dropped (no CBT is saved for it), its block device
    /// stopped before the engine disk is removed (no I/O can meet a missing disk), and its
    /// backing released.
    pub fn remove_origin(&self, dev: DeviceId) -> Result<(), Error> {
        let mut st = self.state();
        let Some(o) = st.origins.get(&dev) else {
            return Err(Error::new(Errno::ENODEV, "not a served origin"));
        };
        if st.snapshots.values().any(|r| r.members.contains(&dev)) {
            return Err(Error::new(Errno::EBUSY, "the device is in a snapshot"));
        }
        // Held until the device is gone, so nothing can mount it in between.
        let _probe = exclusive_probe(&o.served.path())?;
        let o = st.origins.remove(&dev).expect("checked");
        self.nbd.withdraw(&crate::nbd::Exports::origin_name(dev));
        // Under the lock (a request naming `dev` must not reach the engine in between); the
        // device is unmounted and unclaimed, so stopping it is quick.
        o.served.stop();
        if let Err(e) = self.engine.remove_disk(dev) {
            eprintln!("blksnapd: {dev}: removing the engine disk: {e:?}");
        }
        st.claims.remove(&o.key);
        self.save_map(&st);
        Ok(())
    }

    fn take(&self, id: SnapshotId) -> Result<(), Error> {
        let members = self.state().snapshots.get(&id).map(|r| r.members.clone());
        let members = members.unwrap_or_default();
        // As the kernel module: freeze what is mounted on the origins, switch, thaw — before
        // the image devices start (that can take a while and needs no frozen filesystem).
        // `frozen` thaws when dropped, so an engine error or a panic thaws too. The freeze
        // (up to `freeze_timeout_secs`) runs without the daemon's lock: other requests go on.
        let frozen = if self.config.freeze {
            let mounts = freeze::mounts_of(&members);
            let timeout = Duration::from_secs(u64::from(self.config.freeze_timeout_secs));
            freeze::freeze_all(&mounts, timeout)?
        } else {
            freeze::Frozen::default()
        };
        let st = self.state();
        // The members as they are now (a SnapshotAdd racing with the take may have added one,
        // which then is taken unfrozen, as if added just before the take).
        let members = st.snapshots.get(&id).map(|r| r.members.clone()).unwrap_or_default();
        let taken = self.engine.snapshot_take(id);
        let held = frozen.count();
        drop(frozen);
        taken?;
        if held > 0 {
            eprintln!("blksnapd: snapshot {id}: taken with {held} filesystem(s) frozen");
        }
        // One image device per member, started without the daemon's lock (up to 60 s each);
        // if one cannot be served, the take is rolled back: the images started so far are
        // removed and the snapshot destroyed (the engine cannot un-take), so no half-taken
        // snapshot remains. The kernel likewise releases the trackers' snapshot state when an
        // image cannot be created. A destroy while the images start wins: they are removed.
        let targets: Vec<(DeviceId, Arc<Target>)> = members
            .iter()
            .filter_map(|origin| {
                let o = st.origins.get(origin)?;
                let storages = o.target.storages.lock().map(|s| s.clone()).unwrap_or_default();
                Some((
                    *origin,
                    Arc::new(Target {
                        engine: self.engine.clone(),
                        origin: RwLock::new(Some(*origin)),
                        backing: o.target.backing.clone(),
                        direct_backing: None,
                        storages: Mutex::new(storages),
                        image_of: Some(*origin),
                        failed: Default::default(),
                    }),
                ))
            })
            .collect();
        drop(st);
        let mut started = Vec::new();
        let mut failed = None;
        for (origin, target) in targets {
            let name = format!("blksnap-image-{}-{}", origin.major, origin.minor);
            match self.frontend.serve(&name, target.clone(), Box::new(|_| Ok(()))) {
                Ok(served) => started.push((origin, served, target)),
                Err(err) => {
                    eprintln!("blksnapd: image of {origin}: cannot start its device: {err:?}");
                    failed = Some(err);
                    break;
                }
            }
        }
        let mut st = self.state();
        let alive = st.snapshots.contains_key(&id);
        if failed.is_none() && alive {
            for (origin, served, target) in started {
                if let Some(o) = st.origins.get(&origin) {
                    self.nbd.publish_image(origin, target.clone(), &o.backing_path);
                }
                let links = self.make_links(origin, &served.path());
                st.images.insert(origin, Image { served, links, target });
            }
            // Storage appended while the images started: their flush lists follow.
            if let Some(rec) = st.snapshots.get(&id) {
                set_storages(&st, &rec.members, &rec.storages);
            }
            self.save_map(&st);
            return Ok(());
        }
        // A destroy that reached the snapshot first wins, whatever else failed: the take fails
        // with ESRCH as if the destroy had come before it (the outcome of one sequential order;
        // reporting the image's error here was not, found by tests/shuttle_daemon.rs).
        let err = match failed {
            Some(e) if alive => e,
            _ => Error::new(Errno::ESRCH, "the snapshot was destroyed during the take"),
        };
        if alive {
            // Engine first, as in destroy: image I/O fails from here on.
            if let Err(e) = self.engine.snapshot_destroy(id) {
                eprintln!("blksnapd: snapshot {id}: rollback of the take: destroy: {e:?}");
            }
            st.snapshots.remove(&id);
            self.forget_events(id);
            set_storages(&st, &members, &[]);
            self.save_map(&st);
        }
        drop(st);
        for (_, served, _) in started {
            served.stop();
        }
        eprintln!("blksnapd: snapshot {id}: take rolled back (snapshot destroyed): {err:?}");
        Err(err)
    }

    fn make_links(&self, origin: DeviceId, target: &str) -> Vec<PathBuf> {
        let mut links = Vec::new();
        if target.starts_with("/dev/null-") {
            return links;
        }
        for style in &self.config.image_links {
            let link = self.config.link_dir.join(style.name(origin));
            let _ = std::fs::remove_file(&link);
            match std::os::unix::fs::symlink(target, &link) {
                Ok(()) => links.push(link),
                Err(e) => eprintln!("blksnapd: link {}: {e}", link.display()),
            }
        }
        links
    }

    fn destroy(&self, id: SnapshotId) -> Result<(), Error> {
        let mut st = self.state();
        // The engine first: from here on image I/O fails (ENODEV → EIO to the block layer),
        // so removing a mounted image's device below cannot wait on our own I/O.
        self.engine.snapshot_destroy(id)?;
        self.forget_events(id);
        let rec = st.snapshots.remove(&id).unwrap_or_default();
        for m in &rec.members {
            // Connections to the image get ESHUTDOWN on their next request, then are closed.
            self.nbd.withdraw(&crate::nbd::Exports::image_name(*m));
        }
        set_storages(&st, &rec.members, &[]);
        let mut images = Vec::new();
        for m in &rec.members {
            if let Some(img) = st.images.remove(m) {
                images.push(img);
            }
        }
        self.save_map(&st);
        drop(st);
        for img in images {
            for l in &img.links {
                let _ = std::fs::remove_file(l);
            }
            img.served.stop();
        }
        Ok(())
    }

    /// Clean stop: destroys every snapshot (the engine first, so image I/O fails with EIO from
    /// then on; then the image devices are removed — snapshots never survive a stop), then
    /// leaves each origin device to the next daemon (the default; see below) — or stops it,
    /// with `remove_devices_on_stop`, without a state directory (nothing would tell the next
    /// daemon which device is which), or when the front end cannot recover devices. With a
    /// state directory, each origin's tracker is saved once no write can reach its backing any
    /// more and the backing is flushed; the marker goes last.
    ///
    /// Keeping a device: the data path's lock ([`Target::origin`]) is taken for writing and
    /// never released — requests in flight finish first (they hold it for reading), later ones
    /// wait in their queue thread — so the saved CBT has every write that reached the backing.
    /// The device is not stopped ([`Served::keep`]): when the process exits the kernel
    /// quiesces it (ublk user recovery), keeps `/dev/ublkbN` and what is mounted on it, and
    /// reissues the waiting and new requests to the next daemon, which takes the device over
    /// with the saved CBT (same generation; the device map in the state directory says which
    /// device was which) — the recovery path of a crash, with the map carried over. The caller
    /// must exit the process right after.
    pub fn shutdown(&self) {
        for id in self.engine.snapshot_collect() {
            if let Err(e) = self.destroy(id) {
                eprintln!("blksnapd: destroy {id} at shutdown: {e:?}");
            }
        }
        let origins = {
            let mut st = self.state();
            st.claims.clear();
            std::mem::take(&mut st.origins)
        };
        for id in origins.keys() {
            self.nbd.withdraw(&crate::nbd::Exports::origin_name(*id));
        }
        let persist = self.persist().take();
        let keep = self.config.keeps_devices() && persist.is_some();
        let mut kept = 0;
        for (id, o) in origins {
            if keep && o.served.handle().is_some() {
                let gate = o.target.origin.write().unwrap_or_else(|p| p.into_inner());
                std::mem::forget(gate);
                if let Some(sd) = persist.as_ref() {
                    save_tracker(&self.engine, sd, id, &o.target, &o.backing_path);
                }
                eprintln!(
                    "blksnapd: {}: {} left for the next daemon",
                    o.backing_path.display(),
                    o.served.path()
                );
                // Not stopped: left for the next daemon.
                o.served.keep();
                kept += 1;
            } else {
                let Origin { served, target, backing_path, .. } = o;
                served.stop();
                if let Some(sd) = persist.as_ref() {
                    save_tracker(&self.engine, sd, id, &target, &backing_path);
                }
            }
        }
        if let Some(sd) = persist {
            let closed = if kept > 0 { sd.close_keeping_devices() } else { sd.close_clean() };
            if let Err(e) = closed {
                eprintln!("blksnapd: state directory: {e}");
            }
        }
    }
}

/// Saves the tracker of `id` (if it has one) after flushing its backing; logs the outcome.
fn save_tracker(engine: &Engine, sd: &StateDir, id: DeviceId, target: &Target, backing: &Path) {
    let Ok(cbt) = engine.cbt_export(id) else { return }; // no tracker
    let saved = target
        .backing
        .flush()
        .map_err(|e| format!("flush: {e:?}"))
        .and_then(|()| sd.identity(backing, target.capacity_bytes()).map_err(|e| e.to_string()))
        .and_then(|identity| sd.save_cbt(&SavedCbt::new(identity, cbt)));
    match saved {
        Ok(path) => eprintln!("blksnapd: {}: CBT saved to {}", backing.display(), path.display()),
        Err(e) => eprintln!(
            "blksnapd: {}: CBT not saved ({e}): the next start begins a new generation",
            backing.display()
        ),
    }
}

/// Sets the storage list flushed on flush/FUA by the members' origin and image devices (storage
/// appended after the take must be flushed by the images' flushes too).
fn set_storages(st: &State, members: &[DeviceId], storages: &[Dev]) {
    for m in members {
        let targets = [st.origins.get(m).map(|o| &o.target), st.images.get(m).map(|i| &i.target)];
        for t in targets.into_iter().flatten() {
            if let Ok(mut s) = t.storages.lock() {
                *s = storages.to_vec();
            }
        }
    }
}

/// The requests only the engine answers (no daemon bookkeeping), shared by the daemon and the
/// command line's in-process backend so both answer them the same way.
pub fn engine_reply(e: &Engine, req: Request) -> Result<Reply, Error> {
    Ok(match req {
        Request::Attach { dev } => {
            e.attach(dev.into())?;
            Reply::Done
        }
        Request::Detach { dev } => {
            e.detach(dev.into())?;
            Reply::Done
        }
        Request::CbtInfo { dev } => Reply::CbtInfo(CbtInfoW::from(e.cbt_info(dev.into())?)),
        Request::CbtMap { dev, offset, length } => {
            let mut out = Vec::new();
            e.cbt_map(dev.into(), offset, length, &mut out)?;
            Reply::CbtMap(out)
        }
        Request::CbtDirty { dev, ranges } => {
            let r: Vec<SectorRange> = ranges.into_iter().map(Into::into).collect();
            e.cbt_dirty(dev.into(), &r)?;
            Reply::Done
        }
        Request::SnapshotCollect => {
            Reply::Snapshots(e.snapshot_collect().into_iter().map(Into::into).collect())
        }
        Request::WaitEvent { id, timeout_ms } => {
            Reply::Event(e.wait_event(id.into(), timeout_ms)?.into())
        }
        Request::StorageStats { id } => Reply::Stats(e.storage_stats(id.into())?.into()),
        _ => return Err(Error::new(Errno::EINVAL, "not an engine-only request")),
    })
}
