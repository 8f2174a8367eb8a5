//! Scenario `two-devices` (see its entry in `SCENARIOS`).

use super::*;

pub(crate) fn two_devices(env: &Env) -> R {
    let o = env.origins()?;
    let (a, b) = (&o[0], &o[1]);
    let mut c = env.client()?;
    let fa = Arc::new(open_direct(&a.0, true).map_err(|e| e.to_string())?);
    let fb = Arc::new(open_direct(&b.0, true).map_err(|e| e.to_string())?);
    for f in [&fa, &fb] {
        pwrite_page(f, MIB, b"BEFORE").map_err(|e| e.to_string())?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (s, wa, wb) = (stop.clone(), fa.clone(), fb.clone());
    let writer = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut n = 0u64;
        while !s.load(Ordering::Relaxed) {
            n += 1;
            pwrite_page(&wa, 0, &n.to_le_bytes())?;
            pwrite_page(&wb, 0, &n.to_le_bytes())?;
        }
        Ok(n)
    });
    std::thread::sleep(Duration::from_millis(500));
    let id = env.snapshot(&mut c, 8, &[a.1, b.1])?;
    c.req(Request::SnapshotTake { id })?;
    for f in [&fa, &fb] {
        pwrite_page(f, MIB, b"AFTER").map_err(|e| e.to_string())?;
        pwrite_page(f, 2 * MIB, b"AFTER").map_err(|e| e.to_string())?;
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let last = writer.join().map_err(|_| "writer panicked")?.map_err(|e| e.to_string())?;
    let ia = open_direct(&image_link(a.1, false), false).map_err(|e| e.to_string())?;
    let ib = open_direct(&image_link(b.1, true), false).map_err(|e| e.to_string())?;
    let seq = |f: &File| -> R<u64> {
        let p = pread_page(f, 0).map_err(|e| e.to_string())?;
        Ok(u64::from_le_bytes(p.0[..8].try_into().expect("8 bytes")))
    };
    let (sa, sb) = (seq(&ia)?, seq(&ib)?);
    ensure!(sa >= 1 && sa < last, "image A sequence {sa} (writer reached {last})");
    ensure!(sa == sb || sa == sb + 1, "images incoherent: A has {sa}, B has {sb}");
    for (name, f) in [("A", &ia), ("B", &ib)] {
        let p = pread_page(f, MIB).map_err(|e| e.to_string())?;
        ensure!(&p.0[..6] == b"BEFORE", "image {name}: marker written before the take missing");
        let p = pread_page(f, 2 * MIB).map_err(|e| e.to_string())?;
        ensure!(p.0.iter().all(|b| *b == 0), "image {name}: marker written after the take present");
    }
    let (ra, rb) = (seq(&fa)?, seq(&fb)?);
    ensure!(ra == last && rb == last, "origins: {ra} {rb}, writer {last}");
    drop((ia, ib));
    c.req(Request::SnapshotDestroy { id })?;
    println!("    images at sequence {sa}/{sb}, writer reached {last}");
    Ok(())
}
