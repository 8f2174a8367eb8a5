//! Shared pieces of the fuzz targets: a byte reader over [`arbitrary::Unstructured`] whose
//! encoding is simple enough to write seeds by hand ([`Enc`] is its mirror), and the decoder of
//! `ops_vs_model` inputs into [`blksnap_sim_tests::Op`]s.
//!
//! Every field is drawn from single bytes (an exhausted input reads as zero bytes), so an input
//! is a plain byte script: a variant byte, then the variant's field bytes. Values come from
//! realistic ranges most of the time and from tables of edge values otherwise.

use std::path::{Path, PathBuf};

use arbitrary::{Arbitrary, Unstructured};
use blksnap_model::{Errno, IoKind, Params, SectorRange};
use blksnap_sim_tests::{Op, StorageKind};

/// Byte reader: every read succeeds (zeroes once the input is exhausted).
pub struct Rd<'a, 'b>(pub &'b mut Unstructured<'a>);

impl Rd<'_, '_> {
    /// One byte.
    pub fn u8(&mut self) -> u8 {
        u8::arbitrary(self.0).unwrap_or(0)
    }
    /// Little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    /// Little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    /// Little-endian u64.
    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.u8();
        }
        u64::from_le_bytes(b)
    }
    /// `n` bytes (zero-padded).
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
    /// Fills `buf` (zero-padded).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.u8();
        }
    }
    /// An index below `n` (one byte, modulo).
    pub fn below(&mut self, n: usize) -> usize {
        usize::from(self.u8()) % n.max(1)
    }
    /// One of `table`.
    pub fn pick<T: Copy>(&mut self, table: &[T]) -> T {
        table[self.below(table.len())]
    }
    /// Whether input is left.
    pub fn more(&self) -> bool {
        !self.0.is_empty()
    }
    /// A value: a byte below `small` is itself; otherwise an edge from `edges` (one more byte).
    pub fn small_or_edge(&mut self, small: u8, edges: &[u64]) -> u64 {
        let b = self.u8();
        if b < small {
            u64::from(b)
        } else {
            self.pick(edges)
        }
    }
}

/// The mirror of [`Rd`] for writing seeds: pushes the bytes that read back as the given values.
#[derive(Default, Clone)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    /// One byte.
    pub fn u8(&mut self, b: u8) -> &mut Enc {
        self.0.push(b);
        self
    }
    /// Several bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Enc {
        self.0.extend_from_slice(b);
        self
    }
    /// Little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Enc {
        self.bytes(&v.to_le_bytes())
    }
    /// Little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Enc {
        self.bytes(&v.to_le_bytes())
    }
}

// ---- ops_vs_model ------------------------------------------------------------------------------

/// Disk sizes in sectors (the model keeps every disk in memory: small ones, with short last
/// chunks and blocks, one sector, and none).
pub const DISK_SECTORS: [u64; 8] = [64, 75, 131, 8, 1, 0, 256, 17];
/// io_min values in sectors.
pub const IO_MIN: [u64; 4] = [1, 16, 8, 64];
/// Sector edges (every one times 512 still fits u64, as the harness computes bytes).
pub const SECTOR_EDGES: [u64; 8] =
    [u64::MAX / 512, u64::MAX / 512 - 7, 1 << 32, (1 << 32) - 1, 1 << 45, 255, 256, 257];
/// Lengths in sectors for I/O that allocates a buffer (at most 256 sectors).
pub const LEN_EDGES: [u64; 4] = [0, 128, 256, 255];
/// Range field edges (no allocation follows from them).
pub const RANGE_EDGES: [u64; 10] =
    [u64::MAX, u64::MAX - 1, 1 << 63, u64::MAX / 512, 1 << 32, 512, 513, 131, 132, 1 << 16];
/// Storage sizes at create.
pub const STORAGE_INITIAL: [u64; 6] = [0, 8, 24, 40, 100, 1000];
/// Storage limits.
pub const STORAGE_LIMIT: [u64; 8] = [0, 16, 48, 96, 200, 1000, u64::MAX, 1 << 40];
/// Fault errnos.
pub const FAULT_ERRNO: [Errno; 4] = [Errno::EIO, Errno::ENOSPC, Errno::EIO, Errno::ENOMEM];
/// cbtmap offset/length edges.
pub const MAP_EDGES: [u64; 6] = [u32::MAX as u64, u32::MAX as u64 - 1, 1 << 16, 65_535, 256, 257];
/// Wait timeouts (the harness clock jumps instead of sleeping).
pub const TIMEOUTS: [u32; 4] = [0, 1, 100, u32::MAX];
/// Storage minimum values (at most 2^20 sectors: the harness's in-memory storage keeps a
/// segment table proportional to its length, so growth steps stay bounded).
pub const MINIMUMS: [u64; 8] = [0, 1, 8, 16, 64, 100, 256, 1 << 20];
/// Clock advances.
pub const CLOCK_STEPS: [u64; 4] = [0, 1, 1_000_000, 1_000_000_000];

/// Parameter sets of the harness (each valid; the ones with 8 KiB chunks on 4 KiB io sizes and
/// 1 MiB CBT blocks reach other layout corners than `Params::small`).
pub fn params_variant(i: usize) -> Params {
    let s = Params::small();
    match i % 4 {
        0 => s,
        1 => Params { chunk_minimum_shift: 13, diff_storage_minimum_sectors: 32, ..s },
        2 => Params { tracking_block_minimum_shift: 9, tracking_block_maximum_count: 16, ..s },
        _ => Params { chunk_minimum_shift: 15, chunk_maximum_shift: 15, ..s },
    }
}

/// Number of op variants.
pub const OP_VARIANTS: u8 = 25;

fn ranges(r: &mut Rd, small_offset: u8, small_count: u8) -> Vec<SectorRange> {
    let n = r.below(5);
    (0..n)
        .map(|_| {
            let offset = r.small_or_edge(small_offset, &RANGE_EDGES);
            let count = r.small_or_edge(small_count, &RANGE_EDGES);
            SectorRange::new(offset, count)
        })
        .collect()
}

fn storage(r: &mut Rd) -> StorageKind {
    let b = r.u8();
    if b % 3 == 0 {
        StorageKind::Ranges
    } else {
        StorageKind::File {
            initial_sectors: r.pick(&STORAGE_INITIAL),
            limit_sectors: r.pick(&STORAGE_LIMIT),
            growable: b % 5 != 0,
        }
    }
}

/// Decodes one op (variant byte, then fields).
pub fn op(r: &mut Rd) -> Op {
    let disk = |r: &mut Rd| usize::from(r.u8() % 4);
    let snap = |r: &mut Rd| usize::from(r.u8() % 8);
    let sector = |r: &mut Rd| r.small_or_edge(240, &SECTOR_EDGES);
    let io_len = |r: &mut Rd| r.small_or_edge(65, &LEN_EDGES);
    match r.u8() % OP_VARIANTS {
        0 => Op::Attach { disk: disk(r) },
        1 => Op::Detach { disk: disk(r) },
        2 => Op::CbtInfo { disk: disk(r) },
        3 => Op::CbtMap {
            disk: disk(r),
            offset: r.small_or_edge(200, &MAP_EDGES) as u32,
            length: r.small_or_edge(200, &MAP_EDGES) as u32,
        },
        4 => Op::CbtDirty { disk: disk(r), ranges: ranges(r, 240, 40) },
        5 => Op::Create { storage: storage(r) },
        6 => Op::Destroy { snap: snap(r) },
        7 => Op::Append {
            snap: snap(r),
            backend: usize::from(r.u8() % 2),
            ranges: ranges(r, 250, 250),
        },
        8 => Op::Add { snap: snap(r), disk: disk(r) },
        9 => Op::Take { snap: snap(r) },
        10 => Op::Collect,
        11 => Op::Info { disk: disk(r) },
        12 => Op::WaitEvent { snap: snap(r), timeout_ms: r.pick(&TIMEOUTS) },
        13 => Op::Read { disk: disk(r), sector: sector(r), sectors: io_len(r) },
        14 | 15 => Op::Write { disk: disk(r), sector: sector(r), sectors: io_len(r), seed: r.u8() },
        16 => Op::Discard {
            disk: disk(r),
            sector: sector(r),
            sectors: r.small_or_edge(65, &SECTOR_EDGES),
        },
        17 => Op::WriteZeroes {
            disk: disk(r),
            sector: sector(r),
            sectors: r.small_or_edge(65, &SECTOR_EDGES),
        },
        18 => Op::ImageRead { disk: disk(r), sector: sector(r), sectors: io_len(r) },
        19 => Op::ImageWrite { disk: disk(r), sector: sector(r), sectors: io_len(r), seed: r.u8() },
        20 => {
            let t = r.u8();
            let target = (t % 4 != 3).then_some(usize::from(t % 4));
            let kind = if r.u8() % 2 == 0 { IoKind::Read } else { IoKind::Write };
            Op::Fault { target, kind, errno: r.pick(&FAULT_ERRNO) }
        }
        21 => {
            let t = r.u8();
            let target = (t % 4 != 3).then_some(usize::from(t % 4));
            let sectors_written = r.small_or_edge(40, &[u64::MAX, 1 << 20, 64]);
            Op::TornFault { target, sectors_written, errno: r.pick(&FAULT_ERRNO) }
        }
        22 => {
            if r.u8() % 2 == 0 {
                Op::FailGrowth { errno: r.pick(&FAULT_ERRNO) }
            } else {
                Op::SetStorageMinimum { sectors: r.pick(&MINIMUMS) }
            }
        }
        23 => Op::AdvanceClock { ns: r.pick(&CLOCK_STEPS) },
        _ => Op::ImageWriteZeroes { disk: disk(r), sector: sector(r), sectors: io_len(r) },
    }
}

/// A decoded `ops_vs_model` input.
#[derive(Debug)]
pub struct OpsInput {
    /// `(sectors, io_min_sectors)` of 1–3 disks.
    pub disks: Vec<(u64, u64)>,
    /// Harness parameters.
    pub params: Params,
    /// Id seed.
    pub seed: u64,
    /// The operations.
    pub ops: Vec<Op>,
}

/// Most operations per input (keeps exec/s up; longer inputs are cut).
pub const MAX_OPS: usize = 64;

/// Header: disk count byte, then (size, io_min) bytes per disk, a params byte, a seed byte;
/// then ops until the input ends.
pub fn ops_input(u: &mut Unstructured) -> OpsInput {
    let mut r = Rd(u);
    let n = 1 + r.below(3);
    let disks = (0..n).map(|_| (r.pick(&DISK_SECTORS), r.pick(&IO_MIN))).collect();
    let params = params_variant(r.below(4));
    let seed = u64::from(r.u8());
    let mut ops = Vec::new();
    while r.more() && ops.len() < MAX_OPS {
        ops.push(op(&mut r));
    }
    OpsInput { disks, params, seed, ops }
}

/// Seed encoders for `ops_vs_model` (only in-range values: sectors < 240, lengths < 65).
pub mod ops_enc {
    use super::Enc;

    /// Header: disks as indices into `DISK_SECTORS` / `IO_MIN`, a params variant, a seed.
    pub fn header(disks: &[(u8, u8)], params: u8, seed: u8) -> Enc {
        let mut e = Enc::default();
        e.u8(disks.len() as u8 - 1);
        for (s, m) in disks {
            e.u8(*s).u8(*m);
        }
        e.u8(params).u8(seed);
        e
    }
    /// Attach disk.
    pub fn attach(e: &mut Enc, disk: u8) {
        e.u8(0).u8(disk);
    }
    /// Ranges storage (`true`) or a growable file (initial index, limit index).
    pub fn create(e: &mut Enc, ranges: bool, initial: u8, limit: u8) {
        e.u8(5);
        if ranges {
            e.u8(0);
        } else {
            e.u8(1).u8(initial).u8(limit);
        }
    }
    /// Append one range to a snapshot's backend.
    pub fn append(e: &mut Enc, snap: u8, backend: u8, offset: u8, count: u8) {
        e.u8(7).u8(snap).u8(backend).u8(1).u8(offset).u8(count);
    }
    /// Add disk to snapshot.
    pub fn add(e: &mut Enc, snap: u8, disk: u8) {
        e.u8(8).u8(snap).u8(disk);
    }
    /// Take.
    pub fn take(e: &mut Enc, snap: u8) {
        e.u8(9).u8(snap);
    }
    /// Origin write.
    pub fn write(e: &mut Enc, disk: u8, sector: u8, sectors: u8, seed: u8) {
        e.u8(14).u8(disk).u8(sector).u8(sectors).u8(seed);
    }
    /// Image read.
    pub fn image_read(e: &mut Enc, disk: u8, sector: u8, sectors: u8) {
        e.u8(18).u8(disk).u8(sector).u8(sectors);
    }
    /// Image write.
    pub fn image_write(e: &mut Enc, disk: u8, sector: u8, sectors: u8, seed: u8) {
        e.u8(19).u8(disk).u8(sector).u8(sectors).u8(seed);
    }
    /// cbtdirty of one range.
    pub fn cbt_dirty(e: &mut Enc, disk: u8, offset: u8, count: u8) {
        e.u8(4).u8(disk).u8(1).u8(offset).u8(count);
    }
    /// cbtmap.
    pub fn cbt_map(e: &mut Enc, disk: u8, offset: u8, length: u8) {
        e.u8(3).u8(disk).u8(offset).u8(length);
    }
    /// A storage write fault.
    pub fn storage_fault(e: &mut Enc) {
        e.u8(20).u8(3).u8(1).u8(0);
    }
    /// Wait for an event (timeout index).
    pub fn wait(e: &mut Enc, snap: u8) {
        e.u8(12).u8(snap).u8(0);
    }
    /// Destroy.
    pub fn destroy(e: &mut Enc, snap: u8) {
        e.u8(6).u8(snap);
    }
}

/// The files a control-socket target's daemon serves from, in a directory of its own per process
/// (`blksnap-fuzz-NAME-PID`, with a `links` subdirectory for symlinks): two origin backings, a
/// storage file and a spare backing.
pub struct FileEnv {
    /// The directory.
    pub dir: PathBuf,
    /// The origins' backings.
    pub origins: [PathBuf; 2],
    /// The storage file.
    pub storage: PathBuf,
    /// A backing no origin uses at the start.
    pub spare: PathBuf,
}

impl FileEnv {
    /// Makes the directory (the files are made by [`reset_file`]).
    pub fn new(name: &str) -> FileEnv {
        let dir = std::env::temp_dir().join(format!("blksnap-fuzz-{name}-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("links")).unwrap();
        FileEnv {
            origins: [dir.join("b0.img"), dir.join("b1.img")],
            storage: dir.join("storage.img"),
            spare: dir.join("b2.img"),
            dir,
        }
    }
}

/// `path` as a file of `len` zero bytes (created or truncated).
pub fn reset_file(path: &Path, len: u64) {
    let f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(path).unwrap();
    f.set_len(len).unwrap();
}
