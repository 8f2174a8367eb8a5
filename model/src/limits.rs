//! Limits on everything (docs/SEMANTICS.md, "Limits"). Model and engine enforce the same values.

/// Snapshots alive at once; one more → ENOMEM.
pub const MAX_SNAPSHOTS: usize = 1024;
/// Member devices of one snapshot; one more → ENOMEM.
pub const MAX_DEVICES_PER_SNAPSHOT: usize = 256;
/// Ranges in one append or one cbtdirty call; more → EINVAL.
pub const MAX_RANGES_PER_CALL: usize = 65_536;
/// Storage ranges of one snapshot over its life; more → ENOMEM.
pub const MAX_STORAGE_RANGES: usize = 1_048_576;
/// Events queued per snapshot; a newer one is dropped and counted.
pub const EVENT_QUEUE_CAPACITY: usize = 1024;
/// Registered disks; one more → ENOMEM.
pub const MAX_DISKS: usize = 4096;

const _: () = assert!(MAX_RANGES_PER_CALL <= MAX_STORAGE_RANGES);
const _: () =
    assert!(MAX_DEVICES_PER_SNAPSHOT < EVENT_QUEUE_CAPACITY, "one corrupted event per device fits");
