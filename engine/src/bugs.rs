//! Historical upstream bugs, restorable for the checkers (`--cfg blksnap_bugs` only; a normal
//! build contains none of this). A bug build selects one at run time through
//! `EngineConfig::bug`, so one build serves every re-injection test, and each test shows that
//! loom or shuttle finds its bug (sim-tests `bug_injection`).
//!
//! In a bug build, [`crate::kref::Kref`] never frees memory: a released object is marked dead
//! and leaked, so a use after release is a failed assertion ("use after release"), not
//! undefined behaviour.

/// The bugs that can be restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// Seed bug a (April 2023 review): image I/O runs without pinning the diff area, so a
    /// destroy frees it under in-flight chunk I/O.
    SeedADiffAreaUnpinned,
    /// Seed bug b (April 2023 review): add does not check membership in another snapshot, so a
    /// tracker is linked into two snapshots.
    SeedBDoubleMembership,
    /// A lookup takes its reference after dropping the list lock: a get from zero when it
    /// races the last put (the shape of the out-of-tree chunk lookup fix).
    GetFromZero,
    /// `is_taken` tested outside the snapshot lock: two takes both switch (upstream #17).
    TakeTakeDoubleSwitch,
    /// add holds the device's queue usage (gate) while taking the snapshot lock, while take
    /// holds the snapshot lock and freezes the queue: ABBA deadlock (upstream #6, v3–v7).
    AbbaAddTake,
    /// The event queue notifies before publishing the event: a lost wake-up.
    LostWakeup,
    /// The diff area holds no reference on the difference storage: a completion allocates on
    /// a freed storage (upstream #8, fixed only in the newest series).
    StorageUnpinned,
    /// Not upstream: this engine's own race, found by review (2026-12). An image read of an
    /// uncopied chunk re-checks only that the image is open, not that the snapshot is still
    /// intact, so a read in flight when a copy-on-write fails returns an origin write made
    /// after the take (writers stop copying once the diff area is corrupted) as success.
    ReadIgnoresCorruption,
    /// Not upstream: the take does not wait for origin writes in flight outside the gate
    /// (`WriteTicket`s, the asynchronous write path): a write that passed its copy-on-write
    /// check before the take lands after it, uncopied, and the image changes.
    TakeIgnoresWriteTickets,
    /// Not upstream: this engine's own, found by the concurrent simulation (2026-12). DESTROY
    /// removes the snapshot from the list and closes its images only later, in the teardown:
    /// a second destroy answers ENODEV, and an image read started after that answer still
    /// succeeds — not linearizable.
    DestroyClosesImagesLate,
    /// Not upstream: the same race's other half (2026-12). Nothing waits for a destroy's
    /// teardown to release the snapshot's members: after a second destroy answered ENODEV, the
    /// device is still reported in the snapshot (member_of; add to a new snapshot EBUSY).
    DestroyReleasesMembersLate,
}
