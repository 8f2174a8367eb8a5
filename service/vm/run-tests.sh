#!/usr/bin/env bash
# service/vm/run-tests.sh — build the static test binaries and run the VM scenarios
# (README.md, "VM tests"). Arguments are passed to blksnap-vmtest (scenario names, --timeout).
#   BLKSNAP_VM_TARGET_DIR  cargo target directory for the static build (default target/vm)
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET_DIR=${BLKSNAP_VM_TARGET_DIR:-target/vm}
TRIPLE=x86_64-unknown-linux-gnu
# Static binaries run in the busybox guest as they are. RUSTFLAGS with --target apply to the
# target's crates only, not to build scripts (libublk's bindgen runs on the host).
RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=$TARGET_DIR \
  cargo build --release -p blksnap-service --features ublk --target "$TRIPLE" \
  --bin blksnap-vmtest --bin blksnapd --bin blksnap
BIN=$TARGET_DIR/$TRIPLE/release
# The C/C++ lifecycle clients of ffi/tests-c, unchanged, linked statically with libblksnap.a
# (scenario c-clients runs them in client mode against blksnapd).
CLIENTS=()
if command -v gcc >/dev/null && command -v g++ >/dev/null; then
  RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=$TARGET_DIR \
    cargo build --release -p blksnap-ffi --target "$TRIPLE" --lib
  build_client() { # compiler std profile source output
    # (glibc's "statically linked applications" linker notes are expected; shown on failure)
    "$1" -static -std="$2" -Wall -Wextra -O1 -I "include/$3" -I include -o "$5" "$4" \
      "$BIN/libblksnap.a" -lpthread -ldl -lm > "$5.log" 2>&1 || { cat "$5.log" >&2; exit 1; }
  }
  build_client gcc c11 v3 ffi/tests-c/client_v3.c "$BIN/client_v3"
  build_client g++ c++17 newest ffi/tests-c/client_newest.cpp "$BIN/client_newest"
  CLIENTS=("$BIN/client_v3" "$BIN/client_newest")
  # The LD_PRELOAD shim (a shared object: built for the host, not crt-static) and the
  # upstream-style raw-ioctl client it serves, linked dynamically (scenario preload-daemon; the
  # VM harness copies their loader and libc into the guest).
  CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -p blksnap-preload
  cp "$TARGET_DIR/release/libblksnap_preload.so" "$BIN/libblksnap-preload.so"
  for p in v3 newest; do
    gcc -std=c11 -Wall -Wextra -Werror -O1 -I "include/$p" -o "$BIN/preload_daemon_$p" \
      ffi/tests-c/preload_daemon.c
    CLIENTS+=("$BIN/preload_daemon_$p")
  done
  CLIENTS+=("$BIN/libblksnap-preload.so")
else
  echo "run-tests.sh: gcc/g++ missing: scenario c-clients will fail (apt-get install gcc g++)" >&2
fi
# The host's mke2fs (dynamically linked: the VM harness copies its libraries) makes the ext4 of
# scenario take-freezes; busybox's mke2fs makes ext2 only. Without it that scenario uses ext2.
if MKE2FS=$(command -v mke2fs); then
  CLIENTS+=("$MKE2FS")
else
  echo "run-tests.sh: mke2fs missing on the host: take-freezes uses ext2 (apt-get install e2fsprogs)" >&2
fi
# The host's fio (dynamically linked, its libraries copied too) drives scenario datapath's
# benchmark and its verify run; without it that scenario fails (apt-get install fio).
if FIO=$(command -v fio); then
  CLIENTS+=("$FIO")
else
  echo "run-tests.sh: fio missing on the host: scenario datapath will fail (apt-get install fio)" >&2
fi
exec service/vm/ublk-vm.sh --timeout "${BLKSNAP_VM_TIMEOUT:-900}" "$BIN/blksnap-vmtest" \
  "$BIN/blksnapd" "$BIN/blksnap" "${CLIENTS[@]}" -- --require-ublk "$@"
