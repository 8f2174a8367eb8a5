//! What the shim serves: the configuration (read once from the environment), the one in-process
//! engine (created at the first open of a served path, shared by every descriptor, like the
//! kernel module), path classification, and the descriptor table.
//!
//! Every served descriptor is a real one (a memfd from libc), so `close`, `dup`, `fork` and
//! `exec` keep working on it; the table maps its number to an [`Object`] (what it names, its
//! access mode and flags, and its file position, shared by duplicates as an open file
//! description is).

use core::ffi::c_int;
use core::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};

use blksnap_ffi::handles;
use blksnap_ffi::instance::{Config, Device, Instance};
use blksnap_model::{DeviceId, Profile};

use crate::guard::{Errno, Res};
use crate::real;

/// Environment variable naming the profile: `v3` or `newest` (the default).
pub const PROFILE_ENV: &str = "BLKSNAP_PROFILE";
/// The control device.
pub const CONTROL_PATH: &[u8] = b"/dev/blksnap-control";
/// `st_rdev` of the control device (misc major 10, a minor from the dynamic range).
pub const CONTROL_NUMBER: (u32, u32) = (10, 249);
/// Major number of snapshot images (`st_rdev` = `IMAGE_MAJOR:index of the device`); upstream
/// images get a dynamic major of their own. `/dev/block/251:N` names image N.
pub const IMAGE_MAJOR: u32 = 251;

/// What a served path or descriptor names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `/dev/blksnap-control`.
    Control,
    /// A configured device (its path, or `/dev/block/MAJ:MIN`).
    Device(DeviceId),
    /// The snapshot image of a configured device (`/dev/blksnap-image_MAJ:MIN` in v3,
    /// `/dev/blksnap-MAJ-MIN` in newest).
    Image(DeviceId),
}

/// The configuration, as read from the environment.
pub struct Setup {
    /// The profile (`EINVAL`: an unknown `BLKSNAP_PROFILE`).
    pub profile: Res<Profile>,
    /// The parsed `BLKSNAP_CONFIG` (libblksnap's grammar).
    pub config: Res<Config>,
}

/// A lexically normalised absolute path (`//` and `/./` collapsed, `..` applied); `None` for a
/// relative path (served paths are matched as absolute paths only).
pub fn normalize(path: &[u8]) -> Option<Vec<u8>> {
    if path.first() != Some(&b'/') {
        return None;
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for part in path.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            _ => parts.push(part),
        }
    }
    let mut out = Vec::with_capacity(path.len());
    for part in parts {
        out.push(b'/');
        out.extend_from_slice(part);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    Some(out)
}

fn parse_number(text: &[u8]) -> Option<DeviceId> {
    let text = std::str::from_utf8(text).ok()?;
    let (major, minor) = text.split_once(':')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(major) || !digits(minor) {
        return None;
    }
    Some(DeviceId::new(major.parse().ok()?, minor.parse().ok()?))
}

impl Setup {
    /// From the profile name (`None`: the default) and the configuration text.
    pub fn new(profile: Option<&str>, config: &str) -> Setup {
        let profile = match profile.map(str::trim) {
            None | Some("") | Some("newest") => Ok(Profile::Newest),
            Some("v3") => Ok(Profile::V3),
            Some(_) => Err(libc::EINVAL),
        };
        let config = Config::parse(config).map_err(|e| e.code());
        Setup { profile, config }
    }

    /// In front of blksnapd with no device configured: the handle follows the daemon's
    /// origins, and their names are served when the daemon has no block devices for them.
    pub fn follows_daemon(&self) -> bool {
        let Ok(config) = &self.config else { return false };
        config.devices.is_empty()
            && (config.socket.is_some() || blksnap_ffi::client::socket_from_env().is_some())
    }

    /// The configured devices (none if the configuration is invalid).
    pub fn devices(&self) -> &[Device] {
        self.config.as_ref().map_or(&[], |c| c.devices.as_slice())
    }

    /// The index of device `id` in the configuration.
    fn index_of(&self, id: DeviceId) -> Option<usize> {
        self.devices().iter().position(|d| d.id == id)
    }

    /// The number of the snapshot image of device `id`.
    pub fn image_number(&self, id: DeviceId) -> DeviceId {
        // A device of the daemon's (not configured here): its own minor.
        let index = self.index_of(id).map_or(id.minor, |i| u32::try_from(i).unwrap_or(u32::MAX));
        DeviceId::new(IMAGE_MAJOR, index)
    }

    /// What the normalised absolute path `path` names, if it is served.
    pub fn classify(&self, path: &[u8]) -> Option<Target> {
        if path == CONTROL_PATH {
            return Some(Target::Control);
        }
        let devices = self.devices();
        let named = |d: &&Device| {
            normalize(d.path.as_os_str().as_encoded_bytes()).is_some_and(|p| p == path)
        };
        if let Some(d) = devices.iter().find(named) {
            return Some(Target::Device(d.id));
        }
        if let Some(number) = path.strip_prefix(b"/dev/block/").and_then(parse_number) {
            if let Some(d) = devices.iter().find(|d| d.id == number) {
                return Some(Target::Device(d.id));
            }
            if number.major == IMAGE_MAJOR {
                let d = devices.get(usize::try_from(number.minor).ok()?)?;
                return Some(Target::Image(d.id));
            }
            return None;
        }
        let profile = *self.profile.as_ref().ok()?;
        let name = path.strip_prefix(b"/dev/")?;
        let d = devices.iter().find(|d| profile.image_name(d.id).as_bytes() == name)?;
        Some(Target::Image(d.id))
    }
}

static SETUP: OnceLock<Setup> = OnceLock::new();

/// The configuration of this process (read on first use; errors reported once on stderr).
pub fn setup() -> &'static Setup {
    SETUP.get_or_init(|| {
        let profile = std::env::var(PROFILE_ENV).ok();
        let config = std::env::var(blksnap_ffi::BLKSNAP_CONFIG_ENV).unwrap_or_default();
        let setup = Setup::new(profile.as_deref(), &config);
        if setup.profile.is_err() {
            eprintln!(
                "libblksnap-preload: {PROFILE_ENV}={:?}: expected v3 or newest",
                profile.unwrap_or_default()
            );
        }
        if let Err(errno) = setup.config {
            eprintln!(
                "libblksnap-preload: {}: invalid configuration ({})",
                blksnap_ffi::BLKSNAP_CONFIG_ENV,
                errno_name(errno)
            );
        }
        setup
    })
}

fn errno_name(errno: Errno) -> &'static str {
    blksnap_model::Errno::from_code(errno).map_or("error", |e| e.name())
}

/// The served target of a path argument (a C string), if any.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string.
pub unsafe fn classify_cstr(path: *const core::ffi::c_char) -> Option<Target> {
    if path.is_null() {
        return None;
    }
    // SAFETY: contract: a NUL-terminated string.
    let bytes = unsafe { core::ffi::CStr::from_ptr(path) }.to_bytes();
    if bytes.first() != Some(&b'/') {
        return None;
    }
    let path = normalize(bytes)?;
    let setup = setup();
    setup.classify(&path).or_else(|| classify_daemon(setup, &path))
}

/// Path prefixes that may name a device of a daemon with no block devices: its own node names
/// (`/dev/null-blksnap-MAJ-MIN`), the profiles' image names, `/dev/block/MAJ:MIN`. Only these
/// are looked up (a lookup may ask the daemon), so `/dev/null` or `/dev/zero` cost nothing.
const DAEMON_PREFIXES: [&[u8]; 3] = [b"/dev/null-blksnap-", b"/dev/blksnap-", b"/dev/block/"];

/// In front of a blksnapd that serves no block devices (`--frontend none`), with no device
/// configured: the daemon's names of its origins (as `ListDevices` and `blksnap device add`
/// report them), their `/dev/block/MAJ:MIN`, and their images' names in this profile are served
/// like configured devices — their data goes to the daemon over its socket. A name whose origin
/// is a real block device of this host (blksnapd with ublk) stays the kernel's.
fn classify_daemon(setup: &Setup, path: &[u8]) -> Option<Target> {
    if !setup.follows_daemon() || !DAEMON_PREFIXES.iter().any(|p| path.starts_with(p)) {
        return None;
    }
    let instance = engine().ok()?;
    let (device, target) = match instance.device_by_path(path) {
        Some(d) => (d.clone(), Target::Device(d.id)),
        None => {
            let d = instance.device_by_image(path)?;
            (d.clone(), Target::Image(d.id))
        }
    };
    (!is_kernel_block_device(&device.path, device.id)).then_some(target)
}

/// Whether `path` is, on this host, the block device `id`.
fn is_kernel_block_device(path: &std::path::Path, id: DeviceId) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    std::fs::metadata(path).is_ok_and(|m| {
        m.file_type().is_block_device()
            && (libc::major(m.rdev()), libc::minor(m.rdev())) == (id.major, id.minor)
    })
}

static ENGINE: OnceLock<Res<c_int>> = OnceLock::new();

fn create_engine() -> Res<c_int> {
    let setup = setup();
    let profile = setup.profile?;
    let config = setup.config.clone()?;
    let instance = Instance::new(profile, config).map_err(|e| {
        eprintln!("libblksnap-preload: cannot serve the configured devices ({})", e.name());
        e.code()
    })?;
    let handle = handles::insert(Arc::new(instance)).map_err(|negative| -negative)?;
    // SAFETY: registers a plain `extern "C" fn()` (glibc ties it to this object).
    unsafe { libc::atexit(release_engine) };
    Ok(handle)
}

/// At exit: closes the engine's handle, so the engine (and its backing files) is released
/// unless a call is still using it (memory checkers then see no leak).
extern "C" fn release_engine() {
    let Some(_inside) = crate::guard::Inside::enter() else { return };
    crate::guard::catch((), || {
        if let Some(Ok(handle)) = ENGINE.get() {
            handles::remove(*handle);
        }
    });
}

/// The engine (created on first use; the same for the whole process).
pub fn engine() -> Res<Arc<Instance>> {
    let handle = (*ENGINE.get_or_init(create_engine))?;
    handles::get(handle).map_err(|negative| -negative)
}

/// The engine if it was created and is usable.
pub fn engine_if_created() -> Option<Arc<Instance>> {
    let handle = *ENGINE.get()?.as_ref().ok()?;
    handles::get(handle).ok()
}

/// Marks the engine failed after a caught panic: every later call returns `ENOTRECOVERABLE`.
pub fn poison() {
    if let Some(instance) = engine_if_created() {
        instance.poison();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Exclusive (`O_EXCL`) opens of devices and images in force.
static CLAIMS: Mutex<Vec<Target>> = Mutex::new(Vec::new());

/// Status flags kept per open file description (`F_GETFL`/`F_SETFL`).
const STATUS_FLAGS: c_int =
    libc::O_APPEND | libc::O_NONBLOCK | libc::O_DIRECT | libc::O_NOATIME | libc::O_ASYNC;
/// Status flags `F_SETFL` may change.
const SETFL_FLAGS: c_int = STATUS_FLAGS;

/// An open served object (an open file description).
#[derive(Debug)]
pub struct Object {
    /// What it names.
    pub target: Target,
    /// Opened for reading.
    pub readable: bool,
    /// Opened for writing.
    pub writable: bool,
    access: c_int,
    flags: AtomicI32,
    /// The file position (read/write/lseek).
    pub pos: Mutex<u64>,
    claimed: bool,
}

impl Object {
    /// Whether I/O is O_DIRECT (alignment enforced).
    pub fn direct(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & libc::O_DIRECT != 0
    }

    /// `F_GETFL`.
    pub fn getfl(&self) -> c_int {
        self.access | self.flags.load(Ordering::Relaxed) | libc::O_LARGEFILE
    }

    /// `F_SETFL`: the changeable status flags.
    pub fn setfl(&self, arg: c_int) {
        let _ = self.flags.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            Some((old & !SETFL_FLAGS) | (arg & SETFL_FLAGS))
        });
    }

    /// The position, locked (read/write advance it atomically).
    pub fn position(&self) -> MutexGuard<'_, u64> {
        lock(&self.pos)
    }
}

impl Drop for Object {
    fn drop(&mut self) {
        if self.claimed {
            let mut claims = lock(&CLAIMS);
            if let Some(at) = claims.iter().position(|t| *t == self.target) {
                claims.swap_remove(at);
            }
        }
    }
}

/// Served descriptors.
static FDS: RwLock<BTreeMap<c_int, Arc<Object>>> = RwLock::new(BTreeMap::new());
/// Number of entries in [`FDS`] (0: every descriptor passes through without a lookup).
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// Whether any descriptor is served.
pub fn any_served() -> bool {
    COUNT.load(Ordering::Acquire) != 0
}

/// The object behind `fd`, if it is served.
pub fn lookup(fd: c_int) -> Option<Arc<Object>> {
    if !any_served() {
        return None;
    }
    FDS.read().unwrap_or_else(PoisonError::into_inner).get(&fd).cloned()
}

/// Serves `fd` as `object` (replacing whatever the number meant before).
pub fn insert(fd: c_int, object: Arc<Object>) {
    let old = {
        let mut fds = FDS.write().unwrap_or_else(PoisonError::into_inner);
        let old = fds.insert(fd, object);
        COUNT.store(fds.len(), Ordering::Release);
        old
    };
    drop(old);
}

/// Stops serving `fd` (closed, or reused for something else). The object is dropped by the
/// caller, outside the table lock.
pub fn remove(fd: c_int) -> Option<Arc<Object>> {
    if !any_served() {
        return None;
    }
    let mut fds = FDS.write().unwrap_or_else(PoisonError::into_inner);
    let old = fds.remove(&fd);
    COUNT.store(fds.len(), Ordering::Release);
    old
}

/// Stops serving every descriptor in `first..=last`.
pub fn remove_range(first: c_int, last: c_int) -> Vec<Arc<Object>> {
    if !any_served() || first > last {
        return Vec::new();
    }
    let mut fds = FDS.write().unwrap_or_else(PoisonError::into_inner);
    let gone: Vec<c_int> = fds.range(first..=last).map(|(fd, _)| *fd).collect();
    let objects = gone.iter().filter_map(|fd| fds.remove(fd)).collect();
    COUNT.store(fds.len(), Ordering::Release);
    objects
}

/// A real descriptor for a served object: a memfd (`/dev/null` if memfds are unavailable).
fn real_descriptor(target: Target, cloexec: bool) -> Res<c_int> {
    let name: &core::ffi::CStr = match target {
        Target::Control => c"blksnap-control",
        Target::Device(_) => c"blksnap-device",
        Target::Image(_) => c"blksnap-image",
    };
    let flags = if cloexec { libc::MFD_CLOEXEC } else { 0 };
    // SAFETY: a NUL-terminated name and valid flags.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd >= 0 {
        return Ok(fd);
    }
    let open = real::open().ok_or(libc::ENOSYS)?;
    let cloexec = if cloexec { libc::O_CLOEXEC } else { 0 };
    // SAFETY: libc's open with a valid path and flags.
    let fd = unsafe { open(c"/dev/null".as_ptr(), libc::O_RDWR | cloexec) };
    if fd >= 0 {
        Ok(fd)
    } else {
        // SAFETY: this thread's errno slot.
        Err(unsafe { *libc::__errno_location() })
    }
}

/// Opens a served target with `open(2)` flags: the new descriptor or an errno (`ENOTDIR`
/// O_DIRECTORY/O_TMPFILE; `EEXIST` O_CREAT|O_EXCL; `EINVAL` access mode 3; `ENOENT` an image
/// that does not exist; `EBUSY` O_EXCL on a device or image already opened with O_EXCL; the
/// engine's errors if it cannot be created).
pub fn open(target: Target, flags: c_int) -> Res<c_int> {
    if flags & libc::O_DIRECTORY != 0 {
        return Err(libc::ENOTDIR);
    }
    if flags & libc::O_CREAT != 0 && flags & libc::O_EXCL != 0 {
        return Err(libc::EEXIST);
    }
    let access = flags & libc::O_ACCMODE;
    let path_only = flags & libc::O_PATH != 0;
    let (readable, writable) = match access {
        _ if path_only => (false, false),
        libc::O_RDONLY => (true, false),
        libc::O_WRONLY => (false, true),
        libc::O_RDWR => (true, true),
        _ => return Err(libc::EINVAL),
    };
    let instance = engine()?;
    if let Target::Image(id) = target {
        if !crate::data::image_exists(&instance, id) {
            return Err(libc::ENOENT);
        }
    }
    let claimed = flags & libc::O_EXCL != 0 && target != Target::Control && !path_only;
    if claimed {
        let mut claims = lock(&CLAIMS);
        if claims.contains(&target) {
            return Err(libc::EBUSY);
        }
        claims.push(target);
    }
    let object = Arc::new(Object {
        target,
        readable,
        writable,
        access,
        flags: AtomicI32::new(flags & STATUS_FLAGS),
        pos: Mutex::new(0),
        claimed,
    });
    let fd = real_descriptor(target, flags & libc::O_CLOEXEC != 0)?;
    insert(fd, object);
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization() {
        let n = |p: &str| normalize(p.as_bytes()).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(n("/dev/sda").as_deref(), Some("/dev/sda"));
        assert_eq!(n("//dev/./sda/").as_deref(), Some("/dev/sda"));
        assert_eq!(n("/dev/x/../sda").as_deref(), Some("/dev/sda"));
        assert_eq!(n("/..").as_deref(), Some("/"));
        assert_eq!(n("dev/sda"), None);
        assert_eq!(n(""), None);
    }

    #[test]
    fn classification() {
        let s = Setup::new(Some("v3"), "/dev/sdz=/tmp/a@8:0;/dev/vdz=/tmp/b");
        let d0 = DeviceId::new(8, 0);
        let d1 = DeviceId::new(blksnap_ffi::instance::DEFAULT_MAJOR, 1);
        assert_eq!(s.classify(b"/dev/blksnap-control"), Some(Target::Control));
        assert_eq!(s.classify(b"/dev/sdz"), Some(Target::Device(d0)));
        assert_eq!(s.classify(b"/dev/vdz"), Some(Target::Device(d1)));
        assert_eq!(s.classify(b"/dev/block/8:0"), Some(Target::Device(d0)));
        assert_eq!(s.classify(b"/dev/block/240:1"), Some(Target::Device(d1)));
        assert_eq!(s.classify(b"/dev/block/251:1"), Some(Target::Image(d1)));
        assert_eq!(s.classify(b"/dev/block/251:2"), None);
        assert_eq!(s.classify(b"/dev/block/8:1"), None);
        assert_eq!(s.classify(b"/dev/block/8:x"), None);
        assert_eq!(s.classify(b"/dev/blksnap-image_8:0"), Some(Target::Image(d0)));
        assert_eq!(s.classify(b"/dev/blksnap-8-0"), None, "newest name in v3");
        assert_eq!(s.classify(b"/dev/sda"), None);
        assert_eq!(s.classify(b"/tmp/a"), None, "backing files are not device paths");
        assert_eq!(s.image_number(d1), DeviceId::new(IMAGE_MAJOR, 1));

        let n = Setup::new(None, "/dev/sdz=/tmp/a@8:0");
        assert_eq!(n.profile, Ok(Profile::Newest));
        assert_eq!(n.classify(b"/dev/blksnap-8-0"), Some(Target::Image(d0)));
        assert_eq!(n.classify(b"/dev/blksnap-image_8:0"), None);

        let bad = Setup::new(Some("v4"), "nonsense");
        assert_eq!(bad.profile, Err(libc::EINVAL));
        assert_eq!(bad.config.as_ref().err(), Some(&libc::EINVAL));
        assert_eq!(bad.classify(b"/dev/blksnap-control"), Some(Target::Control));
        assert_eq!(bad.classify(b"/dev/sdz"), None);
    }
}
