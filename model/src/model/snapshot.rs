//! Snapshots: create, add, take, collect, info and destroy; the member list and, from the take
//! on, one diff area per member. The engine implements the same rules in `snapshot.rs`. This
//! specifies docs/SEMANTICS.md "Snapshots" (the append rules are in `diff_storage.rs`, the
//! create-time sizing of a File storage too).

use std::collections::{BTreeSet, VecDeque};

use crate::bail;
use crate::errno::{Errno, Error, Result};
use crate::formulas::chunk_layout;
use crate::limits::{MAX_DEVICES_PER_SNAPSHOT, MAX_SNAPSHOTS};
use crate::params::SECTOR_SIZE_BYTES;
use crate::types::*;

use super::diff_area::DiffArea;
use super::diff_storage::{DiffStorage, RangesStorage, StorageKind, StorageStats};
use super::{Loc, Model};

/// One device of a snapshot, in add order.
#[derive(Clone, Debug)]
pub(super) struct Member {
    pub(super) dev: DeviceId,
    /// `Some` from the take on.
    pub(super) area: Option<DiffArea>,
}

#[derive(Clone, Debug)]
pub(super) struct Snapshot {
    pub(super) id: SnapshotId,
    pub(super) members: Vec<Member>,
    pub(super) taken: bool,
    pub(super) storage: DiffStorage,
    pub(super) events: VecDeque<Event>,
    /// Events dropped because the queue was full (the contract counts them).
    pub(super) dropped_events: u64,
}

pub(super) fn no_snapshot() -> Error {
    Error::new(Errno::ESRCH, "no snapshot with this id")
}

impl Model {
    /// SNAPSHOT_CREATE. `initial_capacity_sectors` is the File storage's current size (ignored for
    /// Ranges).
    pub fn snapshot_create(
        &mut self,
        mode: StorageMode,
        initial_capacity_sectors: u64,
    ) -> Result<SnapshotId> {
        if self.snapshots.len() >= MAX_SNAPSHOTS {
            bail!(ENOMEM, "too many snapshots");
        }
        let minimum = self.params.diff_storage_minimum_sectors;
        let storage = match mode {
            StorageMode::Ranges => DiffStorage {
                // Empty; the low-space request for the first portion is outstanding at once.
                stats: StorageStats {
                    requested_sectors: minimum,
                    low_space: true,
                    ..StorageStats::default()
                },
                kind: StorageKind::Ranges(RangesStorage::default()),
            },
            StorageMode::File { limit_sectors, growable } => {
                self.sized_file_storage(limit_sectors, growable, initial_capacity_sectors)?
            }
        };
        let id = self.ids.next_id();
        self.snapshots.push(Snapshot {
            id,
            members: Vec::new(),
            taken: false,
            storage,
            events: VecDeque::new(),
            dropped_events: 0,
        });
        if mode == StorageMode::Ranges {
            self.push_event(
                self.snapshots.len() - 1,
                EventKind::LowFreeSpace { requested_sectors: minimum },
            );
        }
        Ok(id)
    }

    /// SNAPSHOT_DESTROY.
    pub fn snapshot_destroy(&mut self, id: SnapshotId) -> Result<()> {
        let si = self
            .snap_index(id)
            .ok_or_else(|| Error::new(Errno::ENODEV, "no snapshot with this id to destroy"))?;
        // Members, images, storage and queued events go with it; trackers and CBT stay.
        self.snapshots.remove(si);
        Ok(())
    }

    /// ctl snapshotadd.
    pub fn snapshot_add(&mut self, id: SnapshotId, dev: DeviceId) -> Result<()> {
        self.tracker(dev)?;
        let si = self.snap_index(id).ok_or_else(no_snapshot)?;
        if let Some(loc) = self.member_loc(dev) {
            if loc.snap == si {
                bail!(EALREADY, "the device is already in this snapshot");
            }
            bail!(EBUSY, "the device is in another snapshot");
        }
        let snap = &mut self.snapshots[si];
        if snap.taken {
            bail!(EBUSY, "devices cannot be added to a taken snapshot");
        }
        if snap.members.len() >= MAX_DEVICES_PER_SNAPSHOT {
            bail!(ENOMEM, "too many devices in one snapshot");
        }
        snap.members.push(Member { dev, area: None });
        Ok(())
    }

    /// ctl snapshotinfo.
    pub fn snapshot_info(&self, dev: DeviceId) -> Result<SnapshotInfo> {
        self.tracker(dev)?;
        let area = self.member_loc(dev).and_then(|loc| self.area(loc));
        Ok(SnapshotInfo {
            error_code: area.and_then(|a| a.error).map_or(0, |e| -e.code()),
            image: area.map(|_| dev),
        })
    }

    /// SNAPSHOT_TAKE.
    pub fn snapshot_take(&mut self, id: SnapshotId) -> Result<()> {
        let si = self.snap_index(id).ok_or_else(no_snapshot)?;
        let snap = &self.snapshots[si];
        if snap.taken {
            bail!(EALREADY, "the snapshot is already taken");
        }
        if snap.members.is_empty() {
            bail!(ENODEV, "the snapshot has no devices");
        }
        if matches!(snap.storage.kind, StorageKind::Ranges(_))
            && snap.storage.stats.capacity_sectors == 0
        {
            bail!(EFAULT, "the snapshot has no difference storage");
        }
        for mi in 0..self.snapshots[si].members.len() {
            let dev = self.snapshots[si].members[mi].dev;
            let disk = self.disks.get_mut(&dev).expect("a member's disk is registered");
            let chunks = chunk_layout(
                &self.params,
                disk.capacity_bytes() / SECTOR_SIZE_BYTES,
                disk.io_min_sectors,
            );
            disk.tracker.as_mut().expect("a member has a tracker").switch(&mut self.ids);
            let area =
                DiffArea { chunks, stored: BTreeSet::new(), image: disk.data.clone(), error: None };
            self.snapshots[si].members[mi].area = Some(area);
        }
        self.snapshots[si].taken = true;
        Ok(())
    }

    /// SNAPSHOT_COLLECT.
    pub fn snapshot_collect(&self) -> Vec<SnapshotId> {
        self.snapshots.iter().map(|s| s.id).collect()
    }

    pub(super) fn snap_index(&self, id: SnapshotId) -> Option<usize> {
        self.snapshots.iter().position(|s| s.id == id)
    }

    /// The snapshot membership of `dev`, if any (a device is in at most one snapshot).
    pub(super) fn member_loc(&self, dev: DeviceId) -> Option<Loc> {
        self.snapshots.iter().enumerate().find_map(|(snap, s)| {
            s.members.iter().position(|m| m.dev == dev).map(|member| Loc { snap, member })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;

    #[test]
    fn snapshot_add_checks_in_order() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        disk(&mut m, D2, 64 * KIB, 2);
        let a = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        let b = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        assert_eq!(errno(m.snapshot_add(Uuid::default(), D1)), Errno::ESRCH);
        m.snapshot_add(a, D1).unwrap();
        assert_eq!(errno(m.snapshot_add(a, D1)), Errno::EALREADY);
        assert_eq!(errno(m.snapshot_add(b, D1)), Errno::EBUSY, "in another snapshot");
        m.snapshot_append_storage(a, 0, 1024, &[SectorRange::new(0, 64)]).unwrap();
        m.snapshot_take(a).unwrap();
        assert_eq!(
            errno(m.snapshot_add(a, D1)),
            Errno::EALREADY,
            "EALREADY before the taken check"
        );
        assert_eq!(errno(m.snapshot_add(a, D2)), Errno::EBUSY, "the snapshot is taken");
        m.snapshot_add(b, D2).unwrap();
    }

    #[test]
    fn snapshot_add_limit_is_enomem() {
        let mut m = model();
        let id = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        for i in 0..=MAX_DEVICES_PER_SNAPSHOT as u32 {
            let dev = DeviceId::new(2, i);
            m.add_disk(dev, 0, 8).unwrap();
            m.attach(dev).unwrap();
            let r = m.snapshot_add(id, dev);
            if (i as usize) < MAX_DEVICES_PER_SNAPSHOT {
                r.unwrap();
            } else {
                assert_eq!(errno(r), Errno::ENOMEM);
            }
        }
    }

    #[test]
    fn snapshot_create_limit_is_enomem_and_draws_no_id() {
        let mut m = model();
        let file = StorageMode::File { limit_sectors: 0, growable: false };
        for _ in 0..MAX_SNAPSHOTS {
            m.snapshot_create(file, 0).unwrap();
        }
        assert_eq!(errno(m.snapshot_create(StorageMode::Ranges, 0)), Errno::ENOMEM);
        let first = m.snapshot_collect()[0];
        m.snapshot_destroy(first).unwrap();
        assert_eq!(m.snapshot_create(file, 0).unwrap(), IdGen::nth(SEED, MAX_SNAPSHOTS as u64));
    }

    #[test]
    fn snapshot_take_checks_in_order() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        assert_eq!(errno(m.snapshot_take(Uuid::default())), Errno::ESRCH);
        let id = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        assert_eq!(errno(m.snapshot_take(id)), Errno::ENODEV, "no devices");
        m.snapshot_add(id, D1).unwrap();
        assert_eq!(errno(m.snapshot_take(id)), Errno::EFAULT, "no storage");
        m.snapshot_append_storage(id, 0, 1024, &[SectorRange::new(5, 0)]).unwrap();
        assert_eq!(errno(m.snapshot_take(id)), Errno::EFAULT, "empty ranges add nothing");
        assert_eq!(m.snapshot_info(D1).unwrap().image, None, "a failed take makes no image");
        m.snapshot_append_storage(id, 0, 1024, &[SectorRange::new(0, 8)]).unwrap();
        m.snapshot_take(id).unwrap();
        assert_eq!(errno(m.snapshot_take(id)), Errno::EALREADY);
        assert_eq!(m.cbt_info(D1).unwrap().changes_number, 1, "one switch per take");
    }

    #[test]
    fn file_storage_take_needs_no_capacity() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        let id = file_taken(&mut m, &[D1], 0, false, 0);
        assert_eq!(m.snapshot_info(D1).unwrap().image, Some(D1));
        // The first COW overflows at once.
        m.write(D1, 0, &[1; 512]).unwrap();
        assert_eq!(events(&mut m, id), vec![corrupted(D1, Errno::ENOSPC)]);
    }

    #[test]
    fn destroy_collect_and_wait() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        assert_eq!(errno(m.snapshot_destroy(Uuid::default())), Errno::ENODEV);
        let a = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        let b = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        let c = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        assert_eq!(m.snapshot_collect(), vec![a, b, c], "creation order");
        m.snapshot_add(b, D1).unwrap();
        m.snapshot_append_storage(b, 0, 1024, &[SectorRange::new(0, 64)]).unwrap();
        m.snapshot_take(b).unwrap();
        m.snapshot_destroy(b).unwrap();
        assert_eq!(m.snapshot_collect(), vec![a, c]);
        assert_eq!(errno(m.snapshot_destroy(b)), Errno::ENODEV);
        assert_eq!(errno(m.wait_event(b, 10)), Errno::ESRCH, "the queue is closed");
        assert_eq!(errno(m.storage_stats(b)), Errno::ESRCH);
        assert_eq!(errno(m.snapshot_take(b)), Errno::ESRCH);
        assert_eq!(errno(m.snapshot_append_storage(b, 0, 1024, &[])), Errno::ESRCH);
        assert_eq!(errno(m.snapshot_add(b, D1)), Errno::ESRCH);
        // The tracker survives; the image is gone; the device is free again.
        assert_eq!(m.cbt_info(D1).unwrap().changes_number, 1);
        assert_eq!(m.snapshot_info(D1).unwrap(), SnapshotInfo { error_code: 0, image: None });
        assert_eq!(errno(m.image_read(D1, 0, 512)), Errno::ENODEV);
        m.snapshot_add(c, D1).unwrap();
    }

    #[test]
    fn snapshot_info_reports_image_and_error() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        assert_eq!(m.snapshot_info(D1).unwrap(), SnapshotInfo { error_code: 0, image: None });
        let id = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        m.snapshot_add(id, D1).unwrap();
        assert_eq!(m.snapshot_info(D1).unwrap().image, None, "not taken yet");
        m.snapshot_append_storage(id, 0, 1024, &[SectorRange::new(0, 8)]).unwrap();
        m.snapshot_take(id).unwrap();
        assert_eq!(m.snapshot_info(D1).unwrap(), SnapshotInfo { error_code: 0, image: Some(D1) });
        touch_chunks(&mut m, D1, 0, 2); // the second chunk overflows
        assert_eq!(m.snapshot_info(D1).unwrap(), SnapshotInfo { error_code: -28, image: Some(D1) });
    }
}
