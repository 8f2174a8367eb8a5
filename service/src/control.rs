//! The control socket: a Unix stream socket speaking `blksnap-proto`, one thread per
//! connection. Access: the socket file is mode 0600 (0660 and group-owned with a configured
//! group), and every connection's peer credentials (`SO_PEERCRED`) are checked again: uid 0, or
//! the configured group as primary or supplementary group of the peer process.

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

/// Supplementary groups of a process (from `/proc/PID/status`).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| g.split_whitespace().filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default()
}

/// Whether `peer` may use the socket.
pub fn allowed(peer: &Peer, group: Option<u32>) -> bool {
    if peer.uid == 0 {
        return true;
    }
    match group {
        Some(g) => peer.gid == g || supplementary_groups(peer.pid).contains(&g),
        None => false,
    }
}

/// The listening socket.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    group: Option<u32>,
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
        Ok(ControlServer { listener, path: path.to_path_buf(), group })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts connections forever, one thread each.
    pub fn serve(self, daemon: Arc<Daemon>) {
        for conn in self.listener.incoming() {
            let Ok(stream) = conn else { continue };
            let d = daemon.clone();
            let group = self.group;
            let _ = std::thread::Builder::new()
                .name("blksnapd-conn".into())
                .spawn(move || serve_connection(stream, &d, group));
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

/// Serves one connection until it closes or misbehaves.
pub fn serve_connection(mut stream: UnixStream, daemon: &Daemon, group: Option<u32>) {
    let peer = match peer_cred(&stream) {
        Ok(p) => p,
        Err(_) => return,
    };
    if !allowed(&peer, group) {
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
