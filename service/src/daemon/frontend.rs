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
    /// The same backing as its concrete type when a front end may read and write it directly
    /// (origins served by the daemon; None for images and tests): origin reads need nothing of
    /// the engine (it only checks the range), and origin writes need only its
    /// `try_write_begin`, so a front end may issue them asynchronously
    /// ([`crate::daemon::backing_io::BackingDev::direct_fd`]).
    pub direct_backing: Option<Arc<crate::daemon::backing_io::BackingDev>>,
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
    /// Leaves it, with whatever is mounted on it, for the next daemon to take over
    /// ([`Frontend::recover`]) — a clean stop that keeps the device. The process exits soon
    /// after: the kernel then quiesces the device and holds its I/O for the next daemon.
    /// Default: not stopped, nothing released (dropping it would stop it).
    fn keep(self: Box<Self>) {
        std::mem::forget(self);
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
    /// Devices that outlive a daemon, when set ([`NullFrontend::lasting`]).
    devices: Option<Arc<NullDevices>>,
}

/// The devices of successive null front ends in one process, as the kernel holds ublk devices
/// for the next daemon: a device not stopped (a clean stop that keeps it, or a daemon dropped
/// as if its process died) stays here with its handle until a later daemon takes it over
/// ([`Frontend::recover`]) or deletes it ([`Frontend::remove_stale`]). The daemon simulation's
/// model of ublk user recovery.
#[derive(Default, Debug)]
pub struct NullDevices {
    /// By handle: the device number, its capacity, whether it is an image.
    live: Mutex<std::collections::BTreeMap<u32, (DeviceId, u64, bool)>>,
}

impl NullDevices {
    /// The devices that exist now: handle → (device number, is an image).
    pub fn list(&self) -> std::collections::BTreeMap<u32, (DeviceId, bool)> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.iter().map(|(h, (dev, _, image))| (*h, (*dev, *image))).collect()
    }

    /// A new device: the lowest free handle (as ublk's device ids); origins are `240:handle`.
    fn add(&self, image_of: Option<DeviceId>, capacity_bytes: u64) -> (u32, DeviceId) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let handle = (0..).find(|h| !live.contains_key(h)).expect("a free handle");
        let dev = match image_of {
            Some(origin) => DeviceId::new(241, origin.minor),
            None => DeviceId::new(240, handle),
        };
        live.insert(handle, (dev, capacity_bytes, image_of.is_some()));
        (handle, dev)
    }

    /// Deletes the device `handle` (what an administrator does with a device nobody serves).
    pub fn remove(&self, handle: u32) {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&handle);
    }

    fn get(&self, handle: u32) -> Option<(DeviceId, u64, bool)> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).get(&handle).copied()
    }
}

impl NullFrontend {
    /// A null frontend whose image devices fail to start while `fail` is set.
    pub fn failing_images(fail: Arc<std::sync::atomic::AtomicBool>) -> NullFrontend {
        NullFrontend { next: Mutex::new(0), fail_images: fail, devices: None }
    }

    /// As [`NullFrontend::failing_images`], with devices that outlive the daemon in `devices`
    /// (each has a handle, so the daemon keeps them at a clean stop and recovers them at the
    /// next start, as with ublk).
    pub fn lasting(
        fail: Arc<std::sync::atomic::AtomicBool>,
        devices: Arc<NullDevices>,
    ) -> NullFrontend {
        NullFrontend { next: Mutex::new(0), fail_images: fail, devices: Some(devices) }
    }
}

struct NullServed {
    dev: DeviceId,
    /// The handle in `devices` (lasting devices only).
    lasting: Option<(u32, Arc<NullDevices>)>,
}

impl Served for NullServed {
    fn dev(&self) -> DeviceId {
        self.dev
    }
    fn path(&self) -> String {
        format!("/dev/null-blksnap-{}-{}", self.dev.major, self.dev.minor)
    }
    fn stop(self: Box<Self>) {
        if let Some((handle, devices)) = &self.lasting {
            devices.remove(*handle);
        }
    }
    fn handle(&self) -> Option<u32> {
        self.lasting.as_ref().map(|(h, _)| *h)
    }
    fn keep(self: Box<Self>) {
        // The device stays in `devices`; nothing to release here.
    }
}

impl Frontend for NullFrontend {
    fn serve(
        &self,
        _name: &str,
        target: Arc<Target>,
        started: Box<dyn FnOnce(DeviceId) -> Result<(), Error> + Send>,
    ) -> Result<Box<dyn Served>, Error> {
        if target.image_of.is_some() && self.fail_images.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::new(Errno::ENOMEM, "image devices fail (test setting)"));
        }
        if let Some(devices) = &self.devices {
            let (handle, dev) = devices.add(target.image_of, target.capacity_bytes());
            if let Err(e) = started(dev) {
                devices.remove(handle);
                return Err(e);
            }
            return Ok(Box::new(NullServed { dev, lasting: Some((handle, devices.clone())) }));
        }
        let dev = match target.image_of {
            Some(origin) => DeviceId::new(241, origin.minor),
            None => {
                let mut n = self.next.lock().expect("poisoned");
                *n += 1;
                DeviceId::new(240, *n - 1)
            }
        };
        started(dev)?;
        Ok(Box::new(NullServed { dev, lasting: None }))
    }

    fn recoverable(&self, handle: u32, capacity_bytes: u64) -> bool {
        let device = self.devices.as_ref().and_then(|d| d.get(handle));
        device.is_some_and(|(_, capacity, image)| !image && capacity == capacity_bytes)
    }

    fn recover(
        &self,
        handle: u32,
        _name: &str,
        _target: Arc<Target>,
        started: Box<dyn FnOnce(DeviceId) -> Result<(), Error> + Send>,
    ) -> Result<Box<dyn Served>, Error> {
        let Some(devices) = &self.devices else {
            return Err(Error::new(Errno::EOPNOTSUPP, "this frontend cannot recover devices"));
        };
        let Some((dev, _, false)) = devices.get(handle) else {
            return Err(Error::new(Errno::ENODEV, "no such device of the previous run"));
        };
        // A device that fails to come back stays for a later start (or its stale removal), as
        // a ublk device that failed its recovery.
        started(dev)?;
        Ok(Box::new(NullServed { dev, lasting: Some((handle, devices.clone())) }))
    }

    fn remove_stale(&self, handle: u32) {
        if let Some(devices) = &self.devices {
            devices.remove(handle);
        }
    }
}
