#!/usr/bin/env bash
# Mutation testing of the engine (cargo-mutants), run by hand — NOT in CI. See docs/MUTATION.md.
#
# Mutates the engine modules whose logic decides correctness (copy-on-write, the image, chunk
# permits, take/teardown, the gate, the registry and every ctl) and, for every mutant, runs the
# engine's unit and integration tests plus the sim-tests crate (the differential proptest against
# the model, the seeded simulation and the fault sweep). One mutant at a time (-j 1): the machine
# is shared. A mutant that hangs (e.g. a permit never released) is cut off after 60 s and counted
# as a timeout.
#
# Cost (2 shared cores, cargo-mutants 27.1): about a quarter of the mutants do not compile (~1 s
# each); a viable one costs ~10-15 s of incremental build + ~10 s of tests. The default set
# (diff_area, chunk, snapshot, tracker, engine, event_queue: ~220 mutants) takes ~45-50 minutes.
# Pass files to widen or narrow the run, e.g. the modules left out of the default set (~50 min):
#   engine/mutants.sh engine/src/cbt.rs engine/src/kref.rs engine/src/diff_storage.rs
# Extra cargo-mutants options go in MUTANTS_ARGS, e.g. MUTANTS_ARGS='-F set_failed'.
#
# Install: cargo install cargo-mutants --locked   (tested with 27.1.0)
# Output: target/mutants/mutants.out/{caught,missed,timeout,unviable}.txt and per-mutant logs.
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)

files=("$@")
if [ ${#files[@]} -eq 0 ]; then
  files=(engine/src/diff_area.rs engine/src/chunk.rs engine/src/snapshot.rs engine/src/tracker.rs
    engine/src/engine.rs engine/src/event_queue.rs)
fi
file_args=()
for f in "${files[@]}"; do
  file_args+=(--file "$f")
done

# Builds of the mutated copies share one target directory (dependencies are built once).
export CARGO_TARGET_DIR="$root/target/mutants/build"
mkdir -p "$root/target/mutants"

# shellcheck disable=SC2086 # MUTANTS_ARGS is split on purpose
exec cargo mutants \
  --package blksnap-engine \
  --test-package blksnap-engine --test-package blksnap-sim-tests \
  "${file_args[@]}" \
  --jobs 1 \
  --timeout 60 \
  --output "$root/target/mutants" \
  ${MUTANTS_ARGS:-} \
  -- --lib --tests
