//! # libblksnap: the C ABI of blksnap-rs
//!
//! A C or C++ backup client written against the upstream `linux/blksnap.h` and
//! `linux/blk-filter.h` (profile "v3" = April 2023, or "newest" = lk6.15) keeps its structs and
//! request codes; it calls [`blksnap_ctl_ioctl`] where it called `ioctl(control_fd, ...)` and
//! [`blksnap_filter_ioctl`] / [`blksnap_filter_ioctl_fd`] where it called `ioctl(device_fd,
//! BLKFILTER_*, ...)`. Return values are the kernel's: 0 (or a count), or a **negative errno**
//! (`blksnap-abi.md` §2.6–3.8, §6), with the quirk decisions of §7 listed in `ffi/README.md`.
//!
//! A handle names an in-process engine serving configured devices (path → backing file, see
//! [`instance`]); data I/O on devices and snapshot images goes through
//! [`blksnap_dev_pread`]/[`blksnap_dev_pwrite`]/[`blksnap_image_pread`]/[`blksnap_image_pwrite`].
//!
//! Safety model: every entry point is `unsafe extern "C"` with the ioctl contract (non-NULL
//! pointers point to the documented number of bytes); everything checkable is checked (NULL,
//! unrepresentable or wrapping addresses, overflowing counts, short `optlen`, closed handles),
//! misaligned pointers are served (byte-wise copies), and no panic crosses the boundary.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

use core::ffi::{c_char, c_int, c_ulong, c_void};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::sync::Arc;

use blksnap_model::{DeviceId, Errno, Profile};

pub mod client;
pub mod control;
pub mod errno;
pub mod filter;
pub mod handles;
pub mod instance;
pub mod ioc;
pub mod uapi;
pub mod user;

use crate::errno::{negative, EBADF};
use crate::handles::boundary;
use crate::instance::{Config, Device, Instance};
use crate::user::{UserAddr, R};

/// `ssize_t` (the C header takes it from `<sys/types.h>`).
#[allow(non_camel_case_types)]
pub type ssize_t = isize;

/// Profile "v3" (April 2023 series: APPEND_STORAGE, `low_free_space`).
pub const BLKSNAP_PROFILE_V3: u32 = 1;
/// Profile "newest" (lk6.15: storage file + limit, `no_space`).
pub const BLKSNAP_PROFILE_NEWEST: u32 = 2;
/// Environment variable read by [`blksnap_ctl_open`] when `config` is NULL.
pub const BLKSNAP_CONFIG_ENV: &str = "BLKSNAP_CONFIG";
/// `ENOTRECOVERABLE`: returned (negated) after a caught panic and by every later call on the
/// poisoned handle.
pub const BLKSNAP_PANIC_ERRNO: c_int = 131;
const _: () = assert!(BLKSNAP_PANIC_ERRNO == errno::PANIC_ERRNO);

fn profile_of(value: u32) -> R<Profile> {
    match value {
        BLKSNAP_PROFILE_V3 => Ok(Profile::V3),
        BLKSNAP_PROFILE_NEWEST => Ok(Profile::Newest),
        _ => Err(Errno::EINVAL),
    }
}

fn profile_number(profile: Profile) -> c_int {
    match profile {
        Profile::V3 => BLKSNAP_PROFILE_V3 as c_int,
        Profile::Newest => BLKSNAP_PROFILE_NEWEST as c_int,
    }
}

/// `Ok(n)` → n, `Err(errno)` → -errno.
fn ret(result: R<c_int>) -> c_int {
    result.unwrap_or_else(negative)
}

/// Reads a path argument: NULL → EFAULT, no NUL within PATH_MAX → EINVAL.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string.
unsafe fn path_arg(path: *const c_char) -> R<Vec<u8>> {
    // SAFETY: forwarded contract.
    unsafe {
        user::read_cstr(UserAddr::from_ptr(path), uapi::PATH_MAX, Errno::EFAULT, Errno::EINVAL)
    }
}

/// Runs `body` with the instance of `handle`, inside the panic boundary.
fn with_instance<T: handles::Ret>(handle: c_int, body: impl FnOnce(&Instance) -> T) -> T {
    boundary(Some(handle), || match handles::get(handle) {
        Ok(instance) => body(&instance),
        Err(negative_errno) => T::from_errno(negative_errno),
    })
}

/// Opens a control handle for `profile` ([`BLKSNAP_PROFILE_V3`] or [`BLKSNAP_PROFILE_NEWEST`])
/// on a new in-process engine configured by `config` (see the configuration grammar in
/// `instance`; NULL reads the `BLKSNAP_CONFIG` environment variable, unset = no devices), or —
/// client mode, `socket=PATH` in `config` or the `BLKSNAP_SOCKET` environment variable — on a
/// connection to `blksnapd` ([`client`]; `-ENOENT` no socket there, `-EIO` cannot connect).
///
/// Returns the handle (> 0) or: `-EINVAL` unknown profile or bad configuration; the errno of
/// opening a backing file (`-ENOENT`, `-EACCES` as `-EIO`, ...); `-ENOMEM` out of handles.
///
/// # Safety
/// `config` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn blksnap_ctl_open(profile: u32, config: *const c_char) -> c_int {
    boundary(None, || {
        let open = || -> R<c_int> {
            let profile = profile_of(profile)?;
            let text = if config.is_null() {
                std::env::var(BLKSNAP_CONFIG_ENV).unwrap_or_default()
            } else {
                // SAFETY: contract: config is a NUL-terminated string. A configuration has no
                // length limit of its own; 1 MiB bounds the scan.
                let bytes = unsafe {
                    user::read_cstr(
                        UserAddr::from_ptr(config),
                        1 << 20,
                        Errno::EFAULT,
                        Errno::EINVAL,
                    )?
                };
                String::from_utf8(bytes).map_err(|_| Errno::EINVAL)?
            };
            let instance = Instance::new(profile, Config::parse(&text)?)?;
            Ok(handles::insert(Arc::new(instance)).unwrap_or_else(|e| e))
        };
        ret(open())
    })
}

/// Another handle on the same engine as `handle` (as a second `open` of the control device):
/// the new handle (> 0), `-EBADF`, `-ENOTRECOVERABLE`, or `-ENOMEM`.
#[no_mangle]
pub extern "C" fn blksnap_ctl_dup(handle: c_int) -> c_int {
    with_instance(handle, |_| match handles::get(handle) {
        Ok(instance) => handles::insert(instance).unwrap_or_else(|e| e),
        Err(e) => e,
    })
}

/// Closes a handle: 0, or `-EBADF` if it is not open (double close, never opened). Closing a
/// poisoned handle succeeds. The engine is freed with its last handle.
#[no_mangle]
pub extern "C" fn blksnap_ctl_close(handle: c_int) -> c_int {
    boundary(None, || handles::remove(handle))
}

/// The profile of a handle ([`BLKSNAP_PROFILE_V3`] or [`BLKSNAP_PROFILE_NEWEST`]), or
/// `-EBADF` / `-ENOTRECOVERABLE`.
#[no_mangle]
pub extern "C" fn blksnap_ctl_profile(handle: c_int) -> c_int {
    with_instance(handle, |inst| profile_number(inst.profile))
}

/// A control-device request (`ioctl(fd_of("/dev/blksnap-control"), request, arg)`), with the
/// upstream request codes and structs of the handle's profile. Only the low 32 bits of
/// `request` count (the kernel's `unsigned int cmd`). Returns 0 or a negative errno as the
/// kernel does; an unknown code (including the other profile's) is `-ENOTTY`.
///
/// # Safety
/// `arg` is NULL or points to the request's struct, and the pointers inside it to their
/// documented buffers (as for the real ioctl).
#[no_mangle]
pub unsafe extern "C" fn blksnap_ctl_ioctl(
    handle: c_int,
    request: c_ulong,
    arg: *mut c_void,
) -> c_int {
    with_instance(handle, |inst| {
        // SAFETY: contract forwarded.
        ret(unsafe { control::ioctl(inst, request as u32, UserAddr::from_ptr(arg)) })
    })
}

/// What a filter request is aimed at.
enum FilterTarget {
    /// A device this engine serves (and may track).
    Served(Device),
    /// A block device it does not track: one of its snapshot images, or another block device.
    Untracked,
    /// Not a block device (a regular file, a character device, nothing): ENOTTY, as the kernel.
    NotABlockDevice,
}

/// The target named by a path: a served device (by its path, number or backing), an image of
/// this engine, another block device, or none.
fn filter_target_of_path(inst: &Instance, path: &[u8]) -> FilterTarget {
    if let Some(device) = inst.device_by_path(path) {
        return FilterTarget::Served(device);
    }
    let is_block = std::fs::metadata(std::ffi::OsStr::from_bytes(path))
        .is_ok_and(|m| m.file_type().is_block_device());
    if inst.device_by_image(path).is_some() || is_block {
        FilterTarget::Untracked
    } else {
        FilterTarget::NotABlockDevice
    }
}

fn filter_on(inst: &Instance, target: FilterTarget, request: c_ulong, arg: *mut c_void) -> c_int {
    let arg = UserAddr::from_ptr(arg);
    let request = request as u32;
    match target {
        FilterTarget::Served(device) => {
            // SAFETY: the caller of the entry point guarantees the ioctl contract on `arg`.
            ret(unsafe { filter::ioctl(inst, &device, request, arg) })
        }
        FilterTarget::Untracked => {
            // SAFETY: as above.
            ret(unsafe { filter::ioctl_unfiltered(inst, request, arg) })
        }
        FilterTarget::NotABlockDevice => negative(Errno::ENOTTY),
    }
}

/// A block-filter request (`BLKFILTER_ATTACH`, `BLKFILTER_DETACH`, `BLKFILTER_CTL` of the
/// handle's profile) on the served device named `device_path` (its configured path,
/// `/dev/block/MAJ:MIN`, or its backing file). Returns 0 or a negative errno as the kernel does;
/// `-EFAULT` NULL path; `-ENOTTY` a path this engine does not serve (as BLKFILTER on a non-block
/// fd) or an unknown request.
///
/// # Safety
/// `device_path` is NULL or a NUL-terminated string; `arg` as for [`blksnap_ctl_ioctl`].
#[no_mangle]
pub unsafe extern "C" fn blksnap_filter_ioctl(
    handle: c_int,
    device_path: *const c_char,
    request: c_ulong,
    arg: *mut c_void,
) -> c_int {
    with_instance(handle, |inst| {
        // SAFETY: contract: a string or NULL.
        match unsafe { path_arg(device_path) } {
            Ok(path) => filter_on(inst, filter_target_of_path(inst, &path), request, arg),
            Err(errno) => negative(errno),
        }
    })
}

/// What an open file descriptor refers to: a real block device with a served number, or a
/// path (`/proc/self/fd/N`) that names a served device, its backing file or an image; else
/// another block device or none.
fn filter_target_of_fd(inst: &Instance, fd: c_int) -> Result<FilterTarget, c_int> {
    if fd < 0 {
        return Err(-EBADF);
    }
    let link = format!("/proc/self/fd/{fd}");
    // A closed fd has no /proc/self/fd entry.
    let meta = std::fs::metadata(&link).map_err(|_| -EBADF)?;
    if meta.file_type().is_block_device() {
        let rdev = meta.rdev();
        let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
        let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
        if let Some(d) = inst.device_by_id(DeviceId::new(major as u32, minor as u32)) {
            return Ok(FilterTarget::Served(d));
        }
    }
    let target = std::fs::read_link(&link).map_err(|_| -EBADF)?;
    Ok(match filter_target_of_path(inst, target.as_os_str().as_bytes()) {
        FilterTarget::NotABlockDevice if meta.file_type().is_block_device() => {
            FilterTarget::Untracked
        }
        found => found,
    })
}

/// As [`blksnap_filter_ioctl`], the device named by an open file descriptor (of the device
/// path or of its backing file). `-EBADF` for a negative or closed fd.
///
/// # Safety
/// `arg` as for [`blksnap_ctl_ioctl`].
#[no_mangle]
pub unsafe extern "C" fn blksnap_filter_ioctl_fd(
    handle: c_int,
    fd: c_int,
    request: c_ulong,
    arg: *mut c_void,
) -> c_int {
    with_instance(handle, |inst| match filter_target_of_fd(inst, fd) {
        Ok(target) => filter_on(inst, target, request, arg),
        Err(negative_errno) => negative_errno,
    })
}

/// Which side of a device an I/O goes to.
#[derive(Clone, Copy)]
enum Side {
    Origin,
    Image,
}

fn resolve(inst: &Instance, side: Side, path: &[u8]) -> R<DeviceId> {
    let device = match side {
        Side::Origin => inst.device_by_path(path),
        Side::Image => inst.device_by_image(path),
    };
    device.map(|d| d.id).ok_or(Errno::ENODEV)
}

/// Largest length of one `blksnap_{dev,image}_{pread,pwrite}` call (64 MiB): the data is
/// bounced through a buffer of that length, so a larger (or huge) one is `-EINVAL` before
/// anything is allocated or the path is looked at. Split larger I/O.
const MAX_IO_BYTES: usize = 64 << 20;

/// The return value of an I/O of `len` bytes, or EINVAL over [`MAX_IO_BYTES`].
fn io_len(len: usize) -> R<isize> {
    if len > MAX_IO_BYTES {
        return Err(Errno::EINVAL);
    }
    isize::try_from(len).map_err(|_| Errno::EINVAL)
}

/// # Safety
/// `path` a string or NULL; `buf` NULL or `len` writable bytes.
unsafe fn pread(
    handle: c_int,
    side: Side,
    path: *const c_char,
    buf: *mut c_void,
    len: usize,
    offset: u64,
) -> isize {
    with_instance(handle, |inst| {
        let run = || -> R<isize> {
            let count = io_len(len)?;
            // SAFETY: contract forwarded.
            let path = unsafe { path_arg(path)? };
            let dev = resolve(inst, side, &path)?;
            let out = UserAddr::from_ptr(buf);
            if len > 0 {
                out.check(len, Errno::EFAULT)?;
            }
            let mut data = vec![0u8; len];
            match side {
                Side::Origin => inst.engine.read(dev, offset, &mut data),
                Side::Image => inst.engine.image_read(dev, offset, &mut data),
            }
            .map_err(|e| e.errno)?;
            // SAFETY: contract: buf holds len writable bytes (checked non-NULL if len > 0).
            unsafe { user::write_bytes(out, &data, Errno::EFAULT)? };
            Ok(count)
        };
        run().unwrap_or_else(|e| negative(e) as isize)
    })
}

/// # Safety
/// `path` a string or NULL; `buf` NULL or `len` readable bytes.
unsafe fn pwrite(
    handle: c_int,
    side: Side,
    path: *const c_char,
    buf: *const c_void,
    len: usize,
    offset: u64,
) -> isize {
    with_instance(handle, |inst| {
        let run = || -> R<isize> {
            let count = io_len(len)?;
            // SAFETY: contract forwarded.
            let path = unsafe { path_arg(path)? };
            let dev = resolve(inst, side, &path)?;
            // SAFETY: contract: buf holds len readable bytes.
            let data = unsafe { user::read_bytes(UserAddr::from_ptr(buf), len, Errno::EFAULT)? };
            match side {
                Side::Origin => inst.engine.write(dev, offset, &data),
                Side::Image => inst.engine.image_write(dev, offset, &data),
            }
            .map_err(|e| e.errno)?;
            Ok(count)
        };
        run().unwrap_or_else(|e| negative(e) as isize)
    })
}

/// Reads `len` bytes at `offset_bytes` of the served device `device_path` (as `pread` on the
/// block device). Returns `len`, or: `-EFAULT` NULL path or buffer; `-ENODEV` not a served
/// device; `-EINVAL` offset or length not a multiple of 512, or past the end; `-EIO`.
///
/// # Safety
/// `device_path` is NULL or a string; `buf` is NULL or `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn blksnap_dev_pread(
    handle: c_int,
    device_path: *const c_char,
    buf: *mut c_void,
    len: usize,
    offset_bytes: u64,
) -> ssize_t {
    // SAFETY: contract forwarded.
    unsafe { pread(handle, Side::Origin, device_path, buf, len, offset_bytes) }
}

/// Writes `len` bytes at `offset_bytes` of the served device (through the engine: CBT marking
/// and copy-on-write happen). Returns and errors as [`blksnap_dev_pread`].
///
/// # Safety
/// `device_path` is NULL or a string; `buf` is NULL or `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn blksnap_dev_pwrite(
    handle: c_int,
    device_path: *const c_char,
    buf: *const c_void,
    len: usize,
    offset_bytes: u64,
) -> ssize_t {
    // SAFETY: contract forwarded.
    unsafe { pwrite(handle, Side::Origin, device_path, buf, len, offset_bytes) }
}

/// Reads the snapshot image `image_path` (`/dev/` + `snapshotinfo.image`, prefix optional).
/// As [`blksnap_dev_pread`]; `-ENODEV` no such image (not taken, destroyed); `-EIO` the image
/// is corrupted (difference storage overflow or failure).
///
/// # Safety
/// `image_path` is NULL or a string; `buf` is NULL or `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn blksnap_image_pread(
    handle: c_int,
    image_path: *const c_char,
    buf: *mut c_void,
    len: usize,
    offset_bytes: u64,
) -> ssize_t {
    // SAFETY: contract forwarded.
    unsafe { pread(handle, Side::Image, image_path, buf, len, offset_bytes) }
}

/// Writes the snapshot image (images are writable, as upstream). As [`blksnap_image_pread`].
///
/// # Safety
/// `image_path` is NULL or a string; `buf` is NULL or `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn blksnap_image_pwrite(
    handle: c_int,
    image_path: *const c_char,
    buf: *const c_void,
    len: usize,
    offset_bytes: u64,
) -> ssize_t {
    // SAFETY: contract forwarded.
    unsafe { pwrite(handle, Side::Image, image_path, buf, len, offset_bytes) }
}

/// The size in bytes of a served device or of an existing snapshot image (as `BLKGETSIZE64`)
/// into `*size_bytes`: 0, `-EFAULT` NULL argument, `-ENODEV` neither.
///
/// # Safety
/// `path` is NULL or a string; `size_bytes` is NULL or 8 writable bytes.
#[no_mangle]
pub unsafe extern "C" fn blksnap_dev_size(
    handle: c_int,
    path: *const c_char,
    size_bytes: *mut u64,
) -> c_int {
    with_instance(handle, |inst| {
        let run = || -> R<c_int> {
            // SAFETY: contract forwarded.
            let path = unsafe { path_arg(path)? };
            let out = UserAddr::from_ptr(size_bytes);
            out.check(8, Errno::EFAULT)?;
            let size = match resolve(inst, Side::Origin, &path) {
                Ok(dev) => inst.engine.disk_capacity_bytes(dev),
                Err(_) => {
                    let dev = resolve(inst, Side::Image, &path)?;
                    // The image exists iff it can be read (zero bytes).
                    inst.engine
                        .image_read(dev, 0, &mut [])
                        .and(inst.engine.disk_capacity_bytes(dev))
                }
            }
            .map_err(|e| e.errno)?;
            // SAFETY: contract: 8 writable bytes (non-NULL checked).
            unsafe { user::write_bytes(out, &size.to_ne_bytes(), Errno::EFAULT)? };
            Ok(0)
        };
        ret(run())
    })
}

/// A static, NUL-terminated description of an errno (negative or positive); never NULL.
#[no_mangle]
pub extern "C" fn blksnap_strerror(err: c_int) -> *const c_char {
    errno::message_ptr(err)
}

/// The library version ("MAJOR.MINOR.PATCH"), static, never NULL. (The blksnap interface
/// version, 2.0.0.0, is what `IOCTL_BLKSNAP_VERSION` reports.)
#[no_mangle]
pub extern "C" fn blksnap_lib_version() -> *const c_char {
    const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    VERSION.as_ptr().cast()
}

/// Test hook: panics inside the boundary of `handle` (only with the `test-hooks` feature).
/// Returns `-ENOTRECOVERABLE` (the panic was caught) or `-EBADF`; the handle is poisoned.
#[cfg(any(test, feature = "test-hooks"))]
#[no_mangle]
pub extern "C" fn blksnap_test_inject_panic(handle: c_int) -> c_int {
    with_instance(handle, |_| -> c_int { panic!("injected panic (test hook)") })
}

#[cfg(test)]
mod tests;
