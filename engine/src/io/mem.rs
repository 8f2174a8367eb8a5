//! [`MemDev`]: a sparse, sharded in-memory device.
//!
//! The device is cut into power-of-two segments allocated on first write, so a large test device
//! costs only what is written. Each segment has its own mutex so that writers of disjoint ranges
//! run in parallel; the segment table sits behind a reader-writer lock that only `set_len` takes
//! exclusively. Lock order: the table, then one segment at a time.
//!
//! Invariant: bytes of an allocated segment that lie past the device's end are zero. `set_len`
//! keeps it when shrinking, so growing again exposes zeroes, and a segment whose live part is
//! zeroed whole can be freed.

use core::fmt;

use blksnap_model::{Errno, Error, Result};

use super::BlockDev;
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{LockRank, Mutex, RwLock};

/// Default segment size: 1 MiB keeps the table small for multi-GiB devices and the
/// allocation granularity fine enough for chunk-sized writes.
pub const DEFAULT_SEGMENT_SHIFT: u32 = 20;
/// Smallest accepted segment: one sector, the unit of every I/O.
const MIN_SEGMENT_SHIFT: u32 = 9;
/// Largest accepted segment: 1 GiB, so one segment always fits a `usize` allocation.
const MAX_SEGMENT_SHIFT: u32 = 30;

/// A segment's bytes, `None` until first written (reads as zeroes).
type Segment = Mutex<Option<Box<[u8]>>>;

/// The part that `set_len` replaces.
struct Table {
    len_bytes: u64,
    segments: Vec<Segment>,
}

/// A sparse in-memory block device. See the module documentation.
pub struct MemDev {
    segment_shift: u32,
    /// `None`: fixed size. `Some(max)`: `set_len` accepts up to `max`.
    max_len_bytes: Option<u64>,
    table: RwLock<Table>,
    /// Statistic only (tests read it); segments are counted under their own lock.
    allocated_segments: AtomicU64,
}

/// The part of one I/O that falls into one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    segment: usize,
    in_segment_bytes: usize,
    len_bytes: usize,
    buf_offset_bytes: usize,
}

impl Piece {
    fn in_segment(&self) -> core::ops::Range<usize> {
        self.in_segment_bytes..self.in_segment_bytes + self.len_bytes
    }
    fn in_buf(&self) -> core::ops::Range<usize> {
        self.buf_offset_bytes..self.buf_offset_bytes + self.len_bytes
    }
}

/// Splits `[offset, offset + len)` at segment boundaries. The caller has checked the range
/// against the device length, so every index fits the table.
fn pieces(offset_bytes: u64, len_bytes: u64, shift: u32) -> impl Iterator<Item = Piece> {
    let segment_bytes = 1u64 << shift;
    let end_bytes = offset_bytes + len_bytes;
    let mut pos_bytes = offset_bytes;
    core::iter::from_fn(move || {
        if pos_bytes >= end_bytes {
            return None;
        }
        let in_segment_bytes = pos_bytes & (segment_bytes - 1);
        let len_bytes = (segment_bytes - in_segment_bytes).min(end_bytes - pos_bytes);
        let piece = Piece {
            segment: (pos_bytes >> shift) as usize,
            in_segment_bytes: in_segment_bytes as usize,
            len_bytes: len_bytes as usize,
            buf_offset_bytes: (pos_bytes - offset_bytes) as usize,
        };
        pos_bytes += len_bytes;
        Some(piece)
    })
}

/// Past-the-end (or overflowing) I/O is EIO by the [`BlockDev`] contract.
fn check_range(offset_bytes: u64, len_bytes: u64, device_len_bytes: u64) -> Result<()> {
    match offset_bytes.checked_add(len_bytes) {
        Some(end_bytes) if end_bytes <= device_len_bytes => Ok(()),
        _ => Err(Error::new(Errno::EIO, "memory device: I/O past the end")),
    }
}

/// Segments needed to hold `len_bytes`; ENOMEM if the table could not be indexed.
fn segment_count(len_bytes: u64, shift: u32) -> Result<usize> {
    let count = len_bytes.div_ceil(1u64 << shift);
    usize::try_from(count)
        .map_err(|_| Error::new(Errno::ENOMEM, "memory device: segment table too large"))
}

fn empty_segments(count: usize) -> Vec<Segment> {
    (0..count).map(|_| Mutex::new(LockRank::MemSegment, None)).collect()
}

impl MemDev {
    /// A fixed-size device of `len_bytes` zero bytes (1 MiB segments; `can_grow` is false).
    ///
    /// Panics only if the segment table cannot be allocated (an absurd `len_bytes`).
    pub fn new(len_bytes: u64) -> MemDev {
        MemDev::build(len_bytes, None, DEFAULT_SEGMENT_SHIFT)
    }

    /// A growable device of `len_bytes`: `set_len` accepts up to `max_len_bytes` (ENOSPC beyond).
    /// A `max_len_bytes` below `len_bytes` is raised to it (the device cannot grow then).
    pub fn growable(len_bytes: u64, max_len_bytes: u64) -> MemDev {
        MemDev::build(len_bytes, Some(max_len_bytes.max(len_bytes)), DEFAULT_SEGMENT_SHIFT)
    }

    /// Full control: `max_len_bytes` as for [`MemDev::growable`] (`None` = fixed size), and
    /// `segment_bytes` a power of two from 512 to 1 GiB (else EINVAL). Small segments make
    /// boundary tests cheap.
    pub fn with_segment_bytes(
        len_bytes: u64,
        max_len_bytes: Option<u64>,
        segment_bytes: u64,
    ) -> Result<MemDev> {
        let shift = segment_bytes.trailing_zeros();
        let valid = segment_bytes.is_power_of_two()
            && (MIN_SEGMENT_SHIFT..=MAX_SEGMENT_SHIFT).contains(&shift);
        if !valid {
            return Err(Error::new(Errno::EINVAL, "segment size: a power of two, 512 B to 1 GiB"));
        }
        segment_count(len_bytes, shift)?;
        Ok(MemDev::build(len_bytes, max_len_bytes.map(|m| m.max(len_bytes)), shift))
    }

    fn build(len_bytes: u64, max_len_bytes: Option<u64>, segment_shift: u32) -> MemDev {
        let count = segment_count(len_bytes, segment_shift).expect("segment table fits usize");
        MemDev {
            segment_shift,
            max_len_bytes,
            table: RwLock::new(
                LockRank::MemTable,
                Table { len_bytes, segments: empty_segments(count) },
            ),
            allocated_segments: AtomicU64::new(0),
        }
    }

    /// Bytes of memory held by data segments (a multiple of [`MemDev::segment_bytes`]).
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated_segments.load(Ordering::Relaxed) << self.segment_shift
    }

    /// The allocation granularity.
    pub fn segment_bytes(&self) -> u64 {
        1u64 << self.segment_shift
    }

    /// The growth limit, `None` for a fixed-size device.
    pub fn max_len_bytes(&self) -> Option<u64> {
        self.max_len_bytes
    }

    /// Bytes of segment `index` that lie inside a device of `len_bytes`.
    fn live_bytes(&self, index: usize, len_bytes: u64) -> usize {
        let start_bytes = (index as u64) << self.segment_shift;
        (len_bytes - start_bytes).min(self.segment_bytes()) as usize
    }

    fn alloc_segment(&self) -> Box<[u8]> {
        self.allocated_segments.fetch_add(1, Ordering::Relaxed);
        vec![0u8; self.segment_bytes() as usize].into_boxed_slice()
    }

    fn free_segment(&self, slot: &mut Option<Box<[u8]>>) {
        if slot.take().is_some() {
            self.allocated_segments.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Zeroes one piece; frees the segment when the piece covers all its live bytes, which the
    /// invariant (tail past the end is zero) makes equivalent to an all-zero segment.
    fn zero_piece(&self, table: &Table, piece: Piece) {
        let whole = piece.in_segment_bytes == 0
            && piece.len_bytes == self.live_bytes(piece.segment, table.len_bytes);
        let mut slot = table.segments[piece.segment].lock();
        if whole {
            self.free_segment(&mut slot);
        } else if let Some(data) = slot.as_mut() {
            data[piece.in_segment()].fill(0);
        }
    }

    /// Drops segments from `count` on, keeping the allocation statistic right.
    fn truncate_table(&self, table: &mut Table, count: usize) {
        for segment in table.segments.drain(count.min(table.segments.len())..) {
            self.free_segment(&mut segment.into_inner());
        }
    }

    /// Zeroes the bytes of the last segment past `len_bytes` (keeps the invariant on shrink).
    fn zero_tail(&self, table: &Table, len_bytes: u64) {
        let tail_start_bytes = (len_bytes & (self.segment_bytes() - 1)) as usize;
        let Some(last) = table.segments.last() else {
            return;
        };
        if tail_start_bytes == 0 {
            return;
        }
        if let Some(data) = last.lock().as_mut() {
            data[tail_start_bytes..].fill(0);
        }
    }

    /// Appends unallocated segments up to `count`; ENOMEM instead of aborting.
    fn extend_table(table: &mut Table, count: usize) -> Result<()> {
        let more = count.saturating_sub(table.segments.len());
        table
            .segments
            .try_reserve(more)
            .map_err(|_| Error::new(Errno::ENOMEM, "memory device: cannot grow segment table"))?;
        table.segments.extend(empty_segments(more));
        Ok(())
    }
}

impl fmt::Debug for MemDev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemDev")
            .field("len_bytes", &self.len_bytes())
            .field("max_len_bytes", &self.max_len_bytes)
            .field("segment_bytes", &self.segment_bytes())
            .field("allocated_bytes", &self.allocated_bytes())
            .finish()
    }
}

impl BlockDev for MemDev {
    fn len_bytes(&self) -> u64 {
        self.table.read().len_bytes
    }

    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<()> {
        let table = self.table.read();
        check_range(offset_bytes, buf.len() as u64, table.len_bytes)?;
        for piece in pieces(offset_bytes, buf.len() as u64, self.segment_shift) {
            let dst = &mut buf[piece.in_buf()];
            match table.segments[piece.segment].lock().as_ref() {
                Some(data) => dst.copy_from_slice(&data[piece.in_segment()]),
                None => dst.fill(0),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> Result<()> {
        let table = self.table.read();
        check_range(offset_bytes, buf.len() as u64, table.len_bytes)?;
        for piece in pieces(offset_bytes, buf.len() as u64, self.segment_shift) {
            let mut slot = table.segments[piece.segment].lock();
            let data = slot.get_or_insert_with(|| self.alloc_segment());
            data[piece.in_segment()].copy_from_slice(&buf[piece.in_buf()]);
        }
        Ok(())
    }

    fn write_zeroes_at(&self, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        let table = self.table.read();
        check_range(offset_bytes, len_bytes, table.len_bytes)?;
        for piece in pieces(offset_bytes, len_bytes, self.segment_shift) {
            self.zero_piece(&table, piece);
        }
        Ok(())
    }

    /// Memory is as durable as it gets.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn can_grow(&self) -> bool {
        self.max_len_bytes.is_some()
    }

    /// Fixed size → EOPNOTSUPP; over the maximum → ENOSPC. Shrinking drops the data past the
    /// new end, so growing again reads zeroes there.
    fn set_len(&self, len_bytes: u64) -> Result<()> {
        let Some(max_len_bytes) = self.max_len_bytes else {
            return Err(Error::new(Errno::EOPNOTSUPP, "memory device has a fixed size"));
        };
        if len_bytes > max_len_bytes {
            return Err(Error::new(Errno::ENOSPC, "memory device: over its maximum size"));
        }
        let count = segment_count(len_bytes, self.segment_shift)?;
        let mut table = self.table.write();
        if len_bytes < table.len_bytes {
            self.truncate_table(&mut table, count);
            self.zero_tail(&table, len_bytes);
        } else {
            MemDev::extend_table(&mut table, count)?;
        }
        table.len_bytes = len_bytes;
        Ok(())
    }
}

// The facade's locks belong to the checker under loom/shuttle and cannot be created outside a
// checked execution, so these unit tests run on the std backend only.
#[cfg(all(test, not(any(blksnap_loom, blksnap_shuttle))))]
mod tests {
    use super::*;
    use crate::sync::{thread, StdArc};

    const SEG_BYTES: u64 = 4096;

    fn small(len_bytes: u64, max_len_bytes: Option<u64>) -> MemDev {
        MemDev::with_segment_bytes(len_bytes, max_len_bytes, SEG_BYTES).unwrap()
    }

    fn pattern(len_bytes: usize, seed: u8) -> Vec<u8> {
        (0..len_bytes).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    fn read(dev: &MemDev, offset_bytes: u64, len_bytes: usize) -> Vec<u8> {
        let mut buf = vec![0xAAu8; len_bytes];
        dev.read_at(&mut buf, offset_bytes).unwrap();
        buf
    }

    #[test]
    fn pieces_split_at_segment_boundaries() {
        let got: Vec<Piece> = pieces(4096 - 512, 4096 + 1024, 12).collect();
        assert_eq!(
            got,
            vec![
                Piece { segment: 0, in_segment_bytes: 3584, len_bytes: 512, buf_offset_bytes: 0 },
                Piece { segment: 1, in_segment_bytes: 0, len_bytes: 4096, buf_offset_bytes: 512 },
                Piece { segment: 2, in_segment_bytes: 0, len_bytes: 512, buf_offset_bytes: 4608 },
            ]
        );
        assert_eq!(pieces(100, 0, 12).count(), 0);
    }

    #[test]
    fn round_trip_across_segment_boundaries() {
        let dev = small(4 * SEG_BYTES, None);
        let data = pattern(2 * SEG_BYTES as usize + 1024, 7);
        dev.write_at(&data, SEG_BYTES - 512).unwrap();
        assert_eq!(read(&dev, SEG_BYTES - 512, data.len()), data);
        // Unwritten neighbours still read as zeroes.
        assert_eq!(read(&dev, 0, 3584), vec![0u8; 3584]);
        let after_bytes = SEG_BYTES - 512 + data.len() as u64;
        let tail = read(&dev, after_bytes, (4 * SEG_BYTES - after_bytes) as usize);
        assert!(tail.iter().all(|b| *b == 0));
        // A read straddling written and unwritten bytes.
        let mixed = read(&dev, SEG_BYTES - 1024, 1024);
        assert_eq!(&mixed[..512], &[0u8; 512][..]);
        assert_eq!(&mixed[512..], &data[..512]);
    }

    #[test]
    fn default_segment_is_one_mib() {
        let dev = MemDev::new(3 << 20);
        assert_eq!(dev.segment_bytes(), 1 << 20);
        dev.write_at(&[1u8; 512], (1 << 20) - 512).unwrap();
        dev.write_at(&[2u8; 512], 1 << 20).unwrap();
        assert_eq!(dev.allocated_bytes(), 2 << 20);
        assert_eq!(read(&dev, (1 << 20) - 512, 1024)[511..513], [1, 2]);
    }

    #[test]
    fn sparse_allocation_accounting() {
        let dev = small(8 * SEG_BYTES, None);
        assert_eq!(dev.allocated_bytes(), 0);
        let _ = read(&dev, 0, 8 * SEG_BYTES as usize);
        assert_eq!(dev.allocated_bytes(), 0, "reads allocate nothing");
        dev.write_at(&[1u8; 512], 3 * SEG_BYTES).unwrap();
        assert_eq!(dev.allocated_bytes(), SEG_BYTES);
        dev.write_at(&[2u8; 1024], 5 * SEG_BYTES - 512).unwrap();
        assert_eq!(dev.allocated_bytes(), 3 * SEG_BYTES);
        dev.write_at(&[3u8; 512], 3 * SEG_BYTES + 512).unwrap();
        assert_eq!(dev.allocated_bytes(), 3 * SEG_BYTES, "rewrites allocate nothing");
    }

    #[test]
    fn write_zeroes_frees_whole_segments_only() {
        let dev = small(4 * SEG_BYTES, None);
        dev.write_zeroes_at(0, 4 * SEG_BYTES).unwrap();
        assert_eq!(dev.allocated_bytes(), 0, "zeroing unallocated segments allocates nothing");
        dev.write_at(&pattern(2 * SEG_BYTES as usize, 1), 0).unwrap();
        dev.write_zeroes_at(512, 1024).unwrap();
        assert_eq!(dev.allocated_bytes(), 2 * SEG_BYTES, "a partial zero keeps the segment");
        let first = read(&dev, 0, 2048);
        assert_eq!(&first[..512], &pattern(512, 1)[..]);
        assert!(first[512..1536].iter().all(|b| *b == 0));
        assert_eq!(&first[1536..], &pattern(2048, 1)[1536..]);
        dev.write_zeroes_at(SEG_BYTES, SEG_BYTES).unwrap();
        assert_eq!(dev.allocated_bytes(), SEG_BYTES, "a whole zero frees the segment");
        assert_eq!(read(&dev, SEG_BYTES, SEG_BYTES as usize), vec![0u8; SEG_BYTES as usize]);
        dev.write_zeroes_at(2 * SEG_BYTES + 512, 512).unwrap();
        assert_eq!(dev.allocated_bytes(), SEG_BYTES, "a partial zero of a hole allocates nothing");
    }

    #[test]
    fn zeroing_a_short_last_segment_frees_it() {
        let dev = small(SEG_BYTES + 1024, None);
        dev.write_at(&[9u8; 1024], SEG_BYTES).unwrap();
        assert_eq!(dev.allocated_bytes(), SEG_BYTES);
        dev.write_zeroes_at(SEG_BYTES, 1024).unwrap();
        assert_eq!(dev.allocated_bytes(), 0);
        assert_eq!(read(&dev, SEG_BYTES, 1024), vec![0u8; 1024]);
    }

    #[test]
    fn past_end_is_eio_never_a_panic() {
        let dev = small(2 * SEG_BYTES, None);
        let mut buf = [0u8; 1024];
        let eio = Some(Errno::EIO);
        assert_eq!(dev.read_at(&mut buf, 2 * SEG_BYTES - 512).err().map(|e| e.errno), eio);
        assert_eq!(dev.write_at(&buf, 2 * SEG_BYTES).err().map(|e| e.errno), eio);
        assert_eq!(dev.write_zeroes_at(SEG_BYTES, SEG_BYTES + 1).err().map(|e| e.errno), eio);
        assert_eq!(dev.read_at(&mut buf, u64::MAX - 10).err().map(|e| e.errno), eio);
        assert_eq!(dev.write_zeroes_at(u64::MAX, u64::MAX).err().map(|e| e.errno), eio);
        assert_eq!(dev.allocated_bytes(), 0, "a failed write touches nothing");
        // Zero-length I/O at the very end is in range.
        dev.read_at(&mut [], 2 * SEG_BYTES).unwrap();
        dev.write_zeroes_at(2 * SEG_BYTES, 0).unwrap();
    }

    #[test]
    fn fixed_size_cannot_grow() {
        let dev = MemDev::new(1 << 20);
        assert!(!dev.can_grow());
        assert_eq!(dev.max_len_bytes(), None);
        assert_eq!(dev.set_len(2 << 20).unwrap_err().errno, Errno::EOPNOTSUPP);
        assert_eq!(dev.len_bytes(), 1 << 20);
    }

    #[test]
    fn grows_up_to_the_maximum() {
        let dev = small(SEG_BYTES, Some(4 * SEG_BYTES));
        assert!(dev.can_grow());
        dev.set_len(3 * SEG_BYTES + 512).unwrap();
        assert_eq!(dev.len_bytes(), 3 * SEG_BYTES + 512);
        dev.write_at(&[5u8; 1024], 3 * SEG_BYTES - 512).unwrap();
        assert_eq!(read(&dev, 3 * SEG_BYTES - 512, 1024), vec![5u8; 1024]);
        assert_eq!(dev.set_len(4 * SEG_BYTES + 512).unwrap_err().errno, Errno::ENOSPC);
        assert_eq!(dev.len_bytes(), 3 * SEG_BYTES + 512, "a refused growth changes nothing");
        dev.set_len(4 * SEG_BYTES).unwrap();
        assert_eq!(MemDev::growable(2048, 1024).max_len_bytes(), Some(2048));
    }

    #[test]
    fn shrink_drops_data_and_memory() {
        let dev = small(4 * SEG_BYTES, Some(4 * SEG_BYTES));
        dev.write_at(&vec![7u8; 4 * SEG_BYTES as usize], 0).unwrap();
        assert_eq!(dev.allocated_bytes(), 4 * SEG_BYTES);
        dev.set_len(SEG_BYTES + 1024).unwrap();
        assert_eq!(dev.allocated_bytes(), 2 * SEG_BYTES);
        assert_eq!(dev.read_at(&mut [0u8; 512], SEG_BYTES + 1024).unwrap_err().errno, Errno::EIO);
        dev.set_len(4 * SEG_BYTES).unwrap();
        assert_eq!(read(&dev, SEG_BYTES, 1024), vec![7u8; 1024], "kept bytes survive");
        let regrown = read(&dev, SEG_BYTES + 1024, 3 * SEG_BYTES as usize - 1024);
        assert!(regrown.iter().all(|b| *b == 0), "dropped bytes read as zeroes");
        dev.set_len(0).unwrap();
        assert_eq!(dev.allocated_bytes(), 0);
    }

    #[test]
    fn rejects_bad_segment_sizes() {
        for bytes in [0, 256, 3000, 1 << 31] {
            assert_eq!(
                MemDev::with_segment_bytes(1 << 20, None, bytes).unwrap_err().errno,
                Errno::EINVAL,
                "{bytes}"
            );
        }
        assert!(MemDev::with_segment_bytes(1 << 20, None, 512).is_ok());
    }

    #[test]
    fn parallel_writers_on_disjoint_segments() {
        let dev = StdArc::new(small(8 * SEG_BYTES, None));
        let handles: Vec<_> = (0..8u8)
            .map(|i| {
                let dev = StdArc::clone(&dev);
                thread::spawn(move || {
                    let data = pattern(SEG_BYTES as usize, i);
                    for _ in 0..50 {
                        dev.write_at(&data, u64::from(i) * SEG_BYTES).unwrap();
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
        for i in 0..8u8 {
            let got = read(&dev, u64::from(i) * SEG_BYTES, SEG_BYTES as usize);
            assert_eq!(got, pattern(SEG_BYTES as usize, i));
        }
        assert_eq!(dev.allocated_bytes(), 8 * SEG_BYTES);
    }
}
