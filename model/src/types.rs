//! The vocabulary shared by the model, the engine and every adapter.

use core::fmt;

use crate::errno::{Errno, Error, Result};
use crate::params::SECTOR_SIZE_BYTES;

/// A block device number, as the kernel's `MAJOR:MINOR`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

impl DeviceId {
    /// `MAJOR:MINOR`.
    pub const fn new(major: u32, minor: u32) -> DeviceId {
        DeviceId { major, minor }
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// A 16-byte RFC 4122 identifier (snapshot id, CBT generation id).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Uuid(pub [u8; 16]);

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Uuid {
    /// The canonical 8-4-4-4-12 lower-case hex form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl core::str::FromStr for Uuid {
    type Err = Error;
    /// Parses the canonical form (hyphens optional, either case).
    fn from_str(s: &str) -> Result<Uuid> {
        let hex: Vec<u8> = s.bytes().filter(|b| *b != b'-').collect();
        if hex.len() != 32 {
            return Err(Error::new(Errno::EINVAL, "a uuid has 32 hex digits"));
        }
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks(2).enumerate() {
            let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
            match (digit(pair[0]), digit(pair[1])) {
                (Some(h), Some(l)) => out[i] = h << 4 | l,
                _ => return Err(Error::new(Errno::EINVAL, "a uuid has only hex digits")),
            }
        }
        Ok(Uuid(out))
    }
}

/// A snapshot's identity (`blksnap_uuid`).
pub type SnapshotId = Uuid;

/// Deterministic generator of version-4 UUIDs: `uuid(n) = splitmix64` of `seed` and `n`.
///
/// Production seeds it from the OS; tests and the simulation give a fixed seed so that the model
/// and the engine produce the same ids in the same order. Distinct counters give distinct ids
/// (splitmix64 is a bijection on u64 and the counter is in the first half).
#[derive(Clone, Debug)]
pub struct IdGen {
    seed: u64,
    next: u64,
}

/// One step of splitmix64: a bijective mix of 64 bits.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl IdGen {
    /// A generator whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> IdGen {
        IdGen { seed, next: 0 }
    }

    /// The `n`-th id of the sequence of `seed` (pure; [`IdGen::next_id`] walks it).
    pub fn nth(seed: u64, n: u64) -> Uuid {
        let high = splitmix64(n ^ splitmix64(seed));
        let low = splitmix64(high ^ seed.rotate_left(17));
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&high.to_be_bytes());
        b[8..].copy_from_slice(&low.to_be_bytes());
        b[6] = (b[6] & 0x0f) | 0x40; // version 4
        b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
        Uuid(b)
    }

    /// The next id.
    pub fn next_id(&mut self) -> Uuid {
        let id = IdGen::nth(self.seed, self.next);
        self.next += 1;
        id
    }
}

/// A range of sectors (`blksnap_sectors`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SectorRange {
    /// First sector.
    pub offset: u64,
    /// Number of sectors.
    pub count: u64,
}

impl SectorRange {
    /// `{offset, count}`.
    pub const fn new(offset: u64, count: u64) -> SectorRange {
        SectorRange { offset, count }
    }

    /// One past the last sector, or `None` if that overflows.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.count)
    }
}

/// Result of the `cbtinfo` ctl.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CbtInfo {
    /// Device capacity in bytes (the capacity when the map was created).
    pub device_capacity_bytes: u64,
    /// CBT block size in bytes.
    pub block_size_bytes: u32,
    /// Number of CBT blocks.
    pub block_count: u32,
    /// Changes when the map is reset or wraps: a different id means "full backup".
    pub generation_id: Uuid,
    /// `snap_number_previous`: the number the last take froze into the read map.
    pub changes_number: u8,
}

/// Result of the `snapshotinfo` ctl.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// 0, or the negative errno of the first failure of the device's diff area.
    pub error_code: i32,
    /// The original device whose image exists (name it with [`Profile::image_name`]),
    /// `None` when no image exists.
    pub image: Option<DeviceId>,
}

/// What an event says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// v3: the storage wants `requested_sectors` more (always `diff_storage_minimum`).
    LowFreeSpace {
        /// Sectors the client should append.
        requested_sectors: u64,
    },
    /// The diff area of `device` failed for good with `errno` (ENOSPC on overflow, EIO, ...).
    Corrupted {
        /// The original device.
        device: DeviceId,
        /// The first error (the C payload carries its positive number).
        errno: Errno,
    },
    /// newest: the storage hit its limit; `requested_sectors` is the current total requested.
    NoSpace {
        /// Total sectors requested so far.
        requested_sectors: u64,
    },
}

/// One entry of a snapshot's event queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Clock reading (ns) when the event was generated (`time_label`).
    pub time_ns: u64,
    /// The payload.
    pub kind: EventKind,
}

/// Interface generation a client speaks (`reference/blksnap-abi.md` §0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Profile {
    /// April 2023: APPEND_STORAGE, `low_free_space`, images `blksnap-image_MAJ:MIN`.
    V3,
    /// lk6.15: storage file + limit, `no_space`, images `blksnap-MAJ-MIN`.
    Newest,
}

impl Profile {
    /// The image disk name for `device` (`/dev/` + this is what clients open).
    pub fn image_name(self, device: DeviceId) -> String {
        match self {
            Profile::V3 => format!("blksnap-image_{}:{}", device.major, device.minor),
            Profile::Newest => format!("blksnap-{}-{}", device.major, device.minor),
        }
    }

    /// The event code of `kind` in this profile, or `None` if the profile has no such event.
    pub fn event_code(self, kind: &EventKind) -> Option<u32> {
        match (self, kind) {
            (Profile::V3, EventKind::LowFreeSpace { .. }) => Some(0),
            (Profile::V3, EventKind::Corrupted { .. }) => Some(1),
            (Profile::V3, EventKind::NoSpace { .. }) => None,
            (Profile::Newest, EventKind::Corrupted { .. }) => Some(0),
            (Profile::Newest, EventKind::NoSpace { .. }) => Some(1),
            (Profile::Newest, EventKind::LowFreeSpace { .. }) => None,
        }
    }
}

/// How a snapshot's difference storage is provided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageMode {
    /// v3: empty at create (a `LowFreeSpace` event asks for the first portion); the client
    /// appends sector ranges; TAKE needs capacity > 0.
    Ranges,
    /// newest: one file or block device, grown by the storage itself up to a limit.
    File {
        /// Upper bound on the storage's size, in sectors.
        limit_sectors: u64,
        /// A regular file can grow; a block device cannot (and never emits `NoSpace`).
        growable: bool,
    },
}

/// Which I/O a fault applies to, for fault injection shared by the model and the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoKind {
    /// `read_at`.
    Read,
    /// `write_at` (including zero-fill writes).
    Write,
}

/// Where a fault is injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultTarget {
    /// The backing of an original device.
    Origin(DeviceId),
    /// Every backend of the difference storage (all snapshots).
    Storage,
}

/// Checks an I/O request's geometry: sector-aligned offset and length, inside `capacity_bytes`.
pub fn check_io_range(offset_bytes: u64, len_bytes: u64, capacity_bytes: u64) -> Result<()> {
    if !offset_bytes.is_multiple_of(SECTOR_SIZE_BYTES)
        || !len_bytes.is_multiple_of(SECTOR_SIZE_BYTES)
    {
        return Err(Error::new(Errno::EINVAL, "I/O offset and length must be multiples of 512"));
    }
    match offset_bytes.checked_add(len_bytes) {
        Some(end) if end <= capacity_bytes => Ok(()),
        _ => Err(Error::new(Errno::EINVAL, "I/O beyond the end of the device")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_round_trip_and_version() {
        let mut g = IdGen::new(7);
        let a = g.next_id();
        let b = g.next_id();
        assert_ne!(a, b);
        assert_eq!(a, IdGen::nth(7, 0));
        assert_eq!(a.0[6] >> 4, 4);
        assert_eq!(a.0[8] >> 6, 2);
        let text = a.to_string();
        assert_eq!(text.len(), 36);
        assert_eq!(text.parse::<Uuid>().unwrap(), a);
        assert_eq!(text.replace('-', "").to_uppercase().parse::<Uuid>().unwrap(), a);
        assert_eq!("xyz".parse::<Uuid>().unwrap_err().errno, Errno::EINVAL);
        assert_eq!("g".repeat(32).parse::<Uuid>().unwrap_err().errno, Errno::EINVAL);
    }

    #[test]
    fn image_names_per_profile() {
        let d = DeviceId::new(7, 0);
        assert_eq!(Profile::V3.image_name(d), "blksnap-image_7:0");
        assert_eq!(Profile::Newest.image_name(d), "blksnap-7-0");
    }

    #[test]
    fn event_codes_per_profile() {
        let c = EventKind::Corrupted { device: DeviceId::new(1, 2), errno: Errno::ENOSPC };
        let l = EventKind::LowFreeSpace { requested_sectors: 1 };
        let n = EventKind::NoSpace { requested_sectors: 1 };
        assert_eq!(Profile::V3.event_code(&l), Some(0));
        assert_eq!(Profile::V3.event_code(&c), Some(1));
        assert_eq!(Profile::Newest.event_code(&c), Some(0));
        assert_eq!(Profile::Newest.event_code(&n), Some(1));
        assert_eq!(Profile::V3.event_code(&n), None);
    }

    #[test]
    fn io_range_rules() {
        assert!(check_io_range(0, 512, 512).is_ok());
        assert!(check_io_range(0, 0, 0).is_ok());
        assert_eq!(check_io_range(1, 512, 4096).unwrap_err().errno, Errno::EINVAL);
        assert_eq!(check_io_range(0, 1024, 512).unwrap_err().errno, Errno::EINVAL);
        assert_eq!(
            check_io_range(u64::MAX - 511, 1024, u64::MAX).unwrap_err().errno,
            Errno::EINVAL
        );
    }
}
