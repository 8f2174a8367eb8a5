//! The one mapping from the engine's [`Errno`] to the C return value, and `strerror` texts.
//!
//! [`negative`] is an exhaustive `match` with no wildcard: a new engine errno does not compile
//! until someone decides what C callers see. Values are Linux's (identical on x86_64 and i386).

use core::ffi::{c_char, c_int, CStr};

use blksnap_model::Errno;

/// "Bad file descriptor": a handle that was never opened, or is closed (double close, use after
/// close). The only C return value that is not an engine [`Errno`].
pub const EBADF: c_int = 9;

/// What every entry point returns after it caught a panic, and what every later call on the
/// poisoned handle returns (`ENOTRECOVERABLE`).
pub const PANIC_ERRNO: c_int = 131;

/// `-errno` for the C caller.
pub const fn negative(errno: Errno) -> c_int {
    let positive: c_int = match errno {
        Errno::EPERM => 1,
        Errno::ENOENT => 2,
        Errno::ESRCH => 3,
        Errno::EINTR => 4,
        Errno::EIO => 5,
        Errno::EAGAIN => 11,
        Errno::ENOMEM => 12,
        Errno::EFAULT => 14,
        Errno::ENOTBLK => 15,
        Errno::EBUSY => 16,
        Errno::ENODEV => 19,
        Errno::EINVAL => 22,
        Errno::ENOTTY => 25,
        Errno::EFBIG => 27,
        Errno::ENOSPC => 28,
        Errno::ENODATA => 61,
        Errno::EOPNOTSUPP => 95,
        Errno::EALREADY => 114,
        Errno::ENOTRECOVERABLE => PANIC_ERRNO,
        Errno::EACCES => 13,
    };
    -positive
}

/// The message for a positive or negative errno (static, NUL-terminated).
pub fn message(err: c_int) -> &'static CStr {
    let Some(positive) = err.checked_abs() else {
        return c"Unknown error";
    };
    if positive == EBADF {
        return c"Bad file descriptor (handle closed or never opened)";
    }
    if positive == 0 {
        return c"Success";
    }
    let Some(errno) = Errno::from_code(positive) else {
        return c"Unknown error";
    };
    match errno {
        Errno::EPERM => c"Operation not permitted",
        Errno::ENOENT => c"No such file or directory (no filter attached, or wait timed out)",
        Errno::ESRCH => c"No such process (no such snapshot)",
        Errno::EINTR => c"Interrupted system call",
        Errno::EIO => c"Input/output error",
        Errno::EAGAIN => c"Resource temporarily unavailable",
        Errno::ENOMEM => c"Cannot allocate memory (or over a limit)",
        Errno::EFAULT => c"Bad address (or no storage, or corrupted)",
        Errno::ENOTBLK => c"Block device required",
        Errno::EBUSY => c"Device or resource busy",
        Errno::ENODEV => c"No such device",
        Errno::EINVAL => c"Invalid argument",
        Errno::ENOTTY => c"Inappropriate ioctl for device",
        Errno::EFBIG => c"File too large",
        Errno::ENOSPC => c"No space left on device (difference storage)",
        Errno::ENODATA => c"No data available (copy fault or out of range)",
        Errno::EOPNOTSUPP => c"Operation not supported",
        Errno::EALREADY => c"Operation already in progress (already done)",
        Errno::ENOTRECOVERABLE => c"State not recoverable (the handle caught a panic)",
        Errno::EACCES => c"Permission denied",
    }
}

/// Pointer form of [`message`] for C.
pub fn message_ptr(err: c_int) -> *const c_char {
    message(err).as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_table_matches_the_model_codes() {
        for errno in Errno::ALL {
            assert_eq!(negative(errno), -errno.code(), "{errno:?}");
            assert_ne!(message(negative(errno)).to_bytes(), b"Unknown error");
            assert_eq!(message(negative(errno)), message(errno.code()));
        }
        assert_eq!(negative(Errno::ENOTRECOVERABLE), -PANIC_ERRNO);
        assert!(Errno::from_code(EBADF).is_none(), "EBADF stays outside the engine's set");
        assert_eq!(message(-EBADF), message(EBADF));
        assert_eq!(message(i32::MIN).to_bytes(), b"Unknown error");
        assert_eq!(message(-9999).to_bytes(), b"Unknown error");
        assert_eq!(message(0).to_bytes(), b"Success");
    }
}
