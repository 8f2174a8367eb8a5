//! The daemon's core: owns the engine, the served devices and the snapshot bookkeeping, and
//! carries out control requests. The block-device side is a [`Frontend`]: ublk in production
//! (`crate::ublk`, feature `ublk`), or [`NullFrontend`] (no block devices, synthetic ids) for
//! tests of the control plane on hosts without the driver.
//!
//! Lock order: `state` → engine (the engine's own order below it). The data path never takes
//! `state`: each served device holds an [`Arc<Target>`] with what it needs (engine id, backing,
//! the storage backends to flush).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use blksnap_engine::io::{Dev, FileDev};

use blksnap_engine::{Engine, StorageSpec};
use blksnap_model::{DeviceId, Errno, Error, SectorRange, SnapshotId};
use blksnap_proto::{
    CbtInfoW, DeviceEntry, Reply, Request, Role, Storage, WireError, PROTOCOL_VERSION,
};

use crate::config::Config;

/// What one served device needs on its data path.
pub struct Target {
    /// The engine.
    pub engine: Arc<Engine>,
    /// The origin's engine id once known (the ublk device's MAJ:MIN is known only after it
    /// started; I/O before that — the kernel's partition scan — goes straight to the backing,
    /// which is what the engine does for a disk with no tracker).
    pub origin: RwLock<Option<DeviceId>>,
    /// The origin's backing.
    pub backing: Dev,
    /// The difference storage backends of the snapshot the origin is in (flushed on flush/FUA).
    pub storages: Mutex<Vec<Dev>>,
    /// `Some(origin)` for an image device.
    pub image_of: Option<DeviceId>,
}

impl Target {
    /// Flushes the difference storage, then (origins) the backing.
    pub fn flush(&self) -> Result<(), Error> {
        let storages: Vec<Dev> = self.storages.lock().map(|s| s.clone()).unwrap_or_default();
        for s in storages {
            s.flush()?;
        }
        if self.image_of.is_none() {
            self.backing.flush()?;
        }
        Ok(())
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.backing.len_bytes()
    }
}

/// A block device in front of a [`Target`].
pub trait Served: Send {
    /// The block device's MAJ:MIN.
    fn dev(&self) -> DeviceId;
    /// Its node, e.g. `/dev/ublkb0`.
    fn path(&self) -> String;
    /// Removes it (even while open or mounted: later I/O fails) and releases everything.
    fn stop(self: Box<Self>);
}

/// Makes block devices.
pub trait Frontend: Send + Sync {
    /// Starts serving `target`; `started` runs once the device's number is known, before any
    /// I/O reaches the engine under that number.
    fn serve(
        &self,
        name: &str,
        target: Arc<Target>,
        started: Box<dyn FnOnce(DeviceId) -> Result<(), Error> + Send>,
    ) -> Result<Box<dyn Served>, Error>;
}

/// A frontend with no block devices: origins get ids `240:N` (a local/experimental major);
/// images exist only in the engine. For control-plane tests.
#[derive(Default)]
pub struct NullFrontend {
    next: Mutex<u32>,
}

struct NullServed(DeviceId);

impl Served for NullServed {
    fn dev(&self) -> DeviceId {
        self.0
    }
    fn path(&self) -> String {
        format!("/dev/null-blksnap-{}-{}", self.0.major, self.0.minor)
    }
    fn stop(self: Box<Self>) {}
}

impl Frontend for NullFrontend {
    fn serve(
        &self,
        _name: &str,
        target: Arc<Target>,
        started: Box<dyn FnOnce(DeviceId) -> Result<(), Error> + Send>,
    ) -> Result<Box<dyn Served>, Error> {
        let dev = match target.image_of {
            Some(origin) => DeviceId::new(241, origin.minor),
            None => {
                let mut n = self.next.lock().expect("poisoned");
                *n += 1;
                DeviceId::new(240, *n - 1)
            }
        };
        started(dev)?;
        Ok(Box::new(NullServed(dev)))
    }
}

struct Origin {
    served: Box<dyn Served>,
    target: Arc<Target>,
    backing_path: PathBuf,
}

struct Image {
    served: Box<dyn Served>,
    links: Vec<PathBuf>,
}

#[derive(Default)]
struct SnapRec {
    members: Vec<DeviceId>,
    storages: Vec<Dev>,
}

#[derive(Default)]
struct State {
    origins: BTreeMap<DeviceId, Origin>,
    snapshots: HashMap<SnapshotId, SnapRec>,
    images: BTreeMap<DeviceId, Image>,
}

/// The daemon.
pub struct Daemon {
    engine: Arc<Engine>,
    frontend: Box<dyn Frontend>,
    config: Config,
    state: Mutex<State>,
}

impl Daemon {
    /// A daemon with no devices yet.
    pub fn new(engine: Arc<Engine>, frontend: Box<dyn Frontend>, config: Config) -> Daemon {
        Daemon { engine, frontend, config, state: Mutex::new(State::default()) }
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves `backing` as a tracked device (attached at once when `attach`); returns its id.
    pub fn add_origin(&self, backing: &Path, attach: bool) -> Result<DeviceId, Error> {
        let file = FileDev::open(backing, true)?;
        let dev: Dev = Arc::new(file);
        let target = Arc::new(Target {
            engine: self.engine.clone(),
            origin: RwLock::new(None),
            backing: dev.clone(),
            storages: Mutex::new(Vec::new()),
            image_of: None,
        });
        let engine = self.engine.clone();
        let t = target.clone();
        let started = Box::new(move |id: DeviceId| {
            engine.add_disk(id, dev, 1)?;
            if attach {
                engine.attach(id)?;
            }
            *t.origin.write().unwrap_or_else(|p| p.into_inner()) = Some(id);
            Ok(())
        });
        let name = format!("blksnap-{}", backing.display());
        let served = self.frontend.serve(&name, target.clone(), started)?;
        let id = served.dev();
        self.state()
            .origins
            .insert(id, Origin { served, target, backing_path: backing.to_path_buf() });
        Ok(id)
    }

    /// Serves every configured device.
    pub fn add_configured(&self) -> Result<Vec<DeviceId>, String> {
        let mut ids = Vec::new();
        for d in &self.config.devices {
            let id = self
                .add_origin(&d.backing, d.attach)
                .map_err(|e| format!("{}: {e:?}", d.backing.display()))?;
            ids.push(id);
        }
        Ok(ids)
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
        req.validate().map_err(|e| WireError::from_error(&e))?;
        self.dispatch(req).map_err(|e| WireError::from_error(&e))
    }

    fn dispatch(&self, req: Request) -> Result<Reply, Error> {
        let e = &self.engine;
        Ok(match req {
            Request::Version => Reply::Version {
                protocol: PROTOCOL_VERSION,
                daemon: format!("blksnapd {}", env!("CARGO_PKG_VERSION")),
            },
            Request::ListDevices => Reply::Devices(self.list()),
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
            Request::SnapshotCreate { storage } => {
                let (spec, backends) = match storage {
                    Storage::Ranges => (StorageSpec::Ranges, Vec::new()),
                    Storage::File { path, limit_sectors } => {
                        let backend: Dev = Arc::new(open_storage(&path)?);
                        (
                            StorageSpec::File { backend: backend.clone(), limit_sectors },
                            vec![backend],
                        )
                    }
                };
                let mut st = self.state();
                let id = e.snapshot_create(spec)?;
                st.snapshots.insert(id, SnapRec { members: Vec::new(), storages: backends });
                Reply::Created(id.into())
            }
            Request::SnapshotAppend { id, path, ranges } => {
                let backend: Dev = Arc::new(open_storage(&path)?);
                let r: Vec<SectorRange> = ranges.into_iter().map(Into::into).collect();
                let mut st = self.state();
                e.snapshot_append_storage(id.into(), backend.clone(), &r)?;
                if let Some(rec) = st.snapshots.get_mut(&id.into()) {
                    rec.storages.push(backend);
                    let members = rec.members.clone();
                    let storages = rec.storages.clone();
                    set_storages(&st, &members, &storages);
                }
                Reply::Done
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
            Request::SnapshotCollect => {
                Reply::Snapshots(e.snapshot_collect().into_iter().map(Into::into).collect())
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
            Request::WaitEvent { id, timeout_ms } => {
                Reply::Event(e.wait_event(id.into(), timeout_ms)?.into())
            }
            Request::StorageStats { id } => Reply::Stats(e.storage_stats(id.into())?.into()),
        })
    }

    fn take(&self, id: SnapshotId) -> Result<(), Error> {
        let mut st = self.state();
        self.engine.snapshot_take(id)?;
        let members = st.snapshots.get(&id).map(|r| r.members.clone()).unwrap_or_default();
        let mut first_err = None;
        for origin in members {
            let Some(o) = st.origins.get(&origin) else { continue };
            let target = Arc::new(Target {
                engine: self.engine.clone(),
                origin: RwLock::new(Some(origin)),
                backing: o.target.backing.clone(),
                storages: Mutex::new(
                    o.target.storages.lock().map(|s| s.clone()).unwrap_or_default(),
                ),
                image_of: Some(origin),
            });
            let name = format!("blksnap-image-{}-{}", origin.major, origin.minor);
            match self.frontend.serve(&name, target, Box::new(|_| Ok(()))) {
                Ok(served) => {
                    let links = self.make_links(origin, &served.path());
                    st.images.insert(origin, Image { served, links });
                }
                Err(err) => {
                    eprintln!("blksnapd: image of {origin}: cannot start its device: {err:?}");
                    first_err.get_or_insert(err);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
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
        let rec = st.snapshots.remove(&id).unwrap_or_default();
        set_storages(&st, &rec.members, &[]);
        let mut images = Vec::new();
        for m in &rec.members {
            if let Some(img) = st.images.remove(m) {
                images.push(img);
            }
        }
        drop(st);
        for img in images {
            for l in &img.links {
                let _ = std::fs::remove_file(l);
            }
            img.served.stop();
        }
        Ok(())
    }

    /// Clean stop: destroys every snapshot (removing images), then stops every origin device.
    pub fn shutdown(&self) {
        for id in self.engine.snapshot_collect() {
            if let Err(e) = self.destroy(id) {
                eprintln!("blksnapd: destroy {id} at shutdown: {e:?}");
            }
        }
        let origins = std::mem::take(&mut self.state().origins);
        for (_, o) in origins {
            o.served.stop();
        }
    }
}

fn set_storages(st: &State, members: &[DeviceId], storages: &[Dev]) {
    for m in members {
        if let Some(o) = st.origins.get(m) {
            if let Ok(mut s) = o.target.storages.lock() {
                *s = storages.to_vec();
            }
        }
    }
}

fn open_storage(path: &str) -> Result<FileDev, Error> {
    FileDev::open(path, true).map_err(|e| {
        if e.errno == Errno::ENOENT {
            Error::new(Errno::ENOENT, "storage path does not exist")
        } else {
            e
        }
    })
}
