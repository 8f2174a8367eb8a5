//! Module parameters (`reference/blksnap-semantics.md` §1), with the kernel's defaults.
//!
//! The kernel reads them on every use, except the chunk shift and the CBT block shift which are
//! fixed per object when it is created. Model and engine do the same: a changed parameter applies
//! to the next allocation, the next threshold check, the next attach or take.

use crate::errno::{Errno, Error, Result};

/// Bytes per sector: every `*_sectors` quantity in the project is in these units.
pub const SECTOR_SIZE_BYTES: u64 = 512;
/// log2 of [`SECTOR_SIZE_BYTES`].
pub const SECTOR_SHIFT: u32 = 9;
/// Smallest chunk shift the newest generation accepts (PAGE_SHIFT).
pub const PAGE_SHIFT: u32 = 12;

/// Tunables of the snapshot module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// log2 bytes of the smallest CBT block (default 16 = 64 KiB).
    pub tracking_block_minimum_shift: u32,
    /// Largest number of CBT blocks per device (default 2^21).
    pub tracking_block_maximum_count: u64,
    /// log2 bytes of the largest CBT block (default 26 = 64 MiB).
    pub tracking_block_maximum_shift: u32,
    /// log2 bytes of the smallest COW chunk (default 18 = 256 KiB).
    pub chunk_minimum_shift: u32,
    /// Largest number of chunks per device = 2^this (default 40).
    pub chunk_maximum_count_shift: u32,
    /// log2 bytes of the largest chunk (default 26 = 64 MiB).
    pub chunk_maximum_shift: u32,
    /// Difference-storage step in sectors (default 2 097 152 = 1 GiB): the v3 low-space request,
    /// the newest growth step; half of it is the low-space threshold.
    pub diff_storage_minimum_sectors: u64,
}

impl Default for Params {
    fn default() -> Params {
        Params {
            tracking_block_minimum_shift: 16,
            tracking_block_maximum_count: 2_097_152,
            tracking_block_maximum_shift: 26,
            chunk_minimum_shift: 18,
            chunk_maximum_count_shift: 40,
            chunk_maximum_shift: 26,
            diff_storage_minimum_sectors: 2_097_152,
        }
    }
}

/// Upper bound on every shift parameter: 2^62 bytes keeps every sector and byte computation
/// inside u64.
pub const SHIFT_LIMIT: u32 = 62;

impl Params {
    /// Small parameters for tests and simulation: 4 KiB CBT blocks and chunks, a 64-sector
    /// (32 KiB) storage step. Same rules, small numbers.
    pub fn small() -> Params {
        Params {
            tracking_block_minimum_shift: 12,
            tracking_block_maximum_count: 1 << 16,
            tracking_block_maximum_shift: 20,
            chunk_minimum_shift: 12,
            chunk_maximum_count_shift: 40,
            chunk_maximum_shift: 20,
            diff_storage_minimum_sectors: 64,
        }
    }

    /// The newest generation's load-time sanitising (§1), plus range checks the kernel lacks:
    /// shifts between 9 and [`SHIFT_LIMIT`], a non-zero block count. Returns the sanitised copy.
    pub fn sanitized(self) -> Result<Params> {
        let shifts = [
            self.tracking_block_minimum_shift,
            self.tracking_block_maximum_shift,
            self.chunk_minimum_shift,
            self.chunk_maximum_shift,
        ];
        if shifts.iter().any(|s| *s < SECTOR_SHIFT || *s > SHIFT_LIMIT) {
            return Err(Error::new(Errno::EINVAL, "shift parameters must lie in 9..=62"));
        }
        if self.tracking_block_maximum_count == 0 {
            return Err(Error::new(Errno::EINVAL, "tracking_block_maximum_count must be > 0"));
        }
        let mut p = self;
        p.tracking_block_maximum_shift =
            p.tracking_block_maximum_shift.max(p.tracking_block_minimum_shift);
        p.chunk_minimum_shift = p.chunk_minimum_shift.min(p.chunk_maximum_shift).max(PAGE_SHIFT);
        p.chunk_maximum_shift = p.chunk_maximum_shift.max(p.chunk_minimum_shift);
        let chunk_min_sectors = 1u64 << (p.chunk_minimum_shift - SECTOR_SHIFT);
        p.diff_storage_minimum_sectors = p.diff_storage_minimum_sectors.max(2 * chunk_min_sectors);
        p.diff_storage_minimum_sectors -= p.diff_storage_minimum_sectors % chunk_min_sectors;
        p.chunk_maximum_count_shift = p.chunk_maximum_count_shift.min(40);
        debug_assert!(p.diff_storage_minimum_sectors >= 2 * chunk_min_sectors);
        debug_assert!(p.chunk_minimum_shift <= p.chunk_maximum_shift);
        Ok(p)
    }

    /// The parameters' names, as the kernel module's (`modinfo blksnap`).
    pub const NAMES: [&'static str; 7] = [
        "tracking_block_minimum_shift",
        "tracking_block_maximum_count",
        "tracking_block_maximum_shift",
        "chunk_minimum_shift",
        "chunk_maximum_count_shift",
        "chunk_maximum_shift",
        "diff_storage_minimum_sectors",
    ];

    /// Sets parameter `name` (one of [`Params::NAMES`]) to `value`: EINVAL for an unknown name or
    /// a shift that does not fit. Whole-set checks are [`Params::sanitized`]'s.
    pub fn set(&mut self, name: &str, value: u64) -> Result<()> {
        let shift = |v: u64| {
            u32::try_from(v).map_err(|_| Error::new(Errno::EINVAL, "shift parameter too large"))
        };
        match name {
            "tracking_block_minimum_shift" => self.tracking_block_minimum_shift = shift(value)?,
            "tracking_block_maximum_count" => self.tracking_block_maximum_count = value,
            "tracking_block_maximum_shift" => self.tracking_block_maximum_shift = shift(value)?,
            "chunk_minimum_shift" => self.chunk_minimum_shift = shift(value)?,
            "chunk_maximum_count_shift" => self.chunk_maximum_count_shift = shift(value)?,
            "chunk_maximum_shift" => self.chunk_maximum_shift = shift(value)?,
            "diff_storage_minimum_sectors" => self.diff_storage_minimum_sectors = value,
            _ => return Err(Error::new(Errno::EINVAL, "unknown parameter")),
        }
        Ok(())
    }

    /// The low-space threshold in sectors: half the storage step.
    pub fn low_space_threshold_sectors(&self) -> u64 {
        self.diff_storage_minimum_sectors / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_survive_sanitising() {
        assert_eq!(Params::default().sanitized().unwrap(), Params::default());
        assert_eq!(Params::small().sanitized().unwrap(), Params::small());
    }

    #[test]
    fn sanitising_rules() {
        let p = Params {
            chunk_minimum_shift: 10,
            diff_storage_minimum_sectors: 13,
            tracking_block_maximum_shift: 10,
            chunk_maximum_count_shift: 63,
            ..Params::default()
        };
        let s = p.sanitized().unwrap();
        assert_eq!(s.chunk_minimum_shift, PAGE_SHIFT, "raised to the page shift");
        assert_eq!(s.diff_storage_minimum_sectors, 16, "2 x 8 sectors, multiple of 8");
        assert_eq!(s.tracking_block_maximum_shift, 16, "max >= min");
        assert_eq!(s.chunk_maximum_count_shift, 40);
        let bad = Params { chunk_maximum_shift: 70, ..Params::default() };
        assert_eq!(bad.sanitized().unwrap_err().errno, Errno::EINVAL);
        let bad = Params { tracking_block_maximum_count: 0, ..Params::default() };
        assert_eq!(bad.sanitized().unwrap_err().errno, Errno::EINVAL);
    }

    #[test]
    fn diff_storage_minimum_rounds_down_to_chunk_multiple() {
        let p = Params { diff_storage_minimum_sectors: 2_097_152 + 100, ..Params::default() };
        assert_eq!(p.sanitized().unwrap().diff_storage_minimum_sectors, 2_097_152);
    }
}
