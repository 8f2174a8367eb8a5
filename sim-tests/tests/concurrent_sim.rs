//! The concurrent mode of the simulation (`blksnap_sim_tests::concurrent`): seeded workloads
//! split over threads, every round linearizable against the model with the same final state.
//!
//! In an ordinary build the threads are real (whatever interleaving the machine gives); with
//! `RUSTFLAGS="--cfg blksnap_shuttle"` (CI stage `concurrent-sim`) each seed runs under shuttle's
//! random and PCT schedulers, `BLKSNAP_SHUTTLE_SIM_ITERATIONS` schedules each (default 60).
//! `BLKSNAP_SIM_EXTRA_SEEDS` (comma-separated) adds seeds to the fixed ones: CI derives two from
//! the commit, so each change also meets workloads no earlier run has (a failure names its seed;
//! the same variable replays it).

use blksnap_sim_tests::concurrent::{run, ConcurrentConfig, ConcurrentReport};

fn config(seed: u64) -> ConcurrentConfig {
    ConcurrentConfig {
        seed,
        prefix_steps: 150,
        rounds: 12,
        threads: 2 + (seed % 2) as usize,
        ops_per_thread: 2 + usize::from(seed.is_multiple_of(3)),
    }
}

/// The fixed seeds `1..=fixed`, then those of `BLKSNAP_SIM_EXTRA_SEEDS`.
fn seeds(fixed: u64) -> Vec<u64> {
    let extra = std::env::var("BLKSNAP_SIM_EXTRA_SEEDS").unwrap_or_default();
    let extra = extra.split(',').filter(|s| !s.trim().is_empty()).map(|s| {
        s.trim().parse::<u64>().unwrap_or_else(|_| panic!("BLKSNAP_SIM_EXTRA_SEEDS: {s:?}"))
    });
    (1..=fixed).chain(extra).collect()
}

fn check(report: &ConcurrentReport, seed: u64) {
    assert!(report.rounds_run > 0, "seed {seed}: no round ran: {report:?}");
    assert!(report.ops >= 4 * u64::from(report.rounds_run), "seed {seed}: {report:?}");
}

#[cfg(not(blksnap_shuttle))]
#[test]
fn seeds_with_real_threads() {
    let (mut rounds, mut skipped, mut ops, mut steps) = (0, 0, 0, 0);
    let seeds = seeds(24);
    for &seed in &seeds {
        let report = run(&config(seed)).unwrap_or_else(|e| panic!("{e}"));
        check(&report, seed);
        rounds += report.rounds_run;
        skipped += report.faults_withdrawn;
        ops += report.ops;
        steps += report.search_steps;
    }
    eprintln!(
        "concurrent simulation, real threads: seeds {seeds:?}, {rounds} rounds ({skipped} began by withdrawing \
         a pending fault), {ops} concurrent operations, {steps} model steps searched"
    );
}

#[cfg(blksnap_shuttle)]
#[test]
fn seeds_under_shuttle() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let iterations = std::env::var("BLKSNAP_SHUTTLE_SIM_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let seeds = seeds(8);
    let executions = Arc::new(AtomicU64::new(0));
    let rounds = Arc::new(AtomicU64::new(0));
    for &seed in &seeds {
        eprintln!("concurrent simulation under shuttle: seed {seed}");
        let body = {
            let (executions, rounds) = (executions.clone(), rounds.clone());
            move || {
                let report = run(&config(seed)).unwrap_or_else(|e| panic!("{e}"));
                check(&report, seed);
                executions.fetch_add(1, Ordering::Relaxed);
                rounds.fetch_add(u64::from(report.rounds_run), Ordering::Relaxed);
            }
        };
        let mut shuttle_config = shuttle::Config::new();
        shuttle_config.stack_size = 1 << 21;
        let body = Arc::new(body);
        let b1 = body.clone();
        let random = shuttle::scheduler::RandomScheduler::new(iterations);
        shuttle::Runner::new(random, shuttle_config.clone()).run(move || b1());
        let pct = shuttle::scheduler::PctScheduler::new(3, iterations);
        shuttle::Runner::new(pct, shuttle_config).run(move || body());
    }
    eprintln!(
        "concurrent simulation under shuttle: seeds {seeds:?}, {} executions (random + PCT), {} \
         rounds checked",
        executions.load(Ordering::Relaxed),
        rounds.load(Ordering::Relaxed)
    );
}
