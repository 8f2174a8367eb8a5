//! Scenario `datapath`: the service's data path against the device under it, measured with fio
//! (direct I/O, io_uring — libaio when the kernel refuses io_uring) in one boot, and a
//! `fio --verify` run with a take in the middle whose image must equal the pre-take copy (the
//! only assertion besides fio's own errors: the table's ratios are printed, never asserted).
//!
//! The raw device is a memory-backed `null_blk` made through configfs (`nullb0`, completion
//! latency 50 µs; the full run adds 0 µs); the difference storage is a second one (`nullb1`).
//! Targets: raw `nullb0`; the kernel loop driver with direct I/O over it; blksnapd serving it
//! with no tracker (pass-through), tracking, after a take (first writes of one 4 KiB block per
//! chunk, then rewrites of copied chunks), and the image. Without null_blk the raw device is a
//! loop device over a tmpfs file (said in the output).
//!
//! Full runs measure two daemons in the same boot, in turn: "before" (one request at a time per
//! queue, buffered backing: the data path as it was) and "now" (the defaults).
//!
//! Short by default (CI: the defaults only, 1 s per run, 50 µs only, tracking and taken rows);
//! `BLKSNAP_DATAPATH_FULL=1` (`BLKSNAP_DATAPATH_RUNTIME_SECS` to change the 5 s per run) for the
//! README table. `BLKSNAP_DATAPATH_VERIFY_ONLY=N` runs the verify run alone, N times (a soak of
//! take under load).

use super::*;
use blksnap_service::config::ZeroCopy;
use blksnap_service::daemon::backing_io::DirectIo;
use blksnap_service::ublk::{io_served_again, zero_copy_available};

/// The raw device's size and the regions the workloads use (all within it).
const DEV_MIB: u64 = 160;
/// Random and sequential workloads run over the first `REGION_MIB`.
const REGION_MIB: u64 = 32;
/// First writes: QD1 over [`FIRST1_AT_MIB`, +16 MiB), QD32 over [`FIRST32_AT_MIB`, +32 MiB).
const FIRST1_AT_MIB: u64 = 64;
const FIRST32_AT_MIB: u64 = 96;
/// The verify run's region.
const VERIFY_AT_MIB: u64 = 40;
const VERIFY_MIB: u64 = 4;
/// Chunk size the engine picks for a 160 MiB disk (256 KiB: `chunk_minimum_shift` 18).
const CHUNK_BYTES: u64 = 256 << 10;

const NULLB: &str = "/sys/kernel/config/nullb";

/// One fio workload.
#[derive(Clone, Copy)]
struct Load {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    qd: u32,
}

const LOADS: [Load; 4] = [
    Load { name: "4k randwrite QD1", rw: "randwrite", bs: "4k", qd: 1 },
    Load { name: "4k randwrite QD32", rw: "randwrite", bs: "4k", qd: 32 },
    Load { name: "4k randread QD32 cold", rw: "randread", bs: "4k", qd: 32 },
    Load { name: "1M seqwrite QD8", rw: "write", bs: "1M", qd: 8 },
];

struct Fio {
    bin: PathBuf,
    engine: &'static str,
    runtime_secs: u64,
}

impl Fio {
    fn new(runtime_secs: u64) -> R<Fio> {
        let bin = sibling("fio")?;
        Ok(Fio { bin, engine: "io_uring", runtime_secs })
    }

    /// Runs fio; (IOPS, MB/s) summed over reads and writes (terse v3 fields).
    fn run(&self, file: &str, args: &[String]) -> R<(f64, f64)> {
        let mut all = vec![
            "--name=dp".to_string(),
            format!("--filename={file}"),
            "--direct=1".into(),
            format!("--ioengine={}", self.engine),
            "--minimal".into(),
        ];
        all.extend(args.iter().cloned());
        let mut cmd = Command::new(&self.bin);
        cmd.args(&all);
        let out = run_client(cmd, &format!("fio {}", all.join(" ")))?;
        let f: Vec<&str> = out.lines().last().unwrap_or("").split(';').collect();
        ensure!(f.len() > 50, "fio output: {out}");
        let num = |i: usize| f[i].parse::<f64>().unwrap_or(0.0);
        ensure!(num(4) == 0.0, "fio error {}: {out}", f[4]);
        Ok((num(7) + num(48), (num(6) + num(47)) * 1024.0 / 1e6))
    }

    /// A timed workload over the bench region.
    fn load(&self, file: &str, l: Load) -> R<(f64, f64)> {
        if l.rw == "randread" {
            drop_caches();
        }
        self.run(
            file,
            &[
                format!("--rw={}", l.rw),
                format!("--bs={}", l.bs),
                format!("--iodepth={}", l.qd),
                format!("--size={REGION_MIB}M"),
                format!("--runtime={}", self.runtime_secs),
                "--time_based".into(),
                "--ramp_time=0".into(),
                "--randrepeat=0".into(),
            ],
        )
    }

    /// One 4 KiB write into each chunk of [at, at + mib) (every write a first write after a
    /// take: a copy-on-write); IOPS.
    fn first_writes(&self, file: &str, at_mib: u64, mib: u64, qd: u32) -> R<f64> {
        let skip = CHUNK_BYTES - 4096;
        self.run(
            file,
            &[
                format!("--rw=write:{skip}"),
                "--bs=4k".into(),
                format!("--iodepth={qd}"),
                format!("--offset={at_mib}M"),
                format!("--size={mib}M"),
            ],
        )
        .map(|r| r.0)
    }

    /// Sequential 1 MiB writes over [at, at + mib), untimed (fills or copies a region).
    fn fill(&self, file: &str, at_mib: u64, mib: u64) -> R {
        let a = [
            "--rw=write".into(),
            "--bs=1M".into(),
            "--iodepth=8".into(),
            format!("--offset={at_mib}M"),
            format!("--size={mib}M"),
        ];
        self.run(file, &a).map(drop)
    }
}

/// A memory-backed null_blk named `name` (configfs), `mib` MiB, `completion_nsec` latency.
fn nullb_create(name: &str, mib: u64, completion_nsec: u64) -> R<String> {
    let dir = format!("{NULLB}/{name}");
    std::fs::create_dir(&dir).map_err(|e| format!("{dir}: {e}"))?;
    for (k, v) in [
        ("size", mib.to_string()),
        ("memory_backed", "1".into()),
        ("irqmode", "2".into()),
        ("completion_nsec", completion_nsec.to_string()),
        ("blocksize", "4096".into()),
        ("power", "1".into()),
    ] {
        std::fs::write(format!("{dir}/{k}"), &v).map_err(|e| format!("{dir}/{k}={v}: {e}"))?;
    }
    let node = format!("/dev/{name}");
    let t = Instant::now();
    while !Path::new(&node).exists() {
        ensure!(t.elapsed() < Duration::from_secs(10), "{node} did not appear");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(node)
}

fn nullb_remove(name: &str) {
    let dir = format!("{NULLB}/{name}");
    let _ = std::fs::write(format!("{dir}/power"), "0");
    let _ = std::fs::remove_dir(&dir);
}

/// Whether configfs null_blk is usable (configfs mounted here when needed).
fn nullb_available() -> bool {
    if !Path::new("/sys/module/null_blk").exists() {
        return false;
    }
    if !Path::new(NULLB).exists() {
        let _ = run("mount", &["-t", "configfs", "none", "/sys/kernel/config"]);
    }
    Path::new(NULLB).exists()
}

/// `losetup` of `file`, then LOOP_SET_BLOCK_SIZE 4096 (direct I/O needs the loop's logical
/// block size to cover the backing's) and LOOP_SET_DIRECT_IO (busybox's losetup has neither).
fn loop_dio(file: &str) -> R<String> {
    let lo = run("losetup", &["-f"])?.trim().to_string();
    run("losetup", &[&lo, file])?;
    let f = OpenOptions::new().read(true).open(&lo).map_err(|e| format!("{lo}: {e}"))?;
    const LOOP_SET_DIRECT_IO: libc::c_ulong = 0x4C08;
    const LOOP_SET_BLOCK_SIZE: libc::c_ulong = 0x4C09;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    // SAFETY: ioctls with integer arguments on a descriptor we own.
    let rc = unsafe { libc::ioctl(fd, LOOP_SET_BLOCK_SIZE, 4096) };
    if rc != 0 {
        println!("    note: {lo}: LOOP_SET_BLOCK_SIZE: {}", std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    let rc = unsafe { libc::ioctl(fd, LOOP_SET_DIRECT_IO, 1) };
    if rc != 0 {
        println!(
            "    note: {lo}: LOOP_SET_DIRECT_IO: {} (buffered loop)",
            std::io::Error::last_os_error()
        );
    }
    Ok(lo)
}

type Row = (String, Vec<Option<f64>>);

fn cell(v: Option<f64>, raw: Option<f64>, lo: Option<f64>) -> String {
    match (v, raw, lo) {
        (Some(v), Some(r), Some(l)) => format!("{v:8.0} {:4.2}/{:4.2}", v / r, v / l),
        (Some(v), _, _) => format!("{v:8.0}          "),
        _ => format!("{:>18}", "-"),
    }
}

fn print_table(title: &str, rows: &[Row], heads: &[&str]) {
    println!("    {title}  (value, ratio to raw / to loop)");
    let h: Vec<String> = heads.iter().map(|h| format!("{h:>18}")).collect();
    println!("    {:26}{}", "", h.join(" "));
    let raw = &rows[0].1;
    let lo = &rows[1].1;
    for (name, vals) in rows {
        let c: Vec<String> =
            vals.iter().enumerate().map(|(i, v)| cell(*v, raw[i], lo[i])).collect();
        println!("    {name:26}{}", c.join(" "));
    }
}

/// The metric of a workload: MB/s for the 1 MiB sequential write, IOPS otherwise.
fn metric(l: Load, r: (f64, f64)) -> f64 {
    if l.bs == "1M" {
        r.1
    } else {
        r.0
    }
}

/// The daemons compared in one boot: the data path as it was (one request at a time per queue,
/// buffered backing) and as configured now (defaults).
struct Variant<'a> {
    name: &'a str,
    env: &'a Env,
}

/// What one variant measured: its rows, first-write IOPS at QD1 and QD32.
struct Served {
    rows: Vec<Row>,
    first1: f64,
    first32: f64,
}

/// The blksnapd rows of one variant over `raw` (snapshot storage on `storage_dev`).
fn served(v: &Variant, fio: &Fio, raw: &str, storage_dev: &str, full: bool) -> R<Served> {
    let env = v.env;
    let dev_id = env.daemon.add_origin(Path::new(raw), false).map_err(|e| format!("{e:?}"))?;
    let dev = Dev { major: dev_id.major, minor: dev_id.minor };
    let origin = env
        .origins()?
        .into_iter()
        .find(|(_, d)| *d == dev)
        .map(|(p, _)| p)
        .ok_or("origin missing")?;
    let mut c = env.client()?;
    let mut rows: Vec<Row> = Vec::new();
    let measure = |file: &str| -> R<Vec<Option<f64>>> {
        LOADS.iter().map(|l| fio.load(file, *l).map(|r| Some(metric(*l, r)))).collect()
    };
    if full {
        rows.push(("pass-through".into(), measure(&origin)?));
    }
    c.req(Request::Attach { dev })?;
    rows.push(("tracking".into(), measure(&origin)?));
    let Reply::Created(id) = c.req(Request::SnapshotCreate {
        storage: Storage::File { path: storage_dev.into(), limit_sectors: DEV_MIB * MIB / 512 },
    })?
    else {
        return Err("SnapshotCreate: unexpected reply".into());
    };
    c.req(Request::SnapshotAdd { id, dev })?;
    c.req(Request::SnapshotTake { id })?;
    let scale = if full { 1 } else { 2 };
    let first1 = fio.first_writes(&origin, FIRST1_AT_MIB, 16 / scale, 1)?;
    let first32 = fio.first_writes(&origin, FIRST32_AT_MIB, 32 / scale, 32)?;
    // every chunk of the region copied: what follows are rewrites
    fio.fill(&origin, 0, REGION_MIB)?;
    rows.push(("taken: rewrites".into(), measure(&origin)?));
    if full {
        rows.push(("image".into(), measure(&image_link(dev, false))?));
    }
    c.req(Request::SnapshotDestroy { id })?;
    c.req(Request::RemoveDevice { dev })?;
    Ok(Served { rows, first1, first32 })
}

/// One pass of the benchmark over a raw device with `completion_nsec`, every variant in turn.
fn pass(variants: &[Variant], fio: &Fio, completion_nsec: u64, full: bool) -> R {
    let env = variants[0].env;
    let (raw, storage_dev) = if nullb_available() {
        (nullb_create("nullb0", DEV_MIB, completion_nsec)?, nullb_create("nullb1", DEV_MIB, 0)?)
    } else {
        println!(
            "    note: no null_blk in this kernel: the raw device is a loop device over tmpfs"
        );
        let (a, b) = (env.path("raw.img"), env.path("storage.img"));
        sparse_file(&a, DEV_MIB * MIB)?;
        sparse_file(&b, DEV_MIB * MIB)?;
        (loop_dio(&a.display().to_string())?, loop_dio(&b.display().to_string())?)
    };
    // the whole device written once: memory-backed pages exist, reads are not of holes
    fio.fill(&raw, 0, DEV_MIB)?;
    let lo = loop_dio(&raw)?;
    let result = (|| -> R {
        let n = LOADS.len();
        let mut base: Vec<Row> =
            ["raw", "kernel loop (dio)"].iter().map(|s| (s.to_string(), vec![None; n])).collect();
        for (i, l) in LOADS.iter().enumerate() {
            for (row, file) in [(0, &raw), (1, &lo)] {
                base[row].1[i] = Some(metric(*l, fio.load(file, *l)?));
            }
        }
        let heads: Vec<&str> =
            LOADS.iter().map(|l| if l.bs == "1M" { "MB/s" } else { "IOPS" }).collect();
        println!(
            "    completion latency {} us; {}: {}",
            completion_nsec / 1000,
            heads.join("/"),
            LOADS.map(|l| l.name).join(", ")
        );
        for v in variants {
            let got = served(v, fio, &raw, &storage_dev, full)?;
            let mut rows = base.clone();
            rows.extend(got.rows.into_iter().map(|(name, r)| (format!("blksnapd {name}"), r)));
            print_table(&format!("data path, {}", v.name), &rows, &heads);
            println!(
                "    taken: first writes (4 KiB into each 256 KiB chunk): QD1 {:.0} IOPS, \
                 QD32 {:.0} IOPS",
                got.first1, got.first32
            );
            goals(&rows, got.first1, got.first32);
        }
        Ok(())
    })();
    let _ = run("losetup", &["-d", &lo]);
    if raw.starts_with("/dev/loop") {
        let _ = run("losetup", &["-d", &raw]);
        let _ = run("losetup", &["-d", &storage_dev]);
    } else {
        nullb_remove("nullb0");
        nullb_remove("nullb1");
    }
    result
}

/// The goals next to the measured ratios (targets, not assertions).
fn goals(rows: &[Row], first1: f64, first32: f64) {
    let row = |name: &str| rows.iter().position(|(n, _)| n == name).unwrap_or(0);
    let (tracking, taken) = (row("blksnapd tracking"), row("blksnapd taken: rewrites"));
    let v = |row: usize, col: usize| rows[row].1[col].unwrap_or(0.0);
    let ratio = |row: usize, col: usize| v(row, col) / v(0, col).max(f64::MIN_POSITIVE);
    let show = |what: &str, got: f64, goal: f64| {
        let mark = if got >= goal { "met" } else { "NOT met" };
        println!("    goal {what:52} >= {goal:4.2}: {got:5.2} ({mark})");
    };
    show("tracking 4k randwrite QD32 / raw", ratio(tracking, 1), 0.8);
    show("taken (rewrites) 4k randwrite QD32 / raw", ratio(taken, 1), 0.8);
    show("tracking 4k randread QD32 cold / raw", ratio(tracking, 2), 0.8);
    show("tracking 1M seqwrite QD8 / raw", ratio(tracking, 3), 0.7);
    let gain = |row: usize| v(row, 1) / v(row, 0).max(f64::MIN_POSITIVE);
    show("tracking QD32/QD1 randwrite gain / raw's gain", gain(tracking) / gain(0), 0.8);
    show("first writes QD32 / QD1", first32 / first1.max(f64::MIN_POSITIVE), 4.0);
}

/// fio writes a region with verification headers; while a second fio rewrites it with
/// verification, it is stopped (SIGSTOP; in-flight I/O drains), the region copied, the snapshot
/// taken, fio continued: fio's verify must be clean and the image must equal the copy.
fn verify_across_take(env: &Env, fio: &Fio, origin: &str, dev: Dev, what: &str) -> R {
    let origin = origin.to_string();
    let mut c = env.client()?; // (attached)
    let common = |rw: &str| {
        vec![
            format!("--rw={rw}"),
            "--bs=4k".into(),
            "--iodepth=16".into(),
            format!("--offset={VERIFY_AT_MIB}M"),
            format!("--size={VERIFY_MIB}M"),
            "--verify=crc32c".into(),
            "--do_verify=1".into(),
            "--verify_fatal=1".into(),
        ]
    };
    let mut first = common("write");
    first[1] = "--bs=64k".into(); // headers for the region, quickly (rewritten at 4 KiB below)
    fio.run(&origin, &first)?;
    let storage = env.path("verify-diff.img");
    sparse_file(&storage, 64 * MIB)?;
    let Reply::Created(id) = c.req(Request::SnapshotCreate {
        storage: Storage::File {
            path: storage.display().to_string(),
            limit_sectors: 64 * MIB / 512,
        },
    })?
    else {
        return Err("SnapshotCreate: unexpected reply".into());
    };
    c.req(Request::SnapshotAdd { id, dev })?;
    let mut args = common("randwrite");
    // long enough to be still writing at the take (asserted below)
    args.extend(["--loops=6".to_string(), "--randrepeat=0".into()]);
    let mut all = vec![
        "--name=verify".to_string(),
        // one process: SIGSTOP below stops the job itself (fio forks a process per job otherwise)
        "--thread".into(),
        format!("--filename={origin}"),
        "--direct=1".into(),
        format!("--ioengine={}", fio.engine),
    ];
    all.extend(args);
    let child = Command::new(&fio.bin)
        .args(&all)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("fio: {e}"))?;
    std::thread::sleep(Duration::from_millis(1500));
    let mut child = child;
    ensure!(
        child.try_wait().map_err(|e| e.to_string())?.is_none(),
        "fio finished before the take: the verify run tests nothing (make it longer)"
    );
    let pid = child.id() as i32;
    // SAFETY: signals to our own child by its pid.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_millis(500));
    let region = (VERIFY_AT_MIB * MIB, VERIFY_MIB * MIB);
    let copy = read_region(&origin, region)?;
    // The copy is the pre-take content only if fio really stopped (its job is a thread of the
    // stopped process: `--thread`); a second read a moment later proves it.
    std::thread::sleep(Duration::from_millis(200));
    let moved = differing_blocks(&copy, &read_region(&origin, region)?).len();
    if moved > 0 {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = child.wait_with_output();
        return Err(format!("{moved} blocks of the origin changed while fio was stopped"));
    }
    let took = c.req(Request::SnapshotTake { id });
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    took?;
    let out = child.wait_with_output().map_err(|e| format!("fio: {e}"))?;
    ensure!(
        out.status.success(),
        "fio --verify across the take: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let image = read_region(&image_link(dev, false), region)?;
    let same = image == copy;
    let now = read_region(&origin, region)?;
    let changed = now != copy;
    if !same {
        // What kind of difference: post-take data in the image (a copy-on-write missed), or
        // something else; and whether the image reads the same twice.
        let again = read_region(&image_link(dev, false), region)?;
        let differ = differing_blocks(&image, &copy);
        let post_take =
            differ.iter().filter(|i| image[*i * 4096..][..4096] == now[*i * 4096..][..4096]);
        println!(
            "    image != pre-take copy in {} of {} 4 KiB blocks (first {:?}); {} of them hold \
             the origin's current data; a second image read differs from the first in {}",
            differ.len(),
            copy.len() / 4096,
            &differ[..differ.len().min(8)],
            post_take.count(),
            differing_blocks(&image, &again).len()
        );
    }
    c.req(Request::SnapshotDestroy { id })?;
    ensure!(same, "the image differs from the pre-take copy of the verify region");
    ensure!(changed, "the origin was not written after the take: copy-on-write was not tested");
    println!(
        "    {what}: fio --verify=crc32c clean across a take; image == pre-take copy \
         ({VERIFY_MIB} MiB; origin changed after the take: {changed})"
    );
    Ok(())
}

/// The 4 KiB blocks in which `a` and `b` differ.
fn differing_blocks(a: &[u8], b: &[u8]) -> Vec<usize> {
    (0..a.len().min(b.len()) / 4096)
        .filter(|i| a[i * 4096..][..4096] != b[i * 4096..][..4096])
        .collect()
}

/// Both ways an origin write can go, verified across a take: the environment's file backing
/// (buffered: every request through the queue workers) and a block device served with direct
/// I/O (reads and copy-free writes on the queue's io_uring, under write tickets) — on devices
/// whose data mode must be `zero_copy` (else the run would test the other mode unawares).
fn verify_both_ways(env: &Env, fio: &Fio, zero_copy: bool) -> R {
    let Some((origin, dev)) = env.origins()?.into_iter().next() else {
        return Err("no origin for the verify run".into());
    };
    let mode = if zero_copy { "zero copy" } else { "copying" };
    expect_mode(&origin, zero_copy)?;
    verify_across_take(env, fio, &origin, dev, &format!("file backing (workers), {mode}"))?;
    with_direct_origin(env, "nullb0", |origin, dev| {
        expect_mode(origin, zero_copy)?;
        let what = format!("block device, direct (queue io_uring), {mode}");
        verify_across_take(env, fio, origin, dev, &what)?;
        // a 4 KiB-aligned range (the queue's io_uring may take it) and a 512-byte-aligned one
        // (the workers: the backing's blocks are 4 KiB)
        for at_bytes in [SKEWED_AT_BYTES, SKEWED_AT_BYTES + MIB + 512] {
            skewed_buffers(origin, at_bytes)?;
        }
        println!("    null_blk, direct, {mode}: O_DIRECT from 4-byte-aligned buffers round-trips");
        Ok(())
    })?;
    // The kernel loop driver's direct I/O refuses such pages (EINVAL) where null_blk takes them:
    // on a zero-copy device the fixed write and read fail and are served again by user copy.
    with_direct_origin(env, "loop-skewed", |origin, _| {
        let before = io_served_again();
        skewed_buffers(origin, SKEWED_AT_BYTES)?;
        let again = io_served_again() - before;
        if zero_copy {
            ensure!(again >= 2, "the loop device took skewed pages: the fallback went untested");
        }
        println!(
            "    loop device, direct, {mode}: O_DIRECT from 4-byte-aligned buffers round-trips \
             ({again} I/Os on the queue's io_uring refused and served again)"
        );
        Ok(())
    })
}

/// Where [`skewed_buffers`] writes: past the verify region.
const SKEWED_AT_BYTES: u64 = (VERIFY_AT_MIB + VERIFY_MIB + 1) * MIB;

/// `O_DIRECT` writes and reads of 8 KiB from buffers 4 bytes past a page boundary — the least
/// alignment the ublk device accepts (its DMA alignment stays the driver's default) — at a
/// sector-aligned offset `at_bytes` outside the verify region. On a zero-copy device a backing
/// that wants more alignment refuses such pages for its own direct I/O (the loop driver does,
/// null_blk does not), so this exercises the fallback (user copy); either way the data must
/// round-trip and equal a page-aligned read.
fn skewed_buffers(origin: &str, at_bytes: u64) -> R {
    const LEN_BYTES: usize = 8192;
    let f = open_direct(origin, true).map_err(|e| format!("{origin}: {e}"))?;
    let skewed = |raw: &mut Vec<u8>| {
        let skew = (4096 - raw.as_ptr() as usize % 4096) % 4096 + 4;
        skew..skew + LEN_BYTES
    };
    let mut out = vec![0u8; LEN_BYTES + 8192];
    let r = skewed(&mut out);
    for (i, b) in out[r.clone()].iter_mut().enumerate() {
        *b = (i * 31 % 253) as u8 ^ 0x5a;
    }
    f.write_all_at(&out[r.clone()], at_bytes).map_err(|e| format!("skewed O_DIRECT write: {e}"))?;
    let mut back = vec![0u8; LEN_BYTES + 8192];
    let rb = skewed(&mut back);
    f.read_exact_at(&mut back[rb.clone()], at_bytes)
        .map_err(|e| format!("skewed O_DIRECT read: {e}"))?;
    ensure!(back[rb] == out[r.clone()], "skewed O_DIRECT: the data read back differs");
    // the same bytes through a page-aligned buffer (the page holding the range's start)
    let page_at = at_bytes & !4095;
    let page = pread_page(&f, page_at).map_err(|e| format!("aligned O_DIRECT read: {e}"))?;
    let into_page = (at_bytes - page_at) as usize;
    ensure!(
        page.0[into_page..] == out[r.start..r.start + 4096 - into_page],
        "skewed O_DIRECT: a page-aligned read sees other data"
    );
    Ok(())
}

/// Runs `f` on a tracked origin that `env`'s daemon serves over a fresh memory-backed null_blk
/// `name` (a loop device with direct I/O over tmpfs when the kernel has no null_blk, or when
/// `name` starts with "loop"): a block device, so direct I/O and the queue's io_uring path.
/// Removed afterwards.
fn with_direct_origin(env: &Env, name: &str, f: impl FnOnce(&str, Dev) -> R) -> R {
    let raw = if nullb_available() && !name.starts_with("loop") {
        nullb_create(name, DEV_MIB, 0)?
    } else {
        let file = env.path(&format!("{name}.img"));
        sparse_file(&file, DEV_MIB * MIB)?;
        loop_dio(&file.display().to_string())?
    };
    let result = (|| -> R {
        let dev_id = env.daemon.add_origin(Path::new(&raw), true).map_err(|e| format!("{e:?}"))?;
        let dev = Dev { major: dev_id.major, minor: dev_id.minor };
        let found = env.origins()?.into_iter().find(|(_, d)| *d == dev);
        let result = match found {
            Some((origin, _)) => f(&origin, dev),
            None => Err("the direct origin is not served".into()),
        };
        env.daemon.remove_origin(dev_id).map_err(|e| format!("{e:?}"))?;
        result
    })();
    if raw.starts_with("/dev/loop") {
        let _ = run("losetup", &["-d", &raw]);
    } else {
        nullb_remove(name);
    }
    result
}

fn read_region(path: &str, (at, len): (u64, u64)) -> R<Vec<u8>> {
    let f = File::open(path).map_err(|e| format!("{path}: {e}"))?;
    let mut buf = vec![0u8; len as usize];
    drop_caches();
    f.read_exact_at(&mut buf, at).map_err(|e| format!("{path}: {e}"))?;
    Ok(buf)
}

pub(crate) fn datapath(env: &Env) -> R {
    let full = std::env::var("BLKSNAP_DATAPATH_FULL").is_ok_and(|v| v == "1");
    let runtime_secs = std::env::var("BLKSNAP_DATAPATH_RUNTIME_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 5 } else { 1 });
    let mut fio = Fio::new(runtime_secs)?;
    // BLKSNAP_DATAPATH_VERIFY_ONLY=N: the verify run alone, N times (a soak of take under load)
    let verify_only: u32 = std::env::var("BLKSNAP_DATAPATH_VERIFY_ONLY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // io_uring may be disabled by sysctl; libaio then
    let probe = env.path("probe");
    sparse_file(&probe, MIB)?;
    let p = probe.display().to_string();
    if fio.run(&p, &["--rw=read".into(), "--bs=4k".into(), "--size=64k".into()]).is_err() {
        fio.engine = "libaio";
        println!("    note: fio's io_uring engine failed here: libaio");
    }
    // BLKSNAP_DATAPATH_PERF="<fio rw> <bs> <qd>": that workload alone on the tracked origin under
    // `perf record -a -g -e cpu-clock` (the host's perf, copied in beside fio); prints the top
    // of the report (where the CPU goes, guest kernel and daemon alike).
    if let Ok(spec) = std::env::var("BLKSNAP_DATAPATH_PERF") {
        return profile(env, &fio, &spec);
    }
    // the defaults use zero copy where the kernel offers it; a second daemon copies (the
    // fallback of older kernels, and the benchmark's comparison)
    let zero_copy = zero_copy_available();
    println!(
        "    ublk zero copy: {}",
        if zero_copy { "offered: the defaults use it" } else { "not offered: copying only" }
    );
    let copying = Env::with("datapath-copying", &[64 * MIB], |cfg| {
        cfg.ublk_zero_copy = ZeroCopy::Never;
    })?;
    let verify = |round: &str| -> R {
        println!("    verify{round}: the defaults");
        verify_both_ways(env, &fio, zero_copy)?;
        println!("    verify{round}: ublk_zero_copy = \"never\"");
        verify_both_ways(&copying, &fio, false)
    };
    if verify_only > 0 {
        for round in 1..=verify_only {
            verify(&format!(" round {round} of {verify_only}"))?;
        }
        return Ok(());
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "    conditions: qemu TCG, {cpus} vCPUs, fio {} direct=1, {runtime_secs} s per run, \
         blksnapd in-process with 2 queues of depth 32",
        fio.engine
    );
    // The data path as it was, in the same boot (full runs): one request at a time per queue,
    // buffered. BLKSNAP_DATAPATH_VARIANTS=1 adds the steps apart (workers only, direct only).
    // The CI's short run measures the defaults only.
    let steps = std::env::var("BLKSNAP_DATAPATH_VARIANTS").is_ok_and(|v| v == "1");
    let mut envs = Vec::new();
    if full || steps {
        envs.push((
            "before (1 request per queue, buffered backing)",
            Env::with("datapath-before", &[], |cfg| {
                cfg.queue_workers = 0;
                cfg.backing_direct_io = DirectIo::Never;
            })?,
        ));
    }
    if steps {
        envs.push((
            "queue workers, buffered backing",
            Env::with("datapath-workers", &[], |cfg| cfg.backing_direct_io = DirectIo::Never)?,
        ));
        envs.push((
            "defaults but origin reads through the workers",
            Env::with("datapath-no-uring", &[], |cfg| cfg.queue_uring = false)?,
        ));
        envs.push((
            "1 request per queue, direct backing",
            Env::with("datapath-direct", &[], |cfg| cfg.queue_workers = 0)?,
        ));
    }
    let mut variants: Vec<Variant> = envs.iter().map(|(name, env)| Variant { name, env }).collect();
    if (full || steps) && zero_copy {
        variants
            .push(Variant { name: "defaults but copying (ublk_zero_copy = never)", env: &copying });
    }
    variants.push(Variant { name: "now (defaults)", env });
    let latencies: &[u64] = if full { &[0, 50_000] } else { &[50_000] };
    for ns in latencies {
        pass(&variants, &fio, *ns, full)?;
    }
    verify("")?;
    sparse_backing(env)
}

/// See `BLKSNAP_DATAPATH_PERF` in [`datapath`].
fn profile(env: &Env, fio: &Fio, spec: &str) -> R {
    let perf = sibling("perf")?;
    let [rw, bs, qd] = spec.split_whitespace().collect::<Vec<_>>()[..] else {
        return Err(format!("BLKSNAP_DATAPATH_PERF={spec:?}: want \"<rw> <bs> <qd>\""));
    };
    with_direct_origin(env, "nullb0", |origin, _| perf_record(fio, &perf, origin, (rw, bs, qd)))
}

fn perf_record(fio: &Fio, perf: &Path, origin: &str, (rw, bs, qd): (&str, &str, &str)) -> R {
    let data = Path::new("/tmp/blksnap-datapath-perf.data");
    let mut cmd = Command::new(perf);
    cmd.args(["record", "-a", "-g", "-e", "cpu-clock", "-o"]).arg(data).arg("--").arg(&fio.bin);
    cmd.args([
        "--name=perf".to_string(),
        format!("--filename={origin}"),
        "--direct=1".into(),
        format!("--ioengine={}", fio.engine),
        format!("--rw={rw}"),
        format!("--bs={bs}"),
        format!("--iodepth={qd}"),
        format!("--size={REGION_MIB}M"),
        format!("--runtime={}", fio.runtime_secs),
        "--time_based".into(),
    ]);
    println!("{}", run_client(cmd, "perf record")?);
    let mut report = Command::new(perf);
    report.args([
        "report",
        "--stdio",
        "--no-children",
        "--sort",
        "comm,dso,sym",
        "-g",
        "none",
        "-i",
    ]);
    report.arg(data);
    let out = run_client(report, "perf report")?;
    for line in out.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).take(45) {
        println!("    {line}");
    }
    Ok(())
}

/// Bytes allocated to a file (`st_blocks`).
fn allocated_bytes(path: &Path) -> R<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.blocks() * 512).map_err(|e| e.to_string())
}

/// `FITRIM` over the whole filesystem mounted at `dir` (busybox has no fstrim); bytes trimmed.
fn fitrim(dir: &Path) -> R<u64> {
    #[repr(C)]
    struct FstrimRange {
        start: u64,
        len: u64,
        minlen: u64,
    }
    const FITRIM: libc::c_ulong = 0xC018_5879; // _IOWR('X', 121, struct fstrim_range)
    let f = File::open(dir).map_err(|e| e.to_string())?;
    let mut r = FstrimRange { start: 0, len: u64::MAX, minlen: 0 };
    // SAFETY: FITRIM reads and writes the struct through the valid pointer.
    let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), FITRIM, &mut r) };
    ensure!(rc == 0, "FITRIM: {}", std::io::Error::last_os_error());
    Ok(r.len)
}

/// A sparse 4 GiB backing file served by blksnapd (tracking) stays sparse: mkfs.ext4 (which
/// discards the device first), a 64 MiB file written and deleted, fstrim — the backing's
/// allocated bytes printed after each step; asserted: mkfs allocates under 256 MiB, and the
/// trim gives back the deleted file's blocks.
pub(crate) fn sparse_backing(env: &Env) -> R {
    let backing = env.path("sparse4g.img");
    sparse_file(&backing, 4 << 30)?;
    let dev_id = env.daemon.add_origin(&backing, true).map_err(|e| format!("{e:?}"))?;
    let dev = Dev { major: dev_id.major, minor: dev_id.minor };
    let (node, _) = env.origins()?.into_iter().find(|(_, d)| *d == dev).ok_or("no origin")?;
    let mib = |b: u64| b as f64 / MIB as f64;
    let fresh = allocated_bytes(&backing)?;
    let fstype = super::take_freezes::mkfs_journaled(&node)?;
    let after_mkfs = allocated_bytes(&backing)?;
    let mnt = env.path("sparse-mnt");
    super::take_freezes::mount_as(fstype, &node, &mnt, "rw")?;
    let mut data = vec![0u8; 64 << 20];
    fill(7, &mut data);
    std::fs::write(mnt.join("big"), &data).map_err(|e| e.to_string())?;
    sync();
    let after_write = allocated_bytes(&backing)?;
    std::fs::remove_file(mnt.join("big")).map_err(|e| e.to_string())?;
    sync();
    let trimmed = fitrim(&mnt)?;
    let after_trim = allocated_bytes(&backing)?;
    umount(&mnt)?;
    env.client()?.req(Request::RemoveDevice { dev })?;
    println!(
        "    sparse 4 GiB backing, allocated MiB: new {:.1}, after mkfs.{fstype} {:.1}, after a \
         64 MiB file {:.1}, after rm + fstrim ({:.0} MiB trimmed) {:.1}",
        mib(fresh),
        mib(after_mkfs),
        mib(after_write),
        mib(trimmed),
        mib(after_trim)
    );
    ensure!(after_mkfs < 256 * MIB, "mkfs allocated {:.0} MiB of the backing", mib(after_mkfs));
    ensure!(
        after_trim + 32 * MIB < after_write,
        "fstrim gave back too little: {:.1} -> {:.1} MiB",
        mib(after_write),
        mib(after_trim)
    );
    Ok(())
}
