//! The ublk front end: one ublk device per [`Target`] (origin or image), one queue per core.
//! Each queue's thread takes its requests from the driver and hands them to the queue's
//! `workers` threads (config `queue_workers`), which serve them through the engine
//! ([`crate::daemon::serve`]: what each operation does, errors, contained panics) and return the
//! results over a list and an eventfd that wakes the queue's io_uring (a poll on it is the
//! queue's one "target I/O"); the queue thread then completes them. So up to `workers` requests
//! of one queue are in flight at once — a copy-on-write no longer holds up every other tag of
//! its queue — while the engine keeps its order (copy-on-write before the origin write, one
//! writer per chunk). The engine's API is synchronous, hence threads rather than io_uring on
//! the backing — except origin reads, and origin writes that need no copy-on-write, that go
//! direct to the backing: the queue thread issues those on its own io_uring ([`UringIo`],
//! config `queue_uring`). `queue_workers = 0`
//! serves one request at a time on the queue thread (the
//! earlier behaviour, kept for comparison). Flush requests carry start sector `u64::MAX`: they
//! are recognised before any range check.
//!
//! How request data reaches the daemon is the device's [`DataMode`]: the driver copies it into
//! a buffer per tag, or — where the kernel offers automatic buffer registration and user copy
//! (6.16+; config `ublk_zero_copy`, default "auto") — the queue's io_uring reads and writes the
//! backing with the request's own pages and the workers copy only what they serve.
//!
//! A device's thread runs libublk's `run_target`; stopping is `STOP_DEV` from the control side
//! (the kernel removes the disk even while it is open or mounted, aborts the queues, and the
//! queue threads end), then `DEL_DEV_ASYNC`, which does not wait for the last opener to close.
//!
//! Origins are created with `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`: when the
//! daemon dies (`kill -9`, crash) the kernel keeps `/dev/ublkbN` and whatever is mounted on it,
//! queues new I/O and requeues the requests the dead daemon had not completed; a new daemon
//! takes the device over with `START_USER_RECOVERY`, fetches on every queue and ends with
//! `END_USER_RECOVERY` ([`Frontend::recover`]), after which the queued and reissued I/O is served.
//! Images are not recoverable (a snapshot does not survive the daemon): they fail and are
//! deleted by the next run.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use blksnap_model::{DeviceId, Errno, Error};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, UblkFlags, UblkIORes};

use crate::daemon::serve::{serve, DataOp, DataRequest};
use crate::daemon::{Frontend, Served, Target};

mod uring_io;
mod zero_copy;

pub use uring_io::io_served_again;
use uring_io::{RingBuf, UringIo, READ_OP, WRITE_OP};
use zero_copy::{handle_copied, zero_copy_offered, DataMode, UserCopy, ZERO_COPY_FLAGS};
pub use zero_copy::{zero_copy_available, zero_copy_of};

/// Whether this host has the ublk driver.
pub fn available() -> bool {
    std::path::Path::new("/dev/ublk-control").exists()
}

/// Device shape.
#[derive(Clone, Copy, Debug)]
pub struct UblkFrontend {
    /// Queues per device.
    pub queues: u16,
    /// Queue depth.
    pub depth: u16,
    /// Largest I/O in bytes.
    pub io_buf_bytes: u32,
    /// Worker threads per queue serving its requests at once (0: one request at a time on the
    /// queue thread); at most `depth` are used.
    pub workers: u16,
    /// Origin reads, and writes that need no copy, that go direct are issued on the queue's
    /// io_uring ([`UringIo`]); needs `workers > 0` (config `queue_uring`).
    pub uring: bool,
    /// New devices ask for zero copy and user copy ([`DataMode::ZeroCopy`]) when the driver
    /// offers both (config `ublk_zero_copy`).
    pub zero_copy: bool,
}

impl UblkFrontend {
    /// The shape a configuration asks for.
    pub fn of(cfg: &crate::config::Config) -> UblkFrontend {
        UblkFrontend {
            queues: cfg.nr_queues(),
            depth: cfg.queue_depth,
            io_buf_bytes: cfg.io_buf_bytes,
            workers: cfg.queue_workers,
            uring: cfg.queue_uring,
            zero_copy: cfg.ublk_zero_copy == crate::config::ZeroCopy::Auto,
        }
    }
}

fn neg(e: Errno) -> i32 {
    -e.code()
}

/// The request a descriptor carries (ranges checked for overflow), or the errno to fail it with.
fn request_of(iod: &sys::ublksrv_io_desc) -> Result<DataRequest, Errno> {
    let op = match iod.op_flags & 0xff {
        sys::UBLK_IO_OP_READ => DataOp::Read,
        sys::UBLK_IO_OP_WRITE => DataOp::Write,
        sys::UBLK_IO_OP_FLUSH => DataOp::Flush,
        sys::UBLK_IO_OP_DISCARD => DataOp::Discard,
        sys::UBLK_IO_OP_WRITE_ZEROES => DataOp::WriteZeroes,
        _ => return Err(Errno::EOPNOTSUPP),
    };
    let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
    if op == DataOp::Flush {
        // flush requests carry start sector u64::MAX: no range to check
        return Ok(DataRequest { op, offset_bytes: 0, len_bytes: 0, fua });
    }
    match (iod.start_sector.checked_mul(512), u64::from(iod.nr_sectors).checked_mul(512)) {
        (Some(offset_bytes), Some(len_bytes)) => {
            Ok(DataRequest { op, offset_bytes, len_bytes, fua })
        }
        _ => Err(Errno::EINVAL),
    }
}

/// Serves one request; the completion result (bytes or a negative errno).
fn handle(t: &Target, req: Result<DataRequest, Errno>, buf: &mut [u8]) -> i32 {
    match req.and_then(|r| serve(t, &r, buf).map(|()| r.len_bytes)) {
        Ok(len) => len.min(i32::MAX as u64) as i32,
        Err(e) => neg(e),
    }
}

/// Serves one request on this thread with `buf`: the tag's buffer (copy mode, `uc` None) or
/// this thread's own (zero copy).
fn handle_in(
    t: &Target,
    uc: Option<UserCopy>,
    tag: u16,
    req: Result<DataRequest, Errno>,
    buf: &mut [u8],
) -> i32 {
    match uc {
        Some(uc) => handle_copied(t, uc, tag, req, buf),
        None => handle(t, req, buf),
    }
}

/// A tag's buffer handed to a worker. The buffer of a tag is used by one party at a time: the
/// kernel until the tag's request arrives, then the worker serving it, then the queue thread
/// completing it (which hands it back to the kernel).
struct TagBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: see `TagBuf`: the pointer is only dereferenced by the one worker serving the tag,
// while the queue (which owns the buffers and outlives its workers) does not touch it.
unsafe impl Send for TagBuf {}

struct Job {
    tag: u16,
    req: Result<DataRequest, Errno>,
    /// The tag's buffer (copy mode); None: zero copy, the worker copies through its own.
    buf: Option<TagBuf>,
}

/// Completions from the workers to the queue thread: the list and an eventfd that wakes the
/// queue's io_uring (a poll on it is the queue's one target I/O).
struct Completions {
    done: Mutex<Vec<(u16, i32)>>,
    efd: OwnedFd,
}

impl Completions {
    fn push(&self, tag: u16, res: i32) {
        self.done.lock().unwrap_or_else(|p| p.into_inner()).push((tag, res));
        let one: u64 = 1;
        // SAFETY: an 8-byte write from a valid u64 to our eventfd.
        let n = unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if n != 8 {
            // EAGAIN: the counter is saturated, so a wake-up is pending anyway
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EAGAIN) {
                eprintln!("blksnapd: waking a ublk queue: {e}");
            }
        }
    }

    /// Resets the eventfd (non-blocking) and takes the completions.
    fn take(&self) -> Vec<(u16, i32)> {
        let mut v: u64 = 0;
        // SAFETY: an 8-byte read into a valid u64 from our non-blocking eventfd.
        let _ = unsafe { libc::read(self.efd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        std::mem::take(&mut *self.done.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The user data of the queue's eventfd poll (a target I/O with a tag no request has).
fn wake_user_data() -> u64 {
    UblkIOCtx::build_user_data(WAKE_TAG, 0, 0, true)
}
const WAKE_TAG: u16 = u16::MAX;

fn arm_wake(q: &UblkQueue, efd: i32) {
    let sqe = io_uring::opcode::PollAdd::new(io_uring::types::Fd(efd), libc::POLLIN as u32)
        .build()
        .user_data(wake_user_data());
    if let Err(e) = q.ublk_submit_sqe_sync(sqe) {
        eprintln!("blksnapd: arming a ublk queue's wake-up: {e}");
    }
}

/// The queue's jobs for its workers: a list and a condition variable, so that each job wakes
/// one idle worker (no worker sleeps holding a lock the others queue behind).
#[derive(Default)]
struct Jobs {
    list: Mutex<(VecDeque<Job>, bool)>,
    ready: Condvar,
}

impl Jobs {
    fn push(&self, job: Job) {
        self.list.lock().unwrap_or_else(|p| p.into_inner()).0.push_back(job);
        self.ready.notify_one();
    }

    /// No more jobs: the workers end once the list is empty.
    fn close(&self) {
        self.list.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.ready.notify_all();
    }

    fn next(&self) -> Option<Job> {
        let mut l = self.list.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(job) = l.0.pop_front() {
                return Some(job);
            }
            if l.1 {
                return None;
            }
            l = self.ready.wait(l).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A queue's worker: serves jobs until the list is closed. Zero copy (`uc`): the data goes
/// through the worker's own buffer of `buf_bytes` (so a queue holds `workers` buffers, not
/// `depth`).
fn worker(t: &Target, jobs: &Jobs, done: &Completions, uc: Option<UserCopy>, buf_bytes: usize) {
    let mut own = uc.map(|_| libublk::helpers::IoBuf::<u8>::new(buf_bytes));
    while let Some(job) = jobs.next() {
        let res = match (&job.buf, own.as_mut()) {
            (Some(b), _) => {
                // SAFETY: see `TagBuf`: this worker is the buffer's only user until it pushes
                // the completion below.
                let buf = unsafe { std::slice::from_raw_parts_mut(b.ptr, b.len) };
                handle(t, job.req, buf)
            }
            (None, Some(own)) => handle_in(t, uc, job.tag, job.req, own.as_mut_slice()),
            (None, None) => {
                debug_assert!(false, "a zero-copy job for a copy-mode worker");
                neg(Errno::EIO)
            }
        };
        done.push(job.tag, res);
    }
}

/// The buffer of `tag`, from the addresses of the queue's buffers.
fn tag_slice<'b>(tag_bufs: &[(usize, usize)], tag: u16) -> &'b mut [u8] {
    let (p, len) = tag_bufs[tag as usize];
    // SAFETY: a live buffer of the queue's `bufs` (kept until `queue_fn` returns, after every
    // use) of `len` bytes, used by one party at a time (see `TagBuf`).
    unsafe { std::slice::from_raw_parts_mut(p as *mut u8, len) }
}

fn queue_fn(qid: u16, dev: &UblkDev, target: &Arc<Target>, workers: u16, uring: bool) {
    let mode = DataMode::of_flags(dev.dev_info.flags);
    let depth = dev.dev_info.queue_depth as usize;
    let buf_bytes = dev.dev_info.max_io_buf_bytes as usize;
    // copy mode: the buffers the driver copies into, one per tag; zero copy: none (each
    // request's own pages), and the registration every fetch and commit of a tag carries
    let bufs = match mode {
        DataMode::Copy => dev.alloc_queue_io_bufs(),
        DataMode::ZeroCopy => Vec::new(),
    };
    let regs: Vec<sys::ublk_auto_buf_reg> = (0..depth)
        .map(|tag| sys::ublk_auto_buf_reg {
            index: tag as u16,
            flags: sys::UBLK_AUTO_BUF_REG_FALLBACK as u8,
            ..Default::default()
        })
        .collect();
    let fetch = match mode {
        DataMode::Copy => BufDescList::Slices(Some(&bufs)),
        DataMode::ZeroCopy => BufDescList::AutoRegs(&regs),
    };
    let queue = match UblkQueue::new(qid, dev).and_then(|q| q.submit_fetch_commands_unified(fetch))
    {
        Ok(q) => q,
        Err(e) => {
            eprintln!("blksnapd: queue {qid} of ublk device {}: {e}", dev.dev_info.dev_id);
            return;
        }
    };
    let uc = (mode == DataMode::ZeroCopy).then(|| UserCopy { cdev: dev.tgt.fds[0], qid });
    // zero copy: the queue thread's own buffer for the requests it serves itself
    let mut own = uc.map(|_| libublk::helpers::IoBuf::<u8>::new(buf_bytes));
    let own_buf = own.as_mut().map(|b| (b.as_mut_ptr() as usize, b.len()));
    // the buffers' addresses, taken once: `bufs` and `own` outlive the queue loop and the
    // workers
    let tag_bufs: Vec<(usize, usize)> =
        bufs.iter().map(|b| (b.as_slice().as_ptr() as usize, b.as_slice().len())).collect();
    // the buffer a request is served with on this thread: the tag's, or the thread's own
    let slice = |tag: u16| match own_buf {
        // SAFETY: `own` lives until this function returns; only this thread uses it, for one
        // request at a time (each use ends before the next slice is made).
        Some((p, len)) => unsafe { std::slice::from_raw_parts_mut(p as *mut u8, len) },
        None => tag_slice(&tag_bufs, tag),
    };
    let complete = |q: &UblkQueue, tag: u16, res: i32| {
        let desc = match mode {
            DataMode::Copy => BufDesc::Slice(tag_slice(&tag_bufs, tag)),
            DataMode::ZeroCopy => BufDesc::AutoReg(regs[tag as usize]),
        };
        if let Err(e) = q.complete_io_cmd_unified(tag, desc, Ok(UblkIORes::Result(res))) {
            eprintln!("blksnapd: completing tag {tag}: {e}");
        }
    };
    // what the queue's io_uring may read or write a request's data with
    let ring_buf = |q: &UblkQueue, tag: u16| match mode {
        DataMode::Copy => Some(RingBuf::Slice(tag_slice(&tag_bufs, tag))),
        // the driver could not register this request's pages: the worker path copies
        DataMode::ZeroCopy if q.get_iod(tag).op_flags & sys::UBLK_IO_F_NEED_REG_BUF != 0 => None,
        DataMode::ZeroCopy => Some(RingBuf::Registered),
    };
    let t = target.clone();
    if workers == 0 {
        // one request at a time on the queue thread
        queue.wait_and_handle_io(|q: &UblkQueue, tag: u16, _ctx: &UblkIOCtx| {
            let res = handle_in(&t, uc, tag, request_of(q.get_iod(tag)), slice(tag));
            complete(q, tag, res);
        });
        return;
    }
    // SAFETY: eventfd(2) with flags; the result is checked before use.
    let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if raw < 0 {
        eprintln!("blksnapd: queue {qid}: eventfd: {}", std::io::Error::last_os_error());
        return;
    }
    // SAFETY: a new descriptor this function owns from now on.
    let efd = unsafe { OwnedFd::from_raw_fd(raw) };
    let done = Arc::new(Completions { done: Mutex::new(Vec::new()), efd });
    let jobs = Arc::new(Jobs::default());
    let mut threads = Vec::new();
    for i in 0..workers.min(queue.get_depth() as u16).max(1) {
        let (t, jobs, done) = (t.clone(), jobs.clone(), done.clone());
        match std::thread::Builder::new()
            .name(format!("blksnapd-q{qid}w{i}"))
            .spawn(move || worker(&t, &jobs, &done, uc, buf_bytes))
        {
            Ok(h) => threads.push(h),
            Err(e) => eprintln!("blksnapd: queue {qid}: worker {i}: {e}"),
        }
    }
    if threads.is_empty() {
        eprintln!("blksnapd: queue {qid}: no worker could start");
        return;
    }
    let efd = done.efd.as_raw_fd();
    arm_wake(&queue, efd);
    // requests handed to the workers and not completed yet
    let in_flight = std::cell::Cell::new(0u32);
    let uring_io = UringIo::new(queue.get_depth() as usize, uc);
    queue.wait_and_handle_io(|q: &UblkQueue, tag: u16, ctx: &UblkIOCtx| {
        if ctx.is_tgt_io() {
            if tag == WAKE_TAG {
                for (tag, res) in done.take() {
                    in_flight.set(in_flight.get().saturating_sub(1));
                    complete(q, tag, res);
                }
                arm_wake(q, efd);
            } else {
                let op = UblkIOCtx::user_data_to_op(ctx.user_data());
                if op == READ_OP || op == WRITE_OP {
                    let req = request_of(q.get_iod(tag));
                    let res = uring_io.reaped(&t, tag, op, req, ctx.result(), slice(tag));
                    complete(q, tag, res);
                }
            }
            return;
        }
        let req = request_of(q.get_iod(tag));
        if uring {
            if let (Ok(r), Some(buf)) = (&req, ring_buf(q, tag)) {
                if uring_io.try_submit(q, &t, tag, r, buf) {
                    return;
                }
            }
        }
        // A lone request while nothing else is in flight (queue depth 1) is served here: a
        // hand-off to a worker would only add two thread switches to its latency.
        if in_flight.get() == 0
            && uring_io.in_flight.get() == 0
            && ctx.is_first_cqe()
            && ctx.is_last_cqe()
        {
            let res = handle_in(&t, uc, tag, req, slice(tag));
            complete(q, tag, res);
            return;
        }
        let buf = tag_bufs.get(tag as usize).map(|&(p, len)| TagBuf { ptr: p as *mut u8, len });
        in_flight.set(in_flight.get() + 1);
        jobs.push(Job { tag, req, buf });
    });
    // the queue is down: the reads in flight end, the workers finish what they hold (its
    // completion is moot) and end
    uring_io.drain();
    if uring_io.served_again.get() > 0 {
        eprintln!(
            "blksnapd: queue {qid} of ublk device {}: {} I/Os on the queue's io_uring failed or \
             came back short and were served again",
            dev.dev_info.dev_id,
            uring_io.served_again.get()
        );
    }
    jobs.close();
    for h in threads {
        let _ = h.join();
    }
    drop(bufs);
    drop(own);
}

/// The `MAJ:MIN` of `/dev/ublkbN` (from sysfs).
fn block_devt(dev_id: u32) -> Result<DeviceId, Error> {
    let text = std::fs::read_to_string(format!("/sys/block/ublkb{dev_id}/dev"))
        .map_err(|_| Error::new(Errno::ENODEV, "ublk block device missing in sysfs"))?;
    let (maj, min) = text.trim().split_once(':').ok_or(Error::new(Errno::EIO, "bad dev"))?;
    match (maj.parse(), min.parse()) {
        (Ok(a), Ok(b)) => Ok(DeviceId::new(a, b)),
        _ => Err(Error::new(Errno::EIO, "bad dev number in sysfs")),
    }
}

/// The `MAJ:MIN`, size in bytes and state of an existing ublk device (None: no such device).
fn existing(dev_id: u32) -> Option<(sys::ublksrv_ctrl_dev_info, u64)> {
    if !std::path::Path::new(&format!("/sys/class/ublk-char/ublkc{dev_id}")).exists() {
        return None;
    }
    let ctrl = UblkCtrl::new_simple(dev_id as i32).ok()?;
    let sectors = std::fs::read_to_string(format!("/sys/block/ublkb{dev_id}/size"))
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(0);
    Some((ctrl.dev_info(), sectors * 512))
}

/// A running ublk device.
pub struct UblkServed {
    dev_id: u32,
    devt: DeviceId,
    thread: Option<JoinHandle<()>>,
}

impl Served for UblkServed {
    fn dev(&self) -> DeviceId {
        self.devt
    }

    fn path(&self) -> String {
        format!("/dev/ublkb{}", self.dev_id)
    }

    fn stop(mut self: Box<Self>) {
        self.stop_now();
    }

    fn handle(&self) -> Option<u32> {
        Some(self.dev_id)
    }
}

impl UblkServed {
    fn stop_now(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        match UblkCtrl::new_simple(self.dev_id as i32).and_then(|c| c.kill_dev()) {
            Ok(_) => {}
            Err(e) => eprintln!("blksnapd: stopping ublk device {}: {e}", self.dev_id),
        }
        if thread.join().is_err() {
            eprintln!("blksnapd: ublk device {} thread panicked", self.dev_id);
        }
    }
}

impl Drop for UblkServed {
    fn drop(&mut self) {
        self.stop_now();
    }
}

type Started = Box<dyn FnOnce(DeviceId) -> Result<(), Error> + Send>;

impl UblkFrontend {
    fn start(
        &self,
        name: &str,
        target: Arc<Target>,
        started: Started,
        recover: Option<u32>,
    ) -> Result<Box<dyn Served>, Error> {
        let (tx, rx) = mpsc::channel::<Result<(u32, DeviceId), Error>>();
        let shape = *self;
        let name = name.chars().filter(|c| c.is_ascii_graphic()).take(64).collect::<String>();
        let thread = std::thread::Builder::new()
            .name("blksnapd-ublk".into())
            .spawn(move || run_device(shape, &name, target, started, tx, recover))
            .map_err(|_| Error::new(Errno::ENOMEM, "cannot spawn a device thread"))?;
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok((dev_id, devt))) => {
                Ok(Box::new(UblkServed { dev_id, devt, thread: Some(thread) }))
            }
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(Error::new(Errno::EIO, "the ublk device did not start")),
        }
    }
}

impl Frontend for UblkFrontend {
    fn serve(
        &self,
        name: &str,
        target: Arc<Target>,
        started: Started,
    ) -> Result<Box<dyn Served>, Error> {
        self.start(name, target, started, None)
    }

    fn recoverable(&self, handle: u32, capacity_bytes: u64) -> bool {
        existing(handle).is_some_and(|(info, size)| {
            info.flags & u64::from(sys::UBLK_F_USER_RECOVERY) != 0
                && u32::from(info.state) != sys::UBLK_S_DEV_DEAD
                && size == capacity_bytes
        })
    }

    fn recover(
        &self,
        handle: u32,
        name: &str,
        target: Arc<Target>,
        started: Started,
    ) -> Result<Box<dyn Served>, Error> {
        self.start(name, target, started, Some(handle))
    }

    fn remove_stale(&self, handle: u32) {
        if existing(handle).is_none() {
            return;
        }
        match UblkCtrl::new_simple(handle as i32) {
            Ok(c) => {
                let _ = c.kill_dev();
                if c.del_dev_async().is_err() && c.del_dev().is_err() {
                    eprintln!("blksnapd: cannot delete ublk device {handle} of the previous run");
                } else {
                    eprintln!("blksnapd: deleted ublk device {handle} of the previous run");
                }
            }
            Err(e) => eprintln!("blksnapd: ublk device {handle} of the previous run: {e}"),
        }
    }
}

fn ublk_error(e: &libublk::UblkError) -> Error {
    eprintln!("blksnapd: ublk: {e}");
    Error::new(Errno::EIO, "ublk control command failed")
}

fn run_device(
    shape: UblkFrontend,
    name: &str,
    target: Arc<Target>,
    started: Started,
    tx: mpsc::Sender<Result<(u32, DeviceId), Error>>,
    recover: Option<u32>,
) {
    // Recovery: the block device exists, so its number is known and the engine is set up
    // before the first (queued or reissued) request reaches a queue.
    let mut started = Some(started);
    if let Some(id) = recover {
        let prepared = block_devt(id).and_then(|devt| {
            (started.take().expect("once"))(devt)?;
            let ctrl = UblkCtrl::new_simple(id as i32).map_err(|e| ublk_error(&e))?;
            match ctrl.start_user_recover() {
                Ok(r) if r >= 0 => Ok(()),
                Ok(r) => Err(ublk_error(&libublk::UblkError::OtherError(r))),
                Err(e) => Err(ublk_error(&e)),
            }
        });
        if let Err(e) = prepared {
            let _ = tx.send(Err(e));
            return;
        }
    }
    // Origins survive a crash of the daemon (user recovery, requests reissued); images do not.
    let mut ctrl_flags = if target.image_of.is_none() {
        u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE)
    } else {
        0
    };
    // Zero copy: asked for where the driver offers it; a recovered device keeps what it was
    // added with (the driver fixed its flags then).
    ctrl_flags |= match recover {
        Some(id) => existing(id).map_or(0, |(info, _)| info.flags & ZERO_COPY_FLAGS),
        None if shape.zero_copy => zero_copy_offered(),
        None => 0,
    };
    let dev_flags = if recover.is_some() {
        UblkFlags::UBLK_DEV_F_RECOVER_DEV
    } else {
        UblkFlags::UBLK_DEV_F_ADD_DEV
    };
    let ctrl = match UblkCtrlBuilder::default()
        .name(name)
        .id(recover.map_or(-1, |id| id as i32))
        .nr_queues(shape.queues)
        .depth(shape.depth)
        .io_buf_bytes(shape.io_buf_bytes)
        .ctrl_flags(ctrl_flags)
        .dev_flags(dev_flags)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Err(ublk_error(&e)));
            return;
        }
    };
    let capacity = target.capacity_bytes();
    let tgt_init = move |dev: &mut UblkDev| {
        dev.set_default_params(capacity);
        let p = &mut dev.tgt.params;
        p.basic.attrs = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
        p.basic.io_min_shift = 9;
        p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        p.discard = sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: 4096,
            max_discard_sectors: 8 << 11,
            max_write_zeroes_sectors: 8 << 11,
            max_discard_segments: 1,
            reserved0: 0,
        };
        Ok(())
    };
    let q_target = target.clone();
    let (workers, uring) = (shape.workers, shape.uring);
    let q_fn = move |qid: u16, dev: &UblkDev| queue_fn(qid, dev, &q_target, workers, uring);
    let tx2 = std::sync::Mutex::new(tx.clone());
    let recovering = recover.is_some();
    let started = std::sync::Mutex::new(started);
    let on_start = move |ctrl: &UblkCtrl| {
        let dev_id = ctrl.dev_info().dev_id;
        let started = started.lock().ok().and_then(|mut s| s.take());
        let result = block_devt(dev_id).and_then(|devt| match started {
            Some(f) => f(devt).map(|()| (dev_id, devt)),
            None if recovering => Ok((dev_id, devt)),
            None => Err(Error::new(Errno::EIO, "started twice")),
        });
        if result.is_err() {
            let _ = ctrl.kill_dev();
        }
        if let Ok(tx) = tx2.lock() {
            let _ = tx.send(result);
        }
    };
    if let Err(e) = ctrl.run_target(tgt_init, q_fn, on_start) {
        let _ = tx.send(Err(ublk_error(&e)));
    }
    // DEL_DEV_ASYNC: an image may still be mounted; the kernel frees the device at last close.
    if ctrl.del_dev_async().is_err() {
        let _ = ctrl.del_dev();
    }
}
