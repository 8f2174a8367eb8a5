//! Scenario `cbt` (see its entry in `SCENARIOS`).

use super::*;

pub(crate) fn cbt(env: &Env) -> R {
    let (origin, dev) = env.origins()?.remove(0);
    let mut c = env.client()?;
    let id1 = env.snapshot(&mut c, 8, &[dev])?;
    c.req(Request::SnapshotTake { id: id1 })?;
    let Reply::CbtInfo(info1) = c.req(Request::CbtInfo { dev })? else {
        return Err("CbtInfo".into());
    };
    let bs = u64::from(info1.block_size_bytes);
    let count = u64::from(info1.block_count);
    ensure!(count > 16, "device too small for the test: {count} blocks of {bs}");
    // Write pages at scattered offsets (some straddling block boundaries when bs > 4 KiB).
    let f = open_direct(&origin, true).map_err(|e| e.to_string())?;
    let capacity = count * bs;
    let mut written = std::collections::BTreeSet::new();
    let mut x = 12345u64;
    for _ in 0..40 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let page = (x >> 33) % (capacity / 4096 / 2); // the first half only
        let off = page * 4096;
        pwrite_page(&f, off, b"cbt").map_err(|e| e.to_string())?;
        written.insert(off / bs);
    }
    f.sync_all().map_err(|e| e.to_string())?;
    c.req(Request::SnapshotDestroy { id: id1 })?;
    let id2 = env.snapshot(&mut c, 8, &[dev])?;
    c.req(Request::SnapshotTake { id: id2 })?;
    let Reply::CbtInfo(info2) = c.req(Request::CbtInfo { dev })? else {
        return Err("CbtInfo".into());
    };
    ensure!(info2.generation_id == info1.generation_id, "generation changed");
    ensure!(info2.changes_number > info1.changes_number, "take did not advance");
    let Reply::CbtMap(map) =
        c.req(Request::CbtMap { dev, offset: 0, length: info2.block_count })?
    else {
        return Err("CbtMap".into());
    };
    for (b, v) in map.iter().enumerate() {
        let b = b as u64;
        if written.contains(&b) {
            ensure!(*v > info1.changes_number, "written block {b} not marked ({v})");
        } else {
            ensure!(*v == 0, "block {b} never written but marked {v}");
        }
    }
    // Out-of-range map requests are refused.
    let r = c.call(Request::CbtMap { dev, offset: 0, length: info2.block_count + 1 });
    ensure!(matches!(r, Ok(Err(ref e)) if e.errno == 61), "cbtmap past the end: {r:?}");
    c.req(Request::SnapshotDestroy { id: id2 })?;
    Ok(())
}
