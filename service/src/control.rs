//! The control socket: a Unix stream socket speaking `blksnap-proto`, one thread per
//! connection. Access: the socket file is mode 0600 (0660 and group-owned with a configured
//! group), and every connection's peer credentials are checked once, from the kernel, at
//! connect: `SO_PEERCRED` (uid, gid) and `SO_PEERGROUPS` (supplementary groups) — uid 0, or the
//! configured group as the peer's primary or supplementary group. Limits ([`Limits`]): a
//! connection over `max_connections` is answered EAGAIN and closed; a peer that sends nothing
//! (or reads nothing) for `idle_timeout` is disconnected, so no silent client holds a thread.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blksnap_model::Errno;
use blksnap_proto::{
    decode_request, read_frame, write_frame, Reply, RequestFrame, ResponseFrame, WireError,
    PROTOCOL_VERSION,
};

use crate::daemon::Daemon;

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

/// Limits on the control socket's clients (configuration `max_connections`,
/// `idle_timeout_secs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; the next is answered EAGAIN and closed.
    pub max_connections: usize,
    /// A connection that neither sends a request nor reads its answer for this long is closed
    /// (a partial frame included: every read and write must progress within it).
    pub idle_timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_connections: 64, idle_timeout: std::time::Duration::from_secs(600) }
    }
}

/// The listening socket.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    group: Option<u32>,
    limits: Limits,
}

/// One connection's slot in the connection count; released when the connection ends.
struct Slot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
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

    /// Accepts connections forever, one thread each, at most `max_connections` at once.
    pub fn serve(self, daemon: Arc<Daemon>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let active = Arc::new(AtomicUsize::new(0));
        for conn in self.listener.incoming() {
            let Ok(mut stream) = conn else { continue };
            if active.fetch_add(1, Ordering::SeqCst) >= self.limits.max_connections {
                active.fetch_sub(1, Ordering::SeqCst);
                let msg = format!(
                    "too many connections (max_connections = {})",
                    self.limits.max_connections
                );
                let _ = stream.set_write_timeout(Some(std::time::Duration::from_secs(1)));
                let _ = respond(&mut stream, Err(WireError::new(Errno::EAGAIN, msg)));
                continue;
            }
            let slot = Slot(active.clone());
            let d = daemon.clone();
            let (group, limits) = (self.group, self.limits);
            let _ = std::thread::Builder::new().name("blksnapd-conn".into()).spawn(move || {
                let _slot = slot;
                serve_connection(stream, &d, group, limits)
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

/// Serves one connection until it closes, misbehaves or idles past the limit.
pub fn serve_connection(
    mut stream: UnixStream,
    daemon: &Daemon,
    group: Option<u32>,
    limits: Limits,
) {
    let (Ok(peer), Ok(groups)) = (peer_cred(&stream), peer_groups(&stream)) else { return };
    if stream.set_read_timeout(Some(limits.idle_timeout)).is_err()
        || stream.set_write_timeout(Some(limits.idle_timeout)).is_err()
    {
        return;
    }
    if !allowed(&peer, &groups, group) {
        let _ = respond(
            &mut stream,
            Err(WireError::new(Errno::EPERM, "only root or the configured group may connect")),
        );
        return;
    }
    loop {
        let body = match read_frame(&mut stream) {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(_) => {
                let _ = respond(&mut stream, Err(WireError::new(Errno::EINVAL, "bad frame")));
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
        let waited = match frame.request {
            blksnap_proto::Request::WaitEvent { id, .. } => Some(id),
            _ => None,
        };
        let result = daemon.handle_for(frame.request, &|| peer_gone(&stream));
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
