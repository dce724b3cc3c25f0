#!/usr/bin/env bash
# What recording block references and building the changed-block map costs the WAL decoder.
#
# Generates WAL with pgbench in a throwaway PostgreSQL 15 cluster (loopback only, data checksums
# on), then decodes every completed segment (best of 15 passes, interleaved) three ways: as wal-push does today,
# with block references and relation changes, and with the changed-block map built as well; then
# the tail record's map at each segment boundary, from the whole segment (tail_block_map) and from
# its last 64 kB (tail_block_map_from_end); and reports the stored size of the maps. Figures, not
# pass/fail.
# Usage: [PORT=54334] [CARGO_FLAGS=--release] bash bench/blocks.sh [pgbench scale, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
scale=${1:-10}
bindir=/usr/lib/postgresql/15/bin
work=$(mktemp -d /tmp/walnut-blocks-bench.XXXXXX)
run_pg() { if [ "$(id -u)" = 0 ]; then setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; else "$@"; fi; }
cleanup() { run_pg "$bindir/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
[ "$(id -u)" = 0 ] && chown postgres "$work"
port=${PORT:-54334}
run_pg "$bindir/initdb" -D "$work/data" -U postgres --auth=trust --no-sync --data-checksums >/dev/null
cat >> "$work/data/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work'
wal_keep_size = 4GB
max_wal_size = 4GB
CONF
run_pg "$bindir/pg_ctl" -D "$work/data" -l "$work/pg.log" -w start >/dev/null
psql() { "$bindir/psql" -h 127.0.0.1 -p "$port" -U postgres -Atq "$@"; }
timeout 600 "$bindir/pgbench" -h 127.0.0.1 -p "$port" -U postgres -i -s "$scale" postgres >/dev/null 2>&1
timeout 120 "$bindir/pgbench" -h 127.0.0.1 -p "$port" -U postgres -c 4 -T 20 -N postgres >/dev/null 2>&1
psql -c "SELECT pg_switch_wal()" >/dev/null
current=$(psql -c "SELECT pg_walfile_name(pg_current_wal_lsn())")
mkdir -p "$work/segs"
for f in $(ls "$work/data/pg_wal" | grep -E '^[0-9A-F]{24}$' | sort); do
  [[ "$f" < "$current" ]] && cp "$work/data/pg_wal/$f" "$work/segs/"
done
echo "walnut block-map benchmark: $(ls "$work/segs" | wc -l) segments of pgbench WAL (scale $scale), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
# shellcheck disable=SC2086
cargo run -q ${CARGO_FLAGS:---release} -p walnut-core --example blocks_bench -- "$work/segs"
