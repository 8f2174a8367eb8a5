//! What a served descriptor does: data I/O through the engine (devices: CBT and copy-on-write
//! happen; images: the snapshot's content), positions, flushes, the block-device ioctls, the
//! control and filter ioctls (libblksnap's dispatch), and the `stat` view of served nodes.

use core::ffi::{c_int, c_uint, c_ulong, c_void};
use core::mem::size_of;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use blksnap_ffi::instance::Instance;
use blksnap_ffi::ioc::{io, ior};
use blksnap_ffi::user::UserAddr;
use blksnap_ffi::{control, filter};
use blksnap_model::DeviceId;

use crate::guard::{Errno, Res};
use crate::state::{self, Object, Target};

/// Logical block size (`BLKSSZGET`): the O_DIRECT alignment of offsets, lengths and buffers.
pub const LOGICAL_BLOCK: u64 = 512;
/// Physical block size and minimum I/O (`BLKPBSZGET`, `BLKIOMIN`): libblksnap's `io_min`.
pub const PHYSICAL_BLOCK: u32 = 4096;
/// Largest piece of one request handed to the engine at a time (bounds the bounce buffer).
const CHUNK: usize = 1 << 20;

const BLK: u32 = 0x12;
/// `BLKROGET` (`int` out: 0).
pub const BLKROGET: u32 = io(BLK, 94);
/// `BLKGETSIZE` (`unsigned long` out: sectors).
pub const BLKGETSIZE: u32 = io(BLK, 96);
/// `BLKFLSBUF` (flush).
pub const BLKFLSBUF: u32 = io(BLK, 97);
/// `BLKSSZGET` (`int` out: logical block size).
pub const BLKSSZGET: u32 = io(BLK, 104);
/// `BLKBSZGET` (`_IOR(0x12,112,size_t)`; the kernel writes an `int`: the soft block size).
pub const BLKBSZGET: u32 = ior(BLK, 112, size_of::<usize>());
/// `BLKGETSIZE64` (`_IOR(0x12,114,size_t)`; `u64` out: bytes).
pub const BLKGETSIZE64: u32 = ior(BLK, 114, size_of::<usize>());
/// `BLKIOMIN` (`unsigned int` out).
pub const BLKIOMIN: u32 = io(BLK, 120);
/// `BLKIOOPT` (`unsigned int` out: 0, no preference).
pub const BLKIOOPT: u32 = io(BLK, 121);
/// `BLKALIGNOFF` (`int` out: 0).
pub const BLKALIGNOFF: u32 = io(BLK, 122);
/// `BLKPBSZGET` (`unsigned int` out: physical block size).
pub const BLKPBSZGET: u32 = io(BLK, 123);

const _: () = {
    // blksnap-abi.md §8.2 (x86_64 and i386 values).
    assert!(BLKSSZGET == 0x1268 && BLKPBSZGET == 0x127b && BLKFLSBUF == 0x1261);
    #[cfg(target_pointer_width = "64")]
    assert!(BLKGETSIZE64 == 0x8008_1272 && BLKBSZGET == 0x8008_1270);
    #[cfg(target_pointer_width = "32")]
    assert!(BLKGETSIZE64 == 0x8004_1272 && BLKBSZGET == 0x8004_1270);
};

fn code(err: blksnap_model::Error) -> Errno {
    err.errno.code()
}

/// Whether the snapshot image of `id` exists (taken, not destroyed; a corrupted one exists).
pub fn image_exists(inst: &Instance, id: DeviceId) -> bool {
    match inst.engine.image_read(id, 0, &mut []) {
        Ok(()) => true,
        Err(e) => e.errno != blksnap_model::Errno::ENODEV,
    }
}

/// Size in bytes: a device's capacity; an image's, or 0 once it is gone (as a deleted disk).
fn size_of_target(inst: &Instance, target: Target) -> Res<u64> {
    match target {
        Target::Control => Err(libc::ENOTTY),
        Target::Device(id) => inst.engine.disk_capacity_bytes(id).map_err(code),
        Target::Image(id) if image_exists(inst, id) => {
            inst.engine.disk_capacity_bytes(id).map_err(code)
        }
        Target::Image(_) => Ok(0),
    }
}

/// The engine and the device of a data descriptor; `EINVAL` on the control device (it has no
/// read/write).
fn data_target(obj: &Object) -> Res<(Arc<Instance>, Target)> {
    match obj.target {
        Target::Control => Err(libc::EINVAL),
        target => Ok((state::engine()?, target)),
    }
}

fn aligned(offset: u64, len: usize, addr: usize) -> bool {
    let block = LOGICAL_BLOCK as usize;
    offset.is_multiple_of(LOGICAL_BLOCK) && len.is_multiple_of(block) && addr.is_multiple_of(block)
}

/// Reads the sector-aligned window at `start` (an image that is gone reads as EIO).
fn read_window(inst: &Instance, target: Target, start: u64, window: &mut [u8]) -> Res<()> {
    match target {
        Target::Device(id) => inst.engine.read(id, start, window).map_err(code),
        Target::Image(id) => inst.engine.image_read(id, start, window).map_err(image_errno),
        Target::Control => Err(libc::EINVAL),
    }
}

fn write_window(inst: &Instance, target: Target, start: u64, window: &[u8]) -> Res<()> {
    match target {
        Target::Device(id) => inst.engine.write(id, start, window).map_err(code),
        Target::Image(id) => inst.engine.image_write(id, start, window).map_err(image_errno),
        Target::Control => Err(libc::EINVAL),
    }
}

/// I/O on an image whose disk was deleted under an open descriptor fails with EIO.
fn image_errno(err: blksnap_model::Error) -> Errno {
    match err.errno {
        blksnap_model::Errno::ENODEV => libc::EIO,
        other => other.code(),
    }
}

/// The sector-aligned window around `[at, at + len)`.
fn window_of(at: u64, len: usize) -> (u64, usize) {
    let start = at - at % LOGICAL_BLOCK;
    let end = (at + len as u64).div_ceil(LOGICAL_BLOCK) * LOGICAL_BLOCK;
    (start, (end - start) as usize)
}

/// `pread`: bytes read (0 at or past the end), or `EBADF` (not open for reading), `EINVAL`
/// (negative offset; O_DIRECT and an offset, length or buffer not 512-aligned; the control
/// device), `EFAULT` (NULL buffer), `EIO`.
///
/// # Safety
/// `buf` is NULL or `len` writable bytes.
pub unsafe fn pread(obj: &Object, buf: *mut u8, len: usize, offset: i64) -> Res<usize> {
    let (inst, target) = data_target(obj)?;
    if !obj.readable {
        return Err(libc::EBADF);
    }
    let offset = u64::try_from(offset).map_err(|_| libc::EINVAL)?;
    let size = size_of_target(&inst, target)?;
    if offset >= size || len == 0 {
        return Ok(0);
    }
    let len = len.min(usize::try_from(size - offset).unwrap_or(usize::MAX));
    if obj.direct() && !aligned(offset, len, buf as usize) {
        return Err(libc::EINVAL);
    }
    if buf.is_null() {
        return Err(libc::EFAULT);
    }
    let mut done = 0;
    while done < len {
        let at = offset + done as u64;
        let n = (len - done).min(CHUNK);
        let (start, window_len) = window_of(at, n);
        let mut window = vec![0u8; window_len];
        if let Err(errno) = read_window(&inst, target, start, &mut window) {
            return if done > 0 { Ok(done) } else { Err(errno) };
        }
        let skip = (at - start) as usize;
        // SAFETY: contract: buf holds len writable bytes and done + n <= len; the window holds
        // skip + n bytes; a Vec never overlaps the caller's memory.
        unsafe { core::ptr::copy_nonoverlapping(window.as_ptr().add(skip), buf.add(done), n) };
        done += n;
    }
    Ok(done)
}

/// `pwrite`: bytes written (short at the end of the device), or `EBADF` (not open for writing),
/// `ENOSPC` (at or past the end), `EINVAL`, `EFAULT`, `EIO` as [`pread`]. Unaligned buffered
/// writes read-modify-write the sectors they touch.
///
/// # Safety
/// `buf` is NULL or `len` readable bytes.
pub unsafe fn pwrite(obj: &Object, buf: *const u8, len: usize, offset: i64) -> Res<usize> {
    let (inst, target) = data_target(obj)?;
    if !obj.writable {
        return Err(libc::EBADF);
    }
    let offset = u64::try_from(offset).map_err(|_| libc::EINVAL)?;
    if len == 0 {
        return Ok(0);
    }
    let size = size_of_target(&inst, target)?;
    if offset >= size {
        return Err(libc::ENOSPC);
    }
    let len = len.min(usize::try_from(size - offset).unwrap_or(usize::MAX));
    if obj.direct() && !aligned(offset, len, buf as usize) {
        return Err(libc::EINVAL);
    }
    if buf.is_null() {
        return Err(libc::EFAULT);
    }
    let mut done = 0;
    while done < len {
        let at = offset + done as u64;
        let n = (len - done).min(CHUNK);
        let (start, window_len) = window_of(at, n);
        let mut window = vec![0u8; window_len];
        let skip = (at - start) as usize;
        let partial = skip != 0 || window_len != n;
        let result = if partial { read_window(&inst, target, start, &mut window) } else { Ok(()) };
        let result = result.and_then(|()| {
            // SAFETY: contract: buf holds len readable bytes and done + n <= len; the window
            // holds skip + n bytes; a Vec never overlaps the caller's memory.
            unsafe {
                core::ptr::copy_nonoverlapping(buf.add(done), window.as_mut_ptr().add(skip), n)
            };
            write_window(&inst, target, start, &window)
        });
        if let Err(errno) = result {
            return if done > 0 { Ok(done) } else { Err(errno) };
        }
        done += n;
    }
    Ok(done)
}

/// `lseek`: `SEEK_SET`/`SEEK_CUR`/`SEEK_END` within `0..=size` (as a block device), else
/// `EINVAL`; `ESPIPE` on the control device.
pub fn lseek(obj: &Object, offset: i64, whence: c_int) -> Res<i64> {
    if obj.target == Target::Control {
        return Err(libc::ESPIPE);
    }
    let (inst, target) = data_target(obj)?;
    let size = i64::try_from(size_of_target(&inst, target)?).map_err(|_| libc::EOVERFLOW)?;
    let mut pos = obj.position();
    let base = match whence {
        libc::SEEK_SET => 0,
        libc::SEEK_CUR => i64::try_from(*pos).map_err(|_| libc::EOVERFLOW)?,
        libc::SEEK_END => size,
        _ => return Err(libc::EINVAL),
    };
    let new = base.checked_add(offset).ok_or(libc::EINVAL)?;
    if new < 0 || new > size {
        return Err(libc::EINVAL);
    }
    *pos = new as u64;
    Ok(new)
}

/// Flushes the backing file of a served device to stable storage. (`fsync` on any descriptor of
/// a file flushes the file; the engine writes the backing with plain `pwrite`s.)
fn flush_backing(inst: &Instance, id: DeviceId) -> Res<()> {
    if let Some(remote) = inst.engine.remote() {
        // In front of blksnapd: the daemon flushes the snapshot's storage and the backing it
        // writes (the file may not even be readable by this process).
        return remote.flush(id).map_err(code);
    }
    let device = inst.device_by_id(id).ok_or(libc::ENODEV)?;
    let file = std::fs::File::open(&device.backing).map_err(|e| os_errno(&e))?;
    file.sync_all().map_err(|e| os_errno(&e))
}

fn os_errno(err: &std::io::Error) -> Errno {
    err.raw_os_error().unwrap_or(libc::EIO)
}

/// `fsync`/`fdatasync`/`BLKFLSBUF`: a device's backing is flushed; an image has nothing to
/// flush; `EINVAL` on the control device.
pub fn fsync(obj: &Object) -> Res<c_int> {
    match obj.target {
        Target::Control => Err(libc::EINVAL),
        Target::Device(id) => {
            flush_backing(&*state::engine()?, id)?;
            Ok(0)
        }
        Target::Image(_) => {
            state::engine()?;
            Ok(0)
        }
    }
}

/// Flushes every served device (for `sync`), if the engine exists.
pub fn flush_all() {
    if let Some(inst) = state::engine_if_created() {
        for device in inst.devices() {
            let _ = flush_backing(&inst, device.id);
        }
    }
}

/// Writes an ioctl's scalar result: `EFAULT` for NULL.
///
/// # Safety
/// `arg` is NULL or `size_of::<T>()` writable bytes.
unsafe fn put<T>(arg: *mut c_void, value: T) -> Res<c_int> {
    if arg.is_null() {
        return Err(libc::EFAULT);
    }
    // SAFETY: contract; alignment is not required of the caller.
    unsafe { arg.cast::<T>().write_unaligned(value) };
    Ok(0)
}

/// The kernel's default soft block size: the largest power of two up to the page size that
/// divides the capacity, at least the logical block size.
fn soft_block_size(size: u64) -> c_int {
    let mut block = PHYSICAL_BLOCK as u64;
    while block > LOGICAL_BLOCK && !size.is_multiple_of(block) {
        block /= 2;
    }
    block as c_int
}

/// `ioctl` on a served descriptor: the control requests of the profile (libblksnap's
/// dispatch), the block-device size/geometry requests on devices and images, and `BLKFILTER_*`
/// on devices (libblksnap's filter dispatch). Anything else: `ENOTTY`.
///
/// # Safety
/// `arg` follows the request's contract (as for the real ioctl).
pub unsafe fn ioctl(obj: &Object, request: c_ulong, arg: *mut c_void) -> Res<c_int> {
    let inst = state::engine()?;
    // The kernel's `unsigned int cmd`.
    let request = request as u32;
    let target = obj.target;
    let id = match target {
        Target::Control => {
            // SAFETY: contract forwarded.
            let result = unsafe { control::ioctl(&inst, request, UserAddr::from_ptr(arg)) };
            return result.map_err(|e| e.code());
        }
        Target::Device(id) | Target::Image(id) => id,
    };
    let size = || size_of_target(&inst, target);
    // SAFETY: (every `put`) contract: `arg` points to the request's output type.
    unsafe {
        match request {
            BLKGETSIZE64 => put::<u64>(arg, size()?),
            BLKGETSIZE => {
                put::<c_ulong>(arg, c_ulong::try_from(size()? >> 9).map_err(|_| libc::EFBIG)?)
            }
            BLKSSZGET => put::<c_int>(arg, LOGICAL_BLOCK as c_int),
            BLKBSZGET => put::<c_int>(arg, soft_block_size(size()?)),
            BLKPBSZGET | BLKIOMIN => put::<c_uint>(arg, PHYSICAL_BLOCK),
            BLKIOOPT => put::<c_uint>(arg, 0),
            BLKALIGNOFF | BLKROGET => put::<c_int>(arg, 0),
            BLKFLSBUF => fsync(obj),
            _ => match target {
                Target::Device(_) => {
                    let device = inst.device_by_id(id).ok_or(libc::ENOTTY)?;
                    filter::ioctl(&inst, &device, request, UserAddr::from_ptr(arg))
                        .map_err(|e| e.code())
                }
                // An image is a block device with no filter: the kernel's errnos (ENOENT).
                _ => filter::ioctl_unfiltered(&inst, request, UserAddr::from_ptr(arg))
                    .map_err(|e| e.code()),
            },
        }
    }
}

/// Whether `request` is one of the profile's `BLKFILTER_*` requests.
fn is_filter_request(request: u32) -> bool {
    use blksnap_ffi::uapi::{newest, v3};
    match state::setup().profile {
        Ok(blksnap_model::Profile::V3) => {
            [v3::BLKFILTER_ATTACH, v3::BLKFILTER_DETACH, v3::BLKFILTER_CTL].contains(&request)
        }
        Ok(blksnap_model::Profile::Newest) => {
            [newest::BLKFILTER_ATTACH, newest::BLKFILTER_DETACH, newest::BLKFILTER_CTL]
                .contains(&request)
        }
        Err(_) => false,
    }
}

/// `BLKFILTER_*` on a descriptor the shim does not serve: a real block device — typically
/// blksnapd's `/dev/ublkbN`, in client mode (`BLKSNAP_SOCKET`) — that the engine knows by its
/// number (`st_rdev`). The daemon serves the data of such a device itself, so only the filter
/// requests need the library; everything else on the descriptor stays with the kernel.
///
/// `None` (the caller passes the request to libc): not a filter request, not a block device, no
/// engine can be had (no configuration, no daemon), or a device the engine does not know.
/// Caller holds [`crate::guard::Inside`] (the `fstat` below must reach libc).
///
/// # Safety
/// `arg` follows the request's contract.
pub unsafe fn filter_on_block_device(
    fd: c_int,
    request: c_ulong,
    arg: *mut c_void,
) -> Option<Res<c_int>> {
    let request = request as u32;
    if !is_filter_request(request) {
        return None;
    }
    // SAFETY: `stat` is plain old data; fstat writes it whole or fails.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: a valid out pointer; a bad `fd` is fstat's EBADF.
    if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFBLK {
        return None;
    }
    let id = DeviceId::new(libc::major(st.st_rdev), libc::minor(st.st_rdev));
    let inst = state::engine().ok()?;
    let device = inst.device_by_id(id)?;
    // SAFETY: contract forwarded.
    Some(
        unsafe { filter::ioctl(&inst, &device, request, UserAddr::from_ptr(arg)) }
            .map_err(|e| e.code()),
    )
}

/// The `stat` view of a served node.
#[derive(Debug, Clone, Copy)]
pub struct Node {
    /// `st_mode`.
    pub mode: u32,
    /// `st_rdev`.
    pub rdev: DeviceId,
    /// `st_ino`.
    pub ino: u64,
    /// `st_gid` (6, "disk", for block devices).
    pub gid: u32,
}

/// `st_dev` of served nodes (devtmpfs is usually 0:5).
const NODE_DEV: (u32, u32) = (0, 5);

/// The node of a served target. By path (`by_path`): `ENOENT` for an image that does not exist
/// (not taken, destroyed), and for the control device when the profile is invalid. By descriptor,
/// the node of what was opened (even if the image has been deleted since).
pub fn node(target: Target, by_path: bool) -> Res<Node> {
    let setup = state::setup();
    let ino = |kind: u64, id: DeviceId| {
        0xb15a_0000_0000_0000 | kind << 44 | u64::from(id.major) << 20 | u64::from(id.minor)
    };
    match target {
        Target::Control => {
            if by_path {
                setup.profile.map_err(|_| libc::ENOENT)?;
            }
            let (major, minor) = state::CONTROL_NUMBER;
            let rdev = DeviceId::new(major, minor);
            Ok(Node { mode: libc::S_IFCHR | 0o600, rdev, ino: ino(0, rdev), gid: 0 })
        }
        Target::Device(id) => {
            Ok(Node { mode: libc::S_IFBLK | 0o660, rdev: id, ino: ino(1, id), gid: 6 })
        }
        Target::Image(id) => {
            let exists = || state::engine_if_created().is_some_and(|i| image_exists(&i, id));
            if by_path && !exists() {
                return Err(libc::ENOENT);
            }
            let rdev = setup.image_number(id);
            Ok(Node { mode: libc::S_IFBLK | 0o660, rdev, ino: ino(2, rdev), gid: 6 })
        }
    }
}

fn now() -> (i64, i64) {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (i64::try_from(t.as_secs()).unwrap_or(i64::MAX), i64::from(t.subsec_nanos()))
}

macro_rules! fill_stat {
    ($ty:ty, $node:expr) => {{
        let node: &Node = $node;
        // SAFETY: the stat structs are plain integers (and padding): all-zero is valid.
        let mut st: $ty = unsafe { core::mem::zeroed() };
        let (sec, nsec) = now();
        st.st_dev = libc::makedev(NODE_DEV.0, NODE_DEV.1) as _;
        st.st_ino = node.ino as _;
        st.st_nlink = 1;
        st.st_mode = node.mode as _;
        st.st_uid = 0;
        st.st_gid = node.gid as _;
        st.st_rdev = libc::makedev(node.rdev.major, node.rdev.minor) as _;
        st.st_size = 0;
        st.st_blksize = PHYSICAL_BLOCK as _;
        st.st_blocks = 0;
        st.st_atime = sec as _;
        st.st_atime_nsec = nsec as _;
        st.st_mtime = sec as _;
        st.st_mtime_nsec = nsec as _;
        st.st_ctime = sec as _;
        st.st_ctime_nsec = nsec as _;
        st
    }};
}

/// `struct stat` of a node.
pub fn stat_of(node: &Node) -> libc::stat {
    fill_stat!(libc::stat, node)
}

/// `struct stat64` of a node.
pub fn stat64_of(node: &Node) -> libc::stat64 {
    fill_stat!(libc::stat64, node)
}

/// `struct statx` of a node (basic stats, plus the O_DIRECT alignment if asked for).
pub fn statx_of(node: &Node, mask: c_uint) -> libc::statx {
    // SAFETY: struct statx is plain integers (and padding): all-zero is valid.
    let mut st: libc::statx = unsafe { core::mem::zeroed() };
    let (sec, nsec) = now();
    // SAFETY: plain integers: all-zero is valid.
    let mut stamp: libc::statx_timestamp = unsafe { core::mem::zeroed() };
    stamp.tv_sec = sec;
    stamp.tv_nsec = nsec as u32;
    st.stx_mask = libc::STATX_BASIC_STATS;
    st.stx_blksize = PHYSICAL_BLOCK;
    st.stx_nlink = 1;
    st.stx_uid = 0;
    st.stx_gid = node.gid;
    st.stx_mode = node.mode as u16;
    st.stx_ino = node.ino;
    st.stx_atime = stamp;
    st.stx_ctime = stamp;
    st.stx_mtime = stamp;
    st.stx_rdev_major = node.rdev.major;
    st.stx_rdev_minor = node.rdev.minor;
    st.stx_dev_major = NODE_DEV.0;
    st.stx_dev_minor = NODE_DEV.1;
    if mask & libc::STATX_DIOALIGN != 0 && node.mode & libc::S_IFMT == libc::S_IFBLK {
        st.stx_mask |= libc::STATX_DIOALIGN;
        st.stx_dio_mem_align = LOGICAL_BLOCK as u32;
        st.stx_dio_offset_align = LOGICAL_BLOCK as u32;
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows() {
        assert_eq!(window_of(0, 512), (0, 512));
        assert_eq!(window_of(1, 1), (0, 512));
        assert_eq!(window_of(511, 2), (0, 1024));
        assert_eq!(window_of(1024, 100), (1024, 512));
        assert!(aligned(512, 1024, 4096));
        assert!(!aligned(512, 1000, 4096));
        assert!(!aligned(100, 512, 4096));
        assert!(!aligned(0, 512, 4097));
    }

    #[test]
    fn block_sizes() {
        assert_eq!(soft_block_size(8 << 20), 4096);
        assert_eq!(soft_block_size(8 << 20 | 2048), 2048);
        assert_eq!(soft_block_size(8 << 20 | 512), 512);
        assert_eq!(BLKGETSIZE, 0x1260);
        assert_eq!(BLKROGET, 0x125e);
    }

    #[test]
    fn stat_views() {
        let node =
            Node { mode: libc::S_IFBLK | 0o660, rdev: DeviceId::new(8, 16), ino: 42, gid: 6 };
        let st = stat_of(&node);
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFBLK);
        assert_eq!(libc::major(st.st_rdev), 8);
        assert_eq!(libc::minor(st.st_rdev), 16);
        let sx = statx_of(&node, libc::STATX_BASIC_STATS | libc::STATX_DIOALIGN);
        assert_eq!((sx.stx_rdev_major, sx.stx_rdev_minor), (8, 16));
        assert_eq!(sx.stx_dio_offset_align, 512);
        assert_eq!(u32::from(sx.stx_mode) & libc::S_IFMT, libc::S_IFBLK);
    }
}
