//! The functions this library interposes, as the next definition in the lookup order (libc's):
//! `dlsym(RTLD_NEXT, name)`, resolved once and cached. Every pass-through goes here; nothing in
//! this crate calls `libc::open` & co. directly (those names resolve to our own definitions).

use core::ffi::{c_char, c_int, c_uint, c_ulong, c_void, CStr};
use core::sync::atomic::{AtomicPtr, Ordering};

use libc::{iovec, mode_t, off64_t, off_t, size_t, ssize_t};

/// One lazily resolved symbol.
pub struct Sym {
    name: &'static CStr,
    addr: AtomicPtr<c_void>,
}

impl Sym {
    /// A symbol named `name`, not yet resolved.
    pub const fn new(name: &'static CStr) -> Sym {
        Sym { name, addr: AtomicPtr::new(core::ptr::null_mut()) }
    }

    /// The address of the next definition, or NULL if there is none.
    pub fn addr(&self) -> *mut c_void {
        let cached = self.addr.load(Ordering::Acquire);
        if !cached.is_null() {
            return cached;
        }
        // SAFETY: `name` is NUL-terminated and RTLD_NEXT is a valid pseudo-handle; dlsym has no
        // other precondition. Racing resolutions store the same address.
        let found = unsafe { libc::dlsym(libc::RTLD_NEXT, self.name.as_ptr()) };
        self.addr.store(found, Ordering::Release);
        found
    }
}

/// `real!(name: fn type)` defines `real::name() -> Option<fn type>`.
macro_rules! real {
    ($($name:ident: $ty:ty;)*) => {$(
        #[allow(non_snake_case)]
        #[doc = concat!("The next `", stringify!($name), "` (libc's), if any.")]
        pub fn $name() -> Option<$ty> {
            const NAME: &CStr = match CStr::from_bytes_with_nul(
                concat!(stringify!($name), "\0").as_bytes(),
            ) {
                Ok(name) => name,
                Err(_) => panic!("symbol name"),
            };
            static SYM: Sym = Sym::new(NAME);
            let addr = SYM.addr();
            if addr.is_null() {
                return None;
            }
            // SAFETY: `addr` is the address of the C function `name`, whose prototype (glibc's)
            // is `$ty`; a data pointer and a function pointer have the same size here.
            Some(unsafe { core::mem::transmute::<*mut c_void, $ty>(addr) })
        }
    )*};
}

type Stat = libc::stat;
type Stat64 = libc::stat64;

real! {
    open: unsafe extern "C" fn(*const c_char, c_int, ...) -> c_int;
    open64: unsafe extern "C" fn(*const c_char, c_int, ...) -> c_int;
    openat: unsafe extern "C" fn(c_int, *const c_char, c_int, ...) -> c_int;
    openat64: unsafe extern "C" fn(c_int, *const c_char, c_int, ...) -> c_int;
    __open_2: unsafe extern "C" fn(*const c_char, c_int) -> c_int;
    __open64_2: unsafe extern "C" fn(*const c_char, c_int) -> c_int;
    __openat_2: unsafe extern "C" fn(c_int, *const c_char, c_int) -> c_int;
    __openat64_2: unsafe extern "C" fn(c_int, *const c_char, c_int) -> c_int;
    creat: unsafe extern "C" fn(*const c_char, mode_t) -> c_int;
    creat64: unsafe extern "C" fn(*const c_char, mode_t) -> c_int;
    close: unsafe extern "C" fn(c_int) -> c_int;
    close_range: unsafe extern "C" fn(c_uint, c_uint, c_int) -> c_int;
    closefrom: unsafe extern "C" fn(c_int);
    dup: unsafe extern "C" fn(c_int) -> c_int;
    dup2: unsafe extern "C" fn(c_int, c_int) -> c_int;
    dup3: unsafe extern "C" fn(c_int, c_int, c_int) -> c_int;
    fcntl: unsafe extern "C" fn(c_int, c_int, ...) -> c_int;
    fcntl64: unsafe extern "C" fn(c_int, c_int, ...) -> c_int;
    ioctl: unsafe extern "C" fn(c_int, c_ulong, ...) -> c_int;
    read: unsafe extern "C" fn(c_int, *mut c_void, size_t) -> ssize_t;
    write: unsafe extern "C" fn(c_int, *const c_void, size_t) -> ssize_t;
    pread: unsafe extern "C" fn(c_int, *mut c_void, size_t, off_t) -> ssize_t;
    pread64: unsafe extern "C" fn(c_int, *mut c_void, size_t, off64_t) -> ssize_t;
    pwrite: unsafe extern "C" fn(c_int, *const c_void, size_t, off_t) -> ssize_t;
    pwrite64: unsafe extern "C" fn(c_int, *const c_void, size_t, off64_t) -> ssize_t;
    __read_chk: unsafe extern "C" fn(c_int, *mut c_void, size_t, size_t) -> ssize_t;
    __pread_chk: unsafe extern "C" fn(c_int, *mut c_void, size_t, off_t, size_t) -> ssize_t;
    __pread64_chk: unsafe extern "C" fn(c_int, *mut c_void, size_t, off64_t, size_t) -> ssize_t;
    readv: unsafe extern "C" fn(c_int, *const iovec, c_int) -> ssize_t;
    writev: unsafe extern "C" fn(c_int, *const iovec, c_int) -> ssize_t;
    preadv: unsafe extern "C" fn(c_int, *const iovec, c_int, off_t) -> ssize_t;
    preadv64: unsafe extern "C" fn(c_int, *const iovec, c_int, off64_t) -> ssize_t;
    pwritev: unsafe extern "C" fn(c_int, *const iovec, c_int, off_t) -> ssize_t;
    pwritev64: unsafe extern "C" fn(c_int, *const iovec, c_int, off64_t) -> ssize_t;
    lseek: unsafe extern "C" fn(c_int, off_t, c_int) -> off_t;
    lseek64: unsafe extern "C" fn(c_int, off64_t, c_int) -> off64_t;
    fsync: unsafe extern "C" fn(c_int) -> c_int;
    fdatasync: unsafe extern "C" fn(c_int) -> c_int;
    sync: unsafe extern "C" fn();
    stat: unsafe extern "C" fn(*const c_char, *mut Stat) -> c_int;
    stat64: unsafe extern "C" fn(*const c_char, *mut Stat64) -> c_int;
    lstat: unsafe extern "C" fn(*const c_char, *mut Stat) -> c_int;
    lstat64: unsafe extern "C" fn(*const c_char, *mut Stat64) -> c_int;
    fstat: unsafe extern "C" fn(c_int, *mut Stat) -> c_int;
    fstat64: unsafe extern "C" fn(c_int, *mut Stat64) -> c_int;
    fstatat: unsafe extern "C" fn(c_int, *const c_char, *mut Stat, c_int) -> c_int;
    fstatat64: unsafe extern "C" fn(c_int, *const c_char, *mut Stat64, c_int) -> c_int;
    __xstat: unsafe extern "C" fn(c_int, *const c_char, *mut Stat) -> c_int;
    __xstat64: unsafe extern "C" fn(c_int, *const c_char, *mut Stat64) -> c_int;
    __lxstat: unsafe extern "C" fn(c_int, *const c_char, *mut Stat) -> c_int;
    __lxstat64: unsafe extern "C" fn(c_int, *const c_char, *mut Stat64) -> c_int;
    __fxstat: unsafe extern "C" fn(c_int, c_int, *mut Stat) -> c_int;
    __fxstat64: unsafe extern "C" fn(c_int, c_int, *mut Stat64) -> c_int;
    __fxstatat: unsafe extern "C" fn(c_int, c_int, *const c_char, *mut Stat, c_int) -> c_int;
    __fxstatat64: unsafe extern "C" fn(c_int, c_int, *const c_char, *mut Stat64, c_int) -> c_int;
    statx: unsafe extern "C" fn(c_int, *const c_char, c_int, c_uint, *mut libc::statx) -> c_int;
    access: unsafe extern "C" fn(*const c_char, c_int) -> c_int;
    faccessat: unsafe extern "C" fn(c_int, *const c_char, c_int, c_int) -> c_int;
}
