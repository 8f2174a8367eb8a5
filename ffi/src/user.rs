//! "User memory": the caller's buffers, reached through addresses that arrive as `void *` or as
//! `__u64` fields. This module is the kernel's `copy_from_user`/`copy_to_user` for an in-process
//! library, and holds the only raw memory accesses of the crate.
//!
//! What can be checked is checked: a NULL address, an address that does not fit `usize` (a
//! `__u64` pointer with high bits set in a 32-bit process), an `addr + len` that wraps the
//! address space, a `count * size` that overflows. Each is a "copy fault" and the caller says
//! which errno a fault is for its command (the per-command table of `blksnap-abi.md` §6/§7.20).
//! Alignment is **not** required, as with `copy_from_user`: every access is byte-wise or
//! `read_unaligned`, so a misaligned pointer is served, never undefined behaviour.
//!
//! What cannot be checked is the caller's duty, exactly as for a kernel ioctl: a non-NULL
//! address must point to at least the documented number of readable (or writable) bytes.

use core::mem::size_of;

use blksnap_model::Errno;

/// Internal result: the errno is turned into `-errno` at the boundary.
pub type R<T> = Result<T, Errno>;

/// A caller-supplied address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserAddr(usize);

impl UserAddr {
    /// From a `void *`.
    pub fn from_ptr<T>(ptr: *const T) -> UserAddr {
        UserAddr(ptr as usize)
    }

    /// From a `__u64` user pointer; `None` if it cannot be an address in this process.
    pub fn from_u64(value: u64) -> Option<UserAddr> {
        usize::try_from(value).ok().map(UserAddr)
    }

    /// From a `__u64` user pointer, a fault (`fault`) if it cannot be an address here.
    pub fn from_u64_or(value: u64, fault: Errno) -> R<UserAddr> {
        UserAddr::from_u64(value).ok_or(fault)
    }

    /// NULL?
    pub fn is_null(self) -> bool {
        self.0 == 0
    }

    /// The raw address.
    pub fn get(self) -> usize {
        self.0
    }

    /// Checks that `len` bytes from here could be accessed (not NULL, no wrap) before doing
    /// something that cannot be undone, so the later copy does not fault.
    pub fn check(self, len: usize, fault: Errno) -> R<()> {
        self.span(len, fault).map(|_| ())
    }

    /// The address `bytes` further on, a fault if that wraps.
    pub fn add(self, bytes: usize, fault: Errno) -> R<UserAddr> {
        self.0.checked_add(bytes).map(UserAddr).ok_or(fault)
    }

    /// The address `bytes` further on (no wrap: the span was checked by the caller).
    fn offset(self, bytes: usize) -> UserAddr {
        UserAddr(self.0 + bytes)
    }

    /// A span of `len` bytes from here that is not NULL and does not wrap.
    fn span(self, len: usize, fault: Errno) -> R<*mut u8> {
        if self.is_null() || self.0.checked_add(len).is_none() {
            return Err(fault);
        }
        Ok(self.0 as *mut u8)
    }
}

/// Reads a `T` (any bit pattern valid: the uapi structs are integers, arrays and raw pointers).
///
/// # Safety
/// A non-NULL `addr` points to `size_of::<T>()` readable bytes, and every bit pattern is a valid
/// `T`.
pub unsafe fn read<T: Copy>(addr: UserAddr, fault: Errno) -> R<T> {
    let ptr = addr.span(size_of::<T>(), fault)?;
    // SAFETY: non-NULL and not wrapping (checked above); readable for size_of::<T>() bytes by
    // the caller's contract; unaligned read, so no alignment requirement; T accepts any bits.
    Ok(unsafe { core::ptr::read_unaligned(ptr as *const T) })
}

/// Reads `len` bytes.
///
/// # Safety
/// A non-NULL `addr` points to `len` readable bytes.
pub unsafe fn read_bytes(addr: UserAddr, len: usize, fault: Errno) -> R<Vec<u8>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let ptr = addr.span(len, fault)?;
    let mut out = vec![0u8; len];
    // SAFETY: source readable for len bytes (contract) and non-wrapping; destination is our own
    // buffer of len bytes; they cannot overlap (ours is freshly allocated).
    unsafe { core::ptr::copy_nonoverlapping(ptr as *const u8, out.as_mut_ptr(), len) };
    Ok(out)
}

/// Reads `count` consecutive `T`s. `count * size_of::<T>()` overflowing is a fault.
///
/// # Safety
/// As [`read`], for `count` elements.
pub unsafe fn read_array<T: Copy>(addr: UserAddr, count: usize, fault: Errno) -> R<Vec<T>> {
    let total = count.checked_mul(size_of::<T>()).ok_or(fault)?;
    if count == 0 {
        return Ok(Vec::new());
    }
    addr.span(total, fault)?;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        // SAFETY: element i lies inside the span checked above; contract as for `read`.
        out.push(unsafe { read::<T>(addr.offset(i * size_of::<T>()), fault)? });
    }
    Ok(out)
}

/// Writes `bytes` at `addr`.
///
/// # Safety
/// A non-NULL `addr` points to `bytes.len()` writable bytes that do not overlap `bytes`.
pub unsafe fn write_bytes(addr: UserAddr, bytes: &[u8], fault: Errno) -> R<()> {
    if bytes.is_empty() {
        return Ok(()); // like copy_to_user of 0 bytes: nothing to fault on
    }
    let ptr = addr.span(bytes.len(), fault)?;
    // SAFETY: destination writable for len bytes (contract), non-NULL and non-wrapping;
    // byte copy, so no alignment requirement; `bytes` is our own buffer.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, bytes.len()) };
    Ok(())
}

/// Reads a NUL-terminated string of at most `max_bytes` bytes including the NUL, byte by byte
/// (never past the NUL). NULL, or an `addr + max_bytes` that wraps (no string can lie there), →
/// `fault`; no NUL within `max_bytes` → `too_long`.
///
/// # Safety
/// A non-NULL `addr` points to a readable NUL-terminated string, or to `max_bytes` readable
/// bytes.
pub unsafe fn read_cstr(
    addr: UserAddr,
    max_bytes: usize,
    fault: Errno,
    too_long: Errno,
) -> R<Vec<u8>> {
    // The whole span is checked before the first byte is read: a wrapping address is a fault,
    // never dereferenced (found by the abi_ioctl fuzz target).
    addr.check(max_bytes, fault)?;
    let mut out = Vec::new();
    for i in 0..max_bytes {
        let Some(at) = addr.0.checked_add(i) else {
            return Err(fault);
        };
        // SAFETY: bytes before index i were all non-NUL, so byte i is still inside the string
        // (or inside max_bytes) by the caller's contract; a u8 has no alignment.
        let byte = unsafe { read::<u8>(UserAddr(at), fault)? };
        if byte == 0 {
            return Ok(out);
        }
        out.push(byte);
    }
    Err(too_long)
}

/// Builds the byte image of an output struct: starts all-zero (so padding is zero, quirk §7.7),
/// fields are put at their `offset_of!` in native byte order.
pub struct OutImage(Vec<u8>);

impl OutImage {
    /// `size` zero bytes.
    pub fn zeroed(size: usize) -> OutImage {
        OutImage(vec![0u8; size])
    }

    /// Puts raw bytes at `offset`. Panics if out of bounds (a bug in this crate, caught by the
    /// panic boundary).
    pub fn put(&mut self, offset: usize, bytes: &[u8]) -> &mut OutImage {
        self.0[offset..offset + bytes.len()].copy_from_slice(bytes);
        self
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_reported_not_dereferenced() {
        // SAFETY: NULL and wrapping addresses are rejected before any access.
        unsafe {
            assert_eq!(read::<u64>(UserAddr(0), Errno::ENODATA), Err(Errno::ENODATA));
            assert_eq!(read::<u64>(UserAddr(usize::MAX - 3), Errno::EINVAL), Err(Errno::EINVAL));
            assert_eq!(
                read_array::<u64>(UserAddr(8), usize::MAX / 4, Errno::EFAULT),
                Err(Errno::EFAULT)
            );
            assert_eq!(write_bytes(UserAddr(0), &[1], Errno::EINVAL), Err(Errno::EINVAL));
            assert_eq!(write_bytes(UserAddr(0), &[], Errno::EINVAL), Ok(()));
            assert_eq!(read_bytes(UserAddr(0), 0, Errno::EINVAL), Ok(Vec::new()));
            assert_eq!(
                read_cstr(UserAddr(0), 10, Errno::EFAULT, Errno::EINVAL),
                Err(Errno::EFAULT)
            );
            // Regression (fuzz): a string address whose max span wraps is never read.
            assert_eq!(
                read_cstr(UserAddr(usize::MAX - 100), 4096, Errno::EFAULT, Errno::EINVAL),
                Err(Errno::EFAULT)
            );
        }
    }

    #[test]
    fn misaligned_reads_and_strings() {
        let buf: Vec<u8> = (0u8..32).collect();
        let addr = UserAddr::from_ptr(buf.as_ptr()).offset(1);
        // SAFETY: addr + 8 and addr + 16 lie inside buf.
        let v = unsafe { read::<u64>(addr, Errno::EFAULT) }.unwrap();
        assert_eq!(v.to_ne_bytes(), [1, 2, 3, 4, 5, 6, 7, 8]);
        // SAFETY: 2 u32 from addr lie inside buf.
        let arr = unsafe { read_array::<u32>(addr, 2, Errno::EFAULT) }.unwrap();
        assert_eq!(arr.len(), 2);
        let s = b"abc\0def";
        // SAFETY: NUL-terminated within the array.
        let got =
            unsafe { read_cstr(UserAddr::from_ptr(s.as_ptr()), 8, Errno::EFAULT, Errno::EINVAL) };
        assert_eq!(got.unwrap(), b"abc");
        // SAFETY: at most 3 bytes are read, all inside s.
        let long =
            unsafe { read_cstr(UserAddr::from_ptr(s.as_ptr()), 3, Errno::EFAULT, Errno::EINVAL) };
        assert_eq!(long, Err(Errno::EINVAL));
        assert_eq!(UserAddr::from_u64(u64::MAX).is_some(), usize::BITS == 64);
    }

    /// Writes and reads through user addresses stay inside the caller's buffers, at any
    /// alignment (Miri checks every access: `.ci/run` stage miri).
    #[test]
    fn round_trips_stay_in_bounds() {
        let mut buf = vec![0u8; 40];
        for start in 0..8 {
            let addr = UserAddr::from_ptr(buf.as_mut_ptr()).offset(start);
            let data: Vec<u8> = (0..32).map(|i| i as u8 ^ start as u8).collect();
            // SAFETY: start + 32 <= 40: the span lies inside buf, which outlives the calls.
            unsafe {
                write_bytes(addr, &data, Errno::EFAULT).unwrap();
                assert_eq!(read_bytes(addr, 32, Errno::EFAULT).unwrap(), data);
                let words = read_array::<u64>(addr, 4, Errno::EFAULT).unwrap();
                assert_eq!(words[0].to_ne_bytes(), data[..8]);
            }
            let mut out = OutImage::zeroed(16);
            out.put(8, &data[..8]);
            assert_eq!(&out.bytes()[8..], &data[..8]);
        }
        // A span past the end of the address space is refused before any access.
        // SAFETY: nothing is dereferenced (the span wraps).
        let wrap = unsafe { read_bytes(UserAddr(usize::MAX - 7), 16, Errno::EFAULT) };
        assert_eq!(wrap, Err(Errno::EFAULT));
    }
}
