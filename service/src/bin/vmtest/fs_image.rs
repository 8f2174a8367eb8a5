//! Scenario `fs-image` (see its entry in `SCENARIOS`).

use super::*;

pub(crate) fn fs_image(env: &Env) -> R {
    let (origin, dev) = env.origins()?.remove(0);
    let mut c = env.client()?;
    mkfs(&origin)?;
    let om = env.path("origin");
    mount(&origin, &om, "rw")?;
    let before = write_files(&om, "f", 40, 1)?;
    let id = env.snapshot(&mut c, 32, &[dev])?;
    c.req(Request::SnapshotTake { id })?;
    // After the take: overwrite half, delete a quarter, add new ones.
    let mut after = write_files(&om, "f", 20, 2)?;
    for i in 20..30 {
        std::fs::remove_file(om.join(format!("f{i:03}"))).map_err(|e| e.to_string())?;
    }
    after.extend(write_files(&om, "new", 10, 3)?);
    sync();
    // The image, through both link names.
    let v3 = image_link(dev, true);
    let newest = image_link(dev, false);
    for l in [&v3, &newest] {
        let target = std::fs::read_link(l).map_err(|e| format!("{l}: {e}"))?;
        ensure!(target.display().to_string().starts_with("/dev/ublkb"), "{l} -> {target:?}");
    }
    let Reply::SnapshotInfo { error_code: 0, image: Some(img), image_path: Some(_) } =
        c.req(Request::SnapshotInfo { dev })?
    else {
        return Err("SnapshotInfo: no image".into());
    };
    ensure!(img == dev, "image of {img:?}");
    fsck(&v3)?;
    let im = env.path("image");
    mount(&v3, &im, "ro")?;
    verify_files(&im, &before)?;
    verify_files(&om, &after)?;
    for i in 30..40 {
        let name = format!("f{i:03}");
        ensure!(before.contains_key(&name), "bookkeeping");
    }
    umount(&im)?;
    c.req(Request::SnapshotDestroy { id })?;
    ensure!(!Path::new(&v3).exists() && !Path::new(&newest).exists(), "links left after destroy");
    // The origin keeps being served after the destroy.
    let more = write_files(&om, "post", 5, 4)?;
    sync();
    umount(&om)?;
    drop_caches();
    fsck(&origin)?;
    mount(&origin, &om, "ro")?;
    verify_files(&om, &after)?;
    verify_files(&om, &more)?;
    umount(&om)?;
    let live = env.daemon.engine().live();
    ensure!(live.snapshots == 0 && live.diff_areas == 0, "engine objects left: {live:?}");
    Ok(())
}
