//! Scenario `hostile-clients`: the real `blksnapd` with a socket group, and clients that drop
//! their privileges themselves (setgroups / setresgid / setresuid in the forked child before it
//! runs this binary again in the role given): a member of the socket's group (uid 4242) and a
//! user outside it (uid 4343). Every escalation attempt of the group member fails with a clear
//! errno and leaves its target byte-identical (hashed before and after): growing or writing a
//! root-only 0600 file as File storage (by path, by a read-only descriptor), a symlink swapped
//! between a root-only file and the user's own while it is used, v3 storage ranges of a block
//! device the user cannot open, a directory on another (small) filesystem with a huge limit,
//! serving a root-only file, changing root's device. The outsider is refused at connect. Then
//! a connection flood, an oversized and a truncated frame, a client that stops mid-frame and one
//! that disconnects mid-request, while a well-behaved client keeps being served; its latency
//! (p50/max) is printed. The table of attempts is in docs/SECURITY.md.

use super::*;

const MEMBER: u32 = 4242;
const OUTSIDER: u32 = 4343;

/// The errno of an answer (0 for success), over the transport.
fn errno_of(r: std::io::Result<Result<Reply, blksnap_proto::WireError>>) -> i32 {
    match r {
        Ok(Ok(_)) => 0,
        Ok(Err(e)) => e.errno,
        Err(e) => -e.raw_os_error().unwrap_or(1),
    }
}

/// Runs this binary as `uid` (primary group `gid`, supplementary `groups`) in `role`.
fn as_user(uid: u32, gid: u32, groups: &[u32], role: &str, args: &[String]) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(std::env::current_exe().expect("own path"));
    cmd.arg("--hostile-child").arg(role).args(args).stdin(Stdio::null());
    let groups: Vec<libc::gid_t> = groups.to_vec();
    // SAFETY: the closure runs in the forked child before exec and calls only setgroups,
    // setresgid and setresuid (async-signal-safe system calls) on data owned by the closure.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

fn hash(path: &Path) -> R<u64> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(fnv(&data) ^ data.len() as u64)
}

fn free_bytes(dir: &Path) -> R<u64> {
    let st = rustix::fs::statfs(dir).map_err(|e| e.to_string())?;
    Ok(st.f_bavail as u64 * st.f_bsize as u64)
}

pub(crate) fn hostile_clients(env: &Env) -> R {
    let dir = env.path("");
    let secret = env.path("secret");
    std::fs::write(&secret, b"root-only 0600 file: must stay 40 bytes!")
        .map_err(|e| e.to_string())?;
    let readable = env.path("readable");
    std::fs::write(&readable, b"root's world-readable file").map_err(|e| e.to_string())?;
    let secret_dev = env.path("secret-dev");
    sparse_file(&secret_dev, 4 * MIB)?;
    for (p, mode) in [(&secret, 0o600), (&readable, 0o644), (&secret_dev, 0o600)] {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(|e| e.to_string())?;
    }
    // a block device the user cannot open: a loop device over a root file, mode 0600
    let lo_file = env.path("lo.img");
    sparse_file(&lo_file, 8 * MIB)?;
    let lo = run("losetup", &["-f"])?.trim().to_string();
    run("losetup", &[&lo, &lo_file.display().to_string()])?;
    run("chmod", &["0600", &lo])?;
    // another, small filesystem with a directory the user may write (1777)
    let small = env.path("small");
    std::fs::create_dir_all(&small).map_err(|e| e.to_string())?;
    run(
        "mount",
        &["-t", "tmpfs", "-o", "size=8m,mode=1777", "tmpfs", &small.display().to_string()],
    )?;
    // the user's own directory, where it makes its symlink and its own storage
    let home = env.path("home");
    std::fs::create_dir_all(&home).map_err(|e| e.to_string())?;
    std::os::unix::fs::chown(&home, Some(MEMBER), Some(MEMBER)).map_err(|e| e.to_string())?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    let cfg = env.path("blksnapd.toml");
    std::fs::write(
        &cfg,
        format!(
            "group = \"{MEMBER}\"\nidle_timeout_secs = 20\nframe_timeout_secs = 2\n\
             max_connections_per_user = 8\nmax_requests_in_flight_per_user = 4\n\
             max_frame_bytes = 65536\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let backing = env.path("d.img");
    sparse_file(&backing, 16 * MIB)?;
    let links = env.path("links");
    std::fs::create_dir_all(&links).map_err(|e| e.to_string())?;
    let cfg_arg = cfg.display().to_string();
    let mut d = DaemonProc::start_args(
        env,
        Some(&backing),
        1,
        &links,
        &["newest"],
        &["--config", &cfg_arg],
    )?;
    let result = (|| -> R {
        let (node, dev) = d.origin()?;
        let targets = [secret.clone(), readable.clone(), secret_dev.clone(), PathBuf::from(&lo)];
        let before: Vec<u64> = targets.iter().map(|p| hash(p)).collect::<R<_>>()?;
        let small_free = free_bytes(&small)?;
        let sock = d.socket.display().to_string();
        let args: Vec<String> = [
            sock.clone(),
            secret.display().to_string(),
            readable.display().to_string(),
            secret_dev.display().to_string(),
            lo.clone(),
            small.display().to_string(),
            home.display().to_string(),
            format!("{}:{}", dev.major, dev.minor),
            node.clone(),
        ]
        .to_vec();
        // 1. the group member's escalation attempts
        let out = as_user(MEMBER, MEMBER, &[MEMBER], "attempts", &args)
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        print!("{text}");
        ensure!(out.status.success(), "attempts: {}", String::from_utf8_lossy(&out.stderr));
        // 2. the outsider is refused at connect
        let out = as_user(OUTSIDER, OUTSIDER, &[], "outsider", &args)
            .output()
            .map_err(|e| e.to_string())?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        ensure!(out.status.success(), "outsider: {}", String::from_utf8_lossy(&out.stderr));
        let after: Vec<u64> = targets.iter().map(|p| hash(p)).collect::<R<_>>()?;
        for ((p, b), a) in targets.iter().zip(&before).zip(&after) {
            ensure!(b == a, "{} changed", p.display());
        }
        ensure!(std::fs::metadata(&secret).map_err(|e| e.to_string())?.len() == 40, "secret grew");
        let now_free = free_bytes(&small)?;
        ensure!(
            now_free + MIB >= small_free,
            "the small filesystem lost space: {small_free} -> {now_free}"
        );
        println!(
            "    targets byte-identical: {} files/devices hashed before and after",
            targets.len()
        );
        // 3. abuse while a well-behaved root client is served
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let socket = d.socket.clone();
        let pinger = std::thread::spawn(move || -> R<Vec<Duration>> {
            let mut c = Client::connect(&socket).map_err(|e| e.to_string())?;
            let mut lat = Vec::new();
            while !s2.load(Ordering::SeqCst) {
                let t = Instant::now();
                match c.req(Request::ListDevices) {
                    Ok(Reply::Devices(_)) => lat.push(t.elapsed()),
                    other => return Err(format!("well-behaved client: {other:?}")),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(lat)
        });
        let out = as_user(MEMBER, MEMBER, &[MEMBER], "abuse", &args)
            .output()
            .map_err(|e| e.to_string())?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        stop.store(true, Ordering::SeqCst);
        let mut lat = pinger.join().map_err(|_| "pinger panicked")??;
        ensure!(out.status.success(), "abuse: {}", String::from_utf8_lossy(&out.stderr));
        lat.sort();
        ensure!(lat.len() > 20, "the well-behaved client got {} answers", lat.len());
        let (p50, max) = (lat[lat.len() / 2], lat[lat.len() - 1]);
        println!(
            "    well-behaved client during the abuse: {} requests, latency p50 {:.2} ms, max {:.2} ms",
            lat.len(),
            p50.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3
        );
        ensure!(max < Duration::from_secs(2), "the well-behaved client waited {max:?}");
        // the daemon still serves after everything
        let mut c = d.client()?;
        ensure!(
            matches!(c.req(Request::Version)?, Reply::Version { .. }),
            "Version after the abuse"
        );
        Ok(())
    })();
    // RemoveDevice of the origin, a clean stop, no device left (or, after a failure, whatever
    // the daemon's drop does).
    let result = result.and_then(|()| d.finish());
    drop(d);
    let _ = run("umount", &[&small.display().to_string()]);
    let _ = run("losetup", &["-d", &lo]);
    result
}

// ------------------------------------------------------------------ the unprivileged children

struct Args {
    sock: PathBuf,
    secret: String,
    readable: String,
    secret_dev: String,
    lo: String,
    small: String,
    home: PathBuf,
    dev: Dev,
}

fn parse(a: &[String]) -> R<Args> {
    ensure!(a.len() == 9, "child arguments: {a:?}");
    let (ma, mi) = a[7].split_once(':').ok_or("dev")?;
    Ok(Args {
        sock: PathBuf::from(&a[0]),
        secret: a[1].clone(),
        readable: a[2].clone(),
        secret_dev: a[3].clone(),
        lo: a[4].clone(),
        small: a[5].clone(),
        home: PathBuf::from(&a[6]),
        dev: Dev {
            major: ma.parse().map_err(|_| "major")?,
            minor: mi.parse().map_err(|_| "minor")?,
        },
    })
}

/// One attempt: its name, the errno it must fail with, the errno it got.
fn check(name: &str, want: i32, got: i32) -> R {
    println!("    {name:<44} errno {got:>3} (want {want})");
    ensure!(got == want, "{name}: errno {got}, want {want}");
    Ok(())
}

fn file_storage(path: &str, limit_sectors: u64) -> Request {
    Request::SnapshotCreate { storage: Storage::File { path: path.into(), limit_sectors } }
}

fn attempts(a: &Args) -> R {
    let mut c = Client::connect(&a.sock).map_err(|e| e.to_string())?;
    let (eperm, eacces, enospc) = (libc::EPERM, libc::EACCES, libc::ENOSPC);
    // grow/write a root-only file as File storage
    check(
        "file storage by path (raw v2 request)",
        eperm,
        errno_of(c.call_path(file_storage(&a.secret, 1 << 17))),
    )?;
    check(
        "file storage opened by the client",
        eacces,
        errno_of(c.call(file_storage(&a.secret, 1 << 17))),
    )?;
    let ro = File::open(&a.readable).map_err(|e| e.to_string())?;
    let req = Request::SnapshotCreateFd { limit_sectors: 1 << 17 };
    check(
        "file storage by a read-only descriptor",
        eacces,
        errno_of(c.call_with_fds(req, &[std::os::fd::AsFd::as_fd(&ro)])),
    )?;
    // a symlink swapped between the user's own file and the secret while it is used
    let own = a.home.join("own.img");
    sparse_file(&own, MIB)?;
    let link = a.home.join("link");
    let (stop, l2, own2, secret2) =
        (Arc::new(AtomicBool::new(false)), link.clone(), own.clone(), a.secret.clone());
    let s2 = stop.clone();
    let swapper = std::thread::spawn(move || {
        let tmp = l2.with_extension("new");
        let mut i = 0u64;
        while !s2.load(Ordering::SeqCst) {
            let target = if i.is_multiple_of(2) { PathBuf::from(&secret2) } else { own2.clone() };
            let _ = std::fs::remove_file(&tmp);
            let _ = std::os::unix::fs::symlink(&target, &tmp);
            let _ = std::fs::rename(&tmp, &l2);
            i += 1;
        }
    });
    let t = Instant::now();
    while std::fs::symlink_metadata(&link).is_err() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let (mut created, mut refused) = (0, 0);
    for i in 0..400 {
        if created > 0 && refused > 0 && i >= 200 {
            break;
        }
        match c.call(file_storage(&link.display().to_string(), 2048)).map_err(|e| e.to_string())? {
            Ok(Reply::Created(id)) => {
                created += 1;
                c.req(Request::SnapshotDestroy { id })?;
            }
            Err(e) if e.errno == eacces => refused += 1,
            other => return Err(format!("swapped symlink: {other:?}")),
        }
        std::thread::yield_now();
    }
    stop.store(true, Ordering::SeqCst);
    let _ = swapper.join();
    println!(
        "    symlink swapped during use: {created} used the user's own file, {refused} EACCES"
    );
    check(
        "swapped symlink sent as a path (raw)",
        eperm,
        errno_of(c.call_path(file_storage(&link.display().to_string(), 2048))),
    )?;
    // v3 storage ranges of a device the user cannot open
    let Reply::Created(id) = c.req(Request::SnapshotCreate { storage: Storage::Ranges })? else {
        return Err("create ranges".into());
    };
    let append = |path: &str| Request::SnapshotAppend {
        id,
        path: path.into(),
        ranges: vec![blksnap_proto::Range { offset: 0, count: 2048 }],
    };
    check(
        "v3 ranges of a root-only device (raw path)",
        eperm,
        errno_of(c.call_path(append(&a.lo))),
    )?;
    check("v3 ranges of a root-only device (client)", eacces, errno_of(c.call(append(&a.lo))))?;
    c.req(Request::SnapshotDestroy { id })?;
    // a directory on another filesystem with a huge limit
    check(
        "directory on a small fs, 1 TiB limit",
        enospc,
        errno_of(c.call(file_storage(&a.small, 1 << 31))),
    )?;
    check(
        "directory on a small fs (raw path)",
        eperm,
        errno_of(c.call_path(file_storage(&a.small, 1 << 31))),
    )?;
    // serve a root-only file, change root's device
    let add = |p: &str| Request::AddDevice { backing: p.into(), attach: true };
    check(
        "AddDevice of a root-only file (raw path)",
        eperm,
        errno_of(c.call_path(add(&a.secret_dev))),
    )?;
    check("AddDevice of a root-only file (client)", eacces, errno_of(c.call(add(&a.secret_dev))))?;
    let ro = File::open(&a.readable).map_err(|e| e.to_string())?;
    let req = Request::AddDeviceFd { attach: true };
    check(
        "AddDevice by a read-only descriptor",
        eacces,
        errno_of(c.call_with_fds(req, &[std::os::fd::AsFd::as_fd(&ro)])),
    )?;
    check("Detach root's device", eperm, errno_of(c.call(Request::Detach { dev: a.dev })))?;
    check(
        "RemoveDevice root's device",
        eperm,
        errno_of(c.call(Request::RemoveDevice { dev: a.dev })),
    )?;
    // what it may do: its own storage file and its own backing, by descriptor
    let own_backing = a.home.join("mine.img");
    sparse_file(&own_backing, 8 * MIB)?;
    let Reply::Device(mine) = c.req(add(&own_backing.display().to_string()))? else {
        return Err("own AddDevice".into());
    };
    let Reply::Created(id) = c.req(file_storage(&own.display().to_string(), 2048))? else {
        return Err("own storage".into());
    };
    c.req(Request::SnapshotAdd { id, dev: mine.dev })?;
    c.req(Request::SnapshotDestroy { id })?;
    c.req(Request::RemoveDevice { dev: mine.dev })?;
    println!("    allowed: its own backing served and removed, its own storage used");
    Ok(())
}

fn outsider(a: &Args) -> R {
    // The socket's mode (0660, the group's) stops it at connect(2); were it reachable, the
    // daemon's own check answers EPERM.
    match Client::connect(&a.sock) {
        Err(e) => {
            check("a user outside the group connects", libc::EACCES, e.raw_os_error().unwrap_or(0))
        }
        Ok(mut c) => check(
            "a user outside the group connects",
            libc::EPERM,
            errno_of(c.call(Request::Version)),
        ),
    }
}

fn abuse(a: &Args) -> R {
    use std::os::unix::net::UnixStream;
    // connection flood: past max_connections_per_user the daemon answers EAGAIN
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..40 {
        // A refused connection is answered at once, before any request (and closed).
        let mut s = UnixStream::connect(&a.sock).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_millis(300))).map_err(|e| e.to_string())?;
        match blksnap_proto::read_frame(&mut s) {
            Ok(Some(body)) => {
                let f = blksnap_proto::decode_response(&body).map_err(|e| e.to_string())?;
                ensure!(
                    f.result.as_ref().err().map(|e| e.errno) == Some(libc::EAGAIN),
                    "flood: {f:?}"
                );
                refused += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                s.set_read_timeout(None).map_err(|e| e.to_string())?;
                let mut c = Client::from_stream(s);
                ensure!(matches!(c.call(Request::Version), Ok(Ok(_))), "flood: a held connection");
                held.push(c);
            }
            other => return Err(format!("flood: {other:?}")),
        }
    }
    println!(
        "    connection flood: {} served, {refused} refused with EAGAIN (max_connections_per_user)",
        held.len()
    );
    ensure!(held.len() == 8 && refused == 32, "flood: {} held, {refused} refused", held.len());
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    let answer = |s: &mut UnixStream| -> i32 {
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        match blksnap_proto::read_frame(s) {
            Ok(Some(body)) => match blksnap_proto::decode_response(&body) {
                Ok(f) => f.result.err().map_or(0, |e| e.errno),
                Err(_) => -1,
            },
            _ => -2,
        }
    };
    // an oversized frame: EFBIG, connection closed
    let mut s = UnixStream::connect(&a.sock).map_err(|e| e.to_string())?;
    s.write_all(&(1u32 << 20).to_le_bytes()).map_err(|e| e.to_string())?;
    check("oversized frame (1 MiB > max_frame_bytes)", libc::EFBIG, answer(&mut s))?;
    // a truncated frame: the connection is closed, nothing else happens
    let mut s = UnixStream::connect(&a.sock).map_err(|e| e.to_string())?;
    s.write_all(&[100, 0, 0, 0, 1, 2, 3]).map_err(|e| e.to_string())?;
    drop(s);
    // stopping mid-frame: EAGAIN after frame_timeout_secs, however slowly it trickles
    let t = Instant::now();
    let mut s = UnixStream::connect(&a.sock).map_err(|e| e.to_string())?;
    s.write_all(&[100, 0, 0, 0, 1]).map_err(|e| e.to_string())?;
    let mut trickle = s.try_clone().map_err(|e| e.to_string())?;
    let tr = std::thread::spawn(move || {
        for _ in 0..30 {
            std::thread::sleep(Duration::from_millis(200));
            if trickle.write_all(&[0]).is_err() {
                break;
            }
        }
    });
    check("a client that stops mid-frame (trickling)", libc::EAGAIN, answer(&mut s))?;
    let _ = tr.join();
    println!(
        "    dropped mid-frame after {:.1} s (frame_timeout_secs = 2)",
        t.elapsed().as_secs_f64()
    );
    // disconnecting mid-request: a long wait, then gone
    let mut c = Client::connect(&a.sock).map_err(|e| e.to_string())?;
    let Reply::Created(id) = c.req(Request::SnapshotCreate { storage: Storage::Ranges })? else {
        return Err("create".into());
    };
    let mut s = UnixStream::connect(&a.sock).map_err(|e| e.to_string())?;
    let frame = blksnap_proto::RequestFrame {
        version: blksnap_proto::PROTOCOL_VERSION,
        request: Request::WaitEvent { id, timeout_ms: 60_000 },
    };
    blksnap_proto::write_frame(&mut s, &frame).map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(100));
    drop(s);
    c.req(Request::SnapshotDestroy { id })?;
    println!("    a client gone in the middle of a 60 s WaitEvent: the daemon went on");
    Ok(())
}

/// The child side: runs `role` as the user it was started as; exit status 0 when every check
/// held.
pub(crate) fn child(role: &str, args: &[String]) -> i32 {
    let r = parse(args).and_then(|a| match role {
        "attempts" => attempts(&a),
        "outsider" => outsider(&a),
        "abuse" => abuse(&a),
        _ => Err(format!("no role {role}")),
    });
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{role}: {e}");
            1
        }
    }
}
