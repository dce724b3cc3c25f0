#!/usr/bin/env bash
# Runs `walnut demo` on a fresh machine: installs PostgreSQL 15 if needed, builds walnut, runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked --bin walnut
exec target/release/walnut demo "$@"
