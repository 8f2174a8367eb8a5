/*
 * A v3-profile backup client, written the upstream way (upstream structs and request codes from
 * <linux/blksnap.h> and <linux/blk-filter.h>), driving libblksnap through a whole lifecycle:
 * attach, create, add, low_free_space, append storage, take, write the origin, read the image
 * and compare, cbtinfo/cbtmap/cbtdirty, wait_event timeout, overflow -> corrupted, destroy.
 * Exits 0 on success; prints the failed check otherwise. Run under valgrind by run-c-tests.sh.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <linux/blk-filter.h>
#include <linux/blksnap.h>
#include <blksnap/libblksnap.h>

#define DISK_BYTES (8u << 20)
#define STORAGE_BYTES (2u << 20)
#define DEV "/dev/blksnap-test0"

static int failures;
#define CHECK(cond)                                                              \
	do {                                                                     \
		if (!(cond)) {                                                   \
			fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
			failures++;                                              \
		}                                                                \
	} while (0)
#define CHECK_RC(expr, want)                                                     \
	do {                                                                     \
		long rc_ = (long)(expr);                                         \
		if (rc_ != (long)(want)) {                                       \
			fprintf(stderr, "%s:%d: %s = %ld (%s), want %ld\n", __FILE__, __LINE__, \
				#expr, rc_, blksnap_strerror((int)rc_), (long)(want)); \
			failures++;                                              \
		}                                                                \
	} while (0)

static void make_file(const char *path, size_t bytes)
{
	int fd = open(path, O_CREAT | O_RDWR | O_TRUNC, 0600);
	if (fd < 0 || ftruncate(fd, (off_t)bytes) != 0) {
		perror(path);
		exit(2);
	}
	close(fd);
}

static void fill(unsigned char *buf, size_t len, unsigned seed)
{
	for (size_t i = 0; i < len; i++)
		buf[i] = (unsigned char)(i * 31u + seed);
}

static void filter_name(__u8 name[BLKFILTER_NAME_LENGTH])
{
	memset(name, 0, BLKFILTER_NAME_LENGTH);
	memcpy(name, "blksnap", 7);
}

static int ctl(int h, unsigned cmd, void *opt, unsigned optlen)
{
	struct blkfilter_ctl c;
	filter_name(c.name);
	c.cmd = cmd;
	c.optlen = optlen;
	c.opt = (__u64)(uintptr_t)opt;
	return blksnap_filter_ioctl(h, DEV, BLKFILTER_CTL, &c);
}

/* Waits for the next event; returns the ioctl result. */
static int wait_event(int h, const struct blksnap_uuid *id, unsigned timeout_ms,
		      struct blksnap_snapshot_event *ev)
{
	memset(ev, 0xAB, sizeof(*ev));
	ev->id = *id;
	ev->timeout_ms = timeout_ms;
	return blksnap_ctl_ioctl(h, IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT, ev);
}

int main(void)
{
	char dir[] = "/tmp/blksnap-c-v3-XXXXXX";
	if (!mkdtemp(dir)) {
		perror("mkdtemp");
		return 2;
	}
	char disk[256], storage[256], config[1024];
	snprintf(disk, sizeof disk, "%s/disk0.img", dir);
	snprintf(storage, sizeof storage, "%s/storage.img", dir);
	make_file(disk, DISK_BYTES);
	make_file(storage, STORAGE_BYTES);
	snprintf(config, sizeof config, DEV "=%s@7:0;storage:/dev/block/8:1=%s", disk, storage);

	int h = blksnap_ctl_open(BLKSNAP_PROFILE_V3, config);
	CHECK(h > 0);
	CHECK_RC(blksnap_ctl_profile(h), BLKSNAP_PROFILE_V3);

	struct blksnap_version ver;
	CHECK_RC(blksnap_ctl_ioctl(h, IOCTL_BLKSNAP_VERSION, &ver), 0);
	CHECK(ver.major == 2 && ver.minor == 0 && ver.revision == 0 && ver.build == 0);

	/* 1. attach (EALREADY the second time, as the library expects). */
	struct blkfilter_name name;
	filter_name(name.name);
	CHECK_RC(blksnap_filter_ioctl(h, DEV, BLKFILTER_ATTACH, &name), 0);
	CHECK_RC(blksnap_filter_ioctl(h, DEV, BLKFILTER_ATTACH, &name), -EALREADY);

	/* Original content, written through the library (tracked by the CBT since attach). */
	unsigned char *orig = malloc(DISK_BYTES), *buf = malloc(DISK_BYTES);
	fill(orig, DISK_BYTES, 7);
	CHECK_RC(blksnap_dev_pwrite(h, DEV, orig, DISK_BYTES, 0), DISK_BYTES);
	uint64_t size = 0;
	CHECK_RC(blksnap_dev_size(h, DEV, &size), 0);
	CHECK(size == DISK_BYTES);

	/* 2. create, 3. add. */
	struct blksnap_uuid id;
	CHECK_RC(blksnap_ctl_ioctl(h, IOCTL_BLKSNAP_SNAPSHOT_CREATE, &id), 0);
	struct blksnap_snapshotadd add = { .id = id };
	CHECK_RC(ctl(h, blkfilter_ctl_blksnap_snapshotadd, &add, sizeof add), 0);
	CHECK_RC(ctl(h, blkfilter_ctl_blksnap_snapshotadd, &add, sizeof add), -EALREADY);

	/* 4. the immediate low_free_space event, then nothing (timeout -> ENOENT). */
	struct blksnap_snapshot_event *ev = malloc(sizeof *ev);
	CHECK_RC(wait_event(h, &id, 100, ev), 0);
	CHECK(ev->code == blksnap_event_code_low_free_space);
	struct blksnap_event_low_free_space low;
	memcpy(&low, ev->data, sizeof low);
	CHECK(low.requested_nr_sect == 2097152);
	CHECK(ev->data[sizeof low] == 0 && ev->data[sizeof ev->data - 1] == 0);
	CHECK(memcmp(&ev->id, &id, sizeof id) == 0 && ev->timeout_ms == 100);
	CHECK_RC(wait_event(h, &id, 10, ev), -ENOENT);

	/* 5-6. append the storage: all of it, as sector ranges of /dev/block/8:1. */
	struct blksnap_sectors range = { .offset = 0, .count = STORAGE_BYTES / 512 };
	char bdev[] = "/dev/block/8:1";
	struct blksnap_snapshot_append_storage app = {
		.id = id, .bdev_path = (__u8 *)bdev, .bdev_path_size = sizeof bdev,
		.count = 1, .ranges = &range,
	};
	CHECK_RC(blksnap_ctl_ioctl(h, IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE, &app), 0);

	/* 8. take. */
	CHECK_RC(blksnap_ctl_ioctl(h, IOCTL_BLKSNAP_SNAPSHOT_TAKE, &id), 0);
	CHECK_RC(blksnap_ctl_ioctl(h, IOCTL_BLKSNAP_SNAPSHOT_TAKE, &id), -EALREADY);

	struct blksnap_snapshotinfo info;
	memset(&info, 0xCD, sizeof info);
	CHECK_RC(ctl(h, blkfilter_ctl_blksnap_snapshotinfo, &info, sizeof info), 0);
	CHECK(info.error_code == 0);
	CHECK(strcmp((char *)info.image, "blksnap-image_7:0") == 0);
	CHECK(info.image[sizeof info.image - 1] == 0);
	char image[64];
	snprintf(image, sizeof image, "/dev/%s", (char *)info.image);

	/* COLLECT: count, then the ids. */
	struct blksnap_snapshot_collect col = { .count = 0, .ids = NULL };
	CHECK_RC(blksnap_ctl_ioctl(h, IOCTL_BLKSNAP_SNAPSHOT_COLLECT, &col), 0);
	CHECK(col.count == 1);
	struct blksnap_uuid ids[4];
	col.ids = ids;
	col.count = 4;
	CHECK_RC(blksnap_ctl_ioctl(h, IOCTL_BLKSNAP_SNAPSHOT_COLLECT, &col), 0);
	CHECK(col.count == 1 && memcmp(&ids[0], &id, sizeof id) == 0);

	/* Write the origin, read the image: it still holds the content at take. */
	unsigned char *fresh = malloc(65536);
	fill(fresh, 65536, 99);
	CHECK_RC(blksnap_dev_pwrite(h, DEV, fresh, 65536, 0), 65536);
	CHECK_RC(blksnap_image_pread(h, image, buf, DISK_BYTES, 0), DISK_BYTES);
	CHECK(memcmp(buf, orig, DISK_BYTES) == 0);
	CHECK_RC(blksnap_dev_pread(h, DEV, buf, 65536, 0), 65536);
	CHECK(memcmp(buf, fresh, 65536) == 0);

	/* CBT: info (padding zeroed), map (v3 clamps the length), dirty. */
	struct blksnap_cbtinfo cbt;
	memset(&cbt, 0xEE, sizeof cbt);
	CHECK_RC(ctl(h, blkfilter_ctl_blksnap_cbtinfo, &cbt, sizeof cbt), 0);
	CHECK(cbt.device_capacity == DISK_BYTES);
	CHECK(cbt.block_count > 0 && (uint64_t)cbt.block_count * cbt.block_size >= DISK_BYTES);
	CHECK(cbt.changes_number == 1);
	for (size_t i = offsetof(struct blksnap_cbtinfo, changes_number) + 1; i < sizeof cbt; i++)
		CHECK(((unsigned char *)&cbt)[i] == 0);
	unsigned char *map = malloc(cbt.block_count + 16);
	memset(map, 0x77, cbt.block_count + 16);
	struct blksnap_cbtmap m = { .offset = 0, .length = cbt.block_count + 16, .buffer = map };
	CHECK_RC(ctl(h, blkfilter_ctl_blksnap_cbtmap, &m, sizeof m), 0);
	CHECK(map[0] == 1 && map[cbt.block_count - 1] == 1);
	CHECK(map[cbt.block_count] == 0x77); /* clamped: nothing past the map */
	m.offset = cbt.block_count + 1;
	CHECK_RC(ctl(h, blkfilter_ctl_blksnap_cbtmap, &m, sizeof m), -ENODATA);
	struct blksnap_sectors dirty[2] = { { 0, 8 }, { 64, 8 } };
	struct blksnap_cbtdirty d = { .count = 2, .dirty_sectors = dirty };
	CHECK_RC(ctl(h, blkfilter_ctl_blksnap_cbtdirty, &d, sizeof d), 0);
	CHECK_RC(ctl(h, blkfilter_ctl_blksnap_cbtdirty, &d, sizeof d - 1), -EINVAL);
	CHECK_RC(ctl(h, 5, &d, sizeof d), -ENOTTY);

	/* Overflow: rewrite the whole origin; the 2 MiB storage cannot hold the pre-images. */
	fill(buf, DISK_BYTES, 200);
	CHECK_RC(blksnap_dev_pwrite(h, DEV, buf, DISK_BYTES, 0), DISK_BYTES);
	int corrupted = 0;
	for (int i = 0; i < 64 && !corrupted; i++) {
		int rc = wait_event(h, &id, 100, ev);
		if (rc != 0) {
			CHECK_RC(rc, 0);
			break;
		}
		if (ev->code == blksnap_event_code_corrupted) {
			struct blksnap_event_corrupted c;
			memcpy(&c, ev->data, sizeof c);
			CHECK(c.dev_id_mj == 7 && c.dev_id_mn == 0 && c.err_code == ENOSPC);
			corrupted = 1;
		} else {
			CHECK(ev->code == blksnap_event_code_low_free_space);
		}
	}
	CHECK(corrupted);
	CHECK_RC(ctl(h, blkfilter_ctl_blksnap_snapshotinfo, &info, sizeof info), 0);
	CHECK(info.error_code == -ENOSPC);
	CHECK_RC(blksnap_image_pread(h, image, buf, 4096, 0), -EIO);

	/* Destroy: the id is gone, the image too; the filter stays until detach. */
	CHECK_RC(blksnap_ctl_ioctl(h, IOCTL_BLKSNAP_SNAPSHOT_DESTROY, &id), 0);
	CHECK_RC(blksnap_ctl_ioctl(h, IOCTL_BLKSNAP_SNAPSHOT_DESTROY, &id), -ENODEV);
	CHECK_RC(blksnap_ctl_ioctl(h, IOCTL_BLKSNAP_SNAPSHOT_TAKE, &id), -ESRCH);
	CHECK_RC(blksnap_image_pread(h, image, buf, 4096, 0), -ENODEV);
	CHECK_RC(blksnap_filter_ioctl(h, DEV, BLKFILTER_DETACH, &name), 0);
	CHECK_RC(blksnap_filter_ioctl(h, DEV, BLKFILTER_DETACH, &name), -ENOENT);

	/* Wrong profile and unknown codes. */
	CHECK_RC(blksnap_ctl_ioctl(h, 0xc0205601u /* newest CREATE */, &id), -ENOTTY);
	CHECK_RC(blksnap_ctl_ioctl(h, 0x5401 /* TCGETS */, &id), -ENOTTY);

	CHECK_RC(blksnap_ctl_close(h), 0);
	CHECK_RC(blksnap_ctl_close(h), -9 /* EBADF */);
	CHECK_RC(blksnap_ctl_ioctl(h, IOCTL_BLKSNAP_VERSION, &ver), -9);

	free(orig);
	free(buf);
	free(fresh);
	free(map);
	free(ev);
	unlink(disk);
	unlink(storage);
	rmdir(dir);
	if (failures) {
		fprintf(stderr, "client_v3: %d check(s) failed\n", failures);
		return 1;
	}
	printf("client_v3: lifecycle OK (libblksnap %s)\n", blksnap_lib_version());
	return 0;
}
