#!/usr/bin/env bash
# NBD exports of blksnapd on the host, no kernel module needed (blksnapd --frontend none, a
# regular-file origin), checked with Debian's own NBD clients and with `blksnap backup`:
#   1. `qemu-img convert` and `nbdcopy` of an image (Unix socket and TCP+TLS) equal the copy of
#      the origin made just before the take;
#   2. `nbdinfo --map=qemu:dirty-bitmap:blksnap-GEN-since-N` lists exactly the CBT blocks the
#      script wrote (through the writable origin export, with `qemu-io`) since the previous
#      snapshot, and a stale generation is refused;
#   3. a chain full -> 3 incrementals pulled by `blksnap backup` over TCP+TLS (client
#      certificates) restores byte-identical, every point;
#   4. a destroy during a pull ends the client with an error, and blksnapd keeps serving;
#   5. throughput of a full pull vs `nbdcopy` from `qemu-nbd` exporting the same file, side by
#      side (TCP+TLS and Unix socket).
#   service/nbd-tests.sh            (NBD_TEST_SIZE_MIB=256 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${NBD_TEST_SIZE_MIB:-256}

need=()
{ command -v nbdcopy && command -v nbdinfo; } >/dev/null || need+=(libnbd-bin)
{ command -v qemu-img && command -v qemu-io && command -v qemu-nbd; } >/dev/null || need+=(qemu-utils)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
cargo build --release -q -p blksnap-service --bin blksnapd --bin blksnap
BIN=$PWD/target/release

W=$(mktemp -d "${TMPDIR:-/tmp}/blksnap-nbd.XXXXXX")
DAEMON=""
QNBD=""
cleanup() {
  [ -n "$QNBD" ] && kill "$QNBD" 2>/dev/null && wait "$QNBD" 2>/dev/null
  [ -n "$DAEMON" ] && kill "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; [ -f "$W/daemon.log" ] && tail -n 20 "$W/daemon.log"; exit 1; }
now() { date +%s.%N; }

# Certificates: a CA, the server (localhost, 127.0.0.1), a client; one directory with the file
# names both GnuTLS-based tools (nbdcopy, qemu-nbd) and `blksnap backup` read.
PKI=$W/pki
mkdir -p "$PKI"
(
  cd "$PKI"
  key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
  key ca-key.pem
  openssl req -x509 -new -key ca-key.pem -out ca-cert.pem -days 2 -subj /CN=blksnap-test-ca
  for who in server client; do
    key $who-key.pem
    openssl req -new -key $who-key.pem -out $who.csr -subj "/CN=$who"
  done
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
  printf 'extendedKeyUsage=clientAuth\n' >client.ext
  for who in server client; do
    openssl x509 -req -in $who.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
      -out $who-cert.pem -days 2 -extfile $who.ext 2>/dev/null
  done
)

head -c $((SIZE_MIB << 20)) /dev/urandom >"$W/disk.img"
PORT=$((20000 + RANDOM % 20000))
"$BIN/blksnapd" --frontend none --socket "$W/control" --state-dir "$W/state" --no-freeze \
  --nbd-socket "$W/nbd.sock" --nbd-tcp "127.0.0.1:$PORT" \
  --nbd-tls-cert "$PKI/server-cert.pem" --nbd-tls-key "$PKI/server-key.pem" \
  --nbd-tls-ca "$PKI/ca-cert.pem" --nbd-writable "$W/disk.img" >"$W/daemon.log" 2>&1 &
DAEMON=$!
for _ in $(seq 50); do [ -S "$W/control" ] && [ -S "$W/nbd.sock" ] && break; sleep 0.1; done
export BLKSNAP_SOCKET=$W/control
B=$BIN/blksnap
DEV=$($B --json device add "$W/disk.img" | sed -n 's/.*"device":"\([0-9:]*\)".*/\1/p')
[ -n "$DEV" ] || fail "device add printed no device"
IMG="image-$DEV"
U_UNIX="nbd+unix:///$IMG?socket=$W/nbd.sock"
U_TLS="nbds://127.0.0.1:$PORT/$IMG?tls-certificates=$PKI"
U_ORIGIN="nbd+unix:///origin-$DEV?socket=$W/nbd.sock"
echo "blksnapd: origin $DEV, exports on $W/nbd.sock and tcp 127.0.0.1:$PORT (TLS)"

take() { # -> snapshot id
  local id
  id=$($B snapshot_create -d "$DEV" -f "$W" -l $((SIZE_MIB * 2))M)
  $B snapshot_take -i "$id"
  echo "$id"
}
cbt() { $B cbtinfo -d "$DEV" | sed -n "s/^$1=//p"; }

# --- 1. full copies by qemu-img and nbdcopy -----------------------------------------------------
cp "$W/disk.img" "$W/pre.img"
ID=$(take)
nbdinfo --list "nbd+unix:///?socket=$W/nbd.sock" | grep -q "export=\"$IMG\"" || fail "image not listed"
qemu-img convert -f raw -O raw "$U_UNIX" "$W/out.img"
cmp "$W/out.img" "$W/pre.img" || fail "qemu-img convert differs from the pre-take copy"
nbdcopy "$U_UNIX" "$W/out.img"
cmp "$W/out.img" "$W/pre.img" || fail "nbdcopy (unix) differs"
nbdcopy "$U_TLS" "$W/out.img"
cmp "$W/out.img" "$W/pre.img" || fail "nbdcopy (tcp+tls) differs"
if nbdcopy "nbd://127.0.0.1:$PORT/$IMG" null: 2>/dev/null; then fail "plain NBD accepted on the TLS listener"; fi
echo "ok: qemu-img convert and nbdcopy (unix, tcp+tls) equal the pre-take copy; plain tcp refused"
# The chain's full point, pulled over TCP+TLS.
$B backup --image "$U_TLS" --target "$W/chain" >"$W/backup.log"
grep -q "kind=full" "$W/backup.log" || fail "first pull not full"
$B verify --image "$W/pre.img" --target "$W/chain" --point 0 >/dev/null || fail "point 0 differs"
echo "ok: blksnap backup --full over tcp+tls: $(grep -E '^rate=' "$W/backup.log")"

# --- 5. throughput, while the image is exported: blksnapd vs qemu-nbd on the same file ---------
QPORT=$((PORT + 1))
qemu-nbd --read-only --format=raw --persistent --shared=8 --bind=127.0.0.1 --port=$QPORT \
  --object "tls-creds-x509,id=tls0,dir=$PKI,endpoint=server,verify-peer=on" --tls-creds tls0 \
  "$W/disk.img" 2>"$W/qemu-nbd-tcp.log" &
QNBD=$!
for _ in $(seq 50); do nbdinfo --size "nbds://127.0.0.1:$QPORT/?tls-certificates=$PKI" >/dev/null 2>&1 && break; sleep 0.1; done
cat "$W/disk.img" >/dev/null # page cache warm for both servers
timed() { local t0 t1; t0=$(now); "$@" >/dev/null; t1=$(now); awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
ROUNDS=${ROUNDS:-3}
bench() { # label, blksnapd URI, qemu-nbd URI
  local a=() q=() r
  for r in $(seq "$ROUNDS"); do
    a+=("$(timed nbdcopy --connections=4 "$2" null:)")
    q+=("$(timed nbdcopy --connections=4 "$3" null:)")
  done
  local as qs
  as=$(median "${a[@]}"); qs=$(median "${q[@]}")
  awk -v l="$1" -v b=$((SIZE_MIB << 20)) -v a="$as" -v q="$qs" 'BEGIN {
    printf "%-28s blksnapd %7.1f MB/s   qemu-nbd %7.1f MB/s   ratio %.2f\n", l, b/1e6/a, b/1e6/q, q/a }'
}
echo "throughput of a full pull of $SIZE_MIB MiB (nbdcopy --connections=4 to null:, median of $ROUNDS):"
bench "nbdcopy, tcp+tls loopback" "$U_TLS" "nbds://127.0.0.1:$QPORT/?tls-certificates=$PKI"
kill "$QNBD"; wait "$QNBD" 2>/dev/null || true
qemu-nbd --read-only --format=raw --persistent --shared=8 --socket="$W/qemu.sock" "$W/disk.img" \
  2>"$W/qemu-nbd-unix.log" &
QNBD=$!
for _ in $(seq 50); do [ -S "$W/qemu.sock" ] && break; sleep 0.1; done
bench "nbdcopy, unix socket" "$U_UNIX" "nbd+unix:///?socket=$W/qemu.sock"
kill "$QNBD"; wait "$QNBD" 2>/dev/null || true
QNBD=""
pull_rate() { # URI -> MB/s of `blksnap backup --full` (to a file, fsync included), median
  local t=() r
  for r in $(seq "$ROUNDS"); do
    t+=("$(timed $B backup --full --image "$1" --target "$W/bench")")
    rm -rf "$W/bench"
  done
  awk -v b=$((SIZE_MIB << 20)) -v s="$(median "${t[@]}")" 'BEGIN { printf "%.1f MB/s", b/1e6/s }'
}
echo "blksnap backup --full (4 connections, to a file + fsync; median of $ROUNDS):" \
  "tcp+tls $(pull_rate "$U_TLS"), unix socket $(pull_rate "$U_UNIX")"
$B snapshot_destroy -i "$ID"

# --- 2 + 3. three rounds of writes -> dirty bitmap -> incremental pull ----------------------------
BS=$(cbt block_size)
GEN=$(cbt generation_id)
expected_map() { # "OFF:LEN ..." -> merged dirty ranges "start length", one a line
  local w o l
  for w in "$@"; do
    o=${w%%:*}; l=${w##*:}
    seq $((o / BS)) $(((o + l - 1) / BS))
  done | sort -n -u | awk -v bs="$BS" '
    NR == 1 || $1 != prev + 1 { if (NR > 1) print start * bs, (prev - start + 1) * bs; start = $1 }
    { prev = $1 } END { if (NR) print start * bs, (prev - start + 1) * bs }'
}
declare -a ROUND_WRITES=(
  "$((1 << 20)):65536 $((10 << 20)):204800 $(((SIZE_MIB - 1) << 20)):4096"
  "0:512 $((5 << 20)):$((3 << 20)) $((40 << 20)):131072"
  "$((64 << 20)):65536 $((64 << 20)):65536 $((100 << 20)):1048576 $((7 << 20)):4096"
)
for k in 1 2 3; do
  PREV=$(cbt changes_number)
  writes=${ROUND_WRITES[$((k - 1))]}
  args=()
  for w in $writes; do args+=(-c "write -P $((k * 17)) ${w%%:*} ${w##*:}"); done
  qemu-io -f raw "${args[@]}" "$U_ORIGIN" >/dev/null
  cp "$W/disk.img" "$W/pre.img"
  ID=$(take)
  [ "$(cbt generation_id)" = "$GEN" ] || fail "generation changed"
  CTX="qemu:dirty-bitmap:blksnap-$GEN-since-$PREV"
  nbdinfo --map="$CTX" "$U_UNIX" | awk '$3 == 1 { print $1, $2 }' >"$W/map.got"
  # shellcheck disable=SC2086
  expected_map $writes >"$W/map.want"
  diff -u "$W/map.want" "$W/map.got" || fail "round $k: dirty bitmap differs from the writes"
  echo "ok: round $k: $CTX lists exactly the $(wc -l <"$W/map.want") written range(s)"
  $B backup --image "$U_TLS" --target "$W/chain" >"$W/backup.log"
  grep -q "kind=incremental" "$W/backup.log" || fail "round $k: not incremental"
  $B verify --image "$W/pre.img" --target "$W/chain" >/dev/null || fail "round $k: point $k differs"
  $B restore --target "$W/chain" --point "$k" -o "$W/restored.img" >/dev/null
  cmp "$W/restored.img" "$W/pre.img" || fail "round $k: restore differs"
  echo "ok: round $k: incremental over tcp+tls ($(grep -E '^blocks_changed=' "$W/backup.log")) restores byte-identical"
  $B snapshot_destroy -i "$ID"
done
# A stale generation is refused (the client sees the context missing).
STALE="qemu:dirty-bitmap:blksnap-00000000-0000-0000-0000-000000000000-since-0"
ID=$(take)
if nbdinfo --map="$STALE" "$U_UNIX" >/dev/null 2>&1; then fail "a stale generation was served"; fi
echo "ok: a stale generation's bitmap is refused"

# --- 4. destroy during a pull -----------------------------------------------------------------
# The reader stalls (a pipe nobody reads for 2 s) with requests in flight; the destroy comes
# meanwhile; the next requests must fail, and nbdcopy must exit with an error, not hang.
set +e
( nbdcopy --connections=1 "$U_UNIX" - | { sleep 2; cat >/dev/null; }; echo "${PIPESTATUS[0]}" >"$W/pull.rc" ) &
PULL=$!
sleep 0.5
$B snapshot_destroy -i "$ID"
timeout 30 tail --pid=$PULL -f /dev/null
rc=$(cat "$W/pull.rc" 2>/dev/null)
set -e
[ -n "$rc" ] || fail "the pull did not end"
[ "$rc" != 0 ] || fail "nbdcopy succeeded although the snapshot was destroyed during the pull"
echo "ok: destroy during a pull: nbdcopy ended with status $rc"
ID=$(take)
qemu-img convert -f raw -O raw "$U_UNIX" "$W/out.img"
cmp "$W/out.img" "$W/disk.img" || fail "after the interrupted pull, a new image differs"
$B snapshot_destroy -i "$ID"
nbdinfo --list "nbd+unix:///?socket=$W/nbd.sock" | grep -q "export=\"$IMG\"" && fail "export survived destroy"
echo "ok: blksnapd keeps serving after the interrupted pull"
echo "nbd-tests: all passed"
