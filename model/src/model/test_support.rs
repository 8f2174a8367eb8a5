//! What the model's unit tests share (each concept file has its own `tests` module): the
//! vocabulary of the crate, a small model, disks with a known pattern, taken snapshots.

pub(super) use super::{InjectedFault, Model, StorageStats};
pub(super) use crate::errno::{Errno, Result};
pub(super) use crate::limits::{
    EVENT_QUEUE_CAPACITY, MAX_DEVICES_PER_SNAPSHOT, MAX_DISKS, MAX_RANGES_PER_CALL, MAX_SNAPSHOTS,
    MAX_STORAGE_RANGES,
};
pub(super) use crate::params::Params;
pub(super) use crate::types::*;

pub(super) const KIB: u64 = 1024;
pub(super) const D1: DeviceId = DeviceId::new(8, 0);
pub(super) const D2: DeviceId = DeviceId::new(8, 16);
pub(super) const UNKNOWN: DeviceId = DeviceId::new(99, 99);
pub(super) const SEED: u64 = 7;
/// Params::small(): 4 KiB chunks = 8 sectors.
pub(super) const CHUNK_BYTES: u64 = 4 * KIB;
pub(super) const CHUNK_SECTORS: u64 = 8;
/// Params::small(): storage step 64 sectors, threshold 32.
pub(super) const MINIMUM_SECTORS: u64 = 64;

pub(super) fn model() -> Model {
    Model::new(Params::small(), SEED).unwrap()
}

pub(super) fn errno<T: core::fmt::Debug>(r: Result<T>) -> Errno {
    r.unwrap_err().errno
}

/// A registered, attached disk filled with a pattern derived from `seed`; clean CBT maps.
pub(super) fn disk(m: &mut Model, dev: DeviceId, bytes: u64, seed: u8) {
    m.add_disk(dev, bytes, 8).unwrap();
    // Filled before the attach, so the CBT maps start all zero.
    m.write(dev, 0, &pattern(bytes, seed)).unwrap();
    m.attach(dev).unwrap();
}

pub(super) fn pattern(len_bytes: u64, seed: u8) -> Vec<u8> {
    (0..len_bytes).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8).collect()
}

/// A v3 snapshot of `devs` with `storage_sectors` appended on backend 0, taken, its create
/// event drained.
pub(super) fn v3_taken(m: &mut Model, devs: &[DeviceId], storage_sectors: u64) -> SnapshotId {
    let id = m.snapshot_create(StorageMode::Ranges, 0).unwrap();
    assert!(matches!(m.wait_event(id, 0).unwrap().kind, EventKind::LowFreeSpace { .. }));
    m.snapshot_append_storage(id, 0, 1 << 30, &[SectorRange::new(0, storage_sectors)]).unwrap();
    for &dev in devs {
        m.snapshot_add(id, dev).unwrap();
    }
    m.snapshot_take(id).unwrap();
    id
}

/// A newest-style snapshot of `devs` on a File storage, taken.
pub(super) fn file_taken(
    m: &mut Model,
    devs: &[DeviceId],
    limit_sectors: u64,
    growable: bool,
    initial_sectors: u64,
) -> SnapshotId {
    let id =
        m.snapshot_create(StorageMode::File { limit_sectors, growable }, initial_sectors).unwrap();
    for &dev in devs {
        m.snapshot_add(id, dev).unwrap();
    }
    m.snapshot_take(id).unwrap();
    id
}

pub(super) fn events(m: &mut Model, id: SnapshotId) -> Vec<EventKind> {
    std::iter::from_fn(|| m.wait_event(id, 0).ok()).map(|e| e.kind).collect()
}

/// Dirty one byte in every chunk `first..first + n` of `dev` (one COW each).
pub(super) fn touch_chunks(m: &mut Model, dev: DeviceId, first: u64, n: u64) {
    for c in first..first + n {
        m.write(dev, c * CHUNK_BYTES, &[0xEE; 512]).unwrap();
    }
}

pub(super) fn corrupted(device: DeviceId, errno: Errno) -> EventKind {
    EventKind::Corrupted { device, errno }
}
