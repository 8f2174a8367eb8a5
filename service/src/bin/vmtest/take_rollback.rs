//! Scenario `take-rollback`: a take whose image device cannot be served leaves no half-taken
//! snapshot. The running `blksnapd` binary's file-descriptor limit is lowered (prlimit) to its
//! lowest free descriptor, so that starting the image's ublk device (which opens
//! `/dev/ublk-control`) fails with EMFILE — a real exhausted limit, no test hook. The take
//! fails, the snapshot is gone (the daemon destroyed it), no image device or link is left, and
//! the origin keeps being served. With the limit restored, a new snapshot of the same device
//! takes and its image holds the data.

use super::*;

fn ublk_devices() -> usize {
    std::fs::read_dir("/sys/class/ublk-char").map(|d| d.count()).unwrap_or(0)
}

/// The lowest descriptor number `pid` has free.
fn lowest_free_fd(pid: u32) -> R<u64> {
    let used: std::collections::BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| e.to_string())?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    Ok((0..).find(|n| !used.contains(n)).unwrap_or(0))
}

/// Sets `pid`'s soft RLIMIT_NOFILE to `soft` (None: back to `old`); returns the old limits.
fn nofile(pid: u32, soft: Option<u64>, old: Option<libc::rlimit>) -> R<libc::rlimit> {
    let mut prev = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a plain query of another process's limit into a valid out location.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut prev) };
    ensure!(rc == 0, "prlimit: {}", std::io::Error::last_os_error());
    let new = match (soft, old) {
        (Some(s), _) => libc::rlimit { rlim_cur: s, rlim_max: prev.rlim_max },
        (None, Some(o)) => o,
        (None, None) => return Ok(prev),
    };
    // SAFETY: as above, with a valid new limit that outlives the call.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    ensure!(rc == 0, "prlimit: {}", std::io::Error::last_os_error());
    Ok(prev)
}

pub(crate) fn take_rollback(env: &Env) -> R {
    let backing = env.path("tr.img");
    sparse_file(&backing, 32 * MIB)?;
    let d = DaemonProc::start(env, &backing, 1)?;
    let (node, dev) = d.origin()?;
    let link = env.path("links").join(format!("blksnap-{}-{}", dev.major, dev.minor));
    let f = open_direct(&node, true).map_err(|e| e.to_string())?;
    pwrite_page(&f, 0, b"before").map_err(|e| e.to_string())?;
    let mut c = d.client()?;
    let snapshot = |c: &mut Client| -> R<Id> {
        let storage = env.path("diff.img");
        sparse_file(&storage, 16 * MIB)?;
        let Reply::Created(id) = c.req(Request::SnapshotCreate {
            storage: Storage::File {
                path: storage.display().to_string(),
                limit_sectors: 16 * MIB / 512,
            },
        })?
        else {
            return Err("SnapshotCreate".into());
        };
        c.req(Request::SnapshotAdd { id, dev })?;
        Ok(id)
    };
    let id = snapshot(&mut c)?;
    let devices = ublk_devices();
    let pid = d.child.id();
    let free = lowest_free_fd(pid)?;
    let old = nofile(pid, Some(free), None)?;
    let took = c.call(Request::SnapshotTake { id }).map_err(|e| e.to_string());
    nofile(pid, None, Some(old))?;
    let err = match took? {
        Ok(r) => return Err(format!("take succeeded with no descriptor left: {r:?}")),
        Err(e) => e,
    };
    println!("    take with RLIMIT_NOFILE {free}: errno {} ({})", err.errno, err.message);
    // nothing half-taken
    let Reply::Snapshots(ids) = c.req(Request::SnapshotCollect)? else {
        return Err("SnapshotCollect".into());
    };
    ensure!(ids.is_empty(), "snapshots left after a failed take: {ids:?}");
    let r = c.call(Request::SnapshotDestroy { id }).map_err(|e| e.to_string())?;
    ensure!(r.is_err(), "the rolled-back snapshot could still be destroyed");
    ensure!(ublk_devices() == devices, "an image device was left");
    ensure!(!link.exists(), "an image link was left");
    let Reply::SnapshotInfo { image: None, .. } = c.req(Request::SnapshotInfo { dev })? else {
        return Err("SnapshotInfo: the device still has an image".into());
    };
    // the origin is served, tracked, and can be taken again
    pwrite_page(&f, MIB, b"between").map_err(|e| e.to_string())?;
    let id = snapshot(&mut c)?;
    c.req(Request::SnapshotTake { id })?;
    pwrite_page(&f, 0, b"after").map_err(|e| e.to_string())?;
    let img = open_direct(&link.display().to_string(), false).map_err(|e| e.to_string())?;
    let p = pread_page(&img, 0).map_err(|e| e.to_string())?;
    ensure!(&p.0[..6] == b"before", "image content after the retry");
    let p = pread_page(&img, MIB).map_err(|e| e.to_string())?;
    ensure!(&p.0[..7] == b"between", "image content after the retry");
    drop(img);
    c.req(Request::SnapshotDestroy { id })?;
    Ok(())
}
