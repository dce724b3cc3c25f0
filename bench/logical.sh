#!/usr/bin/env bash
# bench/logical.sh: logical captures and restores, walnut against plain pg_dump / pg_restore in the
# same run, on two datasets of about 1.5 GB: pgbench (scale 100) and "realistic" (mixed text, hex,
# numbers, timestamps and two indexes; it compresses like real data).
#
#   nice -n 10 bash bench/logical.sh
#
# Timed, each REPEAT times in interleaved rounds (median and min-max shown):
#   capture  walnut logical capture (pg_dump --format=custom --compress=0 streamed through zstd-1,
#            SHA-256 and the repository, file://)
#            pg_dump -Fc -f FILE             (the plain command: pg_dump's own gzip, level 6)
#            pg_dump -Fc -Z0 | zstd -1 > FILE (like for like: the same compression as walnut's)
#            pg_dump -Fc -Z0 -f FILE          (no compression: the floor of the dump itself)
#   restore  walnut logical restore LATEST --to DB --jobs 2 (fetch, check, decompress, pg_restore)
#            pg_restore -j 2 of the plain -Fc file, and of the -Z0 file (the floor)
#            each into a newly created empty database
#   --at     walnut logical capture --at T, end to end: a fork restored from a base backup (taken
#            untimed just before) and the WAL archive to T, started, dumped, stopped and removed
# Nothing is archived during the dumps and restores (archive_command = /bin/true): a restore
# writes as much WAL as the database holds, and archiving it loaded whichever step came next.
# The goal of issue 15: walnut adds <= 10% to the like-for-like dump and to the restore.
#
# Knobs: SCALE=100, ROWS=5200000, DATASETS="pgbench realistic", REPEAT=3, STEP_TIMEOUT=1200,
# SKIP_AT=1 (no --at runs), NO_WAIT=1, KEEP=1. Needs root, PostgreSQL 15, ~12 GB free in /tmp.
set -euo pipefail
shopt -s inherit_errexit
export LC_ALL=C
cd "$(dirname "$0")/.."
SRC=$(pwd)
SCALE=${SCALE:-100} ROWS=${ROWS:-5200000} DATASETS=${DATASETS:-pgbench realistic}
STEP_TIMEOUT=${STEP_TIMEOUT:-1200} REPEAT=${REPEAT:-3}
PGBIN=/usr/lib/postgresql/15/bin PORT=54339 LOCK=/tmp/walnut-bench.lock
[[ $(id -u) == 0 ]] || { echo "run as root (PostgreSQL is run as the postgres OS user)" >&2; exit 2; }
[[ -x $PGBIN/postgres ]] || { echo "PostgreSQL 15 not found in $PGBIN (bash scripts/setup.sh)" >&2; exit 2; }
command -v zstd >/dev/null || { apt-get update -qq && apt-get install -y -qq zstd; } >/dev/null
BENCH_NAME=logical SKIP_S3=1 SKIP_PGBACKREST=1
# shellcheck source=bench/lib.sh
source "$SRC/bench/lib.sh"

CONN="host=$W/sock port=$PORT user=postgres"
# fresh_db NAME: an empty database, and no dirty buffers left by the step before (untimed)
fresh_db() { sql "DROP DATABASE IF EXISTS $1" >/dev/null; sql "CREATE DATABASE $1" >/dev/null; sql "CHECKPOINT" >/dev/null; }
# dump_bytes DS KEY FILE: the size of what a step wrote
file_bytes() { stat -c %s "$3" >"$R/$1.$2.stored"; }

for ds in $DATASETS; do
  make_cluster "$ds"
  c=$(walnut_conf "$ds" "file://$W/repo/$ds")
  DB_BYTES=$(sql "SELECT pg_database_size('postgres')")
  echo "$DB_BYTES" >"$R/$ds.data" # throughput and ratios below are per byte of the database
  for ((rep = 1; rep <= REPEAT; rep++)); do
    # Restores write as much WAL as the database holds: archiving it would load the machine
    # during whichever step follows, so nothing is archived during the timed dumps and restores.
    set_archive /bin/true
    say "$ds: round $rep of $REPEAT"
    step "$ds" lc.capture "$WALNUT" -q --config "$c" logical capture --database postgres || true
    "${AS_PG[@]}" "$WALNUT" -q --config "$c" --json logical show LATEST >"$W/$ds/show.json"
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["size"])' "$W/$ds/show.json" >"$R/$ds.lc.capture.stored"
    rm -f "$W/$ds/dump".*
    step "$ds" pd.fc "$PGBIN/pg_dump" -h "$W/sock" -p "$PORT" -U postgres -Fc -f "$W/$ds/dump.fc" postgres || true
    file_bytes "$ds" pd.fc "$W/$ds/dump.fc"
    step "$ds" pd.zstd bash -o pipefail -c "'$PGBIN/pg_dump' -h '$W/sock' -p $PORT -U postgres -Fc -Z0 postgres | zstd -1 -q -o '$W/$ds/dump.zst'" || true
    file_bytes "$ds" pd.zstd "$W/$ds/dump.zst"
    rm -f "$W/$ds/dump.zst"
    step "$ds" pd.z0 "$PGBIN/pg_dump" -h "$W/sock" -p "$PORT" -U postgres -Fc -Z0 -f "$W/$ds/dump.z0" postgres || true
    file_bytes "$ds" pd.z0 "$W/$ds/dump.z0"

    # The three restores in a rotating order: none always comes first or after the same step.
    for ((k = 0; k < 3; k++)); do
      fresh_db target
      case $(((rep + k) % 3)) in
        0) step "$ds" lc.restore "$WALNUT" -q --config "$c" logical restore LATEST --to "$CONN dbname=target" --jobs 2 || true ;;
        1) step "$ds" pr.fc "$PGBIN/pg_restore" -h "$W/sock" -p "$PORT" -U postgres -j 2 -d target "$W/$ds/dump.fc" || true ;;
        2) step "$ds" pr.z0 "$PGBIN/pg_restore" -h "$W/sock" -p "$PORT" -U postgres -j 2 -d target "$W/$ds/dump.z0" || true ;;
      esac
    done
    sql "DROP DATABASE target" >/dev/null

    if [[ -z ${SKIP_AT:-} ]]; then
      # A base backup and its WAL archived (untimed), then T; the fork replays to it.
      set_archive "$WALNUT -q --config $c wal-push %p"
      "${AS_PG[@]}" "$WALNUT" -q --config "$c" backup-push --pgdata "$PGDATA" >"$W/$ds/backup.log" 2>&1 || die "backup-push: $(tail -3 "$W/$ds/backup.log")"
      sql "CREATE TABLE IF NOT EXISTS bench_at (round int, t timestamptz default clock_timestamp())"
      sql "INSERT INTO bench_at (round) VALUES ($rep)"
      T=$(sql "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
      sql "INSERT INTO bench_at (round) VALUES (-$rep)"
      seg=$(sql "SELECT pg_walfile_name(pg_switch_wal())")
      until [[ $(sql "SELECT coalesce(last_archived_wal, '') >= '$seg' FROM pg_stat_archiver") == t ]]; do sleep 0.2; done
      step "$ds" lc.at "$WALNUT" -q --config "$c" logical capture --database postgres --at "$T" || true
    fi
    # The captures of this round are deleted (untimed), so the repository does not grow.
    for id in $("${AS_PG[@]}" "$WALNUT" -q --config "$c" --json logical list | python3 -c 'import json,sys; [print(c["id"]) for c in json.load(sys.stdin)]'); do
      "${AS_PG[@]}" "$WALNUT" -q --config "$c" logical delete "$id" >/dev/null
    done
  done
  rm -f "$W/$ds/dump".*
  pg_stop
  rm -rf "$W/$ds" "$W/repo/$ds" && PGDATA=''
done

# ---------------------------------------------------------------- report
spread() { [[ -s $R/$1.$2.spread ]] && awk '{printf "%.1f-%.1f", $1, $2}' "$R/$1.$2.spread" || echo '-'; }
echo
echo "walnut logical benchmark  walnut $REV_DESC  $(date -u +%Y-%m-%dT%H:%MZ)  $(nproc) cores  PostgreSQL $("$PGBIN/postgres" -V | awk '{print $3}')"
echo "median of $REPEAT interleaved rounds [min-max]; MB/s = database bytes (pg_database_size) per second; stored = bytes written;"
echo "max RSS = the largest process (/usr/bin/time -v); sum RSS = peak over the command's processes (pg_dump/pg_restore included)"
for ds in $DATASETS; do
  echo
  case $ds in
    pgbench) d="pgbench -i -s $SCALE" ;;
    realistic) d="$ROWS rows of words, md5 hex, e-mails, numbers, timestamps + 2 indexes" ;;
  esac
  echo "$ds: $d, database $(awk '{printf "%.0f MB", $1 / 1e6}' "$R/$ds.data")"
  printf '  %-46s %9s %11s %7s %9s %8s %8s\n' step seconds spread MB/s "stored MB" "max RSS" "sum RSS"
  for k in lc.capture pd.fc pd.zstd pd.z0 lc.restore pr.fc pr.z0 lc.at; do
    [[ -s $R/$ds.$k.secs || $(num "$R/$ds.$k.status") == FAILED ]] || continue
    case $k in
      lc.capture) n="walnut logical capture (zstd-1, file://)" ;;
      pd.fc) n="pg_dump -Fc -f FILE (gzip 6)" ;;
      pd.zstd) n="pg_dump -Fc -Z0 | zstd -1 > FILE" ;;
      pd.z0) n="pg_dump -Fc -Z0 -f FILE" ;;
      lc.restore) n="walnut logical restore --jobs 2" ;;
      pr.fc) n="pg_restore -j 2 (the gzip file)" ;;
      pr.z0) n="pg_restore -j 2 (the -Z0 file)" ;;
      lc.at) n="walnut logical capture --at T (end to end)" ;;
    esac
    printf '  %-46s %9s %11s %7s %9s %8s %8s\n' "$n" "$(cell "$ds" "$k" secs)" "$(spread "$ds" "$k")" "$(cell "$ds" "$k" mbs)" \
      "$(cell "$ds" "$k" stored)" "$(cell "$ds" "$k" rss)" "$(cell "$ds" "$k" tree)"
  done
  a=$(ratio_of "$ds" lc.capture pd.zstd secs) b=$(ratio_of "$ds" lc.capture pd.fc secs)
  c2=$(ratio_of "$ds" lc.restore pr.z0 secs) d2=$(ratio_of "$ds" lc.restore pr.fc secs)
  echo "  capture: walnut / (pg_dump -Z0 | zstd -1) = $a, walnut / pg_dump -Fc = $b (goal <= 1.10 like for like)"
  echo "  restore: walnut / pg_restore -j 2 of the -Z0 file = $c2, of the gzip file = $d2 (goal <= 1.10)"
done
echo "  (* a build or another bench ran during that step: its time is suspect)"
((${#FAILED[@]} == 0)) || { echo "FAILED steps: ${FAILED[*]}"; exit 1; }
