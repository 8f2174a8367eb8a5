//! A small blocking NBD client: what `blksnap backup` pulls an image with. One connection, one
//! request at a time; fixed newstyle, TLS by `NBD_OPT_STARTTLS` (client certificate), structured
//! replies, metadata contexts, `NBD_OPT_GO`; READ, BLOCK_STATUS, DISC.
//!
//! URIs (the NBD URI convention): `nbd://HOST[:PORT]/EXPORT`, `nbds://…` (TLS),
//! `nbd+unix:///EXPORT?socket=PATH`, `nbds+unix:///EXPORT?socket=PATH`; TLS takes its files
//! from `tls-certificates=DIR` (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`). The port
//! defaults to 10809.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use super::wire::*;
use super::Socket;

/// A client-side failure: an errno for the exit status and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdError {
    /// Positive errno.
    pub errno: i32,
    /// What happened.
    pub message: String,
}

impl NbdError {
    fn new(errno: i32, message: impl Into<String>) -> NbdError {
        NbdError { errno, message: message.into() }
    }
}

impl std::fmt::Display for NbdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> NbdError + '_ {
    move |e| NbdError::new(e.raw_os_error().unwrap_or(libc::EIO), format!("{what}: {e}"))
}

fn proto(msg: impl Into<String>) -> NbdError {
    NbdError::new(libc::EPROTO, msg)
}

/// Where the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// TCP host and port.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// Unix socket.
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// The server.
    pub endpoint: Endpoint,
    /// The export's name (percent-decoded).
    pub export: String,
    /// TLS (`nbds` schemes).
    pub tls: bool,
    /// `tls-certificates=DIR`.
    pub tls_dir: Option<PathBuf>,
}

/// Whether `s` looks like an NBD URI (rather than a path).
pub fn is_uri(s: &str) -> bool {
    ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"].iter().any(|p| s.starts_with(p))
}

fn percent_decode(s: &str) -> Result<String, NbdError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex =
                s.get(i + 1..i + 3).ok_or_else(|| NbdError::new(libc::EINVAL, "bad % escape"))?;
            out.push(
                u8::from_str_radix(hex, 16)
                    .map_err(|_| NbdError::new(libc::EINVAL, "bad % escape"))?,
            );
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| NbdError::new(libc::EINVAL, "the URI is not UTF-8"))
}

impl NbdUri {
    /// Parses an NBD URI.
    pub fn parse(s: &str) -> Result<NbdUri, NbdError> {
        let bad = |why: &str| NbdError::new(libc::EINVAL, format!("{s}: {why}"));
        let (scheme, rest) = s.split_once("://").ok_or_else(|| bad("not a URI"))?;
        let (tls, unix) = match scheme {
            "nbd" => (false, false),
            "nbds" => (true, false),
            "nbd+unix" => (false, true),
            "nbds+unix" => (true, true),
            _ => return Err(bad("scheme must be nbd, nbds, nbd+unix or nbds+unix")),
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path)?;
        let mut socket = None;
        let mut tls_dir = None;
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "socket" => socket = Some(PathBuf::from(percent_decode(v)?)),
                "tls-certificates" => tls_dir = Some(PathBuf::from(percent_decode(v)?)),
                _ => return Err(bad(&format!("unknown query parameter {k}"))),
            }
        }
        let endpoint = if unix {
            if !authority.is_empty() {
                return Err(bad("a unix URI has no host"));
            }
            Endpoint::Unix(socket.ok_or_else(|| bad("socket=PATH is missing"))?)
        } else {
            if socket.is_some() {
                return Err(bad("socket= is for nbd+unix URIs"));
            }
            let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                let (h, p) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
                (h.to_string(), p.strip_prefix(':'))
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), Some(p)),
                    None => (authority.to_string(), None),
                }
            };
            if host.is_empty() {
                return Err(bad("no host"));
            }
            let port = match port {
                Some(p) => p.parse().map_err(|_| bad("bad port"))?,
                None => 10809,
            };
            Endpoint::Tcp { host, port }
        };
        Ok(NbdUri { endpoint, export, tls, tls_dir })
    }
}

/// A connected client in the transmission phase.
pub struct Client {
    s: Box<dyn Socket>,
    size: u64,
    flags: u16,
    /// Contexts the server listed for `qemu:dirty-bitmap:` (names).
    listed: Vec<String>,
    /// Selected contexts: (id, name).
    selected: Vec<(u32, String)>,
    cookie: u64,
    /// A read sent ahead of the caller (cookie, offset, length): a sequential reader finds
    /// its next range already on the way, so the server reads while the caller writes.
    ahead: Option<(u64, u64, usize)>,
    read_ahead: bool,
}

/// How a server's error reply starts its message.
const SERVER_ERROR: &str = "server error";

/// Most bytes one READ asks for.
pub const READ_UNIT_BYTES: usize = 4 << 20;

fn opt(s: &mut dyn Socket, opt: u32, data: &[u8]) -> Result<(), NbdError> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.put_u64(IHAVEOPT);
    m.put_u32(opt);
    m.put_u32(data.len() as u32);
    m.extend_from_slice(data);
    s.write_all(&m).and_then(|()| s.flush()).map_err(io_err("send option"))
}

/// Reads one option reply: (type, data). Errors from the server become `NbdError`s.
fn opt_reply_read(s: &mut dyn Socket, want: u32) -> Result<(u32, Vec<u8>), NbdError> {
    let mut r = s;
    let magic = get_u64(&mut r).map_err(io_err("option reply"))?;
    let o = get_u32(&mut r).map_err(io_err("option reply"))?;
    let kind = get_u32(&mut r).map_err(io_err("option reply"))?;
    let len = get_u32(&mut r).map_err(io_err("option reply"))?;
    if magic != OPT_REPLY_MAGIC || o != want || len > 16 << 20 {
        return Err(proto("bad option reply"));
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data).map_err(io_err("option reply"))?;
    if kind & (1 << 31) != 0 {
        let msg = String::from_utf8_lossy(&data).into_owned();
        let errno = match kind {
            REP_ERR_UNKNOWN => libc::ENOENT,
            REP_ERR_TLS_REQD | REP_ERR_POLICY => libc::EACCES,
            REP_ERR_UNSUP => libc::EOPNOTSUPP,
            REP_ERR_INVALID => libc::EINVAL,
            REP_ERR_SHUTDOWN => libc::ESHUTDOWN,
            _ => libc::EPROTO,
        };
        return Err(NbdError::new(errno, format!("server refused option {want}: {msg}")));
    }
    Ok((kind, data))
}

fn meta_data(export: &str, queries: &[String]) -> Vec<u8> {
    let mut m = Vec::new();
    m.put_str(export);
    m.put_u32(queries.len() as u32);
    for q in queries {
        m.put_str(q);
    }
    m
}

/// Reads META_CONTEXT replies until the ACK.
fn contexts_read(s: &mut dyn Socket, o: u32) -> Result<Vec<(u32, String)>, NbdError> {
    let mut out = Vec::new();
    loop {
        let (kind, data) = opt_reply_read(s, o)?;
        match kind {
            REP_ACK => return Ok(out),
            REP_META_CONTEXT => {
                let mut c = Cursor::new(&data);
                let id = c.u32().ok_or_else(|| proto("short META_CONTEXT"))?;
                out.push((id, String::from_utf8_lossy(c.rest()).into_owned()));
            }
            _ => return Err(proto("unexpected reply to a meta context option")),
        }
    }
}

impl Client {
    /// Connects, negotiates (TLS if the URI says so, structured replies, the contexts in
    /// `contexts`) and enters transmission on the URI's export. `timeout` bounds every read
    /// and write.
    pub fn connect(
        uri: &NbdUri,
        contexts: &[String],
        timeout: Duration,
    ) -> Result<Client, NbdError> {
        let mut s: Box<dyn Socket> = match &uri.endpoint {
            Endpoint::Tcp { host, port } => {
                let t = TcpStream::connect((host.as_str(), *port)).map_err(io_err("connect"))?;
                let _ = t.set_nodelay(true);
                t.set_read_timeout(Some(timeout)).map_err(io_err("socket"))?;
                t.set_write_timeout(Some(timeout)).map_err(io_err("socket"))?;
                Box::new(t)
            }
            Endpoint::Unix(p) => {
                let u = UnixStream::connect(p).map_err(io_err("connect"))?;
                u.set_read_timeout(Some(timeout)).map_err(io_err("socket"))?;
                u.set_write_timeout(Some(timeout)).map_err(io_err("socket"))?;
                Box::new(u)
            }
        };
        let magic = get_u64(&mut s).map_err(io_err("greeting"))?;
        let opt_magic = get_u64(&mut s).map_err(io_err("greeting"))?;
        let hflags = get_u16(&mut s).map_err(io_err("greeting"))?;
        if magic != NBDMAGIC || opt_magic != IHAVEOPT || hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(proto("not a fixed-newstyle NBD server"));
        }
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if hflags & FLAG_NO_ZEROES != 0 {
            cflags |= FLAG_C_NO_ZEROES;
        }
        s.write_all(&cflags.to_be_bytes()).map_err(io_err("client flags"))?;
        if uri.tls {
            let dir = uri.tls_dir.clone().ok_or_else(|| {
                NbdError::new(libc::EINVAL, "TLS needs tls-certificates=DIR in the URI")
            })?;
            let cfg = super::tls::client_config(
                &dir.join("ca-cert.pem"),
                &dir.join("client-cert.pem"),
                &dir.join("client-key.pem"),
            )
            .map_err(|m| NbdError::new(libc::EINVAL, m))?;
            opt(s.as_mut(), OPT_STARTTLS, &[])?;
            opt_reply_read(s.as_mut(), OPT_STARTTLS)?;
            let host = match &uri.endpoint {
                Endpoint::Tcp { host, .. } => host.clone(),
                Endpoint::Unix(_) => "localhost".to_string(),
            };
            s = super::tls::connect(s, &cfg, &host).map_err(io_err("TLS handshake"))?;
        }
        opt(s.as_mut(), OPT_STRUCTURED_REPLY, &[])?;
        opt_reply_read(s.as_mut(), OPT_STRUCTURED_REPLY)?;
        let export = uri.export.as_str();
        opt(s.as_mut(), OPT_LIST_META_CONTEXT, &meta_data(export, &[DIRTY_NS.to_string()]))?;
        let listed = match contexts_read(s.as_mut(), OPT_LIST_META_CONTEXT) {
            Ok(l) => l.into_iter().map(|(_, n)| n).collect(),
            Err(e) if e.errno == libc::EOPNOTSUPP => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut selected = Vec::new();
        if !contexts.is_empty() {
            opt(s.as_mut(), OPT_SET_META_CONTEXT, &meta_data(export, contexts))?;
            selected = contexts_read(s.as_mut(), OPT_SET_META_CONTEXT)?;
            for want in contexts {
                if !selected.iter().any(|(_, n)| n == want) {
                    return Err(NbdError::new(
                        libc::ESTALE,
                        format!("the server does not offer the context {want} on {export}"),
                    ));
                }
            }
        }
        let mut go = Vec::new();
        go.put_str(export);
        go.put_u16(0);
        opt(s.as_mut(), OPT_GO, &go)?;
        let mut size_flags = None;
        loop {
            let (kind, data) = opt_reply_read(s.as_mut(), OPT_GO)?;
            match kind {
                REP_ACK => break,
                REP_INFO => {
                    let mut c = Cursor::new(&data);
                    if c.u16() == Some(INFO_EXPORT) {
                        let size = c.u64().ok_or_else(|| proto("short INFO_EXPORT"))?;
                        let flags = c.u16().ok_or_else(|| proto("short INFO_EXPORT"))?;
                        size_flags = Some((size, flags));
                    }
                }
                _ => return Err(proto("unexpected reply to NBD_OPT_GO")),
            }
        }
        let (size, flags) = size_flags.ok_or_else(|| proto("no NBD_INFO_EXPORT before the ACK"))?;
        Ok(Client { s, size, flags, listed, selected, cookie: 0, ahead: None, read_ahead: true })
    }

    /// Turns the read ahead of sequential reads off (a reader that strides) or on.
    pub fn set_read_ahead(&mut self, on: bool) -> Result<(), NbdError> {
        self.read_ahead = on;
        let ahead = self.ahead.take();
        self.settle(ahead)
    }

    /// The export's size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size
    }

    /// The transmission flags.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// The `qemu:dirty-bitmap:` contexts the server listed for the export.
    pub fn listed_contexts(&self) -> &[String] {
        &self.listed
    }

    fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
    ) -> Result<u64, NbdError> {
        self.cookie += 1;
        let h = RequestHeader { flags, kind, cookie: self.cookie, offset, length };
        self.s
            .write_all(&h.encode())
            .and_then(|()| self.s.flush())
            .map_err(io_err("send request"))?;
        Ok(self.cookie)
    }

    /// One structured reply chunk's header: (flags, type, length).
    fn chunk(&mut self, cookie: u64) -> Result<(u16, u16, u32), NbdError> {
        let r = &mut self.s;
        let magic = get_u32(r).map_err(io_err("reply"))?;
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(proto(format!("bad reply magic {magic:#x}")));
        }
        let flags = get_u16(r).map_err(io_err("reply"))?;
        let kind = get_u16(r).map_err(io_err("reply"))?;
        let c = get_u64(r).map_err(io_err("reply"))?;
        let len = get_u32(r).map_err(io_err("reply"))?;
        if c != cookie {
            return Err(proto("reply to another request"));
        }
        Ok((flags, kind, len))
    }

    fn payload(&mut self, len: u32) -> Result<Vec<u8>, NbdError> {
        if len > MAX_PAYLOAD_BYTES + 64 {
            return Err(proto("reply chunk too large"));
        }
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).map_err(io_err("reply"))?;
        Ok(d)
    }

    fn error_chunk(&mut self, len: u32) -> NbdError {
        match self.payload(len) {
            Ok(d) => {
                let mut c = Cursor::new(&d);
                let errno = c.u32().unwrap_or(EIO);
                let n = c.u16().unwrap_or(0) as usize;
                let msg =
                    c.take(n).map(|m| String::from_utf8_lossy(m).into_owned()).unwrap_or_default();
                NbdError::new(errno as i32, format!("{SERVER_ERROR} {errno}: {msg}"))
            }
            Err(e) => e,
        }
    }

    /// Reads `buf.len()` bytes at `offset` (at most [`READ_UNIT_BYTES`] per request). After
    /// each request the same length that follows is asked for ahead (within the export).
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), NbdError> {
        for (i, part) in buf.chunks_mut(READ_UNIT_BYTES).enumerate() {
            let off = offset + (i * READ_UNIT_BYTES) as u64;
            let cookie = match self.ahead.take() {
                Some((cookie, o, n)) if o == off && n == part.len() => cookie,
                other => {
                    self.settle(other)?;
                    self.request(CMD_READ, 0, off, part.len() as u32)?
                }
            };
            let next = off + part.len() as u64;
            if self.read_ahead && next + part.len() as u64 <= self.size {
                let c = self.request(CMD_READ, 0, next, part.len() as u32)?;
                self.ahead = Some((c, next, part.len()));
            }
            self.read_reply(cookie, part, off)?;
        }
        Ok(())
    }

    /// Takes the reply of a read sent ahead that nobody wants: an error the server answered
    /// does not matter (nobody asked), but the stream must stay in step.
    fn settle(&mut self, ahead: Option<(u64, u64, usize)>) -> Result<(), NbdError> {
        let Some((cookie, off, n)) = ahead else { return Ok(()) };
        let mut scratch = vec![0u8; n];
        match self.read_reply(cookie, &mut scratch, off) {
            Err(e) if !e.message.starts_with(SERVER_ERROR) => Err(e),
            _ => Ok(()),
        }
    }

    fn read_reply(&mut self, cookie: u64, buf: &mut [u8], offset: u64) -> Result<(), NbdError> {
        let mut got = 0u64;
        loop {
            let (flags, kind, len) = self.chunk(cookie)?;
            match kind {
                REPLY_TYPE_OFFSET_DATA => {
                    let off = get_u64(&mut self.s).map_err(io_err("reply"))?;
                    let n = u64::from(len.checked_sub(8).ok_or_else(|| proto("short data chunk"))?);
                    let start = off.checked_sub(offset).filter(|s| s + n <= buf.len() as u64);
                    let Some(start) = start else {
                        return Err(proto("data chunk outside the request"));
                    };
                    let dst = &mut buf[start as usize..(start + n) as usize];
                    self.s.read_exact(dst).map_err(io_err("reply"))?;
                    got += n;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let d = self.payload(len)?;
                    let mut c = Cursor::new(&d);
                    let (off, n) = (c.u64(), c.u32());
                    let (Some(off), Some(n)) = (off, n) else {
                        return Err(proto("short hole chunk"));
                    };
                    let start =
                        off.checked_sub(offset).filter(|s| s + u64::from(n) <= buf.len() as u64);
                    let Some(start) = start else {
                        return Err(proto("hole chunk outside the request"));
                    };
                    buf[start as usize..start as usize + n as usize].fill(0);
                    got += u64::from(n);
                }
                REPLY_TYPE_NONE => {
                    self.payload(len)?;
                }
                REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => return Err(self.error_chunk(len)),
                _ => return Err(proto(format!("unexpected reply chunk type {kind}"))),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if got != buf.len() as u64 {
            return Err(proto("the read reply did not cover the request"));
        }
        Ok(())
    }

    /// Block status of the selected context `name` over `[offset, offset + len)`: extents
    /// `(offset, length, flags)` from `offset` on (they may cover less than asked).
    pub fn block_status(
        &mut self,
        name: &str,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u64, u32, u32)>, NbdError> {
        let ahead = self.ahead.take();
        self.settle(ahead)?;
        let id =
            self.selected.iter().find(|(_, n)| n == name).map(|(id, _)| *id).ok_or_else(|| {
                NbdError::new(libc::EINVAL, format!("context {name} not selected"))
            })?;
        let cookie = self.request(CMD_BLOCK_STATUS, 0, offset, len)?;
        let mut out = Vec::new();
        loop {
            let (flags, kind, clen) = self.chunk(cookie)?;
            match kind {
                REPLY_TYPE_BLOCK_STATUS => {
                    let d = self.payload(clen)?;
                    let mut c = Cursor::new(&d);
                    let ctx = c.u32().ok_or_else(|| proto("short block status"))?;
                    if ctx == id {
                        let mut pos = offset;
                        while let (Some(l), Some(f)) = (c.u32(), c.u32()) {
                            out.push((pos, l, f));
                            pos += u64::from(l);
                        }
                    }
                }
                REPLY_TYPE_NONE => {
                    self.payload(clen)?;
                }
                REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => return Err(self.error_chunk(clen)),
                _ => return Err(proto(format!("unexpected reply chunk type {kind}"))),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if out.is_empty() || out.iter().any(|(_, l, _)| *l == 0) {
            return Err(proto("empty block status"));
        }
        Ok(out)
    }

    /// Sends NBD_CMD_DISC (the server closes).
    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0);
    }
}

const DIRTY_NS: &str = super::contexts::DIRTY_BITMAP_NS;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let u = NbdUri::parse("nbd://host:1234/image-240:0").unwrap();
        assert_eq!(u.endpoint, Endpoint::Tcp { host: "host".into(), port: 1234 });
        assert_eq!(u.export, "image-240:0");
        assert!(!u.tls);
        let u = NbdUri::parse("nbds://[::1]/a%20b?tls-certificates=/etc/pki").unwrap();
        assert_eq!(u.endpoint, Endpoint::Tcp { host: "::1".into(), port: 10809 });
        assert_eq!(u.export, "a b");
        assert_eq!(u.tls_dir, Some(PathBuf::from("/etc/pki")));
        let u = NbdUri::parse("nbd+unix:///image-240:0?socket=/run/nbd").unwrap();
        assert_eq!(u.endpoint, Endpoint::Unix("/run/nbd".into()));
        assert!(NbdUri::parse("nbd+unix:///x").is_err());
        assert!(NbdUri::parse("http://x/y").is_err());
        assert!(NbdUri::parse("nbd://:1/x").is_err());
        assert!(NbdUri::parse("nbd://h:99999/x").is_err());
        assert!(NbdUri::parse("nbd://h/x?bogus=1").is_err());
        assert!(is_uri("nbds+unix:///x?socket=/s") && !is_uri("/dev/x"));
    }
}
