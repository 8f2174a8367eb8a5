//! Frames with descriptors (`SCM_RIGHTS`), protocol version 3.
//!
//! A client that wants the daemon to use a file, block device or storage never sends its path
//! for the daemon to open with the daemon's privileges: it opens it itself, with its own
//! credentials and the access mode the daemon needs (read-write), and sends the descriptor with
//! the request's frame ([`send_frame`]). The descriptors ride on the `sendmsg` that carries the
//! frame's first bytes, so the daemon's [`recv_frame`] receives them while reading that frame
//! and never mixes them up with another frame's. At most [`MAX_FDS_PER_FRAME`] descriptors per
//! frame: more (or a truncated control message) fail the frame, and every descriptor received
//! for it is closed — received descriptors are [`OwnedFd`]s from the first moment, so no error
//! path can leak one.
//!
//! [`recv_frame`] also enforces the daemon's per-frame limits: a largest frame size, an idle
//! timeout before a frame starts and a deadline for completing a frame once it has started (a
//! client that stops mid-frame is dropped after it, whatever it trickles), and it never
//! allocates more than what has arrived.

use std::io::{self, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use serde::Serialize;

use crate::{encode, MAX_FRAME_BYTES};

/// Most descriptors one frame may carry (the requests of version 3 take one).
pub const MAX_FDS_PER_FRAME: usize = 4;

/// Bytes read per `recvmsg` (the body grows by what arrived, never by the announced length).
const CHUNK_BYTES: usize = 64 << 10;

/// Sends one frame with `fds` (at most [`MAX_FDS_PER_FRAME`]) attached to its first bytes.
pub fn send_frame<T: Serialize>(
    stream: &UnixStream,
    msg: &T,
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let bytes = encode(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.detail))?;
    if fds.is_empty() {
        return (&mut &*stream).write_all(&bytes);
    }
    if fds.len() > MAX_FDS_PER_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many descriptors"));
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_FRAME))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many descriptors"));
    }
    let sent = loop {
        match sendmsg(stream, &[IoSlice::new(&bytes)], &mut control, SendFlags::NOSIGNAL) {
            Ok(n) => break n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    // The descriptors went with the first chunk; the rest of a large frame follows plainly.
    (&mut &*stream).write_all(&bytes[sent..])
}

/// Limits on receiving one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvLimits {
    /// How long to wait for a frame's first byte (`None`: forever).
    pub idle: Option<Duration>,
    /// How long a frame may take from its first byte to its last (`None`: forever).
    pub frame: Option<Duration>,
    /// Largest payload accepted (at most [`MAX_FRAME_BYTES`]).
    pub max_frame_bytes: u32,
}

impl Default for RecvLimits {
    fn default() -> RecvLimits {
        RecvLimits { idle: None, frame: None, max_frame_bytes: MAX_FRAME_BYTES }
    }
}

/// Why a frame could not be received. After any of these the connection is unusable.
#[derive(Debug)]
pub enum RecvError {
    /// No frame started within the idle timeout.
    Idle,
    /// A frame started but was not complete within the frame deadline.
    PartialFrame,
    /// The peer closed the connection in the middle of a frame.
    Truncated,
    /// The frame announces more than the limit (the announced length).
    TooLarge(u32),
    /// More descriptors than [`MAX_FDS_PER_FRAME`] (all of them were closed).
    TooManyFds,
    /// The socket failed.
    Io(io::Error),
}

impl std::fmt::Display for RecvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecvError::Idle => write!(f, "no request within the idle timeout"),
            RecvError::PartialFrame => write!(f, "a frame was not completed within its deadline"),
            RecvError::Truncated => write!(f, "connection closed in the middle of a frame"),
            RecvError::TooLarge(n) => write!(f, "frame of {n} bytes over the limit"),
            RecvError::TooManyFds => {
                write!(f, "more than {MAX_FDS_PER_FRAME} descriptors with one frame")
            }
            RecvError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// One received frame: its payload and the descriptors that came with it.
#[derive(Debug)]
pub struct Received {
    /// The payload (without the length prefix).
    pub body: Vec<u8>,
    /// The descriptors (close-on-exec; closed when dropped).
    pub fds: Vec<OwnedFd>,
}

/// Receives one frame and its descriptors; `Ok(None)` at a clean end of stream (before a
/// frame). Changes the stream's read timeout.
pub fn recv_frame(stream: &UnixStream, limits: RecvLimits) -> Result<Option<Received>, RecvError> {
    let max = limits.max_frame_bytes.min(MAX_FRAME_BYTES);
    let mut len = [0u8; 4];
    let mut got = 0usize;
    let mut body: Vec<u8> = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut started: Option<Instant> = None;
    let mut chunk = vec![0u8; CHUNK_BYTES];
    loop {
        let total = if got < 4 { 4 } else { 4 + u32::from_le_bytes(len) as usize };
        if got == total {
            return Ok(Some(Received { body, fds }));
        }
        let timeout = match started {
            None => limits.idle,
            // Within a frame: every read must progress within the idle timeout, and the
            // whole frame must be in by its deadline.
            Some(t0) => match limits.frame {
                None => limits.idle,
                Some(f) => {
                    let left = f.saturating_sub(t0.elapsed());
                    if left.is_zero() {
                        return Err(RecvError::PartialFrame);
                    }
                    Some(limits.idle.map_or(left, |i| i.min(left)))
                }
            },
        };
        stream
            .set_read_timeout(timeout.map(|t| t.max(Duration::from_millis(1))))
            .map_err(RecvError::Io)?;
        let want = (total - got).min(CHUNK_BYTES);
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_FRAME))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let target: &mut [u8] = if got < 4 { &mut len[got..] } else { &mut chunk[..want] };
        let r = match recvmsg(
            stream,
            &mut [IoSliceMut::new(target)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(r) => r,
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => {
                return Err(if started.is_none() {
                    RecvError::Idle
                } else {
                    RecvError::PartialFrame
                });
            }
            Err(e) => return Err(RecvError::Io(e.into())),
        };
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = msg {
                fds.extend(received);
            }
        }
        if r.flags.contains(ReturnFlags::CTRUNC) || fds.len() > MAX_FDS_PER_FRAME {
            return Err(RecvError::TooManyFds);
        }
        if r.bytes == 0 {
            return match started {
                None => Ok(None),
                Some(_) => Err(RecvError::Truncated),
            };
        }
        started.get_or_insert_with(Instant::now);
        if got >= 4 {
            body.extend_from_slice(&chunk[..r.bytes]);
        }
        got += r.bytes;
        if got == 4 {
            let n = u32::from_le_bytes(len);
            if n > max {
                return Err(RecvError::TooLarge(n));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode_request, Request, RequestFrame, PROTOCOL_VERSION};
    use std::os::fd::{AsFd, AsRawFd};

    fn frame(request: Request) -> RequestFrame {
        RequestFrame { version: PROTOCOL_VERSION, request }
    }

    #[test]
    fn descriptors_travel_with_their_frame() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile_in_tmp();
        send_frame(&a, &frame(Request::Version), &[]).unwrap();
        send_frame(&a, &frame(Request::AddDeviceFd { attach: true }), &[file.as_fd()]).unwrap();
        let first = recv_frame(&b, RecvLimits::default()).unwrap().unwrap();
        assert!(first.fds.is_empty());
        assert_eq!(decode_request(&first.body).unwrap().request, Request::Version);
        let second = recv_frame(&b, RecvLimits::default()).unwrap().unwrap();
        assert_eq!(second.fds.len(), 1);
        let (x, y) = (fstat_ino(second.fds[0].as_fd()), fstat_ino(file.as_fd()));
        assert_eq!(x, y, "the same open file arrived");
        assert_ne!(second.fds[0].as_raw_fd(), file.as_raw_fd());
        drop(a);
        assert!(recv_frame(&b, RecvLimits::default()).unwrap().is_none());
    }

    #[test]
    fn limits_are_enforced() {
        let limits = RecvLimits {
            idle: Some(Duration::from_millis(50)),
            frame: Some(Duration::from_millis(100)),
            max_frame_bytes: 1000,
        };
        let (a, b) = UnixStream::pair().unwrap();
        assert!(matches!(recv_frame(&b, limits), Err(RecvError::Idle)));
        // a partial frame: the length and half the body, then silence
        (&a).write_all(&[10, 0, 0, 0, 1, 2, 3, 4, 5]).unwrap();
        assert!(matches!(recv_frame(&b, limits), Err(RecvError::PartialFrame)));
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&5000u32.to_le_bytes()).unwrap();
        assert!(matches!(recv_frame(&b, limits), Err(RecvError::TooLarge(5000))));
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&[10, 0, 0, 0, 1]).unwrap();
        drop(a);
        assert!(matches!(recv_frame(&b, limits), Err(RecvError::Truncated)));
        // too many descriptors: refused, none kept
        let (a, b) = UnixStream::pair().unwrap();
        let f = tempfile_in_tmp();
        let many = [f.as_fd(); MAX_FDS_PER_FRAME];
        send_frame(&a, &frame(Request::Version), &many).unwrap();
        assert_eq!(recv_frame(&b, limits).unwrap().unwrap().fds.len(), MAX_FDS_PER_FRAME);
        assert!(send_frame(&a, &frame(Request::Version), &[f.as_fd(); 5]).is_err());
    }

    fn tempfile_in_tmp() -> OwnedFd {
        rustix::fs::open(
            std::env::temp_dir(),
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::TMPFILE | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::from(0o600),
        )
        .unwrap()
    }

    fn fstat_ino(fd: BorrowedFd<'_>) -> u64 {
        rustix::fs::fstat(fd).unwrap().st_ino
    }
}
