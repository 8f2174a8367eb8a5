//! The `blksnap` binary end to end: every command against an in-process engine (golden text
//! and `--json` outputs, exit codes, bad arguments), a backup chain (full + 5 incrementals with
//! random writes between takes, each point restored byte-identical to its image), a refused
//! incremental after a generation change, no progress output off a terminal, the long-running
//! commands (watcher, stretch), and the daemon backend over a socket.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blksnap_service::Daemon;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_blksnap");

struct Env {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    cfg: String,
}

/// Two devices (`/dev/vda` 8 MiB = 240:0, `/dev/vdb` 4 MiB = 251:1), 4 KiB CBT blocks and
/// chunks, a 256-sector storage step, fixed ids.
fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::File::create(dir.join("a.img")).unwrap().set_len(8 << 20).unwrap();
    std::fs::File::create(dir.join("b.img")).unwrap().set_len(4 << 20).unwrap();
    let cfg = format!(
        "# test devices\n/dev/vda={d}/a.img\n/dev/vdb={d}/b.img@251:1\nstate={d}/state\nseed=1\n\
         param.tracking_block_minimum_shift=12\nparam.chunk_minimum_shift=12\n\
         param.diff_storage_minimum_sectors=256\n",
        d = dir.display()
    );
    std::fs::write(dir.join("blksnap.conf"), &cfg).unwrap();
    let cfg = dir.join("blksnap.conf").display().to_string();
    Env { _tmp: tmp, dir, cfg }
}

struct Run {
    status: i32,
    out: String,
    err: String,
}

impl Env {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--in-process").arg(&self.cfg).args(args);
        c.env_remove("BLKSNAP_SOCKET");
        c
    }

    fn run(&self, args: &[&str]) -> Run {
        self.finish(self.cmd(args).output().unwrap())
    }

    fn finish(&self, o: Output) -> Run {
        let t = self.dir.display().to_string();
        Run {
            status: o.status.code().unwrap_or(-1),
            out: String::from_utf8(o.stdout).unwrap().replace(&t, "$T"),
            err: String::from_utf8(o.stderr).unwrap().replace(&t, "$T"),
        }
    }

    /// Runs, expects success and returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(r.status, 0, "{args:?}: {}{}", r.out, r.err);
        assert_eq!(r.err, "", "{args:?}");
        r.out
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ok(&a);
        assert_eq!(out.lines().count(), 1, "one JSON object: {out}");
        serde_json::from_str(&out).unwrap()
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn write(&self, dev: &str, offset: u64, data: &[u8]) {
        let f = std::fs::OpenOptions::new().write(true).open(self.dir.join(dev)).unwrap();
        f.write_all_at(data, offset).unwrap();
    }
}

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn version_attach_detach_cbtinfo() {
    let e = env();
    assert_eq!(e.ok(&["version"]), "2.0.0.0\n");
    let v = e.json(&["version"]);
    assert_eq!(v["version"], "2.0.0.0");
    assert_eq!(v["backend"], "in-process engine (state $T/state)");

    assert_eq!(e.ok(&["attach", "-d", "/dev/vda"]), "");
    assert_eq!(e.ok(&["attach", "--device", "/dev/vda"]), "already attached\n");
    let j = e.json(&["attach", "-d", "240:0"]);
    assert_eq!(
        j,
        serde_json::json!({"device": "240:0", "dev": "240:0", "attached": true,
                                     "already": true})
    );
    assert_eq!(
        e.ok(&["cbtinfo", "-d", "/dev/vda"]),
        "block_size=4096\ndevice_capacity=8388608\nblock_count=2048\n\
         generation_id=5e41ab08-7439-411e-901e-29a152c79fdd\nchanges_number=0\n"
    );
    // the backing path names the device too; -j after the command works as before it
    let j = e.json(&["cbtinfo", "-d", &e.path("a.img")]);
    assert_eq!(j["block_count"], 2048);
    assert_eq!(j["generation_id"], "5e41ab08-7439-411e-901e-29a152c79fdd");
    let r = e.run(&["cbtinfo", "-d", "/dev/vdb", "-j"]);
    assert_eq!(r.status, 1);
    assert_eq!(r.err, "blksnap cbtinfo: ENOENT: no filter attached\n");
    assert_eq!(
        r.out,
        "{\"command\":\"cbtinfo\",\"error\":{\"code\":2,\"errno\":\"ENOENT\",\
         \"message\":\"no filter attached\"}}\n"
    );
    assert_eq!(e.ok(&["detach", "-d", "/dev/vda"]), "");
    let r = e.run(&["detach", "-d", "/dev/vda"]);
    assert_eq!((r.status, r.err.as_str()), (1, "blksnap detach: ENOENT: no filter attached\n"));
    let r = e.run(&["attach", "-d", "/dev/sdz"]);
    assert_eq!(r.status, 1);
    assert_eq!(
        r.err,
        "blksnap attach: ENODEV: /dev/sdz is not a device of the in-process configuration\n"
    );
    // a new attach is a new generation
    e.ok(&["attach", "-d", "/dev/vda"]);
    let j = e.json(&["cbtinfo", "-d", "/dev/vda"]);
    assert_ne!(j["generation_id"], "5e41ab08-7439-411e-901e-29a152c79fdd");
}

#[test]
fn bad_arguments_are_explained() {
    let e = env();
    for (args, needle) in [
        (vec!["snapshot_take", "-i", "nope"], "`nope` is not a snapshot id"),
        (vec!["snapshot_take"], "--id <UUID>"),
        (vec!["markdirtyblock", "-d", "/dev/vda", "-r", "12"], "is not a range SECTOR:COUNT"),
        (vec!["markdirtyblock", "-d", "/dev/vda"], "required"),
        (vec!["snapshot_create", "-d", "/dev/vda", "-f", "/tmp"], "--limit <SIZE>"),
        (vec!["snapshot_create", "-f", "/tmp", "-l", "12X"], "is not a size"),
        (vec!["snapshot_info", "-d", "/dev/vda", "-f", "colour"], "invalid value 'colour'"),
        (vec!["frobnicate"], "unrecognized subcommand 'frobnicate'"),
        (vec!["snapshot_appendstorage", "-i", "5e41ab08-7439-411e-901e-29a152c79fdd"], "required"),
    ] {
        let r = e.run(&args);
        assert_eq!(r.status, 2, "{args:?}");
        assert!(r.err.contains(needle), "{args:?}: {}", r.err);
        assert_eq!(r.out, "");
    }
    // help everywhere
    for cmd in ["backup", "snapshot_create", "stretch_snapshot", "markdirtyblock", "verify"] {
        let r = e.run(&[cmd, "--help"]);
        assert_eq!(r.status, 0);
        assert!(r.out.contains("Usage: blksnap"), "{cmd}");
        assert!(r.out.contains("--json"), "{cmd}");
    }
    let r = e.run(&["--help"]);
    for cmd in ["snapshot_waitevent", "snapshot_appendstorage", "readcbtmap", "restore"] {
        assert!(r.out.contains(cmd), "{cmd}");
    }
    // a missing configuration, and a missing daemon
    let r = Command::new(BIN).args(["--in-process", "/nonexistent.conf", "version"]).output();
    let r = e.finish(r.unwrap());
    assert_eq!(r.status, 1);
    assert!(r.err.contains("ENOENT: --in-process /nonexistent.conf: no such configuration file"));
    let r = Command::new(BIN)
        .args(["--socket", "/nonexistent/control", "snapshot_collect"])
        .env_remove("BLKSNAP_SOCKET")
        .output()
        .unwrap();
    let r = e.finish(r);
    assert_eq!(r.status, 1);
    assert!(r.err.starts_with("blksnap snapshot_collect: ENOENT: cannot reach blksnapd at"));
}

#[test]
fn snapshot_lifecycle_golden() {
    let e = env();
    let got = e.ok(&["snapshot_create", "-d", "/dev/vda", "-d", "/dev/vdb"]);
    let id = got.trim().to_string();
    assert_eq!(got, "5e41ab08-7439-411e-901e-29a152c79fdd\n");
    assert_eq!(e.ok(&["snapshot_collect"]), format!("{id}\n"));
    assert_eq!(e.json(&["snapshot_collect"]), serde_json::json!({"snapshots": [id]}));
    // v3 storage: the create queued a low-space event
    assert_eq!(
        e.ok(&["snapshot_waitevent", "-i", &id, "-t", "0"]),
        "result=ok\ntime=0\nevent=low_free_space\nrequested_nr_sect=256\n"
    );
    assert_eq!(e.ok(&["snapshot_waitevent", "-i", &id]), "result=timeout\n");
    assert_eq!(
        e.json(&["snapshot_waitevent", "-i", &id, "-t", "5"]),
        serde_json::json!({"result": "timeout", "id": id})
    );
    // take without storage: EFAULT
    let r = e.run(&["snapshot_take", "-i", &id]);
    assert_eq!(r.status, 1);
    assert_eq!(r.err, "blksnap snapshot_take: EFAULT: append difference storage before the take\n");
    // a sparse file has no extents to give
    std::fs::File::create(e.dir.join("sparse")).unwrap().set_len(1 << 20).unwrap();
    let r = e.run(&["snapshot_appendstorage", "-i", &id, "-f", &e.path("sparse")]);
    if r.status == 1 {
        assert!(r.err.contains("EINVAL: $T/sparse has no allocated blocks"), "{}", r.err);
    }
    // ranges of a file given as a device (upstream's broken branch)
    std::fs::File::create(e.dir.join("store")).unwrap().set_len(4 << 20).unwrap();
    let j = e.json(&[
        "snapshot_appendstorage",
        "-i",
        &id,
        "-d",
        &e.path("store"),
        "-r",
        "0:2048",
        "4096:2048",
    ]);
    assert_eq!(j["ranges"], 2);
    assert_eq!(j["sectors"], 4096);
    assert_eq!(j["from"], "ranges");
    let r =
        e.run(&["snapshot_appendstorage", "-i", &id, "-d", &e.path("store"), "-r", "8:8", "0:16"]);
    assert_eq!(r.status, 1, "overlapping ranges in one append");
    assert!(r.err.starts_with("blksnap snapshot_appendstorage: EINVAL"), "{}", r.err);
    assert_eq!(e.ok(&["snapshot_info", "-d", "/dev/vda"]), "error_code=0\nimage=\n");
    assert_eq!(e.ok(&["snapshot_take", "-i", &id]), "");
    let r = e.run(&["snapshot_take", "-i", &id]);
    assert_eq!(
        (r.status, r.err.as_str()),
        (1, "blksnap snapshot_take: EALREADY: the snapshot is already taken\n")
    );
    assert_eq!(
        e.ok(&["snapshot_info", "-d", "/dev/vda"]),
        "error_code=0\nimage=$T/state/images/blksnap-240-0\n"
    );
    assert_eq!(
        e.ok(&["snapshot_info", "-d", "/dev/vdb", "-f", "image"]),
        "$T/state/images/blksnap-251-1\n"
    );
    assert_eq!(e.ok(&["snapshot_info", "-d", "/dev/vdb", "--field", "error-code"]), "0\n");
    let j = e.json(&["snapshot_info", "-d", "/dev/vdb"]);
    assert_eq!(j["error_code"], 0);
    assert_eq!(j["image"], "$T/state/images/blksnap-251-1");
    // the image keeps the content at take while the device is overwritten
    e.write("a.img", 4096, &[0xAB; 8192]);
    let img = std::fs::read(e.dir.join("state/images/blksnap-240-0")).unwrap();
    assert!(img.iter().all(|b| *b == 0));
    assert_eq!(e.ok(&["snapshot_info", "-d", "/dev/vda"]).lines().next(), Some("error_code=0"));
    // the map after the next take names what was written
    let r = e.run(&["snapshot_add", "-i", &id, "-d", "/dev/vda"]);
    assert_eq!(
        (r.status, r.err.as_str()),
        (1, "blksnap snapshot_add: EALREADY: the device is already in this snapshot\n")
    );
    assert_eq!(e.json(&["snapshot_destroy", "-i", &id])["destroyed"], true);
    assert!(!e.dir.join("state/images/blksnap-240-0").exists());
    let r = e.run(&["snapshot_destroy", "-i", &id]);
    assert_eq!(r.status, 1);
    assert!(r.err.starts_with("blksnap snapshot_destroy: ENODEV: "), "{}", r.err);
    let r = e.run(&["snapshot_waitevent", "-i", &id, "-t", "10"]);
    assert_eq!((r.status, r.out.as_str(), r.err.as_str()), (1, "result=not found\n", ""));
    let r = e.run(&["-j", "snapshot_waitevent", "-i", &id]);
    assert_eq!(r.status, 1);
    assert_eq!(r.out, format!("{{\"id\":\"{id}\",\"result\":\"not found\"}}\n"));
    assert_eq!(e.ok(&["snapshot_collect"]), "");

    // newest storage (directory), snapshot_add attaching the filter on ENOENT
    e.ok(&["detach", "-d", "/dev/vdb"]);
    let id2 = e.ok(&["snapshot_create", "-f", &e.path(""), "--limit", "2M"]).trim().to_string();
    assert_eq!(e.ok(&["snapshot_add", "-i", &id2, "-d", "/dev/vdb"]), "");
    e.ok(&["snapshot_take", "-i", &id2]);
    let map = e.path("map");
    assert_eq!(e.ok(&["readcbtmap", "-d", "/dev/vdb", "-f", &map]), "");
    assert_eq!(std::fs::read(&map).unwrap(), vec![0u8; 1024]);
    e.ok(&["snapshot_destroy", "-i", &id2]);
    let r = e.run(&["snapshot_create", "-d", "/dev/vda", "-f", &e.path("nonexistent"), "-l", "1M"]);
    assert_eq!(r.status, 1);
    assert_eq!(r.err, "blksnap snapshot_create: ENOENT: storage path does not exist\n");
}

#[test]
fn markdirtyblock_and_readcbtmap() {
    let e = env();
    e.ok(&["attach", "-d", "/dev/vda"]);
    // before any take the read map is marked with changes number 0 (nothing to see): take once
    let id = e.ok(&["snapshot_create", "-d", "/dev/vda", "-f", &e.path(""), "-l", "1M"]);
    e.ok(&["snapshot_take", "-i", id.trim()]);
    e.ok(&["snapshot_destroy", "-i", id.trim()]);
    let j = e.json(&["markdirtyblock", "-d", "/dev/vda", "-r", "0:8", "80:1", "16376:8"]);
    assert_eq!(j["ranges"], 3);
    assert_eq!(j["sectors"], 17);
    let map = e.path("map");
    e.ok(&["readcbtmap", "-d", "/dev/vda", "--file", &map]);
    let m = std::fs::read(&map).unwrap();
    assert_eq!(m.len(), 2048);
    let marked: Vec<usize> = (0..m.len()).filter(|i| m[*i] != 0).collect();
    assert_eq!(marked, vec![0, 10, 2047]);
    assert!(marked.iter().all(|i| m[*i] == 1), "marked with the previous number");
    let j = e.json(&["readcbtmap", "-d", "/dev/vda", "-f", &map]);
    assert_eq!(j["block_count"], 2048);
    // beyond the device: EINVAL, nothing applied
    let r = e.run(&["markdirtyblock", "-d", "/dev/vda", "-r", "0:8", "16384:8"]);
    assert_eq!(r.status, 1);
    assert!(r.err.starts_with("blksnap markdirtyblock: EINVAL"), "{}", r.err);
    // a file: its extents are on the device that holds it, which is not configured here
    e.write("a.img", 0, &[1; 4096]);
    std::fs::write(e.dir.join("f"), vec![7u8; 65536]).unwrap();
    let r = e.run(&["markdirtyblock", "-f", &e.path("f")]);
    assert_eq!(r.status, 1);
    assert!(r.err.contains("ENODEV: $T/f lives on device "), "{}", r.err);
    // a sparse file (upstream looped forever on one): the walk ends
    std::fs::File::create(e.dir.join("hole")).unwrap().set_len(1 << 30).unwrap();
    let t = Instant::now();
    let r = e.run(&["-j", "markdirtyblock", "-f", &e.path("hole"), "-d", "/dev/vda"]);
    assert!(t.elapsed() < Duration::from_secs(20));
    if r.status == 0 {
        let j: Value = serde_json::from_str(&r.out).unwrap();
        assert_eq!(j["ranges"], 0, "a file with only a hole has no extents");
    } else {
        assert!(r.err.contains("EOPNOTSUPP") || r.err.contains("ENOTTY"), "{}", r.err);
    }
}

/// A snapshot of `/dev/vda` on directory storage, taken; returns its id.
fn take(e: &Env) -> String {
    let id = e.ok(&["snapshot_create", "-d", "/dev/vda", "-f", &e.path("store/"), "-l", "8M"]);
    let id = id.trim().to_string();
    e.ok(&["snapshot_take", "-i", &id]);
    id
}

fn random_writes(e: &Env, seed: &mut u64, count: usize) -> usize {
    let mut bytes = 0;
    for _ in 0..count {
        let off = rng(seed) % ((8 << 20) - 65536);
        let len = 1 + (rng(seed) % 20000) as usize;
        let data: Vec<u8> = (0..len).map(|_| rng(seed) as u8).collect();
        e.write("a.img", off, &data);
        bytes += len;
    }
    bytes
}

#[test]
fn backup_chain_full_and_five_incrementals() {
    let e = env();
    std::fs::create_dir(e.dir.join("store")).unwrap();
    let target = e.path("backup");
    let mut seed = 0x5eed_u64;
    random_writes(&e, &mut seed, 40);
    e.ok(&["attach", "-d", "/dev/vda"]);
    let mut images = Vec::new();
    for point in 0..6u32 {
        let id = take(&e);
        // writes after the take: copy-on-write keeps the image, the next map names them
        let written = random_writes(&e, &mut seed, 12);
        let image = e.path("state/images/blksnap-240-0");
        let kept = e.path(&format!("image-{point}"));
        std::fs::copy(&image, &kept).unwrap();
        let j = e.json(&["backup", "--image", &image, "--target", &target, "-d", "/dev/vda"]);
        assert_eq!(j["point"], point);
        if point == 0 {
            assert_eq!(j["kind"], "full");
            assert_eq!(j["bytes_read"], 8 << 20);
        } else {
            assert_eq!(j["kind"], "incremental");
            let changed = j["blocks_changed"].as_u64().unwrap();
            assert!(changed > 0 && changed < 2048 / 4, "point {point}: {changed} blocks");
            assert_eq!(j["bytes_written"].as_u64().unwrap(), changed * 4096);
            // the previous cycle's writes, rounded out to 4 KiB blocks, at most
            assert!(j["bytes_written"].as_u64().unwrap() <= (written as u64 + 12 * 8192) * 2);
        }
        assert_eq!(
            e.ok(&["verify", "--image", &kept, "--target", &target]),
            format!("point={point}\nresult=identical\n")
        );
        e.ok(&["snapshot_destroy", "-i", &id]);
        images.push(kept);
    }
    // every point restores to its image, byte for byte
    for (n, kept) in images.iter().enumerate() {
        let out = e.path(&format!("restored-{n}"));
        let text = e.ok(&["restore", "--target", &target, "--point", &n.to_string(), "-o", &out]);
        assert_eq!(text, format!("point={n}\noutput=$T/restored-{n}\nbytes=8388608\n"));
        assert!(std::fs::read(&out).unwrap() == std::fs::read(kept).unwrap(), "point {n}");
        let r = e.run(&["verify", "--image", kept, "--target", &target, "--point", &n.to_string()]);
        assert_eq!(r.status, 0, "{}", r.out);
        if n > 0 {
            // and differs from its neighbour
            let r = e.run(&[
                "verify",
                "--image",
                &images[n - 1],
                "--target",
                &target,
                "--point",
                &n.to_string(),
            ]);
            assert_eq!(r.status, 1);
            assert!(r.out.contains("result=differs\nfirst_difference="), "{}", r.out);
        }
    }
    let r = e.run(&["restore", "--target", &target, "--point", "9", "-o", &e.path("x")]);
    assert_eq!(r.status, 1);
    assert!(r.err.contains("ENOENT: no point 9: $T/backup holds points 0 to 5"), "{}", r.err);
}

#[test]
fn generation_change_refuses_an_incremental() {
    let e = env();
    std::fs::create_dir(e.dir.join("store")).unwrap();
    let target = e.path("backup");
    let image = e.path("state/images/blksnap-240-0");
    e.ok(&["attach", "-d", "/dev/vda"]);
    let id = take(&e);
    e.ok(&["backup", "--image", &image, "--target", &target, "-d", "/dev/vda"]);
    e.ok(&["snapshot_destroy", "-i", &id]);
    // a new generation: detach and attach again
    e.ok(&["detach", "-d", "/dev/vda"]);
    e.ok(&["attach", "-d", "/dev/vda"]);
    e.write("a.img", 1 << 20, &[9; 4096]);
    let id = take(&e);
    let r = e.run(&["backup", "--image", &image, "--target", &target, "-d", "/dev/vda"]);
    assert_eq!(r.status, 1);
    assert!(r
        .err
        .starts_with("blksnap backup: ESTALE: generation changed: a full backup is needed"));
    assert_eq!(r.out, "");
    let r = e.run(&["-j", "backup", "--image", &image, "--target", &target, "-d", "/dev/vda"]);
    assert_eq!(r.status, 1);
    let j: Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(j["error"]["errno"], "ESTALE");
    // without --device no incremental is possible at all
    let r = e.run(&["backup", "--image", &image, "--target", &target]);
    assert_eq!(r.status, 1);
    assert!(r.err.contains("an incremental backup needs --device"), "{}", r.err);
    // --full starts a new chain; the next incremental builds on it
    let j = e.json(&["backup", "--image", &image, "--target", &target, "-d", "/dev/vda", "--full"]);
    assert_eq!((j["point"].as_u64(), j["kind"].as_str()), (Some(1), Some("full")));
    e.ok(&["snapshot_destroy", "-i", &id]);
    e.write("a.img", 3 << 20, &[5; 100]);
    let id = take(&e);
    let j = e.json(&["backup", "--image", &image, "--target", &target, "-d", "/dev/vda"]);
    assert_eq!((j["kind"].as_str(), j["blocks_changed"].as_u64()), (Some("incremental"), Some(1)));
    let kept = std::fs::read(&image).unwrap();
    assert_eq!(kept[3 << 20], 5);
    e.ok(&["verify", "--image", &image, "--target", &target]);
    e.ok(&["snapshot_destroy", "-i", &id]);
    // the old chain's point still restores
    let out = e.path("p0");
    e.ok(&["restore", "--target", &target, "--point", "0", "-o", &out]);
    assert!(std::fs::read(&out).unwrap().iter().all(|b| *b == 0));
}

#[test]
fn no_progress_output_off_a_terminal() {
    let e = env();
    e.write("a.img", 0, &[3; 1 << 20]);
    let target = e.path("backup");
    let image = e.path("a.img");
    let r = e.run(&["backup", "--image", &image, "--target", &target, "--full"]);
    assert_eq!((r.status, r.err.as_str()), (0, ""));
    assert!(r.out.lines().all(|l| l.split_once('=').is_some()), "key=value lines only: {}", r.out);
    assert!(!r.out.contains('\r') && !r.out.contains('\u{1b}'));
    assert!(r.out.starts_with("point=0\nkind=full\nfile=$T/backup/point-0000.img\nbytes_read=8388608\nbytes_written=1048576\n"), "{}", r.out);
    let r = e.run(&["--json", "backup", "--image", &image, "--target", &target, "--full"]);
    assert_eq!((r.status, r.err.as_str()), (0, ""));
    let j: Value = serde_json::from_str(r.out.trim()).unwrap();
    assert_eq!(r.out.trim_end().lines().count(), 1);
    assert_eq!(j["point"], 1);
    assert_eq!(j["bytes_written"], 1 << 20);
    for k in ["bytes_read", "blocks_changed", "seconds", "mb_per_s", "image_size"] {
        assert!(j.get(k).is_some(), "{k}");
    }
    let r = e.run(&["-j", "verify", "--image", &image, "--target", &target]);
    let j: Value = serde_json::from_str(r.out.trim()).unwrap();
    assert_eq!(j["identical"], true);
    assert_eq!(r.err, "");
}

fn spawn(e: &Env, args: &[&str]) -> Child {
    e.cmd(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

#[test]
fn watcher_prints_events_until_the_snapshot_is_gone() {
    let e = env();
    let id = e.ok(&["snapshot_create", "-d", "/dev/vda"]).trim().to_string();
    let watcher = spawn(&e, &["snapshot_watcher", "-i", &id]);
    let json = spawn(&e, &["--json", "snapshot_watcher", "-i", &id]);
    std::thread::sleep(Duration::from_millis(2500));
    e.ok(&["snapshot_destroy", "-i", &id]);
    let w = e.finish(watcher.wait_with_output().unwrap());
    let j = e.finish(json.wait_with_output().unwrap());
    assert_eq!((w.status, j.status), (0, 0), "{}{}", w.err, j.err);
    // one of the two got the create's event (each event goes to one waiter)
    let both = format!("{}{}", w.out, j.out);
    assert!(w.out.ends_with("snapshot is gone\n"), "{}", w.out);
    assert!(
        both.contains("time=0 event=low_free_space requested_nr_sect=256\n")
            || both.contains(r#"{"event":"low_free_space","requested_nr_sect":256,"time":0}"#),
        "{both}"
    );
    let last: Value = serde_json::from_str(j.out.lines().last().unwrap()).unwrap();
    assert_eq!(last, serde_json::json!({"id": id, "end": "gone"}));
    assert!(j.out.lines().all(|l| serde_json::from_str::<Value>(l).is_ok()), "JSON lines");
}

#[test]
fn stretch_grows_the_storage_and_cleans_up() {
    let e = env();
    std::fs::create_dir(e.dir.join("stretch")).unwrap();
    let id = e.ok(&["snapshot_create", "-d", "/dev/vdb"]).trim().to_string();
    let stretch =
        spawn(&e, &["stretch_snapshot", "-i", &id, "-p", &e.path("stretch/"), "-l", "64"]);
    // the create's low-space event makes stretch append a first file
    let deadline = Instant::now() + Duration::from_secs(60);
    while !e.dir.join("stretch/diff_storage#0").exists() {
        assert!(Instant::now() < deadline, "stretch did not append its first file");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    e.ok(&["snapshot_take", "-i", &id]);
    // small writes, with time for stretch to keep up (it looks once a second)
    for i in 0..12u64 {
        e.write("b.img", i * 8192, &[i as u8 + 1; 8192]);
        std::thread::sleep(Duration::from_millis(700));
    }
    let info = e.ok(&["snapshot_info", "-d", "/dev/vdb"]);
    assert!(info.starts_with("error_code=0\n"), "{info}");
    let img = std::fs::read(e.dir.join("state/images/blksnap-251-1")).unwrap();
    assert!(img.iter().all(|b| *b == 0), "image kept through growth");
    e.ok(&["snapshot_destroy", "-i", &id]);
    let s = e.finish(stretch.wait_with_output().unwrap());
    assert_eq!(s.status, 0, "{}{}", s.out, s.err);
    assert!(s.out.starts_with("time=0 event=low_free_space requested_nr_sect=256\nappended $T/stretch/diff_storage#0 (256 sectors)\n"), "{}", s.out);
    assert!(s.out.contains("appended $T/stretch/diff_storage#1"), "grew again: {}", s.out);
    assert!(s.out.ends_with("snapshot is gone\n"), "{}", s.out);
    let left: Vec<_> = std::fs::read_dir(e.dir.join("stretch")).unwrap().collect();
    assert!(left.is_empty(), "stretch removes its files at exit");
}

struct DaemonFixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    socket: PathBuf,
    daemon: Arc<Daemon>,
}

fn daemon() -> DaemonFixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let socket = dir.join("control");
    let daemon = common::serve_null(&socket, &dir);
    DaemonFixture { _tmp: tmp, dir, socket, daemon }
}

fn over_socket(socket: &Path, args: &[&str]) -> (i32, String, String) {
    let o = Command::new(BIN).env("BLKSNAP_SOCKET", socket).args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8(o.stdout).unwrap(),
        String::from_utf8(o.stderr).unwrap(),
    )
}

#[test]
fn daemon_backend_over_the_socket() {
    let f = daemon();
    let disk = f.dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(8 << 20).unwrap();
    let disk = disk.display().to_string();
    let s = f.socket.as_path();
    let (st, out, _) = over_socket(s, &["version", "--json"]);
    assert_eq!(st, 0);
    let j: Value = serde_json::from_str(&out).unwrap();
    assert!(j["backend"].as_str().unwrap().starts_with("blksnapd "), "{j}");
    // attach serves a file that is not served yet
    let (st, out, err) = over_socket(s, &["attach", "-d", &disk]);
    assert_eq!((st, out.as_str(), err.as_str()), (0, "device=/dev/null-blksnap-240-0\n", ""));
    assert_eq!(over_socket(s, &["attach", "-d", &disk]).1, "already attached\n");
    let (st, out, _) = over_socket(s, &["cbtinfo", "-d", "240:0"]);
    assert_eq!(st, 0);
    assert!(out.starts_with("block_size=65536\ndevice_capacity=8388608\nblock_count=128\n"));
    let store = f.dir.join("store");
    std::fs::create_dir(&store).unwrap();
    let (st, out, err) = over_socket(
        s,
        &["snapshot_create", "-d", &disk, "-f", &store.display().to_string(), "-l", "16M"],
    );
    assert_eq!(st, 0, "{err}");
    let id = out.trim().to_string();
    assert_eq!(over_socket(s, &["snapshot_collect"]).1, format!("{id}\n"));
    assert_eq!(over_socket(s, &["snapshot_take", "-i", &id]).0, 0);
    let (st, out, _) = over_socket(s, &["snapshot_info", "-d", &disk]);
    assert_eq!((st, out.as_str()), (0, "error_code=0\nimage=/dev/null-blksnap-241-0\n"));
    // the image lives in the engine only (null front end): back it up from a file copy
    let engine = f.daemon.engine();
    let dev = blksnap_model::DeviceId::new(240, 0);
    engine.write(dev, 0, &[1; 65536]).unwrap();
    let mut img = vec![0u8; 8 << 20];
    engine.image_read(dev, 0, &mut img).unwrap();
    let image = f.dir.join("image");
    std::fs::write(&image, &img).unwrap();
    let target = f.dir.join("backup").display().to_string();
    let image = image.display().to_string();
    let (st, _, err) =
        over_socket(s, &["backup", "--image", &image, "--target", &target, "-d", &disk]);
    assert_eq!(st, 0, "{err}");
    assert_eq!(over_socket(s, &["snapshot_destroy", "-i", &id]).0, 0);
    let (st, out, _) = over_socket(s, &["snapshot_waitevent", "-i", &id, "-t", "10"]);
    assert_eq!((st, out.as_str()), (1, "result=not found\n"));
    let (st, _, err) = over_socket(s, &["snapshot_take", "-i", &id]);
    assert_eq!((st, err.as_str()), (1, "blksnap snapshot_take: ESRCH: no such snapshot\n"));
    // next cycle: the 64 KiB written above is one changed block
    let (_, out, _) = over_socket(
        s,
        &["snapshot_create", "-d", &disk, "-f", &store.display().to_string(), "-l", "16M"],
    );
    let id = out.trim().to_string();
    assert_eq!(over_socket(s, &["snapshot_take", "-i", &id]).0, 0);
    engine.image_read(dev, 0, &mut img).unwrap();
    std::fs::write(&image, &img).unwrap();
    let (st, out, err) =
        over_socket(s, &["-j", "backup", "--image", &image, "--target", &target, "-d", &disk]);
    assert_eq!(st, 0, "{err}");
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((j["kind"].as_str(), j["blocks_changed"].as_u64()), (Some("incremental"), Some(1)));
    assert_eq!(over_socket(s, &["verify", "--image", &image, "--target", &target]).0, 0);
    assert_eq!(over_socket(s, &["snapshot_destroy", "-i", &id]).0, 0);
    assert_eq!(over_socket(s, &["detach", "-d", &disk]).0, 0);
    f.daemon.shutdown();
}

#[test]
fn device_add_remove_list_over_the_socket_and_in_process() {
    let f = daemon();
    let disk = f.dir.join("plain.img");
    std::fs::File::create(&disk).unwrap().set_len(4 << 20).unwrap();
    let disk = disk.display().to_string();
    let s = f.socket.as_path();
    assert_eq!(over_socket(s, &["device", "list"]), (0, String::new(), String::new()));
    // served without tracking: a node, no filter
    let (st, out, err) = over_socket(s, &["device", "add", &disk, "--no-attach"]);
    assert_eq!((st, out.as_str(), err.as_str()), (0, "/dev/null-blksnap-240-0\n", ""));
    let (st, _, err) = over_socket(s, &["cbtinfo", "-d", "240:0"]);
    assert_eq!((st, err.as_str()), (1, "blksnap cbtinfo: ENOENT: no filter attached\n"));
    let (st, out, _) = over_socket(s, &["device", "list"]);
    assert_eq!(st, 0);
    assert_eq!(out, format!("240:0 /dev/null-blksnap-240-0 origin 4194304 {disk}\n"));
    let (st, out, _) = over_socket(s, &["--json", "device", "list"]);
    assert_eq!(st, 0);
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["devices"][0]["device"], "240:0");
    assert_eq!(j["devices"][0]["role"], "origin");
    assert_eq!(j["devices"][0]["backing"], disk.as_str());
    // a second add of the same backing is refused
    let (st, _, err) = over_socket(s, &["device", "add", &disk]);
    assert_ne!(st, 0, "{err}");
    // removed by its backing's name; then gone
    let (st, out, err) = over_socket(s, &["device", "remove", &disk]);
    assert_eq!((st, out.as_str(), err.as_str()), (0, "", ""));
    assert_eq!(over_socket(s, &["device", "list"]).1, "");
    let (st, _, err) = over_socket(s, &["device", "remove", "240:0"]);
    assert_ne!(st, 0, "removing a device that is gone fails: {err}");
    // in-process: the configured devices; add and remove are EOPNOTSUPP
    let e = env();
    let out = e.ok(&["device", "list"]);
    assert!(out.starts_with("240:0 /dev/vda origin 8388608 "), "{out}");
    let r = e.run(&["device", "add", &e.path("a.img")]);
    assert!(r.status != 0 && r.err.contains("EOPNOTSUPP"), "{}", r.err);
}
