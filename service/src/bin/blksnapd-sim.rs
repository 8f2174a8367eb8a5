//! `blksnapd-sim`: the seeded deterministic simulation of the daemon (`blksnap_service::sim`):
//! clients' requests, origin writes, crashes, clean stops and restarts, state-directory faults,
//! checked against an oracle after every step.
//!
//! ```text
//! blksnapd-sim --seed 42 --steps 2000 [--trace] [--check-determinism] [--daemon-log]
//! ```
//! Exit status 1 on the first failure, with the line that replays it.

use std::process::ExitCode;
use std::time::Instant;

use blksnap_service::sim::{self, SimConfig};
use clap::Parser;

#[derive(Parser)]
#[command(
    about = "Seeded deterministic simulation of blksnapd: requests, writes, crashes, restarts, faults"
)]
struct Args {
    /// The seed: the whole run follows from it.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Steps.
    #[arg(long, default_value_t = 2000)]
    steps: u64,
    /// Print every step.
    #[arg(long)]
    trace: bool,
    /// Run the seed twice and compare the trace hashes.
    #[arg(long)]
    check_determinism: bool,
    /// Keep the daemon's log (stderr); by default it is discarded.
    #[arg(long)]
    daemon_log: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !args.daemon_log {
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            use std::os::fd::AsRawFd;
            // SAFETY: both descriptors are open (`null` lives until after the call); dup2 only
            // replaces descriptor 2, which nothing in this process holds a Rust handle to.
            unsafe {
                libc::dup2(null.as_raw_fd(), 2);
            }
        }
    }
    let t = Instant::now();
    let cfg = SimConfig { seed: args.seed, steps: args.steps, trace: args.trace };
    let result = sim::run(&cfg).and_then(|report| {
        if !args.check_determinism {
            return Ok(report);
        }
        let quiet = SimConfig { trace: false, ..cfg.clone() };
        let again = sim::run(&quiet)?;
        if again.trace_hash != report.trace_hash {
            return Err(format!(
                "not deterministic: trace hash {:016x}, then {:016x}",
                report.trace_hash, again.trace_hash
            ));
        }
        Ok(report)
    });
    match result {
        Ok(report) => {
            println!("blksnapd-sim seed {} steps {}: ok", args.seed, args.steps);
            println!("{report}");
            println!("  wall time        {:.2} s", t.elapsed().as_secs_f64());
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("blksnapd-sim seed {} steps {}: FAILED", args.seed, args.steps);
            println!("  {e}");
            println!(
                "  replay: cargo run --release -p blksnap-service --bin blksnapd-sim -- --seed {} --steps {} --trace --daemon-log",
                args.seed, args.steps
            );
            ExitCode::FAILURE
        }
    }
}
