/* SPDX-License-Identifier: Apache-2.0 OR MIT */
/*
 * Block-device filter uapi, profile "v3" (veeam/blksnap patches/lk6.3-rc4-v2). Written for
 * blksnap-rs from the interface tables. As in the userspace copy of that period, the
 * BLKFILTER_* request macros are defined here (upstream they are in <linux/fs.h>).
 */
#ifndef _UAPI_LINUX_BLK_FILTER_H
#define _UAPI_LINUX_BLK_FILTER_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define BLKFILTER_NAME_LENGTH 32

/* BLKFILTER_ATTACH / BLKFILTER_DETACH argument. */
struct blkfilter_name {
	__u8 name[BLKFILTER_NAME_LENGTH];
};

/* BLKFILTER_CTL argument: filter-specific command `cmd` on `opt` (optlen bytes). */
struct blkfilter_ctl {
	__u8 name[BLKFILTER_NAME_LENGTH];
	__u32 cmd;
	__u32 optlen;
	__u64 opt;
};

#ifndef BLKFILTER_ATTACH
#define BLKFILTER_ATTACH _IOWR(0x12, 140, struct blkfilter_name)
#endif
#ifndef BLKFILTER_DETACH
#define BLKFILTER_DETACH _IOWR(0x12, 141, struct blkfilter_name)
#endif
#ifndef BLKFILTER_CTL
#define BLKFILTER_CTL _IOWR(0x12, 142, struct blkfilter_ctl)
#endif

#endif /* _UAPI_LINUX_BLK_FILTER_H */
