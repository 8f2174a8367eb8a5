//! The daemon the control-plane tests start: an engine and a front end (by default the null
//! one, no block devices) behind a real control socket, served on a thread of its own.
#![allow(dead_code)] // each test crate uses what it needs

use std::path::Path;
use std::sync::Arc;

use blksnap_engine::{Engine, EngineConfig};
use blksnap_service::control::Limits;
use blksnap_service::{Config, ControlServer, Daemon, Frontend, NullFrontend};

/// Serves a daemon (`engine`, `frontend`; image links under `link_dir`) on the control socket
/// `socket`, with `limits` when given (else the defaults).
pub fn serve_with(
    socket: &Path,
    link_dir: &Path,
    engine: EngineConfig,
    frontend: Box<dyn Frontend>,
    limits: Option<Limits>,
) -> Arc<Daemon> {
    let cfg = Config {
        socket: socket.to_path_buf(),
        link_dir: link_dir.to_path_buf(),
        ..Config::default()
    };
    let daemon = Arc::new(Daemon::new(Arc::new(Engine::new(engine).unwrap()), frontend, cfg));
    let mut server = ControlServer::bind(socket, None).unwrap();
    if let Some(limits) = limits {
        server = server.with_limits(limits);
    }
    let d = daemon.clone();
    std::thread::spawn(move || server.serve(d));
    daemon
}

/// A daemon with the default engine and the null front end on `socket`, links under `link_dir`.
pub fn serve_null(socket: &Path, link_dir: &Path) -> Arc<Daemon> {
    serve_with(socket, link_dir, EngineConfig::default(), Box::new(NullFrontend::default()), None)
}
