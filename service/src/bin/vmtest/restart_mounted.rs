//! Scenario `restart-mounted`: a clean restart of `blksnapd` (a clean stop keeps the devices by
//! default) while a filesystem is mounted on its device and a writer keeps going. ext4 (ext2 without the shipped mke2fs)
//! on the origin, files written without sync, a writer creating and fsyncing files; SIGTERM,
//! a clean exit, a start of the binary again: the same `/dev/ublkbN` is taken over, the mount
//! survives, the writer goes on, every file verifies, fsck is clean after unmount, and the CBT
//! keeps its generation and `changes_number`, with every block marked before the stop still
//! marked; the next take marks the blocks written across the restart (writes made during the
//! stop wait in the kernel and are tracked by the new daemon). A failure unmounts before the
//! daemon stops, so no later scenario meets a mount on a device nobody serves. At the end, a
//! daemon started with `--remove-devices-on-stop` takes the device over and removes it at its
//! stop.

use super::offline_write::take_destroy;
use super::take_freezes::{mkfs_journaled, mount_as};
use super::*;

pub(crate) fn restart_mounted(env: &Env) -> R {
    let backing = env.path("rm.img");
    sparse_file(&backing, 64 * MIB)?;
    let links = env.path("links");
    let mut d = DaemonProc::start_args(env, Some(&backing), 2, &links, &["newest"], &[])?;
    let (node, dev) = d.origin()?;
    let fstype = mkfs_journaled(&node)?;
    let om = env.path("origin");
    mount_as(fstype, &node, &om, "rw")?;
    let result = with_mount(env, &mut d, &node, dev, fstype, &om);
    if result.is_err() {
        let _ = umount(&om);
    }
    result?;
    // The old behaviour on request: a clean stop of a daemon started with
    // --remove-devices-on-stop removes the device (after taking it over).
    d.stop()?;
    ensure!(Path::new(&node).exists(), "{node} removed by a default clean stop");
    d.args.push("--remove-devices-on-stop".into());
    d.restart()?;
    ensure!(d.origin()?.0 == node, "{node} not taken over");
    d.stop()?;
    ensure!(wait_gone(&node, 10), "{node} left by a clean stop with --remove-devices-on-stop");
    Ok(())
}

fn with_mount(env: &Env, d: &mut DaemonProc, node: &str, dev: Dev, fstype: &str, om: &Path) -> R {
    let before = write_files(om, "f", 20, 101)?;
    take_destroy(env, d, dev)?;
    let unsynced = write_files(om, "u", 5, 102)?;
    let (info1, map1) = d.cbt(dev)?;
    let (stop, progress, writer) = background_writer(om, 2000)?;
    let stopped = (|| -> R<(u128, u64, u128)> {
        let t = Instant::now();
        d.stop()?;
        let stopped_ms = t.elapsed().as_millis();
        let at_stop = progress.load(Ordering::Relaxed);
        ensure!(Path::new(node).exists(), "{node} removed by a default clean stop");
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        d.restart()?;
        Ok((stopped_ms, at_stop, t.elapsed().as_millis()))
    })();
    let checked = stopped.and_then(|(stopped_ms, at_stop, restarted_ms)| {
        let (node2, dev2) = d.origin()?;
        ensure!(node2 == node && dev2 == dev, "not taken over: {node}/{dev:?} -> {node2}/{dev2:?}");
        let (info2, map2) = d.cbt(dev)?;
        ensure!(
            info2.generation_id == info1.generation_id,
            "CBT generation changed by a clean restart"
        );
        ensure!(info2.changes_number == info1.changes_number, "{info1:?} -> {info2:?}");
        ensure!(map2 == map1, "cbtmap changed by a clean restart");
        let deadline = Instant::now() + Duration::from_secs(30);
        while progress.load(Ordering::Relaxed) < at_stop + 5 {
            ensure!(Instant::now() < deadline, "the writer made no progress after the restart");
            ensure!(!writer.is_finished(), "the writer failed after the restart");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((stopped_ms, at_stop, restarted_ms))
    });
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().map_err(|_| "writer panicked")?;
    let (stopped_ms, at_stop, restarted_ms) = checked?;
    let written = written?;
    sync();
    // the next take marks what was written since the first one, across the restart
    take_destroy(env, d, dev)?;
    let (info3, map3) = d.cbt(dev)?;
    ensure!(info3.generation_id == info1.generation_id, "generation changed by a take");
    ensure!(info3.changes_number == info1.changes_number + 1, "{info1:?} -> {info3:?}");
    let new = map3.iter().filter(|b| **b == info3.changes_number).count();
    ensure!(new > 0, "no block marked by the writes made across the restart");
    for (b, (old, now)) in map1.iter().zip(&map3).enumerate() {
        ensure!(*old == 0 || *now >= *old, "block {b}: marked {old} before the stop, {now} after");
    }
    for files in [&before, &unsynced, &written] {
        verify_files(om, files)?;
    }
    umount(om)?;
    drop_caches();
    fsck(node)?;
    mount_as(fstype, node, om, "ro")?;
    for files in [&before, &unsynced, &written] {
        verify_files(om, files)?;
    }
    umount(om)?;
    println!(
        "    {fstype}: stop {stopped_ms} ms, restart {restarted_ms} ms; writer at {at_stop} rounds at the stop, {} files in all; generation kept, {new} blocks marked by the next take",
        written.len()
    );
    Ok(())
}
