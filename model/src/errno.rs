//! Error numbers. Every failure in the model and the engine is one of these, and each maps to
//! exactly one negative errno that the kernel module returns in the same situation
//! (`reference/blksnap-abi.md` §6). The numeric values are Linux's (identical on x86_64 and i386).

use core::fmt;

/// A Linux errno, by name. The `code()` is the positive number; the C ABI returns `-code()`.
///
/// The set is closed on purpose: adding a variant forces every exhaustive `match` (the C ABI's
/// mapping, the CLI's messages) to decide what it means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Errno {
    /// Operation not permitted.
    EPERM,
    /// No such entry: no filter attached, event wait timed out, path missing.
    ENOENT,
    /// No such snapshot (append, take, wait, add).
    ESRCH,
    /// Interrupted wait.
    EINTR,
    /// I/O error: image I/O after corruption, backend failure.
    EIO,
    /// Out of memory or over an allocation limit.
    ENOMEM,
    /// Bad address; also "no storage" / "corrupted right after take" on TAKE, corrupted CBT map.
    EFAULT,
    /// Not a block device (storage block size mismatch).
    ENOTBLK,
    /// Busy: device in another snapshot, snapshot already taken for add, detach of a member.
    EBUSY,
    /// No such device: unknown disk, DESTROY of an unknown id, TAKE with no devices.
    ENODEV,
    /// Invalid argument: misaligned or out-of-range I/O, range beyond the CBT map.
    EINVAL,
    /// File too large.
    EFBIG,
    /// No space left in the difference storage (overflow, create over the limit).
    ENOSPC,
    /// Inappropriate ioctl: unknown request code or ctl command.
    ENOTTY,
    /// Try again (non-blocking I/O would block).
    EAGAIN,
    /// No data: copy fault, cbtmap range out of bounds, COLLECT array too small.
    ENODATA,
    /// Operation not supported (e.g. growing a fixed-size backend).
    EOPNOTSUPP,
    /// Already: TAKE twice, attach twice, add twice.
    EALREADY,
    /// State not recoverable: a handle poisoned by a caught panic.
    ENOTRECOVERABLE,
    /// Permission denied: blksnapd refuses a descriptor not open read-write, or the client
    /// itself cannot open a path with its own credentials (never returned by the engine).
    EACCES,
}

impl Errno {
    /// Every variant, in declaration order (for exhaustive table tests).
    pub const ALL: [Errno; 20] = [
        Errno::EPERM,
        Errno::ENOENT,
        Errno::ESRCH,
        Errno::EINTR,
        Errno::EIO,
        Errno::ENOMEM,
        Errno::EFAULT,
        Errno::ENOTBLK,
        Errno::EBUSY,
        Errno::ENODEV,
        Errno::EINVAL,
        Errno::EFBIG,
        Errno::ENOSPC,
        Errno::ENOTTY,
        Errno::EAGAIN,
        Errno::ENODATA,
        Errno::EOPNOTSUPP,
        Errno::EALREADY,
        Errno::ENOTRECOVERABLE,
        Errno::EACCES,
    ];

    /// The positive Linux errno value.
    pub const fn code(self) -> i32 {
        match self {
            Errno::EPERM => 1,
            Errno::ENOENT => 2,
            Errno::ESRCH => 3,
            Errno::EINTR => 4,
            Errno::EIO => 5,
            Errno::ENOMEM => 12,
            Errno::EFAULT => 14,
            Errno::ENOTBLK => 15,
            Errno::EBUSY => 16,
            Errno::ENODEV => 19,
            Errno::EINVAL => 22,
            Errno::EFBIG => 27,
            Errno::ENOSPC => 28,
            Errno::ENOTTY => 25,
            Errno::EAGAIN => 11,
            Errno::ENODATA => 61,
            Errno::EOPNOTSUPP => 95,
            Errno::EALREADY => 114,
            Errno::ENOTRECOVERABLE => 131,
            Errno::EACCES => 13,
        }
    }

    /// The inverse of [`Errno::code`]; `None` for numbers outside the closed set.
    pub fn from_code(code: i32) -> Option<Errno> {
        Errno::ALL.iter().copied().find(|e| e.code() == code)
    }

    /// The symbolic name, e.g. `"ENOSPC"`.
    pub const fn name(self) -> &'static str {
        match self {
            Errno::EPERM => "EPERM",
            Errno::ENOENT => "ENOENT",
            Errno::ESRCH => "ESRCH",
            Errno::EINTR => "EINTR",
            Errno::EIO => "EIO",
            Errno::ENOMEM => "ENOMEM",
            Errno::EFAULT => "EFAULT",
            Errno::ENOTBLK => "ENOTBLK",
            Errno::EBUSY => "EBUSY",
            Errno::ENODEV => "ENODEV",
            Errno::EINVAL => "EINVAL",
            Errno::EFBIG => "EFBIG",
            Errno::ENOSPC => "ENOSPC",
            Errno::ENOTTY => "ENOTTY",
            Errno::EAGAIN => "EAGAIN",
            Errno::ENODATA => "ENODATA",
            Errno::EOPNOTSUPP => "EOPNOTSUPP",
            Errno::EALREADY => "EALREADY",
            Errno::ENOTRECOVERABLE => "ENOTRECOVERABLE",
            Errno::EACCES => "EACCES",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.code())
    }
}

/// A failure: the errno a caller branches on, plus a static sentence saying which rule was hit.
///
/// Equality compares only the errno: the sentence is for people, the number is the contract
/// (differential tests compare the model's and the engine's errno, not their wording).
#[derive(Clone, Copy, Debug, Eq)]
pub struct Error {
    /// What the caller sees as `-errno`.
    pub errno: Errno,
    /// Why, in one sentence; never empty.
    pub detail: &'static str,
}

impl Error {
    /// An error with its explanation.
    pub const fn new(errno: Errno, detail: &'static str) -> Error {
        Error { errno, detail }
    }

    /// The negative errno the C ABI returns.
    pub const fn negative_errno(self) -> i32 {
        -self.errno.code()
    }
}

impl PartialEq for Error {
    fn eq(&self, other: &Error) -> bool {
        self.errno == other.errno
    }
}

impl From<Errno> for Error {
    fn from(errno: Errno) -> Error {
        Error { errno, detail: "" }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.detail.is_empty() {
            write!(f, "{}", self.errno)
        } else {
            write!(f, "{}: {}", self.errno, self.detail)
        }
    }
}

impl std::error::Error for Error {}

/// Shorthand for fallible results across the project.
pub type Result<T, E = Error> = core::result::Result<T, E>;

/// `return Err(Error::new(errno, detail))` in one line.
#[macro_export]
macro_rules! bail {
    ($errno:ident, $detail:expr) => {
        return Err($crate::Error::new($crate::Errno::$errno, $detail))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_round_trip() {
        for (i, a) in Errno::ALL.iter().enumerate() {
            assert_eq!(Errno::from_code(a.code()), Some(*a));
            for b in &Errno::ALL[i + 1..] {
                assert_ne!(a.code(), b.code(), "{a:?} and {b:?} share a code");
            }
        }
        assert_eq!(Errno::from_code(0), None);
        assert_eq!(Errno::from_code(-5), None);
    }

    #[test]
    fn linux_values() {
        assert_eq!(Errno::ENOSPC.code(), 28);
        assert_eq!(Errno::EALREADY.code(), 114);
        assert_eq!(Errno::ENODATA.code(), 61);
        assert_eq!(Error::new(Errno::ESRCH, "x").negative_errno(), -3);
    }
}
