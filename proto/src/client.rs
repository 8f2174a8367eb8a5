//! A small blocking client of the control socket: one request, one answer, in order, on one
//! connection (used by `libblksnap` in client mode, the tests, and a CLI).
//!
//! Errors come in two layers: [`Client::call`]'s `io::Result` is the transport (connection
//! refused, the daemon went away mid-request: `UnexpectedEof`/`ConnectionReset`/`BrokenPipe`,
//! a malformed or invalid answer: `InvalidData`); inside it, `Err(WireError)` is the daemon's
//! answer (an engine errno). After a transport error the connection is unusable: drop it.
//!
//! Descriptor passing: [`Client::call`] never asks the daemon to open a path. A request that
//! names one (a file storage, v3 storage ranges, a backing to serve) is sent as its version-3
//! `*Fd` form with a descriptor this process opened itself, with its own credentials, read-write
//! (a directory storage becomes an unnamed `O_TMPFILE | O_EXCL` 0600 file created here, in the
//! caller's name). A path this process cannot open fails here with its errno (`EACCES`,
//! `ENOENT`...), as the kernel would refuse the caller. [`Client::call_path`] sends a request as it
//! is (root tools that rely on the daemon opening paths).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use blksnap_model::Errno;
use rustix::fs::{Mode, OFlags};

use crate::fds::send_frame;
use crate::{
    decode_response, read_frame, Reply, Request, RequestFrame, Storage, WireError, PROTOCOL_VERSION,
};

/// Opens `path` as the daemon would have, but with this process's credentials: read-write; a
/// directory (when `dir_storage`) gets an unnamed private file created in it.
pub fn open_for_daemon(path: &str, what: &str, dir_storage: bool) -> Result<OwnedFd, WireError> {
    let fail = |e: rustix::io::Errno, how: &str| {
        let errno = Errno::from_code(e.raw_os_error()).unwrap_or(Errno::EIO);
        let os = io::Error::from(e);
        WireError::new(errno, format!("{how} {what} {path} with this client's credentials: {os}"))
    };
    let flags = OFlags::RDWR | OFlags::CLOEXEC;
    match rustix::fs::open(path, flags, Mode::empty()) {
        Ok(fd) => Ok(fd),
        Err(rustix::io::Errno::ISDIR) if dir_storage => rustix::fs::open(
            path,
            flags | OFlags::TMPFILE | OFlags::EXCL,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| fail(e, "cannot create a storage file in")),
        Err(e) => Err(fail(e, "cannot open")),
    }
}

/// The descriptor-passing form of a request naming a path, with the descriptor opened here;
/// other requests as they are.
pub fn with_descriptor(request: Request) -> Result<(Request, Option<OwnedFd>), WireError> {
    Ok(match request {
        Request::SnapshotCreate { storage: Storage::File { path, limit_sectors } } => {
            let fd = open_for_daemon(&path, "the storage", true)?;
            (Request::SnapshotCreateFd { limit_sectors }, Some(fd))
        }
        Request::SnapshotAppend { id, path, ranges } => {
            let fd = open_for_daemon(&path, "the storage", false)?;
            (Request::SnapshotAppendFd { id, ranges }, Some(fd))
        }
        Request::AddDevice { backing, attach } => {
            let fd = open_for_daemon(&backing, "the backing", false)?;
            (Request::AddDeviceFd { attach }, Some(fd))
        }
        other => (other, None),
    })
}

/// A connection to `blksnapd`.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
}

impl Client {
    /// Whether the daemon has closed this connection (for an idle one: blksnapd drops clients
    /// idle past its `idle_timeout_secs`), checked without blocking. A connection with unread
    /// data is unusable too (the stream position is lost) and counts as closed.
    pub fn is_closed(&self) -> bool {
        if self.stream.set_nonblocking(true).is_err() {
            return true;
        }
        // A read that would block consumed nothing: the connection is open and idle.
        let mut byte = [0u8; 1];
        let closed = match io::Read::read(&mut &self.stream, &mut byte) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            _ => true, // EOF, stray data (now consumed) or an error
        };
        closed || self.stream.set_nonblocking(false).is_err()
    }

    /// A client on an already connected stream (a socketpair in tests and fuzzing).
    pub fn from_stream(stream: UnixStream) -> Client {
        Client { stream }
    }

    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> io::Result<Client> {
        Ok(Client { stream: UnixStream::connect(path)? })
    }

    /// Sets a limit on waiting for an answer (None: wait as long as the request takes, e.g. a
    /// `WaitEvent` with a long timeout).
    pub fn set_timeout(&self, limit: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(limit)?;
        self.stream.set_write_timeout(limit)
    }

    /// Sends one request and waits for its answer; a request naming a path goes as its
    /// descriptor-passing form (see the module docs), and fails here if this process cannot
    /// open the path.
    pub fn call(&mut self, request: Request) -> io::Result<Result<Reply, WireError>> {
        if let Err(e) = request.validate() {
            return Ok(Err(WireError::from_error(&e)));
        }
        let (request, fd) = match with_descriptor(request) {
            Ok(x) => x,
            Err(e) => return Ok(Err(e)),
        };
        match fd {
            Some(fd) => self.call_with_fds(request, &[fd.as_fd()]),
            None => self.call_with_fds(request, &[]),
        }
    }

    /// Sends a request exactly as it is (paths included: only root's are served) and waits.
    pub fn call_path(&mut self, request: Request) -> io::Result<Result<Reply, WireError>> {
        self.call_with_fds(request, &[])
    }

    /// Sends one request with `fds` attached to its frame and waits for its answer.
    pub fn call_with_fds(
        &mut self,
        request: Request,
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<Result<Reply, WireError>> {
        send_frame(&self.stream, &RequestFrame { version: PROTOCOL_VERSION, request }, fds)?;
        let body = read_frame(&mut self.stream)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "daemon hung up"))?;
        let frame = decode_response(&body)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.detail))?;
        Ok(frame.result)
    }

    /// [`Client::call`] with transport and request errors folded into one string error.
    pub fn req(&mut self, request: Request) -> Result<Reply, String> {
        match self.call(request) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("transport: {e}")),
        }
    }
}
