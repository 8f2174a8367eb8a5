//! `#[repr(C)]` mirrors of the blksnap uapi (`linux/blksnap.h`, `linux/blk-filter.h`) of both
//! profiles, with the request codes, every layout asserted at compile time against the tables of
//! `reference/blksnap-abi.md` §2.3, §2.4, §3.3, §3.4 (x86_64 and i386 columns, chosen by
//! `target_pointer_width`). The C side checks the same numbers in `ffi/tests-c/abi_check.c`.
//!
//! Names are the upstream C names, so a grep finds both sides. Layout differences between the
//! profiles are real: v3 has genuine C pointers in `cbtmap`, `cbtdirty`, `append_storage` and
//! `collect`; the newest header has `__u64` there.
#![allow(non_camel_case_types)]

use core::mem::{align_of, offset_of, size_of};

use crate::ioc::{ior, iow, iowr};

/// ioctl type of the control device (`'V'`).
pub const BLKSNAP: u32 = 0x56;
/// ioctl type of the block-layer requests (`BLKFILTER_*`, `BLK*GET`).
pub const BLOCK_IOCTL_TYPE: u32 = 0x12;
/// Control device name (`/dev/blksnap-control`).
pub const BLKSNAP_CTL: &str = "blksnap-control";
/// Length of `blksnap_snapshotinfo.image`.
pub const IMAGE_DISK_NAME_LEN: usize = 32;
/// Length of the filter name arrays.
pub const BLKFILTER_NAME_LENGTH: usize = 32;
/// The filter name blksnap registers.
pub const BLKSNAP_FILTER_NAME: &[u8] = b"blksnap";
/// Size of `blksnap_snapshot_event` and of its `data` payload.
pub const EVENT_SIZE: usize = 4096;
/// Bytes of `blksnap_snapshot_event` WAIT_EVENT reads (id + timeout_ms), quirk §7.6.
pub const EVENT_IN_BYTES: usize = 20;
/// `PATH_MAX` including the NUL.
pub const PATH_MAX: usize = 4096;

/// `_IOC_SIZE` of the type.
const fn sz<T>() -> usize {
    size_of::<T>()
}

/// Size of a field's type, for the layout assertions (the closure is never called).
pub(crate) const fn size_of_field<T, F>(_field: fn(T) -> F) -> usize {
    size_of::<F>()
}

// ---- structs shared by both profiles (no pointer fields) --------------------------------------

/// `struct blksnap_uuid`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct blksnap_uuid {
    /// The 16 bytes.
    pub b: [u8; 16],
}

/// `struct blksnap_sectors`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct blksnap_sectors {
    /// First sector.
    pub offset: u64,
    /// Number of sectors.
    pub count: u64,
}

/// `struct blksnap_cbtinfo` (ctl cmd 0, out).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct blksnap_cbtinfo {
    /// Capacity in bytes.
    pub device_capacity: u64,
    /// CBT block size in bytes.
    pub block_size: u32,
    /// Number of CBT blocks.
    pub block_count: u32,
    /// CBT generation.
    pub generation_id: blksnap_uuid,
    /// `snap_number_previous`.
    pub changes_number: u8,
}

/// `struct blksnap_snapshotadd` (ctl cmd 3, in).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct blksnap_snapshotadd {
    /// Snapshot id.
    pub id: blksnap_uuid,
}

/// `struct blksnap_snapshotinfo` (ctl cmd 4, in/out).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct blksnap_snapshotinfo {
    /// 0 or the negative errno of the diff area's first failure.
    pub error_code: i32,
    /// Image disk name, NUL-terminated.
    pub image: [u8; IMAGE_DISK_NAME_LEN],
}

/// `struct blksnap_version`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct blksnap_version {
    /// 2.
    pub major: u16,
    /// 0.
    pub minor: u16,
    /// 0.
    pub revision: u16,
    /// 0.
    pub build: u16,
}

/// `struct blksnap_snapshot_event` (WAIT_EVENT).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct blksnap_snapshot_event {
    /// Snapshot id (in).
    pub id: blksnap_uuid,
    /// Timeout in ms (in; 0 polls).
    pub timeout_ms: u32,
    /// Event code (out).
    pub code: u32,
    /// CLOCK_MONOTONIC ns at generation (out).
    pub time_label: i64,
    /// Payload, zero-padded (out).
    pub data: [u8; EVENT_SIZE - 32],
}

/// `struct blksnap_event_corrupted` (payload).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct blksnap_event_corrupted {
    /// MAJOR of the original.
    pub dev_id_mj: u32,
    /// MINOR of the original.
    pub dev_id_mn: u32,
    /// Positive errno.
    pub err_code: i32,
}

/// `struct blkfilter_ctl` (BLKFILTER_CTL).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct blkfilter_ctl {
    /// Filter name, NUL-padded.
    pub name: [u8; BLKFILTER_NAME_LENGTH],
    /// `enum blkfilter_ctl_blksnap`.
    pub cmd: u32,
    /// Size of `*opt`.
    pub optlen: u32,
    /// User pointer to the command struct.
    pub opt: u64,
}

/// Filter ctl command numbers (`enum blkfilter_ctl_blksnap`, same values in both profiles).
pub mod ctl_cmd {
    /// cbtinfo.
    pub const CBTINFO: u32 = 0;
    /// cbtmap.
    pub const CBTMAP: u32 = 1;
    /// cbtdirty.
    pub const CBTDIRTY: u32 = 2;
    /// snapshotadd.
    pub const SNAPSHOTADD: u32 = 3;
    /// snapshotinfo.
    pub const SNAPSHOTINFO: u32 = 4;
}

/// Asserts `size_of`/`align_of` for the running pointer width: `(size, align)` on 64-bit, then
/// on 32-bit.
macro_rules! layout {
    ($t:ty, $s64:expr, $a64:expr, $s32:expr, $a32:expr) => {
        #[cfg(target_pointer_width = "64")]
        const _: () = assert!(size_of::<$t>() == $s64 && align_of::<$t>() == $a64);
        #[cfg(target_pointer_width = "32")]
        const _: () = assert!(size_of::<$t>() == $s32 && align_of::<$t>() == $a32);
    };
}

/// Asserts a field's offset and size: `(offset, size)` on 64-bit, then on 32-bit.
macro_rules! field {
    ($t:ident, $f:ident, $o64:expr, $s64:expr, $o32:expr, $s32:expr) => {
        #[cfg(target_pointer_width = "64")]
        const _: () = assert!(
            offset_of!($t, $f) == $o64 && size_of_field(|s: $t| s.$f) == $s64,
            concat!(stringify!($t), ".", stringify!($f))
        );
        #[cfg(target_pointer_width = "32")]
        const _: () = assert!(
            offset_of!($t, $f) == $o32 && size_of_field(|s: $t| s.$f) == $s32,
            concat!(stringify!($t), ".", stringify!($f))
        );
    };
}

layout!(blksnap_uuid, 16, 1, 16, 1);
field!(blksnap_uuid, b, 0, 16, 0, 16);
layout!(blksnap_sectors, 16, 8, 16, 4);
field!(blksnap_sectors, offset, 0, 8, 0, 8);
field!(blksnap_sectors, count, 8, 8, 8, 8);
layout!(blksnap_cbtinfo, 40, 8, 36, 4);
field!(blksnap_cbtinfo, device_capacity, 0, 8, 0, 8);
field!(blksnap_cbtinfo, block_size, 8, 4, 8, 4);
field!(blksnap_cbtinfo, block_count, 12, 4, 12, 4);
field!(blksnap_cbtinfo, generation_id, 16, 16, 16, 16);
field!(blksnap_cbtinfo, changes_number, 32, 1, 32, 1);
layout!(blksnap_snapshotadd, 16, 1, 16, 1);
field!(blksnap_snapshotadd, id, 0, 16, 0, 16);
layout!(blksnap_snapshotinfo, 36, 4, 36, 4);
field!(blksnap_snapshotinfo, error_code, 0, 4, 0, 4);
field!(blksnap_snapshotinfo, image, 4, 32, 4, 32);
layout!(blksnap_version, 8, 2, 8, 2);
field!(blksnap_version, major, 0, 2, 0, 2);
field!(blksnap_version, minor, 2, 2, 2, 2);
field!(blksnap_version, revision, 4, 2, 4, 2);
field!(blksnap_version, build, 6, 2, 6, 2);
layout!(blksnap_snapshot_event, 4096, 8, 4096, 4);
field!(blksnap_snapshot_event, id, 0, 16, 0, 16);
field!(blksnap_snapshot_event, timeout_ms, 16, 4, 16, 4);
field!(blksnap_snapshot_event, code, 20, 4, 20, 4);
field!(blksnap_snapshot_event, time_label, 24, 8, 24, 8);
field!(blksnap_snapshot_event, data, 32, 4064, 32, 4064);
layout!(blksnap_event_corrupted, 12, 4, 12, 4);
field!(blksnap_event_corrupted, dev_id_mj, 0, 4, 0, 4);
field!(blksnap_event_corrupted, dev_id_mn, 4, 4, 4, 4);
field!(blksnap_event_corrupted, err_code, 8, 4, 8, 4);
layout!(blkfilter_ctl, 48, 8, 48, 4);
field!(blkfilter_ctl, name, 0, 32, 0, 32);
field!(blkfilter_ctl, cmd, 32, 4, 32, 4);
field!(blkfilter_ctl, optlen, 36, 4, 36, 4);
field!(blkfilter_ctl, opt, 40, 8, 40, 8);
const _: () = assert!(EVENT_IN_BYTES == offset_of!(blksnap_snapshot_event, code));

/// Profile "v3" (veeam/blksnap `patches/lk6.3-rc4-v2`).
pub mod v3 {
    use super::*;
    pub use super::{
        blkfilter_ctl, blksnap_cbtinfo, blksnap_event_corrupted, blksnap_sectors,
        blksnap_snapshot_event, blksnap_snapshotadd, blksnap_snapshotinfo, blksnap_uuid,
        blksnap_version,
    };

    /// `struct blksnap_cbtmap` (ctl cmd 1): a real C pointer in v3.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct blksnap_cbtmap {
        /// Index of the first CBT block.
        pub offset: u32,
        /// Bytes to copy.
        pub length: u32,
        /// User out-buffer.
        pub buffer: *mut u8,
    }

    /// `struct blksnap_cbtdirty` (ctl cmd 2).
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct blksnap_cbtdirty {
        /// Number of ranges.
        pub count: u32,
        /// `blksnap_sectors[count]`.
        pub dirty_sectors: *mut blksnap_sectors,
    }

    /// `struct blksnap_snapshot_append_storage` (APPEND_STORAGE).
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct blksnap_snapshot_append_storage {
        /// Snapshot id.
        pub id: blksnap_uuid,
        /// Path of a block device.
        pub bdev_path: *mut u8,
        /// Bytes of `bdev_path` including the NUL.
        pub bdev_path_size: u32,
        /// Number of ranges.
        pub count: u32,
        /// `blksnap_sectors[count]`.
        pub ranges: *mut blksnap_sectors,
    }

    /// `struct blksnap_snapshot_collect` (COLLECT).
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct blksnap_snapshot_collect {
        /// In: capacity of `ids`; out: written or total.
        pub count: u32,
        /// `blksnap_uuid[count]`, may be NULL.
        pub ids: *mut blksnap_uuid,
    }

    /// `struct blksnap_event_low_free_space` (payload of code 0).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct blksnap_event_low_free_space {
        /// Sectors requested (the step size).
        pub requested_nr_sect: u64,
    }

    /// `struct blkfilter_name` (ATTACH/DETACH).
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct blkfilter_name {
        /// Filter name, NUL-padded.
        pub name: [u8; BLKFILTER_NAME_LENGTH],
    }

    /// `blksnap_event_code_low_free_space`.
    pub const EVENT_CODE_LOW_FREE_SPACE: u32 = 0;
    /// `blksnap_event_code_corrupted`.
    pub const EVENT_CODE_CORRUPTED: u32 = 1;

    // Directions inverted as in the v3 header (quirk §7.1: the numbers are the ABI).
    /// `IOCTL_BLKSNAP_VERSION`.
    pub const IOCTL_BLKSNAP_VERSION: u32 = iow(BLKSNAP, 0, sz::<blksnap_version>());
    /// `IOCTL_BLKSNAP_SNAPSHOT_CREATE`.
    pub const IOCTL_BLKSNAP_SNAPSHOT_CREATE: u32 = iow(BLKSNAP, 1, sz::<blksnap_uuid>());
    /// `IOCTL_BLKSNAP_SNAPSHOT_DESTROY`.
    pub const IOCTL_BLKSNAP_SNAPSHOT_DESTROY: u32 = ior(BLKSNAP, 2, sz::<blksnap_uuid>());
    /// `IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE`.
    pub const IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE: u32 =
        iow(BLKSNAP, 3, sz::<blksnap_snapshot_append_storage>());
    /// `IOCTL_BLKSNAP_SNAPSHOT_TAKE`.
    pub const IOCTL_BLKSNAP_SNAPSHOT_TAKE: u32 = ior(BLKSNAP, 4, sz::<blksnap_uuid>());
    /// `IOCTL_BLKSNAP_SNAPSHOT_COLLECT`.
    pub const IOCTL_BLKSNAP_SNAPSHOT_COLLECT: u32 =
        iow(BLKSNAP, 5, sz::<blksnap_snapshot_collect>());
    /// `IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT`.
    pub const IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT: u32 =
        iow(BLKSNAP, 6, sz::<blksnap_snapshot_event>());
    /// `BLKFILTER_ATTACH`.
    pub const BLKFILTER_ATTACH: u32 = iowr(BLOCK_IOCTL_TYPE, 140, sz::<blkfilter_name>());
    /// `BLKFILTER_DETACH`.
    pub const BLKFILTER_DETACH: u32 = iowr(BLOCK_IOCTL_TYPE, 141, sz::<blkfilter_name>());
    /// `BLKFILTER_CTL`.
    pub const BLKFILTER_CTL: u32 = iowr(BLOCK_IOCTL_TYPE, 142, sz::<blkfilter_ctl>());

    /// Every request code of the profile with its name (tests, strerror-style tools).
    pub const REQUESTS: [(&str, u32); 10] = [
        ("IOCTL_BLKSNAP_VERSION", IOCTL_BLKSNAP_VERSION),
        ("IOCTL_BLKSNAP_SNAPSHOT_CREATE", IOCTL_BLKSNAP_SNAPSHOT_CREATE),
        ("IOCTL_BLKSNAP_SNAPSHOT_DESTROY", IOCTL_BLKSNAP_SNAPSHOT_DESTROY),
        ("IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE", IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE),
        ("IOCTL_BLKSNAP_SNAPSHOT_TAKE", IOCTL_BLKSNAP_SNAPSHOT_TAKE),
        ("IOCTL_BLKSNAP_SNAPSHOT_COLLECT", IOCTL_BLKSNAP_SNAPSHOT_COLLECT),
        ("IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT", IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT),
        ("BLKFILTER_ATTACH", BLKFILTER_ATTACH),
        ("BLKFILTER_DETACH", BLKFILTER_DETACH),
        ("BLKFILTER_CTL", BLKFILTER_CTL),
    ];

    layout!(blksnap_cbtmap, 16, 8, 12, 4);
    field!(blksnap_cbtmap, offset, 0, 4, 0, 4);
    field!(blksnap_cbtmap, length, 4, 4, 4, 4);
    field!(blksnap_cbtmap, buffer, 8, 8, 8, 4);
    layout!(blksnap_cbtdirty, 16, 8, 8, 4);
    field!(blksnap_cbtdirty, count, 0, 4, 0, 4);
    field!(blksnap_cbtdirty, dirty_sectors, 8, 8, 4, 4);
    layout!(blksnap_snapshot_append_storage, 40, 8, 32, 4);
    field!(blksnap_snapshot_append_storage, id, 0, 16, 0, 16);
    field!(blksnap_snapshot_append_storage, bdev_path, 16, 8, 16, 4);
    field!(blksnap_snapshot_append_storage, bdev_path_size, 24, 4, 20, 4);
    field!(blksnap_snapshot_append_storage, count, 28, 4, 24, 4);
    field!(blksnap_snapshot_append_storage, ranges, 32, 8, 28, 4);
    layout!(blksnap_snapshot_collect, 16, 8, 8, 4);
    field!(blksnap_snapshot_collect, count, 0, 4, 0, 4);
    field!(blksnap_snapshot_collect, ids, 8, 8, 4, 4);
    layout!(blksnap_event_low_free_space, 8, 8, 8, 4);
    field!(blksnap_event_low_free_space, requested_nr_sect, 0, 8, 0, 8);
    layout!(blkfilter_name, 32, 1, 32, 1);
    field!(blkfilter_name, name, 0, 32, 0, 32);

    const _: () = assert!(IOCTL_BLKSNAP_VERSION == 0x4008_5600);
    const _: () = assert!(IOCTL_BLKSNAP_SNAPSHOT_CREATE == 0x4010_5601);
    const _: () = assert!(IOCTL_BLKSNAP_SNAPSHOT_DESTROY == 0x8010_5602);
    #[cfg(target_pointer_width = "64")]
    const _: () = assert!(IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE == 0x4028_5603);
    #[cfg(target_pointer_width = "32")]
    const _: () = assert!(IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE == 0x4020_5603);
    const _: () = assert!(IOCTL_BLKSNAP_SNAPSHOT_TAKE == 0x8010_5604);
    #[cfg(target_pointer_width = "64")]
    const _: () = assert!(IOCTL_BLKSNAP_SNAPSHOT_COLLECT == 0x4010_5605);
    #[cfg(target_pointer_width = "32")]
    const _: () = assert!(IOCTL_BLKSNAP_SNAPSHOT_COLLECT == 0x4008_5605);
    const _: () = assert!(IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT == 0x5000_5606);
    const _: () = assert!(BLKFILTER_ATTACH == 0xc020_128c);
    const _: () = assert!(BLKFILTER_DETACH == 0xc020_128d);
    const _: () = assert!(BLKFILTER_CTL == 0xc030_128e);
}

/// Profile "newest" (veeam/blksnap `patches/lk6.15` = master headers).
pub mod newest {
    use super::*;
    pub use super::{
        blkfilter_ctl, blksnap_cbtinfo, blksnap_event_corrupted, blksnap_sectors,
        blksnap_snapshot_event, blksnap_snapshotadd, blksnap_snapshotinfo, blksnap_uuid,
        blksnap_version,
    };

    /// `struct blksnap_cbtmap` (ctl cmd 1).
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct blksnap_cbtmap {
        /// Index of the first CBT block.
        pub offset: u32,
        /// Bytes to copy.
        pub length: u32,
        /// User pointer to the out-buffer.
        pub buffer: u64,
    }

    /// `struct blksnap_cbtdirty` (ctl cmd 2).
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct blksnap_cbtdirty {
        /// Number of ranges.
        pub count: u32,
        /// User pointer to `blksnap_sectors[count]`.
        pub dirty_sectors: u64,
    }

    /// `struct blksnap_snapshot_create` (CREATE, v7 layout).
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct blksnap_snapshot_create {
        /// Storage limit in sectors.
        pub diff_storage_limit_sect: u64,
        /// User pointer to the NUL-terminated storage path.
        pub diff_storage_filename: u64,
        /// Snapshot id (out).
        pub id: blksnap_uuid,
    }

    /// `struct blksnap_snapshot_collect` (COLLECT).
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct blksnap_snapshot_collect {
        /// In: capacity of `ids`; out: written or total.
        pub count: u32,
        /// User pointer to `blksnap_uuid[count]`, may be 0.
        pub ids: u64,
    }

    /// `struct blksnap_event_no_space` (payload of code 1).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct blksnap_event_no_space {
        /// Total sectors requested.
        pub requested_nr_sect: u64,
    }

    /// `struct blkfilter_attach` (ATTACH).
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct blkfilter_attach {
        /// Filter name, NUL-padded.
        pub name: [u8; BLKFILTER_NAME_LENGTH],
        /// Reserved option pointer (ignored by blksnap).
        pub opt: u64,
        /// Size of `*opt`.
        pub optlen: u32,
    }

    /// `struct blkfilter_detach` (DETACH).
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct blkfilter_detach {
        /// Filter name, NUL-padded.
        pub name: [u8; BLKFILTER_NAME_LENGTH],
    }

    /// `blksnap_event_code_corrupted`.
    pub const EVENT_CODE_CORRUPTED: u32 = 0;
    /// `blksnap_event_code_no_space`.
    pub const EVENT_CODE_NO_SPACE: u32 = 1;

    /// `IOCTL_BLKSNAP_VERSION`.
    pub const IOCTL_BLKSNAP_VERSION: u32 = ior(BLKSNAP, 0, sz::<blksnap_version>());
    /// `IOCTL_BLKSNAP_SNAPSHOT_CREATE`.
    pub const IOCTL_BLKSNAP_SNAPSHOT_CREATE: u32 =
        iowr(BLKSNAP, 1, sz::<blksnap_snapshot_create>());
    /// `IOCTL_BLKSNAP_SNAPSHOT_DESTROY`.
    pub const IOCTL_BLKSNAP_SNAPSHOT_DESTROY: u32 = iow(BLKSNAP, 2, sz::<blksnap_uuid>());
    /// `IOCTL_BLKSNAP_SNAPSHOT_TAKE`.
    pub const IOCTL_BLKSNAP_SNAPSHOT_TAKE: u32 = iow(BLKSNAP, 3, sz::<blksnap_uuid>());
    /// `IOCTL_BLKSNAP_SNAPSHOT_COLLECT`.
    pub const IOCTL_BLKSNAP_SNAPSHOT_COLLECT: u32 =
        ior(BLKSNAP, 4, sz::<blksnap_snapshot_collect>());
    /// `IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT`.
    pub const IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT: u32 =
        ior(BLKSNAP, 5, sz::<blksnap_snapshot_event>());
    /// `BLKFILTER_ATTACH`.
    pub const BLKFILTER_ATTACH: u32 = iowr(BLOCK_IOCTL_TYPE, 142, sz::<blkfilter_attach>());
    /// `BLKFILTER_DETACH`.
    pub const BLKFILTER_DETACH: u32 = iowr(BLOCK_IOCTL_TYPE, 143, sz::<blkfilter_detach>());
    /// `BLKFILTER_CTL`.
    pub const BLKFILTER_CTL: u32 = iowr(BLOCK_IOCTL_TYPE, 144, sz::<blkfilter_ctl>());

    /// Every request code of the profile with its name.
    pub const REQUESTS: [(&str, u32); 9] = [
        ("IOCTL_BLKSNAP_VERSION", IOCTL_BLKSNAP_VERSION),
        ("IOCTL_BLKSNAP_SNAPSHOT_CREATE", IOCTL_BLKSNAP_SNAPSHOT_CREATE),
        ("IOCTL_BLKSNAP_SNAPSHOT_DESTROY", IOCTL_BLKSNAP_SNAPSHOT_DESTROY),
        ("IOCTL_BLKSNAP_SNAPSHOT_TAKE", IOCTL_BLKSNAP_SNAPSHOT_TAKE),
        ("IOCTL_BLKSNAP_SNAPSHOT_COLLECT", IOCTL_BLKSNAP_SNAPSHOT_COLLECT),
        ("IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT", IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT),
        ("BLKFILTER_ATTACH", BLKFILTER_ATTACH),
        ("BLKFILTER_DETACH", BLKFILTER_DETACH),
        ("BLKFILTER_CTL", BLKFILTER_CTL),
    ];

    layout!(blksnap_cbtmap, 16, 8, 16, 4);
    field!(blksnap_cbtmap, offset, 0, 4, 0, 4);
    field!(blksnap_cbtmap, length, 4, 4, 4, 4);
    field!(blksnap_cbtmap, buffer, 8, 8, 8, 8);
    layout!(blksnap_cbtdirty, 16, 8, 12, 4);
    field!(blksnap_cbtdirty, count, 0, 4, 0, 4);
    field!(blksnap_cbtdirty, dirty_sectors, 8, 8, 4, 8);
    layout!(blksnap_snapshot_create, 32, 8, 32, 4);
    field!(blksnap_snapshot_create, diff_storage_limit_sect, 0, 8, 0, 8);
    field!(blksnap_snapshot_create, diff_storage_filename, 8, 8, 8, 8);
    field!(blksnap_snapshot_create, id, 16, 16, 16, 16);
    layout!(blksnap_snapshot_collect, 16, 8, 12, 4);
    field!(blksnap_snapshot_collect, count, 0, 4, 0, 4);
    field!(blksnap_snapshot_collect, ids, 8, 8, 4, 8);
    layout!(blksnap_event_no_space, 8, 8, 8, 4);
    field!(blksnap_event_no_space, requested_nr_sect, 0, 8, 0, 8);
    layout!(blkfilter_attach, 48, 8, 44, 4);
    field!(blkfilter_attach, name, 0, 32, 0, 32);
    field!(blkfilter_attach, opt, 32, 8, 32, 8);
    field!(blkfilter_attach, optlen, 40, 4, 40, 4);
    layout!(blkfilter_detach, 32, 1, 32, 1);
    field!(blkfilter_detach, name, 0, 32, 0, 32);

    const _: () = assert!(IOCTL_BLKSNAP_VERSION == 0x8008_5600);
    const _: () = assert!(IOCTL_BLKSNAP_SNAPSHOT_CREATE == 0xc020_5601);
    const _: () = assert!(IOCTL_BLKSNAP_SNAPSHOT_DESTROY == 0x4010_5602);
    const _: () = assert!(IOCTL_BLKSNAP_SNAPSHOT_TAKE == 0x4010_5603);
    #[cfg(target_pointer_width = "64")]
    const _: () = assert!(IOCTL_BLKSNAP_SNAPSHOT_COLLECT == 0x8010_5604);
    #[cfg(target_pointer_width = "32")]
    const _: () = assert!(IOCTL_BLKSNAP_SNAPSHOT_COLLECT == 0x800c_5604);
    const _: () = assert!(IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT == 0x9000_5605);
    #[cfg(target_pointer_width = "64")]
    const _: () = assert!(BLKFILTER_ATTACH == 0xc030_128e);
    #[cfg(target_pointer_width = "32")]
    const _: () = assert!(BLKFILTER_ATTACH == 0xc02c_128e);
    const _: () = assert!(BLKFILTER_DETACH == 0xc020_128f);
    const _: () = assert!(BLKFILTER_CTL == 0xc030_1290);
}

/// Block-device ioctls a data-path client (and the preload shim) sees.
pub mod blk {
    use super::*;
    use crate::ioc::io;

    /// `BLKGETSIZE64` = `_IOR(0x12, 114, size_t)`.
    pub const BLKGETSIZE64: u32 = ior(BLOCK_IOCTL_TYPE, 114, size_of::<usize>());
    /// `BLKBSZGET` = `_IOR(0x12, 112, size_t)`.
    pub const BLKBSZGET: u32 = ior(BLOCK_IOCTL_TYPE, 112, size_of::<usize>());
    /// `BLKSSZGET`.
    pub const BLKSSZGET: u32 = io(BLOCK_IOCTL_TYPE, 104);
    /// `BLKPBSZGET`.
    pub const BLKPBSZGET: u32 = io(BLOCK_IOCTL_TYPE, 123);
    /// `BLKFLSBUF`.
    pub const BLKFLSBUF: u32 = io(BLOCK_IOCTL_TYPE, 97);

    #[cfg(target_pointer_width = "64")]
    const _: () = assert!(BLKGETSIZE64 == 0x8008_1272 && BLKBSZGET == 0x8008_1270);
    #[cfg(target_pointer_width = "32")]
    const _: () = assert!(BLKGETSIZE64 == 0x8004_1272 && BLKBSZGET == 0x8004_1270);
    const _: () = assert!(BLKSSZGET == 0x1268 && BLKPBSZGET == 0x127b && BLKFLSBUF == 0x1261);
}
