//! Bad input on every entry point: NULL, wrapping and misaligned pointers, short buffers and
//! `optlen`, overflowing counts, unknown codes, the wrong profile, double close, use after
//! close, and a panic injected inside the boundary. Every case returns the documented errno.
//!
//! The entry points are called exactly as C calls them (`extern "C"` functions, raw pointers).

use core::ffi::{c_char, c_int, c_ulong, c_void};
use core::mem::size_of;
use core::ptr::{null, null_mut};
use std::ffi::CString;

use crate::errno::{negative, EBADF, PANIC_ERRNO};
use crate::uapi::{self, blksnap_uuid, ctl_cmd, newest, v3};
use crate::*;

const DISK_BYTES: u64 = 1 << 20;
const ENOENT: c_int = -2;
const ESRCH: c_int = -3;
const EIO: c_int = -5;
const EFAULT: c_int = -14;
const ENODEV: c_int = -19;
const EINVAL: c_int = -22;
const ENOTTY: c_int = -25;
const EBUSY: c_int = -16;
const EOPNOTSUPP: c_int = -95;
const ENODATA: c_int = -61;
const EALREADY: c_int = -114;

struct Fixture {
    _dir: tempfile::TempDir,
    handle: c_int,
    dev: CString,
    disk: std::path::PathBuf,
    storage: CString,
}

fn fixture(profile: u32) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(DISK_BYTES).unwrap();
    let storage = dir.path().join("storage.img");
    std::fs::File::create(&storage).unwrap().set_len(DISK_BYTES).unwrap();
    let config = format!("/dev/test0={}@7:0", disk.display());
    let config = CString::new(config).unwrap();
    // SAFETY: a valid C string.
    let handle = unsafe { blksnap_ctl_open(profile, config.as_ptr()) };
    assert!(handle > 0, "open: {handle}");
    let storage = CString::new(storage.to_str().unwrap()).unwrap();
    Fixture { _dir: dir, handle, dev: CString::new("/dev/test0").unwrap(), disk, storage }
}

fn ioctl<T>(h: c_int, request: u32, arg: *mut T) -> c_int {
    // SAFETY: tests pass NULL, or pointers to live values of the request's type.
    unsafe { blksnap_ctl_ioctl(h, request as c_ulong, arg.cast()) }
}

fn filter<T>(f: &Fixture, request: u32, arg: *mut T) -> c_int {
    // SAFETY: as `ioctl`; the path is a C string.
    unsafe { blksnap_filter_ioctl(f.handle, f.dev.as_ptr(), request as c_ulong, arg.cast()) }
}

fn name32(text: &[u8]) -> [u8; 32] {
    let mut n = [0u8; 32];
    n[..text.len()].copy_from_slice(text);
    n
}

fn ctl_struct(cmd: u32, opt: *mut c_void, optlen: usize) -> uapi::blkfilter_ctl {
    uapi::blkfilter_ctl {
        name: name32(b"blksnap"),
        cmd,
        optlen: optlen as u32,
        opt: opt as usize as u64,
    }
}

fn ctl<T>(f: &Fixture, profile_ctl: u32, cmd: u32, opt: *mut T, optlen: usize) -> c_int {
    let mut c = ctl_struct(cmd, opt.cast(), optlen);
    filter(f, profile_ctl, &mut c)
}

fn attach(f: &Fixture, profile: u32) {
    if profile == BLKSNAP_PROFILE_V3 {
        let mut n = v3::blkfilter_name { name: name32(b"blksnap") };
        assert_eq!(filter(f, v3::BLKFILTER_ATTACH, &mut n), 0);
    } else {
        let mut a = newest::blkfilter_attach { name: name32(b"blksnap"), opt: 0, optlen: 0 };
        assert_eq!(filter(f, newest::BLKFILTER_ATTACH, &mut a), 0);
    }
}

fn create_v3(h: c_int) -> blksnap_uuid {
    let mut id = blksnap_uuid::default();
    assert_eq!(ioctl(h, v3::IOCTL_BLKSNAP_SNAPSHOT_CREATE, &mut id), 0);
    id
}

fn collect_count_v3(h: c_int) -> u32 {
    let mut c = v3::blksnap_snapshot_collect { count: 0, ids: null_mut() };
    assert_eq!(ioctl(h, v3::IOCTL_BLKSNAP_SNAPSHOT_COLLECT, &mut c), 0);
    c.count
}

fn close(h: c_int) {
    assert_eq!(blksnap_ctl_close(h), 0);
}

#[test]
fn open_rejects_bad_profiles_and_configs() {
    for profile in [0, 3, u32::MAX] {
        // SAFETY: NULL config is allowed.
        assert_eq!(unsafe { blksnap_ctl_open(profile, null()) }, EINVAL, "profile {profile}");
    }
    for bad in ["nonsense", "/dev/x=", "param.bogus=1", "/dev/x=/nonexistent/backing.img"] {
        let c = CString::new(bad).unwrap();
        // SAFETY: a valid C string.
        let rc = unsafe { blksnap_ctl_open(BLKSNAP_PROFILE_V3, c.as_ptr()) };
        assert!(rc == EINVAL || rc == ENOENT, "{bad}: {rc}");
    }
    let not_utf8 = [0xffu8, 0xfe, 0];
    // SAFETY: NUL-terminated.
    let rc = unsafe { blksnap_ctl_open(BLKSNAP_PROFILE_V3, not_utf8.as_ptr().cast()) };
    assert_eq!(rc, EINVAL);
    // An empty configuration: a working handle with no devices.
    let empty = CString::new("").unwrap();
    // SAFETY: a valid C string.
    let h = unsafe { blksnap_ctl_open(BLKSNAP_PROFILE_NEWEST, empty.as_ptr()) };
    assert!(h > 0);
    assert_eq!(blksnap_ctl_profile(h), BLKSNAP_PROFILE_NEWEST as c_int);
    close(h);
}

#[test]
fn double_close_and_use_after_close_are_ebadf_everywhere() {
    let f = fixture(BLKSNAP_PROFILE_V3);
    let h = f.handle;
    let dup = blksnap_ctl_dup(h);
    assert!(dup > 0 && dup != h);
    close(h);
    assert_eq!(blksnap_ctl_close(h), -EBADF);
    let mut buf = [0u8; 512];
    let mut size = 0u64;
    let mut version = uapi::blksnap_version::default();
    let p = f.dev.as_ptr();
    // SAFETY: valid pointers throughout; the handle is what is wrong.
    unsafe {
        assert_eq!(blksnap_ctl_ioctl(h, v3::IOCTL_BLKSNAP_VERSION as c_ulong, null_mut()), -EBADF);
        assert_eq!(blksnap_filter_ioctl(h, p, v3::BLKFILTER_ATTACH as c_ulong, null_mut()), -EBADF);
        assert_eq!(
            blksnap_filter_ioctl_fd(h, 0, v3::BLKFILTER_ATTACH as c_ulong, null_mut()),
            -EBADF
        );
        assert_eq!(blksnap_dev_pread(h, p, buf.as_mut_ptr().cast(), 512, 0), -EBADF as isize);
        assert_eq!(blksnap_dev_pwrite(h, p, buf.as_ptr().cast(), 512, 0), -EBADF as isize);
        assert_eq!(blksnap_image_pread(h, p, buf.as_mut_ptr().cast(), 512, 0), -EBADF as isize);
        assert_eq!(blksnap_image_pwrite(h, p, buf.as_ptr().cast(), 512, 0), -EBADF as isize);
        assert_eq!(blksnap_dev_size(h, p, &mut size), -EBADF);
    }
    assert_eq!(blksnap_ctl_profile(h), -EBADF);
    assert_eq!(blksnap_ctl_dup(h), -EBADF);
    // The dup still works: the engine lives until its last handle.
    assert_eq!(ioctl(dup, v3::IOCTL_BLKSNAP_VERSION, &mut version), 0);
    assert_eq!(version.major, 2);
    close(dup);
    for never in [0, -1, c_int::MIN, c_int::MAX] {
        assert_eq!(blksnap_ctl_close(never), -EBADF);
        assert_eq!(blksnap_ctl_profile(never), -EBADF);
    }
}

#[test]
fn null_arguments_give_each_commands_copy_fault_errno() {
    let f = fixture(BLKSNAP_PROFILE_V3);
    let v3_cases = [
        (v3::IOCTL_BLKSNAP_VERSION, ENODATA),
        (v3::IOCTL_BLKSNAP_SNAPSHOT_CREATE, ENODATA),
        (v3::IOCTL_BLKSNAP_SNAPSHOT_DESTROY, ENODATA),
        (v3::IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE, EINVAL),
        (v3::IOCTL_BLKSNAP_SNAPSHOT_TAKE, ENODATA),
        (v3::IOCTL_BLKSNAP_SNAPSHOT_COLLECT, ENODATA),
        (v3::IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT, EINVAL),
    ];
    for (code, want) in v3_cases {
        assert_eq!(ioctl::<u8>(f.handle, code, null_mut()), want, "v3 {code:#x}");
        // An address whose span wraps the address space faults the same way.
        assert_eq!(ioctl::<u8>(f.handle, code, (usize::MAX - 3) as *mut u8), want);
    }
    assert_eq!(collect_count_v3(f.handle), 0, "a failed CREATE leaves no snapshot (§7.21)");
    let n = fixture(BLKSNAP_PROFILE_NEWEST);
    let newest_cases = [
        (newest::IOCTL_BLKSNAP_VERSION, ENODATA),
        (newest::IOCTL_BLKSNAP_SNAPSHOT_CREATE, ENODATA),
        (newest::IOCTL_BLKSNAP_SNAPSHOT_DESTROY, ENODATA),
        (newest::IOCTL_BLKSNAP_SNAPSHOT_TAKE, ENODATA),
        (newest::IOCTL_BLKSNAP_SNAPSHOT_COLLECT, ENODATA),
        (newest::IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT, EINVAL),
    ];
    for (code, want) in newest_cases {
        assert_eq!(ioctl::<u8>(n.handle, code, null_mut()), want, "newest {code:#x}");
    }
    for code in [v3::BLKFILTER_ATTACH, v3::BLKFILTER_DETACH, v3::BLKFILTER_CTL] {
        assert_eq!(filter::<u8>(&f, code, null_mut()), EFAULT);
    }
    for code in [newest::BLKFILTER_ATTACH, newest::BLKFILTER_DETACH, newest::BLKFILTER_CTL] {
        assert_eq!(filter::<u8>(&n, code, null_mut()), EFAULT);
    }
    close(f.handle);
    close(n.handle);
}

#[test]
fn unknown_codes_and_the_other_profiles_codes_are_enotty() {
    let f = fixture(BLKSNAP_PROFILE_V3);
    let n = fixture(BLKSNAP_PROFILE_NEWEST);
    let mut big = [0u8; 4096];
    let v3_codes: Vec<u32> = v3::REQUESTS.iter().map(|r| r.1).collect();
    let newest_codes: Vec<u32> = newest::REQUESTS.iter().map(|r| r.1).collect();
    let mut foreign = vec![0u32, u32::MAX, 0x5401, crate::ioc::iow(0x56, 7, 8)];
    // Same nr, other size or type: upstream v3 dispatched on nr alone (§7.2, fixed).
    foreign.push(crate::ioc::iow(0x56, 0, 16));
    foreign.push(crate::ioc::iow(0x57, 1, 16));
    for code in foreign.iter().chain(&newest_codes).filter(|c| !v3_codes.contains(c)) {
        assert_eq!(ioctl(f.handle, *code, big.as_mut_ptr()), ENOTTY, "v3 handle {code:#x}");
        assert_eq!(filter(&f, *code, big.as_mut_ptr()), ENOTTY, "v3 filter {code:#x}");
    }
    for code in foreign.iter().chain(&v3_codes).filter(|c| !newest_codes.contains(c)) {
        assert_eq!(ioctl(n.handle, *code, big.as_mut_ptr()), ENOTTY, "newest handle {code:#x}");
        assert_eq!(filter(&n, *code, big.as_mut_ptr()), ENOTTY, "newest filter {code:#x}");
    }
    // Only the low 32 bits count (the kernel's `unsigned int cmd`).
    let mut version = uapi::blksnap_version::default();
    let wide = (1u64 << 32 | u64::from(v3::IOCTL_BLKSNAP_VERSION)) as c_ulong;
    // SAFETY: a valid out struct.
    let rc = unsafe {
        blksnap_ctl_ioctl(f.handle, wide, (&mut version as *mut uapi::blksnap_version).cast())
    };
    assert_eq!((rc, version.major), (0, 2));
    close(f.handle);
    close(n.handle);
}

#[test]
fn append_storage_validates_every_pointer_and_count() {
    let f = fixture(BLKSNAP_PROFILE_V3);
    let id = create_v3(f.handle);
    let mut range = uapi::blksnap_sectors { offset: 0, count: 64 };
    let path = f.storage.as_bytes_with_nul();
    let mut a = v3::blksnap_snapshot_append_storage {
        id,
        bdev_path: path.as_ptr() as *mut u8,
        bdev_path_size: path.len() as u32,
        count: 1,
        ranges: &mut range,
    };
    let code = v3::IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE;
    let mut bad = a;
    bad.bdev_path = null_mut();
    assert_eq!(ioctl(f.handle, code, &mut bad), EFAULT, "NULL path");
    bad = a;
    bad.bdev_path_size = 0;
    assert_eq!(ioctl(f.handle, code, &mut bad), EINVAL, "no room for the NUL");
    bad.bdev_path_size = path.len() as u32 - 1;
    assert_eq!(ioctl(f.handle, code, &mut bad), EINVAL, "no NUL within bdev_path_size");
    bad = a;
    bad.count = u32::MAX;
    assert_eq!(ioctl(f.handle, code, &mut bad), EINVAL, "count over the per-call limit");
    bad.count = 2;
    bad.ranges = null_mut();
    assert_eq!(ioctl(f.handle, code, &mut bad), EINVAL, "NULL ranges");
    bad = a;
    bad.id = blksnap_uuid { b: [9; 16] };
    assert_eq!(ioctl(f.handle, code, &mut bad), ESRCH, "unknown snapshot");
    let missing = c"/nonexistent/storage";
    bad = a;
    bad.bdev_path = missing.as_ptr() as *mut u8;
    bad.bdev_path_size = missing.to_bytes_with_nul().len() as u32;
    assert_eq!(ioctl(f.handle, code, &mut bad), ENOENT, "missing storage device");
    let mut beyond = uapi::blksnap_sectors { offset: DISK_BYTES / 512, count: 8 };
    bad = a;
    bad.ranges = &mut beyond;
    assert_eq!(ioctl(f.handle, code, &mut bad), EINVAL, "range past the storage's end");
    // Misaligned struct: served (copy_from_user has no alignment rule).
    let mut raw = vec![0u8; size_of::<v3::blksnap_snapshot_append_storage>() + 1];
    // SAFETY: raw has room for the struct at offset 1; unaligned write.
    unsafe { core::ptr::write_unaligned(raw.as_mut_ptr().add(1).cast(), a) };
    // SAFETY: raw[1..] holds the struct.
    assert_eq!(ioctl(f.handle, code, unsafe { raw.as_mut_ptr().add(1) }), 0);
    a.count = 0;
    assert_eq!(ioctl(f.handle, code, &mut a), 0, "zero ranges append nothing");
    close(f.handle);
}

/// v3 storage named by a served device's path is that device (its backing), in-process as the
/// kernel opens the device; a device and its own snapshot's storage exclude each other in either
/// order (EBUSY).
#[test]
fn storage_named_by_a_served_device_path() {
    let append = |f: &Fixture, id: blksnap_uuid, path: &CString| {
        let mut range = uapi::blksnap_sectors { offset: 0, count: 64 };
        let bytes = path.as_bytes_with_nul();
        let mut a = v3::blksnap_snapshot_append_storage {
            id,
            bdev_path: bytes.as_ptr() as *mut u8,
            bdev_path_size: bytes.len() as u32,
            count: 1,
            ranges: &mut range,
        };
        ioctl(f.handle, v3::IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE, &mut a)
    };
    let add = |f: &Fixture, id: blksnap_uuid| {
        let mut add = uapi::blksnap_snapshotadd { id };
        ctl(f, v3::BLKFILTER_CTL, ctl_cmd::SNAPSHOTADD, &mut add, 16)
    };
    let f = fixture(BLKSNAP_PROFILE_V3);
    attach(&f, BLKSNAP_PROFILE_V3);
    // append, then add: the device holds the snapshot's storage.
    let s1 = create_v3(f.handle);
    assert_eq!(append(&f, s1, &f.dev), 0, "the served path resolves to its backing");
    assert_eq!(add(&f, s1), EBUSY, "add after append");
    // add, then append: the same answer.
    let s2 = create_v3(f.handle);
    assert_eq!(add(&f, s2), 0);
    assert_eq!(append(&f, s2, &f.dev), EBUSY, "append after add");
    let by_number = CString::new("/dev/block/7:0").unwrap();
    assert_eq!(append(&f, s2, &by_number), EBUSY, "by number too");
    // another snapshot may use it (ranges other snapshots hold are the engine's EBUSY).
    let s3 = create_v3(f.handle);
    assert_eq!(append(&f, s3, &by_number), EBUSY, "s1 holds sectors 0-63 of that backing");
    close(f.handle);
}

#[test]
fn filter_requests_validate_names_optlen_and_opt() {
    for profile in [BLKSNAP_PROFILE_V3, BLKSNAP_PROFILE_NEWEST] {
        let f = fixture(profile);
        let (ctl_code, mismatch) = if profile == BLKSNAP_PROFILE_V3 {
            (v3::BLKFILTER_CTL, ENOENT)
        } else {
            (newest::BLKFILTER_CTL, EINVAL)
        };
        let mut info = [0u8; 64];
        assert_eq!(ctl(&f, ctl_code, ctl_cmd::CBTINFO, info.as_mut_ptr(), 64), ENOENT, "no filter");
        if profile == BLKSNAP_PROFILE_V3 {
            let mut other = v3::blkfilter_name { name: name32(b"other") };
            assert_eq!(filter(&f, v3::BLKFILTER_ATTACH, &mut other), ENOENT);
            assert_eq!(filter(&f, v3::BLKFILTER_DETACH, &mut other), ENOENT, "not attached");
        } else {
            let mut other = newest::blkfilter_attach { name: name32(b"other"), opt: 1, optlen: 9 };
            assert_eq!(filter(&f, newest::BLKFILTER_ATTACH, &mut other), ENOENT);
        }
        // The device with no filter: DETACH of blksnap, CTL of another name: ENOENT.
        let (attach_code, detach_code) = if profile == BLKSNAP_PROFILE_V3 {
            (v3::BLKFILTER_ATTACH, v3::BLKFILTER_DETACH)
        } else {
            (newest::BLKFILTER_ATTACH, newest::BLKFILTER_DETACH)
        };
        // A 48-byte ctl struct is large enough for every filter request's argument.
        let mut blksnap = ctl_struct(ctl_cmd::CBTINFO, info.as_mut_ptr().cast(), 64);
        let mut other = ctl_struct(ctl_cmd::CBTINFO, info.as_mut_ptr().cast(), 64);
        other.name = name32(b"other");
        assert_eq!(filter(&f, detach_code, &mut blksnap), ENOENT, "detach, no filter");
        assert_eq!(filter(&f, ctl_code, &mut other), ENOENT, "ctl of another name, no filter");
        attach(&f, profile);
        // blksnap attached: requests naming another filter (none is registered).
        assert_eq!(filter(&f, attach_code, &mut blksnap), EALREADY, "attach again");
        assert_eq!(filter(&f, attach_code, &mut other), ENOENT, "no filter of that name");
        assert_eq!(filter(&f, detach_code, &mut other), EINVAL, "detach: name mismatch");
        let mut c = ctl_struct(ctl_cmd::CBTINFO, info.as_mut_ptr().cast(), 64);
        c.name = name32(b"blksnap2");
        assert_eq!(filter(&f, ctl_code, &mut c), mismatch, "ctl name mismatch");
        // Every command: optlen one short → EINVAL; NULL opt → ENODATA.
        let sizes = [
            (ctl_cmd::CBTINFO, size_of::<uapi::blksnap_cbtinfo>()),
            (ctl_cmd::CBTMAP, size_of::<v3::blksnap_cbtmap>()),
            (ctl_cmd::CBTDIRTY, size_of::<v3::blksnap_cbtdirty>()),
            (ctl_cmd::SNAPSHOTADD, size_of::<uapi::blksnap_snapshotadd>()),
            (ctl_cmd::SNAPSHOTINFO, size_of::<uapi::blksnap_snapshotinfo>()),
        ];
        for (cmd, size) in sizes {
            assert_eq!(ctl(&f, ctl_code, cmd, info.as_mut_ptr(), size - 1), EINVAL, "cmd {cmd}");
            assert_eq!(ctl::<u8>(&f, ctl_code, cmd, null_mut(), size), ENODATA, "cmd {cmd}");
        }
        for cmd in [5, 6, u32::MAX] {
            assert_eq!(ctl(&f, ctl_code, cmd, info.as_mut_ptr(), 64), ENOTTY, "cmd {cmd}");
        }
        // cbtinfo into a misaligned buffer, padding zeroed.
        let mut raw = [0xEEu8; 48];
        assert_eq!(ctl(&f, ctl_code, ctl_cmd::CBTINFO, raw.as_mut_ptr().wrapping_add(1), 40), 0);
        assert!(raw[1 + 33..1 + size_of::<uapi::blksnap_cbtinfo>()].iter().all(|b| *b == 0));
        assert_eq!(u64::from_ne_bytes(raw[1..9].try_into().unwrap()), DISK_BYTES);
        // cbtmap: NULL buffer faults (EINVAL) unless nothing is copied (§7.12).
        let mut m = newest::blksnap_cbtmap { offset: 0, length: 1, buffer: 0 };
        assert_eq!(ctl(&f, ctl_code, ctl_cmd::CBTMAP, &mut m, 16), EINVAL);
        m.length = 0;
        assert_eq!(ctl(&f, ctl_code, ctl_cmd::CBTMAP, &mut m, 16), 0);
        m.offset = u32::MAX;
        assert_eq!(ctl(&f, ctl_code, ctl_cmd::CBTMAP, &mut m, 16), ENODATA, "§7.11");
        // cbtdirty: a huge count is refused before anything is read or allocated.
        let mut d = newest::blksnap_cbtdirty { count: u32::MAX, dirty_sectors: 8 };
        assert_eq!(ctl(&f, ctl_code, ctl_cmd::CBTDIRTY, &mut d, 16), EINVAL);
        d.count = 1;
        d.dirty_sectors = 0;
        assert_eq!(ctl(&f, ctl_code, ctl_cmd::CBTDIRTY, &mut d, 16), ENODATA);
        // snapshotadd of an unknown snapshot; snapshotinfo with no image: zero-filled.
        let mut add = uapi::blksnap_snapshotadd { id: blksnap_uuid { b: [1; 16] } };
        assert_eq!(ctl(&f, ctl_code, ctl_cmd::SNAPSHOTADD, &mut add, 16), ESRCH);
        let mut si = uapi::blksnap_snapshotinfo { error_code: 5, image: [0xAA; 32] };
        assert_eq!(ctl(&f, ctl_code, ctl_cmd::SNAPSHOTINFO, &mut si, 36), 0);
        assert_eq!((si.error_code, si.image), (0, [0u8; 32]), "§7.8");
        // optlen is never written back (§7.14).
        let mut c = ctl_struct(ctl_cmd::CBTINFO, info.as_mut_ptr().cast(), 64);
        assert_eq!(filter(&f, ctl_code, &mut c), 0);
        assert_eq!(c.optlen, 64);
        close(f.handle);
    }
}

/// Filter requests on a block device with no filter — one of the engine's snapshot images, or
/// any other block device of the host — return what the kernel returns (ENOENT), not ENOTTY;
/// attaching "blksnap" there is EOPNOTSUPP (the engine tracks only what it serves).
#[test]
fn filter_requests_on_untracked_block_devices_give_the_kernels_errnos() {
    let other_block_device = std::fs::read_dir("/dev").ok().and_then(|entries| {
        entries.flatten().map(|e| e.path()).find(|p| {
            use std::os::unix::fs::FileTypeExt;
            std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
        })
    });
    for profile in [BLKSNAP_PROFILE_V3, BLKSNAP_PROFILE_NEWEST] {
        let f = fixture(profile);
        let (attach_code, detach_code, ctl_code, image) = if profile == BLKSNAP_PROFILE_V3 {
            (v3::BLKFILTER_ATTACH, v3::BLKFILTER_DETACH, v3::BLKFILTER_CTL, "blksnap-image_7:0")
        } else {
            (
                newest::BLKFILTER_ATTACH,
                newest::BLKFILTER_DETACH,
                newest::BLKFILTER_CTL,
                "blksnap-7-0",
            )
        };
        let mut targets = vec![CString::new(format!("/dev/{image}")).unwrap()];
        targets
            .extend(other_block_device.iter().map(|p| CString::new(p.to_str().unwrap()).unwrap()));
        for path in &targets {
            let call = |code: u32, arg: *mut c_void| {
                // SAFETY: a C string; `arg` NULL or a live struct of the request's size (a
                // 48-byte ctl struct is large enough for every filter request).
                unsafe { blksnap_filter_ioctl(f.handle, path.as_ptr(), code as c_ulong, arg) }
            };
            let mut blksnap = ctl_struct(ctl_cmd::CBTINFO, null_mut(), 0);
            let mut other = ctl_struct(ctl_cmd::CBTINFO, null_mut(), 0);
            other.name = name32(b"another");
            let (b, o): (*mut c_void, *mut c_void) = (
                (&mut blksnap as *mut uapi::blkfilter_ctl).cast(),
                (&mut other as *mut uapi::blkfilter_ctl).cast(),
            );
            assert_eq!(call(detach_code, b), ENOENT, "{path:?}: detach with no filter");
            assert_eq!(call(detach_code, o), ENOENT, "{path:?}: detach of another filter name");
            assert_eq!(call(ctl_code, b), ENOENT, "{path:?}: ctl with no filter");
            assert_eq!(call(ctl_code, o), ENOENT, "{path:?}: ctl of another filter name");
            assert_eq!(call(attach_code, o), ENOENT, "{path:?}: no filter of that name");
            assert_eq!(call(attach_code, b), EOPNOTSUPP, "{path:?}: an untracked device");
            assert_eq!(call(ctl_code, null_mut()), EFAULT, "{path:?}: the argument first");
        }
        // Not a block device at all: ENOTTY, as the kernel on a regular file.
        let file = CString::new(f.storage.to_str().unwrap()).unwrap();
        let mut n = ctl_struct(ctl_cmd::CBTINFO, null_mut(), 0);
        // SAFETY: valid pointers.
        let rc = unsafe {
            blksnap_filter_ioctl(
                f.handle,
                file.as_ptr(),
                detach_code as c_ulong,
                (&mut n as *mut uapi::blkfilter_ctl).cast(),
            )
        };
        assert_eq!(rc, ENOTTY);
        close(f.handle);
    }
}

#[test]
fn device_names_paths_and_fds() {
    let f = fixture(BLKSNAP_PROFILE_V3);
    let mut n = v3::blkfilter_name { name: name32(b"blksnap") };
    let arg: *mut c_void = (&mut n as *mut v3::blkfilter_name).cast();
    let code = v3::BLKFILTER_ATTACH as c_ulong;
    let unknown = c"/nonexistent/blksnap-test-device";
    // SAFETY: valid pointers or NULL.
    unsafe {
        assert_eq!(blksnap_filter_ioctl(f.handle, null(), code, arg), EFAULT);
        assert_eq!(blksnap_filter_ioctl(f.handle, unknown.as_ptr(), code, arg), ENOTTY);
        let by_number = c"/dev/block/7:0";
        assert_eq!(blksnap_filter_ioctl(f.handle, by_number.as_ptr(), code, arg), 0);
        assert_eq!(blksnap_filter_ioctl(f.handle, f.dev.as_ptr(), code, arg), EALREADY);
        assert_eq!(blksnap_filter_ioctl_fd(f.handle, -1, code, arg), -EBADF);
        assert_eq!(blksnap_filter_ioctl_fd(f.handle, 1_000_000, code, arg), -EBADF);
    }
    let null_dev = std::fs::File::open("/dev/null").unwrap();
    let backing = std::fs::File::open(&f.disk).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: valid pointers.
    unsafe {
        assert_eq!(blksnap_filter_ioctl_fd(f.handle, null_dev.as_raw_fd(), code, arg), ENOTTY);
        assert_eq!(blksnap_filter_ioctl_fd(f.handle, backing.as_raw_fd(), code, arg), EALREADY);
    }
    let long = vec![b'a'; uapi::PATH_MAX + 10];
    // SAFETY: not NUL-terminated within PATH_MAX, and at most PATH_MAX bytes are read.
    let rc = unsafe { blksnap_filter_ioctl(f.handle, long.as_ptr().cast(), code, arg) };
    assert_eq!(rc, EINVAL);
    close(f.handle);
}

#[test]
fn data_io_validates_buffers_and_geometry() {
    let f = fixture(BLKSNAP_PROFILE_V3);
    let h = f.handle;
    let p = f.dev.as_ptr();
    let mut buf = vec![0u8; 1025];
    let e = |v: c_int| v as isize;
    // SAFETY: valid pointers, NULL, or lengths that are rejected before any access.
    unsafe {
        assert_eq!(blksnap_dev_pread(h, null(), buf.as_mut_ptr().cast(), 512, 0), e(EFAULT));
        assert_eq!(blksnap_dev_pread(h, p, null_mut(), 512, 0), e(EFAULT));
        assert_eq!(blksnap_dev_pwrite(h, p, null(), 512, 0), e(EFAULT));
        assert_eq!(blksnap_dev_pread(h, p, null_mut(), 0, 0), 0);
        assert_eq!(blksnap_dev_pread(h, p, buf.as_mut_ptr().cast(), 511, 0), e(EINVAL));
        assert_eq!(blksnap_dev_pread(h, p, buf.as_mut_ptr().cast(), 512, 1), e(EINVAL));
        assert_eq!(blksnap_dev_pread(h, p, buf.as_mut_ptr().cast(), 512, DISK_BYTES), e(EINVAL));
        assert_eq!(
            blksnap_dev_pread(h, p, buf.as_mut_ptr().cast(), 512, u64::MAX - 511),
            e(EINVAL)
        );
        assert_eq!(blksnap_dev_pread(h, p, buf.as_mut_ptr().cast(), usize::MAX, 0), e(EINVAL));
        let unknown = c"/dev/other";
        assert_eq!(
            blksnap_dev_pread(h, unknown.as_ptr(), buf.as_mut_ptr().cast(), 512, 0),
            e(ENODEV)
        );
        let image = c"/dev/blksnap-image_7:0";
        assert_eq!(
            blksnap_image_pread(h, image.as_ptr(), buf.as_mut_ptr().cast(), 512, 0),
            e(ENODEV)
        );
        assert_eq!(blksnap_image_pwrite(h, image.as_ptr(), buf.as_ptr().cast(), 512, 0), e(ENODEV));
        let newest_name = c"/dev/blksnap-7-0";
        assert_eq!(
            blksnap_image_pread(h, newest_name.as_ptr(), buf.as_mut_ptr().cast(), 512, 0),
            e(ENODEV)
        );
        // Misaligned buffer, aligned geometry: served.
        let mis = buf.as_mut_ptr().wrapping_add(1);
        core::ptr::write_bytes(mis, 0x3C, 512);
        assert_eq!(blksnap_dev_pwrite(h, p, mis.cast(), 512, 512), 512);
        buf.fill(0);
        assert_eq!(blksnap_dev_pread(h, p, buf.as_mut_ptr().cast(), 512, 512), 512);
        assert!(buf[..512].iter().all(|b| *b == 0x3C));
        let mut size = 0u64;
        assert_eq!(blksnap_dev_size(h, p, null_mut()), EFAULT);
        assert_eq!(blksnap_dev_size(h, null(), &mut size), EFAULT);
        assert_eq!(blksnap_dev_size(h, image.as_ptr(), &mut size), ENODEV, "not taken yet");
        assert_eq!(blksnap_dev_size(h, p, &mut size), 0);
        assert_eq!(size, DISK_BYTES);
    }
    close(h);
}

#[test]
fn collect_and_wait_event_boundaries() {
    let f = fixture(BLKSNAP_PROFILE_V3);
    let h = f.handle;
    let a = create_v3(h);
    let _b = create_v3(h);
    let mut ids = [blksnap_uuid::default(); 1];
    let mut c = v3::blksnap_snapshot_collect { count: 1, ids: ids.as_mut_ptr() };
    assert_eq!(ioctl(h, v3::IOCTL_BLKSNAP_SNAPSHOT_COLLECT, &mut c), ENODATA, "array too small");
    assert_eq!((c.count, ids[0]), (1, a));
    c.count = 0;
    assert_eq!(ioctl(h, v3::IOCTL_BLKSNAP_SNAPSHOT_COLLECT, &mut c), ENODATA);
    assert_eq!(c.count, 0);
    c = v3::blksnap_snapshot_collect { count: 2, ids: (usize::MAX - 8) as *mut blksnap_uuid };
    assert_eq!(ioctl(h, v3::IOCTL_BLKSNAP_SNAPSHOT_COLLECT, &mut c), ENODATA, "wrapping ids");
    // WAIT_EVENT: the immediate low_free_space, then a poll; unknown id → ESRCH.
    let mut ev = vec![0u8; 4096 + 1];
    let at = ev.as_mut_ptr().wrapping_add(1); // misaligned event buffer
                                              // SAFETY: 4096 bytes from at lie inside ev.
    unsafe {
        core::ptr::copy_nonoverlapping(a.b.as_ptr(), at, 16);
        core::ptr::write_bytes(at.add(16), 0, 4);
    }
    assert_eq!(ioctl(h, v3::IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT, at), 0);
    assert_eq!(u32::from_ne_bytes(ev[21..25].try_into().unwrap()), v3::EVENT_CODE_LOW_FREE_SPACE);
    assert!(ev[33 + 8..].iter().all(|b| *b == 0), "payload zero-padded");
    assert_eq!(ioctl(h, v3::IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT, at), ENOENT);
    ev[1] ^= 0xff;
    assert_eq!(ioctl(h, v3::IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT, at), ESRCH);
    // TAKE without storage: EFAULT (v3); without devices first: ENODEV.
    let mut id = a;
    assert_eq!(ioctl(h, v3::IOCTL_BLKSNAP_SNAPSHOT_TAKE, &mut id), ENODEV);
    close(h);
}

#[test]
fn newest_create_validates_the_file_name() {
    let f = fixture(BLKSNAP_PROFILE_NEWEST);
    let h = f.handle;
    let code = newest::IOCTL_BLKSNAP_SNAPSHOT_CREATE;
    let mut c = newest::blksnap_snapshot_create {
        diff_storage_limit_sect: 1 << 20,
        diff_storage_filename: 0,
        id: blksnap_uuid::default(),
    };
    assert_eq!(ioctl(h, code, &mut c), EFAULT, "NULL file name (§7.28)");
    let long = vec![b'/'; uapi::PATH_MAX + 1];
    c.diff_storage_filename = long.as_ptr() as u64;
    assert_eq!(ioctl(h, code, &mut c), EINVAL, "longer than PATH_MAX");
    c.diff_storage_filename = f.storage.as_ptr() as u64;
    assert_eq!(ioctl(h, code, &mut c), 0);
    assert_ne!(c.id, blksnap_uuid::default());
    // The device holding the storage cannot join (§7.16): storage = the disk's backing file.
    let disk = CString::new(f.disk.to_str().unwrap()).unwrap();
    let mut c2 = c;
    c2.diff_storage_filename = disk.as_ptr() as u64;
    assert_eq!(ioctl(h, code, &mut c2), 0);
    attach(&f, BLKSNAP_PROFILE_NEWEST);
    let mut add = uapi::blksnap_snapshotadd { id: c2.id };
    assert_eq!(ctl(&f, newest::BLKFILTER_CTL, ctl_cmd::SNAPSHOTADD, &mut add, 16), -16);
    add.id = c.id;
    assert_eq!(ctl(&f, newest::BLKFILTER_CTL, ctl_cmd::SNAPSHOTADD, &mut add, 16), 0);
    close(h);
}

#[test]
fn strerror_and_version_never_fail() {
    for err in [0, 1, -1, EBADF, -EBADF, PANIC_ERRNO, -PANIC_ERRNO, 9999, c_int::MIN, c_int::MAX] {
        let msg = blksnap_strerror(err);
        assert!(!msg.is_null());
        // SAFETY: a static NUL-terminated string.
        assert!(!unsafe { std::ffi::CStr::from_ptr(msg) }.to_bytes().is_empty());
    }
    // SAFETY: static NUL-terminated.
    let v = unsafe { std::ffi::CStr::from_ptr(blksnap_lib_version()) };
    assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    assert_eq!(negative(blksnap_model::Errno::EIO), EIO);
}

#[test]
fn a_panic_is_caught_and_poisons_the_engine() {
    let f = fixture(BLKSNAP_PROFILE_V3);
    let dup = blksnap_ctl_dup(f.handle);
    assert_eq!(blksnap_test_inject_panic(f.handle), -PANIC_ERRNO);
    let mut version = uapi::blksnap_version::default();
    assert_eq!(ioctl(f.handle, v3::IOCTL_BLKSNAP_VERSION, &mut version), -PANIC_ERRNO);
    assert_eq!(ioctl(dup, v3::IOCTL_BLKSNAP_VERSION, &mut version), -PANIC_ERRNO, "same engine");
    assert_eq!(blksnap_ctl_profile(f.handle), -PANIC_ERRNO);
    assert_eq!(blksnap_ctl_dup(f.handle), -PANIC_ERRNO);
    close(f.handle);
    close(dup);
    assert_eq!(blksnap_ctl_close(f.handle), -EBADF);
    assert_eq!(blksnap_test_inject_panic(f.handle), -EBADF);
    // Other engines are unaffected.
    let g = fixture(BLKSNAP_PROFILE_V3);
    assert_eq!(ioctl(g.handle, v3::IOCTL_BLKSNAP_VERSION, &mut version), 0);
    close(g.handle);
}

#[test]
fn paths_with_interior_bytes_are_plain_bytes() {
    let f = fixture(BLKSNAP_PROFILE_V3);
    let weird: [c_char; 4] = [-1, -2, b'x' as c_char, 0];
    let mut n = v3::blkfilter_name { name: name32(b"blksnap") };
    // SAFETY: NUL-terminated; a valid struct.
    let rc = unsafe {
        blksnap_filter_ioctl(
            f.handle,
            weird.as_ptr(),
            v3::BLKFILTER_ATTACH as c_ulong,
            (&mut n as *mut v3::blkfilter_name).cast(),
        )
    };
    assert_eq!(rc, ENOTTY);
    close(f.handle);
}

/// Regressions found by the `abi_ioctl` fuzz target (`fuzz/`): a nested pointer whose
/// *described* span wraps the address space is a copy fault, even when the part the command
/// would touch first does not wrap. Each of these dereferenced an invalid address before.
#[test]
fn fuzz_regressions_wrapping_described_spans_are_faults() {
    // A wrapping address the first 16 (or 40) bytes from which do not wrap.
    let wrap = |span: usize| usize::MAX - span / 2;
    // newest CREATE: file name read byte by byte up to PATH_MAX.
    let f = fixture(BLKSNAP_PROFILE_NEWEST);
    let mut c = newest::blksnap_snapshot_create {
        diff_storage_limit_sect: 1 << 20,
        diff_storage_filename: wrap(uapi::PATH_MAX) as u64,
        id: blksnap_uuid::default(),
    };
    assert_eq!(ioctl(f.handle, newest::IOCTL_BLKSNAP_SNAPSHOT_CREATE, &mut c), EFAULT);
    // COLLECT: two ids into a described array of 4 that wraps after the first one.
    let mut storage = newest::blksnap_snapshot_create {
        diff_storage_limit_sect: 1 << 20,
        diff_storage_filename: f.storage.as_ptr() as u64,
        id: blksnap_uuid::default(),
    };
    for _ in 0..2 {
        assert_eq!(ioctl(f.handle, newest::IOCTL_BLKSNAP_SNAPSHOT_CREATE, &mut storage), 0);
    }
    let mut col = newest::blksnap_snapshot_collect { count: 4, ids: wrap(64) as u64 };
    assert_eq!(ioctl(f.handle, newest::IOCTL_BLKSNAP_SNAPSHOT_COLLECT, &mut col), ENODATA);
    // BLKFILTER_CTL: an opt of optlen bytes that wraps, though the struct itself would not.
    attach(&f, BLKSNAP_PROFILE_NEWEST);
    for cmd in [ctl_cmd::CBTINFO, ctl_cmd::CBTMAP, ctl_cmd::SNAPSHOTINFO] {
        let opt = wrap(4096) as *mut u8;
        assert_eq!(ctl(&f, newest::BLKFILTER_CTL, cmd, opt, 4096), ENODATA, "cmd {cmd}");
    }
    close(f.handle);

    let f = fixture(BLKSNAP_PROFILE_V3);
    // v3 APPEND_STORAGE: bdev_path of bdev_path_size bytes that wraps.
    let id = create_v3(f.handle);
    let mut range = uapi::blksnap_sectors { offset: 0, count: 64 };
    let mut a = v3::blksnap_snapshot_append_storage {
        id,
        bdev_path: wrap(4096) as *mut u8,
        bdev_path_size: 4096,
        count: 1,
        ranges: &mut range,
    };
    assert_eq!(ioctl(f.handle, v3::IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE, &mut a), EFAULT);
    // v3 cbtmap: `length` bytes described, clamped to the block count: the described buffer
    // wraps although the clamped copy would not.
    attach(&f, BLKSNAP_PROFILE_V3);
    let mut m =
        v3::blksnap_cbtmap { offset: 0, length: u32::MAX, buffer: wrap(1 << 20) as *mut u8 };
    let len = size_of::<v3::blksnap_cbtmap>();
    assert_eq!(ctl(&f, v3::BLKFILTER_CTL, ctl_cmd::CBTMAP, &mut m, len), EINVAL);
    close(f.handle);
}
