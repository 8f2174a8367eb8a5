//! Configuration: a TOML file (`/etc/blksnap/blksnapd.toml` by default) overridden by flags.
//!
//! ```toml
//! socket = "/run/blksnap/control"   # control socket (mode 0600, or 0660 with `group`)
//! group = "backup"                  # optional: members may use the socket too
//! link_dir = "/dev"                 # where image links are made
//! image_links = ["v3", "newest"]    # /dev/blksnap-image_MAJ:MIN and/or /dev/blksnap-MAJ-MIN
//! queues = 2                        # per ublk device; default: one per core
//! queue_depth = 64
//! io_buf_bytes = 524288
//! queue_workers = 8                 # threads per queue serving its requests at once (0: one
//!                                   # request at a time on the queue thread)
//! backing_direct_io = "auto"        # O_DIRECT on backings: "auto" (block devices), "always",
//!                                   # "never"
//! storage_direct_io = "auto"        # O_DIRECT on difference storages: the same three values
//! queue_uring = true                # origin reads, and writes that need no copy, that go direct
//!                                   # are issued on the queue's io_uring (false: the workers)
//! ublk_zero_copy = "auto"           # "auto": the driver's zero copy and user copy where the
//!                                   # kernel offers both (6.16+); "never": it copies each request
//! state_dir = "/var/lib/blksnap"  # CBT kept across clean restarts; crash marker; device map
//! remove_devices_on_stop = false    # a clean stop leaves the devices to the next daemon
//! freeze = true                     # TAKE freezes the filesystems mounted on the origins
//! freeze_timeout_secs = 30          # a freeze not done by then fails the take (EAGAIN)
//! max_connections = 64              # control-socket connections at once
//! idle_timeout_secs = 600           # a client silent this long is disconnected
//! max_connections_per_user = 16     # per non-root user
//! max_requests_in_flight_per_user = 8
//! frame_timeout_secs = 30           # a frame must be complete this long after its first byte
//! max_frame_bytes = 16777216
//! max_snapshots = 64                # snapshots at once
//! max_devices = 256                 # served origins at once
//!
//! [params]                          # the module parameters (`modinfo blksnap`), optional
//! diff_storage_minimum = 2097152   # sectors: storage step, v3 low-space request, newest growth
//! tracking_block_minimum_shift = 16
//!
//! [nbd]                             # NBD exports of images (`crate::nbd::NbdConfig`), optional
//! socket = "/run/blksnap/nbd"
//!
//! [[device]]
//! backing = "/var/lib/vm/disk0.img" # regular file or block device
//! attach = true                     # start change tracking at once (default)
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use blksnap_model::{Params, Profile};
use serde::Deserialize;

/// Whether `meta` is owned by root or by the daemon's own user (the only owners whose files
/// the daemon trusts as configuration or configured devices).
pub fn trusted_owner(meta: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != me {
        return Err(format!("owned by uid {}, not by root or the daemon's user", meta.uid()));
    }
    Ok(())
}

/// A configured backing as the daemon opens it: symlinks resolved once here (the
/// configuration may name `/dev/disk/by-id/...`), then the resolved path must be a regular file
/// or block device owned by root or the daemon's user (checked on the file itself,
/// `O_NOFOLLOW`).
pub fn trusted_backing(path: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let real = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(&real)
        .map_err(|e| format!("{}: {e}", real.display()))?;
    let meta = file.metadata().map_err(|e| format!("{}: {e}", real.display()))?;
    if !(meta.is_file() || meta.file_type().is_block_device()) {
        return Err(format!("{}: not a regular file or block device", real.display()));
    }
    trusted_owner(&meta).map_err(|e| format!("{}: {e}", real.display()))?;
    Ok(real)
}

/// Default configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/blksnap/blksnapd.toml";

/// Who makes the block devices of origins and images.
#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FrontendKind {
    /// ublk block devices (`/dev/ublkbN`; needs the `ublk` build feature and `ublk_drv`).
    #[default]
    Ublk,
    /// No block devices: origins and images exist only in the daemon (ids `240:N`, `241:N`);
    /// clients reach their data over the control socket (protocol v3 data requests: libblksnap,
    /// the LD_PRELOAD shim). For hosts without ublk.
    None,
}

/// Config `ublk_zero_copy`.
#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ZeroCopy {
    /// Where the running kernel offers both `UBLK_F_AUTO_BUF_REG` and `UBLK_F_USER_COPY`.
    #[default]
    Auto,
    /// Never: the driver copies every request's data to or from a buffer per tag.
    Never,
}

/// Image link naming: the upstream clients' two conventions.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LinkStyle {
    /// `blksnap-image_MAJ:MIN` (v3).
    V3,
    /// `blksnap-MAJ-MIN` (newest).
    Newest,
}

impl LinkStyle {
    /// The link's file name for the origin `dev`.
    pub fn name(self, dev: blksnap_model::DeviceId) -> String {
        match self {
            LinkStyle::V3 => Profile::V3.image_name(dev),
            LinkStyle::Newest => Profile::Newest.image_name(dev),
        }
    }
}

/// One tracked device.
#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Backing regular file or block device.
    pub backing: PathBuf,
    /// Attach the tracker at start.
    #[serde(default = "yes")]
    pub attach: bool,
}

/// The daemon's configuration.
#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Control socket path.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Group (name or numeric gid) allowed to use the socket besides root.
    #[serde(default)]
    pub group: Option<String>,
    /// Directory for image links.
    #[serde(default = "default_link_dir")]
    pub link_dir: PathBuf,
    /// Which links each image gets.
    #[serde(default = "default_links")]
    pub image_links: Vec<LinkStyle>,
    /// Queues per ublk device (default: one per core).
    #[serde(default)]
    pub queues: Option<u16>,
    /// Queue depth.
    #[serde(default = "default_depth")]
    pub queue_depth: u16,
    /// Largest I/O in bytes.
    #[serde(default = "default_io_buf")]
    pub io_buf_bytes: u32,
    /// Worker threads per queue serving its requests concurrently (0: one at a time on the
    /// queue thread); at most `queue_depth` are used.
    #[serde(default = "default_queue_workers")]
    pub queue_workers: u16,
    /// Direct I/O on the origins' backings (`crate::daemon::backing_io`).
    #[serde(default)]
    pub backing_direct_io: crate::daemon::backing_io::DirectIo,
    /// Direct I/O on difference storages (`crate::daemon::backing::open_storage`): the same rule
    /// as `backing_direct_io`, set apart because a storage often lives on another medium than
    /// the backings (a tmpfs or a scratch disk).
    #[serde(default)]
    pub storage_direct_io: crate::daemon::backing_io::DirectIo,
    /// Origin reads, and origin writes that need no copy-on-write, that go direct to the backing
    /// are issued on the ublk queue's own io_uring (asynchronous, no hand-off to a worker
    /// thread); false: the workers serve them too.
    #[serde(default = "default_true")]
    pub queue_uring: bool,
    /// Whether new ublk devices use the driver's zero copy (`UBLK_F_AUTO_BUF_REG`) and user copy
    /// (`UBLK_F_USER_COPY`) where the kernel offers both (`crate::ublk`, "Zero copy").
    #[serde(default)]
    pub ublk_zero_copy: ZeroCopy,
    /// State directory (`crate::state`): saved CBT, the running marker, the device map.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// A clean stop removes the origin devices (what is mounted on them then fails) instead of
    /// leaving them, and what is mounted on them, to the next daemon, which takes them over
    /// with the saved CBT (the default).
    #[serde(default)]
    pub remove_devices_on_stop: bool,
    /// Deprecated (keeping the devices is the default now): `keep_devices = false` is the same
    /// as `remove_devices_on_stop = true`, `true` changes nothing.
    #[serde(default)]
    pub keep_devices: Option<bool>,
    /// TAKE freezes the filesystems mounted on the snapshot's origins (`crate::freeze`).
    #[serde(default = "yes")]
    pub freeze: bool,
    /// How long one filesystem's freeze may take before the take is refused.
    #[serde(default = "default_freeze_timeout")]
    pub freeze_timeout_secs: u32,
    /// Control-socket connections served at once; the next is answered EAGAIN.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A client that neither sends nor reads for this long is disconnected.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u32,
    /// Connections one non-root user may hold at once (root is bound only by
    /// `max_connections`); the next is answered EAGAIN.
    #[serde(default = "default_max_connections_per_user")]
    pub max_connections_per_user: usize,
    /// Requests one non-root user may have in flight at once, over all its connections; the
    /// next is answered EAGAIN (a WaitEvent in progress counts).
    #[serde(default = "default_max_requests_per_user")]
    pub max_requests_in_flight_per_user: usize,
    /// A frame must be complete this long after its first byte; a client that stops
    /// mid-frame is answered EAGAIN and disconnected.
    #[serde(default = "default_frame_timeout")]
    pub frame_timeout_secs: u32,
    /// Largest request frame accepted (bytes, at most the protocol's 16 MiB); a larger one is
    /// answered EFBIG and the connection closed.
    #[serde(default = "default_max_frame_bytes")]
    pub max_frame_bytes: u32,
    /// Snapshots at once (at most the engine's 1,024); a create over it is ENOMEM.
    #[serde(default = "default_max_snapshots")]
    pub max_snapshots: usize,
    /// Served origin devices at once (at most the engine's 4,096); an add over it is ENOMEM.
    #[serde(default = "default_max_devices")]
    pub max_devices: usize,
    /// Engine parameters by their module names (`Params::NAMES`); the rest keep the defaults.
    #[serde(default)]
    pub params: BTreeMap<String, u64>,
    /// Who makes the block devices (`ublk`, or `none` on hosts without the driver).
    #[serde(default)]
    pub frontend: FrontendKind,
    /// NBD exports of images and writable origins (`crate::nbd`; off unless a listener is set).
    #[serde(default)]
    pub nbd: crate::nbd::NbdConfig,
    /// Tracked devices.
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceConfig>,
}

fn yes() -> bool {
    true
}
fn default_socket() -> PathBuf {
    PathBuf::from(blksnap_proto::DEFAULT_SOCKET)
}
fn default_link_dir() -> PathBuf {
    PathBuf::from("/dev")
}
fn default_links() -> Vec<LinkStyle> {
    vec![LinkStyle::V3, LinkStyle::Newest]
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/blksnap")
}
fn default_freeze_timeout() -> u32 {
    30
}
fn default_max_connections() -> usize {
    64
}
fn default_idle_timeout() -> u32 {
    600
}
fn default_max_connections_per_user() -> usize {
    16
}
fn default_max_requests_per_user() -> usize {
    8
}
fn default_frame_timeout() -> u32 {
    30
}
fn default_max_frame_bytes() -> u32 {
    blksnap_proto::MAX_FRAME_BYTES
}
fn default_max_snapshots() -> usize {
    64
}
fn default_max_devices() -> usize {
    256
}
fn default_depth() -> u16 {
    64
}
fn default_true() -> bool {
    true
}
fn default_queue_workers() -> u16 {
    8
}
fn default_io_buf() -> u32 {
    512 << 10
}

impl Default for Config {
    fn default() -> Config {
        Config {
            socket: default_socket(),
            group: None,
            link_dir: default_link_dir(),
            image_links: default_links(),
            queues: None,
            queue_depth: default_depth(),
            io_buf_bytes: default_io_buf(),
            queue_workers: default_queue_workers(),
            backing_direct_io: Default::default(),
            storage_direct_io: Default::default(),
            queue_uring: true,
            ublk_zero_copy: ZeroCopy::Auto,
            state_dir: default_state_dir(),
            remove_devices_on_stop: false,
            keep_devices: None,
            freeze: true,
            freeze_timeout_secs: default_freeze_timeout(),
            max_connections: default_max_connections(),
            idle_timeout_secs: default_idle_timeout(),
            max_connections_per_user: default_max_connections_per_user(),
            max_requests_in_flight_per_user: default_max_requests_per_user(),
            frame_timeout_secs: default_frame_timeout(),
            max_frame_bytes: default_max_frame_bytes(),
            max_snapshots: default_max_snapshots(),
            max_devices: default_max_devices(),
            params: BTreeMap::new(),
            frontend: FrontendKind::Ublk,
            nbd: crate::nbd::NbdConfig::default(),
            devices: Vec::new(),
        }
    }
}

impl Config {
    /// The control socket's limits.
    pub fn control_limits(&self) -> crate::control::Limits {
        crate::control::Limits {
            max_connections: self.max_connections,
            idle_timeout: std::time::Duration::from_secs(u64::from(self.idle_timeout_secs)),
            max_connections_per_user: self.max_connections_per_user,
            max_requests_in_flight_per_user: self.max_requests_in_flight_per_user,
            frame_timeout: std::time::Duration::from_secs(u64::from(self.frame_timeout_secs)),
            max_frame_bytes: self.max_frame_bytes,
        }
    }

    /// Whether a clean stop leaves the origin devices to the next daemon (the default; see
    /// [`Config::remove_devices_on_stop`]).
    pub fn keeps_devices(&self) -> bool {
        !self.remove_devices_on_stop && self.keep_devices != Some(false)
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Config, String> {
        let cfg: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and parses a file: opened without following a symlink (`O_NOFOLLOW`), and it
    /// must be a regular file owned by root (or the daemon's user) that no one else may write
    /// — whoever can change it decides what the daemon serves.
    pub fn load(path: &Path) -> Result<Config, String> {
        use std::io::Read;
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| format!("cannot read {} (a symlink is refused): {e}", path.display()))?;
        let meta = file.metadata().map_err(|e| format!("{}: {e}", path.display()))?;
        if !meta.is_file() {
            return Err(format!("{}: not a regular file", path.display()));
        }
        trusted_owner(&meta).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.mode() & 0o022 != 0 {
            return Err(format!("{}: writable by group or others (chmod go-w)", path.display()));
        }
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Config::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        if !self.socket.is_absolute()
            || !self.link_dir.is_absolute()
            || !self.state_dir.is_absolute()
        {
            return Err("socket, link_dir and state_dir must be absolute paths".into());
        }
        if self.remove_devices_on_stop && self.keep_devices == Some(true) {
            return Err("keep_devices = true contradicts remove_devices_on_stop = true".into());
        }
        if self.queues == Some(0) || self.queues.is_some_and(|q| q > 64) {
            return Err("queues must be 1..=64".into());
        }
        if !(1..=3600).contains(&self.freeze_timeout_secs) {
            return Err("freeze_timeout_secs must be 1..=3600".into());
        }
        if !(1..=4096).contains(&self.max_connections) {
            return Err("max_connections must be 1..=4096".into());
        }
        if !(1..=86_400).contains(&self.idle_timeout_secs) {
            return Err("idle_timeout_secs must be 1..=86400".into());
        }
        // (over max_connections it simply never binds first)
        if !(1..=4096).contains(&self.max_connections_per_user) {
            return Err("max_connections_per_user must be 1..=4096".into());
        }
        if !(1..=4096).contains(&self.max_requests_in_flight_per_user) {
            return Err("max_requests_in_flight_per_user must be 1..=4096".into());
        }
        if !(1..=3600).contains(&self.frame_timeout_secs) {
            return Err("frame_timeout_secs must be 1..=3600".into());
        }
        if !(4096..=blksnap_proto::MAX_FRAME_BYTES).contains(&self.max_frame_bytes) {
            return Err("max_frame_bytes must be 4096..=16777216".into());
        }
        if !(1..=blksnap_model::limits::MAX_SNAPSHOTS).contains(&self.max_snapshots) {
            return Err("max_snapshots must be 1..=1024".into());
        }
        if !(1..=blksnap_model::limits::MAX_DISKS).contains(&self.max_devices) {
            return Err("max_devices must be 1..=4096".into());
        }
        if !(1..=4096).contains(&self.queue_depth) {
            return Err("queue_depth must be 1..=4096".into());
        }
        if self.queue_workers > 256 {
            return Err("queue_workers must be 0..=256".into());
        }
        if !(4096..=(4 << 20)).contains(&self.io_buf_bytes) || !self.io_buf_bytes.is_power_of_two()
        {
            return Err("io_buf_bytes must be a power of two in 4 KiB..=4 MiB".into());
        }
        for d in &self.devices {
            if !d.backing.is_absolute() {
                return Err(format!("{}: backing must be an absolute path", d.backing.display()));
            }
        }
        self.nbd.validate()?;
        self.engine_params().map(drop)
    }

    /// The engine's parameters: the defaults with `params` applied, sanitised as the module does
    /// at load time.
    pub fn engine_params(&self) -> Result<Params, String> {
        let mut p = Params::default();
        for (name, value) in &self.params {
            p.set(name, *value).map_err(|e| {
                format!(
                    "params.{name} = {value}: {} (known: {})",
                    e.detail,
                    Params::NAMES.join(", ")
                )
            })?;
        }
        p.sanitized().map_err(|e| format!("params: {}", e.detail))
    }

    /// Queues per device: configured, or one per core.
    pub fn nr_queues(&self) -> u16 {
        self.queues.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, |n| n.get().min(64) as u16)
        })
    }

    /// The numeric gid of `group`, if set (a number, or a name looked up in /etc/group).
    pub fn group_gid(&self) -> Result<Option<u32>, String> {
        let Some(g) = &self.group else { return Ok(None) };
        if let Ok(gid) = g.parse::<u32>() {
            return Ok(Some(gid));
        }
        let text = std::fs::read_to_string("/etc/group").unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                let gid = f.nth(1)?.parse::<u32>().ok()?;
                (name == g).then_some(gid)
            })
            .next()
            .map(Some)
            .ok_or_else(|| format!("group {g} not found in /etc/group"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file() {
        let cfg = Config::parse(
            r#"
            socket = "/run/x/control"
            group = "0"
            image_links = ["newest"]
            queues = 2
            frontend = "none"
            [[device]]
            backing = "/tmp/a.img"
            [[device]]
            backing = "/dev/sdb"
            attach = false
            "#,
        )
        .unwrap();
        assert_eq!(cfg.devices.len(), 2);
        assert!(cfg.devices[0].attach);
        assert!(!cfg.devices[1].attach);
        assert_eq!(cfg.image_links, vec![LinkStyle::Newest]);
        assert_eq!(cfg.group_gid().unwrap(), Some(0));
        assert_eq!(cfg.nr_queues(), 2);
        assert_eq!(cfg.frontend, FrontendKind::None);
        assert_eq!(Config::default().frontend, FrontendKind::Ublk);
        use crate::daemon::backing_io::DirectIo;
        assert_eq!(cfg.storage_direct_io, DirectIo::Auto, "the default");
        let direct = Config::parse("storage_direct_io = \"always\"").unwrap();
        assert_eq!(
            (direct.storage_direct_io, direct.backing_direct_io),
            (DirectIo::Always, DirectIo::Auto)
        );
        assert!(Config::parse("frontend = \"loop\"").is_err());
    }

    #[test]
    fn the_shipped_example_parses() {
        let cfg = Config::parse(include_str!("../blksnapd.toml")).unwrap();
        assert_eq!(cfg.devices.len(), 1);
        assert_eq!(cfg.nbd, crate::nbd::NbdConfig::default(), "NBD is off unless configured");
        let nbd = Config::parse("[nbd]\nsocket = \"/run/x/nbd\"\nmax_connections = 4").unwrap();
        assert!(nbd.nbd.enabled() && nbd.nbd.max_connections == 4);
        assert!(Config::parse("[nbd]\ntcp = \"0.0.0.0:1\"\ntls = false").is_err());
        assert_eq!(cfg.socket, PathBuf::from(blksnap_proto::DEFAULT_SOCKET));
    }

    #[test]
    fn load_refuses_symlinks_and_writable_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        std::fs::write(&good, "max_snapshots = 3\n").unwrap();
        std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(Config::load(&good).unwrap().max_snapshots, 3);
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        assert!(Config::load(&link).unwrap_err().contains("symlink"));
        std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o664)).unwrap();
        assert!(Config::load(&good).unwrap_err().contains("writable"));
        assert!(Config::load(dir.path()).is_err(), "a directory");
        // configured backings: resolved once, must be a file or block device of ours
        let img = dir.path().join("d.img");
        std::fs::write(&img, [0u8; 512]).unwrap();
        let alias = dir.path().join("alias.img");
        std::os::unix::fs::symlink(&img, &alias).unwrap();
        assert_eq!(trusted_backing(&alias).unwrap(), std::fs::canonicalize(&img).unwrap());
        assert!(trusted_backing(dir.path()).is_err(), "a directory");
    }

    #[test]
    fn refuses_bad_values() {
        assert!(Config::parse("unknown = 1").is_err());
        assert!(Config::parse("queues = 0").is_err());
        assert!(Config::parse("io_buf_bytes = 1000").is_err());
        assert!(Config::parse("ublk_zero_copy = \"sometimes\"").is_err());
        assert_eq!(Config::default().ublk_zero_copy, ZeroCopy::Auto);
        assert_eq!(
            Config::parse("ublk_zero_copy = \"never\"").unwrap().ublk_zero_copy,
            ZeroCopy::Never
        );
        assert!(Config::parse("freeze_timeout_secs = 0").is_err());
        assert!(Config::parse("max_connections = 0").is_err());
        assert!(Config::parse("idle_timeout_secs = 0").is_err());
        let limits = Config::parse("max_connections = 8\nidle_timeout_secs = 30").unwrap();
        assert_eq!(limits.control_limits().max_connections, 8);
        assert_eq!(limits.control_limits().idle_timeout.as_secs(), 30);
        for bad in [
            "max_connections_per_user = 0",
            "max_requests_in_flight_per_user = 0",
            "frame_timeout_secs = 0",
            "max_frame_bytes = 100",
            "max_frame_bytes = 16777217",
            "max_snapshots = 0",
            "max_snapshots = 1025",
            "max_devices = 4097",
        ] {
            assert!(Config::parse(bad).is_err(), "{bad}");
        }
        let l = Config::parse(
            "frame_timeout_secs = 3
max_frame_bytes = 65536",
        )
        .unwrap();
        assert_eq!(l.control_limits().frame_timeout.as_secs(), 3);
        assert_eq!(l.control_limits().max_frame_bytes, 65536);
        assert!(!Config::parse("freeze = false").unwrap().freeze);
        assert!(Config::default().freeze, "freezing is on by default");
        assert!(Config::default().keeps_devices(), "a clean stop keeps the devices by default");
        assert!(!Config::parse("remove_devices_on_stop = true").unwrap().keeps_devices());
        // the deprecated key: `false` asks for the old behaviour, `true` is the default
        assert!(!Config::parse("keep_devices = false").unwrap().keeps_devices());
        assert!(Config::parse("keep_devices = true").unwrap().keeps_devices());
        assert!(Config::parse("keep_devices = true\nremove_devices_on_stop = true").is_err());
        assert!(Config::parse("[[device]]\nbacking = \"rel.img\"").is_err());
        assert_eq!(Config::parse("").unwrap(), Config::default());
        let e = Config::parse("[params]\nno_such_param = 1").unwrap_err();
        assert!(e.contains("no_such_param") && e.contains("diff_storage_minimum"), "{e}");
        assert!(Config::parse("[params]\nchunk_minimum_shift = 99").is_err());
        assert!(Config::parse("[params]\nchunk_minimum_shift = 99999999999").is_err());
    }

    #[test]
    fn module_parameters() {
        let cfg = Config::parse("[params]\ndiff_storage_minimum = 16384").unwrap();
        let p = cfg.engine_params().unwrap();
        assert_eq!(p.diff_storage_minimum_sectors, 16384, "the kernel's name and unit");
        let alias = Config::parse("[params]\ndiff_storage_minimum_sectors = 16384").unwrap();
        assert_eq!(alias.engine_params().unwrap(), p, "the old name is an alias");
        let no_effect = "[params]\nchunk_maximum_in_queue = 256\nfree_diff_buffer_pool_size = 0";
        let no_effect = Config::parse(no_effect).unwrap().engine_params().unwrap();
        assert_eq!(no_effect, Params::default(), "accepted, documented as without effect");
        assert_eq!(p.chunk_minimum_shift, Params::default().chunk_minimum_shift);
        // every kernel parameter of both generations, by its kernel name, in [params]
        for (name, value) in Params::KERNEL_DEFAULTS {
            let cfg = Config::parse(&format!("[params]\n{name} = {value}"))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(cfg.engine_params().is_ok(), "{name}");
        }
        // sanitised as the module does: the step is at least two minimum chunks
        let cfg = Config::parse("[params]\ndiff_storage_minimum_sectors = 1").unwrap();
        assert_eq!(cfg.engine_params().unwrap().diff_storage_minimum_sectors, 1024);
    }
}
