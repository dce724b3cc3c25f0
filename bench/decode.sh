#!/usr/bin/env bash
# WAL decoder throughput, and what decoding costs inside wal-push.
#
# Generates WAL with pgbench in a throwaway PostgreSQL 15 cluster (loopback only), then:
#   - decodes every completed segment with `walnut wal-inspect` (decoder MB/s, per-segment ms);
#   - pushes each segment with `walnut wal-push` to a fresh file:// repository (upload_ahead 0)
#     and reports median push latency and the share of it spent decoding.
# Figures, not pass/fail. Usage: [PORT=54333] bash bench/decode.sh [pgbench scale, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
scale=${1:-10}
bindir=/usr/lib/postgresql/15/bin
cargo build --release --locked --bin walnut >/dev/null 2>&1
walnut=$PWD/target/release/walnut
work=$(mktemp -d /tmp/walnut-decode-bench.XXXXXX)
run_pg() { if [ "$(id -u)" = 0 ]; then setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; else "$@"; fi; }
cleanup() { run_pg "$bindir/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
[ "$(id -u)" = 0 ] && chown postgres "$work"
port=${PORT:-54333}
run_pg "$bindir/initdb" -D "$work/data" -U postgres --auth=trust --no-sync >/dev/null
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
mkdir -p "$work/segs/pg_wal"
for f in $(ls "$work/data/pg_wal" | grep -E '^[0-9A-F]{24}$' | sort); do
  [[ "$f" < "$current" ]] && cp "$work/data/pg_wal/$f" "$work/segs/pg_wal/"
done
n=$(ls "$work/segs/pg_wal" | wc -l)
echo "walnut decode benchmark: $n segments of pgbench WAL (scale $scale), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "== decoder (walnut wal-inspect) =="
(cd "$work/segs/pg_wal" && "$walnut" wal-inspect $(ls)) | tail -1
decode_ms=$(cd "$work/segs/pg_wal" && "$walnut" --json wal-inspect $(ls) | grep -o '"decode_ms": *[0-9.]*' \
  | sed 's/.*: *//' | sort -g | awk '{a[NR] = $1} END {printf "%.1f", NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}')
echo "median decode time per 16 MiB segment: ${decode_ms} ms"
echo
echo "== wal-push to file:// (upload_ahead = 0), each call a new process =="
mkdir -p "$work/repo" "$work/state"
printf 'repo = "file://%s/repo"\nstate_dir = "%s/state"\n[wal]\nupload_ahead = 0\n' "$work" "$work" > "$work/walnut.toml"
push_ms=$(for f in $(ls "$work/segs/pg_wal"); do
  s=$(date +%s%N); "$walnut" -q --config "$work/walnut.toml" wal-push "$work/segs/pg_wal/$f"; e=$(date +%s%N)
  echo $(( (e - s) / 1000000 ))
done | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
echo "median wal-push latency: ${push_ms} ms per segment"
awk -v d="$decode_ms" -v p="$push_ms" 'BEGIN {printf "decoding share of wal-push: %.1f%% (push without decoding ~ %.1f ms)\n", d / (p > 0 ? p : 1e-9) * 100, p - d}'
