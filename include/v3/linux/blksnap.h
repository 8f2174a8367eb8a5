/* SPDX-License-Identifier: Apache-2.0 OR MIT */
/*
 * blksnap uapi, profile "v3" (the April 2023 series, veeam/blksnap patches/lk6.3-rc4-v2).
 *
 * Written for blksnap-rs from the interface tables (names, numbers and layouts are the
 * interface; this text is not the upstream header). Source-compatible: a client written against
 * the upstream <linux/blksnap.h> of that series compiles unchanged with -I include/v3.
 */
#ifndef _UAPI_LINUX_BLKSNAP_H
#define _UAPI_LINUX_BLKSNAP_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define BLKSNAP_CTL "blksnap-control"
#define BLKSNAP_IMAGE_NAME "blksnap-image"
#define BLKSNAP 'V'

/* Filter ctl commands (blkfilter_ctl.cmd) */
enum blkfilter_ctl_blksnap {
	blkfilter_ctl_blksnap_cbtinfo,
	blkfilter_ctl_blksnap_cbtmap,
	blkfilter_ctl_blksnap_cbtdirty,
	blkfilter_ctl_blksnap_snapshotadd,
	blkfilter_ctl_blksnap_snapshotinfo,
};

#ifndef UUID_SIZE
#define UUID_SIZE 16
#endif

struct blksnap_uuid {
	__u8 b[UUID_SIZE];
};

/* cbtinfo: device capacity in bytes, CBT block size in bytes, block count, generation. */
struct blksnap_cbtinfo {
	__u64 device_capacity;
	__u32 block_size;
	__u32 block_count;
	struct blksnap_uuid generation_id;
	__u8 changes_number;
};

/* cbtmap: copy `length` bytes of the CBT read map from block `offset` into `buffer`. */
struct blksnap_cbtmap {
	__u32 offset;
	__u32 length;
	__u8 *buffer;
};

/* A range of 512-byte sectors. */
struct blksnap_sectors {
	__u64 offset;
	__u64 count;
};

/* cbtdirty: mark `count` ranges as changed. */
struct blksnap_cbtdirty {
	__u32 count;
	struct blksnap_sectors *dirty_sectors;
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
	blksnap_ioctl_version,
	blksnap_ioctl_snapshot_create,
	blksnap_ioctl_snapshot_destroy,
	blksnap_ioctl_snapshot_append_storage,
	blksnap_ioctl_snapshot_take,
	blksnap_ioctl_snapshot_collect,
	blksnap_ioctl_snapshot_wait_event,
};

struct blksnap_version {
	__u16 major;
	__u16 minor;
	__u16 revision;
	__u16 build;
};

/* The directions below are inverted relative to the data flow; the numbers are the ABI. */
#define IOCTL_BLKSNAP_VERSION \
	_IOW(BLKSNAP, blksnap_ioctl_version, struct blksnap_version)

#define IOCTL_BLKSNAP_SNAPSHOT_CREATE \
	_IOW(BLKSNAP, blksnap_ioctl_snapshot_create, struct blksnap_uuid)

#define IOCTL_BLKSNAP_SNAPSHOT_DESTROY \
	_IOR(BLKSNAP, blksnap_ioctl_snapshot_destroy, struct blksnap_uuid)

/* Append sector ranges of the block device `bdev_path` to the snapshot's difference storage. */
struct blksnap_snapshot_append_storage {
	struct blksnap_uuid id;
	__u8 *bdev_path;
	__u32 bdev_path_size;
	__u32 count;
	struct blksnap_sectors *ranges;
};

#define IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE \
	_IOW(BLKSNAP, blksnap_ioctl_snapshot_append_storage, \
	     struct blksnap_snapshot_append_storage)

#define IOCTL_BLKSNAP_SNAPSHOT_TAKE \
	_IOR(BLKSNAP, blksnap_ioctl_snapshot_take, struct blksnap_uuid)

/* ids == NULL: count receives the number of snapshots. */
struct blksnap_snapshot_collect {
	__u32 count;
	struct blksnap_uuid *ids;
};

#define IOCTL_BLKSNAP_SNAPSHOT_COLLECT \
	_IOW(BLKSNAP, blksnap_ioctl_snapshot_collect, struct blksnap_snapshot_collect)

enum blksnap_event_codes {
	blksnap_event_code_low_free_space,
	blksnap_event_code_corrupted,
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
	_IOW(BLKSNAP, blksnap_ioctl_snapshot_wait_event, struct blksnap_snapshot_event)

/* Payload of blksnap_event_code_low_free_space. */
struct blksnap_event_low_free_space {
	__u64 requested_nr_sect;
};

/* Payload of blksnap_event_code_corrupted; err_code is a positive errno. */
struct blksnap_event_corrupted {
	__u32 dev_id_mj;
	__u32 dev_id_mn;
	__s32 err_code;
};

#endif /* _UAPI_LINUX_BLKSNAP_H */
