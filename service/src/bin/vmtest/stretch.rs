//! Scenario `stretch` (see its entry in `SCENARIOS`).

use super::*;

/// `stretch_snapshot` against blksnapd (v3 storage grown on demand): a 4 MiB storage step
/// (`--param`), the tool appending a preallocated file at each low-space event while 24 MiB are
/// written to the mounted origin; the snapshot never overflows, its image is the pre-take
/// filesystem, and destroy ends the tool, which removes its files.
pub(crate) fn stretch(env: &Env) -> R {
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
