//! `--in-process CONFIG`: the engine runs inside the `blksnap` process — for tests, the
//! simulation, and hosts without `blksnapd`.
//!
//! An engine lives only as long as one process, but a snapshot session spans many commands. So
//! the in-process backend keeps a **state directory** and re-creates the engine for every
//! request, exactly:
//!
//! * `base-N.img`: each device's content when the journal started;
//! * `cbt-N.bin`: each tracker (maps, numbers, generation) when the journal started;
//! * `journal.bin`: every state-changing request since then, and every **origin write**;
//! * `session.json`: the configuration it was made for and the id seed.
//!
//! The engine is rebuilt from the base, the trackers and the journal replayed into it (same id
//! seed and a manual clock, so the same snapshot ids, generation ids and event times come out),
//! then the configured backing files are compared with the engine's view of each device: what
//! changed since the previous command is written through the engine as origin writes (CBT marks
//! them, copy-on-write preserves the image) and journaled. Then the request runs. A new take
//! writes each image to `images/blksnap-MAJ-MIN` (the image is frozen from then on: the copies
//! are the engine's), which is what `snapshot_info` names; destroy removes them. When no snapshot
//! is left, the journal is folded into a new base. A lock file serialises commands.
//!
//! Limits (use `blksnapd` on a real host): writes are found by comparing whole devices at every
//! request, so a write is only tracked at the next command, and memory holds each device.
//! Difference-storage files must stay in place while their snapshot lives.
//!
//! CONFIG is a file or an inline string of entries separated by `;` or new lines (`#` starts a
//! comment): `PATH=BACKING[@MAJ:MIN]` (a device named PATH, served from the regular file
//! BACKING; number 240:N unless given), `state=DIR` (default: the config file's path plus
//! `.state`; required for an inline config), `seed=N` (the id seed of a new state: fixed ids
//! for tests), and `param.NAME=VALUE` for the engine parameters (`tracking_block_minimum_shift`,
//! `tracking_block_maximum_count`, `tracking_block_maximum_shift`, `chunk_minimum_shift`,
//! `chunk_maximum_count_shift`, `chunk_maximum_shift`, `diff_storage_minimum_sectors`).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blksnap_engine::cbt::CbtState;
use blksnap_engine::io::{BlockDev, Dev as EngineDev, MemDev};
use blksnap_engine::{Clock, Engine, EngineConfig, StorageSpec};
use blksnap_model::{DeviceId, Errno, Error, Params, SectorRange, SnapshotId, Uuid};
use blksnap_proto::{Dev, DeviceEntry, Reply, Request, Role, Storage, PROTOCOL_VERSION};
use serde::{Deserialize, Serialize};

use super::backend::{canonical, parse_majmin, Backend};
use super::error::CliError;

/// Format of `session.json`.
const FORMAT: u32 = 1;
/// Granularity of the comparison of backing and engine.
const SYNC_BLOCK: usize = 4096;
/// Largest origin write one journal entry carries.
const SYNC_RUN: usize = 1 << 20;

#[derive(Clone, Debug)]
struct DevCfg {
    path: String,
    backing: PathBuf,
    dev: Dev,
}

/// A parsed in-process configuration.
#[derive(Clone, Debug)]
pub struct InConfig {
    state: PathBuf,
    devices: Vec<DevCfg>,
    params: Params,
    seed: Option<u64>,
}

impl InConfig {
    /// Parses CONFIG: a path to a file, or the entries inline.
    pub fn parse(config: &str) -> Result<InConfig, CliError> {
        let (text, default_state) = match std::fs::read_to_string(config) {
            Ok(t) if Path::new(config).is_file() => {
                (t, Some(canonical(Path::new(&format!("{config}.state")))))
            }
            _ if !config.contains('=') => {
                return Err(CliError::new(
                    libc::ENOENT,
                    format!("--in-process {config}: no such configuration file"),
                ))
            }
            _ => (config.to_string(), None),
        };
        let bad = |why: String| CliError::invalid(format!("in-process configuration: {why}"));
        let mut state = default_state;
        let mut devices: Vec<DevCfg> = Vec::new();
        let mut params = Params::default();
        let mut seed = None;
        for line in text.split([';', '\n']) {
            let entry = line.split('#').next().unwrap_or("").trim();
            if entry.is_empty() {
                continue;
            }
            let (key, value) =
                entry.split_once('=').ok_or_else(|| bad(format!("`{entry}` is not KEY=VALUE")))?;
            let (key, value) = (key.trim(), value.trim());
            let num = |v: &str| v.parse::<u64>().map_err(|_| bad(format!("{key}: not a number")));
            match key {
                "state" => state = Some(canonical(Path::new(value))),
                "seed" => seed = Some(num(value)?),
                _ if key.starts_with("param.") => {
                    let name = &key["param.".len()..];
                    params.set(name, num(value)?).map_err(|e| {
                        bad(format!("{key}: {} (known: {})", e.detail, Params::NAMES.join(", ")))
                    })?;
                }
                _ => {
                    let (backing, dev) = match value.rsplit_once('@') {
                        Some((b, d)) if parse_majmin(d).is_some() => (b, parse_majmin(d)),
                        _ => (value, None),
                    };
                    let dev = dev.unwrap_or(Dev { major: 240, minor: devices.len() as u32 });
                    if devices.iter().any(|d| d.path == key || d.dev == dev) {
                        return Err(bad(format!("{key}: device named or numbered twice")));
                    }
                    devices.push(DevCfg {
                        path: key.to_string(),
                        backing: canonical(Path::new(backing)),
                        dev,
                    });
                }
            }
        }
        let params = params.sanitized().map_err(|e| bad(format!("parameters: {}", e.detail)))?;
        let state = state.ok_or_else(|| bad("an inline configuration needs state=DIR".into()))?;
        Ok(InConfig { state, devices, params, seed })
    }
}

/// The in-process backend.
pub struct InProcess {
    cfg: InConfig,
}

impl InProcess {
    /// A backend for this configuration (nothing is opened before the first request).
    pub fn new(cfg: InConfig) -> InProcess {
        InProcess { cfg }
    }
}

impl Backend for InProcess {
    fn call(&mut self, req: Request) -> Result<Reply, CliError> {
        let mut s = Session::open(&self.cfg)?;
        let r = s.request(req);
        s.close()?;
        r
    }

    fn device(&mut self, name: &str) -> Result<Dev, CliError> {
        let want = canonical(Path::new(name));
        let majmin = parse_majmin(name);
        self.cfg
            .devices
            .iter()
            .find(|d| d.path == name || d.backing == want || Some(d.dev) == majmin)
            .map(|d| d.dev)
            .ok_or_else(|| {
                CliError::new(
                    libc::ENODEV,
                    format!("{name} is not a device of the in-process configuration"),
                )
            })
    }

    fn serve(&mut self, name: &str) -> Result<(Dev, String), CliError> {
        let dev = self.device(name)?;
        self.call(Request::Attach { dev })?;
        Ok((dev, name.to_string()))
    }

    fn after_empty_wait(&mut self, timeout_ms: u32) {
        // Another process cannot wake this engine: wait here (at most a second) and look again.
        std::thread::sleep(Duration::from_millis(u64::from(timeout_ms.min(1000))));
    }

    fn describe(&mut self) -> Result<String, CliError> {
        Ok(format!("in-process engine (state {})", self.cfg.state.display()))
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct SessionFile {
    format: u32,
    seed: u64,
    /// (path, canonical backing, major, minor, capacity) per device.
    devices: Vec<(String, String, u32, u32, u64)>,
}

#[derive(Serialize, Deserialize, Debug)]
enum Entry {
    /// A request, with the length of the storage it opened (for replay without the file).
    Req { req: Request, storage_len: Option<u64> },
    /// An origin write found by comparing the backing with the engine.
    Write { dev: Dev, offset: u64, data: Vec<u8> },
}

#[derive(Serialize, Deserialize)]
struct SavedCbt {
    block_shift: u32,
    capacity_sectors: u64,
    write_map: Vec<u8>,
    read_map: Vec<u8>,
    active: u8,
    previous: u8,
    generation: [u8; 16],
}

struct Session<'a> {
    cfg: &'a InConfig,
    engine: Engine,
    file: SessionFile,
    members: HashMap<SnapshotId, Vec<Dev>>,
    journal: File,
    _lock: File,
}

fn io_err(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> CliError {
    move |e| CliError::io(what, &e)
}

fn read_full(f: &File, buf: &mut [u8], offset: u64) -> Result<(), CliError> {
    f.read_exact_at(buf, offset).map_err(io_err("in-process: read a backing file"))
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    splitmix(t ^ u64::from(std::process::id()) << 32)
}

impl<'a> Session<'a> {
    fn open(cfg: &'a InConfig) -> Result<Session<'a>, CliError> {
        let dir = &cfg.state;
        std::fs::create_dir_all(dir.join("images")).map_err(io_err(format!(
            "in-process: cannot create the state directory {}",
            dir.display()
        )))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(io_err("in-process: lock file"))?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(CliError::io("in-process: lock", &std::io::Error::last_os_error()));
        }
        let mut want = Vec::new();
        for d in &cfg.devices {
            let len = std::fs::metadata(&d.backing)
                .map_err(io_err(format!("in-process: backing of {}", d.path)))?
                .len();
            if len % 512 != 0 {
                return Err(CliError::invalid(format!(
                    "in-process: {} is {len} bytes, not a multiple of 512",
                    d.backing.display()
                )));
            }
            want.push((
                d.path.clone(),
                d.backing.display().to_string(),
                d.dev.major,
                d.dev.minor,
                len,
            ));
        }
        let session_path = dir.join("session.json");
        let file = match std::fs::read(&session_path) {
            Ok(bytes) => {
                let f: SessionFile = serde_json::from_slice(&bytes).map_err(|e| {
                    CliError::new(libc::EPROTO, format!("in-process: session.json: {e}"))
                })?;
                if f.format != FORMAT || f.devices != want {
                    return Err(CliError::invalid(format!(
                        "in-process: the state in {} was made for another configuration or \
                         device size (remove it to start over)",
                        dir.display()
                    )));
                }
                f
            }
            Err(_) => {
                for (i, d) in cfg.devices.iter().enumerate() {
                    std::fs::copy(&d.backing, dir.join(format!("base-{i}.img")))
                        .map_err(io_err("in-process: copy a backing to the state directory"))?;
                    let _ = std::fs::remove_file(dir.join(format!("cbt-{i}.bin")));
                }
                File::create(dir.join("journal.bin")).map_err(io_err("in-process: journal"))?;
                let f = SessionFile {
                    format: FORMAT,
                    seed: cfg.seed.unwrap_or_else(random_seed),
                    devices: want,
                };
                write_json(&session_path, &f)?;
                f
            }
        };
        let engine =
            Engine::new(EngineConfig::new(cfg.params, Some(file.seed), Clock::manual(true)))
                .map_err(CliError::from)?;
        for (i, d) in cfg.devices.iter().enumerate() {
            let cap = file.devices[i].4;
            let mem = MemDev::new(cap);
            let base = File::open(dir.join(format!("base-{i}.img")))
                .map_err(io_err("in-process: base image"))?;
            let mut buf = vec![0u8; SYNC_RUN];
            let mut off = 0;
            while off < cap {
                let n = (cap - off).min(SYNC_RUN as u64) as usize;
                read_full(&base, &mut buf[..n], off)?;
                if buf[..n].iter().any(|b| *b != 0) {
                    mem.write_at(&buf[..n], off).map_err(CliError::from)?;
                }
                off += n as u64;
            }
            engine.add_disk(d.dev.into(), Arc::new(mem), 1).map_err(CliError::from)?;
            if let Ok(bytes) = std::fs::read(dir.join(format!("cbt-{i}.bin"))) {
                let s: SavedCbt = postcard::from_bytes(&bytes).map_err(|_| {
                    CliError::new(libc::EPROTO, "in-process: a saved CBT is malformed")
                })?;
                let state = CbtState {
                    block_shift: s.block_shift,
                    capacity_sectors: s.capacity_sectors,
                    write_map: s.write_map,
                    read_map: s.read_map,
                    active: s.active,
                    previous: s.previous,
                    generation: Uuid(s.generation),
                };
                engine.attach_with_cbt(d.dev.into(), &state).map_err(CliError::from)?;
            }
        }
        let journal = OpenOptions::new()
            .read(true)
            .append(true)
            .open(dir.join("journal.bin"))
            .map_err(io_err("in-process: journal"))?;
        let mut s = Session { cfg, engine, file, members: HashMap::new(), journal, _lock: lock };
        s.replay()?;
        s.sync()?;
        Ok(s)
    }

    fn replay(&mut self) -> Result<(), CliError> {
        let file = self.journal.try_clone().map_err(io_err("in-process: journal"))?;
        let mut r = BufReader::new(file);
        loop {
            let body = match blksnap_proto::read_frame(&mut r) {
                Ok(Some(b)) => b,
                Ok(None) => return Ok(()),
                Err(e) => return Err(CliError::io("in-process: journal", &e)),
            };
            let entry: Entry = blksnap_proto::decode(&body)
                .map_err(|_| CliError::new(libc::EPROTO, "in-process: journal entry malformed"))?;
            match entry {
                Entry::Req { req, storage_len } => {
                    let _ = self.dispatch(req, storage_len);
                }
                Entry::Write { dev, offset, data } => {
                    let _ = self.engine.write(dev.into(), offset, &data);
                }
            }
        }
    }

    fn log(&mut self, entry: &Entry) -> Result<(), CliError> {
        let bytes = blksnap_proto::encode(entry).map_err(CliError::from)?;
        self.journal.write_all(&bytes).map_err(io_err("in-process: journal"))
    }

    /// Writes what changed in each backing since the engine last saw it through the engine.
    fn sync(&mut self) -> Result<(), CliError> {
        for d in &self.cfg.devices {
            let backing = File::open(&d.backing).map_err(io_err("in-process: backing"))?;
            let cap = self.engine.disk_capacity_bytes(d.dev.into()).map_err(CliError::from)?;
            let mut mine = vec![0u8; SYNC_RUN];
            let mut theirs = vec![0u8; SYNC_RUN];
            let mut off = 0u64;
            let mut writes = Vec::new();
            while off < cap {
                let n = (cap - off).min(SYNC_RUN as u64) as usize;
                read_full(&backing, &mut theirs[..n], off)?;
                self.engine.read(d.dev.into(), off, &mut mine[..n]).map_err(CliError::from)?;
                if mine[..n] != theirs[..n] {
                    let mut run: Option<(usize, usize)> = None;
                    for b in (0..n).step_by(SYNC_BLOCK) {
                        let e = (b + SYNC_BLOCK).min(n);
                        if mine[b..e] != theirs[b..e] {
                            run = Some(run.map_or((b, e), |(s, _)| (s, e)));
                        } else if let Some((s, e)) = run.take() {
                            writes.push((off + s as u64, theirs[s..e].to_vec()));
                        }
                    }
                    if let Some((s, e)) = run {
                        writes.push((off + s as u64, theirs[s..e].to_vec()));
                    }
                }
                off += n as u64;
            }
            for (offset, data) in writes {
                // The result is the engine's (a failing COW corrupts the snapshot as it would
                // under a real write); the data reaches the device either way.
                let _ = self.engine.write(d.dev.into(), offset, &data);
                self.log(&Entry::Write { dev: d.dev, offset, data })?;
            }
        }
        Ok(())
    }

    fn image_path(&self, dev: Dev) -> PathBuf {
        self.cfg.state.join("images").join(format!("blksnap-{}-{}", dev.major, dev.minor))
    }

    fn request(&mut self, req: Request) -> Result<Reply, CliError> {
        let read_only = matches!(
            req,
            Request::Version
                | Request::ListDevices
                | Request::CbtInfo { .. }
                | Request::CbtMap { .. }
                | Request::SnapshotCollect
                | Request::SnapshotInfo { .. }
                | Request::StorageStats { .. }
        );
        let destroyed = match &req {
            Request::SnapshotDestroy { id } => self.members.get(&(*id).into()).cloned(),
            _ => None,
        };
        let (result, storage_len) = self.dispatch(req.clone(), None);
        let keep = match &result {
            Ok(_) => !read_only,
            // a wait that timed out moved the (manual) clock
            Err(e) => matches!(req, Request::WaitEvent { .. }) && e.errno == Errno::ENOENT,
        };
        if keep {
            self.log(&Entry::Req { req: req.clone(), storage_len })?;
        }
        match (&req, &result) {
            (Request::SnapshotTake { id }, Ok(_)) => {
                let members = self.members.get(&(*id).into()).cloned().unwrap_or_default();
                for m in members {
                    self.materialize(m)?;
                }
            }
            (Request::SnapshotDestroy { .. }, Ok(_)) => {
                for m in destroyed.unwrap_or_default() {
                    let _ = std::fs::remove_file(self.image_path(m));
                }
            }
            _ => {}
        }
        result.map_err(CliError::from)
    }

    /// Writes the image of `dev` (just taken) to its file.
    fn materialize(&self, dev: Dev) -> Result<(), CliError> {
        let path = self.image_path(dev);
        let tmp = path.with_extension("tmp");
        let f = File::create(&tmp).map_err(io_err("in-process: image file"))?;
        let cap = self.engine.disk_capacity_bytes(dev.into()).map_err(CliError::from)?;
        f.set_len(cap).map_err(io_err("in-process: image file"))?;
        let mut buf = vec![0u8; SYNC_RUN];
        let mut off = 0;
        while off < cap {
            let n = (cap - off).min(SYNC_RUN as u64) as usize;
            if self.engine.image_read(dev.into(), off, &mut buf[..n]).is_err() {
                let _ = std::fs::remove_file(&tmp);
                return Ok(()); // corrupted right away: no image to read
            }
            if buf[..n].iter().any(|b| *b != 0) {
                f.write_all_at(&buf[..n], off).map_err(io_err("in-process: image file"))?;
            }
            off += n as u64;
        }
        std::fs::rename(&tmp, &path).map_err(io_err("in-process: image file"))
    }

    fn dispatch(
        &mut self,
        req: Request,
        replay_len: Option<u64>,
    ) -> (Result<Reply, Error>, Option<u64>) {
        let mut opened = None;
        let r = self.dispatch_inner(req, replay_len, &mut opened);
        (r, opened)
    }

    fn dispatch_inner(
        &mut self,
        req: Request,
        replay_len: Option<u64>,
        opened: &mut Option<u64>,
    ) -> Result<Reply, Error> {
        let e = &self.engine;
        Ok(match req {
            Request::Version => Reply::Version {
                protocol: PROTOCOL_VERSION,
                daemon: format!("blksnap in-process engine {}", env!("CARGO_PKG_VERSION")),
            },
            Request::ListDevices => {
                let mut out = Vec::new();
                for d in &self.cfg.devices {
                    let capacity_bytes = e.disk_capacity_bytes(d.dev.into())?;
                    out.push(DeviceEntry {
                        dev: d.dev,
                        role: Role::Origin,
                        path: d.path.clone(),
                        backing: d.backing.display().to_string(),
                        capacity_bytes,
                    });
                    if e.snapshot_info(d.dev.into()).is_ok_and(|i| i.image.is_some()) {
                        out.push(DeviceEntry {
                            dev: d.dev,
                            role: Role::Image { of: d.dev },
                            path: self.image_path(d.dev).display().to_string(),
                            backing: String::new(),
                            capacity_bytes,
                        });
                    }
                }
                Reply::Devices(out)
            }
            req @ (Request::Attach { .. }
            | Request::Detach { .. }
            | Request::CbtInfo { .. }
            | Request::CbtMap { .. }
            | Request::CbtDirty { .. }
            | Request::SnapshotCollect
            | Request::WaitEvent { .. }
            | Request::StorageStats { .. }) => crate::daemon::engine_reply(e, req)?,
            Request::SnapshotCreate { storage } => {
                let spec = match storage {
                    Storage::Ranges => StorageSpec::Ranges,
                    Storage::File { path, limit_sectors } => {
                        let backend = open_storage(&path, replay_len, Some(limit_sectors))?;
                        *opened = Some(backend.len_bytes());
                        StorageSpec::File { backend, limit_sectors }
                    }
                };
                let id = e.snapshot_create(spec)?;
                self.members.insert(id, Vec::new());
                Reply::Created(id.into())
            }
            Request::SnapshotAppend { id, path, ranges } => {
                let backend = open_storage(&path, replay_len, None)?;
                *opened = Some(backend.len_bytes());
                let r: Vec<SectorRange> = ranges.into_iter().map(Into::into).collect();
                e.snapshot_append_storage(id.into(), backend, &r)?;
                Reply::Done
            }
            Request::SnapshotAdd { id, dev } => {
                e.snapshot_add(id.into(), dev.into())?;
                self.members.entry(id.into()).or_default().push(dev);
                Reply::Done
            }
            Request::SnapshotTake { id } => {
                e.snapshot_take(id.into())?;
                Reply::Done
            }
            Request::SnapshotDestroy { id } => {
                e.snapshot_destroy(id.into())?;
                self.members.remove(&id.into());
                Reply::Done
            }
            Request::SnapshotInfo { dev } => {
                let info = e.snapshot_info(dev.into())?;
                let image_path =
                    info.image.map(|o| self.image_path(o.into()).display().to_string());
                Reply::SnapshotInfo {
                    error_code: info.error_code,
                    image: info.image.map(Into::into),
                    image_path,
                }
            }
            Request::AddDevice { .. } | Request::RemoveDevice { .. } => {
                return Err(Error::new(
                    Errno::EOPNOTSUPP,
                    "in-process devices come from the configuration",
                ))
            }
            Request::DevRead { .. }
            | Request::DevWrite { .. }
            | Request::DevDiscard { .. }
            | Request::DevWriteZeroes { .. }
            | Request::DevFlush { .. } => {
                return Err(Error::new(
                    Errno::EOPNOTSUPP,
                    "in-process, the devices' data is in their backing files",
                ))
            }
            // The in-process backend opens paths as its caller (no daemon between them).
            Request::SnapshotCreateFd { .. }
            | Request::SnapshotAppendFd { .. }
            | Request::AddDeviceFd { .. } => {
                return Err(Error::new(Errno::EINVAL, "descriptors go to the daemon only"))
            }
        })
    }

    /// Folds the journal into a new base when no snapshot is left, then releases the lock.
    fn close(mut self) -> Result<(), CliError> {
        let dir = self.cfg.state.clone();
        let journal_len = self.journal.metadata().map_or(0, |m| m.len());
        if journal_len == 0 || !self.engine.snapshot_collect().is_empty() {
            return Ok(());
        }
        for (i, d) in self.cfg.devices.iter().enumerate() {
            let id: DeviceId = d.dev.into();
            let cap = self.engine.disk_capacity_bytes(id).map_err(CliError::from)?;
            let tmp = dir.join(format!("base-{i}.tmp"));
            let f = File::create(&tmp).map_err(io_err("in-process: base image"))?;
            f.set_len(cap).map_err(io_err("in-process: base image"))?;
            let mut buf = vec![0u8; SYNC_RUN];
            let mut off = 0;
            while off < cap {
                let n = (cap - off).min(SYNC_RUN as u64) as usize;
                self.engine.read(id, off, &mut buf[..n]).map_err(CliError::from)?;
                if buf[..n].iter().any(|b| *b != 0) {
                    f.write_all_at(&buf[..n], off).map_err(io_err("in-process: base image"))?;
                }
                off += n as u64;
            }
            std::fs::rename(&tmp, dir.join(format!("base-{i}.img")))
                .map_err(io_err("in-process: base image"))?;
            let cbt_path = dir.join(format!("cbt-{i}.bin"));
            match self.engine.cbt_export(id) {
                Ok(s) => {
                    let saved = SavedCbt {
                        block_shift: s.block_shift,
                        capacity_sectors: s.capacity_sectors,
                        write_map: s.write_map,
                        read_map: s.read_map,
                        active: s.active,
                        previous: s.previous,
                        generation: s.generation.0,
                    };
                    let bytes = postcard::to_stdvec(&saved)
                        .map_err(|_| CliError::invalid("in-process: cannot encode a CBT"))?;
                    let tmp = cbt_path.with_extension("tmp");
                    std::fs::write(&tmp, bytes).map_err(io_err("in-process: save CBT"))?;
                    std::fs::rename(&tmp, &cbt_path).map_err(io_err("in-process: save CBT"))?;
                }
                Err(_) => {
                    let _ = std::fs::remove_file(&cbt_path);
                }
            }
        }
        self.file.seed = splitmix(self.file.seed);
        write_json(&dir.join("session.json"), &self.file)?;
        self.journal.set_len(0).map_err(io_err("in-process: journal"))?;
        Ok(())
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), CliError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err("in-process: session file"))?;
    let text = serde_json::to_vec_pretty(value)
        .map_err(|e| CliError::invalid(format!("in-process: session file: {e}")))?;
    f.write_all(&text).map_err(io_err("in-process: session file"))?;
    std::fs::rename(&tmp, path).map_err(io_err("in-process: session file"))
}

/// Opens a difference storage as `blksnapd` does (a file or block device as it is, a directory →
/// an unnamed file in it). In a replay a storage that is gone is stood in for by memory of the
/// recorded size (its content no longer matters: the snapshot it served is gone).
fn open_storage(
    path: &str,
    replay_len: Option<u64>,
    limit_sectors: Option<u64>,
) -> Result<EngineDev, Error> {
    // No daemon configuration here: the daemon's default rule (direct I/O on block devices).
    let direct = crate::daemon::backing_io::DirectIo::Auto;
    match crate::daemon::open_storage(path, direct) {
        Ok(f) => Ok(Arc::new(f)),
        Err(e) => match replay_len {
            Some(len) => Ok(Arc::new(match limit_sectors {
                Some(l) => MemDev::growable(len, l.saturating_mul(512)),
                None => MemDev::new(len),
            })),
            None => Err(e),
        },
    }
}
