//! `abi_ioctl`: the C ABI with arbitrary requests, both profiles.
//!
//! Per input: a handle opened in-process (profile and parameters from the first byte) on two
//! served devices backed by per-process temp files (created once, zeroed per input), then a
//! sequence of calls: control requests (every valid code of both profiles, plus arbitrary u32
//! codes), filter requests (ATTACH/DETACH/CTL with arbitrary cmd and optlen) and data calls
//! (device/image pread/pwrite, dev_size). Arguments are built from fuzz bytes at exactly the
//! size the request code names; every nested pointer (cbtmap buffer, cbtdirty ranges, collect
//! ids, append_storage bdev_path/ranges, create filename, ctl opt) is NULL, an address whose
//! span wraps, or a fresh heap buffer of exactly the size the struct describes (counts capped
//! at 256 elements; above the cap only NULL or wrapping). ASan reports any access outside those
//! buffers; every call must return 0, a count, or a negative errno of the closed set — and
//! never `-ENOTRECOVERABLE` (a caught panic; libFuzzer's panic hook aborts anyway).
//!
//! Paths handed to the library are chosen from a fixed set inside the temp directory, so no
//! input can make the library open a file outside it.
//!
//! `BLKSNAP_FUZZ_TRACE=1` prints each call and its return value (to read a seed or an artifact).
#![no_main]

use core::ffi::{c_int, c_ulong, c_void};
use std::ffi::CString;
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::OnceLock;

use arbitrary::Unstructured;
use blksnap::uapi::{newest, v3};
use blksnap::{
    blksnap_ctl_close, blksnap_ctl_dup, blksnap_ctl_ioctl, blksnap_ctl_open, blksnap_ctl_profile,
    blksnap_dev_pread, blksnap_dev_pwrite, blksnap_dev_size, blksnap_filter_ioctl,
    blksnap_image_pread, blksnap_image_pwrite,
};
use blksnap_fuzz::Rd;
use blksnap_model::Errno;
use libfuzzer_sys::fuzz_target;

const DISK_BYTES: u64 = 1 << 20;
const STORAGE_BYTES: u64 = 1 << 20;
/// Largest element count that gets a real buffer.
const COUNT_CAP: u64 = 256;
/// Largest byte buffer (cbtmap, ctl opt, strings, data I/O).
const BYTES_CAP: u64 = 1 << 16;

struct Env {
    dir: PathBuf,
    disks: [PathBuf; 2],
    storage: PathBuf,
    storage_dir: PathBuf,
}

static ENV: OnceLock<Env> = OnceLock::new();

fn env() -> &'static Env {
    ENV.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("blksnap-fuzz-abi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let storage_dir = dir.join("stdir");
        std::fs::create_dir_all(&storage_dir).unwrap();
        Env {
            disks: [dir.join("disk0.img"), dir.join("disk1.img")],
            storage: dir.join("storage.img"),
            storage_dir,
            dir,
        }
    })
}

/// Zero a file of `len` bytes (truncate and re-extend: sparse, cheap).
fn reset(path: &PathBuf, len: u64) {
    let f = OpenOptions::new().create(true).truncate(true).write(true).open(path).unwrap();
    f.set_len(len).unwrap();
}

fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("BLKSNAP_FUZZ_TRACE").is_some())
}

/// Checks an ioctl-style return: 0 or `-errno` of the closed set, never the panic errno.
fn check(ret: c_int, what: &str) {
    if ret > 0 {
        panic!("{what}: positive return {ret}");
    }
    check_neg(ret as isize, what);
}

fn check_neg(ret: isize, what: &str) {
    if trace() {
        eprintln!("{what} -> {ret}");
    }
    if ret < 0 {
        let code = i32::try_from(-ret).unwrap_or(i32::MAX);
        match Errno::from_code(code) {
            None => panic!("{what}: errno {code} outside the closed set"),
            Some(Errno::ENOTRECOVERABLE) => panic!("{what}: a panic was caught (-131)"),
            Some(_) => {}
        }
    }
}

/// Buffers that must outlive the call.
#[derive(Default)]
struct Arena(Vec<Vec<u8>>);

impl Arena {
    /// A pointer for `size` bytes: NULL, wrapping (`addr + size` overflows), or a fresh buffer of
    /// exactly `size` bytes filled by `fill`. Sizes over `cap` only get NULL or wrapping.
    fn ptr(&mut self, r: &mut Rd, size: u64, cap: u64, fill: impl FnOnce(&mut Rd, &mut [u8])) -> usize {
        let choice = r.u8() % 16;
        if choice == 0 || (size > cap && choice % 2 == 0) {
            return 0;
        }
        if choice == 1 || size > cap {
            let back = if size == 0 { 0 } else { (r.u16() as u64 % size) as usize };
            return usize::MAX - back;
        }
        let mut buf = vec![0u8; size as usize];
        fill(r, &mut buf);
        let p = buf.as_mut_ptr() as usize;
        self.0.push(buf);
        p
    }
}

fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
    if off + bytes.len() <= buf.len() {
        buf[off..off + bytes.len()].copy_from_slice(bytes);
    }
}

fn get16(buf: &[u8], off: usize) -> Option<[u8; 16]> {
    buf.get(off..off + 16).map(|s| s.try_into().unwrap())
}

struct State {
    handle: c_int,
    v3: bool,
    ids: Vec<[u8; 16]>,
    arena: Arena,
}

impl State {
    fn id(&self, r: &mut Rd) -> [u8; 16] {
        let b = r.u8();
        if b % 4 == 0 || self.ids.is_empty() {
            let mut id = [0u8; 16];
            r.fill(&mut id);
            id
        } else {
            self.ids[usize::from(b) % self.ids.len()]
        }
    }
}

/// The storage path strings (NUL included, or unterminated): always inside the temp dir.
fn storage_string(r: &mut Rd) -> Vec<u8> {
    let e = env();
    let mut s = match r.u8() % 8 {
        0 => b"/dev/block/8:1".to_vec(),
        1 => e.storage.as_os_str().as_encoded_bytes().to_vec(),
        2 => e.storage_dir.as_os_str().as_encoded_bytes().to_vec(),
        3 => e.disks[0].as_os_str().as_encoded_bytes().to_vec(),
        4 => e.dir.join("missing").as_os_str().as_encoded_bytes().to_vec(),
        5 => Vec::new(),
        6 => return vec![b'a'; 4096], // no NUL within PATH_MAX
        _ => {
            let n = r.below(12);
            let name: Vec<u8> = (0..n).map(|_| b'a' + r.u8() % 26).collect();
            let mut p = e.dir.as_os_str().as_encoded_bytes().to_vec();
            p.push(b'/');
            p.extend(name);
            p
        }
    };
    s.push(0);
    s
}

fn sector_range(r: &mut Rd, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(16) {
        let b = r.u8();
        let (offset, count) = match b % 8 {
            0 => (r.u64(), r.u64()),
            1 => (u64::MAX - u64::from(r.u8()), u64::from(r.u8())),
            _ => (u64::from(r.u16() % 2100), u64::from(r.u16() % 300)),
        };
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&offset.to_ne_bytes());
        bytes[8..].copy_from_slice(&count.to_ne_bytes());
        let n = chunk.len();
        chunk.copy_from_slice(&bytes[..n]);
    }
}

fn count_value(r: &mut Rd) -> u32 {
    let b = r.u8();
    if b < 200 {
        u32::from(b % 6)
    } else {
        r.pick(&[256, 257, 65_536, 65_537, u32::MAX, 1 << 28, 128])
    }
}

/// `_IOC_SIZE` of a request code.
fn ioc_size(code: u32) -> u64 {
    u64::from((code >> 16) & 0x3fff)
}

fn control(st: &mut State, r: &mut Rd) {
    let b = r.u8();
    let code = if b < 200 {
        let all: Vec<u32> =
            v3::REQUESTS.iter().chain(newest::REQUESTS.iter()).map(|(_, c)| *c).collect();
        all[usize::from(b) % all.len()]
    } else {
        r.u32()
    };
    let size = ioc_size(code);
    let choice = r.u8() % 16;
    let mut arg = vec![0u8; size as usize];
    r.fill(&mut arg);
    nested_control(st, r, code, &mut arg);
    let argp = match choice {
        0 => core::ptr::null_mut(),
        1 => (usize::MAX - (usize::from(r.u8()) % size.max(1) as usize)) as *mut c_void,
        _ if size == 0 => core::ptr::null_mut(),
        _ => arg.as_mut_ptr().cast(),
    };
    // SAFETY: argp is NULL, wrapping, or `arg` (exactly the code's size); nested pointers are
    // NULL, wrapping, or arena buffers of exactly the described sizes.
    let ret = unsafe { blksnap_ctl_ioctl(st.handle, code as c_ulong, argp) };
    check(ret, &format!("ctl_ioctl {code:#x}"));
    if ret == 0 && choice >= 2 {
        // Learn ids for later requests.
        match (st.v3, code) {
            (true, v3::IOCTL_BLKSNAP_SNAPSHOT_CREATE) => st.ids.extend(get16(&arg, 0)),
            (false, newest::IOCTL_BLKSNAP_SNAPSHOT_CREATE) => st.ids.extend(get16(&arg, 16)),
            _ => {}
        }
    }
}

/// The id and nested-pointer fields of a control request's struct.
/// What a control code means in the handle's profile (codes collide across profiles: v3 TAKE
/// is newest COLLECT, so the profile decides).
#[derive(PartialEq)]
enum Kind {
    Append,
    Collect,
    CreateNewest,
    Wait,
    Id,
    Other,
}

fn kind(v3: bool, code: u32) -> Kind {
    if v3 {
        match code {
            v3::IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE => Kind::Append,
            v3::IOCTL_BLKSNAP_SNAPSHOT_COLLECT => Kind::Collect,
            v3::IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT => Kind::Wait,
            v3::IOCTL_BLKSNAP_SNAPSHOT_DESTROY | v3::IOCTL_BLKSNAP_SNAPSHOT_TAKE => Kind::Id,
            _ => Kind::Other,
        }
    } else {
        match code {
            newest::IOCTL_BLKSNAP_SNAPSHOT_CREATE => Kind::CreateNewest,
            newest::IOCTL_BLKSNAP_SNAPSHOT_COLLECT => Kind::Collect,
            newest::IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT => Kind::Wait,
            newest::IOCTL_BLKSNAP_SNAPSHOT_DESTROY | newest::IOCTL_BLKSNAP_SNAPSHOT_TAKE => Kind::Id,
            _ => Kind::Other,
        }
    }
}

/// The id and nested-pointer fields of a control request's struct.
fn nested_control(st: &mut State, r: &mut Rd, code: u32, arg: &mut [u8]) {
    match kind(st.v3, code) {
        Kind::Append => {
            let id = st.id(r);
            put(arg, 0, &id);
            let s = storage_string(r);
            let size = match r.u8() % 8 {
                0 => u32::from(r.u16()),
                1 => r.u32(),
                _ => s.len() as u32,
            };
            let p = st.arena.ptr(r, u64::from(size), BYTES_CAP, |_, buf| {
                let n = buf.len().min(s.len());
                buf[..n].copy_from_slice(&s[..n]);
            });
            put(arg, 16, &p.to_ne_bytes());
            put(arg, 24, &size.to_ne_bytes());
            let count = count_value(r);
            put(arg, 28, &count.to_ne_bytes());
            let p = st.arena.ptr(r, u64::from(count) * 16, COUNT_CAP * 16, sector_range);
            put(arg, 32, &p.to_ne_bytes());
        }
        Kind::Collect => {
            let count = count_value(r);
            put(arg, 0, &count.to_ne_bytes());
            let p = st.arena.ptr(r, u64::from(count) * 16, COUNT_CAP * 16, |r, b| r.fill(b));
            put(arg, 8, &(p as u64).to_ne_bytes());
        }
        Kind::CreateNewest => {
            let limit = match r.u8() % 4 {
                0 => r.u64(),
                1 => r.pick(&[0, 1, u64::MAX, 1 << 40, 4096]),
                _ => u64::from(r.u16()),
            };
            put(arg, 0, &limit.to_ne_bytes());
            let s = storage_string(r);
            let p = st.arena.ptr(r, s.len() as u64, BYTES_CAP, |_, buf| buf.copy_from_slice(&s));
            put(arg, 8, &(p as u64).to_ne_bytes());
        }
        // id + timeout (the instance's clock is real: never wait).
        Kind::Wait => {
            let id = st.id(r);
            put(arg, 0, &id);
            put(arg, 16, &0u32.to_ne_bytes());
        }
        Kind::Id => {
            let id = st.id(r);
            put(arg, 0, &id);
        }
        Kind::Other => {}
    }
}

fn filter(st: &mut State, r: &mut Rd) {
    let e = env();
    let path: Option<Vec<u8>> = match r.u8() % 8 {
        0 | 6 => Some(b"/dev/fz0".to_vec()),
        1 | 7 => Some(b"/dev/fz1".to_vec()),
        2 => Some(b"/dev/block/240:0".to_vec()),
        3 => Some(e.disks[1].as_os_str().as_encoded_bytes().to_vec()),
        4 => Some(b"/dev/nope".to_vec()),
        _ => None,
    };
    let path = path.map(|p| CString::new(p).unwrap());
    let (attach, detach, ctl) = if st.v3 {
        (v3::BLKFILTER_ATTACH, v3::BLKFILTER_DETACH, v3::BLKFILTER_CTL)
    } else {
        (newest::BLKFILTER_ATTACH, newest::BLKFILTER_DETACH, newest::BLKFILTER_CTL)
    };
    let code = match r.u8() % 10 {
        0 | 1 => attach,
        2 => detach,
        3..=7 => ctl,
        8 => r.pick(&[
            v3::BLKFILTER_ATTACH,
            v3::BLKFILTER_DETACH,
            v3::BLKFILTER_CTL,
            newest::BLKFILTER_ATTACH,
            newest::BLKFILTER_DETACH,
            newest::BLKFILTER_CTL,
        ]),
        _ => r.u32(),
    };
    let size = ioc_size(code);
    let choice = r.u8() % 16;
    let mut arg = vec![0u8; size as usize];
    r.fill(&mut arg);
    if r.u8() % 4 != 0 {
        let mut name = [0u8; 32];
        name[..7].copy_from_slice(b"blksnap");
        put(&mut arg, 0, &name);
    }
    if code == ctl && arg.len() >= 48 {
        let b = r.u8();
        let cmd = if b < 240 { u32::from(b % 6) } else { r.u32() };
        let needed: u32 = match cmd {
            0 => 40,
            1 | 2 => 16,
            3 => 16,
            4 => 36,
            _ => 0,
        };
        let optlen = match r.u8() % 8 {
            0 => u32::from(r.u8()),
            1 => r.u32(),
            2 => needed.saturating_sub(1),
            3 => needed + u32::from(r.u8() % 16),
            _ => needed,
        };
        // The option struct's contents (nested pointers first), then its own pointer.
        let mut opt_buf = vec![0u8; if u64::from(optlen) <= BYTES_CAP { optlen as usize } else { 0 }];
        r.fill(&mut opt_buf);
        match cmd {
            1 => {
                let offset =
                    r.small_or_edge(250, &[u32::MAX as u64, 256, 2048, 2049, 65_536]) as u32;
                let length = match r.u8() % 4 {
                    0 => r.u32(),
                    1 => r.pick(&[256, 2048, 4096, u32::MAX, 1 << 20]),
                    _ => u32::from(r.u16() % 2100),
                };
                put(&mut opt_buf, 0, &offset.to_ne_bytes());
                put(&mut opt_buf, 4, &length.to_ne_bytes());
                let p = st.arena.ptr(r, u64::from(length), BYTES_CAP, |_, _| {});
                put(&mut opt_buf, 8, &(p as u64).to_ne_bytes());
            }
            2 => {
                let count = count_value(r);
                put(&mut opt_buf, 0, &count.to_ne_bytes());
                let p = st.arena.ptr(r, u64::from(count) * 16, COUNT_CAP * 16, sector_range);
                put(&mut opt_buf, 8, &(p as u64).to_ne_bytes());
            }
            3 => {
                let id = st.id(r);
                put(&mut opt_buf, 0, &id);
            }
            _ => {}
        }
        let opt = st.arena.ptr(r, u64::from(optlen), BYTES_CAP, |_, buf| {
            buf.copy_from_slice(&opt_buf);
        });
        put(&mut arg, 32, &cmd.to_ne_bytes());
        put(&mut arg, 36, &optlen.to_ne_bytes());
        put(&mut arg, 40, &(opt as u64).to_ne_bytes());
    }
    let argp = match choice {
        0 => core::ptr::null_mut(),
        1 => (usize::MAX - (usize::from(r.u8()) % size.max(1) as usize)) as *mut c_void,
        _ if size == 0 => core::ptr::null_mut(),
        _ => arg.as_mut_ptr().cast(),
    };
    let pathp = path.as_ref().map_or(core::ptr::null(), |p| p.as_ptr());
    // SAFETY: as in `control`; the path is NULL or a C string.
    let ret = unsafe { blksnap_filter_ioctl(st.handle, pathp, code as c_ulong, argp) };
    check(ret, &format!("filter_ioctl {code:#x} on {path:?}"));
}

fn data(st: &mut State, r: &mut Rd) {
    let op = r.u8() % 5;
    let image = op % 2 == 1;
    let path: Option<Vec<u8>> = match r.u8() % 6 {
        0 | 1 if image => Some(if st.v3 {
            b"/dev/blksnap-image_240:0".to_vec()
        } else {
            b"blksnap-240-0".to_vec()
        }),
        2 if image => Some(if st.v3 {
            b"blksnap-image_240:1".to_vec()
        } else {
            b"/dev/blksnap-240-1".to_vec()
        }),
        0 | 1 => Some(b"/dev/fz0".to_vec()),
        2 => Some(b"/dev/fz1".to_vec()),
        3 => Some(b"/dev/blksnap-image_240:9".to_vec()),
        4 => None,
        _ => Some(b"/dev/fz0".to_vec()),
    };
    let path = path.map(|p| CString::new(p).unwrap());
    let pathp = path.as_ref().map_or(core::ptr::null(), |p| p.as_ptr());
    let offset = match r.u8() % 8 {
        0 => r.u64(),
        1 => r.pick(&[DISK_BYTES, DISK_BYTES - 512, u64::MAX, u64::MAX - 511, 1 << 63]),
        2 => u64::from(r.u16()),
        _ => u64::from(r.u16() % 2048) * 512,
    };
    let len: u64 = match r.u8() % 8 {
        0 => u64::from(r.u16()),
        1 => r.pick(&[DISK_BYTES + 512, usize::MAX as u64, isize::MAX as u64 + 1, 1 << 40, 0]),
        _ => u64::from(r.u8() % 17) * 512,
    };
    if op == 4 {
        let p = st.arena.ptr(r, 8, 8, |_, _| {});
        // SAFETY: path NULL or a C string; p NULL, wrapping, or 8 bytes.
        let ret = unsafe { blksnap_dev_size(st.handle, pathp, p as *mut u64) };
        check(ret, "dev_size");
        return;
    }
    let p = st.arena.ptr(r, len, 1 << 21, |r, b| {
        if let Some(x) = b.first_mut() {
            *x = r.u8();
        }
    });
    let n = len as usize;
    // SAFETY: path NULL or a C string; p NULL, wrapping, or exactly `len` bytes.
    let ret = unsafe {
        match op {
            0 => blksnap_dev_pread(st.handle, pathp, p as *mut c_void, n, offset),
            1 => blksnap_image_pread(st.handle, pathp, p as *mut c_void, n, offset),
            2 => blksnap_dev_pwrite(st.handle, pathp, p as *const c_void, n, offset),
            _ => blksnap_image_pwrite(st.handle, pathp, p as *const c_void, n, offset),
        }
    };
    if ret > 0 && ret as u64 != len {
        panic!("data op {op}: returned {ret} for len {len}");
    }
    check_neg(ret, &format!("data op {op} len {len} offset {offset}"));
}

fuzz_target!(|data_in: &[u8]| {
    let e = env();
    let mut u = Unstructured::new(data_in);
    let mut r = Rd(&mut u);
    for d in &e.disks {
        reset(d, DISK_BYTES);
    }
    reset(&e.storage, STORAGE_BYTES);
    let head = r.u8();
    let v3 = head % 2 == 0;
    let params = match (head >> 1) % 4 {
        0 => "param.tracking_block_minimum_shift=12;param.tracking_block_maximum_shift=20;\
              param.chunk_minimum_shift=12;param.chunk_maximum_shift=20;\
              param.diff_storage_minimum_sectors=64",
        1 => "param.tracking_block_minimum_shift=9;param.tracking_block_maximum_count=64;\
              param.chunk_minimum_shift=13;param.diff_storage_minimum_sectors=32",
        2 => "",
        _ => "param.chunk_minimum_shift=15;param.chunk_maximum_shift=15;\
              param.diff_storage_minimum_sectors=128",
    };
    let config = format!(
        "/dev/fz0={}@240:0;/dev/fz1={}@240:1;storage:/dev/block/8:1={};{params};seed=1",
        e.disks[0].display(),
        e.disks[1].display(),
        e.storage.display()
    );
    let config = CString::new(config).unwrap();
    if head >> 3 == 31 {
        // A bad profile number.
        // SAFETY: a C string.
        let ret = unsafe { blksnap_ctl_open(3, config.as_ptr()) };
        assert_eq!(ret, -(Errno::EINVAL.code()));
    }
    // SAFETY: a C string.
    let handle = unsafe { blksnap_ctl_open(if v3 { 1 } else { 2 }, config.as_ptr()) };
    assert!(handle > 0, "open: {handle}");
    let mut st = State { handle, v3, ids: Vec::new(), arena: Arena::default() };
    let mut calls = 0;
    while r.more() && calls < 48 {
        calls += 1;
        match r.u8() % 8 {
            0 | 1 => control(&mut st, &mut r),
            2..=4 => filter(&mut st, &mut r),
            5 | 6 => data(&mut st, &mut r),
            _ => {
                let dup = blksnap_ctl_dup(handle);
                assert!(dup > 0, "dup: {dup}");
                assert_eq!(blksnap_ctl_profile(dup), if v3 { 1 } else { 2 });
                assert_eq!(blksnap_ctl_close(dup), 0);
                assert_eq!(blksnap_ctl_close(dup), -9 /* EBADF */);
            }
        }
        st.arena.0.clear();
    }
    assert_eq!(blksnap_ctl_close(handle), 0);
    assert_eq!(blksnap_ctl_profile(handle), -9 /* EBADF */);
});
