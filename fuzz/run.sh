#!/usr/bin/env bash
# fuzz/run.sh [seconds]: builds every fuzz target once (nightly, ASan, one build), then runs each
# for `seconds` (default 60) from a scratch copy of its committed seed corpus (fuzz/corpus/<t>,
# which is never written). Fails on any crash, panic, leak, timeout (>10 s per input) or
# out-of-memory; prints executions and exec/s per target. Reproduce a failure with
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}

cargo +nightly fuzz build
targets=$(cargo +nightly fuzz list)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The targets keep their backing files under the temp dir: keep them in ours.
mkdir -p "$work/tmp"

failed=()
summary=()
for t in $targets; do
  mkdir -p "$work/$t"
  log="$work/$t.log"
  echo "::: fuzz $t for ${secs}s"
  set +e
  TMPDIR="$work/tmp" cargo +nightly fuzz run "$t" "$work/$t" "corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 || true)
  line=$(printf '%-18s rc=%-3s executions=%-10s exec/s=%-7s %s' "$t" "$rc" "${execs:-?}" "${rate:-?}" "$cov")
  summary+=("$line")
  echo "$line"
  if [ "$rc" -ne 0 ]; then
    failed+=("$t")
    grep -E 'ERROR:|panicked|SUMMARY|Test unit written|timeout|leak' "$log" | head -20 || true
    tail -40 "$log"
  fi
done

echo "::: fuzz summary (${secs}s per target)"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "::: fuzz FAILED: ${failed[*]} (artifacts in fuzz/artifacts/)"
  exit 1
fi
echo "::: fuzz: every target ran ${secs}s without a crash, leak or timeout"
