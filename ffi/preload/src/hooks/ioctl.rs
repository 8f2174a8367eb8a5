//! `ioctl`: on a served descriptor, the control / filter / block requests (see
//! [`crate::data::ioctl`]); the generic descriptor requests (`FIOCLEX`, `FIONCLEX`, `FIONBIO`,
//! `FIOASYNC`) and every other descriptor go to libc.

use core::ffi::{c_int, c_ulong, c_void};

use super::served;
use crate::guard::{self, missing};
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
    }
    match real::ioctl() {
        // SAFETY: the caller's arguments, forwarded to libc.
        Some(f) => unsafe { f(fd, request, arg) },
        None => missing(),
    }
}
