//! `blksnap-sim`: the seeded deterministic simulation of blksnap-rs (engine vs model, faults,
//! invariants after every step). See `blksnap_sim_tests::sim`.
//!
//! ```text
//! blksnap-sim --seed 42 --steps 20000 [--devices D] [--trace FILE] [--quiet] [--check-determinism]
//! blksnap-sim --sweep
//! ```
//! Exit status 1 on a mismatch, a broken invariant, a hang, or a determinism difference.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blksnap_sim_tests::sim::{self, SimConfig};
use clap::{value_parser, Arg, ArgAction, Command};

/// A step that makes no progress for this long is a hang.
const HANG_SECS: u64 = 60;

fn command() -> Command {
    Command::new("blksnap-sim")
        .about("Seeded deterministic simulation of blksnap-rs: engine vs model under faults")
        .arg(Arg::new("seed").long("seed").value_parser(value_parser!(u64)).default_value("42"))
        .arg(
            Arg::new("steps").long("steps").value_parser(value_parser!(u64)).default_value("20000"),
        )
        .arg(
            Arg::new("devices")
                .long("devices")
                .value_parser(value_parser!(u64).range(1..=4))
                .help("disks (1-4); default: chosen by the seed"),
        )
        .arg(Arg::new("trace").long("trace").help("write the trace to FILE instead of stdout"))
        .arg(Arg::new("quiet").long("quiet").action(ArgAction::SetTrue).help("no trace"))
        .arg(
            Arg::new("check-determinism")
                .long("check-determinism")
                .action(ArgAction::SetTrue)
                .help("run the seed twice and compare the trace hashes"),
        )
        .arg(
            Arg::new("sweep")
                .long("sweep")
                .action(ArgAction::SetTrue)
                .help("run the fault sweep (fail the k-th I/O of a fixed workload, every k)"),
        )
}

/// Runs `f` on a worker thread; gives up (exit 1) when `heartbeat` stops moving.
fn watched<T: Send + 'static>(
    what: String,
    heartbeat: Arc<AtomicU64>,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    let mut last = (heartbeat.load(Ordering::Relaxed), Instant::now());
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(v) => return v,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                eprintln!("{what}: the simulation thread panicked");
                std::process::exit(1);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let now = heartbeat.load(Ordering::Relaxed);
                if now != last.0 {
                    last = (now, Instant::now());
                } else if last.1.elapsed() > Duration::from_secs(HANG_SECS) {
                    eprintln!("{what}: no progress for {HANG_SECS} s at step {now}: a hang");
                    std::process::exit(1);
                }
            }
        }
    }
}

fn run_once(
    config: SimConfig,
    out: Option<Box<dyn Write + Send>>,
) -> Result<sim::Report, sim::Failure> {
    let s = sim::Sim::new(config, out);
    let heartbeat = s.c.heartbeat.clone();
    watched(format!("seed {}", config.seed), heartbeat, move || s.run())
}

/// Prints a line to stdout; a closed pipe (`| head`) is not an error worth a panic.
fn say(text: impl std::fmt::Display) {
    let _ = writeln!(std::io::stdout(), "{text}");
}

fn main() -> ExitCode {
    let m = command().get_matches();
    if m.get_flag("sweep") {
        let report = watched("sweep".into(), Arc::new(AtomicU64::new(0)), || {
            sim::sweep(|k, total| {
                if k % 100 == 0 {
                    eprintln!("sweep: run {k}/{total}");
                }
            })
        });
        say(report.render());
        return if report.failures.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    let config = SimConfig {
        seed: *m.get_one::<u64>("seed").expect("default"),
        steps: *m.get_one::<u64>("steps").expect("default"),
        devices: m.get_one::<u64>("devices").map(|d| *d as usize),
    };
    let quiet = m.get_flag("quiet");
    let out: Option<Box<dyn Write + Send>> = match m.get_one::<String>("trace") {
        Some(path) => match File::create(path) {
            Ok(f) => Some(Box::new(BufWriter::new(f))),
            Err(e) => {
                eprintln!("cannot create {path}: {e}");
                return ExitCode::FAILURE;
            }
        },
        None if quiet => None,
        None => Some(Box::new(BufWriter::new(std::io::stdout()))),
    };
    let first = match run_once(config, out) {
        Ok(r) => r,
        Err(f) => {
            say(f);
            return ExitCode::FAILURE;
        }
    };
    say(first.render());
    if m.get_flag("check-determinism") {
        match run_once(config, None) {
            Ok(second) if second.trace_hash == first.trace_hash && second.stats == first.stats => {
                say(format!(
                    "determinism: OK, two runs of seed {} gave trace hash {:016x}",
                    config.seed, first.trace_hash
                ));
            }
            Ok(second) => {
                say(format!(
                    "determinism: FAILED, seed {} gave trace hashes {:016x} and {:016x}",
                    config.seed, first.trace_hash, second.trace_hash
                ));
                return ExitCode::FAILURE;
            }
            Err(f) => {
                say(format!("determinism: FAILED, the second run failed:\n{f}"));
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
