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
sync -f "$DIR/image"        # the image durable first: neither timed run pays its writeback
cat "$DIR/image" >/dev/null # warm the page cache for both readers
now() { date +%s.%N; }
rate() { awk -v b=$((SIZE_MIB << 20)) -v s="$1" 'BEGIN { printf "%.1f MB/s (%.3f s)", b / 1e6 / s, s }'; }

# `sync FILE` is fsync of that file only, as the backup's own fsync of its point. Writeback makes
# single runs swing by 3x here, so cp and backup alternate (order swapped each round) for ROUNDS
# rounds, `sync -f` between runs, and the medians are reported.
ROUNDS=${ROUNDS:-5}
run_cp() { cp "$DIR/image" "$DIR/copy"; sync "$DIR/copy"; }
run_backup() { "$BIN" backup --full --image "$DIR/image" --target "$DIR/backup" >/dev/null; }
timed() { # command -> seconds
  local t0 t1
  t0=$(now); "$@"; t1=$(now)
  awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }'
}
cps=(); bks=()
for r in $(seq 1 "$ROUNDS"); do
  for which in $( ((r % 2)) && echo "cp backup" || echo "backup cp"); do
    rm -rf "$DIR/copy" "$DIR/backup"
    sync -f "$DIR/image"
    if [ "$which" = cp ]; then cps+=("$(timed run_cp)"); else bks+=("$(timed run_backup)"); fi
  done
done
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
cp_s=$(median "${cps[@]}")
bk_s=$(median "${bks[@]}")

t0=$(now); "$BIN" verify --image "$DIR/image" --target "$DIR/backup" >/dev/null; t1=$(now)
vf_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')

echo "image           ${SIZE_MIB} MiB of random data in $DIR ($(df -T "$DIR" | awk 'NR==2 {print $2}'))"
echo "cp              $(rate "$cp_s")   (cp + fsync of the copy; median of $ROUNDS)"
echo "blksnap backup  $(rate "$bk_s")   (--full, fsync of the point; median of $ROUNDS)"
echo "backup / cp     $(awk -v c="$cp_s" -v b="$bk_s" 'BEGIN { printf "%.2fx", c / b }') (throughput ratio)"
echo "blksnap verify  $(rate "$vf_s")   (reads image and backup)"
