//! `control_protocol`: arbitrary bytes into the daemon's frame reader, request decoder and
//! dispatcher.
//!
//! The input is a byte stream of frames (`read_frame`: 4-byte length + payload, as on the
//! socket); each payload goes through `decode_request` (and, for robustness, `decode_response`);
//! a request of the current version is handed to `Daemon::handle` on a daemon built per input
//! (in-process engine with small parameters and a jump-on-wait test clock, `NullFrontend`, two
//! origins backed by per-process temp files). Nothing may panic; every response must encode,
//! decode back equal, and validate.
//!
//! Paths inside requests are remapped into the temp directory (a valid absolute path becomes
//! one of a few files there, chosen by its hash), so no input can open a file elsewhere.
//!
//! `BLKSNAP_FUZZ_TRACE=1` prints each request and its response (to read a seed or an artifact).
#![no_main]

use std::sync::{Arc, OnceLock};

use blksnap_engine::{Clock, Engine, EngineConfig};
use blksnap_fuzz::{reset_file, FileEnv};
use blksnap_model::Params;
use blksnap_proto::{
    decode_request, decode_response, encode, read_frame, Id, Reply, Request, ResponseFrame,
    Storage, MAX_PATH_BYTES, PROTOCOL_VERSION,
};
use blksnap_service::{Config, Daemon, NullFrontend};
use libfuzzer_sys::fuzz_target;

fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("BLKSNAP_FUZZ_TRACE").is_some())
}

const ORIGIN_BYTES: u64 = 1 << 20;
const STORAGE_BYTES: u64 = 1 << 20;

static ENV: OnceLock<FileEnv> = OnceLock::new();

fn env() -> &'static FileEnv {
    ENV.get_or_init(|| FileEnv::new("proto"))
}

/// A valid absolute path → a file of the temp dir (the storage, an origin's backing, the
/// directory itself, a missing file, or a spare backing), by a hash of the path. Invalid paths stay as they are:
/// `Daemon::handle` refuses them before opening anything.
fn sandbox(path: &mut String) {
    let valid = path.starts_with('/') && path.len() <= MAX_PATH_BYTES && !path.contains('\0');
    if !valid {
        return;
    }
    let e = env();
    let h = path.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    let target = match h % 6 {
        0 | 1 => e.storage.clone(),
        2 => e.origins[0].clone(),
        3 => e.dir.clone(),
        4 => e.dir.join("missing.img"),
        _ => e.spare.clone(),
    };
    *path = target.display().to_string();
}

/// Paths into the sandbox; an id of fifteen 0xAA bytes and `k` names the k-th snapshot created
/// in this input (ids are random-looking: this lets inputs, and the seeds, reach them).
fn prepare(req: &mut Request, created: &[Id]) {
    match req {
        Request::SnapshotCreate { storage: Storage::File { path, .. } } => sandbox(path),
        Request::SnapshotAppend { path, .. } => sandbox(path),
        Request::AddDevice { backing, .. } => sandbox(backing),
        _ => {}
    }
    let id = match req {
        Request::SnapshotDestroy { id }
        | Request::SnapshotAppend { id, .. }
        | Request::SnapshotAdd { id, .. }
        | Request::SnapshotTake { id }
        | Request::WaitEvent { id, .. }
        | Request::StorageStats { id } => id,
        _ => return,
    };
    if id.0[..15] == [0xAA; 15] && !created.is_empty() {
        *id = created[usize::from(id.0[15]) % created.len()];
    }
}

fn daemon() -> Daemon {
    let e = env();
    for o in &e.origins {
        reset_file(o, ORIGIN_BYTES);
    }
    reset_file(&e.storage, STORAGE_BYTES);
    reset_file(&e.spare, ORIGIN_BYTES);
    let config =
        EngineConfig { params: Params::small(), id_seed: Some(1), clock: Clock::manual(true) };
    let engine = Arc::new(Engine::new(config).unwrap());
    let cfg = Config {
        socket: e.dir.join("control"),
        link_dir: e.dir.join("links"),
        state_dir: e.dir.join("state"),
        ..Config::default()
    };
    let d = Daemon::new(engine, Box::new(NullFrontend::default()), cfg);
    d.add_origin(&e.origins[0], true).unwrap();
    d.add_origin(&e.origins[1], false).unwrap();
    d
}

fuzz_target!(|data: &[u8]| {
    let d = daemon();
    let mut stream = data;
    let mut created = Vec::new();
    for _ in 0..32 {
        let body = match read_frame(&mut stream) {
            Ok(Some(body)) => body,
            Ok(None) | Err(_) => break,
        };
        let _ = decode_response(&body);
        let Ok(frame) = decode_request(&body) else { continue };
        if frame.version != PROTOCOL_VERSION {
            continue; // the server answers EINVAL and closes; nothing reaches the daemon
        }
        let mut req = frame.request;
        prepare(&mut req, &created);
        let result = d.handle(req.clone());
        if trace() {
            eprintln!("{req:?} -> {result:?}");
        }
        if let Ok(Reply::Created(id)) = &result {
            created.push(*id);
        }
        let resp = ResponseFrame { version: PROTOCOL_VERSION, result };
        let bytes =
            encode(&resp).unwrap_or_else(|e| panic!("{req:?}: response does not encode: {e:?}"));
        let back = decode_response(&bytes[4..])
            .unwrap_or_else(|e| panic!("{req:?}: response {resp:?} does not decode: {e:?}"));
        assert_eq!(back, resp, "{req:?}: response changed in a round trip");
    }
    d.shutdown();
});
