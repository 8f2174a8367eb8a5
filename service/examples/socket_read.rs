//! How fast is data over blksnapd's socket (protocol v3 data requests, the data path of a daemon
//! with no block devices)? Reads a snapshot image and its origin, side by side in one run:
//!
//! * `engine`: `Engine::image_read` in the daemon's process (no transport: the bound);
//! * `socket`: `DevRead` requests of the same size over the control socket (one connection);
//! * `socket x2`: two connections reading halves at once (two client processes).
//!
//! The backing is a memory-cached file, so the numbers are the transport's cost, not a disk's.
//! Wall-clock MB/s depends on how busy the machine is (the socket path hands every request
//! between two threads); `cpu` is the process's CPU time (user + system, every thread: client
//! and daemon) per byte, as MB/s — what one core could do if nothing else ran.
//! Decides whether a shared-memory data path would be worth it (README, "One engine for every
//! process"). Run: `cargo run --release -p blksnap-service --example socket_read [MIB]`.

use std::sync::Arc;
use std::time::Instant;

use blksnap_engine::{Engine, EngineConfig};
use blksnap_proto::{Reply, Request, Role, Storage};
use blksnap_service::{Client, Config, ControlServer, Daemon, NullFrontend};

fn main() {
    let mib: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(256);
    let bytes = mib << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("control");
    let cfg = Config { socket: socket.clone(), ..Config::default() };
    let engine = Arc::new(Engine::new(EngineConfig::default()).expect("engine"));
    let daemon = Arc::new(Daemon::new(engine.clone(), Box::new(NullFrontend::default()), cfg));
    let server = ControlServer::bind(&socket, None).expect("bind");
    let d = daemon.clone();
    std::thread::spawn(move || server.serve(d));
    let backing = dir.path().join("disk.img");
    let content: Vec<u8> = (0..bytes).map(|i| (i >> 9) as u8).collect();
    std::fs::write(&backing, &content).expect("backing");
    drop(content);
    let origin = daemon.add_origin(&backing, true).expect("add");
    let storage = dir.path().join("diff.img");
    std::fs::File::create(&storage).and_then(|f| f.set_len(64 << 20)).expect("storage");
    let mut c = Client::connect(&socket).expect("connect");
    let storage = Storage::File { path: storage.display().to_string(), limit_sectors: 1 << 17 };
    let Ok(Reply::Created(id)) = c.req(Request::SnapshotCreate { storage }) else { panic!() };
    c.req(Request::SnapshotAdd { id, dev: origin.into() }).expect("add");
    c.req(Request::SnapshotTake { id }).expect("take");
    let Ok(Reply::Devices(list)) = c.req(Request::ListDevices) else { panic!() };
    let image = list.iter().find(|d| matches!(d.role, Role::Image { .. })).expect("image").dev;

    println!("reading a {mib} MiB image (page-cached backing), MB/s, best of 3:");
    println!(
        "{:>10} {:>10} {:>10} {:>10} {:>12} {:>11} {:>11} {:>9}",
        "request",
        "engine",
        "socket",
        "socket x2",
        "socket/engine",
        "engine cpu",
        "socket cpu",
        "cpu ratio"
    );
    for req_bytes in [64u32 << 10, 256 << 10, 1 << 20] {
        let mut best = [0f64; 5];
        for _ in 0..3 {
            let (t, cpu) = (Instant::now(), cpu_secs());
            let mut buf = vec![0u8; req_bytes as usize];
            for at in (0..bytes).step_by(req_bytes as usize) {
                engine.image_read(origin, at, &mut buf).expect("engine read");
            }
            best[0] = best[0].max(bytes as f64 / t.elapsed().as_secs_f64() / 1e6);
            best[3] = best[3].max(bytes as f64 / (cpu_secs() - cpu) / 1e6);

            let (t, cpu) = (Instant::now(), cpu_secs());
            read_range(&mut c, image, 0, bytes, req_bytes);
            best[1] = best[1].max(bytes as f64 / t.elapsed().as_secs_f64() / 1e6);
            best[4] = best[4].max(bytes as f64 / (cpu_secs() - cpu) / 1e6);

            let t = Instant::now();
            let half = bytes / 2;
            let s = socket.clone();
            let other = std::thread::spawn(move || {
                let mut c2 = Client::connect(&s).expect("connect");
                read_range(&mut c2, image, half, half, req_bytes);
            });
            read_range(&mut c, image, 0, half, req_bytes);
            other.join().expect("reader");
            best[2] = best[2].max(bytes as f64 / t.elapsed().as_secs_f64() / 1e6);
        }
        println!(
            "{:>8}Ki {:>10.0} {:>10.0} {:>10.0} {:>12.2} {:>11.0} {:>11.0} {:>9.2}",
            req_bytes >> 10,
            best[0],
            best[1],
            best[2],
            best[1] / best[0],
            best[3],
            best[4],
            best[4] / best[3]
        );
    }
}

/// CPU time of the whole process (every thread), user + system, in seconds.
fn cpu_secs() -> f64 {
    // SAFETY: an all-zero rusage is a valid out value; getrusage writes it whole.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out pointer for RUSAGE_SELF.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

fn read_range(c: &mut Client, dev: blksnap_proto::Dev, from: u64, len: u64, step: u32) {
    for at in (from..from + len).step_by(step as usize) {
        let req = Request::DevRead { dev, offset_bytes: at, len_bytes: step };
        match c.call(req) {
            Ok(Ok(Reply::Data(d))) if d.0.len() == step as usize => {}
            other => panic!("read at {at}: {other:?}"),
        }
    }
}
