//! The control device (`/dev/blksnap-control`): request dispatch per profile, following the
//! nested user pointers, with the errno table of `blksnap-abi.md` §2.6 / §3.5.
//!
//! Dispatch matches the **full** request code (quirk §7.2 fixed; §7.3's out-of-bounds slot does
//! not exist); anything else, including the other profile's codes, is ENOTTY.

use core::ffi::c_int;
use core::mem::{offset_of, size_of};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use blksnap_engine::StorageSpec;
use blksnap_model::limits::MAX_RANGES_PER_CALL;
use blksnap_model::{Errno, EventKind, Profile, SectorRange, SnapshotId, Uuid};

use crate::instance::Instance;
use crate::uapi::{self, blksnap_snapshot_event as Event, blksnap_version, newest, v3};
use crate::user::{self, OutImage, UserAddr, R};

/// Version every series reports (quirk §7.30).
pub const VERSION: [u16; 4] = [2, 0, 0, 0];

/// Runs one control request.
///
/// # Safety
/// `arg` follows the ioctl contract: NULL, or the request's struct (and the buffers its
/// pointers name) readable/writable for their documented sizes.
pub unsafe fn ioctl(inst: &Instance, request: u32, arg: UserAddr) -> R<c_int> {
    match inst.profile {
        // SAFETY: contract forwarded.
        Profile::V3 => unsafe { ioctl_v3(inst, request, arg) },
        // SAFETY: contract forwarded.
        Profile::Newest => unsafe { ioctl_newest(inst, request, arg) },
    }
}

unsafe fn ioctl_v3(inst: &Instance, request: u32, arg: UserAddr) -> R<c_int> {
    // SAFETY: (every arm) the caller's contract on `arg`, forwarded.
    unsafe {
        match request {
            v3::IOCTL_BLKSNAP_VERSION => version(arg),
            v3::IOCTL_BLKSNAP_SNAPSHOT_CREATE => create_v3(inst, arg),
            v3::IOCTL_BLKSNAP_SNAPSHOT_DESTROY => destroy(inst, arg),
            v3::IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE => append_storage(inst, arg),
            v3::IOCTL_BLKSNAP_SNAPSHOT_TAKE => take(inst, arg),
            v3::IOCTL_BLKSNAP_SNAPSHOT_COLLECT => {
                let c = user::read::<v3::blksnap_snapshot_collect>(arg, Errno::ENODATA)?;
                collect::<v3::blksnap_snapshot_collect>(
                    inst,
                    arg,
                    c.count,
                    UserAddr::from_ptr(c.ids),
                    &(c.ids as usize).to_ne_bytes(),
                    offset_of!(v3::blksnap_snapshot_collect, ids),
                )
            }
            v3::IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT => wait_event(inst, arg),
            _ => Err(Errno::ENOTTY),
        }
    }
}

unsafe fn ioctl_newest(inst: &Instance, request: u32, arg: UserAddr) -> R<c_int> {
    // SAFETY: (every arm) the caller's contract on `arg`, forwarded.
    unsafe {
        match request {
            newest::IOCTL_BLKSNAP_VERSION => version(arg),
            newest::IOCTL_BLKSNAP_SNAPSHOT_CREATE => create_newest(inst, arg),
            newest::IOCTL_BLKSNAP_SNAPSHOT_DESTROY => destroy(inst, arg),
            newest::IOCTL_BLKSNAP_SNAPSHOT_TAKE => take(inst, arg),
            newest::IOCTL_BLKSNAP_SNAPSHOT_COLLECT => {
                let c = user::read::<newest::blksnap_snapshot_collect>(arg, Errno::ENODATA)?;
                // An `ids` value that cannot be an address here is a copy fault.
                let ids = UserAddr::from_u64_or(c.ids, Errno::ENODATA)?;
                collect::<newest::blksnap_snapshot_collect>(
                    inst,
                    arg,
                    c.count,
                    ids,
                    &c.ids.to_ne_bytes(),
                    offset_of!(newest::blksnap_snapshot_collect, ids),
                )
            }
            newest::IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT => wait_event(inst, arg),
            _ => Err(Errno::ENOTTY),
        }
    }
}

unsafe fn version(arg: UserAddr) -> R<c_int> {
    let mut out = OutImage::zeroed(size_of::<blksnap_version>());
    out.put(offset_of!(blksnap_version, major), &VERSION[0].to_ne_bytes())
        .put(offset_of!(blksnap_version, minor), &VERSION[1].to_ne_bytes())
        .put(offset_of!(blksnap_version, revision), &VERSION[2].to_ne_bytes())
        .put(offset_of!(blksnap_version, build), &VERSION[3].to_ne_bytes());
    // SAFETY: contract: arg is NULL or 8 writable bytes.
    unsafe { user::write_bytes(arg, out.bytes(), Errno::ENODATA)? };
    Ok(0)
}

unsafe fn read_id(arg: UserAddr) -> R<SnapshotId> {
    // SAFETY: contract: arg is NULL or 16 readable bytes.
    let id = unsafe { user::read::<uapi::blksnap_uuid>(arg, Errno::ENODATA)? };
    Ok(Uuid(id.b))
}

unsafe fn create_v3(inst: &Instance, arg: UserAddr) -> R<c_int> {
    // Checked first, so a copy-out fault cannot leave an orphan snapshot (quirk §7.21 fixed).
    arg.check(size_of::<uapi::blksnap_uuid>(), Errno::ENODATA)?;
    let id = inst.engine.snapshot_create(StorageSpec::Ranges).map_err(|e| e.errno)?;
    // SAFETY: contract: 16 writable bytes (non-NULL checked above).
    if let Err(errno) = unsafe { user::write_bytes(arg, &id.0, Errno::ENODATA) } {
        let _ = inst.engine.snapshot_destroy(id);
        return Err(errno);
    }
    Ok(0)
}

unsafe fn create_newest(inst: &Instance, arg: UserAddr) -> R<c_int> {
    type C = newest::blksnap_snapshot_create;
    // SAFETY: contract: arg is NULL or 32 readable and writable bytes.
    let c = unsafe { user::read::<C>(arg, Errno::ENODATA)? };
    let name_addr = UserAddr::from_u64_or(c.diff_storage_filename, Errno::EFAULT)?;
    // SAFETY: contract: the file name is a NUL-terminated string (NULL → EFAULT, quirk §7.28).
    let name = unsafe { user::read_cstr(name_addr, uapi::PATH_MAX, Errno::EFAULT, Errno::EINVAL)? };
    let name = Path::new(OsStr::from_bytes(&name));
    let id = if inst.engine.remote().is_some() {
        // Client mode: the daemon opens the storage (same type rules).
        let backing = inst.storage_backing(name);
        let limit = c.diff_storage_limit_sect;
        let id = inst.engine.create_with_file(&backing, limit).map_err(|e| e.errno)?;
        inst.record_storage(id, std::fs::canonicalize(&backing).unwrap_or(backing));
        id
    } else {
        let (backend, backing) = inst.open_storage(name)?;
        let spec = StorageSpec::File { backend, limit_sectors: c.diff_storage_limit_sect };
        let id = inst.engine.snapshot_create(spec).map_err(|e| e.errno)?;
        inst.record_storage(id, backing);
        id
    };
    let mut out = OutImage::zeroed(size_of::<C>());
    out.put(offset_of!(C, diff_storage_limit_sect), &c.diff_storage_limit_sect.to_ne_bytes())
        .put(offset_of!(C, diff_storage_filename), &c.diff_storage_filename.to_ne_bytes())
        .put(offset_of!(C, id), &id.0);
    // SAFETY: contract: 32 writable bytes (readable above, so not NULL).
    if let Err(errno) = unsafe { user::write_bytes(arg, out.bytes(), Errno::ENODATA) } {
        let _ = inst.engine.snapshot_destroy(id);
        inst.forget_snapshot(id);
        return Err(errno);
    }
    Ok(0)
}

unsafe fn destroy(inst: &Instance, arg: UserAddr) -> R<c_int> {
    // SAFETY: contract forwarded.
    let id = unsafe { read_id(arg)? };
    inst.engine.snapshot_destroy(id).map_err(|e| e.errno)?;
    inst.forget_snapshot(id);
    Ok(0)
}

unsafe fn take(inst: &Instance, arg: UserAddr) -> R<c_int> {
    // SAFETY: contract forwarded.
    let id = unsafe { read_id(arg)? };
    inst.engine.snapshot_take(id).map_err(|e| e.errno)?;
    Ok(0)
}

unsafe fn append_storage(inst: &Instance, arg: UserAddr) -> R<c_int> {
    type A = v3::blksnap_snapshot_append_storage;
    // Copy faults of the struct and of the ranges are EINVAL in v3 (§2.6).
    // SAFETY: contract: arg is NULL or the 40-byte (32 on i386) struct.
    let a = unsafe { user::read::<A>(arg, Errno::EINVAL)? };
    let path_addr = UserAddr::from_ptr(a.bdev_path);
    let path_size = a.bdev_path_size as usize;
    // SAFETY: contract: bdev_path is a string of at most bdev_path_size bytes (NUL included).
    let path = unsafe { user::read_cstr(path_addr, path_size, Errno::EFAULT, Errno::EINVAL)? };
    let count = a.count as usize;
    if count > MAX_RANGES_PER_CALL {
        return Err(Errno::EINVAL);
    }
    // SAFETY: contract: ranges holds `count` elements.
    let ranges = unsafe {
        user::read_array::<uapi::blksnap_sectors>(
            UserAddr::from_ptr(a.ranges),
            count,
            Errno::EINVAL,
        )?
    };
    let ranges: Vec<SectorRange> =
        ranges.iter().map(|r| SectorRange::new(r.offset, r.count)).collect();
    let id = Uuid(a.id.b);
    inst.engine.storage_stats(id).map_err(|e| e.errno)?; // ESRCH before opening anything
    let path = Path::new(OsStr::from_bytes(&path));
    if inst.engine.remote().is_some() {
        // Client mode: the daemon opens the storage.
        let backing = inst.storage_backing(path);
        inst.engine.append_path(id, &backing, &ranges).map_err(|e| e.errno)?;
        inst.record_storage(id, std::fs::canonicalize(&backing).unwrap_or(backing));
    } else {
        inst.refuse_member_storage(id, &inst.storage_backing(path))?;
        let backend = inst.append_backend(id, path)?;
        inst.engine.snapshot_append_storage(id, backend, &ranges).map_err(|e| e.errno)?;
    }
    Ok(0)
}

/// COLLECT for both layouts (`T` is the profile's struct; `ids_raw` its `ids` field bytes,
/// echoed back). Always writes the struct back; ENODATA when the array was too small, or an id
/// could not be written (quirk §7.19 fixed).
unsafe fn collect<T>(
    inst: &Instance,
    arg: UserAddr,
    capacity: u32,
    ids: UserAddr,
    ids_raw: &[u8],
    ids_offset: usize,
) -> R<c_int> {
    let list = inst.engine.snapshot_collect().map_err(|e| e.errno)?;
    let total = u32::try_from(list.len()).map_err(|_| Errno::ENOMEM)?;
    let (count, mut result) = if ids.is_null() {
        (total, Ok(0))
    } else {
        let written = capacity.min(total);
        let mut result = if total > capacity { Err(Errno::ENODATA) } else { Ok(0) };
        // The described array (`capacity` ids) must not wrap the address space: a copy fault
        // before any id is written (found by the abi_ioctl fuzz target).
        let described = (capacity as usize).checked_mul(size_of::<uapi::blksnap_uuid>());
        let in_bounds = described.is_some_and(|len| ids.check(len, Errno::ENODATA).is_ok());
        if !in_bounds {
            result = Err(Errno::ENODATA);
        }
        let copies = if in_bounds { written as usize } else { 0 };
        for (i, id) in list.iter().take(copies).enumerate() {
            let at = ids.add(i * size_of::<uapi::blksnap_uuid>(), Errno::ENODATA);
            // SAFETY: contract: ids holds `capacity` elements and i < capacity.
            let copied = at.and_then(|at| unsafe { user::write_bytes(at, &id.0, Errno::ENODATA) });
            if let Err(e) = copied {
                result = Err(e);
                break;
            }
        }
        (written, result)
    };
    let mut out = OutImage::zeroed(size_of::<T>());
    out.put(0, &count.to_ne_bytes()).put(ids_offset, ids_raw);
    // SAFETY: contract: arg is the struct (it was readable, so it is not NULL).
    if let Err(e) = unsafe { user::write_bytes(arg, out.bytes(), Errno::ENODATA) } {
        result = Err(e);
    }
    result
}

/// The payload bytes and code of an event in `profile`, `None` if the profile has no such event
/// (a v3 instance only creates range storages, a newest one only file storages, so it cannot
/// happen).
fn encode_event(profile: Profile, kind: &EventKind) -> Option<(u32, Vec<u8>)> {
    let code = profile.event_code(kind)?;
    let payload = match kind {
        EventKind::LowFreeSpace { requested_sectors }
        | EventKind::NoSpace { requested_sectors } => requested_sectors.to_ne_bytes().to_vec(),
        EventKind::Corrupted { device, errno } => {
            type C = uapi::blksnap_event_corrupted;
            let mut out = OutImage::zeroed(size_of::<C>());
            out.put(offset_of!(C, dev_id_mj), &device.major.to_ne_bytes())
                .put(offset_of!(C, dev_id_mn), &device.minor.to_ne_bytes())
                .put(offset_of!(C, err_code), &errno.code().to_ne_bytes()); // positive (§7.23)
            out.bytes().to_vec()
        }
    };
    Some((code, payload))
}

unsafe fn wait_event(inst: &Instance, arg: UserAddr) -> R<c_int> {
    // Reads only id + timeout_ms (20 bytes), writes all 4096 (quirk §7.6); copy faults EINVAL.
    arg.check(size_of::<Event>(), Errno::EINVAL)?;
    // SAFETY: contract: arg is 4096 readable and writable bytes (non-NULL checked above).
    let head = unsafe { user::read_bytes(arg, uapi::EVENT_IN_BYTES, Errno::EINVAL)? };
    let mut id = [0u8; 16];
    id.copy_from_slice(&head[..16]);
    let timeout_ms = u32::from_ne_bytes([head[16], head[17], head[18], head[19]]);
    let (event, code, payload) = loop {
        let event = inst.engine.wait_event(Uuid(id), timeout_ms).map_err(|e| e.errno)?;
        if let Some((code, payload)) = encode_event(inst.profile, &event.kind) {
            break (event, code, payload);
        }
    };
    let mut out = OutImage::zeroed(size_of::<Event>());
    let time_label = i64::try_from(event.time_ns).unwrap_or(i64::MAX);
    out.put(offset_of!(Event, id), &id)
        .put(offset_of!(Event, timeout_ms), &timeout_ms.to_ne_bytes())
        .put(offset_of!(Event, code), &code.to_ne_bytes())
        .put(offset_of!(Event, time_label), &time_label.to_ne_bytes())
        .put(offset_of!(Event, data), &payload);
    // SAFETY: as above.
    unsafe { user::write_bytes(arg, out.bytes(), Errno::EINVAL)? };
    Ok(0)
}
