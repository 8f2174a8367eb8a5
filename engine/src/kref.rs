//! `Kref<T>`: the engine's own reference count, for the objects the kernel reference-counts
//! (snapshot, tracker, diff area, diff storage, chunk).
//!
//! Why not `Arc`: shuttle's `Arc` is std's (its count is not explored) and loom has no `Weak`;
//! with the count on facade atomics both checkers interleave around the last `put`. Every live
//! object is also counted per kind in [`LiveObjects`], so tests assert that teardown leaves
//! nothing behind.
//!
//! Invariants (asserted): a `get` never starts from zero (one can only clone a `Kref` one holds,
//! so the count is ≥ 1); the release runs exactly once, in the thread that dropped the count
//! from 1 to 0, after every other holder's accesses (AcqRel on the decrement).

use core::fmt;
use core::ops::Deref;
use core::ptr::NonNull;

use crate::sync::atomic::{AtomicUsize, Ordering};
use crate::sync::Arc;

/// The kinds of reference-counted engine objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjKind {
    /// A snapshot (global list + lookups).
    Snapshot = 0,
    /// A tracker (filter slot + snapshot membership).
    Tracker = 1,
    /// A diff area (device gate + locked chunks + in-flight image I/O).
    DiffArea = 2,
    /// A difference storage (snapshot + diff areas).
    DiffStorage = 3,
    /// A chunk's metadata (diff area's map + permits).
    Chunk = 4,
}

const KINDS: usize = 5;

/// Live-object counters of one engine, per kind.
#[derive(Debug, Default)]
pub struct LiveObjects {
    counts: [AtomicUsize; KINDS],
}

/// A reading of [`LiveObjects`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LiveCounts {
    /// Snapshots alive.
    pub snapshots: usize,
    /// Trackers alive.
    pub trackers: usize,
    /// Diff areas alive.
    pub diff_areas: usize,
    /// Difference storages alive.
    pub diff_storages: usize,
    /// Chunk metadata records alive.
    pub chunks: usize,
}

impl LiveObjects {
    /// All counters at zero.
    pub fn new() -> LiveObjects {
        LiveObjects { counts: Default::default() }
    }

    /// Current counts.
    pub fn counts(&self) -> LiveCounts {
        let c = |k: ObjKind| self.counts[k as usize].load(Ordering::Acquire);
        LiveCounts {
            snapshots: c(ObjKind::Snapshot),
            trackers: c(ObjKind::Tracker),
            diff_areas: c(ObjKind::DiffArea),
            diff_storages: c(ObjKind::DiffStorage),
            chunks: c(ObjKind::Chunk),
        }
    }
}

struct Inner<T> {
    /// References that keep the memory: every Kref, and in bug builds every Unowned too.
    count: AtomicUsize,
    /// Bug builds: the references the kernel would count (Krefs only). Reaching zero is the
    /// "release": the object is dead from then on, though its memory lives while an Unowned
    /// pointer (upstream's raw pointer) still points at it — so a use after release is an
    /// assertion, never undefined behaviour.
    #[cfg(blksnap_bugs)]
    logical: AtomicUsize,
    #[cfg(blksnap_bugs)]
    dead: crate::sync::atomic::AtomicBool,
    kind: ObjKind,
    live: Arc<LiveObjects>,
    value: T,
}

/// A counted reference to an engine object. `clone` is `get`, `drop` is `put`.
pub struct Kref<T> {
    inner: NonNull<Inner<T>>,
}

// SAFETY: a Kref hands out only `&T` across threads and drops `T` in whichever thread puts the
// last reference, exactly like `Arc<T>`, so it needs the same bounds.
unsafe impl<T: Send + Sync> Send for Kref<T> {}
// SAFETY: as above: shared access is `&T`, which is safe to share when `T: Sync`.
unsafe impl<T: Send + Sync> Sync for Kref<T> {}

/// Above this the count is considered corrupt (a leak loop): abort like `Arc` does.
const MAX_REFCOUNT: usize = isize::MAX as usize;

impl<T> Kref<T> {
    /// A new object with one reference, counted live under `kind`.
    pub fn new(value: T, kind: ObjKind, live: &Arc<LiveObjects>) -> Kref<T> {
        live.counts[kind as usize].fetch_add(1, Ordering::AcqRel);
        let inner = Box::new(Inner {
            count: AtomicUsize::new(1),
            #[cfg(blksnap_bugs)]
            logical: AtomicUsize::new(1),
            #[cfg(blksnap_bugs)]
            dead: crate::sync::atomic::AtomicBool::new(false),
            kind,
            live: live.clone(),
            value,
        });
        Kref { inner: NonNull::from(Box::leak(inner)) }
    }

    fn inner(&self) -> &Inner<T> {
        // SAFETY: `inner` came from a Box and is freed only when the count reaches zero, which
        // cannot happen while `self` (one counted reference) exists.
        unsafe { self.inner.as_ref() }
    }

    /// The current count (racy by nature: for assertions and tests).
    pub fn count(this: &Kref<T>) -> usize {
        this.inner().count.load(Ordering::Acquire)
    }

    /// Whether two references name the same object.
    pub fn ptr_eq(a: &Kref<T>, b: &Kref<T>) -> bool {
        a.inner == b.inner
    }

    /// The release: the object stops being live (its memory may outlive it in bug builds).
    fn released(inner: &Inner<T>) {
        let before = inner.live.counts[inner.kind as usize].fetch_sub(1, Ordering::AcqRel);
        assert!(before > 0, "live counter of {:?} below zero", inner.kind);
    }

    /// Drop one memory reference; the last one frees.
    fn put_memory(ptr: NonNull<Inner<T>>) {
        // SAFETY: the caller owns one memory reference, so the allocation is live.
        let old = unsafe { ptr.as_ref() }.count.fetch_sub(1, Ordering::AcqRel);
        assert!(old > 0, "Kref put below zero");
        if old != 1 {
            return;
        }
        // SAFETY: the count went 1 → 0, so no reference is left; the pointer came from
        // `Box::leak` in `new` and is reconstructed exactly once.
        let inner = unsafe { Box::from_raw(ptr.as_ptr()) };
        #[cfg(not(blksnap_bugs))]
        Self::released(&inner);
        drop(inner);
    }
}

impl<T> Clone for Kref<T> {
    /// `get`: Relaxed is enough because the caller already holds a reference that keeps the
    /// object alive; nothing is published by the increment.
    fn clone(&self) -> Kref<T> {
        let old = self.inner().count.fetch_add(1, Ordering::Relaxed);
        assert!(old > 0, "Kref get from zero: object already released");
        assert!(old < MAX_REFCOUNT, "Kref count overflow");
        #[cfg(blksnap_bugs)]
        self.inner().logical.fetch_add(1, Ordering::Relaxed);
        Kref { inner: self.inner }
    }
}

impl<T> Drop for Kref<T> {
    /// `put`: AcqRel so that every other holder's accesses happen before the release.
    fn drop(&mut self) {
        #[cfg(blksnap_bugs)]
        {
            let inner = self.inner();
            if inner.logical.fetch_sub(1, Ordering::AcqRel) == 1 {
                inner.dead.store(true, Ordering::SeqCst);
                Self::released(inner);
            }
        }
        Self::put_memory(self.inner);
    }
}

/// Bug builds only: a pointer that holds the memory but no counted reference, as upstream's raw
/// pointers. Every use asserts that the object was not released.
#[cfg(blksnap_bugs)]
pub struct Unowned<T> {
    inner: NonNull<Inner<T>>,
}

#[cfg(blksnap_bugs)]
// SAFETY: as for Kref: it hands out `&T` and may free in any thread.
unsafe impl<T: Send + Sync> Send for Unowned<T> {}
#[cfg(blksnap_bugs)]
// SAFETY: as for Kref.
unsafe impl<T: Send + Sync> Sync for Unowned<T> {}

#[cfg(blksnap_bugs)]
impl<T> Unowned<T> {
    /// A non-owning pointer to `k`'s object.
    pub fn of(k: &Kref<T>) -> Unowned<T> {
        k.inner().count.fetch_add(1, Ordering::Relaxed);
        Unowned { inner: k.inner }
    }

    fn inner(&self) -> &Inner<T> {
        // SAFETY: an Unowned holds one memory reference, so the allocation is live.
        unsafe { self.inner.as_ref() }
    }

    /// Use the object; panics if it was released.
    pub fn get(&self) -> &T {
        let inner = self.inner();
        assert!(!inner.dead.load(Ordering::SeqCst), "use after release of a {:?}", inner.kind);
        &inner.value
    }

    /// Take a reference the way upstream's racy lookups did; panics on a get from zero.
    pub fn upgrade(&self) -> Kref<T> {
        let inner = self.inner();
        let old = inner.logical.fetch_add(1, Ordering::SeqCst);
        assert!(old > 0, "Kref get from zero: {:?} already released", inner.kind);
        inner.count.fetch_add(1, Ordering::Relaxed);
        Kref { inner: self.inner }
    }
}

#[cfg(blksnap_bugs)]
impl<T> Drop for Unowned<T> {
    fn drop(&mut self) {
        Kref::put_memory(self.inner);
    }
}

impl<T> Deref for Kref<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner().value
    }
}

impl<T: fmt::Debug> fmt::Debug for Kref<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kref").field("count", &Kref::count(self)).field("value", &**self).finish()
    }
}

#[cfg(all(test, not(any(blksnap_loom, blksnap_shuttle))))]
mod tests {
    use super::*;

    #[test]
    fn counts_and_release() {
        let live = Arc::new(LiveObjects::new());
        let a = Kref::new(String::from("x"), ObjKind::Chunk, &live);
        assert_eq!(live.counts().chunks, 1);
        let b = a.clone();
        assert_eq!(Kref::count(&a), 2);
        assert!(Kref::ptr_eq(&a, &b));
        drop(a);
        assert_eq!(live.counts().chunks, 1);
        assert_eq!(&*b, "x");
        drop(b);
        assert_eq!(live.counts(), LiveCounts::default());
    }

    #[test]
    fn release_in_another_thread() {
        let live = Arc::new(LiveObjects::new());
        let a = Kref::new(vec![1u8; 16], ObjKind::DiffArea, &live);
        let b = a.clone();
        let t = crate::sync::thread::spawn(move || b.len());
        drop(a);
        assert_eq!(t.join().unwrap(), 16);
        assert_eq!(live.counts().diff_areas, 0);
    }

    #[test]
    fn distinct_objects_are_not_the_same_and_debug_shows_the_count() {
        let live = Arc::new(LiveObjects::new());
        let a = Kref::new(7u32, ObjKind::Chunk, &live);
        let b = Kref::new(7u32, ObjKind::Chunk, &live);
        assert!(!Kref::ptr_eq(&a, &b), "equal values, two objects");
        let a2 = a.clone();
        assert_eq!(format!("{a2:?}"), "Kref { count: 2, value: 7 }");
    }
}
