//! A file's extents through `FS_IOC_FIEMAP` (for `markdirtyblock --file`, the v3 storage
//! appends and `stretch_snapshot`).
//!
//! The walk always makes progress: each call starts where the previous call's last extent
//! ended, and the walk stops when the filesystem returns no extent (only holes after that
//! point), sets `FIEMAP_EXTENT_LAST`, or returns an extent that does not move forward. (The
//! upstream tool restarted from a position that did not advance on sparse files and unwritten
//! extents, and looped forever.)

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// Flush dirty data first, so delayed allocations have a place on the device.
const FIEMAP_FLAG_SYNC: u32 = 0x1;
/// The last extent of the file.
pub const EXTENT_LAST: u32 = 0x1;
/// The location is not known yet.
pub const EXTENT_UNKNOWN: u32 = 0x2;
/// Delayed allocation: no location yet.
pub const EXTENT_DELALLOC: u32 = 0x4;
/// Allocated but not written (reads return zeroes).
pub const EXTENT_UNWRITTEN: u32 = 0x800;
/// Shared with another file (reflink): writing it allocates.
pub const EXTENT_SHARED: u32 = 0x2000;
/// Data inline in metadata: not a block of its own.
pub const EXTENT_DATA_INLINE: u32 = 0x200;

/// Extents asked for per call.
const BATCH: usize = 128;
/// `struct fiemap` header: 32 bytes = 4 u64 words.
const HEADER_WORDS: usize = 4;
/// `struct fiemap_extent`: 56 bytes = 7 u64 words.
const EXTENT_WORDS: usize = 7;

/// One extent of a file, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub logical: u64,
    /// Offset on the file's block device.
    pub physical: u64,
    /// Length.
    pub length: u64,
    /// `FIEMAP_EXTENT_*` flags.
    pub flags: u32,
}

/// Every extent of `file` (holes are absent). Errors: the filesystem does not support FIEMAP
/// (`EOPNOTSUPP`/`ENOTTY`), or another ioctl error.
pub fn extents(file: &File) -> io::Result<Vec<Extent>> {
    let mut out: Vec<Extent> = Vec::new();
    let mut start = 0u64;
    let mut buf = vec![0u64; HEADER_WORDS + EXTENT_WORDS * BATCH];
    loop {
        buf.iter_mut().for_each(|w| *w = 0);
        buf[0] = start; // fm_start
        buf[1] = u64::MAX - start; // fm_length
                                   // fm_flags (low half) and fm_mapped_extents (high half) share word 2; word 3 holds
                                   // fm_extent_count (low half) and fm_reserved.
        buf[2] = u64::from(FIEMAP_FLAG_SYNC);
        buf[3] = BATCH as u64;
        // SAFETY: `buf` is a live, 8-byte aligned buffer of HEADER + BATCH extents, exactly what
        // fm_extent_count = BATCH tells the kernel it may write; the fd is open for the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP as _, buf.as_mut_ptr()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let mapped = ((buf[2] >> 32) as usize).min(BATCH);
        if mapped == 0 {
            return Ok(out);
        }
        let mut last = false;
        let mut next = start;
        for i in 0..mapped {
            let w = &buf[HEADER_WORDS + i * EXTENT_WORDS..][..EXTENT_WORDS];
            let e = Extent { logical: w[0], physical: w[1], length: w[2], flags: w[5] as u32 };
            last |= e.flags & EXTENT_LAST != 0;
            next = next.max(e.logical.saturating_add(e.length));
            if e.length > 0 {
                out.push(e);
            }
        }
        if last || next <= start {
            return Ok(out);
        }
        start = next;
    }
}

/// Whether an error means "this filesystem has no FIEMAP".
pub fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn sparse_and_unwritten_files_terminate() {
        let dir = tempfile::tempdir().unwrap();
        // only a hole
        let hole = File::create(dir.path().join("hole")).unwrap();
        hole.set_len(64 << 20).unwrap();
        match extents(&hole) {
            Ok(e) => assert!(e.is_empty(), "{e:?}"),
            Err(e) if unsupported(&e) => return,
            Err(e) => panic!("{e}"),
        }
        // data, hole, data, hole; and an unwritten (preallocated) range
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("sparse"))
            .unwrap();
        f.write_at(&[1u8; 8192], 0).unwrap();
        f.write_at(&[2u8; 8192], 4 << 20).unwrap();
        f.set_len(16 << 20).unwrap();
        // SAFETY: plain fallocate on an open descriptor.
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 8 << 20, 1 << 20) };
        let e = extents(&f).unwrap();
        assert!(e.iter().any(|x| x.logical == 0));
        assert!(e.iter().any(|x| x.logical <= 4 << 20 && x.logical + x.length > 4 << 20));
        if rc == 0 {
            assert!(e.iter().any(|x| x.logical <= 8 << 20 && x.logical + x.length > 8 << 20));
        }
        assert!(e.windows(2).all(|w| w[0].logical + w[0].length <= w[1].logical));
    }
}
