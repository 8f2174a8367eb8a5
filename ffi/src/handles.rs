//! Handles: small positive integers naming an [`Instance`], like file descriptors.
//!
//! No pointer is ever handed to C, so nothing can be double-freed: a handle is a key into one
//! table. Numbers are never reused (a closed handle stays invalid: double close and use after
//! close are EBADF, not someone else's handle). Several handles may share an instance (as
//! several fds of `/dev/blksnap-control` share the module); it is dropped with its last handle.
//!
//! The panic boundary lives here too: [`boundary`] runs an entry point's body under
//! `catch_unwind`; a panic returns `-ENOTRECOVERABLE` and poisons the instance, after which every
//! call on any of its handles returns the same (close still works and frees it).

use core::ffi::c_int;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::errno::{EBADF, PANIC_ERRNO};
use crate::instance::Instance;

struct Table {
    /// The next number to hand out.
    next: c_int,
    map: BTreeMap<c_int, Arc<Instance>>,
}

static TABLE: Mutex<Table> = Mutex::new(Table { next: 1, map: BTreeMap::new() });

/// Open handles at most (a limit on everything): one more → ENOMEM.
pub const MAX_HANDLES: usize = 65_536;

fn table() -> MutexGuard<'static, Table> {
    // The table is only ever mutated by complete insert/remove calls, so a poisoned lock still
    // guards a consistent map.
    TABLE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Registers a handle for `instance`; `Err(-errno)` when out of numbers or over the limit.
pub fn insert(instance: Arc<Instance>) -> Result<c_int, c_int> {
    let mut t = table();
    if t.map.len() >= MAX_HANDLES || t.next == c_int::MAX {
        return Err(crate::errno::negative(blksnap_model::Errno::ENOMEM));
    }
    let handle = t.next;
    t.next += 1;
    t.map.insert(handle, instance);
    Ok(handle)
}

/// The instance of an open handle: `-EBADF` if not open, `-ENOTRECOVERABLE` if poisoned.
pub fn get(handle: c_int) -> Result<Arc<Instance>, c_int> {
    let instance = table().map.get(&handle).cloned().ok_or(-EBADF)?;
    if instance.is_poisoned() {
        return Err(-PANIC_ERRNO);
    }
    Ok(instance)
}

/// Closes a handle (poisoned or not): 0, or `-EBADF` if it is not open. The instance is dropped
/// outside the table lock when this was its last handle.
pub fn remove(handle: c_int) -> c_int {
    let removed = table().map.remove(&handle);
    match removed {
        Some(instance) => {
            drop(instance);
            0
        }
        None => -EBADF,
    }
}

/// Number of open handles (tests).
pub fn open_count() -> usize {
    table().map.len()
}

/// Marks the instance behind `handle` failed, if it is open.
fn poison(handle: c_int) {
    if let Some(instance) = table().map.get(&handle) {
        instance.poison();
    }
}

/// What an entry point returns, so that the boundary can return an errno of the right type.
pub trait Ret {
    /// `-errno` in this type.
    fn from_errno(negative_errno: c_int) -> Self;
}

impl Ret for c_int {
    fn from_errno(negative_errno: c_int) -> c_int {
        negative_errno
    }
}

impl Ret for isize {
    fn from_errno(negative_errno: c_int) -> isize {
        negative_errno as isize
    }
}

/// Runs `body` so that no panic crosses into C: a panic returns `-ENOTRECOVERABLE` and poisons
/// the instance of `handle` (if any).
pub fn boundary<T: Ret>(handle: Option<c_int>, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(_) => {
            if let Some(handle) = handle {
                poison(handle);
            }
            T::from_errno(-PANIC_ERRNO)
        }
    }
}
