//! Trackers and disks (kernel: `tracker.c` and the block-filter slot).
//!
//! A [`Disk`] is a device the engine serves: its backing plus the **gate**, the engine's
//! equivalent of the block queue's enter/freeze barrier. Every origin write, every CBT ctl and
//! every image-request start holds the gate for reading; attach, detach, the take switch and
//! teardown hold it for writing. What the I/O path needs — the tracker and the diff area — is
//! published only inside the gate, so a writer sees either no snapshot or a complete one.
//!
//! Tracker membership has one authority, `Tracker::owner`: `None` ⇔ in no snapshot; `Some(id)` ⇔
//! on exactly that snapshot's member list, which holds exactly one tracker reference for it.

use blksnap_model::params::SECTOR_SHIFT;
use blksnap_model::{DeviceId, Errno, Error, Result, SnapshotId};

use crate::cbt::CbtMap;
use crate::diff_area::DiffArea;
use crate::io::Dev;
use crate::kref::Kref;
use crate::sync::{Arc, Condvar, LockRank, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Change tracking of one device.
#[derive(Debug)]
pub struct Tracker {
    /// The device.
    pub device: DeviceId,
    /// Its CBT (fixed size: the engine's disks do not change capacity).
    pub cbt: CbtMap,
    /// The snapshot it belongs to. A leaf lock.
    pub owner: Mutex<Option<SnapshotId>>,
}

/// What the I/O path reads inside the gate.
#[derive(Default)]
pub struct Gate {
    /// The attached tracker (filter slot).
    pub tracker: Option<Kref<Tracker>>,
    /// The diff area while a snapshot of this device is taken.
    pub diff_area: Option<Kref<DiffArea>>,
    /// Set once by `remove_disk`, under the write side, with the tracker taken out. A request
    /// that looked the disk up before its removal and reaches the gate after it fails with
    /// ENODEV, exactly as if it had come after the removal: no request sees the half-removed
    /// disk (no tracker, still registered), and none attaches to a disk nobody can find.
    pub removed: bool,
}

/// A served device.
pub struct Disk {
    /// Its number.
    pub id: DeviceId,
    /// Where its data lives.
    pub backend: Dev,
    /// Capacity in bytes (multiple of 512), fixed at registration.
    pub capacity_bytes: u64,
    /// Minimum I/O size in sectors (chunks are at least this large).
    pub io_min_sectors: u64,
    /// The I/O barrier.
    pub gate: RwLock<Gate>,
    /// Origin writes in flight outside the gate ([`WriteTicket`]s not yet dropped).
    pub tickets: WriteTickets,
}

/// The count of a disk's [`WriteTicket`]s and the wait for none to remain.
///
/// Invariant: a ticket is counted only inside a gate read section, and every gate write
/// section starts only after the count is zero ([`Disk::quiesce`]), so a write section (take,
/// attach, detach, destroy's unpublish, removal) excludes every write in flight exactly as the
/// gate's read side does for the synchronous path — the kernel's queue freeze waits for the
/// requests in flight the same way.
#[derive(Debug)]
pub struct WriteTickets {
    count: Mutex<u64>,
    drained: Condvar,
}

impl Default for WriteTickets {
    fn default() -> WriteTickets {
        WriteTickets { count: Mutex::new(LockRank::WriteTickets, 0), drained: Condvar::new() }
    }
}

/// An origin write whose change tracking is done and whose chunks need no copy-on-write
/// (`Engine::try_write_begin`); the caller writes the backing itself (asynchronously) and
/// drops the ticket once that write has completed. Until then every gate write section of the
/// disk waits: a take cannot start while the write may still land.
pub struct WriteTicket {
    disk: Arc<Disk>,
}

impl WriteTicket {
    /// Counts a new ticket; the caller holds the gate for reading.
    pub(crate) fn new(disk: Arc<Disk>, _gate: &RwLockReadGuard<'_, Gate>) -> WriteTicket {
        *disk.tickets.count.lock() += 1;
        WriteTicket { disk }
    }

    /// The disk's backing (to retry the write synchronously, without the gate).
    pub fn backend(&self) -> &Dev {
        &self.disk.backend
    }
}

impl Drop for WriteTicket {
    fn drop(&mut self) {
        let mut n = self.disk.tickets.count.lock();
        assert!(*n > 0, "a write ticket ended that was never counted");
        *n -= 1;
        if *n == 0 {
            self.disk.tickets.drained.notify_all();
        }
    }
}

impl Disk {
    /// The gate, shared, unless the disk was removed (ENODEV).
    pub fn gate_read(&self) -> Result<RwLockReadGuard<'_, Gate>> {
        let gate = self.gate.read();
        if gate.removed {
            return Err(Error::new(Errno::ENODEV, "the disk was removed"));
        }
        Ok(gate)
    }

    /// The gate, exclusive, unless the disk was removed (ENODEV); every write ticket has ended.
    pub fn gate_write(&self) -> Result<RwLockWriteGuard<'_, Gate>> {
        let gate = self.gate.write();
        self.quiesce(&gate);
        if gate.removed {
            return Err(Error::new(Errno::ENODEV, "the disk was removed"));
        }
        Ok(gate)
    }

    /// Waits, with the gate held for writing, until no write ticket is left (none can be
    /// counted meanwhile: counting needs the read side). Their holders never need this gate to
    /// end them, so the wait ends once their writes complete.
    pub fn quiesce(&self, _gate: &RwLockWriteGuard<'_, Gate>) {
        let mut n = self.tickets.count.lock();
        while *n > 0 {
            n = self.tickets.drained.wait(n);
        }
    }

    /// Capacity in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_bytes >> SECTOR_SHIFT
    }

    /// The diff area whose image is open, if any (a counted reference: the caller is a temporary
    /// holder for the length of one image request).
    pub fn open_image(&self) -> Option<Kref<DiffArea>> {
        self.gate.read().diff_area.clone().filter(|a| a.image_open())
    }
}
