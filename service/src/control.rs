//! The control socket: a Unix stream socket speaking `blksnap-proto`, one thread per
//! connection. Access: the socket file is mode 0600 (0660 and group-owned with a configured
//! group), and every connection's peer credentials are checked once, from the kernel, at
//! connect: `SO_PEERCRED` (uid, gid) and `SO_PEERGROUPS` (supplementary groups) — uid 0, or the
//! configured group as the peer's primary or supplementary group. Limits ([`Limits`]): a
//! connection over `max_connections` (or a non-root user's over `max_connections_per_user`) is
//! answered EAGAIN and closed; a request over the user's `max_requests_in_flight_per_user` is
//! answered EAGAIN; a peer that sends nothing (or reads nothing) for `idle_timeout` is
//! disconnected, and so is one whose frame is not complete `frame_timeout` after its first
//! byte, or larger than `max_frame_bytes` (EFBIG): no silent or slow client holds a thread.
//! Frames carry descriptors (`SCM_RIGHTS`, `blksnap_proto::fds`); the daemon checks and uses
//! them by the connection's [`Principal`] (`crate::daemon` `trust`).

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blksnap_model::Errno;
use blksnap_proto::fds::{recv_frame, Received, RecvError, RecvLimits, MAX_FDS_PER_FRAME};
use blksnap_proto::{
    decode_request, write_frame, Reply, RequestFrame, ResponseFrame, WireError, PROTOCOL_VERSION,
};

use crate::daemon::{Daemon, Principal};

/// A peer's credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Process id.
    pub pid: i32,
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
}

/// `SO_PEERCRED` of a connected Unix socket.
pub fn peer_cred(s: &UnixStream) -> io::Result<Peer> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid, writable and sized for SO_PEERCRED's `struct ucred`;
    // the fd is a live socket owned by `s` for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Peer { pid: cred.pid, uid: cred.uid, gid: cred.gid })
}

/// Most supplementary groups read (the kernel's NGROUPS_MAX is 65,536).
const MAX_PEER_GROUPS: usize = 65_536;

/// `SO_PEERGROUPS` of a connected Unix socket: the peer's supplementary groups as they were
/// when it connected (from the kernel, not from `/proc`, so a reused pid cannot lie).
pub fn peer_groups(s: &UnixStream) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` is writable for `len` bytes and `len` is valid; the fd is a live
        // socket owned by `s` for the duration of the call.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(needed);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) || needed <= groups.len() {
            return Err(err);
        }
        if needed > MAX_PEER_GROUPS {
            return Err(io::Error::from_raw_os_error(libc::E2BIG));
        }
        groups.resize(needed, 0);
    }
}

/// Whether `peer`, with supplementary `groups`, may use the socket.
pub fn allowed(peer: &Peer, groups: &[u32], group: Option<u32>) -> bool {
    if peer.uid == 0 {
        return true;
    }
    match group {
        Some(g) => peer.gid == g || groups.contains(&g),
        None => false,
    }
}

/// Limits on the control socket's clients (configuration keys of the same names, see
/// `blksnapd.toml`). Every refusal names the key that was hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; the next is answered EAGAIN and closed.
    pub max_connections: usize,
    /// A connection that sends no request (or reads no answer) for this long is closed.
    pub idle_timeout: Duration,
    /// Connections one non-root user may hold at once (root: only `max_connections`).
    pub max_connections_per_user: usize,
    /// Requests one non-root user may have in flight at once, over all its connections.
    pub max_requests_in_flight_per_user: usize,
    /// A frame must be complete this long after its first byte (a client that stops
    /// mid-frame is dropped after it, however slowly it trickles bytes).
    pub frame_timeout: Duration,
    /// Largest request frame (bytes).
    pub max_frame_bytes: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 64,
            idle_timeout: Duration::from_secs(600),
            max_connections_per_user: 16,
            max_requests_in_flight_per_user: 8,
            frame_timeout: Duration::from_secs(30),
            max_frame_bytes: blksnap_proto::MAX_FRAME_BYTES,
        }
    }
}

/// The listening socket.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    group: Option<u32>,
    limits: Limits,
}

/// Counts by key (connections or requests in flight per uid), with a bound.
#[derive(Default)]
struct Counts(Mutex<HashMap<u32, usize>>);

/// One unit of a [`Counts`] held; released when dropped.
struct Held(Arc<Counts>, u32);

impl Counts {
    /// Takes one unit for `key` unless `limit` are already held.
    fn take(self: &Arc<Self>, key: u32, limit: usize) -> Option<Held> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key).or_default();
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(Held(self.clone(), key))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut m = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// Shared by every connection of one server.
#[derive(Default)]
struct Shared {
    /// All connections (key 0 of a separate table: the global count).
    all: Arc<Counts>,
    per_user: Arc<Counts>,
    in_flight: Arc<Counts>,
}

impl ControlServer {
    /// Binds `path` (replacing a stale socket), creating its directory (0755).
    pub fn bind(path: &Path, group: Option<u32>) -> io::Result<ControlServer> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(path)?;
        let mode = if group.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        if let Some(g) = group {
            std::os::unix::fs::chown(path, None, Some(g))?;
        }
        Ok(ControlServer { listener, path: path.to_path_buf(), group, limits: Limits::default() })
    }

    /// The same server with these limits.
    pub fn with_limits(self, limits: Limits) -> ControlServer {
        ControlServer { limits, ..self }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts connections forever, one thread each, within the connection limits (global,
    /// then per non-root user). The accept loop only reads the peer's credentials (one
    /// `getsockopt`), so a flood of connections cannot stall it behind a slow client.
    pub fn serve(self, daemon: Arc<Daemon>) {
        let shared = Arc::new(Shared::default());
        let limits = self.limits;
        for conn in self.listener.incoming() {
            let Ok(mut stream) = conn else { continue };
            let refuse = |stream: &mut UnixStream, msg: String| {
                let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = respond(stream, Err(WireError::new(Errno::EAGAIN, msg)));
            };
            let Some(all) = shared.all.take(0, limits.max_connections) else {
                let msg =
                    format!("too many connections (max_connections = {})", limits.max_connections);
                refuse(&mut stream, msg);
                continue;
            };
            let Ok(peer) = peer_cred(&stream) else { continue };
            let mine = if peer.uid == 0 {
                None
            } else {
                match shared.per_user.take(peer.uid, limits.max_connections_per_user) {
                    Some(h) => Some(h),
                    None => {
                        let msg = format!(
                            "too many connections of uid {} (max_connections_per_user = {})",
                            peer.uid, limits.max_connections_per_user
                        );
                        refuse(&mut stream, msg);
                        continue;
                    }
                }
            };
            let d = daemon.clone();
            let (group, sh) = (self.group, shared.clone());
            let _ = std::thread::Builder::new().name("blksnapd-conn".into()).spawn(move || {
                let _slots = (all, mine);
                serve_connection_in(stream, &d, group, limits, &sh.in_flight);
            });
        }
    }
}

/// Whether the peer of `stream` has hung up (or the socket failed), without blocking.
fn peer_gone(stream: &UnixStream) -> bool {
    let mut pfd = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd for the call's duration; the fd is owned by `stream`; timeout 0.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    rc < 0 || pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

fn respond(stream: &mut UnixStream, result: Result<Reply, WireError>) -> io::Result<()> {
    write_frame(stream, &ResponseFrame { version: PROTOCOL_VERSION, result })
}

/// Serves one connection until it closes, misbehaves or idles past the limit (with its own
/// in-flight accounting: for tests and embedders; [`ControlServer::serve`] shares one).
pub fn serve_connection(stream: UnixStream, daemon: &Daemon, group: Option<u32>, limits: Limits) {
    serve_connection_in(stream, daemon, group, limits, &Arc::new(Counts::default()));
}

/// The answer to a frame that could not be received (`None`: just close).
fn recv_refusal(e: &RecvError, limits: &Limits) -> Option<WireError> {
    Some(match e {
        RecvError::Idle | RecvError::Truncated | RecvError::Io(_) => return None,
        RecvError::PartialFrame => WireError::new(
            Errno::EAGAIN,
            format!(
                "frame not complete within {} s (frame_timeout_secs): disconnected",
                limits.frame_timeout.as_secs()
            ),
        ),
        RecvError::TooLarge(n) => WireError::new(
            Errno::EFBIG,
            format!("frame of {n} bytes over max_frame_bytes = {}", limits.max_frame_bytes),
        ),
        RecvError::TooManyFds => WireError::new(
            Errno::EINVAL,
            format!("more than {MAX_FDS_PER_FRAME} descriptors with one frame"),
        ),
    })
}

fn serve_connection_in(
    mut stream: UnixStream,
    daemon: &Daemon,
    group: Option<u32>,
    limits: Limits,
    in_flight: &Arc<Counts>,
) {
    let (Ok(peer), Ok(groups)) = (peer_cred(&stream), peer_groups(&stream)) else { return };
    if !allowed(&peer, &groups, group) {
        let _ = stream.set_write_timeout(Some(limits.idle_timeout));
        let _ = respond(
            &mut stream,
            Err(WireError::new(Errno::EPERM, "only root or the configured group may connect")),
        );
        return;
    }
    let who = Principal { uid: peer.uid, gid: peer.gid, groups };
    serve_admitted(stream, daemon, &who, limits, in_flight);
}

/// Serves one connection as `who` (its admission already decided): for tests and fuzzing of
/// the non-root rules on one uid.
pub fn serve_connection_as(stream: UnixStream, daemon: &Daemon, who: &Principal, limits: Limits) {
    serve_admitted(stream, daemon, who, limits, &Arc::new(Counts::default()));
}

fn serve_admitted(
    mut stream: UnixStream,
    daemon: &Daemon,
    who: &Principal,
    limits: Limits,
    in_flight: &Arc<Counts>,
) {
    let who = who.clone();
    if stream.set_write_timeout(Some(limits.idle_timeout)).is_err() {
        return;
    }
    let recv_limits = RecvLimits {
        idle: Some(limits.idle_timeout),
        frame: Some(limits.frame_timeout),
        max_frame_bytes: limits.max_frame_bytes,
    };
    loop {
        let Received { body, fds } = match recv_frame(&stream, recv_limits) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                if let Some(w) = recv_refusal(&e, &limits) {
                    let _ = respond(&mut stream, Err(w));
                }
                return;
            }
        };
        let frame: RequestFrame = match decode_request(&body) {
            Ok(f) => f,
            Err(e) => {
                // An undecodable or invalid request: answer and drop the connection, since
                // the stream position can no longer be trusted after a malformed message.
                let _ = respond(&mut stream, Err(WireError::from_error(&e)));
                return;
            }
        };
        if !blksnap_proto::version_supported(frame.version) {
            let msg = format!(
                "protocol version {} not supported (this daemon speaks {}..={PROTOCOL_VERSION})",
                frame.version,
                blksnap_proto::MIN_PROTOCOL_VERSION
            );
            let _ = respond(&mut stream, Err(WireError::new(Errno::EINVAL, msg)));
            return;
        }
        let held = if who.is_root() {
            None
        } else {
            match in_flight.take(who.uid, limits.max_requests_in_flight_per_user) {
                Some(h) => Some(h),
                None => {
                    let msg = format!(
                        "too many requests in flight for uid {} \
                         (max_requests_in_flight_per_user = {})",
                        who.uid, limits.max_requests_in_flight_per_user
                    );
                    if respond(&mut stream, Err(WireError::new(Errno::EAGAIN, msg))).is_err() {
                        return;
                    }
                    continue;
                }
            }
        };
        let waited = match frame.request {
            blksnap_proto::Request::WaitEvent { id, .. } => Some(id),
            _ => None,
        };
        let result = daemon.handle_from(frame.request, fds, &who, &|| peer_gone(&stream));
        drop(held);
        if let (Some(id), Ok(Reply::Event(event))) = (waited, &result) {
            // An event taken for a client that hung up meanwhile is kept for the next waiter
            // (a restarted `stretch_snapshot` must still see the low-space event).
            let event = *event;
            if peer_gone(&stream) || respond(&mut stream, result).is_err() {
                daemon.requeue_event(id.into(), event);
                return;
            }
            continue;
        }
        if respond(&mut stream, result).is_err() {
            return;
        }
    }
}

/// The blocking client (moved to `blksnap-proto`; re-exported for existing users).
pub use blksnap_proto::client::Client;
