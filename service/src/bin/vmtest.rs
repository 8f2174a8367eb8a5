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
#[path = "vmtest/c_clients.rs"]
mod c_clients;
#[path = "vmtest/cbt.rs"]
mod cbt;
#[path = "vmtest/cli_backup.rs"]
mod cli_backup;
#[path = "vmtest/daemon_process.rs"]
mod daemon_process;
#[path = "vmtest/datapath.rs"]
mod datapath;
#[path = "vmtest/destroy_mounted.rs"]
mod destroy_mounted;
#[path = "vmtest/exclusive_claim.rs"]
mod exclusive_claim;
#[path = "vmtest/fs_image.rs"]
mod fs_image;
#[path = "vmtest/hostile_clients.rs"]
mod hostile_clients;
#[path = "vmtest/offline_write.rs"]
mod offline_write;
#[path = "vmtest/overflow.rs"]
mod overflow;
#[path = "vmtest/preload_daemon.rs"]
mod preload_daemon;
#[path = "vmtest/recovery.rs"]
mod recovery;
#[path = "vmtest/remove_busy.rs"]
mod remove_busy;
#[path = "vmtest/restart.rs"]
mod restart;
#[path = "vmtest/restart_mounted.rs"]
mod restart_mounted;
#[path = "vmtest/stretch.rs"]
mod stretch;
#[path = "vmtest/take_freezes.rs"]
mod take_freezes;
#[path = "vmtest/take_rollback.rs"]
mod take_rollback;
#[path = "vmtest/two_devices.rs"]
mod two_devices;

struct Scenario {
    name: &'static str,
    about: &'static str,
    run: fn(&Env) -> R,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "fs-image",
        about: "ext2 on a tracked device, take, overwrite/delete, image has the pre-take files",
        run: fs_image::fs_image,
    },
    Scenario {
        name: "cbt",
        about: "cbtmap marks every block written after a take, and nothing else",
        run: cbt::cbt,
    },
    Scenario {
        name: "overflow",
        about: "tiny diff storage: origin intact, corrupted event, image reads fail with EIO",
        run: overflow::overflow,
    },
    Scenario {
        name: "destroy-mounted",
        about: "destroy while the image is mounted and written; origin keeps being served",
        run: destroy_mounted::destroy_mounted,
    },
    Scenario {
        name: "two-devices",
        about: "two devices taken in one snapshot are coherent",
        run: two_devices::two_devices,
    },
    Scenario {
        name: "datapath",
        about: "fio on null_blk: raw, loop, blksnapd pass/tracking/taken/image (printed); verify across a take",
        run: datapath::datapath,
    },
    Scenario {
        name: "daemon-process",
        about: "the blksnapd binary: flags, socket, take; SIGTERM: image I/O fails, the origin is kept",
        run: daemon_process::daemon_process,
    },
    Scenario {
        name: "restart",
        about: "CBT kept across a clean restart; corrupted state or kill -9: new generation",
        run: restart::restart,
    },
    Scenario {
        name: "c-clients",
        about:
            "the C/C++ lifecycle clients of ffi/tests-c, unchanged, in client mode against blksnapd",
        run: c_clients::c_clients,
    },
    Scenario {
        name: "cli-backup",
        about: "README's session with the blksnap CLI: /dev/blksnap-* images, full + incremental, restores",
        run: cli_backup::cli_backup,
    },
    Scenario {
        name: "stretch",
        about: "stretch_snapshot grows v3 storage on demand while the mounted origin is written",
        run: stretch::stretch,
    },
    Scenario {
        name: "preload-daemon",
        about: "an upstream-style raw-ioctl client under the LD_PRELOAD shim against blksnapd",
        run: preload_daemon::preload_daemon,
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
        about: "blksnapd restarted under a mounted, written ext4 (devices kept by default): mount, data, CBT kept",
        run: restart_mounted::restart_mounted,
    },
    Scenario {
        name: "recovery",
        about: "kill -9 during writes to a mounted fs, restart recovers the device: data intact",
        run: recovery::recovery,
    },
    Scenario {
        name: "hostile-clients",
        about: "a group member and an outsider: every escalation fails (errno, targets intact); abuse vs a well-behaved client",
        run: hostile_clients::hostile_clients,
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
        Env::with(name, sizes, |_| {})
    }

    /// As `new`, with the daemon's configuration adjusted by `tweak`.
    fn with(name: &str, sizes: &[u64], tweak: impl FnOnce(&mut Config)) -> R<Env> {
        let dir = PathBuf::from(format!("/tmp/{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let socket = dir.join("control");
        let mut cfg = Config { socket: socket.clone(), queues: Some(2), ..Config::default() };
        cfg.queue_depth = 32;
        tweak(&mut cfg);
        let engine = Arc::new(Engine::new(EngineConfig::default()).map_err(|e| format!("{e:?}"))?);
        let frontend = UblkFrontend::of(&cfg);
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

/// Fails unless the ublk device `node` (`/dev/ublkbN`) moves its data by zero copy exactly
/// when `zero_copy`.
pub(crate) fn expect_mode(node: &str, zero_copy: bool) -> R {
    let id = node.strip_prefix("/dev/ublkb").and_then(|n| n.parse::<u32>().ok());
    let got = id
        .and_then(blksnap_service::ublk::zero_copy_of)
        .ok_or(format!("{node}: not a ublk device"))?;
    if got != zero_copy {
        return Err(format!("{node}: zero copy {got}, expected {zero_copy}"));
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

// ---------------------------------------------------------------------------------- shared by scenarios

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

    /// Every origin removed (RemoveDevice: only an explicit request removes a device), then
    /// SIGTERM; checks that no device is left. The clean end of a scenario.
    fn finish(&mut self) -> R {
        let nodes = self.remove_all()?;
        self.stop()?;
        for node in &nodes {
            ensure!(wait_gone(node, 10), "{node} left after RemoveDevice and a clean stop");
        }
        Ok(())
    }

    /// RemoveDevice of every origin; their nodes.
    fn remove_all(&self) -> R<Vec<String>> {
        let Reply::Devices(list) = self.client()?.req(Request::ListDevices)? else {
            return Err("ListDevices".into());
        };
        let mut nodes = Vec::new();
        for d in list.into_iter().filter(|d| d.role == Role::Origin) {
            self.client()?.req(Request::RemoveDevice { dev: d.dev })?;
            nodes.push(d.path);
        }
        Ok(nodes)
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
            // A clean stop keeps the devices: remove them first, so that no scenario leaves
            // one behind (best effort: a device still mounted is refused and stays).
            let _ = self.remove_all();
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

// ---------------------------------------------------------------------------------- runner

fn sizes_for(name: &str) -> Vec<u64> {
    match name {
        "two-devices" => vec![16 * MIB, 16 * MIB],
        "remove-busy" => vec![32 * MIB, 16 * MIB],
        "cbt" => vec![64 * MIB],
        "daemon-process" | "restart" | "recovery" | "c-clients" | "cli-backup"
        | "preload-daemon" | "stretch" | "take-freezes" | "exclusive-claim" | "hostile-clients" => {
            vec![]
        }
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
    if let [flag, role, rest @ ..] = &args[..] {
        if flag == "--hostile-child" {
            std::process::exit(hostile_clients::child(role, rest));
        }
    }
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
    let (mut passed, mut failed) = (0, Vec::new());
    let total = Instant::now();
    for name in &names {
        let t = Instant::now();
        let mut child = match Command::new(&exe).args(["--scenario", name]).spawn() {
            Ok(c) => c,
            Err(e) => {
                println!("scenario {name}: cannot start: {e}");
                failed.push(name.clone());
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
            failed.push(name.clone());
            println!("scenario {name}: FAILED in {secs:.1} s");
        }
    }
    println!("vm scenarios took {:.1} s", total.elapsed().as_secs_f64());
    // CI shows only the tail of a run: the last line names what failed.
    if failed.is_empty() {
        println!("{passed} passed, 0 failed");
    } else {
        println!("{passed} passed, {} failed: {}", failed.len(), failed.join(", "));
    }
    std::process::exit(if failed.is_empty() { 0 } else { 1 });
}
