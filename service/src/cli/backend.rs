//! Where the commands go: `blksnapd` over its socket ([`DaemonBackend`]) or an engine in this
//! process ([`super::inproc::InProcess`]). Both speak the protocol's requests, so every command
//! is written once.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use blksnap_proto::client::Client;
use blksnap_proto::{Dev, DeviceEntry, Reply, Request};

use super::error::CliError;

/// A place that carries out blksnap requests.
pub trait Backend {
    /// Carries out one request.
    fn call(&mut self, req: Request) -> Result<Reply, CliError>;
    /// The tracked device a user names: its path, the path of its backing, `MAJ:MIN` or
    /// `/dev/block/MAJ:MIN`. ENODEV if this backend does not serve it.
    fn device(&mut self, name: &str) -> Result<Dev, CliError>;
    /// Starts serving `name` as a tracked device with its filter attached (`attach` of a
    /// device that is not served yet). Returns it and its block device path.
    fn serve(&mut self, name: &str) -> Result<(Dev, String), CliError>;
    /// Pause between polls of a waiting loop after a wait returned with nothing. The daemon
    /// really waited; an in-process engine cannot be woken by another process, so it sleeps.
    fn after_empty_wait(&mut self, _timeout_ms: u32) {}
    /// Which backend this is, for `version`.
    fn describe(&mut self) -> Result<String, CliError>;
}

/// `MAJ:MIN` or `/dev/block/MAJ:MIN`.
pub fn parse_majmin(name: &str) -> Option<Dev> {
    let s = name.strip_prefix("/dev/block/").unwrap_or(name);
    let (a, b) = s.split_once(':')?;
    Some(Dev { major: a.parse().ok()?, minor: b.parse().ok()? })
}

/// The `st_rdev` of `path` if it is a block device.
pub fn block_rdev(path: &Path) -> Option<Dev> {
    let meta = std::fs::metadata(path).ok()?;
    meta.file_type().is_block_device().then(|| split_rdev(meta.rdev()))
}

/// Splits a `dev_t` (glibc encoding).
pub fn split_rdev(rdev: u64) -> Dev {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    Dev { major: major as u32, minor: minor as u32 }
}

/// The canonical absolute form of a path (as given if it cannot be resolved).
pub fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf())
        }
    })
}

/// `blksnapd` over its control socket.
pub struct DaemonBackend {
    socket: PathBuf,
    client: Option<Client>,
}

impl DaemonBackend {
    /// A backend that connects to `socket` at its first request.
    pub fn new(socket: PathBuf) -> DaemonBackend {
        DaemonBackend { socket, client: None }
    }

    fn client(&mut self) -> Result<&mut Client, CliError> {
        if self.client.is_none() {
            let c = Client::connect(&self.socket).map_err(|e| {
                CliError::io(
                    format!(
                        "cannot reach blksnapd at {} (is it running? --socket, BLKSNAP_SOCKET, \
                         or --in-process CONFIG without the daemon)",
                        self.socket.display()
                    ),
                    &e,
                )
            })?;
            self.client = Some(c);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    fn devices(&mut self) -> Result<Vec<DeviceEntry>, CliError> {
        match self.call(Request::ListDevices)? {
            Reply::Devices(list) => Ok(list),
            other => Err(unexpected(&other)),
        }
    }
}

/// A reply of the wrong kind (a daemon bug or a protocol mismatch).
pub fn unexpected(reply: &Reply) -> CliError {
    CliError::new(libc::EPROTO, format!("unexpected reply from the backend: {reply:?}"))
}

impl Backend for DaemonBackend {
    fn call(&mut self, req: Request) -> Result<Reply, CliError> {
        let client = self.client()?;
        match client.call(req) {
            Ok(r) => r.map_err(CliError::from),
            Err(e) => {
                self.client = None;
                Err(CliError::io("blksnapd connection", &e))
            }
        }
    }

    fn device(&mut self, name: &str) -> Result<Dev, CliError> {
        if let Some(d) = parse_majmin(name) {
            return Ok(d);
        }
        let path = Path::new(name);
        if let Some(d) = block_rdev(path) {
            return Ok(d);
        }
        let want = canonical(path);
        for d in self.devices()? {
            if d.path == name
                || d.backing == name
                || Path::new(&d.path) == want
                || canonical(Path::new(&d.backing)) == want
            {
                return Ok(d.dev);
            }
        }
        Err(CliError::new(
            libc::ENODEV,
            format!(
                "{name} is not a device served by blksnapd (`blksnap attach -d {name}` serves it)"
            ),
        ))
    }

    fn serve(&mut self, name: &str) -> Result<(Dev, String), CliError> {
        let backing = canonical(Path::new(name)).display().to_string();
        match self.call(Request::AddDevice { backing, attach: true })? {
            Reply::Device(d) => Ok((d.dev, d.path)),
            other => Err(unexpected(&other)),
        }
    }

    fn describe(&mut self) -> Result<String, CliError> {
        match self.call(Request::Version)? {
            Reply::Version { protocol, daemon } => Ok(format!("{daemon} (protocol {protocol})")),
            other => Err(unexpected(&other)),
        }
    }
}
