//! Backends, engines and the disk states the measurements switch between.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use blksnap_engine::io::{BlockDev, Dev, FileDev, MemDev};
use blksnap_engine::{Clock, Engine, EngineConfig, StorageSpec};
use blksnap_model::formulas::{chunk_layout, ChunkLayout};
use blksnap_model::{DeviceId, Params, Result, SnapshotId};

use crate::util::{Rng, GIB, MIB};

/// Minimum I/O size of every bench disk: 4 KiB, so chunks are the default 256 KiB.
pub const IO_MIN_SECTORS: u64 = 8;

/// Which backend a measurement runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `MemDev`: sharded memory, 1 MiB segments (sparse ones: 1 GiB segments).
    Mem,
    /// `FileDev`: pread/pwrite on files in a temporary directory (page cache).
    File,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Mem, Kind::File];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Mem => "MemDev",
            Kind::File => "FileDev",
        }
    }
}

/// Where file backends live; every file is unlinked right after creation, so it vanishes when
/// its last handle is dropped.
pub struct Env {
    dir: tempfile::TempDir,
    seq: AtomicU64,
}

impl Env {
    /// Files go to `$BLKSNAP_BENCH_DIR`, else to `/dev/shm` when it has room for `need_bytes`
    /// (tmpfs: the file API without a disk's or a journal's noise), else to the temp dir.
    pub fn new(need_bytes: u64) -> std::io::Result<Env> {
        let base = match std::env::var_os("BLKSNAP_BENCH_DIR") {
            Some(d) => PathBuf::from(d),
            None if fs_info(Path::new("/dev/shm")).is_some_and(|f| f.free_bytes >= need_bytes) => {
                PathBuf::from("/dev/shm")
            }
            None => std::env::temp_dir(),
        };
        let dir = tempfile::Builder::new().prefix("blksnap-bench").tempdir_in(base)?;
        Ok(Env { dir, seq: AtomicU64::new(0) })
    }

    /// The directory and its file system, for the report.
    pub fn describe(&self) -> String {
        let fs = fs_info(self.dir.path()).map_or("?", |f| f.kind);
        format!("{} ({fs})", self.dir.path().display())
    }

    fn file(&self, len_bytes: u64) -> Result<FileDev> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.path().join(format!("dev{n}.img"));
        let dev = FileDev::create(&path, len_bytes)?;
        let _ = std::fs::remove_file(&path);
        Ok(dev)
    }

    /// A device of `len_bytes` of zeroes (memory: allocated as written).
    pub fn device(&self, kind: Kind, len_bytes: u64) -> Result<Dev> {
        Ok(match kind {
            Kind::Mem => Arc::new(MemDev::new(len_bytes)),
            Kind::File => Arc::new(self.file(len_bytes)?),
        })
    }

    /// A sparse device for huge capacities (memory: 1 GiB segments, so a 16 TiB table is
    /// 16 Ki entries).
    pub fn sparse(&self, kind: Kind, len_bytes: u64) -> Result<Dev> {
        Ok(match kind {
            Kind::Mem => Arc::new(MemDev::with_segment_bytes(len_bytes, None, GIB)?),
            Kind::File => Arc::new(self.file(len_bytes)?),
        })
    }

    /// An empty, growable difference storage of at most `max_bytes`.
    pub fn storage(&self, kind: Kind, max_bytes: u64) -> Result<Dev> {
        Ok(match kind {
            Kind::Mem => Arc::new(MemDev::growable(0, max_bytes)),
            Kind::File => Arc::new(self.file(0)?),
        })
    }
}

pub fn engine(params: Params) -> Engine {
    Engine::new(EngineConfig::new(params, Some(0xb1a5), Clock::monotonic()))
        .expect("valid parameters")
}

pub fn layout(params: &Params, disk_bytes: u64) -> ChunkLayout {
    chunk_layout(params, disk_bytes >> 9, IO_MIN_SECTORS)
}

/// Writes non-zero data over the whole device (allocates every memory segment and every file
/// block before anything is timed).
pub fn fill(dev: &Dev, seed: u64) -> Result<()> {
    let mut rng = Rng::new(seed);
    let block = rng.bytes(MIB as usize);
    let len = dev.len_bytes();
    let mut off = 0;
    while off < len {
        let n = (len - off).min(MIB) as usize;
        dev.write_at(&block[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// One disk in one engine, moved between the states the measurements compare.
pub struct Rig<'a> {
    pub env: &'a Env,
    pub kind: Kind,
    pub engine: Engine,
    pub dev: DeviceId,
    pub disk: Dev,
    pub disk_bytes: u64,
    attached: bool,
    snapshot: Option<SnapshotId>,
    /// The difference storage of the current snapshot.
    pub storage: Option<Dev>,
}

impl<'a> Rig<'a> {
    /// A filled disk of `disk_bytes`, registered, not attached.
    pub fn new(env: &'a Env, kind: Kind, disk_bytes: u64, params: Params) -> Result<Rig<'a>> {
        let disk = env.device(kind, disk_bytes)?;
        fill(&disk, 7)?;
        Rig::on(env, kind, disk, params)
    }

    /// A disk served from `disk` (which another rig may serve too), registered, not attached.
    pub fn on(env: &'a Env, kind: Kind, disk: Dev, params: Params) -> Result<Rig<'a>> {
        let disk_bytes = disk.len_bytes();
        let engine = engine(params);
        let dev = DeviceId::new(251, 0);
        engine.add_disk(dev, disk.clone(), IO_MIN_SECTORS)?;
        Ok(Rig {
            env,
            kind,
            engine,
            dev,
            disk,
            disk_bytes,
            attached: false,
            snapshot: None,
            storage: None,
        })
    }

    pub fn drop_snapshot(&mut self) -> Result<()> {
        if let Some(id) = self.snapshot.take() {
            self.engine.snapshot_destroy(id)?;
        }
        self.storage = None;
        Ok(())
    }

    /// No tracker, no snapshot: pass-through.
    pub fn detached(&mut self) -> Result<()> {
        self.drop_snapshot()?;
        if self.attached {
            self.engine.detach(self.dev)?;
            self.attached = false;
        }
        Ok(())
    }

    /// Tracker attached, no snapshot.
    pub fn tracking(&mut self) -> Result<()> {
        self.drop_snapshot()?;
        if !self.attached {
            self.engine.attach(self.dev)?;
            self.attached = true;
        }
        Ok(())
    }

    /// A fresh snapshot taken (every chunk New), storage of the same kind as the disk.
    pub fn taken(&mut self) -> Result<SnapshotId> {
        self.tracking()?;
        let limit_bytes = 2 * self.disk_bytes.max(GIB);
        let storage = self.env.storage(self.kind, limit_bytes)?;
        let id = self.engine.snapshot_create(StorageSpec::File {
            backend: storage.clone(),
            limit_sectors: limit_bytes >> 9,
        })?;
        self.storage = Some(storage);
        self.engine.snapshot_add(id, self.dev)?;
        self.engine.snapshot_take(id)?;
        self.snapshot = Some(id);
        Ok(id)
    }
}

/// Free space and type of the file system holding `path`.
pub struct FsInfo {
    pub free_bytes: u64,
    pub kind: &'static str,
}

pub fn fs_info(path: &Path) -> Option<FsInfo> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `statfs` is plain old data, for which all-zero bytes are a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a writable `statfs` that outlives the call.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let kind = match st.f_type as i64 {
        0x0102_1994 => "tmpfs",
        0xef53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683e => "btrfs",
        0x6969 => "nfs",
        0x794c_7630 => "overlayfs",
        _ => "other file system",
    };
    Some(FsInfo { free_bytes: st.f_bavail as u64 * st.f_bsize as u64, kind })
}

/// A device wrapper that counts reads (proves that full-chunk image writes skip the origin).
pub struct CountingDev {
    pub inner: Dev,
    pub reads: AtomicU64,
}

impl BlockDev for CountingDev {
    fn len_bytes(&self) -> u64 {
        self.inner.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<()> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.read_at(buf, offset_bytes)
    }
    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> Result<()> {
        self.inner.write_at(buf, offset_bytes)
    }
    fn write_zeroes_at(&self, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        self.inner.write_zeroes_at(offset_bytes, len_bytes)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
}
