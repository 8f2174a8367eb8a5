// A newest-profile (lk6.15) backup client in C++, written the upstream way (upstream structs and
// request codes from <linux/blksnap.h> and <linux/blk-filter.h>), driving libblksnap through a
// whole lifecycle: attach (by fd), create with a storage directory and a limit, add, take, write
// the origin, read the image and compare, cbtinfo/cbtmap/cbtdirty, wait_event timeout,
// no_space, overflow -> corrupted, destroy. Run under valgrind by run-c-tests.sh.
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include <linux/blk-filter.h>
#include <linux/blksnap.h>
#include <blksnap/libblksnap.h>

namespace {

constexpr std::size_t kDiskBytes = 8u << 20;
constexpr std::uint64_t kLimitSectors = 4096;  // 2 MiB of difference storage at most
const char *const kDev = "/dev/blksnap-test1";

int failures = 0;

void check(bool ok, const char *what, int line) {
  if (!ok) {
    std::fprintf(stderr, "client_newest.cpp:%d: check failed: %s\n", line, what);
    ++failures;
  }
}

void check_rc(long rc, long want, const char *what, int line) {
  if (rc != want) {
    std::fprintf(stderr, "client_newest.cpp:%d: %s = %ld (%s), want %ld\n", line, what, rc,
                 blksnap_strerror(static_cast<int>(rc)), want);
    ++failures;
  }
}

#define CHECK(c) check((c), #c, __LINE__)
#define CHECK_RC(e, w) check_rc(static_cast<long>(e), static_cast<long>(w), #e, __LINE__)

std::vector<unsigned char> pattern(std::size_t len, unsigned seed) {
  std::vector<unsigned char> v(len);
  for (std::size_t i = 0; i < len; ++i) v[i] = static_cast<unsigned char>(i * 17u + seed);
  return v;
}

// One control handle and one open fd of the original device.
class Session {
 public:
  Session(int handle, int device_fd) : h_(handle), fd_(device_fd) {}

  int ctl(unsigned cmd, void *opt, unsigned optlen) const {
    blkfilter_ctl c{};
    std::memcpy(c.name, "blksnap", 7);
    c.cmd = cmd;
    c.optlen = optlen;
    c.opt = reinterpret_cast<std::uintptr_t>(opt);
    return blksnap_filter_ioctl_fd(h_, fd_, BLKFILTER_CTL, &c);
  }

  int wait(const blksnap_uuid &id, unsigned timeout_ms, blksnap_snapshot_event &ev) const {
    std::memset(&ev, 0xAB, sizeof ev);
    ev.id = id;
    ev.timeout_ms = timeout_ms;
    return blksnap_ctl_ioctl(h_, IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT, &ev);
  }

  int h() const { return h_; }
  int fd() const { return fd_; }

 private:
  int h_;
  int fd_;
};

int create(int h, const std::string &path, std::uint64_t limit, blksnap_uuid *id) {
  blksnap_snapshot_create c{};
  c.diff_storage_limit_sect = limit;
  c.diff_storage_filename = reinterpret_cast<std::uintptr_t>(path.c_str());
  int rc = blksnap_ctl_ioctl(h, IOCTL_BLKSNAP_SNAPSHOT_CREATE, &c);
  if (rc == 0) *id = c.id;
  return rc;
}

}  // namespace

int main() {
  char dir_template[] = "/tmp/blksnap-cpp-newest-XXXXXX";
  if (!mkdtemp(dir_template)) return 2;
  const std::string dir = dir_template;
  const std::string disk = dir + "/disk1.img";
  const std::string big = dir + "/big-storage.img";
  for (const auto &[path, bytes] : {std::pair{disk, kDiskBytes}, std::pair{big, std::size_t{4u << 20}}}) {
    int fd = open(path.c_str(), O_CREAT | O_RDWR | O_TRUNC, 0600);
    if (fd < 0 || ftruncate(fd, static_cast<off_t>(bytes)) != 0) return 2;
    close(fd);
  }
  const std::string config = std::string(kDev) + "=" + disk + "@7:1";
  const int h = blksnap_ctl_open(BLKSNAP_PROFILE_NEWEST, config.c_str());
  CHECK(h > 0);
  const int dev_fd = open(disk.c_str(), O_RDONLY);  // the device, named by an open fd
  CHECK(dev_fd >= 0);
  Session s(h, dev_fd);

  blksnap_version ver{};
  CHECK_RC(blksnap_ctl_ioctl(h, IOCTL_BLKSNAP_VERSION, &ver), 0);
  CHECK(ver.major == 2 && ver.minor == 0);

  blkfilter_attach att{};
  std::memcpy(att.name, "blksnap", 7);
  CHECK_RC(blksnap_filter_ioctl_fd(h, dev_fd, BLKFILTER_ATTACH, &att), 0);
  CHECK_RC(blksnap_filter_ioctl_fd(h, dev_fd, BLKFILTER_ATTACH, &att), -EALREADY);

  const auto orig = pattern(kDiskBytes, 3);
  CHECK_RC(blksnap_dev_pwrite(h, kDev, orig.data(), orig.size(), 0), kDiskBytes);

  // CREATE errors: missing path, not a file/dir/block device, already over the limit.
  blksnap_uuid id{};
  CHECK_RC(create(h, dir + "/missing", kLimitSectors, &id), -ENOENT);
  CHECK_RC(create(h, "/dev/null", kLimitSectors, &id), -EINVAL);
  CHECK_RC(create(h, big, 1024, &id), -ENOSPC);
  blksnap_snapshot_create null_name{};
  CHECK_RC(blksnap_ctl_ioctl(h, IOCTL_BLKSNAP_SNAPSHOT_CREATE, &null_name), -EFAULT);

  // Create with a directory: an unnamed temporary file in it, at most kLimitSectors.
  CHECK_RC(create(h, dir, kLimitSectors, &id), 0);
  blksnap_snapshotadd add{};
  add.id = id;
  CHECK_RC(s.ctl(BLKFILTER_CTL_BLKSNAP_SNAPSHOTADD, &add, sizeof add), 0);
  CHECK_RC(s.ctl(BLKFILTER_CTL_BLKSNAP_SNAPSHOTADD, &add, sizeof add), -EALREADY);

  auto *ev = new blksnap_snapshot_event;
  CHECK_RC(s.wait(id, 10, *ev), -ENOENT);  // newest: no event at create

  CHECK_RC(blksnap_ctl_ioctl(h, IOCTL_BLKSNAP_SNAPSHOT_TAKE, &id), 0);
  CHECK_RC(s.ctl(BLKFILTER_CTL_BLKSNAP_SNAPSHOTADD, &add, sizeof add), -EALREADY);

  blksnap_snapshotinfo info{};
  std::memset(&info, 0x5A, sizeof info);
  CHECK_RC(s.ctl(BLKFILTER_CTL_BLKSNAP_SNAPSHOTINFO, &info, sizeof info), 0);
  CHECK(info.error_code == 0);
  CHECK(std::strcmp(reinterpret_cast<char *>(info.image), "blksnap-7-1") == 0);
  CHECK(info.image[sizeof info.image - 1] == 0);
  const std::string image = std::string("/dev/") + reinterpret_cast<char *>(info.image);
  std::uint64_t image_size = 0;
  CHECK_RC(blksnap_dev_size(h, image.c_str(), &image_size), 0);
  CHECK(image_size == kDiskBytes);

  // Write the origin; the image keeps the content at take.
  const auto fresh = pattern(65536, 77);
  CHECK_RC(blksnap_dev_pwrite(h, kDev, fresh.data(), fresh.size(), 1 << 20), 65536);
  std::vector<unsigned char> buf(kDiskBytes);
  CHECK_RC(blksnap_image_pread(h, image.c_str(), buf.data(), buf.size(), 0), kDiskBytes);
  CHECK(buf == orig);
  CHECK_RC(blksnap_dev_pread(h, kDev, buf.data(), 65536, 1 << 20), 65536);
  CHECK(std::memcmp(buf.data(), fresh.data(), 65536) == 0);

  // The first copy-on-write reached the limit: one no_space event.
  CHECK_RC(s.wait(id, 100, *ev), 0);
  CHECK(ev->code == blksnap_event_code_no_space);
  blksnap_event_no_space ns{};
  std::memcpy(&ns, ev->data, sizeof ns);
  CHECK(ns.requested_nr_sect == kLimitSectors);
  CHECK(ev->time_label > 0);
  CHECK_RC(s.wait(id, 0, *ev), -ENOENT);  // timeout 0 polls

  // CBT.
  blksnap_cbtinfo cbt{};
  CHECK_RC(s.ctl(BLKFILTER_CTL_BLKSNAP_CBTINFO, &cbt, sizeof cbt), 0);
  CHECK(cbt.device_capacity == kDiskBytes && cbt.changes_number == 1);
  std::vector<unsigned char> map(cbt.block_count);
  blksnap_cbtmap m{};
  m.offset = 0;
  m.length = cbt.block_count;
  m.buffer = reinterpret_cast<std::uintptr_t>(map.data());
  CHECK_RC(s.ctl(BLKFILTER_CTL_BLKSNAP_CBTMAP, &m, sizeof m), 0);
  CHECK(map.front() == 1 && map.back() == 1);
  m.length = cbt.block_count + 1;  // newest: out of range is ENODATA, not clamped
  CHECK_RC(s.ctl(BLKFILTER_CTL_BLKSNAP_CBTMAP, &m, sizeof m), -ENODATA);
  blksnap_sectors ranges[2] = {{0, 8}, {1024, 16}};
  blksnap_cbtdirty d{};
  d.count = 2;
  d.dirty_sectors = reinterpret_cast<std::uintptr_t>(ranges);
  CHECK_RC(s.ctl(BLKFILTER_CTL_BLKSNAP_CBTDIRTY, &d, sizeof d), 0);
  blksnap_sectors beyond = {kDiskBytes / 512, 8};
  d.count = 1;
  d.dirty_sectors = reinterpret_cast<std::uintptr_t>(&beyond);
  CHECK_RC(s.ctl(BLKFILTER_CTL_BLKSNAP_CBTDIRTY, &d, sizeof d), -EINVAL);

  // Overflow: rewrite everything; the 2 MiB storage cannot hold 8 MiB of pre-images.
  const auto over = pattern(kDiskBytes, 150);
  CHECK_RC(blksnap_dev_pwrite(h, kDev, over.data(), over.size(), 0), kDiskBytes);
  CHECK_RC(s.wait(id, 100, *ev), 0);
  CHECK(ev->code == blksnap_event_code_corrupted);
  blksnap_event_corrupted c{};
  std::memcpy(&c, ev->data, sizeof c);
  CHECK(c.dev_id_mj == 7 && c.dev_id_mn == 1 && c.err_code == ENOSPC);
  CHECK_RC(s.ctl(BLKFILTER_CTL_BLKSNAP_SNAPSHOTINFO, &info, sizeof info), 0);
  CHECK(info.error_code == -ENOSPC);
  CHECK_RC(blksnap_image_pread(h, image.c_str(), buf.data(), 4096, 0), -EIO);

  // COLLECT with too small an array: partial fill and ENODATA.
  blksnap_uuid id2{};
  CHECK_RC(create(h, dir, kLimitSectors, &id2), 0);
  blksnap_uuid ids[1];
  blksnap_snapshot_collect col{};
  col.count = 1;
  col.ids = reinterpret_cast<std::uintptr_t>(ids);
  CHECK_RC(blksnap_ctl_ioctl(h, IOCTL_BLKSNAP_SNAPSHOT_COLLECT, &col), -ENODATA);
  CHECK(col.count == 1 && std::memcmp(&ids[0], &id, sizeof id) == 0);

  // Destroy both; detach with a wrong name first.
  CHECK_RC(blksnap_ctl_ioctl(h, IOCTL_BLKSNAP_SNAPSHOT_DESTROY, &id), 0);
  CHECK_RC(blksnap_ctl_ioctl(h, IOCTL_BLKSNAP_SNAPSHOT_DESTROY, &id2), 0);
  CHECK_RC(s.wait(id, 0, *ev), -ESRCH);
  blkfilter_detach det{};
  std::memcpy(det.name, "other", 5);
  CHECK_RC(blksnap_filter_ioctl_fd(h, dev_fd, BLKFILTER_DETACH, &det), -EINVAL);
  std::memcpy(det.name, "blksnap", 7);
  CHECK_RC(blksnap_filter_ioctl_fd(h, dev_fd, BLKFILTER_DETACH, &det), 0);
  CHECK_RC(s.ctl(BLKFILTER_CTL_BLKSNAP_CBTINFO, &cbt, sizeof cbt), -ENOENT);

  // The v3 codes mean nothing here.
  CHECK_RC(blksnap_ctl_ioctl(h, 0x40105601u /* v3 CREATE */, &id), -ENOTTY);

  delete ev;
  close(dev_fd);
  CHECK_RC(blksnap_ctl_close(h), 0);
  CHECK_RC(blksnap_ctl_close(h), -9);
  unlink(disk.c_str());
  unlink(big.c_str());
  rmdir(dir.c_str());
  if (failures != 0) {
    std::fprintf(stderr, "client_newest: %d check(s) failed\n", failures);
    return 1;
  }
  std::printf("client_newest: lifecycle OK (libblksnap %s)\n", blksnap_lib_version());
  return 0;
}
