//! Scenario `take-freezes`: TAKE through `blksnapd` freezes the filesystem mounted on the
//! origin, as the kernel module does. ext4 (made by the host's `mke2fs`, shipped next to this
//! program by `service/vm/run-tests.sh`; ext2 from busybox if it is missing) on the origin,
//! files and a directory written just before the take with no `sync`, and no freezing by the
//! scenario: the image fscks clean and holds every file with its content. A control run with
//! `--no-freeze` shows what the image holds without the daemon's freeze (printed, not
//! asserted: it depends on writeback timing). The asserted run is repeated over a loop device
//! (a block device: direct I/O, reads and copy-free writes on the queue's io_uring).

use super::*;

/// Makes a filesystem on `dev`: ext4 with the shipped `mke2fs`, else busybox's ext2. Returns
/// the type to mount it with.
pub(crate) fn mkfs_journaled(dev: &str) -> R<&'static str> {
    match sibling("mke2fs") {
        Ok(mke2fs) => {
            let mke2fs = mke2fs.display().to_string();
            run(&mke2fs, &["-t", "ext4", "-F", "-q", "-b", "4096", dev])?;
            Ok("ext4")
        }
        Err(_) => {
            println!("    no mke2fs shipped (service/vm/run-tests.sh): ext2 instead of ext4");
            mkfs(dev)?;
            Ok("ext2")
        }
    }
}

pub(crate) fn mount_as(fstype: &str, dev: &str, dir: &Path, opts: &str) -> R {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    run("mount", &["-t", fstype, "-o", opts, dev, &dir.display().to_string()]).map(drop)
}

/// Files and a directory written with no sync: name (relative) → checksum.
fn write_unsynced(om: &Path, seed: u64) -> R<BTreeMap<String, u64>> {
    let mut files = write_files(om, "late", 5, seed)?;
    let sub = om.join("dir");
    std::fs::create_dir_all(&sub).map_err(|e| e.to_string())?;
    for (name, sum) in write_files(&sub, "in", 3, seed + 1)? {
        files.insert(format!("dir/{name}"), sum);
    }
    Ok(files)
}

/// Takes a snapshot of the mounted origin right after writing files without sync; returns how
/// many of them the image holds intact (and the image checked clean by fsck when `check`).
fn take_and_count(
    env: &Env,
    d: &DaemonProc,
    fstype: &str,
    seed: u64,
    check: bool,
) -> R<(usize, usize)> {
    let (node, dev) = d.origin()?;
    let om = env.path("origin");
    mount_as(fstype, &node, &om, "rw")?;
    let base = write_files(&om, "base", 10, seed)?;
    sync();
    let late = write_unsynced(&om, seed + 10)?;
    let mut c = d.client()?;
    let storage = env.path("diff.img");
    sparse_file(&storage, 32 * MIB)?;
    let Reply::Created(id) = c.req(Request::SnapshotCreate {
        storage: Storage::File {
            path: storage.display().to_string(),
            limit_sectors: 32 * MIB / 512,
        },
    })?
    else {
        return Err("SnapshotCreate".into());
    };
    c.req(Request::SnapshotAdd { id, dev })?;
    let t = Instant::now();
    c.req(Request::SnapshotTake { id })?;
    let took_ms = t.elapsed().as_millis();
    // The origin keeps being written after the take; none of it may show in the image.
    write_files(&om, "after", 3, seed + 20)?;
    let Reply::SnapshotInfo { error_code: 0, image_path: Some(image), .. } =
        c.req(Request::SnapshotInfo { dev })?
    else {
        return Err("SnapshotInfo: no image".into());
    };
    let counted = (|| -> R<usize> {
        if check {
            fsck(&image)?;
        }
        let im = env.path("image");
        // `noload`: a control image taken without freezing may need journal recovery, which a
        // read-only mount of it would otherwise refuse or replay.
        let opts = if fstype == "ext4" { "ro,noload" } else { "ro" };
        mount_as(fstype, &image, &im, opts)?;
        let r = (|| {
            verify_files(&im, &base)?;
            ensure!(!im.join("after000").exists(), "a file written after the take is in the image");
            Ok(late
                .iter()
                .filter(|(name, sum)| {
                    std::fs::read(im.join(name)).is_ok_and(|data| fnv(&data) == **sum)
                })
                .count())
        })();
        umount(&im)?;
        r
    })();
    c.req(Request::SnapshotDestroy { id })?;
    umount(&om)?;
    let n = counted?;
    println!("    take in {took_ms} ms: {n} of {} unsynced files in the image", late.len());
    Ok((n, late.len()))
}

pub(crate) fn take_freezes(env: &Env) -> R {
    let backing = env.path("tf.img");
    sparse_file(&backing, 64 * MIB)?;
    let d = DaemonProc::start(env, &backing, 2)?;
    let (node, _) = d.origin()?;
    let fstype = mkfs_journaled(&node)?;
    println!("    {fstype} on {node}, frozen by blksnapd");
    let (n, total) = take_and_count(env, &d, fstype, 61, true)?;
    ensure!(n == total, "only {n} of {total} files written before the take are in the image");
    // The origin is thawed and clean.
    fsck(&node)?;
    drop(d);

    // The same on a block-device backing (a loop device): served with direct I/O, so the
    // filesystem's reads and copy-free writes go on the queue's io_uring, the writes under
    // write tickets that the take waits for.
    let file = env.path("tf-loop.img");
    sparse_file(&file, 64 * MIB)?;
    let lo = run("losetup", &["-f"])?.trim().to_string();
    run("losetup", &[&lo, &file.display().to_string()])?;
    let _ = std::fs::remove_dir_all(env.path("state"));
    let on_loop = (|| -> R {
        let d = DaemonProc::start(env, Path::new(&lo), 2)?;
        let (node, _) = d.origin()?;
        mkfs_journaled(&node)?;
        println!("    {fstype} on {node} over {lo} (direct I/O, the queue's io_uring)");
        let (n, total) = take_and_count(env, &d, fstype, 81, true)?;
        ensure!(n == total, "over {lo}: only {n} of {total} files written before the take");
        fsck(&node)
    })();
    let _ = run("losetup", &["-d", &lo]);
    on_loop?;

    // Control: the same without the daemon's freeze.
    let backing = env.path("tf-control.img");
    sparse_file(&backing, 64 * MIB)?;
    let _ = std::fs::remove_dir_all(env.path("state"));
    let links = env.path("links");
    let d = DaemonProc::start_args(env, Some(&backing), 2, &links, &["newest"], &["--no-freeze"])?;
    let (node, _) = d.origin()?;
    mkfs_journaled(&node)?;
    let (n, total) = take_and_count(env, &d, fstype, 71, false)?;
    println!("    control with --no-freeze: {n} of {total} unsynced files in the image");
    Ok(())
}
