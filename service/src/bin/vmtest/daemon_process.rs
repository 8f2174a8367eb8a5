//! Scenario `daemon-process` (see its entry in `SCENARIOS`).

use super::*;

pub(crate) fn daemon_process(env: &Env) -> R {
    // `env` has no devices: this scenario runs the real binary.
    let bin = sibling("blksnapd")?;
    let backing = env.path("d.img");
    sparse_file(&backing, 16 * MIB)?;
    let socket = env.path("d.sock");
    let links = env.path("links");
    std::fs::create_dir_all(&links).map_err(|e| e.to_string())?;
    let args: Vec<String> = [
        "--socket",
        &socket.display().to_string(),
        "--link-dir",
        &links.display().to_string(),
        "--image-link",
        "newest",
        "--state-dir",
        &env.path("state").display().to_string(),
        "--queues",
        "1",
        "--device",
        &backing.display().to_string(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let mut child =
        Command::new(&bin).args(&args).stdin(Stdio::null()).spawn().map_err(|e| e.to_string())?;
    let result = (|| -> R {
        let t = Instant::now();
        let mut c = loop {
            if let Ok(c) = Client::connect(&socket) {
                break c;
            }
            ensure!(t.elapsed() < Duration::from_secs(20), "blksnapd did not come up");
            std::thread::sleep(Duration::from_millis(50));
        };
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&socket).map_err(|e| e.to_string())?.permissions(),
        );
        ensure!(mode & 0o777 == 0o600, "socket mode {mode:o}");
        let Reply::Version { protocol, .. } = c.req(Request::Version)? else {
            return Err("Version".into());
        };
        ensure!(protocol == blksnap_proto::PROTOCOL_VERSION, "protocol {protocol}");
        let Reply::Devices(list) = c.req(Request::ListDevices)? else {
            return Err("ListDevices".into());
        };
        ensure!(list.len() == 1, "devices: {list:?}");
        let (node, dev) = (list[0].path.clone(), list[0].dev);
        let f = open_direct(&node, true).map_err(|e| e.to_string())?;
        pwrite_page(&f, 0, b"one").map_err(|e| e.to_string())?;
        let storage = env.path("d.diff");
        sparse_file(&storage, 4 * MIB)?;
        let Reply::Created(id) = c.req(Request::SnapshotCreate {
            storage: Storage::File {
                path: storage.display().to_string(),
                limit_sectors: 4 * MIB / 512,
            },
        })?
        else {
            return Err("create".into());
        };
        c.req(Request::SnapshotAdd { id, dev })?;
        c.req(Request::SnapshotTake { id })?;
        pwrite_page(&f, 0, b"two").map_err(|e| e.to_string())?;
        let link = links.join(format!("blksnap-{}-{}", dev.major, dev.minor));
        let img = open_direct(&link.display().to_string(), false).map_err(|e| e.to_string())?;
        let p = pread_page(&img, 0).map_err(|e| e.to_string())?;
        ensure!(&p.0[..3] == b"one", "image content");
        drop(f);
        // SIGTERM: clean stop while a snapshot is taken and its image is open. Snapshots do
        // not survive a stop: the image goes and its I/O fails; the origin is kept (default).
        // SAFETY: plain kill(2) of our own child by its pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
                break s;
            }
            ensure!(t.elapsed() < Duration::from_secs(20), "blksnapd did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        };
        ensure!(status.success(), "blksnapd exit: {status}");
        ensure!(!socket.exists() && !link.exists(), "socket or link left behind");
        let image_read = pread_page(&img, 0).map(drop);
        ensure!(image_read.is_err(), "the image of a stopped daemon still reads");
        drop(img);
        ensure!(Path::new(&node).exists(), "{node} removed by a default clean stop");
        let mut data = vec![0u8; 3];
        File::open(&backing)
            .and_then(|mut f| f.read_exact(&mut data))
            .map_err(|e| e.to_string())?;
        ensure!(data == b"two", "backing content after stop");
        // The next daemon takes the device over; with --remove-devices-on-stop its clean stop
        // removes it.
        child = Command::new(&bin)
            .args(&args)
            .arg("--remove-devices-on-stop")
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let t = Instant::now();
        let mut c = loop {
            if let Ok(c) = Client::connect(&socket) {
                break c;
            }
            ensure!(t.elapsed() < Duration::from_secs(20), "blksnapd did not come up again");
            std::thread::sleep(Duration::from_millis(50));
        };
        let Reply::Devices(list) = c.req(Request::ListDevices)? else {
            return Err("ListDevices".into());
        };
        ensure!(list.len() == 1 && list[0].path == node, "not taken over: {list:?}");
        let f = open_direct(&node, false).map_err(|e| e.to_string())?;
        let p = pread_page(&f, 0).map_err(|e| e.to_string())?;
        ensure!(&p.0[..3] == b"two", "origin content after the take-over");
        drop(f);
        // SAFETY: plain kill(2) of our own child by its pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().map_err(|e| e.to_string())?;
        ensure!(status.success(), "blksnapd exit: {status}");
        ensure!(wait_gone(&node, 10), "{node} left by a stop with --remove-devices-on-stop");
        println!("    image I/O after the stop: {image_read:?}; origin kept, taken over, removed");
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}
