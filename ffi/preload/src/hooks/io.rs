//! The data path: `read`, `write`, `pread`/`pwrite` (and `64`), `readv`/`writev`,
//! `preadv`/`pwritev` (and `64`), the fortified `__read_chk`/`__pread_chk`/`__pread64_chk`,
//! `lseek`/`lseek64`, `fsync`, `fdatasync`, `sync`.

// `off_t` is `i64` on 64-bit targets and `i32` on i386: the `.into()` widenings are identities here.
#![allow(clippy::useless_conversion)]

use core::ffi::{c_int, c_void};

use libc::{iovec, off64_t, off_t, size_t, ssize_t};

use super::served;
use crate::data;
use crate::guard::{self, missing, Inside, Res};
use crate::real;
use crate::state::Object;

/// Most iovecs per call (`IOV_MAX`).
const IOV_MAX: c_int = 1024;

fn count(n: usize) -> Res<ssize_t> {
    ssize_t::try_from(n).map_err(|_| libc::EINVAL)
}

/// `read`/`write` at the shared file position (advanced by the bytes transferred).
///
/// # Safety
/// `buf` is NULL or `len` accessible bytes (writable for a read).
unsafe fn at_position(obj: &Object, buf: *mut c_void, len: usize, write: bool) -> Res<ssize_t> {
    let mut pos = obj.position();
    let at = i64::try_from(*pos).map_err(|_| libc::EOVERFLOW)?;
    let done = if write {
        // SAFETY: contract.
        unsafe { data::pwrite(obj, buf.cast_const().cast(), len, at)? }
    } else {
        // SAFETY: contract.
        unsafe { data::pread(obj, buf.cast(), len, at)? }
    };
    *pos += done as u64;
    count(done)
}

/// Vectored I/O at `offset` (`None`: the file position), segment by segment; stops at the first
/// short transfer. O_DIRECT alignment applies to every segment.
///
/// # Safety
/// `iov` is NULL or `iovcnt` iovecs, each NULL or `iov_len` accessible bytes.
unsafe fn vectored(
    obj: &Object,
    iov: *const iovec,
    iovcnt: c_int,
    offset: Option<i64>,
    write: bool,
) -> Res<ssize_t> {
    if !(0..=IOV_MAX).contains(&iovcnt) {
        return Err(libc::EINVAL);
    }
    if iov.is_null() && iovcnt > 0 {
        return Err(libc::EFAULT);
    }
    let segments: Vec<iovec> = (0..iovcnt as usize)
        // SAFETY: contract: iovcnt readable iovecs.
        .map(|i| unsafe { iov.add(i).read_unaligned() })
        .collect();
    let total = segments.iter().try_fold(0usize, |sum, s| sum.checked_add(s.iov_len));
    if total.is_none_or(|t| t > ssize_t::MAX as usize) {
        return Err(libc::EINVAL);
    }
    let mut pos = obj.position();
    let mut at = match offset {
        Some(offset) => offset,
        None => i64::try_from(*pos).map_err(|_| libc::EOVERFLOW)?,
    };
    let mut done = 0usize;
    for segment in segments.iter().filter(|s| s.iov_len > 0) {
        let base = segment.iov_base;
        let result = if write {
            // SAFETY: contract: the segment is iov_len readable bytes.
            unsafe { data::pwrite(obj, base.cast_const().cast(), segment.iov_len, at) }
        } else {
            // SAFETY: contract: the segment is iov_len writable bytes.
            unsafe { data::pread(obj, base.cast(), segment.iov_len, at) }
        };
        match result {
            Ok(n) => {
                done += n;
                at += n as i64;
                if n < segment.iov_len {
                    break;
                }
            }
            Err(_) if done > 0 => break,
            Err(errno) => return Err(errno),
        }
    }
    if offset.is_none() {
        *pos = at as u64;
    }
    count(done)
}

/// `read(fd, buf, count)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, len: size_t) -> ssize_t {
    if let Some((_inside, obj)) = served(fd) {
        // SAFETY: contract: buf holds len writable bytes.
        return guard::run(|| unsafe { at_position(&obj, buf, len, false) });
    }
    match real::read() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(fd, buf, len) },
        None => missing(),
    }
}

/// `__read_chk(fd, buf, count, buflen)` (`_FORTIFY_SOURCE`): `count > buflen` goes to libc,
/// which aborts.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn __read_chk(
    fd: c_int,
    buf: *mut c_void,
    len: size_t,
    buflen: size_t,
) -> ssize_t {
    if len <= buflen {
        if let Some((_inside, obj)) = served(fd) {
            // SAFETY: contract: buf holds len writable bytes.
            return guard::run(|| unsafe { at_position(&obj, buf, len, false) });
        }
    }
    match real::__read_chk() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(fd, buf, len, buflen) },
        None => missing(),
    }
}

/// `write(fd, buf, count)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, len: size_t) -> ssize_t {
    if let Some((_inside, obj)) = served(fd) {
        // SAFETY: contract: buf holds len readable bytes (never written through).
        return guard::run(|| unsafe { at_position(&obj, buf.cast_mut(), len, true) });
    }
    match real::write() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(fd, buf, len) },
        None => missing(),
    }
}

/// `pread` for both offset widths.
///
/// # Safety
/// `buf` is NULL or `len` writable bytes.
unsafe fn pread_served(obj: &Object, buf: *mut c_void, len: usize, offset: i64) -> ssize_t {
    // SAFETY: contract.
    guard::run(|| count(unsafe { data::pread(obj, buf.cast(), len, offset)? }))
}

/// `pwrite` for both offset widths.
///
/// # Safety
/// `buf` is NULL or `len` readable bytes.
unsafe fn pwrite_served(obj: &Object, buf: *const c_void, len: usize, offset: i64) -> ssize_t {
    // SAFETY: contract.
    guard::run(|| count(unsafe { data::pwrite(obj, buf.cast(), len, offset)? }))
}

/// `pread(fd, buf, count, offset)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn pread(fd: c_int, buf: *mut c_void, len: size_t, off: off_t) -> ssize_t {
    if let Some((_inside, obj)) = served(fd) {
        // SAFETY: contract.
        return unsafe { pread_served(&obj, buf, len, off.into()) };
    }
    match real::pread() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(fd, buf, len, off) },
        None => missing(),
    }
}

/// `pread64(fd, buf, count, offset)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn pread64(
    fd: c_int,
    buf: *mut c_void,
    len: size_t,
    off: off64_t,
) -> ssize_t {
    if let Some((_inside, obj)) = served(fd) {
        // SAFETY: contract.
        return unsafe { pread_served(&obj, buf, len, off) };
    }
    match real::pread64() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(fd, buf, len, off) },
        None => missing(),
    }
}

/// `__pread_chk(fd, buf, count, offset, buflen)` (`_FORTIFY_SOURCE`).
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn __pread_chk(
    fd: c_int,
    buf: *mut c_void,
    len: size_t,
    off: off_t,
    buflen: size_t,
) -> ssize_t {
    if len <= buflen {
        if let Some((_inside, obj)) = served(fd) {
            // SAFETY: contract.
            return unsafe { pread_served(&obj, buf, len, off.into()) };
        }
    }
    match real::__pread_chk() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(fd, buf, len, off, buflen) },
        None => missing(),
    }
}

/// `__pread64_chk(fd, buf, count, offset, buflen)` (`_FORTIFY_SOURCE`).
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn __pread64_chk(
    fd: c_int,
    buf: *mut c_void,
    len: size_t,
    off: off64_t,
    buflen: size_t,
) -> ssize_t {
    if len <= buflen {
        if let Some((_inside, obj)) = served(fd) {
            // SAFETY: contract.
            return unsafe { pread_served(&obj, buf, len, off) };
        }
    }
    match real::__pread64_chk() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(fd, buf, len, off, buflen) },
        None => missing(),
    }
}

/// `pwrite(fd, buf, count, offset)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn pwrite(fd: c_int, buf: *const c_void, len: size_t, off: off_t) -> ssize_t {
    if let Some((_inside, obj)) = served(fd) {
        // SAFETY: contract.
        return unsafe { pwrite_served(&obj, buf, len, off.into()) };
    }
    match real::pwrite() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(fd, buf, len, off) },
        None => missing(),
    }
}

/// `pwrite64(fd, buf, count, offset)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn pwrite64(
    fd: c_int,
    buf: *const c_void,
    len: size_t,
    off: off64_t,
) -> ssize_t {
    if let Some((_inside, obj)) = served(fd) {
        // SAFETY: contract.
        return unsafe { pwrite_served(&obj, buf, len, off) };
    }
    match real::pwrite64() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(fd, buf, len, off) },
        None => missing(),
    }
}

/// `readv(fd, iov, iovcnt)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const iovec, iovcnt: c_int) -> ssize_t {
    if let Some((_inside, obj)) = served(fd) {
        // SAFETY: contract.
        return guard::run(|| unsafe { vectored(&obj, iov, iovcnt, None, false) });
    }
    match real::readv() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(fd, iov, iovcnt) },
        None => missing(),
    }
}

/// `writev(fd, iov, iovcnt)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const iovec, iovcnt: c_int) -> ssize_t {
    if let Some((_inside, obj)) = served(fd) {
        // SAFETY: contract.
        return guard::run(|| unsafe { vectored(&obj, iov, iovcnt, None, true) });
    }
    match real::writev() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(fd, iov, iovcnt) },
        None => missing(),
    }
}

/// `preadv(fd, iov, iovcnt, offset)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn preadv(
    fd: c_int,
    iov: *const iovec,
    iovcnt: c_int,
    off: off_t,
) -> ssize_t {
    if let Some((_inside, obj)) = served(fd) {
        // SAFETY: contract.
        return guard::run(|| unsafe { vectored(&obj, iov, iovcnt, Some(off.into()), false) });
    }
    match real::preadv() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(fd, iov, iovcnt, off) },
        None => missing(),
    }
}

/// `preadv64(fd, iov, iovcnt, offset)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn preadv64(
    fd: c_int,
    iov: *const iovec,
    iovcnt: c_int,
    off: off64_t,
) -> ssize_t {
    if let Some((_inside, obj)) = served(fd) {
        // SAFETY: contract.
        return guard::run(|| unsafe { vectored(&obj, iov, iovcnt, Some(off), false) });
    }
    match real::preadv64() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(fd, iov, iovcnt, off) },
        None => missing(),
    }
}

/// `pwritev(fd, iov, iovcnt, offset)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn pwritev(
    fd: c_int,
    iov: *const iovec,
    iovcnt: c_int,
    off: off_t,
) -> ssize_t {
    if let Some((_inside, obj)) = served(fd) {
        // SAFETY: contract.
        return guard::run(|| unsafe { vectored(&obj, iov, iovcnt, Some(off.into()), true) });
    }
    match real::pwritev() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(fd, iov, iovcnt, off) },
        None => missing(),
    }
}

/// `pwritev64(fd, iov, iovcnt, offset)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn pwritev64(
    fd: c_int,
    iov: *const iovec,
    iovcnt: c_int,
    off: off64_t,
) -> ssize_t {
    if let Some((_inside, obj)) = served(fd) {
        // SAFETY: contract.
        return guard::run(|| unsafe { vectored(&obj, iov, iovcnt, Some(off), true) });
    }
    match real::pwritev64() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(fd, iov, iovcnt, off) },
        None => missing(),
    }
}

/// `lseek(fd, offset, whence)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn lseek(fd: c_int, off: off_t, whence: c_int) -> off_t {
    if let Some((_inside, obj)) = served(fd) {
        return guard::run(|| {
            let new = data::lseek(&obj, off.into(), whence)?;
            off_t::try_from(new).map_err(|_| libc::EOVERFLOW)
        });
    }
    match real::lseek() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(fd, off, whence) },
        None => missing(),
    }
}

/// `lseek64(fd, offset, whence)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn lseek64(fd: c_int, off: off64_t, whence: c_int) -> off64_t {
    if let Some((_inside, obj)) = served(fd) {
        return guard::run(|| data::lseek(&obj, off, whence));
    }
    match real::lseek64() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(fd, off, whence) },
        None => missing(),
    }
}

/// `fsync(fd)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn fsync(fd: c_int) -> c_int {
    if let Some((_inside, obj)) = served(fd) {
        return guard::run(|| data::fsync(&obj));
    }
    match real::fsync() {
        // SAFETY: the caller's argument, forwarded to libc.
        Some(f) => unsafe { f(fd) },
        None => missing(),
    }
}

/// `fdatasync(fd)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn fdatasync(fd: c_int) -> c_int {
    if let Some((_inside, obj)) = served(fd) {
        return guard::run(|| data::fsync(&obj));
    }
    match real::fdatasync() {
        // SAFETY: the caller's argument, forwarded to libc.
        Some(f) => unsafe { f(fd) },
        None => missing(),
    }
}

/// `sync()`: flushes the served devices' backings, then libc's sync.
///
/// # Safety
/// libc's contract (none).
#[no_mangle]
pub unsafe extern "C" fn sync() {
    if let Some(_inside) = Inside::enter() {
        guard::catch((), data::flush_all);
    }
    if let Some(f) = real::sync() {
        // SAFETY: no arguments.
        unsafe { f() }
    }
}
