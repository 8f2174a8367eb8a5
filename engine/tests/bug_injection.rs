//! Each historical upstream bug, restored in the engine (`--cfg blksnap_bugs`), must be found by
//! a checker within the CI budget. A test passes only if the checker fails the scenario with
//! the bug's signature; if a checker stops catching a bug, CI fails.
//!
//! shuttle: `RUSTFLAGS="--cfg blksnap_bugs --cfg blksnap_shuttle" CARGO_TARGET_DIR=
//! target/shuttle-bugs cargo test --release -p blksnap-engine --test bug_injection`
//! loom: the same with `--cfg blksnap_loom` (target/loom-bugs).
#![cfg(all(blksnap_bugs, any(blksnap_loom, blksnap_shuttle)))]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};

mod common;

use blksnap_engine::bugs::Bug;
use blksnap_engine::clock::Clock;
use blksnap_engine::event_queue::EventQueue;
use blksnap_engine::sync::{thread, Arc};
use blksnap_model::{Event, EventKind};

/// First the control: `scenario(None)` (the fixed engine) must pass the checker's whole
/// budget. Then `scenario(Some(bug))` must fail with `signature`. Panics otherwise.
fn expect_caught<F>(name: &str, signature: &str, bug: Bug, scenario: F)
where
    F: Fn(Option<Bug>) + Send + Sync + Copy + 'static,
{
    let control = std::sync::Arc::new(AtomicUsize::new(0));
    let control_counter = control.clone();
    run_checker(move || {
        control_counter.fetch_add(1, Ordering::Relaxed);
        scenario(None)
    });
    let control_runs = control.load(Ordering::Relaxed);
    assert!(control_runs > 1, "the control explored {control_runs} executions");
    let executions = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = executions.clone();
    let counted = move || {
        counter.fetch_add(1, Ordering::Relaxed);
        scenario(Some(bug));
    };
    let outcome = catch_unwind(AssertUnwindSafe(|| run_checker(counted)));
    let n = executions.load(Ordering::Relaxed);
    let payload = match outcome {
        Ok(()) => panic!("{name}: NOT caught by {CHECKER} in {n} executions"),
        Err(payload) => payload,
    };
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    // Alternatives are separated by '|' (one bug can show as either of two assertions).
    assert!(
        signature.split('|').any(|alternative| message.contains(alternative)),
        "{name}: the checker failed, but not with the bug's signature {signature:?}: {message}"
    );
    eprintln!(
        "bug caught: {name} by {CHECKER} after {n} executions ({signature}); \
         control without the bug: {control_runs} executions clean"
    );
}

#[cfg(blksnap_shuttle)]
const CHECKER: &str = "shuttle";
#[cfg(blksnap_loom)]
const CHECKER: &str = "loom";

#[cfg(blksnap_shuttle)]
fn run_checker<F: Fn() + Send + Sync + 'static>(f: F) {
    let mut config = shuttle::Config::new();
    config.stack_size = 1 << 20;
    // Random first (cheap, broad), then PCT (depth 3): 1,000 each at most.
    let f = std::sync::Arc::new(f);
    let f1 = f.clone();
    shuttle::Runner::new(shuttle::scheduler::RandomScheduler::new(1000), config.clone())
        .run(move || f1());
    shuttle::Runner::new(shuttle::scheduler::PctScheduler::new(3, 1000), config).run(move || f());
}

#[cfg(blksnap_loom)]
fn run_checker<F: Fn() + Send + Sync + 'static>(f: F) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(2);
    builder.check(f);
}

#[cfg(blksnap_shuttle)]
mod shuttle_found {
    use super::*;
    use blksnap_engine::io::{Dev, MemDev};
    use blksnap_engine::sync::StdArc;
    use blksnap_engine::{Engine, EngineConfig, StorageSpec};
    use blksnap_model::{DeviceId, Errno, Params, SectorRange};

    const D0: DeviceId = DeviceId::new(7, 0);
    const CHUNK: usize = 4096;

    fn engine(bug: Option<Bug>) -> Arc<Engine> {
        let config = EngineConfig {
            params: Params::small(),
            id_seed: Some(1),
            clock: Clock::manual(true),
            bug,
        };
        Arc::new(Engine::new(config).unwrap())
    }

    fn taken_snapshot(e: &Engine, chunks: usize) -> blksnap_model::SnapshotId {
        let disk: Dev = StdArc::new(MemDev::new((chunks * CHUNK) as u64));
        e.add_disk(D0, disk, 1).unwrap();
        e.attach(D0).unwrap();
        let storage = StorageSpec::File {
            backend: StdArc::new(MemDev::growable(0, 1 << 24)),
            limit_sectors: 1 << 12,
        };
        let id = e.snapshot_create(storage).unwrap();
        e.snapshot_add(id, D0).unwrap();
        e.snapshot_take(id).unwrap();
        id
    }

    #[test]
    fn seed_bug_a_diff_area_freed_under_image_io() {
        expect_caught(
            "seed bug a (diff area unpinned)",
            "get from zero|use after release of a DiffArea",
            Bug::SeedADiffAreaUnpinned,
            |bug| {
                let e = engine(bug);
                let id = taken_snapshot(&e, 2);
                let e1 = e.clone();
                let writer = thread::spawn(move || {
                    let r = e1.image_write(D0, 0, &[1; 2 * CHUNK]);
                    assert!(r.is_ok() || r.unwrap_err().errno == Errno::ENODEV);
                });
                e.snapshot_destroy(id).unwrap();
                writer.join().unwrap();
            },
        );
    }

    #[test]
    fn seed_bug_b_tracker_in_two_snapshots() {
        expect_caught(
            "seed bug b (double membership)",
            "a member's owner is its snapshot",
            Bug::SeedBDoubleMembership,
            |bug| {
                let e = engine(bug);
                let s1 = taken_snapshot(&e, 1);
                let s2 = e.snapshot_create(StorageSpec::Ranges).unwrap();
                let e1 = e.clone();
                let adder = thread::spawn(move || {
                    let _ = e1.snapshot_add(s2, D0);
                });
                e.snapshot_destroy(s1).unwrap();
                adder.join().unwrap();
                e.snapshot_destroy(s2).unwrap();
            },
        );
    }

    #[test]
    fn reference_taken_from_zero_in_a_racing_lookup() {
        expect_caught(
            "get from zero (lookup vs last put)",
            "get from zero",
            Bug::GetFromZero,
            |bug| {
                let e = engine(bug);
                let id = e.snapshot_create(StorageSpec::Ranges).unwrap();
                let e1 = e.clone();
                let waiter = thread::spawn(move || {
                    let _ = e1.wait_event(id, 0);
                });
                e.snapshot_destroy(id).unwrap();
                waiter.join().unwrap();
            },
        );
    }

    #[test]
    fn take_take_double_switch() {
        expect_caught(
            "take ‖ take double switch",
            "exactly one take succeeds",
            Bug::TakeTakeDoubleSwitch,
            |bug| {
                let e = engine(bug);
                let disk: Dev = StdArc::new(MemDev::new(CHUNK as u64));
                e.add_disk(D0, disk, 1).unwrap();
                e.attach(D0).unwrap();
                let storage = StorageSpec::File {
                    backend: StdArc::new(MemDev::growable(0, 1 << 24)),
                    limit_sectors: 1 << 12,
                };
                let id = e.snapshot_create(storage).unwrap();
                e.snapshot_add(id, D0).unwrap();
                let e1 = e.clone();
                let t = thread::spawn(move || e1.snapshot_take(id).is_ok());
                let mine = e.snapshot_take(id).is_ok();
                let theirs = t.join().unwrap();
                assert!(mine ^ theirs, "exactly one take succeeds");
                assert_eq!(e.cbt_info(D0).unwrap().changes_number, 1, "exactly one take succeeds");
            },
        );
    }

    #[test]
    fn abba_deadlock_between_add_and_take() {
        expect_caught(
            "ABBA add vs take",
            "lock order violated: acquiring SnapshotState|deadlock",
            Bug::AbbaAddTake,
            |bug| {
                let e = engine(bug);
                let disk: Dev = StdArc::new(MemDev::new(CHUNK as u64));
                e.add_disk(D0, disk, 1).unwrap();
                e.attach(D0).unwrap();
                let id = e.snapshot_create(StorageSpec::Ranges).unwrap();
                e.snapshot_add(id, D0).unwrap();
                e.snapshot_append_storage(
                    id,
                    StdArc::new(MemDev::new(1 << 16)),
                    &[SectorRange::new(0, 64)],
                )
                .unwrap();
                // A second add of the member (EALREADY) runs the ctl path while TAKE freezes D0.
                let e1 = e.clone();
                let adder = thread::spawn(move || {
                    let _ = e1.snapshot_add(id, D0);
                });
                e.snapshot_take(id).unwrap();
                adder.join().unwrap();
            },
        );
    }

    #[test]
    fn completion_touches_an_unpinned_storage() {
        expect_caught(
            "diff storage unpinned",
            "use after release of a DiffStorage",
            Bug::StorageUnpinned,
            |bug| {
                let e = engine(bug);
                let id = taken_snapshot(&e, 1);
                let e1 = e.clone();
                let writer = thread::spawn(move || {
                    let r = e1.image_write(D0, 0, &[1; 512]);
                    assert!(r.is_ok() || r.unwrap_err().errno == Errno::ENODEV);
                });
                e.snapshot_destroy(id).unwrap();
                writer.join().unwrap();
            },
        );
    }

    #[test]
    fn lost_wakeup_in_the_event_queue_shuttle() {
        expect_caught("lost wake-up (shuttle)", "deadlock", Bug::LostWakeup, lost_wakeup_scenario);
    }
}

/// Issue 11's race restored: an image read that re-checks only that the image is open returns
/// an origin write made after the take once copying stopped. Both checkers must catch it.
#[test]
fn image_read_ignores_corruption() {
    expect_caught(
        "image read ignores corruption",
        "an image read returned data written after the take",
        Bug::ReadIgnoresCorruption,
        |bug| common::image_read_racing_corruption(bugged(bug)),
    );
}

/// The take that does not wait for write tickets: a write that passed its copy-on-write check
/// before the take lands after it, and the image changes. Both checkers must catch it.
#[test]
fn take_ignores_write_tickets() {
    expect_caught(
        "take ignores write tickets",
        "the image changed after the take",
        Bug::TakeIgnoresWriteTickets,
        |bug| common::write_ticket_racing_take(bugged(bug)),
    );
}

/// DESTROY closing the images only in its teardown: a second destroy answers ENODEV and an
/// image read after that still succeeds. Both checkers must catch it.
#[test]
fn destroy_closes_images_late() {
    expect_caught(
        "destroy closes images late",
        "an image read after a destroy answered ENODEV",
        Bug::DestroyClosesImagesLate,
        |bug| common::destroy_racing_destroy(bugged(bug)),
    );
}

/// Nothing waiting for a destroy's teardown to release the members: after a second destroy
/// answered ENODEV the device is still in the snapshot. Both checkers must catch it.
#[test]
fn destroy_releases_members_late() {
    expect_caught(
        "destroy releases members late",
        "a member after a destroy answered ENODEV",
        Bug::DestroyReleasesMembersLate,
        |bug| common::destroy_racing_destroy(bugged(bug)),
    );
}

/// The shared scenarios' engine configuration with `bug` restored (or none).
fn bugged(bug: Option<Bug>) -> blksnap_engine::EngineConfig {
    let mut config = common::config();
    config.bug = bug;
    config
}

fn lost_wakeup_scenario(bug: Option<Bug>) {
    let q =
        Arc::new(if bug.is_some() { EventQueue::with_lost_wakeup() } else { EventQueue::new() });
    let q2 = q.clone();
    // A clock that never times out on its own: only a push can end the wait.
    let waiter = thread::spawn(move || q2.wait(1000, &Clock::manual(false)).unwrap());
    q.push(Event { time_ns: 1, kind: EventKind::NoSpace { requested_sectors: 1 } });
    waiter.join().unwrap();
}

/// loom aborts the process when it finds a deadlock (a destructor panics during the unwind), so
/// the buggy model runs in a child process of this test binary and the parent reads its verdict.
#[cfg(blksnap_loom)]
#[test]
fn lost_wakeup_in_the_event_queue_loom() {
    const CHILD: &str = "BLKSNAP_LOOM_BUG_CHILD";
    if std::env::var_os(CHILD).is_some() {
        run_checker(|| lost_wakeup_scenario(Some(Bug::LostWakeup)));
        return;
    }
    run_checker(|| lost_wakeup_scenario(None));
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "lost_wakeup_in_the_event_queue_loom",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "lost wake-up NOT caught by loom: {stderr}");
    assert!(stderr.contains("deadlock"), "loom failed without the bug's signature: {stderr}");
    eprintln!("bug caught: lost wake-up by loom (deadlock); control without the bug clean");
}
