//! A snapshot's event queue (kernel: embedded in the diff storage).
//!
//! FIFO; each event goes to exactly one waiter (popped under the lock). A waiter re-checks the
//! queue, the closed flag and the deadline under the lock after every wake-up, so no wake-up is
//! lost and spurious ones are harmless. Bounded at [`EVENT_QUEUE_CAPACITY`]: push never blocks
//! and never allocates past the reservation; an event beyond the bound is dropped and counted
//! (the engine's limits keep the count well below it). `close` (snapshot destroyed) wakes every
//! waiter with ESRCH — the fix of upstream's "destroy does not wake waiters".

use std::collections::VecDeque;

use blksnap_model::limits::EVENT_QUEUE_CAPACITY;
use blksnap_model::{Errno, Error, Event, Result};

use crate::clock::Clock;
use crate::sync::{Condvar, LockRank, Mutex};

#[derive(Debug)]
struct QueueState {
    events: VecDeque<Event>,
    closed: bool,
    dropped: u64,
}

/// The queue.
#[derive(Debug)]
pub struct EventQueue {
    state: Mutex<QueueState>,
    wakeup: Condvar,
    /// Bug builds: notify before publishing (a lost wake-up).
    #[cfg(blksnap_bugs)]
    lost_wakeup: bool,
}

impl Default for EventQueue {
    fn default() -> EventQueue {
        EventQueue::new()
    }
}

impl EventQueue {
    /// An empty, open queue with its capacity reserved.
    pub fn new() -> EventQueue {
        EventQueue {
            state: Mutex::new(
                LockRank::EventQueue,
                QueueState {
                    events: VecDeque::with_capacity(EVENT_QUEUE_CAPACITY),
                    closed: false,
                    dropped: 0,
                },
            ),
            wakeup: Condvar::new(),
            #[cfg(blksnap_bugs)]
            lost_wakeup: false,
        }
    }

    /// The queue of a snapshot of an engine (bug builds may restore the lost wake-up).
    pub fn for_engine(shared: &crate::Shared) -> EventQueue {
        let _ = shared;
        #[allow(unused_mut)]
        let mut q = EventQueue::new();
        #[cfg(blksnap_bugs)]
        {
            q.lost_wakeup = shared.injected(crate::bugs::Bug::LostWakeup);
        }
        q
    }

    /// Bug builds: a queue with the lost wake-up restored.
    #[cfg(blksnap_bugs)]
    pub fn with_lost_wakeup() -> EventQueue {
        EventQueue { lost_wakeup: true, ..EventQueue::new() }
    }

    /// Append `event` and wake the waiters. Ignored once closed.
    pub fn push(&self, event: Event) {
        #[cfg(blksnap_bugs)]
        if self.lost_wakeup {
            // Wake first, publish after: a waiter between its check and its sleep misses it.
            self.wakeup.notify_all();
            let mut st = self.state.lock();
            st.events.push_back(event);
            return;
        }
        let mut st = self.state.lock();
        if st.closed {
            return;
        }
        if st.events.len() >= EVENT_QUEUE_CAPACITY {
            st.dropped += 1;
            return;
        }
        st.events.push_back(event);
        drop(st);
        // All waiters: any of them may take it, the others re-check and find the queue empty.
        self.wakeup.notify_all();
    }

    /// Pop the oldest event, waiting until `timeout_ms` passes on `clock`. Closed → ESRCH;
    /// nothing by the deadline → ENOENT (`timeout_ms == 0` polls).
    pub fn wait(&self, timeout_ms: u32, clock: &Clock) -> Result<Event> {
        let deadline_ns = clock.now_ns().saturating_add(u64::from(timeout_ms) * 1_000_000);
        let mut st = self.state.lock();
        loop {
            if st.closed {
                return Err(Error::new(Errno::ESRCH, "the snapshot was destroyed"));
            }
            if let Some(event) = st.events.pop_front() {
                return Ok(event);
            }
            if clock.now_ns() >= deadline_ns {
                return Err(Error::new(Errno::ENOENT, "no event before the timeout"));
            }
            st = clock.wait_until(&self.wakeup, st, deadline_ns);
        }
    }

    /// Wake every waiter so it re-reads the clock (after a manual clock moved).
    pub fn kick(&self) {
        let _st = self.state.lock();
        self.wakeup.notify_all();
    }

    /// Close: pending and future waits return ESRCH; queued events are dropped.
    pub fn close(&self) {
        let mut st = self.state.lock();
        st.closed = true;
        st.events.clear();
        drop(st);
        self.wakeup.notify_all();
    }

    /// Events queued now.
    pub fn len(&self) -> usize {
        self.state.lock().events.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.state.lock().dropped
    }
}

#[cfg(all(test, not(any(blksnap_loom, blksnap_shuttle))))]
mod tests {
    use super::*;
    use blksnap_model::EventKind;

    fn ev(n: u64) -> Event {
        Event { time_ns: n, kind: EventKind::NoSpace { requested_sectors: n } }
    }

    #[test]
    fn fifo_and_timeout() {
        let q = EventQueue::new();
        let clock = Clock::manual(true);
        q.push(ev(1));
        q.push(ev(2));
        assert_eq!(q.wait(0, &clock).unwrap(), ev(1));
        assert_eq!(q.wait(0, &clock).unwrap(), ev(2));
        assert_eq!(q.wait(5, &clock).unwrap_err().errno, Errno::ENOENT);
        assert_eq!(clock.now_ns(), 5_000_000, "the manual clock jumped to the deadline");
    }

    #[test]
    fn bounded() {
        let q = EventQueue::new();
        for i in 0..(EVENT_QUEUE_CAPACITY as u64 + 3) {
            q.push(ev(i));
        }
        assert_eq!(q.len(), EVENT_QUEUE_CAPACITY);
        assert_eq!(q.dropped(), 3);
    }

    #[test]
    fn close_wakes_a_real_waiter() {
        let q = crate::sync::Arc::new(EventQueue::new());
        let q2 = q.clone();
        let t = crate::sync::thread::spawn(move || q2.wait(60_000, &Clock::monotonic()));
        crate::sync::thread::sleep(std::time::Duration::from_millis(20));
        q.close();
        assert_eq!(t.join().unwrap().unwrap_err().errno, Errno::ESRCH);
        q.push(ev(1));
        assert!(q.is_empty(), "closed queues take nothing");
    }

    #[test]
    fn push_wakes_a_real_waiter() {
        let q = crate::sync::Arc::new(EventQueue::new());
        let q2 = q.clone();
        let t = crate::sync::thread::spawn(move || q2.wait(60_000, &Clock::monotonic()));
        crate::sync::thread::sleep(std::time::Duration::from_millis(20));
        q.push(ev(9));
        assert_eq!(t.join().unwrap().unwrap(), ev(9));
    }

    #[test]
    fn kick_lets_a_waiter_see_a_manual_clock_pass_its_deadline() {
        // A manual clock that does not jump: the waiter sleeps until notified, and only a kick
        // after the clock moved lets it see the deadline (nothing is ever pushed).
        let clock = Clock::manual(false);
        let Clock::Manual(manual) = &clock else { unreachable!() };
        let q = crate::sync::Arc::new(EventQueue::new());
        let (q2, clock2) = (q.clone(), clock.clone());
        // 0: still waiting; 1: ENOENT (the deadline passed); 2: anything else.
        let answer = crate::sync::Arc::new(crate::sync::atomic::AtomicU8::new(0));
        let answer2 = answer.clone();
        let waiter = crate::sync::thread::spawn(move || {
            let r = q2.wait(10, &clock2);
            let code = if r.is_err_and(|e| e.errno == Errno::ENOENT) { 1 } else { 2 };
            answer2.store(code, crate::sync::atomic::Ordering::SeqCst);
        });
        // The waiter may read the clock after any of these steps: advance and kick until it
        // answers (a few rounds), or give up after about 10 s.
        for _ in 0..1000 {
            manual.advance(20_000_000);
            q.kick();
            if answer.load(crate::sync::atomic::Ordering::SeqCst) != 0 {
                break;
            }
            crate::sync::thread::sleep(core::time::Duration::from_millis(10));
        }
        let seen = answer.load(crate::sync::atomic::Ordering::SeqCst);
        assert_eq!(seen, 1, "the kicked waiter saw its deadline pass (ENOENT)");
        waiter.join().unwrap();
    }

    #[test]
    fn len_and_is_empty_follow_the_queue() {
        let q = EventQueue::new();
        assert!(q.is_empty());
        q.push(ev(1));
        assert!(!q.is_empty());
        assert_eq!(q.len(), 1);
        q.wait(0, &Clock::manual(true)).unwrap();
        assert!(q.is_empty());
    }
}
