//! Scenario `destroy-mounted` (see its entry in `SCENARIOS`).

use super::*;

pub(crate) fn destroy_mounted(env: &Env) -> R {
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
