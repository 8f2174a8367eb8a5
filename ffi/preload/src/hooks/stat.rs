//! The stat family on served paths and descriptors (`S_IFBLK` with `st_rdev` = the device
//! number for devices and images, `S_IFCHR` for the control device): `stat`, `stat64`, `lstat`,
//! `lstat64`, `fstat`, `fstat64`, `fstatat`, `fstatat64`, the pre-2.33 glibc entry points
//! (`__xstat`, `__lxstat`, `__fxstat`, `__fxstatat` and their `64` forms, still called by older
//! binaries), `statx`, `access` and `faccessat`.

use core::ffi::{c_char, c_int, c_uint};

use super::served;
use crate::data::{self, Node};
use crate::guard::{self, missing, Inside, Res};
use crate::{real, state};

/// Writes a stat struct: `EFAULT` for NULL.
///
/// # Safety
/// `buf` is NULL or points to a `S`.
unsafe fn put<S>(buf: *mut S, value: S) -> Res<c_int> {
    if buf.is_null() {
        return Err(libc::EFAULT);
    }
    // SAFETY: contract.
    unsafe { buf.write_unaligned(value) };
    Ok(0)
}

/// A stat of a path: served → the node's struct; otherwise `pass`.
///
/// # Safety
/// `path` is NULL or a string; `buf` NULL or a writable `S`.
unsafe fn by_path<S>(
    path: *const c_char,
    buf: *mut S,
    fill: impl FnOnce(&Node) -> S,
    pass: impl FnOnce() -> c_int,
) -> c_int {
    if let Some(_inside) = Inside::enter() {
        // SAFETY: contract: NULL or a string.
        if let Some(target) = guard::catch(None, || unsafe { state::classify_cstr(path) }) {
            // SAFETY: contract: buf is NULL or a writable S.
            return guard::run(|| unsafe { put(buf, fill(&data::node(target, true)?)) });
        }
    }
    pass()
}

/// A stat of a descriptor: served → the node's struct; otherwise `pass`.
///
/// # Safety
/// `buf` is NULL or a writable `S`.
unsafe fn by_fd<S>(
    fd: c_int,
    buf: *mut S,
    fill: impl FnOnce(&Node) -> S,
    pass: impl FnOnce() -> c_int,
) -> c_int {
    if let Some((_inside, obj)) = served(fd) {
        // SAFETY: contract: buf is NULL or a writable S.
        return guard::run(|| unsafe { put(buf, fill(&data::node(obj.target, false)?)) });
    }
    pass()
}

/// `*at` forms: `AT_EMPTY_PATH` with `""` is the descriptor `dirfd`; an absolute path is a
/// path; anything else (relative to `dirfd`) passes through.
///
/// # Safety
/// `path` is NULL or a string; `buf` NULL or a writable `S`.
unsafe fn by_at<S>(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    buf: *mut S,
    fill: impl FnOnce(&Node) -> S,
    pass: impl FnOnce() -> c_int,
) -> c_int {
    // SAFETY: contract: a non-NULL path is a string (at least its NUL byte is readable).
    let empty = !path.is_null() && unsafe { *path } == 0;
    if empty && flags & libc::AT_EMPTY_PATH != 0 {
        // SAFETY: contract forwarded.
        unsafe { by_fd(dirfd, buf, fill, pass) }
    } else {
        // SAFETY: contract forwarded.
        unsafe { by_path(path, buf, fill, pass) }
    }
}

/// Defines a path stat hook: `name(path, buf)`.
macro_rules! path_stat {
    ($name:ident, $ty:ty, $fill:path) => {
        #[doc = concat!("`", stringify!($name), "(path, buf)`.")]
        ///
        /// # Safety
        /// libc's contract.
        #[no_mangle]
        pub unsafe extern "C" fn $name(path: *const c_char, buf: *mut $ty) -> c_int {
            // SAFETY: the caller's arguments; forwarded unchanged to libc if not served.
            unsafe {
                by_path(path, buf, $fill, || match real::$name() {
                    Some(f) => f(path, buf),
                    None => missing(),
                })
            }
        }
    };
}

path_stat!(stat, libc::stat, data::stat_of);
path_stat!(stat64, libc::stat64, data::stat64_of);
path_stat!(lstat, libc::stat, data::stat_of);
path_stat!(lstat64, libc::stat64, data::stat64_of);

/// Defines a descriptor stat hook: `name(fd, buf)`.
macro_rules! fd_stat {
    ($name:ident, $ty:ty, $fill:path) => {
        #[doc = concat!("`", stringify!($name), "(fd, buf)`.")]
        ///
        /// # Safety
        /// libc's contract.
        #[no_mangle]
        pub unsafe extern "C" fn $name(fd: c_int, buf: *mut $ty) -> c_int {
            // SAFETY: the caller's arguments; forwarded unchanged to libc if not served.
            unsafe {
                by_fd(fd, buf, $fill, || match real::$name() {
                    Some(f) => f(fd, buf),
                    None => missing(),
                })
            }
        }
    };
}

fd_stat!(fstat, libc::stat, data::stat_of);
fd_stat!(fstat64, libc::stat64, data::stat64_of);

/// Defines an `*at` stat hook: `name(dirfd, path, buf, flags)`.
macro_rules! at_stat {
    ($name:ident, $ty:ty, $fill:path) => {
        #[doc = concat!("`", stringify!($name), "(dirfd, path, buf, flags)`.")]
        ///
        /// # Safety
        /// libc's contract.
        #[no_mangle]
        pub unsafe extern "C" fn $name(
            dirfd: c_int,
            path: *const c_char,
            buf: *mut $ty,
            flags: c_int,
        ) -> c_int {
            // SAFETY: the caller's arguments; forwarded unchanged to libc if not served.
            unsafe {
                by_at(dirfd, path, flags, buf, $fill, || match real::$name() {
                    Some(f) => f(dirfd, path, buf, flags),
                    None => missing(),
                })
            }
        }
    };
}

at_stat!(fstatat, libc::stat, data::stat_of);
at_stat!(fstatat64, libc::stat64, data::stat64_of);

/// Defines a pre-2.33 `__xstat`-style hook: `name(ver, path, buf)`.
macro_rules! xstat {
    ($name:ident, $ty:ty, $fill:path) => {
        #[doc = concat!("`", stringify!($name), "(ver, path, buf)` (glibc < 2.33 binaries).")]
        ///
        /// # Safety
        /// libc's contract.
        #[no_mangle]
        pub unsafe extern "C" fn $name(ver: c_int, path: *const c_char, buf: *mut $ty) -> c_int {
            // SAFETY: the caller's arguments; forwarded unchanged to libc if not served.
            unsafe {
                by_path(path, buf, $fill, || match real::$name() {
                    Some(f) => f(ver, path, buf),
                    None => missing(),
                })
            }
        }
    };
}

xstat!(__xstat, libc::stat, data::stat_of);
xstat!(__xstat64, libc::stat64, data::stat64_of);
xstat!(__lxstat, libc::stat, data::stat_of);
xstat!(__lxstat64, libc::stat64, data::stat64_of);

/// Defines a pre-2.33 `__fxstat`-style hook: `name(ver, fd, buf)`.
macro_rules! fxstat {
    ($name:ident, $ty:ty, $fill:path) => {
        #[doc = concat!("`", stringify!($name), "(ver, fd, buf)` (glibc < 2.33 binaries).")]
        ///
        /// # Safety
        /// libc's contract.
        #[no_mangle]
        pub unsafe extern "C" fn $name(ver: c_int, fd: c_int, buf: *mut $ty) -> c_int {
            // SAFETY: the caller's arguments; forwarded unchanged to libc if not served.
            unsafe {
                by_fd(fd, buf, $fill, || match real::$name() {
                    Some(f) => f(ver, fd, buf),
                    None => missing(),
                })
            }
        }
    };
}

fxstat!(__fxstat, libc::stat, data::stat_of);
fxstat!(__fxstat64, libc::stat64, data::stat64_of);

/// Defines a pre-2.33 `__fxstatat`-style hook: `name(ver, dirfd, path, buf, flags)`.
macro_rules! fxstatat {
    ($name:ident, $ty:ty, $fill:path) => {
        #[doc = concat!("`", stringify!($name), "(ver, dirfd, path, buf, flags)`.")]
        ///
        /// # Safety
        /// libc's contract.
        #[no_mangle]
        pub unsafe extern "C" fn $name(
            ver: c_int,
            dirfd: c_int,
            path: *const c_char,
            buf: *mut $ty,
            flags: c_int,
        ) -> c_int {
            // SAFETY: the caller's arguments; forwarded unchanged to libc if not served.
            unsafe {
                by_at(dirfd, path, flags, buf, $fill, || match real::$name() {
                    Some(f) => f(ver, dirfd, path, buf, flags),
                    None => missing(),
                })
            }
        }
    };
}

fxstatat!(__fxstatat, libc::stat, data::stat_of);
fxstatat!(__fxstatat64, libc::stat64, data::stat64_of);

/// `statx(dirfd, path, flags, mask, buf)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn statx(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mask: c_uint,
    buf: *mut libc::statx,
) -> c_int {
    // SAFETY: the caller's arguments; forwarded unchanged to libc if not served.
    unsafe {
        by_at(
            dirfd,
            path,
            flags,
            buf,
            |node| data::statx_of(node, mask),
            || match real::statx() {
                Some(f) => f(dirfd, path, flags, mask, buf),
                None => missing(),
            },
        )
    }
}

/// `access` on a served node: 0 if it exists, `EACCES` for `X_OK` (device nodes are not
/// executable), `ENOENT` for an image that does not exist.
fn access_node(target: state::Target, mode: c_int) -> Res<c_int> {
    data::node(target, true)?;
    if mode & libc::X_OK != 0 {
        return Err(libc::EACCES);
    }
    Ok(0)
}

/// `access(path, mode)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn access(path: *const c_char, mode: c_int) -> c_int {
    if let Some(_inside) = Inside::enter() {
        // SAFETY: contract: NULL or a string.
        if let Some(target) = guard::catch(None, || unsafe { state::classify_cstr(path) }) {
            return guard::run(|| access_node(target, mode));
        }
    }
    match real::access() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(path, mode) },
        None => missing(),
    }
}

/// `faccessat(dirfd, path, mode, flags)` (absolute served paths only).
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn faccessat(
    dirfd: c_int,
    path: *const c_char,
    mode: c_int,
    flags: c_int,
) -> c_int {
    if let Some(_inside) = Inside::enter() {
        // SAFETY: contract: NULL or a string.
        if let Some(target) = guard::catch(None, || unsafe { state::classify_cstr(path) }) {
            return guard::run(|| access_node(target, mode));
        }
    }
    match real::faccessat() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(dirfd, path, mode, flags) },
        None => missing(),
    }
}
