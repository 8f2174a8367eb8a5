//! The one synchronisation facade. Everything concurrent in the engine names these types, never
//! `std::sync` or `std::thread`, so that the same code runs on std (default), under loom
//! (`RUSTFLAGS="--cfg blksnap_loom"`) and under shuttle (`--cfg blksnap_shuttle`).
//!
//! Shapes are std's minus poisoning: `lock()` returns the guard (a poisoned lock means a thread
//! panicked while holding engine state, which is a bug: we propagate the panic).

#[cfg(all(blksnap_loom, blksnap_shuttle))]
compile_error!("--cfg blksnap_loom and --cfg blksnap_shuttle are exclusive");
#[cfg(all(miri, any(blksnap_loom, blksnap_shuttle)))]
compile_error!("miri runs the std backend only");

#[cfg(not(any(blksnap_loom, blksnap_shuttle)))]
mod backend {
    pub use std::sync::atomic;
    pub use std::sync::Arc;
    pub use std::sync::{
        Condvar as RawCondvar, Mutex as RawMutex, MutexGuard, RwLock as RawRwLock, RwLockReadGuard,
        RwLockWriteGuard, TryLockError,
    };
    pub use std::thread;
}

#[cfg(blksnap_loom)]
mod backend {
    pub use loom::sync::atomic;
    pub use loom::sync::Arc;
    pub use loom::sync::{
        Condvar as RawCondvar, Mutex as RawMutex, MutexGuard, RwLock as RawRwLock, RwLockReadGuard,
        RwLockWriteGuard,
    };
    pub use loom::thread;
    pub use std::sync::TryLockError;
}

#[cfg(blksnap_shuttle)]
mod backend {
    pub use shuttle::sync::atomic;
    pub use shuttle::sync::Arc;
    pub use shuttle::sync::{
        Condvar as RawCondvar, Mutex as RawMutex, MutexGuard, RwLock as RawRwLock, RwLockReadGuard,
        RwLockWriteGuard,
    };
    pub use shuttle::thread;
    pub use std::sync::TryLockError;
}

pub use backend::{atomic, thread, Arc};

/// std's `Arc`, for shared handles to I/O objects (`Arc<dyn BlockDev>`): loom's `Arc` cannot hold
/// a trait object, and these handles are immutable references to devices, not engine state whose
/// reference count is a checking target. Engine objects use [`crate::kref::Kref`] instead.
pub use std::sync::Arc as StdArc;

pub use order::{Held, LockRank, LOCK_ORDER_CHECKED};

/// A mutex whose `lock` returns the guard directly, with a rank in the lock order.
#[derive(Debug)]
pub struct Mutex<T> {
    raw: backend::RawMutex<T>,
    rank: LockRank,
    key: u64,
}

/// A held [`Mutex`]: the data, plus its entry in the thread's held-lock list (checked builds).
pub struct MutexGuard<'a, T> {
    inner: backend::MutexGuard<'a, T>,
    _held: Held,
}

impl<T> Mutex<T> {
    /// A new unlocked mutex of rank `rank` (see [`LockRank`]).
    pub fn new(rank: LockRank, value: T) -> Mutex<T> {
        Mutex::keyed(rank, 0, value)
    }
    /// A mutex of an ordered family: several of one rank may be held at once, acquired in
    /// strictly ascending `key`.
    pub fn keyed(rank: LockRank, key: u64, value: T) -> Mutex<T> {
        Mutex { raw: backend::RawMutex::new(value), rank, key }
    }
    /// Lock, blocking. Panics if another thread panicked while holding it, and in checked builds
    /// if this acquisition breaks the lock order (even when this schedule would not deadlock).
    pub fn lock(&self) -> MutexGuard<'_, T> {
        let held = Held::acquire(self.rank, self.key);
        let inner =
            self.raw.lock().expect("engine mutex poisoned: a thread panicked holding engine state");
        MutexGuard { inner, _held: held }
    }
    /// Consume the mutex.
    pub fn into_inner(self) -> T {
        self.raw.into_inner().expect("engine mutex poisoned")
    }
}

impl<T> core::ops::Deref for MutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T> core::ops::DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

/// A reader-writer lock whose `read`/`write` return the guard directly, with a rank in the lock
/// order (a read acquisition is checked like a write: a second read of one lock by one thread
/// deadlocks behind a queued writer on std).
#[derive(Debug)]
pub struct RwLock<T> {
    raw: backend::RawRwLock<T>,
    rank: LockRank,
    key: u64,
}

/// Shared access to an [`RwLock`].
pub struct RwLockReadGuard<'a, T> {
    inner: backend::RwLockReadGuard<'a, T>,
    _held: Held,
}

/// Exclusive access to an [`RwLock`].
pub struct RwLockWriteGuard<'a, T> {
    inner: backend::RwLockWriteGuard<'a, T>,
    _held: Held,
}

impl<T> RwLock<T> {
    /// A new unlocked lock of rank `rank`.
    pub fn new(rank: LockRank, value: T) -> RwLock<T> {
        RwLock::keyed(rank, 0, value)
    }
    /// A lock of an ordered family (see [`Mutex::keyed`]).
    pub fn keyed(rank: LockRank, key: u64, value: T) -> RwLock<T> {
        RwLock { raw: backend::RawRwLock::new(value), rank, key }
    }
    /// Shared access.
    pub fn read(&self) -> RwLockReadGuard<'_, T> {
        let held = Held::acquire(self.rank, self.key);
        RwLockReadGuard { inner: self.raw.read().expect("engine rwlock poisoned"), _held: held }
    }
    /// Shared access if nobody holds or waits for exclusive access right now, else None (never
    /// blocks: for a thread that must not wait behind a writer).
    pub fn try_read(&self) -> Option<RwLockReadGuard<'_, T>> {
        let held = Held::acquire(self.rank, self.key);
        match self.raw.try_read() {
            Ok(inner) => Some(RwLockReadGuard { inner, _held: held }),
            Err(backend::TryLockError::WouldBlock) => None,
            Err(backend::TryLockError::Poisoned(_)) => panic!("engine rwlock poisoned"),
        }
    }
    /// Exclusive access.
    pub fn write(&self) -> RwLockWriteGuard<'_, T> {
        let held = Held::acquire(self.rank, self.key);
        RwLockWriteGuard { inner: self.raw.write().expect("engine rwlock poisoned"), _held: held }
    }
}

impl<T> core::ops::Deref for RwLockReadGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T> core::ops::Deref for RwLockWriteGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T> core::ops::DerefMut for RwLockWriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

/// A condition variable. Callers always wait in a loop over their predicate: neither checker
/// generates spurious wake-ups, and real ones happen on std. While waiting, the thread still
/// counts the mutex as held for the lock order (it reacquires it before returning).
#[derive(Debug, Default)]
pub struct Condvar(backend::RawCondvar);

impl Condvar {
    /// A new condition variable.
    pub fn new() -> Condvar {
        Condvar(backend::RawCondvar::new())
    }
    /// Block until notified.
    pub fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        let MutexGuard { inner, _held } = guard;
        let inner = self.0.wait(inner).expect("engine mutex poisoned");
        MutexGuard { inner, _held }
    }
    /// Block until notified or `timeout` passes (never times out under loom or shuttle).
    pub fn wait_timeout<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: core::time::Duration,
    ) -> MutexGuard<'a, T> {
        let MutexGuard { inner, _held } = guard;
        let inner = self.0.wait_timeout(inner, timeout).expect("engine mutex poisoned").0;
        MutexGuard { inner, _held }
    }
    /// Wake one waiter.
    pub fn notify_one(&self) {
        self.0.notify_one()
    }
    /// Wake every waiter.
    pub fn notify_all(&self) {
        self.0.notify_all()
    }
}

/// The lock order, checked mechanically. Every engine lock has a [`LockRank`]; in checked builds
/// (debug builds, loom, shuttle: every test and checker run) each thread keeps the list of what
/// it holds, and an acquisition of a rank not above everything held panics with both names —
/// on the schedule that merely *could* deadlock, not only on one that does. Ordered families
/// (device gates by device, chunk permits by chunk index, memory segments by index) may hold
/// several of one rank, acquired in strictly ascending key. Release builds check nothing and
/// carry no state (a zero-sized [`Held`]).
mod order {
    /// The documented lock order of the engine, outermost first (`engine.rs` states the same
    /// order in prose; this enum is what is enforced).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
    pub enum LockRank {
        /// `Engine::appends`: serialises storage appends across snapshots.
        Appends,
        /// The global snapshot list (held only to look up, insert or remove).
        Snapshots,
        /// `Engine::retiring`: snapshots gone from the list whose teardown runs (pushed under
        /// the list lock, looked up or removed alone).
        Retiring,
        /// The disk registry (likewise).
        Disks,
        /// A snapshot's state (add, take, destroy).
        SnapshotState,
        /// Device gates, in ascending device order (key: the device number).
        Gate,
        /// A disk's count of origin writes in flight outside its gate (`WriteTicket`): taken
        /// under the gate, held only to count or to wait for zero.
        WriteTickets,
        /// A tracker's owner (leaf of the control side).
        TrackerOwner,
        /// A tracker's CBT generation.
        CbtGeneration,
        /// A diff area's chunk map (looked up or inserted, never held across a wait).
        ChunkMap,
        /// A chunk permit: held across the chunk's I/O; several in ascending chunk index.
        ChunkPermit,
        /// A chunk's slot (inside the permit's own bookkeeping; leaf).
        ChunkSlot,
        /// A diff area's free copy buffers (leaf: popped or pushed, never held across I/O).
        DiffBuffers,
        /// A diff area's first error.
        DiffAreaError,
        /// A difference storage's accounting.
        StorageState,
        /// A snapshot's event queue.
        EventQueue,
        /// The engine's parameters.
        Params,
        /// The id generator.
        Ids,
        /// A fault plan (I/O layer, asked before each I/O).
        FaultPlan,
        /// A file device's resize lock.
        FileResize,
        /// A memory device's segment table.
        MemTable,
        /// A memory device's segments, in ascending index.
        MemSegment,
    }

    impl LockRank {
        /// Ranks of which a thread may hold several (in strictly ascending key). Only the
        /// checked builds ask (release builds carry no bookkeeping).
        #[cfg(any(debug_assertions, blksnap_loom, blksnap_shuttle))]
        fn ordered_family(self) -> bool {
            matches!(self, LockRank::Gate | LockRank::ChunkPermit | LockRank::MemSegment)
        }
    }

    /// Whether this build checks the lock order.
    pub const LOCK_ORDER_CHECKED: bool = cfg!(any(debug_assertions, blksnap_loom, blksnap_shuttle));

    #[cfg(any(debug_assertions, blksnap_loom, blksnap_shuttle))]
    mod checked {
        use super::LockRank;
        use std::cell::RefCell;
        use std::sync::{Arc, Mutex, PoisonError};

        #[derive(Clone, Copy, Debug)]
        struct Entry {
            rank: LockRank,
            key: u64,
            /// Identifies this acquisition at its release.
            serial: u64,
        }

        /// One thread's held locks. Shared (`Arc`) so that a held value moved to another thread
        /// (a chunk permit moving into a completion) is removed from the list of the thread that
        /// acquired it. A std mutex: it is bookkeeping outside the model, never contended under
        /// loom or shuttle (one thread runs at a time) and only by moved permits on std.
        #[derive(Default)]
        struct HeldList {
            entries: Vec<Entry>,
            next_serial: u64,
        }

        type List = Arc<Mutex<HeldList>>;

        #[cfg(not(any(blksnap_loom, blksnap_shuttle)))]
        std::thread_local!(static HELD: RefCell<Option<List>> = const { RefCell::new(None) });
        #[cfg(blksnap_loom)]
        loom::thread_local!(static HELD: RefCell<Option<List>> = RefCell::new(None));
        #[cfg(blksnap_shuttle)]
        shuttle::thread_local!(static HELD: RefCell<Option<List>> = RefCell::new(None));

        fn this_thread() -> List {
            HELD.with(|h| h.borrow_mut().get_or_insert_with(List::default).clone())
        }

        /// One acquisition of a ranked lock (or permit); dropping it records the release.
        pub struct Held {
            list: List,
            serial: u64,
        }

        impl Held {
            /// Check the order against what this thread holds, then record the acquisition.
            pub fn acquire(rank: LockRank, key: u64) -> Held {
                let list = this_thread();
                let mut held = list.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(top) = held.entries.iter().max_by_key(|e| (e.rank, e.key)) {
                    let ok = rank > top.rank
                        || (rank == top.rank && rank.ordered_family() && key > top.key);
                    if !ok {
                        let message = format!(
                            "lock order violated: acquiring {rank:?} (key {key}) while holding \
                             {:?} (key {}); held: {:?}",
                            top.rank,
                            top.key,
                            held.entries.iter().map(|e| (e.rank, e.key)).collect::<Vec<_>>()
                        );
                        drop(held);
                        panic!("{message}");
                    }
                }
                let serial = held.next_serial;
                held.next_serial += 1;
                held.entries.push(Entry { rank, key, serial });
                drop(held);
                Held { list, serial }
            }
        }

        impl Drop for Held {
            fn drop(&mut self) {
                let mut held = self.list.lock().unwrap_or_else(PoisonError::into_inner);
                let at = held.entries.iter().rposition(|e| e.serial == self.serial);
                // Impossible: each Held removes only its own entry, once.
                let at = at.expect("a held lock released twice");
                held.entries.remove(at);
            }
        }
    }

    #[cfg(any(debug_assertions, blksnap_loom, blksnap_shuttle))]
    pub use checked::Held;

    /// Release builds: nothing to record.
    #[cfg(not(any(debug_assertions, blksnap_loom, blksnap_shuttle)))]
    pub struct Held;

    #[cfg(not(any(debug_assertions, blksnap_loom, blksnap_shuttle)))]
    impl Held {
        /// No check, no record.
        #[inline(always)]
        pub fn acquire(_rank: LockRank, _key: u64) -> Held {
            Held
        }
    }
}

/// A hint inside a spin loop (a yield point for both checkers).
pub fn spin_loop() {
    #[cfg(not(any(blksnap_loom, blksnap_shuttle)))]
    std::hint::spin_loop();
    #[cfg(blksnap_loom)]
    loom::hint::spin_loop();
    #[cfg(blksnap_shuttle)]
    shuttle::hint::spin_loop();
}

#[cfg(all(test, not(any(blksnap_loom, blksnap_shuttle))))]
mod tests {
    use super::*;

    fn panics(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
        let payload = std::panic::catch_unwind(f).expect_err("the lock order check must fire");
        payload.downcast_ref::<String>().cloned().unwrap_or_default()
    }

    #[test]
    fn the_documented_order_passes_and_an_inversion_panics_without_deadlocking() {
        const { assert!(LOCK_ORDER_CHECKED, "test builds check the order") };
        let outer = Mutex::new(LockRank::SnapshotState, ());
        let inner = RwLock::keyed(LockRank::Gate, 1, ());
        {
            let _a = outer.lock();
            let _b = inner.write();
        }
        // One thread, no contention: an inversion is reported although nothing can deadlock.
        let message = panics(|| {
            let _b = inner.read();
            let _a = outer.lock();
        });
        assert!(message.contains("acquiring SnapshotState"), "{message}");
        // The failed acquisition left nothing behind: the right order works again.
        let _a = outer.lock();
        let _b = inner.read();
    }

    #[test]
    fn an_ordered_family_goes_up_by_key_only() {
        let gates: Vec<_> = (0..3).map(|k| RwLock::keyed(LockRank::Gate, k, ())).collect();
        {
            let _held: Vec<_> = gates.iter().map(|g| g.write()).collect();
        }
        let message = panics(|| {
            let _two = gates[2].read();
            let _zero = gates[0].read();
        });
        assert!(message.contains("acquiring Gate (key 0) while holding Gate (key 2)"), "{message}");
        // A lock read twice by one thread is refused too (std may deadlock behind a writer).
        let message = panics(|| {
            let _first = gates[1].read();
            let _again = gates[1].read();
        });
        assert!(message.contains("lock order violated"), "{message}");
        // Ranks outside a family never repeat.
        let a = Mutex::new(LockRank::StorageState, ());
        let b = Mutex::new(LockRank::StorageState, ());
        let message = panics(|| {
            let _a = a.lock();
            let _b = b.lock();
        });
        assert!(message.contains("acquiring StorageState"), "{message}");
    }

    #[test]
    fn a_condvar_wait_keeps_the_mutex_held_and_releases_at_drop() {
        let m = Mutex::new(LockRank::EventQueue, 0u32);
        let cv = Condvar::new();
        let guard = m.lock();
        let guard = cv.wait_timeout(guard, core::time::Duration::from_millis(1));
        let outer = Mutex::new(LockRank::SnapshotState, ());
        let message = panics(std::panic::AssertUnwindSafe(|| drop(outer.lock())));
        assert!(message.contains("while holding EventQueue"), "{message}");
        drop(guard);
        drop(outer.lock());
    }
}
