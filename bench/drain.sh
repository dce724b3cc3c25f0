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
# CPU: whole-machine (every process, the S3 server and its TLS front included) and the archiver's
# (the archive commands and what they start: walnut's worker, pgBackRest's async and local
# processes; each archive command first joins a cpuacct cgroup), each per GiB of WAL drained.
#
# Live phase (pgbench dataset): the snapshot with its backlog marked archived, started with a
# target's archive_command (the first UA figure) under pgbench -N (CLIENTS clients, LIVE_SECS s,
# synchronous_commit off as in every bench cluster: the database keeps both cores busy). A sampler
# sees each segment's .done file appear: archive lag = then - its mtime (the .ready file's, kept by
# the rename: when PostgreSQL asked for the segment), p50/p99/max. What archiving takes from the database: tps against the
# `true` target of the same round, and the archiver's CPU (cgroup) per GiB of WAL and in cores.
#
# Knobs: BACKLOG_MB=1024, REPEAT=3 (interleaved rounds), DATASETS="pgbench realistic", UA="2 4"
# (walnut upload_ahead and pgBackRest process-max pairs), LIVE_SECS=30 (0: no live phase),
# CLIENTS=4, SKIP_PGBACKREST=1, SKIP_S3=1, NO_WAIT=1, KEEP=1. Needs root, PostgreSQL 15, python3,
# and 2 * (BACKLOG_MB + the dataset) of free space in /tmp.
set -euo pipefail
shopt -s inherit_errexit
export LC_ALL=C
cd "$(dirname "$0")/.."
SRC=$(pwd)
BACKLOG_MB=${BACKLOG_MB:-1024} REPEAT=${REPEAT:-3} DATASETS=${DATASETS:-pgbench realistic} UA=${UA:-2 4}
SCALE=${SCALE:-10} ROWS=${ROWS:-400000} STEP_TIMEOUT=900 LIVE_SECS=${LIVE_SECS:-30} CLIENTS=${CLIENTS:-4}
PGBIN=/usr/lib/postgresql/15/bin PORT=54341 LOCK=/tmp/walnut-bench.lock
[[ $(id -u) == 0 ]] || { echo "run as root (PostgreSQL is run as the postgres OS user)" >&2; exit 2; }
[[ -x $PGBIN/postgres ]] || { echo "PostgreSQL 15 not found in $PGBIN (bash scripts/setup.sh)" >&2; exit 2; }
BENCH_NAME=drain S3_TLS=1
# shellcheck source=bench/lib.sh
source "$SRC/bench/lib.sh"
RUN=$W/run CG_ROOT=/sys/fs/cgroup/cpuacct CG=''
CG_NOTE="cpuacct cgroup joined by each archive command"
if ! mkdir "$CG_ROOT/walnut-drain-probe-$$" 2>/dev/null; then CG_ROOT='' CG_NOTE="no writable cpuacct cgroup: archiver CPU not measured"; say "$CG_NOTE"
else rmdir "$CG_ROOT/walnut-drain-probe-$$"; fi
# The archiver's cgroup (one at a time): each archive command joins it first.
ACG=${CG_ROOT:+$CG_ROOT/walnut-archiver-$$}

TARGETS=(true cp-sync)
for n in $UA; do TARGETS+=("walnut-file-ua$n"); done
((HAVE_S3)) && for n in $UA; do TARGETS+=("walnut-s3-ua$n"); done
if ((HAVE_PGBR)); then
  for n in $UA; do TARGETS+=("pgbr-file-pm$n"); done
  ((HAVE_S3)) && for n in $UA; do TARGETS+=("pgbr-s3-pm$n"); done
fi
LIVE_N=${UA%% *} LIVE_TARGETS=()
if ((LIVE_SECS > 0)) && [[ " $DATASETS " == *" pgbench "* ]]; then
  for t in "${TARGETS[@]}"; do [[ $t == true || $t == cp-sync || $t == *-ua$LIVE_N || $t == *-pm$LIVE_N ]] && LIVE_TARGETS+=("$t"); done
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
  [[ -n $ACG ]] && printf 'echo $$ >>%s/cgroup.procs && ' "$ACG"
  case $2 in
    true) echo "/bin/true" ;;
    cp-sync) echo "cp %p $W/arch/$name/%f && sync $W/arch/$name/%f" ;;
    walnut-*) echo "$WALNUT -q --config $W/conf/$name.toml wal-push %p" ;;
    pgbr-*) echo "pgbackrest --config=$W/pgbr/$name.conf --stanza=bench archive-push %p" ;;
  esac
}
make_confs() { # DS ROUND...: every run's configuration (the pgBackRest stanzas need the run's cluster up)
  local ds=$1 t r name targets=("${TARGETS[@]}")
  shift
  for r in "$@"; do
    [[ $r == L* ]] && targets=("${LIVE_TARGETS[@]}")
    for t in "${targets[@]}"; do
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
run_start() { "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$RUN" -l "$RUN.log" -w -t 120 start >/dev/null 9>&- || { tail -20 "$RUN.log" >&2; die "the run's server did not start"; }; }
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
cg_begin() { [[ -z $ACG ]] && return; CG=$ACG; mkdir -p "$CG"; chown postgres:postgres "$CG/cgroup.procs"; }
# cg_end NAME: CG_NS = the archiver's CPU ns (0 without a cgroup). What the archive commands started
# (the worker, pgBackRest's async process) may outlive the server: it is stopped first, and what it
# spent until then counts.
cg_end() {
  local name=$1
  CG_NS=0
  pkill -f -- "--config $W/conf/$name.toml" 2>/dev/null || true
  pkill -f "pgbackrest --config=$W/pgbr/$name.conf" 2>/dev/null || true
  if [[ -n $CG ]]; then
    # (cgroup files have no size: -s would not wait)
    for _ in $(seq 100); do [[ -n $(cat "$CG/cgroup.procs") ]] || break; sleep 0.1; done
    CG_NS=$(cat "$CG/cpuacct.usage")
    rmdir "$CG" 2>/dev/null || { xargs -r kill -9 <"$CG/cgroup.procs"; sleep 0.5; rmdir "$CG"; }
    CG=''
  fi
}
fresh_run() { # DS: a copy of the snapshot at $RUN
  rm -rf "$RUN" "$RUN.log"
  cp -a "$W/$1/snap" "$RUN"
}
drain() { # DS TARGET ROUND
  local ds=$1 t=$2 r=$3 cmd ready0 t0 t1 c0 c1 done_n failed end
  cmd=$(archive_cmd "$ds" "$t" "$r")
  fresh_run "$ds"
  echo "archive_command = '$cmd'" >>"$RUN/postgresql.conf"
  ready0=$(ready_count)
  sync
  cg_begin
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
  failed=$(run_sql "SELECT failed_count FROM pg_stat_archiver")
  run_stop
  cg_end "$ds-$t-$r"
  done_n=$(find "$RUN/pg_wal/archive_status" -name '*.done' | wc -l)
  ((done_n >= ready0)) || die "$ds $t: $done_n segments archived of $ready0"
  # seconds, segments, machine CPU s, archiver CPU s, failed archive attempts
  awk -v a="$t0" -v b="$t1" -v n="$ready0" -v c="$((c1 - c0))" -v hz="$(getconf CLK_TCK)" -v g="$CG_NS" -v f="$failed" \
    'BEGIN {printf "%.3f %d %.2f %.2f %d\n", b - a, n, c / hz, g / 1e9, f}' >>"$R/$ds.$t.runs"
  say "$ds $t round $r: $(tail -1 "$R/$ds.$t.runs" | awk '{printf "%d segments in %.2f s (%.1f/s), machine CPU %.2f s, archiver %.2f s, %d failed attempts", $2, $1, $2 / $1, $3, $4, $5}')"
}

# ---------------------------------------------------------------- live: archive lag under pgbench
# The sampler: a segment's .ready file becomes its .done file by a rename, which keeps the mtime
# PostgreSQL gave the .ready file when it asked for the segment; each new .done file, seen within
# 10 ms, gives "name lag_ms" on stdout. Files there when it starts are not counted.
cat >"$W/readylag.py" <<'PY'
import os, signal, sys, time
d = sys.argv[1]
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
old = set(os.listdir(d))
while True:
    now = time.time()
    for n in os.listdir(d):
        if n in old or not n.endswith(".done"):
            continue
        old.add(n)
        try:
            print(f"{n[:-5]} {(now - os.stat(os.path.join(d, n)).st_mtime) * 1000:.1f}", flush=True)
        except FileNotFoundError:
            pass
    if stop:
        break
    time.sleep(0.01)
PY
live() { # TARGET ROUND: pgbench -N for LIVE_SECS with the target archiving
  local ds=pgbench t=$1 r=$2 cmd f sp lsn0 wal t0 t1 c0 c1 end failed tps
  cmd=$(archive_cmd "$ds" "$t" "$r")
  fresh_run "$ds"
  for f in "$RUN"/pg_wal/archive_status/*.ready; do mv "$f" "${f%.ready}.done"; done
  echo "archive_command = '$cmd'" >>"$RUN/postgresql.conf"
  cg_begin
  run_start
  python3 "$W/readylag.py" "$RUN/pg_wal/archive_status" >"$R/live.$t.$r.lag" &
  sp=$! SAMPLER_PID=$!
  lsn0=$(run_sql "SELECT pg_current_wal_lsn()")
  c0=$(machine_cpu) t0=$EPOCHREALTIME
  "${AS_PG[@]}" "$PGBIN/pgbench" -n -N -c "$CLIENTS" -j 2 -T "$LIVE_SECS" -h "$W/sock" -p "$PORT" -U postgres postgres >"$W/live.out" 2>&1 ||
    { tail -5 "$W/live.out" >&2; die "live $t: pgbench failed"; }
  t1=$EPOCHREALTIME c1=$(machine_cpu)
  wal=$(run_sql "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '$lsn0')::bigint")
  # The segments filled during the run: each archived before the run ends.
  end=$((SECONDS + 300))
  while (($(ready_count) > 0)); do
    ((SECONDS < end)) || die "live $t: segments still .ready 300 s after pgbench"
    ! grep -q 'failed too many times' "$RUN.log" || { grep -v '^\s*$' "$RUN.log" | tail -6 >&2; die "live $t: the archive command fails"; }
    sleep 0.05
  done
  sleep 0.05 # one more sampler pass sees the last .done
  kill "$sp"; wait "$sp" || true
  SAMPLER_PID=''
  failed=$(run_sql "SELECT failed_count FROM pg_stat_archiver")
  run_stop
  cg_end "$ds-$t-$r"
  tps=$(sed -n 's/^tps = \([0-9.]*\) (without.*/\1/p' "$W/live.out")
  [[ -n $tps ]] || die "live $t: no tps in pgbench's output: $(tail -3 "$W/live.out")"
  [[ -s $R/live.$t.$r.lag ]] || die "live $t: no segment archived during the run"
  # seconds, WAL bytes, tps, machine CPU s (while pgbench ran), archiver CPU s, segments, failed
  awk -v a="$t0" -v b="$t1" -v w="$wal" -v tps="$tps" -v c="$((c1 - c0))" -v hz="$(getconf CLK_TCK)" -v g="$CG_NS" -v n="$(wc -l <"$R/live.$t.$r.lag")" -v f="$failed" \
    'BEGIN {printf "%.3f %d %.1f %.2f %.2f %d %d\n", b - a, w, tps, c / hz, g / 1e9, n, f}' >>"$R/live.$t.runs"
  say "live $t round $r: $(tail -1 "$R/live.$t.runs" | awk '{printf "%.0f tps, %.0f MB of WAL, %d segments archived, archiver CPU %.2f s, %d failed attempts", $3, $2 / 1e6, $6, $5, $7}'), lag p50 $(sort -k2 -g "$R/live.$t.$r.lag" | awk '{a[NR] = $2} END {print a[int((NR + 1) / 2)]}') ms"
}

# ---------------------------------------------------------------- run
for ds in $DATASETS; do
  make_cluster "$ds"
  make_backlog "$ds"
  fresh_run "$ds"
  echo "archive_command = ''" >>"$RUN/postgresql.conf"
  run_start
  rounds=$(seq "$REPEAT")
  [[ $ds == pgbench ]] && ((${#LIVE_TARGETS[@]})) && rounds+=" $(seq -f 'L%g' "$REPEAT")"
  # shellcheck disable=SC2086 # the rounds are words
  make_confs "$ds" $rounds
  run_stop fast
  for ((r = 1; r <= REPEAT; r++)); do
    say "$ds: round $r of $REPEAT"
    for t in "${TARGETS[@]}"; do drain "$ds" "$t" "$r"; done
  done
  if [[ $ds == pgbench ]] && ((${#LIVE_TARGETS[@]})); then
    for ((r = 1; r <= REPEAT; r++)); do
      say "live: round $r of $REPEAT"
      for t in "${LIVE_TARGETS[@]}"; do live "$t" "L$r"; done
    done
  fi
  rm -rf "$W/$ds/snap" "$RUN" "$W/repo" "$W/arch" ${S3_BUCKET_DIR:+"$S3_BUCKET_DIR"/*} "$W/pgbr/$ds"-* "$W/pgbr/spool-$ds"-*
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
echo "CPU s/GiB: whole machine (/proc/stat) and the archiver's ($CG_NOTE)"
for ds in $DATASETS; do
  echo "-- $ds"
  printf '  %-16s %9s %22s %22s %26s %26s %7s\n' target segments "drain s" "segments/s" "machine CPU s/GiB" "archiver CPU s/GiB" failed
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
        printf "  %s, %d at a time: walnut drains %.2fx pgBackRest'"'"'s speed at %.2fx its machine CPU per GiB and %.2fx its archiver CPU (goal >= 2x at <= 1x: %s)\n",
          k, n, ar / br, ac / bc, (bg > 0 ? ag / bg : 0), (ar / br >= 2 && ac / bc <= 1 ? "met" : "NOT met")
        # What the goal asks of the machine: at twice the speed and the same CPU per GiB, twice the busy cores.
        printf "    pgBackRest keeps %.2f cores busy (machine CPU / drain time); twice its speed at its CPU per GiB needs %.2f cores, the machine has %d\n",
          bc * br * 16 / 1024, 2 * bc * br * 16 / 1024, cores }'
    done
  done
done
if ((${#LIVE_TARGETS[@]})); then
  echo "-- live: pgbench -N, $CLIENTS clients, $LIVE_SECS s, synchronous_commit off; walnut upload_ahead and pgBackRest process-max $LIVE_N; median [min-max] of $REPEAT rounds"
  echo "   archive lag (ms from .ready to stored, 10 ms sampling) over every segment of every round; tps against the \`true\` target of the same rounds"
  printf '  %-16s %8s %7s %22s %9s %8s %8s %8s %22s %18s %7s\n' target "segs(all)" "WAL MB" tps "vs true" "lag p50" "lag p99" "lag max" "archiver CPU s/GiB" "archiver cores" failed
  base=$(stat_of "$R/live.true.runs" '$3' | cut -d' ' -f1)
  for t in "${LIVE_TARGETS[@]}"; do
    f=$R/live.$t.runs
    [[ -s $f ]] || continue
    read -r wm _ < <(stat_of "$f" '$2 / 1e6')
    read -r tm tlo thi < <(stat_of "$f" '$3')
    read -r gm glo ghi < <(stat_of "$f" '$5 / ($2 / 1073741824)')
    read -r km klo khi < <(stat_of "$f" '$5 / $1')
    read -r p50 p99 pmax < <(cat "$R/live.$t".*.lag | sort -k2 -g | awk '{a[NR] = $2} END {printf "%.0f %.0f %.0f\n", a[int((NR + 1) / 2)], a[int(NR * 0.99 + 0.999)], a[NR]}')
    printf '  %-16s %8s %7s %22s %9s %8s %8s %8s %22s %18s %7s\n' "$t" "$(awk '{s += $6} END {print s}' "$f")" "$wm" "$tm [$tlo-$thi]" \
      "$(awk -v a="$tm" -v b="$base" 'BEGIN {printf "%.3f", a / b}')" "$p50" "$p99" "$pmax" \
      "$( [[ -n $CG_ROOT ]] && echo "$gm [$glo-$ghi]" || echo n/a)" "$( [[ -n $CG_ROOT ]] && echo "$km [$klo-$khi]" || echo n/a)" "$(awk '{s += $7} END {print s}' "$f")"
  done
fi
