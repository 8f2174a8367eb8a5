//! Fault sweep: a fixed workload (three disks, two snapshots taken, overwrites with COW, image
//! reads and writes, overflow, destroy, a second take, plain I/O, then the end-of-run drain,
//! whole-image reads and teardown) is run once to number the engine's I/Os; then, for every k,
//! again with the k-th I/O failing — EIO, and for writes separately a torn write — on the engine
//! (a pinned `FaultPlan::fail_at`) and on the model (a counted fault at the same operation,
//! target, kind and ordinal). Every run must agree with the model after every step and keep the
//! simulation's invariants: an origin write succeeds with its data or fails leaving a prefix of
//! it (never silent loss), images show the frozen copy or fail, nothing stays alive after the
//! teardown, and every run ends (a watchdog fails the test on a hang).

use std::sync::mpsc;
use std::time::Duration;

use blksnap_sim_tests::sim::{self, SweepReport};
use blksnap_sim_tests::{IoOp, IoTarget};

/// No single run may take this long.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn fail_every_io_once() {
    let (tx, rx) = mpsc::channel::<Option<SweepReport>>();
    let progress = tx.clone();
    std::thread::spawn(move || {
        let report = sim::sweep(|_, _| {
            let _ = progress.send(None);
        });
        let _ = tx.send(Some(report));
    });
    let report = loop {
        match rx.recv_timeout(RUN_TIMEOUT) {
            Ok(Some(report)) => break report,
            Ok(None) => continue,
            Err(e) => {
                panic!("a fault-sweep run did not finish within {RUN_TIMEOUT:?} ({e:?}): a hang")
            }
        }
    };
    println!("{}", report.render());
    assert!(report.failures.is_empty(), "{}", report.render());
    // The workload reaches every kind of I/O the engine issues.
    for key in [
        (IoTarget::Origin(0), IoOp::Read),
        (IoTarget::Origin(0), IoOp::Write),
        (IoTarget::Origin(2), IoOp::WriteZeroes),
        (IoTarget::Storage, IoOp::Read),
        (IoTarget::Storage, IoOp::Write),
        (IoTarget::Storage, IoOp::WriteZeroes),
        (IoTarget::Storage, IoOp::SetLen),
    ] {
        assert!(report.by_kind.get(&key).is_some_and(|n| *n > 0), "no {key:?} I/O in the workload");
    }
    assert!(report.ios >= 100, "the workload issues only {} I/Os", report.ios);
    assert_eq!(report.runs, 1 + report.ios + report.writes);
    assert!(report.runs_with_origin_write_error > 0 && report.runs_with_corruption > 0);
    assert!(report.runs_with_more_errors > report.ios / 2, "most faults must surface");
}

/// The fault-free sweep workload passes on its own, and recording I/O changes nothing.
#[test]
fn sweep_workload_is_clean_and_deterministic() {
    let (a, ra) = sim::sweep_run(None, true).expect("clean run");
    let (b, rb) = sim::sweep_run(None, true).expect("clean run");
    assert_eq!((a, ra.len()), (b, rb.len()));
    assert_eq!(ra, rb, "the I/O numbering is the same in every run");
    assert_eq!(a.origin_write_errors, 0);
}
