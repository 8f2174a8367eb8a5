#!/usr/bin/env bash
# Builds libblksnap and runs the C-side checks; exits non-zero on any failure.
#  1. abi_check.c: _Static_assert on every sizeof/offsetof/enum/request code of both profiles,
#     -std=c11 -Wall -Werror -fsyntax-only, natively and with -m32 (needs gcc-multilib);
#     the headers also compile as C++ (g++ -fsyntax-only).
#  2. exported symbols of libblksnap.so: only blksnap_*.
#  3. the C (v3) and C++ (newest) lifecycle clients, linked against the shared library and run
#     under valgrind memcheck (zero errors, no leaks), then linked against the static library.
#  4. the README example.
#  5. the LD_PRELOAD shim (libblksnap-preload.so): its exports and soname, then
#     tests-c/preload_client.c -- an upstream-style client using only open/ioctl/pread/pwrite/stat
#     on /dev/... paths -- built against each profile's headers, plain (-O0) and fortified
#     (-O2 -D_FORTIFY_SOURCE=2, so the __open_2/__read_chk/__pread_chk entry points are used),
#     run under LD_PRELOAD (valgrind memcheck, following its fork+exec); and without the shim it
#     must fail (nothing is served by accident); stat, blockdev and dd on a served device.
#     (tests-c/preload_daemon.c, the shim in front of blksnapd, is only compiled here: it runs in
#     the VM, service/vm/run-tests.sh.)
# Options: --no-valgrind (run the shared-library clients and the shim tests directly).
set -euo pipefail
cd "$(dirname "$0")/.."
VALGRIND=1
[ "${1:-}" = "--no-valgrind" ] && VALGRIND=0

cargo build -p blksnap-ffi -p blksnap-preload
LIBDIR=${CARGO_TARGET_DIR:-target}/debug
OUT=$(mktemp -d /tmp/blksnap-c-tests.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
CC=${CC:-gcc}
CXX=${CXX:-g++}

echo "--- abi_check.c (static asserts)"
for arch in "" -m32; do
  for profile in v3 newest; do
    defs=""
    [ "$profile" = newest ] && defs=-DBLKSNAP_ABI_NEWEST
    "$CC" -std=c11 -Wall -Wextra -Werror -fsyntax-only $arch -I "include/$profile" $defs \
      ffi/tests-c/abi_check.c
    echo "abi_check $profile ${arch:-native}: ok"
  done
  for profile in v3 newest; do
    printf '#include <linux/blksnap.h>\n#include <linux/blk-filter.h>\n#include <blksnap/libblksnap.h>\n' |
      "$CXX" -std=c++11 -Wall -Werror -fsyntax-only $arch -I "include/$profile" -I include -x c++ -
    echo "headers as C++ $profile ${arch:-native}: ok"
  done
  # The daemon-mode shim client runs only in the VM (scenario preload-daemon); compiled here too.
  # So does the one-step-per-process client of ffi/run-multiprocess.sh (CI stage ffi-multiprocess).
  for profile in v3 newest; do
    for client in preload_daemon.c multiproc_step.c; do
      "$CC" -std=c11 -Wall -Wextra -Werror -fsyntax-only $arch -I "include/$profile" \
        "ffi/tests-c/$client"
    done
  done
  echo "preload_daemon.c, multiproc_step.c ${arch:-native}: compile"
done

echo "--- exported symbols"
bad=$(nm -D --defined-only "$LIBDIR/libblksnap.so" | awk '{print $3}' | grep -v '^blksnap_' || true)
if [ -n "$bad" ]; then echo "unexpected exports: $bad"; exit 1; fi
echo "exports: $(nm -D --defined-only "$LIBDIR/libblksnap.so" | wc -l) symbols, all blksnap_*"

echo "--- clients"
"$CC" -std=c11 -Wall -Wextra -Werror -g -I include/v3 -I include \
  -o "$OUT/client_v3" ffi/tests-c/client_v3.c -L "$LIBDIR" -lblksnap
"$CXX" -std=c++17 -Wall -Wextra -Werror -g -I include/newest -I include \
  -o "$OUT/client_newest" ffi/tests-c/client_newest.cpp -L "$LIBDIR" -lblksnap
"$CC" -std=c11 -Wall -Wextra -Werror -g -I include/v3 -I include \
  -o "$OUT/client_v3_static" ffi/tests-c/client_v3.c "$LIBDIR/libblksnap.a" -lpthread -ldl -lm
"$CXX" -std=c++17 -Wall -Wextra -Werror -g -I include/newest -I include \
  -o "$OUT/client_newest_static" ffi/tests-c/client_newest.cpp "$LIBDIR/libblksnap.a" -lpthread -ldl -lm
for client in client_v3 client_newest; do
  if [ "$VALGRIND" = 1 ]; then
    LD_LIBRARY_PATH="$LIBDIR" valgrind -q --error-exitcode=1 --leak-check=full \
      --errors-for-leak-kinds=definite,possible "$OUT/$client"
    echo "$client (shared, valgrind): ok"
  else
    LD_LIBRARY_PATH="$LIBDIR" "$OUT/$client"
  fi
  "$OUT/${client}_static"
  echo "${client} (static): ok"
done
echo "--- README example"
# The README's "Using libblksnap from C" block must be exactly ffi/tests-c/readme_example.c.
awk '/<!-- readme_example.c -->/{f=1; next} f && /^```c$/{g=1; next} g && /^```$/{exit} g' README.md |
  diff -u ffi/tests-c/readme_example.c - || { echo "README example differs from the file"; exit 1; }
"$CC" -std=c11 -Wall -Wextra -Werror -I include/newest -I include \
  -o "$OUT/readme_example" ffi/tests-c/readme_example.c -L "$LIBDIR" -lblksnap
LD_LIBRARY_PATH="$LIBDIR" "$OUT/readme_example"

echo "--- LD_PRELOAD shim"
# Cargo names the artifact libblksnap_preload.so; its soname and installed name use a hyphen.
SHIM="$OUT/libblksnap-preload.so"
cp "$LIBDIR/libblksnap_preload.so" "$SHIM"
soname=$(readelf -d "$SHIM" | sed -n 's/.*Library soname: \[\(.*\)\]/\1/p')
[ "$soname" = libblksnap-preload.so ] || { echo "shim soname: '$soname'"; exit 1; }
hooks='open open64 openat openat64 __open_2 __open64_2 __openat_2 __openat64_2 creat creat64
  close close_range closefrom dup dup2 dup3 fcntl fcntl64 ioctl read write pread pread64 pwrite
  pwrite64 readv writev preadv preadv64 pwritev pwritev64 __read_chk __pread_chk __pread64_chk
  lseek lseek64 fsync fdatasync sync stat stat64 lstat lstat64 fstat fstat64 fstatat fstatat64
  __xstat __xstat64 __lxstat __lxstat64 __fxstat __fxstat64 __fxstatat __fxstatat64 statx access
  faccessat'
exports=$(nm -D --defined-only "$SHIM" | awk '{print $3}' | grep -v '^blksnap_' | sort)
if [ "$exports" != "$(echo $hooks | tr ' ' '\n' | sort)" ]; then
  echo "shim exports differ from the hook list:"
  diff <(echo $hooks | tr ' ' '\n' | sort) <(echo "$exports") || true
  exit 1
fi
echo "shim: soname $soname, $(echo $hooks | wc -w) libc hooks (+ the blksnap_* API)"
for profile in v3 newest; do
  for variant in plain fortified; do
    flags="-O0 -g"
    [ "$variant" = fortified ] && flags="-O2 -g -D_FORTIFY_SOURCE=2"
    bin="$OUT/preload_${profile}_$variant"
    # shellcheck disable=SC2086
    "$CC" -std=c11 -Wall -Wextra -Werror -pthread $flags -I "include/$profile" -o "$bin" \
      ffi/tests-c/preload_client.c
    if [ "$VALGRIND" = 1 ]; then
      LD_PRELOAD="$SHIM" valgrind -q --trace-children=yes --error-exitcode=1 --leak-check=full \
        --errors-for-leak-kinds=definite,possible "$bin"
      echo "preload_client $profile $variant (valgrind): ok"
    else
      LD_PRELOAD="$SHIM" "$bin"
    fi
  done
  if "$OUT/preload_${profile}_plain" >/dev/null 2>&1; then
    echo "preload_client $profile passed without the shim"
    exit 1
  fi
  echo "preload_client $profile without the shim: fails, as it must"
done
# Off-the-shelf binaries (coreutils, util-linux) see a served device as a block device.
img="$OUT/tools.img"
truncate -s 4M "$img"
tools() { BLKSNAP_CONFIG="/dev/blksnap-tools0=$img@7:5" LD_PRELOAD="$SHIM" "$@"; }
[ "$(tools stat -c '%F %t:%T' /dev/blksnap-tools0)" = "block special file 7:5" ]
[ "$(tools blockdev --getsize64 --getss --getbsz /dev/block/7:5 | tr '\n' ' ')" = "4194304 512 4096 " ]
head -c 1048576 /dev/urandom > "$OUT/tools.data"
tools dd if="$OUT/tools.data" of=/dev/blksnap-tools0 bs=64k oflag=direct status=none
tools dd if=/dev/blksnap-tools0 of="$OUT/tools.back" bs=1M count=1 iflag=direct status=none
cmp "$OUT/tools.data" "$OUT/tools.back" && cmp -n 1048576 "$OUT/tools.data" "$img"
echo "stat, blockdev, dd (O_DIRECT) on a served device: ok"
echo "--- all C tests passed"
