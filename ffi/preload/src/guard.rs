//! Re-entrancy guard, errno, and the panic boundary.
//!
//! While this library works on a virtual object it calls into libblksnap, which opens, reads and
//! writes backing files with the same libc functions this library interposes. Those calls must
//! reach libc untouched: a thread-local flag ([`Inside`]) is set for the duration of every hook,
//! and a hook entered with the flag set passes straight through. The flag is a `const`-initialised
//! `Cell<bool>` (no allocation, no destructor), so reading it is safe at any point of a thread's
//! life.

use core::cell::Cell;
use core::ffi::c_int;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A positive errno.
pub type Errno = c_int;
/// A result whose error is a positive errno.
pub type Res<T> = Result<T, Errno>;

thread_local! {
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Proof that this thread is inside a hook (the flag is cleared on drop).
pub struct Inside(());

impl Inside {
    /// Sets the flag; `None` if it was already set (a re-entrant call: pass it through) or the
    /// thread-local is gone (thread teardown: pass through too).
    pub fn enter() -> Option<Inside> {
        INSIDE
            .try_with(|inside| {
                if inside.get() {
                    None
                } else {
                    inside.set(true);
                    Some(Inside(()))
                }
            })
            .ok()
            .flatten()
    }

    /// Whether this thread is inside a hook now.
    pub fn active() -> bool {
        INSIDE.try_with(Cell::get).unwrap_or(true)
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        let _ = INSIDE.try_with(|inside| inside.set(false));
    }
}

/// Sets the calling thread's `errno`.
pub fn set_errno(errno: Errno) {
    // SAFETY: __errno_location returns this thread's errno slot, valid for the thread's life.
    unsafe { *libc::__errno_location() = errno };
}

/// The failure value of a libc return type (`-1`).
pub trait Fail: Copy {
    /// `-1` in this type.
    const FAIL: Self;
}

impl Fail for i32 {
    const FAIL: i32 = -1;
}

impl Fail for i64 {
    const FAIL: i64 = -1;
}

impl Fail for isize {
    const FAIL: isize = -1;
}

/// `ENOTRECOVERABLE`: a panic was caught (as libblksnap's `BLKSNAP_PANIC_ERRNO`).
pub const PANIC_ERRNO: Errno = blksnap_ffi::BLKSNAP_PANIC_ERRNO;

/// Runs the body of a hook on a virtual object, libc-style: `Ok(v)` → `v`; `Err(e)` → `errno =
/// e`, `-1`; a panic never crosses into C: it marks the engine failed (every later call on it
/// returns `ENOTRECOVERABLE`) and returns `-1` with `errno = ENOTRECOVERABLE`.
pub fn run<T: Fail>(body: impl FnOnce() -> Res<T>) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(value)) => value,
        Ok(Err(errno)) => {
            set_errno(errno);
            T::FAIL
        }
        Err(_) => panicked(),
    }
}

/// After a caught panic: marks the engine failed, `errno = ENOTRECOVERABLE`, `-1`.
pub fn panicked<T: Fail>() -> T {
    crate::state::poison();
    set_errno(PANIC_ERRNO);
    T::FAIL
}

/// Runs `body`, `fallback` if it panics (for the decisions made before a pass-through).
pub fn catch<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

/// A missing libc function (no next definition): `ENOSYS`.
pub fn missing<T: Fail>() -> T {
    set_errno(libc::ENOSYS);
    T::FAIL
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reentrancy_flag() {
        assert!(!Inside::active());
        let outer = Inside::enter().expect("first entry");
        assert!(Inside::active());
        assert!(Inside::enter().is_none(), "re-entry passes through");
        drop(outer);
        assert!(!Inside::active());
        assert!(Inside::enter().is_some());
    }

    #[test]
    fn run_sets_errno() {
        set_errno(0);
        assert_eq!(run(|| -> Res<i32> { Err(libc::EBADF) }), -1);
        // SAFETY: this thread's errno slot.
        assert_eq!(unsafe { *libc::__errno_location() }, libc::EBADF);
        assert_eq!(run(|| -> Res<i64> { Ok(7) }), 7);
    }

    #[test]
    fn run_catches_panics() {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r = run(|| -> Res<i32> { panic!("boom") });
        std::panic::set_hook(hook);
        assert_eq!(r, -1);
        // SAFETY: this thread's errno slot.
        assert_eq!(unsafe { *libc::__errno_location() }, PANIC_ERRNO);
        assert_eq!(catch(3, || -> i32 { panic!("boom") }), 3);
    }
}
