//! Section 5: heap bytes retained by CBT maps and chunk metadata, read from the counting
//! allocator around each operation.

use std::sync::Arc;

use blksnap_engine::io::{Dev, MemDev};
use blksnap_engine::StorageSpec;
use blksnap_model::formulas::cbt_layout;
use blksnap_model::{DeviceId, Params, Result};

use crate::alloc::live_bytes;
use crate::setup::{engine, layout, Env, Kind, IO_MIN_SECTORS};
use crate::util::{self, Table, GIB, MIB, TIB};
use crate::{Config, Goals};

fn per_tib(bytes: i64, device: u64) -> String {
    util::size((bytes as f64 * TIB as f64 / device as f64) as u64)
}

pub fn section(env: &Env, cfg: &Config, goals: &mut Goals) -> Result<Table> {
    crate::progress("memory");
    let params = Params::default();
    let mut t = Table::new(
        "5. Memory: heap bytes retained (counting global allocator)",
        &[
            "what",
            "measured",
            "per TiB tracked",
            "kernel (1 byte per block per map)",
            "measured / kernel",
        ],
    );
    let engine = engine(params);
    // CBT: both maps, at attach.
    for (i, &bytes) in [16 * GIB, TIB, 16 * TIB].iter().enumerate() {
        let dev = DeviceId::new(253, i as u32);
        engine.add_disk(dev, env.sparse(Kind::Mem, bytes)?, IO_MIN_SECTORS)?;
        let before = live_bytes();
        engine.attach(dev)?;
        let cbt = live_bytes() - before;
        let blocks = cbt_layout(&params, bytes >> 9).block_count;
        let kernel = 2 * blocks as i64;
        t.row(vec![
            format!(
                "CBT of a {} device ({} blocks of {})",
                util::size(bytes),
                blocks,
                util::size(cbt_layout(&params, bytes >> 9).block_size_bytes())
            ),
            format!("{} ({cbt} B)", util::size(cbt as u64)),
            per_tib(cbt, bytes),
            util::size(kernel as u64),
            util::ratio(cbt as f64 / kernel as f64),
        ]);
        if bytes == TIB {
            goals.add(
                "CBT memory ≤ 1.05× the kernel's 2 bytes per block".into(),
                Kind::Mem,
                util::ratio(cbt as f64 / kernel as f64),
                cbt as f64 <= 1.05 * kernel as f64,
            );
        }
    }
    // Take: what it retains does not depend on the size (no per-chunk metadata).
    let mut take_bytes = Vec::new();
    for (i, &bytes) in [GIB, 16 * TIB].iter().enumerate() {
        let dev = DeviceId::new(254, i as u32);
        engine.add_disk(dev, env.sparse(Kind::Mem, bytes)?, IO_MIN_SECTORS)?;
        engine.attach(dev)?;
        let storage: Dev = Arc::new(MemDev::growable(0, 4 * GIB));
        let id = engine
            .snapshot_create(StorageSpec::File { backend: storage, limit_sectors: 4 << 21 })?;
        engine.snapshot_add(id, dev)?;
        let before = live_bytes();
        engine.snapshot_take(id)?;
        let took = live_bytes() - before;
        // Image reads of untouched chunks create no metadata either.
        let mut buf = vec![0u8; MIB as usize];
        let before_reads = live_bytes();
        for k in 0..64 {
            engine.image_read(dev, k * (bytes / 64), &mut buf)?;
        }
        let reads = live_bytes() - before_reads;
        let chunks = engine.live().chunks;
        t.row(vec![
            format!(
                "take of a {} device ({} chunks), then 64 MiB of image reads",
                util::size(bytes),
                layout(&params, bytes).chunk_count
            ),
            format!("{took} B; reads: {reads} B, {chunks} chunk records"),
            "—".into(),
            "—".into(),
            "—".into(),
        ]);
        take_bytes.push(took);
        engine.snapshot_destroy(id)?;
    }
    goals.add(
        "no per-chunk memory for untouched chunks (take of 1 GiB vs 16 TiB)".into(),
        Kind::Mem,
        format!("{} B vs {} B", take_bytes[0], take_bytes[1]),
        take_bytes[0] == take_bytes[1],
    );
    // Per copied chunk: 4 KiB chunks on files (the file backends keep nothing on the heap, so
    // the difference is the engine's metadata: chunk records and the chunk map).
    let small = Params { chunk_minimum_shift: 12, ..params };
    let disk_bytes = if cfg.quick { 16 * MIB } else { 64 * MIB };
    let chunk_layout = layout(&small, disk_bytes);
    let engine = crate::setup::engine(small);
    let dev = DeviceId::new(255, 0);
    engine.add_disk(dev, env.device(Kind::File, disk_bytes)?, IO_MIN_SECTORS)?;
    engine.attach(dev)?;
    let storage = env.storage(Kind::File, 2 * GIB)?;
    let id =
        engine.snapshot_create(StorageSpec::File { backend: storage, limit_sectors: 4 << 21 })?;
    engine.snapshot_add(id, dev)?;
    engine.snapshot_take(id)?;
    let sector = [0x11u8; 512];
    let before = live_bytes();
    for c in 0..chunk_layout.chunk_count {
        engine.write(dev, c * chunk_layout.chunk_size_bytes(), &sector)?;
    }
    let copied = live_bytes() - before;
    let n = chunk_layout.chunk_count as i64;
    let per_chunk = copied as f64 / n as f64;
    engine.snapshot_destroy(id)?;
    let full_tib = per_chunk * (TIB / layout(&params, TIB).chunk_size_bytes()) as f64;
    t.row(vec![
        format!("chunk metadata per copied chunk ({n} chunks copied)"),
        format!("{per_chunk:.0} B per chunk"),
        format!("{} if every 256 KiB chunk of a TiB is copied", util::size(full_tib as u64)),
        "—".into(),
        "—".into(),
    ]);
    t.note(
        "* CBT: both maps live in one `AtomicU16` cell per block, as many bytes as the kernel's \
         two byte maps; the \
         measured figure is everything attach retains (the maps and the tracker's record). Per-TiB figures scale the device's \
         retained bytes to 1 TiB (the block size grows with the device, so small devices cost \
         more per TiB)."
            .to_string(),
    );
    t.note(
        "* Chunk metadata exists only for chunks that were written (COW or image write): a take \
         allocates the diff area and an empty chunk map whatever the size; image reads of \
         untouched chunks allocate nothing. Per copied chunk: a reference-counted record (state, \
         lock, wait queue, storage location) plus its chunk-map entry, amortised over the map's \
         growth (measured with 4 KiB chunks; the record does not depend on the chunk size)."
            .to_string(),
    );
    Ok(t)
}
