//! A small blocking client of the control socket: one request, one answer, in order, on one
//! connection (used by `libblksnap` in client mode, the tests, and a CLI).
//!
//! Errors come in two layers: [`Client::call`]'s `io::Result` is the transport (connection
//! refused, the daemon went away mid-request: `UnexpectedEof`/`ConnectionReset`/`BrokenPipe`,
//! a malformed or invalid answer: `InvalidData`); inside it, `Err(WireError)` is the daemon's
//! answer (an engine errno). After a transport error the connection is unusable: drop it.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::{
    decode_response, read_frame, write_frame, Reply, Request, RequestFrame, WireError,
    PROTOCOL_VERSION,
};

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

    /// Sends one request and waits for its answer.
    pub fn call(&mut self, request: Request) -> io::Result<Result<Reply, WireError>> {
        write_frame(&mut self.stream, &RequestFrame { version: PROTOCOL_VERSION, request })?;
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
