#!/usr/bin/env bash
# Backup throughput against plain `cp` of the same image, in one run.
#   service/bench-backup.sh [SIZE_MIB]     (default 1024)
# Builds the release `blksnap`, writes an image of random data, then times `cp` and
# `blksnap backup --full` (file to file, same page cache state: each reads the image once
# after a warm-up read), and `blksnap verify`. Prints MB/s for each.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
cargo build --release -q -p blksnap-service --bin blksnap
BIN=$PWD/target/release/blksnap
DIR=$(mktemp -d "${TMPDIR:-/tmp}/blksnap-bench.XXXXXX")
trap 'rm -rf "$DIR"' EXIT
head -c $((SIZE_MIB << 20)) /dev/urandom >"$DIR/image"
cat "$DIR/image" >/dev/null # warm the page cache for both readers
now() { date +%s.%N; }
rate() { awk -v b=$((SIZE_MIB << 20)) -v s="$1" 'BEGIN { printf "%.1f MB/s (%.3f s)", b / 1e6 / s, s }'; }

t0=$(now); cp "$DIR/image" "$DIR/copy"; sync -f "$DIR/copy"; t1=$(now)
cp_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
rm -f "$DIR/copy"

t0=$(now); "$BIN" backup --full --image "$DIR/image" --target "$DIR/backup" >/dev/null; t1=$(now)
bk_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')

t0=$(now); "$BIN" verify --image "$DIR/image" --target "$DIR/backup" >/dev/null; t1=$(now)
vf_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')

echo "image           ${SIZE_MIB} MiB of random data in $DIR ($(df -T "$DIR" | awk 'NR==2 {print $2}'))"
echo "cp              $(rate "$cp_s")   (cp + sync of the copy)"
echo "blksnap backup  $(rate "$bk_s")   (--full, fsync of the point)"
echo "blksnap verify  $(rate "$vf_s")   (reads image and backup)"
