//! NBD exports: every snapshot image (read-only) and, when configured, origins (writable),
//! served over the NBD protocol (fixed newstyle handshake, structured replies, metadata
//! contexts) on a Unix socket and on TCP (TLS required), so that any NBD client — `qemu-img`,
//! `nbdcopy`, `nbdinfo`, libnbd programs, `blksnap backup` on another machine — pulls full
//! and incremental backups.
//!
//! * [`handshake`]: option negotiation (`NBD_OPT_GO`/`INFO`/`LIST`/`ABORT`/`STARTTLS`/
//!   `STRUCTURED_REPLY`/`LIST_META_CONTEXT`/`SET_META_CONTEXT`, and the old `EXPORT_NAME`).
//! * [`transmission`]: the commands (READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS,
//!   DISC), served synchronously through the engine — the same calls the ublk front end makes.
//! * [`contexts`]: `base:allocation` and the CBT change map as `qemu:dirty-bitmap:` contexts.
//! * [`tls`]: rustls configurations (client certificates against a CA; rustls has no TLS-PSK,
//!   so PSK is not offered).
//! * [`client`]: a small blocking client (what `blksnap backup` pulls with).
//!
//! Exports follow the daemon ([`Exports`]): an image's export appears when its snapshot is
//! taken and is withdrawn at destroy — a request on a connection to a withdrawn export is
//! answered ESHUTDOWN and the connection closed (a request in flight at the destroy fails
//! with EIO, as the engine's image I/O does). Names: `image-MAJ:MIN` for the image of the
//! origin `MAJ:MIN`, `origin-MAJ:MIN` for a writable origin. Limits ([`NbdConfig`]):
//! connections in total (closed at accept) and per export (refused at `NBD_OPT_GO`), request
//! payload (at most NBD's 32 MiB), idle time.
//!
//! Trust: the Unix socket admits root only (mode 0600, peer credentials checked), or with
//! `group_reads` also the daemon's group (0660), whose members then read every image. TCP peers are trusted by their TLS
//! client certificate (verified against `tls_ca`); `tls = false` is accepted only on a
//! loopback address, where every local user can connect (see docs/SECURITY.md).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blksnap_model::DeviceId;

use crate::daemon::Target;

pub mod client;
mod config;
pub mod contexts;
pub mod handshake;
pub mod tls;
pub mod transmission;
pub mod wire;

pub use config::NbdConfig;

/// What a connection reads from and writes to: a socket, or TLS over one.
pub trait Socket: Read + Write + Send {}
impl<T: Read + Write + Send> Socket for T {}

/// One export.
pub struct Export {
    /// Its name in `NBD_OPT_GO` / `NBD_OPT_LIST`.
    pub name: String,
    /// Human-readable description (`NBD_INFO_DESCRIPTION`, the second column of a list).
    pub description: String,
    /// The data path (the same one a ublk device of it would have).
    pub target: Arc<Target>,
    /// Writes allowed (configured origins only).
    pub writable: bool,
    gone: AtomicBool,
    connections: AtomicUsize,
}

impl Export {
    /// The engine id whose CBT describes this export: the origin (an image's is its origin's).
    pub fn dev(&self) -> Option<DeviceId> {
        self.target.image_of.or(*self.target.origin.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.target.capacity_bytes()
    }

    /// Whether it was withdrawn (snapshot destroyed, origin removed).
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }
}

/// A connection's hold on an export, released when the connection ends.
pub struct ExportSlot(Arc<Export>);

impl Drop for ExportSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The exports, following the daemon's images and origins.
pub struct Exports {
    config: NbdConfig,
    /// `writable_origins`, canonicalised when they exist (an origin is matched by either).
    writable: Vec<PathBuf>,
    map: Mutex<BTreeMap<String, Arc<Export>>>,
}

impl Exports {
    /// Exports as `config` says (none until the daemon publishes some).
    pub fn new(config: &NbdConfig) -> Exports {
        let mut writable = config.writable_origins.clone();
        writable
            .extend(config.writable_origins.iter().filter_map(|p| std::fs::canonicalize(p).ok()));
        Exports { config: config.clone(), writable, map: Mutex::new(BTreeMap::new()) }
    }

    /// The configuration.
    pub fn config(&self) -> &NbdConfig {
        &self.config
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Export>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The export name of the image of `origin`.
    pub fn image_name(origin: DeviceId) -> String {
        format!("image-{}:{}", origin.major, origin.minor)
    }

    /// The export name of the writable origin `origin`.
    pub fn origin_name(origin: DeviceId) -> String {
        format!("origin-{}:{}", origin.major, origin.minor)
    }

    fn publish(&self, name: String, description: String, target: Arc<Target>, writable: bool) {
        let export = Arc::new(Export {
            name: name.clone(),
            description,
            target,
            writable,
            gone: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
        });
        if let Some(old) = self.map().insert(name, export) {
            old.gone.store(true, Ordering::Release);
        }
    }

    /// The image of `origin` (backing `backing`) is served: export it, read-only.
    pub fn publish_image(&self, origin: DeviceId, target: Arc<Target>, backing: &Path) {
        let description = format!("blksnap image of {origin} ({})", backing.display());
        self.publish(Self::image_name(origin), description, target, false);
    }

    /// The origin `origin` is served: export it, writable, if its backing is one of
    /// `writable_origins` (by the path given or its canonical form); otherwise nothing.
    pub fn publish_origin(&self, origin: DeviceId, target: Arc<Target>, backing: &Path) {
        let canonical = std::fs::canonicalize(backing).ok();
        let listed = self
            .writable
            .iter()
            .any(|w| w == backing || canonical.as_deref().is_some_and(|c| c == w.as_path()));
        if listed {
            let description = format!("blksnap origin {origin} ({}), writable", backing.display());
            self.publish(Self::origin_name(origin), description, target, true);
        }
    }

    /// Withdraws an export: later requests on its connections are refused (ESHUTDOWN) and
    /// the connections closed.
    pub fn withdraw(&self, name: &str) {
        if let Some(e) = self.map().remove(name) {
            e.gone.store(true, Ordering::Release);
        }
    }

    /// The export called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.map().get(name).cloned()
    }

    /// Every export, by name.
    pub fn list(&self) -> Vec<Arc<Export>> {
        self.map().values().cloned().collect()
    }

    /// A connection slot on `export`, or None when it has `max_connections_per_export`.
    pub fn hold(&self, export: &Arc<Export>) -> Option<ExportSlot> {
        let max = self.config.max_connections_per_export;
        let n = export.connections.fetch_add(1, Ordering::AcqRel);
        let slot = ExportSlot(export.clone());
        (n < max).then_some(slot)
    }
}

/// One connection's place in the total count; released when it ends.
struct ConnSlot(Arc<AtomicUsize>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The bound NBD listeners of a daemon.
pub struct Listeners {
    unix: Option<(UnixListener, PathBuf)>,
    tcp: Option<TcpListener>,
    tls: Option<Arc<rustls::ServerConfig>>,
    group: Option<u32>,
    config: NbdConfig,
}

impl Listeners {
    /// Binds what `config` names (the Unix socket replaces a stale one; mode 0600 and root
    /// peers only, or 0660 and that group's members too when `group` is given — the caller
    /// passes the daemon's group only with `group_reads`) and loads the TLS files.
    pub fn bind(config: &NbdConfig, group: Option<u32>) -> Result<Listeners, String> {
        config.validate()?;
        let tls = if config.tcp_tls() { Some(tls::server_config(config)?) } else { None };
        let unix = match &config.socket {
            Some(path) => Some((
                bind_unix(path, group).map_err(|e| format!("{}: {e}", path.display()))?,
                path.clone(),
            )),
            None => None,
        };
        let tcp = match config.tcp {
            Some(addr) => {
                Some(TcpListener::bind(addr).map_err(|e| format!("nbd tcp {addr}: {e}"))?)
            }
            None => None,
        };
        Ok(Listeners { unix, tcp, tls, group, config: config.clone() })
    }

    /// The TCP listener's address (its port when bound to port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The Unix socket's path.
    pub fn socket_path(&self) -> Option<&Path> {
        self.unix.as_ref().map(|(_, p)| p.as_path())
    }

    /// Accepts connections on every listener, one thread per listener and per connection.
    pub fn spawn(self, exports: Arc<Exports>) -> Result<(), String> {
        let active = Arc::new(AtomicUsize::new(0));
        let idle = Duration::from_secs(u64::from(self.config.idle_timeout_secs));
        let max = self.config.max_connections;
        if let Some((l, _)) = self.unix {
            let (exports, active, group) = (exports.clone(), active.clone(), self.group);
            spawn("blksnapd-nbd-unix", move || {
                for conn in l.incoming() {
                    let Ok(s) = conn else { continue };
                    let Some(slot) = take_slot(&active, max) else { continue };
                    let exports = exports.clone();
                    let spawned = spawn("blksnapd-nbd", move || {
                        let _slot = slot;
                        serve_unix(s, &exports, group, idle);
                    });
                    if let Err(e) = spawned {
                        eprintln!("blksnapd: nbd: cannot start a connection thread: {e}");
                    }
                }
            })?;
        }
        if let Some(l) = self.tcp {
            let tls = self.tls;
            spawn("blksnapd-nbd-tcp", move || {
                for conn in l.incoming() {
                    let Ok(s) = conn else { continue };
                    let Some(slot) = take_slot(&active, max) else { continue };
                    let (exports, tls) = (exports.clone(), tls.clone());
                    let spawned = spawn("blksnapd-nbd", move || {
                        let _slot = slot;
                        serve_tcp(s, &exports, tls.as_ref(), idle);
                    });
                    if let Err(e) = spawned {
                        eprintln!("blksnapd: nbd: cannot start a connection thread: {e}");
                    }
                }
            })?;
        }
        Ok(())
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
    std::thread::Builder::new().name(name.into()).spawn(f).map(drop).map_err(|e| e.to_string())
}

fn take_slot(active: &Arc<AtomicUsize>, max: usize) -> Option<ConnSlot> {
    if active.fetch_add(1, Ordering::AcqRel) >= max {
        active.fetch_sub(1, Ordering::AcqRel);
        eprintln!("blksnapd: nbd: connection refused: max_connections = {max} reached");
        return None;
    }
    Some(ConnSlot(active.clone()))
}

fn bind_unix(path: &Path, group: Option<u32>) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let l = UnixListener::bind(path)?;
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Some(g) = group {
        std::os::unix::fs::chown(path, None, Some(g))?;
    }
    Ok(l)
}

fn serve_unix(s: UnixStream, exports: &Exports, group: Option<u32>, idle: Duration) {
    use crate::control::{allowed, peer_cred, peer_groups};
    let (Ok(peer), Ok(groups)) = (peer_cred(&s), peer_groups(&s)) else { return };
    if !allowed(&peer, &groups, group) {
        // Not even the greeting: the socket's mode should have kept the peer out already.
        eprintln!("blksnapd: nbd: uid {} refused (only root or the configured group)", peer.uid);
        return;
    }
    if s.set_read_timeout(Some(idle)).is_err() || s.set_write_timeout(Some(idle)).is_err() {
        return;
    }
    serve(Box::new(s), exports, None);
}

fn serve_tcp(
    s: TcpStream,
    exports: &Exports,
    tls: Option<&Arc<rustls::ServerConfig>>,
    idle: Duration,
) {
    let _ = s.set_nodelay(true);
    if s.set_read_timeout(Some(idle)).is_err() || s.set_write_timeout(Some(idle)).is_err() {
        return;
    }
    serve(Box::new(s), exports, tls);
}

/// Serves one connection from the greeting to its end. With `tls`, the client must start TLS
/// before it may name an export.
pub fn serve(s: Box<dyn Socket>, exports: &Exports, tls: Option<&Arc<rustls::ServerConfig>>) {
    match handshake::negotiate(s, exports, tls) {
        Ok(Some(session)) => transmission::serve(session, exports.config().max_request_bytes),
        Ok(None) => {}
        Err(e) => {
            if e.kind() != std::io::ErrorKind::UnexpectedEof {
                eprintln!("blksnapd: nbd: handshake: {e}");
            }
        }
    }
}
