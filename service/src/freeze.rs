//! Freezing the filesystems mounted on the origins around TAKE, as the kernel module does
//! (`freeze_bdev` in v3, `bdev_freeze`/`bdev_thaw` in the newest series): a filesystem mounted
//! on a tracked device commits its journal and writes back its dirty data before the snapshot
//! is taken, so the image holds every file written before the take — not only what happened to
//! be on the device already.
//!
//! The daemon cannot freeze a block device as the kernel does; it freezes filesystems, through
//! their mount points (`FIFREEZE`/`FITHAW` on a descriptor of the mount's root directory):
//! * the filesystems are found by device number in `/proc/self/mountinfo` — the mounts the
//!   daemon can see. A filesystem mounted only in another mount namespace (a container, or a
//!   systemd unit sandboxed with `PrivateMounts=`, `ProtectSystem=`, `PrivateTmp=`…, which give
//!   the *daemon* its own namespace where mounts made later by others do not propagate) is not
//!   seen and not frozen: its image is then crash-consistent only (what was on the device).
//! * each origin's partitions (`/sys/dev/block/MAJ:MIN/*/partition`) count as the origin: a
//!   filesystem on `/dev/ublkb0p1` is frozen for a take of `/dev/ublkb0`. Stacked devices on
//!   top of an origin (device-mapper, md) are not followed.
//! * one mount point per filesystem: bind mounts share the superblock, and a second FIFREEZE of
//!   a frozen superblock fails with EBUSY.
//! * a filesystem that cannot be frozen (EOPNOTSUPP/ENOTTY/EINVAL: its type has no freeze
//!   support), one someone else froze already (EBUSY: it is as frozen as it can be, and not ours
//!   to thaw), or any other FIFREEZE failure (EPERM without CAP_SYS_ADMIN) is logged and the
//!   take goes on: that filesystem's image is crash-consistent, as it would be without freezing.
//! * each FIFREEZE runs in a helper thread and is waited for at most `timeout`. One that has not
//!   completed by then fails the take with EAGAIN (the engine's closed errno set has no
//!   ETIMEDOUT; the client may retry, or turn freezing off) and leaves nothing frozen: what was
//!   frozen so far is thawed, and a freeze that completes later is undone by its own thread.
//! * [`Frozen`] thaws on drop: every path out of a take — success, engine error, panic — thaws
//!   what was frozen.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blksnap_model::{DeviceId, Errno, Error};

/// `FIFREEZE`: `_IOWR('X', 119, int)` (linux/fs.h).
const FIFREEZE: libc::c_ulong = 0xc004_5877;
/// `FITHAW`: `_IOWR('X', 120, int)` (linux/fs.h).
const FITHAW: libc::c_ulong = 0xc004_5878;

/// One mounted filesystem of interest: its device and one mount point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// The device the filesystem is on (`st_dev` of its files).
    pub dev: DeviceId,
    /// A mount point of it.
    pub point: PathBuf,
}

/// Undoes the octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` backslash) of a
/// path field of `/proc/self/mountinfo`.
fn unescape(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// The mounts in `mountinfo` text (format of `/proc/PID/mountinfo`) whose device is in `devs`,
/// one mount point per device (the first listed), in the order listed.
pub fn mounts_in(mountinfo: &str, devs: &BTreeSet<DeviceId>) -> Vec<Mount> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNT-POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER-OPTIONS
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() < 5 {
            continue;
        }
        let Some((maj, min)) = f[2].split_once(':') else { continue };
        let (Ok(maj), Ok(min)) = (maj.parse(), min.parse()) else { continue };
        let dev = DeviceId::new(maj, min);
        if devs.contains(&dev) && seen.insert(dev) {
            out.push(Mount { dev, point: unescape(f[4]) });
        }
    }
    out
}

/// `dev` and its partitions (from sysfs; just `dev` where sysfs does not say).
pub fn with_partitions(dev: DeviceId) -> Vec<DeviceId> {
    let mut out = vec![dev];
    let dir = format!("/sys/dev/block/{}:{}", dev.major, dev.minor);
    let Ok(entries) = std::fs::read_dir(&dir) else { return out };
    for e in entries.flatten() {
        let p = e.path();
        if !p.join("partition").exists() {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(p.join("dev")) else { continue };
        if let Some((a, b)) = text.trim().split_once(':') {
            if let (Ok(a), Ok(b)) = (a.parse(), b.parse()) {
                out.push(DeviceId::new(a, b));
            }
        }
    }
    out
}

/// The filesystems the daemon can see mounted on `origins` or their partitions.
pub fn mounts_of(origins: &[DeviceId]) -> Vec<Mount> {
    let devs: BTreeSet<DeviceId> = origins.iter().flat_map(|d| with_partitions(*d)).collect();
    match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(text) => mounts_in(&text, &devs),
        Err(e) => {
            eprintln!("blksnapd: freeze: cannot read /proc/self/mountinfo ({e}): nothing frozen");
            Vec::new()
        }
    }
}

/// How freezing one filesystem ended.
#[derive(Debug)]
enum Outcome {
    /// Frozen by us: thaw it through this descriptor.
    Frozen(File),
    /// Not frozen, and the take goes on (logged): cannot be frozen, or frozen by someone else.
    Skipped(String),
}

fn ioctl_noarg(f: &File, request: libc::c_ulong) -> std::io::Result<()> {
    // FIFREEZE and FITHAW take no argument the kernel reads or writes (the `int` in their
    // encoding is unused), so passing 0 touches no memory of ours.
    // SAFETY: `f` is an open descriptor for the whole call; the argument is not a pointer.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), request as _, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// FIFREEZE of the filesystem mounted at `point`.
fn freeze_one(point: &Path) -> Result<Outcome, Error> {
    let dir = File::open(point).map_err(|e| {
        let errno = e.raw_os_error().and_then(Errno::from_code).unwrap_or(Errno::EIO);
        eprintln!("blksnapd: freeze: open {}: {e}", point.display());
        Error::new(errno, "freeze: cannot open a mount point of the origin")
    })?;
    match ioctl_noarg(&dir, FIFREEZE) {
        Ok(()) => Ok(Outcome::Frozen(dir)),
        Err(e) => match e.raw_os_error() {
            Some(libc::EBUSY) => Ok(Outcome::Skipped("already frozen by someone else".into())),
            Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL) => {
                Ok(Outcome::Skipped(format!("this filesystem cannot be frozen ({e})")))
            }
            _ => Ok(Outcome::Skipped(format!("FIFREEZE failed ({e})"))),
        },
    }
}

/// Filesystems frozen for a take; thawed when dropped (or by [`Frozen::thaw`]).
#[derive(Debug, Default)]
pub struct Frozen {
    held: Vec<(PathBuf, File)>,
}

impl Frozen {
    /// How many filesystems are held frozen.
    pub fn count(&self) -> usize {
        self.held.len()
    }

    /// Thaws every filesystem frozen here (in reverse order), logging failures.
    pub fn thaw(&mut self) {
        while let Some((point, f)) = self.held.pop() {
            if let Err(e) = ioctl_noarg(&f, FITHAW) {
                eprintln!("blksnapd: thaw {}: {e}", point.display());
            }
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.thaw();
    }
}

/// What a freeze helper thread and its waiter share: whether the waiter gave up, so that a
/// freeze completing after the timeout is undone by the helper itself.
#[derive(Default)]
struct Handoff {
    abandoned: bool,
}

/// Freezes each of `mounts` in turn, waiting at most `timeout` for each; see the module docs.
/// On error nothing stays frozen.
pub fn freeze_all(mounts: &[Mount], timeout: Duration) -> Result<Frozen, Error> {
    freeze_with(mounts, timeout, freeze_one)
}

/// [`freeze_all`] with the per-filesystem operation given (tests inject slow or failing ones).
fn freeze_with(
    mounts: &[Mount],
    timeout: Duration,
    op: fn(&Path) -> Result<Outcome, Error>,
) -> Result<Frozen, Error> {
    let mut frozen = Frozen::default();
    for m in mounts {
        let handoff = Arc::new(Mutex::new(Handoff::default()));
        let (tx, rx) = mpsc::channel();
        let (h, point) = (handoff.clone(), m.point.clone());
        let spawned = std::thread::Builder::new().name("blksnapd-freeze".into()).spawn(move || {
            let r = op(&point);
            let h = h.lock().unwrap_or_else(|p| p.into_inner());
            if h.abandoned {
                // The waiter timed out and went on without us: undo a late freeze here.
                if let Ok(Outcome::Frozen(f)) = &r {
                    let _ = ioctl_noarg(f, FITHAW);
                    eprintln!("blksnapd: {}: froze after the timeout; thawed", point.display());
                }
                return;
            }
            let _ = tx.send(r);
        });
        if spawned.is_err() {
            return Err(Error::new(Errno::ENOMEM, "freeze: cannot spawn a helper thread"));
        }
        let r = match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(_) => {
                // The helper may be sending right now: decide under the lock who owns it.
                let mut h = handoff.lock().unwrap_or_else(|p| p.into_inner());
                match rx.try_recv() {
                    Ok(r) => r,
                    Err(_) => {
                        h.abandoned = true;
                        drop(h);
                        eprintln!(
                            "blksnapd: freeze {} did not complete within {} s: take refused",
                            m.point.display(),
                            timeout.as_secs_f64()
                        );
                        return Err(Error::new(
                            Errno::EAGAIN,
                            "a filesystem on the origin did not freeze in time",
                        ));
                    }
                }
            }
        };
        match r? {
            Outcome::Frozen(f) => frozen.held.push((m.point.clone(), f)),
            Outcome::Skipped(why) => eprintln!(
                "blksnapd: {} ({}): not frozen: {why}; its image is crash-consistent",
                m.point.display(),
                m.dev
            ),
        }
    }
    Ok(frozen)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
30 1 259:0 / /mnt/a\\040b rw,relatime shared:1 - ext4 /dev/ublkb0 rw
31 1 259:0 /sub /bind rw,relatime - ext4 /dev/ublkb0 rw
32 1 259:1 / /mnt/p1 rw - ext2 /dev/ublkb0p1 rw
33 1 8:1 / / rw - ext4 /dev/sda1 rw
";

    #[test]
    fn finds_one_mount_per_device_and_unescapes() {
        let devs: BTreeSet<DeviceId> =
            [DeviceId::new(259, 0), DeviceId::new(259, 1)].into_iter().collect();
        let m = mounts_in(INFO, &devs);
        assert_eq!(
            m,
            vec![
                Mount { dev: DeviceId::new(259, 0), point: PathBuf::from("/mnt/a b") },
                Mount { dev: DeviceId::new(259, 1), point: PathBuf::from("/mnt/p1") },
            ]
        );
        assert!(mounts_in(INFO, &BTreeSet::new()).is_empty());
        assert!(mounts_in("garbage\n1 2 x:y / /m\n", &devs).is_empty());
        assert_eq!(unescape("a\\134b\\011"), PathBuf::from("a\\b\t"));
        assert_eq!(unescape("tail\\04"), PathBuf::from("tail\\04"));
    }

    fn mount(p: &str) -> Mount {
        Mount { dev: DeviceId::new(1, 1), point: PathBuf::from(p) }
    }

    #[test]
    fn skipped_filesystems_do_not_fail_the_take() {
        fn skip(_: &Path) -> Result<Outcome, Error> {
            Ok(Outcome::Skipped("cannot".into()))
        }
        let f = freeze_with(&[mount("/a"), mount("/b")], Duration::from_secs(5), skip).unwrap();
        assert_eq!(f.count(), 0);
    }

    #[test]
    fn errors_and_timeouts_fail_the_take() {
        fn fail(_: &Path) -> Result<Outcome, Error> {
            Err(Error::new(Errno::ENOENT, "gone"))
        }
        let e = freeze_with(&[mount("/a")], Duration::from_secs(5), fail).unwrap_err();
        assert_eq!(e.errno, Errno::ENOENT);
        fn slow(_: &Path) -> Result<Outcome, Error> {
            std::thread::sleep(Duration::from_millis(300));
            Ok(Outcome::Skipped("late".into()))
        }
        let t = std::time::Instant::now();
        let e = freeze_with(&[mount("/a")], Duration::from_millis(50), slow).unwrap_err();
        assert_eq!(e.errno, Errno::EAGAIN);
        assert!(t.elapsed() < Duration::from_millis(250), "the timeout bounds the wait");
    }
}
