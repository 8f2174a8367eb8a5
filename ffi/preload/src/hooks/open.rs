//! `open` and friends: served paths get a real descriptor (a memfd) registered in the table.

use core::ffi::{c_char, c_int, c_uint};

use libc::mode_t;

use crate::guard::{self, missing, Inside};
use crate::{real, state};

/// Serves `path` if it is served, else calls `pass` (libc) and forgets any stale entry for the
/// descriptor it returns.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string.
unsafe fn open_hook(path: *const c_char, flags: c_int, pass: impl FnOnce() -> c_int) -> c_int {
    let Some(inside) = Inside::enter() else { return pass() };
    // SAFETY: contract: NULL or a string.
    let target = guard::catch(None, || unsafe { state::classify_cstr(path) });
    if let Some(target) = target {
        return guard::run(|| state::open(target, flags));
    }
    drop(inside);
    let fd = pass();
    super::handed_out(fd, None);
    fd
}

/// `open(path, flags, mode)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn open(path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
    // SAFETY: the caller's arguments, forwarded unchanged to libc.
    unsafe {
        open_hook(path, flags, || match real::open() {
            Some(f) => f(path, flags, mode),
            None => missing(),
        })
    }
}

/// `open64(path, flags, mode)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn open64(path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
    // SAFETY: the caller's arguments, forwarded unchanged to libc.
    unsafe {
        open_hook(path, flags, || match real::open64() {
            Some(f) => f(path, flags, mode),
            None => missing(),
        })
    }
}

/// `openat(dirfd, path, flags, mode)` (served paths are absolute: `dirfd` is then irrelevant).
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn openat(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: c_uint,
) -> c_int {
    // SAFETY: the caller's arguments, forwarded unchanged to libc.
    unsafe {
        open_hook(path, flags, || match real::openat() {
            Some(f) => f(dirfd, path, flags, mode),
            None => missing(),
        })
    }
}

/// `openat64(dirfd, path, flags, mode)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn openat64(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: c_uint,
) -> c_int {
    // SAFETY: the caller's arguments, forwarded unchanged to libc.
    unsafe {
        open_hook(path, flags, || match real::openat64() {
            Some(f) => f(dirfd, path, flags, mode),
            None => missing(),
        })
    }
}

/// `__open_2(path, flags)` (`_FORTIFY_SOURCE`).
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn __open_2(path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: the caller's arguments, forwarded unchanged to libc.
    unsafe {
        open_hook(path, flags, || match real::__open_2() {
            Some(f) => f(path, flags),
            None => missing(),
        })
    }
}

/// `__open64_2(path, flags)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn __open64_2(path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: the caller's arguments, forwarded unchanged to libc.
    unsafe {
        open_hook(path, flags, || match real::__open64_2() {
            Some(f) => f(path, flags),
            None => missing(),
        })
    }
}

/// `__openat_2(dirfd, path, flags)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn __openat_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: the caller's arguments, forwarded unchanged to libc.
    unsafe {
        open_hook(path, flags, || match real::__openat_2() {
            Some(f) => f(dirfd, path, flags),
            None => missing(),
        })
    }
}

/// `__openat64_2(dirfd, path, flags)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn __openat64_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: the caller's arguments, forwarded unchanged to libc.
    unsafe {
        open_hook(path, flags, || match real::__openat64_2() {
            Some(f) => f(dirfd, path, flags),
            None => missing(),
        })
    }
}

const CREAT_FLAGS: c_int = libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC;

/// `creat(path, mode)` = `open(path, O_CREAT|O_WRONLY|O_TRUNC, mode)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn creat(path: *const c_char, mode: mode_t) -> c_int {
    // SAFETY: the caller's arguments, forwarded unchanged to libc.
    unsafe {
        open_hook(path, CREAT_FLAGS, || match real::creat() {
            Some(f) => f(path, mode),
            None => missing(),
        })
    }
}

/// `creat64(path, mode)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn creat64(path: *const c_char, mode: mode_t) -> c_int {
    // SAFETY: the caller's arguments, forwarded unchanged to libc.
    unsafe {
        open_hook(path, CREAT_FLAGS, || match real::creat64() {
            Some(f) => f(path, mode),
            None => missing(),
        })
    }
}
