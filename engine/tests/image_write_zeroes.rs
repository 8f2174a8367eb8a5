//! `Engine::image_write_zeroes` (an image's discard / write-zeroes) against `image_write` of a
//! zero buffer: the same image, CBT, storage accounting and errors, on memory devices; and the
//! I/O it does — no origin read and only `write_zeroes_at` on the storage for chunks the range
//! covers wholly, the copy of the origin for partly covered ones.

use std::sync::Mutex;

use blksnap_engine::io::{BlockDev, Dev, Fault, FaultDev, FaultPlan, MemDev};
use blksnap_engine::sync::StdArc;
use blksnap_engine::{Clock, Engine, EngineConfig, StorageSpec};
use blksnap_model::{DeviceId, Errno, IoKind, Params, Result};

const KIB: u64 = 1024;
/// `Params::small()`: 4 KiB chunks and 4 KiB CBT blocks on these devices.
const CHUNK: u64 = 4 * KIB;
const DISK_BYTES: u64 = 64 * KIB;
const D0: DeviceId = DeviceId::new(7, 0);

/// What reached a device, in order: (op, offset, length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Io {
    Read(u64, u64),
    Write(u64, u64),
    Zeroes(u64, u64),
}

struct Logged {
    inner: Dev,
    log: Mutex<Vec<Io>>,
}

impl Logged {
    fn new(inner: Dev) -> StdArc<Logged> {
        StdArc::new(Logged { inner, log: Mutex::new(Vec::new()) })
    }
    fn take(&self) -> Vec<Io> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl BlockDev for Logged {
    fn len_bytes(&self) -> u64 {
        self.inner.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<()> {
        self.log.lock().unwrap().push(Io::Read(offset_bytes, buf.len() as u64));
        self.inner.read_at(buf, offset_bytes)
    }
    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> Result<()> {
        self.log.lock().unwrap().push(Io::Write(offset_bytes, buf.len() as u64));
        self.inner.write_at(buf, offset_bytes)
    }
    fn write_zeroes_at(&self, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        self.log.lock().unwrap().push(Io::Zeroes(offset_bytes, len_bytes));
        self.inner.write_zeroes_at(offset_bytes, len_bytes)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn can_grow(&self) -> bool {
        self.inner.can_grow()
    }
    fn set_len(&self, len_bytes: u64) -> Result<()> {
        self.inner.set_len(len_bytes)
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect()
}

/// An engine with one taken 64 KiB disk (pattern 1), its origin and storage logged; the
/// storage is a growable file-mode memory device behind a fault plan.
struct Setup {
    e: Engine,
    origin: StdArc<Logged>,
    storage: StdArc<Logged>,
    plan: StdArc<FaultPlan>,
}

fn setup() -> Setup {
    let e = Engine::new(EngineConfig::new(Params::small(), Some(1), Clock::manual(true))).unwrap();
    // Filled behind the tracker's back, so that the CBT starts clean.
    let mem = MemDev::new(DISK_BYTES);
    mem.write_at(&pattern(DISK_BYTES as usize, 1), 0).unwrap();
    let origin = Logged::new(StdArc::new(mem));
    e.add_disk(D0, origin.clone(), 1).unwrap();
    e.attach(D0).unwrap();
    let plan = FaultPlan::shared();
    let storage = Logged::new(StdArc::new(MemDev::growable(0, 1 << 24)));
    let faulty: Dev = StdArc::new(FaultDev::new(storage.clone(), plan.clone()));
    let id =
        e.snapshot_create(StorageSpec::File { backend: faulty, limit_sectors: 1 << 14 }).unwrap();
    e.snapshot_add(id, D0).unwrap();
    e.snapshot_take(id).unwrap();
    origin.take();
    storage.take();
    Setup { e, origin, storage, plan }
}

fn image(e: &Engine) -> Vec<u8> {
    let mut b = vec![0; DISK_BYTES as usize];
    e.image_read(D0, 0, &mut b).unwrap();
    b
}

fn origin(e: &Engine) -> Vec<u8> {
    let mut b = vec![0; DISK_BYTES as usize];
    e.read(D0, 0, &mut b).unwrap();
    b
}

fn cbt(e: &Engine) -> Vec<u8> {
    let mut map = Vec::new();
    e.cbt_map(D0, 0, e.cbt_info(D0).unwrap().block_count, &mut map).unwrap();
    map
}

/// Everything observable, for comparing the two ways of zeroing.
fn state(s: &Setup) -> (Vec<u8>, Vec<u8>, Vec<u8>, i32, Vec<u64>) {
    let stats = s.e.storage_stats(s.e.snapshot_collect()[0]).unwrap();
    (
        image(&s.e),
        origin(&s.e),
        cbt(&s.e),
        s.e.snapshot_info(D0).unwrap().error_code,
        vec![stats.filled_sectors, stats.capacity_sectors],
    )
}

/// Stores chunks 3 (by an image write) and 5 (by copy-on-write) before any zeroing.
fn store_some(s: &Setup) {
    s.e.image_write(D0, 3 * CHUNK, &[0xab; CHUNK as usize]).unwrap();
    s.e.write(D0, 5 * CHUNK + 512, &[0xcd; 512]).unwrap();
    s.origin.take();
    s.storage.take();
}

#[test]
fn zeroing_partial_and_whole_chunks_reads_zero_and_matches_a_zero_write() {
    let (a, b) = (setup(), setup());
    store_some(&a);
    store_some(&b);
    let origin_before = origin(&a.e);
    let cbt_before = cbt(&a.e);
    // 2 KiB .. 25 KiB: chunk 0 partly (New), 1..=5 wholly (3 and 5 stored), 6 partly (New).
    let (off, len) = (2 * KIB, 23 * KIB);
    let _ = (a.origin.take(), a.storage.take());
    a.e.image_write_zeroes(D0, off, len).unwrap();
    let (origin_io, storage_io) = (a.origin.take(), a.storage.take());
    b.e.image_write(D0, off, &vec![0; len as usize]).unwrap();
    assert_eq!(state(&a), state(&b), "the same as image_write of zeroes");
    let img = image(&a.e);
    let before = pattern(DISK_BYTES as usize, 1);
    assert_eq!(img[..2 * KIB as usize], before[..2 * KIB as usize]);
    assert!(img[off as usize..(off + len) as usize].iter().all(|x| *x == 0));
    assert_eq!(img[(off + len) as usize..], before[(off + len) as usize..]);
    assert_eq!(origin(&a.e), origin_before, "the origin is untouched");
    let marked: Vec<usize> =
        (0..cbt_before.len()).filter(|&i| cbt(&a.e)[i] != cbt_before[i]).collect();
    // The read map: block 3 had its image write; 5 only an origin write (write map only).
    assert_eq!(marked, [0, 1, 2, 4, 5, 6], "CBT blocks 0..=6 marked in the read map");

    // The I/O: the partly covered chunks are copied from the origin (one read each) and stored
    // with one write; the wholly covered ones are never read and only zeroed in the storage.
    assert_eq!(origin_io, [Io::Read(0, CHUNK), Io::Read(6 * CHUNK, CHUNK)]);
    let writes = storage_io.iter().filter(|io| matches!(io, Io::Write(..))).count();
    let zeroes: Vec<u64> = storage_io
        .iter()
        .filter_map(|io| match io {
            Io::Zeroes(_, n) => Some(*n),
            _ => None,
        })
        .collect();
    assert_eq!(writes, 2, "{storage_io:?}");
    assert_eq!(zeroes, [CHUNK; 5], "{storage_io:?}");
    assert!(!storage_io.iter().any(|io| matches!(io, Io::Read(..))), "{storage_io:?}");

    // A stored chunk zeroed in part: only that part of its storage range.
    let _ = (a.origin.take(), a.storage.take());
    a.e.image_write_zeroes(D0, 6 * CHUNK + 512, 1024).unwrap();
    let (origin_io, storage_io) = (a.origin.take(), a.storage.take());
    b.e.image_write(D0, 6 * CHUNK + 512, &[0; 1024]).unwrap();
    assert_eq!(state(&a), state(&b));
    assert_eq!(
        storage_io.as_slice(),
        [Io::Zeroes(6 * CHUNK + 512, 1024)],
        "chunk 6 went to storage offset 24 KiB (chunks 3, 5, 0, 1, 2, 4 before it)"
    );
    assert!(origin_io.is_empty());
    // Zero length: nothing at all, not even CBT.
    let cbt_now = cbt(&a.e);
    let _ = (a.storage.take(), a.origin.take());
    a.e.image_write_zeroes(D0, 8 * CHUNK, 0).unwrap();
    assert!(a.storage.take().is_empty() && a.origin.take().is_empty());
    assert_eq!(cbt(&a.e), cbt_now);
}

#[test]
fn errors_match_a_zero_write() {
    let (a, b) = (setup(), setup());
    // Range checks first: no image, unaligned, past the end.
    let e = |r: Result<()>| r.unwrap_err().errno;
    assert_eq!(e(a.e.image_write_zeroes(DeviceId::new(7, 9), 0, 512)), Errno::ENODEV);
    for (off, len) in [(1, 512), (0, 100), (DISK_BYTES - 512, 1024), (u64::MAX - 511, 1024)] {
        let want = e(b.e.image_write(D0, off, &vec![0; len as usize]));
        assert_eq!(want, Errno::EINVAL);
        assert_eq!(e(a.e.image_write_zeroes(D0, off, len)), want, "{off} {len}");
    }
    assert_eq!(e(a.e.image_write_zeroes(D0, 0, u64::MAX - 511)), Errno::EINVAL, "huge");
    // A storage failure on a wholly covered chunk corrupts the area with its errno; later
    // requests are EIO, the origin is still served.
    for s in [&a, &b] {
        s.plan.fail_next(IoKind::Write, Fault::Error(Errno::ENOSPC));
    }
    assert_eq!(e(a.e.image_write_zeroes(D0, 0, 2 * CHUNK)), Errno::EIO);
    assert_eq!(e(b.e.image_write(D0, 0, &[0; 2 * CHUNK as usize])), Errno::EIO);
    assert_eq!(a.e.snapshot_info(D0).unwrap().error_code, -Errno::ENOSPC.code());
    assert_eq!(
        a.e.snapshot_info(D0).unwrap().error_code,
        b.e.snapshot_info(D0).unwrap().error_code
    );
    assert_eq!(e(a.e.image_write_zeroes(D0, 0, CHUNK)), Errno::EIO);
    assert_eq!(cbt(&a.e), cbt(&b.e));
    a.e.write(D0, 0, &[1; 512]).unwrap();
}

#[test]
fn a_torn_zeroing_fails_like_a_torn_write() {
    let (a, b) = (setup(), setup());
    for s in [&a, &b] {
        s.plan.fail_next(IoKind::Write, Fault::Torn { sectors_written: 3, errno: Errno::EIO });
    }
    let r = a.e.image_write_zeroes(D0, CHUNK, CHUNK).unwrap_err().errno;
    assert_eq!(r, b.e.image_write(D0, CHUNK, &[0; CHUNK as usize]).unwrap_err().errno);
    assert_eq!(
        a.e.snapshot_info(D0).unwrap().error_code,
        b.e.snapshot_info(D0).unwrap().error_code
    );
    assert!(a.e.snapshot_info(D0).unwrap().error_code < 0);
}
