/* SPDX-License-Identifier: Apache-2.0 OR MIT */
/*
 * blksnap uapi, profile "newest" (lk6.15 = veeam/blksnap master include/linux/blksnap.h).
 *
 * Written for blksnap-rs from the interface tables (names, numbers and layouts are the
 * interface; this text is not the upstream header). Source-compatible: a client written against
 * the upstream header compiles unchanged with -I include/newest.
 */
#ifndef _UAPI_LINUX_BLKSNAP_H
#define _UAPI_LINUX_BLKSNAP_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define BLKSNAP_CTL "blksnap-control"
#define BLKSNAP_IMAGE_NAME "blksnap"
#define BLKSNAP 'V'

/* Filter ctl commands (blkfilter_ctl.cmd) */
enum blkfilter_ctl_blksnap {
	BLKFILTER_CTL_BLKSNAP_CBTINFO = 0,
	BLKFILTER_CTL_BLKSNAP_CBTMAP = 1,
	BLKFILTER_CTL_BLKSNAP_CBTDIRTY = 2,
	BLKFILTER_CTL_BLKSNAP_SNAPSHOTADD = 3,
	BLKFILTER_CTL_BLKSNAP_SNAPSHOTINFO = 4,
};

struct blksnap_uuid {
	__u8 b[16];
};

/* cbtinfo: device capacity in bytes, CBT block size in bytes, block count, generation. */
struct blksnap_cbtinfo {
	__u64 device_capacity;
	__u32 block_size;
	__u32 block_count;
	struct blksnap_uuid generation_id;
	__u8 changes_number;
};

/* cbtmap: copy `length` bytes of the CBT read map from block `offset` to user pointer `buffer`. */
struct blksnap_cbtmap {
	__u32 offset;
	__u32 length;
	__u64 buffer;
};

/* A range of 512-byte sectors. */
struct blksnap_sectors {
	__u64 offset;
	__u64 count;
};

/* cbtdirty: mark `count` ranges (user pointer dirty_sectors) as changed. */
struct blksnap_cbtdirty {
	__u32 count;
	__u64 dirty_sectors;
};

/* snapshotadd: add the device to snapshot `id`. */
struct blksnap_snapshotadd {
	struct blksnap_uuid id;
};

#define IMAGE_DISK_NAME_LEN 32

/* snapshotinfo: 0 or the negative errno of the diff area, and the image disk name. */
struct blksnap_snapshotinfo {
	__s32 error_code;
	__u8 image[IMAGE_DISK_NAME_LEN];
};

/* Control device request numbers. */
enum blksnap_ioctl {
	BLKSNAP_IOCTL_VERSION = 0,
	BLKSNAP_IOCTL_SNAPSHOT_CREATE = 1,
	BLKSNAP_IOCTL_SNAPSHOT_DESTROY = 2,
	BLKSNAP_IOCTL_SNAPSHOT_TAKE = 3,
	BLKSNAP_IOCTL_SNAPSHOT_COLLECT = 4,
	BLKSNAP_IOCTL_SNAPSHOT_WAIT_EVENT = 5,
};

struct blksnap_version {
	__u16 major;
	__u16 minor;
	__u16 revision;
	__u16 build;
};

#define IOCTL_BLKSNAP_VERSION \
	_IOR(BLKSNAP, BLKSNAP_IOCTL_VERSION, struct blksnap_version)

/*
 * Create a snapshot whose difference storage is the file, directory (an unnamed temporary file
 * in it) or block device at diff_storage_filename, at most diff_storage_limit_sect sectors.
 * Out: id.
 */
struct blksnap_snapshot_create {
	__u64 diff_storage_limit_sect;
	__u64 diff_storage_filename;
	struct blksnap_uuid id;
};

#define IOCTL_BLKSNAP_SNAPSHOT_CREATE \
	_IOWR(BLKSNAP, BLKSNAP_IOCTL_SNAPSHOT_CREATE, struct blksnap_snapshot_create)

#define IOCTL_BLKSNAP_SNAPSHOT_DESTROY \
	_IOW(BLKSNAP, BLKSNAP_IOCTL_SNAPSHOT_DESTROY, struct blksnap_uuid)

#define IOCTL_BLKSNAP_SNAPSHOT_TAKE \
	_IOW(BLKSNAP, BLKSNAP_IOCTL_SNAPSHOT_TAKE, struct blksnap_uuid)

/* ids == 0: count receives the number of snapshots. */
struct blksnap_snapshot_collect {
	__u32 count;
	__u64 ids;
};

#define IOCTL_BLKSNAP_SNAPSHOT_COLLECT \
	_IOR(BLKSNAP, BLKSNAP_IOCTL_SNAPSHOT_COLLECT, struct blksnap_snapshot_collect)

enum blksnap_event_codes {
	blksnap_event_code_corrupted = 0,
	blksnap_event_code_no_space = 1,
};

/* In: id, timeout_ms. Out: code, time_label (CLOCK_MONOTONIC ns), data (the payload). */
struct blksnap_snapshot_event {
	struct blksnap_uuid id;
	__u32 timeout_ms;
	__u32 code;
	__s64 time_label;
	__u8 data[4096 - 32];
};

#if defined(__cplusplus)
static_assert(sizeof(struct blksnap_snapshot_event) == 4096,
	      "The size struct blksnap_snapshot_event should be equal to the size of the page.");
#elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
_Static_assert(sizeof(struct blksnap_snapshot_event) == 4096,
	       "The size struct blksnap_snapshot_event should be equal to the size of the page.");
#endif

#define IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT \
	_IOR(BLKSNAP, BLKSNAP_IOCTL_SNAPSHOT_WAIT_EVENT, struct blksnap_snapshot_event)

/* Payload of blksnap_event_code_corrupted; err_code is a positive errno. */
struct blksnap_event_corrupted {
	__u32 dev_id_mj;
	__u32 dev_id_mn;
	__s32 err_code;
};

/* Payload of blksnap_event_code_no_space: the total requested, in sectors. */
struct blksnap_event_no_space {
	__u64 requested_nr_sect;
};

#endif /* _UAPI_LINUX_BLKSNAP_H */
