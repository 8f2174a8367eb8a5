//! Scenario `restart` (see its entry in `SCENARIOS`).

use super::*;

pub(crate) fn restart(env: &Env) -> R {
    let backing = env.path("r.img");
    sparse_file(&backing, 64 * MIB)?;
    let mut d = DaemonProc::start(env, &backing, 1)?;
    let (node, dev) = d.origin()?;
    let f = open_direct(&node, true).map_err(|e| e.to_string())?;
    for i in 0..8u64 {
        pwrite_page(&f, i * 3 * MIB, b"before take").map_err(|e| e.to_string())?;
    }
    // take and destroy, then more writes: both maps and both numbers are non-trivial
    offline_write::take_destroy(env, &d, dev)?;
    for i in 0..5u64 {
        pwrite_page(&f, 40 * MIB + i * MIB, b"after take").map_err(|e| e.to_string())?;
    }
    drop(f);
    let (info1, map1) = d.cbt(dev)?;
    ensure!(info1.changes_number >= 1, "take did not advance: {info1:?}");
    ensure!(map1.iter().any(|b| *b != 0), "no change before the take marked");

    // 1. clean restart: same generation, same numbers, same map
    let t = Instant::now();
    d.stop()?;
    let files = state_files(env);
    ensure!(!env.path("state/running").exists(), "marker left after a clean stop: {files:?}");
    ensure!(
        files.iter().any(|p| p.display().to_string().ends_with(".state")),
        "no saved CBT: {files:?}"
    );
    ensure!(Path::new(&node).exists(), "{node} removed by a clean stop (kept by default)");
    d.restart()?;
    let (node2, dev2) = d.origin()?;
    ensure!(node2 == node && dev2 == dev, "not taken over: {node} -> {node2}");
    let (info2, map2) = d.cbt(dev2)?;
    println!(
        "    clean restart in {} ms ({node} {}:{} -> {node2} {}:{})",
        t.elapsed().as_millis(),
        dev.major,
        dev.minor,
        dev2.major,
        dev2.minor
    );
    ensure!(info2.generation_id == info1.generation_id, "generation changed on a clean restart");
    ensure!(info2.changes_number == info1.changes_number, "{info1:?} -> {info2:?}");
    ensure!(map2 == map1, "cbtmap differs after a clean restart");
    ensure!(env.path("state/running").exists(), "no marker while running");
    // incremental backups keep working: the next take advances from the restored numbers
    offline_write::take_destroy(env, &d, dev2)?;
    let (info3, map3) = d.cbt(dev2)?;
    ensure!(info3.generation_id == info1.generation_id, "generation changed by a take");
    ensure!(info3.changes_number == info1.changes_number + 1, "{info1:?} -> {info3:?}");
    // the writes after the first take (made before the restart, kept in the restored live
    // map) show up with the new number; the older marks stay
    let bs = u64::from(info3.block_size_bytes);
    for i in 0..5u64 {
        let b = ((40 * MIB + i * MIB) / bs) as usize;
        ensure!(
            map3[b] == info3.changes_number,
            "block {b} written before the restart: {}",
            map3[b]
        );
    }
    for (b, (old, new)) in map1.iter().zip(&map3).enumerate() {
        ensure!(*old == 0 || new == old, "block {b}: {old} before restart, {new} after take");
    }

    // 2. a corrupted state file: refused, new generation
    d.stop()?;
    let state = state_files(env)
        .into_iter()
        .find(|p| p.display().to_string().ends_with(".state"))
        .ok_or("no state file")?;
    let mut bytes = std::fs::read(&state).map_err(|e| e.to_string())?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&state, bytes).map_err(|e| e.to_string())?;
    d.restart()?;
    let (_, dev4) = d.origin()?;
    let (info4, map4) = d.cbt(dev4)?;
    ensure!(info4.generation_id != info1.generation_id, "a corrupted state was used");
    ensure!(map4.iter().all(|b| *b == 0) && info4.changes_number == 0, "{info4:?}");
    ensure!(!state.exists(), "the corrupted state file was left");

    // 3. kill -9: the next start does not trust anything saved; new generation
    let (node5, dev5) = d.origin()?;
    let f = open_direct(&node5, true).map_err(|e| e.to_string())?;
    pwrite_page(&f, 0, b"before kill").map_err(|e| e.to_string())?;
    drop(f);
    let (info5, _) = d.cbt(dev5)?;
    d.kill9()?;
    ensure!(env.path("state/running").exists(), "marker gone after kill -9");
    let t = Instant::now();
    d.restart()?;
    let (node6, dev6) = d.origin()?;
    let (info6, _) = d.cbt(dev6)?;
    println!("    restart after kill -9 in {} ms ({node5} -> {node6})", t.elapsed().as_millis());
    ensure!(info6.generation_id != info5.generation_id, "generation kept after kill -9");
    let f = open_direct(&node6, false).map_err(|e| e.to_string())?;
    let p = pread_page(&f, 0).map_err(|e| e.to_string())?;
    ensure!(&p.0[..11] == b"before kill", "data written before kill -9 lost");
    drop(f);
    d.finish()?;
    ensure!(!env.path("state/running").exists(), "marker left after the last clean stop");
    Ok(())
}
