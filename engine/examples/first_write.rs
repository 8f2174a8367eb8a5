//! The cost of a first write after a take, next to its physical minimum (the same three calls
//! on the same kinds of backends: read the chunk from the origin, write it to the storage, write
//! the data). Meant for instruction counts, which are repeatable on a loaded machine:
//!
//! `valgrind --tool=callgrind --toggle-collect='*first_write::cow_writes*'
//! target/release/examples/first_write cow 256` (and `min` / `*min_writes*`): the collected
//! count over the writes is the cost of one first write, setup excluded. The program also prints
//! the minor page faults per write (kernel work that instruction counts do not see) and the time
//! per write.
//!
//! `cargo run --release -p blksnap-engine --example first_write -- [cow|min] [WRITES]`

use std::time::Instant;

use blksnap_engine::io::{Dev, MemDev};
use blksnap_engine::sync::StdArc;
use blksnap_engine::{Engine, EngineConfig, StorageSpec};
use blksnap_model::{DeviceId, Params};

const MIB: u64 = 1 << 20;
const WRITE_BYTES: usize = 4096;

fn minor_faults() -> i64 {
    let mut usage = std::mem::MaybeUninit::<libc_rusage::Rusage>::zeroed();
    // SAFETY: `getrusage` fills the `rusage` struct it is given; ours has the kernel's layout
    // for the fields we read (see `libc_rusage`) and outlives the call.
    unsafe { libc_rusage::getrusage(0, usage.as_mut_ptr()) };
    // SAFETY: zero-initialised and then filled by the kernel: every field is plain integers.
    unsafe { usage.assume_init() }.ru_minflt
}

/// The `rusage` layout of Linux (64-bit), declared here: the engine takes no dependencies.
mod libc_rusage {
    #[repr(C)]
    pub struct Rusage {
        pub ru_utime: [i64; 2],
        pub ru_stime: [i64; 2],
        pub ru_maxrss: i64,
        pub ru_ixrss: i64,
        pub ru_idrss: i64,
        pub ru_isrss: i64,
        pub ru_minflt: i64,
        pub rest: [i64; 9],
    }
    extern "C" {
        pub fn getrusage(who: i32, usage: *mut Rusage) -> i32;
    }
}

/// The measured loop of `cow` (not inlined: callgrind's `--toggle-collect` names it).
#[inline(never)]
fn cow_writes(
    engine: &Engine,
    dev: DeviceId,
    writes: u64,
    chunk_bytes: u64,
    data: &[u8],
) -> blksnap_model::Result<()> {
    for c in 0..writes {
        engine.write(dev, c * chunk_bytes, data)?;
    }
    Ok(())
}

/// The measured loop of `min`: the three calls of a first write, one reused buffer.
#[inline(never)]
fn min_writes(
    origin: &Dev,
    storage: &Dev,
    buf: &mut [u8],
    writes: u64,
    chunk_bytes: u64,
    data: &[u8],
) -> blksnap_model::Result<()> {
    for c in 0..writes {
        origin.read_at(buf, c * chunk_bytes)?;
        storage.write_at(buf, c * chunk_bytes)?;
        origin.write_at(data, c * chunk_bytes)?;
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "cow".into());
    let writes: u64 = args.next().map(|n| n.parse()).transpose()?.unwrap_or(256);
    let params = Params::default();
    let chunk_bytes = 256 * 1024u64;
    let disk_bytes = (writes * chunk_bytes).max(MIB);
    let origin: Dev = StdArc::new(MemDev::new(disk_bytes));
    origin.write_at(&vec![0x5au8; disk_bytes as usize], 0)?;
    let storage: Dev = StdArc::new(MemDev::growable(0, 2 * disk_bytes));
    let data = vec![0xa5u8; WRITE_BYTES];
    let (faults, t) = match mode.as_str() {
        "cow" => {
            let engine = Engine::new(EngineConfig { params, ..EngineConfig::default() })?;
            let dev = DeviceId::new(251, 0);
            engine.add_disk(dev, origin.clone(), 8)?;
            engine.attach(dev)?;
            let spec = StorageSpec::File { backend: storage, limit_sectors: (2 * disk_bytes) >> 9 };
            let id = engine.snapshot_create(spec)?;
            engine.snapshot_add(id, dev)?;
            engine.snapshot_take(id)?;
            let (f0, t0) = (minor_faults(), Instant::now());
            cow_writes(&engine, dev, writes, chunk_bytes, &data)?;
            let r = (minor_faults() - f0, t0.elapsed());
            engine.snapshot_destroy(id)?;
            r
        }
        "min" => {
            storage.set_len(disk_bytes)?;
            let mut buf = vec![0u8; chunk_bytes as usize];
            let (f0, t0) = (minor_faults(), Instant::now());
            min_writes(&origin, &storage, &mut buf, writes, chunk_bytes, &data)?;
            (minor_faults() - f0, t0.elapsed())
        }
        other => return Err(format!("mode {other}: expected cow or min").into()),
    };
    println!(
        "{mode}: {writes} first writes, {:.1} minor faults and {:.1} µs per write",
        faults as f64 / writes as f64,
        t.as_secs_f64() * 1e6 / writes as f64
    );
    Ok(())
}
