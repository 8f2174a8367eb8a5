/* Snapshot a device served by libblksnap and read the snapshot image (profile "newest").
 * Build: cc -std=c11 -I include/newest -I include example.c -L target/debug -lblksnap */
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

#define DEV "/dev/vdb"
#define MIB (1u << 20)

static int ctl(int h, unsigned cmd, void *opt, unsigned len)
{
	struct blkfilter_ctl c = { .name = "blksnap", .cmd = cmd, .optlen = len,
				   .opt = (uintptr_t)opt };
	return blksnap_filter_ioctl(h, DEV, BLKFILTER_CTL, &c);
}

int main(void)
{
	/* A 4 MiB file plays the block device /dev/vdb (MAJ:MIN 252:16). */
	char dir[] = "/tmp/blksnap-example-XXXXXX", disk[64], config[128];
	if (!mkdtemp(dir))
		return 1;
	snprintf(disk, sizeof disk, "%s/vdb.img", dir);
	int fd = open(disk, O_CREAT | O_RDWR, 0600);
	if (fd < 0 || ftruncate(fd, 4 * MIB) != 0)
		return 1;
	close(fd);
	snprintf(config, sizeof config, DEV "=%s@252:16", disk);

	int h = blksnap_ctl_open(BLKSNAP_PROFILE_NEWEST, config);
	if (h < 0) {
		fprintf(stderr, "open: %s\n", blksnap_strerror(h));
		return 1;
	}
	struct blkfilter_attach attach = { .name = "blksnap" };
	int rc = blksnap_filter_ioctl(h, DEV, BLKFILTER_ATTACH, &attach);

	/* Difference storage: an unnamed file in `dir`, at most 1 MiB (2048 sectors). */
	struct blksnap_snapshot_create create = { .diff_storage_limit_sect = 2048,
						  .diff_storage_filename = (uintptr_t)dir };
	if (rc == 0)
		rc = blksnap_ctl_ioctl(h, IOCTL_BLKSNAP_SNAPSHOT_CREATE, &create);
	struct blksnap_snapshotadd add = { .id = create.id };
	if (rc == 0)
		rc = ctl(h, BLKFILTER_CTL_BLKSNAP_SNAPSHOTADD, &add, sizeof add);
	if (rc == 0)
		rc = blksnap_ctl_ioctl(h, IOCTL_BLKSNAP_SNAPSHOT_TAKE, &create.id);
	struct blksnap_snapshotinfo info;
	if (rc == 0)
		rc = ctl(h, BLKFILTER_CTL_BLKSNAP_SNAPSHOTINFO, &info, sizeof info);
	if (rc != 0) {
		fprintf(stderr, "snapshot: %s\n", blksnap_strerror(rc));
		return 1;
	}

	/* Overwrite the device; the image keeps the content at take (zeroes). */
	static unsigned char block[4096], image_block[4096];
	memset(block, 0xA5, sizeof block);
	char image[64];
	snprintf(image, sizeof image, "/dev/%s", (char *)info.image);
	if (blksnap_dev_pwrite(h, DEV, block, sizeof block, 0) != sizeof block ||
	    blksnap_image_pread(h, image, image_block, sizeof image_block, 0) != sizeof image_block)
		return 1;
	printf("%s: first byte %#x on the device, %#x in the snapshot\n", image, block[0],
	       image_block[0]);

	blksnap_ctl_ioctl(h, IOCTL_BLKSNAP_SNAPSHOT_DESTROY, &create.id);
	struct blkfilter_detach detach = { .name = "blksnap" };
	blksnap_filter_ioctl(h, DEV, BLKFILTER_DETACH, &detach);
	blksnap_ctl_close(h);
	unlink(disk);
	rmdir(dir);
	return image_block[0] == 0 ? 0 : 1;
}
