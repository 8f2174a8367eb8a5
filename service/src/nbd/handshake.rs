//! The fixed newstyle handshake: greeting, client flags, then options until the client picks
//! an export (`NBD_OPT_GO`, or the old `NBD_OPT_EXPORT_NAME`) or aborts.
//!
//! Bounds: an option's payload is at most [`MAX_OPTION_BYTES`] (a larger one closes the
//! connection: its bytes would have to be read to stay in step), and a connection may send at
//! most [`MAX_OPTIONS`] options. A listener with TLS answers every option but `STARTTLS` and
//! `ABORT` with `NBD_REP_ERR_TLS_REQD` until TLS is up (`EXPORT_NAME`, which cannot be answered
//! with an error, closes the connection). Starting TLS forgets what was negotiated before it.

use std::io::{self, Read, Write};
use std::sync::Arc;

use super::contexts::{self, Context};
use super::wire::*;
use super::{Export, ExportSlot, Exports, Socket};

/// Largest option payload accepted.
pub const MAX_OPTION_BYTES: u32 = 64 << 10;
/// Most options on one connection.
pub const MAX_OPTIONS: usize = 4096;

/// A negotiated connection, ready for transmission.
pub struct Session {
    /// The stream (TLS if it was started).
    pub stream: Box<dyn Socket>,
    /// The export.
    pub export: Arc<Export>,
    /// The connection's slot on it.
    pub slot: ExportSlot,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The selected metadata contexts.
    pub contexts: Vec<Context>,
}

/// Transmission flags of `export`.
pub fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_CAN_MULTI_CONN;
    if structured {
        f |= TF_SEND_DF;
    }
    if export.writable {
        f | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES
    } else {
        f | TF_READ_ONLY
    }
}

struct State {
    tls_done: bool,
    structured: bool,
    /// Contexts selected by SET_META_CONTEXT, and for which export.
    meta: Option<(String, Vec<Context>)>,
}

/// Negotiates; `Ok(None)` when the client aborted or was refused.
pub fn negotiate(
    mut s: Box<dyn Socket>,
    exports: &Exports,
    tls: Option<&Arc<rustls::ServerConfig>>,
) -> io::Result<Option<Session>> {
    let mut hello = Vec::with_capacity(18);
    hello.put_u64(NBDMAGIC);
    hello.put_u64(IHAVEOPT);
    hello.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.write_all(&hello)?;
    s.flush()?;
    let client = get_u32(&mut s)?;
    if client & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0
        || client & FLAG_C_FIXED_NEWSTYLE == 0
    {
        return Ok(None); // unknown flags, or not fixed newstyle: the protocol says disconnect
    }
    let no_zeroes = client & FLAG_C_NO_ZEROES != 0;
    let mut st = State { tls_done: false, structured: false, meta: None };
    for _ in 0..MAX_OPTIONS {
        if get_u64(&mut s)? != IHAVEOPT {
            return Ok(None);
        }
        let opt = get_u32(&mut s)?;
        let len = get_u32(&mut s)?;
        if len > MAX_OPTION_BYTES {
            let _ = opt_reply(&mut s, opt, REP_ERR_TOO_BIG, b"option payload over 64 KiB");
            return Ok(None);
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        if tls.is_some() && !st.tls_done && opt != OPT_STARTTLS && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                return Ok(None);
            }
            opt_reply(&mut s, opt, REP_ERR_TLS_REQD, b"start TLS first (NBD_OPT_STARTTLS)")?;
            continue;
        }
        match opt {
            OPT_ABORT => {
                let _ = opt_reply(&mut s, opt, REP_ACK, &[]);
                return Ok(None);
            }
            OPT_EXPORT_NAME => {
                let Ok(name) = String::from_utf8(data) else { return Ok(None) };
                let Some(export) = exports.get(&name) else { return Ok(None) };
                let Some(slot) = exports.hold(&export) else { return Ok(None) };
                let mut m = Vec::with_capacity(134);
                m.put_u64(export.size_bytes());
                m.put_u16(transmission_flags(&export, st.structured));
                if !no_zeroes {
                    m.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&m)?;
                s.flush()?;
                return Ok(Some(session(s, export, slot, st, &name)));
            }
            OPT_LIST => {
                if !data.is_empty() {
                    opt_reply(&mut s, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for e in exports.list() {
                    let mut m = Vec::new();
                    m.put_str(&e.name);
                    m.extend_from_slice(e.description.as_bytes());
                    opt_reply(&mut s, opt, REP_SERVER, &m)?;
                }
                opt_reply(&mut s, opt, REP_ACK, &[])?;
            }
            OPT_STARTTLS => {
                if !data.is_empty() {
                    opt_reply(&mut s, opt, REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")?;
                    continue;
                }
                let Some(cfg) = tls else {
                    opt_reply(&mut s, opt, REP_ERR_POLICY, b"TLS is not offered on this listener")?;
                    continue;
                };
                if st.tls_done {
                    opt_reply(&mut s, opt, REP_ERR_INVALID, b"TLS is already started")?;
                    continue;
                }
                opt_reply(&mut s, opt, REP_ACK, &[])?;
                s = super::tls::accept(s, cfg)?;
                st = State { tls_done: true, structured: false, meta: None };
            }
            OPT_INFO | OPT_GO => {
                if let Some((export, slot, name)) = info(&mut s, opt, &data, exports, &st)? {
                    return Ok(Some(session(s, export, slot, st, &name)));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    opt_reply(&mut s, opt, REP_ERR_INVALID, b"takes no data")?;
                    continue;
                }
                st.structured = true;
                opt_reply(&mut s, opt, REP_ACK, &[])?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(&mut s, opt, &data, exports, &mut st)?;
            }
            _ => {
                opt_reply(&mut s, opt, REP_ERR_UNSUP, b"option not supported")?;
            }
        }
    }
    Ok(None)
}

fn session(
    stream: Box<dyn Socket>,
    export: Arc<Export>,
    slot: ExportSlot,
    st: State,
    name: &str,
) -> Session {
    // Contexts selected for another export do not apply to this one.
    let contexts = match st.meta {
        Some((for_export, ctxs)) if for_export == name => ctxs,
        _ => Vec::new(),
    };
    Session { stream, export, slot, structured: st.structured, contexts }
}

/// NBD_OPT_INFO / NBD_OPT_GO. Returns the export when GO succeeded.
fn info(
    s: &mut Box<dyn Socket>,
    opt: u32,
    data: &[u8],
    exports: &Exports,
    st: &State,
) -> io::Result<Option<(Arc<Export>, ExportSlot, String)>> {
    let mut c = Cursor::new(data);
    let parsed = (|| {
        let name = c.string()?;
        let n = c.u16()?;
        let mut wanted = Vec::with_capacity(n as usize);
        for _ in 0..n {
            wanted.push(c.u16()?);
        }
        c.rest().is_empty().then_some((name, wanted))
    })();
    let Some((name, wanted)) = parsed else {
        opt_reply(s, opt, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO")?;
        return Ok(None);
    };
    let Some(export) = exports.get(&name) else {
        let msg = format!("no export {name:?} (NBD_OPT_LIST lists them)");
        opt_reply(s, opt, REP_ERR_UNKNOWN, msg.as_bytes())?;
        return Ok(None);
    };
    let slot = if opt == OPT_GO {
        match exports.hold(&export) {
            Some(slot) => Some(slot),
            None => {
                let msg = format!(
                    "too many connections to {name} (max_connections_per_export = {})",
                    exports.config().max_connections_per_export
                );
                opt_reply(s, opt, REP_ERR_POLICY, msg.as_bytes())?;
                return Ok(None);
            }
        }
    } else {
        None
    };
    let mut m = Vec::new();
    m.put_u16(INFO_EXPORT);
    m.put_u64(export.size_bytes());
    m.put_u16(transmission_flags(&export, st.structured));
    opt_reply(s, opt, REP_INFO, &m)?;
    if wanted.contains(&INFO_NAME) {
        let mut m = Vec::new();
        m.put_u16(INFO_NAME);
        m.extend_from_slice(export.name.as_bytes());
        opt_reply(s, opt, REP_INFO, &m)?;
    }
    if wanted.contains(&INFO_DESCRIPTION) {
        let mut m = Vec::new();
        m.put_u16(INFO_DESCRIPTION);
        m.extend_from_slice(export.description.as_bytes());
        opt_reply(s, opt, REP_INFO, &m)?;
    }
    // Always: the engine works in 512-byte sectors (writes must be aligned to them; reads
    // need not be), 4 KiB is the natural unit, and the payload limit is the configured one.
    let mut m = Vec::new();
    m.put_u16(INFO_BLOCK_SIZE);
    m.put_u32(512);
    m.put_u32(4096);
    m.put_u32(exports.config().max_request_bytes);
    opt_reply(s, opt, REP_INFO, &m)?;
    opt_reply(s, opt, REP_ACK, &[])?;
    Ok(slot.map(|slot| (export, slot, name)))
}

/// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
fn meta_context(
    s: &mut Box<dyn Socket>,
    opt: u32,
    data: &[u8],
    exports: &Exports,
    st: &mut State,
) -> io::Result<()> {
    let set = opt == OPT_SET_META_CONTEXT;
    if set && !st.structured {
        return opt_reply(s, opt, REP_ERR_INVALID, b"negotiate structured replies first");
    }
    let mut c = Cursor::new(data);
    let parsed = (|| {
        let name = c.string()?;
        let n = c.u32()?;
        let mut queries = Vec::new();
        for _ in 0..n {
            queries.push(c.string()?);
        }
        c.rest().is_empty().then_some((name, queries))
    })();
    let Some((name, queries)) = parsed else {
        return opt_reply(s, opt, REP_ERR_INVALID, b"malformed meta context option");
    };
    let Some(export) = exports.get(&name) else {
        let msg = format!("no export {name:?}");
        return opt_reply(s, opt, REP_ERR_UNKNOWN, msg.as_bytes());
    };
    let dev = export.dev();
    let available = dev.map(|d| contexts::available(&export.target.engine, d)).unwrap_or_default();
    let mut chosen: Vec<Context> = Vec::new();
    if set {
        for q in &queries {
            let picked = match dev {
                Some(d) => contexts::select(q, &export.target.engine, d),
                None => Err(format!("{q}: the export has no device yet")),
            };
            match picked {
                Ok(c) if !chosen.contains(&c) => chosen.push(c),
                Ok(_) => {}
                // Not selected: the client sees the context missing from the reply.
                Err(why) => eprintln!("blksnapd: nbd: {name}: context not selected: {why}"),
            }
        }
    } else if queries.is_empty() {
        chosen = available.clone();
    } else {
        for q in &queries {
            for c in contexts::list_query(q, &available) {
                if !chosen.contains(&c) {
                    chosen.push(c);
                }
            }
        }
    }
    for c in &chosen {
        let mut m = Vec::new();
        m.put_u32(if set { c.id() } else { 0 });
        m.extend_from_slice(c.name().as_bytes());
        opt_reply(s, opt, REP_META_CONTEXT, &m)?;
    }
    if set {
        st.meta = Some((name, chosen));
    }
    opt_reply(s, opt, REP_ACK, &[])
}
