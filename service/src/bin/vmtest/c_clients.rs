//! Scenario `c-clients` (see its entry in `SCENARIOS`).

use super::*;

/// The C (v3) and C++ (newest) lifecycle clients of `ffi/tests-c`, built unchanged against the
/// static libblksnap, run with `BLKSNAP_SOCKET` set: every control and filter request goes to
/// the daemon, their devices are ublk devices the library asks the daemon to serve, data I/O
/// goes through those block devices and the images' (O_DIRECT).
pub(crate) fn c_clients(env: &Env) -> R {
    let d = DaemonProc::start_with(env, None, 1)?;
    for name in ["client_v3", "client_newest"] {
        let mut cmd = Command::new(sibling(name)?);
        cmd.env("BLKSNAP_SOCKET", &d.socket);
        let t = Instant::now();
        let out = run_client(cmd, name)?;
        println!("    {} ({} ms)", out.trim(), t.elapsed().as_millis());
    }
    // The library removed the devices it had the daemon serve; nothing is left behind.
    let mut c = d.client()?;
    let Reply::Devices(list) = c.req(Request::ListDevices)? else {
        return Err("ListDevices".into());
    };
    ensure!(list.is_empty(), "devices left: {list:?}");
    let Reply::Snapshots(ids) = c.req(Request::SnapshotCollect)? else {
        return Err("SnapshotCollect".into());
    };
    ensure!(ids.is_empty(), "snapshots left: {ids:?}");
    Ok(())
}
