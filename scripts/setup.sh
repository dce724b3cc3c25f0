#!/usr/bin/env bash
# Installs what walnut's demo and tests need on a fresh Debian machine: the PostgreSQL 15 server.
# (The S3-compatible test server, s3s-fs, is a pinned Rust dev-dependency: cargo builds it.)
set -euo pipefail

pg_bin=/usr/lib/postgresql/15/bin
if [ ! -x "$pg_bin/postgres" ] || [ ! -x "$pg_bin/initdb" ] || [ ! -x "$pg_bin/pg_verifybackup" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "PostgreSQL 15 server binaries are missing in $pg_bin; run as root or: sudo apt-get install postgresql-15" >&2
    exit 1
  fi
  echo "==> installing the PostgreSQL 15 server (apt-get install postgresql-15)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends postgresql-15 postgresql-client-15 >/dev/null
fi
if ! id postgres >/dev/null 2>&1; then
  echo "the 'postgres' OS user is missing (the postgresql-15 package creates it)" >&2
  exit 1
fi
command -v setpriv >/dev/null || { echo "setpriv (util-linux) is missing" >&2; exit 1; }
command -v cargo >/dev/null || { echo "cargo is missing: install a Rust toolchain (rustup)" >&2; exit 1; }
