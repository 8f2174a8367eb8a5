//! Data requests over the control socket (protocol v3): the data path of a daemon that serves no
//! block devices (`--frontend none`), so that every process on a host without the ublk driver
//! reads and writes the same engine's origins and images — one engine for every process, as the
//! kernel module is.
//!
//! A request names a served device by its number, as `ListDevices` lists it (origins `240:N`,
//! images `241:N` with the null front end; the ublk devices' numbers otherwise). It is served by
//! [`serve::serve`], the very code that serves the ublk front end's block requests: origin reads
//! and writes through the engine (change tracking and copy-on-write), image reads and writes
//! through the snapshot, discard and write-zeroes as the engine's (origins) or as
//! `Engine::image_write_zeroes` (images: wholly covered chunks zeroed in the difference storage,
//! a hole in a file), flush of the difference storage then the backing; an image whose snapshot is gone
//! or corrupted answers EIO; a panic marks the device failed (EIO from then on). Ranges past the
//! end are EINVAL (the block layer never sends them to ublk; here the client could). Limits:
//! [`blksnap_proto::MAX_DATA_BYTES`] per read or write, [`blksnap_proto::MAX_ZERO_BYTES`] per
//! discard or write-zeroes (checked by the protocol's validation before this runs).

use std::sync::Arc;

use blksnap_model::{DeviceId, Errno, Error};
use blksnap_proto::{Bytes, Reply, Request};

use super::serve::{self, DataOp, DataRequest};
use super::{Daemon, Target};

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
        let (dev, op, offset_bytes, len_bytes) = match &req {
            Request::DevRead { dev, offset_bytes, len_bytes } => {
                (*dev, DataOp::Read, *offset_bytes, u64::from(*len_bytes))
            }
            Request::DevWrite { dev, offset_bytes, data } => {
                (*dev, DataOp::Write, *offset_bytes, data.0.len() as u64)
            }
            Request::DevDiscard { dev, offset_bytes, len_bytes } => {
                (*dev, DataOp::Discard, *offset_bytes, *len_bytes)
            }
            Request::DevWriteZeroes { dev, offset_bytes, len_bytes } => {
                (*dev, DataOp::WriteZeroes, *offset_bytes, *len_bytes)
            }
            Request::DevFlush { dev } => (*dev, DataOp::Flush, 0, 0),
            _ => return Err(Error::new(Errno::EINVAL, "not a data request")),
        };
        let target = self.data_target(dev.into())?;
        let end = offset_bytes.checked_add(len_bytes);
        if op != DataOp::Flush && end.is_none_or(|end| end > target.capacity_bytes()) {
            return Err(Error::new(Errno::EINVAL, "range past the end of the device"));
        }
        let request = DataRequest { op, offset_bytes, len_bytes, fua: false };
        let failed = |errno: Errno| Error::new(errno, "the data request failed");
        match req {
            Request::DevRead { .. } => {
                let mut buf = vec![0u8; len_bytes as usize];
                serve::serve(&target, &request, &mut buf).map_err(failed)?;
                Ok(Reply::Data(Bytes(buf)))
            }
            Request::DevWrite { mut data, .. } => {
                serve::serve(&target, &request, &mut data.0).map_err(failed)?;
                Ok(Reply::Done)
            }
            _ => {
                serve::serve(&target, &request, &mut []).map_err(failed)?;
                Ok(Reply::Done)
            }
        }
    }
}
