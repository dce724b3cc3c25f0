#!/usr/bin/env bash
# bench/wal.sh: WAL archiving figures for walnut, measured in one run next to two references:
# `cp %p DIR/%f && sync DIR/%f` and pgBackRest archive-push/archive-get (zst and lz4 at level 1, as
# walnut; synchronous for latency, and both synchronous and archive-async process-max=4 under load,
# against walnut's upload_ahead = 4). Latency on three datasets: idle (a small transaction, then a
# WAL switch, on a new cluster: what sets the RPO of an idle server with archive_timeout), pgbench
# and realistic (segments full of WAL).
#
#   bash bench/wal.sh                       # builds this checkout (release), then measures
#   WALNUT_REV=HEAD bash bench/wal.sh       # builds a git revision instead (for a dirty tree)
#
# Knobs (environment): SEGS=20 segments per dataset, SCALE=20 (pgbench -i -s), LOAD_SECS=30,
# CLIENTS=4, SKIP_PGBACKREST=1, KEEP=1 (keep the work directory). Needs root (PostgreSQL 15 runs as
# the `postgres` OS user), PostgreSQL 15 in /usr/lib/postgresql/15/bin, 2 GB free in /tmp.
#
# What is timed: each archive/restore command runs as PostgreSQL runs it, `sh -c` as `postgres`,
# one fresh process per 16 MiB segment, wall time from fork to exit. walnut latency runs use
# `[wal] upload_ahead = 0, prefetch = 0`, so every call does its own upload/download; the load
# runs use walnut's defaults. The S3 server is walnut-testkit's in-process s3s-fs on 127.0.0.1.
set -euo pipefail
shopt -s inherit_errexit
export LC_ALL=C
cd "$(dirname "$0")/.."
SRC=$(pwd)
SEGS=${SEGS:-20} SCALE=${SCALE:-20} LOAD_SECS=${LOAD_SECS:-30} CLIENTS=${CLIENTS:-4}
PGBIN=/usr/lib/postgresql/15/bin PORT=54329 SEG_BYTES=$((16 * 1024 * 1024))
[[ $(id -u) == 0 ]] || { echo "run as root (PostgreSQL is run as the postgres OS user)" >&2; exit 2; }
[[ -x $PGBIN/postgres ]] || { echo "PostgreSQL 15 not found in $PGBIN (bash scripts/setup.sh)" >&2; exit 2; }
AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups --)
say() { printf '[%(%H:%M:%S)T load %s] %s\n' -1 "$(cut -d' ' -f1 /proc/loadavg)" "$*" >&2; }

# ---------------------------------------------------------------- work dir, cleanup
W=$(mktemp -d /tmp/walnut-bench.XXXXXX) LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
PGDATA=$W/data S3_PID='' SAMPLER_PID=''
cleanup() {
  set +e
  [[ -n $SAMPLER_PID ]] && kill "$SAMPLER_PID" 2>/dev/null
  [[ -f $PGDATA/postmaster.pid ]] && "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -m immediate -w -t 30 stop >/dev/null 2>&1
  [[ -n $S3_PID ]] && kill "$S3_PID" 2>/dev/null && wait "$S3_PID" 2>/dev/null
  if [[ -n ${KEEP:-} ]]; then echo "kept $W" >&2; else rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$W"/{bin,conf,state,repo,arch,fetch,seg,res,pgbr}
# One benchmark at a time on this machine (bench/backup.sh takes the same lock).
exec 9>/tmp/walnut-bench.lock
flock -w 1800 9 || { echo "another benchmark holds /tmp/walnut-bench.lock" >&2; exit 1; }

# ---------------------------------------------------------------- tools and binaries
command -v /usr/bin/time >/dev/null || { say "installing time"; apt-get install -y -qq time >/dev/null || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }; }
HAVE_PGBR=0
if [[ -z ${SKIP_PGBACKREST:-} ]]; then
  command -v pgbackrest >/dev/null || { say "installing pgbackrest"; { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbackrest; } >"$W/apt.log" 2>&1 || true; }
  if command -v pgbackrest >/dev/null; then HAVE_PGBR=1; else say "pgbackrest could not be installed (see apt output below); continuing without it"; tail -3 "$W/apt.log" >&2; fi
fi
BUILD_DIR=$SRC REV_DESC="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates Cargo.toml Cargo.lock || echo '+dirty-tree')"
if [[ -n ${WALNUT_REV:-} ]]; then
  BUILD_DIR=$W/src REV_DESC=$(git rev-parse --short "$WALNUT_REV"); mkdir -p "$BUILD_DIR"
  git archive "$WALNUT_REV" | tar -x -C "$BUILD_DIR"
fi
say "building walnut $REV_DESC (release)"
(cd "$BUILD_DIR" && nice -n 10 cargo build -q --release --target-dir "$SRC/target" --bin walnut --bin walnut-s3-server)
cp "$SRC/target/release/walnut" "$SRC/target/release/walnut-s3-server" "$W/bin/"
WALNUT=$W/bin/walnut

# ---------------------------------------------------------------- S3 server
"$W/bin/walnut-s3-server" --exit-after 7200 >"$W/s3.out" 2>"$W/s3.err" &
S3_PID=$!
for _ in $(seq 100); do grep -q '^bucket_dir=' "$W/s3.out" && break; sleep 0.1; done
S3_ENDPOINT=$(sed -n 's/^endpoint=//p' "$W/s3.out") S3_BUCKET_DIR=$(sed -n 's/^bucket_dir=//p' "$W/s3.out")
[[ -n $S3_BUCKET_DIR ]] || { echo "S3 server did not start: $(cat "$W/s3.err")" >&2; exit 1; }
S3_ID=$(sed -n 's/^access_key_id=//p' "$W/s3.out") S3_SECRET=$(sed -n 's/^secret_access_key=//p' "$W/s3.out")

# walnut config NAME REPO [upload_ahead prefetch [worker]]; prints the file's path
walnut_conf() {
  local f=$W/conf/$1.toml
  printf 'repo = "%s"\nstate_dir = "%s"\n' "$2" "$W/state/$1" >"$f"
  # The per-process path unless asked for the worker (walnut's default is the worker).
  if [[ $# -ge 4 ]]; then
    printf '[wal]\nupload_ahead = %s\nprefetch = %s\nworker = %s\n' "$3" "$4" "${5:-false}" >>"$f"
  else
    printf '[wal]\nworker = false\n' >>"$f"
  fi
  # A 6th argument "age": every object encrypted to a key made for the run.
  if [[ ${6:-} == age ]]; then
    [[ -s $W/age.key ]] || "$WALNUT" age-keygen >"$W/age.key"
    printf '[encryption]\nrecipients = ["%s"]\n' "$(sed -n 's/^# public key: //p' "$W/age.key")" >>"$f"
  fi
  [[ $2 == s3://* ]] && printf '[s3]\nendpoint = "%s"\nregion = "us-east-1"\naccess_key_id = "%s"\nsecret_access_key = "%s"\nforce_path_style = true\n' \
    "$S3_ENDPOINT" "$S3_ID" "$S3_SECRET" >>"$f"
  if [[ $2 == file://* ]]; then mkdir -p "${2#file://}" && chown postgres:postgres "${2#file://}"; fi
  echo "$f"
}

# ---------------------------------------------------------------- PostgreSQL 15 (unix socket only)
chown -R postgres:postgres "$W"
"${AS_PG[@]}" "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 --locale=C >"$W/initdb.log"
cat >>"$PGDATA/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$W'
port = $PORT
wal_level = replica
archive_mode = on
archive_command = ''
synchronous_commit = off
shared_buffers = 256MB
max_wal_size = 1GB
EOF
"${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -l "$W/pg.log" -w -t 60 start >/dev/null
sql() { "$PGBIN/psql" -X -A -t -q -v ON_ERROR_STOP=1 -h "$W" -p "$PORT" -U postgres -d postgres -c "$1"; }
pgbench() { "${AS_PG[@]}" timeout "$1" "$PGBIN/pgbench" -h "$W" -p "$PORT" -U postgres "${@:2}" postgres; }
ready_count() { find "$PGDATA/pg_wal/archive_status" -name '*.ready' | wc -l; }
set_archive() { sql "ALTER SYSTEM SET archive_command = '$1'" && sql "SELECT pg_reload_conf()" >/dev/null; }
wait_drained() { # LIMIT_SECONDS: until no .ready is left (archiver idle)
  local end=$((SECONDS + $1))
  while (($(ready_count) > 0)); do ((SECONDS < end)) || return 1; sleep 0.2; done
}
counters() { sql "SELECT archived_count, failed_count FROM pg_stat_archiver" | tr '|' ' '; }

# ---------------------------------------------------------------- datasets: SEGS archived segments each
# Segments are collected by archive_command = cp (completed, never recycled), newest SEGS kept.
REAL_SQL="SET client_min_messages = warning;
CREATE TABLE IF NOT EXISTS orders (id bigserial PRIMARY KEY, uid uuid, ref text, note text,
  qty int, price numeric(12,2), created timestamptz, status text);
CREATE INDEX IF NOT EXISTS orders_ref ON orders (ref);
CREATE INDEX IF NOT EXISTS orders_created ON orders (created);
INSERT INTO orders (uid, ref, note, qty, price, created, status)
SELECT gen_random_uuid(), md5(random()::text),
       substr(md5(random()::text) || ' ' || md5(random()::text), 1, 8 + (random() * 56)::int),
       (random() * 1000)::int, round((random() * 10000)::numeric, 2),
       now() - random() * interval '365 days',
       (ARRAY['new', 'paid', 'shipped', 'returned', 'cancelled'])[1 + (random() * 4)::int]
FROM generate_series(1, 100000);"
make_dataset() { # NAME
  local name=$1 dir=$W/seg/$1 round
  mkdir -p "$dir/collect" "$dir/pg_wal/archive_status" && chown -R postgres:postgres "$dir"
  wait_drained 120 && set_archive "cp %p $dir/collect/%f"
  [[ $name == pgbench ]] && pgbench 300 -i -s 5 -q >/dev/null 2>&1
  for round in $(seq 1 60); do
    (($(find "$dir/collect" -type f | wc -l) > SEGS + 2)) && break
    case $name in
      pgbench) pgbench 60 -n -N -c 2 -j 2 -T 5 >/dev/null ;;
      # An idle server: one small transaction, then the switch archive_timeout would force.
      idle) sql "CREATE TABLE IF NOT EXISTS beat (at timestamptz); INSERT INTO beat VALUES (now())" && sql "SELECT pg_switch_wal()" >/dev/null ;;
      *) sql "$REAL_SQL" ;;
    esac
  done
  wait_drained 120 || { echo "archiver did not drain" >&2; exit 1; }
  find "$dir/collect" -type f -printf '%f\n' | sort | tail -n "$SEGS" | while read -r f; do cp "$dir/collect/$f" "$dir/pg_wal/"; done
  chown -R postgres:postgres "$dir"
  say "dataset $name: $(ls "$dir/pg_wal" | grep -c '^[0-9A-F]\{24\}$') segments (first $(ls "$dir/pg_wal" | awk '/^[0-9A-F]/ && !f {print; f = 1}')), $round rounds"
}
# idle first: on the new cluster every segment is a new, zero-filled file, as on a server that has
# been idle for a while (its recycled segments held idle WAL too); a server that was busy until
# recently recycles segments full of older WAL, and its idle segments cost what a full one does.
make_dataset idle
make_dataset pgbench
make_dataset realistic
set_archive ''

# ---------------------------------------------------------------- pgBackRest repos (one stanza each)
pgbr_setup() { # NAME COMPRESS_TYPE [async]; prints the config path
  local f=$W/pgbr/$1.conf async=n extra=''
  mkdir -p "$W/pgbr/$1" && chown postgres:postgres "$W/pgbr/$1"
  # Like for like: compression level 1 as walnut's default; async = 4 processes, as walnut's
  # upload_ahead = 4.
  if [[ ${3:-} == async ]]; then
    async=y
    mkdir -p "$W/pgbr/spool-$1" && chown postgres:postgres "$W/pgbr/spool-$1"
    extra="spool-path=$W/pgbr/spool-$1
process-max=4"
  fi
  cat >"$f" <<EOF
[global]
repo1-path=$W/pgbr/$1
compress-type=$2
compress-level=1
archive-async=$async
$extra
log-level-console=warn
log-level-file=off
lock-path=$W/pgbr/lock
[bench]
pg1-path=$PGDATA
pg1-port=$PORT
pg1-socket-path=$W
EOF
  chown postgres:postgres "$f"
  "${AS_PG[@]}" pgbackrest --config="$f" --stanza=bench stanza-create >>"$W/pgbr.log" 2>&1
  echo "$f"
}

# ---------------------------------------------------------------- measurement helpers
# run TEMPLATE with %p/%f filled in, as PostgreSQL does (sh -c, as postgres); appends µs to OUT
timed() { # OUT TEMPLATE PATH NAME
  local cmd=${2//\%p/$3}; cmd=${cmd//\%f/$4}
  local t0=${EPOCHREALTIME/./}
  "${AS_PG[@]}" timeout 120 sh -c "$cmd" >>"$W/cmd.log" 2>&1 || { echo "FAILED: $cmd" >&2; tail -5 "$W/cmd.log" >&2; exit 1; }
  echo $((${EPOCHREALTIME/./} - t0)) >>"$1"
}
median() { sort -n "$1" | awk '{a[NR]=$1} END {printf "%.1f", (NR % 2 ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2) / 1000}'; }
p90() { sort -n "$1" | awk '{a[NR]=$1} END {i = int((9 * NR + 9) / 10); printf "%.1f", a[i] / 1000}'; }
stored_bytes() { find "$1" -type f -regextype posix-extended -regex '.*/[0-9A-F]{24}(-[0-9a-f]{40}(\.(zst|lz4))?)?' -printf '%s\n' | awk '{s+=$1} END {print s+0}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else printf "n/a"}'; }

# latency DATASET TARGET PUSH_TEMPLATE FETCH_TEMPLATE STORE_DIR
latency() {
  local ds=$1 t=$2 seg n
  for seg in "$W/seg/$ds/pg_wal/"[0-9A-F]*; do timed "$W/res/$ds.$t.push" "$3" "$seg" "${seg##*/}"; done
  for seg in "$W/seg/$ds/pg_wal/"[0-9A-F]*; do
    n=${seg##*/}; timed "$W/res/$ds.$t.fetch" "$4" "$W/fetch/$n" "$n"
    cmp -s "$seg" "$W/fetch/$n" || { echo "$t: fetched $n differs from the original" >&2; exit 1; }
    rm -f "$W/fetch/$n"
  done
  echo "$(stored_bytes "$5")" >"$W/res/$ds.$t.stored"
  say "latency $ds $t: push p50 $(median "$W/res/$ds.$t.push") ms, fetch p50 $(median "$W/res/$ds.$t.fetch") ms"
}

# WAL workers started by a run are stopped before the next: they watch the one pg_wal.
stop_workers() { pkill -f "$WALNUT.* wal-worker " 2>/dev/null || true; sleep 0.3; }
TARGETS=(walnut-file walnut-s3 walnut-file-worker walnut-s3-worker cp-sync)
((HAVE_PGBR)) && TARGETS+=(pgbr-zst pgbr-lz4)
chown postgres:postgres "$W/fetch" "$W/repo" "$W/arch" "$W/state"
for ds in idle pgbench realistic; do
  c=$(walnut_conf "$ds-file" "file://$W/repo/$ds-file" 0 0)
  latency "$ds" walnut-file "$WALNUT -q --config $c wal-push %p" "$WALNUT -q --config $c wal-fetch %f %p" "$W/repo/$ds-file"
  c=$(walnut_conf "$ds-s3" "s3://walnut/$ds" 0 0)
  latency "$ds" walnut-s3 "$WALNUT -q --config $c wal-push %p" "$WALNUT -q --config $c wal-fetch %f %p" "$S3_BUCKET_DIR/$ds"
  # The WAL worker, warm: the first push starts it, the rest are thin clients (no .ready files
  # beside these segments, so each is stored when asked for, not ahead).
  for kind in file s3; do
    if [[ $kind == file ]]; then repo=file://$W/repo/$ds-file-worker store=$W/repo/$ds-file-worker; else repo=s3://walnut/$ds-worker store=$S3_BUCKET_DIR/$ds-worker; fi
    c=$(walnut_conf "$ds-$kind-worker" "$repo" 4 0 true)
    latency "$ds" "walnut-$kind-worker" "$WALNUT -q --config $c wal-push %p" "$WALNUT -q --config $c wal-fetch %f %p" "$store"
    stop_workers
  done
  mkdir -p "$W/arch/$ds" && chown postgres:postgres "$W/arch/$ds"
  latency "$ds" cp-sync "cp %p $W/arch/$ds/%f && sync $W/arch/$ds/%f" "cp $W/arch/$ds/%f %p" "$W/arch/$ds"
  if ((HAVE_PGBR)); then
    for z in zst lz4; do
      c=$(pgbr_setup "$ds-$z" "$z")
      latency "$ds" "pgbr-$z" "pgbackrest --config=$c --stanza=bench archive-push %p" \
        "pgbackrest --config=$c --stanza=bench archive-get %f %p" "$W/pgbr/$ds-$z"
    done
  fi
done

# ---------------------------------------------------------------- where a segment's time goes
# walnut wal-stages times each stage of a push and a fetch in one process (the identity read,
# reading, validating and decoding, hashing, compressing, upload, download, decompressing and
# checking, the durable write); the process's own cost is a command that does nothing else.
for ds in pgbench realistic; do
  for kind in file s3; do
    if [[ $kind == file ]]; then repo=file://$W/repo/$ds-stages; else repo=s3://walnut/$ds-stages; fi
    c=$(walnut_conf "$ds-$kind-stages" "$repo" 0 0)
    first=$(ls -d "$W/seg/$ds/pg_wal/"[0-9A-F]* | head -1)
    "${AS_PG[@]}" "$WALNUT" -q --config "$c" wal-push "$first" >>"$W/cmd.log" 2>&1 # the identity
    "${AS_PG[@]}" "$WALNUT" -q --config "$c" wal-stages "$W/seg/$ds/pg_wal/"[0-9A-F]* >"$W/res/stages.$ds.$kind" 2>>"$W/cmd.log"
  done
done
for _ in $(seq 10); do timed "$W/res/startup" "$WALNUT -q --config $c show-config >/dev/null" x x; done

# ---------------------------------------------------------------- peak memory of one push
# The second segment of the realistic set into a repository that already holds the first; with
# upload_ahead = 4, the next 4 segments are marked .ready beside it (so 5 are handled at once).
maxrss_mib() { awk -F': ' '/Maximum resident set size/ {printf "%.1f", $2 / 1024}' "$1"; }
cpu_secs() { awk -F': ' '/User time|System time/ {s += $2} END {printf "%.2f", s}' "$1"; }
mem_push() { # LABEL CONFIG-or-COMMAND...
  local label=$1; shift
  /usr/bin/time -v -o "$W/res/mem.$label.txt" "${AS_PG[@]}" "$@" >>"$W/cmd.log" 2>&1
  echo "$(maxrss_mib "$W/res/mem.$label.txt") $(cpu_secs "$W/res/mem.$label.txt")" >"$W/res/mem.$label"
}
mapfile -t REAL < <(ls -d "$W/seg/realistic/pg_wal/"[0-9A-F]* | sort)
MEMWAL=$W/seg/mem/pg_wal; mkdir -p "$MEMWAL/archive_status"; cp "${REAL[@]:0:6}" "$MEMWAL/"
for ((i = 2; i < ${#REAL[@]} && i < 6; i++)); do touch "$MEMWAL/archive_status/${REAL[$i]##*/}.ready"; done
chown -R postgres:postgres "$W/seg/mem"
MEM_LABELS=()
for kind in file s3; do
  for ua in 0 4; do
    if [[ $kind == file ]]; then repo=file://$W/repo/mem-$kind-$ua; else repo=s3://walnut/mem-$ua; fi
    c=$(walnut_conf "mem-$kind-$ua-seed" "$repo" 0 0) # first push (identity) without upload-ahead
    "${AS_PG[@]}" "$WALNUT" -q --config "$c" wal-push "$MEMWAL/${REAL[0]##*/}" >>"$W/cmd.log" 2>&1
    c=$(walnut_conf "mem-$kind-$ua" "$repo" "$ua" 0)
    mem_push "walnut-$kind-ua$ua" "$WALNUT" -q --config "$c" wal-push "$MEMWAL/${REAL[1]##*/}"
    MEM_LABELS+=("walnut-$kind-ua$ua")
  done
done
mkdir -p "$W/arch/mem" && chown postgres:postgres "$W/arch/mem"
mem_push cp-sync sh -c "cp ${REAL[1]} $W/arch/mem/x && sync $W/arch/mem/x"; MEM_LABELS+=(cp-sync)
if ((HAVE_PGBR)); then
  c=$(pgbr_setup mem-zst zst)
  mem_push pgbr-zst pgbackrest --config="$c" --stanza=bench archive-push "${REAL[1]}"; MEM_LABELS+=(pgbr-zst)
fi

# ---------------------------------------------------------------- archiving under load
# Per target: (1) with archiving paused, `pgbench -i -s SCALE` leaves a backlog of .ready segments;
# archiving is switched on and the time to drain it gives the archiver's capacity. (2) Under
# `pgbench -N -c CLIENTS -T LOAD_SECS`, .ready files are sampled every 0.5 s; archived/s is the
# pg_stat_archiver archived_count delta over load time plus the drain after it.
# Whole-machine CPU time so far, in clock ticks (user, nice, system, irq, softirq: every process,
# the S3 server and PostgreSQL included, the same for every target).
machine_cpu() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
load_run() { # TARGET ARCHIVE_COMMAND
  local t=$1 a0 f0 a1 f1 backlog t0 t1 t2 tps
  set_archive '' && sleep 0.5
  pgbench 900 -i -s "$SCALE" -q >/dev/null 2>&1
  backlog=$(ready_count); read -r a0 f0 < <(counters)
  c0=$(machine_cpu); t0=${EPOCHREALTIME/./}; set_archive "$2"
  wait_drained 600 || { echo "$t: backlog not drained in 600 s" >&2; exit 1; }
  t1=${EPOCHREALTIME/./}; c1=$(machine_cpu); read -r a1 f1 < <(counters)
  echo "$backlog $((a1 - a0)) $((t1 - t0)) $((f1 - f0)) $((c1 - c0))" >"$W/res/load.$t.drain"
  for ((i = 0; i < (LOAD_SECS + 700) * 2; i++)); do ready_count; sleep 0.5; done >"$W/res/load.$t.samples" &
  SAMPLER_PID=$!
  sql "CHECKPOINT" # every run starts right after a checkpoint: the same full-page-image volume
  read -r a0 f0 < <(counters); lsn0=$(sql "SELECT pg_current_wal_lsn()"); t0=${EPOCHREALTIME/./}
  tps=$(pgbench $((LOAD_SECS + 120)) -n -N -c "$CLIENTS" -j 2 -T "$LOAD_SECS" 2>/dev/null | awk '/^tps/ {printf "%.0f", $3}')
  t1=${EPOCHREALTIME/./}; wal=$(sql "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '$lsn0')")
  wait_drained 600 || { echo "$t: load backlog not drained in 600 s" >&2; exit 1; }
  t2=${EPOCHREALTIME/./}; read -r a1 f1 < <(counters)
  kill "$SAMPLER_PID" 2>/dev/null; wait "$SAMPLER_PID" 2>/dev/null || true; SAMPLER_PID=''
  echo "$tps $wal $((a1 - a0)) $((t1 - t0)) $((t2 - t1)) $(sort -n "$W/res/load.$t.samples" | tail -1) $((f1 - f0))" >"$W/res/load.$t.run"
  say "load $t: drain $(cat "$W/res/load.$t.drain"); run $(cat "$W/res/load.$t.run")"
}
load_run walnut-file "$WALNUT -q --config $(walnut_conf load-file "file://$W/repo/load-file") wal-push %p"
load_run walnut-s3 "$WALNUT -q --config $(walnut_conf load-s3 s3://walnut/load) wal-push %p"
load_run walnut-file-worker "$WALNUT -q --config $(walnut_conf load-file-worker "file://$W/repo/load-file-worker" 4 0 true) wal-push %p"
stop_workers
load_run walnut-s3-worker "$WALNUT -q --config $(walnut_conf load-s3-worker s3://walnut/load-worker 4 0 true) wal-push %p"
stop_workers
load_run walnut-file-worker-age "$WALNUT -q --config $(walnut_conf load-file-worker-age "file://$W/repo/load-file-worker-age" 4 0 true age) wal-push %p"
stop_workers
mkdir -p "$W/arch/load" && chown postgres:postgres "$W/arch/load"
load_run cp-sync "cp %p $W/arch/load/%f && sync $W/arch/load/%f"
LOAD_TARGETS=(walnut-file walnut-s3 walnut-file-worker walnut-s3-worker walnut-file-worker-age cp-sync)
if ((HAVE_PGBR)); then
  load_run pgbr-zst "pgbackrest --config=$(pgbr_setup load-zst zst) --stanza=bench archive-push %p"
  load_run pgbr-zst-async "pgbackrest --config=$(pgbr_setup load-zst-async zst async) --stanza=bench archive-push %p"
  LOAD_TARGETS+=(pgbr-zst pgbr-zst-async)
fi

# ---------------------------------------------------------------- report
echo
echo "walnut WAL benchmark  walnut $REV_DESC  $(date -u +%Y-%m-%dT%H:%MZ)  $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)  PostgreSQL $("$PGBIN/postgres" -V | awk '{print $3}')  $( ((HAVE_PGBR)) && pgbackrest version || echo 'pgBackRest: not installed')"
echo "Load average (1/5/15 min) at start: $LOAD_START, at end: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews every figure)"
echo "Segments: $SEGS x 16 MiB per dataset, each call a fresh process (sh -c as postgres); walnut upload_ahead=0 prefetch=0 for latency; every tool at compression level 1 (zst and lz4); under load walnut upload_ahead=4 against pgBackRest synchronous and archive-async with process-max=4"
for ds in idle pgbench realistic; do
  echo
  echo "== Latency per segment, dataset: $ds =="
  printf '%-18s %12s %12s %13s %16s %16s %17s\n' target "push p50 ms" "push p90 ms" "fetch p50 ms" "stored/original" "push p50 / cp" "fetch p50 / cp"
  for t in "${TARGETS[@]}"; do
    r=$W/res/$ds.$t
    printf '%-18s %12s %12s %13s %16s %16s %17s\n' "$t" "$(median "$r.push")" "$(p90 "$r.push")" "$(median "$r.fetch")" \
      "$(ratio "$(cat "$r.stored")" $(($(ls "$W/seg/$ds/pg_wal" | grep -c '^[0-9A-F]\{24\}$') * SEG_BYTES)))" "$(ratio "$(median "$r.push")" "$(median "$W/res/$ds.cp-sync.push")")" \
      "$(ratio "$(median "$r.fetch")" "$(median "$W/res/$ds.cp-sync.fetch")")"
  done
  if ((HAVE_PGBR)); then
    for w in walnut-file walnut-s3 walnut-file-worker walnut-s3-worker; do for z in zst lz4; do
      echo "  $w / pgbr-$z: push p50 $(ratio "$(median "$W/res/$ds.$w.push")" "$(median "$W/res/$ds.pgbr-$z.push")")x, fetch p50 $(ratio "$(median "$W/res/$ds.$w.fetch")" "$(median "$W/res/$ds.pgbr-$z.fetch")")x, stored $(ratio "$(cat "$W/res/$ds.$w.stored")" "$(cat "$W/res/$ds.pgbr-$z.stored")")x"
    done; done
  fi
done
echo
echo "== Where a segment's time goes (walnut wal-stages, median over the dataset's segments) =="
for ds in pgbench realistic; do for kind in file s3; do
  echo "-- $ds, $kind"; sed 's/^/   /' "$W/res/stages.$ds.$kind"
done; done
echo "   process start, runtime, config, logging (walnut show-config, p50): $(median "$W/res/startup") ms"
echo
echo "== Peak memory (max RSS) and CPU time (user+sys) of one push, realistic segment =="
for l in "${MEM_LABELS[@]}"; do read -r rss cpu <"$W/res/mem.$l"; printf '%-22s %8s MiB %8s s CPU\n' "$l" "$rss" "$cpu"; done
echo "   (ua0: upload_ahead=0; ua4: upload_ahead=4 with 4 more segments marked .ready beside it)"
echo
echo "== Archiving under load (pgbench scale $SCALE, -N -c $CLIENTS -T $LOAD_SECS, synchronous_commit=off) =="
printf '%-18s %8s %13s %11s %10s %8s %9s %13s %11s %12s %7s\n' target backlog "drain seg/s" "drain MB/s" "CPU s/GiB" "load tps" "WAL segs" "archived/s" "max .ready" "drain after" failed
for t in "${LOAD_TARGETS[@]}"; do
  read -r backlog darch dus dfail dcpu <"$W/res/load.$t.drain"
  read -r tps wal arch lus tail maxr lfail <"$W/res/load.$t.run"
  printf '%-18s %8s %13s %11s %10s %8s %9s %13s %11s %12s %7s\n' "$t" "$backlog" \
    "$(awk -v n="$darch" -v u="$dus" 'BEGIN {printf "%.1f", n / (u / 1e6)}')" "$(awk -v n="$darch" -v u="$dus" 'BEGIN {printf "%.0f", n * 16.777216 / (u / 1e6)}')" \
    "$(awk -v c="$dcpu" -v n="$darch" -v hz="$(getconf CLK_TCK)" 'BEGIN {if (n > 0) printf "%.2f", (c / hz) / (n / 64); else printf "n/a"}')" \
    "$tps" "$(awk -v b="$wal" 'BEGIN {printf "%.1f", b / 16777216}')" "$(awk -v n="$arch" -v u=$((lus + tail)) 'BEGIN {printf "%.2f", n / (u / 1e6)}')" \
    "$maxr" "$(awk -v u="$tail" 'BEGIN {printf "%.1f s", u / 1e6}')" "$((dfail + lfail))"
done
echo "   backlog: .ready segments left by pgbench -i with archiving paused; drain: time to archive them all (no other load)"
echo "   CPU s/GiB: whole-machine CPU time during the drain (every process: PostgreSQL, the S3 server, the archiver) per GiB of WAL"
echo "   -worker: [wal] worker = true (the WAL worker stores .ready segments ahead; wal-push asks it over a Unix socket); -age: encrypted with age"
read -r _ an au _ ac <"$W/res/load.walnut-file-worker-age.drain"; read -r _ cn cu _ cc <"$W/res/load.walnut-file-worker.drain"
awk -v an="$an" -v au="$au" -v ac="$ac" -v cn="$cn" -v cu="$cu" -v cc="$cc" 'BEGIN {
  w = (au / an) / (cu / cn); c = (ac / an) / (cc / cn)
  printf "   encryption cost (file://, worker): drain time per segment x%.2f, CPU per segment x%.2f (goal <= 1.10 and <= 1.15: %s)\n", w, c, (w <= 1.10 && c <= 1.15) ? "met" : "NOT met" }'
echo "   archived/s: archived_count delta / (load time + time to drain what was left); max .ready: largest backlog sampled every 0.5 s"
