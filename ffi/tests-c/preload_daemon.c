/*
 * An upstream-style blksnap client against blksnapd, through the LD_PRELOAD shim in client
 * mode: nothing but libc calls and the upstream <linux/blksnap.h> / <linux/blk-filter.h> of one
 * profile (build against include/v3 or include/newest).
 *
 *   LD_PRELOAD=libblksnap-preload.so BLKSNAP_SOCKET=/run/blksnap/control BLKSNAP_PROFILE=...
 *     preload_daemon /dev/ublkbN DIR
 *
 * /dev/ublkbN is a real block device the daemon serves and /dev/blksnap-* are the daemon's real
 * image links: the shim serves only /dev/blksnap-control and the BLKFILTER_* requests on the
 * device's descriptor (routed by its st_rdev); every read and write goes to the kernel. DIR
 * holds the difference storage. Run in the VM (service/src/bin/vmtest.rs, scenario preload-daemon).
 * Exit status 0 = every check passed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <linux/fs.h>

#define CLIENT_NAME "preload_daemon"
#include "upstream_client.h"

#define STORAGE_BYTES (16 * MIB)
#define AT (1 * MIB) /* where the test writes */
#define LEN (64u << 10)

static void *page_buffer(size_t len, int fill)
{
	void *p = NULL;
	if (posix_memalign(&p, 4096, len) != 0) {
		perror("posix_memalign");
		exit(2);
	}
	memset(p, fill, len);
	return p;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s /dev/ublkbN DIR\n", argv[0]);
		return 2;
	}
	const char *device = argv[1], *dir = argv[2];
	int control = open("/dev/blksnap-control", O_RDWR);
	CHECK(control >= 0);
	struct blksnap_version ver;
	memset(&ver, 0, sizeof ver);
	CHECK(ioctl(control, IOCTL_BLKSNAP_VERSION, &ver) == 0 && ver.major == 2);

	/* The device is the kernel's: size and data from ublk, the filter from the daemon. */
	int dev = open(device, O_RDWR | O_DIRECT);
	CHECK(dev >= 0);
	struct stat st;
	CHECK(fstat(dev, &st) == 0 && S_ISBLK(st.st_mode));
	unsigned maj = major(st.st_rdev), min = minor(st.st_rdev);
	unsigned long long size = 0;
	CHECK(ioctl(dev, BLKGETSIZE64, &size) == 0 && size >= 8 * MIB);
	errno = 0;
	int rc = filter_attach(dev);
	CHECK(rc == 0 || errno == EALREADY); /* blksnapd may track it already */
	CHECK_ERR(filter_attach(dev), EALREADY);
	struct blksnap_cbtinfo cbt;
	memset(&cbt, 0, sizeof cbt);
	CHECK(ctl(dev, CTL_CBTINFO, &cbt, sizeof cbt) == 0);
	CHECK(cbt.device_capacity == size && cbt.block_size >= 4096 && cbt.block_count > 0);

	unsigned char *before = page_buffer(LEN, 0xa5), *after = page_buffer(LEN, 0x5a);
	unsigned char *buf = page_buffer(LEN, 0);
	CHECK(pwrite(dev, before, LEN, AT) == LEN && fsync(dev) == 0);

	/* Create, storage, add, take. */
	struct blksnap_uuid id;
	struct blksnap_snapshot_event *ev = page_buffer(sizeof *ev, 0);
	char storage[512];
	snprintf(storage, sizeof storage, "%s/diff_storage", dir);
#ifdef IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE
	CHECK(ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_CREATE, &id) == 0);
	CHECK(wait_event(control, &id, 1000, ev) == 0 && ev->code == EVENT_LOW_FREE_SPACE);
	/* v3 storage: sectors of a device or file the daemon opens (here a file). */
	int sfd = open(storage, O_CREAT | O_RDWR | O_TRUNC, 0600);
	CHECK(sfd >= 0 && ftruncate(sfd, STORAGE_BYTES) == 0 && close(sfd) == 0);
	struct blksnap_sectors range = { .offset = 0, .count = STORAGE_BYTES / 512 };
	struct blksnap_snapshot_append_storage app = {
		.id = id, .bdev_path = (__u8 *)storage, .bdev_path_size = strlen(storage) + 1,
		.count = 1, .ranges = &range,
	};
	CHECK(ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE, &app) == 0);
#else
	struct blksnap_snapshot_create create = {
		.diff_storage_limit_sect = STORAGE_BYTES / 512,
		.diff_storage_filename = (__u64)(uintptr_t)dir, /* a directory: an unnamed file */
	};
	CHECK(ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_CREATE, &create) == 0);
	id = create.id;
#endif
	struct blksnap_snapshotadd add = { .id = id };
	CHECK(ctl(dev, CTL_SNAPSHOTADD, &add, sizeof add) == 0);
	CHECK_ERR(ctl(dev, CTL_SNAPSHOTADD, &add, sizeof add), EALREADY);
	CHECK(ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_TAKE, &id) == 0);

	/* The image: the daemon's /dev link, a real block device. */
	struct blksnap_snapshotinfo info;
	memset(&info, 0, sizeof info);
	CHECK(ctl(dev, CTL_SNAPSHOTINFO, &info, sizeof info) == 0 && info.error_code == 0);
	char want[64], image[80];
	snprintf(want, sizeof want, IMAGE_FMT, maj, min);
	CHECK(strcmp((char *)info.image, want) == 0);
	snprintf(image, sizeof image, "/dev/%s", (char *)info.image);
	int img = -1;
	for (int i = 0; i < 100 && img < 0; i++) { /* udev-less: the link follows the take */
		img = open(image, O_RDONLY | O_DIRECT);
		if (img < 0)
			usleep(50000);
	}
	CHECK(img >= 0);
	CHECK(fstat(img, &st) == 0 && S_ISBLK(st.st_mode));
	unsigned long long isize = 0;
	CHECK(ioctl(img, BLKGETSIZE64, &isize) == 0 && isize == size);

	/* Overwrite the device: the image keeps the content at take. */
	CHECK(pwrite(dev, after, LEN, AT) == LEN && fsync(dev) == 0);
	CHECK(pread(img, buf, LEN, AT) == LEN && memcmp(buf, before, LEN) == 0);
	CHECK(pread(dev, buf, LEN, AT) == LEN && memcmp(buf, after, LEN) == 0);

	/* CBT: the map frozen at take marks the blocks written before it. */
	unsigned char *map = calloc(cbt.block_count, 1);
	struct blksnap_cbtmap m = { .offset = 0, .length = cbt.block_count, .buffer = USER_PTR(map) };
	CHECK(map && ctl(dev, CTL_CBTMAP, &m, sizeof m) == 0);
	CHECK(map && map[AT / cbt.block_size] != 0);
	struct blksnap_sectors dirty = { .offset = 0, .count = 8 };
	struct blksnap_cbtdirty dm = { .count = 1, .dirty_sectors = USER_PTR(&dirty) };
	CHECK(ctl(dev, CTL_CBTDIRTY, &dm, sizeof dm) == 0);
	CHECK(ctl(dev, CTL_CBTMAP, &m, sizeof m) == 0 && map[0] != 0);

	/* Events, collect. */
	/* 16 MiB is below the low-space threshold (half the 1 GiB minimum): v3 asks for more
	 * storage again, newest reports that its limit is reached (no_space). */
	for (int i = 0; i < 8 && wait_event(control, &id, 100, ev) == 0; i++)
		CHECK(ev->code == EVENT_STORAGE_LOW);
	CHECK_ERR(wait_event(control, &id, 100, ev), ENOENT);
	struct blksnap_uuid ids[64];
	struct blksnap_snapshot_collect col = { .count = 64, .ids = USER_PTR(ids) };
	CHECK(ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_COLLECT, &col) == 0 && col.count >= 1);
	int found = 0;
	for (unsigned i = 0; i < col.count && i < 64; i++)
		found |= memcmp(&ids[i], &id, sizeof id) == 0;
	CHECK(found);

	/* Destroy: the image goes away. */
	CHECK(close(img) == 0);
	CHECK(ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_DESTROY, &id) == 0);
	int gone = 0;
	for (int i = 0; i < 100 && !gone; i++) {
		gone = stat(image, &st) != 0 && errno == ENOENT;
		if (!gone)
			usleep(50000);
	}
	CHECK(gone);
	CHECK_ERR(ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_DESTROY, &id), ENODEV);

	/* Only BLKFILTER_* of known devices are the library's: a regular file is the kernel's. */
	int plain = open(storage, O_CREAT | O_RDWR, 0600);
	CHECK(plain >= 0);
	CHECK_ERR(filter_attach(plain), ENOTTY);
	CHECK(close(plain) == 0 && unlink(storage) == 0);

	CHECK(close(dev) == 0 && close(control) == 0);
	free(before);
	free(after);
	free(buf);
	free(ev);
	free(map);
	if (failures == 0)
		printf("preload_daemon[" PROFILE "]: ok (%s = %u:%u, image %s)\n", device, maj, min,
		       (char *)info.image);
	return failures == 0 ? 0 : 1;
}
