//! [`BackingDev`]: how the daemon reads and writes an origin's backing and a difference storage
//! (the engine's [`BlockDev`] for both; a storage file also grows), with what the engine's
//! portable [`FileDev`] cannot do without new dependencies:
//! * **direct I/O** (`O_DIRECT`, default for block devices, `backing_direct_io` and
//!   `storage_direct_io` in the config):
//!   data is not cached twice (the daemon's page cache and the guest's), a completed write has
//!   reached the device (its volatile cache: flush/FUA still send a flush), reads are the
//!   device's speed, not page-cache hits. Requests whose offset and length are multiples of the
//!   device's logical block size go direct — from the caller's buffer when it is aligned (ublk's
//!   per-tag buffers are page aligned), else through an aligned bounce buffer; anything else
//!   (a 512-byte write to a 4 KiB-sector device) goes through a second, buffered descriptor of
//!   the same file, which the kernel keeps coherent with direct I/O (a direct write writes back
//!   and invalidates the cached pages of its range, a direct read writes dirty ones back first).
//! * **real discard**: discard and write-zeroes (the engine's `write_zeroes_at`, after its
//!   copy-on-write and change tracking, exactly as for a write) punch a hole
//!   (`fallocate(PUNCH_HOLE | KEEP_SIZE)`: a file stays sparse; on a block device the kernel
//!   zeroes with unmap where the device can), else zero the range (`FALLOC_FL_ZERO_RANGE`; on a
//!   block device `BLKZEROOUT`), else write zeroes — the fallback reported once per backing.
//!   `BLKDISCARD` is not used: a discarded range must read as zeroes (the model's discard), which
//!   a plain discard does not promise. On a difference storage the same zeroing serves an
//!   image's discard of whole chunks (`Engine::image_write_zeroes`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU8, Ordering};

use blksnap_engine::io::{BlockDev, FileDev};
use blksnap_model::{Errno, Error, Result};

/// `BLKZEROOUT` = `_IO(0x12, 127)` (linux/fs.h; not in the libc crate).
const BLKZEROOUT: libc::c_ulong = 0x127f;
/// Largest zero buffer the write-zeroes fallback writes at once.
const ZERO_STEP_BYTES: u64 = 1 << 20;
/// Buffer address alignment direct I/O gets (the page size covers every logical block size).
const DIRECT_ALIGN_BYTES: usize = 4096;
/// The bounce buffer's size (larger unaligned requests go in steps): one per thread, kept for
/// the thread's life, so a copy-on-write's chunk read (256 KiB by default, into the engine's
/// unaligned buffer) does not map and fault in fresh pages every time.
const BOUNCE_STEP_BYTES: usize = 256 << 10;

thread_local! {
    static BOUNCE: std::cell::RefCell<Option<Aligned>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with this thread's bounce buffer (made on first use).
fn with_bounce<T>(f: impl FnOnce(&mut Aligned) -> Result<T>) -> Result<T> {
    BOUNCE.with(|b| {
        let mut b = b.borrow_mut();
        if b.is_none() {
            *b = Some(Aligned::new(BOUNCE_STEP_BYTES)?);
        }
        match b.as_mut() {
            Some(a) => f(a),
            None => Err(Error::new(Errno::ENOMEM, "no bounce buffer")),
        }
    })
}

/// Whether the backing is opened for direct I/O (config `backing_direct_io`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirectIo {
    /// Block devices yes, regular files no (a file's page cache is often what its user wants).
    #[default]
    Auto,
    /// Files too.
    Always,
    /// Never (buffered, as before).
    Never,
}

/// How zeroing is done, learnt at the first refusal (each step only ever moves down).
const ZERO_PUNCH: u8 = 0;
const ZERO_RANGE: u8 = 1;
const ZERO_WRITE: u8 = 2;

/// An origin's backing. See the module documentation.
#[derive(Debug)]
pub struct BackingDev {
    /// The buffered descriptor (unaligned I/O, flush, zeroing).
    buffered: FileDev,
    /// The `O_DIRECT` descriptor of the same file, and its alignment (logical block size).
    direct: Option<(File, u64)>,
    block_device: bool,
    zeroing: AtomicU8,
}

fn errno_err(errno: i32, detail: &'static str) -> Error {
    Error::new(Errno::from_code(errno).unwrap_or(Errno::EIO), detail)
}

/// A zeroed buffer aligned for direct I/O.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Result<Aligned> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), DIRECT_ALIGN_BYTES)
            .map_err(|_| Error::new(Errno::EINVAL, "bounce buffer size"))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(Error::new(Errno::ENOMEM, "no memory for a bounce buffer"));
        }
        Ok(Aligned { ptr, layout })
    }

    fn slice(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: `ptr` is a live allocation of `layout.size() >= len` bytes, initialised
        // (zeroed), borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len.min(self.layout.size())) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// The logical block size of a block device (`BLKSSZGET`), 4096 for a regular file (what the
/// common filesystems need for direct I/O at most).
fn logical_block_bytes(file: &File, block_device: bool) -> u64 {
    if !block_device {
        return 4096;
    }
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the valid pointer.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size) };
    if rc == 0 && size > 0 {
        size as u64
    } else {
        4096
    }
}

impl BackingDev {
    /// Wraps an open backing; opens an `O_DIRECT` descriptor of the same file as `direct`
    /// says (through `/proc/self/fd`, so it is the very file opened, not what its path names
    /// now). A filesystem that refuses `O_DIRECT` (tmpfs) keeps the buffered path, said once.
    pub fn new(file: File, direct: DirectIo, name: &str) -> Result<BackingDev> {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let meta = file.metadata().map_err(|_| Error::new(Errno::EIO, "stat of the backing"))?;
        let block_device = meta.file_type().is_block_device();
        let want = match direct {
            DirectIo::Auto => block_device,
            DirectIo::Always => true,
            DirectIo::Never => false,
        };
        let direct = if want {
            let align = logical_block_bytes(&file, block_device);
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            {
                Ok(f) => Some((f, align)),
                Err(e) => {
                    eprintln!("blksnapd: {name}: no direct I/O ({e}): buffered");
                    None
                }
            }
        } else {
            None
        };
        Ok(BackingDev {
            buffered: FileDev::from_file(file)?,
            direct,
            block_device,
            zeroing: AtomicU8::new(ZERO_PUNCH),
        })
    }

    /// Whether reads and writes go direct (`O_DIRECT`).
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The direct descriptor when this range may use it.
    fn direct_for(&self, offset_bytes: u64, len_bytes: usize) -> Option<&File> {
        let (f, align) = self.direct.as_ref()?;
        (offset_bytes.is_multiple_of(*align)
            && (len_bytes as u64).is_multiple_of(*align)
            && len_bytes > 0)
            .then_some(f)
    }

    /// The direct descriptor for a read of `len_bytes` at `offset_bytes` into `buf_addr` that
    /// another party (a ublk queue's io_uring) may issue itself, exactly as [`Self::read_at`]
    /// would: inside the backing, the range a multiple of its logical block size, the buffer
    /// page aligned. None: use `read_at`.
    pub fn direct_fd(
        &self,
        offset_bytes: u64,
        len_bytes: usize,
        buf_addr: usize,
    ) -> Option<std::os::fd::RawFd> {
        self.check(offset_bytes, len_bytes as u64).ok()?;
        let f = self.direct_for(offset_bytes, len_bytes)?;
        buf_addr.is_multiple_of(DIRECT_ALIGN_BYTES).then(|| f.as_raw_fd())
    }

    fn check(&self, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        match offset_bytes.checked_add(len_bytes) {
            Some(end) if end <= self.len_bytes() => Ok(()),
            _ => Err(Error::new(Errno::EIO, "backing: I/O past the end")),
        }
    }

    /// `fallocate(mode)` of the range; Err(errno) as the kernel said.
    fn fallocate(
        &self,
        mode: libc::c_int,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> std::result::Result<(), i32> {
        let fd = self.buffered.file().as_raw_fd();
        loop {
            // SAFETY: fallocate on a descriptor we own, plain integer arguments.
            let rc = unsafe { libc::fallocate(fd, mode, offset_bytes as i64, len_bytes as i64) };
            if rc == 0 {
                return Ok(());
            }
            match std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO) {
                libc::EINTR => {}
                e => return Err(e),
            }
        }
    }

    /// `BLKZEROOUT` of the range (block devices).
    fn blkzeroout(&self, offset_bytes: u64, len_bytes: u64) -> std::result::Result<(), i32> {
        let range: [u64; 2] = [offset_bytes, len_bytes];
        // SAFETY: BLKZEROOUT reads two u64 through the valid pointer.
        let rc = unsafe { libc::ioctl(self.buffered.file().as_raw_fd(), BLKZEROOUT, &range) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
        }
    }

    fn write_zero_steps(&self, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        let zeroes = vec![0u8; len_bytes.min(ZERO_STEP_BYTES) as usize];
        let mut done = 0;
        while done < len_bytes {
            let step = (len_bytes - done).min(ZERO_STEP_BYTES) as usize;
            self.write_at(&zeroes[..step], offset_bytes + done)?;
            done += step as u64;
        }
        Ok(())
    }

    /// Moves zeroing one step down after a refusal, saying so once.
    fn degrade(&self, from: u8, to: u8, errno: i32) {
        if self.zeroing.compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            let how = if to == ZERO_RANGE { "zeroing ranges" } else { "writing zeroes" };
            eprintln!(
                "blksnapd: the backing cannot {} (errno {errno}): discard and write-zeroes fall \
                 back to {how}",
                if from == ZERO_PUNCH { "punch holes" } else { "zero ranges" }
            );
        }
    }
}

/// Whether an errno means "this file or device cannot do that operation".
fn unsupported(errno: i32) -> bool {
    matches!(errno, libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL | libc::ENOSYS)
}

fn direct_read(f: &File, buf: &mut [u8], offset_bytes: u64) -> Result<()> {
    f.read_exact_at(buf, offset_bytes).map_err(|e| {
        Error::new(
            e.raw_os_error().and_then(Errno::from_code).unwrap_or(Errno::EIO),
            "backing: direct read",
        )
    })
}

fn direct_write(f: &File, buf: &[u8], offset_bytes: u64) -> Result<()> {
    f.write_all_at(buf, offset_bytes).map_err(|e| {
        Error::new(
            e.raw_os_error().and_then(Errno::from_code).unwrap_or(Errno::EIO),
            "backing: direct write",
        )
    })
}

fn aligned(buf: &[u8]) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN_BYTES)
}

impl BlockDev for BackingDev {
    fn len_bytes(&self) -> u64 {
        self.buffered.len_bytes()
    }

    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<()> {
        self.check(offset_bytes, buf.len() as u64)?;
        let Some(f) = self.direct_for(offset_bytes, buf.len()) else {
            return self.buffered.read_at(buf, offset_bytes);
        };
        if aligned(buf) {
            return direct_read(f, buf, offset_bytes);
        }
        with_bounce(|bounce| {
            for (i, part) in buf.chunks_mut(BOUNCE_STEP_BYTES).enumerate() {
                let b = bounce.slice(part.len());
                direct_read(f, b, offset_bytes + (i * BOUNCE_STEP_BYTES) as u64)?;
                part.copy_from_slice(b);
            }
            Ok(())
        })
    }

    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> Result<()> {
        self.check(offset_bytes, buf.len() as u64)?;
        let Some(f) = self.direct_for(offset_bytes, buf.len()) else {
            return self.buffered.write_at(buf, offset_bytes);
        };
        if aligned(buf) {
            return direct_write(f, buf, offset_bytes);
        }
        with_bounce(|bounce| {
            for (i, part) in buf.chunks(BOUNCE_STEP_BYTES).enumerate() {
                let b = bounce.slice(part.len());
                b.copy_from_slice(part);
                direct_write(f, b, offset_bytes + (i * BOUNCE_STEP_BYTES) as u64)?;
            }
            Ok(())
        })
    }

    /// A hole, else a zeroed range, else written zeroes (see the module documentation).
    fn write_zeroes_at(&self, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        self.check(offset_bytes, len_bytes)?;
        if len_bytes == 0 {
            return Ok(());
        }
        if self.zeroing.load(Ordering::Acquire) == ZERO_PUNCH {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            match self.fallocate(mode, offset_bytes, len_bytes) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(e) => self.degrade(ZERO_PUNCH, ZERO_RANGE, e),
                Err(e) => return Err(errno_err(e, "backing: punching a hole failed")),
            }
        }
        if self.zeroing.load(Ordering::Acquire) == ZERO_RANGE {
            let r = if self.block_device {
                self.blkzeroout(offset_bytes, len_bytes)
            } else {
                self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset_bytes, len_bytes)
            };
            match r {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(e) => self.degrade(ZERO_RANGE, ZERO_WRITE, e),
                Err(e) => return Err(errno_err(e, "backing: zeroing a range failed")),
            }
        }
        self.write_zero_steps(offset_bytes, len_bytes)
    }

    /// `fdatasync` (on a block device also a flush of its volatile cache): covers the direct
    /// descriptor's writes too (same file).
    fn flush(&self) -> Result<()> {
        self.buffered.flush()
    }

    /// A regular file grows (a difference storage does); a block device does not.
    fn can_grow(&self) -> bool {
        self.buffered.can_grow()
    }

    /// `ftruncate` of the file (the direct descriptor is the same file: it sees the new size).
    fn set_len(&self, len_bytes: u64) -> Result<()> {
        self.buffered.set_len(len_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const MIB: u64 = 1 << 20;

    fn backing(len_bytes: u64, direct: DirectIo) -> (tempfile::NamedTempFile, BackingDev) {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(len_bytes).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(tmp.path()).unwrap();
        let dev = BackingDev::new(file, direct, "test").unwrap();
        (tmp, dev)
    }

    fn allocated(tmp: &tempfile::NamedTempFile) -> u64 {
        tmp.as_file().metadata().unwrap().blocks() * 512
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)).collect()
    }

    #[test]
    fn discard_punches_a_hole_and_reads_zeroes() {
        let (tmp, dev) = backing(64 * MIB, DirectIo::Never);
        dev.write_at(&pattern(16 * MIB as usize, 1), 0).unwrap();
        dev.flush().unwrap();
        let written = allocated(&tmp);
        assert!(written >= 16 * MIB, "{written}");
        dev.write_zeroes_at(4096, 16 * MIB - 8192).unwrap();
        let after = allocated(&tmp);
        println!("allocated: {written} bytes after the write, {after} after the discard");
        assert!(after <= 2 * 4096 + 64 * 1024, "the hole was not punched: {after} bytes");
        let mut all = vec![0xAAu8; 16 * MIB as usize];
        dev.read_at(&mut all, 0).unwrap();
        let p = pattern(16 * MIB as usize, 1);
        assert_eq!(all[..4096], p[..4096]);
        assert!(all[4096..16 * MIB as usize - 4096].iter().all(|b| *b == 0));
        assert_eq!(all[16 * MIB as usize - 4096..], p[16 * MIB as usize - 4096..]);
        assert_eq!(tmp.as_file().metadata().unwrap().len(), 64 * MIB, "KEEP_SIZE");
    }

    #[test]
    fn zeroing_fallbacks_still_zero() {
        for how in [ZERO_RANGE, ZERO_WRITE] {
            let (_tmp, dev) = backing(8 * MIB, DirectIo::Never);
            dev.zeroing.store(how, Ordering::Release);
            dev.write_at(&pattern(4 * MIB as usize, 3), 0).unwrap();
            dev.write_zeroes_at(512, 3 * MIB).unwrap();
            let mut all = vec![0xAAu8; 4 * MIB as usize];
            dev.read_at(&mut all, 0).unwrap();
            let p = pattern(4 * MIB as usize, 3);
            assert_eq!(all[..512], p[..512], "mode {how}");
            assert!(all[512..512 + 3 * MIB as usize].iter().all(|b| *b == 0), "mode {how}");
            assert_eq!(all[512 + 3 * MIB as usize..], p[512 + 3 * MIB as usize..], "mode {how}");
        }
    }

    #[test]
    fn past_the_end_is_eio() {
        let (_tmp, dev) = backing(MIB, DirectIo::Always);
        assert_eq!(dev.read_at(&mut [0u8; 4096], MIB).unwrap_err().errno, Errno::EIO);
        assert_eq!(dev.write_at(&[0u8; 512], MIB - 256).unwrap_err().errno, Errno::EIO);
        assert_eq!(dev.write_zeroes_at(0, MIB + 1).unwrap_err().errno, Errno::EIO);
        assert_eq!(dev.write_zeroes_at(u64::MAX, 2).unwrap_err().errno, Errno::EIO);
    }

    /// Direct I/O where the filesystem allows it (the temp dir; tmpfs refuses O_DIRECT and the
    /// backing stays buffered): aligned, unaligned buffers (bounce), unaligned ranges
    /// (buffered descriptor) and mixing them all read back what was written; flush works.
    #[test]
    fn direct_io_round_trips_aligned_and_not() {
        let (_tmp, dev) = backing(8 * MIB, DirectIo::Always);
        println!("direct: {}", dev.is_direct());
        // page-aligned buffer (as ublk's), aligned range: straight from the buffer
        let mut a = Aligned::new(64 * 1024).unwrap();
        a.slice(64 * 1024).copy_from_slice(&pattern(64 * 1024, 5));
        dev.write_at(a.slice(64 * 1024), 128 * 1024).unwrap();
        // unaligned buffer, aligned range: bounce, more than one bounce step
        let big = pattern(BOUNCE_STEP_BYTES + 8192, 9);
        let unaligned = &big[..]; // a Vec's address is rarely page aligned; both paths agree
        dev.write_at(unaligned, MIB).unwrap();
        // unaligned range: the buffered descriptor, coherent with the direct one
        dev.write_at(&pattern(1000, 11), 3 * MIB + 512).unwrap();
        dev.flush().unwrap();
        let mut back = vec![0u8; 64 * 1024];
        dev.read_at(&mut back, 128 * 1024).unwrap();
        assert_eq!(back, pattern(64 * 1024, 5));
        let mut back = vec![0u8; big.len()];
        dev.read_at(&mut back, MIB).unwrap();
        assert_eq!(back, big);
        let mut page = Aligned::new(4096).unwrap();
        dev.read_at(page.slice(4096), 3 * MIB).unwrap();
        let p = page.slice(4096);
        assert!(p[..512].iter().all(|b| *b == 0));
        assert_eq!(p[512..1512], pattern(1000, 11)[..]);
        assert!(p[1512..].iter().all(|b| *b == 0));
        // a direct write after a buffered one of the same range wins, and vice versa
        dev.write_at(&pattern(4096, 13), 5 * MIB + 100).unwrap();
        dev.write_at(&pattern(8192, 17), 5 * MIB).unwrap();
        let mut back = vec![0u8; 8192];
        dev.read_at(&mut back, 5 * MIB).unwrap();
        assert_eq!(back, pattern(8192, 17));
    }

    /// A difference storage opened as blksnapd opens one (`open_storage`: a directory → an
    /// unnamed file, a file as it is), direct where the filesystem allows: it starts empty,
    /// grows (`set_len`, as the engine's file storage does), round-trips data at aligned and
    /// unaligned offsets and buffers, also past its old end after growing, and punches holes.
    #[test]
    fn a_storage_grows_and_round_trips_aligned_and_not() {
        use crate::daemon::backing::open_storage;
        let dir = tempfile::tempdir().unwrap();
        let named = dir.path().join("storage.img");
        std::fs::File::create(&named).unwrap();
        for path in [dir.path().to_path_buf(), named] {
            let dev = open_storage(path.to_str().unwrap(), DirectIo::Always).unwrap();
            println!("{}: direct {}", path.display(), dev.is_direct());
            assert!(dev.can_grow(), "a regular file grows");
            assert_eq!(dev.len_bytes(), 0);
            dev.set_len(4 * MIB).unwrap();
            assert_eq!(dev.len_bytes(), 4 * MIB);
            let mut page = Aligned::new(256 * 1024).unwrap();
            page.slice(256 * 1024).copy_from_slice(&pattern(256 * 1024, 21));
            dev.write_at(page.slice(256 * 1024), MIB).unwrap(); // direct from the buffer
            let chunk = pattern(256 * 1024 + 4096, 22);
            dev.write_at(&chunk, 2 * MIB).unwrap(); // aligned range, bounce
            dev.write_at(&pattern(1536, 23), 3 * MIB + 512).unwrap(); // unaligned: buffered

            // a write past the end is refused until the storage grows
            assert_eq!(dev.write_at(&[1u8; 4096], 4 * MIB).unwrap_err().errno, Errno::EIO);
            dev.set_len(8 * MIB).unwrap();
            dev.write_at(&pattern(8192, 24), 6 * MIB).unwrap();
            dev.write_at(&pattern(1024, 25), 7 * MIB + 3584).unwrap();
            dev.flush().unwrap();
            let back = |off: u64, len: usize| {
                let mut b = vec![0xEEu8; len];
                dev.read_at(&mut b, off).unwrap();
                b
            };
            assert_eq!(back(MIB, 256 * 1024), pattern(256 * 1024, 21));
            assert_eq!(back(2 * MIB, chunk.len()), chunk);
            assert_eq!(back(3 * MIB + 512, 1536), pattern(1536, 23));
            assert_eq!(back(3 * MIB, 512), vec![0u8; 512]);
            assert_eq!(back(6 * MIB, 8192), pattern(8192, 24));
            assert_eq!(back(7 * MIB + 3584, 1024), pattern(1024, 25));
            assert_eq!(back(4 * MIB, 4096), vec![0u8; 4096], "grown sparse: zeroes");
            // zeroing a stored chunk's range (an image discard) reads back zeroes
            dev.write_zeroes_at(2 * MIB, 256 * 1024).unwrap();
            assert_eq!(back(2 * MIB, 256 * 1024), vec![0u8; 256 * 1024]);
            assert_eq!(back(2 * MIB + 256 * 1024, 4096), chunk[256 * 1024..]);
        }
        let bad = |p: &str| open_storage(p, DirectIo::Auto).unwrap_err().errno;
        assert_eq!(bad("/dev/null"), Errno::EINVAL, "a character device");
        assert_eq!(bad(dir.path().join("missing").to_str().unwrap()), Errno::ENOENT);
    }

    #[test]
    fn auto_is_buffered_for_files() {
        let (_tmp, dev) = backing(MIB, DirectIo::Auto);
        assert!(!dev.is_direct());
        let (_tmp, dev) = backing(MIB, DirectIo::Never);
        assert!(!dev.is_direct());
    }
}
