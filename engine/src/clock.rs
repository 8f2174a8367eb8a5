//! The clock: event time labels and wait timeouts. Neither checker models timeouts, so tests use
//! a manual clock they control; production uses CLOCK_MONOTONIC.

use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{Arc, Condvar, MutexGuard};

/// A clock the engine reads and waits on.
#[derive(Clone, Debug)]
pub enum Clock {
    /// CLOCK_MONOTONIC (via `Instant`), nanoseconds since the engine started.
    Monotonic(std::time::Instant),
    /// A clock that moves only when told.
    Manual(Arc<ManualClock>),
}

/// A test clock. With `jump_on_wait` a waiter that would block until a deadline moves the clock
/// to that deadline instead (time jumps to the next timer, as in a discrete-event simulation, so
/// single-threaded tests never block); without it a waiter sleeps until notified and timeouts
/// fire only after [`ManualClock::advance`] plus a notification (the engine's `advance_clock`).
#[derive(Debug, Default)]
pub struct ManualClock {
    now_ns: AtomicU64,
    jump_on_wait: bool,
}

impl ManualClock {
    /// A clock at 0.
    pub fn new(jump_on_wait: bool) -> ManualClock {
        ManualClock { now_ns: AtomicU64::new(0), jump_on_wait }
    }
    /// Move forward by `ns` (saturating).
    pub fn advance(&self, ns: u64) {
        let mut cur = self.now_ns.load(Ordering::Acquire);
        loop {
            let next = cur.saturating_add(ns);
            match self.now_ns.compare_exchange(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(seen) => cur = seen,
            }
        }
    }
    /// Current reading.
    pub fn now_ns(&self) -> u64 {
        self.now_ns.load(Ordering::Acquire)
    }
}

impl Clock {
    /// A real monotonic clock starting now.
    pub fn monotonic() -> Clock {
        Clock::Monotonic(std::time::Instant::now())
    }

    /// A manual clock (see [`ManualClock`]).
    pub fn manual(jump_on_wait: bool) -> Clock {
        Clock::Manual(Arc::new(ManualClock::new(jump_on_wait)))
    }

    /// Nanoseconds.
    pub fn now_ns(&self) -> u64 {
        match self {
            Clock::Monotonic(start) => {
                u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
            }
            Clock::Manual(m) => m.now_ns(),
        }
    }

    /// Sleep on `cv` until notified or until this clock reads `deadline_ns`. May return early:
    /// callers loop over their predicate and the deadline.
    pub fn wait_until<'a, T>(
        &self,
        cv: &Condvar,
        guard: MutexGuard<'a, T>,
        deadline_ns: u64,
    ) -> MutexGuard<'a, T> {
        match self {
            Clock::Monotonic(_) => {
                let left_ns = deadline_ns.saturating_sub(self.now_ns());
                cv.wait_timeout(guard, core::time::Duration::from_nanos(left_ns))
            }
            Clock::Manual(m) if m.jump_on_wait => {
                let now = m.now_ns();
                if deadline_ns > now {
                    m.advance(deadline_ns - now);
                }
                guard
            }
            Clock::Manual(_) => cv.wait(guard),
        }
    }
}
