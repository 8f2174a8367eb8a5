#!/usr/bin/env bash
# Packaging check (CI stage ffi-package): stages an install of libblksnap into a temporary
# DESTDIR, then builds C programs against it with nothing but pkg-config and runs them:
#   - readme_example.c (newest) with `pkg-config --cflags --libs blksnap` (dynamic: NEEDED
#     libblksnap.so.0, run with the staged libdir), and statically against libblksnap.a with
#     `pkg-config --static --libs blksnap`;
#   - client_v3.c with the staged v3 headers (-I$includedir/blksnap/v3 before the .pc's flags);
#   - preload_client.c (newest, upstream style) under LD_PRELOAD of the staged
#     libblksnap-preload.so.
# Staging: `cargo cinstall` (cargo-c) if it is installed, else ffi/cinstall.sh (the same tree).
# Options: --cargo-c (require cargo-c), --script (use ffi/cinstall.sh even if cargo-c is there),
#          --compare (stage with both, require identical trees, .pc files and sonames, then test
#          the cargo-c one); --have-cargo-c (only report: exit 0 iff cargo-c >= 0.10 is there).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=auto
case ${1:-} in
  --cargo-c) MODE=cargo-c ;;
  --script) MODE=script ;;
  --compare) MODE=compare ;;
  --have-cargo-c) MODE=have ;;
  "") ;;
  *) echo "usage: $0 [--cargo-c|--script|--compare|--have-cargo-c]" >&2; exit 2 ;;
esac
# cargo-c >= 0.10 (Debian's 0.9.14 cannot read this workspace: ffi/README.md "Packaging").
have_cargo_c() {
  local v
  v=$(cargo cinstall --version 2>/dev/null | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -1) || return 1
  [ -n "$v" ] && [ "$(printf '%s\n' 0.10.0 "$v" | sort -V | head -1)" = 0.10.0 ]
}
if [ "$MODE" = have ]; then
  have_cargo_c
  exit
fi
if [ "$MODE" = auto ]; then
  if have_cargo_c; then MODE=cargo-c; else MODE=script; fi
fi
if [ "$MODE" != script ] && ! have_cargo_c; then
  echo "cargo-c >= 0.10 is not installed (cargo install cargo-c --version 0.10.24 --locked)" >&2
  exit 1
fi

PREFIX=/usr/local
LIBDIR=lib
HOST=$(rustc -vV | sed -n 's/^host: //p')
VERSION=$(cargo pkgid -p blksnap-ffi | sed 's/.*[#@]//')
WORK=$(mktemp -d /tmp/blksnap-package.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
CC=${CC:-gcc}

stage_cargo_c() { # destdir
  cargo cinstall -p blksnap-ffi --release --destdir "$1" --prefix "$PREFIX" --libdir "$LIBDIR"
  # cargo-c packages libraries with capi metadata only; the shim is installed beside it.
  cargo build -p blksnap-preload --release --target "$HOST"
  install -m 755 "${CARGO_TARGET_DIR:-target}/$HOST/release/libblksnap_preload.so" \
    "$1$PREFIX/$LIBDIR/libblksnap-preload.so"
}
stage_script() { # destdir
  ffi/cinstall.sh --destdir "$1" --prefix "$PREFIX" --libdir "$LIBDIR" --shim
}

# What an install consists of: every path (type, symlink target), every text file's content,
# every shared object's soname.
describe() { # root
  (cd "$1" && find . -printf '%y %p %l\n' | sort)
  find "$1" -type f \( -name '*.h' -o -name '*.pc' \) | sort | while read -r f; do
    echo "== ${f#"$1"}"; cat "$f"
  done
  find "$1" -type f -name '*.so*' | sort | while read -r f; do
    echo "== ${f#"$1"} soname: $(readelf -d "$f" | sed -n 's/.*soname: \[\(.*\)\]/\1/p')"
  done
}

case $MODE in
  cargo-c) stage_cargo_c "$WORK/stage" ;;
  script) stage_script "$WORK/stage" ;;
  compare)
    stage_script "$WORK/script"
    stage_cargo_c "$WORK/stage"
    if ! diff -u <(describe "$WORK/script") <(describe "$WORK/stage"); then
      echo "ffi/cinstall.sh and cargo cinstall stage different trees" >&2
      exit 1
    fi
    echo "ffi/cinstall.sh and cargo cinstall stage the same tree"
    ;;
esac
echo "staged with: $([ "$MODE" = script ] && echo ffi/cinstall.sh || cargo cinstall --version)"

DEST=$WORK/stage
LIB=$DEST$PREFIX/$LIBDIR
soname=$(readelf -d "$LIB/libblksnap.so.$VERSION" | sed -n 's/.*soname: \[\(.*\)\]/\1/p')
[ "$soname" = libblksnap.so.0 ] || { echo "soname $soname, want libblksnap.so.0"; exit 1; }
[ "$(readlink "$LIB/libblksnap.so.0")" = "libblksnap.so.$VERSION" ]
[ "$(readlink "$LIB/libblksnap.so")" = "libblksnap.so.$VERSION" ]

export PKG_CONFIG_PATH=$LIB/pkgconfig PKG_CONFIG_SYSROOT_DIR=$DEST
[ "$(pkg-config --modversion blksnap)" = "$VERSION" ]
echo "pkg-config --cflags --libs blksnap: $(pkg-config --cflags --libs blksnap)"

# shellcheck disable=SC2046
"$CC" -std=c11 -Wall -Wextra -Werror -o "$WORK/example" ffi/tests-c/readme_example.c \
  $(pkg-config --cflags --libs blksnap)
readelf -d "$WORK/example" | grep -q 'NEEDED.*\[libblksnap.so.0\]' ||
  { echo "example does not need libblksnap.so.0"; exit 1; }
LD_LIBRARY_PATH=$LIB "$WORK/example"
echo "readme_example (pkg-config, shared): ok"

# shellcheck disable=SC2046
"$CC" -std=c11 -Wall -Wextra -Werror -o "$WORK/example_static" ffi/tests-c/readme_example.c \
  $(pkg-config --cflags blksnap) \
  $(pkg-config --static --libs blksnap | sed "s|-lblksnap\b|$LIB/libblksnap.a|")
if readelf -d "$WORK/example_static" | grep -q 'NEEDED.*libblksnap'; then
  echo "static example still needs libblksnap.so"; exit 1
fi
"$WORK/example_static"
echo "readme_example (pkg-config --static, libblksnap.a): ok"

# pkgconf applies the sysroot to --variable, freedesktop pkg-config does not.
INCLUDEDIR=$(pkg-config --variable=includedir blksnap)
case $INCLUDEDIR in "$DEST"/*) ;; *) INCLUDEDIR=$DEST$INCLUDEDIR ;; esac
# shellcheck disable=SC2046
"$CC" -std=c11 -Wall -Wextra -Werror -o "$WORK/client_v3" ffi/tests-c/client_v3.c \
  -I "$INCLUDEDIR/blksnap/v3" $(pkg-config --cflags --libs blksnap)
LD_LIBRARY_PATH=$LIB "$WORK/client_v3"
echo "client_v3 (staged v3 headers): ok"

"$CC" -std=c11 -Wall -Wextra -Werror -pthread -o "$WORK/preload_client" ffi/tests-c/preload_client.c \
  -I "$INCLUDEDIR/blksnap/newest"
LD_PRELOAD=$LIB/libblksnap-preload.so "$WORK/preload_client"
echo "preload_client (staged libblksnap-preload.so): ok"
echo "--- packaging checks passed"
