//! Errors of the command line: an errno (from the daemon, the engine or the OS) and a sentence.

use std::fmt;
use std::io;

use blksnap_model::{Errno, Error};
use blksnap_proto::WireError;

/// A failed command: a positive errno and what went wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CliError {
    /// Positive errno.
    pub errno: i32,
    /// A sentence for the user.
    pub message: String,
}

impl CliError {
    /// An error with this errno and message.
    pub fn new(errno: i32, message: impl Into<String>) -> CliError {
        CliError { errno, message: message.into() }
    }

    /// From an engine errno.
    pub fn of(errno: Errno, message: impl Into<String>) -> CliError {
        CliError::new(errno.code(), message)
    }

    /// EINVAL with a message (bad input the parser could not catch).
    pub fn invalid(message: impl Into<String>) -> CliError {
        CliError::new(libc::EINVAL, message)
    }

    /// From an I/O error, prefixed with what was being done.
    pub fn io(what: impl fmt::Display, e: &io::Error) -> CliError {
        let errno = e.raw_os_error().unwrap_or(match e.kind() {
            io::ErrorKind::NotFound => libc::ENOENT,
            io::ErrorKind::PermissionDenied => libc::EACCES,
            io::ErrorKind::UnexpectedEof => libc::EIO,
            io::ErrorKind::InvalidData => libc::EPROTO,
            _ => libc::EIO,
        });
        CliError::new(errno, format!("{what}: {}", strip_os_suffix(e)))
    }

    /// The errno's symbolic name, e.g. `ENOENT`.
    pub fn name(&self) -> String {
        errno_name(self.errno)
    }

    /// Adds context in front of the message.
    pub fn context(mut self, what: impl fmt::Display) -> CliError {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name(), self.message)
    }
}

impl From<WireError> for CliError {
    fn from(e: WireError) -> CliError {
        let message = if e.message.is_empty() { describe(e.errno) } else { e.message };
        CliError::new(e.errno, message)
    }
}

impl From<Error> for CliError {
    fn from(e: Error) -> CliError {
        let message = if e.detail.is_empty() { describe(e.errno.code()) } else { e.detail.into() };
        CliError::new(e.errno.code(), message)
    }
}

/// `io::Error`'s display without the " (os error N)" suffix (the errno name is printed).
fn strip_os_suffix(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

const NAMES: &[(i32, &str, &str)] = &[
    (libc::EPERM, "EPERM", "operation not permitted"),
    (libc::ENOENT, "ENOENT", "no such entry"),
    (libc::ESRCH, "ESRCH", "no such snapshot"),
    (libc::EINTR, "EINTR", "interrupted"),
    (libc::EIO, "EIO", "input/output error"),
    (libc::ENXIO, "ENXIO", "no such device or address"),
    (libc::EBADF, "EBADF", "bad file descriptor"),
    (libc::EAGAIN, "EAGAIN", "try again"),
    (libc::ENOMEM, "ENOMEM", "out of memory or over a limit"),
    (libc::EACCES, "EACCES", "permission denied"),
    (libc::EFAULT, "EFAULT", "bad address or no storage"),
    (libc::ENOTBLK, "ENOTBLK", "not a block device"),
    (libc::EBUSY, "EBUSY", "busy"),
    (libc::EEXIST, "EEXIST", "already exists"),
    (libc::ENODEV, "ENODEV", "no such device"),
    (libc::ENOTDIR, "ENOTDIR", "not a directory"),
    (libc::EISDIR, "EISDIR", "is a directory"),
    (libc::EINVAL, "EINVAL", "invalid argument"),
    (libc::ENOTTY, "ENOTTY", "inappropriate ioctl"),
    (libc::EFBIG, "EFBIG", "file too large"),
    (libc::ENOSPC, "ENOSPC", "no space left"),
    (libc::EROFS, "EROFS", "read-only file system"),
    (libc::EPIPE, "EPIPE", "broken pipe"),
    (libc::ENAMETOOLONG, "ENAMETOOLONG", "name too long"),
    (libc::ENODATA, "ENODATA", "no data"),
    (libc::EPROTO, "EPROTO", "protocol error"),
    (libc::EOPNOTSUPP, "EOPNOTSUPP", "not supported"),
    (libc::EADDRINUSE, "EADDRINUSE", "address in use"),
    (libc::ECONNRESET, "ECONNRESET", "connection reset"),
    (libc::ENOTCONN, "ENOTCONN", "not connected"),
    (libc::ETIMEDOUT, "ETIMEDOUT", "timed out"),
    (libc::ECONNREFUSED, "ECONNREFUSED", "connection refused"),
    (libc::EALREADY, "EALREADY", "already done"),
    (libc::ESTALE, "ESTALE", "stale"),
    (libc::ENOTRECOVERABLE, "ENOTRECOVERABLE", "state not recoverable"),
];

/// The symbolic name of a positive errno (`E<number>` if unknown).
pub fn errno_name(errno: i32) -> String {
    NAMES
        .iter()
        .find(|(c, _, _)| *c == errno)
        .map_or_else(|| format!("E{errno}"), |(_, n, _)| (*n).to_string())
}

fn describe(errno: i32) -> String {
    NAMES.iter().find(|(c, _, _)| *c == errno).map_or("error", |(_, _, d)| d).to_string()
}
