//! A snapshot's events: queued FIFO, stamped with the clock, the newest dropped (and counted)
//! when the queue is full; `wait_event` pops the oldest or sleeps out its timeout. The engine
//! implements the same rules in `event_queue.rs` (where waiters block and a destroy wakes them).
//! This specifies docs/SEMANTICS.md "Events" and `wait_event` in "Snapshots".

use crate::bail;
use crate::limits::EVENT_QUEUE_CAPACITY;
use crate::types::*;
use crate::Result;

use super::snapshot::no_snapshot;
use super::Model;

/// Nanoseconds per millisecond, for `wait_event` timeouts.
const NS_PER_MS: u64 = 1_000_000;

impl Model {
    /// SNAPSHOT_WAIT_EVENT.
    pub fn wait_event(&mut self, id: SnapshotId, timeout_ms: u32) -> Result<Event> {
        let si = self.snap_index(id).ok_or_else(no_snapshot)?;
        if let Some(event) = self.snapshots[si].events.pop_front() {
            return Ok(event);
        }
        // Nothing queued: the simulated waiter sleeps out its whole timeout.
        self.advance_clock(u64::from(timeout_ms) * NS_PER_MS);
        bail!(ENOENT, "no event arrived within the timeout");
    }

    /// Queue an event on snapshot `si`, stamped now; a full queue drops it and counts the drop.
    pub(super) fn push_event(&mut self, si: usize, kind: EventKind) {
        let time_ns = self.clock_ns;
        let snap = &mut self.snapshots[si];
        if snap.events.len() >= EVENT_QUEUE_CAPACITY {
            snap.dropped_events += 1;
            return;
        }
        snap.events.push_back(Event { time_ns, kind });
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::NS_PER_MS;

    #[test]
    fn wait_event_pops_in_order_and_times_out() {
        let mut m = model();
        m.advance_clock(5);
        let id = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        assert_eq!(errno(m.wait_event(Uuid::default(), 0)), Errno::ESRCH);
        let e = m.wait_event(id, 1000).unwrap();
        assert_eq!(
            e,
            Event {
                time_ns: 5,
                kind: EventKind::LowFreeSpace { requested_sectors: MINIMUM_SECTORS }
            }
        );
        assert_eq!(m.now_ns(), 5, "an event returns at once");
        assert_eq!(errno(m.wait_event(id, 250)), Errno::ENOENT);
        assert_eq!(m.now_ns(), 5 + 250 * NS_PER_MS, "the timeout is slept out");
        assert_eq!(errno(m.wait_event(id, 0)), Errno::ENOENT);
        assert_eq!(m.now_ns(), 5 + 250 * NS_PER_MS);
    }

    #[test]
    fn event_queue_drops_the_newest_when_full() {
        let mut m = model();
        let id = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        for n in 1..=EVENT_QUEUE_CAPACITY as u64 {
            m.push_event(0, EventKind::NoSpace { requested_sectors: n });
        }
        assert_eq!(m.snapshots[0].events.len(), EVENT_QUEUE_CAPACITY);
        assert_eq!(m.snapshots[0].dropped_events, 1);
        let kinds = events(&mut m, id);
        assert_eq!(kinds.len(), EVENT_QUEUE_CAPACITY);
        assert_eq!(kinds[0], EventKind::LowFreeSpace { requested_sectors: MINIMUM_SECTORS });
        assert_eq!(
            kinds[EVENT_QUEUE_CAPACITY - 1],
            EventKind::NoSpace { requested_sectors: EVENT_QUEUE_CAPACITY as u64 - 1 }
        );
    }
}
