//! The state directory (`state_dir`, default `/var/lib/blksnap`): what survives a restart.
//!
//! * `running` — the marker: created (with the daemon's pid) when the daemon starts, removed at
//!   the very end of a clean stop. Found at start, it means the last run did not stop cleanly
//!   (crash, `kill -9`, power loss): no saved CBT is trusted and every tracker starts a new
//!   generation, so no backup client can take a stale map for a complete one.
//! * `cbt-<hash>.state` — one per tracked device, written at a clean stop after the device's
//!   ublk device was stopped (no write can reach it any more): the tracker's whole [`CbtState`]
//!   plus the device's identity (backing path, capacity, file identity and mtime). A file is
//!   consumed (removed) when it is loaded, so it is used at most once.
//! * `devices` — the ublk devices this daemon runs (origins by backing, images), rewritten on
//!   every change, for user recovery after an unclean stop (the origins are recovered, stale
//!   image devices deleted); stamped with the boot id, ignored after a reboot.
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
pub const FORMAT_VERSION: u32 = 1;
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

/// What identifies the device a CBT was saved for.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Canonical backing path.
    pub backing: String,
    /// Capacity in bytes.
    pub capacity_bytes: u64,
    /// `st_dev`, `st_ino` of a regular backing file; `st_rdev`, 0 of a block device.
    pub file_id: (u64, u64),
    /// mtime (ns) of a regular backing file after its last write through the daemon (a file
    /// changed behind the daemon's back would have writes the CBT never saw); 0 for devices.
    pub mtime_ns: i128,
}

impl Identity {
    /// The identity of `backing` as it is now.
    pub fn of(backing: &Path, capacity_bytes: u64) -> std::io::Result<Identity> {
        let canonical = std::fs::canonicalize(backing)?;
        let meta = std::fs::metadata(&canonical)?;
        let (file_id, mtime_ns) = if meta.file_type().is_block_device() {
            ((meta.rdev(), 0), 0)
        } else {
            (
                (meta.dev(), meta.ino()),
                i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            )
        };
        Ok(Identity { backing: canonical.display().to_string(), capacity_bytes, file_id, mtime_ns })
    }

    /// Why `self` (saved) is not `now`, if it is not.
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
        } else if self.mtime_ns != now.mtime_ns {
            Some("the backing file was modified while the daemon was stopped".into())
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
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    fsync_dir(dir)
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`; empty when unavailable).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The state directory of a running daemon.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    unclean: bool,
}

impl StateDir {
    /// Opens (creating it, mode 0700) the directory, notes whether the last run stopped
    /// uncleanly (marker present) and creates the marker for this run.
    pub fn open(dir: &Path) -> std::io::Result<StateDir> {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let marker = dir.join(MARKER);
        let unclean = marker.exists();
        write_atomic(&marker, format!("{}\n", std::process::id()).as_bytes())?;
        Ok(StateDir { dir: dir.to_path_buf(), unclean })
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
        let h = backing.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        self.dir.join(format!("cbt-{h:016x}.state"))
    }

    /// Saves a tracker.
    pub fn save_cbt(&self, saved: &SavedCbt) -> Result<PathBuf, String> {
        let path = self.cbt_path(&saved.identity.backing);
        let bytes = encode(saved)?;
        write_atomic(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
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
        let _ = std::fs::remove_file(&path);
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
        write_atomic(&self.dir.join(DEVICES), &bytes).map_err(|e| format!("device map: {e}"))
    }

    /// Clean stop: removes the device map and then the marker (last).
    pub fn close_clean(self) -> std::io::Result<()> {
        let _ = std::fs::remove_file(self.dir.join(DEVICES));
        std::fs::remove_file(self.dir.join(MARKER))?;
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
        other_version[8] = 2;
        let crc = crc32(&other_version[..bytes.len() - 4]);
        let n = other_version.len();
        other_version[n - 4..].copy_from_slice(&crc.to_le_bytes());
        assert!(decode::<SavedCbt>(&other_version).unwrap_err().contains("version 2"));
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
