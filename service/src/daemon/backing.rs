//! Backings and storage opened by the daemon: what a backing is whatever its path
//! ([`BackingKey`]), opening one for serving with the kernel's exclusive claim, checking a
//! served node for users, and opening a difference storage by its type.

use std::path::Path;

use blksnap_model::{Errno, Error};

use super::backing_io::{BackingDev, DirectIo};

/// What a backing is, independent of the path used to name it: a block device by its number,
/// a regular file by device and inode — a second path, a symlink or a hard link to a served
/// backing is the same backing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackingKey {
    /// A block device (`st_rdev`).
    Block(u64),
    /// A regular file (`st_dev`, `st_ino`).
    File(u64, u64),
}

impl BackingKey {
    /// The key of an open backing (from `fstat`, so it names what was opened, not what the
    /// path names now). EINVAL for anything but a regular file or a block device.
    pub fn of(meta: &std::fs::Metadata) -> Result<BackingKey, Error> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        if meta.file_type().is_block_device() {
            Ok(BackingKey::Block(meta.rdev()))
        } else if meta.is_file() {
            Ok(BackingKey::File(meta.dev(), meta.ino()))
        } else {
            Err(Error::new(Errno::EINVAL, "a backing must be a regular file or a block device"))
        }
    }
}

/// Opens a backing for serving: read-write; a block device also exclusively (`O_EXCL`, the
/// kernel's block-device claim): while it is served nobody can mount it or open it
/// exclusively (EBUSY), and it cannot be served while something holds it so (EBUSY).
/// Returns the open file and its key (from `fstat` of the descriptor).
pub fn open_backing(path: &Path) -> Result<(std::fs::File, BackingKey), Error> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let os = |e: std::io::Error, detail: &'static str| {
        Error::new(e.raw_os_error().and_then(Errno::from_code).unwrap_or(Errno::EIO), detail)
    };
    let meta = std::fs::metadata(path).map_err(|e| os(e, "cannot stat the backing"))?;
    BackingKey::of(&meta)?;
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true);
    if meta.file_type().is_block_device() {
        // O_EXCL without O_CREAT on a block device: an exclusive open (bdev claim).
        opts.custom_flags(libc::O_EXCL);
    }
    let file = opts.open(path).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => Error::new(
            Errno::EBUSY,
            "the backing block device is in use (mounted, or opened exclusively by another)",
        ),
        _ => os(e, "cannot open the backing"),
    })?;
    let key = BackingKey::of(&file.metadata().map_err(|e| os(e, "cannot stat the backing"))?)?;
    Ok((file, key))
}

/// An exclusive open of a served device's node: EBUSY while it is mounted or held exclusively
/// (the kernel refuses the open then); `None` when the node does not exist (the null frontend).
pub(super) fn exclusive_probe(node: &str) -> Result<Option<std::fs::File>, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(node) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            Err(Error::new(Errno::EBUSY, "the device is mounted or held exclusively"))
        }
        Err(e) => {
            eprintln!("blksnapd: {node}: exclusive open to check for users: {e}");
            Err(Error::new(Errno::EBUSY, "cannot check whether the device is in use"))
        }
    }
}

/// Opens a difference storage by its type, as the newest uapi's CREATE does: a regular file
/// (growable) or a block device (fixed size) as it is, a directory → an unnamed `O_TMPFILE`
/// file in it; anything else EINVAL. It is served as a backing is ([`BackingDev`]): direct I/O
/// as `direct` says (config `storage_direct_io`), and zeroing — an image's discard of whole
/// chunks — punches holes.
pub fn open_storage(path: &str, direct: DirectIo) -> Result<BackingDev, Error> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::new(Errno::ENOENT, "storage path does not exist"),
        _ => Error::new(Errno::EIO, "cannot stat the storage path"),
    })?;
    let kind = meta.file_type();
    if kind.is_dir() {
        // Unnamed, never linkable (O_EXCL), owner-only: as the kernel (libblksnap's
        // `unnamed_storage_in` is the same for in-process handles).
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE | libc::O_EXCL)
            .mode(0o600)
            .open(path)
            .map_err(|_| Error::new(Errno::EIO, "cannot create a file in the storage directory"))?;
        BackingDev::new(file, direct, path)
    } else if kind.is_file() || kind.is_block_device() {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(|e| {
            let errno = e.raw_os_error().and_then(Errno::from_code).unwrap_or(Errno::EIO);
            Error::new(errno, "cannot open the storage")
        })?;
        BackingDev::new(file, direct, path)
    } else {
        Err(Error::new(Errno::EINVAL, "storage must be a file, block device or directory"))
    }
}

/// An unnamed private storage file in the directory `dir` (`openat(dir, ".", O_TMPFILE |
/// O_EXCL | O_RDWR, 0600)`), for a directory descriptor root passed; served as
/// [`open_storage`] serves one.
pub(super) fn tmpfile_in(dir: &std::fs::File, direct: DirectIo) -> Result<BackingDev, Error> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::openat(
        dir,
        ".",
        OFlags::TMPFILE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| {
        let errno = Errno::from_code(e.raw_os_error()).unwrap_or(Errno::EIO);
        Error::new(errno, "cannot create a file in the storage directory")
    })?;
    BackingDev::new(std::fs::File::from(fd), direct, &fd_path(dir))
}

/// The path the kernel gives an open file (its `/proc/self/fd` link: the name at open time,
/// `... (deleted)` for an unlinked file), for lists and logs; never trusted for access.
pub(super) fn fd_path(file: &std::fs::File) -> String {
    use std::os::fd::AsRawFd;
    let link = format!("/proc/self/fd/{}", file.as_raw_fd());
    match std::fs::read_link(link) {
        Ok(p) if p.is_absolute() && p.as_os_str().len() < blksnap_proto::MAX_PATH_BYTES => {
            p.to_string_lossy().replace('\0', "")
        }
        _ => "/(passed descriptor)".to_string(),
    }
}

/// A passed backing ready to serve: a block device is reopened through its descriptor with
/// the kernel's exclusive claim (`O_EXCL`, as [`open_backing`] does: nobody mounts it while
/// served) — the client proved read-write access by passing it open `O_RDWR`, and the reopen
/// names that very device; a regular file is used as passed.
pub(super) fn claimed(file: std::fs::File, key: BackingKey) -> Result<std::fs::File, Error> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let BackingKey::Block(rdev) = key else { return Ok(file) };
    let again = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => Error::new(
                Errno::EBUSY,
                "the backing block device is in use (mounted, or opened exclusively by another)",
            ),
            _ => Error::new(Errno::EIO, "cannot claim the passed block device"),
        })?;
    let same = again.metadata().map(|m| BackingKey::of(&m).ok() == Some(BackingKey::Block(rdev)));
    if !matches!(same, Ok(true)) {
        return Err(Error::new(Errno::EAGAIN, "the passed block device changed while claimed"));
    }
    Ok(again)
}
