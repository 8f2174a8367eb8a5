//! Fault injection: errors and torn writes queued per target and kind (`fail_next`), counted
//! faults pinned a number of I/Os ahead (`fail_nth`), and File-storage growth failures. The
//! engine's side is the `FaultDev` wrapper and its `FaultPlan` in `io/fault.rs`. This specifies
//! the faults of docs/SEMANTICS.md "Data path"; the readings on torn and counted faults are in
//! the model's module doc (`mod.rs`).

use std::collections::VecDeque;

use crate::errno::{Errno, Error, Result};
use crate::types::*;

use super::Model;

/// Fault-queue key: `Some(dev)` for an origin, `None` for the storage; `true` for writes.
pub(super) type FaultKey = (Option<DeviceId>, bool);

/// What an injected fault does to the I/O it hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectedFault {
    /// The I/O fails with this errno and changes nothing.
    Error(Errno),
    /// A torn write: the first `sectors_written` sectors reach the device (all of it if the
    /// write is shorter), then the write fails with `errno`. Other I/O behaves as `Error`.
    Torn {
        /// 512-byte sectors written before the failure.
        sectors_written: u64,
        /// What the caller sees.
        errno: Errno,
    },
}

impl InjectedFault {
    /// The errno the failed I/O returns.
    pub fn errno(self) -> Errno {
        match self {
            InjectedFault::Error(errno) | InjectedFault::Torn { errno, .. } => errno,
        }
    }

    pub(super) fn into_error(self) -> Error {
        Error::new(self.errno(), "injected I/O fault")
    }
}

/// What a counted fault waits for: an I/O of a target and kind, or a File-storage growth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CountedKey {
    Io(FaultKey),
    Growth,
}

/// A counted fault: fires on the matching event after `skip` more have passed.
#[derive(Clone, Copy, Debug)]
pub(super) struct Counted {
    key: CountedKey,
    skip: u64,
    fault: InjectedFault,
}

fn fault_key(target: FaultTarget, kind: IoKind) -> FaultKey {
    let dev = match target {
        FaultTarget::Origin(dev) => Some(dev),
        FaultTarget::Storage => None,
    };
    (dev, kind == IoKind::Write)
}

impl Model {
    /// Make the next I/O of `kind` on `target` fail with `errno`.
    pub fn fail_next(&mut self, target: FaultTarget, kind: IoKind, errno: crate::Errno) {
        self.fail_next_fault(target, kind, InjectedFault::Error(errno));
    }

    /// Make the next write on `target` a torn write: its first `sectors_written` sectors land,
    /// then it fails with `errno` (queued with the [`Model::fail_next`] write faults, in order).
    pub fn fail_next_torn(&mut self, target: FaultTarget, sectors_written: u64, errno: Errno) {
        self.fail_next_fault(target, IoKind::Write, InjectedFault::Torn { sectors_written, errno });
    }

    /// Make the next I/O of `kind` on `target` fail with `fault`.
    pub fn fail_next_fault(&mut self, target: FaultTarget, kind: IoKind, fault: InjectedFault) {
        self.faults.entry(fault_key(target, kind)).or_default().push_back(fault);
    }

    /// Let `skip` I/Os of `kind` on `target` pass from now on, then fail the next one with
    /// `fault`, ahead of any [`Model::fail_next`] fault (the engine's pinned `fail_at`).
    pub fn fail_nth(&mut self, target: FaultTarget, kind: IoKind, skip: u64, fault: InjectedFault) {
        let key = CountedKey::Io(fault_key(target, kind));
        self.counted.push(Counted { key, skip, fault });
    }

    /// Let `skip` File-storage growths pass from now on, then fail the next one with `errno`,
    /// ahead of any [`Model::fail_next_growth`] fault.
    pub fn fail_nth_growth(&mut self, skip: u64, errno: Errno) {
        let fault = InjectedFault::Error(errno);
        self.counted.push(Counted { key: CountedKey::Growth, skip, fault });
    }

    /// Faults armed and not fired yet (queued, counted and growth faults).
    pub fn pending_faults(&self) -> usize {
        self.faults.values().map(VecDeque::len).sum::<usize>()
            + self.growth_faults.len()
            + self.counted.len()
    }

    /// Withdraw every armed fault (mirrors `FaultPlan::clear` on every plan).
    pub fn clear_faults(&mut self) {
        self.faults.clear();
        self.growth_faults.clear();
        self.counted.clear();
    }

    /// Make the next growth of a File storage (at create or after an allocation, any snapshot)
    /// fail with `errno`. Mirrors the engine's `FaultPlan::fail_set_len` on the storage plan.
    pub fn fail_next_growth(&mut self, errno: crate::Errno) {
        self.growth_faults.push_back(errno);
    }

    /// One I/O on `target`: fails with the oldest queued fault of that kind, consuming it.
    pub(super) fn io(&mut self, target: FaultTarget, kind: IoKind) -> Result<()> {
        match self.io_fault(target, kind) {
            Some(fault) => Err(fault.into_error()),
            None => Ok(()),
        }
    }

    /// One I/O on `target`: the fault it takes, if any (a counted one first, else the oldest
    /// queued one), consumed.
    pub(super) fn io_fault(&mut self, target: FaultTarget, kind: IoKind) -> Option<InjectedFault> {
        let key = fault_key(target, kind);
        self.tick_counted(CountedKey::Io(key))
            .or_else(|| self.faults.get_mut(&key).and_then(VecDeque::pop_front))
    }

    /// Counts one event of `key` against the counted faults: the oldest one due fires (and any
    /// other due one expires, as a pinned rule of the engine whose op has passed); the others
    /// of this key count down.
    fn tick_counted(&mut self, key: CountedKey) -> Option<InjectedFault> {
        let mut fired = None;
        self.counted.retain_mut(|c| {
            if c.key != key {
                return true;
            }
            if c.skip == 0 {
                fired = fired.or(Some(c.fault));
                return false;
            }
            c.skip -= 1;
            true
        });
        fired
    }

    /// Growing a File storage: fails with a counted growth fault or the oldest queued growth
    /// fault, consuming it.
    pub(super) fn grow_storage(&mut self) -> Result<()> {
        if let Some(fault) = self.tick_counted(CountedKey::Growth) {
            return Err(fault.into_error());
        }
        match self.growth_faults.pop_front() {
            Some(errno) => Err(Error::new(errno, "injected storage growth fault")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;

    #[test]
    fn faults_are_per_target_and_kind_in_fifo_order() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        disk(&mut m, D2, 64 * KIB, 2);
        m.fail_next(FaultTarget::Origin(D1), IoKind::Read, Errno::EIO);
        m.fail_next(FaultTarget::Origin(D1), IoKind::Read, Errno::ENOMEM);
        m.fail_next(FaultTarget::Storage, IoKind::Read, Errno::EPERM);
        m.write(D1, 0, &[1; 512]).unwrap();
        m.read(D2, 0, 512).unwrap();
        assert_eq!(m.read(D1, 0, 0).unwrap(), Vec::<u8>::new(), "an empty read does no I/O");
        assert_eq!(errno(m.read(D1, 0, 512)), Errno::EIO);
        assert_eq!(errno(m.read(D1, 0, 512)), Errno::ENOMEM);
        m.read(D1, 0, 512).unwrap();
        assert_eq!(errno(m.read(D1, 1, 512)), Errno::EINVAL, "a rejected read does no I/O");
    }

    #[test]
    fn torn_origin_write_leaves_a_prefix_and_fails() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        let id = v3_taken(&mut m, &[D1], 1024);
        let before = m.read(D1, 0, 4 * 512).unwrap();
        m.fail_next_torn(FaultTarget::Origin(D1), 2, Errno::EIO);
        assert_eq!(errno(m.write(D1, 0, &[9; 4 * 512])), Errno::EIO);
        let after = m.read(D1, 0, 4 * 512).unwrap();
        assert_eq!(after[..1024], [9; 1024]);
        assert_eq!(after[1024..], before[1024..]);
        // The COW before the write happened: the image still shows the content at take.
        assert_eq!(m.image_read(D1, 0, 2048).unwrap(), pattern(64 * KIB, 1)[..2048].to_vec());
        // Longer than the write: all of it lands, the error is still returned; zero fills too.
        m.fail_next_torn(FaultTarget::Origin(D1), 100, Errno::ENOSPC);
        assert_eq!(errno(m.discard(D1, 512, 512)), Errno::ENOSPC);
        assert_eq!(m.read(D1, 512, 512).unwrap(), vec![0; 512]);
        assert_eq!(events(&mut m, id), vec![]);
    }

    #[test]
    fn torn_storage_write_corrupts_like_an_error() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        let id = v3_taken(&mut m, &[D1], 1024);
        m.fail_next_torn(FaultTarget::Storage, 3, Errno::EIO);
        m.write(D1, 0, &[1; 512]).unwrap();
        assert_eq!(events(&mut m, id), vec![corrupted(D1, Errno::EIO)]);
        assert_eq!(errno(m.image_read(D1, 0, 512)), Errno::EIO);
    }

    #[test]
    fn counted_faults_skip_then_fire_first() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        m.fail_next(FaultTarget::Origin(D1), IoKind::Read, Errno::ENOMEM);
        m.fail_nth(FaultTarget::Origin(D1), IoKind::Read, 1, InjectedFault::Error(Errno::EIO));
        assert_eq!(m.pending_faults(), 2);
        // The first read is counted (skip 1 -> 0) and takes the queued fault.
        assert_eq!(errno(m.read(D1, 0, 512)), Errno::ENOMEM);
        assert_eq!(errno(m.read(D1, 0, 512)), Errno::EIO, "the counted one is due");
        m.read(D1, 0, 512).unwrap();
        m.fail_nth(FaultTarget::Origin(D1), IoKind::Write, 0, InjectedFault::Error(Errno::EIO));
        m.fail_nth(FaultTarget::Origin(D1), IoKind::Write, 0, InjectedFault::Error(Errno::EPERM));
        assert_eq!(errno(m.write(D1, 0, &[1; 512])), Errno::EIO);
        m.write(D1, 0, &[1; 512]).unwrap();
        assert_eq!(m.pending_faults(), 0, "a second rule due on the same I/O expires");
        // Growth: the second growth fails.
        m.snapshot_create(StorageMode::File { limit_sectors: 1000, growable: true }, 0).unwrap();
        m.fail_nth_growth(0, Errno::EFBIG);
        assert_eq!(
            errno(m.snapshot_create(StorageMode::File { limit_sectors: 1000, growable: true }, 0)),
            Errno::EFBIG
        );
    }
}
