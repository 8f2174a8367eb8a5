//! Scenario `recovery` (see its entry in `SCENARIOS`).

use super::*;

pub(crate) fn recovery(env: &Env) -> R {
    let backing = env.path("rec.img");
    sparse_file(&backing, 64 * MIB)?;
    let mut d = DaemonProc::start(env, &backing, 2)?;
    let (node, dev) = d.origin()?;
    // the device keeps the data mode it was added with across the recovery (zero copy where
    // the kernel offers it: the daemon's default)
    let zero_copy = blksnap_service::ublk::zero_copy_available();
    expect_mode(&node, zero_copy)?;
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
    expect_mode(&node2, zero_copy)?;
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
    d.finish()?;
    println!(
        "    writer at {at_kill} rounds at kill -9, {} files in all; recovery took {recovered_ms} ms; \
         zero copy {zero_copy} before and after",
        written.len()
    );
    Ok(())
}
