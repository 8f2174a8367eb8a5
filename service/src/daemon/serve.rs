//! Serving one block request through the engine, whatever front end received it (ublk's queue
//! workers; any other front end that carries block requests can call [`serve`] the same way):
//! * read → `Engine::read` (origin) / `Engine::image_read`; before the origin's engine id is
//!   known, straight to the backing;
//! * write, discard, write-zeroes → `Engine::write/discard/write_zeroes` (CBT + copy-on-write,
//!   then the backing: a discard or write-zeroes punches a hole or zeroes a range there, see
//!   [`super::backing_io`]) / `Engine::image_write` (discard and write-zeroes on an image:
//!   `Engine::image_write_zeroes`, which zeroes wholly covered chunks in the difference storage
//!   by its `write_zeroes_at`, no zero buffer);
//! * flush → the difference storage, then the backing (`fdatasync`); FUA writes flush likewise
//!   before they complete.
//!
//! Errors are the engine's negative errno; an image whose snapshot is gone (ENODEV) or
//! corrupted completes with EIO. A panic while serving is contained ([`serve`]).
//!
//! Any number of requests may be served at once from any threads: the engine orders what
//! must be ordered (a chunk's copy-on-write finishes before the origin write into it; writers
//! of one chunk are serialised by its permit, writers of different chunks are not).

use blksnap_model::{DeviceId, Errno, Error};

use super::Target;

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataOp {
    /// Fill the buffer.
    Read,
    /// Write the buffer.
    Write,
    /// Make completed writes durable (no range).
    Flush,
    /// Discard the range: it reads as zeroes afterwards (the model's discard).
    Discard,
    /// Zero the range.
    WriteZeroes,
}

/// One request: the operation, its byte range and whether it is FUA (durable on completion).
#[derive(Clone, Copy, Debug)]
pub struct DataRequest {
    /// The operation.
    pub op: DataOp,
    /// Start, bytes.
    pub offset_bytes: u64,
    /// Length, bytes (reads and writes: at most the buffer's length).
    pub len_bytes: u64,
    /// Force unit access: durable before completion.
    pub fua: bool,
}

fn serve_unguarded(t: &Target, req: &DataRequest, buf: &mut [u8]) -> Result<(), Error> {
    if req.op == DataOp::Flush {
        return t.flush();
    }
    let data_op = matches!(req.op, DataOp::Read | DataOp::Write);
    if data_op && req.len_bytes > buf.len() as u64 {
        return Err(Error::new(Errno::EINVAL, "request larger than its buffer"));
    }
    let n = if data_op { req.len_bytes as usize } else { 0 };
    let buf = &mut buf[..n];
    match t.image_of {
        Some(origin) => image_io(t, origin, req, buf)?,
        None => origin_io(t, req, buf)?,
    }
    if req.fua && req.op != DataOp::Read {
        t.flush()?;
    }
    Ok(())
}

/// Serves `req` with `buf` (its data for writes, filled for reads); `Ok(())` or the error to
/// complete the request with (ENODEV of an image is EIO). A panic while serving is contained:
/// that request fails with EIO and the target is marked failed (every later request EIO too),
/// so a front end's thread never dies with requests left hanging.
pub fn serve(t: &Target, req: &DataRequest, buf: &mut [u8]) -> Result<(), Errno> {
    use std::sync::atomic::Ordering;
    if t.failed.load(Ordering::Acquire) {
        return Err(Errno::EIO);
    }
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve_unguarded(t, req, buf))) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if t.image_of.is_some() && e.errno == Errno::ENODEV => Err(Errno::EIO),
        Ok(Err(e)) => Err(e.errno),
        Err(_) => {
            t.failed.store(true, Ordering::Release);
            eprintln!(
                "blksnapd: a request to {} panicked: the device fails every request from now on",
                t.image_of.map_or_else(|| "an origin".to_string(), |o| format!("the image of {o}"))
            );
            Err(Errno::EIO)
        }
    }
}

fn origin_io(t: &Target, req: &DataRequest, buf: &mut [u8]) -> Result<(), Error> {
    let (offset, len) = (req.offset_bytes, req.len_bytes);
    // Held across the I/O so that `started` (which takes it for writing) orders after any
    // request that went straight to the backing.
    let id = t.origin.read().unwrap_or_else(|p| p.into_inner());
    match (*id, req.op) {
        (Some(d), DataOp::Read) => t.engine.read(d, offset, buf),
        (Some(d), DataOp::Write) => t.engine.write(d, offset, buf),
        (Some(d), DataOp::Discard) => t.engine.discard(d, offset, len),
        (Some(d), DataOp::WriteZeroes) => t.engine.write_zeroes(d, offset, len),
        (None, DataOp::Read) => t.backing.read_at(buf, offset),
        (None, DataOp::Write) => t.backing.write_at(buf, offset),
        (None, DataOp::Discard | DataOp::WriteZeroes) => t.backing.write_zeroes_at(offset, len),
        (_, DataOp::Flush) => t.flush(),
    }
}

fn image_io(t: &Target, origin: DeviceId, req: &DataRequest, buf: &mut [u8]) -> Result<(), Error> {
    let (offset, len) = (req.offset_bytes, req.len_bytes);
    match req.op {
        DataOp::Read => t.engine.image_read(origin, offset, buf),
        DataOp::Write => t.engine.image_write(origin, offset, buf),
        DataOp::Discard | DataOp::WriteZeroes => t.engine.image_write_zeroes(origin, offset, len),
        DataOp::Flush => t.flush(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex, RwLock};

    use blksnap_engine::io::{BlockDev, Dev, MemDev};
    use blksnap_engine::{Engine, EngineConfig};

    /// A memory device that logs writes, zeroings and flushes in order.
    struct Logged {
        mem: MemDev,
        log: Mutex<Vec<&'static str>>,
    }

    impl BlockDev for Logged {
        fn len_bytes(&self) -> u64 {
            self.mem.len_bytes()
        }
        fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> blksnap_model::Result<()> {
            self.mem.read_at(buf, offset_bytes)
        }
        fn write_at(&self, buf: &[u8], offset_bytes: u64) -> blksnap_model::Result<()> {
            self.log.lock().unwrap().push("write");
            self.mem.write_at(buf, offset_bytes)
        }
        fn write_zeroes_at(&self, offset_bytes: u64, len_bytes: u64) -> blksnap_model::Result<()> {
            self.log.lock().unwrap().push("zeroes");
            self.mem.write_zeroes_at(offset_bytes, len_bytes)
        }
        fn flush(&self) -> blksnap_model::Result<()> {
            self.log.lock().unwrap().push("flush");
            Ok(())
        }
    }

    fn target(attached: bool) -> (Arc<Target>, Arc<Logged>) {
        let engine = Arc::new(Engine::new(EngineConfig::default()).unwrap());
        let logged = Arc::new(Logged { mem: MemDev::new(1 << 20), log: Mutex::new(Vec::new()) });
        let backing: Dev = logged.clone();
        let origin = DeviceId::new(240, 0);
        if attached {
            engine.add_disk(origin, backing.clone(), 1).unwrap();
            engine.attach(origin).unwrap();
        }
        let t = Target {
            engine,
            origin: RwLock::new(attached.then_some(origin)),
            backing,
            direct_backing: None,
            storages: Mutex::new(Vec::new()),
            image_of: None,
            failed: AtomicBool::new(false),
        };
        (Arc::new(t), logged)
    }

    fn req(op: DataOp, offset_bytes: u64, len_bytes: u64, fua: bool) -> DataRequest {
        DataRequest { op, offset_bytes, len_bytes, fua }
    }

    #[test]
    fn fua_write_is_flushed_before_completion_and_flush_flushes() {
        for attached in [false, true] {
            let (t, log) = target(attached);
            let mut data = vec![7u8; 4096];
            serve(&t, &req(DataOp::Write, 8192, 4096, false), &mut data).unwrap();
            assert_eq!(*log.log.lock().unwrap(), ["write"], "attached {attached}");
            serve(&t, &req(DataOp::Write, 8192, 4096, true), &mut data).unwrap();
            assert_eq!(*log.log.lock().unwrap(), ["write", "write", "flush"]);
            serve(&t, &req(DataOp::Flush, 0, 0, false), &mut []).unwrap();
            assert_eq!(*log.log.lock().unwrap(), ["write", "write", "flush", "flush"]);
            // a FUA read flushes nothing
            let mut back = vec![0u8; 4096];
            serve(&t, &req(DataOp::Read, 8192, 4096, true), &mut back).unwrap();
            assert_eq!(back, data);
            assert_eq!(log.log.lock().unwrap().len(), 4);
        }
    }

    #[test]
    fn discard_and_write_zeroes_zero_the_backing_range() {
        for attached in [false, true] {
            let (t, log) = target(attached);
            let mut data = vec![9u8; 16384];
            serve(&t, &req(DataOp::Write, 0, 16384, false), &mut data).unwrap();
            serve(&t, &req(DataOp::Discard, 4096, 4096, false), &mut []).unwrap();
            serve(&t, &req(DataOp::WriteZeroes, 12288, 4096, true), &mut []).unwrap();
            assert_eq!(*log.log.lock().unwrap(), ["write", "zeroes", "zeroes", "flush"]);
            let mut back = vec![1u8; 16384];
            serve(&t, &req(DataOp::Read, 0, 16384, false), &mut back).unwrap();
            assert!(back[..4096].iter().all(|b| *b == 9));
            assert!(back[4096..8192].iter().all(|b| *b == 0));
            assert!(back[8192..12288].iter().all(|b| *b == 9));
            assert!(back[12288..].iter().all(|b| *b == 0));
        }
    }

    #[test]
    fn oversized_request_and_past_the_end_fail_without_io() {
        let (t, log) = target(true);
        let mut small = vec![0u8; 512];
        assert_eq!(serve(&t, &req(DataOp::Write, 0, 4096, false), &mut small), Err(Errno::EINVAL));
        // the engine's range check: EINVAL past the end
        assert_eq!(
            serve(&t, &req(DataOp::Discard, 1 << 20, 4096, false), &mut []),
            Err(Errno::EINVAL)
        );
        assert!(log.log.lock().unwrap().is_empty());
        assert!(!t.failed.load(Ordering::Acquire));
    }

    /// An image's discard reaches the difference storage as holes, not zero buffers: on a
    /// sparse storage file (served as blksnapd serves one), the allocated bytes (`st_blocks`)
    /// do not grow by a discard of whole chunks that were never stored, and shrink by a discard
    /// of stored ones; the image reads zeroes there, the origin is untouched. The numbers are
    /// printed (`--nocapture`), with the old way (image writes of zero buffers) beside them.
    #[test]
    fn image_discard_punches_holes_in_the_storage() {
        use std::os::unix::fs::MetadataExt;

        use blksnap_engine::StorageSpec;

        use crate::daemon::backing_io::{BackingDev, DirectIo};

        const MIB: u64 = 1 << 20;
        const RANGE: u64 = 64 * MIB;
        // Buffered (the default for files) and direct.
        for direct in [DirectIo::Auto, DirectIo::Always] {
            let engine = Arc::new(Engine::new(EngineConfig::default()).unwrap());
            let origin = DeviceId::new(240, 0);
            let origin_dev: Dev = Arc::new(MemDev::new(3 * RANGE));
            origin_dev.write_at(&vec![0x5a; (3 * RANGE) as usize], 0).unwrap();
            engine.add_disk(origin, origin_dev.clone(), 1).unwrap();
            engine.attach(origin).unwrap();
            let tmp = tempfile::NamedTempFile::new().unwrap();
            let file = std::fs::OpenOptions::new().read(true).write(true).open(tmp.path()).unwrap();
            let storage: Dev = Arc::new(BackingDev::new(file, direct, "storage").unwrap());
            let allocated = || tmp.as_file().metadata().unwrap().blocks() * 512;
            let spec =
                StorageSpec::File { backend: storage.clone(), limit_sectors: (1 << 30) >> 9 };
            let id = engine.snapshot_create(spec).unwrap();
            engine.snapshot_add(id, origin).unwrap();
            engine.snapshot_take(id).unwrap();
            let image = Target {
                engine: engine.clone(),
                origin: RwLock::new(None),
                backing: origin_dev.clone(),
                direct_backing: None,
                storages: Mutex::new(vec![storage]),
                image_of: Some(origin),
                failed: AtomicBool::new(false),
            };
            let discard = |offset_bytes: u64| {
                serve(&image, &req(DataOp::Discard, offset_bytes, RANGE, true), &mut []).unwrap();
            };

            let start = allocated();
            // Whole chunks never stored: stored as holes.
            discard(0);
            let after_fresh = allocated();
            // Whole chunks stored by image writes, then discarded: the holes come back.
            let mut data = vec![0xc3u8; 4 * MIB as usize];
            for at in (RANGE..2 * RANGE).step_by(data.len()) {
                serve(&image, &req(DataOp::Write, at, data.len() as u64, false), &mut data)
                    .unwrap();
            }
            let after_write = allocated();
            discard(RANGE);
            let after_stored = allocated();
            // The old way, for comparison: zero buffers written through image_write.
            let zeroes = vec![0u8; MIB as usize];
            for at in (2 * RANGE..3 * RANGE).step_by(zeroes.len()) {
                engine.image_write(origin, at, &zeroes).unwrap();
            }
            let after_zero_writes = allocated();
            println!(
                "{direct:?} storage allocated bytes: {start} at take, {after_fresh} after a 64 MiB image \
                 discard of unstored chunks, {after_write} after 64 MiB of image writes, \
                 {after_stored} after discarding those, {after_zero_writes} after 64 MiB of image \
                 writes of zero buffers (the old way)"
            );
            let slack = 4 * MIB; // metadata and the filesystem's rounding, not the data
            assert!(after_fresh <= start + slack, "discard allocated {after_fresh} bytes");
            assert!(after_write >= after_fresh + RANGE, "the writes must allocate: {after_write}");
            assert!(after_stored <= after_fresh + slack, "no holes punched: {after_stored}");
            assert!(after_zero_writes >= after_stored + RANGE, "the old way allocates");

            let mut back = vec![0xffu8; (2 * RANGE) as usize];
            engine.image_read(origin, 0, &mut back).unwrap();
            assert!(back.iter().all(|b| *b == 0), "the discarded image reads zeroes");
            engine.read(origin, 0, &mut back).unwrap();
            assert!(back.iter().all(|b| *b == 0x5a), "the origin is untouched");
            engine.snapshot_destroy(id).unwrap();
        }
    }
}
