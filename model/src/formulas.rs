//! The sizing formulas: CBT block size and chunk size (`reference/blksnap-semantics.md` §2.1,
//! §3.1). Pure functions; the engine and the model call the same code.

use crate::params::{Params, PAGE_SHIFT, SECTOR_SHIFT};

/// `ceil(capacity_sectors / 2^(shift - 9))`: how many `2^shift`-byte blocks cover a device.
pub fn count_by_shift(capacity_sectors: u64, shift: u32) -> u64 {
    assert!((SECTOR_SHIFT..64).contains(&shift), "shift {shift} out of range");
    let block_sectors_shift = shift - SECTOR_SHIFT;
    let whole = capacity_sectors >> block_sectors_shift;
    let rest = capacity_sectors & ((1u64 << block_sectors_shift) - 1);
    whole + u64::from(rest != 0)
}

/// Layout of a device's CBT: `block_count` blocks of `2^block_shift` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CbtLayout {
    /// log2 of the block size in bytes.
    pub block_shift: u32,
    /// Number of blocks (= bytes per map).
    pub block_count: u64,
}

impl CbtLayout {
    /// Block size in bytes.
    pub fn block_size_bytes(&self) -> u64 {
        1u64 << self.block_shift
    }
    /// Block size in sectors.
    pub fn block_sectors(&self) -> u64 {
        1u64 << (self.block_shift - SECTOR_SHIFT)
    }
}

/// §2.1: start at `min(min_shift, max_shift)`, grow while the count exceeds the maximum count,
/// stop at the maximum shift even if the count is still too large (the kernel logs and goes on).
pub fn cbt_layout(params: &Params, capacity_sectors: u64) -> CbtLayout {
    let mut shift = params.tracking_block_minimum_shift.min(params.tracking_block_maximum_shift);
    let mut count = count_by_shift(capacity_sectors, shift);
    while count > params.tracking_block_maximum_count {
        if shift >= params.tracking_block_maximum_shift {
            break;
        }
        shift += 1;
        count = count_by_shift(capacity_sectors, shift);
    }
    CbtLayout { block_shift: shift, block_count: count }
}

/// Layout of a device's chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLayout {
    /// log2 of the chunk size in bytes.
    pub chunk_shift: u32,
    /// Number of chunks covering the device.
    pub chunk_count: u64,
    /// Sectors in the last chunk (the device capacity need not be a chunk multiple).
    pub last_chunk_sectors: u64,
}

impl ChunkLayout {
    fn new(capacity_sectors: u64, chunk_shift: u32) -> ChunkLayout {
        let chunk_count = count_by_shift(capacity_sectors, chunk_shift);
        let chunk_sectors = 1u64 << (chunk_shift - SECTOR_SHIFT);
        let last_chunk_sectors =
            if chunk_count == 0 { 0 } else { capacity_sectors - chunk_sectors * (chunk_count - 1) };
        debug_assert!(last_chunk_sectors <= chunk_sectors);
        ChunkLayout { chunk_shift, chunk_count, last_chunk_sectors }
    }

    /// Full chunk size in sectors.
    pub fn chunk_sectors(&self) -> u64 {
        1u64 << (self.chunk_shift - SECTOR_SHIFT)
    }

    /// Full chunk size in bytes.
    pub fn chunk_size_bytes(&self) -> u64 {
        1u64 << self.chunk_shift
    }

    /// Sectors of chunk `index` (the last one may be short). Panics on an index past the end.
    pub fn sectors_of(&self, index: u64) -> u64 {
        assert!(index < self.chunk_count, "chunk {index} >= count {}", self.chunk_count);
        if index + 1 == self.chunk_count {
            self.last_chunk_sectors
        } else {
            self.chunk_sectors()
        }
    }

    /// First sector of chunk `index`.
    pub fn first_sector_of(&self, index: u64) -> u64 {
        index << (self.chunk_shift - SECTOR_SHIFT)
    }

    /// Index of the chunk that holds `sector`.
    pub fn chunk_of_sector(&self, sector: u64) -> u64 {
        sector >> (self.chunk_shift - SECTOR_SHIFT)
    }
}

/// §3.1, v3 generation: `max(256 KiB, io_min, next_pow2(capacity / 2^21))`, capped at the maximum
/// shift. `chunk_maximum_count` is the v3 parameter (default 2^21).
pub fn chunk_layout_v3(
    params: &Params,
    chunk_maximum_count: u64,
    capacity_sectors: u64,
    io_min_sectors: u64,
) -> ChunkLayout {
    let mut shift = params.chunk_minimum_shift.min(params.chunk_maximum_shift);
    while count_by_shift(capacity_sectors, shift) > chunk_maximum_count
        || (1u64 << (shift - SECTOR_SHIFT)) < io_min_sectors
    {
        if shift >= params.chunk_maximum_shift {
            break;
        }
        shift += 1;
    }
    ChunkLayout::new(capacity_sectors, shift)
}

/// §3.1, newest generation (what the engine uses):
/// 1. from the page shift, grow until the chunk covers `io_min_sectors`;
/// 2. at or above the maximum shift: keep it (even above the maximum);
/// 3. else raise to the minimum shift, then grow while the count exceeds
///    `2^chunk_maximum_count_shift`, capped at the maximum shift.
pub fn chunk_layout(params: &Params, capacity_sectors: u64, io_min_sectors: u64) -> ChunkLayout {
    let mut shift = PAGE_SHIFT;
    while (1u64 << (shift - SECTOR_SHIFT)) < io_min_sectors && shift < 62 {
        shift += 1;
    }
    if shift < params.chunk_maximum_shift {
        shift = shift.max(params.chunk_minimum_shift);
        let count_limit = 1u64 << params.chunk_maximum_count_shift.min(63);
        while count_by_shift(capacity_sectors, shift) > count_limit
            && shift < params.chunk_maximum_shift
        {
            shift += 1;
        }
    }
    ChunkLayout::new(capacity_sectors, shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    const GIB: u64 = 1024 * MIB;
    const TIB: u64 = 1024 * GIB;

    fn sectors(bytes: u64) -> u64 {
        bytes / 512
    }

    #[test]
    fn count_by_shift_rounds_up() {
        assert_eq!(count_by_shift(0, 16), 0);
        assert_eq!(count_by_shift(1, 16), 1);
        assert_eq!(count_by_shift(128, 16), 1);
        assert_eq!(count_by_shift(129, 16), 2);
        assert_eq!(count_by_shift(u64::MAX, 9), u64::MAX);
        assert_eq!(count_by_shift(u64::MAX, 10), (u64::MAX >> 1) + 1);
    }

    /// The worked examples of §2.1.
    #[test]
    fn cbt_worked_examples() {
        let p = Params::default();
        let cases: &[(u64, u64, u64)] = &[
            (sectors(GIB), 64 * KIB, 16_384),
            (sectors(GIB) + 1, 64 * KIB, 16_385),
            (sectors(100 * GIB), 64 * KIB, 1_638_400),
            (sectors(128 * GIB), 64 * KIB, 2_097_152),
            (sectors(200 * GIB), 128 * KIB, 1_638_400),
            (sectors(500 * GIB), 256 * KIB, 2_048_000),
            (sectors(TIB), 512 * KIB, 2_097_152),
            (sectors(16 * TIB), 8 * MIB, 2_097_152),
            (sectors(128 * TIB), 64 * MIB, 2_097_152),
            (sectors(256 * TIB), 64 * MIB, 4_194_304),
        ];
        for &(cap, block, count) in cases {
            let l = cbt_layout(&p, cap);
            assert_eq!((l.block_size_bytes(), l.block_count), (block, count), "capacity {cap}");
        }
    }

    /// The worked examples of §3.1, both generations.
    #[test]
    fn chunk_worked_examples() {
        let p = Params::default();
        let v3_max = 2_097_152;
        // (capacity, io_min, v3 chunk, v3 count, newest chunk, newest count)
        let cases: &[(u64, u64, u64, u64, u64, u64)] = &[
            (sectors(GIB), 8, 256 * KIB, 4096, 256 * KIB, 4096),
            (sectors(GIB) + 1, 8, 256 * KIB, 4097, 256 * KIB, 4097),
            (sectors(100 * GIB), 8, 256 * KIB, 409_600, 256 * KIB, 409_600),
            (sectors(512 * GIB), 8, 256 * KIB, 2_097_152, 256 * KIB, 2_097_152),
            (sectors(TIB), 8, 512 * KIB, 2_097_152, 256 * KIB, 4_194_304),
            (sectors(16 * TIB), 8, 8 * MIB, 2_097_152, 256 * KIB, 67_108_864),
            (sectors(256 * TIB), 8, 64 * MIB, 4_194_304, 256 * KIB, 1_073_741_824),
            (sectors(100 * GIB), sectors(MIB), MIB, 102_400, MIB, 102_400),
            (sectors(100 * GIB), sectors(128 * MIB), 64 * MIB, 1600, 128 * MIB, 800),
        ];
        for &(cap, io_min, c3, n3, cn, nn) in cases {
            let v3 = chunk_layout_v3(&p, v3_max, cap, io_min);
            assert_eq!((v3.chunk_size_bytes(), v3.chunk_count), (c3, n3), "v3 cap {cap}");
            let new = chunk_layout(&p, cap, io_min);
            assert_eq!((new.chunk_size_bytes(), new.chunk_count), (cn, nn), "newest cap {cap}");
        }
    }

    #[test]
    fn last_chunk_is_short() {
        let l = chunk_layout(&Params::default(), sectors(GIB) + 1, 8);
        assert_eq!(l.last_chunk_sectors, 1);
        assert_eq!(l.sectors_of(4096), 1);
        assert_eq!(l.sectors_of(4095), 512);
        assert_eq!(l.first_sector_of(4096), sectors(GIB));
        assert_eq!(l.chunk_of_sector(sectors(GIB)), 4096);
        let exact = chunk_layout(&Params::default(), sectors(GIB), 8);
        assert_eq!(exact.last_chunk_sectors, 512);
        let empty = chunk_layout(&Params::default(), 0, 8);
        assert_eq!((empty.chunk_count, empty.last_chunk_sectors), (0, 0));
    }

    #[test]
    #[should_panic(expected = "chunk 1 >= count 1")]
    fn sectors_of_past_the_end_panics() {
        chunk_layout(&Params::default(), 8, 8).sectors_of(1);
    }
}
