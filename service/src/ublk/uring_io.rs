//! The queue's own io_uring as a data path ([`UringIo`]): origin reads and copy-free origin
//! writes submitted and completed on the queue thread, with the request's own pages on
//! zero-copy devices.

use std::ptr::{null, null_mut};

use blksnap_engine::WriteTicket;
use blksnap_model::Errno;
use io_uring::opcode::{Read, ReadFixed, Write, WriteFixed};
use libublk::io::{UblkIOCtx, UblkQueue};

use super::zero_copy::{UserCopy, USER_COPY_MAX_BYTES};
use super::{handle_in, neg};
use crate::daemon::serve::{DataOp, DataRequest};
use crate::daemon::Target;

/// Origin reads and writes issued on the queue's own io_uring, with no hand-off to a worker:
/// * a read needs nothing of the engine (it checks the range and reads the backing);
/// * a write whose chunks need no copy-on-write gets a [`WriteTicket`] from
///   `Engine::try_write_begin` (CBT marked; the engine never blocks the queue thread: a busy
///   gate or a chunk to copy means no ticket), and the ticket is dropped when the backing write
///   has completed — a take waits for it, as the kernel's queue freeze waits for requests in
///   flight. FUA writes, discards and write-zeroes go to the workers.
///
/// Either goes this way only when it would go direct to the backing anyway
/// ([`BackingDev::direct_fd`]: aligned range, page-aligned tag buffer). On a zero-copy device
/// the I/O uses the request's own pages, registered at buffer index = tag
/// (`READ_FIXED`/`WRITE_FIXED`, [`RingBuf::Registered`]); whether they suit direct I/O the kernel
/// decides, and one it refuses fails here and is served the other way. A read that comes back
/// short or failed is served again through the engine; a write is retried once synchronously
/// on the backing under its ticket (their answer is the request's).
///
/// Invariants: a tag's buffer is used by its I/O until that I/O's completion is reaped; the
/// queue does not return (and free the buffers) before every submitted I/O is reaped
/// ([`UringIo::drain`]); a ticket is dropped only after its write completed, or at the drain
/// when the ring failed (a take must not wait for a queue that is gone). While any I/O of this
/// queue is in flight, the queue thread serves nothing synchronously through the engine (a
/// write there could wait on a gate whose take waits for this queue's tickets).
///
/// [`BackingDev::direct_fd`]: crate::daemon::backing_io::BackingDev::direct_fd
pub(super) struct UringIo {
    /// Submitted and not reaped.
    pub(super) in_flight: std::cell::Cell<u32>,
    /// The ticket of each tag's write in flight.
    tickets: std::cell::RefCell<Vec<Option<WriteTicket>>>,
    /// Zero copy: how a request failed here gets its data for serving it the other way.
    uc: Option<UserCopy>,
    /// I/Os that failed or came back short and were served again the other way (said when the
    /// queue ends: a steady count means the backing refuses what this path sends it).
    pub(super) served_again: std::cell::Cell<u64>,
}

/// [`UringIo`]'s I/Os served again, over every queue of the process (see [`io_served_again`]).
static SERVED_AGAIN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many I/Os on the queues' io_urings of this process failed or came back short and were
/// served again the other way (the engine, with user copy on zero-copy devices): a fallback a
/// test can see taken.
pub fn io_served_again() -> u64 {
    SERVED_AGAIN.load(std::sync::atomic::Ordering::Relaxed)
}

/// A request's data for the queue's io_uring.
pub(super) enum RingBuf<'b> {
    /// The tag's buffer (copy mode).
    Slice(&'b mut [u8]),
    /// The request's own pages, registered by the driver at buffer index = tag (zero copy).
    Registered,
}

/// The target-I/O op codes in the user data (any values but the wake poll's 0).
pub(super) const READ_OP: u32 = 1;
pub(super) const WRITE_OP: u32 = 2;

impl UringIo {
    pub(super) fn new(depth: usize, uc: Option<UserCopy>) -> UringIo {
        UringIo {
            in_flight: std::cell::Cell::new(0),
            tickets: std::cell::RefCell::new((0..depth).map(|_| None).collect()),
            uc,
            served_again: std::cell::Cell::new(0),
        }
    }

    /// Submits `req` on the queue's io_uring if it may go that way; false: serve it otherwise
    /// (nothing was done).
    pub(super) fn try_submit(
        &self,
        q: &UblkQueue,
        t: &Target,
        tag: u16,
        req: &DataRequest,
        buf: RingBuf<'_>,
    ) -> bool {
        use std::sync::atomic::Ordering;
        let write = match req.op {
            DataOp::Read => false,
            DataOp::Write if !req.fua => true,
            _ => return false,
        };
        if t.image_of.is_some() || t.failed.load(Ordering::Acquire) {
            return false;
        }
        let Some(backing) = &t.direct_backing else { return false };
        let Ok(len) = u32::try_from(req.len_bytes) else { return false };
        // a registered buffer's address is an offset into the request (0); whether its pages
        // suit direct I/O the kernel checks (EINVAL: served again the other way)
        let (addr, cap) = match &buf {
            RingBuf::Slice(b) => (b.as_ptr() as usize, b.len()),
            RingBuf::Registered => (0, USER_COPY_MAX_BYTES),
        };
        if len == 0 || len as usize > cap || tag as usize >= self.tickets.borrow().len() {
            return false;
        }
        let Some(fd) = backing.direct_fd(req.offset_bytes, len as usize, addr) else {
            return false;
        };
        let fd = io_uring::types::Fd(fd);
        if write {
            let id = *t.origin.read().unwrap_or_else(|p| p.into_inner());
            let Some(id) = id else { return false };
            // a panic here fails the target as one in `serve` does (every request EIO from
            // now on) instead of ending the queue thread with its requests hanging
            let begun = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                t.engine.try_write_begin(id, req.offset_bytes, req.len_bytes)
            }));
            let ticket = match begun {
                Ok(Ok(Some(ticket))) => ticket,
                // a copy to make, a busy gate, or an error the engine reports on the other way
                Ok(_) => return false,
                Err(_) => {
                    t.failed.store(true, Ordering::Release);
                    eprintln!("blksnapd: an origin write panicked: the device fails every request from now on");
                    return false;
                }
            };
            self.tickets.borrow_mut()[tag as usize] = Some(ticket);
        }
        let at = req.offset_bytes;
        let sqe = match (write, buf) {
            (true, RingBuf::Slice(b)) => Write::new(fd, b.as_ptr(), len).offset(at).build(),
            (true, RingBuf::Registered) => WriteFixed::new(fd, null(), len, tag).offset(at).build(),
            (false, RingBuf::Slice(b)) => Read::new(fd, b.as_mut_ptr(), len).offset(at).build(),
            (false, RingBuf::Registered) => {
                ReadFixed::new(fd, null_mut(), len, tag).offset(at).build()
            }
        };
        let op = if write { WRITE_OP } else { READ_OP };
        let sqe = sqe.user_data(UblkIOCtx::build_user_data(tag, op, 0, true));
        if q.ublk_submit_sqe_sync(sqe).is_err() {
            // not submitted: nothing was written; the ticket ends and the request takes the
            // other way (the engine marks the CBT again: the same marks)
            self.tickets.borrow_mut()[tag as usize] = None;
            return false;
        }
        self.in_flight.set(self.in_flight.get() + 1);
        true
    }

    /// An I/O's completion (`op` from its user data): the request's result.
    pub(super) fn reaped(
        &self,
        t: &Target,
        tag: u16,
        op: u32,
        req: Result<DataRequest, Errno>,
        res: i32,
        buf: &mut [u8],
    ) -> i32 {
        let uc = self.uc;
        debug_assert!(self.in_flight.get() > 0, "an I/O reaped that was never submitted");
        self.in_flight.set(self.in_flight.get().saturating_sub(1));
        let done = matches!(&req, Ok(r) if res >= 0 && res as u64 == r.len_bytes);
        if !done {
            self.served_again.set(self.served_again.get() + 1);
            SERVED_AGAIN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if op == WRITE_OP {
            let ticket = self.tickets.borrow_mut().get_mut(tag as usize).and_then(Option::take);
            debug_assert!(ticket.is_some(), "a write reaped without its ticket");
            match (done, req) {
                (true, _) => res,
                (false, Ok(r)) => {
                    let n = r.len_bytes as usize;
                    if n > buf.len() {
                        return neg(Errno::EINVAL);
                    }
                    // zero copy: the data is still in the request's pages; take a copy
                    if let Some(Err(e)) = uc.map(|uc| uc.read_request(tag, &mut buf[..n])) {
                        return neg(e);
                    }
                    let retry = ticket.map(|k| k.backend().write_at(&buf[..n], r.offset_bytes));
                    match retry {
                        Some(Ok(())) => n as i32,
                        Some(Err(e)) => neg(e.errno),
                        None => neg(Errno::EIO),
                    }
                }
                (false, Err(e)) => neg(e),
            }
            // the ticket ends here, after its write (or the retry) completed
        } else if done {
            res
        } else {
            handle_in(t, uc, tag, req, buf)
        }
    }

    /// After the queue loop ended: waits for the I/O still in flight, so that none fills or
    /// reads a buffer after the queue freed it (their requests are gone with the queue), then
    /// ends every ticket.
    pub(super) fn drain(&self) {
        while self.in_flight.get() > 0 {
            let reaped = libublk::io::with_task_io_ring_mut(|ring| {
                if let Err(e) = ring.submit_and_wait(1) {
                    if e.raw_os_error() != Some(libc::EINTR) {
                        return Err(e);
                    }
                }
                let mut n = 0;
                for cqe in ring.completion() {
                    let data = cqe.user_data();
                    let tgt = data & libublk::UblkUringData::Target as u64 != 0;
                    let op = UblkIOCtx::user_data_to_op(data);
                    if tgt && (op == READ_OP || op == WRITE_OP) {
                        n += 1;
                    }
                }
                Ok(n)
            });
            match reaped {
                Ok(n) => self.in_flight.set(self.in_flight.get().saturating_sub(n)),
                Err(e) => {
                    // the ring is unusable: the kernel tears it down with the buffers' pages
                    // still pinned by the I/O; the buffers are leaked rather than freed
                    eprintln!("blksnapd: waiting for a ublk queue's I/O: {e}");
                    break;
                }
            }
        }
        self.tickets.borrow_mut().iter_mut().for_each(|k| drop(k.take()));
    }
}
