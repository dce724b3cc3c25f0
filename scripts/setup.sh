#!/usr/bin/env bash
# Installs what walnut's demo and tests need on a fresh Debian machine: the PostgreSQL 15 server,
# openssl (the TLS tests make their certificates with it) and Azurite (the Azure Storage emulator,
# from npm). (The S3-compatible test server, s3s-fs, is a pinned Rust dev-dependency: cargo builds it.)
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
apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "missing: $*; run as root or: sudo apt-get install $*" >&2
    exit 1
  fi
  echo "==> installing $* (apt-get install)"
  export DEBIAN_FRONTEND=noninteractive
  [ -n "${apt_updated:-}" ] || { apt-get update -qq; apt_updated=1; }
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
command -v openssl >/dev/null || apt_install openssl
# Azurite, pinned; telemetry is turned off where the tests start it.
azurite_version=3.35.0
if ! command -v azurite-blob >/dev/null || [ "$(azurite-blob --version 2>/dev/null)" != "$azurite_version" ]; then
  command -v npm >/dev/null || apt_install nodejs npm
  echo "==> installing Azurite $azurite_version (npm install -g azurite)"
  npm install -g --no-fund --no-audit "azurite@$azurite_version" >/dev/null
fi
command -v setpriv >/dev/null || { echo "setpriv (util-linux) is missing" >&2; exit 1; }
command -v cargo >/dev/null || { echo "cargo is missing: install a Rust toolchain (rustup)" >&2; exit 1; }
