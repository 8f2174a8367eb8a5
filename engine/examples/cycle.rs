//! A whole snapshot cycle on in-memory devices, printed step by step: attach, write, create a
//! snapshot with a growable storage, take, overwrite the origin, verify the image, read the CBT,
//! destroy, and check that nothing is left alive. Needs no kernel driver.
//!
//! `cargo run --release -p blksnap-engine --example cycle`

use std::time::Instant;

use blksnap_engine::io::MemDev;
use blksnap_engine::sync::StdArc;
use blksnap_engine::{Engine, EngineConfig, LiveCounts, StorageSpec};
use blksnap_model::{DeviceId, Params};

const MIB: u64 = 1 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let engine =
        Engine::new(EngineConfig { params: Params::default(), ..EngineConfig::default() })?;
    let dev = DeviceId::new(251, 0);
    let disk_bytes = 256 * MIB;
    engine.add_disk(dev, StdArc::new(MemDev::new(disk_bytes)), 8)?;
    engine.attach(dev)?;
    let info = engine.cbt_info(dev)?;
    println!(
        "attached {dev}: {} MiB, CBT {} blocks of {} KiB, generation {}",
        disk_bytes / MIB,
        info.block_count,
        info.block_size_bytes / 1024,
        info.generation_id
    );

    let block = vec![0x5au8; MIB as usize];
    for i in 0..disk_bytes / MIB {
        engine.write(dev, i * MIB, &block)?;
    }
    let storage = StdArc::new(MemDev::growable(0, 4096 * MIB));
    let id =
        engine.snapshot_create(StorageSpec::File { backend: storage, limit_sectors: 8 << 20 })?;
    engine.snapshot_add(id, dev)?;
    let t = Instant::now();
    engine.snapshot_take(id)?;
    println!("snapshot {id} taken in {:?}", t.elapsed());

    let t = Instant::now();
    let new = vec![0xa5u8; MIB as usize];
    for i in (0..disk_bytes / MIB).step_by(4) {
        engine.write(dev, i * MIB, &new)?;
    }
    let stats = engine.storage_stats(id)?;
    println!(
        "overwrote 64 MiB of the origin in {:?}: {} chunks copied, storage {} MiB used of {} MiB",
        t.elapsed(),
        engine.live().chunks,
        stats.filled_sectors / 2048,
        stats.capacity_sectors / 2048
    );

    let mut buf = vec![0u8; MIB as usize];
    for i in 0..disk_bytes / MIB {
        engine.image_read(dev, i * MIB, &mut buf)?;
        if buf != block {
            return Err(format!("image differs from the pre-take data at MiB {i}").into());
        }
    }
    println!("image verified: all {} MiB equal the pre-take content", disk_bytes / MIB);

    engine.snapshot_take(id).expect_err("a second take is refused");
    let mut map = Vec::new();
    let info = engine.cbt_info(dev)?;
    engine.cbt_map(dev, 0, info.block_count, &mut map)?;
    let changed = map.iter().filter(|b| **b >= 1).count();
    println!("CBT: changes_number {}, {changed} blocks marked since attach", info.changes_number);

    engine.snapshot_destroy(id)?;
    engine.detach(dev)?;
    let live = engine.live();
    println!("destroyed and detached; live objects: {live:?}");
    if live != LiveCounts::default() {
        return Err("objects left alive after teardown".into());
    }
    println!("cycle OK");
    Ok(())
}
