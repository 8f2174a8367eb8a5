/* SPDX-License-Identifier: Apache-2.0 OR MIT */
/*
 * Block-device filter uapi, profile "newest" (lk6.15 = veeam/blksnap master). Written for
 * blksnap-rs from the interface tables. The BLKFILTER_* request macros are defined only if the
 * system headers have not defined them already (as the userspace copy does).
 */
#ifndef _UAPI_LINUX_BLK_FILTER_H
#define _UAPI_LINUX_BLK_FILTER_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define BLKFILTER_NAME_LENGTH 32

/* BLKFILTER_ATTACH argument; opt/optlen are reserved for filter options (blksnap ignores them). */
struct blkfilter_attach {
	__u8 name[BLKFILTER_NAME_LENGTH];
	__u64 opt;
	__u32 optlen;
};

/* BLKFILTER_DETACH argument. */
struct blkfilter_detach {
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
#define BLKFILTER_ATTACH _IOWR(0x12, 142, struct blkfilter_attach)
#endif
#ifndef BLKFILTER_DETACH
#define BLKFILTER_DETACH _IOWR(0x12, 143, struct blkfilter_detach)
#endif
#ifndef BLKFILTER_CTL
#define BLKFILTER_CTL _IOWR(0x12, 144, struct blkfilter_ctl)
#endif

#endif /* _UAPI_LINUX_BLK_FILTER_H */
