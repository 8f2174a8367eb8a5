//! The one synchronisation facade. Everything concurrent in the engine names these types, never
//! `std::sync` or `std::thread`, so that the same code runs on std (default), under loom
//! (`RUSTFLAGS="--cfg blksnap_loom"`) and under shuttle (`--cfg blksnap_shuttle`).
//!
//! Shapes are std's minus poisoning: `lock()` returns the guard (a poisoned lock means a thread
//! panicked while holding engine state, which is a bug: we propagate the panic).

#[cfg(all(blksnap_loom, blksnap_shuttle))]
compile_error!("--cfg blksnap_loom and --cfg blksnap_shuttle are exclusive");
#[cfg(all(miri, any(blksnap_loom, blksnap_shuttle)))]
compile_error!("miri runs the std backend only");

#[cfg(not(any(blksnap_loom, blksnap_shuttle)))]
mod backend {
    pub use std::sync::atomic;
    pub use std::sync::Arc;
    pub use std::sync::{
        Condvar as RawCondvar, Mutex as RawMutex, MutexGuard, RwLock as RawRwLock, RwLockReadGuard,
        RwLockWriteGuard,
    };
    pub use std::thread;
}

#[cfg(blksnap_loom)]
mod backend {
    pub use loom::sync::atomic;
    pub use loom::sync::Arc;
    pub use loom::sync::{
        Condvar as RawCondvar, Mutex as RawMutex, MutexGuard, RwLock as RawRwLock, RwLockReadGuard,
        RwLockWriteGuard,
    };
    pub use loom::thread;
}

#[cfg(blksnap_shuttle)]
mod backend {
    pub use shuttle::sync::atomic;
    pub use shuttle::sync::Arc;
    pub use shuttle::sync::{
        Condvar as RawCondvar, Mutex as RawMutex, MutexGuard, RwLock as RawRwLock, RwLockReadGuard,
        RwLockWriteGuard,
    };
    pub use shuttle::thread;
}

pub use backend::{atomic, thread, Arc};

pub use backend::{MutexGuard, RwLockReadGuard, RwLockWriteGuard};
/// std's `Arc`, for shared handles to I/O objects (`Arc<dyn BlockDev>`): loom's `Arc` cannot hold
/// a trait object, and these handles are immutable references to devices, not engine state whose
/// reference count is a checking target. Engine objects use [`crate::kref::Kref`] instead.
pub use std::sync::Arc as StdArc;

/// A mutex whose `lock` returns the guard directly.
#[derive(Debug, Default)]
pub struct Mutex<T>(backend::RawMutex<T>);

impl<T> Mutex<T> {
    /// A new unlocked mutex.
    pub fn new(value: T) -> Mutex<T> {
        Mutex(backend::RawMutex::new(value))
    }
    /// Lock, blocking. Panics if another thread panicked while holding it.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().expect("engine mutex poisoned: a thread panicked holding engine state")
    }
    /// Consume the mutex.
    pub fn into_inner(self) -> T {
        self.0.into_inner().expect("engine mutex poisoned")
    }
}

/// A reader-writer lock whose `read`/`write` return the guard directly.
#[derive(Debug, Default)]
pub struct RwLock<T>(backend::RawRwLock<T>);

impl<T> RwLock<T> {
    /// A new unlocked lock.
    pub fn new(value: T) -> RwLock<T> {
        RwLock(backend::RawRwLock::new(value))
    }
    /// Shared access.
    pub fn read(&self) -> RwLockReadGuard<'_, T> {
        self.0.read().expect("engine rwlock poisoned")
    }
    /// Exclusive access.
    pub fn write(&self) -> RwLockWriteGuard<'_, T> {
        self.0.write().expect("engine rwlock poisoned")
    }
}

/// A condition variable. Callers always wait in a loop over their predicate: neither checker
/// generates spurious wake-ups, and real ones happen on std.
#[derive(Debug, Default)]
pub struct Condvar(backend::RawCondvar);

impl Condvar {
    /// A new condition variable.
    pub fn new() -> Condvar {
        Condvar(backend::RawCondvar::new())
    }
    /// Block until notified.
    pub fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.0.wait(guard).expect("engine mutex poisoned")
    }
    /// Block until notified or `timeout` passes (never times out under loom or shuttle).
    pub fn wait_timeout<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: core::time::Duration,
    ) -> MutexGuard<'a, T> {
        self.0.wait_timeout(guard, timeout).expect("engine mutex poisoned").0
    }
    /// Wake one waiter.
    pub fn notify_one(&self) {
        self.0.notify_one()
    }
    /// Wake every waiter.
    pub fn notify_all(&self) {
        self.0.notify_all()
    }
}

/// A hint inside a spin loop (a yield point for both checkers).
pub fn spin_loop() {
    #[cfg(not(any(blksnap_loom, blksnap_shuttle)))]
    std::hint::spin_loop();
    #[cfg(blksnap_loom)]
    loom::hint::spin_loop();
    #[cfg(blksnap_shuttle)]
    shuttle::hint::spin_loop();
}
