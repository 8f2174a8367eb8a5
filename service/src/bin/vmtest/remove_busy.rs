//! Scenario `remove-busy`: RemoveDevice of an origin that is mounted, or held open
//! exclusively, is refused with EBUSY before anything changes (the device keeps being served
//! and tracked, the mounted filesystem keeps working); once unmounted or closed, the removal
//! succeeds and the block device is gone.

use super::*;

fn remove(c: &mut Client, dev: Dev) -> R<Result<(), i32>> {
    let r = c.call(Request::RemoveDevice { dev }).map_err(|e| e.to_string())?;
    Ok(r.map(drop).map_err(|e| e.errno))
}

pub(crate) fn remove_busy(env: &Env) -> R {
    let mut origins = env.origins()?;
    let (held_node, held_dev) = origins.remove(1);
    let (node, dev) = origins.remove(0);
    let mut c = env.client()?;
    // 1. mounted
    mkfs(&node)?;
    let om = env.path("origin");
    mount(&node, &om, "rw")?;
    let files = write_files(&om, "f", 10, 91)?;
    ensure!(remove(&mut c, dev)? == Err(16), "RemoveDevice of a mounted origin: not EBUSY");
    // nothing changed: still served, tracked, the filesystem works
    let more = write_files(&om, "g", 5, 92)?;
    sync();
    ensure!(c.req(Request::CbtInfo { dev }).is_ok(), "the tracker is gone after a refused remove");
    verify_files(&om, &files)?;
    verify_files(&om, &more)?;
    umount(&om)?;
    fsck(&node)?;
    remove(&mut c, dev)?.map_err(|e| format!("RemoveDevice after umount: errno {e}"))?;
    ensure!(wait_gone(&node, 10), "{node} still there after RemoveDevice");
    // 2. held open exclusively (as a filesystem or device-mapper would)
    let held = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(&held_node)
        .map_err(|e| format!("{held_node}: {e}"))?;
    ensure!(remove(&mut c, held_dev)? == Err(16), "RemoveDevice of a held origin: not EBUSY");
    drop(held);
    remove(&mut c, held_dev)?.map_err(|e| format!("RemoveDevice after close: errno {e}"))?;
    ensure!(wait_gone(&held_node, 10), "{held_node} still there after RemoveDevice");
    let Reply::Devices(list) = c.req(Request::ListDevices)? else {
        return Err("ListDevices".into());
    };
    ensure!(list.is_empty(), "devices left: {list:?}");
    Ok(())
}
