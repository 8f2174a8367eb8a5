#!/usr/bin/env bash
# fuzz/coverage.sh [CORPUS_ROOT]: source line coverage of each fuzz target over a corpus
# (CORPUS_ROOT/<target>, default: the committed seeds in fuzz/corpus/<target>), with
# `cargo fuzz coverage` (needs the nightly llvm-tools component:
# `rustup component add --toolchain nightly llvm-tools-preview`). Prints, per target, the lines
# of each project crate that the corpus executes, and the key files of the target.
set -euo pipefail
cd "$(dirname "$0")"
root=${1:-corpus}
llvm_cov=$(ls "$(rustc +nightly --print sysroot)"/lib/rustlib/*/bin/llvm-cov 2>/dev/null | head -1)
[ -x "$llvm_cov" ] || { echo "llvm-cov missing: rustup component add --toolchain nightly llvm-tools-preview"; exit 1; }
triple=$(rustc +nightly -vV | sed -n 's/^host: //p')
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
mkdir -p "$out/tmp"
for t in $(cargo +nightly fuzz list); do
  TMPDIR="$out/tmp" cargo +nightly fuzz coverage "$t" "$root/$t" >"$out/$t.log" 2>&1 ||
    { tail -20 "$out/$t.log"; exit 1; }
  "$llvm_cov" export -summary-only "target/$triple/coverage/$triple/release/$t" \
    -instr-profile="coverage/$t/coverage.profdata" >"$out/$t.json"
done
python3 - "$out" $(cargo +nightly fuzz list) <<'PY'
import collections, json, os, sys
out, targets = sys.argv[1], sys.argv[2:]
top = os.path.abspath("..") + "/"
for t in targets:
    data = json.load(open(f"{out}/{t}.json"))["data"][0]["files"]
    per_crate = collections.defaultdict(lambda: [0, 0])
    for f in data:
        name = f["filename"]
        if not name.startswith(top) or name.startswith(top + "fuzz/"):
            continue
        rel = name[len(top):]
        crate = "ffi/preload" if rel.startswith("ffi/preload/") else rel.split("/")[0]
        lines = f["summary"]["lines"]
        per_crate[crate][0] += lines["covered"]
        per_crate[crate][1] += lines["count"]
    cells = [f"{c} {a}/{b} ({100 * a / b:.0f}%)" for c, (a, b) in sorted(per_crate.items()) if b]
    print(f"{t:18} " + "; ".join(cells))
PY
