//! The ublk front end: one ublk device per [`Target`] (origin or image), one queue per core, each
//! queue a thread that serves its requests synchronously through the engine:
//! * read → `Engine::read` (origin, straight to the backing) / `Engine::image_read`;
//! * write, discard, write-zeroes → `Engine::write/discard/write_zeroes` (CBT + copy-on-write)
//!   / `Engine::image_write` (discard and write-zeroes on an image write zero buffers);
//! * flush → the difference storage, then the backing (`fdatasync`); FUA writes flush likewise
//!   before they complete. Flush requests carry start sector `u64::MAX`: they are handled before
//!   any range check.
//!
//! Errors complete the request with the engine's negative errno; an image whose snapshot is gone
//! (ENODEV) or corrupted completes with EIO. A panic while serving a request is caught: that
//! request completes with EIO and the device is marked failed (EIO from then on).
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

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use blksnap_model::{DeviceId, Errno, Error};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, UblkFlags, UblkIORes};

use crate::daemon::{Frontend, Served, Target};

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
}

fn neg(e: Errno) -> i32 {
    -e.code()
}

/// Serves one request; returns the completion result (bytes or a negative errno).
fn handle(t: &Target, iod: &sys::ublksrv_io_desc, buf: &mut [u8]) -> i32 {
    let op = iod.op_flags & 0xff;
    if op == sys::UBLK_IO_OP_FLUSH {
        return t.flush().map_or_else(|e| neg(e.errno), |()| 0);
    }
    let (Some(offset), Some(len)) =
        (iod.start_sector.checked_mul(512), u64::from(iod.nr_sectors).checked_mul(512))
    else {
        return neg(Errno::EINVAL);
    };
    let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
    let data_op = op == sys::UBLK_IO_OP_READ || op == sys::UBLK_IO_OP_WRITE;
    if data_op && len > buf.len() as u64 {
        return neg(Errno::EINVAL);
    }
    let n = (len as usize).min(buf.len());
    let r = match t.image_of {
        Some(origin) => image_io(t, origin, op, offset, len, &mut buf[..n]),
        None => origin_io(t, op, offset, len, &mut buf[..n]),
    };
    let r = r.and_then(|()| if fua && op != sys::UBLK_IO_OP_READ { t.flush() } else { Ok(()) });
    match r {
        Ok(()) => len.min(i32::MAX as u64) as i32,
        Err(e) if t.image_of.is_some() && e.errno == Errno::ENODEV => neg(Errno::EIO),
        Err(e) => neg(e.errno),
    }
}

/// [`handle`], with a panic contained: a panicking request completes with EIO and marks the
/// device failed (every later request EIO too), instead of killing the queue thread, which
/// would leave the request — and the device — hanging.
fn handle_guarded(t: &Target, iod: &sys::ublksrv_io_desc, buf: &mut [u8]) -> i32 {
    use std::sync::atomic::Ordering;
    if t.failed.load(Ordering::Acquire) {
        return neg(Errno::EIO);
    }
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handle(t, iod, buf))) {
        Ok(res) => res,
        Err(_) => {
            t.failed.store(true, Ordering::Release);
            eprintln!(
                "blksnapd: a request to {} panicked: the device fails every request from now on",
                t.image_of.map_or_else(|| "an origin".to_string(), |o| format!("the image of {o}"))
            );
            neg(Errno::EIO)
        }
    }
}

fn origin_io(t: &Target, op: u32, offset: u64, len: u64, buf: &mut [u8]) -> Result<(), Error> {
    // Held across the I/O so that `started` (which takes it for writing) orders after any
    // request that went straight to the backing.
    let id = t.origin.read().unwrap_or_else(|p| p.into_inner());
    match (*id, op) {
        (Some(d), sys::UBLK_IO_OP_READ) => t.engine.read(d, offset, buf),
        (Some(d), sys::UBLK_IO_OP_WRITE) => t.engine.write(d, offset, buf),
        (Some(d), sys::UBLK_IO_OP_DISCARD) => t.engine.discard(d, offset, len),
        (Some(d), sys::UBLK_IO_OP_WRITE_ZEROES) => t.engine.write_zeroes(d, offset, len),
        (None, sys::UBLK_IO_OP_READ) => t.backing.read_at(buf, offset),
        (None, sys::UBLK_IO_OP_WRITE) => t.backing.write_at(buf, offset),
        (None, sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES) => {
            t.backing.write_zeroes_at(offset, len)
        }
        _ => Err(Error::new(Errno::EOPNOTSUPP, "unsupported ublk operation")),
    }
}

fn image_io(
    t: &Target,
    origin: DeviceId,
    op: u32,
    offset: u64,
    len: u64,
    buf: &mut [u8],
) -> Result<(), Error> {
    match op {
        sys::UBLK_IO_OP_READ => t.engine.image_read(origin, offset, buf),
        sys::UBLK_IO_OP_WRITE => t.engine.image_write(origin, offset, buf),
        sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES => {
            const STEP: u64 = 1 << 20;
            let zeroes = vec![0u8; len.min(STEP) as usize];
            let mut done = 0;
            while done < len {
                let step = (len - done).min(STEP);
                t.engine.image_write(origin, offset + done, &zeroes[..step as usize])?;
                done += step;
            }
            Ok(())
        }
        _ => Err(Error::new(Errno::EOPNOTSUPP, "unsupported ublk operation")),
    }
}

fn queue_fn(qid: u16, dev: &UblkDev, target: &Arc<Target>) {
    let mut bufs = dev.alloc_queue_io_bufs();
    let queue = match UblkQueue::new(qid, dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))))
    {
        Ok(q) => q,
        Err(e) => {
            eprintln!("blksnapd: queue {qid} of ublk device {}: {e}", dev.dev_info.dev_id);
            return;
        }
    };
    let t = target.clone();
    queue.wait_and_handle_io(move |q: &UblkQueue, tag: u16, _ctx: &UblkIOCtx| {
        let iod = q.get_iod(tag);
        let buf = bufs[tag as usize].as_mut_slice();
        let res = handle_guarded(&t, iod, buf);
        if let Err(e) =
            q.complete_io_cmd_unified(tag, BufDesc::Slice(buf), Ok(UblkIORes::Result(res)))
        {
            eprintln!("blksnapd: completing tag {tag}: {e}");
        }
    });
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
    let ctrl_flags = if target.image_of.is_none() {
        u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE)
    } else {
        0
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
    let q_fn = move |qid: u16, dev: &UblkDev| queue_fn(qid, dev, &q_target);
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
