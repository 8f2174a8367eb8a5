//! `ioctl`: on a served descriptor, the control / filter / block requests (see
//! [`crate::data::ioctl`]); on a real block device the engine knows by number (blksnapd's
//! devices, in client mode), the `BLKFILTER_*` requests
//! ([`crate::data::filter_on_block_device`]); the generic descriptor requests (`FIOCLEX`,
//! `FIONCLEX`, `FIONBIO`, `FIOASYNC`) and everything else go to libc.

use core::ffi::{c_int, c_ulong, c_void};

use super::served;
use crate::guard::{self, missing, Inside};
use crate::{data, real};

/// Requests the VFS answers for any descriptor (they act on the real one).
fn generic(request: c_ulong) -> bool {
    let request = request as u32 as c_ulong;
    [libc::FIOCLEX, libc::FIONCLEX, libc::FIONBIO, libc::FIOASYNC]
        .iter()
        .any(|r| *r as u32 as c_ulong == request)
}

/// `ioctl(fd, request, arg)`.
///
/// # Safety
/// libc's contract (`arg` is what the request expects).
#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, request: c_ulong, arg: *mut c_void) -> c_int {
    if !generic(request) {
        if let Some((_inside, object)) = served(fd) {
            // SAFETY: contract: arg follows the request's contract.
            return guard::run(|| unsafe { data::ioctl(&object, request, arg) });
        }
        // A block device of the kernel's (blksnapd's ublk device): only its filter requests are
        // the library's.
        if let Some(_inside) = Inside::enter() {
            let routed = guard::catch(None, || {
                // SAFETY: contract: arg follows the request's contract.
                Some(unsafe { data::filter_on_block_device(fd, request, arg) })
            });
            match routed {
                Some(None) => {} // not ours: the kernel's
                Some(Some(result)) => return guard::run(|| result),
                None => return guard::panicked(), // the engine is marked failed
            }
        }
    }
    match real::ioctl() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(fd, request, arg) },
        None => missing(),
    }
}
