//! The transmission phase: one request at a time, in order, each answered before the next is
//! read (clients that pipeline simply wait; `nbdcopy` opens several connections, which
//! `NBD_FLAG_CAN_MULTI_CONN` allows). Data goes through the daemon's data path
//! (`crate::daemon::serve`), exactly as the ublk front end sends it: images with
//! `Engine::image_read`, origins with `Engine::read/write/discard/write_zeroes` under the
//! target's origin lock, flushes of the difference storage and the backing.
//!
//! Errors are replies, never a dropped connection, except where the stream cannot be trusted:
//! a bad magic, a write whose payload is over the limit (its bytes are not read), an export
//! withdrawn (ESHUTDOWN, then closed), or a request that panicked (EIO, then closed).

use std::io::{BufReader, Read, Write};
use std::sync::Arc;

use blksnap_model::{Errno, Error};

use super::contexts::{self, Context};
use super::handshake::Session;
use super::wire::*;
use super::{Export, Socket};
use crate::daemon::serve::{self as data_path, DataOp, DataRequest};

/// Bytes buffered from the client (request headers and write payloads).
const READ_BUFFER_BYTES: usize = 256 << 10;

struct Conn {
    r: BufReader<Box<dyn Socket>>,
    structured: bool,
    /// Reply buffer, reused (grows to the largest read answered).
    out: Vec<u8>,
}

impl Conn {
    fn w(&mut self) -> &mut Box<dyn Socket> {
        self.r.get_mut()
    }

    fn send(&mut self, len: usize) -> std::io::Result<()> {
        let out = std::mem::take(&mut self.out);
        let res = self.w().write_all(&out[..len]).and_then(|()| self.w().flush());
        self.out = out;
        res
    }

    fn ok(&mut self, cookie: u64) -> std::io::Result<()> {
        let mut m = Vec::with_capacity(20);
        if self.structured {
            chunk_header(&mut m, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
        } else {
            m.put_u32(SIMPLE_REPLY_MAGIC);
            m.put_u32(0);
            m.put_u64(cookie);
        }
        self.w().write_all(&m)?;
        self.w().flush()
    }

    fn err(&mut self, cookie: u64, errno: u32, msg: &str) -> std::io::Result<()> {
        let mut m = Vec::with_capacity(32 + msg.len());
        if self.structured {
            let msg = &msg.as_bytes()[..msg.len().min(MAX_STRING_BYTES)];
            chunk_header(&mut m, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6 + msg.len() as u32);
            m.put_u32(errno);
            m.put_u16(msg.len() as u16);
            m.extend_from_slice(msg);
        } else {
            m.put_u32(SIMPLE_REPLY_MAGIC);
            m.put_u32(errno);
            m.put_u64(cookie);
        }
        self.w().write_all(&m)?;
        self.w().flush()
    }

    fn engine_err(&mut self, cookie: u64, e: &Error) -> std::io::Result<()> {
        self.err(cookie, errno_to_wire(e.errno), e.detail)
    }
}

/// Serves `session` until the client disconnects, the connection fails or the export goes.
pub fn serve(session: Session, max_request_bytes: u32) {
    let Session { stream, export, slot, structured, contexts } = session;
    let _slot = slot;
    let mut c = Conn {
        r: BufReader::with_capacity(READ_BUFFER_BYTES, stream),
        structured,
        out: Vec::new(),
    };
    let mut payload = Vec::new();
    loop {
        let mut h = [0u8; 28];
        if c.r.read_exact(&mut h).is_err() {
            return;
        }
        let mut cur = Cursor::new(&h);
        let magic = cur.u32().unwrap_or(0);
        let req = RequestHeader {
            flags: cur.u16().unwrap_or(0),
            kind: cur.u16().unwrap_or(0),
            cookie: cur.u64().unwrap_or(0),
            offset: cur.u64().unwrap_or(0),
            length: cur.u32().unwrap_or(0),
        };
        if magic != REQUEST_MAGIC {
            return;
        }
        if req.kind == CMD_DISC {
            return;
        }
        if req.kind == CMD_WRITE {
            if req.length > max_request_bytes {
                let msg =
                    format!("write of {} bytes over the limit {max_request_bytes}", req.length);
                let _ = c.err(req.cookie, EINVAL, &msg);
                return; // its payload was not read: the stream is out of step
            }
            payload.resize(req.length as usize, 0);
            if c.r.read_exact(&mut payload).is_err() {
                return;
            }
        }
        if export.is_gone() {
            let _ = c.err(req.cookie, ESHUTDOWN, "the export was withdrawn (snapshot destroyed)");
            return;
        }
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            one(&mut c, &export, &contexts, &req, &mut payload, max_request_bytes)
        }));
        match served {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                eprintln!(
                    "blksnapd: nbd: a request to {} panicked: connection closed",
                    export.name
                );
                let _ = c.err(req.cookie, EIO, "internal error");
                return;
            }
        }
    }
}

/// Checks `[offset, offset + len)` against the export.
fn in_range(export: &Export, offset: u64, len: u64) -> Result<(), Error> {
    match offset.checked_add(len) {
        Some(end) if end <= export.size_bytes() => Ok(()),
        _ => Err(Error::new(Errno::EINVAL, "the range is past the end of the export")),
    }
}

fn one(
    c: &mut Conn,
    export: &Arc<Export>,
    contexts: &[Context],
    req: &RequestHeader,
    payload: &mut [u8],
    max_request_bytes: u32,
) -> std::io::Result<()> {
    let cookie = req.cookie;
    let known_flags = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE;
    if req.flags & !known_flags != 0 {
        return c.err(cookie, EINVAL, "unknown command flags");
    }
    let len = u64::from(req.length);
    match req.kind {
        CMD_READ => {
            if req.length > max_request_bytes {
                let msg =
                    format!("read of {} bytes over the limit {max_request_bytes}", req.length);
                return c.err(cookie, EINVAL, &msg);
            }
            if let Err(e) = in_range(export, req.offset, len) {
                return c.engine_err(cookie, &e);
            }
            if req.length == 0 {
                return c.ok(cookie);
            }
            let hdr = if c.structured { 28 } else { 16 };
            let total = hdr + req.length as usize;
            if c.out.len() < total {
                c.out.resize(total, 0);
            }
            if let Err(e) = read(export, req.offset, &mut c.out[hdr..total]) {
                return c.engine_err(cookie, &e);
            }
            let mut m = Vec::with_capacity(hdr);
            if c.structured {
                chunk_header(
                    &mut m,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    cookie,
                    8 + req.length,
                );
                m.put_u64(req.offset);
            } else {
                m.put_u32(SIMPLE_REPLY_MAGIC);
                m.put_u32(0);
                m.put_u64(cookie);
            }
            c.out[..hdr].copy_from_slice(&m);
            c.send(total)
        }
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => {
            if !export.writable {
                return c.err(cookie, EPERM, "the export is read-only");
            }
            if let Err(e) = in_range(export, req.offset, len) {
                return c.engine_err(cookie, &e);
            }
            if !req.offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
                return c.err(cookie, EINVAL, "writes must be in whole 512-byte blocks");
            }
            let fua = req.flags & CMD_FLAG_FUA != 0;
            match write(export, req.kind, req.offset, len, payload, fua) {
                Ok(()) => c.ok(cookie),
                Err(e) => c.engine_err(cookie, &e),
            }
        }
        CMD_FLUSH => match data(export, DataOp::Flush, 0, 0, false, &mut []) {
            Ok(()) => c.ok(cookie),
            Err(e) => c.engine_err(cookie, &e),
        },
        CMD_BLOCK_STATUS => block_status(c, export, contexts, req),
        _ => c.err(cookie, EINVAL, "unknown command"),
    }
}

/// The engine's I/O unit: its requests are in whole sectors.
const SECTOR: u64 = 512;

/// Reads `buf` at `offset`; a range not in whole sectors is read through an aligned bounce
/// buffer (clients are told the minimum block is 512 bytes, but a read is harmless to serve).
fn read(export: &Export, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
    let end = offset + buf.len() as u64;
    if offset.is_multiple_of(SECTOR) && end.is_multiple_of(SECTOR) {
        return read_aligned(export, offset, buf);
    }
    let start = offset - offset % SECTOR;
    let mut bounce = vec![0u8; (end.next_multiple_of(SECTOR) - start) as usize];
    read_aligned(export, start, &mut bounce)?;
    let skip = (offset - start) as usize;
    buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
    Ok(())
}

fn read_aligned(export: &Export, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
    data(export, DataOp::Read, offset, buf.len() as u64, false, buf)
}

fn write(
    export: &Export,
    kind: u16,
    offset: u64,
    len: u64,
    payload: &mut [u8],
    fua: bool,
) -> Result<(), Error> {
    if export.target.image_of.is_some() {
        return Err(Error::new(Errno::EPERM, "images are exported read-only"));
    }
    let op = match kind {
        CMD_WRITE => DataOp::Write,
        CMD_TRIM => DataOp::Discard,
        _ => DataOp::WriteZeroes,
    };
    data(export, op, offset, len, fua, payload)
}

/// One request through the daemon's data path (`crate::daemon::serve`, what the ublk front end
/// calls): the engine's calls, the origin lock, flushes, a contained panic.
fn data(
    export: &Export,
    op: DataOp,
    offset_bytes: u64,
    len_bytes: u64,
    fua: bool,
    buf: &mut [u8],
) -> Result<(), Error> {
    let req = DataRequest { op, offset_bytes, len_bytes, fua };
    data_path::serve(&export.target, &req, buf).map_err(|errno| {
        let detail = match errno {
            Errno::EIO => "I/O error (the snapshot failed or was destroyed, or the backing failed)",
            Errno::EINVAL => "invalid range",
            Errno::ENOSPC => "no space left in the difference storage",
            _ => "the request failed",
        };
        Error::new(errno, detail)
    })
}

fn block_status(
    c: &mut Conn,
    export: &Export,
    contexts: &[Context],
    req: &RequestHeader,
) -> std::io::Result<()> {
    let cookie = req.cookie;
    if !c.structured || contexts.is_empty() {
        return c.err(cookie, EINVAL, "no metadata context was selected");
    }
    if req.length == 0 {
        return c.err(cookie, EINVAL, "empty block-status range");
    }
    if let Err(e) = in_range(export, req.offset, u64::from(req.length)) {
        return c.engine_err(cookie, &e);
    }
    let Some(dev) = export.dev() else {
        return c.err(cookie, EIO, "the export has no device yet");
    };
    let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let mut chunks = Vec::with_capacity(contexts.len());
    for ctx in contexts {
        match contexts::extents(*ctx, &export.target.engine, dev, req.offset, req.length, req_one) {
            Ok(ext) => chunks.push((ctx.id(), ext)),
            Err(e) => return c.engine_err(cookie, &e),
        }
    }
    let mut m = Vec::new();
    let last = chunks.len() - 1;
    for (i, (id, ext)) in chunks.iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        chunk_header(&mut m, flags, REPLY_TYPE_BLOCK_STATUS, cookie, 4 + 8 * ext.len() as u32);
        m.put_u32(*id);
        for (l, f) in ext {
            m.put_u32(*l);
            m.put_u32(*f);
        }
    }
    c.w().write_all(&m)?;
    c.w().flush()
}
