//! The Linux ioctl request encoding (`asm-generic/ioctl.h`, identical on x86_64 and i386):
//! `code = dir << 30 | size << 16 | type << 8 | nr` (`reference/blksnap-abi.md` §1).

/// No data transfer.
pub const IOC_NONE: u32 = 0;
/// User → kernel (`_IOW`).
pub const IOC_WRITE: u32 = 1;
/// Kernel → user (`_IOR`).
pub const IOC_READ: u32 = 2;

const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_SIZEBITS: u32 = 14;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;

/// `_IOC(dir, type, nr, size)`. A size that does not fit 14 bits fails const evaluation.
pub const fn ioc(dir: u32, kind: u32, nr: u32, size: usize) -> u32 {
    assert!(dir <= 3, "direction has 2 bits");
    assert!(kind < (1 << IOC_TYPEBITS), "type has 8 bits");
    assert!(nr < (1 << IOC_NRBITS), "nr has 8 bits");
    assert!(size < (1 << IOC_SIZEBITS), "size has 14 bits");
    (dir << IOC_DIRSHIFT) | ((size as u32) << IOC_SIZESHIFT) | (kind << IOC_TYPESHIFT) | nr
}

/// `_IO(type, nr)`.
pub const fn io(kind: u32, nr: u32) -> u32 {
    ioc(IOC_NONE, kind, nr, 0)
}

/// `_IOR(type, nr, T)`: `size` is `sizeof(T)`.
pub const fn ior(kind: u32, nr: u32, size: usize) -> u32 {
    ioc(IOC_READ, kind, nr, size)
}

/// `_IOW(type, nr, T)`.
pub const fn iow(kind: u32, nr: u32, size: usize) -> u32 {
    ioc(IOC_WRITE, kind, nr, size)
}

/// `_IOWR(type, nr, T)`.
pub const fn iowr(kind: u32, nr: u32, size: usize) -> u32 {
    ioc(IOC_READ | IOC_WRITE, kind, nr, size)
}

/// `_IOC_NR(code)`.
pub const fn ioc_nr(code: u32) -> u32 {
    (code >> IOC_NRSHIFT) & ((1 << IOC_NRBITS) - 1)
}

/// `_IOC_TYPE(code)`.
pub const fn ioc_type(code: u32) -> u32 {
    (code >> IOC_TYPESHIFT) & ((1 << IOC_TYPEBITS) - 1)
}

/// `_IOC_SIZE(code)`.
pub const fn ioc_size(code: u32) -> u32 {
    (code >> IOC_SIZESHIFT) & ((1 << IOC_SIZEBITS) - 1)
}

/// `_IOC_DIR(code)`.
pub const fn ioc_dir(code: u32) -> u32 {
    code >> IOC_DIRSHIFT
}

const _: () = assert!(IOC_DIRSHIFT == 30);
const _: () = assert!(iow(0x56, 0, 8) == 0x4008_5600);
const _: () = assert!(iowr(0x12, 140, 32) == 0xc020_128c);
const _: () = assert!(io(0x12, 104) == 0x0000_1268, "BLKSSZGET");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        let code = iowr(0x12, 144, 48);
        assert_eq!(code, 0xc030_1290);
        assert_eq!(ioc_nr(code), 144);
        assert_eq!(ioc_type(code), 0x12);
        assert_eq!(ioc_size(code), 48);
        assert_eq!(ioc_dir(code), IOC_READ | IOC_WRITE);
        assert_eq!(ior(0x56, 5, 4096), 0x9000_5605);
    }
}
