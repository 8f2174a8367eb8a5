//! Scenario `offline-write`: the change map never under-reports after a gap. The `blksnapd`
//! binary with a state directory, restarted cleanly:
//! * a block-device backing (a loop device): a clean restart keeps the generation, also after
//!   the backing was read while the daemon was down (reads are no writes); a write to the
//!   backing while the daemon was down gives a new generation (its write counters moved);
//! * a file backing: written while the daemon was down with its mtime then set back to the
//!   saved value — a new generation (ctime moved); a clean restart without writes keeps it.

use super::*;

fn write_some(node: &str, at: u64) -> R {
    let f = open_direct(node, true).map_err(|e| format!("{node}: {e}"))?;
    for i in 0..4u64 {
        pwrite_page(&f, at + i * MIB, b"through the daemon").map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A take and a destroy, so the saved state has a non-trivial number and maps.
pub(crate) fn take_destroy(env: &Env, d: &DaemonProc, dev: Dev) -> R {
    let mut c = d.client()?;
    let storage = env.path("diff.img");
    sparse_file(&storage, 8 * MIB)?;
    let Reply::Created(id) = c.req(Request::SnapshotCreate {
        storage: Storage::File {
            path: storage.display().to_string(),
            limit_sectors: 8 * MIB / 512,
        },
    })?
    else {
        return Err("SnapshotCreate".into());
    };
    c.req(Request::SnapshotAdd { id, dev })?;
    c.req(Request::SnapshotTake { id })?;
    c.req(Request::SnapshotDestroy { id }).map(drop)
}

/// Stops the daemon, runs `offline` while it is down, starts it again; returns the tracker's
/// (generation, changes number) before and after.
fn gap(d: &mut DaemonProc, offline: impl FnOnce() -> R) -> R<(Id, u8, Id, u8)> {
    let (_, dev) = d.origin()?;
    let (before, _) = d.cbt(dev)?;
    d.stop()?;
    offline()?;
    d.restart()?;
    let (_, dev) = d.origin()?;
    let (after, _) = d.cbt(dev)?;
    Ok((before.generation_id, before.changes_number, after.generation_id, after.changes_number))
}

pub(crate) fn offline_write(env: &Env) -> R {
    // 1. a block device
    let file = env.path("lo.img");
    sparse_file(&file, 32 * MIB)?;
    let lo = run("losetup", &["-f"])?.trim().to_string();
    run("losetup", &[&lo, &file.display().to_string()])?;
    let iostats = std::fs::read_to_string(format!(
        "/sys/block/{}/queue/iostats",
        lo.trim_start_matches("/dev/")
    ))
    .unwrap_or_default();
    println!("    {lo}: queue/iostats {}", iostats.trim());
    let block = (|| -> R {
        let mut d = DaemonProc::start(env, Path::new(&lo), 1)?;
        let (node, dev) = d.origin()?;
        write_some(&node, 0)?;
        take_destroy(env, &d, dev)?;
        write_some(&node, 8 * MIB)?;
        // clean restart: the same generation
        let (g0, n0, g1, n1) = gap(&mut d, || Ok(()))?;
        ensure!(
            g0 == g1 && n0 == n1 && n0 >= 1,
            "clean restart of {lo}: {n0} -> {n1}, generation kept: {}",
            g0 == g1
        );
        // read while down (a backup tool, blkid): still the same generation
        let (g0, _, g1, _) = gap(&mut d, || {
            let f = open_direct(&lo, false).map_err(|e| e.to_string())?;
            pread_page(&f, 0).map_err(|e| e.to_string()).map(drop)
        })?;
        ensure!(g0 == g1, "{lo} read while the daemon was down: generation changed");
        // written while down: a new generation, nothing restored
        let (g0, _, g1, n1) = gap(&mut d, || {
            let f = open_direct(&lo, true).map_err(|e| e.to_string())?;
            pwrite_page(&f, 20 * MIB, b"behind the daemon's back").map_err(|e| e.to_string())
        })?;
        ensure!(g0 != g1 && n1 == 0, "{lo} written while the daemon was down: generation kept");
        let (node, _) = d.origin()?;
        let f = open_direct(&node, false).map_err(|e| e.to_string())?;
        let p = pread_page(&f, 20 * MIB).map_err(|e| e.to_string())?;
        ensure!(&p.0[..24] == b"behind the daemon's back", "the offline write is not served");
        drop(f);
        d.finish()?;
        println!("    {lo}: clean restart and a read while down keep the generation; a write while down changes it");
        Ok(())
    })();
    let _ = run("losetup", &["-d", &lo]);
    block?;

    // 2. a file, written while down and its mtime set back
    let backing = env.path("f.img");
    sparse_file(&backing, 32 * MIB)?;
    let mut d = DaemonProc::start(env, &backing, 1)?;
    let (node, dev) = d.origin()?;
    write_some(&node, 0)?;
    take_destroy(env, &d, dev)?;
    let (g0, n0, g1, n1) = gap(&mut d, || Ok(()))?;
    ensure!(g0 == g1 && n0 == n1, "clean restart of the file: generation or number changed");
    let (g0, _, g1, n1) = gap(&mut d, || {
        let f = OpenOptions::new().write(true).open(&backing).map_err(|e| e.to_string())?;
        let mtime = f.metadata().and_then(|m| m.modified()).map_err(|e| e.to_string())?;
        f.write_all_at(b"behind the daemon's back", 4 * MIB).map_err(|e| e.to_string())?;
        f.set_modified(mtime).map_err(|e| e.to_string())?;
        let now = f.metadata().and_then(|m| m.modified()).map_err(|e| e.to_string())?;
        ensure!(now == mtime, "mtime not set back");
        Ok(())
    })?;
    ensure!(g0 != g1 && n1 == 0, "file written while down (mtime set back): generation kept");
    d.finish()?;
    println!("    file: written while down with its mtime set back: new generation (ctime)");
    Ok(())
}
