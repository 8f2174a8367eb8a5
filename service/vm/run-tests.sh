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
  --bin blksnap-vmtest --bin blksnapd
BIN=$TARGET_DIR/$TRIPLE/release
exec service/vm/ublk-vm.sh --timeout "${BLKSNAP_VM_TIMEOUT:-900}" "$BIN/blksnap-vmtest" \
  "$BIN/blksnapd" -- --require-ublk "$@"
