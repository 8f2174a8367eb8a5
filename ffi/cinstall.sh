#!/usr/bin/env bash
# Stages libblksnap the way `cargo cinstall` does with ffi/Cargo.toml's [package.metadata.capi],
# for hosts without cargo-c (building cargo-c takes minutes; Debian's 0.9.14 package cannot read
# this workspace: ffi/README.md "Packaging"). The result is the same tree, file for file
# (checked against cargo-c 0.10.24 by ffi/package-test.sh --compare):
#
#   $prefix/$libdir/libblksnap.so.X.Y.Z, libblksnap.so.X -> it (the soname), libblksnap.so -> it
#   $prefix/$libdir/libblksnap.a
#   $prefix/$libdir/pkgconfig/blksnap.pc           (Cflags: -I${includedir}/blksnap)
#   $prefix/include/blksnap/blksnap/libblksnap.h
#   $prefix/include/blksnap/linux/{blksnap,blk-filter}.h          (default profile: newest)
#   $prefix/include/blksnap/{newest,v3}/linux/{blksnap,blk-filter}.h
#
# Usage: ffi/cinstall.sh --destdir DIR [--prefix /usr/local] [--libdir lib] [--shim]
#   --shim  also install the LD_PRELOAD shim as $prefix/$libdir/libblksnap-preload.so (cargo-c
#           does not package it; ffi/package-test.sh adds it the same way after cargo cinstall).
# Builds with `cargo rustc --release --target <host>` into target/<host>/release, as cargo-c.
set -euo pipefail
cd "$(dirname "$0")/.."

DESTDIR="" PREFIX=/usr/local LIBDIR=lib SHIM=0
while [ $# -gt 0 ]; do
  case $1 in
    --destdir) DESTDIR=$2; shift 2 ;;
    --prefix) PREFIX=$2; shift 2 ;;
    --libdir) LIBDIR=$2; shift 2 ;;
    --shim) SHIM=1; shift ;;
    *) echo "usage: $0 --destdir DIR [--prefix P] [--libdir L] [--shim]" >&2; exit 2 ;;
  esac
done
[ -n "$DESTDIR" ] || { echo "--destdir is required" >&2; exit 2; }

# The values of [package.metadata.capi] this script reproduces; fail if they changed.
for want in 'name = "blksnap"' 'version_suffix_components = 1' 'name = "libblksnap"' \
  'subdirectory = "blksnap/blksnap"' 'generation = false' 'filename = "blksnap"' \
  'strip_include_path_components = 1'; do
  grep -qxF "$want" ffi/Cargo.toml ||
    { echo "ffi/Cargo.toml capi metadata changed ($want): update $0" >&2; exit 1; }
done

HOST=$(rustc -vV | sed -n 's/^host: //p')
VERSION=$(cargo pkgid -p blksnap-ffi | sed 's/.*[#@]//')
MAJOR=${VERSION%%.*}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
OUT=$TARGET_DIR/$HOST/release

cargo rustc -p blksnap-ffi --lib --release --target "$HOST" --crate-type cdylib,staticlib -- \
  -C "link-arg=-Wl,-soname,libblksnap.so.$MAJOR"
if [ "$SHIM" = 1 ]; then
  cargo build -p blksnap-preload --release --target "$HOST"
fi
# Libs.private: what a static libblksnap needs (rustc's native-static-libs of a std staticlib;
# libblksnap links no native library of its own).
probe=$(mktemp -d)
native=$(echo '' | rustc --crate-type staticlib --crate-name probe --print native-static-libs \
  -o "$probe/libprobe.a" - 2>&1 | sed -n 's/.*native-static-libs: //p')
rm -rf "$probe"

root=$DESTDIR$PREFIX
lib=$root/$LIBDIR
inc=$root/include
install -d "$lib/pkgconfig" "$inc/blksnap/blksnap" "$inc/blksnap/linux" \
  "$inc/blksnap/newest/linux" "$inc/blksnap/v3/linux"
install -m 755 "$OUT/libblksnap.so" "$lib/libblksnap.so.$VERSION"
ln -sf "libblksnap.so.$VERSION" "$lib/libblksnap.so.$MAJOR"
ln -sf "libblksnap.so.$VERSION" "$lib/libblksnap.so"
install -m 644 "$OUT/libblksnap.a" "$lib/libblksnap.a"
install -m 644 include/blksnap/libblksnap.h "$inc/blksnap/blksnap/"
install -m 644 include/newest/linux/*.h "$inc/blksnap/linux/"
install -m 644 include/newest/linux/*.h "$inc/blksnap/newest/linux/"
install -m 644 include/v3/linux/*.h "$inc/blksnap/v3/linux/"
if [ "$SHIM" = 1 ]; then
  install -m 755 "$OUT/libblksnap_preload.so" "$lib/libblksnap-preload.so"
fi

description=$(sed -n 's/^description = "\(libblksnap: .*\)"$/\1/p' ffi/Cargo.toml)
case $LIBDIR in /*) libdir_pc=$LIBDIR ;; *) libdir_pc="\${prefix}/$LIBDIR" ;; esac  # as cargo-c with --libdir
cat > "$lib/pkgconfig/blksnap.pc" <<EOF
prefix=$PREFIX
exec_prefix=\${prefix}
libdir=$libdir_pc
includedir=\${prefix}/include

Name: blksnap
Description: $description
Version: $VERSION
Libs: -L\${libdir} -lblksnap
Cflags: -I\${includedir}/blksnap
Libs.private: $native
EOF
echo "staged libblksnap $VERSION (soname libblksnap.so.$MAJOR) in $DESTDIR$PREFIX"
