//! Copy buffers of a diff area (kernel: `diff_buffer.c`, a free list of chunk-sized buffers
//! reused by the copy-on-write): the first write to a chunk reads the chunk's pre-image into a
//! buffer and writes it to the difference storage. A fresh zeroed allocation per copy cost as
//! much CPU as one of the copy's two memory copies (glibc's `calloc` of a reused heap block
//! clears it, and the origin read then overwrites every byte; measured in `docs/datapath.md`).
//! Reused buffers are never cleared: each use overwrites the bytes it hands out (the origin read
//! fills them, or the caller copies into them), so no stale byte is ever written anywhere.
//! The bytes handed out start at a [`BUFFER_ALIGN_BYTES`] boundary, so a backing opened for
//! direct I/O (the daemon's) reads and writes them in place instead of through a bounce buffer
//! and one more copy of the chunk; the alignment is found in safe code by allocating one
//! alignment more and starting at the first aligned byte.
//!
//! Bounded memory: at most [`DiffBufferPool::kept`] free buffers of `buffer_bytes` (plus
//! [`BUFFER_ALIGN_BYTES`]) each are kept (`max(1, POOL_KEPT_BYTES / buffer_bytes)`, i.e. at most
//! the larger of 1 MiB and one chunk per diff area, freed with it); buffers in use are one per
//! copy in flight, as before the pool.
//!
//! Locking: one leaf mutex, held only to pop or push a buffer, never across I/O.

use crate::sync::{LockRank, Mutex};

/// Bytes of free buffers a pool keeps (at least one buffer whatever the chunk size).
pub const POOL_KEPT_BYTES: usize = 1 << 20;

/// Alignment of the bytes a [`DiffBuffer`] hands out: the page size, which covers every logical
/// block size direct I/O asks for.
pub const BUFFER_ALIGN_BYTES: usize = 4096;

/// A bounded free list of equal-sized buffers.
///
/// Invariants: every buffer in `free` is exactly `buffer_bytes + BUFFER_ALIGN_BYTES` long (its
/// heap block never moves: nothing grows it); `free.len() <= kept`.
#[derive(Debug)]
pub struct DiffBufferPool {
    free: Mutex<Vec<Vec<u8>>>,
    buffer_bytes: usize,
    kept: usize,
}

/// A buffer taken from a pool; it goes back to the pool (or is freed if the pool is full) when
/// dropped, exactly once.
pub struct DiffBuffer<'a> {
    pool: &'a DiffBufferPool,
    /// Taken out (left empty) only by `drop`.
    buf: Vec<u8>,
    /// Where the aligned bytes start in `buf`.
    start: usize,
    len_bytes: usize,
}

impl DiffBufferPool {
    /// A pool of `buffer_bytes` buffers keeping the default number free.
    pub fn new(buffer_bytes: usize) -> DiffBufferPool {
        DiffBufferPool::with_kept(buffer_bytes, (POOL_KEPT_BYTES / buffer_bytes.max(1)).max(1))
    }

    /// A pool keeping at most `kept` free buffers (tests and models use small numbers).
    pub fn with_kept(buffer_bytes: usize, kept: usize) -> DiffBufferPool {
        DiffBufferPool { free: Mutex::new(LockRank::DiffBuffers, Vec::new()), buffer_bytes, kept }
    }

    /// The most free buffers this pool keeps.
    pub fn kept(&self) -> usize {
        self.kept
    }

    /// Free buffers held now.
    pub fn free_count(&self) -> usize {
        self.free.lock().len()
    }

    /// A buffer whose first `len_bytes` (at most `buffer_bytes`) the caller will fully
    /// overwrite: its content is unspecified (a previous copy's data, or zeroes when new).
    pub fn take(&self, len_bytes: usize) -> DiffBuffer<'_> {
        debug_assert!(len_bytes <= self.buffer_bytes);
        let reused = self.free.lock().pop();
        let buf = reused.unwrap_or_else(|| vec![0u8; self.buffer_bytes + BUFFER_ALIGN_BYTES]);
        let misaligned = buf.as_ptr() as usize % BUFFER_ALIGN_BYTES;
        let start = (BUFFER_ALIGN_BYTES - misaligned) % BUFFER_ALIGN_BYTES;
        DiffBuffer { pool: self, buf, start, len_bytes }
    }

    fn give_back(&self, buf: Vec<u8>) {
        debug_assert_eq!(buf.len(), self.buffer_bytes + BUFFER_ALIGN_BYTES);
        let mut free = self.free.lock();
        if free.len() < self.kept {
            free.push(buf);
        }
        // else: dropped after the guard, outside the lock.
    }
}

impl core::ops::Deref for DiffBuffer<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len_bytes]
    }
}

impl core::ops::DerefMut for DiffBuffer<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len_bytes]
    }
}

impl Drop for DiffBuffer<'_> {
    fn drop(&mut self) {
        self.pool.give_back(core::mem::take(&mut self.buf));
    }
}

#[cfg(all(test, not(any(blksnap_loom, blksnap_shuttle))))]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_the_pool_stays_bounded() {
        let pool = DiffBufferPool::with_kept(4096, 2);
        {
            let (mut a, mut b, mut c) = (pool.take(4096), pool.take(4096), pool.take(512));
            assert_eq!((a.len(), b.len(), c.len()), (4096, 4096, 512));
            for buf in [&a, &b, &c] {
                assert_eq!(buf.as_ptr() as usize % BUFFER_ALIGN_BYTES, 0, "aligned for direct I/O");
            }
            a.fill(1);
            b.fill(2);
            c.fill(3);
        }
        assert_eq!(pool.free_count(), 2, "three returned, two kept");
        let first = pool.take(4096);
        assert!(first.iter().all(|&x| x == first[0] && x != 0), "a reused buffer is not cleared");
        drop(first);
        assert_eq!(pool.free_count(), 2);
    }

    #[test]
    fn the_default_pool_keeps_one_mib_or_one_buffer() {
        assert_eq!(DiffBufferPool::new(256 << 10).kept(), 4);
        assert_eq!(DiffBufferPool::new(4 << 20).kept(), 1);
    }
}
