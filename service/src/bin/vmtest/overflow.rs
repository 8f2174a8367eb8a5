//! Scenario `overflow` (see its entry in `SCENARIOS`).

use super::*;

pub(crate) fn overflow(env: &Env) -> R {
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
