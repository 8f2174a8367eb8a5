//! Snapshots (kernel: `snapshot.c`): a set of member devices, one difference storage (with the
//! event queue), and — once taken — one diff area per member, published in each device's gate.
//!
//! The snapshot lock (`state`) serialises add, take and destroy of one snapshot; in particular
//! two concurrent takes cannot both switch (upstream tested `is_taken` without the lock).
//! Lock order: global list (never nested) → snapshot `state` → device gates in ascending device
//! order (write side) → tracker `owner` (leaf). Never the reverse: the I/O path, which holds a
//! gate, never takes a snapshot lock (upstream's add-vs-take ABBA deadlock).

use blksnap_model::formulas::chunk_layout;
use blksnap_model::limits::MAX_DEVICES_PER_SNAPSHOT;
use blksnap_model::{Errno, Error, Result, SnapshotId};

use crate::diff_area::DiffArea;
use crate::diff_storage::DiffStorage;
use crate::kref::Kref;
use crate::sync::{Arc, Mutex, MutexGuard};
use crate::tracker::{Disk, Tracker};
use crate::Shared;

#[cfg(blksnap_bugs)]
fn shared_bug(snapshot: &Snapshot, bug: crate::bugs::Bug) -> bool {
    snapshot.storage.shared().injected(bug)
}

/// A member device: the membership reference on its tracker.
pub struct Member {
    /// The disk.
    pub disk: Arc<Disk>,
    /// One tracker reference, owned by this membership.
    pub tracker: Kref<Tracker>,
}

/// Mutable snapshot state, under the snapshot lock.
#[derive(Default)]
pub struct SnapState {
    /// Members in add order.
    pub members: Vec<Member>,
    /// Taken successfully.
    pub taken: bool,
    /// Destroyed: removed from the list; late lookups that raced see this.
    pub destroyed: bool,
}

/// A snapshot.
pub struct Snapshot {
    /// Its id.
    pub id: SnapshotId,
    /// Its difference storage and event queue.
    pub storage: Kref<DiffStorage>,
    /// The snapshot lock.
    pub state: Mutex<SnapState>,
}

impl Snapshot {
    /// Add `disk` (whose attached tracker is `tracker`). Checks in the contract's order after
    /// the caller's ENOENT/ESRCH: EALREADY, EBUSY (other snapshot), EBUSY (taken), ENOMEM.
    pub fn add(&self, disk: &Arc<Disk>, tracker: Kref<Tracker>) -> Result<()> {
        let mut st = self.state.lock();
        if st.destroyed {
            return Err(Error::new(Errno::ESRCH, "the snapshot was destroyed"));
        }
        // Under the snapshot lock, the gate (read) proves the tracker is still the attached one:
        // a detach in between would otherwise leave a member nobody tracks.
        let gate = disk.gate_read()?;
        let attached = gate.tracker.as_ref().is_some_and(|t| Kref::ptr_eq(t, &tracker));
        if !attached {
            return Err(Error::new(Errno::ENOENT, "the device's filter was detached"));
        }
        let mut owner = tracker.owner.lock();
        match *owner {
            Some(id) if id == self.id => {
                return Err(Error::new(Errno::EALREADY, "the device is already in this snapshot"))
            }
            #[cfg(blksnap_bugs)]
            Some(_) if shared_bug(self, crate::bugs::Bug::SeedBDoubleMembership) => {}
            Some(_) => return Err(Error::new(Errno::EBUSY, "the device is in another snapshot")),
            None => {}
        }
        if st.taken {
            return Err(Error::new(Errno::EBUSY, "the snapshot is already taken"));
        }
        if st.members.len() >= MAX_DEVICES_PER_SNAPSHOT {
            return Err(Error::new(Errno::ENOMEM, "too many devices in one snapshot"));
        }
        *owner = Some(self.id);
        drop(owner);
        drop(gate);
        st.members.push(Member { disk: disk.clone(), tracker });
        Ok(())
    }

    /// TAKE: every member's CBT is switched and its diff area published while all member gates
    /// are held for writing at once, so the devices are frozen at one common point.
    pub fn take(&self, shared: &Shared) -> Result<()> {
        let mut st = self.state.lock();
        #[allow(unused_mut)]
        let mut test_taken = true;
        #[cfg(blksnap_bugs)]
        if shared.injected(crate::bugs::Bug::TakeTakeDoubleSwitch) {
            // `is_taken` tested without the lock held for the take: both takes pass the test.
            let taken = st.taken;
            drop(st);
            if taken {
                return Err(Error::new(Errno::EALREADY, "the snapshot is already taken"));
            }
            st = self.state.lock();
            test_taken = false;
        }
        if st.destroyed {
            return Err(Error::new(Errno::ESRCH, "the snapshot was destroyed"));
        }
        if test_taken && st.taken {
            return Err(Error::new(Errno::EALREADY, "the snapshot is already taken"));
        }
        if st.members.is_empty() {
            return Err(Error::new(Errno::ENODEV, "the snapshot has no devices"));
        }
        if self.storage.is_ranges() && self.storage.capacity_sectors() == 0 {
            return Err(Error::new(Errno::EFAULT, "append difference storage before the take"));
        }
        let params = shared.params();
        let areas: Vec<Kref<DiffArea>> = st
            .members
            .iter()
            .map(|m| {
                let d = &m.disk;
                let layout = chunk_layout(&params, d.capacity_sectors(), d.io_min_sectors);
                DiffArea::new(d.id, d.backend.clone(), layout, self.storage.clone(), &shared.live)
            })
            .collect();
        let mut order: Vec<usize> = (0..st.members.len()).collect();
        order.sort_by_key(|&i| st.members[i].disk.id);
        let mut gates: Vec<_> =
            order.iter().map(|&i| (i, st.members[i].disk.gate.write())).collect();
        // Every gate first (ascending), then each disk's writes in flight outside its gate.
        #[cfg(blksnap_bugs)]
        let quiesce = !shared.injected(crate::bugs::Bug::TakeIgnoresWriteTickets);
        #[cfg(not(blksnap_bugs))]
        let quiesce = true;
        if quiesce {
            for (i, gate) in &gates {
                st.members[*i].disk.quiesce(gate);
            }
        }
        // Switch in add order (the generation ids of wrapping maps are drawn in that order).
        gates.sort_by_key(|(i, _)| *i);
        for (i, gate) in gates.iter_mut() {
            st.members[*i].tracker.cbt.switch(|| shared.next_id());
            gate.diff_area = Some(areas[*i].clone());
        }
        drop(gates);
        st.taken = true;
        if areas.iter().any(|a| a.is_corrupted()) {
            Self::unpublish(&mut st);
            return Err(Error::new(Errno::EFAULT, "the snapshot failed during the take"));
        }
        for area in &areas {
            area.set_image_open(true);
        }
        Ok(())
    }

    /// Close every image, then unpublish every diff area (gate write), then drop the gate's
    /// reference. In-flight I/O keeps each diff area alive until it finishes.
    fn unpublish(st: &mut SnapState) {
        for m in &st.members {
            let mut gate = m.disk.gate.write();
            m.disk.quiesce(&gate);
            let area = gate.diff_area.take();
            drop(gate);
            if let Some(area) = area {
                area.set_image_open(false);
            }
        }
        st.taken = false;
    }

    /// DESTROY's teardown, under the snapshot lock `st` (the caller took it, and removed the
    /// snapshot from the list, before).
    pub fn teardown(&self, mut st: MutexGuard<'_, SnapState>) {
        assert!(!st.destroyed, "a snapshot is torn down once");
        st.destroyed = true;
        for m in &st.members {
            // Close the image first so no new image request starts, then freeze and unpublish.
            if let Some(area) = m.disk.open_image() {
                area.set_image_open(false);
            }
        }
        Self::unpublish(&mut st);
        for m in st.members.drain(..) {
            let mut owner = m.tracker.owner.lock();
            assert_eq!(*owner, Some(self.id), "a member's owner is its snapshot");
            *owner = None;
        }
        drop(st);
        self.storage.events.close();
    }
}
