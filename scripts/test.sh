#!/usr/bin/env bash
# The whole test suite: installs what is missing, then runs every test (real PostgreSQL 15, the
# local S3 server on 127.0.0.1). The same command CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --workspace --locked "$@"
