//! Scenario `preload-daemon` (see its entry in `SCENARIOS`).

use super::*;

/// An upstream-style client (ffi/tests-c/preload_daemon.c: open/ioctl/pread/pwrite only),
/// dynamically linked, run under the LD_PRELOAD shim in client mode against blksnapd: the shim
/// serves /dev/blksnap-control and the BLKFILTER_* requests on the real ublk device; data I/O
/// and the images (the daemon's /dev links) are the kernel's.
pub(crate) fn preload_daemon(env: &Env) -> R {
    let shim = sibling("libblksnap-preload.so")?;
    let backing = env.path("pd.img");
    sparse_file(&backing, 32 * MIB)?;
    let d = DaemonProc::start_linked(env, Some(&backing), 1, Path::new("/dev"), &["v3", "newest"])?;
    let (node, _) = d.origin()?;
    for profile in ["v3", "newest"] {
        let bin = sibling(&format!("preload_daemon_{profile}"))?;
        let dir = env.path(&format!("pd-{profile}"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(bin);
        cmd.args([node.as_str(), &dir.display().to_string()])
            .env("LD_PRELOAD", &shim)
            .env("BLKSNAP_SOCKET", &d.socket)
            .env("BLKSNAP_PROFILE", profile);
        let t = Instant::now();
        let out = run_client(cmd, &format!("preload_daemon {profile}"))?;
        println!("    {} ({} ms)", out.trim(), t.elapsed().as_millis());
    }
    // Nothing left behind: no snapshot; the device is still served and tracked.
    let mut c = d.client()?;
    let Reply::Snapshots(ids) = c.req(Request::SnapshotCollect)? else {
        return Err("SnapshotCollect".into());
    };
    ensure!(ids.is_empty(), "snapshots left: {ids:?}");
    Ok(())
}
