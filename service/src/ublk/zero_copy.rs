//! Zero copy on a ublk device: which [`DataMode`] it is served in, and user copy ([`UserCopy`]):
//! how the workers and the fallbacks move a request's data when the driver copies nothing.

use libublk::ctrl::UblkCtrl;
use libublk::io::UblkIOCtx;
use libublk::sys;

use blksnap_model::Errno;

use super::{existing, handle, neg};
use crate::daemon::serve::{DataOp, DataRequest};
use crate::daemon::Target;

/// How a device's request data moves between the kernel's pages and the backing, fixed when
/// the device is added (its flags) and followed by every daemon that serves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DataMode {
    /// The driver copies each request's data into (write) or out of (read) a buffer per tag
    /// that the daemon owns: one memory copy per request in the kernel, `depth` buffers of
    /// `io_buf_bytes` per queue.
    Copy,
    /// `UBLK_F_AUTO_BUF_REG | UBLK_F_USER_COPY` (kernel 6.16+): the driver registers each
    /// request's own pages in the queue thread's io_uring at buffer index = tag before handing
    /// the request over; the queue's io_uring I/O ([`UringIo`]) reads and writes the backing
    /// with them in place (`READ_FIXED`/`WRITE_FIXED`, no copy at all), and everything else
    /// (workers: copy-on-write, images, FUA, discard) copies the data with `pread`/`pwrite` on
    /// `/dev/ublkcN` ([`UserCopy`]) into a buffer per worker. A request the driver could not
    /// register (`UBLK_IO_F_NEED_REG_BUF`) takes the worker path. Every commit carries the
    /// tag's registration (index, fallback), since the driver reads the next request's from it.
    ZeroCopy,
}

/// The device flags zero copy needs (both: the registration, and the fallback's copy).
pub(super) const ZERO_COPY_FLAGS: u64 = (sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_USER_COPY) as u64;

impl DataMode {
    pub(super) fn of_flags(flags: u64) -> DataMode {
        if flags & ZERO_COPY_FLAGS == ZERO_COPY_FLAGS {
            DataMode::ZeroCopy
        } else {
            DataMode::Copy
        }
    }
}

/// User copy (`UBLK_F_USER_COPY`): between a request's dispatch and its commit, any thread may
/// read a write request's data (`pread`) or fill a read request's pages (`pwrite`) on the
/// device's `/dev/ublkcN`, at a position that names the queue, the tag and the byte offset.
#[derive(Clone, Copy)]
pub(super) struct UserCopy {
    /// `/dev/ublkcN` (the one descriptor libublk opened: a second open is refused).
    pub(super) cdev: i32,
    pub(super) qid: u16,
}

/// Largest request a user-copy position can address (its offset field, 25 bits).
pub(super) const USER_COPY_MAX_BYTES: usize = 1 << 25;

impl UserCopy {
    /// A write request's data into `buf` (its length: the request's).
    pub(super) fn read_request(&self, tag: u16, buf: &mut [u8]) -> Result<(), Errno> {
        self.copy(tag, buf.as_mut_ptr(), buf.len(), false)
    }

    /// `buf` (the request's length) into a read request's pages.
    pub(super) fn fill_request(&self, tag: u16, buf: &[u8]) -> Result<(), Errno> {
        self.copy(tag, buf.as_ptr().cast_mut(), buf.len(), true)
    }

    fn copy(&self, tag: u16, buf: *mut u8, len: usize, into_request: bool) -> Result<(), Errno> {
        if len > USER_COPY_MAX_BYTES {
            return Err(Errno::EINVAL);
        }
        let mut done = 0usize;
        while done < len {
            let pos = UblkIOCtx::ublk_user_copy_pos(self.qid, tag, done as u32) as libc::off_t;
            // SAFETY: `buf` is valid for `len` bytes (a slice the callers hold); `into_request`
            // only reads it (pwrite), else it is written (pread, from a `&mut` slice).
            let n = unsafe {
                if into_request {
                    libc::pwrite(self.cdev, buf.add(done).cast(), len - done, pos)
                } else {
                    libc::pread(self.cdev, buf.add(done).cast(), len - done, pos)
                }
            };
            if n < 0 {
                let code = std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
                if code == libc::EINTR {
                    continue;
                }
                return Err(Errno::from_code(code).unwrap_or(Errno::EIO));
            }
            if n == 0 {
                // the request is shorter than its descriptor said: never expected
                return Err(Errno::EIO);
            }
            done += n as usize;
        }
        Ok(())
    }
}

/// Serves one request of a zero-copy device through `buf` (a buffer of this thread's, at least
/// the request's length): a write's data is copied in from the request first, a read's out to
/// it after ([`UserCopy`]).
pub(super) fn handle_copied(
    t: &Target,
    uc: UserCopy,
    tag: u16,
    req: Result<DataRequest, Errno>,
    buf: &mut [u8],
) -> i32 {
    let r = match req {
        Ok(r) => r,
        Err(e) => return neg(e),
    };
    if r.op == DataOp::Write {
        let Some(data) = usize::try_from(r.len_bytes).ok().and_then(|n| buf.get_mut(..n)) else {
            return neg(Errno::EINVAL);
        };
        if let Err(e) = uc.read_request(tag, data) {
            return neg(e);
        }
    }
    let res = handle(t, Ok(r), buf);
    if r.op == DataOp::Read && res > 0 {
        // `serve` checked that the length fits `buf`
        if let Err(e) = uc.fill_request(tag, &buf[..res as usize]) {
            return neg(e);
        }
    }
    res
}

/// Whether this host's ublk driver offers zero copy (both flags [`DataMode::ZeroCopy`] needs).
pub fn zero_copy_available() -> bool {
    zero_copy_offered() != 0
}

/// Whether ublk device `dev_id` moves its data by zero copy (None: no such device).
pub fn zero_copy_of(dev_id: u32) -> Option<bool> {
    existing(dev_id).map(|(info, _)| DataMode::of_flags(info.flags) == DataMode::ZeroCopy)
}

/// [`ZERO_COPY_FLAGS`] if the driver offers both (once per process: the driver does not change
/// under a running daemon), else 0. Privilege is not checked here: without CAP_SYS_ADMIN the
/// driver refuses these flags and the device fails to add, said in the log.
pub(super) fn zero_copy_offered() -> u64 {
    static OFFERED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *OFFERED.get_or_init(|| {
        let features = UblkCtrl::get_features().unwrap_or(0);
        let offered = features & ZERO_COPY_FLAGS == ZERO_COPY_FLAGS;
        eprintln!(
            "blksnapd: ublk driver features {features:#x}: zero copy {}",
            if offered {
                "on (auto buffer registration + user copy)"
            } else {
                "not offered: copying"
            }
        );
        if offered {
            ZERO_COPY_FLAGS
        } else {
            0
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn zero_copy_needs_both_flags() {
        let (auto, user) = (u64::from(sys::UBLK_F_AUTO_BUF_REG), u64::from(sys::UBLK_F_USER_COPY));
        assert_eq!(DataMode::of_flags(0), DataMode::Copy);
        assert_eq!(DataMode::of_flags(auto), DataMode::Copy);
        assert_eq!(DataMode::of_flags(user), DataMode::Copy);
        let recovery = u64::from(sys::UBLK_F_USER_RECOVERY);
        assert_eq!(DataMode::of_flags(auto | user | recovery), DataMode::ZeroCopy);
    }

    /// The copy loop against a regular file standing in for `/dev/ublkcN` (same positions):
    /// both directions land at the request's position, byte for byte; an end of file (a
    /// request shorter than its descriptor) is EIO, not a hang or a short success; a request
    /// past the position's offset field is refused.
    #[test]
    fn user_copy_moves_whole_requests_at_their_positions() {
        let file = tempfile::tempfile().unwrap();
        let uc = UserCopy { cdev: file.as_raw_fd(), qid: 0 };
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        uc.fill_request(3, &data).unwrap();
        let mut back = vec![0u8; data.len()];
        uc.read_request(3, &mut back).unwrap();
        assert_eq!(back, data);
        let mut at = vec![0u8; 16];
        let pos = UblkIOCtx::ublk_user_copy_pos(0, 3, 4096);
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut at, pos).unwrap();
        assert_eq!(at, data[4096..4112]);
        // tag 4 starts right after tag 3's 32 MiB window: nothing there (end of file)
        assert_eq!(uc.read_request(4, &mut back), Err(Errno::EIO));
        let mut huge = vec![0u8; USER_COPY_MAX_BYTES + 1];
        assert_eq!(uc.read_request(0, &mut huge), Err(Errno::EINVAL));
    }
}
