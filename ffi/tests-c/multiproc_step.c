/*
 * One step of the upstream console tool's workflow per process, against blksnapd on a host
 * without ublk (blksnapd --frontend none), through the LD_PRELOAD shim in client mode: nothing
 * but libc calls and the upstream <linux/blksnap.h> / <linux/blk-filter.h> of one profile (build
 * against include/v3 or include/newest). State lives in the daemon, so each step is a new
 * process, as with the kernel module:
 *
 *   LD_PRELOAD=libblksnap-preload.so BLKSNAP_SOCKET=SOCK BLKSNAP_PROFILE=v3|newest \
 *   BLKSNAP_CONFIG='/dev/sdX=BACKING@MAJ:MIN' multiproc_step STEP ARGS...
 *
 * Steps (output on stdout, for the next step or the script's checks):
 *   attach DEV | detach DEV                  BLKFILTER_ATTACH / DETACH of "blksnap"
 *   create STORAGE BYTES                     prints the snapshot id (32 hex digits). v3: CREATE,
 *                                            then APPEND_STORAGE of the file's first BYTES; newest:
 *                                            CREATE on the file with a limit of BYTES
 *   add ID DEV | take ID | destroy ID        snapshotadd, TAKE, DESTROY
 *   image DEV                                snapshotinfo: prints /dev/<image name>
 *   cbtinfo DEV                              prints "generation=HEX changes=N blocks=N block_size=N"
 *   cbtmap DEV                               prints "BLOCK VALUE" for every non-zero block
 *   write DEV OFFSET LEN BYTE                O_DIRECT pwrite of LEN bytes of BYTE, then fsync
 *   errnos DEV IMAGE                         the kernel's errnos of every filter request on an
 *                                            image, on the device with no filter, and naming
 *                                            another filter on the tracked device
 * Exit status 0 = the step succeeded and every check passed.
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
#include <unistd.h>

#define CLIENT_NAME "multiproc_step"
#include "upstream_client.h"

static int open_or_die(const char *path, int flags)
{
	int fd = open(path, flags);
	if (fd < 0) {
		fprintf(stderr, CLIENT_NAME "[" PROFILE "]: open %s: %s\n", path, strerror(errno));
		exit(1);
	}
	return fd;
}

static void print_id(const struct blksnap_uuid *id)
{
	for (unsigned i = 0; i < sizeof id->b; i++)
		printf("%02x", id->b[i]);
	printf("\n");
}

static int parse_id(const char *text, struct blksnap_uuid *id)
{
	if (strlen(text) != 2 * sizeof id->b)
		return -1;
	for (unsigned i = 0; i < sizeof id->b; i++) {
		unsigned v;
		if (sscanf(text + 2 * i, "%2x", &v) != 1)
			return -1;
		id->b[i] = (__u8)v;
	}
	return 0;
}

static int control(void)
{
	return open_or_die("/dev/blksnap-control", O_RDWR);
}

static int step_create(const char *storage, unsigned long long bytes)
{
	int c = control();
	struct blksnap_uuid id;
#ifdef IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE
	CHECK(ioctl(c, IOCTL_BLKSNAP_SNAPSHOT_CREATE, &id) == 0);
	struct blksnap_sectors range = { .offset = 0, .count = bytes / 512 };
	struct blksnap_snapshot_append_storage app = {
		.id = id, .bdev_path = (__u8 *)storage, .bdev_path_size = strlen(storage) + 1,
		.count = 1, .ranges = &range,
	};
	CHECK(ioctl(c, IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE, &app) == 0);
#else
	struct blksnap_snapshot_create create = {
		.diff_storage_limit_sect = bytes / 512,
		.diff_storage_filename = (__u64)(uintptr_t)storage,
	};
	CHECK(ioctl(c, IOCTL_BLKSNAP_SNAPSHOT_CREATE, &create) == 0);
	id = create.id;
#endif
	print_id(&id);
	return close(c);
}

static int step_id(const char *step, const char *text)
{
	struct blksnap_uuid id;
	if (parse_id(text, &id) != 0) {
		fprintf(stderr, "bad id %s\n", text);
		return 2;
	}
	int c = control();
	if (strcmp(step, "take") == 0)
		CHECK(ioctl(c, IOCTL_BLKSNAP_SNAPSHOT_TAKE, &id) == 0);
	else
		CHECK(ioctl(c, IOCTL_BLKSNAP_SNAPSHOT_DESTROY, &id) == 0);
	return close(c);
}

static void step_add(const char *text, const char *device)
{
	struct blksnap_snapshotadd add;
	memset(&add, 0, sizeof add);
	CHECK(parse_id(text, &add.id) == 0);
	int dev = open_or_die(device, O_RDONLY);
	CHECK(ctl(dev, CTL_SNAPSHOTADD, &add, sizeof add) == 0);
	close(dev);
}

static void step_image(const char *device)
{
	int dev = open_or_die(device, O_RDONLY);
	struct stat st;
	CHECK(fstat(dev, &st) == 0 && S_ISBLK(st.st_mode));
	struct blksnap_snapshotinfo info;
	memset(&info, 0, sizeof info);
	CHECK(ctl(dev, CTL_SNAPSHOTINFO, &info, sizeof info) == 0 && info.error_code == 0);
	char want[64];
	snprintf(want, sizeof want, IMAGE_FMT, major(st.st_rdev), minor(st.st_rdev));
	CHECK(strcmp((char *)info.image, want) == 0);
	printf("/dev/%s\n", (char *)info.image);
	close(dev);
}

static void step_cbtinfo(const char *device)
{
	int dev = open_or_die(device, O_RDONLY);
	struct blksnap_cbtinfo cbt;
	memset(&cbt, 0, sizeof cbt);
	CHECK(ctl(dev, CTL_CBTINFO, &cbt, sizeof cbt) == 0);
	printf("generation=");
	for (unsigned i = 0; i < sizeof cbt.generation_id.b; i++)
		printf("%02x", cbt.generation_id.b[i]);
	printf(" changes=%u blocks=%u block_size=%u\n", (unsigned)cbt.changes_number,
	       (unsigned)cbt.block_count, (unsigned)cbt.block_size);
	close(dev);
}

static void step_cbtmap(const char *device)
{
	int dev = open_or_die(device, O_RDONLY);
	struct blksnap_cbtinfo cbt;
	memset(&cbt, 0, sizeof cbt);
	CHECK(ctl(dev, CTL_CBTINFO, &cbt, sizeof cbt) == 0);
	unsigned char *map = calloc(cbt.block_count ? cbt.block_count : 1, 1);
	CHECK(map != NULL);
	struct blksnap_cbtmap m = { .offset = 0, .length = cbt.block_count, .buffer = USER_PTR(map) };
	CHECK(ctl(dev, CTL_CBTMAP, &m, sizeof m) == 0);
	for (unsigned i = 0; i < cbt.block_count; i++)
		if (map[i])
			printf("%u %u\n", i, map[i]);
	free(map);
	close(dev);
}

static void step_write(const char *device, long long offset, long long len, int byte)
{
	int dev = open_or_die(device, O_RDWR | O_DIRECT);
	void *buf = NULL;
	CHECK(posix_memalign(&buf, 4096, len) == 0);
	memset(buf, byte, len);
	CHECK(pwrite(dev, buf, len, offset) == len);
	CHECK(fsync(dev) == 0);
	free(buf);
	close(dev);
}

/* A filter request naming `name`; returns the ioctl's result. */
static int named(int fd, unsigned long request, const char *name)
{
	if (request == BLKFILTER_CTL) {
		struct blkfilter_ctl c;
		struct blksnap_cbtinfo cbt;
		memset(&c, 0, sizeof c);
		set_name(c.name, name);
		c.cmd = CTL_CBTINFO;
		c.optlen = sizeof cbt;
		c.opt = (__u64)(uintptr_t)&cbt;
		return ioctl(fd, request, &c);
	}
	if (request == BLKFILTER_ATTACH) {
		attach_t a;
		memset(&a, 0, sizeof a);
		set_name(a.name, name);
		return ioctl(fd, request, &a);
	}
	detach_t d;
	memset(&d, 0, sizeof d);
	set_name(d.name, name);
	return ioctl(fd, request, &d);
}

/* DEV must not be attached and IMAGE must exist (another device's snapshot image). Leaves DEV
 * detached. The kernel's answers (blksnap-abi.md §2.7, §3.6). */
static void step_errnos(const char *device, const char *image)
{
	int img = open_or_die(image, O_RDONLY);
	CHECK_ERR(named(img, BLKFILTER_ATTACH, "blksnap"), EOPNOTSUPP); /* kernel: would attach */
	CHECK_ERR(named(img, BLKFILTER_ATTACH, "other"), ENOENT);
	CHECK_ERR(named(img, BLKFILTER_DETACH, "blksnap"), ENOENT);
	CHECK_ERR(named(img, BLKFILTER_DETACH, "other"), ENOENT);
	CHECK_ERR(named(img, BLKFILTER_CTL, "blksnap"), ENOENT);
	CHECK_ERR(named(img, BLKFILTER_CTL, "other"), ENOENT);
	close(img);

	int dev = open_or_die(device, O_RDONLY);
	/* no filter attached */
	CHECK_ERR(named(dev, BLKFILTER_DETACH, "blksnap"), ENOENT);
	CHECK_ERR(named(dev, BLKFILTER_DETACH, "other"), ENOENT);
	CHECK_ERR(named(dev, BLKFILTER_CTL, "blksnap"), ENOENT);
	CHECK_ERR(named(dev, BLKFILTER_CTL, "other"), ENOENT);
	CHECK_ERR(named(dev, BLKFILTER_ATTACH, "other"), ENOENT); /* no such filter registered */
	/* blksnap attached: requests naming another filter */
	CHECK(named(dev, BLKFILTER_ATTACH, "blksnap") == 0);
	CHECK_ERR(named(dev, BLKFILTER_ATTACH, "blksnap"), EALREADY);
	CHECK_ERR(named(dev, BLKFILTER_ATTACH, "other"), ENOENT);
	CHECK_ERR(named(dev, BLKFILTER_DETACH, "other"), EINVAL);
#ifdef IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE
	CHECK_ERR(named(dev, BLKFILTER_CTL, "other"), ENOENT); /* v3: name mismatch is ENOENT */
#else
	CHECK_ERR(named(dev, BLKFILTER_CTL, "other"), EINVAL);
#endif
	CHECK(named(dev, BLKFILTER_CTL, "blksnap") == 0);
	CHECK(named(dev, BLKFILTER_DETACH, "blksnap") == 0);
	CHECK_ERR(named(dev, BLKFILTER_DETACH, "blksnap"), ENOENT);
	close(dev);
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s STEP ARGS... (see the source)\n", argv[0]);
		return 2;
	}
	const char *step = argv[1];
	if (strcmp(step, "attach") == 0 && argc == 3) {
		int dev = open_or_die(argv[2], O_RDONLY);
		CHECK(filter_attach(dev) == 0);
		close(dev);
	} else if (strcmp(step, "detach") == 0 && argc == 3) {
		int dev = open_or_die(argv[2], O_RDONLY);
		CHECK(filter_detach(dev) == 0);
		close(dev);
	} else if (strcmp(step, "create") == 0 && argc == 4) {
		step_create(argv[2], strtoull(argv[3], NULL, 0));
	} else if ((strcmp(step, "take") == 0 || strcmp(step, "destroy") == 0) && argc == 3) {
		int rc = step_id(step, argv[2]);
		if (rc == 2)
			return 2;
	} else if (strcmp(step, "add") == 0 && argc == 4) {
		step_add(argv[2], argv[3]);
	} else if (strcmp(step, "image") == 0 && argc == 3) {
		step_image(argv[2]);
	} else if (strcmp(step, "cbtinfo") == 0 && argc == 3) {
		step_cbtinfo(argv[2]);
	} else if (strcmp(step, "cbtmap") == 0 && argc == 3) {
		step_cbtmap(argv[2]);
	} else if (strcmp(step, "write") == 0 && argc == 6) {
		step_write(argv[2], strtoll(argv[3], NULL, 0), strtoll(argv[4], NULL, 0),
			   (int)strtol(argv[5], NULL, 0));
	} else if (strcmp(step, "errnos") == 0 && argc == 4) {
		step_errnos(argv[2], argv[3]);
	} else {
		fprintf(stderr, "%s: unknown step or wrong arguments: %s\n", argv[0], step);
		return 2;
	}
	fflush(stdout);
	return failures ? 1 : 0;
}
