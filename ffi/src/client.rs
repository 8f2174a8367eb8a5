//! Client mode: a handle whose "module" is a running `blksnapd`, reached over its control
//! socket with `blksnap-proto`, instead of an in-process engine.
//!
//! Chosen by `socket=PATH` in the configuration string, or else by a non-empty environment
//! variable `BLKSNAP_SOCKET` ([`SOCKET_ENV`]). Every control and filter request goes through the
//! same dispatch as in-process mode (same argument checks, copy-fault errnos, struct outputs and
//! quirk decisions); only the engine calls underneath become requests ([`Backend`]), so the return
//! codes are the daemon engine's. Data I/O (`blksnap_dev_*`, `blksnap_image_*`) goes through the
//! real block devices the daemon serves (`/dev/ublkbN` of the origin and of its image), opened
//! `O_DIRECT` with aligned bounce buffers, when this host has them; a daemon that serves no block
//! devices (`blksnapd --frontend none`, hosts without the ublk driver) gets protocol v3 data
//! requests over the socket instead, 1 MiB each. CBT marking and copy-on-write happen in the
//! daemon either way.
//!
//! Devices: with no device entries in the configuration, the handle sees the daemon's origins
//! as they are (path `/dev/ublkbN`, number its `MAJ:MIN`); a device looked up and not found makes
//! it re-read the daemon's list once ([`Remote::refresh`]), so devices served after the handle
//! opened are found. A `/dev/PATH=BACKING[@MAJ:MIN]` entry
//! names the daemon's origin in front of `BACKING` (asking the daemon to serve it, not attached,
//! if it does not yet — and to stop serving it when the last handle closes, unless it is tracked
//! by then: a tracker outlives the process that attached it); the client sees it
//! under `/dev/PATH` with the entry's number, which is translated both ways (requests, the
//! snapshotinfo image name, the corrupted event's device), so an unchanged client written for
//! in-process mode runs against the daemon.
//!
//! Failure paths: socket missing at open → `-ENOENT`, refused or other connect errors → `-EIO`,
//! permission → `-EPERM`; the daemon gone or the connection broken mid-request → `-EIO` for that
//! request (the connection is dropped; the next request connects again). `storage:`
//! translations apply before paths are sent; relative paths are made absolute; `param.*` and
//! `seed` have no effect (the daemon's engine has its own).

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError, RwLock};

use blksnap_engine::io::Dev as Backing;
use blksnap_engine::{Engine, StorageSpec};
use blksnap_model::{
    CbtInfo, DeviceId, Errno, Error, Event, SectorRange, SnapshotId, SnapshotInfo, StorageStats,
};
use blksnap_proto::client::Client;
use blksnap_proto::{Dev, Range, Reply, Request, Role, Storage, WireError};

use crate::instance::Device;
use crate::user::R;

/// Environment variable naming the daemon's socket (client mode when set and non-empty).
pub const SOCKET_ENV: &str = "BLKSNAP_SOCKET";

/// The socket named by the environment, if any.
pub fn socket_from_env() -> Option<PathBuf> {
    std::env::var_os(SOCKET_ENV).filter(|v| !v.is_empty()).map(PathBuf::from)
}

type Res<T> = Result<T, Error>;

fn transport() -> Error {
    Error::new(Errno::EIO, "connection to blksnapd failed")
}

fn wire(e: WireError) -> Error {
    Error::new(e.errno().unwrap_or(Errno::EIO), "blksnapd refused the request")
}

fn unexpected() -> Error {
    Error::new(Errno::EIO, "unexpected answer from blksnapd")
}

fn io_err(e: &std::io::Error) -> Error {
    let errno = e.raw_os_error().and_then(Errno::from_code).unwrap_or(Errno::EIO);
    Error::new(errno, "I/O on the daemon's block device failed")
}

/// One device as the client sees it and as the daemon serves it.
#[derive(Debug, Clone)]
struct Mapped {
    /// The client's number.
    id: DeviceId,
    /// The daemon's number (the ublk device's).
    dev: Dev,
    /// The origin's block device node.
    node: String,
    /// Capacity in bytes.
    capacity: u64,
}

/// A served device as looked up: its node, capacity in bytes and the daemon's number for it.
type Found = (String, u64, Dev);

/// A connection pool to one daemon and the device mapping of one handle family.
pub struct Remote {
    socket: PathBuf,
    idle: Mutex<Vec<Client>>,
    /// The device mapping; re-read from the daemon by [`Remote::refresh`].
    devices: RwLock<Vec<Mapped>>,
    /// Origins this instance asked the daemon to serve (removed again on drop).
    added: Vec<Dev>,
    /// No devices were configured: the handle sees every origin the daemon serves, and a
    /// device the daemon starts serving later is found by re-reading its list.
    follows_daemon: bool,
    /// The last image looked up, by origin (daemon number): node, capacity, image number. Data
    /// requests use it; an existence check (an empty request) and a failed request look again.
    image: Mutex<Option<(Dev, Found)>>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("socket", &self.socket).finish_non_exhaustive()
    }
}

fn canonical(p: &Path) -> String {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string()
}

impl Remote {
    /// Connects to `socket` and maps `devices` (the configuration's entries; when empty, it
    /// is filled with the daemon's origins). Errors: see the module docs.
    pub fn open(socket: &Path, devices: &mut Vec<Device>) -> R<Remote> {
        let client = Client::connect(socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Errno::ENOENT,
            std::io::ErrorKind::PermissionDenied => Errno::EPERM,
            _ => Errno::EIO,
        })?;
        let mut remote = Remote {
            socket: socket.to_path_buf(),
            idle: Mutex::new(vec![client]),
            devices: RwLock::new(Vec::new()),
            added: Vec::new(),
            follows_daemon: devices.is_empty(),
            image: Mutex::new(None),
        };
        if remote.follows_daemon {
            *devices = remote.refresh().map_err(|e| e.errno)?.unwrap_or_default();
            return Ok(remote);
        }
        let origins = remote.origins().map_err(|e| e.errno)?;
        for d in devices.iter() {
            let backing = canonical(&d.backing);
            let entry = match origins.iter().find(|o| o.backing == backing) {
                Some(o) => o.clone(),
                None => {
                    let req = Request::AddDevice { backing: backing.clone(), attach: false };
                    match remote.call(req).map_err(|e| e.errno)? {
                        Reply::Device(entry) => {
                            remote.added.push(entry.dev);
                            entry
                        }
                        _ => return Err(Errno::EIO),
                    }
                }
            };
            remote.devices.get_mut().unwrap_or_else(PoisonError::into_inner).push(Mapped {
                id: d.id,
                dev: entry.dev,
                node: entry.path,
                capacity: entry.capacity_bytes,
            });
        }
        Ok(remote)
    }

    /// When the handle follows the daemon's origins: re-reads them, replaces the mapping and
    /// returns the devices as the instance lists them; `None` for a handle of configured devices.
    pub fn refresh(&self) -> Res<Option<Vec<Device>>> {
        if !self.follows_daemon {
            return Ok(None);
        }
        let origins = self.origins()?;
        let mapped = origins.iter().map(|o| Mapped {
            id: DeviceId::from(o.dev),
            dev: o.dev,
            node: o.path.clone(),
            capacity: o.capacity_bytes,
        });
        *self.devices.write().unwrap_or_else(PoisonError::into_inner) = mapped.collect();
        let listed = origins.into_iter().map(|o| Device {
            path: PathBuf::from(o.path),
            backing: PathBuf::from(o.backing),
            id: DeviceId::from(o.dev),
        });
        Ok(Some(listed.collect()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Client>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One request on an idle connection (or a new one); a broken connection is dropped. Idle
    /// connections the daemon has closed meanwhile (its idle timeout) are skipped before the
    /// request is sent, so no request is lost or sent twice.
    fn call(&self, request: Request) -> Res<Reply> {
        let idle = loop {
            match self.lock().pop() {
                Some(c) if c.is_closed() => continue,
                other => break other,
            }
        };
        let mut client = match idle {
            Some(c) => c,
            None => Client::connect(&self.socket).map_err(|_| transport())?,
        };
        match client.call(request) {
            Ok(result) => {
                self.lock().push(client);
                result.map_err(wire)
            }
            Err(_) => Err(transport()),
        }
    }

    fn done(&self, request: Request) -> Res<()> {
        match self.call(request)? {
            Reply::Done => Ok(()),
            _ => Err(unexpected()),
        }
    }

    fn origins(&self) -> Res<Vec<blksnap_proto::DeviceEntry>> {
        match self.call(Request::ListDevices)? {
            Reply::Devices(list) => {
                Ok(list.into_iter().filter(|d| d.role == Role::Origin).collect())
            }
            _ => Err(unexpected()),
        }
    }

    fn mapped(&self, id: DeviceId) -> Option<Mapped> {
        let devices = self.devices.read().unwrap_or_else(PoisonError::into_inner);
        devices.iter().find(|m| m.id == id).cloned()
    }

    /// Client number → daemon number (unmapped numbers pass as they are).
    fn to_daemon(&self, id: DeviceId) -> Dev {
        self.mapped(id).map_or_else(|| id.into(), |m| m.dev)
    }

    /// Daemon number → client number.
    fn to_client(&self, dev: Dev) -> DeviceId {
        let devices = self.devices.read().unwrap_or_else(PoisonError::into_inner);
        devices.iter().find(|m| m.dev == dev).map_or_else(|| dev.into(), |m| m.id)
    }

    /// The served device of the origin `id` or of its image: its node, capacity and the
    /// daemon's number for it.
    fn node(&self, id: DeviceId, image: bool) -> Res<Found> {
        let dev = self.to_daemon(id);
        if !image {
            if let Some(m) = self.mapped(id) {
                return Ok((m.node, m.capacity, m.dev));
            }
        }
        let Reply::Devices(list) = self.call(Request::ListDevices)? else {
            return Err(unexpected());
        };
        list.into_iter()
            .find(|d| match d.role {
                Role::Image { of } => image && of == dev,
                Role::Origin => !image && d.dev == dev,
            })
            .map(|d| (d.path, d.capacity_bytes, d.dev))
            .ok_or(Error::new(Errno::ENODEV, "no such device or image"))
    }

    /// Data I/O on the origin `id` or its image: on the daemon's block device when this host
    /// has it (ublk), else over the socket (protocol v3 data requests: a daemon with no block
    /// devices, `--frontend none`). Either way CBT and copy-on-write happen in the daemon.
    fn data_io(&self, id: DeviceId, image: bool, offset: u64, mut data: Io<'_>) -> Res<()> {
        if !image || data.len() == 0 {
            return self.data_io_on(self.node(id, image)?, offset, data);
        }
        // Image data: the image's node from the last lookup, if it is this origin's; looked up
        // again when the request fails (the image was destroyed, maybe taken again since).
        let origin = self.to_daemon(id);
        let cached = self.image.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if let Some((_, node)) = cached.filter(|(of, _)| *of == origin) {
            if self.data_io_on(node, offset, data.reborrow()).is_ok() {
                return Ok(());
            }
        }
        let node = self.node(id, true)?;
        *self.image.lock().unwrap_or_else(PoisonError::into_inner) = Some((origin, node.clone()));
        self.data_io_on(node, offset, data)
    }

    fn data_io_on(&self, found: Found, offset: u64, data: Io<'_>) -> Res<()> {
        let (node, capacity, dev) = found;
        let len = data.len() as u64;
        if !offset.is_multiple_of(512) || !len.is_multiple_of(512) {
            return Err(Error::new(Errno::EINVAL, "offset and length must be multiples of 512"));
        }
        if offset.checked_add(len).is_none_or(|end| end > capacity) {
            return Err(Error::new(Errno::EINVAL, "I/O past the end of the device"));
        }
        if len == 0 {
            return Ok(());
        }
        if is_local_block_device(&node, dev) {
            direct_io(&node, offset, data)
        } else {
            self.socket_io(dev, offset, data)
        }
    }

    /// Data over the socket, [`blksnap_proto::MAX_DATA_BYTES`] per request.
    fn socket_io(&self, dev: Dev, offset: u64, mut data: Io<'_>) -> Res<()> {
        let step = blksnap_proto::MAX_DATA_BYTES as usize;
        let mut done = 0usize;
        while done < data.len() {
            let n = (data.len() - done).min(step);
            let offset_bytes = offset + done as u64;
            match &mut data {
                Io::Read(buf) => {
                    let req = Request::DevRead { dev, offset_bytes, len_bytes: n as u32 };
                    match self.call(req)? {
                        Reply::Data(got) if got.0.len() == n => {
                            buf[done..done + n].copy_from_slice(&got.0);
                        }
                        _ => return Err(unexpected()),
                    }
                }
                Io::Write(buf) => {
                    let data = blksnap_proto::Bytes(buf[done..done + n].to_vec());
                    self.done(Request::DevWrite { dev, offset_bytes, data })?;
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Flushes the origin `id` (its snapshot's storage, then its backing) in the daemon.
    pub fn flush(&self, id: DeviceId) -> Res<()> {
        let (_, _, dev) = self.node(id, false)?;
        self.done(Request::DevFlush { dev })
    }
}

/// Whether `node` is, on this host, the block device `dev` (the daemon's ublk device), rather
/// than a name of a daemon that serves no block devices.
fn is_local_block_device(node: &str, dev: Dev) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    std::fs::metadata(node).is_ok_and(|m| {
        m.file_type().is_block_device()
            && (libc::major(m.rdev()), libc::minor(m.rdev())) == (dev.major, dev.minor)
    })
}

/// `pread`/`pwrite` on the block device `node`, `O_DIRECT`, through an aligned bounce buffer.
fn direct_io(node: &str, offset: u64, mut data: Io<'_>) -> Res<()> {
    let write = matches!(data, Io::Write(_));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(node)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::new(Errno::ENODEV, "the block device is gone")
            } else {
                io_err(&e)
            }
        })?;
    const STEP: usize = 1 << 20;
    const ALIGN: usize = 4096;
    let mut raw = vec![0u8; STEP.min(data.len()) + ALIGN];
    let start = raw.as_ptr().align_offset(ALIGN);
    let bounce = &mut raw[start..start + STEP.min(data.len())];
    let mut done = 0usize;
    while done < data.len() {
        let n = (data.len() - done).min(STEP);
        let at = offset + done as u64;
        match &mut data {
            Io::Read(buf) => {
                file.read_exact_at(&mut bounce[..n], at).map_err(|e| io_err(&e))?;
                buf[done..done + n].copy_from_slice(&bounce[..n]);
            }
            Io::Write(buf) => {
                bounce[..n].copy_from_slice(&buf[done..done + n]);
                file.write_all_at(&bounce[..n], at).map_err(|e| io_err(&e))?;
            }
        }
        done += n;
    }
    Ok(())
}

impl Drop for Remote {
    /// Origins this instance had the daemon serve stop being served — unless they are tracked
    /// now (attached, maybe in a snapshot): a tracker outlives the process that attached it, as
    /// the kernel's does, so the next process (the next step of a one-command-per-process tool)
    /// finds the device, its change map and its snapshot.
    fn drop(&mut self) {
        for dev in std::mem::take(&mut self.added) {
            if matches!(self.call(Request::CbtInfo { dev }), Err(e) if e.errno == Errno::ENOENT) {
                let _ = self.done(Request::RemoveDevice { dev });
            }
        }
    }
}

enum Io<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

impl Io<'_> {
    /// The same buffer, for one more attempt.
    fn reborrow(&mut self) -> Io<'_> {
        match self {
            Io::Read(b) => Io::Read(b),
            Io::Write(b) => Io::Write(b),
        }
    }

    fn len(&self) -> usize {
        match self {
            Io::Read(b) => b.len(),
            Io::Write(b) => b.len(),
        }
    }
}

fn ranges(r: &[SectorRange]) -> Vec<Range> {
    r.iter().map(|r| Range::from(*r)).collect()
}

/// What a handle's requests run on: the in-process engine, or a daemon. The methods mirror the
/// engine's that the dispatch calls, with the same signatures and errors.
#[allow(clippy::large_enum_variant)]
pub enum Backend {
    /// In-process mode.
    Local(Engine),
    /// Client mode.
    Remote(Remote),
}

impl Backend {
    /// The daemon connection, in client mode.
    pub fn remote(&self) -> Option<&Remote> {
        match self {
            Backend::Remote(r) => Some(r),
            Backend::Local(_) => None,
        }
    }

    /// SNAPSHOT_CREATE. Client mode: range storage only (file storages go by path:
    /// [`Backend::create_with_file`]).
    pub fn snapshot_create(&self, spec: StorageSpec) -> Res<SnapshotId> {
        match (self, spec) {
            (Backend::Local(e), spec) => e.snapshot_create(spec),
            (Backend::Remote(r), StorageSpec::Ranges) => {
                match r.call(Request::SnapshotCreate { storage: Storage::Ranges })? {
                    Reply::Created(id) => Ok(id.into()),
                    _ => Err(unexpected()),
                }
            }
            (Backend::Remote(_), _) => Err(Error::new(Errno::EINVAL, "storage must be a path")),
        }
    }

    /// Client mode: SNAPSHOT_CREATE on the file, block device or directory `path`, opened by
    /// the daemon.
    pub fn create_with_file(&self, path: &Path, limit_sectors: u64) -> Res<SnapshotId> {
        let Backend::Remote(r) = self else {
            return Err(Error::new(Errno::EINVAL, "in-process mode opens storages itself"));
        };
        let path =
            std::path::absolute(path).map_err(|_| Error::new(Errno::EINVAL, "bad storage path"))?;
        let storage = Storage::File { path: path.display().to_string(), limit_sectors };
        match r.call(Request::SnapshotCreate { storage })? {
            Reply::Created(id) => Ok(id.into()),
            _ => Err(unexpected()),
        }
    }

    /// Client mode: SNAPSHOT_APPEND_STORAGE of ranges of `path`, opened by the daemon.
    pub fn append_path(&self, id: SnapshotId, path: &Path, r: &[SectorRange]) -> Res<()> {
        let Backend::Remote(remote) = self else {
            return Err(Error::new(Errno::EINVAL, "in-process mode opens storages itself"));
        };
        let path =
            std::path::absolute(path).map_err(|_| Error::new(Errno::EINVAL, "bad storage path"))?;
        remote.done(Request::SnapshotAppend {
            id: id.into(),
            path: path.display().to_string(),
            ranges: ranges(r),
        })
    }

    /// SNAPSHOT_DESTROY.
    pub fn snapshot_destroy(&self, id: SnapshotId) -> Res<()> {
        match self {
            Backend::Local(e) => e.snapshot_destroy(id),
            Backend::Remote(r) => r.done(Request::SnapshotDestroy { id: id.into() }),
        }
    }

    /// SNAPSHOT_TAKE.
    pub fn snapshot_take(&self, id: SnapshotId) -> Res<()> {
        match self {
            Backend::Local(e) => e.snapshot_take(id),
            Backend::Remote(r) => r.done(Request::SnapshotTake { id: id.into() }),
        }
    }

    /// v3 APPEND_STORAGE with an opened backend (in-process mode).
    pub fn snapshot_append_storage(
        &self,
        id: SnapshotId,
        backend: Backing,
        r: &[SectorRange],
    ) -> Res<()> {
        match self {
            Backend::Local(e) => e.snapshot_append_storage(id, backend, r),
            Backend::Remote(_) => Err(Error::new(Errno::EINVAL, "storage must be a path")),
        }
    }

    /// SNAPSHOT_COLLECT.
    pub fn snapshot_collect(&self) -> Res<Vec<SnapshotId>> {
        match self {
            Backend::Local(e) => Ok(e.snapshot_collect()),
            Backend::Remote(r) => match r.call(Request::SnapshotCollect)? {
                Reply::Snapshots(ids) => Ok(ids.into_iter().map(Into::into).collect()),
                _ => Err(unexpected()),
            },
        }
    }

    /// SNAPSHOT_WAIT_EVENT (client mode: the corrupted event's device in the client's numbers).
    pub fn wait_event(&self, id: SnapshotId, timeout_ms: u32) -> Res<Event> {
        match self {
            Backend::Local(e) => e.wait_event(id, timeout_ms),
            Backend::Remote(r) => {
                match r.call(Request::WaitEvent { id: id.into(), timeout_ms })? {
                    Reply::Event(ev) => {
                        let mut ev = Event::try_from(ev)?;
                        if let blksnap_model::EventKind::Corrupted { device, .. } = &mut ev.kind {
                            *device = r.to_client((*device).into());
                        }
                        Ok(ev)
                    }
                    _ => Err(unexpected()),
                }
            }
        }
    }

    /// Storage accounting.
    pub fn storage_stats(&self, id: SnapshotId) -> Res<StorageStats> {
        match self {
            Backend::Local(e) => e.storage_stats(id),
            Backend::Remote(r) => match r.call(Request::StorageStats { id: id.into() })? {
                Reply::Stats(s) => Ok(StorageStats {
                    capacity_sectors: s.capacity_sectors,
                    filled_sectors: s.filled_sectors,
                    requested_sectors: s.requested_sectors,
                    overflow: s.overflow,
                    low_space: s.low_space,
                }),
                _ => Err(unexpected()),
            },
        }
    }

    /// BLKFILTER_ATTACH.
    pub fn attach(&self, dev: DeviceId) -> Res<()> {
        match self {
            Backend::Local(e) => e.attach(dev),
            Backend::Remote(r) => r.done(Request::Attach { dev: r.to_daemon(dev) }),
        }
    }

    /// BLKFILTER_DETACH.
    pub fn detach(&self, dev: DeviceId) -> Res<()> {
        match self {
            Backend::Local(e) => e.detach(dev),
            Backend::Remote(r) => r.done(Request::Detach { dev: r.to_daemon(dev) }),
        }
    }

    /// cbtinfo.
    pub fn cbt_info(&self, dev: DeviceId) -> Res<CbtInfo> {
        match self {
            Backend::Local(e) => e.cbt_info(dev),
            Backend::Remote(r) => match r.call(Request::CbtInfo { dev: r.to_daemon(dev) })? {
                Reply::CbtInfo(i) => Ok(i.into()),
                _ => Err(unexpected()),
            },
        }
    }

    /// cbtmap into `out`.
    pub fn cbt_map(&self, dev: DeviceId, offset: u32, length: u32, out: &mut Vec<u8>) -> Res<()> {
        match self {
            Backend::Local(e) => e.cbt_map(dev, offset, length, out),
            Backend::Remote(r) => {
                out.clear();
                // The reply must fit a frame: long maps come in pieces.
                let mut at = 0u32;
                loop {
                    let n = (length - at).min(blksnap_proto::MAX_CBTMAP_LEN);
                    let dev = r.to_daemon(dev);
                    match r.call(Request::CbtMap {
                        dev,
                        offset: offset.saturating_add(at),
                        length: n,
                    })? {
                        Reply::CbtMap(map) if map.len() == n as usize => out.extend(map),
                        _ => return Err(unexpected()),
                    }
                    at += n;
                    if at >= length {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// cbtdirty.
    pub fn cbt_dirty(&self, dev: DeviceId, r: &[SectorRange]) -> Res<()> {
        match self {
            Backend::Local(e) => e.cbt_dirty(dev, r),
            Backend::Remote(remote) => {
                remote.done(Request::CbtDirty { dev: remote.to_daemon(dev), ranges: ranges(r) })
            }
        }
    }

    /// snapshotadd.
    pub fn snapshot_add(&self, id: SnapshotId, dev: DeviceId) -> Res<()> {
        match self {
            Backend::Local(e) => e.snapshot_add(id, dev),
            Backend::Remote(r) => {
                r.done(Request::SnapshotAdd { id: id.into(), dev: r.to_daemon(dev) })
            }
        }
    }

    /// snapshotinfo (client mode: the image in the client's numbers).
    pub fn snapshot_info(&self, dev: DeviceId) -> Res<SnapshotInfo> {
        match self {
            Backend::Local(e) => e.snapshot_info(dev),
            Backend::Remote(r) => match r.call(Request::SnapshotInfo { dev: r.to_daemon(dev) })? {
                Reply::SnapshotInfo { error_code, image, .. } => {
                    Ok(SnapshotInfo { error_code, image: image.map(|d| r.to_client(d)) })
                }
                _ => Err(unexpected()),
            },
        }
    }

    /// Capacity of a device.
    pub fn disk_capacity_bytes(&self, dev: DeviceId) -> Res<u64> {
        match self {
            Backend::Local(e) => e.disk_capacity_bytes(dev),
            Backend::Remote(r) => r.node(dev, false).map(|(_, c, _)| c),
        }
    }

    /// Origin read.
    pub fn read(&self, dev: DeviceId, offset: u64, buf: &mut [u8]) -> Res<()> {
        match self {
            Backend::Local(e) => e.read(dev, offset, buf),
            Backend::Remote(r) => r.data_io(dev, false, offset, Io::Read(buf)),
        }
    }

    /// Origin write.
    pub fn write(&self, dev: DeviceId, offset: u64, data: &[u8]) -> Res<()> {
        match self {
            Backend::Local(e) => e.write(dev, offset, data),
            Backend::Remote(r) => r.data_io(dev, false, offset, Io::Write(data)),
        }
    }

    /// Image read (an empty buffer only checks that the image exists).
    pub fn image_read(&self, dev: DeviceId, offset: u64, buf: &mut [u8]) -> Res<()> {
        match self {
            Backend::Local(e) => e.image_read(dev, offset, buf),
            Backend::Remote(r) => r.data_io(dev, true, offset, Io::Read(buf)),
        }
    }

    /// Image write.
    pub fn image_write(&self, dev: DeviceId, offset: u64, data: &[u8]) -> Res<()> {
        match self {
            Backend::Local(e) => e.image_write(dev, offset, data),
            Backend::Remote(r) => r.data_io(dev, true, offset, Io::Write(data)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use blksnap_proto::{decode_request, read_frame, write_frame, ResponseFrame, PROTOCOL_VERSION};
    use std::os::unix::net::UnixListener;

    #[test]
    fn no_daemon_at_open() {
        let mut devices = Vec::new();
        let err = Remote::open(Path::new("/nonexistent/blksnap.sock"), &mut devices).unwrap_err();
        assert_eq!(err, Errno::ENOENT);
    }

    /// A fake daemon: answers `ListDevices` with nothing and every request after `answers`
    /// more with an error; then hangs up in the middle of the next request.
    fn fake_daemon(path: &Path, answers: usize) -> std::thread::JoinHandle<()> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            for i in 0..=answers {
                let Ok(Some(body)) = read_frame(&mut s) else { return };
                let req = decode_request(&body).unwrap().request;
                let result = match req {
                    Request::ListDevices if i == 0 => Ok(Reply::Devices(Vec::new())),
                    _ => Err(WireError::new(Errno::ESRCH, "no such snapshot")),
                };
                write_frame(&mut s, &ResponseFrame { version: PROTOCOL_VERSION, result }).unwrap();
            }
            let _ = read_frame(&mut s); // the request is read, never answered
            drop(listener); // and the daemon is gone: no reconnect either
        })
    }

    #[test]
    fn daemon_errors_and_the_socket_gone_mid_request() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("control");
        let daemon = fake_daemon(&sock, 1);
        let mut devices = Vec::new();
        let backend = Backend::Remote(Remote::open(&sock, &mut devices).unwrap());
        assert!(devices.is_empty());
        let id = blksnap_model::Uuid([1; 16]);
        // the daemon's errno comes through as it is
        assert_eq!(backend.snapshot_take(id).unwrap_err().errno, Errno::ESRCH);
        // the connection breaks mid-request: EIO, and EIO again when no daemon answers
        assert_eq!(backend.snapshot_take(id).unwrap_err().errno, Errno::EIO);
        daemon.join().unwrap();
        assert_eq!(backend.snapshot_collect().unwrap_err().errno, Errno::EIO);
        let mut buf = [0u8; 512];
        assert_eq!(
            backend.read(DeviceId::new(7, 0), 0, &mut buf).unwrap_err().errno,
            Errno::EIO,
            "no daemon to look the device up"
        );
    }
}
