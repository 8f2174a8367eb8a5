//! The NBD protocol's numbers (from the protocol document: facts only) and the small
//! big-endian helpers both the server and the client use. Every integer on the wire is in
//! network byte order.

use std::io::{self, Read, Write};

/// `NBDMAGIC`: the first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: after `NBDMAGIC` in the newstyle handshake, and before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server): fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flags (server): the client may omit the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flags: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// NBD_CMD_FLUSH is supported.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// NBD_CMD_FLAG_FUA is supported.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// NBD_CMD_TRIM is supported.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// NBD_CMD_WRITE_ZEROES is supported.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// NBD_CMD_FLAG_DF is supported.
pub const TF_SEND_DF: u16 = 1 << 7;
/// Several connections see one consistent export (flush on one covers writes on all).
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Ends the negotiation.
pub const OPT_ABORT: u32 = 2;
/// Lists the exports.
pub const OPT_LIST: u32 = 3;
/// Starts TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describes an export.
pub const OPT_INFO: u32 = 6;
/// Describes an export and enters transmission.
pub const OPT_GO: u32 = 7;
/// Structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Lists metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Selects metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Extended headers (not supported here: answered `REP_ERR_UNSUP`).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types.
pub const REP_ACK: u32 = 1;
/// One export of NBD_OPT_LIST.
pub const REP_SERVER: u32 = 2;
/// One information item of NBD_OPT_INFO/GO.
pub const REP_INFO: u32 = 3;
/// One metadata context.
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// The option is not supported.
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
/// Refused by policy.
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
/// Malformed option.
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
/// TLS first.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
/// No such export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
/// The server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
/// The option or its reply is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;

/// Information types.
pub const INFO_EXPORT: u16 = 0;
/// The export's name.
pub const INFO_NAME: u16 = 1;
/// The export's description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Write zeroes: do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Read: do not fragment the reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Block status: one extent only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply flags: the last chunk.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply types.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// A hole at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Block status descriptors of one context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// An error (errno, message).
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// An error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// `base:allocation` flags: a hole / reads as zeroes.
pub const STATE_HOLE: u32 = 1 << 0;
/// Reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:*`: the extent changed.
pub const STATE_DIRTY: u32 = 1 << 0;

/// Errors on the wire (the protocol's fixed list; anything else travels as EIO).
pub const EPERM: u32 = 1;
/// I/O error.
pub const EIO: u32 = 5;
/// Out of memory.
pub const ENOMEM: u32 = 12;
/// Invalid request.
pub const EINVAL: u32 = 22;
/// No space.
pub const ENOSPC: u32 = 28;
/// Too large.
pub const EOVERFLOW: u32 = 75;
/// Not supported.
pub const ENOTSUP: u32 = 95;
/// The server is going away (the export was withdrawn).
pub const ESHUTDOWN: u32 = 108;

/// NBD's limit on a request's payload that every client honours (32 MiB).
pub const MAX_PAYLOAD_BYTES: u32 = 32 << 20;
/// Longest string (export name, context name, message) the protocol allows.
pub const MAX_STRING_BYTES: usize = 4096;

/// The wire errno for an engine error.
pub fn errno_to_wire(e: blksnap_model::Errno) -> u32 {
    use blksnap_model::Errno as E;
    match e {
        E::EPERM => EPERM,
        E::ENOMEM => ENOMEM,
        E::EINVAL => EINVAL,
        E::ENOSPC => ENOSPC,
        E::EFBIG => EOVERFLOW,
        E::EOPNOTSUPP => ENOTSUP,
        _ => EIO,
    }
}

/// Reads a big-endian `u16`.
pub fn get_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

/// Reads a big-endian `u32`.
pub fn get_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// Reads a big-endian `u64`.
pub fn get_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// A cursor over an option's or a reply's payload: every read is bounds-checked, so a
/// malformed payload is an error, never a panic.
pub struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// Over `data`.
    pub fn new(data: &'a [u8]) -> Cursor<'a> {
        Cursor { data }
    }

    /// `n` bytes, or None if fewer are left.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.data.len() {
            return None;
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Some(head)
    }

    /// A big-endian `u16`.
    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// A big-endian `u32`.
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A big-endian `u64`.
    pub fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
    }

    /// A string preceded by its `u32` length (at most [`MAX_STRING_BYTES`], valid UTF-8).
    pub fn string(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        if len > MAX_STRING_BYTES {
            return None;
        }
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }

    /// What is left.
    pub fn rest(&self) -> &'a [u8] {
        self.data
    }
}

/// Appends big-endian integers and strings to a message being built.
pub trait Put {
    /// A `u16`.
    fn put_u16(&mut self, v: u16);
    /// A `u32`.
    fn put_u32(&mut self, v: u32);
    /// A `u64`.
    fn put_u64(&mut self, v: u64);
    /// A string preceded by its `u32` length.
    fn put_str(&mut self, s: &str);
}

impl Put for Vec<u8> {
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_str(&mut self, s: &str) {
        self.put_u32(s.len() as u32);
        self.extend_from_slice(s.as_bytes());
    }
}

/// Writes one option reply.
pub fn opt_reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(20 + data.len());
    m.put_u64(OPT_REPLY_MAGIC);
    m.put_u32(opt);
    m.put_u32(kind);
    m.put_u32(data.len() as u32);
    m.extend_from_slice(data);
    w.write_all(&m)?;
    w.flush()
}

/// The header of a structured reply chunk.
pub fn chunk_header(m: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, len: u32) {
    m.put_u32(STRUCTURED_REPLY_MAGIC);
    m.put_u16(flags);
    m.put_u16(kind);
    m.put_u64(cookie);
    m.put_u32(len);
}

/// A transmission request's header (28 bytes on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command.
    pub kind: u16,
    /// The client's cookie (echoed in the reply).
    pub cookie: u64,
    /// Offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

impl RequestHeader {
    /// The header on the wire.
    pub fn encode(&self) -> [u8; 28] {
        let mut m = Vec::with_capacity(28);
        m.put_u32(REQUEST_MAGIC);
        m.put_u16(self.flags);
        m.put_u16(self.kind);
        m.put_u64(self.cookie);
        m.put_u64(self.offset);
        m.put_u32(self.length);
        m.try_into().expect("28 bytes")
    }
}
