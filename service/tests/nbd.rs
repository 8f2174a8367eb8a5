//! The NBD server against a daemon with the null front end: the handshake and every option,
//! every command, bad input, destroy during a connection, limits, and TLS with client
//! certificates. A raw client speaks the protocol byte by byte (so that bad input can be
//! sent); `blksnap_service::nbd::client::Client` is checked against the same server.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blksnap_engine::{Engine, EngineConfig};
use blksnap_proto::{Dev, Id, Reply, Request, Storage};
use blksnap_service::nbd::client::{Client, NbdUri};
use blksnap_service::nbd::contexts::Context;
use blksnap_service::nbd::wire::*;
use blksnap_service::nbd::{Exports, Listeners, NbdConfig};
use blksnap_service::{Config, Daemon, NullFrontend};

const SIZE: u64 = 8 << 20;

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    daemon: Arc<Daemon>,
    dev: Dev,
    backing: PathBuf,
    socket: PathBuf,
    tcp: Option<std::net::SocketAddr>,
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed).collect()
}

fn fixture_with(nbd: impl FnOnce(&Path) -> NbdConfig) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let backing = dir.join("disk.img");
    std::fs::write(&backing, pattern(SIZE as usize, 0)).unwrap();
    let mut nbd = nbd(&dir);
    nbd.socket = Some(dir.join("nbd.sock"));
    nbd.writable_origins = vec![backing.clone()];
    let cfg = Config {
        socket: dir.join("control"),
        link_dir: dir.clone(),
        freeze: false,
        nbd: nbd.clone(),
        ..Config::default()
    };
    let engine = Arc::new(Engine::new(EngineConfig::default()).unwrap());
    let daemon = Arc::new(Daemon::new(engine, Box::new(NullFrontend::default()), cfg));
    let listeners = Listeners::bind(&nbd, None).unwrap();
    let tcp = listeners.tcp_addr();
    listeners.spawn(daemon.nbd_exports().clone()).unwrap();
    let dev = daemon.add_origin(&backing, true).unwrap().into();
    Fixture { socket: dir.join("nbd.sock"), _tmp: tmp, dir, daemon, dev, backing, tcp }
}

fn fixture() -> Fixture {
    fixture_with(|_| NbdConfig::default())
}

impl Fixture {
    fn snapshot(&self) -> Id {
        let storage = self.dir.join(format!("diff-{}", rand_suffix()));
        std::fs::File::create(&storage).unwrap().set_len(16 << 20).unwrap();
        let storage = Storage::File { path: storage.display().to_string(), limit_sectors: 32768 };
        let Reply::Created(id) = self.daemon.handle(Request::SnapshotCreate { storage }).unwrap()
        else {
            panic!()
        };
        self.daemon.handle(Request::SnapshotAdd { id, dev: self.dev }).unwrap();
        self.daemon.handle(Request::SnapshotTake { id }).unwrap();
        id
    }

    fn destroy(&self, id: Id) {
        self.daemon.handle(Request::SnapshotDestroy { id }).unwrap();
    }

    fn image(&self) -> String {
        format!("image-{}:{}", self.dev.major, self.dev.minor)
    }

    fn origin(&self) -> String {
        format!("origin-{}:{}", self.dev.major, self.dev.minor)
    }

    fn raw(&self) -> Raw {
        Raw::connect(UnixStream::connect(&self.socket).unwrap())
    }

    fn cbt(&self) -> (blksnap_model::Uuid, u8) {
        let Reply::CbtInfo(i) = self.daemon.handle(Request::CbtInfo { dev: self.dev }).unwrap()
        else {
            panic!()
        };
        (blksnap_model::Uuid::from(i.generation_id), i.changes_number)
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

/// A byte-level client.
struct Raw {
    s: UnixStream,
    cookie: u64,
    structured: bool,
}

#[derive(Debug)]
enum Rep {
    Simple { error: u32, data: Vec<u8> },
    Chunks(Vec<(u16, u16, Vec<u8>)>),
}

impl Raw {
    fn connect(s: UnixStream) -> Raw {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Raw { s, cookie: 0, structured: false };
        let mut g = [0u8; 18];
        r.s.read_exact(&mut g).unwrap();
        assert_eq!(u64::from_be_bytes(g[..8].try_into().unwrap()), NBDMAGIC);
        assert_eq!(u64::from_be_bytes(g[8..16].try_into().unwrap()), IHAVEOPT);
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        r
    }

    fn flags(&mut self, f: u32) {
        self.s.write_all(&f.to_be_bytes()).unwrap();
    }

    fn send_opt(&mut self, o: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.put_u64(IHAVEOPT);
        m.put_u32(o);
        m.put_u32(data.len() as u32);
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    /// Option replies up to and including the final ACK or error: (type, data).
    fn opt(&mut self, o: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.send_opt(o, data);
        let mut out = Vec::new();
        loop {
            let magic = get_u64(&mut self.s).unwrap();
            assert_eq!(magic, OPT_REPLY_MAGIC);
            assert_eq!(get_u32(&mut self.s).unwrap(), o);
            let kind = get_u32(&mut self.s).unwrap();
            let len = get_u32(&mut self.s).unwrap();
            let mut d = vec![0u8; len as usize];
            self.s.read_exact(&mut d).unwrap();
            let end = kind == REP_ACK || kind & (1 << 31) != 0;
            out.push((kind, d));
            if end {
                return out;
            }
        }
    }

    fn last(&mut self, o: u32, data: &[u8]) -> u32 {
        self.opt(o, data).last().unwrap().0
    }

    fn structured(&mut self) {
        assert_eq!(self.last(OPT_STRUCTURED_REPLY, &[]), REP_ACK);
        self.structured = true;
    }

    fn go(&mut self, name: &str) -> (u64, u16) {
        let mut d = Vec::new();
        d.put_str(name);
        d.put_u16(0);
        let reps = self.opt(OPT_GO, &d);
        assert_eq!(reps.last().unwrap().0, REP_ACK, "{reps:?}");
        let info = reps.iter().find(|(k, d)| *k == REP_INFO && d[..2] == [0, 0]).unwrap();
        let mut c = Cursor::new(&info.1[2..]);
        (c.u64().unwrap(), c.u16().unwrap())
    }

    fn meta(&mut self, o: u32, export: &str, queries: &[&str]) -> Vec<(u32, String)> {
        let mut d = Vec::new();
        d.put_str(export);
        d.put_u32(queries.len() as u32);
        for q in queries {
            d.put_str(q);
        }
        let reps = self.opt(o, &d);
        assert_eq!(reps.last().unwrap().0, REP_ACK, "{reps:?}");
        reps[..reps.len() - 1]
            .iter()
            .map(|(k, d)| {
                assert_eq!(*k, REP_META_CONTEXT);
                let id = u32::from_be_bytes(d[..4].try_into().unwrap());
                (id, String::from_utf8(d[4..].to_vec()).unwrap())
            })
            .collect()
    }

    fn send_cmd(&mut self, kind: u16, flags: u16, offset: u64, length: u32, payload: &[u8]) -> u64 {
        self.cookie += 1;
        let h = RequestHeader { flags, kind, cookie: self.cookie, offset, length };
        self.s.write_all(&h.encode()).unwrap();
        self.s.write_all(payload).unwrap();
        self.cookie
    }

    /// A reply; `read_len` is the data a simple read reply carries on success.
    fn reply(&mut self, cookie: u64, read_len: usize) -> Rep {
        let magic = get_u32(&mut self.s).unwrap();
        if magic == SIMPLE_REPLY_MAGIC {
            let error = get_u32(&mut self.s).unwrap();
            assert_eq!(get_u64(&mut self.s).unwrap(), cookie);
            let mut data = vec![0u8; if error == 0 { read_len } else { 0 }];
            self.s.read_exact(&mut data).unwrap();
            return Rep::Simple { error, data };
        }
        let mut chunks = Vec::new();
        let mut magic = magic;
        loop {
            assert_eq!(magic, STRUCTURED_REPLY_MAGIC);
            let flags = get_u16(&mut self.s).unwrap();
            let kind = get_u16(&mut self.s).unwrap();
            assert_eq!(get_u64(&mut self.s).unwrap(), cookie);
            let len = get_u32(&mut self.s).unwrap();
            let mut d = vec![0u8; len as usize];
            self.s.read_exact(&mut d).unwrap();
            chunks.push((flags, kind, d));
            if flags & REPLY_FLAG_DONE != 0 {
                return Rep::Chunks(chunks);
            }
            magic = get_u32(&mut self.s).unwrap();
        }
    }

    fn cmd(&mut self, kind: u16, flags: u16, offset: u64, length: u32, payload: &[u8]) -> Rep {
        let c = self.send_cmd(kind, flags, offset, length, payload);
        let read_len = if kind == CMD_READ { length as usize } else { 0 };
        self.reply(c, read_len)
    }

    /// The errno of a reply (0: success).
    fn errno(rep: &Rep) -> u32 {
        match rep {
            Rep::Simple { error, .. } => *error,
            Rep::Chunks(c) => c
                .iter()
                .find(|(_, k, _)| *k == REPLY_TYPE_ERROR)
                .map_or(0, |(_, _, d)| u32::from_be_bytes(d[..4].try_into().unwrap())),
        }
    }

    fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let rep = self.cmd(CMD_READ, 0, offset, len, &[]);
        match rep {
            Rep::Simple { error: 0, data } => Ok(data),
            Rep::Chunks(ref c) if Raw::errno(&rep) == 0 => {
                let mut out = vec![0u8; len as usize];
                for (_, k, d) in c {
                    if *k == REPLY_TYPE_OFFSET_DATA {
                        let off = u64::from_be_bytes(d[..8].try_into().unwrap()) - offset;
                        out[off as usize..off as usize + d.len() - 8].copy_from_slice(&d[8..]);
                    }
                }
                Ok(out)
            }
            r => Err(Raw::errno(&r)),
        }
    }

    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn handshake_and_options() {
    let f = fixture();
    let id = f.snapshot();
    // Not fixed newstyle, or unknown client flags: disconnected.
    let mut r = f.raw();
    r.flags(0);
    assert!(r.closed());
    let mut r = f.raw();
    r.flags(FLAG_C_FIXED_NEWSTYLE | 1 << 7);
    assert!(r.closed());

    let mut r = f.raw();
    r.flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    // NBD_OPT_LIST: the image and the writable origin.
    let reps = r.opt(OPT_LIST, &[]);
    let names: Vec<String> = reps
        .iter()
        .filter(|(k, _)| *k == REP_SERVER)
        .map(|(_, d)| Cursor::new(d).string().unwrap())
        .collect();
    assert_eq!(names, vec![f.image(), f.origin()]);
    assert_eq!(r.last(OPT_LIST, b"x"), REP_ERR_INVALID);
    // Unknown options, extended headers, STARTTLS without TLS.
    assert_eq!(r.last(99, b"abc"), REP_ERR_UNSUP);
    assert_eq!(r.last(OPT_EXTENDED_HEADERS, &[]), REP_ERR_UNSUP);
    assert_eq!(r.last(OPT_STARTTLS, &[]), REP_ERR_POLICY);
    // INFO: unknown export, malformed, then the image with its name and description.
    let mut d = Vec::new();
    d.put_str("no-such-export");
    d.put_u16(0);
    assert_eq!(r.last(OPT_INFO, &d), REP_ERR_UNKNOWN);
    assert_eq!(r.last(OPT_INFO, &[0, 0, 0, 9, b'x']), REP_ERR_INVALID);
    let mut d = Vec::new();
    d.put_str(&f.image());
    d.put_u16(2);
    d.put_u16(INFO_NAME);
    d.put_u16(INFO_DESCRIPTION);
    let reps = r.opt(OPT_INFO, &d);
    assert_eq!(reps.last().unwrap().0, REP_ACK);
    let kinds: Vec<u16> = reps[..reps.len() - 1]
        .iter()
        .map(|(k, d)| {
            assert_eq!(*k, REP_INFO);
            u16::from_be_bytes([d[0], d[1]])
        })
        .collect();
    assert_eq!(kinds, vec![INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]);
    let block = &reps[3].1[2..];
    assert_eq!(u32::from_be_bytes(block[8..12].try_into().unwrap()), MAX_PAYLOAD_BYTES);
    assert_eq!(u32::from_be_bytes(block[..4].try_into().unwrap()), 512);
    // Meta contexts: SET needs structured replies first; LIST does not.
    let (generation, changes) = f.cbt();
    assert_eq!(changes, 1);
    let listed = r.meta(OPT_LIST_META_CONTEXT, &f.image(), &[]);
    let names: Vec<&str> = listed.iter().map(|(_, n)| n.as_str()).collect();
    let since = |n: u8| Context::Dirty { generation, since: n }.name();
    assert_eq!(names, vec!["base:allocation".to_string(), since(0), since(1)]);
    let listed = r.meta(OPT_LIST_META_CONTEXT, &f.image(), &["qemu:dirty-bitmap:"]);
    assert_eq!(listed.len(), 2);
    let listed = r.meta(OPT_LIST_META_CONTEXT, &f.image(), &["base:", "other:x"]);
    assert_eq!(listed.len(), 1);
    let mut d = Vec::new();
    d.put_str(&f.image());
    d.put_u32(0);
    assert_eq!(r.last(OPT_SET_META_CONTEXT, &d), REP_ERR_INVALID);
    assert_eq!(r.last(OPT_STRUCTURED_REPLY, b"x"), REP_ERR_INVALID);
    r.structured();
    let mut d = Vec::new();
    d.put_str("nope");
    d.put_u32(0);
    assert_eq!(r.last(OPT_SET_META_CONTEXT, &d), REP_ERR_UNKNOWN);
    // A stale generation, a number ahead of the device, unknown names: not selected.
    let stale = Context::Dirty { generation: blksnap_model::Uuid([7; 16]), since: 0 }.name();
    let ahead = since(2);
    let chosen = r.meta(
        OPT_SET_META_CONTEXT,
        &f.image(),
        &["base:allocation", &stale, &ahead, "qemu:dirty-bitmap:", "x:y", &since(0)],
    );
    let chosen: Vec<&str> = chosen.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(chosen, vec!["base:allocation".to_string(), since(0)]);
    let (size, flags) = r.go(&f.image());
    assert_eq!(size, SIZE);
    assert_ne!(flags & TF_READ_ONLY, 0);
    assert_eq!(flags & TF_SEND_TRIM, 0);
    assert_ne!(flags & TF_SEND_DF, 0);
    assert_eq!(r.read(0, 4096).unwrap(), pattern(SIZE as usize, 0)[..4096]);
    r.send_cmd(CMD_DISC, 0, 0, 0, &[]);
    assert!(r.closed());
    // NBD_OPT_ABORT is acknowledged, then the server closes.
    let mut r = f.raw();
    r.flags(FLAG_C_FIXED_NEWSTYLE);
    assert_eq!(r.last(OPT_ABORT, &[]), REP_ACK);
    assert!(r.closed());
    // NBD_OPT_EXPORT_NAME: the old way (124 zero bytes without NO_ZEROES; simple replies).
    let mut r = f.raw();
    r.flags(FLAG_C_FIXED_NEWSTYLE);
    r.send_opt(OPT_EXPORT_NAME, f.image().as_bytes());
    assert_eq!(get_u64(&mut r.s).unwrap(), SIZE);
    let flags = get_u16(&mut r.s).unwrap();
    assert_ne!(flags & TF_READ_ONLY, 0);
    let mut zeroes = [1u8; 124];
    r.s.read_exact(&mut zeroes).unwrap();
    assert_eq!(zeroes, [0u8; 124]);
    assert_eq!(r.read(SIZE - 512, 512).unwrap(), pattern(SIZE as usize, 0)[SIZE as usize - 512..]);
    // An unknown export by EXPORT_NAME: disconnected.
    let mut r = f.raw();
    r.flags(FLAG_C_FIXED_NEWSTYLE);
    r.send_opt(OPT_EXPORT_NAME, b"nothing");
    assert!(r.closed());
    // An option too large to read.
    let mut r = f.raw();
    r.flags(FLAG_C_FIXED_NEWSTYLE);
    let mut m = Vec::new();
    m.put_u64(IHAVEOPT);
    m.put_u32(OPT_LIST);
    m.put_u32(1 << 20);
    r.s.write_all(&m).unwrap();
    let _ = get_u64(&mut r.s);
    let _ = get_u32(&mut r.s);
    assert_eq!(get_u32(&mut r.s).unwrap(), REP_ERR_TOO_BIG);
    f.destroy(id);
}

#[test]
fn commands_on_image_and_origin() {
    let f = fixture();
    let id = f.snapshot();
    let before = pattern(SIZE as usize, 0);
    // The origin, writable: write, trim, write zeroes, flush, FUA; reads see them.
    let mut o = f.raw();
    o.flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    o.structured();
    let (_, flags) = o.go(&f.origin());
    assert_eq!(flags & TF_READ_ONLY, 0);
    assert_ne!(flags & TF_SEND_WRITE_ZEROES, 0);
    let data = pattern(64 << 10, 0x5a);
    assert_eq!(Raw::errno(&o.cmd(CMD_WRITE, CMD_FLAG_FUA, 1 << 20, 64 << 10, &data)), 0);
    assert_eq!(o.read(1 << 20, 64 << 10).unwrap(), data);
    assert_eq!(Raw::errno(&o.cmd(CMD_TRIM, 0, 3 << 20, 4096, &[])), 0);
    assert_eq!(Raw::errno(&o.cmd(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 4 << 20, 8192, &[])), 0);
    assert_eq!(o.read(4 << 20, 8192).unwrap(), vec![0u8; 8192]);
    assert_eq!(Raw::errno(&o.cmd(CMD_FLUSH, 0, 0, 0, &[])), 0);
    assert_eq!(std::fs::read(&f.backing).unwrap()[1 << 20..(1 << 20) + 65536], data[..]);
    // Bad input on the origin: past the end, unknown command, unknown flags.
    assert_eq!(Raw::errno(&o.cmd(CMD_WRITE, 0, SIZE - 512, 1024, &[0u8; 1024])), EINVAL);
    assert_eq!(Raw::errno(&o.cmd(CMD_TRIM, 0, u64::MAX - 10, 4096, &[])), EINVAL);
    assert_eq!(Raw::errno(&o.cmd(42, 0, 0, 0, &[])), EINVAL);
    assert_eq!(Raw::errno(&o.cmd(CMD_READ, 1 << 12, 0, 512, &[])), EINVAL);
    assert_eq!(Raw::errno(&o.cmd(CMD_WRITE, 0, 100, 512, &[0u8; 512])), EINVAL, "unaligned");
    // The image still reads the point in time, and refuses writes (EPERM).
    let mut r = f.raw();
    r.flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    r.structured();
    let (generation, changes) = f.cbt();
    let dirty = Context::Dirty { generation, since: changes - 1 }.name();
    let chosen = r.meta(OPT_SET_META_CONTEXT, &f.image(), &["base:allocation", &dirty]);
    assert_eq!(chosen.len(), 2);
    r.go(&f.image());
    assert_eq!(r.read(0, SIZE as u32).unwrap(), before);
    assert_eq!(r.read(SIZE - 1, 1).unwrap(), before[SIZE as usize - 1..]);
    assert_eq!(r.read(1000, 3000).unwrap(), before[1000..4000], "unaligned reads are served");
    assert_eq!(r.read(SIZE, 0).unwrap(), Vec::<u8>::new());
    assert_eq!(r.read(SIZE - 4096, 8192), Err(EINVAL), "read past the end");
    assert_eq!(r.read(0, MAX_PAYLOAD_BYTES + 1), Err(EINVAL), "oversized read");
    assert_eq!(Raw::errno(&r.cmd(CMD_WRITE, 0, 0, 512, &[0u8; 512])), EPERM);
    assert_eq!(Raw::errno(&r.cmd(CMD_TRIM, 0, 0, 512, &[])), EPERM);
    assert_eq!(Raw::errno(&r.cmd(CMD_WRITE_ZEROES, 0, 0, 512, &[])), EPERM);
    assert_eq!(Raw::errno(&r.cmd(CMD_FLUSH, 0, 0, 0, &[])), 0);
    assert_eq!(r.read(1 << 20, 4096).unwrap(), before[1 << 20..(1 << 20) + 4096]);
    // Block status: base:allocation is all data; the bitmap (since the take before this one)
    // is empty: the writes above came after this image's take.
    let rep = r.cmd(CMD_BLOCK_STATUS, 0, 0, SIZE as u32, &[]);
    let Rep::Chunks(chunks) = rep else { panic!() };
    assert_eq!(chunks.len(), 2);
    for (flags, kind, d) in &chunks {
        assert_eq!(*kind, REPLY_TYPE_BLOCK_STATUS);
        let ctx = u32::from_be_bytes(d[..4].try_into().unwrap());
        assert!(ctx == 1 || ctx == 0x100 + u32::from(changes - 1));
        assert_eq!(d.len(), 12, "one extent each: {d:?}");
        assert_eq!(u32::from_be_bytes(d[4..8].try_into().unwrap()), SIZE as u32);
        assert_eq!(u32::from_be_bytes(d[8..12].try_into().unwrap()), 0);
        let _ = flags;
    }
    assert_eq!(chunks.last().unwrap().0 & REPLY_FLAG_DONE, REPLY_FLAG_DONE);
    assert_eq!(Raw::errno(&r.cmd(CMD_BLOCK_STATUS, 0, 0, 0, &[])), EINVAL);
    assert_eq!(Raw::errno(&r.cmd(CMD_BLOCK_STATUS, 0, SIZE, 512, &[])), EINVAL);
    // The next snapshot's bitmap since this one has exactly the origin's writes.
    f.destroy(id);
    assert_eq!(r.read(0, 512), Err(ESHUTDOWN), "a withdrawn export");
    assert!(r.closed());
    let id = f.snapshot();
    let mut r = f.raw();
    r.flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    r.structured();
    let since = Context::Dirty { generation, since: changes }.name();
    assert_eq!(r.meta(OPT_SET_META_CONTEXT, &f.image(), &[&since]).len(), 1);
    r.go(&f.image());
    let Rep::Chunks(chunks) = r.cmd(CMD_BLOCK_STATUS, 0, 0, SIZE as u32, &[]) else { panic!() };
    let d = &chunks[0].2;
    let mut c = Cursor::new(&d[4..]);
    let mut pos = 0u64;
    let mut dirty = Vec::new();
    while let (Some(l), Some(fl)) = (c.u32(), c.u32()) {
        if fl & STATE_DIRTY != 0 {
            dirty.push((pos, u64::from(l)));
        }
        pos += u64::from(l);
    }
    assert_eq!(pos, SIZE);
    let bs = 64 << 10; // the default CBT block
    assert_eq!(dirty, vec![(1 << 20, bs), (3 << 20, bs), (4 << 20, bs)]);
    // One extent with REQ_ONE, starting mid-block.
    let Rep::Chunks(chunks) =
        r.cmd(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, (1 << 20) + 512, 1 << 22, &[])
    else {
        panic!()
    };
    let d = &chunks[0].2;
    assert_eq!(d.len(), 12);
    assert_eq!(u32::from_be_bytes(d[4..8].try_into().unwrap()), bs as u32 - 512);
    assert_eq!(u32::from_be_bytes(d[8..12].try_into().unwrap()), STATE_DIRTY);
    // A write whose payload is over the limit: refused and disconnected.
    o.send_cmd(CMD_WRITE, 0, 0, MAX_PAYLOAD_BYTES + 1, &[]);
    let c = o.cookie;
    assert_eq!(Raw::errno(&o.reply(c, 0)), EINVAL);
    assert!(o.closed());
    f.destroy(id);
}

#[test]
fn simple_replies_without_structured() {
    let f = fixture();
    let id = f.snapshot();
    let mut r = f.raw();
    r.flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    let (_, flags) = r.go(&f.image());
    assert_eq!(flags & TF_SEND_DF, 0, "DF only with structured replies");
    assert!(matches!(r.cmd(CMD_READ, 0, 0, 4096, &[]), Rep::Simple { error: 0, .. }));
    assert!(matches!(r.cmd(CMD_READ, 0, SIZE, 1, &[]), Rep::Simple { error: EINVAL, .. }));
    assert!(matches!(r.cmd(CMD_BLOCK_STATUS, 0, 0, 4096, &[]), Rep::Simple { error: EINVAL, .. }));
    assert!(matches!(r.cmd(CMD_WRITE, 0, 0, 4, b"abcd"), Rep::Simple { error: EPERM, .. }));
    f.destroy(id);
    assert!(matches!(r.cmd(CMD_READ, 0, 0, 4096, &[]), Rep::Simple { error: ESHUTDOWN, .. }));
}

#[test]
fn connection_limit_per_export() {
    let f = fixture_with(|_| NbdConfig { max_connections_per_export: 2, ..NbdConfig::default() });
    let id = f.snapshot();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut r = f.raw();
        r.flags(FLAG_C_FIXED_NEWSTYLE);
        r.go(&f.image());
        held.push(r);
    }
    let mut r = f.raw();
    r.flags(FLAG_C_FIXED_NEWSTYLE);
    let mut d = Vec::new();
    d.put_str(&f.image());
    d.put_u16(0);
    assert_eq!(r.last(OPT_GO, &d), REP_ERR_POLICY);
    // INFO is not a connection to the export.
    assert_eq!(r.last(OPT_INFO, &d), REP_ACK);
    held.pop().unwrap().send_cmd(CMD_DISC, 0, 0, 0, &[]);
    std::thread::sleep(Duration::from_millis(200));
    r.go(&f.image());
    f.destroy(id);
}

#[test]
fn the_client_module_pulls_an_image() {
    let f = fixture();
    let id = f.snapshot();
    let uri = format!("nbd+unix:///{}?socket={}", f.image(), f.socket.display());
    let uri = NbdUri::parse(&uri).unwrap();
    let (generation, changes) = f.cbt();
    let ctx = Context::Dirty { generation, since: 0 }.name();
    let mut c = Client::connect(&uri, std::slice::from_ref(&ctx), Duration::from_secs(10)).unwrap();
    assert_eq!(c.size_bytes(), SIZE);
    assert_eq!(c.listed_contexts().len(), usize::from(changes) + 1);
    let mut buf = vec![0u8; SIZE as usize];
    c.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, pattern(SIZE as usize, 0));
    let ext = c.block_status(&ctx, 0, SIZE as u32).unwrap();
    assert_eq!(ext, vec![(0, SIZE as u32, 0)]);
    let mut one = [0u8; 1];
    let e = c.read_at(&mut one, SIZE).unwrap_err();
    assert_eq!(e.errno, EINVAL as i32, "{e}");
    c.disconnect();
    // A stale generation is refused before any data moves.
    let stale = Context::Dirty { generation: blksnap_model::Uuid([9; 16]), since: 0 }.name();
    let e = Client::connect(&uri, &[stale], Duration::from_secs(10)).map(drop).unwrap_err();
    assert_eq!(e.errno, libc::ESTALE);
    let bad = NbdUri::parse(&format!("nbd+unix:///nope?socket={}", f.socket.display())).unwrap();
    let e = Client::connect(&bad, &[], Duration::from_secs(10)).map(drop).unwrap_err();
    assert_eq!(e.errno, libc::ENOENT, "{e}");
    f.destroy(id);
    let e = Client::connect(&uri, &[], Duration::from_secs(10)).map(drop).unwrap_err();
    assert_eq!(e.errno, libc::ENOENT, "the export went with the snapshot: {e}");
}

/// A CA, a server certificate for localhost / 127.0.0.1 and a client certificate, in `dir`
/// with the file names NBD tools use.
fn certificates(dir: &Path, ca_name: &str) -> PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, ca_name);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["client".into()])
        .unwrap()
        .signed_by(&client_key, &issuer)
        .unwrap();
    std::fs::write(dir.join("ca-cert.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server-cert.pem"), server.pem()).unwrap();
    std::fs::write(dir.join("server-key.pem"), server_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("client-cert.pem"), client.pem()).unwrap();
    std::fs::write(dir.join("client-key.pem"), client_key.serialize_pem()).unwrap();
    dir.to_path_buf()
}

#[test]
fn tcp_with_tls_and_client_certificates() {
    let f = fixture_with(|dir| {
        let pki = certificates(&dir.join("pki"), "blksnap test CA");
        NbdConfig {
            tcp: Some("127.0.0.1:0".parse().unwrap()),
            tls_cert: Some(pki.join("server-cert.pem")),
            tls_key: Some(pki.join("server-key.pem")),
            tls_ca: Some(pki.join("ca-cert.pem")),
            ..NbdConfig::default()
        }
    });
    let id = f.snapshot();
    let port = f.tcp.unwrap().port();
    // Without TLS: every option but STARTTLS/ABORT is refused.
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    let mut s2 = s.try_clone().unwrap();
    s2.read_exact(&mut g).unwrap();
    s2.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    let mut m = Vec::new();
    m.put_u64(IHAVEOPT);
    m.put_u32(OPT_LIST);
    m.put_u32(0);
    s2.write_all(&m).unwrap();
    assert_eq!(get_u64(&mut s2).unwrap(), OPT_REPLY_MAGIC);
    assert_eq!(get_u32(&mut s2).unwrap(), OPT_LIST);
    assert_eq!(get_u32(&mut s2).unwrap(), REP_ERR_TLS_REQD);
    drop(s);
    // With the client certificate: a full read.
    let pki = f.dir.join("pki");
    let uri = format!("nbds://127.0.0.1:{port}/{}?tls-certificates={}", f.image(), pki.display());
    let uri = NbdUri::parse(&uri).unwrap();
    let mut c = Client::connect(&uri, &[], Duration::from_secs(10)).unwrap();
    let mut buf = vec![0u8; SIZE as usize];
    c.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, pattern(SIZE as usize, 0));
    c.disconnect();
    // A client certificate from another CA is refused in the TLS handshake.
    let other = certificates(&f.dir.join("other"), "someone else");
    std::fs::copy(pki.join("ca-cert.pem"), other.join("ca-cert.pem")).unwrap();
    let uri2 =
        format!("nbds://127.0.0.1:{port}/{}?tls-certificates={}", f.image(), other.display());
    let e = Client::connect(&NbdUri::parse(&uri2).unwrap(), &[], Duration::from_secs(10))
        .map(drop)
        .unwrap_err();
    assert!(e.message.contains("TLS") || e.message.contains("reply"), "{e}");
    // Plain NBD to a TLS listener: the client is told TLS is required.
    let plain = NbdUri::parse(&format!("nbd://127.0.0.1:{port}/{}", f.image())).unwrap();
    let e = Client::connect(&plain, &[], Duration::from_secs(10)).map(drop).unwrap_err();
    assert_eq!(e.errno, libc::EACCES, "{e}");
    f.destroy(id);
}

#[test]
fn exports_follow_origins() {
    let f = fixture();
    let exports: &Arc<Exports> = f.daemon.nbd_exports();
    assert!(exports.get(&f.origin()).is_some());
    assert!(exports.get(&f.image()).is_none());
    let id = f.snapshot();
    assert!(exports.get(&f.image()).unwrap().target.image_of.is_some());
    f.destroy(id);
    assert!(exports.get(&f.image()).is_none());
    // An origin not listed as writable is not exported.
    let other = f.dir.join("other.img");
    std::fs::File::create(&other).unwrap().set_len(1 << 20).unwrap();
    let dev = f.daemon.add_origin(&other, true).unwrap();
    assert!(exports.get(&Exports::origin_name(dev)).is_none());
    f.daemon.remove_origin(f.dev.into()).unwrap();
    assert!(exports.get(&f.origin()).is_none());
}

#[test]
fn blksnap_backup_pulls_a_chain_and_refuses_a_new_generation() {
    use blksnap_service::cli::{backup, pull};
    let f = fixture();
    let chain = f.dir.join("chain");
    let uri = format!("nbd+unix:///{}?socket={}", f.image(), f.socket.display());
    let dev: blksnap_model::DeviceId = f.dev.into();
    let mut points = Vec::new();
    let writes: [&[(u64, usize)]; 3] = [&[], &[(1 << 20, 4096), (5 << 20, 70_144)], &[(0, 512)]];
    for (k, w) in writes.iter().enumerate() {
        for (off, len) in *w {
            f.daemon.engine().write(dev, *off, &pattern(*len, k as u8 + 1)).unwrap();
        }
        let id = f.snapshot();
        points.push(std::fs::read(&f.backing).unwrap());
        let r = pull::backup_nbd(&uri, &chain, false, true).unwrap();
        assert_eq!(r.json["kind"], if k == 0 { "full" } else { "incremental" });
        if k == 1 {
            // 1 MiB..+4 KiB is one 64 KiB unit; 5 MiB..+70,144 bytes two.
            assert_eq!(r.json["blocks_changed"], 3);
        }
        if k == 2 {
            assert_eq!(r.json["blocks_changed"], 1);
        }
        f.destroy(id);
    }
    for (k, want) in points.iter().enumerate() {
        let out = f.dir.join(format!("restored-{k}"));
        backup::restore(&chain, Some(k as u32), &out).unwrap();
        assert!(std::fs::read(&out).unwrap() == *want, "point {k} restores byte-identical");
    }
    // A new generation (the tracker re-attached): the incremental is refused, a full works.
    f.daemon.handle(Request::Detach { dev: f.dev }).unwrap();
    f.daemon.handle(Request::Attach { dev: f.dev }).unwrap();
    let id = f.snapshot();
    let e = pull::backup_nbd(&uri, &chain, false, true).unwrap_err();
    assert_eq!(e.errno, libc::ESTALE, "{}", e.message);
    let r = pull::backup_nbd(&uri, &chain, true, true).unwrap();
    assert_eq!(r.json["kind"], "full");
    // Destroyed: no export, no point.
    f.destroy(id);
    let e = pull::backup_nbd(&uri, &chain, false, true).unwrap_err();
    assert_eq!(e.errno, libc::ENOENT, "{}", e.message);
    assert_eq!(backup::load_manifest(&chain).unwrap().points.len(), 4);
}

#[test]
fn at_the_wrap_only_the_images_own_mark_is_offered() {
    let f = fixture();
    let (first_generation, _) = f.cbt();
    for _ in 0..254 {
        let id = f.snapshot();
        f.destroy(id);
    }
    assert_eq!(f.cbt(), (first_generation, 254));
    // The 255th take wraps: a new generation at changes number 255 with a stale read map.
    let id = f.snapshot();
    let (generation, changes) = f.cbt();
    assert_eq!(changes, 255);
    assert_ne!(generation, first_generation);
    let mut r = f.raw();
    r.flags(FLAG_C_FIXED_NEWSTYLE);
    let listed = r.meta(OPT_LIST_META_CONTEXT, &f.image(), &["qemu:dirty-bitmap:"]);
    let own = Context::Dirty { generation, since: 255 }.name();
    assert_eq!(listed.iter().map(|(_, n)| n.clone()).collect::<Vec<_>>(), vec![own.clone()]);
    r.structured();
    let stale = Context::Dirty { generation, since: 0 }.name();
    let chosen = r.meta(OPT_SET_META_CONTEXT, &f.image(), &[&stale, &own]);
    assert_eq!(chosen.iter().map(|(_, n)| n.clone()).collect::<Vec<_>>(), vec![own]);
    f.destroy(id);
}
