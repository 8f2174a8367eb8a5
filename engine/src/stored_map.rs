//! Which chunks of a diff area are Stored, readable with no lock.
//!
//! Why: an origin write to a chunk that was already copied needs no copy-on-write, and it is the
//! common case of a long-lived snapshot. Finding that out through the chunk map costs a read
//! lock, a hash and a reference get/put per chunk; this map answers with one or two atomic loads.
//!
//! Layout: one bit per chunk, in pages of [`PAGE_CHUNKS`] chunks allocated on the first chunk of
//! the page that is stored. A take allocates only the page table: one pointer per `PAGE_CHUNKS`
//! chunks (16 KiB for 16 TiB of 256 KiB chunks), and no page for untouched regions.
//!
//! Invariant: a bit is set only after its chunk is Stored (state and data written), with
//! Release; a reader that sees it with Acquire sees the pre-image safe. Bits are never cleared
//! (Stored is terminal). Pages are freed only when the map is dropped (the diff area is gone).

use core::ptr;

use crate::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

/// 64-bit words per page (small under loom, whose atomics are heavy).
#[cfg(not(blksnap_loom))]
const PAGE_WORDS: usize = 512;
#[cfg(blksnap_loom)]
const PAGE_WORDS: usize = 1;
/// Chunks per page.
pub const PAGE_CHUNKS: u64 = PAGE_WORDS as u64 * 64;

struct Page {
    words: [AtomicU64; PAGE_WORDS],
}

/// The stored-chunk bits of one diff area.
pub struct StoredMap {
    pages: Box<[AtomicPtr<Page>]>,
    chunk_count: u64,
}

impl StoredMap {
    /// A map for `chunk_count` chunks, all clear.
    pub fn new(chunk_count: u64) -> StoredMap {
        let page_count = chunk_count.div_ceil(PAGE_CHUNKS);
        let pages = (0..page_count).map(|_| AtomicPtr::new(ptr::null_mut())).collect();
        StoredMap { pages, chunk_count }
    }

    fn locate(&self, chunk: u64) -> (usize, usize, u64) {
        assert!(chunk < self.chunk_count, "chunk {chunk} >= {}", self.chunk_count);
        let page = (chunk / PAGE_CHUNKS) as usize;
        let word = ((chunk % PAGE_CHUNKS) / 64) as usize;
        (page, word, 1u64 << (chunk % 64))
    }

    /// Whether `chunk` is known Stored. `false` may be stale: callers then take the slow path.
    pub fn is_set(&self, chunk: u64) -> bool {
        let (page, word, bit) = self.locate(chunk);
        let p = self.pages[page].load(Ordering::Acquire);
        if p.is_null() {
            return false;
        }
        // SAFETY: a non-null page pointer came from `Box::into_raw` in `page` and is freed only
        // in `drop`, which cannot run while `&self` is borrowed.
        let page = unsafe { &*p };
        page.words[word].load(Ordering::Acquire) & bit != 0
    }

    /// Record that `chunk` is Stored (after its state and data are).
    pub fn set(&self, chunk: u64) {
        let (page, word, bit) = self.locate(chunk);
        let page = self.page(page);
        page.words[word].fetch_or(bit, Ordering::Release);
        debug_assert!(self.is_set(chunk));
    }

    /// The page at `index`, allocated on first use (a lost race frees the loser's page).
    fn page(&self, index: usize) -> &Page {
        let slot = &self.pages[index];
        let mut p = slot.load(Ordering::Acquire);
        if p.is_null() {
            let fresh = Box::into_raw(Box::new(Page {
                words: core::array::from_fn(|_| AtomicU64::new(0)),
            }));
            match slot.compare_exchange(ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => p = fresh,
                Err(winner) => {
                    // SAFETY: `fresh` was never published, so this is its only owner.
                    drop(unsafe { Box::from_raw(fresh) });
                    p = winner;
                }
            }
        }
        // SAFETY: as in `is_set`: published pages live until `drop`.
        unsafe { &*p }
    }
}

impl Drop for StoredMap {
    fn drop(&mut self) {
        for slot in self.pages.iter() {
            let p = slot.load(Ordering::Acquire);
            if !p.is_null() {
                // SAFETY: `&mut self`: no reader is left; each page was published once by
                // `page` from `Box::into_raw` and is freed once here.
                drop(unsafe { Box::from_raw(p) });
            }
        }
    }
}

#[cfg(all(test, not(any(blksnap_loom, blksnap_shuttle))))]
mod tests {
    use super::*;

    #[test]
    fn bits_and_pages() {
        let m = StoredMap::new(3 * PAGE_CHUNKS + 5);
        assert_eq!(m.pages.len(), 4);
        assert!(!m.is_set(0));
        m.set(0);
        m.set(63);
        m.set(64);
        m.set(3 * PAGE_CHUNKS + 4);
        assert!(m.is_set(0) && m.is_set(63) && m.is_set(64) && m.is_set(3 * PAGE_CHUNKS + 4));
        assert!(!m.is_set(1) && !m.is_set(65) && !m.is_set(PAGE_CHUNKS));
        let allocated = m.pages.iter().filter(|p| !p.load(Ordering::Relaxed).is_null()).count();
        assert_eq!(allocated, 2, "untouched regions have no page");
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
