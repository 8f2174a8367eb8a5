#!/usr/bin/env bash
# service/vm/ublk-vm.sh — run one test program inside a throw-away qemu VM whose Debian kernel
# has the ublk driver (this project's own harness; see README.md "VM tests").
#
#   service/vm/ublk-vm.sh [options] PROGRAM [FILE...] [-- ARGS...]
#
# PROGRAM and the FILEs are copied flat into /test of an initramfs; the guest's init mounts
# proc/sys/devtmpfs/tmpfs, loads the modules, runs `/test/PROGRAM ARGS...` as its child with cwd
# /test and then powers off. The program's output is shown; the exit status travels back as the
# console marker line "@@BLKSNAP_VM_EXIT=<rc>@@" and becomes this script's exit status.
# 124: the VM hit --timeout; 125: the VM died or never reported; 2: usage.
#
# Options (environment variable in brackets):
#   --timeout S     whole-run wall limit, seconds               [BLKSNAP_VM_TIMEOUT, 600]
#   --mem MB        guest memory                                [BLKSNAP_VM_MEM, 1024]
#   --smp N         guest CPUs                                  [BLKSNAP_VM_SMP, 2]
#   --env K=V       exported to the program (repeatable)
#   --modules "..." modules to load, dependencies resolved      [BLKSNAP_VM_MODULES]
#                   (an entry NAME:P1=V1,P2=V2 passes parameters to insmod; NAME? or
#                   NAME?:... is optional: skipped when the kernel does not have it)
#   --cache DIR     kernel + busybox cache                      [BLKSNAP_VM_CACHE,
#                                                                ~/.cache/blksnap-vm]
#   -v              show the whole guest console
#   (env) BLKSNAP_VM_BOOT_TIMEOUT (90), BLKSNAP_VM_BOOT_RETRIES (2): a guest that dies or hangs
#         before the program starts is booted again; a started program is never re-run.
#   (env) BLKSNAP_VM_REFRESH=1: download the kernel again.
#
# Assets: linux-image-amd64 of trixie-backports (its ublk driver has every feature libublk
# knows), busybox-static and e2fsck-static (as /bin/e2fsck in the guest) of trixie, fetched once with `apt-get download` through a private apt
# configuration under the cache that reuses the mirror URIs of the host's own apt sources; the
# host's apt configuration and state are not touched. Host needs: qemu-system-x86_64 (Debian
# package qemu-system-x86, install with --no-install-recommends), apt, dpkg-deb, xz-utils (the
# initramfs is packed by busybox cpio). KVM is not used: the VM runs under TCG.
set -euo pipefail

TIMEOUT=${BLKSNAP_VM_TIMEOUT:-600}
MEM=${BLKSNAP_VM_MEM:-1024}
SMP=${BLKSNAP_VM_SMP:-2}
# null_blk with no devices: scenario datapath creates memory-backed ones through configfs
MODULES=${BLKSNAP_VM_MODULES:-"ublk_drv ext4 loop null_blk?:nr_devices=0"}
CACHE=${BLKSNAP_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/blksnap-vm}
BOOT_TIMEOUT=${BLKSNAP_VM_BOOT_TIMEOUT:-90}
BOOT_RETRIES=${BLKSNAP_VM_BOOT_RETRIES:-2}
SUITE=trixie
KSUITE=trixie-backports
VERBOSE=
ENVS=()

say() { echo "ublk-vm: $*" >&2; }
fail() { say "$*"; exit "${RC:-125}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --timeout) TIMEOUT=$2; shift 2 ;;
    --mem) MEM=$2; shift 2 ;;
    --smp) SMP=$2; shift 2 ;;
    --env) ENVS+=("$2"); shift 2 ;;
    --modules) MODULES=$2; shift 2 ;;
    --cache) CACHE=$2; shift 2 ;;
    -v) VERBOSE=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    --) shift; break ;;
    -*) RC=2 fail "unknown option $1" ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || RC=2 fail "usage: $0 [options] PROGRAM [FILE...] [-- ARGS...]"
PROG=$1; shift
[ -f "$PROG" ] && [ -x "$PROG" ] || RC=2 fail "$PROG is not an executable file"
FILES=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do FILES+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
ARGS=("$@")
command -v qemu-system-x86_64 >/dev/null ||
  fail "qemu-system-x86_64 not found: apt-get install -y --no-install-recommends qemu-system-x86"

T0=$(date +%s%N)
since() { echo "$(( ($(date +%s%N) - T0) / 1000000 ))ms"; }

# ------------------------------------------------------------------ assets (cached)
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
ASSETS=$CACHE/$KSUITE
APTDIR=$ASSETS/apt
TREE=$ASSETS/tree
ASSET_VERSION=assets-v2 # bump when the downloaded package set changes

host_mirror() {
  # The first configured URI of the Debian archive proper (deb822 and one-line formats).
  {
    sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | tr ' ' '\n'
    grep -hE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
      2>/dev/null | sed -E 's/\[[^]]*\]//' | awk '{print $2}'
  } | grep -E '/debian/?$' | head -n 1
}

download_assets() {
  local keyring=/usr/share/keyrings/debian-archive-keyring.gpg mirror
  [ -f "$keyring" ] || fail "$keyring missing (apt-get install debian-archive-keyring)"
  mirror=$(host_mirror || true)
  [ -n "$mirror" ] || fail "no Debian mirror URI in the host's apt sources"
  rm -rf "$APTDIR"
  mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial" "$APTDIR/debs"
  printf 'deb [signed-by=%s] %s %s main\n' "$keyring" "$mirror" "$SUITE" "$keyring" "$mirror" \
    "$KSUITE" > "$APTDIR/sources.list"
  APT=(-o "Dir::Etc::SourceList=$APTDIR/sources.list" -o "Dir::Etc::SourceParts=-"
    -o "Dir::State::Lists=$APTDIR/lists" -o "Dir::Cache=$APTDIR/cache"
    -o "Dir::State::Status=/dev/null" -o "APT::Sandbox::User=$(id -un)" -o "Debug::NoLocking=1"
    -o "Acquire::Languages=none" -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false")
  say "apt-get update ($SUITE, $KSUITE) through a private configuration"
  apt-get "${APT[@]}" -q update > "$APTDIR/update.log" 2>&1 ||
    { cat "$APTDIR/update.log" >&2; fail "apt-get update failed"; }
  # linux-image-amd64 -> linux-image-VERSION (-> on 7.x packaging: linux-binary/modules/base-VERSION)
  local image version pkgs dep
  image=$(apt-cache "${APT[@]}" depends "linux-image-amd64/$KSUITE" 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
  [ -n "$image" ] || fail "cannot resolve linux-image-amd64/$KSUITE"
  version=${image#linux-image-}
  pkgs=("$image")
  for dep in $(apt-cache "${APT[@]}" depends "$image" 2>/dev/null |
    awk '$1 == "Depends:" {print $2}'); do
    case "$dep" in linux-binary-"$version" | linux-modules-"$version" | linux-base-"$version")
      pkgs+=("$dep") ;; esac
  done
  say "downloading ${pkgs[*]} busybox-static e2fsck-static"
  (cd "$APTDIR/debs" && apt-get "${APT[@]}" -q download "${pkgs[@]}" "busybox-static/$SUITE" \
    "e2fsck-static/$SUITE" \
    > "$APTDIR/download.log" 2>&1) ||
    { cat "$APTDIR/download.log" >&2; fail "apt-get download failed"; }
  rm -rf "$TREE.new"
  mkdir -p "$TREE.new"
  local deb
  for deb in "$APTDIR"/debs/*.deb; do dpkg-deb -x "$deb" "$TREE.new"; done
  echo "$ASSET_VERSION ${pkgs[*]}" > "$TREE.new/.packages"
  rm -rf "$TREE" "$APTDIR/debs" "$APTDIR/cache"
  mv "$TREE.new" "$TREE"
}

find_kernel() {
  # Debian <= 6.x: boot/vmlinuz-VER; 7.x packaging: usr/lib/modules/VER/vmlinuz
  local f
  for f in "$TREE"/boot/vmlinuz-* "$TREE"/usr/lib/modules/*/vmlinuz "$TREE"/lib/modules/*/vmlinuz; do
    [ -f "$f" ] || continue
    VMLINUZ=$f
    case "$f" in
      */boot/vmlinuz-*) KVER=${f##*/vmlinuz-} ;;
      *) KVER=$(basename "$(dirname "$f")") ;;
    esac
    return 0
  done
  return 1
}

VMLINUZ= KVER=
stale() {
  [ -n "${BLKSNAP_VM_REFRESH:-}" ] || ! grep -qs "^$ASSET_VERSION " "$TREE/.packages" || ! find_kernel
}
if stale; then
  # one downloader at a time per cache
  exec 9> "$CACHE/.lock"
  flock 9
  if stale; then
    download_assets
  fi
  flock -u 9
  find_kernel || fail "no kernel in $TREE (remove it and retry)"
fi
MODDIR=
for d in "$TREE/usr/lib/modules/$KVER" "$TREE/lib/modules/$KVER"; do
  [ -d "$d" ] && MODDIR=$d && break
done
BUSYBOX=
for b in "$TREE/bin/busybox" "$TREE/usr/bin/busybox"; do [ -x "$b" ] && BUSYBOX=$b && break; done
[ -n "$MODDIR" ] && [ -n "$BUSYBOX" ] || fail "incomplete asset cache $TREE (remove it and retry)"
for cfg in "$TREE/boot/config-$KVER" "$MODDIR/config"; do
  if [ -f "$cfg" ] && ! grep -qE '^CONFIG_BLK_DEV_UBLK=[my]' "$cfg"; then
    fail "kernel $KVER is built without CONFIG_BLK_DEV_UBLK"
  fi
done
say "kernel $KVER ready after $(since)"

# ------------------------------------------------------------------ initramfs
WORK=$(mktemp -d "${TMPDIR:-/tmp}/blksnap-vm.XXXXXX")
QPID=
cleanup() {
  if [ -n "$QPID" ]; then pkill -P "$QPID" 2> /dev/null; kill "$QPID" 2> /dev/null; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,dev,proc,sys,run,tmp,mnt,etc,test,modules}
cp "$BUSYBOX" "$ROOT/bin/busybox"
for f in "$TREE/sbin/e2fsck.static" "$TREE/usr/sbin/e2fsck.static"; do
  [ -x "$f" ] && cp "$f" "$ROOT/bin/e2fsck" && break
done

unpack_module() { # file -> stdout
  case "$1" in
    *.ko.xz) xz -dc "$1" ;;
    *.ko.zst) zstd -dc "$1" ;;
    *.ko.gz) gzip -dc "$1" ;;
    *) cat "$1" ;;
  esac
}
declare -A LOADED=()
LOAD_ORDER=()
add_module() { # name [optional]
  local name=${1//-/_} file deps dep
  [ -n "${LOADED[$name]:-}" ] && return 0
  LOADED[$name]=1
  grep -qE "/${name}\.ko" "$MODDIR/modules.builtin" 2>/dev/null && return 0
  file=$(find "$MODDIR/kernel" -regextype posix-extended \
    -regex ".*/(${name}|${name//_/-})\.ko(\.xz|\.zst|\.gz)?" -print -quit)
  if [ -z "$file" ]; then
    [ -n "${2:-}" ] && return 0
    fail "module $name not in kernel $KVER"
  fi
  unpack_module "$file" > "$ROOT/modules/$name.ko"
  deps=$(grep -ao 'depends=[^[:cntrl:]]*' "$ROOT/modules/$name.ko" | head -n 1 | cut -d= -f2)
  for dep in ${deps//,/ }; do add_module "$dep"; done
  # ext4's checksums use crc32c through the crypto API: a soft dependency
  case "$name" in ext4 | jbd2) add_module crc32c_generic optional; add_module crc32c optional ;; esac
  LOAD_ORDER+=("$name")
}
declare -A MODPARAMS=()
for m in $MODULES; do
  name=${m%%:*} optional=
  [ "$name" != "$m" ] && MODPARAMS[${name%\?}]=${m#*:}
  case "$name" in *\?) name=${name%\?} optional=1 ;; esac
  add_module "$name" $optional
done
for m in "${LOAD_ORDER[@]}"; do
  p=${MODPARAMS[$m]:-}
  printf '%s %s\n' "$m" "${p//,/ }"
done > "$ROOT/etc/modules"

NAME=$(basename "$PROG")
cp -L "$PROG" "$ROOT/test/$NAME"
for f in "${FILES[@]}"; do cp -rL "$f" "$ROOT/test/"; done
# Dynamically linked files (a C program run under LD_PRELOAD, the preload shim itself): their
# loader and libraries from the host, at the same paths (the guest has no libc of its own).
for f in "$PROG" "${FILES[@]}"; do
  [ -f "$f" ] || continue
  { ldd "$f" 2>/dev/null || true; } | { grep -oE '/[^[:space:]]+' || true; } | while read -r lib; do
    [ -e "$ROOT$lib" ] && continue
    mkdir -p "$ROOT$(dirname "$lib")"
    cp -L "$lib" "$ROOT$lib"
  done
done

shq() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
{
  echo "cd /test"
  for e in "${ENVS[@]}"; do echo "export ${e%%=*}=$(shq "${e#*=}")"; done
  printf 'exec ./%s' "$(shq "$NAME")"
  for a in "${ARGS[@]}"; do printf ' %s' "$(shq "$a")"; done
  echo
} > "$ROOT/test/.run"

cat > "$ROOT/init" << 'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin HOME=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/shm /dev/pts && mount -t tmpfs tmpfs /dev/shm
while read -r m params; do
  insmod /modules/$m.ko $params || echo "@@BLKSNAP_VM_WARN insmod $m failed@@"
done < /etc/modules
read up rest < /proc/uptime
echo "@@BLKSNAP_VM_START uptime=$up@@"
sh /test/.run < /dev/null
rc=$?
read up rest < /proc/uptime
echo "@@BLKSNAP_VM_EXIT=$rc uptime=$up@@"
sync
poweroff -f
EOF
chmod 755 "$ROOT/init"
(cd "$ROOT" && find . | "$BUSYBOX" cpio -o -H newc 2> /dev/null) > "$WORK/initrd"
say "initramfs with ${#LOAD_ORDER[@]} modules after $(since)"

# ------------------------------------------------------------------ boot
CONSOLE=$WORK/console
boot() {
  : > "$CONSOLE"
  : > "$CONSOLE.raw"
  rm -f "$WORK/qemu.rc"
  (
    rc=0
    timeout -k 5 "$TIMEOUT" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m "$MEM" \
      -smp "$SMP" -nodefaults -no-user-config -display none -no-reboot -serial stdio \
      -kernel "$VMLINUZ" -initrd "$WORK/initrd" \
      -append "console=ttyS0 quiet loglevel=3 panic=-1 oops=panic rdinit=/init" \
      < /dev/null > "$CONSOLE.raw" 2>&1 || rc=$?
    echo "$rc" > "$WORK/qemu.rc"
  ) &
  QPID=$!
  # follow the console: print the program's lines (all lines with -v) as they come
  local shown=0 started=0 waited=0 total
  while :; do
    tr -d '\r' < "$CONSOLE.raw" > "$CONSOLE" 2> /dev/null || true
    total=$(wc -l < "$CONSOLE")
    if [ "$total" -gt "$shown" ]; then
      awk -v from="$shown" -v to="$total" -v verbose="$VERBOSE" '
        NR > to { exit }
        /@@BLKSNAP_VM_START/ { on = 1; if (NR > from && verbose) print; next }
        /@@BLKSNAP_VM_EXIT=/ { i = index($0, "@@BLKSNAP_VM_EXIT=")
          if (NR > from) { if (i > 1) print substr($0, 1, i - 1); if (verbose) print substr($0, i) }
          on = 0; next }
        NR > from && (on || verbose) { print }' "$CONSOLE"
      shown=$total
    fi
    grep -qa '@@BLKSNAP_VM_START' "$CONSOLE" && started=1
    [ -s "$WORK/qemu.rc" ] && break
    if [ "$started" = 0 ] && [ "$waited" -ge $((BOOT_TIMEOUT * 5)) ]; then
      say "the program did not start within ${BOOT_TIMEOUT}s: stopping this boot"
      pkill -P "$QPID" 2> /dev/null || true
    fi
    sleep 0.2
    waited=$((waited + 1))
  done
  wait "$QPID" 2> /dev/null || true
  QPID=
  tr -d '\r' < "$CONSOLE.raw" > "$CONSOLE"
  QEMU_RC=$(cat "$WORK/qemu.rc")
}

attempt=0
while :; do
  boot
  grep -qa '@@BLKSNAP_VM_START' "$CONSOLE" && break
  [ "$QEMU_RC" = 124 ] && break
  [ "$attempt" -ge "$BOOT_RETRIES" ] && break
  attempt=$((attempt + 1))
  say "guest died before the program started (qemu rc $QEMU_RC); boot $((attempt + 1)), console tail:"
  tail -n 8 "$CONSOLE" >&2
done

START=$( (grep -a -m1 '@@BLKSNAP_VM_START' "$CONSOLE" || true) |
  sed -n 's/.*uptime=\([0-9.]*\)@@.*/\1/p')
EXIT_LINE=$(grep -a -m1 '@@BLKSNAP_VM_EXIT=' "$CONSOLE" || true)
if [ -n "$EXIT_LINE" ]; then
  RC=$(sed -n 's/.*@@BLKSNAP_VM_EXIT=\([0-9]*\).*/\1/p' <<< "$EXIT_LINE")
  END=$(sed -n 's/.*uptime=\([0-9.]*\)@@.*/\1/p' <<< "$EXIT_LINE")
  say "exit $RC; guest boot ${START}s, program $(awk -v a="$START" -v b="$END" \
    'BEGIN {printf "%.1f", b - a}')s (guest clock), wall $(since)"
  exit "$RC"
fi
[ -n "$VERBOSE" ] || { say "console tail:"; tail -n 40 "$CONSOLE" >&2; }
if [ "$QEMU_RC" = 124 ] || [ "$QEMU_RC" = 137 ]; then
  say "TIMEOUT: no exit after ${TIMEOUT}s (wall $(since))"
  exit 124
fi
say "the VM ended without an exit marker (qemu rc $QEMU_RC, wall $(since))"
exit 125
