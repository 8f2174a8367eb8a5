#!/usr/bin/env bash
# The verification budget of blksnap-rs: wall time of the loom models, the shuttle scenarios and
# the seeded simulation (its test suite, and the blksnap-sim runs of .ci/run: seed 42 with the
# determinism check, 30 seeds, one long run, the fault sweep). Each is built first and its run
# timed apart from the build; loom and shuttle run as .ci/run runs them (own target dirs,
# LOOM_MAX_PREEMPTIONS=3, one test thread).
#
#   bench/verification-budget.sh [--markdown FILE]
#
# Prints a Markdown table (and writes it to FILE). Logs: target/verification-budget/*.log.
# Exit status 1 if a suite fails.
set -euo pipefail
cd "$(dirname "$0")/.."

markdown=""
while [ $# -gt 0 ]; do
  case $1 in
    --markdown) markdown=${2:?--markdown needs a file}; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "usage: $0 [--markdown FILE]" >&2; exit 2 ;;
  esac
done

logs=target/verification-budget
mkdir -p "$logs"
export CARGO_TERM_COLOR=never
rows=()
build_total=0
run_total=0

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# name, build command, run command (each a string evaluated by bash)
suite() {
  local name=$1 build=$2 run=$3 t0 t1 t2 log
  log=$logs/$(tr -cs 'A-Za-z0-9' - <<<"$name" | sed 's/-$//')
  echo "::: $name: building" >&2
  t0=$(now)
  if ! bash -c "$build" >"$log.build.log" 2>&1; then
    tail -n 30 "$log.build.log" >&2; echo "::: $name: build failed" >&2; exit 1
  fi
  t1=$(now)
  echo "::: $name: running" >&2
  if ! bash -c "$run" >"$log.run.log" 2>&1; then
    tail -n 30 "$log.run.log" >&2; echo "::: $name: failed" >&2; exit 1
  fi
  t2=$(now)
  echo "::: $name: build $(secs "$t0" "$t1") s, run $(secs "$t1" "$t2") s" >&2
  rows+=("| $name | \`$run\` | $(secs "$t0" "$t1") s | $(secs "$t1" "$t2") s |")
  build_total=$(awk -v a="$build_total" -v b="$(secs "$t0" "$t1")" 'BEGIN { print a + b }')
  run_total=$(awk -v a="$run_total" -v b="$(secs "$t1" "$t2")" 'BEGIN { print a + b }')
}

loom='RUSTFLAGS="--cfg blksnap_loom" CARGO_TARGET_DIR=target/loom'
shuttle='RUSTFLAGS="--cfg blksnap_shuttle" CARGO_TARGET_DIR=target/shuttle'
suite "loom models" \
  "$loom cargo test --release -p blksnap-engine --test loom_models --no-run" \
  "LOOM_MAX_PREEMPTIONS=3 $loom cargo test --release -p blksnap-engine --test loom_models -- --test-threads 1"
suite "shuttle scenarios" \
  "$shuttle cargo test --release -p blksnap-engine --test shuttle_scenarios --no-run" \
  "$shuttle cargo test --release -p blksnap-engine --test shuttle_scenarios -- --test-threads 1"
suite "simulation tests" \
  "cargo test --release -p blksnap-sim-tests --test simulation --no-run" \
  "cargo test --release -p blksnap-sim-tests --test simulation"
if [ -f sim-tests/src/bin/blksnap-sim.rs ]; then
  # As .ci/run's main-job and sim-seeds stages.
  sim_build="cargo build --release -p blksnap-sim-tests --bin blksnap-sim"
  suite "blksnap-sim, seed 42, determinism check" "$sim_build" \
    "target/release/blksnap-sim --seed 42 --steps 20000 --quiet --check-determinism"
  suite "blksnap-sim, 30 seeds" "$sim_build" \
    'for s in $(seq 1 30); do target/release/blksnap-sim --seed $s --steps 20000 --quiet; done'
  suite "blksnap-sim, long run" "$sim_build" \
    "target/release/blksnap-sim --seed 7 --steps 200000 --quiet"
  suite "blksnap-sim, fault sweep" "$sim_build" "target/release/blksnap-sim --sweep"
fi

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
report="#### 8. Verification budget

Machine: $(nproc) cores (${cpu:-unknown}), Linux $(uname -r); noisy (shared cores). One
measurement each; the build (incremental: near 0 when up to date) is timed apart from the run.

| suite | run command | build | run |
|---|---|---:|---:|
$(printf '%s\n' "${rows[@]}")
| total | | $(secs 0 "$build_total") s | $(secs 0 "$run_total") s |"
echo "$report"
if [ -n "$markdown" ]; then echo "$report" >"$markdown"; fi
