//! Section 4: attach, take and destroy latency against the device size (sparse devices).

use blksnap_engine::Engine;
use blksnap_engine::StorageSpec;
use blksnap_model::formulas::cbt_layout;
use blksnap_model::{DeviceId, Params, Result};

use crate::setup::{engine, layout, Env, Kind, IO_MIN_SECTORS};
use crate::util::{self, median, ratio, secs, Table, GIB, KIB, TIB};
use crate::{Config, Goals};

/// ext4 caps a file at 16 TiB − 4 KiB: the file-backed "16 TiB" device is that size.
fn capacity(kind: Kind, bytes: u64) -> u64 {
    if kind == Kind::File && bytes >= 16 * TIB {
        16 * TIB - 4 * KIB
    } else {
        bytes
    }
}

struct Times {
    attach: Vec<f64>,
    take: Vec<f64>,
    destroy: Vec<f64>,
}

/// Create, add (untimed), take and destroy (timed) one snapshot of `dev`.
fn take_destroy(env: &Env, kind: Kind, engine: &Engine, dev: DeviceId) -> Result<(f64, f64)> {
    let storage = env.storage(kind, 4 * GIB)?;
    let id =
        engine.snapshot_create(StorageSpec::File { backend: storage, limit_sectors: 4 << 21 })?;
    engine.snapshot_add(id, dev)?;
    let take = secs(|| engine.snapshot_take(id).expect("take"));
    let destroy = secs(|| engine.snapshot_destroy(id).expect("destroy"));
    Ok((take, destroy))
}

/// Flat: the larger device costs at most 1.5× the smaller plus 20 µs (timer and scheduling
/// noise at this scale).
fn flat(large: f64, small: f64) -> bool {
    large <= 1.5 * small + 20e-6
}

pub fn section(env: &Env, cfg: &Config, goals: &mut Goals) -> Result<Table> {
    let params = Params::default();
    let mut t = Table::new(
        format!(
            "4. Attach, take and destroy latency vs device size (sparse devices; medians of {})",
            cfg.reps
        ),
        &[
            "device",
            "CBT blocks",
            "chunks",
            "MemDev attach",
            "MemDev take",
            "MemDev destroy",
            "FileDev attach",
            "FileDev take",
            "FileDev destroy",
        ],
    );
    let mut all: Vec<Vec<Times>> = Vec::new();
    for kind in Kind::ALL {
        crate::progress(&format!("take/destroy on {}", kind.name()));
        let engine = engine(params);
        let mut devs = Vec::new();
        for (i, &bytes) in cfg.take_sizes.iter().enumerate() {
            let dev = DeviceId::new(252, i as u32);
            engine.add_disk(dev, env.sparse(kind, capacity(kind, bytes))?, IO_MIN_SECTORS)?;
            engine.attach(dev)?;
            devs.push(dev);
        }
        let mut times: Vec<Times> =
            devs.iter().map(|_| Times { attach: vec![], take: vec![], destroy: vec![] }).collect();
        let n = devs.len();
        // Takes and destroys on trackers attached once (as in service: attach at start, take
        // periodically); one untimed round first, which also faults in the maps' pages.
        for rep in 0..=cfg.reps {
            for k in 0..n {
                let i = (k + rep) % n; // rotate the order of the sizes
                let (tk, d) = take_destroy(env, kind, &engine, devs[i])?;
                if rep > 0 {
                    times[i].take.push(tk);
                    times[i].destroy.push(d);
                }
            }
        }
        // Attach (allocates both maps), after a detach.
        for rep in 0..cfg.reps {
            for k in 0..n {
                let i = (k + rep) % n;
                engine.detach(devs[i])?;
                times[i].attach.push(secs(|| engine.attach(devs[i]).expect("attach")));
            }
        }
        all.push(times);
    }
    for (i, &bytes) in cfg.take_sizes.iter().enumerate() {
        let cbt = cbt_layout(&params, bytes >> 9);
        let chunks = layout(&params, bytes).chunk_count;
        let mut cells = vec![util::size(bytes), cbt.block_count.to_string(), chunks.to_string()];
        for times in &all {
            let x = &times[i];
            cells.push(util::dur(median(&x.attach)));
            cells.push(util::dur(median(&x.take)));
            cells.push(util::dur(median(&x.destroy)));
        }
        t.row(cells);
    }
    // Flatness: the largest device against the smallest one that already has the maximum CBT
    // block count (below it the take's CBT switch copies a smaller map), and against the
    // smallest. "Flat" allows 1.5× + 20 µs.
    let last = cfg.take_sizes.len() - 1;
    let capped = cfg
        .take_sizes
        .iter()
        .position(|&b| {
            cbt_layout(&params, b >> 9).block_count >= params.tracking_block_maximum_count
        })
        .unwrap_or(last);
    for (kind, times) in Kind::ALL.iter().zip(&all) {
        let take = |i: usize| median(&times[i].take);
        let destroy = |i: usize| median(&times[i].destroy);
        let size = |i: usize| util::size(cfg.take_sizes[i]);
        goals.add(
            format!("take: no per-chunk work ({} vs {}: same CBT size)", size(last), size(capped)),
            *kind,
            ratio(take(last) / take(capped)),
            flat(take(last), take(capped)),
        );
        goals.add(
            format!("take flat in device size ({} vs {})", size(last), size(0)),
            *kind,
            format!(
                "{} ({} vs {})",
                ratio(take(last) / take(0)),
                util::dur(take(last)),
                util::dur(take(0))
            ),
            flat(take(last), take(0)),
        );
        goals.add(
            format!("destroy flat in device size ({} vs {})", size(last), size(0)),
            *kind,
            format!(
                "{} ({} vs {})",
                ratio(destroy(last) / destroy(0)),
                util::dur(destroy(last)),
                util::dur(destroy(0))
            ),
            flat(destroy(last), destroy(0)),
        );
    }
    t.note(
        "* Take = create the diff area (chunk metadata is lazy: nothing per chunk) + the CBT \
         switch, which moves the snap numbers only: the kernel's copy of the live map into the \
         read map (a memcpy of one byte per block) is deferred per block to its first write \
         after the take (engine/src/cbt.rs), so take is flat in the CBT block count too. The \
         block count grows with the device up to its cap of 2 Mi blocks (128 GiB with 64 KiB \
         blocks), then the block size grows instead. Attach allocates the map (two bytes per \
         block). Takes and destroys run on \
         trackers attached once (after one untimed round); destroy of an untouched snapshot. \
         Flat = at most 1.5× + 20 µs."
            .to_string(),
    );
    t.note("* The file-backed 16 TiB device is 16 TiB − 4 KiB (ext4's largest file).".to_string());
    Ok(t)
}
