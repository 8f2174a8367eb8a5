//! `blksnap-vmtest`: end-to-end scenarios of blksnapd on a kernel with the ublk driver (run
//! inside the VM by `service/vm/ublk-vm.sh`, see README.md "VM tests"). Each scenario runs as a
//! child process of this one with its own timeout; each starts the service in-process (engine,
//! ublk devices, control socket) and drives it only through the control socket, the block
//! devices and busybox (mke2fs, mount) / e2fsck, as a host would. No scenario freezes a filesystem
//! itself: TAKE through the daemon does (`blksnap_service::freeze`), as the kernel module does.
//!
//! Usage: `blksnap-vmtest [--require-ublk] [--timeout S] [SCENARIO...]`; without names every
//! scenario runs. On a host without `/dev/ublk-control` it skips (exit 0, nothing counted as
//! passed) unless `--require-ublk`, which makes that a failure.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blksnap_engine::{Engine, EngineConfig};
use blksnap_proto::{Dev, EventKindW, Id, Reply, Request, Role, Storage};
use blksnap_service::ublk::{available, UblkFrontend};
use blksnap_service::{Client, Config, ControlServer, Daemon};

type R<T = ()> = Result<T, String>;

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

// Scenarios in their own files under vmtest/ (declared after `ensure!`, which they use; a
// binary crate root resolves `mod` beside itself, hence the paths).
#[path = "vmtest/exclusive_claim.rs"]
mod exclusive_claim;
#[path = "vmtest/offline_write.rs"]
mod offline_write;
#[path = "vmtest/remove_busy.rs"]
mod remove_busy;
#[path = "vmtest/restart_mounted.rs"]
mod restart_mounted;
#[path = "vmtest/take_freezes.rs"]
mod take_freezes;
#[path = "vmtest/take_rollback.rs"]
mod take_rollback;

struct Scenario {
    name: &'static str,
    about: &'static str,
    run: fn(&Env) -> R,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "fs-image",
        about: "ext2 on a tracked device, take, overwrite/delete, image has the pre-take files",
        run: fs_image,
    },
    Scenario {
        name: "cbt",
        about: "cbtmap marks every block written after a take, and nothing else",
        run: cbt,
    },
    Scenario {
        name: "overflow",
        about: "tiny diff storage: origin intact, corrupted event, image reads fail with EIO",
        run: overflow,
    },
    Scenario {
        name: "destroy-mounted",
        about: "destroy while the image is mounted and written; origin keeps being served",
        run: destroy_mounted,
    },
    Scenario {
        name: "two-devices",
        about: "two devices taken in one snapshot are coherent",
        run: two_devices,
    },
    Scenario {
        name: "bench",
        about: "4 KiB O_DIRECT throughput vs the kernel loop driver (printed, not asserted)",
        run: bench,
    },
    Scenario {
        name: "daemon-process",
        about: "the blksnapd binary: config by flags, socket, take, clean stop on SIGTERM",
        run: daemon_process,
    },
    Scenario {
        name: "restart",
        about: "CBT kept across a clean restart; corrupted state or kill -9: new generation",
        run: restart,
    },
    Scenario {
        name: "c-clients",
        about:
            "the C/C++ lifecycle clients of ffi/tests-c, unchanged, in client mode against blksnapd",
        run: c_clients,
    },
    Scenario {
        name: "cli-backup",
        about: "README's session with the blksnap CLI: /dev/blksnap-* images, full + incremental, restores",
        run: cli_backup,
    },
    Scenario {
        name: "stretch",
        about: "stretch_snapshot grows v3 storage on demand while the mounted origin is written",
        run: stretch,
    },
    Scenario {
        name: "preload-daemon",
        about: "an upstream-style raw-ioctl client under the LD_PRELOAD shim against blksnapd",
        run: preload_daemon,
    },
    Scenario {
        name: "take-freezes",
        about: "ext4 files written just before the take, no sync, no manual freeze: all in the image",
        run: take_freezes::take_freezes,
    },
    Scenario {
        name: "exclusive-claim",
        about: "a served block device cannot be mounted directly; a file by any path is one origin",
        run: exclusive_claim::exclusive_claim,
    },
    Scenario {
        name: "offline-write",
        about: "a backing written while blksnapd is down gets a new CBT generation; a clean gap does not",
        run: offline_write::offline_write,
    },
    Scenario {
        name: "take-rollback",
        about: "a take whose image device cannot be served leaves no half-taken snapshot",
        run: take_rollback::take_rollback,
    },
    Scenario {
        name: "remove-busy",
        about: "RemoveDevice of a mounted or exclusively held origin: EBUSY, nothing changed",
        run: remove_busy::remove_busy,
    },
    Scenario {
        name: "restart-mounted",
        about: "blksnapd --keep-devices restarted under a mounted, written ext4: mount, data, CBT kept",
        run: restart_mounted::restart_mounted,
    },
    Scenario {
        name: "recovery",
        about: "kill -9 during writes to a mounted fs, restart recovers the device: data intact",
        run: recovery,
    },
];

// ---------------------------------------------------------------------------------- helpers

/// A test environment: backing files, an in-process daemon serving them, a client.
struct Env {
    dir: PathBuf,
    daemon: Arc<Daemon>,
    socket: PathBuf,
}

const MIB: u64 = 1 << 20;

impl Env {
    fn new(name: &str, sizes: &[u64]) -> R<Env> {
        let dir = PathBuf::from(format!("/tmp/{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let socket = dir.join("control");
        let mut cfg = Config { socket: socket.clone(), queues: Some(2), ..Config::default() };
        cfg.queue_depth = 32;
        let engine = Arc::new(Engine::new(EngineConfig::default()).map_err(|e| format!("{e:?}"))?);
        let frontend =
            UblkFrontend { queues: 2, depth: cfg.queue_depth, io_buf_bytes: cfg.io_buf_bytes };
        let daemon = Arc::new(Daemon::new(engine, Box::new(frontend), cfg));
        let server = ControlServer::bind(&socket, None).map_err(|e| e.to_string())?;
        let d = daemon.clone();
        std::thread::spawn(move || server.serve(d));
        for (i, size) in sizes.iter().enumerate() {
            let backing = dir.join(format!("backing{i}.img"));
            sparse_file(&backing, *size)?;
            daemon.add_origin(&backing, true).map_err(|e| format!("add_origin: {e:?}"))?;
        }
        Ok(Env { dir, daemon, socket })
    }

    fn client(&self) -> R<Client> {
        Client::connect(&self.socket).map_err(|e| format!("connect: {e}"))
    }

    /// Origins in order of creation: (block device node, MAJ:MIN).
    fn origins(&self) -> R<Vec<(String, Dev)>> {
        let Reply::Devices(list) = self.client()?.req(Request::ListDevices)? else {
            return Err("ListDevices: unexpected reply".into());
        };
        let mut o: Vec<_> = list
            .into_iter()
            .filter(|d| d.role == Role::Origin)
            .map(|d| (d.backing.clone(), d.path, d.dev))
            .collect();
        o.sort();
        Ok(o.into_iter().map(|(_, p, d)| (p, d)).collect())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Creates a snapshot on a new storage file of `mib` MiB (limit = size) and adds `devs`.
    fn snapshot(&self, c: &mut Client, mib: u64, devs: &[Dev]) -> R<Id> {
        let storage = self.path("diff.img");
        sparse_file(&storage, mib * MIB)?;
        let Reply::Created(id) = c.req(Request::SnapshotCreate {
            storage: Storage::File {
                path: storage.display().to_string(),
                limit_sectors: mib * MIB / 512,
            },
        })?
        else {
            return Err("SnapshotCreate: unexpected reply".into());
        };
        for dev in devs {
            c.req(Request::SnapshotAdd { id, dev: *dev })?;
        }
        Ok(id)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.daemon.shutdown();
    }
}

fn run(cmd: &str, args: &[&str]) -> R<String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "{cmd} {}: {}: {}", args.join(" "), out.status, text.trim());
    Ok(text)
}

fn mkfs(dev: &str) -> R {
    run("mke2fs", &["-F", "-q", "-b", "4096", dev]).map(drop)
}

fn mount(dev: &str, dir: &Path, opts: &str) -> R {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    run("mount", &["-t", "ext2", "-o", opts, dev, &dir.display().to_string()]).map(drop)
}

fn umount(dir: &Path) -> R {
    run("umount", &[&dir.display().to_string()]).map(drop)
}

fn fsck(dev: &str) -> R {
    run("e2fsck", &["-f", "-n", dev]).map(drop)
}

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn sync() {
    let _ = run("sync", &[]);
}

/// xorshift64* bytes.
fn fill(seed: u64, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn fnv(data: &[u8]) -> u64 {
    data.iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

/// Writes `n` files of varying size under `dir`; returns name → checksum.
fn write_files(dir: &Path, prefix: &str, n: u64, seed: u64) -> R<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for i in 0..n {
        let size = 1024 + ((seed.wrapping_add(i) * 7919) % 257) as usize * 1024;
        let mut data = vec![0u8; size];
        fill(seed * 1000 + i, &mut data);
        let name = format!("{prefix}{i:03}");
        std::fs::write(dir.join(&name), &data).map_err(|e| format!("write {name}: {e}"))?;
        out.insert(name, fnv(&data));
    }
    Ok(out)
}

fn verify_files(dir: &Path, files: &BTreeMap<String, u64>) -> R {
    for (name, sum) in files {
        let data = std::fs::read(dir.join(name)).map_err(|e| format!("read {name}: {e}"))?;
        ensure!(fnv(&data) == *sum, "{name} in {}: checksum differs", dir.display());
    }
    Ok(())
}

/// A page-aligned 4 KiB buffer for O_DIRECT.
#[repr(C, align(4096))]
struct Page([u8; 4096]);

fn open_direct(path: &str, write: bool) -> std::io::Result<File> {
    OpenOptions::new().read(true).write(write).custom_flags(libc::O_DIRECT).open(path)
}

fn pwrite_page(f: &File, offset: u64, content: &[u8]) -> std::io::Result<()> {
    let mut p = Box::new(Page([0; 4096]));
    p.0[..content.len()].copy_from_slice(content);
    f.write_all_at(&p.0, offset)
}

fn pread_page(f: &File, offset: u64) -> std::io::Result<Box<Page>> {
    let mut p = Box::new(Page([0; 4096]));
    f.read_exact_at(&mut p.0, offset)?;
    Ok(p)
}

fn image_link(dev: Dev, v3: bool) -> String {
    if v3 {
        format!("/dev/blksnap-image_{}:{}", dev.major, dev.minor)
    } else {
        format!("/dev/blksnap-{}-{}", dev.major, dev.minor)
    }
}

fn wait_gone(path: &str, secs: u64) -> bool {
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        if !Path::new(path).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A sparse file of `bytes` at `path` (a backing or a storage file).
fn sparse_file(path: &Path, bytes: u64) -> R {
    File::create(path)
        .and_then(|f| f.set_len(bytes))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Runs a test client to completion (stdin closed): its stdout, or an error naming `what` with
/// the exit status and both streams.
fn run_client(mut cmd: Command, what: &str) -> R<String> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("{what}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "{what}: {}:\n{}\n{}", out.status, stdout.trim(), stderr.trim());
    Ok(stdout)
}

/// A file shipped next to this test program (service/vm/run-tests.sh copies each one).
fn sibling(name: &str) -> R<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let path = exe.with_file_name(name);
    ensure!(path.exists(), "{} missing (service/vm/run-tests.sh builds it)", path.display());
    Ok(path)
}

// ---------------------------------------------------------------------------------- scenarios

fn fs_image(env: &Env) -> R {
    let (origin, dev) = env.origins()?.remove(0);
    let mut c = env.client()?;
    mkfs(&origin)?;
    let om = env.path("origin");
    mount(&origin, &om, "rw")?;
    let before = write_files(&om, "f", 40, 1)?;
    let id = env.snapshot(&mut c, 32, &[dev])?;
    c.req(Request::SnapshotTake { id })?;
    // After the take: overwrite half, delete a quarter, add new ones.
    let mut after = write_files(&om, "f", 20, 2)?;
    for i in 20..30 {
        std::fs::remove_file(om.join(format!("f{i:03}"))).map_err(|e| e.to_string())?;
    }
    after.extend(write_files(&om, "new", 10, 3)?);
    sync();
    // The image, through both link names.
    let v3 = image_link(dev, true);
    let newest = image_link(dev, false);
    for l in [&v3, &newest] {
        let target = std::fs::read_link(l).map_err(|e| format!("{l}: {e}"))?;
        ensure!(target.display().to_string().starts_with("/dev/ublkb"), "{l} -> {target:?}");
    }
    let Reply::SnapshotInfo { error_code: 0, image: Some(img), image_path: Some(_) } =
        c.req(Request::SnapshotInfo { dev })?
    else {
        return Err("SnapshotInfo: no image".into());
    };
    ensure!(img == dev, "image of {img:?}");
    fsck(&v3)?;
    let im = env.path("image");
    mount(&v3, &im, "ro")?;
    verify_files(&im, &before)?;
    verify_files(&om, &after)?;
    for i in 30..40 {
        let name = format!("f{i:03}");
        ensure!(before.contains_key(&name), "bookkeeping");
    }
    umount(&im)?;
    c.req(Request::SnapshotDestroy { id })?;
    ensure!(!Path::new(&v3).exists() && !Path::new(&newest).exists(), "links left after destroy");
    // The origin keeps being served after the destroy.
    let more = write_files(&om, "post", 5, 4)?;
    sync();
    umount(&om)?;
    drop_caches();
    fsck(&origin)?;
    mount(&origin, &om, "ro")?;
    verify_files(&om, &after)?;
    verify_files(&om, &more)?;
    umount(&om)?;
    let live = env.daemon.engine().live();
    ensure!(live.snapshots == 0 && live.diff_areas == 0, "engine objects left: {live:?}");
    Ok(())
}

fn cbt(env: &Env) -> R {
    let (origin, dev) = env.origins()?.remove(0);
    let mut c = env.client()?;
    let id1 = env.snapshot(&mut c, 8, &[dev])?;
    c.req(Request::SnapshotTake { id: id1 })?;
    let Reply::CbtInfo(info1) = c.req(Request::CbtInfo { dev })? else {
        return Err("CbtInfo".into());
    };
    let bs = u64::from(info1.block_size_bytes);
    let count = u64::from(info1.block_count);
    ensure!(count > 16, "device too small for the test: {count} blocks of {bs}");
    // Write pages at scattered offsets (some straddling block boundaries when bs > 4 KiB).
    let f = open_direct(&origin, true).map_err(|e| e.to_string())?;
    let capacity = count * bs;
    let mut written = std::collections::BTreeSet::new();
    let mut x = 12345u64;
    for _ in 0..40 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let page = (x >> 33) % (capacity / 4096 / 2); // the first half only
        let off = page * 4096;
        pwrite_page(&f, off, b"cbt").map_err(|e| e.to_string())?;
        written.insert(off / bs);
    }
    f.sync_all().map_err(|e| e.to_string())?;
    c.req(Request::SnapshotDestroy { id: id1 })?;
    let id2 = env.snapshot(&mut c, 8, &[dev])?;
    c.req(Request::SnapshotTake { id: id2 })?;
    let Reply::CbtInfo(info2) = c.req(Request::CbtInfo { dev })? else {
        return Err("CbtInfo".into());
    };
    ensure!(info2.generation_id == info1.generation_id, "generation changed");
    ensure!(info2.changes_number > info1.changes_number, "take did not advance");
    let Reply::CbtMap(map) =
        c.req(Request::CbtMap { dev, offset: 0, length: info2.block_count })?
    else {
        return Err("CbtMap".into());
    };
    for (b, v) in map.iter().enumerate() {
        let b = b as u64;
        if written.contains(&b) {
            ensure!(*v > info1.changes_number, "written block {b} not marked ({v})");
        } else {
            ensure!(*v == 0, "block {b} never written but marked {v}");
        }
    }
    // Out-of-range map requests are refused.
    let r = c.call(Request::CbtMap { dev, offset: 0, length: info2.block_count + 1 });
    ensure!(matches!(r, Ok(Err(ref e)) if e.errno == 61), "cbtmap past the end: {r:?}");
    c.req(Request::SnapshotDestroy { id: id2 })?;
    Ok(())
}

fn overflow(env: &Env) -> R {
    let (origin, dev) = env.origins()?.remove(0);
    let mut c = env.client()?;
    mkfs(&origin)?;
    let om = env.path("origin");
    mount(&origin, &om, "rw")?;
    let before = write_files(&om, "f", 20, 5)?;
    let id = env.snapshot(&mut c, 1, &[dev])?; // 1 MiB: four 256 KiB chunks
    c.req(Request::SnapshotTake { id })?;
    let mut after = write_files(&om, "f", 10, 6)?;
    after.extend(write_files(&om, "big", 8, 7)?);
    sync();
    // The corrupted event (a no-space event may come first).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        ensure!(Instant::now() < deadline, "no corrupted event");
        match c.call(Request::WaitEvent { id, timeout_ms: 1000 }) {
            Ok(Ok(Reply::Event(e))) => {
                if let EventKindW::Corrupted { device, errno } = e.kind {
                    ensure!(device == dev && errno == 28, "corrupted {device:?} errno {errno}");
                    break;
                }
            }
            Ok(Err(e)) if e.errno == 2 => {}
            other => return Err(format!("WaitEvent: {other:?}")),
        }
    }
    let Reply::SnapshotInfo { error_code, .. } = c.req(Request::SnapshotInfo { dev })? else {
        return Err("SnapshotInfo".into());
    };
    ensure!(error_code == -28, "snapshot error code {error_code}");
    let img = open_direct(&image_link(dev, false), false).map_err(|e| e.to_string())?;
    let r = pread_page(&img, 0);
    ensure!(
        matches!(&r, Err(e) if e.raw_os_error() == Some(libc::EIO)),
        "image read after overflow: {:?}",
        r.map(|_| ())
    );
    drop(img);
    // The origin is intact.
    let mut expect = before.clone();
    expect.extend(after);
    verify_files(&om, &expect)?;
    umount(&om)?;
    drop_caches();
    fsck(&origin)?;
    mount(&origin, &om, "ro")?;
    verify_files(&om, &expect)?;
    umount(&om)?;
    c.req(Request::SnapshotDestroy { id })?;
    Ok(())
}

fn destroy_mounted(env: &Env) -> R {
    let (origin, dev) = env.origins()?.remove(0);
    let mut c = env.client()?;
    mkfs(&origin)?;
    let om = env.path("origin");
    mount(&origin, &om, "rw")?;
    let before = write_files(&om, "f", 10, 8)?;
    let id = env.snapshot(&mut c, 32, &[dev])?;
    c.req(Request::SnapshotTake { id })?;
    let image = image_link(dev, true);
    let image_node = std::fs::read_link(&image).map_err(|e| e.to_string())?;
    let im = env.path("image");
    mount(&image, &im, "rw")?;
    let stop = Arc::new(AtomicBool::new(false));
    let image_ok = Arc::new(AtomicU64::new(0));
    // Image writer: new files with fsync until an error.
    let (s, ok, dir) = (stop.clone(), image_ok.clone(), im.clone());
    let image_writer = std::thread::spawn(move || -> Option<String> {
        let mut i = 0u64;
        while !s.load(Ordering::Relaxed) {
            let mut data = vec![0u8; 64 << 10];
            fill(i, &mut data);
            let r = File::create(dir.join(format!("w{i}")))
                .and_then(|mut f| f.write_all(&data).and_then(|()| f.sync_all()));
            if let Err(e) = r {
                return Some(e.to_string());
            }
            ok.fetch_add(1, Ordering::Relaxed);
            i += 1;
        }
        None
    });
    // Origin writer: the origin must keep working throughout.
    let (s, dir) = (stop.clone(), om.clone());
    let origin_writer = std::thread::spawn(move || -> R<BTreeMap<String, u64>> {
        let mut all = BTreeMap::new();
        let mut round = 0;
        while !s.load(Ordering::Relaxed) {
            // a few names rewritten in turn: the file system never fills up
            all.extend(write_files(&dir, &format!("o{}_", round % 4), 3, 100 + round)?);
            File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| e.to_string())?;
            round += 1;
        }
        Ok(all)
    });
    std::thread::sleep(Duration::from_millis(1500));
    ensure!(image_ok.load(Ordering::Relaxed) > 0, "the image writer made no progress");
    let t = Instant::now();
    c.req(Request::SnapshotDestroy { id })?;
    let destroy_ms = t.elapsed().as_millis();
    // The image writer fails from now on.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !image_writer.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(image_writer.is_finished(), "image writer still running 20 s after destroy");
    let image_err = image_writer.join().map_err(|_| "image writer panicked")?;
    ensure!(image_err.is_some(), "image writes kept succeeding after destroy");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let origin_files = origin_writer.join().map_err(|_| "origin writer panicked")??;
    ensure!(!Path::new(&image).exists(), "image link left after destroy");
    let _ = run("umount", &["-l", &im.display().to_string()]);
    ensure!(
        wait_gone(&format!("/sys/block/{}", image_node.file_name().unwrap().display()), 10),
        "image block device still present after unmount"
    );
    let listed = env.origins()?.len();
    let Reply::Devices(all) = c.req(Request::ListDevices)? else { return Err("list".into()) };
    ensure!(all.len() == listed, "image still listed: {all:?}");
    let live = env.daemon.engine().live();
    ensure!(
        live.snapshots == 0 && live.diff_areas == 0 && live.diff_storages == 0,
        "engine objects left: {live:?}"
    );
    verify_files(&om, &before)?;
    verify_files(&om, &origin_files)?;
    umount(&om)?;
    drop_caches();
    fsck(&origin)?;
    println!(
        "    destroy took {destroy_ms} ms; image writer stopped by: {}",
        image_err.unwrap_or_default()
    );
    Ok(())
}

fn two_devices(env: &Env) -> R {
    let o = env.origins()?;
    let (a, b) = (&o[0], &o[1]);
    let mut c = env.client()?;
    let fa = Arc::new(open_direct(&a.0, true).map_err(|e| e.to_string())?);
    let fb = Arc::new(open_direct(&b.0, true).map_err(|e| e.to_string())?);
    for f in [&fa, &fb] {
        pwrite_page(f, MIB, b"BEFORE").map_err(|e| e.to_string())?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (s, wa, wb) = (stop.clone(), fa.clone(), fb.clone());
    let writer = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut n = 0u64;
        while !s.load(Ordering::Relaxed) {
            n += 1;
            pwrite_page(&wa, 0, &n.to_le_bytes())?;
            pwrite_page(&wb, 0, &n.to_le_bytes())?;
        }
        Ok(n)
    });
    std::thread::sleep(Duration::from_millis(500));
    let id = env.snapshot(&mut c, 8, &[a.1, b.1])?;
    c.req(Request::SnapshotTake { id })?;
    for f in [&fa, &fb] {
        pwrite_page(f, MIB, b"AFTER").map_err(|e| e.to_string())?;
        pwrite_page(f, 2 * MIB, b"AFTER").map_err(|e| e.to_string())?;
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let last = writer.join().map_err(|_| "writer panicked")?.map_err(|e| e.to_string())?;
    let ia = open_direct(&image_link(a.1, false), false).map_err(|e| e.to_string())?;
    let ib = open_direct(&image_link(b.1, true), false).map_err(|e| e.to_string())?;
    let seq = |f: &File| -> R<u64> {
        let p = pread_page(f, 0).map_err(|e| e.to_string())?;
        Ok(u64::from_le_bytes(p.0[..8].try_into().expect("8 bytes")))
    };
    let (sa, sb) = (seq(&ia)?, seq(&ib)?);
    ensure!(sa >= 1 && sa < last, "image A sequence {sa} (writer reached {last})");
    ensure!(sa == sb || sa == sb + 1, "images incoherent: A has {sa}, B has {sb}");
    for (name, f) in [("A", &ia), ("B", &ib)] {
        let p = pread_page(f, MIB).map_err(|e| e.to_string())?;
        ensure!(&p.0[..6] == b"BEFORE", "image {name}: marker written before the take missing");
        let p = pread_page(f, 2 * MIB).map_err(|e| e.to_string())?;
        ensure!(p.0.iter().all(|b| *b == 0), "image {name}: marker written after the take present");
    }
    let (ra, rb) = (seq(&fa)?, seq(&fb)?);
    ensure!(ra == last && rb == last, "origins: {ra} {rb}, writer {last}");
    drop((ia, ib));
    c.req(Request::SnapshotDestroy { id })?;
    println!("    images at sequence {sa}/{sb}, writer reached {last}");
    Ok(())
}

fn daemon_process(env: &Env) -> R {
    // `env` has no devices: this scenario runs the real binary.
    let bin = sibling("blksnapd")?;
    let backing = env.path("d.img");
    sparse_file(&backing, 16 * MIB)?;
    let socket = env.path("d.sock");
    let links = env.path("links");
    std::fs::create_dir_all(&links).map_err(|e| e.to_string())?;
    let mut child = Command::new(&bin)
        .args(["--socket", &socket.display().to_string()])
        .args(["--link-dir", &links.display().to_string(), "--image-link", "newest"])
        .args(["--queues", "1", "--device", &backing.display().to_string()])
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let result = (|| -> R {
        let t = Instant::now();
        let mut c = loop {
            if let Ok(c) = Client::connect(&socket) {
                break c;
            }
            ensure!(t.elapsed() < Duration::from_secs(20), "blksnapd did not come up");
            std::thread::sleep(Duration::from_millis(50));
        };
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&socket).map_err(|e| e.to_string())?.permissions(),
        );
        ensure!(mode & 0o777 == 0o600, "socket mode {mode:o}");
        let Reply::Version { protocol, .. } = c.req(Request::Version)? else {
            return Err("Version".into());
        };
        ensure!(protocol == blksnap_proto::PROTOCOL_VERSION, "protocol {protocol}");
        let Reply::Devices(list) = c.req(Request::ListDevices)? else {
            return Err("ListDevices".into());
        };
        ensure!(list.len() == 1, "devices: {list:?}");
        let (node, dev) = (list[0].path.clone(), list[0].dev);
        let f = open_direct(&node, true).map_err(|e| e.to_string())?;
        pwrite_page(&f, 0, b"one").map_err(|e| e.to_string())?;
        let storage = env.path("d.diff");
        sparse_file(&storage, 4 * MIB)?;
        let Reply::Created(id) = c.req(Request::SnapshotCreate {
            storage: Storage::File {
                path: storage.display().to_string(),
                limit_sectors: 4 * MIB / 512,
            },
        })?
        else {
            return Err("create".into());
        };
        c.req(Request::SnapshotAdd { id, dev })?;
        c.req(Request::SnapshotTake { id })?;
        pwrite_page(&f, 0, b"two").map_err(|e| e.to_string())?;
        let link = links.join(format!("blksnap-{}-{}", dev.major, dev.minor));
        let img = open_direct(&link.display().to_string(), false).map_err(|e| e.to_string())?;
        let p = pread_page(&img, 0).map_err(|e| e.to_string())?;
        ensure!(&p.0[..3] == b"one", "image content");
        drop((img, f));
        // SIGTERM: clean stop while a snapshot is taken.
        // SAFETY: plain kill(2) of our own child by its pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
                break s;
            }
            ensure!(t.elapsed() < Duration::from_secs(20), "blksnapd did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        };
        ensure!(status.success(), "blksnapd exit: {status}");
        ensure!(!socket.exists() && !link.exists(), "socket or link left behind");
        ensure!(wait_gone(&node, 10), "{node} left behind");
        let mut data = vec![0u8; 3];
        File::open(&backing)
            .and_then(|mut f| f.read_exact(&mut data))
            .map_err(|e| e.to_string())?;
        ensure!(data == b"two", "backing content after stop");
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// The real `blksnapd` binary as a child process, with a state directory.
struct DaemonProc {
    child: std::process::Child,
    args: Vec<String>,
    socket: PathBuf,
}

impl DaemonProc {
    /// Starts `blksnapd` serving `backing` with its socket, links and state under `env`'s dir.
    fn start(env: &Env, backing: &Path, queues: u16) -> R<DaemonProc> {
        Self::start_with(env, Some(backing), queues)
    }

    fn start_with(env: &Env, backing: Option<&Path>, queues: u16) -> R<DaemonProc> {
        let links = env.path("links");
        std::fs::create_dir_all(&links).map_err(|e| e.to_string())?;
        Self::start_linked(env, backing, queues, &links, &["newest"])
    }

    /// As `start_with`, with image links of `styles` made in `link_dir`.
    fn start_linked(
        env: &Env,
        backing: Option<&Path>,
        queues: u16,
        link_dir: &Path,
        styles: &[&str],
    ) -> R<DaemonProc> {
        Self::start_args(env, backing, queues, link_dir, styles, &[])
    }

    /// As `start_linked`, with `extra` flags.
    fn start_args(
        env: &Env,
        backing: Option<&Path>,
        queues: u16,
        link_dir: &Path,
        styles: &[&str],
        extra: &[&str],
    ) -> R<DaemonProc> {
        let bin = sibling("blksnapd")?;
        let socket = env.path("d.sock");
        let mut args = vec![bin.display().to_string()];
        for (k, v) in [
            ("--socket", socket.display().to_string()),
            ("--link-dir", link_dir.display().to_string()),
            ("--queues", queues.to_string()),
            ("--state-dir", env.path("state").display().to_string()),
        ] {
            args.push(k.into());
            args.push(v);
        }
        for style in styles {
            args.push("--image-link".into());
            args.push(style.to_string());
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        if let Some(b) = backing {
            args.push("--device".into());
            args.push(b.display().to_string());
        }
        let mut d = DaemonProc { child: Self::spawn(&args)?, args, socket };
        d.wait_up()?;
        Ok(d)
    }

    fn spawn(args: &[String]) -> R<std::process::Child> {
        Command::new(&args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())
    }

    fn wait_up(&mut self) -> R {
        let t = Instant::now();
        loop {
            if let Ok(mut c) = Client::connect(&self.socket) {
                if c.req(Request::Version).is_ok() {
                    return Ok(());
                }
            }
            if let Some(s) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("blksnapd exited at start: {s}"));
            }
            ensure!(t.elapsed() < Duration::from_secs(60), "blksnapd did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn client(&self) -> R<Client> {
        Client::connect(&self.socket).map_err(|e| format!("connect: {e}"))
    }

    /// The one origin: (node, MAJ:MIN).
    fn origin(&self) -> R<(String, Dev)> {
        let Reply::Devices(list) = self.client()?.req(Request::ListDevices)? else {
            return Err("ListDevices".into());
        };
        let o: Vec<_> = list.into_iter().filter(|d| d.role == Role::Origin).collect();
        ensure!(o.len() == 1, "origins: {o:?}");
        Ok((o[0].path.clone(), o[0].dev))
    }

    fn cbt(&self, dev: Dev) -> R<(blksnap_proto::CbtInfoW, Vec<u8>)> {
        let mut c = self.client()?;
        let Reply::CbtInfo(info) = c.req(Request::CbtInfo { dev })? else {
            return Err("CbtInfo".into());
        };
        let Reply::CbtMap(map) =
            c.req(Request::CbtMap { dev, offset: 0, length: info.block_count })?
        else {
            return Err("CbtMap".into());
        };
        Ok((info, map))
    }

    /// SIGTERM and a clean exit.
    fn stop(&mut self) -> R {
        // SAFETY: plain kill(2) of our own child by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().map_err(|e| e.to_string())? {
                ensure!(s.success(), "blksnapd exit: {s}");
                return Ok(());
            }
            ensure!(t.elapsed() < Duration::from_secs(30), "blksnapd did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, reaped.
    fn kill9(&mut self) -> R {
        self.child.kill().map_err(|e| e.to_string())?;
        self.child.wait().map_err(|e| e.to_string()).map(drop)
    }

    /// Starts the binary again with the same arguments.
    fn restart(&mut self) -> R {
        self.child = Self::spawn(&self.args)?;
        self.wait_up()
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.stop();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn state_files(env: &Env) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(env.path("state"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn restart(env: &Env) -> R {
    let backing = env.path("r.img");
    sparse_file(&backing, 64 * MIB)?;
    let mut d = DaemonProc::start(env, &backing, 1)?;
    let (node, dev) = d.origin()?;
    let f = open_direct(&node, true).map_err(|e| e.to_string())?;
    for i in 0..8u64 {
        pwrite_page(&f, i * 3 * MIB, b"before take").map_err(|e| e.to_string())?;
    }
    // take and destroy, then more writes: both maps and both numbers are non-trivial
    offline_write::take_destroy(env, &d, dev)?;
    for i in 0..5u64 {
        pwrite_page(&f, 40 * MIB + i * MIB, b"after take").map_err(|e| e.to_string())?;
    }
    drop(f);
    let (info1, map1) = d.cbt(dev)?;
    ensure!(info1.changes_number >= 1, "take did not advance: {info1:?}");
    ensure!(map1.iter().any(|b| *b != 0), "no change before the take marked");

    // 1. clean restart: same generation, same numbers, same map
    let t = Instant::now();
    d.stop()?;
    let files = state_files(env);
    ensure!(!env.path("state/running").exists(), "marker left after a clean stop: {files:?}");
    ensure!(
        files.iter().any(|p| p.display().to_string().ends_with(".state")),
        "no saved CBT: {files:?}"
    );
    d.restart()?;
    let (node2, dev2) = d.origin()?;
    let (info2, map2) = d.cbt(dev2)?;
    println!(
        "    clean restart in {} ms ({node} {}:{} -> {node2} {}:{})",
        t.elapsed().as_millis(),
        dev.major,
        dev.minor,
        dev2.major,
        dev2.minor
    );
    ensure!(info2.generation_id == info1.generation_id, "generation changed on a clean restart");
    ensure!(info2.changes_number == info1.changes_number, "{info1:?} -> {info2:?}");
    ensure!(map2 == map1, "cbtmap differs after a clean restart");
    ensure!(env.path("state/running").exists(), "no marker while running");
    // incremental backups keep working: the next take advances from the restored numbers
    offline_write::take_destroy(env, &d, dev2)?;
    let (info3, map3) = d.cbt(dev2)?;
    ensure!(info3.generation_id == info1.generation_id, "generation changed by a take");
    ensure!(info3.changes_number == info1.changes_number + 1, "{info1:?} -> {info3:?}");
    // the writes after the first take (made before the restart, kept in the restored live
    // map) show up with the new number; the older marks stay
    let bs = u64::from(info3.block_size_bytes);
    for i in 0..5u64 {
        let b = ((40 * MIB + i * MIB) / bs) as usize;
        ensure!(
            map3[b] == info3.changes_number,
            "block {b} written before the restart: {}",
            map3[b]
        );
    }
    for (b, (old, new)) in map1.iter().zip(&map3).enumerate() {
        ensure!(*old == 0 || new == old, "block {b}: {old} before restart, {new} after take");
    }

    // 2. a corrupted state file: refused, new generation
    d.stop()?;
    let state = state_files(env)
        .into_iter()
        .find(|p| p.display().to_string().ends_with(".state"))
        .ok_or("no state file")?;
    let mut bytes = std::fs::read(&state).map_err(|e| e.to_string())?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&state, bytes).map_err(|e| e.to_string())?;
    d.restart()?;
    let (_, dev4) = d.origin()?;
    let (info4, map4) = d.cbt(dev4)?;
    ensure!(info4.generation_id != info1.generation_id, "a corrupted state was used");
    ensure!(map4.iter().all(|b| *b == 0) && info4.changes_number == 0, "{info4:?}");
    ensure!(!state.exists(), "the corrupted state file was left");

    // 3. kill -9: the next start does not trust anything saved; new generation
    let (node5, dev5) = d.origin()?;
    let f = open_direct(&node5, true).map_err(|e| e.to_string())?;
    pwrite_page(&f, 0, b"before kill").map_err(|e| e.to_string())?;
    drop(f);
    let (info5, _) = d.cbt(dev5)?;
    d.kill9()?;
    ensure!(env.path("state/running").exists(), "marker gone after kill -9");
    let t = Instant::now();
    d.restart()?;
    let (node6, dev6) = d.origin()?;
    let (info6, _) = d.cbt(dev6)?;
    println!("    restart after kill -9 in {} ms ({node5} -> {node6})", t.elapsed().as_millis());
    ensure!(info6.generation_id != info5.generation_id, "generation kept after kill -9");
    let f = open_direct(&node6, false).map_err(|e| e.to_string())?;
    let p = pread_page(&f, 0).map_err(|e| e.to_string())?;
    ensure!(&p.0[..11] == b"before kill", "data written before kill -9 lost");
    drop(f);
    d.stop()?;
    ensure!(!env.path("state/running").exists(), "marker left after the last clean stop");
    Ok(())
}

/// The C (v3) and C++ (newest) lifecycle clients of `ffi/tests-c`, built unchanged against the
/// static libblksnap, run with `BLKSNAP_SOCKET` set: every control and filter request goes to
/// the daemon, their devices are ublk devices the library asks the daemon to serve, data I/O
/// goes through those block devices and the images' (O_DIRECT).
fn c_clients(env: &Env) -> R {
    let d = DaemonProc::start_with(env, None, 1)?;
    for name in ["client_v3", "client_newest"] {
        let mut cmd = Command::new(sibling(name)?);
        cmd.env("BLKSNAP_SOCKET", &d.socket);
        let t = Instant::now();
        let out = run_client(cmd, name)?;
        println!("    {} ({} ms)", out.trim(), t.elapsed().as_millis());
    }
    // The library removed the devices it had the daemon serve; nothing is left behind.
    let mut c = d.client()?;
    let Reply::Devices(list) = c.req(Request::ListDevices)? else {
        return Err("ListDevices".into());
    };
    ensure!(list.is_empty(), "devices left: {list:?}");
    let Reply::Snapshots(ids) = c.req(Request::SnapshotCollect)? else {
        return Err("SnapshotCollect".into());
    };
    ensure!(ids.is_empty(), "snapshots left: {ids:?}");
    Ok(())
}

/// Runs the `blksnap` CLI (next to this binary) against the daemon on `socket`; returns stdout.
fn cli(socket: &Path, args: &[&str]) -> R<String> {
    let mut cmd = Command::new(sibling("blksnap")?);
    cmd.env("BLKSNAP_SOCKET", socket).args(args);
    run_client(cmd, &format!("blksnap {}", args.join(" ")))
}

/// The value of `key=` in the CLI's key=value output.
fn field(out: &str, key: &str) -> R<String> {
    out.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .map(str::to_string)
        .ok_or(format!("no {key}= in {out:?}"))
}

/// A preallocated file (fallocate(2): busybox has no fallocate(1)); v3 storage is its extents.
fn fallocate(path: &Path, bytes: u64) -> R {
    let f = File::create(path).map_err(|e| e.to_string())?;
    // SAFETY: a valid open fd for the call's duration; plain integer arguments.
    let rc = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, bytes as i64) };
    ensure!(rc == 0, "fallocate {}: {}", path.display(), std::io::Error::last_os_error());
    Ok(())
}

/// The README's backup session, typed as a user would: the `blksnap` CLI against `blksnapd`,
/// images under `/dev/blksnap-*`, a filesystem on the device; restores checked file by file.
fn cli_backup(env: &Env) -> R {
    let backing = env.path("disk0.img");
    sparse_file(&backing, 64 * MIB)?;
    let d = DaemonProc::start_linked(env, None, 2, Path::new("/dev"), &["v3", "newest"])?;
    let sock = d.socket.clone();
    let t = Instant::now();
    // attach serves the file first and names the block device to use from now on
    let out = cli(&sock, &["attach", "-d", &backing.display().to_string()])?;
    let node = field(&out, "device")?;
    ensure!(node.starts_with("/dev/ublkb"), "attach printed device={node}");
    let info = cli(&sock, &["cbtinfo", "-d", &node])?;
    let block_count: u64 = field(&info, "block_count")?.parse().map_err(|_| "block_count")?;
    mkfs(&node)?;
    let om = env.path("origin");
    mount(&node, &om, "rw")?;
    let files0 = write_files(&om, "a", 40, 31)?;
    let target = env.path("backup");
    let target_s = target.display().to_string();

    // point 0: v3 storage (a preallocated file's extents), full backup
    let id = cli(&sock, &["snapshot_create", "-d", &node])?.trim().to_string();
    let diff0 = env.path("diff0");
    fallocate(&diff0, 32 * MIB)?;
    cli(&sock, &["snapshot_appendstorage", "-i", &id, "-f", &diff0.display().to_string()])?;
    cli(&sock, &["snapshot_take", "-i", &id])?;
    let image = cli(&sock, &["snapshot_info", "-d", &node, "-f", "image"])?.trim().to_string();
    ensure!(image.starts_with("/dev/blksnap-"), "image {image}");
    ensure!(Path::new(&image).exists(), "{image} does not exist");
    // the origin moves on while the backup reads the image
    for name in files0.keys().take(10) {
        std::fs::remove_file(om.join(name)).map_err(|e| e.to_string())?;
    }
    let mut files1 = write_files(&om, "b", 20, 32)?;
    sync();
    let b0 = cli(&sock, &["backup", "--image", &image, "--target", &target_s, "-d", &node])?;
    ensure!(field(&b0, "kind")? == "full", "point 0: {b0}");
    ensure!(
        field(&cli(&sock, &["verify", "--image", &image, "--target", &target_s])?, "result")?
            == "identical",
        "point 0 differs from its image"
    );
    cli(&sock, &["snapshot_destroy", "-i", &id])?;
    ensure!(wait_gone(&image, 10), "{image} still there after destroy");
    println!(
        "    point 0 (v3 storage): {}",
        b0.lines()
            .filter(|l| l.starts_with("blocks_changed") || l.starts_with("rate"))
            .collect::<Vec<_>>()
            .join(" ")
    );

    // point 1: newest storage (a file in a directory, with a limit), incremental
    for (name, _) in files0.iter().skip(10) {
        files1.insert(name.clone(), files0[name]);
    }
    let more = write_files(&om, "c", 10, 33)?;
    files1.extend(more);
    let sdir = env.path("storage");
    std::fs::create_dir_all(&sdir).map_err(|e| e.to_string())?;
    let id = cli(
        &sock,
        &["snapshot_create", "-d", &node, "-f", &format!("{}/", sdir.display()), "-l", "32M"],
    )?
    .trim()
    .to_string();
    cli(&sock, &["snapshot_take", "-i", &id])?;
    let image = cli(&sock, &["snapshot_info", "-d", &node, "-f", "image"])?.trim().to_string();
    // files written after the take are in no backup
    write_files(&om, "d", 10, 34)?;
    sync();
    let b1 = cli(&sock, &["backup", "--image", &image, "--target", &target_s, "-d", &node])?;
    ensure!(field(&b1, "kind")? == "incremental", "point 1: {b1}");
    let changed = field(&b1, "blocks_changed")?;
    let (n, total) = changed.split_once('/').ok_or("blocks_changed")?;
    let n: u64 = n.parse().map_err(|_| "blocks_changed")?;
    ensure!(
        total == block_count.to_string(),
        "blocks_changed {changed}, block_count {block_count}"
    );
    ensure!(n > 0 && n < block_count, "incremental copied {changed} blocks");
    ensure!(
        field(&cli(&sock, &["verify", "--image", &image, "--target", &target_s])?, "result")?
            == "identical",
        "point 1 differs from its image"
    );
    cli(&sock, &["snapshot_destroy", "-i", &id])?;
    println!("    point 1 (newest storage): blocks_changed={changed}");

    // restore both points; each is a clean filesystem holding exactly its files
    umount(&om)?;
    for (point, files, absent) in [("0", &files0, "b000"), ("1", &files1, "d000")] {
        let img = env.path(&format!("restored{point}.img"));
        cli(
            &sock,
            &["restore", "--target", &target_s, "--point", point, "-o", &img.display().to_string()],
        )?;
        let lo = run("losetup", &["-f"])?.trim().to_string();
        run("losetup", &[&lo, &img.display().to_string()])?;
        let checked = fsck(&lo).and_then(|()| {
            let m = env.path(&format!("r{point}"));
            mount(&lo, &m, "ro")?;
            let r = verify_files(&m, files).and_then(|()| {
                ensure!(!m.join(absent).exists(), "point {point} holds {absent}");
                Ok(())
            });
            umount(&m)?;
            r
        });
        run("losetup", &["-d", &lo])?;
        checked?;
        println!("    point {point} restored: fsck clean, {} files verified", files.len());
    }
    cli(&sock, &["detach", "-d", &node])?;
    println!("    session in {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

/// `stretch_snapshot` against blksnapd (v3 storage grown on demand): a 4 MiB storage step
/// (`--param`), the tool appending a preallocated file at each low-space event while 24 MiB are
/// written to the mounted origin; the snapshot never overflows, its image is the pre-take
/// filesystem, and destroy ends the tool, which removes its files.
fn stretch(env: &Env) -> R {
    use std::io::BufRead;
    let backing = env.path("disk0.img");
    sparse_file(&backing, 64 * MIB)?;
    let links = env.path("links");
    std::fs::create_dir_all(&links).map_err(|e| e.to_string())?;
    let d = DaemonProc::start_args(
        env,
        None,
        2,
        &links,
        &["v3"],
        // modprobe-style, by the kernel's names (chunk_maximum_in_queue: accepted, no effect).
        &["--module-params", "diff_storage_minimum=8192 chunk_maximum_in_queue=256"],
    )?;
    let sock = d.socket.clone();
    let node = field(&cli(&sock, &["attach", "-d", &backing.display().to_string()])?, "device")?;
    mkfs(&node)?;
    let om = env.path("origin");
    mount(&node, &om, "rw")?;
    let files0 = write_files(&om, "a", 40, 41)?;
    let id = cli(&sock, &["snapshot_create", "-d", &node])?.trim().to_string();
    let sdir = env.path("stretch");
    std::fs::create_dir_all(&sdir).map_err(|e| e.to_string())?;
    let mut child = Command::new(sibling("blksnap")?)
        .env("BLKSNAP_SOCKET", &sock)
        .args(["stretch_snapshot", "-i", &id, "-p", &format!("{}/", sdir.display()), "-l", "64"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("stretch_snapshot: {e}"))?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = child.stdout.take().ok_or("stdout")?;
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let appended = |lines: &mut Vec<String>, wait: Duration| -> usize {
        while let Ok(l) = rx.recv_timeout(wait) {
            lines.push(l);
        }
        lines.iter().filter(|l| l.starts_with("appended ")).count()
    };
    // the create queued a low-space event: the first file arrives before the take
    let t = Instant::now();
    while appended(&mut lines, Duration::from_millis(100)) == 0 {
        ensure!(t.elapsed() < Duration::from_secs(20), "no storage appended: {lines:?}");
    }
    cli(&sock, &["snapshot_take", "-i", &id])?;
    let image = cli(&sock, &["snapshot_info", "-d", &node, "-f", "image"])?.trim().to_string();
    // 24 MiB of new data, 1 MiB per fsync'd file: six times the storage step
    for i in 0..24u64 {
        let mut data = vec![0u8; MIB as usize];
        fill(500 + i, &mut data);
        let path = om.join(format!("big{i:02}"));
        let mut f = File::create(&path).map_err(|e| e.to_string())?;
        f.write_all(&data).and_then(|()| f.sync_all()).map_err(|e| e.to_string())?;
    }
    sync();
    let n = appended(&mut lines, Duration::from_millis(300));
    let info = cli(&sock, &["snapshot_info", "-d", &node])?;
    ensure!(field(&info, "error_code")? == "0", "snapshot failed: {info}; stretch: {lines:?}");
    ensure!(n >= 4, "only {n} storage files appended for 24 MiB of writes: {lines:?}");
    fsck(&image)?;
    let im = env.path("image");
    mount(&image, &im, "ro")?;
    let checked = verify_files(&im, &files0).and_then(|()| {
        ensure!(!im.join("big00").exists(), "a post-take file is in the image");
        Ok(())
    });
    umount(&im)?;
    checked?;
    cli(&sock, &["snapshot_destroy", "-i", &id])?;
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        ensure!(t.elapsed() < Duration::from_secs(10), "stretch_snapshot still running");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = reader.join();
    appended(&mut lines, Duration::from_millis(1));
    ensure!(status.success(), "stretch_snapshot: {status}: {lines:?}");
    ensure!(lines.iter().any(|l| l.contains("snapshot is gone")), "{lines:?}");
    let left: Vec<_> = std::fs::read_dir(&sdir).map_err(|e| e.to_string())?.flatten().collect();
    ensure!(left.is_empty(), "storage files left: {left:?}");
    umount(&om)?;
    fsck(&node)?;
    println!("    {n} storage files of 4 MiB appended while 24 MiB were written; image verified");
    Ok(())
}

/// An upstream-style client (ffi/tests-c/preload_daemon.c: open/ioctl/pread/pwrite only),
/// dynamically linked, run under the LD_PRELOAD shim in client mode against blksnapd: the shim
/// serves /dev/blksnap-control and the BLKFILTER_* requests on the real ublk device; data I/O
/// and the images (the daemon's /dev links) are the kernel's.
fn preload_daemon(env: &Env) -> R {
    let shim = sibling("libblksnap-preload.so")?;
    let backing = env.path("pd.img");
    sparse_file(&backing, 32 * MIB)?;
    let d = DaemonProc::start_linked(env, Some(&backing), 1, Path::new("/dev"), &["v3", "newest"])?;
    let (node, _) = d.origin()?;
    for profile in ["v3", "newest"] {
        let bin = sibling(&format!("preload_daemon_{profile}"))?;
        let dir = env.path(&format!("pd-{profile}"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(bin);
        cmd.args([node.as_str(), &dir.display().to_string()])
            .env("LD_PRELOAD", &shim)
            .env("BLKSNAP_SOCKET", &d.socket)
            .env("BLKSNAP_PROFILE", profile);
        let t = Instant::now();
        let out = run_client(cmd, &format!("preload_daemon {profile}"))?;
        println!("    {} ({} ms)", out.trim(), t.elapsed().as_millis());
    }
    // Nothing left behind: no snapshot; the device is still served and tracked.
    let mut c = d.client()?;
    let Reply::Snapshots(ids) = c.req(Request::SnapshotCollect)? else {
        return Err("SnapshotCollect".into());
    };
    ensure!(ids.is_empty(), "snapshots left: {ids:?}");
    Ok(())
}

/// A writer that keeps creating files in `dir` (two per round, data seeded from `seed` + round,
/// the first of each round fsync'd so writes reach the device for real) until `stop` is set;
/// returns once three rounds are done. The thread's result is every file it wrote.
#[allow(clippy::type_complexity)]
fn background_writer(
    dir: &Path,
    seed: u64,
) -> R<(Arc<AtomicBool>, Arc<AtomicU64>, std::thread::JoinHandle<R<BTreeMap<String, u64>>>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let (s, p, dir) = (stop.clone(), progress.clone(), dir.to_path_buf());
    let writer = std::thread::spawn(move || -> R<BTreeMap<String, u64>> {
        let mut all = BTreeMap::new();
        let mut i = 0;
        while !s.load(Ordering::Relaxed) {
            all.extend(write_files(&dir, &format!("w{i:04}-"), 2, seed + i)?);
            File::open(dir.join(format!("w{i:04}-000")))
                .and_then(|f| f.sync_all())
                .map_err(|e| format!("fsync: {e}"))?;
            i += 1;
            p.store(i, Ordering::Relaxed);
        }
        Ok(all)
    });
    while progress.load(Ordering::Relaxed) < 3 {
        ensure!(!writer.is_finished(), "the writer stopped early");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((stop, progress, writer))
}

fn recovery(env: &Env) -> R {
    let backing = env.path("rec.img");
    sparse_file(&backing, 64 * MIB)?;
    let mut d = DaemonProc::start(env, &backing, 2)?;
    let (node, dev) = d.origin()?;
    mkfs(&node)?;
    let om = env.path("origin");
    mount(&node, &om, "rw")?;
    let before = write_files(&om, "f", 30, 21)?;
    sync();
    let (info1, _) = d.cbt(dev)?;
    // a writer that keeps going across the crash and the recovery
    let (stop, progress, writer) = background_writer(&om, 1000)?;
    d.kill9()?;
    let at_kill = progress.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    d.restart()?;
    let recovered_ms = t.elapsed().as_millis();
    let (node2, dev2) = d.origin()?;
    ensure!(node2 == node && dev2 == dev, "not recovered: {node}/{dev:?} -> {node2}/{dev2:?}");
    let (info2, _) = d.cbt(dev)?;
    ensure!(info2.generation_id != info1.generation_id, "CBT generation kept after kill -9");
    let deadline = Instant::now() + Duration::from_secs(30);
    while progress.load(Ordering::Relaxed) < at_kill + 5 {
        ensure!(Instant::now() < deadline, "the writer made no progress after the recovery");
        ensure!(!writer.is_finished(), "the writer failed after the recovery");
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().map_err(|_| "writer panicked")??;
    sync();
    verify_files(&om, &before)?;
    verify_files(&om, &written)?;
    umount(&om)?;
    drop_caches();
    fsck(&node)?;
    mount(&node, &om, "ro")?;
    verify_files(&om, &before)?;
    verify_files(&om, &written)?;
    umount(&om)?;
    d.stop()?;
    println!(
        "    writer at {at_kill} rounds at kill -9, {} files in all; recovery took {recovered_ms} ms",
        written.len()
    );
    Ok(())
}

/// One timed pass of 4 KiB O_DIRECT I/O over `region` bytes from the start of `path`; MB/s.
fn pass(path: &str, write: bool, random: bool, region: u64, seed: u64) -> R<f64> {
    let f = open_direct(path, write).map_err(|e| format!("{path}: {e}"))?;
    let pages = region / 4096;
    let mut p = Box::new(Page([0; 4096]));
    fill(seed, &mut p.0);
    let mut x = seed | 1;
    let t = Instant::now();
    for i in 0..pages {
        let page = if random {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % pages
        } else {
            i
        };
        let r = if write {
            f.write_all_at(&p.0, page * 4096)
        } else {
            f.read_exact_at(&mut p.0, page * 4096)
        };
        r.map_err(|e| format!("{path} at page {page}: {e}"))?;
    }
    Ok((pages * 4096) as f64 / t.elapsed().as_secs_f64() / 1e6)
}

fn bench(env: &Env) -> R {
    let (origin, dev) = env.origins()?.remove(0);
    let mut c = env.client()?;
    let region = 8 * MIB;
    // the kernel loop driver over a file of the same kind (tmpfs), same sizes
    let loop_file = env.path("loop.img");
    sparse_file(&loop_file, 64 * MIB)?;
    let lo = run("losetup", &["-f"])?.trim().to_string(); // busybox: the next free device
    run("losetup", &[&lo, &loop_file.display().to_string()])?;
    let mut rows: Vec<(String, [f64; 4])> = Vec::new();
    let measure = |name: &str, path: &str, seed: u64| -> R<(String, [f64; 4])> {
        let r = [
            pass(path, true, false, region, seed)?,
            pass(path, true, true, region, seed + 1)?,
            pass(path, false, false, region, seed + 2)?,
            pass(path, false, true, region, seed + 3)?,
        ];
        Ok((name.to_string(), r))
    };
    let run_all = (|| -> R {
        // untimed first passes: the backing files' pages get allocated (tmpfs), caches warm
        pass(&lo, true, false, region, 0)?;
        pass(&origin, true, false, region, 0)?;
        rows.push(measure("loop", &lo, 1)?);
        rows.push(measure("tracked, no snapshot", &origin, 1)?);
        let id = env.snapshot(&mut c, 48, &[dev])?;
        c.req(Request::SnapshotTake { id })?;
        // first writes copy each chunk; rewrites find it stored
        let first_seq = pass(&origin, true, false, region, 5)?;
        let rewrite_seq = pass(&origin, true, false, region, 6)?;
        rows.push(("taken: first write (seq)".into(), [first_seq, 0.0, 0.0, 0.0]));
        rows.push(("taken: rewrite (seq)".into(), [rewrite_seq, 0.0, 0.0, 0.0]));
        rows.push(measure("tracked, taken", &origin, 7)?);
        rows.push(measure("image", &image_link(dev, false), 9)?);
        c.req(Request::SnapshotDestroy { id }).map(drop)
    })();
    let _ = run("losetup", &["-d", &lo]);
    run_all?;
    let base = rows[0].1;
    println!("    MB/s (ratio to loop)   seq write      rand write     seq read       rand read");
    for (name, r) in &rows {
        let cells: Vec<String> = r
            .iter()
            .zip(base.iter())
            .map(|(v, b)| if *v == 0.0 { "-".into() } else { format!("{v:6.1} ({:.2})", v / b) })
            .collect();
        println!("    {name:24} {:14} {:14} {:14} {:14}", cells[0], cells[1], cells[2], cells[3]);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------- runner

fn sizes_for(name: &str) -> Vec<u64> {
    match name {
        "two-devices" => vec![16 * MIB, 16 * MIB],
        "remove-busy" => vec![32 * MIB, 16 * MIB],
        "cbt" => vec![64 * MIB],
        "daemon-process" | "restart" | "recovery" | "c-clients" | "cli-backup"
        | "preload-daemon" | "stretch" | "take-freezes" | "exclusive-claim" => vec![],
        _ => vec![64 * MIB],
    }
}

fn run_one(name: &str) -> R {
    let s = SCENARIOS.iter().find(|s| s.name == name).ok_or(format!("no scenario {name}"))?;
    let env = Env::new(name, &sizes_for(name))?;
    (s.run)(&env)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, name] = &args[..] {
        if flag == "--scenario" {
            match run_one(name) {
                Ok(()) => std::process::exit(0),
                Err(e) => {
                    println!("    error: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
    let mut require = false;
    let mut timeout = 120u64;
    let mut names = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--require-ublk" => require = true,
            "--timeout" => timeout = it.next().and_then(|t| t.parse().ok()).unwrap_or(timeout),
            "--list" => {
                for s in SCENARIOS {
                    println!("{:16} {}", s.name, s.about);
                }
                return;
            }
            n => names.push(n.to_string()),
        }
    }
    if names.is_empty() {
        names = SCENARIOS.iter().map(|s| s.name.to_string()).collect();
    }
    if !available() {
        println!(
            "SKIP: /dev/ublk-control is missing (no ublk driver on this kernel): {} scenario(s) \
             not run; run them in the VM: service/vm/run-tests.sh",
            names.len()
        );
        std::process::exit(if require { 1 } else { 0 });
    }
    let exe = std::env::current_exe().expect("own path");
    let (mut passed, mut failed) = (0, 0);
    let total = Instant::now();
    for name in &names {
        let t = Instant::now();
        let mut child = match Command::new(&exe).args(["--scenario", name]).spawn() {
            Ok(c) => c,
            Err(e) => {
                println!("scenario {name}: cannot start: {e}");
                failed += 1;
                continue;
            }
        };
        let ok = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s.success(),
                Ok(None) if t.elapsed() > Duration::from_secs(timeout) => {
                    println!("scenario {name}: TIMEOUT after {timeout} s");
                    let _ = child.kill();
                    let _ = child.wait();
                    break false;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => break false,
            }
        };
        let secs = t.elapsed().as_secs_f64();
        if ok {
            passed += 1;
            println!("scenario {name}: ok in {secs:.1} s");
        } else {
            failed += 1;
            println!("scenario {name}: FAILED in {secs:.1} s");
        }
    }
    println!("vm scenarios took {:.1} s", total.elapsed().as_secs_f64());
    println!("{passed} passed, {failed} failed");
    std::process::exit(if failed == 0 { 0 } else { 1 });
}
