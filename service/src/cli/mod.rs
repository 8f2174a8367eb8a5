//! The `blksnap` command line: the upstream console tool's commands and options (so existing
//! scripts keep working), `--json` everywhere, and `backup`/`restore`/`verify` for full and
//! incremental backups of snapshot images driven by the CBT map.
//!
//! Commands talk to a [`Backend`]: `blksnapd` over its socket ([`DaemonBackend`], the default)
//! or an engine in this process ([`InProcess`], `--in-process CONFIG`). [`run`] is the whole
//! program (the binary only calls it), so tests can drive it too.

pub mod backend;
pub mod backup;
pub mod device;
pub mod error;
pub mod fiemap;
pub mod inproc;
pub mod pull;

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use blksnap_model::limits::MAX_RANGES_PER_CALL;
use blksnap_model::Uuid;
use blksnap_proto::{Dev, EventKindW, EventW, Id, Range, Reply, Request, Storage};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

pub use backend::{Backend, DaemonBackend};
pub use error::CliError;
pub use inproc::{InConfig, InProcess};

use backend::{canonical, split_rdev, unexpected};

/// The module version the engine implements (what upstream's `version` prints).
pub const MODULE_VERSION: &str = "2.0.0.0";

const AFTER_HELP: &str = "\
Devices (-d) are named by their block device path (e.g. /dev/ublkb0), by the path of the file or \
device behind them, or as MAJ:MIN. Snapshot ids (-i) are UUIDs as snapshot_create prints them.

Backends: by default every command goes to blksnapd over its control socket (--socket, \
BLKSNAP_SOCKET, default /run/blksnap/control). --in-process CONFIG runs an engine inside this \
process instead, keeping its state between commands in a state directory (for tests and hosts \
without the daemon; see the README).

Errors print the errno name and a sentence on stderr and exit with status 1; bad arguments exit \
with status 2.";

/// blksnap: snapshots, change tracking and backups of block devices served by blksnapd.
#[derive(Parser, Debug)]
#[command(name = "blksnap", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// Print one JSON object (machine-readable) instead of text; progress bars are never drawn.
    #[arg(short = 'j', long, global = true)]
    pub json: bool,
    /// blksnapd's control socket.
    #[arg(
        long,
        global = true,
        env = "BLKSNAP_SOCKET",
        default_value = blksnap_proto::DEFAULT_SOCKET,
        value_name = "PATH"
    )]
    pub socket: PathBuf,
    /// Run an engine in this process with this configuration (a file, or inline entries
    /// `PATH=BACKING[@MAJ:MIN];state=DIR;...`) instead of talking to blksnapd.
    #[arg(long = "in-process", global = true, value_name = "CONFIG")]
    pub in_process: Option<String>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// A device option.
#[derive(Args, Debug, Clone)]
pub struct DeviceArg {
    /// The tracked device (path, backing path or MAJ:MIN).
    #[arg(short, long, value_name = "DEVICE")]
    pub device: String,
}

/// A snapshot id option.
#[derive(Args, Debug, Clone)]
pub struct IdArg {
    /// The snapshot's id (UUID).
    #[arg(short, long, value_name = "UUID", value_parser = parse_id)]
    pub id: Uuid,
}

/// `snapshot_info --field`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// The image's block device.
    Image,
    /// 0, or the negative errno of the snapshot's failure on this device.
    ErrorCode,
}

/// The commands (flattened fields are documented on their types).
#[allow(missing_docs)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the blksnap module version the engine implements (2.0.0.0).
    #[command(name = "version")]
    Version,
    /// Serve, stop serving or list devices (blksnapd), without or with tracking.
    #[command(name = "device", subcommand)]
    Device(device::DeviceCommand),
    /// Start change tracking on a device (blksnapd: serves the file or device first if needed).
    #[command(name = "attach")]
    Attach(DeviceArg),
    /// Stop change tracking on a device (refused while it is in a snapshot).
    #[command(name = "detach")]
    Detach(DeviceArg),
    /// Print a device's change-tracking parameters.
    #[command(name = "cbtinfo")]
    Cbtinfo(DeviceArg),
    /// Write a device's change map (one byte per block, frozen at the last take) to a file.
    #[command(name = "readcbtmap")]
    Readcbtmap {
        #[command(flatten)]
        device: DeviceArg,
        /// Output file.
        #[arg(short, long, value_name = "FILE")]
        file: PathBuf,
    },
    /// Mark blocks as changed: a file's blocks on its own device, or sector ranges of a device.
    #[command(name = "markdirtyblock")]
    #[command(group = clap::ArgGroup::new("what").required(true).args(["file", "ranges"]))]
    Markdirtyblock {
        /// A file whose blocks (on the device holding it) are marked.
        #[arg(short, long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// The tracked device (with --ranges; with --file, overrides the file's device).
        #[arg(short, long, value_name = "DEVICE")]
        device: Option<String>,
        /// Sector ranges SECTOR:COUNT (512-byte sectors).
        #[arg(short = 'r', long = "ranges", alias = "range", value_name = "SECTOR:COUNT",
              num_args = 1.., value_parser = parse_range, requires = "device")]
        ranges: Vec<Range>,
    },
    /// Create a snapshot of one or more devices and print its id. Without --file the
    /// difference storage is appended later (snapshot_appendstorage, stretch_snapshot); with
    /// --file it is that file, directory (an unnamed file in it) or block device, up to --limit.
    #[command(name = "snapshot_create")]
    SnapshotCreate {
        /// A device to add (repeat for several).
        #[arg(short, long = "device", value_name = "DEVICE")]
        devices: Vec<String>,
        /// Difference storage: a file, directory or block device.
        #[arg(short, long, value_name = "PATH", requires = "limit")]
        file: Option<PathBuf>,
        /// Storage limit in bytes, with an optional K, M, G or T suffix (powers of 1024).
        #[arg(short, long, value_name = "SIZE", value_parser = parse_size, requires = "file")]
        limit: Option<u64>,
    },
    /// Destroy a snapshot (its images go away, even if open).
    #[command(name = "snapshot_destroy")]
    SnapshotDestroy(IdArg),
    /// Append difference storage (v3): a preallocated file's extents, or ranges of a device.
    #[command(name = "snapshot_appendstorage")]
    #[command(group = clap::ArgGroup::new("what").required(true).args(["file", "device"]))]
    SnapshotAppendstorage {
        #[command(flatten)]
        id: IdArg,
        /// A preallocated file (e.g. `fallocate -l 1G FILE`): its allocated extents are used.
        #[arg(short, long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// A file or block device whose --range sectors are used.
        #[arg(short, long, value_name = "PATH", requires = "ranges")]
        device: Option<PathBuf>,
        /// Sector ranges SECTOR:COUNT of --device.
        #[arg(short = 'r', long = "range", alias = "ranges", value_name = "SECTOR:COUNT",
              num_args = 1.., value_parser = parse_range)]
        ranges: Vec<Range>,
    },
    /// Take a snapshot: images appear, copy-on-write starts, the change maps switch.
    #[command(name = "snapshot_take")]
    SnapshotTake(IdArg),
    /// Wait for a snapshot's next event (low free space, no space, corrupted).
    #[command(name = "snapshot_waitevent")]
    SnapshotWaitevent {
        #[command(flatten)]
        id: IdArg,
        /// How long to wait, in milliseconds (0: just look).
        #[arg(short, long, default_value_t = 0, value_name = "MS")]
        timeout: u32,
    },
    /// List the snapshots' ids, one per line.
    #[command(name = "snapshot_collect")]
    SnapshotCollect,
    /// Print a device's snapshot image and error code.
    #[command(name = "snapshot_info")]
    SnapshotInfo {
        #[command(flatten)]
        device: DeviceArg,
        /// Print only this field's value.
        #[arg(short, long, value_enum)]
        field: Option<Field>,
    },
    /// Add a device to a snapshot before it is taken (attaches the filter if needed).
    #[command(name = "snapshot_add")]
    SnapshotAdd {
        #[command(flatten)]
        id: IdArg,
        #[command(flatten)]
        device: DeviceArg,
    },
    /// Keep a snapshot's difference storage growing (v3): on every low-space event create
    /// `<PATH>diff_storage#N` of the requested size and append it, until the snapshot is gone or
    /// corrupted. The files are removed at exit.
    #[command(name = "stretch_snapshot")]
    StretchSnapshot {
        #[command(flatten)]
        id: IdArg,
        /// Prefix of the storage files (a directory needs its trailing `/`).
        #[arg(short, long, value_name = "PATH")]
        path: String,
        /// Most storage to create in total, in MiB.
        #[arg(short, long, value_name = "MIB")]
        limit: u64,
    },
    /// Print a snapshot's events as they come, until it is gone or corrupted.
    #[command(name = "snapshot_watcher")]
    SnapshotWatcher(IdArg),
    /// Back up a snapshot image to a directory: a full copy, or only the blocks changed since
    /// the previous backup according to the device's change map.
    #[command(name = "backup")]
    Backup {
        /// The image to read (e.g. /dev/blksnap-image_251:0 or a file), or an NBD URI of an
        /// image blksnapd exports (nbd://HOST[:PORT]/image-MAJ:MIN, nbds://…?tls-certificates=DIR,
        /// nbd+unix:///image-MAJ:MIN?socket=PATH): full and incremental pulls from its
        /// dirty-bitmap contexts, without the control socket.
        #[arg(long, value_name = "PATH")]
        image: PathBuf,
        /// The backup directory.
        #[arg(long, value_name = "DIR")]
        target: PathBuf,
        /// The tracked device the image is a snapshot of (needed for incrementals).
        #[arg(short, long, value_name = "DEVICE")]
        device: Option<String>,
        /// Make a full backup even if an incremental is possible.
        #[arg(long)]
        full: bool,
    },
    /// Rebuild a backup point into a file.
    #[command(name = "restore")]
    Restore {
        /// The backup directory.
        #[arg(long, value_name = "DIR")]
        target: PathBuf,
        /// The point (default: the newest).
        #[arg(long, value_name = "N")]
        point: Option<u32>,
        /// The file to write.
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Compare a backup point with an image, byte for byte.
    #[command(name = "verify")]
    Verify {
        /// The image.
        #[arg(long, value_name = "PATH")]
        image: PathBuf,
        /// The backup directory.
        #[arg(long, value_name = "DIR")]
        target: PathBuf,
        /// The point (default: the newest).
        #[arg(long, value_name = "N")]
        point: Option<u32>,
    },
}

impl Command {
    /// The command's name as typed.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Version => "version",
            Command::Device(_) => "device",
            Command::Attach(_) => "attach",
            Command::Detach(_) => "detach",
            Command::Cbtinfo(_) => "cbtinfo",
            Command::Readcbtmap { .. } => "readcbtmap",
            Command::Markdirtyblock { .. } => "markdirtyblock",
            Command::SnapshotCreate { .. } => "snapshot_create",
            Command::SnapshotDestroy(_) => "snapshot_destroy",
            Command::SnapshotAppendstorage { .. } => "snapshot_appendstorage",
            Command::SnapshotTake(_) => "snapshot_take",
            Command::SnapshotWaitevent { .. } => "snapshot_waitevent",
            Command::SnapshotCollect => "snapshot_collect",
            Command::SnapshotInfo { .. } => "snapshot_info",
            Command::SnapshotAdd { .. } => "snapshot_add",
            Command::StretchSnapshot { .. } => "stretch_snapshot",
            Command::SnapshotWatcher(_) => "snapshot_watcher",
            Command::Backup { .. } => "backup",
            Command::Restore { .. } => "restore",
            Command::Verify { .. } => "verify",
        }
    }
}

fn parse_id(s: &str) -> Result<Uuid, String> {
    s.parse::<Uuid>().map_err(|_| format!("`{s}` is not a snapshot id (a UUID: 8-4-4-4-12 hex)"))
}

/// `SECTOR:COUNT`.
pub fn parse_range(s: &str) -> Result<Range, String> {
    let bad = || format!("`{s}` is not a range SECTOR:COUNT (512-byte sectors)");
    let (a, b) = s.split_once(':').ok_or_else(bad)?;
    let offset = a.trim().parse::<u64>().map_err(|_| bad())?;
    let count = b.trim().parse::<u64>().map_err(|_| bad())?;
    if offset.checked_add(count).is_none() {
        return Err(format!("`{s}`: the range overflows"));
    }
    Ok(Range { offset, count })
}

/// Bytes with an optional K/M/G/T suffix (powers of 1024; `KiB`, `kb` also accepted).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("`{s}` is not a size (bytes, or a number with K, M, G or T)");
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let stripped = lower.trim_end_matches('b').trim_end_matches('i');
    let (num, shift) = match stripped.chars().last() {
        Some('k') => (&stripped[..stripped.len() - 1], 10),
        Some('m') => (&stripped[..stripped.len() - 1], 20),
        Some('g') => (&stripped[..stripped.len() - 1], 30),
        Some('t') => (&stripped[..stripped.len() - 1], 40),
        _ => (stripped, 0),
    };
    let n = num.trim().parse::<u64>().map_err(|_| bad())?;
    let v = n.checked_mul(1u64 << shift).ok_or_else(|| format!("`{s}`: too large"))?;
    if v == 0 {
        return Err(format!("`{s}`: the size must be positive"));
    }
    Ok(v)
}

/// What a command printed: text lines, the JSON object, the exit status.
#[derive(Debug)]
pub struct Report {
    /// Text output, one line each.
    pub text: Vec<String>,
    /// The `--json` object.
    pub json: Value,
    /// Exit status.
    pub status: i32,
}

impl Report {
    fn new(text: Vec<String>, json: Value) -> Report {
        Report { text, json, status: 0 }
    }
}

/// Printing for commands that report as they go (watcher, stretch, backup's progress).
pub struct Printer {
    /// `--json`.
    pub json: bool,
}

impl Printer {
    /// Prints one record: a line of text, or one JSON object on its own line.
    pub fn record(&self, text: &str, json: Value) {
        let mut out = std::io::stdout().lock();
        let _ = if self.json { writeln!(out, "{json}") } else { writeln!(out, "{text}") };
        let _ = out.flush();
    }
}

/// The whole program: parses `args` (with the program name first), runs the command, prints,
/// and returns the exit status.
pub fn run<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    let name = cli.command.name();
    let json = cli.json;
    let mut backend: Box<dyn Backend> = match &cli.in_process {
        Some(cfg) => match InConfig::parse(cfg) {
            Ok(c) => Box::new(InProcess::new(c)),
            Err(e) => return fail(name, json, &e),
        },
        None => Box::new(DaemonBackend::new(cli.socket.clone())),
    };
    let printer = Printer { json };
    match execute(cli.command, backend.as_mut(), &printer) {
        Ok(r) => {
            let mut out = std::io::stdout().lock();
            if json {
                let _ = writeln!(out, "{}", r.json);
            } else {
                for l in &r.text {
                    let _ = writeln!(out, "{l}");
                }
            }
            let _ = out.flush();
            r.status
        }
        Err(e) => fail(name, json, &e),
    }
}

fn fail(command: &str, json: bool, e: &CliError) -> i32 {
    eprintln!("blksnap {command}: {}: {}", e.name(), e.message);
    if json {
        let v = json!({
            "command": command,
            "error": { "errno": e.name(), "code": e.errno, "message": e.message },
        });
        println!("{v}");
    }
    1
}

pub(crate) fn dev_str(d: Dev) -> String {
    format!("{}:{}", d.major, d.minor)
}

fn id_str(id: Id) -> String {
    Uuid::from(id).to_string()
}

fn done(b: &mut dyn Backend, req: Request) -> Result<(), CliError> {
    match b.call(req)? {
        Reply::Done => Ok(()),
        other => Err(unexpected(&other)),
    }
}

/// cbtinfo of a device.
pub fn cbt_info(b: &mut dyn Backend, dev: Dev) -> Result<blksnap_proto::CbtInfoW, CliError> {
    match b.call(Request::CbtInfo { dev })? {
        Reply::CbtInfo(i) => Ok(i),
        other => Err(unexpected(&other)),
    }
}

/// The whole read map of a device, in 32 KiB requests (as upstream reads it).
pub fn cbt_map(b: &mut dyn Backend, dev: Dev, block_count: u32) -> Result<Vec<u8>, CliError> {
    let mut map = Vec::with_capacity(block_count as usize);
    let mut offset = 0u32;
    while offset < block_count {
        let length = (block_count - offset).min(32 << 10);
        match b.call(Request::CbtMap { dev, offset, length })? {
            Reply::CbtMap(part) if part.len() == length as usize => map.extend_from_slice(&part),
            other => return Err(unexpected(&other)),
        }
        offset += length;
    }
    Ok(map)
}

/// Resolves a device, serving it first if the daemon does not serve it yet.
fn device_or_serve(b: &mut dyn Backend, name: &str) -> Result<Dev, CliError> {
    match b.device(name) {
        Err(e) if e.errno == libc::ENODEV => b.serve(name).map(|(d, _)| d),
        r => r,
    }
}

fn call_ranges(
    b: &mut dyn Backend,
    ranges: &[Range],
    mut make: impl FnMut(Vec<Range>) -> Request,
) -> Result<(), CliError> {
    for part in ranges.chunks(MAX_RANGES_PER_CALL) {
        done(b, make(part.to_vec()))?;
    }
    Ok(())
}

fn event_fields(ev: &EventW) -> (Vec<String>, Value) {
    match ev.kind {
        EventKindW::LowFreeSpace { requested_sectors } => (
            vec!["event=low_free_space".into(), format!("requested_nr_sect={requested_sectors}")],
            json!({"event": "low_free_space", "requested_nr_sect": requested_sectors}),
        ),
        EventKindW::NoSpace { requested_sectors } => (
            vec!["event=no_space".into(), format!("requested_nr_sect={requested_sectors}")],
            json!({"event": "no_space", "requested_nr_sect": requested_sectors}),
        ),
        EventKindW::Corrupted { device, errno } => (
            vec![
                "event=corrupted".into(),
                format!("dev_id={}", dev_str(device)),
                format!("err_code={errno}"),
            ],
            json!({"event": "corrupted", "dev_id": dev_str(device), "err_code": errno,
                   "errno": error::errno_name(errno)}),
        ),
    }
}

fn wait(b: &mut dyn Backend, id: Uuid, timeout_ms: u32) -> Result<EventW, CliError> {
    match b.call(Request::WaitEvent { id: id.into(), timeout_ms })? {
        Reply::Event(e) => Ok(e),
        other => Err(unexpected(&other)),
    }
}

/// Extents of a file as sector ranges of the file itself (for storage), clipped to its size;
/// the whole file when the filesystem has no FIEMAP. Returns the ranges and how they were found.
fn file_storage_ranges(path: &Path) -> Result<(Vec<Range>, &'static str), CliError> {
    let f = File::open(path).map_err(|e| CliError::io(path.display(), &e))?;
    let size = f.metadata().map_err(|e| CliError::io(path.display(), &e))?.len() / 512 * 512;
    match fiemap::extents(&f) {
        Ok(extents) => {
            let mut ranges: Vec<Range> = Vec::new();
            for e in extents {
                if e.flags & (fiemap::EXTENT_UNKNOWN | fiemap::EXTENT_DATA_INLINE) != 0 {
                    continue;
                }
                let start = e.logical.div_ceil(512) * 512;
                let end = (e.logical + e.length).min(size) / 512 * 512;
                if end <= start {
                    continue;
                }
                let r = Range { offset: start / 512, count: (end - start) / 512 };
                match ranges.last_mut() {
                    Some(l) if l.offset + l.count == r.offset => l.count += r.count,
                    _ => ranges.push(r),
                }
            }
            if ranges.is_empty() {
                return Err(CliError::invalid(format!(
                    "{} has no allocated blocks: preallocate it (fallocate -l SIZE FILE)",
                    path.display()
                )));
            }
            Ok((ranges, "fiemap"))
        }
        Err(e) if fiemap::unsupported(&e) => {
            if size == 0 {
                return Err(CliError::invalid(format!("{} is empty", path.display())));
            }
            Ok((vec![Range { offset: 0, count: size / 512 }], "whole-file"))
        }
        Err(e) => Err(CliError::io(format!("FIEMAP on {}", path.display()), &e)),
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn catch_stop_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe); a plain sigaction
        // without SA_RESTART so a blocked wait returns.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Runs one parsed command against a backend.
pub fn execute(cmd: Command, b: &mut dyn Backend, p: &Printer) -> Result<Report, CliError> {
    match cmd {
        Command::Version => {
            let backend = b.describe()?;
            Ok(Report::new(
                vec![MODULE_VERSION.into()],
                json!({"version": MODULE_VERSION, "cli": env!("CARGO_PKG_VERSION"),
                       "backend": backend}),
            ))
        }
        Command::Device(cmd) => device::execute(cmd, b),
        Command::Attach(DeviceArg { device }) => match b.device(&device) {
            Ok(dev) => match b.call(Request::Attach { dev }) {
                Ok(_) => Ok(Report::new(
                    vec![],
                    json!({"device": device, "dev": dev_str(dev), "attached": true,
                           "already": false}),
                )),
                Err(e) if e.errno == libc::EALREADY => Ok(Report::new(
                    vec!["already attached".into()],
                    json!({"device": device, "dev": dev_str(dev), "attached": true,
                           "already": true}),
                )),
                Err(e) => Err(e),
            },
            Err(e) if e.errno == libc::ENODEV => {
                let (dev, path) = b.serve(&device)?;
                Ok(Report::new(
                    vec![format!("device={path}")],
                    json!({"device": device, "dev": dev_str(dev), "attached": true,
                           "already": false, "block_device": path}),
                ))
            }
            Err(e) => Err(e),
        },
        Command::Detach(DeviceArg { device }) => {
            let dev = b.device(&device)?;
            done(b, Request::Detach { dev })?;
            Ok(Report::new(
                vec![],
                json!({"device": device, "dev": dev_str(dev), "detached": true}),
            ))
        }
        Command::Cbtinfo(DeviceArg { device }) => {
            let dev = b.device(&device)?;
            let i = cbt_info(b, dev)?;
            let generation = id_str(i.generation_id);
            Ok(Report::new(
                vec![
                    format!("block_size={}", i.block_size_bytes),
                    format!("device_capacity={}", i.device_capacity_bytes),
                    format!("block_count={}", i.block_count),
                    format!("generation_id={generation}"),
                    format!("changes_number={}", i.changes_number),
                ],
                json!({"device": device, "block_size": i.block_size_bytes,
                       "device_capacity": i.device_capacity_bytes, "block_count": i.block_count,
                       "generation_id": generation, "changes_number": i.changes_number}),
            ))
        }
        Command::Readcbtmap { device: DeviceArg { device }, file } => {
            let dev = b.device(&device)?;
            let i = cbt_info(b, dev)?;
            let map = cbt_map(b, dev, i.block_count)?;
            std::fs::write(&file, &map).map_err(|e| CliError::io(file.display(), &e))?;
            Ok(Report::new(
                vec![],
                json!({"device": device, "file": file, "block_count": i.block_count,
                       "block_size": i.block_size_bytes, "changes_number": i.changes_number,
                       "generation_id": id_str(i.generation_id), "bytes": map.len()}),
            ))
        }
        Command::Markdirtyblock { file, device, ranges } => {
            let (dev, ranges, how) = match file {
                Some(path) => {
                    let f = File::open(&path).map_err(|e| CliError::io(path.display(), &e))?;
                    let meta = f.metadata().map_err(|e| CliError::io(path.display(), &e))?;
                    let dev = match &device {
                        Some(d) => b.device(d)?,
                        None => {
                            let d = split_rdev(meta.dev());
                            b.device(&dev_str(d)).map_err(|e| {
                                e.context(format!(
                                    "{} lives on device {} (use -d to name the tracked device)",
                                    path.display(),
                                    dev_str(d)
                                ))
                            })?
                        }
                    };
                    let extents = fiemap::extents(&f).map_err(|e| {
                        CliError::io(format!("cannot map the extents of {}", path.display()), &e)
                    })?;
                    let ranges: Vec<Range> = extents
                        .iter()
                        .filter(|e| e.flags & fiemap::EXTENT_UNKNOWN == 0)
                        .map(|e| Range {
                            offset: e.physical / 512,
                            count: (e.physical + e.length).div_ceil(512) - e.physical / 512,
                        })
                        .collect();
                    (dev, ranges, "file")
                }
                None => {
                    let name = device.as_deref().expect("clap requires --device with --ranges");
                    (b.device(name)?, ranges, "ranges")
                }
            };
            call_ranges(b, &ranges, |r| Request::CbtDirty { dev, ranges: r })?;
            let sectors: u64 = ranges.iter().map(|r| r.count).sum();
            Ok(Report::new(
                vec![],
                json!({"dev": dev_str(dev), "from": how, "ranges": ranges.len(),
                       "sectors": sectors}),
            ))
        }
        Command::SnapshotCreate { devices, file, limit } => {
            let mut devs = Vec::new();
            for d in &devices {
                devs.push(device_or_serve(b, d)?);
            }
            let storage = match (&file, limit) {
                (Some(f), Some(l)) => Storage::File {
                    path: canonical(f).display().to_string(),
                    limit_sectors: l.div_ceil(512),
                },
                _ => Storage::Ranges,
            };
            let id = match b.call(Request::SnapshotCreate { storage: storage.clone() })? {
                Reply::Created(id) => id,
                other => return Err(unexpected(&other)),
            };
            for (name, dev) in devices.iter().zip(&devs) {
                if let Err(e) = add_member(b, id, *dev) {
                    // Do not leave a half-made snapshot behind.
                    let _ = b.call(Request::SnapshotDestroy { id });
                    return Err(e.context(format!("add {name} (the snapshot was destroyed)")));
                }
            }
            let sid = id_str(id);
            let storage_json = match storage {
                Storage::Ranges => json!({"kind": "ranges"}),
                Storage::File { path, limit_sectors } => {
                    json!({"kind": "file", "path": path, "limit_sectors": limit_sectors})
                }
            };
            Ok(Report::new(
                vec![sid.clone()],
                json!({"id": sid, "devices": devices, "storage": storage_json}),
            ))
        }
        Command::SnapshotDestroy(IdArg { id }) => {
            done(b, Request::SnapshotDestroy { id: id.into() })?;
            Ok(Report::new(vec![], json!({"id": id.to_string(), "destroyed": true})))
        }
        Command::SnapshotTake(IdArg { id }) => {
            done(b, Request::SnapshotTake { id: id.into() })?;
            Ok(Report::new(vec![], json!({"id": id.to_string(), "taken": true})))
        }
        Command::SnapshotAppendstorage { id: IdArg { id }, file, device, ranges } => {
            let (path, ranges, how) = match (file, device) {
                (Some(f), _) => {
                    let (r, how) = file_storage_ranges(&f)?;
                    (canonical(&f), r, how)
                }
                (None, Some(d)) => (canonical(&d), ranges, "ranges"),
                (None, None) => unreachable!("clap requires --file or --device"),
            };
            let path_s = path.display().to_string();
            call_ranges(b, &ranges, |r| Request::SnapshotAppend {
                id: id.into(),
                path: path_s.clone(),
                ranges: r,
            })?;
            let sectors: u64 = ranges.iter().map(|r| r.count).sum();
            Ok(Report::new(
                vec![],
                json!({"id": id.to_string(), "path": path_s, "from": how,
                       "ranges": ranges.len(), "sectors": sectors}),
            ))
        }
        Command::SnapshotWaitevent { id: IdArg { id }, timeout } => {
            let (text, j, status) = match wait(b, id, timeout) {
                Ok(ev) => {
                    let (mut lines, mut obj) = event_fields(&ev);
                    lines.insert(0, format!("time={}", ev.time_ns));
                    lines.insert(0, "result=ok".into());
                    obj["result"] = json!("ok");
                    obj["time"] = json!(ev.time_ns);
                    (lines, obj, 0)
                }
                Err(e) if e.errno == libc::ENOENT => {
                    (vec!["result=timeout".into()], json!({"result": "timeout"}), 0)
                }
                Err(e) if e.errno == libc::EINTR => {
                    (vec!["result=interrupted".into()], json!({"result": "interrupted"}), 0)
                }
                Err(e) if e.errno == libc::ESRCH => {
                    (vec!["result=not found".into()], json!({"result": "not found"}), 1)
                }
                Err(e) => return Err(e),
            };
            let mut j = j;
            j["id"] = json!(id.to_string());
            Ok(Report { text, json: j, status })
        }
        Command::SnapshotCollect => {
            let ids = match b.call(Request::SnapshotCollect)? {
                Reply::Snapshots(ids) => ids,
                other => return Err(unexpected(&other)),
            };
            let ids: Vec<String> = ids.into_iter().map(id_str).collect();
            Ok(Report::new(ids.clone(), json!({"snapshots": ids})))
        }
        Command::SnapshotInfo { device: DeviceArg { device }, field } => {
            let dev = b.device(&device)?;
            let (error_code, image) = match b.call(Request::SnapshotInfo { dev })? {
                Reply::SnapshotInfo { error_code, image, image_path } => {
                    let path = image_path
                        .or_else(|| image.map(|d| format!("/dev/blksnap-{}-{}", d.major, d.minor)));
                    (error_code, path.unwrap_or_default())
                }
                other => return Err(unexpected(&other)),
            };
            let text = match field {
                Some(Field::Image) => vec![image.clone()],
                Some(Field::ErrorCode) => vec![error_code.to_string()],
                None => vec![format!("error_code={error_code}"), format!("image={image}")],
            };
            let j = match field {
                Some(Field::Image) => json!({"device": device, "image": image}),
                Some(Field::ErrorCode) => json!({"device": device, "error_code": error_code}),
                None => json!({"device": device, "error_code": error_code, "image": image}),
            };
            Ok(Report::new(text, j))
        }
        Command::SnapshotAdd { id: IdArg { id }, device: DeviceArg { device } } => {
            let dev = device_or_serve(b, &device)?;
            add_member(b, id.into(), dev)?;
            Ok(Report::new(vec![], json!({"id": id.to_string(), "device": device, "added": true})))
        }
        Command::SnapshotWatcher(IdArg { id }) => watcher(b, id, p),
        Command::StretchSnapshot { id: IdArg { id }, path, limit } => {
            stretch(b, id, &path, limit, p)
        }
        Command::Backup { image, target, device, full } => match image.to_str() {
            Some(uri) if crate::nbd::client::is_uri(uri) => {
                if device.is_some() {
                    return Err(CliError::invalid(
                        "--device is for local images; an NBD export carries its change map",
                    ));
                }
                pull::backup_nbd(uri, &target, full, p.json)
            }
            _ => backup::backup(b, &image, &target, device.as_deref(), full, p.json),
        },
        Command::Restore { target, point, output } => backup::restore(&target, point, &output),
        Command::Verify { image, target, point } => backup::verify(&image, &target, point),
    }
}

/// snapshot_add with upstream's retry: on ENOENT (no filter) attach and try once more.
fn add_member(b: &mut dyn Backend, id: Id, dev: Dev) -> Result<(), CliError> {
    match done(b, Request::SnapshotAdd { id, dev }) {
        Err(e) if e.errno == libc::ENOENT => {
            match done(b, Request::Attach { dev }) {
                Err(e) if e.errno != libc::EALREADY => return Err(e.context("attach")),
                _ => {}
            }
            done(b, Request::SnapshotAdd { id, dev })
        }
        r => r,
    }
}

fn watcher(b: &mut dyn Backend, id: Uuid, p: &Printer) -> Result<Report, CliError> {
    loop {
        match wait(b, id, 1000) {
            Ok(ev) => {
                let (lines, mut obj) = event_fields(&ev);
                obj["time"] = json!(ev.time_ns);
                p.record(&format!("time={} {}", ev.time_ns, lines.join(" ")), obj);
                if matches!(ev.kind, EventKindW::Corrupted { .. }) {
                    return Ok(Report {
                        text: vec!["snapshot is corrupted".into()],
                        json: json!({"id": id.to_string(), "end": "corrupted"}),
                        status: 1,
                    });
                }
            }
            Err(e) if e.errno == libc::ENOENT || e.errno == libc::EINTR => b.after_empty_wait(1000),
            Err(e) if e.errno == libc::ESRCH => {
                return Ok(Report::new(
                    vec!["snapshot is gone".into()],
                    json!({"id": id.to_string(), "end": "gone"}),
                ))
            }
            Err(e) => return Err(e),
        }
    }
}

/// Creates `path` of `bytes`, preallocated (so the storage never allocates while copying).
fn create_storage_file(path: &Path, bytes: u64) -> Result<(), CliError> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| CliError::io(path.display(), &e))?;
    // SAFETY: fallocate on a descriptor owned by `f`; no memory is passed.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, bytes as libc::off_t) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            let _ = std::fs::remove_file(path);
            return Err(CliError::io(format!("preallocate {}", path.display()), &e));
        }
        f.set_len(bytes).map_err(|e| CliError::io(path.display(), &e))?;
    }
    Ok(())
}

fn stretch(
    b: &mut dyn Backend,
    id: Uuid,
    prefix: &str,
    limit_mib: u64,
    p: &Printer,
) -> Result<Report, CliError> {
    catch_stop_signals();
    let limit = limit_mib.saturating_mul(1 << 20);
    let mut files: Vec<PathBuf> = Vec::new();
    let mut total = 0u64;
    let result = (|| -> Result<Report, CliError> {
        loop {
            if STOP.load(Ordering::SeqCst) {
                return Ok(Report {
                    text: vec!["stopped by a signal".into()],
                    json: json!({"id": id.to_string(), "end": "signal", "files": files.len(),
                                 "bytes": total}),
                    status: 1,
                });
            }
            match wait(b, id, 1000) {
                Ok(ev) => {
                    let (lines, mut obj) = event_fields(&ev);
                    obj["time"] = json!(ev.time_ns);
                    p.record(&format!("time={} {}", ev.time_ns, lines.join(" ")), obj);
                    match ev.kind {
                        EventKindW::LowFreeSpace { requested_sectors } => {
                            let bytes = requested_sectors.saturating_mul(512);
                            if total.saturating_add(bytes) > limit {
                                p.record(
                                    &format!(
                                        "limit of {limit_mib} MiB reached: {bytes} more bytes not \
                                         added"
                                    ),
                                    json!({"limit_reached": true, "requested_bytes": bytes}),
                                );
                                continue;
                            }
                            let path =
                                PathBuf::from(format!("{prefix}diff_storage#{}", files.len()));
                            create_storage_file(&path, bytes)?;
                            files.push(path.clone());
                            let (ranges, _) = file_storage_ranges(&path)?;
                            let path_s = canonical(&path).display().to_string();
                            call_ranges(b, &ranges, |r| Request::SnapshotAppend {
                                id: id.into(),
                                path: path_s.clone(),
                                ranges: r,
                            })?;
                            total += bytes;
                            p.record(
                                &format!("appended {path_s} ({requested_sectors} sectors)"),
                                json!({"appended": path_s, "sectors": requested_sectors}),
                            );
                        }
                        EventKindW::Corrupted { .. } => {
                            return Ok(Report {
                                text: vec!["snapshot is corrupted".into()],
                                json: json!({"id": id.to_string(), "end": "corrupted",
                                             "files": files.len(), "bytes": total}),
                                status: 1,
                            })
                        }
                        EventKindW::NoSpace { .. } => {}
                    }
                }
                Err(e) if e.errno == libc::ENOENT || e.errno == libc::EINTR => {
                    b.after_empty_wait(1000)
                }
                Err(e) if e.errno == libc::ESRCH => {
                    return Ok(Report::new(
                        vec!["snapshot is gone".into()],
                        json!({"id": id.to_string(), "end": "gone", "files": files.len(),
                               "bytes": total}),
                    ))
                }
                Err(e) => return Err(e),
            }
        }
    })();
    for f in &files {
        let _ = std::fs::remove_file(f);
    }
    result
}
