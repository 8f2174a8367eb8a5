//! Scenario `exclusive-claim`: a served backing belongs to blksnapd. A loop device served by
//! the `blksnapd` binary is claimed exclusively (mounting it directly, or opening it with
//! O_EXCL, fails with EBUSY, so nothing can bypass tracking and copy-on-write); a block device
//! mounted elsewhere cannot be served (EBUSY); a file is one origin by any path (a hard link,
//! a symlink: EALREADY); racing AddDevice requests of one file by four paths have exactly one
//! winner; after the daemon stops, the loop device can be mounted again.

use super::*;

/// mount(2) of an ext2 filesystem; the errno on failure.
fn mount_errno(dev: &str, dir: &Path) -> Result<(), i32> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let _ = std::fs::create_dir_all(dir);
    let src = CString::new(dev).map_err(|_| libc::EINVAL)?;
    let dst = CString::new(dir.as_os_str().as_bytes()).map_err(|_| libc::EINVAL)?;
    let fstype = CString::new("ext2").map_err(|_| libc::EINVAL)?;
    // SAFETY: three valid NUL-terminated strings that outlive the call; no data argument.
    let rc =
        unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

fn losetup(file: &Path) -> R<String> {
    let lo = run("losetup", &["-f"])?.trim().to_string();
    run("losetup", &[&lo, &file.display().to_string()])?;
    Ok(lo)
}

fn add(c: &mut Client, path: &Path) -> R<Result<Dev, i32>> {
    let r = c
        .call(Request::AddDevice { backing: path.display().to_string(), attach: true })
        .map_err(|e| format!("AddDevice: {e}"))?;
    Ok(match r {
        Ok(Reply::Device(d)) => Ok(d.dev),
        Ok(other) => return Err(format!("AddDevice: {other:?}")),
        Err(e) => Err(e.errno),
    })
}

pub(crate) fn exclusive_claim(env: &Env) -> R {
    let file = env.path("lo.img");
    sparse_file(&file, 32 * MIB)?;
    let lo = losetup(&file)?;
    let busy_file = env.path("busy.img");
    sparse_file(&busy_file, 16 * MIB)?;
    let busy = losetup(&busy_file)?;
    let result = (|| -> R {
        let mut d = DaemonProc::start(env, Path::new(&lo), 1)?;
        let (node, _) = d.origin()?;
        mkfs(&node)?;
        let om = env.path("origin");
        mount(&node, &om, "rw")?;
        write_files(&om, "f", 5, 81)?;
        // 1. the served loop device is claimed: no direct mount, no exclusive open
        let direct = env.path("direct");
        match mount_errno(&lo, &direct) {
            Err(libc::EBUSY) => {}
            Err(e) => {
                return Err(format!("mounting the served backing {lo}: errno {e}, not EBUSY"))
            }
            Ok(()) => {
                let _ = umount(&direct);
                return Err(format!("the served backing {lo} could be mounted directly"));
            }
        }
        let excl = OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(&lo);
        ensure!(
            excl.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EBUSY),
            "O_EXCL open of the served backing: {excl:?}"
        );
        // 2. the same device again, by a symlink: EALREADY (the daemon's duplicate error)
        let mut c = d.client()?;
        let link = env.path("lo-link");
        std::os::unix::fs::symlink(&lo, &link).map_err(|e| e.to_string())?;
        ensure!(add(&mut c, &link)? == Err(114), "the served device added again by a symlink");
        // 3. a block device mounted elsewhere cannot be served
        mkfs(&busy)?;
        let bm = env.path("busy");
        mount(&busy, &bm, "rw")?;
        let r = add(&mut c, Path::new(&busy))?;
        umount(&bm)?;
        ensure!(r == Err(16), "serving a mounted block device: {r:?}, not EBUSY");
        // 4. a file by a hard link or a symlink is the same origin
        let f1 = env.path("file.img");
        sparse_file(&f1, 8 * MIB)?;
        let first = add(&mut c, &f1)?.map_err(|e| format!("AddDevice file: errno {e}"))?;
        let hard = env.path("file-hard.img");
        std::fs::hard_link(&f1, &hard).map_err(|e| e.to_string())?;
        let soft = env.path("file-soft.img");
        std::os::unix::fs::symlink(&f1, &soft).map_err(|e| e.to_string())?;
        ensure!(add(&mut c, &hard)? == Err(114), "a hard link served twice");
        ensure!(add(&mut c, &soft)? == Err(114), "a symlink served twice");
        c.req(Request::RemoveDevice { dev: first })?;
        // 5. racing adds by four paths, four connections: one winner
        let paths = [f1.clone(), hard.clone(), soft.clone(), env.path("./file.img")];
        let socket = d.socket.clone();
        let results: Vec<R<Result<Dev, i32>>> = std::thread::scope(|s| {
            let hs: Vec<_> = paths
                .iter()
                .map(|p| {
                    let socket = socket.clone();
                    s.spawn(move || {
                        let mut c = Client::connect(&socket).map_err(|e| e.to_string())?;
                        add(&mut c, p)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(Err("panicked".into()))).collect()
        });
        let results: Vec<Result<Dev, i32>> = results.into_iter().collect::<R<_>>()?;
        let winners: Vec<Dev> = results.iter().filter_map(|r| r.ok()).collect();
        ensure!(winners.len() == 1, "racing adds: {results:?}");
        ensure!(results.iter().all(|r| r.is_ok() || *r == Err(114)), "racing adds: {results:?}");
        c.req(Request::RemoveDevice { dev: winners[0] })?;
        println!("    {lo} claimed (mount and O_EXCL: EBUSY); duplicates EALREADY; race: 1 of 4");
        // 6. after the daemon stops, the backing is free again (its device is kept for the
        // next daemon, which takes it over and then removes it)
        umount(&om)?;
        d.stop()?;
        mount(&lo, &direct, "ro").map_err(|e| format!("after stop: {e}"))?;
        umount(&direct)?;
        d.restart()?;
        d.finish()?;
        Ok(())
    })();
    let _ = run("losetup", &["-d", &lo]);
    let _ = run("losetup", &["-d", &busy]);
    result
}
