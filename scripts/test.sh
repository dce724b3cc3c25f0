#!/usr/bin/env bash
# The whole test suite: installs what is missing, then runs every test (real PostgreSQL 15, the
# local S3 server on 127.0.0.1). The same command CI runs. Ends with one summary line.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The suite's summary lines (fault matrix, bad inputs, crashes, corruption), kept by the tests.
summary_dir="${CARGO_TARGET_DIR:-target}/tmp/walnut-summary"
rm -rf "$summary_dir"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Property tests draw their cases from a fixed seed, so that a run is repeatable and a landing is
# not decided by chance; set PROPTEST_RNG_SEED to another number (or to "" for a random one) to
# explore other cases.
export PROPTEST_RNG_SEED="${PROPTEST_RNG_SEED-20261205}"
set +e
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
passed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) passed.*/\1/' | awk '{s+=$1} END {print s+0}')
failed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) failed.*/\1/' | awk '{s+=$1} END {print s+0}')
echo
if [ -d "$summary_dir" ]; then cat "$summary_dir"/*.txt 2>/dev/null || true; fi
echo "tests: $passed passed, $failed failed"
exit "$status"
