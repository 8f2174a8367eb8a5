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

    /// The parameters' names, as the kernel module's (`modinfo blksnap`), of both generations.
    /// Units are the kernel's: shifts are log2 bytes, `diff_storage_minimum` is in sectors,
    /// `chunk_maximum_count` (v3) a count.
    pub const NAMES: [&'static str; 10] = [
        "tracking_block_minimum_shift",
        "tracking_block_maximum_count",
        "tracking_block_maximum_shift",
        "chunk_minimum_shift",
        "chunk_maximum_count",
        "chunk_maximum_count_shift",
        "chunk_maximum_shift",
        "chunk_maximum_in_queue",
        "free_diff_buffer_pool_size",
        "diff_storage_minimum",
    ];

    /// Every kernel module parameter of both generations with the kernel's default value, in the
    /// kernel's unit (`blksnap-semantics.md` §1; newest's where the generations differ, v3's for
    /// the parameters only v3 has): what `modprobe blksnap NAME=VALUE` accepts.
    pub const KERNEL_DEFAULTS: [(&'static str, u64); 10] = [
        ("tracking_block_minimum_shift", 16),
        ("tracking_block_maximum_count", 2_097_152),
        ("tracking_block_maximum_shift", 26),
        ("chunk_minimum_shift", 18),
        ("chunk_maximum_count", 2_097_152),
        ("chunk_maximum_count_shift", 40),
        ("chunk_maximum_shift", 26),
        ("chunk_maximum_in_queue", 256),
        ("free_diff_buffer_pool_size", 128),
        ("diff_storage_minimum", 2_097_152),
    ];

    /// Names accepted for compatibility with this project's earlier releases, and what they mean.
    pub const ALIASES: [(&'static str, &'static str); 1] =
        [("diff_storage_minimum_sectors", "diff_storage_minimum")];

    /// Kernel parameters accepted with no effect here, and why (the docs' table says the same).
    pub const NO_EFFECT: [(&'static str, &'static str); 2] = [
        (
            "chunk_maximum_in_queue",
            "copy-on-write is synchronous: no store queue to kick, no image-I/O queue to bound",
        ),
        ("free_diff_buffer_pool_size", "chunk buffers are not pooled"),
    ];

    /// Sets parameter `name` (one of [`Params::NAMES`] or [`Params::ALIASES`]) to `value` in
    /// the kernel's unit: EINVAL for an unknown name, a shift that does not fit or a zero
    /// `chunk_maximum_count`. `chunk_maximum_count` (v3's limit, a count) becomes the largest
    /// `chunk_maximum_count_shift` whose power of two does not exceed it (at most the count,
    /// never more). Whole-set checks are [`Params::sanitized`]'s.
    pub fn set(&mut self, name: &str, value: u64) -> Result<()> {
        let shift = |v: u64| {
            u32::try_from(v).map_err(|_| Error::new(Errno::EINVAL, "shift parameter too large"))
        };
        let name = Self::ALIASES.iter().find(|(alias, _)| *alias == name).map_or(name, |a| a.1);
        match name {
            "tracking_block_minimum_shift" => self.tracking_block_minimum_shift = shift(value)?,
            "tracking_block_maximum_count" => self.tracking_block_maximum_count = value,
            "tracking_block_maximum_shift" => self.tracking_block_maximum_shift = shift(value)?,
            "chunk_minimum_shift" => self.chunk_minimum_shift = shift(value)?,
            "chunk_maximum_count" => {
                if value == 0 {
                    return Err(Error::new(
                        Errno::EINVAL,
                        "chunk_maximum_count must be at least 1",
                    ));
                }
                self.chunk_maximum_count_shift = value.ilog2();
            }
            "chunk_maximum_count_shift" => self.chunk_maximum_count_shift = shift(value)?,
            "chunk_maximum_shift" => self.chunk_maximum_shift = shift(value)?,
            "diff_storage_minimum" => self.diff_storage_minimum_sectors = value,
            _ if Self::NO_EFFECT.iter().any(|(n, _)| *n == name) => {}
            _ => return Err(Error::new(Errno::EINVAL, "unknown parameter")),
        }
        Ok(())
    }

    /// Applies a `modprobe`-style list (`name=value` items separated by white space, as in
    /// `modprobe blksnap diff_storage_minimum=4096 chunk_minimum_shift=16`), in order; values
    /// decimal or `0x` hexadecimal. EINVAL names the first bad item; nothing is applied then.
    pub fn apply_list(&mut self, list: &str) -> core::result::Result<(), (Error, String)> {
        let mut next = *self;
        for item in list.split_whitespace() {
            let (name, value) = Self::parse_item(item).map_err(|e| (e, item.to_string()))?;
            next.set(name, value).map_err(|e| (e, item.to_string()))?;
        }
        *self = next;
        Ok(())
    }

    /// One `name=value` item (value decimal or `0x` hexadecimal); EINVAL otherwise.
    pub fn parse_item(item: &str) -> Result<(&str, u64)> {
        let (name, value) =
            item.split_once('=').ok_or(Error::new(Errno::EINVAL, "expected name=value"))?;
        let (name, value) = (name.trim(), value.trim());
        match value.strip_prefix("0x").or_else(|| value.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => value.parse(),
        }
        .map(|v| (name, v))
        .map_err(|_| Error::new(Errno::EINVAL, "the value is not a number"))
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
    fn kernel_names_aliases_and_no_effect_parameters() {
        let mut p = Params::default();
        p.set("diff_storage_minimum", 4096).unwrap();
        assert_eq!(p.diff_storage_minimum_sectors, 4096, "the kernel's name, in sectors");
        p.set("diff_storage_minimum_sectors", 8192).unwrap();
        assert_eq!(p.diff_storage_minimum_sectors, 8192, "the old name is an alias");
        p.set("chunk_maximum_count", 2_097_152).unwrap();
        assert_eq!(p.chunk_maximum_count_shift, 21, "v3's count as a power of two");
        p.set("chunk_maximum_count", 3_000_000).unwrap();
        assert_eq!(p.chunk_maximum_count_shift, 21, "rounded down: never above the count");
        assert_eq!(p.set("chunk_maximum_count", 0).unwrap_err().errno, Errno::EINVAL);
        let before = p;
        p.set("chunk_maximum_in_queue", 256).unwrap();
        p.set("free_diff_buffer_pool_size", 128).unwrap();
        assert_eq!(p, before, "accepted, no effect");
        assert_eq!(p.set("no_such_parameter", 1).unwrap_err().errno, Errno::EINVAL);
        for name in Params::NAMES {
            assert!(Params::default().set(name, 16).is_ok(), "{name} is accepted");
        }
    }

    #[test]
    fn every_kernel_parameter_by_its_name_with_the_kernel_default() {
        let names: Vec<&str> = Params::KERNEL_DEFAULTS.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, Params::NAMES, "one default per kernel name");
        for (name, value) in Params::KERNEL_DEFAULTS {
            let mut p = Params::default();
            p.set(name, value).unwrap_or_else(|e| panic!("{name}={value}: {e:?}"));
            if name == "chunk_maximum_count" {
                // v3's count: 2^21 chunks (newest's default shift is 40)
                assert_eq!(p.chunk_maximum_count_shift, 21);
            } else {
                assert_eq!(p, Params::default(), "{name}: the kernel's default is ours");
            }
            let mut listed = Params::default();
            listed.apply_list(&format!("{name}={value}")).unwrap();
            assert_eq!(listed, p, "{name} in a modprobe list");
        }
    }

    #[test]
    fn modprobe_lists_apply_whole_or_not_at_all() {
        let mut p = Params::default();
        p.apply_list("  diff_storage_minimum=4096\tchunk_minimum_shift=0x10 ").unwrap();
        assert_eq!((p.diff_storage_minimum_sectors, p.chunk_minimum_shift), (4096, 16));
        let before = p;
        let (e, item) = p.apply_list("chunk_minimum_shift=12 bogus=1").unwrap_err();
        assert_eq!((e.errno, item.as_str()), (Errno::EINVAL, "bogus=1"));
        assert_eq!(p, before, "nothing applied");
        assert_eq!(p.apply_list("chunk_minimum_shift").unwrap_err().1, "chunk_minimum_shift");
        assert_eq!(p.apply_list("chunk_minimum_shift=x").unwrap_err().1, "chunk_minimum_shift=x");
        p.apply_list("").unwrap();
        assert_eq!(p, before);
    }

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
