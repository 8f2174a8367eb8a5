//! The interposed libc functions. Each one either serves a descriptor or path of this library
//! (inside [`guard::run`]: errno set, panics caught) or calls the next definition (libc's) with
//! exactly the caller's arguments. Variadic prototypes (`open`, `openat`, `ioctl`, `fcntl`) are
//! defined with their optional argument as a fixed one: on the supported ABIs (x86_64, i386,
//! aarch64 Linux) a variadic argument is passed where the same fixed argument would be, and it is
//! only used (or forwarded) when the caller passed it.

use core::ffi::c_int;
use std::sync::Arc;

use crate::guard::{self, Inside};
use crate::state::{self, Object};

mod fd;
mod io;
mod ioctl;
mod open;
mod stat;

/// The object behind `fd` if it is served (and this is not a re-entrant call), with the
/// re-entrancy flag held.
fn served(fd: c_int) -> Option<(Inside, Arc<Object>)> {
    if !state::any_served() {
        return None;
    }
    let inside = Inside::enter()?;
    let object = guard::catch(None, || state::lookup(fd))?;
    Some((inside, object))
}

/// After libc handed out descriptor `new` (open, dup, ...): it is not served any more, unless it
/// duplicates the served `old`.
fn handed_out(new: c_int, old: Option<c_int>) {
    if new < 0 || !state::any_served() {
        return;
    }
    let Some(_inside) = Inside::enter() else { return };
    guard::catch((), || {
        match old.and_then(state::lookup) {
            Some(object) => state::insert(new, object),
            None => drop(state::remove(new)),
        };
    });
}
