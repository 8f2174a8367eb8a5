//! Descriptor bookkeeping: `close`, `close_range`, `closefrom`, `dup`, `dup2`, `dup3`, `fcntl`.
//! A duplicate shares the object (and its file position), as it shares the open file
//! description; the object goes away with its last descriptor.

use core::ffi::{c_int, c_uint, c_ulong};

use super::{handed_out, served};
use crate::guard::{self, missing, Inside};
use crate::{real, state};

/// `close(fd)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if state::any_served() {
        if let Some(_inside) = Inside::enter() {
            guard::catch((), || drop(state::remove(fd)));
        }
    }
    match real::close() {
        // SAFETY: the caller's argument, forwarded to libc.
        Some(f) => unsafe { f(fd) },
        None => missing(),
    }
}

/// `close_range(first, last, flags)` (glibc ≥ 2.34).
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    let result = match real::close_range() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(first, last, flags) },
        None => return missing(),
    };
    let cloexec_only = flags as c_uint & libc::CLOSE_RANGE_CLOEXEC != 0;
    if result == 0 && !cloexec_only && state::any_served() {
        if let Some(_inside) = Inside::enter() {
            let to_fd = |n: c_uint| c_int::try_from(n).unwrap_or(c_int::MAX);
            guard::catch((), || drop(state::remove_range(to_fd(first), to_fd(last))));
        }
    }
    result
}

/// `closefrom(lowfd)` (glibc ≥ 2.34).
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn closefrom(lowfd: c_int) {
    if state::any_served() {
        if let Some(_inside) = Inside::enter() {
            guard::catch((), || drop(state::remove_range(lowfd.max(0), c_int::MAX)));
        }
    }
    if let Some(f) = real::closefrom() {
        // SAFETY: the caller's argument, forwarded to libc.
        unsafe { f(lowfd) }
    }
}

/// `dup(fd)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    let new = match real::dup() {
        // SAFETY: the caller's argument, forwarded to libc.
        Some(f) => unsafe { f(fd) },
        None => return missing(),
    };
    handed_out(new, Some(fd));
    new
}

/// `dup2(old, new)`: `new` now names what `old` names (it was closed first).
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    let result = match real::dup2() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(old, new) },
        None => return missing(),
    };
    if result >= 0 && old != new {
        handed_out(result, Some(old));
    }
    result
}

/// `dup3(old, new, flags)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    let result = match real::dup3() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(old, new, flags) },
        None => return missing(),
    };
    handed_out(result, Some(old));
    result
}

/// The shared body of `fcntl` and `fcntl64`. On a served descriptor: `F_GETFL` reports the
/// open flags (access mode, O_DIRECT, ...), `F_SETFL` records O_DIRECT (the memfd does not take
/// it) and passes the rest on, `F_DUPFD`/`F_DUPFD_CLOEXEC` register the duplicate; everything
/// else (`F_GETFD`, `F_SETFD`, locks, ...) goes to libc on the real descriptor.
///
/// # Safety
/// libc's contract; `arg` is the caller's third argument (or garbage if it passed none, in
/// which case libc ignores it too).
unsafe fn fcntl_hook(
    fd: c_int,
    cmd: c_int,
    arg: c_ulong,
    real: Option<unsafe extern "C" fn(c_int, c_int, ...) -> c_int>,
) -> c_int {
    let Some(real) = real else { return missing() };
    let dup_cmd = cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC;
    if let Some((_inside, object)) = served(fd) {
        match cmd {
            libc::F_GETFL => return object.getfl(),
            libc::F_SETFL => {
                object.setfl(arg as c_int);
                let rest = (arg as c_int & !libc::O_DIRECT) as c_ulong;
                // SAFETY: a valid command and argument on the caller's descriptor.
                return unsafe { real(fd, cmd, rest) };
            }
            _ => {}
        }
    }
    // SAFETY: the caller's arguments, forwarded to libc.
    let result = unsafe { real(fd, cmd, arg) };
    if dup_cmd {
        handed_out(result, Some(fd));
    }
    result
}

/// `fcntl(fd, cmd, arg)`.
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    // SAFETY: forwarded contract.
    unsafe { fcntl_hook(fd, cmd, arg, real::fcntl()) }
}

/// `fcntl64(fd, cmd, arg)` (glibc ≥ 2.28).
///
/// # Safety
/// libc's contract.
#[no_mangle]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    // SAFETY: forwarded contract.
    unsafe { fcntl_hook(fd, cmd, arg, real::fcntl64()) }
}
