//! The block-device side of the daemon: what a served device needs on its data path
//! ([`Target`]), a served device ([`Served`]) and who serves them ([`Frontend`]): ublk in
//! production, [`NullFrontend`] in tests of the control plane.

use std::sync::{Arc, Mutex, RwLock};

use blksnap_engine::io::Dev;
use blksnap_engine::Engine;
use blksnap_model::{DeviceId, Errno, Error};

/// What one served device needs on its data path.
pub struct Target {
    /// The engine.
    pub engine: Arc<Engine>,
    /// The origin's engine id once known (the ublk device's MAJ:MIN is known only after it
    /// started; I/O before that — the kernel's partition scan — goes straight to the backing,
    /// which is what the engine does for a disk with no tracker).
    pub origin: RwLock<Option<DeviceId>>,
    /// The origin's backing.
    pub backing: Dev,
    /// The difference storage backends of the snapshot the origin is in (flushed on flush/FUA).
    pub storages: Mutex<Vec<Dev>>,
    /// `Some(origin)` for an image device.
    pub image_of: Option<DeviceId>,
    /// Set when serving a request panicked: the device's state can no longer be trusted, so
    /// every later request fails with EIO (the panicking one too) instead of hanging.
    pub failed: std::sync::atomic::AtomicBool,
}

impl Target {
    /// Flushes the difference storage, then (origins) the backing.
    pub fn flush(&self) -> Result<(), Error> {
        let storages: Vec<Dev> = self.storages.lock().map(|s| s.clone()).unwrap_or_default();
        for s in storages {
            s.flush()?;
        }
        if self.image_of.is_none() {
            self.backing.flush()?;
        }
        Ok(())
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.backing.len_bytes()
    }
}

/// A block device in front of a [`Target`].
pub trait Served: Send {
    /// The block device's MAJ:MIN.
    fn dev(&self) -> DeviceId;
    /// Its node, e.g. `/dev/ublkb0`.
    fn path(&self) -> String;
    /// Removes it (even while open or mounted: later I/O fails) and releases everything.
    fn stop(self: Box<Self>);
    /// The frontend's handle for recovering it after a crash (ublk: the device id N).
    fn handle(&self) -> Option<u32> {
        None
    }
}

/// Makes block devices.
pub trait Frontend: Send + Sync {
    /// Starts serving `target`; `started` runs once the device's number is known, before any
    /// I/O reaches the engine under that number.
    fn serve(
        &self,
        name: &str,
        target: Arc<Target>,
        started: Box<dyn FnOnce(DeviceId) -> Result<(), Error> + Send>,
    ) -> Result<Box<dyn Served>, Error>;

    /// Whether the device `handle`, left by a previous run that did not stop cleanly, can be
    /// taken over ([`Frontend::recover`]): it exists, was made recoverable and has
    /// `capacity_bytes`.
    fn recoverable(&self, _handle: u32, _capacity_bytes: u64) -> bool {
        false
    }

    /// Takes over the device `handle` of a previous run (user recovery): the block device, its
    /// number and whatever is mounted on it stay; I/O queued meanwhile is served now.
    /// `started` runs before any I/O reaches the engine.
    fn recover(
        &self,
        _handle: u32,
        _name: &str,
        _target: Arc<Target>,
        _started: Box<dyn FnOnce(DeviceId) -> Result<(), Error> + Send>,
    ) -> Result<Box<dyn Served>, Error> {
        Err(Error::new(Errno::EOPNOTSUPP, "this frontend cannot recover devices"))
    }

    /// Deletes a device a previous run left behind (an image, or an origin not recovered).
    fn remove_stale(&self, _handle: u32) {}
}

/// A frontend with no block devices: origins get ids `240:N` (a local/experimental major);
/// images exist only in the engine. For control-plane tests.
#[derive(Default)]
pub struct NullFrontend {
    next: Mutex<u32>,
    /// While set, serving an image fails with ENOMEM (tests of the take's rollback).
    fail_images: Arc<std::sync::atomic::AtomicBool>,
}

impl NullFrontend {
    /// A null frontend whose image devices fail to start while `fail` is set.
    pub fn failing_images(fail: Arc<std::sync::atomic::AtomicBool>) -> NullFrontend {
        NullFrontend { next: Mutex::new(0), fail_images: fail }
    }
}

struct NullServed(DeviceId);

impl Served for NullServed {
    fn dev(&self) -> DeviceId {
        self.0
    }
    fn path(&self) -> String {
        format!("/dev/null-blksnap-{}-{}", self.0.major, self.0.minor)
    }
    fn stop(self: Box<Self>) {}
}

impl Frontend for NullFrontend {
    fn serve(
        &self,
        _name: &str,
        target: Arc<Target>,
        started: Box<dyn FnOnce(DeviceId) -> Result<(), Error> + Send>,
    ) -> Result<Box<dyn Served>, Error> {
        let dev = match target.image_of {
            Some(_) if self.fail_images.load(std::sync::atomic::Ordering::SeqCst) => {
                return Err(Error::new(Errno::ENOMEM, "image devices fail (test setting)"));
            }
            Some(origin) => DeviceId::new(241, origin.minor),
            None => {
                let mut n = self.next.lock().expect("poisoned");
                *n += 1;
                DeviceId::new(240, *n - 1)
            }
        };
        started(dev)?;
        Ok(Box::new(NullServed(dev)))
    }
}
