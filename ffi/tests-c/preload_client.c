/*
 * An upstream-style blksnap client: nothing but libc calls on /dev/... paths and the upstream
 * <linux/blksnap.h> / <linux/blk-filter.h> of one profile (build against include/v3 or
 * include/newest). It runs under LD_PRELOAD=libblksnap-preload.so, which serves those paths:
 *
 *   open("/dev/blksnap-control"), VERSION, BLKFILTER_ATTACH on two devices, CREATE (v3: then
 *   the low_free_space event and APPEND_STORAGE on a mapped /dev/block path; newest: a storage
 *   file and limit), snapshotadd, TAKE, snapshotinfo, writes to the devices, reads of the images
 *   (/dev/blksnap-image_MAJ:MIN or /dev/blksnap-MAJ-MIN) compared with the content at take,
 *   image writes, cbtinfo/cbtmap/cbtdirty, COLLECT, WAIT_EVENT timeout -> ENOENT, DESTROY,
 *   DETACH; BLKGETSIZE64 & co., O_DIRECT alignment, stat/fstat/statx, dup/dup2/fcntl/fork on
 *   served descriptors; and unrelated files, which must behave exactly as without the shim.
 *
 * Started without BLKSNAP_CONFIG it is the launcher: it makes the backing files in a temporary
 * directory, sets BLKSNAP_CONFIG / BLKSNAP_PROFILE, runs itself (fork + exec, under the same
 * LD_PRELOAD) and cleans up. Exit status 0 = every check passed.
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
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <pthread.h>

#include <linux/fs.h>

#define CLIENT_NAME "preload_client"
#include "upstream_client.h"

#define DISK0_BYTES (8 * MIB)
#define DISK1_BYTES (4 * MIB)
#define STORAGE_BYTES (8 * MIB)
#define DEV0 "/dev/sdz"
#define DEV0_MAJOR 8
#define DEV0_MINOR 240
#define DEV1 "/dev/vdz"
#define DEV1_BY_NUMBER "/dev/block/240:1" /* no number configured: 240:index */

static void fill(unsigned char *buf, size_t len, unsigned seed)
{
	for (size_t i = 0; i < len; i++)
		buf[i] = (unsigned char)(i * 131u + seed + i / 4096);
}

static void *aligned_alloc_or_die(size_t len)
{
	void *p = NULL;
	if (posix_memalign(&p, 4096, len) != 0) {
		perror("posix_memalign");
		exit(2);
	}
	return p;
}

/* Reads `len` bytes with read() in 1 MiB steps from the current position. */
static ssize_t read_all(int fd, unsigned char *buf, size_t len)
{
	size_t done = 0;
	while (done < len) {
		size_t n = len - done < MIB ? len - done : MIB;
		ssize_t r = read(fd, buf + done, n);
		if (r <= 0)
			return r < 0 ? r : (ssize_t)done;
		done += (size_t)r;
	}
	return (ssize_t)done;
}

/* Unrelated files and descriptors must behave exactly as without the shim. */
static void unrelated_files(const char *dir)
{
	char path[512];
	snprintf(path, sizeof path, "%s/plain.txt", dir);
	int fd = open(path, O_CREAT | O_RDWR | O_TRUNC, 0600);
	CHECK(fd >= 0);
	CHECK(write(fd, "hello, world", 12) == 12);
	CHECK(lseek(fd, 7, SEEK_SET) == 7);
	char buf[64] = { 0 };
	CHECK(read(fd, buf, sizeof buf) == 5 && memcmp(buf, "world", 5) == 0);
	CHECK(pwrite(fd, "H", 1, 0) == 1);
	CHECK(pread(fd, buf, 5, 0) == 5 && memcmp(buf, "Hello", 5) == 0);
	struct stat st;
	CHECK(fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size == 12);
	CHECK(stat(path, &st) == 0 && S_ISREG(st.st_mode));
	CHECK(lstat(path, &st) == 0 && S_ISREG(st.st_mode));
	CHECK(access(path, R_OK | W_OK) == 0);
	CHECK((fcntl(fd, F_GETFL) & O_ACCMODE) == O_RDWR);
	int n = -1;
	CHECK(lseek(fd, 5, SEEK_SET) == 5);
	CHECK(ioctl(fd, FIONREAD, &n) == 0 && n == 7); /* 12 bytes, position 5 */
	CHECK(lseek(fd, 0, SEEK_END) == 12);
	unsigned long long size;
	CHECK_ERR(ioctl(fd, BLKGETSIZE64, &size), ENOTTY);
	attach_t a;
	memset(&a, 0, sizeof a);
	set_name(a.name, "blksnap");
	CHECK_ERR(ioctl(fd, BLKFILTER_ATTACH, &a), ENOTTY);
	int d = dup(fd);
	CHECK(d >= 0 && lseek(d, 0, SEEK_CUR) == 12);
	CHECK(close(d) == 0);
	CHECK(fsync(fd) == 0 && fdatasync(fd) == 0);
	CHECK(close(fd) == 0);
	CHECK_ERR(close(fd), EBADF);
	CHECK_ERR(read(fd, buf, 1), EBADF);
	FILE *f = fopen(path, "a");
	CHECK(f != NULL);
	if (f) {
		fprintf(f, "!");
		CHECK(fclose(f) == 0);
	}
	CHECK(stat(path, &st) == 0 && st.st_size == 13);
	CHECK(unlink(path) == 0);
	CHECK_ERR(open("/dev/blksnap-no-such-node", O_RDONLY), ENOENT);
	CHECK_ERR(stat("/dev/blksnap-no-such-node", &st), ENOENT);
	fd = open("/dev/null", O_WRONLY);
	CHECK(fd >= 0 && write(fd, "x", 1) == 1 && close(fd) == 0);
	CHECK(stat("/dev/null", &st) == 0 && S_ISCHR(st.st_mode) &&
	      st.st_rdev == makedev(1, 3));
	/* The backing files are regular files to everyone but the engine. */
	snprintf(path, sizeof path, "%s/disk0.img", dir);
	CHECK(stat(path, &st) == 0 && S_ISREG(st.st_mode) && st.st_size == DISK0_BYTES);
}

/* Concurrent use of served descriptors: writers on the device, readers of the image. */
struct worker {
	int fd;           /* device (writers) or image (readers) */
	unsigned index;   /* which 256 KiB region (2-3 MiB: untouched by the rest of the test) */
	const unsigned char *expect; /* readers: the image content at take */
	int ok;
};

#define REGION (256u << 10)

static void *writer(void *arg)
{
	struct worker *w = arg;
	unsigned char *buf = aligned_alloc_or_die(REGION);
	w->ok = 1;
	for (int round = 0; w->ok && round < 4; round++) {
		memset(buf, 0x40 + round + (int)w->index, REGION);
		w->ok = pwrite(w->fd, buf, REGION, (off_t)(w->index * REGION)) == (ssize_t)REGION;
	}
	free(buf);
	return NULL;
}

static void *reader(void *arg)
{
	struct worker *w = arg;
	unsigned char *buf = aligned_alloc_or_die(REGION); /* the image is open O_DIRECT */
	w->ok = 1;
	for (int round = 0; w->ok && round < 4; round++) {
		off_t at = (off_t)(w->index * REGION);
		w->ok = pread(w->fd, buf, REGION, at) == (ssize_t)REGION &&
			memcmp(buf, w->expect + at, REGION) == 0;
	}
	free(buf);
	return NULL;
}

/* glibc's fortified and pre-2.33 entry points, which binaries call directly. */
extern int __open_2(const char *path, int flags);
extern int __openat_2(int dirfd, const char *path, int flags);
#if defined(__x86_64__)
extern int __xstat(int ver, const char *path, struct stat *buf);
extern int __fxstat(int ver, int fd, struct stat *buf);
#endif

/* Every open / stat / offset-width variant reaches the shim. */
static void entry_points(void)
{
	struct stat st;
	struct stat64 st64;
	volatile int rdwr = O_RDWR; /* not a constant: fortified open() calls __open_2 */
	int fds[6];
	fds[0] = open64(DEV0, O_RDONLY);
	fds[1] = openat(AT_FDCWD, "/dev/blksnap-control", O_RDWR);
	fds[2] = openat64(AT_FDCWD, DEV1, O_RDONLY | O_CLOEXEC);
	fds[3] = __open_2("/dev/blksnap-control", O_RDWR);
	fds[4] = __openat_2(AT_FDCWD, DEV0, O_RDONLY);
	fds[5] = open(DEV1, rdwr);
	for (int i = 0; i < 6; i++) {
		CHECK(fds[i] >= 0 && fstat(fds[i], &st) == 0);
		CHECK(fstat64(fds[i], &st64) == 0 && st64.st_rdev == st.st_rdev);
	}
	CHECK(S_ISCHR(st64.st_mode) || S_ISBLK(st64.st_mode));
	CHECK((fcntl(fds[2], F_GETFD) & FD_CLOEXEC) != 0);
	CHECK((fcntl(fds[0], F_GETFD) & FD_CLOEXEC) == 0);
	CHECK(stat64(DEV0, &st64) == 0 && S_ISBLK(st64.st_mode));
	CHECK(lstat64(DEV0, &st64) == 0 && S_ISBLK(st64.st_mode));
	CHECK(fstatat64(AT_FDCWD, DEV0, &st64, 0) == 0 && S_ISBLK(st64.st_mode));
	CHECK(lstat(DEV1, &st) == 0 && S_ISBLK(st.st_mode));
	CHECK(faccessat(AT_FDCWD, DEV0, R_OK, 0) == 0);
	CHECK_ERR(access(DEV0, X_OK), EACCES);
#if defined(__x86_64__)
	CHECK(__xstat(1, DEV0, &st) == 0 && S_ISBLK(st.st_mode));
	CHECK(__fxstat(1, fds[1], &st) == 0 && S_ISCHR(st.st_mode));
#endif
	char buf[512];
	CHECK(pread64(fds[0], buf, sizeof buf, 0) == (ssize_t)sizeof buf);
	CHECK(lseek64(fds[0], 512, SEEK_SET) == 512 && read(fds[0], buf, sizeof buf) == 512);
	volatile size_t len = sizeof buf; /* not a constant: fortified read/pread call the _chk forms */
	CHECK(read(fds[0], buf, len) == 512 && pread(fds[0], buf, len, 0) == 512);
	CHECK(pread64(fds[0], buf, len, 0) == 512);
	CHECK_ERR(write(fds[0], buf, sizeof buf), EBADF); /* read-only */
	CHECK(pwrite64(fds[5], buf, sizeof buf, 512) == (ssize_t)sizeof buf);
	for (int i = 0; i < 6; i++)
		CHECK(close(fds[i]) == 0);
	CHECK_ERR(open(DEV0, O_RDONLY | O_DIRECTORY), ENOTDIR);
	CHECK_ERR(open(DEV0, O_RDWR | O_CREAT | O_EXCL, 0600), EEXIST);
	CHECK_ERR(open("/dev/blksnap-control", 3), EINVAL);
	int excl = open(DEV0, O_RDONLY | O_EXCL);
	CHECK(excl >= 0);
	CHECK_ERR(open(DEV0, O_RDONLY | O_EXCL), EBUSY);
	int again = open(DEV0, O_RDONLY); /* not exclusive: allowed */
	CHECK(again >= 0 && close(again) == 0 && close(excl) == 0);
	excl = open(DEV0, O_RDONLY | O_EXCL); /* released with its last descriptor */
	CHECK(excl >= 0 && close(excl) == 0);
}

static int client(void)
{
	const char *dir = getenv("BLKSNAP_TEST_DIR");
	if (!dir) {
		fprintf(stderr, "BLKSNAP_TEST_DIR not set\n");
		return 2;
	}
	/* Nothing below may touch a real device: only run if DEV0 is the served one (a real
	 * /dev/sdz is 65:160, and 8:240 is /dev/sdp). */
	struct stat probe;
	if (stat(DEV0, &probe) != 0 || !S_ISBLK(probe.st_mode) ||
	    probe.st_rdev != makedev(DEV0_MAJOR, DEV0_MINOR)) {
		fprintf(stderr, "preload_client[" PROFILE "]: " DEV0
			" is not served: is libblksnap-preload.so preloaded?\n");
		return 1;
	}
	unrelated_files(dir);

	/* Control device. */
	int control = open("/dev/blksnap-control", O_RDWR);
	CHECK(control >= 0);
	struct stat st;
	CHECK(fstat(control, &st) == 0 && S_ISCHR(st.st_mode) && major(st.st_rdev) == 10);
	CHECK(stat("/dev/blksnap-control", &st) == 0 && S_ISCHR(st.st_mode));
	struct blksnap_version ver;
	memset(&ver, 0, sizeof ver);
	CHECK(ioctl(control, IOCTL_BLKSNAP_VERSION, &ver) == 0);
	CHECK(ver.major == 2 && ver.minor == 0 && ver.revision == 0 && ver.build == 0);
	CHECK_ERR(ioctl(control, 0x5401 /* TCGETS */, &ver), ENOTTY);
	char c;
	CHECK_ERR(read(control, &c, 1), EINVAL);
	CHECK_ERR(lseek(control, 0, SEEK_SET), ESPIPE);

	/* Devices: O_DIRECT (as the upstream tools), and buffered by number. */
	int dev0 = open(DEV0, O_RDWR | O_DIRECT, 0600);
	CHECK(dev0 >= 0);
	CHECK(fstat(dev0, &st) == 0 && S_ISBLK(st.st_mode) &&
	      st.st_rdev == makedev(DEV0_MAJOR, DEV0_MINOR));
	CHECK(stat(DEV0, &st) == 0 && S_ISBLK(st.st_mode) &&
	      st.st_rdev == makedev(DEV0_MAJOR, DEV0_MINOR));
	CHECK(stat("/dev/block/8:240", &st) == 0 && S_ISBLK(st.st_mode));
	CHECK(fstatat(AT_FDCWD, "/dev//./sdz", &st, 0) == 0 && S_ISBLK(st.st_mode));
	CHECK(fstatat(dev0, "", &st, AT_EMPTY_PATH) == 0 && S_ISBLK(st.st_mode));
	struct statx sx;
	CHECK(statx(AT_FDCWD, DEV0, 0, STATX_BASIC_STATS, &sx) == 0 && S_ISBLK(sx.stx_mode) &&
	      sx.stx_rdev_major == DEV0_MAJOR && sx.stx_rdev_minor == DEV0_MINOR);
	CHECK(statx(dev0, "", AT_EMPTY_PATH, STATX_BASIC_STATS, &sx) == 0 && S_ISBLK(sx.stx_mode));
	CHECK(access(DEV0, R_OK | W_OK) == 0);
	CHECK((fcntl(dev0, F_GETFL) & (O_ACCMODE | O_DIRECT)) == (O_RDWR | O_DIRECT));
	unsigned long long size = 0;
	CHECK(ioctl(dev0, BLKGETSIZE64, &size) == 0 && size == DISK0_BYTES);
	unsigned long sectors = 0;
	CHECK(ioctl(dev0, BLKGETSIZE, &sectors) == 0 && sectors == DISK0_BYTES / 512);
	int ssz = 0, bsz = 0;
	unsigned int pbsz = 0;
	CHECK(ioctl(dev0, BLKSSZGET, &ssz) == 0 && ssz == 512);
	CHECK(ioctl(dev0, BLKBSZGET, &bsz) == 0 && bsz == 4096);
	CHECK(ioctl(dev0, BLKPBSZGET, &pbsz) == 0 && pbsz == 4096);
	CHECK(ioctl(dev0, BLKFLSBUF, 0) == 0);
	CHECK_ERR(ioctl(dev0, BLKGETSIZE64, NULL), EFAULT);
	CHECK_ERR(ioctl(dev0, IOCTL_BLKSNAP_VERSION, &ver), ENOTTY);

	unsigned char *orig0 = aligned_alloc_or_die(DISK0_BYTES);
	unsigned char *orig1 = aligned_alloc_or_die(DISK1_BYTES);
	unsigned char *buf = aligned_alloc_or_die(DISK0_BYTES + 4096);
	fill(orig0, DISK0_BYTES, 7);
	fill(orig1, DISK1_BYTES, 11);
	CHECK_ERR(pwrite(dev0, buf + 1, 4096, 0), EINVAL); /* O_DIRECT: misaligned buffer */
	CHECK_ERR(pwrite(dev0, buf, 100, 0), EINVAL);      /* length */
	CHECK_ERR(pread(dev0, buf, 4096, 100), EINVAL);    /* offset */
	CHECK(pwrite(dev0, orig0, DISK0_BYTES, 0) == DISK0_BYTES);
	CHECK(fsync(dev0) == 0);

	int dev1 = open(DEV1_BY_NUMBER, O_RDWR);
	CHECK(dev1 >= 0);
	CHECK(fstat(dev1, &st) == 0 && st.st_rdev == makedev(240, 1));
	CHECK(stat(DEV1, &st) == 0 && st.st_rdev == makedev(240, 1));
	CHECK(lseek(dev1, 0, SEEK_END) == DISK1_BYTES);
	CHECK_ERR(lseek(dev1, DISK1_BYTES + 1, SEEK_SET), EINVAL);
	CHECK(lseek(dev1, 0, SEEK_SET) == 0);
	CHECK(write(dev1, orig1, DISK1_BYTES) == DISK1_BYTES); /* buffered, at the position */
	CHECK(read(dev1, buf, 512) == 0);                      /* at the end */
	CHECK_ERR(write(dev1, buf, 512), ENOSPC);
	CHECK(pwrite(dev1, "hello", 5, 1000) == 5); /* unaligned: read-modify-write */
	memcpy(orig1 + 1000, "hello", 5);
	CHECK(pread(dev1, buf, 7, 999) == 7 && memcmp(buf, orig1 + 999, 7) == 0);
	CHECK(pread(dev1, buf, 4096, DISK1_BYTES - 100) == 100); /* short at the end */
	struct iovec iov[2] = { { buf, 300 }, { buf + 300, 212 } };
	CHECK(preadv(dev1, iov, 2, 4096) == 512 && memcmp(buf, orig1 + 4096, 512) == 0);
	CHECK(lseek(dev1, 8192, SEEK_SET) == 8192);
	CHECK(writev(dev1, iov, 2) == 512 && lseek(dev1, 0, SEEK_CUR) == 8192 + 512);
	memcpy(orig1 + 8192, orig1 + 4096, 512);
	CHECK(fdatasync(dev1) == 0);
	entry_points();
	CHECK(pread(dev1, buf, 512, 512) == 512);
	memcpy(orig1 + 512, buf, 512); /* entry_points() rewrote that sector */

	/* Attach the filter (EALREADY the second time; an unknown filter name is ENOENT). */
	CHECK(filter_attach(dev0) == 0);
	CHECK_ERR(filter_attach(dev0), EALREADY);
	CHECK(filter_attach(dev1) == 0);
	/* Tracked from now on: the CBT map at take marks block 0. */
	CHECK(pwrite(dev0, orig0, 4096, 0) == 4096);
	attach_t other;
	memset(&other, 0, sizeof other);
	set_name(other.name, "nosuchfilter");
	CHECK_ERR(ioctl(dev0, BLKFILTER_ATTACH, &other), ENOENT);

	/* Create the snapshot, add both devices, give it storage. */
	struct blksnap_uuid id;
	struct blksnap_snapshot_event *ev = aligned_alloc_or_die(sizeof *ev);
#ifdef IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE
	CHECK(ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_CREATE, &id) == 0);
	/* v3 queues low_free_space at create. */
	CHECK(wait_event(control, &id, 100, ev) == 0 && ev->code == EVENT_LOW_FREE_SPACE);
	CHECK_ERR(wait_event(control, &id, 10, ev), ENOENT);
	/* The storage: sectors of the filesystem's device, mapped to a file by the config. */
	char bdev[] = "/dev/block/8:1";
	struct blksnap_sectors range = { .offset = 0, .count = STORAGE_BYTES / 512 };
	struct blksnap_snapshot_append_storage app = {
		.id = id, .bdev_path = (__u8 *)bdev, .bdev_path_size = sizeof bdev,
		.count = 1, .ranges = &range,
	};
	CHECK(ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE, &app) == 0);
#else
	char storage[512];
	snprintf(storage, sizeof storage, "%s/diff_storage", dir);
	struct blksnap_snapshot_create create = {
		.diff_storage_limit_sect = STORAGE_BYTES / 512,
		.diff_storage_filename = (__u64)(uintptr_t)storage,
	};
	CHECK(ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_CREATE, &create) == 0);
	id = create.id;
	CHECK_ERR(wait_event(control, &id, 100, ev), ENOENT); /* newest: nothing at create */
#endif
	struct blksnap_snapshotadd add = { .id = id };
	CHECK(ctl(dev0, CTL_SNAPSHOTADD, &add, sizeof add) == 0);
	CHECK(ctl(dev1, CTL_SNAPSHOTADD, &add, sizeof add) == 0);
	CHECK_ERR(ctl(dev0, CTL_SNAPSHOTADD, &add, sizeof add), EALREADY);
	CHECK(ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_TAKE, &id) == 0);
	CHECK_ERR(ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_TAKE, &id), EALREADY);

	/* The image names, and the images as block devices. */
	struct blksnap_snapshotinfo info;
	memset(&info, 0, sizeof info);
	CHECK(ctl(dev0, CTL_SNAPSHOTINFO, &info, sizeof info) == 0 && info.error_code == 0);
	char want[64], image0[64], image1[64];
	snprintf(want, sizeof want, IMAGE_FMT, DEV0_MAJOR, DEV0_MINOR);
	CHECK(strcmp((char *)info.image, want) == 0);
	snprintf(image0, sizeof image0, "/dev/%s", (char *)info.image);
	memset(&info, 0, sizeof info);
	CHECK(ctl(dev1, CTL_SNAPSHOTINFO, &info, sizeof info) == 0);
	snprintf(image1, sizeof image1, "/dev/%s", (char *)info.image);
	CHECK(stat(image0, &st) == 0 && S_ISBLK(st.st_mode));
	char other_image[64];
	snprintf(other_image, sizeof other_image, OTHER_IMAGE_FMT, DEV0_MAJOR, DEV0_MINOR);
	CHECK_ERR(stat(other_image, &st), ENOENT); /* the other profile's name is not served */
	int img0 = open(image0, O_EXCL | O_RDWR | O_DIRECT); /* as the upstream C++ tests */
	CHECK(img0 >= 0);
	CHECK_ERR(open(image0, O_EXCL | O_RDONLY), EBUSY);
	int img1 = open(image1, O_RDONLY);
	CHECK(img1 >= 0);
	CHECK(ioctl(img0, BLKGETSIZE64, &size) == 0 && size == DISK0_BYTES);
	CHECK(ioctl(img1, BLKGETSIZE64, &size) == 0 && size == DISK1_BYTES);
	CHECK(fstat(img0, &st) == 0 && S_ISBLK(st.st_mode));
	/* An image is a block device with no filter: the kernel's errnos, not ENOTTY. */
	struct blksnap_cbtinfo image_cbt;
	CHECK_ERR(ctl(img1, CTL_CBTINFO, &image_cbt, sizeof image_cbt), ENOENT);
	CHECK_ERR(filter_detach(img1), ENOENT);
	CHECK_ERR(ioctl(img1, BLKFILTER_ATTACH, &other), ENOENT);
	CHECK_ERR(filter_attach(img1), EOPNOTSUPP); /* the engine tracks only what it serves */

	/* Write the devices; the images keep the content at take. */
	unsigned char *fresh = aligned_alloc_or_die(65536);
	fill(fresh, 65536, 99);
	CHECK(pwrite(dev0, fresh, 65536, 0) == 65536);
	CHECK(pwrite(dev0, fresh, 65536, 3 * MIB) == 65536);
	CHECK(pwrite(dev1, "changed", 7, 1000) == 7);
	CHECK(read_all(img0, buf, DISK0_BYTES) == DISK0_BYTES);
	CHECK(memcmp(buf, orig0, DISK0_BYTES) == 0);
	CHECK(pread(img1, buf, DISK1_BYTES, 0) == DISK1_BYTES);
	CHECK(memcmp(buf, orig1, DISK1_BYTES) == 0);
	CHECK(pread(dev0, buf, 65536, 3 * MIB) == 65536 && memcmp(buf, fresh, 65536) == 0);
	CHECK(pread(dev1, buf, 7, 1000) == 7 && memcmp(buf, "changed", 7) == 0);
	/* Images are writable; the device does not see it. */
	CHECK(pwrite(img0, fresh, 4096, MIB) == 4096);
	CHECK(pread(img0, buf, 4096, MIB) == 4096 && memcmp(buf, fresh, 4096) == 0);
	CHECK(pread(dev0, buf, 4096, MIB) == 4096 && memcmp(buf, orig0 + MIB, 4096) == 0);
	CHECK_ERR(pwrite(img1, "x", 1, 0), EBADF); /* opened read-only */

	/* Threads: 4 writers rewrite regions of the device (buffered descriptor) while 4 readers
	 * read the same regions of the image; the image must not change. */
	int dev0b = open(DEV0, O_RDWR);
	CHECK(dev0b >= 0);
	struct worker workers[8];
	pthread_t threads[8];
	for (unsigned i = 0; i < 8; i++) {
		workers[i] = (struct worker){ .fd = i < 4 ? dev0b : img0, .index = 8 + i % 4,
					      .expect = orig0, .ok = 0 };
		CHECK(pthread_create(&threads[i], NULL, i < 4 ? writer : reader, &workers[i]) == 0);
	}
	for (unsigned i = 0; i < 8; i++) {
		CHECK(pthread_join(threads[i], NULL) == 0);
		CHECK(workers[i].ok);
	}
	CHECK(close(dev0b) == 0);
	CHECK(pread(img0, buf, 4 * REGION, 8 * REGION) == (ssize_t)(4 * REGION) &&
	      memcmp(buf, orig0 + 8 * REGION, 4 * REGION) == 0);
	CHECK(pread(dev0, buf, REGION, 11 * REGION) == (ssize_t)REGION && buf[0] == 0x40 + 3 + 11);

	/* CBT. */
	struct blksnap_cbtinfo cbt;
	memset(&cbt, 0, sizeof cbt);
	CHECK(ctl(dev0, CTL_CBTINFO, &cbt, sizeof cbt) == 0 && cbt.device_capacity == DISK0_BYTES);
	CHECK(cbt.block_count > 0 && cbt.changes_number == 1);
	unsigned char *map = calloc(cbt.block_count, 1);
	struct blksnap_cbtmap m = { .offset = 0, .length = cbt.block_count, .buffer = USER_PTR(map) };
	CHECK(ctl(dev0, CTL_CBTMAP, &m, sizeof m) == 0 && map[0] == 1);
	CHECK(cbt.block_count < 2 || map[1] == 0);
	struct blksnap_sectors dirty = { .offset = 0, .count = 8 };
	struct blksnap_cbtdirty dm = { .count = 1, .dirty_sectors = USER_PTR(&dirty) };
	CHECK(ctl(dev0, CTL_CBTDIRTY, &dm, sizeof dm) == 0);
	CHECK_ERR(ctl(dev0, 5, &dm, sizeof dm), ENOTTY);

	/* COLLECT: the count, then the ids. */
	struct blksnap_snapshot_collect col = { .count = 0 };
	CHECK(ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_COLLECT, &col) == 0 && col.count == 1);
	struct blksnap_uuid ids[2];
	col.count = 2;
	col.ids = USER_PTR(ids);
	CHECK(ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_COLLECT, &col) == 0 && col.count == 1);
	CHECK(memcmp(&ids[0], &id, sizeof id) == 0);

	/* WAIT_EVENT: drain (v3 may report low free space; newest no_space, as the 8 MiB limit is
	 * below the growth step), then a timeout is ENOENT. */
	int rc = 0;
	for (int i = 0; i < 16 && rc == 0; i++) {
		rc = wait_event(control, &id, 10, ev);
#ifdef IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE
		CHECK(rc != 0 || ev->code == EVENT_LOW_FREE_SPACE);
#else
		CHECK(rc != 0 || ev->code == blksnap_event_code_no_space);
#endif
	}
	CHECK(rc == -1 && errno == ENOENT);

	/* Served descriptors: dup/dup2/F_DUPFD share the object and the position; fork. */
	int d = dup(dev0);
	CHECK(d >= 0 && ioctl(d, BLKGETSIZE64, &size) == 0 && size == DISK0_BYTES);
	CHECK(lseek(dev0, 4096, SEEK_SET) == 4096 && lseek(d, 0, SEEK_CUR) == 4096);
	int d2 = dup2(dev0, 100);
	CHECK(d2 == 100 && fstat(d2, &st) == 0 && S_ISBLK(st.st_mode));
	int d3 = fcntl(dev0, F_DUPFD_CLOEXEC, 200);
	CHECK(d3 >= 200 && pread(d3, buf, 4096, 0) == 4096 && memcmp(buf, fresh, 4096) == 0);
	CHECK((fcntl(d3, F_GETFD) & FD_CLOEXEC) != 0);
	CHECK(close(d) == 0 && close(d2) == 0);
	CHECK(ioctl(d3, BLKGETSIZE64, &size) == 0);
	CHECK(dup2(control, d3) == d3 && ioctl(d3, IOCTL_BLKSNAP_VERSION, &ver) == 0);
	CHECK(close(d3) == 0);
	CHECK_ERR(ioctl(d3, BLKGETSIZE64, &size), EBADF);
	fflush(NULL);
	pid_t pid = fork();
	if (pid == 0) {
		/* The child has the same descriptors and engine state. */
		int ok = pread(img1, buf, DISK1_BYTES, 0) == DISK1_BYTES &&
			 memcmp(buf, orig1, DISK1_BYTES) == 0 && close(img1) == 0;
		free(orig0);
		free(orig1);
		free(buf);
		free(fresh);
		free(map);
		free(ev);
		exit(ok ? 0 : 1);
	}
	int status = -1;
	CHECK(pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) &&
	      WEXITSTATUS(status) == 0);
	CHECK(pread(img1, buf, 512, 0) == 512); /* the child's close did not close ours */

	/* Destroy: the images go away (open descriptors read as an empty disk). */
	CHECK(ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_DESTROY, &id) == 0);
	CHECK_ERR(ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_DESTROY, &id), ENODEV);
	CHECK_ERR(ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_TAKE, &id), ESRCH);
	CHECK_ERR(stat(image0, &st), ENOENT);
	CHECK_ERR(open(image0, O_RDONLY), ENOENT);
	CHECK(ioctl(img1, BLKGETSIZE64, &size) == 0 && size == 0);
	CHECK(pread(img1, buf, 512, 0) == 0);
	CHECK(close(img0) == 0 && close(img1) == 0);

	/* Detach (ENOENT the second time); the devices keep their data. */
	CHECK(filter_detach(dev0) == 0);
	CHECK_ERR(filter_detach(dev0), ENOENT);
	CHECK(filter_detach(dev1) == 0);
	CHECK(pread(dev0, buf, 65536, 0) == 65536 && memcmp(buf, fresh, 65536) == 0);
	CHECK(close(dev0) == 0 && close(dev1) == 0 && close(control) == 0);
	CHECK_ERR(ioctl(control, IOCTL_BLKSNAP_VERSION, &ver), EBADF);
	CHECK_ERR(close(dev0), EBADF);

	unrelated_files(dir); /* still fine after all of it */
	free(orig0);
	free(orig1);
	free(buf);
	free(fresh);
	free(map);
	free(ev);
	if (failures) {
		fprintf(stderr, "preload_client[" PROFILE "]: %d check(s) failed\n", failures);
		return 1;
	}
	printf("preload_client[" PROFILE "]: upstream-style lifecycle under LD_PRELOAD OK\n");
	return 0;
}

static void make_file(const char *path, size_t bytes)
{
	int fd = open(path, O_CREAT | O_RDWR | O_TRUNC, 0600);
	if (fd < 0 || ftruncate(fd, (off_t)bytes) != 0) {
		perror(path);
		exit(2);
	}
	close(fd);
}

/* Makes the backing files, runs the client in a child with the configuration, cleans up. */
static int launcher(char *self)
{
	char dir[] = "/tmp/blksnap-preload-XXXXXX";
	if (!mkdtemp(dir)) {
		perror("mkdtemp");
		return 2;
	}
	char disk0[256], disk1[256], storage[256], config[1024];
	snprintf(disk0, sizeof disk0, "%s/disk0.img", dir);
	snprintf(disk1, sizeof disk1, "%s/disk1.img", dir);
	snprintf(storage, sizeof storage, "%s/storage.img", dir);
	make_file(disk0, DISK0_BYTES);
	make_file(disk1, DISK1_BYTES);
	make_file(storage, STORAGE_BYTES);
	char diff_storage[256];
	snprintf(diff_storage, sizeof diff_storage, "%s/diff_storage", dir);
	make_file(diff_storage, 0); /* newest: CREATE's storage file (grows up to the limit) */
	snprintf(config, sizeof config,
		 DEV0 "=%s@%u:%u;" DEV1 "=%s;storage:/dev/block/8:1=%s", disk0, DEV0_MAJOR,
		 DEV0_MINOR, disk1, storage);
	setenv("BLKSNAP_CONFIG", config, 1);
	setenv("BLKSNAP_PROFILE", PROFILE, 1);
	setenv("BLKSNAP_TEST_DIR", dir, 1);
	pid_t pid = fork();
	if (pid == 0) {
		char *args[] = { self, NULL };
		execv(self, args);
		perror("execv");
		_exit(2);
	}
	int status = -1;
	if (pid < 0 || waitpid(pid, &status, 0) != pid)
		status = -1;
	char path[256];
	const char *files[] = { "disk0.img", "disk1.img", "storage.img", "diff_storage" };
	for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
		snprintf(path, sizeof path, "%s/%s", dir, files[i]);
		unlink(path);
	}
	rmdir(dir);
	if (!WIFEXITED(status)) {
		fprintf(stderr, "preload_client[" PROFILE "]: client died (status %d)\n", status);
		return 1;
	}
	return WEXITSTATUS(status);
}

int main(int argc, char **argv)
{
	(void)argc;
	if (!getenv("BLKSNAP_CONFIG"))
		return launcher(argv[0]);
	return client();
}
