//! # blksnap-engine
//!
//! The concurrent engine: trackers with change-block tracking, copy-on-write snapshots over a
//! shared, growable difference storage, and per-snapshot event queues — the semantics of
//! `docs/SEMANTICS.md`, which the sequential model (`blksnap-model`) also implements.
//!
//! Modules follow the kernel module's concepts: [`cbt`], [`chunk`], [`diff_area`],
//! [`diff_storage`], [`event_queue`], [`snapshot`], [`tracker`]; the [`engine`] ties them
//! together and states the lock order. All synchronisation goes through [`sync`] (std, loom or
//! shuttle), all I/O through [`io::BlockDev`], and every reference-counted object is a
//! [`kref::Kref`] with live counters.
#![warn(missing_docs)]

#[cfg(blksnap_bugs)]
pub mod bugs;
pub mod cbt;
pub mod chunk;
pub mod clock;
pub mod diff_area;
pub mod diff_buffer;
pub mod diff_storage;
pub mod engine;
pub mod event_queue;
pub mod io;
pub mod kref;
pub mod snapshot;
pub mod stored_map;
pub mod sync;
pub mod tracker;

pub use clock::{Clock, ManualClock};
pub use diff_storage::StorageSpec;
pub use engine::{Engine, EngineConfig};
pub use kref::LiveCounts;
pub use tracker::WriteTicket;

use blksnap_model::{IdGen, Params, Uuid};

/// What every engine object may need: parameters (read on every use), the clock, the live
/// counters and the id sequence. One per engine.
pub struct Shared {
    params: sync::RwLock<Params>,
    clock: Clock,
    live: sync::Arc<kref::LiveObjects>,
    ids: sync::Mutex<IdGen>,
    /// Bug builds: the restored upstream bug, if any.
    #[cfg(blksnap_bugs)]
    pub bug: Option<bugs::Bug>,
}

impl Shared {
    /// The context of one engine (parameters sanitised; EINVAL if invalid). Public so that
    /// checker models can build single components (a diff storage, a diff area) without a
    /// whole engine.
    pub fn new(params: Params, clock: Clock, id_seed: u64) -> blksnap_model::Result<Shared> {
        Ok(Shared {
            params: sync::RwLock::new(sync::LockRank::Params, params.sanitized()?),
            clock,
            live: sync::Arc::new(kref::LiveObjects::new()),
            ids: sync::Mutex::new(sync::LockRank::Ids, IdGen::new(id_seed)),
            #[cfg(blksnap_bugs)]
            bug: None,
        })
    }

    /// The live-object counters.
    pub fn live(&self) -> &sync::Arc<kref::LiveObjects> {
        &self.live
    }

    /// The clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Bug builds: whether `bug` is restored.
    #[cfg(blksnap_bugs)]
    pub fn injected(&self, bug: bugs::Bug) -> bool {
        self.bug == Some(bug)
    }

    /// A copy of the current parameters.
    pub fn params(&self) -> Params {
        *self.params.read()
    }

    /// The next id of the sequence (snapshot ids and CBT generations).
    pub fn next_id(&self) -> Uuid {
        self.ids.lock().next_id()
    }
}
