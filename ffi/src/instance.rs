//! An in-process blksnap "module": one engine, the devices it serves (device path → backing
//! file), the profile it speaks, and the per-snapshot storage bookkeeping the ioctls need.
//!
//! # Configuration string
//! Entries separated by `;` or newlines; blanks and `#` comments ignored:
//!
//! | entry | meaning |
//! |---|---|
//! | `/dev/PATH=BACKING[@MAJ:MIN]` | a device clients name `/dev/PATH`, served from the existing regular file or block device `BACKING` (size a multiple of 512). Its number is `MAJ:MIN` if given, else the `st_rdev` of `/dev/PATH` if that is a real block device, else `240:N` (N = index among devices; 240–254 is the "local use" major range). Also reachable as `/dev/block/MAJ:MIN` |
//! | `storage:PATH=BACKING` | storage path translation: APPEND_STORAGE's `bdev_path` (v3) or CREATE's file name (newest) equal to `PATH` use `BACKING` instead (a v3 client names the filesystem's block device, e.g. `/dev/block/8:1`; map it to a file). Unmapped storage paths are opened as they are |
//! | `param.NAME=VALUE` | an engine parameter (`tracking_block_minimum_shift`, `tracking_block_maximum_count`, `tracking_block_maximum_shift`, `chunk_minimum_shift`, `chunk_maximum_count_shift`, `chunk_maximum_shift`, `diff_storage_minimum_sectors`) |
//! | `seed=N` | fixed id sequence (tests); default: random |
//! | `socket=PATH` | client mode: requests go to the `blksnapd` listening on `PATH` ([`crate::client`]); also chosen by the environment variable `BLKSNAP_SOCKET` when the string has no `socket=` |

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

use blksnap_engine::io::{Dev, FileDev};
use blksnap_engine::sync::StdArc;
use blksnap_engine::{Engine, EngineConfig};
use blksnap_model::{DeviceId, Errno, Params, Profile, SnapshotId};

use crate::client::Backend;
use crate::user::R;

/// Major number given to configured devices that have none (`240:N`).
pub const DEFAULT_MAJOR: u32 = 240;
/// `io_min` of every served device, in sectors (4 KiB, a typical logical block).
const IO_MIN_SECTORS: u64 = 8;

/// A served device.
#[derive(Debug, Clone)]
pub struct Device {
    /// The path clients use (`/dev/...`).
    pub path: PathBuf,
    /// The backing file or block device.
    pub backing: PathBuf,
    /// Its number.
    pub id: DeviceId,
}

/// A parsed configuration string.
#[derive(Debug, Default, Clone)]
pub struct Config {
    /// Devices in order.
    pub devices: Vec<Device>,
    /// Storage path translations.
    pub storage_map: Vec<(PathBuf, PathBuf)>,
    /// Engine parameters.
    pub params: Params,
    /// Id seed.
    pub seed: Option<u64>,
    /// Client mode: the daemon's socket.
    pub socket: Option<PathBuf>,
}

fn parse_u64(text: &str) -> R<u64> {
    text.trim().parse::<u64>().map_err(|_| Errno::EINVAL)
}

fn parse_dev_id(text: &str) -> Option<DeviceId> {
    let (major, minor) = text.split_once(':')?;
    Some(DeviceId::new(major.parse().ok()?, minor.parse().ok()?))
}

/// `dev_t` → `MAJ:MIN` (glibc's encoding).
fn split_rdev(rdev: u64) -> DeviceId {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    DeviceId::new(major as u32, minor as u32)
}

/// The number of a real block device at `path`, if it is one.
fn block_device_id(path: &Path) -> Option<DeviceId> {
    let meta = std::fs::metadata(path).ok()?;
    meta.file_type().is_block_device().then(|| split_rdev(meta.rdev()))
}

impl Config {
    /// Parses the configuration string (module docs). Errors: EINVAL.
    pub fn parse(text: &str) -> R<Config> {
        let mut config = Config::default();
        for entry in text.split([';', '\n']).map(str::trim) {
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            let (key, value) = entry.split_once('=').ok_or(Errno::EINVAL)?;
            let (key, value) = (key.trim(), value.trim());
            if key.is_empty() || value.is_empty() {
                return Err(Errno::EINVAL);
            }
            if let Some(name) = key.strip_prefix("param.") {
                config.params.set(name, parse_u64(value)?).map_err(|e| e.errno)?;
            } else if key == "seed" {
                config.seed = Some(parse_u64(value)?);
            } else if key == "socket" {
                config.socket = Some(PathBuf::from(value));
            } else if let Some(path) = key.strip_prefix("storage:") {
                config.storage_map.push((PathBuf::from(path), PathBuf::from(value)));
            } else if key.starts_with('/') {
                config.add_device(key, value)?;
            } else {
                return Err(Errno::EINVAL);
            }
        }
        Ok(config)
    }

    fn add_device(&mut self, path: &str, value: &str) -> R<()> {
        let (backing, explicit) = match value.rsplit_once('@') {
            Some((b, id)) => match parse_dev_id(id) {
                Some(id) => (b, Some(id)),
                None => (value, None),
            },
            None => (value, None),
        };
        let index = u32::try_from(self.devices.len()).map_err(|_| Errno::ENOMEM)?;
        let id = explicit
            .or_else(|| block_device_id(Path::new(path)))
            .unwrap_or(DeviceId::new(DEFAULT_MAJOR, index));
        let clash = self.devices.iter().any(|d| d.id == id || d.path == Path::new(path));
        if clash {
            return Err(Errno::EINVAL);
        }
        self.devices.push(Device { path: path.into(), backing: backing.into(), id });
        Ok(())
    }
}

/// Storage bookkeeping of one snapshot.
#[derive(Default)]
struct SnapshotStorage {
    /// v3: backends opened by APPEND_STORAGE, once per distinct path (as the kernel does).
    opened: HashMap<PathBuf, Dev>,
    /// Canonical paths of every storage backing (to refuse adding the device that holds them).
    backings: Vec<PathBuf>,
}

/// The in-process module behind one or more handles.
pub struct Instance {
    /// The ABI it speaks.
    pub profile: Profile,
    /// The engine: in process, or a daemon's ([`crate::client`]).
    pub engine: Backend,
    /// The `storage:` translations of the configuration.
    storage_map: Vec<(PathBuf, PathBuf)>,
    /// The devices: the configured ones, or the daemon's origins (refreshed on a miss).
    devices: RwLock<Vec<Device>>,
    storage: Mutex<HashMap<SnapshotId, SnapshotStorage>>,
    poisoned: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

impl Instance {
    /// Builds the engine and registers every configured device (its backing opened read-write).
    /// Client mode (`socket=` or `BLKSNAP_SOCKET`): connects to the daemon instead.
    pub fn new(profile: Profile, mut config: Config) -> R<Instance> {
        let socket = config.socket.clone().or_else(crate::client::socket_from_env);
        let engine = match socket {
            Some(socket) => {
                Backend::Remote(crate::client::Remote::open(&socket, &mut config.devices)?)
            }
            None => Backend::Local(Self::local_engine(&config)?),
        };
        Ok(Instance {
            profile,
            engine,
            devices: RwLock::new(config.devices),
            storage_map: config.storage_map,
            storage: Mutex::new(HashMap::new()),
            poisoned: AtomicBool::new(false),
        })
    }

    fn local_engine(config: &Config) -> R<Engine> {
        let engine_config =
            EngineConfig { params: config.params, id_seed: config.seed, ..EngineConfig::default() };
        let engine = Engine::new(engine_config).map_err(|e| e.errno)?;
        for device in &config.devices {
            let backend = FileDev::open(&device.backing, true).map_err(|e| e.errno)?;
            let backend: Dev = StdArc::new(backend);
            engine.add_disk(device.id, backend, IO_MIN_SECTORS).map_err(|e| e.errno)?;
        }
        Ok(engine)
    }

    /// The devices (a copy: a handle that follows the daemon re-reads them).
    pub fn devices(&self) -> Vec<Device> {
        self.devices.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The first device matching `pred`; on a miss, a handle that follows the daemon re-reads
    /// its origins once (a device it started serving after this handle opened) and looks again.
    fn find_device(&self, pred: impl Fn(&Device) -> bool) -> Option<Device> {
        let found = self
            .devices
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|d| pred(d))
            .cloned();
        if found.is_some() {
            return found;
        }
        let fresh = self.engine.remote()?.refresh().ok()??;
        let found = fresh.iter().find(|d| pred(d)).cloned();
        *self.devices.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        found
    }

    /// Marks the instance failed (a panic was caught while it was in use).
    pub fn poison(&self) {
        self.poisoned.store(true, Ordering::SeqCst);
    }

    /// Whether a panic was caught while it was in use.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    /// The device named `path`: its configured path, `/dev/block/MAJ:MIN`, or its backing path.
    pub fn device_by_path(&self, path: &[u8]) -> Option<Device> {
        let path = Path::new(OsStr::from_bytes(path));
        let by_number =
            path.to_str().and_then(|p| p.strip_prefix("/dev/block/")).and_then(parse_dev_id);
        self.find_device(|d| d.path == path || Some(d.id) == by_number || d.backing == path)
    }

    /// The device whose snapshot image is `name` (`/dev/` prefix optional), in this profile's
    /// naming (`blksnap-image_MAJ:MIN` or `blksnap-MAJ-MIN`).
    pub fn device_by_image(&self, name: &[u8]) -> Option<Device> {
        let name = name.strip_prefix(b"/dev/").unwrap_or(name);
        self.find_device(|d| self.profile.image_name(d.id).as_bytes() == name)
    }

    /// The device with number `id`.
    pub fn device_by_id(&self, id: DeviceId) -> Option<Device> {
        self.find_device(|d| d.id == id)
    }

    /// Where a storage path really is (the `storage:` translations).
    pub fn storage_backing(&self, path: &Path) -> PathBuf {
        let mapped = self.storage_map.iter().find(|(p, _)| p == path);
        if let Some((_, backing)) = mapped {
            return backing.clone();
        }
        // A served device named as storage (`/dev/sdb` when /dev/sdb is one of ours) is its
        // backing, as the kernel would open the device itself.
        match self.device_by_path(path.as_os_str().as_bytes()) {
            Some(device) => device.backing,
            None => path.to_path_buf(),
        }
    }

    /// In-process: EBUSY if `backing` is the backing of a device that is a member of snapshot
    /// `id` — storage on a device of the same snapshot would copy into what it snapshots. The
    /// same answer as adding the device after the append ([`Instance::holds_storage_of`]).
    pub fn refuse_member_storage(&self, id: SnapshotId, backing: &Path) -> R<()> {
        let Backend::Local(engine) = &self.engine else { return Ok(()) };
        let canon = canonical(backing);
        let member = self.find_device(|d| {
            canonical(&d.backing) == canon && engine.member_of(d.id).ok().flatten() == Some(id)
        });
        match member {
            Some(_) => Err(Errno::EBUSY),
            None => Ok(()),
        }
    }

    /// v3 APPEND_STORAGE: the backend of `path` for snapshot `id`, opened read-write (not
    /// exclusive) on first use and reused for later appends of the same path.
    pub fn append_backend(&self, id: SnapshotId, path: &Path) -> R<Dev> {
        let mut all = lock(&self.storage);
        if let Some(dev) = all.get(&id).and_then(|e| e.opened.get(path)) {
            return Ok(dev.clone());
        }
        let backing = self.storage_backing(path);
        let canon = canonical(&backing);
        // One handle per file across snapshots too: the engine refuses a range another live
        // snapshot holds (EBUSY) only when both appends name the same backend.
        let shared = all
            .values()
            .flat_map(|s| s.opened.iter())
            .find(|(p, _)| canonical(&self.storage_backing(p)) == canon)
            .map(|(_, d)| d.clone());
        let dev: Dev = match shared {
            Some(d) => d,
            None => StdArc::new(FileDev::open(&backing, true).map_err(|e| e.errno)?),
        };
        let entry = all.entry(id).or_default();
        entry.opened.insert(path.to_path_buf(), dev.clone());
        entry.backings.push(canon);
        Ok(dev)
    }

    /// newest CREATE: opens the storage named `path` by its type (block device: fixed size;
    /// directory: an unnamed temporary file in it; regular file: growable). Returns the backend
    /// and its canonical path (recorded by [`Instance::record_storage`] once the id is known).
    pub fn open_storage(&self, path: &Path) -> R<(Dev, PathBuf)> {
        let backing = self.storage_backing(path);
        let meta = std::fs::metadata(&backing).map_err(|e| io_errno(&e))?;
        let kind = meta.file_type();
        let dev = if kind.is_dir() {
            unnamed_storage_in(&backing)?
        } else if kind.is_file() || kind.is_block_device() {
            FileDev::open(&backing, true).map_err(|e| e.errno)?
        } else {
            return Err(Errno::EINVAL);
        };
        Ok((StdArc::new(dev), canonical(&backing)))
    }

    /// Remembers that snapshot `id` stores into `backing`.
    pub fn record_storage(&self, id: SnapshotId, backing: PathBuf) {
        lock(&self.storage).entry(id).or_default().backings.push(backing);
    }

    /// Whether `device` is backed by a file that holds snapshot `id`'s storage (quirk §7.16:
    /// upstream silently ignored such an add; we refuse it with EBUSY).
    pub fn holds_storage_of(&self, id: SnapshotId, device: &Device) -> bool {
        let backing = canonical(&device.backing);
        lock(&self.storage).get(&id).is_some_and(|s| s.backings.contains(&backing))
    }

    /// Forgets the storage bookkeeping of a destroyed snapshot.
    pub fn forget_snapshot(&self, id: SnapshotId) {
        lock(&self.storage).remove(&id);
    }
}

/// A new storage file in `dir` that no other process can reach: unnamed (`O_TMPFILE`), never
/// linkable into the tree (`O_EXCL`), owner-only (0600) — as the kernel creates it. (The
/// `tempfile` crate's O_TMPFILE file is 0666 less the umask and linkable.)
pub fn unnamed_storage_in(dir: &Path) -> R<FileDev> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE | libc::O_EXCL)
        .mode(0o600)
        .open(dir)
        .map_err(|e| io_errno(&e))?;
    FileDev::from_file(file).map_err(|e| e.errno)
}

/// The errno of an OS error (when the closed set has it), else EIO.
pub fn io_errno(err: &std::io::Error) -> Errno {
    err.raw_os_error().and_then(Errno::from_code).unwrap_or(Errno::EIO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unnamed_storage_is_private_and_never_linkable() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let dev = unnamed_storage_in(dir.path()).unwrap();
        let fd = dev.file().as_raw_fd();
        let meta = std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o600, "owner-only");
        let linked = std::fs::hard_link(format!("/proc/self/fd/{fd}"), dir.path().join("leak"));
        assert!(linked.is_err(), "O_EXCL: the file can never get a name");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing in the directory");
        assert_eq!(unnamed_storage_in(&dir.path().join("missing")).unwrap_err(), Errno::ENOENT);
    }

    #[test]
    fn config_grammar() {
        let c = Config::parse(
            " /dev/sda=/tmp/a.img ; /dev/sdb=/tmp/b@x.img@8:16\n# comment\n\
             storage:/dev/block/8:1=/tmp/s.img;param.diff_storage_minimum_sectors=64;seed=7",
        )
        .unwrap();
        assert_eq!(c.devices.len(), 2);
        assert_eq!(c.devices[0].id, DeviceId::new(DEFAULT_MAJOR, 0));
        assert_eq!(c.devices[1].id, DeviceId::new(8, 16));
        assert_eq!(c.devices[1].backing, Path::new("/tmp/b@x.img"));
        assert_eq!(c.storage_map.len(), 1);
        assert_eq!(c.params.diff_storage_minimum_sectors, 64);
        assert_eq!(c.seed, Some(7));
        for bad in [
            "nonsense",
            "x=y",
            "/dev/a=",
            "param.nope=1",
            "param.chunk_minimum_shift=99999999999",
            "seed=abc",
            "/dev/a=/x;/dev/a=/y",
            "/dev/a=/x@1:1;/dev/b=/y@1:1",
        ] {
            assert_eq!(Config::parse(bad).unwrap_err(), Errno::EINVAL, "{bad}");
        }
        assert!(Config::parse("").unwrap().devices.is_empty());
        // every kernel parameter of both generations, by its kernel name
        for (name, value) in Params::KERNEL_DEFAULTS {
            assert!(Config::parse(&format!("param.{name}={value}")).is_ok(), "{name}");
        }
    }

    #[test]
    fn rdev_split() {
        assert_eq!(split_rdev(0x0801), DeviceId::new(8, 1));
        assert_eq!(split_rdev((259u64 << 8) | 3), DeviceId::new(259, 3));
    }
}
