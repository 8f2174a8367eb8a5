//! Which chunks of a diff area are Stored, readable with no lock.
//!
//! Why: an origin write to a chunk that was already copied needs no copy-on-write, and it is the
//! common case of a long-lived snapshot. Finding that out through the chunk map costs a read
//! lock, a hash and a reference get/put per chunk; this map answers with one or two atomic loads.
//!
//! Layout: one bit per chunk, in pages of [`PAGE_CHUNKS`] chunks; pages hang from directories of
//! [`DIR_PAGES`] page pointers. Both are allocated on the first chunk stored below them, so a take
//! allocates only the top table: one pointer per `DIR_PAGES * PAGE_CHUNKS` chunks (2^27: one
//! pointer up to 32 TiB of 256 KiB chunks), and untouched regions cost nothing.
//!
//! Invariant: a bit is set only after its chunk is Stored (state and data written), with
//! Release; a reader that sees it with Acquire sees the pre-image safe. Bits are never cleared
//! (Stored is terminal). Pages and directories are freed only when the map is dropped.

use core::ptr;

use crate::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

/// 64-bit words per page and page pointers per directory (small under loom and Miri, which
/// track every atomic and every byte moved: same logic, smaller tables).
#[cfg(not(any(blksnap_loom, miri)))]
const PAGE_WORDS: usize = 512;
#[cfg(not(any(blksnap_loom, miri)))]
const DIR_PAGES: usize = 4096;
#[cfg(any(blksnap_loom, miri))]
const PAGE_WORDS: usize = 2;
#[cfg(any(blksnap_loom, miri))]
const DIR_PAGES: usize = 4;
/// Chunks per page.
pub const PAGE_CHUNKS: u64 = PAGE_WORDS as u64 * 64;
/// Chunks per directory.
pub const DIR_CHUNKS: u64 = PAGE_CHUNKS * DIR_PAGES as u64;

struct Page {
    words: [AtomicU64; PAGE_WORDS],
}

struct Dir {
    pages: [AtomicPtr<Page>; DIR_PAGES],
}

/// The stored-chunk bits of one diff area.
pub struct StoredMap {
    dirs: Box<[AtomicPtr<Dir>]>,
    chunk_count: u64,
}

/// Where a chunk's bit lives.
struct Place {
    dir: usize,
    page: usize,
    word: usize,
    bit: u64,
}

/// The object behind `slot`, or `None` before it was created.
fn load<T>(slot: &AtomicPtr<T>) -> Option<&T> {
    let p = slot.load(Ordering::Acquire);
    // SAFETY: a non-null pointer in a slot came from `Box::into_raw` in `get_or_create` and is
    // freed only by `StoredMap::drop`, which needs `&mut` and so cannot overlap this borrow.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// The object behind `slot`, created on first use (a lost race frees the loser's object).
fn get_or_create<T>(slot: &AtomicPtr<T>, make: impl FnOnce() -> T) -> &T {
    if let Some(existing) = load(slot) {
        return existing;
    }
    let fresh = Box::into_raw(Box::new(make()));
    match slot.compare_exchange(ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire) {
        // SAFETY: just published; lives until `StoredMap::drop` as in `load`.
        Ok(_) => unsafe { &*fresh },
        Err(winner) => {
            // SAFETY: `fresh` was never published, so this is its only owner.
            drop(unsafe { Box::from_raw(fresh) });
            // SAFETY: the winner was published by another `get_or_create`; as in `load`.
            unsafe { &*winner }
        }
    }
}

/// Free what `slot` holds, if anything (only from `drop`).
fn free<T>(slot: &AtomicPtr<T>, before: impl FnOnce(&T)) {
    let p = slot.load(Ordering::Acquire);
    if !p.is_null() {
        // SAFETY: `StoredMap::drop` has `&mut`: no reader is left, and each object was
        // published once by `get_or_create` from `Box::into_raw`; this frees it once.
        let object = unsafe { Box::from_raw(p) };
        before(&object);
    }
}

impl StoredMap {
    /// A map for `chunk_count` chunks, all clear.
    pub fn new(chunk_count: u64) -> StoredMap {
        let dir_count = chunk_count.div_ceil(DIR_CHUNKS);
        let dirs = (0..dir_count).map(|_| AtomicPtr::new(ptr::null_mut())).collect();
        StoredMap { dirs, chunk_count }
    }

    fn place(&self, chunk: u64) -> Place {
        assert!(chunk < self.chunk_count, "chunk {chunk} >= {}", self.chunk_count);
        let in_dir = chunk % DIR_CHUNKS;
        Place {
            dir: (chunk / DIR_CHUNKS) as usize,
            page: (in_dir / PAGE_CHUNKS) as usize,
            word: ((in_dir % PAGE_CHUNKS) / 64) as usize,
            bit: 1u64 << (chunk % 64),
        }
    }

    /// Whether `chunk` is known Stored. `false` may be stale: callers then take the slow path.
    pub fn is_set(&self, chunk: u64) -> bool {
        let at = self.place(chunk);
        let Some(dir) = load(&self.dirs[at.dir]) else { return false };
        let Some(page) = load(&dir.pages[at.page]) else { return false };
        page.words[at.word].load(Ordering::Acquire) & at.bit != 0
    }

    /// Record that `chunk` is Stored (after its state and data are).
    pub fn set(&self, chunk: u64) {
        let at = self.place(chunk);
        let dir = get_or_create(&self.dirs[at.dir], || Dir {
            pages: core::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
        });
        let page = get_or_create(&dir.pages[at.page], || Page {
            words: core::array::from_fn(|_| AtomicU64::new(0)),
        });
        page.words[at.word].fetch_or(at.bit, Ordering::Release);
        debug_assert!(self.is_set(chunk));
    }

    /// Pages allocated (for tests and memory accounting).
    pub fn pages_allocated(&self) -> usize {
        let dirs = self.dirs.iter().filter_map(load);
        dirs.map(|d| d.pages.iter().filter(|p| load(p).is_some()).count()).sum()
    }
}

impl Drop for StoredMap {
    fn drop(&mut self) {
        for dir in self.dirs.iter() {
            free(dir, |d| d.pages.iter().for_each(|p| free(p, |_| ())));
        }
    }
}

#[cfg(all(test, not(any(blksnap_loom, blksnap_shuttle))))]
mod tests {
    use super::*;

    #[test]
    fn bits_and_pages() {
        let m = StoredMap::new(3 * PAGE_CHUNKS + 5);
        assert_eq!(m.dirs.len(), 1);
        assert_eq!(m.pages_allocated(), 0);
        assert!(!m.is_set(0));
        m.set(0);
        m.set(63);
        m.set(64);
        m.set(3 * PAGE_CHUNKS + 4);
        assert!(m.is_set(0) && m.is_set(63) && m.is_set(64) && m.is_set(3 * PAGE_CHUNKS + 4));
        assert!(!m.is_set(1) && !m.is_set(65) && !m.is_set(PAGE_CHUNKS));
        assert_eq!(m.pages_allocated(), 2, "untouched regions have no page");
    }

    #[test]
    fn directories_are_lazy_too() {
        let m = StoredMap::new(3 * DIR_CHUNKS);
        assert_eq!(m.dirs.len(), 3, "a take allocates one pointer per directory");
        m.set(2 * DIR_CHUNKS + 7);
        assert!(m.is_set(2 * DIR_CHUNKS + 7) && !m.is_set(7) && !m.is_set(DIR_CHUNKS + 7));
        assert_eq!(m.pages_allocated(), 1);
    }

    #[test]
    #[should_panic(expected = "chunk 5 >= 5")]
    fn out_of_range_panics() {
        StoredMap::new(5).is_set(5);
    }

    #[test]
    fn racing_first_sets_keep_one_page() {
        let m = crate::sync::Arc::new(StoredMap::new(PAGE_CHUNKS));
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let m = m.clone();
                crate::sync::thread::spawn(move || {
                    for c in (t..PAGE_CHUNKS).step_by(4).take(64) {
                        m.set(c);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        for t in 0..4u64 {
            for c in (t..PAGE_CHUNKS).step_by(4).take(64) {
                assert!(m.is_set(c));
            }
        }
    }
}
