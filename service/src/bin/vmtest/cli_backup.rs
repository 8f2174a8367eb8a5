//! Scenario `cli-backup` (see its entry in `SCENARIOS`).

use super::*;

/// The README's backup session, typed as a user would: the `blksnap` CLI against `blksnapd`,
/// images under `/dev/blksnap-*`, a filesystem on the device; restores checked file by file.
pub(crate) fn cli_backup(env: &Env) -> R {
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
