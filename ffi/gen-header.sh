#!/usr/bin/env bash
# Regenerates include/blksnap/libblksnap.h with the pinned cbindgen (0.29.4).
# --verify: exit non-zero if the committed header differs from what cbindgen generates.
set -euo pipefail
cd "$(dirname "$0")"
want="cbindgen 0.29.4"
have=$(cbindgen --version 2>/dev/null || true)
if [ "$have" != "$want" ]; then
  echo "gen-header.sh: need $want (have: ${have:-none}); cargo install cbindgen --version 0.29.4 --locked" >&2
  exit 2
fi
out=../include/blksnap/libblksnap.h
args=(-q --config cbindgen.toml --crate blksnap-ffi --output "$out")
[ "${1:-}" = "--verify" ] && args+=(--verify)
# The uapi modules of both profiles define the same constant names; they are excluded from the
# header, but cbindgen still reports the clash while loading. Hide only those lines.
log=$(mktemp)
status=0
cbindgen "${args[@]}" 2>"$log" || status=$?
grep -v 'Conflicting name for constant' "$log" >&2 || true
rm -f "$log"
if [ "$status" -ne 0 ] && [ "${1:-}" = "--verify" ]; then
  echo "gen-header.sh: include/blksnap/libblksnap.h is stale: run ffi/gen-header.sh and commit" >&2
fi
exit "$status"
