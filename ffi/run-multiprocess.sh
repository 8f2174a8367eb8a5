#!/usr/bin/env bash
# The upstream console tool's workflow, one process per step, on a host WITHOUT the ublk driver:
# blksnapd --frontend none holds the one engine (trackers, snapshots, images), and every step is
# a new process of the project's own upstream-style C client (tests-c/multiproc_step.c, nothing
# but open/ioctl/pread/pwrite/stat) under the LD_PRELOAD shim in client mode; data of the served
# device and of the image reaches the daemon over its socket (protocol v3 data requests).
#
# For each profile (v3, newest): attach; write before the take; a pre-take copy (dd under the
# shim); create; add; take; writes to the origin after the take (the C client and dd, separate
# processes); the image read by dd in another process, byte-identical to the pre-take copy;
# cbtinfo in every process shows one generation; cbtmap shows the blocks written before the
# take, and after a second take the blocks written after the first; the kernel's errnos of every
# filter request on an image, on a device with no filter and naming another filter; destroy;
# detach. How the device is named, three passes:
#   v3/config:     /dev/sdz, which BLKSNAP_CONFIG maps to the backing file the daemon serves,
#                  added beforehand with `blksnap device add FILE --no-attach`;
#   newest/config: the same name, the device added by the shim at the first open and kept
#                  because it is attached by then;
#   newest/daemon: no BLKSNAP_CONFIG: the name `blksnap device add FILE --no-attach` printed
#                  (/dev/null-blksnap-MAJ-MIN), served by the shim because the daemon has no
#                  block device for it.
# Also measures dd's read throughput of the image over the socket against the backing file.
#
# Usage: ffi/run-multiprocess.sh            (CI stage ffi-multiprocess; builds what it needs)
set -euo pipefail
cd "$(dirname "$0")/.."

# BLKSNAP_MP_RELEASE=1: release builds (for the throughput numbers); CI uses the shared debug ones.
if [ "${BLKSNAP_MP_RELEASE:-0}" = 1 ]; then
  cargo build -q --release -p blksnap-service --bin blksnapd --bin blksnap
  cargo build -q --release -p blksnap-preload
  BIN=${CARGO_TARGET_DIR:-target}/release
else
  cargo build -q -p blksnap-service --bin blksnapd --bin blksnap
  cargo build -q -p blksnap-preload
  BIN=${CARGO_TARGET_DIR:-target}/debug
fi
SHIM=$PWD/$BIN/libblksnap_preload.so
T=$(mktemp -d /tmp/blksnap-multiproc.XXXXXX)
DAEMON_PID=
cleanup() {
  if [ -n "$DAEMON_PID" ]; then kill -TERM "$DAEMON_PID" 2>/dev/null || true; wait "$DAEMON_PID" || true; fi
  rm -rf "$T"
}
trap cleanup EXIT
CC=${CC:-gcc}
for p in v3 newest; do
  "$CC" -std=c11 -Wall -Wextra -Werror -O1 -I "include/$p" -o "$T/step-$p" ffi/tests-c/multiproc_step.c
done

SOCK=$T/run/control
"$BIN/blksnapd" --frontend none --socket "$SOCK" --state-dir "$T/state" --link-dir "$T" \
  2>"$T/daemon.log" &
DAEMON_PID=$!
for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
[ -S "$SOCK" ] || { cat "$T/daemon.log"; echo "blksnapd did not start"; exit 1; }
cli() { "$BIN/blksnap" --socket "$SOCK" "$@"; }
fail() { echo "FAIL [$P]: $*"; echo "--- daemon log"; cat "$T/daemon.log"; exit 1; }
now_ns() { date +%s%N; }
mbps() { echo $(( $1 / ( ($3 - $2) / 1000 + 1 ) )); } # bytes start_ns end_ns -> MB/s (bytes/us)

DISK_MIB=64
for PASS in v3/config newest/config newest/daemon; do
  P=${PASS%/*} NAMING=${PASS#*/}
  echo "--- profile $P, devices named by the $NAMING"
  DISK=$T/${PASS/\//-}-disk.img OTHER=$T/${PASS/\//-}-other.img STORE=$T/${PASS/\//-}-diff.img
  head -c $((DISK_MIB << 20)) /dev/urandom >"$DISK"
  truncate -s 8M "$OTHER"
  truncate -s 32M "$STORE"
  if [ "$NAMING" = config ]; then
    DEV=/dev/sdz DEV2=/dev/sdy CFG="/dev/sdz=$DISK@8:240;/dev/sdy=$OTHER@8:241"
    if [ "$P" = v3 ]; then
      cli device add "$DISK" --no-attach >/dev/null || fail "device add"
    fi
  else
    CFG=
    DEV=$(cli device add "$DISK" --no-attach) || fail "device add"
    DEV2=$(cli device add "$OTHER" --no-attach) || fail "device add"
    echo "blksnap device add: $DEV, $DEV2"
  fi
  shim() { env LD_PRELOAD="$SHIM" BLKSNAP_SOCKET="$SOCK" BLKSNAP_PROFILE="$P" BLKSNAP_CONFIG="$CFG" "$@"; }
  step() { shim "$T/step-$P" "$@" || fail "step $*"; }

  step attach "$DEV"
  cli device list | grep -q "$DISK" || fail "the daemon does not serve $DISK after the attach process exited"
  INFO=$(step cbtinfo "$DEV")
  read -r GEN0 CH0 _ <<<"$INFO"
  step write "$DEV" 0 65536 0xaa                      # before the take: block 0
  shim dd if="$DEV" of="$T/pre.img" bs=1M iflag=direct status=none || fail "dd pre-take copy"
  cmp -s "$T/pre.img" "$DISK" || fail "the pre-take copy read through the daemon is not the backing"
  [ "$(head -c 65536 "$T/pre.img" | tr -d '\252' | wc -c)" = 0 ] || fail "block 0 not written"

  ID=$(step create "$STORE" $((32 << 20)))
  step add "$ID" "$DEV"
  step take "$ID"
  IMG=$(step image "$DEV")
  echo "snapshot $ID, image $IMG"
  step write "$DEV" $((4 << 20)) 65536 0x55          # after the take, from other processes
  shim dd if=/dev/zero of="$DEV" bs=64K count=1 seek=128 conv=notrunc oflag=direct status=none \
    || fail "dd write to the origin"
  cmp -s "$T/pre.img" "$DISK" && fail "the origin did not change"

  t0=$(now_ns)
  shim dd if="$IMG" of="$T/image.out" bs=1M iflag=direct status=none || fail "dd of the image"
  t1=$(now_ns)
  cmp "$T/image.out" "$T/pre.img" || fail "the image read by dd is not the pre-take copy"
  echo "image read by dd in another process: byte-identical to the pre-take copy"
  t2=$(now_ns)
  dd if="$DISK" of=/dev/null bs=1M status=none
  t3=$(now_ns)
  shim dd if="$IMG" of=/dev/null bs=1M iflag=direct status=none
  t4=$(now_ns)
  img_mbps=$(mbps $((DISK_MIB << 20)) "$t3" "$t4") file_mbps=$(mbps $((DISK_MIB << 20)) "$t2" "$t3")
  echo "read throughput, dd bs=1M of $DISK_MIB MiB: image over the socket $img_mbps MB/s" \
    "(first pass $(mbps $((DISK_MIB << 20)) "$t0" "$t1") MB/s), backing file $file_mbps MB/s (page cache)"

  INFO=$(step cbtinfo "$DEV")
  read -r GEN1 CH1 BLOCKS BS <<<"$INFO"
  [ -n "$GEN0" ] && [ "$GEN1" = "$GEN0" ] || fail "generation changed across processes: $GEN0 -> $GEN1"
  [ "${CH1#changes=}" = $(( ${CH0#changes=} + 1 )) ] || fail "the take did not count: $CH0 -> $CH1"
  BS=${BS#block_size=}
  MAP1=$(step cbtmap "$DEV")
  echo "after take 1: $GEN1 $CH1 $BLOCKS, map: $(echo "$MAP1" | tr '\n' ' ')"
  echo "$MAP1" | grep -q '^0 ' || fail "block 0, written before the take, is not in the map"
  echo "$MAP1" | grep -q "^$(( (4 << 20) / BS )) " && fail "a block written after the take is in the first map"

  step errnos "$DEV2" "$IMG"
  echo "filter errnos on an image, a device with no filter, another filter's name: as the kernel"

  # A second snapshot: the blocks written after the first take come up with the next number.
  ID2_STORE=$T/$P-diff2.img
  truncate -s 32M "$ID2_STORE"
  step destroy "$ID"
  shim dd if="$IMG" of=/dev/null bs=1M count=1 status=none 2>/dev/null && fail "the image outlived destroy"
  ID2=$(step create "$ID2_STORE" $((32 << 20)))
  step add "$ID2" "$DEV"
  step take "$ID2"
  INFO=$(step cbtinfo "$DEV")
  read -r GEN2 _ <<<"$INFO"
  [ "$GEN2" = "$GEN0" ] || fail "generation changed at the second take"
  MAP2=$(step cbtmap "$DEV")
  v0=$(echo "$MAP2" | awk '$1 == 0 {print $2}')
  v4=$(echo "$MAP2" | awk -v b=$(( (4 << 20) / BS )) '$1 == b {print $2}')
  v8=$(echo "$MAP2" | awk -v b=$(( (8 << 20) / BS )) '$1 == b {print $2}')
  [ -n "$v4" ] && [ -n "$v8" ] && [ "$v4" -gt "$v0" ] && [ "$v8" = "$v4" ] ||
    fail "after take 2: blocks written after take 1 not marked newer (block0=$v0 4M=$v4 8M=$v8)"
  echo "after take 2: block 0 = $v0, the blocks written after take 1 = $v4"
  step destroy "$ID2"
  step detach "$DEV"
  shim "$T/step-$P" cbtinfo "$DEV" >/dev/null 2>&1 && fail "cbtinfo after detach"
  NUM=$(cli device list | awk -v d="$DISK" '$NF == d {print $1}')
  [ -n "$NUM" ] || fail "the device is not served any more"
  cli device remove "$NUM" || fail "device remove"
  if [ "$NAMING" = config ]; then
    cli device list | grep -q "$OTHER" && fail "the shim left $OTHER served (it never stayed attached)"
  else
    cli device remove "$DEV2" || fail "device remove $DEV2"
  fi
  echo "$PASS: ok"
done
kill -TERM "$DAEMON_PID"; wait "$DAEMON_PID" || fail "blksnapd exit status"
DAEMON_PID=
echo "multi-process workflow: ok (both profiles, both namings)"
