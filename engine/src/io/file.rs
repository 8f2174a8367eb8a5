//! [`FileDev`]: a regular file or a block device, through positioned reads and writes
//! (`pread`/`pwrite` via [`FileExt`]), so that concurrent callers never share a file offset and
//! never take a lock around the I/O.
//!
//! O_DIRECT is not used yet: it requires the buffer address, the offset and the length to be
//! aligned to the device's logical block size (often 4096 for the address), and the engine's
//! callers hand in ordinary `Vec<u8>` buffers with no alignment guarantee. Using it would mean
//! bounce buffers on every I/O; until the engine allocates aligned buffers itself, the page
//! cache is used and [`BlockDev::flush`] (`fdatasync`) provides durability.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use blksnap_model::{Errno, Error, Result};

use super::BlockDev;
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{LockRank, Mutex};

/// Largest zero buffer `write_zeroes_at` allocates: bounds memory for huge discards.
const ZERO_CHUNK_BYTES: u64 = 1 << 20;

/// A file-backed device. See the module documentation.
#[derive(Debug)]
pub struct FileDev {
    file: File,
    /// Cached size: read on every I/O to check ranges, so an atomic rather than a syscall.
    len_bytes: AtomicU64,
    /// Regular files can be resized; block devices cannot.
    regular: bool,
    /// Serialises `set_len` so the cached size always matches the last completed resize.
    resize: Mutex<()>,
}

/// The errno of an OS error (when the closed set has it), else EIO.
fn errno_of(err: &io::Error) -> Errno {
    err.raw_os_error().and_then(Errno::from_code).unwrap_or(Errno::EIO)
}

fn os_error(err: &io::Error, detail: &'static str) -> Error {
    Error::new(errno_of(err), detail)
}

/// Past-the-end (or overflowing) I/O is EIO by the [`BlockDev`] contract.
fn check_range(offset_bytes: u64, len_bytes: u64, device_len_bytes: u64) -> Result<()> {
    match offset_bytes.checked_add(len_bytes) {
        Some(end_bytes) if end_bytes <= device_len_bytes => Ok(()),
        _ => Err(Error::new(Errno::EIO, "file device: I/O past the end")),
    }
}

/// The size and kind of `file`: metadata for a regular file; a block device reports size 0
/// there, so seek to its end instead.
fn probe(file: &File) -> Result<(u64, bool)> {
    let meta = file.metadata().map_err(|e| os_error(&e, "file device: stat failed"))?;
    let kind = meta.file_type();
    if kind.is_file() {
        return Ok((meta.len(), true));
    }
    if !kind.is_block_device() {
        return Err(Error::new(Errno::EINVAL, "file device: not a regular file or block device"));
    }
    // `Seek for &File` moves the shared offset, which positioned I/O never uses.
    let end_bytes =
        (&*file).seek(SeekFrom::End(0)).map_err(|e| os_error(&e, "file device: seek failed"))?;
    Ok((end_bytes, false))
}

impl FileDev {
    /// Opens an existing regular file or block device, read-only unless `writable`.
    pub fn open(path: impl AsRef<Path>, writable: bool) -> Result<FileDev> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| os_error(&e, "file device: open failed"))?;
        FileDev::from_file(file)
    }

    /// Creates (or truncates) a regular file and sizes it to `len_bytes` (sparse).
    pub fn create(path: impl AsRef<Path>, len_bytes: u64) -> Result<FileDev> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| os_error(&e, "file device: create failed"))?;
        file.set_len(len_bytes).map_err(|e| os_error(&e, "file device: set_len failed"))?;
        FileDev::from_file(file)
    }

    /// Wraps an open file; its access mode decides whether writes succeed.
    pub fn from_file(file: File) -> Result<FileDev> {
        let (len_bytes, regular) = probe(&file)?;
        Ok(FileDev {
            file,
            len_bytes: AtomicU64::new(len_bytes),
            regular,
            resize: Mutex::new(LockRank::FileResize, ()),
        })
    }

    /// The underlying file (for metadata in tests and tools).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Writes `len_bytes` zeroes from a bounded buffer, chunk by chunk.
    fn write_zero_chunks(&self, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        let zeroes = vec![0u8; len_bytes.min(ZERO_CHUNK_BYTES) as usize];
        let mut done_bytes = 0;
        while done_bytes < len_bytes {
            let step_bytes = (len_bytes - done_bytes).min(ZERO_CHUNK_BYTES) as usize;
            self.write_all(&zeroes[..step_bytes], offset_bytes + done_bytes)?;
            done_bytes += step_bytes as u64;
        }
        Ok(())
    }

    /// `pwrite` until done: short writes continue, EINTR retries, 0 bytes written is EIO.
    fn write_all(&self, buf: &[u8], offset_bytes: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.write_at(&buf[done..], offset_bytes + done as u64) {
                Ok(0) => return Err(Error::new(Errno::EIO, "file device: write made no progress")),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(os_error(&e, "file device: write failed")),
            }
        }
        Ok(())
    }
}

impl BlockDev for FileDev {
    fn len_bytes(&self) -> u64 {
        self.len_bytes.load(Ordering::Acquire)
    }

    /// `pread` until full: short reads continue, EINTR retries, end of file is EIO (the file
    /// shrank under us).
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<()> {
        check_range(offset_bytes, buf.len() as u64, self.len_bytes())?;
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset_bytes + done as u64) {
                Ok(0) => return Err(Error::new(Errno::EIO, "file device: read past end of file")),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(os_error(&e, "file device: read failed")),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset_bytes: u64) -> Result<()> {
        check_range(offset_bytes, buf.len() as u64, self.len_bytes())?;
        self.write_all(buf, offset_bytes)
    }

    /// Plain zero writes: punching holes needs `fallocate`, which std does not expose.
    fn write_zeroes_at(&self, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        check_range(offset_bytes, len_bytes, self.len_bytes())?;
        self.write_zero_chunks(offset_bytes, len_bytes)
    }

    /// `fdatasync`: the data and the size, not the timestamps.
    fn flush(&self) -> Result<()> {
        loop {
            match self.file.sync_data() {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other.map_err(|e| os_error(&e, "file device: sync failed")),
            }
        }
    }

    fn can_grow(&self) -> bool {
        self.regular
    }

    /// `ftruncate`: growth is sparse; shrinking drops the data past the new end.
    fn set_len(&self, len_bytes: u64) -> Result<()> {
        if !self.regular {
            return Err(Error::new(
                Errno::EOPNOTSUPP,
                "file device: a block device has a fixed size",
            ));
        }
        let _resizing = self.resize.lock();
        self.file.set_len(len_bytes).map_err(|e| os_error(&e, "file device: set_len failed"))?;
        self.len_bytes.store(len_bytes, Ordering::Release);
        Ok(())
    }
}

// The facade's primitives belong to the checker under loom/shuttle and cannot be created outside
// a checked execution, so these unit tests run on the std backend only.
#[cfg(all(test, not(any(blksnap_loom, blksnap_shuttle))))]
mod tests {
    use super::*;
    use crate::sync::{thread, StdArc};

    fn pattern(len_bytes: usize, seed: u8) -> Vec<u8> {
        (0..len_bytes).map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed)).collect()
    }

    fn read(dev: &FileDev, offset_bytes: u64, len_bytes: usize) -> Vec<u8> {
        let mut buf = vec![0xAAu8; len_bytes];
        dev.read_at(&mut buf, offset_bytes).unwrap();
        buf
    }

    fn errno<T: core::fmt::Debug>(r: Result<T>) -> Errno {
        r.unwrap_err().errno
    }

    #[test]
    fn create_round_trip_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev.img");
        let dev = FileDev::create(&path, 1 << 20).unwrap();
        assert_eq!(dev.len_bytes(), 1 << 20);
        assert!(dev.can_grow());
        assert_eq!(read(&dev, 4096, 512), vec![0u8; 512], "a new file reads as zeroes");
        let data = pattern(8192, 3);
        dev.write_at(&data, 4096 - 512).unwrap();
        assert_eq!(read(&dev, 4096 - 512, 8192), data);
        dev.flush().unwrap();
        drop(dev);
        let again = FileDev::open(&path, false).unwrap();
        assert_eq!(again.len_bytes(), 1 << 20);
        assert_eq!(read(&again, 4096 - 512, 8192), data);
    }

    #[test]
    fn create_truncates_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev.img");
        FileDev::create(&path, 4096).unwrap().write_at(&[1u8; 4096], 0).unwrap();
        let dev = FileDev::create(&path, 8192).unwrap();
        assert_eq!(read(&dev, 0, 8192), vec![0u8; 8192]);
    }

    #[test]
    fn past_end_is_eio() {
        let dev = FileDev::from_file(tempfile::tempfile().unwrap()).unwrap();
        assert_eq!(dev.len_bytes(), 0);
        dev.set_len(4096).unwrap();
        assert_eq!(errno(dev.read_at(&mut [0u8; 1024], 3584)), Errno::EIO);
        assert_eq!(errno(dev.write_at(&[0u8; 512], 4096)), Errno::EIO);
        assert_eq!(errno(dev.write_zeroes_at(0, 4097)), Errno::EIO);
        assert_eq!(errno(dev.read_at(&mut [0u8; 1], u64::MAX)), Errno::EIO);
        assert_eq!(dev.file().metadata().unwrap().len(), 4096, "a refused write extends nothing");
        dev.read_at(&mut [], 4096).unwrap();
    }

    #[test]
    fn read_of_a_file_shrunk_behind_our_back_is_eio() {
        let dev = FileDev::from_file(tempfile::tempfile().unwrap()).unwrap();
        dev.set_len(8192).unwrap();
        dev.file().set_len(4096).unwrap(); // the cached size is now stale
        assert_eq!(errno(dev.read_at(&mut [0u8; 1024], 4096 - 512)), Errno::EIO);
    }

    #[test]
    fn set_len_grows_sparse_and_shrink_drops_data() {
        let dev = FileDev::from_file(tempfile::tempfile().unwrap()).unwrap();
        dev.set_len(64 << 20).unwrap();
        assert_eq!(dev.len_bytes(), 64 << 20);
        dev.write_at(&[9u8; 4096], (64 << 20) - 4096).unwrap();
        dev.set_len(32 << 20).unwrap();
        assert_eq!(dev.file().metadata().unwrap().len(), 32 << 20);
        dev.set_len(64 << 20).unwrap();
        assert_eq!(read(&dev, (64 << 20) - 4096, 4096), vec![0u8; 4096]);
    }

    #[test]
    fn write_zeroes_spans_several_chunks() {
        let dev = FileDev::from_file(tempfile::tempfile().unwrap()).unwrap();
        let len_bytes = 3 * ZERO_CHUNK_BYTES + 1024;
        dev.set_len(len_bytes + 1024).unwrap();
        dev.write_at(&vec![0xFFu8; (len_bytes + 1024) as usize], 0).unwrap();
        dev.write_zeroes_at(512, len_bytes).unwrap();
        let all = read(&dev, 0, (len_bytes + 1024) as usize);
        assert!(all[..512].iter().all(|b| *b == 0xFF));
        assert!(all[512..512 + len_bytes as usize].iter().all(|b| *b == 0));
        assert!(all[512 + len_bytes as usize..].iter().all(|b| *b == 0xFF));
    }

    #[test]
    fn open_errors_map_to_errno() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(errno(FileDev::open(dir.path().join("missing"), false)), Errno::ENOENT);
        assert_eq!(errno(FileDev::open(dir.path(), false)), Errno::EINVAL, "a directory");
        assert_eq!(errno(FileDev::open("/dev/null", false)), Errno::EINVAL, "a char device");
    }

    #[test]
    fn read_only_file_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro.img");
        FileDev::create(&path, 4096).unwrap();
        let dev = FileDev::open(&path, false).unwrap();
        // EBADF is outside the closed errno set, so it maps to EIO.
        assert_eq!(errno(dev.write_at(&[1u8; 512], 0)), Errno::EIO);
        assert_eq!(read(&dev, 0, 512), vec![0u8; 512]);
    }

    #[test]
    fn parallel_writers_on_disjoint_ranges() {
        let dev = StdArc::new(FileDev::from_file(tempfile::tempfile().unwrap()).unwrap());
        dev.set_len(8 * 65536).unwrap();
        let handles: Vec<_> = (0..8u8)
            .map(|i| {
                let dev = StdArc::clone(&dev);
                thread::spawn(move || dev.write_at(&pattern(65536, i), u64::from(i) * 65536))
            })
            .collect();
        for handle in handles {
            handle.join().unwrap().unwrap();
        }
        for i in 0..8u8 {
            assert_eq!(read(&dev, u64::from(i) * 65536, 65536), pattern(65536, i));
        }
    }
}
