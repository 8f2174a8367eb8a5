//! Who may ask the daemon for what, and what it does with the descriptors clients pass
//! (`docs/SECURITY.md` is the threat model).
//!
//! Principals ([`Principal`], from the connection's kernel credentials): root (uid 0) may do
//! everything, paths included (upstream compatibility for root-run tools: the daemon opens a
//! root client's paths as root would). Any other admitted client (a member of the socket's
//! group) never makes the daemon open a path: it passes descriptors it opened itself
//! (`SCM_RIGHTS`, the `*Fd` requests of protocol version 3), and it may change only what it
//! brought: devices it added and snapshots it created, and reads and writes data (v3 data
//! requests) only of its own devices and their images. Read-only queries are open to it.
//!
//! A received descriptor is checked before use ([`checked`]): open read-write (`O_RDWR`, not
//! `O_PATH`, not `O_APPEND` — positioned writes must land where the engine puts them), of the
//! expected type (`fstat`), and not one of the daemon's own devices or served backings (EBUSY).

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::sync::Arc;

use blksnap_engine::io::Dev;
use blksnap_engine::StorageSpec;
use blksnap_model::{DeviceId, Errno, Error, SectorRange};
use blksnap_proto::{Reply, Request, WireError};

use super::backing_io::BackingDev;
use super::{BackingKey, Daemon, OriginStart, SnapRec, State};

/// Who sent a request: the connection's credentials from `SO_PEERCRED` / `SO_PEERGROUPS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Principal {
    /// Root: what the daemon's own callers (its configuration, the simulation) act as.
    pub fn root() -> Principal {
        Principal { uid: 0, gid: 0, groups: Vec::new() }
    }

    /// Whether this is root.
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// What a received descriptor is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Use {
    /// A difference storage (regular file, block device; a directory from root).
    Storage,
    /// A backing to serve (regular file or block device).
    Backing,
}

const NOT_RDWR: Error = Error::new(
    Errno::EACCES,
    "the descriptor must be open read-write (O_RDWR, not O_PATH): the daemon writes through it",
);

/// A received descriptor, checked: its file and `fstat`.
fn checked(fd: OwnedFd, what: Use, root: bool) -> Result<(File, std::fs::Metadata), Error> {
    let flags = rustix::fs::fcntl_getfl(fd.as_fd())
        .map_err(|_| Error::new(Errno::EINVAL, "not a valid descriptor"))?;
    let file = File::from(fd);
    let meta =
        file.metadata().map_err(|_| Error::new(Errno::EINVAL, "cannot fstat the descriptor"))?;
    let kind = meta.file_type();
    if kind.is_dir() && what == Use::Storage {
        if !root {
            return Err(Error::new(
                Errno::EPERM,
                "a directory descriptor is for root only: create the storage file in it \
                 yourself (O_TMPFILE) and pass that file",
            ));
        }
        return Ok((file, meta));
    }
    if !(kind.is_file() || kind.is_block_device()) {
        return Err(Error::new(
            Errno::EINVAL,
            "the descriptor must be a regular file or a block device",
        ));
    }
    if flags.contains(rustix::fs::OFlags::PATH)
        || flags & rustix::fs::OFlags::RWMODE != rustix::fs::OFlags::RDWR
    {
        return Err(NOT_RDWR);
    }
    if flags.contains(rustix::fs::OFlags::APPEND) {
        return Err(Error::new(Errno::EINVAL, "the descriptor must not be O_APPEND"));
    }
    Ok((file, meta))
}

/// Space the filesystem of `file` still gives unprivileged users, in bytes.
fn unprivileged_free_bytes(file: &File) -> Result<u64, Error> {
    let st = rustix::fs::fstatfs(file)
        .map_err(|_| Error::new(Errno::EIO, "cannot statfs the storage"))?;
    Ok((st.f_bavail as u64).saturating_mul(st.f_bsize as u64))
}

fn over_limit(what: &'static str) -> Error {
    Error::new(Errno::ENOMEM, what)
}

impl Daemon {
    /// Carries out one request of `who` with the descriptors its frame carried (`trust`):
    /// the count must be the request's ([`Request::fds_expected`], else EINVAL), `who` must
    /// be allowed it (else EPERM); descriptors not kept are closed when this returns.
    pub fn handle_from(
        &self,
        req: Request,
        mut fds: Vec<std::os::fd::OwnedFd>,
        who: &Principal,
        gone: &dyn Fn() -> bool,
    ) -> Result<Reply, WireError> {
        let wire = |e: Error| WireError::from_error(&e);
        req.validate().map_err(wire)?;
        if fds.len() != req.fds_expected() {
            return Err(WireError::new(
                Errno::EINVAL,
                format!(
                    "this request takes {} descriptor(s), its frame carried {}",
                    req.fds_expected(),
                    fds.len()
                ),
            ));
        }
        self.authorize(who, &req).map_err(wire)?;
        match fds.pop() {
            Some(fd) => self.fd_request(req, fd, who).map_err(wire),
            None => self.dispatch(req, gone, who.uid).map_err(wire),
        }
    }

    /// Refuses what `who` may not ask (EPERM with the rule), before any work.
    pub(super) fn authorize(&self, who: &Principal, req: &Request) -> Result<(), Error> {
        if who.is_root() {
            return Ok(());
        }
        if req.names_path() {
            return Err(Error::new(
                Errno::EPERM,
                "a non-root client must pass a descriptor it opened itself (SCM_RIGHTS, \
                 protocol v3): the daemon opens no path on its behalf (libblksnap, the shim \
                 and the blksnap CLI do this)",
            ));
        }
        let st = self.state();
        let own_dev = |dev: DeviceId| -> Result<(), Error> {
            match st.origins.get(&dev) {
                Some(o) if o.owner == who.uid => Ok(()),
                _ => Err(Error::new(
                    Errno::EPERM,
                    "only root or the user who added this device may change it",
                )),
            }
        };
        let own_snap = |id: blksnap_model::SnapshotId| -> Result<(), Error> {
            match st.snapshots.get(&id) {
                Some(r) if r.owner == who.uid => Ok(()),
                Some(_) => Err(Error::new(
                    Errno::EPERM,
                    "only root or the user who created this snapshot may use it",
                )),
                None => Ok(()), // unknown: the engine answers ESRCH/ENODEV as usual
            }
        };
        // Data of a served device (protocol v3 data requests): only its own origins and their
        // images — reading or writing root's devices through the daemon is what the kernel
        // would refuse a user who cannot open them.
        let own_data = |dev: DeviceId| -> Result<(), Error> {
            let origin = if st.origins.contains_key(&dev) {
                Some(dev)
            } else {
                st.images.iter().find(|(_, i)| i.served.dev() == dev).map(|(o, _)| *o)
            };
            match origin.and_then(|o| st.origins.get(&o)) {
                Some(o) if o.owner == who.uid => Ok(()),
                _ => Err(Error::new(
                    Errno::EPERM,
                    "only root or the user who added this device may read or write its data",
                )),
            }
        };
        match req {
            Request::DevRead { dev, .. }
            | Request::DevWrite { dev, .. }
            | Request::DevDiscard { dev, .. }
            | Request::DevWriteZeroes { dev, .. }
            | Request::DevFlush { dev } => own_data((*dev).into()),
            Request::Attach { dev }
            | Request::Detach { dev }
            | Request::CbtDirty { dev, .. }
            | Request::RemoveDevice { dev } => own_dev((*dev).into()),
            Request::SnapshotAdd { id, dev } => {
                own_snap((*id).into())?;
                own_dev((*dev).into())
            }
            Request::SnapshotDestroy { id }
            | Request::SnapshotTake { id }
            | Request::SnapshotAppendFd { id, .. }
            | Request::WaitEvent { id, .. } => own_snap((*id).into()),
            _ => Ok(()),
        }
    }

    /// Refuses a storage or backing that is one of the daemon's own devices or served backings.
    fn not_served(st: &State, meta: &std::fs::Metadata) -> Result<(), Error> {
        let key = BackingKey::of(meta)?;
        let served = match key {
            BackingKey::Block(rdev) => {
                let dev = DeviceId::new(libc::major(rdev), libc::minor(rdev));
                st.origins.contains_key(&dev) || st.images.values().any(|i| i.served.dev() == dev)
            }
            BackingKey::File(..) => false,
        };
        if served || st.claims.contains(&key) {
            return Err(Error::new(
                Errno::EBUSY,
                "the descriptor is a device or backing this daemon serves",
            ));
        }
        Ok(())
    }

    /// The `*Fd` requests: `fd` was checked to be the one the request expects.
    pub(super) fn fd_request(
        &self,
        req: Request,
        fd: OwnedFd,
        who: &Principal,
    ) -> Result<Reply, Error> {
        match req {
            Request::SnapshotCreateFd { limit_sectors } => {
                let (file, meta) = checked(fd, Use::Storage, who.is_root())?;
                let backend: Dev = if meta.is_dir() {
                    Arc::new(super::backing::tmpfile_in(&file, self.config.storage_direct_io)?)
                } else {
                    Self::not_served(&self.state(), &meta)?;
                    if !who.is_root() && meta.is_file() {
                        let limit_bytes = limit_sectors.saturating_mul(512);
                        let free = unprivileged_free_bytes(&file)?;
                        if limit_bytes > meta.len().saturating_add(free) {
                            return Err(Error::new(
                                Errno::ENOSPC,
                                "the storage limit exceeds the space its filesystem leaves \
                                 unprivileged users",
                            ));
                        }
                    }
                    let name = super::backing::fd_path(&file);
                    Arc::new(BackingDev::new(file, self.config.storage_direct_io, &name)?)
                };
                let mut st = self.state();
                if st.snapshots.len() >= self.config.max_snapshots {
                    return Err(over_limit("too many snapshots (max_snapshots in blksnapd.toml)"));
                }
                let spec = StorageSpec::File { backend: backend.clone(), limit_sectors };
                let id = self.engine.snapshot_create(spec)?;
                st.snapshots.insert(
                    id,
                    SnapRec { members: Vec::new(), storages: vec![backend], owner: who.uid },
                );
                Ok(Reply::Created(id.into()))
            }
            Request::SnapshotAppendFd { id, ranges } => {
                let (file, meta) = checked(fd, Use::Storage, false)?;
                let mut st = self.state();
                Self::not_served(&st, &meta)?;
                let key = (meta.dev(), meta.ino());
                st.storage_files.retain(|_, d| Arc::strong_count(d) > 1);
                let backend = match st.storage_files.get(&key) {
                    Some(open) => open.clone(),
                    None => {
                        let name = super::backing::fd_path(&file);
                        let direct = self.config.storage_direct_io;
                        let opened: Dev = Arc::new(BackingDev::new(file, direct, &name)?);
                        st.storage_files.insert(key, opened.clone());
                        opened
                    }
                };
                let r: Vec<SectorRange> = ranges.into_iter().map(Into::into).collect();
                self.append_storage(&mut st, id.into(), backend, &r)?;
                Ok(Reply::Done)
            }
            Request::AddDeviceFd { attach } => {
                let (file, meta) = checked(fd, Use::Backing, who.is_root())?;
                let name = super::backing::fd_path(&file);
                let key = BackingKey::of(&meta)?;
                let claim = self.claim(key)?;
                let file = super::backing::claimed(file, key)?;
                let how = OriginStart { attach, owner: who.uid, ..OriginStart::default() };
                let id = self.serve_opened(
                    file,
                    key,
                    claim,
                    std::path::Path::new(&name),
                    name.clone(),
                    how,
                )?;
                let entry = self.list().into_iter().find(|d| d.dev == id.into());
                Ok(Reply::Device(entry.ok_or(Error::new(Errno::ENODEV, "device gone"))?))
            }
            _ => Err(Error::new(Errno::EINVAL, "this request carries no descriptor")),
        }
    }
}
