//! The state directory (`state_dir`, default `/var/lib/blksnap`): what survives a restart.
//!
//! * `running` — the marker: created (with the daemon's pid) when the daemon starts, removed at
//!   the very end of a clean stop. Found at start, it means the last run did not stop cleanly
//!   (crash, `kill -9`, power loss): no saved CBT is trusted and every tracker starts a new
//!   generation, so no backup client can take a stale map for a complete one.
//! * `cbt-<hash>.state` — one per tracked device, written at a clean stop after the device's
//!   ublk device was stopped (no write can reach it any more): the tracker's whole [`CbtState`]
//!   plus the device's identity and write witness ([`Identity`]: the restore rule). A file is
//!   consumed (removed) when it is loaded, so it is used at most once.
//! * `devices` — the ublk devices this daemon runs (origins by backing, images), rewritten on
//!   every change, for user recovery after an unclean stop or a clean stop that kept the devices
//!   (`keep_devices`): the origins are taken over, stale image devices deleted; stamped with the
//!   boot id, ignored after a reboot. Removed by a clean stop that removes the devices.
//!
//! Every file is written to a temporary name, fsynced, renamed over the old one, and the
//! directory fsynced. State files are `MAGIC`, a format version, the postcard payload and a
//! CRC-32 of everything before it; anything that does not check out is refused with a reason.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use blksnap_engine::cbt::CbtState;
use blksnap_model::Uuid;
use serde::{Deserialize, Serialize};

/// The marker's file name.
pub const MARKER: &str = "running";
/// The device map's file name.
pub const DEVICES: &str = "devices";
const MAGIC: &[u8; 8] = b"BLKSNAPS";
/// Format version of the state files (bump on any payload change).
pub const FORMAT_VERSION: u32 = 2;
const HEADER: usize = 12;

/// CRC-32 (IEEE 802.3, reflected, as zlib's `crc32`).
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for b in data {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// What identifies the device a CBT was saved for, and what witnesses that nothing wrote to
/// it while no daemon served it.
///
/// The rule (README "Restarts"): a saved map is restored only when the daemon can show that no
/// write reached the backing between its final flush at the clean stop and the restart;
/// otherwise the tracker starts a new generation (the client then takes a full backup: honest,
/// never silent).
/// * a regular file: same device and inode, same size, same mtime **and ctime** (ns). Any
///   write (`write`, `mmap`, truncate, `fallocate`) moves both; mtime can be set back by
///   anyone with `touch -d`, ctime cannot (only by changing the clock).
/// * a block device: the kernel's own write counters of the device ([`Witness`]) — write and
///   discard I/Os and sectors from `/sys/dev/block/MAJ:MIN/stat`, also those of the whole disk
///   when it is a partition (a write to the disk may land in the partition) — with the disk's
///   `diskseq` (a loop device re-attached to another file gets a new one) and the boot id (the
///   counters restart at boot). Restored only in the same boot with every counter unchanged
///   since the final flush. After a reboot, or where the counters are unavailable (I/O
///   statistics turned off: `queue/iostats` 0), a block device always starts a new generation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Canonical backing path.
    pub backing: String,
    /// Capacity in bytes.
    pub capacity_bytes: u64,
    /// `st_dev`, `st_ino` of a regular backing file; `st_rdev`, 0 of a block device.
    pub file_id: (u64, u64),
    /// mtime (ns) of a regular backing file after its last write through the daemon; 0 for
    /// devices.
    pub mtime_ns: i128,
    /// ctime (ns) of a regular backing file after its last write through the daemon; 0 for
    /// devices.
    pub ctime_ns: i128,
    /// The write witness of a block device (None for files, and for a device without
    /// usable counters — which then never has its map restored).
    pub witness: Option<Witness>,
}

/// The kernel's evidence of writes to a block device (see [`Identity`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Witness {
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
    /// The whole disk's `diskseq` (0 on kernels without it).
    pub diskseq: u64,
    /// Write I/Os, write sectors, discard I/Os, discard sectors of the device, then of its
    /// whole disk if it is a partition.
    pub counters: Vec<u64>,
}

impl Witness {
    /// The witness of the block device `rdev` now; `Err` says why there is none.
    pub fn read(rdev: u64) -> Result<Witness, String> {
        let sys =
            PathBuf::from(format!("/sys/dev/block/{}:{}", libc::major(rdev), libc::minor(rdev)));
        let sys = std::fs::canonicalize(&sys).map_err(|e| format!("{}: {e}", sys.display()))?;
        let whole = if sys.join("partition").exists() {
            sys.parent().map(Path::to_path_buf).ok_or("partition without a disk")?
        } else {
            sys.clone()
        };
        let iostats = std::fs::read_to_string(whole.join("queue/iostats")).unwrap_or_default();
        if iostats.trim() != "1" {
            return Err("the device keeps no I/O statistics (queue/iostats is not 1)".into());
        }
        wait_idle(&sys);
        let mut counters = stat_counters(&sys)?;
        if whole != sys {
            counters.extend(stat_counters(&whole)?);
        }
        let diskseq = std::fs::read_to_string(whole.join("diskseq"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        Ok(Witness { boot_id: boot_id(), diskseq, counters })
    }
}

/// Waits (up to 1 s) until the device has no request in flight: the block layer counts a
/// request in `stat` after its completion has woken the waiter, so a counter read right after
/// a flush could miss the last request (and make the next start refuse the map needlessly).
fn wait_idle(sys: &Path) {
    for _ in 0..100 {
        let t = std::fs::read_to_string(sys.join("inflight")).unwrap_or_default();
        if t.split_whitespace().all(|n| n == "0") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(20));
}

/// Write I/Os, write sectors, discard I/Os, discard sectors from a sysfs `stat` file
/// (Documentation/block/stat.rst: fields 5, 7, 12, 14; discards since Linux 4.18).
fn stat_counters(sys: &Path) -> Result<Vec<u64>, String> {
    let path = sys.join("stat");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let f: Vec<u64> = text.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    if f.len() < 15 {
        return Err(format!("{}: {} fields, no discard counters", path.display(), f.len()));
    }
    Ok(vec![f[4], f[6], f[11], f[13]])
}

impl Identity {
    /// The identity of `backing` as it is now.
    pub fn of(backing: &Path, capacity_bytes: u64) -> std::io::Result<Identity> {
        let canonical = std::fs::canonicalize(backing)?;
        let meta = std::fs::metadata(&canonical)?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        let (file_id, mtime_ns, ctime_ns, witness) = if meta.file_type().is_block_device() {
            let witness = Witness::read(meta.rdev())
                .map_err(|why| {
                    eprintln!("blksnapd: {}: no write witness: {why}", canonical.display())
                })
                .ok();
            ((meta.rdev(), 0), 0, 0, witness)
        } else {
            (
                (meta.dev(), meta.ino()),
                ns(meta.mtime(), meta.mtime_nsec()),
                ns(meta.ctime(), meta.ctime_nsec()),
                None,
            )
        };
        Ok(Identity {
            backing: canonical.display().to_string(),
            capacity_bytes,
            file_id,
            mtime_ns,
            ctime_ns,
            witness,
        })
    }

    /// Why `self` (saved at the clean stop) does not show that the backing is unwritten since
    /// then (`now`), if it does not.
    pub fn mismatch(&self, now: &Identity) -> Option<String> {
        if self.backing != now.backing {
            Some(format!("saved for {}, not {}", self.backing, now.backing))
        } else if self.capacity_bytes != now.capacity_bytes {
            Some(format!(
                "device resized: {} bytes when saved, {} now",
                self.capacity_bytes, now.capacity_bytes
            ))
        } else if self.file_id != now.file_id {
            Some("the backing is another file than when saved (device/inode differ)".into())
        } else if self.mtime_ns != now.mtime_ns || self.ctime_ns != now.ctime_ns {
            Some("the backing file was modified while the daemon was stopped (mtime/ctime)".into())
        } else if self.file_id.1 == 0 {
            // A block device: only its write witness can show it was not written.
            match (&self.witness, &now.witness) {
                (Some(then), Some(now)) if then.boot_id != now.boot_id => Some(
                    "the system was rebooted since the stop: a block device's write counters \
                     cannot show it was not written"
                        .into(),
                ),
                (Some(then), Some(now)) if then.diskseq != now.diskseq => {
                    Some("the block device was replaced (diskseq changed)".into())
                }
                (Some(then), Some(now)) if then.counters != now.counters => Some(
                    "the block device was written while the daemon was stopped (its write \
                     counters moved)"
                        .into(),
                ),
                (Some(_), Some(_)) => None,
                _ => Some("no write witness for this block device".into()),
            }
        } else {
            None
        }
    }
}

/// A saved tracker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SavedCbt {
    /// The device.
    pub identity: Identity,
    /// log2 of the block size.
    pub block_shift: u32,
    /// Capacity in sectors the map was made for.
    pub capacity_sectors: u64,
    /// The live map.
    pub write_map: Vec<u8>,
    /// The map frozen at the last take.
    pub read_map: Vec<u8>,
    /// `snap_number_active`.
    pub active: u8,
    /// `snap_number_previous`.
    pub previous: u8,
    /// Generation id.
    pub generation: [u8; 16],
}

impl SavedCbt {
    /// From the engine's export.
    pub fn new(identity: Identity, s: CbtState) -> SavedCbt {
        SavedCbt {
            identity,
            block_shift: s.block_shift,
            capacity_sectors: s.capacity_sectors,
            write_map: s.write_map,
            read_map: s.read_map,
            active: s.active,
            previous: s.previous,
            generation: s.generation.0,
        }
    }

    /// The engine's form.
    pub fn cbt(self) -> CbtState {
        CbtState {
            block_shift: self.block_shift,
            capacity_sectors: self.capacity_sectors,
            write_map: self.write_map,
            read_map: self.read_map,
            active: self.active,
            previous: self.previous,
            generation: Uuid(self.generation),
        }
    }
}

/// Role of a ublk device in the device map.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum MapRole {
    /// An origin in front of this (canonical) backing.
    Origin(String),
    /// A snapshot image.
    Image,
}

/// One running ublk device.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// The frontend's device handle (ublk device id N of `/dev/ublkbN`).
    pub handle: u32,
    /// What it is.
    pub role: MapRole,
}

/// Encodes `payload` as a state file's bytes.
pub fn encode<T: Serialize>(payload: &T) -> Result<Vec<u8>, String> {
    let body = postcard::to_stdvec(payload).map_err(|e| format!("encode: {e}"))?;
    let mut out = Vec::with_capacity(HEADER + body.len() + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&body);
    let crc = crc32(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Decodes a state file's bytes; the error says why they are refused.
pub fn decode<T: for<'a> Deserialize<'a>>(bytes: &[u8]) -> Result<T, String> {
    if bytes.len() < HEADER + 4 || &bytes[..8] != MAGIC {
        return Err("not a blksnapd state file (bad magic or truncated)".into());
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(format!("state format version {version}, this daemon reads {FORMAT_VERSION}"));
    }
    let (data, crc) = bytes.split_at(bytes.len() - 4);
    if crc32(data) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err("checksum mismatch (corrupted or torn file)".into());
    }
    let (msg, rest) = postcard::take_from_bytes(&data[HEADER..])
        .map_err(|e| format!("malformed payload: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the payload".into());
    }
    Ok(msg)
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` atomically and durably (temp + fsync + rename + directory fsync).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, bytes, None)
}

/// As [`write_atomic`], with the simulation's faults (if any). A failed write removes its
/// temporary file (a full disk must not leave a stray file behind).
fn write_atomic_with(path: &Path, bytes: &[u8], faults: Option<&Faults>) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let fault = faults.map_or(Ok(Fault::None), |f| f.next(path))?;
    let written = (|| {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        match fault {
            Fault::None => f.write_all(bytes)?,
            Fault::NoSpace(keep) | Fault::Crash(keep) => {
                f.write_all(&bytes[..keep.min(bytes.len())])?;
                return Err(std::io::Error::from_raw_os_error(match fault {
                    Fault::NoSpace(_) => libc::ENOSPC,
                    _ => libc::EIO,
                }));
            }
        }
        f.sync_all()
    })();
    if let Err(e) = written {
        if !matches!(fault, Fault::Crash(_)) {
            let _ = std::fs::remove_file(&tmp);
        }
        return Err(e);
    }
    std::fs::rename(&tmp, path)?;
    fsync_dir(dir)
}

/// A fault the simulation injects into one change of the state directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    /// The write fails with ENOSPC after this many bytes reached the temporary file.
    NoSpace(usize),
    /// The process dies after this many bytes reached the temporary file: nothing it does
    /// later reaches the directory.
    Crash(usize),
}

/// Fault injection for the state directory (the daemon simulation, `crate::sim`): counts the
/// changes made to the directory (file writes and removals) and fails the one armed, either
/// with ENOSPC (a full disk: the daemon goes on) or as a crash (the write is torn in its
/// temporary file and from then on nothing reaches the directory: the process is dead as far
/// as the disk can tell). Not used by the daemon itself.
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct Faults {
    inner: std::sync::Mutex<FaultState>,
    /// Backing files the simulation presents as block devices: canonical path → the device's
    /// write witness as the kernel would report it now (see [`StateDir::identity`]).
    block_devices: std::sync::Mutex<std::collections::BTreeMap<String, Witness>>,
}

#[derive(Debug, Default)]
struct FaultState {
    changes: u64,
    armed: Option<(u64, bool, usize)>,
    dead: bool,
    hit: Option<PathBuf>,
}

impl Faults {
    /// Presents the backing file `canonical` as a block device whose witness is now `witness`
    /// (the simulation moves the counters on a write while no daemon runs, the boot id on a
    /// reboot, the diskseq on a re-attached loop device).
    pub fn set_block_witness(&self, canonical: &str, witness: Witness) {
        let mut b = self.block_devices.lock().unwrap_or_else(|p| p.into_inner());
        b.insert(canonical.to_string(), witness);
    }

    /// The witness set for `canonical`, if it is presented as a block device.
    pub fn block_witness(&self, canonical: &str) -> Option<Witness> {
        let b = self.block_devices.lock().unwrap_or_else(|p| p.into_inner());
        b.get(canonical).cloned()
    }

    /// Fails the `at`-th change from now (0: the next one): ENOSPC, or a crash when `crash`;
    /// a failing write leaves `keep` bytes in its temporary file.
    pub fn arm(&self, at: u64, crash: bool, keep: usize) {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let changes = s.changes;
        s.armed = Some((changes + at, crash, keep));
        s.hit = None;
    }

    /// Disarms; a "dead" directory is alive again (the next process).
    pub fn reset(&self) {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        s.armed = None;
        s.dead = false;
        s.hit = None;
    }

    /// Changes counted so far.
    pub fn changes(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).changes
    }

    /// The file whose change the armed fault hit, once it did.
    pub fn hit(&self) -> Option<PathBuf> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).hit.clone()
    }

    /// Whether a crash fault was hit (nothing reaches the directory any more).
    pub fn dead(&self) -> bool {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).dead
    }

    fn next(&self, path: &Path) -> std::io::Result<Fault> {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if s.dead {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        let n = s.changes;
        s.changes += 1;
        match s.armed {
            Some((at, crash, keep)) if at == n => {
                s.armed = None;
                s.hit = Some(path.to_path_buf());
                s.dead = crash;
                Ok(if crash { Fault::Crash(keep) } else { Fault::NoSpace(keep) })
            }
            _ => Ok(Fault::None),
        }
    }

    /// A removal: refused once dead; an armed fault on a removal is a crash before it (a
    /// removal cannot run out of space) or nothing.
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        match self.next(path)? {
            Fault::Crash(_) => Err(std::io::Error::from_raw_os_error(libc::EIO)),
            _ => Ok(()),
        }
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`; empty when unavailable).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The state directory of a running daemon.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    unclean: bool,
    faults: Option<std::sync::Arc<Faults>>,
}

impl StateDir {
    /// Opens (creating it, mode 0700) the directory, notes whether the last run stopped
    /// uncleanly (marker present) and creates the marker for this run.
    pub fn open(dir: &Path) -> std::io::Result<StateDir> {
        StateDir::open_with_faults(dir, None)
    }

    /// As [`StateDir::open`], every change of the directory passing `faults` (the daemon
    /// simulation).
    #[doc(hidden)]
    pub fn open_with_faults(
        dir: &Path,
        faults: Option<std::sync::Arc<Faults>>,
    ) -> std::io::Result<StateDir> {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let marker = dir.join(MARKER);
        let unclean = marker.exists();
        // Temporary files of a previous run that died while writing (`write_atomic`): never
        // renamed, so never part of the state.
        for entry in std::fs::read_dir(dir)?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let sd = StateDir { dir: dir.to_path_buf(), unclean, faults };
        sd.write(&marker, format!("{}\n", std::process::id()).as_bytes())?;
        Ok(sd)
    }

    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        write_atomic_with(path, bytes, self.faults.as_deref())
    }

    fn remove(&self, path: &Path) -> std::io::Result<()> {
        if let Some(f) = &self.faults {
            f.remove(path)?;
        }
        std::fs::remove_file(path)
    }

    /// The identity of `backing` now ([`Identity::of`]); in the simulation a backing file
    /// presented as a block device gets a block device's identity with the simulated witness.
    pub fn identity(&self, backing: &Path, capacity_bytes: u64) -> std::io::Result<Identity> {
        let mut identity = Identity::of(backing, capacity_bytes)?;
        let simulated = self.faults.as_ref().and_then(|f| f.block_witness(&identity.backing));
        if let Some(witness) = simulated {
            // As `Identity::of` gives a block device: its number, no times, the witness.
            identity.file_id = (identity.file_id.1, 0);
            identity.mtime_ns = 0;
            identity.ctime_ns = 0;
            identity.witness = Some(witness);
        }
        Ok(identity)
    }

    /// Whether the previous run ended without a clean stop.
    pub fn unclean(&self) -> bool {
        self.unclean
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The state file of the device backed by `backing` (canonical path).
    pub fn cbt_path(&self, backing: &str) -> PathBuf {
        StateDir::cbt_path_in(&self.dir, backing)
    }

    /// The state file of the device backed by `backing` (canonical path) in the state
    /// directory `dir`.
    pub fn cbt_path_in(dir: &Path, backing: &str) -> PathBuf {
        let h = backing.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        dir.join(format!("cbt-{h:016x}.state"))
    }

    /// Saves a tracker.
    pub fn save_cbt(&self, saved: &SavedCbt) -> Result<PathBuf, String> {
        let path = self.cbt_path(&saved.identity.backing);
        let bytes = encode(saved)?;
        self.write(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(path)
    }

    /// The saved tracker for `now`'s device, if one exists and matches; consumes the file.
    /// `Err` says why a file that exists is not used.
    pub fn take_cbt(&self, now: &Identity) -> Result<Option<SavedCbt>, String> {
        let path = self.cbt_path(&now.backing);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let _ = self.remove(&path);
        let _ = fsync_dir(&self.dir);
        if self.unclean {
            return Err("the previous run did not stop cleanly (marker present)".into());
        }
        let saved: SavedCbt = decode(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(why) = saved.identity.mismatch(now) {
            return Err(why);
        }
        Ok(Some(saved))
    }

    /// The device map of the previous run: empty when missing, unreadable, or written in
    /// another boot (ublk device ids start again at every boot: the entries would name other
    /// programs' devices).
    pub fn load_map(&self) -> Vec<MapEntry> {
        let map: Option<(String, Vec<MapEntry>)> =
            std::fs::read(self.dir.join(DEVICES)).ok().and_then(|b| decode(&b).ok());
        match map {
            Some((boot, entries)) if boot == boot_id() => entries,
            _ => Vec::new(),
        }
    }

    /// Replaces the device map (stamped with this boot's id).
    pub fn save_map(&self, map: &[MapEntry]) -> Result<(), String> {
        let bytes = encode(&(boot_id(), map.to_vec()))?;
        self.write(&self.dir.join(DEVICES), &bytes).map_err(|e| format!("device map: {e}"))
    }

    /// Clean stop that leaves its origin devices to the next daemon: the device map stays (the
    /// next start takes those devices over), the marker is removed (last).
    pub fn close_keeping_devices(self) -> std::io::Result<()> {
        self.remove(&self.dir.join(MARKER))?;
        fsync_dir(&self.dir)
    }

    /// Clean stop: removes the device map and then the marker (last).
    pub fn close_clean(self) -> std::io::Result<()> {
        let _ = self.remove(&self.dir.join(DEVICES));
        self.remove(&self.dir.join(MARKER))?;
        fsync_dir(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(backing: &str) -> SavedCbt {
        SavedCbt {
            identity: Identity {
                backing: backing.into(),
                capacity_bytes: 1 << 20,
                file_id: (1, 2),
                mtime_ns: 3,
                ctime_ns: 4,
                witness: None,
            },
            block_shift: 16,
            capacity_sectors: 2048,
            write_map: vec![0, 2, 0, 1],
            read_map: vec![0, 1, 0, 1],
            active: 2,
            previous: 1,
            generation: [9; 16],
        }
    }

    #[test]
    fn the_restore_rule() {
        let file = saved("/f").identity;
        assert_eq!(file.mismatch(&file), None);
        let mut touched = file.clone();
        touched.ctime_ns += 1; // written, then mtime set back
        assert!(file.mismatch(&touched).unwrap().contains("modified"));
        let w = Witness { boot_id: "b".into(), diskseq: 7, counters: vec![1, 8, 0, 0] };
        let dev = Identity {
            backing: "/dev/x".into(),
            capacity_bytes: 1 << 20,
            file_id: (0x0801, 0),
            mtime_ns: 0,
            ctime_ns: 0,
            witness: Some(w.clone()),
        };
        assert_eq!(dev.mismatch(&dev), None, "same boot, same disk, counters unchanged");
        let with = |f: &dyn Fn(&mut Witness)| {
            let mut now = dev.clone();
            f(now.witness.as_mut().unwrap());
            dev.mismatch(&now)
        };
        assert!(with(&|w| w.counters[1] += 8).unwrap().contains("written"));
        assert!(with(&|w| w.counters[2] += 1).unwrap().contains("written"), "a discard");
        assert!(with(&|w| w.boot_id = "c".into()).unwrap().contains("rebooted"));
        assert!(with(&|w| w.diskseq += 1).unwrap().contains("replaced"));
        let mut blind = dev.clone();
        blind.witness = None;
        assert!(dev.mismatch(&blind).unwrap().contains("no write witness"));
        assert!(blind.mismatch(&dev).unwrap().contains("no write witness"));
        let sys = tempfile::tempdir().unwrap();
        std::fs::write(sys.path().join("stat"), "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15\n").unwrap();
        assert_eq!(stat_counters(sys.path()).unwrap(), vec![5, 7, 12, 14]);
        std::fs::write(sys.path().join("stat"), "1 2 3 4 5 6 7 8 9 10 11\n").unwrap();
        assert!(stat_counters(sys.path()).is_err(), "no discard counters: no witness");
    }

    #[test]
    fn a_stop_that_keeps_devices_keeps_the_map_and_is_clean() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        let map = vec![MapEntry { handle: 1, role: MapRole::Origin("/x".into()) }];
        sd.save_map(&map).unwrap();
        sd.close_keeping_devices().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        assert!(!sd.unclean(), "a kept-devices stop is clean");
        assert_eq!(sd.load_map(), map, "the next start finds the devices to take over");
        sd.close_clean().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        assert!(sd.load_map().is_empty(), "an ordinary clean stop removes the map");
    }

    #[test]
    fn crc_matches_zlib() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn files_round_trip_and_refuse_damage() {
        let s = saved("/x");
        let bytes = encode(&s).unwrap();
        assert_eq!(decode::<SavedCbt>(&bytes).unwrap(), s);
        // any flipped bit, any truncation
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(decode::<SavedCbt>(&b).is_err(), "flip at {i}");
            assert!(decode::<SavedCbt>(&bytes[..i]).is_err(), "truncated at {i}");
        }
        let mut other_version = bytes.clone();
        // version 1: the format before ctime and the block-device witness
        other_version[8] = 1;
        let crc = crc32(&other_version[..bytes.len() - 4]);
        let n = other_version.len();
        other_version[n - 4..].copy_from_slice(&crc.to_le_bytes());
        assert!(decode::<SavedCbt>(&other_version).unwrap_err().contains("version 1"));
    }

    #[test]
    fn marker_and_matching() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        assert!(!sd.unclean());
        let s = saved("/x");
        sd.save_cbt(&s).unwrap();
        // identity checks
        let mut other = s.identity.clone();
        other.capacity_bytes += 512;
        assert!(sd.take_cbt(&other).unwrap_err().contains("resized"));
        sd.save_cbt(&s).unwrap();
        assert_eq!(sd.take_cbt(&s.identity).unwrap(), Some(s.clone()));
        assert_eq!(sd.take_cbt(&s.identity).unwrap(), None, "consumed");
        sd.save_cbt(&s).unwrap();
        sd.close_clean().unwrap();
        // clean: the state is used
        let sd = StateDir::open(dir.path()).unwrap();
        assert!(!sd.unclean());
        assert!(sd.take_cbt(&s.identity).unwrap().is_some());
        sd.save_cbt(&s).unwrap();
        drop(sd); // no clean stop: the marker stays
        let sd = StateDir::open(dir.path()).unwrap();
        assert!(sd.unclean());
        assert!(sd.take_cbt(&s.identity).unwrap_err().contains("did not stop cleanly"));
        // a corrupted file
        sd.close_clean().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        let path = sd.save_cbt(&s).unwrap();
        let mut b = std::fs::read(&path).unwrap();
        b[20] ^= 1;
        std::fs::write(&path, b).unwrap();
        assert!(sd.take_cbt(&s.identity).unwrap_err().contains("checksum"));
        // the device map
        let map = vec![
            MapEntry { handle: 3, role: MapRole::Origin("/x".into()) },
            MapEntry { handle: 4, role: MapRole::Image },
        ];
        sd.save_map(&map).unwrap();
        assert_eq!(sd.load_map(), map);
        // a map of another boot names nothing
        let other = encode(&("another-boot".to_string(), map.clone())).unwrap();
        write_atomic(&dir.path().join(DEVICES), &other).unwrap();
        assert!(sd.load_map().is_empty());
    }
}
