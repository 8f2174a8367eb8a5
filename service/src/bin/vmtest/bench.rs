//! Scenario `bench` (see its entry in `SCENARIOS`).

use super::*;

/// One timed pass of 4 KiB O_DIRECT I/O over `region` bytes from the start of `path`; MB/s.
fn pass(path: &str, write: bool, random: bool, region: u64, seed: u64) -> R<f64> {
    let f = open_direct(path, write).map_err(|e| format!("{path}: {e}"))?;
    let pages = region / 4096;
    let mut p = Box::new(Page([0; 4096]));
    fill(seed, &mut p.0);
    let mut x = seed | 1;
    let t = Instant::now();
    for i in 0..pages {
        let page = if random {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % pages
        } else {
            i
        };
        let r = if write {
            f.write_all_at(&p.0, page * 4096)
        } else {
            f.read_exact_at(&mut p.0, page * 4096)
        };
        r.map_err(|e| format!("{path} at page {page}: {e}"))?;
    }
    Ok((pages * 4096) as f64 / t.elapsed().as_secs_f64() / 1e6)
}

pub(crate) fn bench(env: &Env) -> R {
    let (origin, dev) = env.origins()?.remove(0);
    let mut c = env.client()?;
    let region = 8 * MIB;
    // the kernel loop driver over a file of the same kind (tmpfs), same sizes
    let loop_file = env.path("loop.img");
    sparse_file(&loop_file, 64 * MIB)?;
    let lo = run("losetup", &["-f"])?.trim().to_string(); // busybox: the next free device
    run("losetup", &[&lo, &loop_file.display().to_string()])?;
    let mut rows: Vec<(String, [f64; 4])> = Vec::new();
    let measure = |name: &str, path: &str, seed: u64| -> R<(String, [f64; 4])> {
        let r = [
            pass(path, true, false, region, seed)?,
            pass(path, true, true, region, seed + 1)?,
            pass(path, false, false, region, seed + 2)?,
            pass(path, false, true, region, seed + 3)?,
        ];
        Ok((name.to_string(), r))
    };
    let run_all = (|| -> R {
        // untimed first passes: the backing files' pages get allocated (tmpfs), caches warm
        pass(&lo, true, false, region, 0)?;
        pass(&origin, true, false, region, 0)?;
        rows.push(measure("loop", &lo, 1)?);
        rows.push(measure("tracked, no snapshot", &origin, 1)?);
        let id = env.snapshot(&mut c, 48, &[dev])?;
        c.req(Request::SnapshotTake { id })?;
        // first writes copy each chunk; rewrites find it stored
        let first_seq = pass(&origin, true, false, region, 5)?;
        let rewrite_seq = pass(&origin, true, false, region, 6)?;
        rows.push(("taken: first write (seq)".into(), [first_seq, 0.0, 0.0, 0.0]));
        rows.push(("taken: rewrite (seq)".into(), [rewrite_seq, 0.0, 0.0, 0.0]));
        rows.push(measure("tracked, taken", &origin, 7)?);
        rows.push(measure("image", &image_link(dev, false), 9)?);
        c.req(Request::SnapshotDestroy { id }).map(drop)
    })();
    let _ = run("losetup", &["-d", &lo]);
    run_all?;
    let base = rows[0].1;
    println!("    MB/s (ratio to loop)   seq write      rand write     seq read       rand read");
    for (name, r) in &rows {
        let cells: Vec<String> = r
            .iter()
            .zip(base.iter())
            .map(|(v, b)| if *v == 0.0 { "-".into() } else { format!("{v:6.1} ({:.2})", v / b) })
            .collect();
        println!("    {name:24} {:14} {:14} {:14} {:14}", cells[0], cells[1], cells[2], cells[3]);
    }
    Ok(())
}
