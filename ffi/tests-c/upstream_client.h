/*
 * Shared by the upstream-style test clients (preload_client.c, preload_daemon.c): the profile's
 * names (build against include/v3 or include/newest), the CHECK macros and the small ioctl
 * helpers every upstream client writes. Define CLIENT_NAME before including it.
 */
#ifndef BLKSNAP_TESTS_UPSTREAM_CLIENT_H
#define BLKSNAP_TESTS_UPSTREAM_CLIENT_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>

#include <linux/blk-filter.h>
#include <linux/blksnap.h>

#ifndef CLIENT_NAME
#error "define CLIENT_NAME before including upstream_client.h"
#endif

#ifdef IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE
#define PROFILE "v3"
#define IMAGE_FMT "blksnap-image_%u:%u"
#define OTHER_IMAGE_FMT "/dev/blksnap-%u-%u"
#define CTL_CBTINFO blkfilter_ctl_blksnap_cbtinfo
#define CTL_CBTMAP blkfilter_ctl_blksnap_cbtmap
#define CTL_CBTDIRTY blkfilter_ctl_blksnap_cbtdirty
#define CTL_SNAPSHOTADD blkfilter_ctl_blksnap_snapshotadd
#define CTL_SNAPSHOTINFO blkfilter_ctl_blksnap_snapshotinfo
#define EVENT_LOW_FREE_SPACE blksnap_event_code_low_free_space
/* the event a storage below the low-space threshold queues */
#define EVENT_STORAGE_LOW blksnap_event_code_low_free_space
typedef struct blkfilter_name attach_t;
typedef struct blkfilter_name detach_t;
#define USER_PTR(p) (p)
#else
#define PROFILE "newest"
#define IMAGE_FMT "blksnap-%u-%u"
#define OTHER_IMAGE_FMT "/dev/blksnap-image_%u:%u"
#define CTL_CBTINFO BLKFILTER_CTL_BLKSNAP_CBTINFO
#define CTL_CBTMAP BLKFILTER_CTL_BLKSNAP_CBTMAP
#define CTL_CBTDIRTY BLKFILTER_CTL_BLKSNAP_CBTDIRTY
#define CTL_SNAPSHOTADD BLKFILTER_CTL_BLKSNAP_SNAPSHOTADD
#define CTL_SNAPSHOTINFO BLKFILTER_CTL_BLKSNAP_SNAPSHOTINFO
#define EVENT_STORAGE_LOW blksnap_event_code_no_space
typedef struct blkfilter_attach attach_t;
typedef struct blkfilter_detach detach_t;
#define USER_PTR(p) ((__u64)(uintptr_t)(p))
#endif

#define MIB (1u << 20)

static int failures;
#define CHECK(cond)                                                                        \
	do {                                                                               \
		if (!(cond)) {                                                             \
			fprintf(stderr, CLIENT_NAME "[" PROFILE "]:%d: check failed: %s (errno %d %s)\n", \
				__LINE__, #cond, errno, strerror(errno));                  \
			failures++;                                                        \
		}                                                                          \
	} while (0)
/* A libc-style call that must fail with `err`. */
#define CHECK_ERR(expr, err)                                                               \
	do {                                                                               \
		errno = 0;                                                                 \
		long rc_ = (long)(expr);                                                   \
		if (rc_ != -1 || errno != (err)) {                                         \
			fprintf(stderr, CLIENT_NAME "[" PROFILE "]:%d: %s = %ld, errno %d (%s), want -1/%s\n", \
				__LINE__, #expr, rc_, errno, strerror(errno), #err);        \
			failures++;                                                        \
		}                                                                          \
	} while (0)

static inline void set_name(__u8 name[BLKFILTER_NAME_LENGTH], const char *value)
{
	memset(name, 0, BLKFILTER_NAME_LENGTH);
	memcpy(name, value, strlen(value));
}

static inline int filter_attach(int fd)
{
	attach_t a;
	memset(&a, 0, sizeof a);
	set_name(a.name, "blksnap");
	return ioctl(fd, BLKFILTER_ATTACH, &a);
}

static inline int filter_detach(int fd)
{
	detach_t d;
	memset(&d, 0, sizeof d);
	set_name(d.name, "blksnap");
	return ioctl(fd, BLKFILTER_DETACH, &d);
}

static inline int ctl(int fd, unsigned cmd, void *opt, unsigned optlen)
{
	struct blkfilter_ctl c;
	memset(&c, 0, sizeof c);
	set_name(c.name, "blksnap");
	c.cmd = cmd;
	c.optlen = optlen;
	c.opt = (__u64)(uintptr_t)opt;
	return ioctl(fd, BLKFILTER_CTL, &c);
}

static inline int wait_event(int control, const struct blksnap_uuid *id, unsigned timeout_ms,
		      struct blksnap_snapshot_event *ev)
{
	memset(ev, 0, sizeof *ev);
	ev->id = *id;
	ev->timeout_ms = timeout_ms;
	return ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT, ev);
}

#endif
