/*
 * Compile-time check of the uapi headers against the interface tables (blksnap-abi.md §2.3,
 * §2.4, §3.3, §3.4): every sizeof, alignment, offsetof, field size, enum value and request code
 * of one profile, for the target's pointer width (x86_64 or i386 columns).
 *
 *   cc -std=c11 -Wall -Werror -fsyntax-only -I include/v3     ffi/tests-c/abi_check.c
 *   cc -std=c11 -Wall -Werror -fsyntax-only -I include/newest -DBLKSNAP_ABI_NEWEST ...
 *   (and both again with -m32)
 */
#include <stddef.h>
#include <stdint.h>
#include <linux/blksnap.h>
#include <linux/blk-filter.h>
#include "../../include/blksnap/libblksnap.h"

#if __SIZEOF_POINTER__ == 8
#define W64 1
#elif __SIZEOF_POINTER__ == 4
#define W64 0
#else
#error "only 64-bit (x86_64) and 32-bit (i386) layouts are tabulated"
#endif

#define PICK(v64, v32) (W64 ? (v64) : (v32))
#define LAYOUT(T, s64, a64, s32, a32)                                           \
	_Static_assert(sizeof(struct T) == PICK(s64, s32), "sizeof " #T);       \
	_Static_assert(_Alignof(struct T) == PICK(a64, a32), "alignof " #T)
#define FIELD(T, f, o64, s64, o32, s32)                                         \
	_Static_assert(offsetof(struct T, f) == PICK(o64, o32), "offsetof " #T "." #f); \
	_Static_assert(sizeof(((struct T *)0)->f) == PICK(s64, s32), "sizeof " #T "." #f)
#define CODE(name, v64, v32) _Static_assert((name) == PICK(v64, v32), "code " #name)
#define VALUE(name, v) _Static_assert((name) == (v), "value " #name)

/* ---- shared by both profiles ---- */
LAYOUT(blksnap_uuid, 16, 1, 16, 1);
FIELD(blksnap_uuid, b, 0, 16, 0, 16);
LAYOUT(blksnap_sectors, 16, 8, 16, 4);
FIELD(blksnap_sectors, offset, 0, 8, 0, 8);
FIELD(blksnap_sectors, count, 8, 8, 8, 8);
LAYOUT(blksnap_cbtinfo, 40, 8, 36, 4);
FIELD(blksnap_cbtinfo, device_capacity, 0, 8, 0, 8);
FIELD(blksnap_cbtinfo, block_size, 8, 4, 8, 4);
FIELD(blksnap_cbtinfo, block_count, 12, 4, 12, 4);
FIELD(blksnap_cbtinfo, generation_id, 16, 16, 16, 16);
FIELD(blksnap_cbtinfo, changes_number, 32, 1, 32, 1);
LAYOUT(blksnap_snapshotadd, 16, 1, 16, 1);
FIELD(blksnap_snapshotadd, id, 0, 16, 0, 16);
LAYOUT(blksnap_snapshotinfo, 36, 4, 36, 4);
FIELD(blksnap_snapshotinfo, error_code, 0, 4, 0, 4);
FIELD(blksnap_snapshotinfo, image, 4, 32, 4, 32);
LAYOUT(blksnap_version, 8, 2, 8, 2);
FIELD(blksnap_version, major, 0, 2, 0, 2);
FIELD(blksnap_version, minor, 2, 2, 2, 2);
FIELD(blksnap_version, revision, 4, 2, 4, 2);
FIELD(blksnap_version, build, 6, 2, 6, 2);
LAYOUT(blksnap_snapshot_event, 4096, 8, 4096, 4);
FIELD(blksnap_snapshot_event, id, 0, 16, 0, 16);
FIELD(blksnap_snapshot_event, timeout_ms, 16, 4, 16, 4);
FIELD(blksnap_snapshot_event, code, 20, 4, 20, 4);
FIELD(blksnap_snapshot_event, time_label, 24, 8, 24, 8);
FIELD(blksnap_snapshot_event, data, 32, 4064, 32, 4064);
LAYOUT(blksnap_event_corrupted, 12, 4, 12, 4);
FIELD(blksnap_event_corrupted, dev_id_mj, 0, 4, 0, 4);
FIELD(blksnap_event_corrupted, dev_id_mn, 4, 4, 4, 4);
FIELD(blksnap_event_corrupted, err_code, 8, 4, 8, 4);
LAYOUT(blkfilter_ctl, 48, 8, 48, 4);
FIELD(blkfilter_ctl, name, 0, 32, 0, 32);
FIELD(blkfilter_ctl, cmd, 32, 4, 32, 4);
FIELD(blkfilter_ctl, optlen, 36, 4, 36, 4);
FIELD(blkfilter_ctl, opt, 40, 8, 40, 8);
VALUE(BLKSNAP, 0x56);
VALUE(IMAGE_DISK_NAME_LEN, 32);
VALUE(BLKFILTER_NAME_LENGTH, 32);
VALUE(BLKSNAP_PROFILE_V3, 1);
VALUE(BLKSNAP_PROFILE_NEWEST, 2);
VALUE(BLKSNAP_PANIC_ERRNO, 131);

#ifndef BLKSNAP_ABI_NEWEST
/* ---- profile v3 ---- */
VALUE(UUID_SIZE, 16);
VALUE(blkfilter_ctl_blksnap_cbtinfo, 0);
VALUE(blkfilter_ctl_blksnap_cbtmap, 1);
VALUE(blkfilter_ctl_blksnap_cbtdirty, 2);
VALUE(blkfilter_ctl_blksnap_snapshotadd, 3);
VALUE(blkfilter_ctl_blksnap_snapshotinfo, 4);
VALUE(blksnap_ioctl_version, 0);
VALUE(blksnap_ioctl_snapshot_create, 1);
VALUE(blksnap_ioctl_snapshot_destroy, 2);
VALUE(blksnap_ioctl_snapshot_append_storage, 3);
VALUE(blksnap_ioctl_snapshot_take, 4);
VALUE(blksnap_ioctl_snapshot_collect, 5);
VALUE(blksnap_ioctl_snapshot_wait_event, 6);
VALUE(blksnap_event_code_low_free_space, 0);
VALUE(blksnap_event_code_corrupted, 1);

LAYOUT(blksnap_cbtmap, 16, 8, 12, 4);
FIELD(blksnap_cbtmap, offset, 0, 4, 0, 4);
FIELD(blksnap_cbtmap, length, 4, 4, 4, 4);
FIELD(blksnap_cbtmap, buffer, 8, 8, 8, 4);
LAYOUT(blksnap_cbtdirty, 16, 8, 8, 4);
FIELD(blksnap_cbtdirty, count, 0, 4, 0, 4);
FIELD(blksnap_cbtdirty, dirty_sectors, 8, 8, 4, 4);
LAYOUT(blksnap_snapshot_append_storage, 40, 8, 32, 4);
FIELD(blksnap_snapshot_append_storage, id, 0, 16, 0, 16);
FIELD(blksnap_snapshot_append_storage, bdev_path, 16, 8, 16, 4);
FIELD(blksnap_snapshot_append_storage, bdev_path_size, 24, 4, 20, 4);
FIELD(blksnap_snapshot_append_storage, count, 28, 4, 24, 4);
FIELD(blksnap_snapshot_append_storage, ranges, 32, 8, 28, 4);
LAYOUT(blksnap_snapshot_collect, 16, 8, 8, 4);
FIELD(blksnap_snapshot_collect, count, 0, 4, 0, 4);
FIELD(blksnap_snapshot_collect, ids, 8, 8, 4, 4);
LAYOUT(blksnap_event_low_free_space, 8, 8, 8, 4);
FIELD(blksnap_event_low_free_space, requested_nr_sect, 0, 8, 0, 8);
LAYOUT(blkfilter_name, 32, 1, 32, 1);
FIELD(blkfilter_name, name, 0, 32, 0, 32);

CODE(IOCTL_BLKSNAP_VERSION, 0x40085600u, 0x40085600u);
CODE(IOCTL_BLKSNAP_SNAPSHOT_CREATE, 0x40105601u, 0x40105601u);
CODE(IOCTL_BLKSNAP_SNAPSHOT_DESTROY, 0x80105602u, 0x80105602u);
CODE(IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE, 0x40285603u, 0x40205603u);
CODE(IOCTL_BLKSNAP_SNAPSHOT_TAKE, 0x80105604u, 0x80105604u);
CODE(IOCTL_BLKSNAP_SNAPSHOT_COLLECT, 0x40105605u, 0x40085605u);
CODE(IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT, 0x50005606u, 0x50005606u);
CODE(BLKFILTER_ATTACH, 0xc020128cu, 0xc020128cu);
CODE(BLKFILTER_DETACH, 0xc020128du, 0xc020128du);
CODE(BLKFILTER_CTL, 0xc030128eu, 0xc030128eu);
#else
/* ---- profile newest ---- */
VALUE(BLKFILTER_CTL_BLKSNAP_CBTINFO, 0);
VALUE(BLKFILTER_CTL_BLKSNAP_CBTMAP, 1);
VALUE(BLKFILTER_CTL_BLKSNAP_CBTDIRTY, 2);
VALUE(BLKFILTER_CTL_BLKSNAP_SNAPSHOTADD, 3);
VALUE(BLKFILTER_CTL_BLKSNAP_SNAPSHOTINFO, 4);
VALUE(BLKSNAP_IOCTL_VERSION, 0);
VALUE(BLKSNAP_IOCTL_SNAPSHOT_CREATE, 1);
VALUE(BLKSNAP_IOCTL_SNAPSHOT_DESTROY, 2);
VALUE(BLKSNAP_IOCTL_SNAPSHOT_TAKE, 3);
VALUE(BLKSNAP_IOCTL_SNAPSHOT_COLLECT, 4);
VALUE(BLKSNAP_IOCTL_SNAPSHOT_WAIT_EVENT, 5);
VALUE(blksnap_event_code_corrupted, 0);
VALUE(blksnap_event_code_no_space, 1);
#ifdef UUID_SIZE
#error "the newest header does not define UUID_SIZE"
#endif

LAYOUT(blksnap_cbtmap, 16, 8, 16, 4);
FIELD(blksnap_cbtmap, offset, 0, 4, 0, 4);
FIELD(blksnap_cbtmap, length, 4, 4, 4, 4);
FIELD(blksnap_cbtmap, buffer, 8, 8, 8, 8);
LAYOUT(blksnap_cbtdirty, 16, 8, 12, 4);
FIELD(blksnap_cbtdirty, count, 0, 4, 0, 4);
FIELD(blksnap_cbtdirty, dirty_sectors, 8, 8, 4, 8);
LAYOUT(blksnap_snapshot_create, 32, 8, 32, 4);
FIELD(blksnap_snapshot_create, diff_storage_limit_sect, 0, 8, 0, 8);
FIELD(blksnap_snapshot_create, diff_storage_filename, 8, 8, 8, 8);
FIELD(blksnap_snapshot_create, id, 16, 16, 16, 16);
LAYOUT(blksnap_snapshot_collect, 16, 8, 12, 4);
FIELD(blksnap_snapshot_collect, count, 0, 4, 0, 4);
FIELD(blksnap_snapshot_collect, ids, 8, 8, 4, 8);
LAYOUT(blksnap_event_no_space, 8, 8, 8, 4);
FIELD(blksnap_event_no_space, requested_nr_sect, 0, 8, 0, 8);
LAYOUT(blkfilter_attach, 48, 8, 44, 4);
FIELD(blkfilter_attach, name, 0, 32, 0, 32);
FIELD(blkfilter_attach, opt, 32, 8, 32, 8);
FIELD(blkfilter_attach, optlen, 40, 4, 40, 4);
LAYOUT(blkfilter_detach, 32, 1, 32, 1);
FIELD(blkfilter_detach, name, 0, 32, 0, 32);

CODE(IOCTL_BLKSNAP_VERSION, 0x80085600u, 0x80085600u);
CODE(IOCTL_BLKSNAP_SNAPSHOT_CREATE, 0xc0205601u, 0xc0205601u);
CODE(IOCTL_BLKSNAP_SNAPSHOT_DESTROY, 0x40105602u, 0x40105602u);
CODE(IOCTL_BLKSNAP_SNAPSHOT_TAKE, 0x40105603u, 0x40105603u);
CODE(IOCTL_BLKSNAP_SNAPSHOT_COLLECT, 0x80105604u, 0x800c5604u);
CODE(IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT, 0x90005605u, 0x90005605u);
CODE(BLKFILTER_ATTACH, 0xc030128eu, 0xc02c128eu);
CODE(BLKFILTER_DETACH, 0xc020128fu, 0xc020128fu);
CODE(BLKFILTER_CTL, 0xc0301290u, 0xc0301290u);
#endif
