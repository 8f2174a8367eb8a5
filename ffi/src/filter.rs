//! Block-filter requests on an original device (`BLKFILTER_ATTACH/DETACH/CTL`) and the blksnap
//! ctl commands (`blksnap-abi.md` §2.7–2.8, §3.6–3.7).

use core::ffi::c_int;
use core::mem::{offset_of, size_of};

use blksnap_model::limits::MAX_RANGES_PER_CALL;
use blksnap_model::{Errno, Profile, SectorRange, Uuid};

use crate::instance::{Device, Instance};
use crate::uapi::{
    self, blkfilter_ctl, blksnap_cbtinfo, blksnap_snapshotinfo, ctl_cmd, newest, v3,
};
use crate::user::{self, OutImage, UserAddr, R};

/// Whether a NUL-padded filter name is "blksnap".
fn is_blksnap(name: &[u8; uapi::BLKFILTER_NAME_LENGTH]) -> bool {
    let len = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    &name[..len] == uapi::BLKSNAP_FILTER_NAME
}

/// Runs one filter request on `dev`.
///
/// # Safety
/// `arg` follows the ioctl contract (NULL, or the request's struct and the buffers it names).
pub unsafe fn ioctl(inst: &Instance, dev: &Device, request: u32, arg: UserAddr) -> R<c_int> {
    // SAFETY: (every arm) the caller's contract on `arg`, forwarded. Argument copy faults of
    // BLKFILTER_* are EFAULT in every series (§6).
    unsafe {
        match (inst.profile, request) {
            (Profile::V3, v3::BLKFILTER_ATTACH) => {
                let n = user::read::<v3::blkfilter_name>(arg, Errno::EFAULT)?;
                attach(inst, dev, &n.name)
            }
            // Reads 32 bytes only: the v3 tool passes a 48-byte blkfilter_ctl here (§7.31).
            (Profile::V3, v3::BLKFILTER_DETACH) => {
                let n = user::read::<v3::blkfilter_name>(arg, Errno::EFAULT)?;
                detach(inst, dev, &n.name)
            }
            (Profile::V3, v3::BLKFILTER_CTL) => ctl(inst, dev, arg, Errno::ENOENT),
            (Profile::Newest, newest::BLKFILTER_ATTACH) => {
                // `opt`/`optlen` are reserved; blksnap ignores them.
                let a = user::read::<newest::blkfilter_attach>(arg, Errno::EFAULT)?;
                attach(inst, dev, &a.name)
            }
            (Profile::Newest, newest::BLKFILTER_DETACH) => {
                let d = user::read::<newest::blkfilter_detach>(arg, Errno::EFAULT)?;
                detach(inst, dev, &d.name)
            }
            (Profile::Newest, newest::BLKFILTER_CTL) => ctl(inst, dev, arg, Errno::EINVAL),
            _ => Err(Errno::ENOTTY),
        }
    }
}

/// Runs one filter request on a block device this engine does not track: a snapshot image, or
/// any other block device. As the kernel on a device with no filter: DETACH and CTL → ENOENT;
/// ATTACH of another filter name → ENOENT (none registered). ATTACH of "blksnap" →
/// EOPNOTSUPP, where the kernel would attach a tracker: this engine tracks only the devices it
/// serves (docs/SEMANTICS.md). Argument faults are EFAULT first, as on a tracked device.
///
/// # Safety
/// As for [`ioctl`].
pub unsafe fn ioctl_unfiltered(inst: &Instance, request: u32, arg: UserAddr) -> R<c_int> {
    // SAFETY: (every arm) the caller's contract on `arg`, forwarded.
    unsafe {
        let attach_name = match (inst.profile, request) {
            (Profile::V3, v3::BLKFILTER_ATTACH) => {
                user::read::<v3::blkfilter_name>(arg, Errno::EFAULT)?.name
            }
            (Profile::Newest, newest::BLKFILTER_ATTACH) => {
                user::read::<newest::blkfilter_attach>(arg, Errno::EFAULT)?.name
            }
            (Profile::V3, v3::BLKFILTER_DETACH) => {
                user::read::<v3::blkfilter_name>(arg, Errno::EFAULT)?;
                return Err(Errno::ENOENT);
            }
            (Profile::Newest, newest::BLKFILTER_DETACH) => {
                user::read::<newest::blkfilter_detach>(arg, Errno::EFAULT)?;
                return Err(Errno::ENOENT);
            }
            (Profile::V3, v3::BLKFILTER_CTL) | (Profile::Newest, newest::BLKFILTER_CTL) => {
                user::read::<blkfilter_ctl>(arg, Errno::EFAULT)?;
                return Err(Errno::ENOENT);
            }
            _ => return Err(Errno::ENOTTY),
        };
        if is_blksnap(&attach_name) {
            Err(Errno::EOPNOTSUPP)
        } else {
            Err(Errno::ENOENT)
        }
    }
}

fn attach(inst: &Instance, dev: &Device, name: &[u8; 32]) -> R<c_int> {
    if !is_blksnap(name) {
        return Err(Errno::ENOENT); // no filter registered with that name
    }
    inst.engine.attach(dev.id).map_err(|e| e.errno)?;
    Ok(0)
}

fn detach(inst: &Instance, dev: &Device, name: &[u8; 32]) -> R<c_int> {
    inst.engine.cbt_info(dev.id).map_err(|e| e.errno)?; // ENOENT: no filter attached
    if !is_blksnap(name) {
        return Err(Errno::EINVAL);
    }
    inst.engine.detach(dev.id).map_err(|e| e.errno)?;
    Ok(0)
}

/// BLKFILTER_CTL. `mismatch` is the errno of a wrong filter name (v3 ENOENT, newest EINVAL).
/// `optlen` is never written back (quirk §7.14).
unsafe fn ctl(inst: &Instance, dev: &Device, arg: UserAddr, mismatch: Errno) -> R<c_int> {
    // SAFETY: contract: arg is NULL or the 48-byte struct.
    let c = unsafe { user::read::<blkfilter_ctl>(arg, Errno::EFAULT)? };
    inst.engine.cbt_info(dev.id).map_err(|e| e.errno)?; // ENOENT: no filter attached
    if !is_blksnap(&c.name) {
        return Err(mismatch);
    }
    let optlen = c.optlen as usize;
    // An `opt` that cannot be an address here faults like a bad pointer (ENODATA: every ctl's
    // copy-in/out fault).
    let opt = UserAddr::from_u64(c.opt);
    // SAFETY: (every arm) contract: opt is NULL or `optlen` bytes of the command's struct.
    unsafe {
        match (c.cmd, opt) {
            (ctl_cmd::CBTINFO, opt) => cbtinfo(inst, dev, optlen, opt),
            (ctl_cmd::CBTMAP, opt) => cbtmap(inst, dev, optlen, opt),
            (ctl_cmd::CBTDIRTY, opt) => cbtdirty(inst, dev, optlen, opt),
            (ctl_cmd::SNAPSHOTADD, opt) => snapshotadd(inst, dev, optlen, opt),
            (ctl_cmd::SNAPSHOTINFO, opt) => snapshotinfo(inst, dev, optlen, opt),
            _ => Err(Errno::ENOTTY), // quirk §7.3 fixed: no out-of-bounds slot
        }
    }
}

/// The option struct's address: optlen too short → EINVAL (checked first, as upstream);
/// unrepresentable, NULL, or an `opt + optlen` that wraps → ENODATA (the described buffer is
/// `optlen` bytes, of which the command reads its struct: found by the abi_ioctl fuzz target).
fn opt_addr(optlen: usize, needed: usize, opt: Option<UserAddr>) -> R<UserAddr> {
    if optlen < needed {
        return Err(Errno::EINVAL);
    }
    let opt = opt.ok_or(Errno::ENODATA)?;
    opt.check(optlen, Errno::ENODATA)?;
    Ok(opt)
}

unsafe fn cbtinfo(inst: &Instance, dev: &Device, optlen: usize, opt: Option<UserAddr>) -> R<c_int> {
    type I = blksnap_cbtinfo;
    let opt = opt_addr(optlen, size_of::<I>(), opt)?;
    let info = inst.engine.cbt_info(dev.id).map_err(|e| e.errno)?;
    // Zero image: the tail padding is zero (quirk §7.7 fixed).
    let mut out = OutImage::zeroed(size_of::<I>());
    out.put(offset_of!(I, device_capacity), &info.device_capacity_bytes.to_ne_bytes())
        .put(offset_of!(I, block_size), &info.block_size_bytes.to_ne_bytes())
        .put(offset_of!(I, block_count), &info.block_count.to_ne_bytes())
        .put(offset_of!(I, generation_id), &info.generation_id.0)
        .put(offset_of!(I, changes_number), &[info.changes_number]);
    // SAFETY: contract: opt is sizeof(cbtinfo) writable bytes.
    unsafe { user::write_bytes(opt, out.bytes(), Errno::ENODATA)? };
    Ok(0)
}

unsafe fn cbtmap(inst: &Instance, dev: &Device, optlen: usize, opt: Option<UserAddr>) -> R<c_int> {
    // (offset, length, buffer) in the profile's layout.
    let (offset, mut length, buffer) = match inst.profile {
        Profile::V3 => {
            let opt = opt_addr(optlen, size_of::<v3::blksnap_cbtmap>(), opt)?;
            // SAFETY: contract: opt is the struct.
            let m = unsafe { user::read::<v3::blksnap_cbtmap>(opt, Errno::ENODATA)? };
            (m.offset, m.length, UserAddr::from_ptr(m.buffer))
        }
        Profile::Newest => {
            let opt = opt_addr(optlen, size_of::<newest::blksnap_cbtmap>(), opt)?;
            // SAFETY: contract: opt is the struct.
            let m = unsafe { user::read::<newest::blksnap_cbtmap>(opt, Errno::ENODATA)? };
            (m.offset, m.length, UserAddr::from_u64_or(m.buffer, Errno::EINVAL)?)
        }
    };
    if inst.profile == Profile::V3 {
        // v3 copies min(block_count - offset, length) (quirk §7.10); offset past the end is
        // ENODATA instead of an out-of-bounds read (§7.11).
        let block_count = inst.engine.cbt_info(dev.id).map_err(|e| e.errno)?.block_count;
        let left = block_count.checked_sub(offset).ok_or(Errno::ENODATA)?;
        // The described buffer is `length` bytes before the clamp: one that wraps is a copy
        // fault even when fewer bytes would be written (found by the abi_ioctl fuzz target).
        buffer.add(length as usize, Errno::EINVAL)?;
        length = length.min(left);
    }
    let mut map = Vec::new();
    inst.engine.cbt_map(dev.id, offset, length, &mut map).map_err(|e| e.errno)?;
    // SAFETY: contract: buffer holds `length` writable bytes (length 0 touches nothing, §7.12).
    unsafe { user::write_bytes(buffer, &map, Errno::EINVAL)? };
    Ok(0) // not "bytes read" (quirk §7.9)
}

unsafe fn cbtdirty(
    inst: &Instance,
    dev: &Device,
    optlen: usize,
    opt: Option<UserAddr>,
) -> R<c_int> {
    let (count, ranges) = match inst.profile {
        Profile::V3 => {
            let opt = opt_addr(optlen, size_of::<v3::blksnap_cbtdirty>(), opt)?;
            // SAFETY: contract: opt is the struct.
            let d = unsafe { user::read::<v3::blksnap_cbtdirty>(opt, Errno::ENODATA)? };
            (d.count, UserAddr::from_ptr(d.dirty_sectors))
        }
        Profile::Newest => {
            let opt = opt_addr(optlen, size_of::<newest::blksnap_cbtdirty>(), opt)?;
            // SAFETY: contract: opt is the struct.
            let d = unsafe { user::read::<newest::blksnap_cbtdirty>(opt, Errno::ENODATA)? };
            (d.count, UserAddr::from_u64_or(d.dirty_sectors, Errno::ENODATA)?)
        }
    };
    let count = count as usize;
    if count > MAX_RANGES_PER_CALL {
        return Err(Errno::EINVAL); // before reading (and allocating for) the array
    }
    // SAFETY: contract: the array holds `count` elements.
    let ranges =
        unsafe { user::read_array::<uapi::blksnap_sectors>(ranges, count, Errno::ENODATA)? };
    // Every range applied once (quirk §7.13 fixed), all or nothing.
    let ranges: Vec<SectorRange> =
        ranges.iter().map(|r| SectorRange::new(r.offset, r.count)).collect();
    inst.engine.cbt_dirty(dev.id, &ranges).map_err(|e| e.errno)?;
    Ok(0)
}

unsafe fn snapshotadd(
    inst: &Instance,
    dev: &Device,
    optlen: usize,
    opt: Option<UserAddr>,
) -> R<c_int> {
    let opt = opt_addr(optlen, size_of::<uapi::blksnap_snapshotadd>(), opt)?;
    // SAFETY: contract: opt is the struct.
    let add = unsafe { user::read::<uapi::blksnap_snapshotadd>(opt, Errno::ENODATA)? };
    let id = Uuid(add.id.b);
    if inst.holds_storage_of(id, dev) {
        return Err(Errno::EBUSY); // quirk §7.16: upstream returned 0 without adding
    }
    inst.engine.snapshot_add(id, dev.id).map_err(|e| e.errno)?;
    Ok(0)
}

unsafe fn snapshotinfo(
    inst: &Instance,
    dev: &Device,
    optlen: usize,
    opt: Option<UserAddr>,
) -> R<c_int> {
    type S = blksnap_snapshotinfo;
    let opt = opt_addr(optlen, size_of::<S>(), opt)?;
    // Copied in first as upstream (a fault here is ENODATA), though nothing of it is used.
    // SAFETY: contract: opt is the struct.
    unsafe { user::read::<S>(opt, Errno::ENODATA)? };
    let info = inst.engine.snapshot_info(dev.id).map_err(|e| e.errno)?;
    // Zero-filled name, then the name (quirk §7.8 fixed); NUL-terminated within 32 bytes.
    let mut out = OutImage::zeroed(size_of::<S>());
    out.put(offset_of!(S, error_code), &info.error_code.to_ne_bytes());
    if let Some(image) = info.image {
        let name = inst.profile.image_name(image);
        let len = name.len().min(uapi::IMAGE_DISK_NAME_LEN - 1);
        out.put(offset_of!(S, image), &name.as_bytes()[..len]);
    }
    // SAFETY: contract: opt is 36 writable bytes.
    unsafe { user::write_bytes(opt, out.bytes(), Errno::ENODATA)? };
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_name() {
        let mut n = [0u8; 32];
        n[..7].copy_from_slice(b"blksnap");
        assert!(is_blksnap(&n));
        n[7] = b'x';
        assert!(!is_blksnap(&n));
        assert!(!is_blksnap(&[0u8; 32]));
        assert!(!is_blksnap(&[b'a'; 32]));
    }
}
