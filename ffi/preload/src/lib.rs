//! # libblksnap-preload: run an unmodified upstream blksnap client without the kernel module
//!
//! `LD_PRELOAD=libblksnap-preload.so client ...` makes the libc calls of an upstream-style C or
//! C++ client (plain `open("/dev/blksnap-control")`, `ioctl(fd, IOCTL_BLKSNAP_...)`,
//! `ioctl(device_fd, BLKFILTER_...)`, `pread`/`pwrite` on `/dev/...` paths) reach libblksnap's
//! in-process engine:
//!
//! * `BLKSNAP_PROFILE=v3|newest` (default `newest`) chooses the interface generation;
//! * `BLKSNAP_CONFIG` (libblksnap's grammar: `/dev/X=backing[@MAJ:MIN]`, `storage:PATH=BACKING`,
//!   `param.NAME=VALUE`, `seed=N`) names the devices served from backing files.
//!
//! Served paths: `/dev/blksnap-control`; each configured device path and `/dev/block/MAJ:MIN`;
//! each device's snapshot image (`/dev/blksnap-image_MAJ:MIN` in v3, `/dev/blksnap-MAJ-MIN` in
//! newest, or `/dev/block/251:N`) while it exists. Opening one returns a real descriptor (a
//! memfd) recorded in a table; the calls on it are served ([`hooks`]): control and filter ioctls
//! through libblksnap's dispatch, `BLKGETSIZE64` & co., data I/O through the engine (writes to a
//! device mark the CBT and copy-on-write; images read the snapshot), `stat`s as block devices.
//! Everything else passes through to libc untouched.
//!
//! Robustness: a thread-local flag makes every call the library itself makes (opening and
//! reading backing files) pass straight to libc ([`guard::Inside`]); no panic crosses into C
//! (`errno = ENOTRECOVERABLE`, engine marked failed); failures are `-1` with `errno`, as libc.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod data;
pub mod guard;
pub mod hooks;
pub mod real;
pub mod state;
