//! `blksnapd`: serves tracked devices and snapshot images as ublk block devices and takes
//! control requests on a Unix socket. Runs in the foreground (systemd `Type=simple`); SIGTERM or
//! SIGINT stops it cleanly: snapshots destroyed and their image devices removed, each origin
//! flushed and its tracker's CBT saved in the state directory, the origin devices left (with
//! what is mounted on them) for the next daemon — or removed with `--remove-devices-on-stop` —,
//! socket unlinked. The next start takes the devices over with the saved CBT (same
//! generation); one after a crash recovers them too (user recovery) and starts new generations.

use std::path::PathBuf;
use std::sync::Arc;

use blksnap_engine::{Engine, EngineConfig};
use blksnap_model::Params;
use blksnap_service::config::{Config, DeviceConfig, FrontendKind, LinkStyle, DEFAULT_CONFIG};
use blksnap_service::{ControlServer, Daemon, StateDir};
use clap::Parser;

/// Command line; flags override the configuration file.
#[derive(Parser, Debug)]
#[command(name = "blksnapd", version, about = "blksnap snapshot service over ublk")]
struct Args {
    /// Configuration file (missing is fine unless given explicitly).
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Control socket path.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Group allowed to use the control socket besides root.
    #[arg(long)]
    group: Option<String>,
    /// Directory for image links.
    #[arg(long)]
    link_dir: Option<PathBuf>,
    /// Image link style(s): v3, newest (repeatable).
    #[arg(long = "image-link", value_parser = parse_link)]
    image_links: Vec<LinkStyle>,
    /// Queues per device.
    #[arg(long)]
    queues: Option<u16>,
    /// Queue depth.
    #[arg(long)]
    queue_depth: Option<u16>,
    /// State directory (saved CBT, crash marker, device map for recovery).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Another tracked device: a backing file or block device (repeatable).
    #[arg(short, long = "device")]
    devices: Vec<PathBuf>,
    /// Do not attach trackers of devices given with --device.
    #[arg(long)]
    no_attach: bool,
    /// A clean stop (SIGTERM/SIGINT) removes the origin devices (what is mounted on them
    /// fails) instead of leaving them, and what is mounted on them, for the next blksnapd to
    /// take over with the same CBT generation (the default).
    #[arg(long, conflicts_with = "keep_devices")]
    remove_devices_on_stop: bool,
    /// The default (kept for scripts written for earlier versions): a clean stop leaves the
    /// origin devices for the next blksnapd.
    #[arg(long, hide = true)]
    keep_devices: bool,
    /// Do not freeze the filesystems mounted on the origins at TAKE (images are then only
    /// crash-consistent).
    #[arg(long)]
    no_freeze: bool,
    /// Who makes the block devices: `ublk` (default) or `none` (no block devices: a host
    /// without the ublk driver; data is reached through the daemon).
    #[arg(long, value_enum)]
    frontend: Option<FrontendKind>,
    /// Serve NBD on this Unix socket (config `[nbd] socket`).
    #[arg(long, value_name = "PATH")]
    nbd_socket: Option<PathBuf>,
    /// Serve NBD on this TCP address, HOST:PORT (config `[nbd] tcp`; TLS required).
    #[arg(long, value_name = "ADDR")]
    nbd_tcp: Option<std::net::SocketAddr>,
    /// NBD TLS: the server's certificate chain (PEM).
    #[arg(long, value_name = "PEM")]
    nbd_tls_cert: Option<PathBuf>,
    /// NBD TLS: the server's private key (PEM).
    #[arg(long, value_name = "PEM")]
    nbd_tls_key: Option<PathBuf>,
    /// NBD TLS: the CA that clients' certificates must chain to (PEM).
    #[arg(long, value_name = "PEM")]
    nbd_tls_ca: Option<PathBuf>,
    /// NBD over TCP without TLS (refused unless --nbd-tcp is a loopback address).
    #[arg(long)]
    nbd_no_tls: bool,
    /// Export the origin of this backing over NBD, writable (repeatable).
    #[arg(long, value_name = "BACKING")]
    nbd_writable: Vec<PathBuf>,
    /// A module parameter by its kernel name and unit, NAME=VALUE (repeatable; e.g.
    /// diff_storage_minimum=16384, in sectors).
    #[arg(long = "param", value_name = "NAME=VALUE", value_parser = parse_param)]
    params: Vec<(String, u64)>,
    /// Module parameters as `modprobe blksnap` takes them: "NAME=VALUE NAME=VALUE ..."
    /// (applied before the --param ones).
    #[arg(long = "module-params", value_name = "LIST", value_parser = parse_param_list)]
    module_params: Option<ParamList>,
}

/// One `--module-params` list (a newtype, so that clap takes the whole list as one value).
#[derive(Clone, Debug)]
struct ParamList(Vec<(String, u64)>);

fn parse_param(s: &str) -> Result<(String, u64), String> {
    let (name, value) = Params::parse_item(s).map_err(|e| format!("{s}: {}", e.detail))?;
    Ok((name.to_string(), value))
}

fn parse_param_list(s: &str) -> Result<ParamList, String> {
    s.split_whitespace().map(parse_param).collect::<Result<_, _>>().map(ParamList)
}

fn parse_link(s: &str) -> Result<LinkStyle, String> {
    match s {
        "v3" => Ok(LinkStyle::V3),
        "newest" => Ok(LinkStyle::Newest),
        _ => Err("v3 or newest".into()),
    }
}

fn config(args: &Args) -> Result<Config, String> {
    let mut cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None if std::path::Path::new(DEFAULT_CONFIG).exists() => {
            Config::load(std::path::Path::new(DEFAULT_CONFIG))?
        }
        None => Config::default(),
    };
    if let Some(s) = &args.socket {
        cfg.socket = s.clone();
    }
    if let Some(g) = &args.group {
        cfg.group = Some(g.clone());
    }
    if let Some(d) = &args.link_dir {
        cfg.link_dir = d.clone();
    }
    if !args.image_links.is_empty() {
        cfg.image_links = args.image_links.clone();
    }
    if args.queues.is_some() {
        cfg.queues = args.queues;
    }
    if let Some(d) = args.queue_depth {
        cfg.queue_depth = d;
    }
    if let Some(d) = &args.state_dir {
        cfg.state_dir = std::path::absolute(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    if args.remove_devices_on_stop {
        cfg.remove_devices_on_stop = true;
    }
    if args.keep_devices {
        cfg.remove_devices_on_stop = false;
        cfg.keep_devices = None;
    }
    if let Some(f) = args.frontend {
        cfg.frontend = f;
    }
    if args.no_freeze {
        cfg.freeze = false;
    }
    nbd_flags(args, &mut cfg.nbd)?;
    cfg.params.extend(args.module_params.iter().flat_map(|l| l.0.iter().cloned()));
    cfg.params.extend(args.params.iter().cloned());
    for d in &args.devices {
        let backing = std::path::absolute(d).map_err(|e| format!("{}: {e}", d.display()))?;
        cfg.devices.push(DeviceConfig { backing, attach: !args.no_attach });
    }
    cfg.validate()?;
    Ok(cfg)
}

fn nbd_flags(args: &Args, nbd: &mut blksnap_service::nbd::NbdConfig) -> Result<(), String> {
    let abs = |p: &PathBuf| std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()));
    if let Some(p) = &args.nbd_socket {
        nbd.socket = Some(abs(p)?);
    }
    if args.nbd_tcp.is_some() {
        nbd.tcp = args.nbd_tcp;
    }
    if let Some(p) = &args.nbd_tls_cert {
        nbd.tls_cert = Some(abs(p)?);
    }
    if let Some(p) = &args.nbd_tls_key {
        nbd.tls_key = Some(abs(p)?);
    }
    if let Some(p) = &args.nbd_tls_ca {
        nbd.tls_ca = Some(abs(p)?);
    }
    if args.nbd_no_tls {
        nbd.tls = false;
    }
    for p in &args.nbd_writable {
        nbd.writable_origins.push(abs(p)?);
    }
    Ok(())
}

fn frontend(cfg: &Config) -> Result<Box<dyn blksnap_service::Frontend>, String> {
    match cfg.frontend {
        FrontendKind::None => Ok(Box::new(blksnap_service::NullFrontend::default())),
        FrontendKind::Ublk => ublk_frontend(cfg),
    }
}

#[cfg(feature = "ublk")]
fn ublk_frontend(cfg: &Config) -> Result<Box<dyn blksnap_service::Frontend>, String> {
    if !blksnap_service::ublk::available() {
        return Err(
            "/dev/ublk-control missing: load the ublk_drv module (modprobe ublk_drv)".into()
        );
    }
    Ok(Box::new(blksnap_service::ublk::UblkFrontend::of(cfg)))
}

#[cfg(not(feature = "ublk"))]
fn ublk_frontend(_cfg: &Config) -> Result<Box<dyn blksnap_service::Frontend>, String> {
    Err("this blksnapd was built without the `ublk` feature (cargo build --features ublk); --frontend none serves without block devices".into())
}

/// Blocks SIGINT/SIGTERM in this thread (and so in every thread spawned later) and returns the
/// set, for `sigwait` in the main thread.
fn block_signals() -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is a valid value to initialise with sigemptyset; the set and
    // the calls below only touch this local variable and this thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn run() -> Result<(), String> {
    let args = Args::parse();
    let cfg = config(&args)?;
    if let Some(keep) = cfg.keep_devices {
        eprintln!(
            "blksnapd: keep_devices = {keep} is deprecated: a clean stop keeps the devices by \
             default; remove_devices_on_stop = true removes them{}",
            if keep { "" } else { " (what keep_devices = false asks for: applied)" }
        );
    }
    let set = block_signals();
    let frontend = frontend(&cfg)?;
    let params = cfg.engine_params()?;
    let engine_config = EngineConfig::new(params, None, blksnap_engine::clock::Clock::monotonic());
    let engine = Arc::new(Engine::new(engine_config).map_err(|e| format!("{e:?}"))?);
    let group = cfg.group_gid()?;
    let state = StateDir::open(&cfg.state_dir)
        .map_err(|e| format!("state directory {}: {e}", cfg.state_dir.display()))?;
    let daemon = Arc::new(Daemon::with_state(engine, frontend, cfg.clone(), state));
    let server = ControlServer::bind(&cfg.socket, group)
        .map_err(|e| format!("{}: {e}", cfg.socket.display()))?
        .with_limits(cfg.control_limits());
    let nbd = if cfg.nbd.enabled() {
        Some(blksnap_service::nbd::Listeners::bind(&cfg.nbd, cfg.nbd.unix_group(group))?)
    } else {
        None
    };
    if let Err(e) = daemon.add_configured() {
        daemon.shutdown();
        let _ = std::fs::remove_file(&cfg.socket);
        return Err(e);
    }
    for d in daemon.list() {
        eprintln!(
            "blksnapd: serving {} as {} ({}:{})",
            d.backing, d.path, d.dev.major, d.dev.minor
        );
    }
    let d = daemon.clone();
    std::thread::Builder::new()
        .name("blksnapd-accept".into())
        .spawn(move || server.serve(d))
        .map_err(|e| e.to_string())?;
    if let Some(l) = nbd {
        if let Some(p) = l.socket_path() {
            eprintln!("blksnapd: nbd on {}", p.display());
        }
        if let Some(a) = l.tcp_addr() {
            let tls = if cfg.nbd.tcp_tls() { "TLS with client certificates" } else { "no TLS" };
            eprintln!("blksnapd: nbd on tcp {a} ({tls})");
        }
        l.spawn(daemon.nbd_exports().clone())?;
    }
    eprintln!("blksnapd: ready, control socket {}", cfg.socket.display());
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is an initialised signal set and `sig` a valid out location.
    unsafe { libc::sigwait(&set, &mut sig) };
    eprintln!("blksnapd: signal {sig}, stopping");
    daemon.shutdown();
    let _ = std::fs::remove_file(&cfg.socket);
    if let Some(p) = &cfg.nbd.socket {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("blksnapd: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn parameters_by_flag_and_modprobe_list() {
        Args::command().debug_assert();
        let args = Args::try_parse_from([
            "blksnapd",
            "--module-params",
            "diff_storage_minimum=8192 chunk_maximum_in_queue=0x100",
            "--param",
            "chunk_minimum_shift=16",
        ])
        .unwrap();
        let list = args.module_params.expect("the list").0;
        assert_eq!(
            list,
            [("diff_storage_minimum".to_string(), 8192), ("chunk_maximum_in_queue".into(), 256)]
        );
        assert_eq!(args.params, [("chunk_minimum_shift".to_string(), 16)]);
        // every kernel parameter of both generations, by its kernel name, both ways
        let kernel = blksnap_model::Params::KERNEL_DEFAULTS;
        let list: Vec<String> = kernel.iter().map(|(n, v)| format!("{n}={v}")).collect();
        let mut argv = vec!["blksnapd".to_string(), "--module-params".into(), list.join(" ")];
        for item in &list {
            argv.extend(["--param".to_string(), item.clone()]);
        }
        let args = Args::try_parse_from(argv).unwrap();
        let cfg = config(&args).unwrap();
        assert!(cfg.engine_params().is_ok());
        assert_eq!(args.params.len(), kernel.len());
        let bad = Args::try_parse_from(["blksnapd", "--module-params", "a=1 b"]).unwrap_err();
        assert!(bad.to_string().contains("b: expected name=value"), "{bad}");
    }
}
