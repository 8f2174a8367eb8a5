#!/usr/bin/env bash
# Builds libblksnap and runs the C-side checks; exits non-zero on any failure.
#  1. abi_check.c: _Static_assert on every sizeof/offsetof/enum/request code of both profiles,
#     -std=c11 -Wall -Werror -fsyntax-only, natively and with -m32 (needs gcc-multilib);
#     the headers also compile as C++ (g++ -fsyntax-only).
#  2. exported symbols of libblksnap.so: only blksnap_*.
#  3. the C (v3) and C++ (newest) lifecycle clients, linked against the shared library and run
#     under valgrind memcheck (zero errors, no leaks), then linked against the static library.
# Options: --no-valgrind (run the shared-library clients directly).
set -euo pipefail
cd "$(dirname "$0")/.."
VALGRIND=1
[ "${1:-}" = "--no-valgrind" ] && VALGRIND=0

cargo build -p blksnap-ffi
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
echo "--- all C tests passed"
