//! Disks and the origin's data: registration, reads, writes, discards and write-zeroes. The
//! engine keeps a disk in `tracker.rs` (`Disk`, its backing and gate) and runs the origin write
//! path (CBT mark, copy-on-write, then the write) in `engine.rs`. This specifies `add_disk` in
//! docs/SEMANTICS.md "Disks and the filter" and the origin write and read in "Data path".

use crate::bail;
use crate::errno::{Errno, Error, Result};
use crate::limits::MAX_DISKS;
use crate::params::SECTOR_SIZE_BYTES;
use crate::types::*;

use super::cbt::Tracker;
use super::faults::InjectedFault;
use super::{sector_bytes, to_usize, Model};

/// A registered disk.
#[derive(Clone, Debug)]
pub(super) struct Disk {
    pub(super) data: Vec<u8>,
    pub(super) io_min_sectors: u64,
    pub(super) tracker: Option<Tracker>,
}

impl Disk {
    pub(super) fn capacity_bytes(&self) -> u64 {
        self.data.len() as u64
    }
}

pub(super) fn no_disk() -> Error {
    Error::new(Errno::ENODEV, "no disk with this device number")
}

impl Model {
    /// Register a disk of `capacity_bytes` (multiple of 512) whose io_min is `io_min_sectors`.
    pub fn add_disk(
        &mut self,
        dev: DeviceId,
        capacity_bytes: u64,
        io_min_sectors: u64,
    ) -> Result<()> {
        if !capacity_bytes.is_multiple_of(SECTOR_SIZE_BYTES) {
            bail!(EINVAL, "a disk's capacity must be a multiple of 512 bytes");
        }
        if self.disks.contains_key(&dev) {
            bail!(EALREADY, "this device number is already registered");
        }
        if self.disks.len() >= MAX_DISKS {
            bail!(ENOMEM, "too many disks");
        }
        let len = usize::try_from(capacity_bytes)
            .map_err(|_| Error::new(Errno::ENOMEM, "the disk does not fit in memory"))?;
        self.disks.insert(dev, Disk { data: vec![0; len], io_min_sectors, tracker: None });
        Ok(())
    }

    /// Unregister a disk (its block device goes away): EBUSY while its tracker is in a snapshot
    /// (taken or not); its tracker, if any, goes with it. ENODEV if not registered.
    pub fn remove_disk(&mut self, dev: DeviceId) -> Result<()> {
        self.disk(dev)?;
        if self.snapshots.iter().any(|s| s.members.iter().any(|m| m.dev == dev)) {
            bail!(EBUSY, "the device is in a snapshot: destroy it first");
        }
        self.disks.remove(&dev);
        Ok(())
    }

    /// Read the origin.
    pub fn read(&mut self, dev: DeviceId, offset_bytes: u64, len_bytes: u64) -> Result<Vec<u8>> {
        check_io_range(offset_bytes, len_bytes, self.disk(dev)?.capacity_bytes())?;
        if len_bytes == 0 {
            return Ok(Vec::new());
        }
        self.io(FaultTarget::Origin(dev), IoKind::Read)?;
        let range = to_usize(offset_bytes)..to_usize(offset_bytes + len_bytes);
        Ok(self.disk(dev)?.data[range].to_vec())
    }

    /// Write the origin.
    pub fn write(&mut self, dev: DeviceId, offset_bytes: u64, data: &[u8]) -> Result<()> {
        self.origin_write(dev, offset_bytes, data.len() as u64, Some(data))
    }

    /// Discard on the origin (= write zeroes).
    pub fn discard(&mut self, dev: DeviceId, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        self.origin_write(dev, offset_bytes, len_bytes, None)
    }

    /// Write zeroes on the origin.
    pub fn write_zeroes(&mut self, dev: DeviceId, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        self.origin_write(dev, offset_bytes, len_bytes, None)
    }

    /// An origin write of `data`, or of zeroes when `data` is `None`.
    fn origin_write(
        &mut self,
        dev: DeviceId,
        offset_bytes: u64,
        len_bytes: u64,
        data: Option<&[u8]>,
    ) -> Result<()> {
        check_io_range(offset_bytes, len_bytes, self.disk(dev)?.capacity_bytes())?;
        if len_bytes == 0 {
            return Ok(());
        }
        let (first_sector, count_sectors) =
            (offset_bytes / SECTOR_SIZE_BYTES, len_bytes / SECTOR_SIZE_BYTES);
        if let Some(t) = self.disk_mut(dev)?.tracker.as_mut() {
            t.mark_write(first_sector, count_sectors);
        }
        if let Some(loc) = self.live_area(dev) {
            self.copy_on_write(loc, first_sector, count_sectors);
        }
        // The origin write happens even when the COW failed; its own failure changes no data,
        // except the prefix a torn write lets through.
        let fault = self.io_fault(FaultTarget::Origin(dev), IoKind::Write);
        let landed_sectors = match fault {
            None => count_sectors,
            Some(InjectedFault::Error(_)) => 0,
            Some(InjectedFault::Torn { sectors_written, .. }) => sectors_written.min(count_sectors),
        };
        let target = &mut self.disk_mut(dev)?.data
            [sector_bytes(first_sector, first_sector + landed_sectors)];
        match data {
            Some(bytes) => target.copy_from_slice(&bytes[sector_bytes(0, landed_sectors)]),
            None => target.fill(0),
        }
        match fault {
            Some(f) => Err(f.into_error()),
            None => Ok(()),
        }
    }

    pub(super) fn disk(&self, dev: DeviceId) -> Result<&Disk> {
        self.disks.get(&dev).ok_or_else(no_disk)
    }

    pub(super) fn disk_mut(&mut self, dev: DeviceId) -> Result<&mut Disk> {
        self.disks.get_mut(&dev).ok_or_else(no_disk)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;

    #[test]
    fn remove_disk_refuses_members_and_forgets_the_disk() {
        let mut m = model();
        assert_eq!(errno(m.remove_disk(D1)), Errno::ENODEV);
        m.add_disk(D1, 64 * KIB, 8).unwrap();
        m.attach(D1).unwrap();
        let id = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        m.snapshot_add(id, D1).unwrap();
        assert_eq!(errno(m.remove_disk(D1)), Errno::EBUSY, "a member stays");
        m.snapshot_destroy(id).unwrap();
        m.remove_disk(D1).unwrap();
        assert_eq!(errno(m.attach(D1)), Errno::ENODEV);
        assert_eq!(errno(m.cbt_info(D1)), Errno::ENODEV, "the tracker went with it");
        m.add_disk(D1, 64 * KIB, 8).unwrap();
        assert_eq!(errno(m.cbt_info(D1)), Errno::ENOENT, "a new disk has no tracker");
    }

    #[test]
    fn add_disk_errors() {
        let mut m = model();
        assert_eq!(errno(m.add_disk(D1, 513, 8)), Errno::EINVAL);
        m.add_disk(D1, 64 * KIB, 8).unwrap();
        assert_eq!(errno(m.add_disk(D1, 64 * KIB, 8)), Errno::EALREADY);
        assert_eq!(errno(m.add_disk(D1, 1, 8)), Errno::EINVAL, "EINVAL is checked first");
        for i in 1..MAX_DISKS as u32 {
            m.add_disk(DeviceId::new(1, i), 0, 8).unwrap();
        }
        assert_eq!(errno(m.add_disk(D2, 0, 8)), Errno::ENOMEM);
    }

    #[test]
    fn new_disk_reads_zeroes_and_keeps_writes() {
        let mut m = model();
        m.add_disk(D1, 64 * KIB, 8).unwrap();
        assert_eq!(m.read(D1, 0, 1024).unwrap(), vec![0; 1024]);
        m.write(D1, 512, &[7; 512]).unwrap();
        assert_eq!(m.read(D1, 512, 512).unwrap(), vec![7; 512]);
        assert_eq!(m.read(D1, 0, 0).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn every_operation_on_an_unknown_disk_is_enodev() {
        let mut m = model();
        let id = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
        assert_eq!(errno(m.attach(UNKNOWN)), Errno::ENODEV);
        assert_eq!(errno(m.detach(UNKNOWN)), Errno::ENODEV);
        assert_eq!(errno(m.cbt_info(UNKNOWN)), Errno::ENODEV);
        assert_eq!(errno(m.cbt_map(UNKNOWN, 0, 0)), Errno::ENODEV);
        assert_eq!(errno(m.cbt_dirty(UNKNOWN, &[])), Errno::ENODEV);
        assert_eq!(errno(m.snapshot_add(id, UNKNOWN)), Errno::ENODEV);
        assert_eq!(errno(m.snapshot_info(UNKNOWN)), Errno::ENODEV);
        assert_eq!(errno(m.read(UNKNOWN, 0, 0)), Errno::ENODEV);
        assert_eq!(errno(m.write(UNKNOWN, 0, &[])), Errno::ENODEV);
        assert_eq!(errno(m.discard(UNKNOWN, 0, 0)), Errno::ENODEV);
        assert_eq!(errno(m.write_zeroes(UNKNOWN, 0, 0)), Errno::ENODEV);
        assert_eq!(errno(m.image_read(UNKNOWN, 0, 0)), Errno::ENODEV);
        assert_eq!(errno(m.image_write(UNKNOWN, 0, &[])), Errno::ENODEV);
    }

    #[test]
    fn origin_io_geometry_is_checked() {
        let mut m = model();
        m.add_disk(D1, 64 * KIB, 8).unwrap();
        assert_eq!(errno(m.read(D1, 1, 512)), Errno::EINVAL);
        assert_eq!(errno(m.read(D1, 0, 100)), Errno::EINVAL);
        assert_eq!(errno(m.read(D1, 64 * KIB, 512)), Errno::EINVAL);
        assert_eq!(errno(m.write(D1, 64 * KIB - 512, &[0; 1024])), Errno::EINVAL);
        assert_eq!(errno(m.discard(D1, 512, 3)), Errno::EINVAL);
        assert_eq!(errno(m.write_zeroes(D1, u64::MAX - 511, 1024)), Errno::EINVAL);
        m.write(D1, 64 * KIB, &[]).unwrap();
    }

    #[test]
    fn discard_and_write_zeroes_write_zeroes() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        m.discard(D1, 0, 1024).unwrap();
        m.write_zeroes(D1, 4096, 512).unwrap();
        assert_eq!(m.read(D1, 0, 1024).unwrap(), vec![0; 1024]);
        assert_eq!(m.read(D1, 4096, 512).unwrap(), vec![0; 512]);
        assert_eq!(m.read(D1, 1024, 512).unwrap(), pattern(64 * KIB, 1)[1024..1536].to_vec());
    }

    #[test]
    fn failed_origin_write_changes_no_data() {
        let mut m = model();
        disk(&mut m, D1, 64 * KIB, 1);
        let id = v3_taken(&mut m, &[D1], 1024);
        m.fail_next(FaultTarget::Origin(D1), IoKind::Write, Errno::EIO);
        assert_eq!(errno(m.write(D1, 0, &[9; 512])), Errno::EIO);
        assert_eq!(m.read(D1, 0, 512).unwrap(), pattern(64 * KIB, 1)[..512].to_vec());
        // The COW and the CBT mark made before the write stay.
        assert_eq!(m.storage_stats(id).unwrap().filled_sectors, CHUNK_SECTORS);
        assert_eq!(m.tracker(D1).unwrap().write_map[0], 2);
        assert_eq!(events(&mut m, id), vec![]);
        m.fail_next(FaultTarget::Origin(D1), IoKind::Write, Errno::EIO);
        assert_eq!(errno(m.discard(D1, 0, 512)), Errno::EIO, "a discard is one origin write");
        m.fail_next(FaultTarget::Origin(D1), IoKind::Write, Errno::EIO);
        m.write(D1, 0, &[]).unwrap();
        assert_eq!(errno(m.write_zeroes(D1, 0, 512)), Errno::EIO, "an empty write does no I/O");
    }
}
