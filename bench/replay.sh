#!/usr/bin/env bash
# bench/replay.sh: how much walnut's restore_command costs a point-in-time restore, against the
# floor of the same WAL already on local disk. One run: a pgbench cluster archives every WAL file
# twice (walnut wal-push to a file:// repository, and a copy to a local directory), takes a walnut
# base backup, then generates WAL under pgbench load. Each round restores that backup twice with
# `walnut restore DEST` (same recovery settings, the end of the archive), once replaying through
# `walnut wal-fetch` (prefetch on, as configured by default) and once through `cp DIR/%f %p`, and
# times each from `pg_ctl start` to the end of recovery (pg_is_in_recovery() false). The goal of
# issue 12: walnut within 5% of the local floor.
#
#   nice -n 10 bash bench/replay.sh
#
# Knobs: SCALE=50 (pgbench -i -s), LOAD_SECS=60 (pgbench -N -c 2 load after the backup: the WAL
# replayed), REPEAT=3, NO_WAIT=1, KEEP=1. Needs root.
set -euo pipefail
shopt -s inherit_errexit
export LC_ALL=C
cd "$(dirname "$0")/.."
SRC=$(pwd)
SCALE=${SCALE:-50} LOAD_SECS=${LOAD_SECS:-60} REPEAT=${REPEAT:-3} ROWS=0 STEP_TIMEOUT=900
PGBIN=/usr/lib/postgresql/15/bin PORT=54339 LOCK=/tmp/walnut-bench.lock
[[ $(id -u) == 0 ]] || { echo "run as root (PostgreSQL is run as the postgres OS user)" >&2; exit 2; }
[[ -x $PGBIN/postgres ]] || { echo "PostgreSQL 15 not found in $PGBIN (bash scripts/setup.sh)" >&2; exit 2; }
BENCH_NAME=replay SKIP_S3=1 SKIP_PGBACKREST=1
# shellcheck source=bench/lib.sh
source "$SRC/bench/lib.sh"

make_cluster pgbench
c=$(walnut_conf replay "file://$W/repo/replay")
LOCAL=$W/local-wal
mkdir -p "$LOCAL" && chown postgres:postgres "$LOCAL"
set_archive "$WALNUT -q --config $c wal-push %p && cp %p $LOCAL/%f"
say "base backup"
"${AS_PG[@]}" "$WALNUT" -q --config "$c" backup-push --pgdata "$PGDATA" >"$W/backup.log" 2>&1 || die "backup-push: $(tail -3 "$W/backup.log")"
BEFORE_MB=$(du -sm "$LOCAL" | cut -f1)
say "pgbench load for $LOAD_SECS s (the WAL to replay)"
"${AS_PG[@]}" "$PGBIN/pgbench" -h "$W/sock" -p "$PORT" -U postgres -n -N -c 2 -T "$LOAD_SECS" postgres >"$W/load.log" 2>&1 || die "pgbench"
seg=$(sql "SELECT pg_walfile_name(pg_switch_wal())")
until [[ $(sql "SELECT coalesce(last_archived_wal, '') >= '$seg' FROM pg_stat_archiver") == t ]]; do sleep 0.5; done
WAL_MB=$(( $(du -sm "$LOCAL" | cut -f1) - BEFORE_MB ))
say "$WAL_MB MB of WAL archived since the backup"
pg_stop

RPORT=54340
# replay KIND: restore the backup into a fresh directory and time its recovery; KIND = walnut | cp
replay() {
  local kind=$1 dest=$W/restored t0 t1
  rm -rf "$dest"
  fresh_dir "$dest"
  "${AS_PG[@]}" "$WALNUT" -q --config "$c" restore "$dest" --port "$RPORT" >"$W/restore.log" 2>&1 || die "restore: $(tail -3 "$W/restore.log")"
  if [[ $kind == cp ]]; then
    sed -i "s|^restore_command = .*|restore_command = 'cp $LOCAL/%f %p'|" "$dest/postgresql.auto.conf"
  fi
  grep -q "^restore_command = '.*$( [[ $kind == cp ]] && echo 'cp ' || echo 'wal-fetch')" "$dest/postgresql.auto.conf" || die "restore_command not set for $kind"
  sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
  t0=$EPOCHREALTIME
  "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$dest" -l "$W/restored.log" -o "-p $RPORT -c listen_addresses='' -c unix_socket_directories=$W/sock" -w -t 900 start >/dev/null || die "start: $(tail -5 "$W/restored.log")"
  until [[ $(PGOPTIONS='' "${AS_PG[@]}" "$PGBIN/psql" -X -A -t -q -h "$W/sock" -p "$RPORT" -U postgres -d postgres -c 'SELECT pg_is_in_recovery()' 2>/dev/null) == f ]]; do
    sleep 0.05
  done
  t1=$EPOCHREALTIME
  awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f\n", b - a}' >>"$R/replay.$kind"
  say "$kind: $(tail -1 "$R/replay.$kind") s"
  "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$dest" -m immediate -w stop >/dev/null
  cp "$W/restored.log" "$W/restored.$kind.$(wc -l <"$R/replay.$kind").log"
}
for ((rep = 1; rep <= REPEAT; rep++)); do
  say "round $rep of $REPEAT"
  replay walnut
  replay cp
done

med() { sort -n "$1" | awk '{a[NR] = $1} END {printf "%.2f", NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
spread() { sort -n "$1" | awk 'NR == 1 {lo = $1} {hi = $1} END {printf "%.2f-%.2f", lo, hi}'; }
echo
echo "walnut replay benchmark  walnut $REV_DESC  $(date -u +%Y-%m-%dT%H:%MZ)  $(nproc) cores  PostgreSQL $("$PGBIN/postgres" -V | awk '{print $3}')"
echo "pgbench -i -s $SCALE, then pgbench -N -c 2 for $LOAD_SECS s: $WAL_MB MB of WAL replayed by each restore ($REPEAT interleaved rounds, cold page cache)"
printf '  %-44s %8s  [%s]\n' "walnut wal-fetch (prefetch, file://)" "$(med "$R/replay.walnut") s" "$(spread "$R/replay.walnut")"
printf '  %-44s %8s  [%s]\n' "cp from a local directory (the floor)" "$(med "$R/replay.cp") s" "$(spread "$R/replay.cp")"
awk -v a="$(med "$R/replay.walnut")" -v b="$(med "$R/replay.cp")" 'BEGIN {printf "  walnut / floor = %.3f (goal <= 1.05: %s)\n", a / b, (a / b <= 1.05 ? "met" : "NOT met")}'
echo "  (time from pg_ctl start to the end of recovery; medians, [min-max])"
