#!/usr/bin/env bash
# bench/drain.sh: how fast each archiver drains a backlog of .ready WAL segments, and what it
# costs in CPU: walnut's WAL worker against pgBackRest archive-async, on file:// and on S3 (the same
# loopback S3 server behind the same HTTPS front for both), on two datasets, in one run.
#
#   nice -n 10 bash bench/drain.sh
#
# For each dataset a cluster is made (bench/lib.sh), archiving is paused (archive_command = '')
# and WAL is generated until BACKLOG_MB of .ready segments wait: pgbench (pgbench -i, repeated)
# and realistic (rows of the realistic table copied with new random text: heap and two indexes).
# The stopped cluster is kept as a snapshot. Each run copies the snapshot, starts it with the
# target's archive_command and times until no .ready file is left (the archive command returned
# success for every segment: stored). Targets, each with a fresh repository:
#   walnut-{file,s3}-uaN   [wal] worker = true, upload_ahead = N (the worker stores N at a time)
#   pgbr-{file,s3}-pmN     pgBackRest archive-async = y, process-max = N
#   cp-sync                cp %p DIR/%f && sync DIR/%f (the local floor); true: /bin/true
# Every tool at compression level 1 (zstd). walnut verifies the server's certificate (ca_file);
# pgBackRest is told not to (repo1-storage-verify-tls = n).
# CPU: whole-machine (every process, the S3 server and its TLS front included) and the server's
# process tree (PostgreSQL, the archive commands and what they start: walnut's worker,
# pgBackRest's async process), from a cpuacct cgroup, each per GiB of WAL drained.
#
# Knobs: BACKLOG_MB=1024, REPEAT=3 (interleaved rounds), DATASETS="pgbench realistic", UA="2 4"
# (walnut upload_ahead and pgBackRest process-max pairs), SKIP_PGBACKREST=1, SKIP_S3=1, NO_WAIT=1,
# KEEP=1. Needs root, PostgreSQL 15, and 2 * (BACKLOG_MB + the dataset) of free space in /tmp.
set -euo pipefail
shopt -s inherit_errexit
export LC_ALL=C
cd "$(dirname "$0")/.."
SRC=$(pwd)
BACKLOG_MB=${BACKLOG_MB:-1024} REPEAT=${REPEAT:-3} DATASETS=${DATASETS:-pgbench realistic} UA=${UA:-2 4}
SCALE=${SCALE:-10} ROWS=${ROWS:-400000} STEP_TIMEOUT=900
PGBIN=/usr/lib/postgresql/15/bin PORT=54341 LOCK=/tmp/walnut-bench.lock
[[ $(id -u) == 0 ]] || { echo "run as root (PostgreSQL is run as the postgres OS user)" >&2; exit 2; }
[[ -x $PGBIN/postgres ]] || { echo "PostgreSQL 15 not found in $PGBIN (bash scripts/setup.sh)" >&2; exit 2; }
BENCH_NAME=drain S3_TLS=1
# shellcheck source=bench/lib.sh
source "$SRC/bench/lib.sh"
RUN=$W/run CG_ROOT=/sys/fs/cgroup/cpuacct CG=''
CG_NOTE="cpuacct cgroup: the server's process tree"
if ! mkdir "$CG_ROOT/walnut-drain-probe-$$" 2>/dev/null; then CG_ROOT='' CG_NOTE="no writable cpuacct cgroup: server-tree CPU not measured"; say "$CG_NOTE"
else rmdir "$CG_ROOT/walnut-drain-probe-$$"; fi

TARGETS=(true cp-sync)
for n in $UA; do TARGETS+=("walnut-file-ua$n"); done
((HAVE_S3)) && for n in $UA; do TARGETS+=("walnut-s3-ua$n"); done
if ((HAVE_PGBR)); then
  for n in $UA; do TARGETS+=("pgbr-file-pm$n"); done
  ((HAVE_S3)) && for n in $UA; do TARGETS+=("pgbr-s3-pm$n"); done
fi

# ---------------------------------------------------------------- configurations (one repository per run)
drain_walnut_conf() { # NAME REPO N: the worker, N at a time
  local f=$W/conf/$1.toml
  printf 'repo = "%s"\nstate_dir = "%s"\ncompression = "zstd"\ncompression_level = 1\n[wal]\nworker = true\nupload_ahead = %s\nprefetch = 0\n' \
    "$2" "$W/state/$1" "$3" >"$f"
  [[ $2 == s3://* ]] && printf '[s3]\nendpoint = "%s"\nregion = "us-east-1"\naccess_key_id = "%s"\nsecret_access_key = "%s"\nforce_path_style = true\nca_file = "%s"\n' \
    "$S3_HTTPS" "$S3_ID" "$S3_SECRET" "$S3_CA" >>"$f"
  if [[ $2 == file://* ]]; then mkdir -p "${2#file://}"; fi
  chown -R postgres:postgres "$f" "$W/repo" "$W/state"
  echo "$f"
}
drain_pgbr_conf() { # NAME KIND(file|s3) N: archive-async, process-max N; the stanza made now
  local f=$W/pgbr/$1.conf repo
  mkdir -p "$W/pgbr/spool-$1" "$W/pgbr/$1"
  if [[ $2 == s3 ]]; then
    local hostport=${S3_HTTPS#https://}
    repo="repo1-type=s3
repo1-path=/pgbr/$1
repo1-s3-bucket=walnut
repo1-s3-endpoint=${hostport%:*}
repo1-storage-port=${hostport##*:}
repo1-s3-region=us-east-1
repo1-s3-key=$S3_ID
repo1-s3-key-secret=$S3_SECRET
repo1-s3-uri-style=path
repo1-storage-verify-tls=n"
  else
    repo="repo1-path=$W/pgbr/$1"
  fi
  cat >"$f" <<EOF
[global]
$repo
compress-type=zst
compress-level=1
archive-async=y
spool-path=$W/pgbr/spool-$1
process-max=$3
log-level-console=warn
log-level-stderr=warn
log-level-file=off
lock-path=$W/pgbr/lock
[bench]
pg1-path=$RUN
pg1-port=$PORT
pg1-socket-path=$W/sock
pg1-user=postgres
EOF
  chown -R postgres:postgres "$W/pgbr"
  "${AS_PG[@]}" timeout 120 pgbackrest --config="$f" --stanza=bench stanza-create >>"$W/pgbr.log" 2>&1 || { tail -5 "$W/pgbr.log" >&2; die "pgBackRest stanza-create $1"; }
  echo "$f"
}
# archive_cmd DS TARGET ROUND: the archive_command of one run (configurations made beforehand)
archive_cmd() {
  local name=$1-$2-$3
  case $2 in
    true) echo "/bin/true" ;;
    cp-sync) echo "cp %p $W/arch/$name/%f && sync $W/arch/$name/%f" ;;
    walnut-*) echo "$WALNUT -q --config $W/conf/$name.toml wal-push %p" ;;
    pgbr-*) echo "pgbackrest --config=$W/pgbr/$name.conf --stanza=bench archive-push %p" ;;
  esac
}
make_confs() { # DS: every run's configuration (the pgBackRest stanzas need the run's cluster up)
  local ds=$1 t r name
  for ((r = 1; r <= REPEAT; r++)); do
    for t in "${TARGETS[@]}"; do
      name=$ds-$t-$r
      case $t in
        cp-sync) mkdir -p "$W/arch/$name" && chown postgres:postgres "$W/arch" "$W/arch/$name" ;;
        walnut-file-ua*) drain_walnut_conf "$name" "file://$W/repo/$name" "${t##*-ua}" >/dev/null ;;
        walnut-s3-ua*) drain_walnut_conf "$name" "s3://walnut/$name" "${t##*-ua}" >/dev/null ;;
        pgbr-file-pm*) drain_pgbr_conf "$name" file "${t##*-pm}" >/dev/null ;;
        pgbr-s3-pm*) drain_pgbr_conf "$name" s3 "${t##*-pm}" >/dev/null ;;
      esac
    done
  done
}

# ---------------------------------------------------------------- the backlog
run_start() { # as postgres, in the cgroup when there is one
  if [[ -n $CG ]]; then
    (echo "$BASHPID" >"$CG/cgroup.procs" && exec "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$RUN" -l "$RUN.log" -w -t 120 start >/dev/null 9>&-)
  else
    "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$RUN" -l "$RUN.log" -w -t 120 start >/dev/null 9>&-
  fi || { tail -20 "$RUN.log" >&2; die "the run's server did not start"; }
}
run_stop() { "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$RUN" -m "${1:-immediate}" -w -t 120 stop >/dev/null; }
run_sql() { PGOPTIONS='-c client_min_messages=warning' "${AS_PG[@]}" "$PGBIN/psql" -X -A -t -q -v ON_ERROR_STOP=1 -h "$W/sock" -p "$PORT" -U postgres -d postgres -c "$1"; }
ready_count() { find "$RUN/pg_wal/archive_status" -name '*.ready' | wc -l; }

make_backlog() { # DS: PGDATA (running, archiving to /bin/true) becomes the snapshot $W/DS/snap
  local ds=$1 lsn0 gen i=0
  sql "ALTER SYSTEM SET archive_command = ''"; sql "SELECT pg_reload_conf()" >/dev/null
  sql "CHECKPOINT"
  lsn0=$(sql "SELECT pg_current_wal_lsn()")
  [[ $ds == realistic ]] && sql "CREATE INDEX IF NOT EXISTS orders_id ON orders (id)"
  while :; do
    gen=$(sql "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '$lsn0')::bigint / 1048576")
    ((gen < BACKLOG_MB)) || break
    ((++i < 200)) || die "$ds: no $BACKLOG_MB MB of WAL after 200 rounds"
    if [[ $ds == pgbench ]]; then
      "${AS_PG[@]}" timeout 900 "$PGBIN/pgbench" -h "$W/sock" -p "$PORT" -U postgres -i -s "$SCALE" -q postgres >>"$W/$ds/backlog.log" 2>&1 || die "pgbench -i"
    else
      # New rows: the same shape, new random text, through the heap and both indexes.
      sql "INSERT INTO orders SELECT id + (SELECT max(id) FROM orders), account_id, md5(random()::text), email, note, qty, price,
             created + random() * interval '1 day', status, substr(md5(random()::text) || md5(random()::text), 1, floor(random() * 64)::int)
           FROM orders WHERE id <= 100000"
    fi
  done
  sql "SELECT pg_switch_wal()" >/dev/null
  pg_stop
  # The run's own archive_command comes last in postgresql.conf; ALTER SYSTEM's must not win.
  rm -f "$PGDATA/postgresql.auto.conf"
  mv "$PGDATA" "$W/$ds/snap"
  PGDATA=$RUN # so that the cleanup stops a run's server
  say "$ds: backlog of $(find "$W/$ds/snap/pg_wal/archive_status" -name '*.ready' | wc -l) segments ($gen MB of WAL)"
}

# ---------------------------------------------------------------- one drain
machine_cpu() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
fresh_run() { # DS: a copy of the snapshot at $RUN
  rm -rf "$RUN" "$RUN.log"
  cp -a "$W/$1/snap" "$RUN"
}
drain() { # DS TARGET ROUND
  local ds=$1 t=$2 r=$3 cmd ready0 t0 t1 c0 c1 g=0 done_n failed end
  cmd=$(archive_cmd "$ds" "$t" "$r")
  fresh_run "$ds"
  echo "archive_command = '$cmd'" >>"$RUN/postgresql.conf"
  ready0=$(ready_count)
  sync
  if [[ -n $CG_ROOT ]]; then CG=$CG_ROOT/walnut-drain-$$; mkdir -p "$CG"; fi
  c0=$(machine_cpu) t0=$EPOCHREALTIME
  run_start
  end=$((SECONDS + STEP_TIMEOUT))
  while (($(ready_count) > 0)); do
    ((SECONDS < end)) || die "$ds $t: not drained in $STEP_TIMEOUT s"
    # An archive command that fails three times in a row is not going to drain: say why, now.
    ! grep -q 'failed too many times' "$RUN.log" || { grep -v '^\s*$' "$RUN.log" | tail -6 >&2; die "$ds $t: the archive command fails"; }
    sleep 0.05
  done
  t1=$EPOCHREALTIME c1=$(machine_cpu)
  [[ -n $CG ]] && g=$(cat "$CG/cpuacct.usage")
  failed=$(run_sql "SELECT failed_count FROM pg_stat_archiver")
  run_stop
  # What the archive commands started: stopped before the next run.
  pkill -f -- "--config $W/conf/$ds-$t-$r.toml" 2>/dev/null || true
  pkill -f "pgbackrest --config=$W/pgbr/$ds-$t-$r.conf" 2>/dev/null || true
  if [[ -n $CG ]]; then
    for _ in $(seq 100); do [[ -s $CG/cgroup.procs ]] || break; sleep 0.1; done
    rmdir "$CG" 2>/dev/null || { xargs -r kill -9 <"$CG/cgroup.procs"; sleep 0.5; rmdir "$CG"; }
    CG=''
  fi
  done_n=$(find "$RUN/pg_wal/archive_status" -name '*.done' | wc -l)
  ((done_n >= ready0)) || die "$ds $t: $done_n segments archived of $ready0"
  # seconds, segments, machine CPU s, server-tree CPU s, failed archive attempts
  awk -v a="$t0" -v b="$t1" -v n="$ready0" -v c="$((c1 - c0))" -v hz="$(getconf CLK_TCK)" -v g="$g" -v f="$failed" \
    'BEGIN {printf "%.3f %d %.2f %.2f %d\n", b - a, n, c / hz, g / 1e9, f}' >>"$R/$ds.$t.runs"
  say "$ds $t round $r: $(tail -1 "$R/$ds.$t.runs" | awk '{printf "%d segments in %.2f s (%.1f/s), machine CPU %.2f s, server tree %.2f s, %d failed attempts", $2, $1, $2 / $1, $3, $4, $5}')"
}

# ---------------------------------------------------------------- run
for ds in $DATASETS; do
  make_cluster "$ds"
  make_backlog "$ds"
  fresh_run "$ds"
  echo "archive_command = ''" >>"$RUN/postgresql.conf"
  run_start
  make_confs "$ds"
  run_stop fast
  for ((r = 1; r <= REPEAT; r++)); do
    say "$ds: round $r of $REPEAT"
    for t in "${TARGETS[@]}"; do drain "$ds" "$t" "$r"; done
  done
  rm -rf "$W/$ds/snap" "$RUN" "$W/repo" "$W/arch" "$S3_BUCKET_DIR"/* "$W/pgbr/$ds"-* "$W/pgbr/spool-$ds"-*
done

# ---------------------------------------------------------------- report
# col FILE N: median [min-max] of column N over the runs
stat_of() { # FILE EXPR(awk, of $1..$5): median min max
  awk "{print $2}" "$1" | sort -g | awk '{a[NR] = $1} END {printf "%.2f %.2f %.2f\n", NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2, a[1], a[NR]}'
}
GIB='($2 * 16 / 1024)'
echo
echo "walnut drain benchmark  walnut $REV_DESC  $(date -u +%Y-%m-%dT%H:%MZ)  $(nproc) cores  PostgreSQL $("$PGBIN/postgres" -V | awk '{print $3}')  $( ((HAVE_PGBR)) && pgbackrest version || echo "$PGBR_NOTE")"
echo "a backlog of ~$BACKLOG_MB MB of .ready segments per dataset, drained by each target $REPEAT times (interleaved); median [min-max]; zstd level 1 for every tool; S3: one loopback server behind one HTTPS front; ${S3_NOTE:-}"
echo "CPU s/GiB: whole machine (/proc/stat) and the server's tree ($CG_NOTE)"
for ds in $DATASETS; do
  echo "-- $ds"
  printf '  %-16s %9s %22s %22s %26s %26s %7s\n' target segments "drain s" "segments/s" "machine CPU s/GiB" "tree CPU s/GiB" failed
  for t in "${TARGETS[@]}"; do
    f=$R/$ds.$t.runs
    [[ -s $f ]] || continue
    read -r sm slo shi < <(stat_of "$f" '$1')
    read -r rm rlo rhi < <(stat_of "$f" '$2 / $1')
    read -r cm clo chi < <(stat_of "$f" "\$3 / $GIB")
    read -r gm glo ghi < <(stat_of "$f" "\$4 / $GIB")
    printf '  %-16s %9s %22s %22s %26s %26s %7s\n' "$t" "$(head -1 "$f" | cut -d' ' -f2)" "$sm [$slo-$shi]" "$rm [$rlo-$rhi]" "$cm [$clo-$chi]" \
      "$( [[ -n $CG_ROOT ]] && echo "$gm [$glo-$ghi]" || echo n/a)" "$(awk '{s += $5} END {print s}' "$f")"
    echo "$rm $cm $gm" >"$R/$ds.$t.med"
  done
  for kind in file s3; do
    for n in $UA; do
      a=$R/$ds.walnut-$kind-ua$n.med b=$R/$ds.pgbr-$kind-pm$n.med
      [[ -s $a && -s $b ]] || continue
      read -r ar ac ag <"$a"; read -r br bc bg <"$b"
      awk -v k="$kind" -v n="$n" -v ar="$ar" -v br="$br" -v ac="$ac" -v bc="$bc" -v ag="$ag" -v bg="$bg" -v cores="$(nproc)" 'BEGIN {
        printf "  %s, %d at a time: walnut drains %.2fx pgBackRest'"'"'s speed at %.2fx its machine CPU per GiB and %.2fx its server-tree CPU (goal >= 2x at <= 1x: %s)\n",
          k, n, ar / br, ac / bc, (bg > 0 ? ag / bg : 0), (ar / br >= 2 && ac / bc <= 1 ? "met" : "NOT met")
        # What the goal asks of the machine: at twice the speed and the same CPU per GiB, twice the busy cores.
        printf "    pgBackRest keeps %.2f cores busy (machine CPU / drain time); twice its speed at its CPU per GiB needs %.2f cores, the machine has %d\n",
          bc * br * 16 / 1024, 2 * bc * br * 16 / 1024, cores }'
    done
  done
done
