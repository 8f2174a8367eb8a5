//! Data requests over the control socket (protocol v3): the data path of a daemon that serves no
//! block devices (`--frontend none`), so that every process on a host without the ublk driver
//! reads and writes the same engine's origins and images — one engine for every process, as the
//! kernel module is.
//!
//! A request names a served device by its number, as `ListDevices` lists it (origins `240:N`,
//! images `241:N` with the null front end; the ublk devices' numbers otherwise). It is served by
//! [`Target::serve`], which does what the ublk front end does with a block request
//! (`crate::ublk`): origin reads and writes through the engine (change tracking and
//! copy-on-write), image reads and writes through the snapshot, discard and write-zeroes as the
//! engine's (origins) or as written zeroes (images), flush of the difference storage then the
//! backing; an image whose snapshot is gone or corrupted answers EIO; a panic marks the device
//! failed (EIO from then on). Ranges past the end are EINVAL (the block layer never sends them
//! to ublk; here the client could). Limits: [`blksnap_proto::MAX_DATA_BYTES`] per read or write,
//! [`blksnap_proto::MAX_ZERO_BYTES`] per discard or write-zeroes (checked by the protocol's
//! validation before this runs).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use blksnap_model::{DeviceId, Errno, Error};
use blksnap_proto::{Bytes, Reply, Request};

use super::{Daemon, Target};

/// One block request.
pub enum DataOp<'a> {
    /// Read into the buffer.
    Read(&'a mut [u8]),
    /// Write the buffer.
    Write(&'a [u8]),
    /// Discard this many bytes.
    Discard(u64),
    /// Write zeroes over this many bytes.
    WriteZeroes(u64),
    /// Flush.
    Flush,
}

impl DataOp<'_> {
    fn len_bytes(&self) -> u64 {
        match self {
            DataOp::Read(b) => b.len() as u64,
            DataOp::Write(b) => b.len() as u64,
            DataOp::Discard(n) | DataOp::WriteZeroes(n) => *n,
            DataOp::Flush => 0,
        }
    }
}

/// Image discard and write-zeroes write zero buffers of at most this size.
const ZERO_STEP_BYTES: u64 = 1 << 20;

impl Target {
    /// Serves one block request at `offset_bytes`, as the ublk front end does; a panic while
    /// serving it is caught, answered EIO and marks the device failed.
    pub fn serve(&self, offset_bytes: u64, op: DataOp<'_>) -> Result<(), Error> {
        if self.failed.load(Ordering::Acquire) {
            return Err(Error::new(Errno::EIO, "the device failed earlier"));
        }
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.serve_inner(offset_bytes, op)
        }));
        match served {
            Ok(result) => result,
            Err(_) => {
                self.failed.store(true, Ordering::Release);
                eprintln!(
                    "blksnapd: a data request to {} panicked: the device fails every request \
                     from now on",
                    self.image_of
                        .map_or_else(|| "an origin".into(), |o| format!("the image of {o}"))
                );
                Err(Error::new(Errno::EIO, "serving the request panicked"))
            }
        }
    }

    fn serve_inner(&self, offset: u64, op: DataOp<'_>) -> Result<(), Error> {
        if matches!(op, DataOp::Flush) {
            return self.flush();
        }
        let len = op.len_bytes();
        if offset.checked_add(len).is_none_or(|end| end > self.capacity_bytes()) {
            return Err(Error::new(Errno::EINVAL, "range past the end of the device"));
        }
        let result = match self.image_of {
            Some(origin) => self.image_io(origin, offset, op),
            None => self.origin_io(offset, op),
        };
        match result {
            Err(e) if self.image_of.is_some() && e.errno == Errno::ENODEV => {
                Err(Error::new(Errno::EIO, "the snapshot of this image is gone"))
            }
            other => other,
        }
    }

    fn origin_io(&self, offset: u64, op: DataOp<'_>) -> Result<(), Error> {
        // Held across the I/O, as the ublk queue does: a device still being added (no engine
        // id yet) is served straight from its backing, ordered before the engine takes over.
        let id = self.origin.read().unwrap_or_else(|p| p.into_inner());
        match (*id, op) {
            (Some(d), DataOp::Read(buf)) => self.engine.read(d, offset, buf),
            (Some(d), DataOp::Write(buf)) => self.engine.write(d, offset, buf),
            (Some(d), DataOp::Discard(len)) => self.engine.discard(d, offset, len),
            (Some(d), DataOp::WriteZeroes(len)) => self.engine.write_zeroes(d, offset, len),
            (None, DataOp::Read(buf)) => self.backing.read_at(buf, offset),
            (None, DataOp::Write(buf)) => self.backing.write_at(buf, offset),
            (None, DataOp::Discard(len) | DataOp::WriteZeroes(len)) => {
                self.backing.write_zeroes_at(offset, len)
            }
            (_, DataOp::Flush) => self.flush(),
        }
    }

    fn image_io(&self, origin: DeviceId, offset: u64, op: DataOp<'_>) -> Result<(), Error> {
        match op {
            DataOp::Read(buf) => self.engine.image_read(origin, offset, buf),
            DataOp::Write(buf) => self.engine.image_write(origin, offset, buf),
            DataOp::Discard(len) | DataOp::WriteZeroes(len) => {
                let zeroes = vec![0u8; len.min(ZERO_STEP_BYTES) as usize];
                let mut done = 0;
                while done < len {
                    let step = (len - done).min(ZERO_STEP_BYTES);
                    self.engine.image_write(origin, offset + done, &zeroes[..step as usize])?;
                    done += step;
                }
                Ok(())
            }
            DataOp::Flush => self.flush(),
        }
    }
}

impl Daemon {
    /// The data path of the served device `dev` (an origin, or an image by its own number).
    fn data_target(&self, dev: DeviceId) -> Result<Arc<Target>, Error> {
        let st = self.state();
        if let Some(o) = st.origins.get(&dev) {
            return Ok(o.target.clone());
        }
        st.images
            .values()
            .find(|i| i.served.dev() == dev)
            .map(|i| i.target.clone())
            .ok_or(Error::new(Errno::ENODEV, "no served device with this number"))
    }

    /// Carries out a data request (the daemon's lock is held only to find the device).
    pub(super) fn data(&self, req: Request) -> Result<Reply, Error> {
        let (dev, offset) = match &req {
            Request::DevRead { dev, offset_bytes, .. }
            | Request::DevWrite { dev, offset_bytes, .. }
            | Request::DevDiscard { dev, offset_bytes, .. }
            | Request::DevWriteZeroes { dev, offset_bytes, .. } => (*dev, *offset_bytes),
            Request::DevFlush { dev } => (*dev, 0),
            _ => return Err(Error::new(Errno::EINVAL, "not a data request")),
        };
        let target = self.data_target(dev.into())?;
        match req {
            Request::DevRead { len_bytes, .. } => {
                let mut buf = vec![0u8; len_bytes as usize];
                target.serve(offset, DataOp::Read(&mut buf))?;
                return Ok(Reply::Data(Bytes(buf)));
            }
            Request::DevWrite { data, .. } => target.serve(offset, DataOp::Write(&data.0))?,
            Request::DevDiscard { len_bytes, .. } => {
                target.serve(offset, DataOp::Discard(len_bytes))?
            }
            Request::DevWriteZeroes { len_bytes, .. } => {
                target.serve(offset, DataOp::WriteZeroes(len_bytes))?
            }
            _ => target.serve(offset, DataOp::Flush)?,
        }
        Ok(Reply::Done)
    }
}
