#!/usr/bin/env bash
# bench/lib.sh: what the benchmarks share (sourced, not run): the lock that keeps one bench at a
# time, the work directory and its cleanup, the release build of walnut, the loopback S3 server,
# config writers for walnut and pgBackRest, PostgreSQL helpers, timed and memory-sampled steps,
# the two datasets (pgbench and "realistic") and the report helpers. The caller sets SRC, SCALE,
# ROWS, STEP_TIMEOUT, REPEAT, PGBIN, PORT, LOCK and BENCH_NAME (the work directory's name) first.

AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups --)
say() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- one bench at a time
if [[ -z ${NO_WAIT:-} ]]; then
  for ((i = 0; i < 90; i++)); do pgrep -f bench/wal.sh >/dev/null || break; ((i)) || say "waiting for bench/wal.sh to finish"; sleep 20; done
  ! pgrep -f bench/wal.sh >/dev/null || die "bench/wal.sh still running after 30 min"
fi
exec 9>"$LOCK"
flock -w 1800 9 || die "another bench holds $LOCK"
say "holding $LOCK"

# ---------------------------------------------------------------- work dir, cleanup
W=$(mktemp -d "/tmp/walnut-bench-${BENCH_NAME:-backup}.XXXXXX")
R=$W/res PGDATA='' S3_PID='' STEP_PID='' SAMPLER_PID=''
cleanup() {
  set +e
  [[ -n $STEP_PID ]] && kill -TERM -- "-$STEP_PID" 2>/dev/null
  [[ -n $SAMPLER_PID ]] && kill "$SAMPLER_PID" 2>/dev/null
  [[ -n $PGDATA && -f $PGDATA/postmaster.pid ]] && "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -m immediate -w -t 30 stop >/dev/null 2>&1
  [[ -n $S3_PID ]] && kill "$S3_PID" 2>/dev/null && wait "$S3_PID" 2>/dev/null
  if [[ -n ${KEEP:-} ]]; then echo "kept $W" >&2; else rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
mkdir -p "$W"/{bin,conf,state,repo,pgbr/lock,sock,s3tmp} "$R"
chown -R postgres:postgres "$W" # PostgreSQL, walnut and pgBackRest run as postgres

# ---------------------------------------------------------------- tools and binaries
command -v /usr/bin/time >/dev/null || { say "installing time"; { apt-get update -qq && apt-get install -y -qq time; } >"$W/apt.log" 2>&1 || die "cannot install time"; }
HAVE_PGBR=0 PGBR_NOTE=''
if [[ -z ${SKIP_PGBACKREST:-} ]]; then
  command -v pgbackrest >/dev/null || { say "installing pgbackrest"; { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbackrest; } >"$W/apt-pgbr.log" 2>&1 || true; }
  if command -v pgbackrest >/dev/null; then HAVE_PGBR=1; else PGBR_NOTE="pgBackRest could not be installed ($(tail -1 "$W/apt-pgbr.log")): no pgBackRest figures"; say "$PGBR_NOTE"; fi
else PGBR_NOTE="pgBackRest skipped (SKIP_PGBACKREST)"; fi
BUILD_DIR=$SRC REV_DESC="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates Cargo.toml Cargo.lock || echo '+dirty-tree')"
if [[ -n ${WALNUT_REV:-} ]]; then
  BUILD_DIR=$W/src REV_DESC=$(git rev-parse --short "$WALNUT_REV"); mkdir -p "$BUILD_DIR"
  git archive "$WALNUT_REV" | tar -x -C "$BUILD_DIR"
fi
say "building walnut $REV_DESC (release)"
(cd "$BUILD_DIR" && nice -n 10 timeout 1800 cargo build -q --release --target-dir "$SRC/target" --bin walnut) 9>&-
cp "$SRC/target/release/walnut" "$W/bin/"
WALNUT=$W/bin/walnut HAVE_S3=0 S3_NOTE=''
if [[ -z ${SKIP_S3:-} ]]; then
  if (cd "$BUILD_DIR" && nice -n 10 timeout 1800 cargo build -q --release --target-dir "$SRC/target" --bin walnut-s3-server) >"$W/build-s3.log" 2>&1 9>&-; then
    cp "$SRC/target/release/walnut-s3-server" "$W/bin/" && HAVE_S3=1
  else S3_NOTE="walnut-s3-server does not build at $REV_DESC: file:// only ($(grep -m1 error "$W/build-s3.log" || true))"; say "$S3_NOTE"; fi
else S3_NOTE="S3 skipped (SKIP_S3)"; fi

# ---------------------------------------------------------------- S3 server (loopback)
if ((HAVE_S3)); then
  # S3_TLS=1: an HTTPS front too (S3_HTTPS, its certificate S3_CA), for tools that need https.
  TMPDIR=$W/s3tmp "$W/bin/walnut-s3-server" --exit-after 7200 ${S3_TLS:+--tls "$W/tls"} >"$W/s3.out" 2>"$W/s3.err" 9>&- &
  S3_PID=$!
  for _ in $(seq 100); do grep -q '^bucket_dir=' "$W/s3.out" && break; sleep 0.1; done
  S3_ENDPOINT=$(sed -n 's/^endpoint=//p' "$W/s3.out") S3_BUCKET_DIR=$(sed -n 's/^bucket_dir=//p' "$W/s3.out")
  S3_ID=$(sed -n 's/^access_key_id=//p' "$W/s3.out") S3_SECRET=$(sed -n 's/^secret_access_key=//p' "$W/s3.out")
  [[ -n $S3_BUCKET_DIR && -n $S3_ID ]] || die "S3 server did not start: $(cat "$W/s3.err")"
  S3_HTTPS=$(sed -n 's/^https_endpoint=//p' "$W/s3.out") S3_CA=$(sed -n 's/^ca_file=//p' "$W/s3.out")
  [[ -z ${S3_TLS:-} || -n $S3_HTTPS ]] || die "the S3 server's TLS front did not start: $(cat "$W/s3.err")"
fi

# walnut_conf NAME REPO: writes a config, prints its path
walnut_conf() {
  local f=$W/conf/$1.toml
  cat >"$f" <<EOF
repo = "$2"
state_dir = "$W/state/$1"
compression = "zstd"
compression_level = 1
[postgres]
url = "postgresql://postgres@127.0.0.1:$PORT/postgres"
[backup]
parallel = 2
archive_wait = "120s"
${WALNUT_BACKUP_EXTRA:-}
EOF
  if [[ $1 == *-age ]]; then
    [[ -s $W/age.key ]] || { "$WALNUT" age-keygen >"$W/age.key"; chown postgres:postgres "$W/age.key"; }
    printf '[encryption]\nrecipients = ["%s"]\nidentity_file = "%s"\n' "$(sed -n 's/^# public key: //p' "$W/age.key")" "$W/age.key" >>"$f"
  fi
  [[ $2 == s3://* ]] && printf '[s3]\nendpoint = "%s"\nregion = "us-east-1"\naccess_key_id = "%s"\nsecret_access_key = "%s"\nforce_path_style = true\n' \
    "$S3_ENDPOINT" "$S3_ID" "$S3_SECRET" >>"$f"
  if [[ $2 == file://* ]]; then mkdir -p "${2#file://}"; fi
  chown -R postgres:postgres "$f" "$W/repo" "$W/state"
  echo "$f"
}

# pgbr_conf NAME VARIANT (lz4 | zst | zst1): writes a config and creates the stanza, prints the path
pgbr_conf() {
  local f=$W/pgbr/$1.conf type=${2%1} level=''
  [[ $2 == *1 ]] && level="compress-level=1"
  mkdir -p "$W/pgbr/$1"
  cat >"$f" <<EOF
[global]
repo1-path=$W/pgbr/$1
repo1-retention-full=2
compress-type=$type
$level
process-max=2
start-fast=y
archive-async=n
log-level-console=warn
log-level-stderr=warn
log-level-file=off
lock-path=$W/pgbr/lock
[bench]
pg1-path=$PGDATA
pg1-port=$PORT
pg1-socket-path=$W/sock
pg1-user=postgres
EOF
  chown -R postgres:postgres "$W/pgbr"
  "${AS_PG[@]}" timeout 120 pgbackrest --config="$f" --stanza=bench stanza-create >>"$W/pgbr.log" 2>&1 || { tail -5 "$W/pgbr.log" >&2; return 1; }
  echo "$f"
}

# ---------------------------------------------------------------- PostgreSQL helpers
sql() { PGOPTIONS='-c client_min_messages=warning' "${AS_PG[@]}" "$PGBIN/psql" -X -A -t -q -v ON_ERROR_STOP=1 -h "$W/sock" -p "$PORT" -U postgres -d postgres -c "$1"; }
pg_start() { "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PGDATA.log" -w -t 120 start >/dev/null 9>&- || { tail -20 "$PGDATA.log" >&2; die "PostgreSQL did not start"; }; }
pg_stop() { "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -t 120 stop >/dev/null; }
# set_archive COMMAND: switches archive_command, then proves it works with a WAL switch (untimed)
set_archive() {
  local seg end=$((SECONDS + 120))
  sql "ALTER SYSTEM SET archive_command = '$1'"; sql "SELECT pg_reload_conf()" >/dev/null
  while [[ $(sql "SHOW archive_command") != "$1" ]]; do ((SECONDS < end)) || die "archive_command not reloaded"; sleep 0.2; done
  sleep 1 # the archiver re-reads its configuration on its own SIGHUP
  sql "CREATE TABLE IF NOT EXISTS bench_tick (t timestamptz); INSERT INTO bench_tick VALUES (now())"
  seg=$(sql "SELECT pg_walfile_name(pg_switch_wal())")
  until [[ $(sql "SELECT coalesce(last_archived_wal, '') >= '$seg' FROM pg_stat_archiver") == t ]]; do
    ((SECONDS < end)) || { tail -5 "$PGDATA.log" >&2; die "archive_command '$1' did not archive $seg in 120 s"; }
    sleep 0.2
  done
}
tree_bytes() { find "$@" -type f -printf '%s\n' 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
data_bytes() { find "$1" -path "$1/pg_wal" -prune -o -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}'; }

# ---------------------------------------------------------------- timed, memory-sampled steps
sample_tree() { # SID OUT: peak RSS (KiB) summed over the session's processes, wrappers excepted
  local peak=0 s
  while kill -0 "$1" 2>/dev/null; do
    s=$(ps -o rss=,comm= -s "$1" 2>/dev/null | awk '$2 != "time" && $2 != "timeout" {t += $1} END {print t + 0}')
    if ((s > peak)); then peak=$s; echo "$peak" >"$2"; fi
    if pgrep -x 'rustc|cargo' >/dev/null || pgrep -f 'bench/wal\.sh' >/dev/null; then : >"$2.busy"; fi
    sleep 0.5
  done
}
# quiet_wait: before each timed step, let bench/wal.sh (30 min at most) and builds (QUIET_WAIT s) finish
quiet_wait() {
  local end=$((SECONDS + 1800)) said=''
  while pgrep -f 'bench/wal\.sh' >/dev/null; do
    ((SECONDS < end)) || die "bench/wal.sh still running after 30 min"
    [[ -n $said ]] || { say "bench/wal.sh started meanwhile: pausing until it ends"; said=1; }
    sleep 20
  done
  end=$((SECONDS + ${QUIET_WAIT:-180}))
  while pgrep -x 'rustc|cargo' >/dev/null && ((SECONDS < end)); do sleep 5; done
}
FAILED=()
# step DS KEY COMMAND...: runs COMMAND as postgres; results in $R/DS.KEY.{secs,rss,tree,status}
step() {
  local ds=$1 key=$2 rc=0 t0 t1; shift 2
  local f=$R/$ds.$key
  quiet_wait
  sync
  # COLD_CACHE=1: every step reads from disk (what "bytes read" below measures is then real I/O).
  if [[ -n ${COLD_CACHE:-} ]]; then echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; fi
  t0=$EPOCHREALTIME
  setsid /usr/bin/time -v -o "$f.time" timeout -k 10 "$STEP_TIMEOUT" "${AS_PG[@]}" "$@" >"$f.out" 2>"$f.err" 9>&- &
  STEP_PID=$!
  sample_tree "$STEP_PID" "$f.tree" 9>&- &
  SAMPLER_PID=$!
  wait "$STEP_PID" || rc=$?
  t1=$EPOCHREALTIME STEP_PID=''
  kill "$SAMPLER_PID" 2>/dev/null; wait "$SAMPLER_PID" 2>/dev/null || true; SAMPLER_PID=''
  # Every run's time is kept; .secs is their median, .spread their min and max.
  awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f\n", b - a}' >>"$f.runs"
  sort -n "$f.runs" | awk '{a[NR] = $1} END {printf "%.2f\n", NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}' >"$f.secs"
  sort -n "$f.runs" | awk 'NR == 1 {lo = $1} {hi = $1} END {printf "%.2f %.2f %d\n", lo, hi, NR}' >"$f.spread"
  awk -F': ' '/Maximum resident set size/ {print $2}' "$f.time" >"$f.rss"
  # CPU: every run's kept too; .cpu is their median, .cpuspread their min and max.
  awk -F': ' '/(User|System) time \(seconds\)/ {s += $2} END {printf "%.2f\n", s}' "$f.time" >>"$f.cpuruns"
  sort -n "$f.cpuruns" | awk '{a[NR] = $1} END {printf "%.2f\n", NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}' >"$f.cpu"
  sort -n "$f.cpuruns" | awk 'NR == 1 {lo = $1} {hi = $1} END {printf "%.2f %.2f\n", lo, hi}' >"$f.cpuspread"
  # Bytes read from disk by the command and its children (block input operations, 512 bytes each).
  awk -F': ' '/File system inputs/ {printf "%.0f\n", $2 * 512}' "$f.time" >>"$f.readruns"
  sort -n "$f.readruns" | awk '{a[NR] = $1} END {printf "%.0f\n", NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}' >"$f.read"
  if ((rc)); then
    echo FAILED >"$f.status"; FAILED+=("$ds $key (exit $rc)")
    say "$ds $key FAILED (exit $rc): $(tail -3 "$f.err" | tr '\n' ' ')"
    return 1
  fi
  echo ok >"$f.status"
  say "$ds $key: $(cat "$f.secs") s, max RSS $(($(cat "$f.rss") / 1024)) MiB"
}
# fresh_dir PATH: an empty directory owned by postgres, mode 0700
fresh_dir() { rm -rf "$1"; mkdir -p "$1"; chmod 700 "$1"; chown postgres:postgres "$1"; }
# check_restored DS KEY DIR: the restored base/ must hold what the source's does (size within 2%)
check_restored() {
  local a b
  a=$(tree_bytes "$PGDATA/base") b=$(tree_bytes "$3/base")
  if [[ ! -f $3/global/pg_control ]] || ((b * 100 < a * 98)); then
    echo FAILED >"$R/$1.$2.status"; FAILED+=("$1 $2 (restored base/ $b bytes of $a, or no pg_control)")
    say "$1 $2: restored directory incomplete ($b of $a bytes in base/)"
  fi
}

# ---------------------------------------------------------------- datasets
REAL_SQL="
SET statement_timeout = '30min';
BEGIN;
CREATE TABLE orders (id bigint NOT NULL, account_id int NOT NULL, ref text NOT NULL, email text,
  note text, qty int, price numeric(12,2), created timestamptz, status text, payload text);
INSERT INTO orders
SELECT g, (random() * 200000)::int, md5(random()::text),
  'user' || (random() * 1000000)::int || '@' || (ARRAY['example.com', 'mail.test', 'corp.example', 'shop.test', 'web.example'])[1 + floor(random() * 5)::int],
  concat_ws(' ', w[1 + floor(random() * 48)::int], w[1 + floor(random() * 48)::int], w[1 + floor(random() * 48)::int],
    CASE WHEN random() < 0.7 THEN w[1 + floor(random() * 48)::int] END,
    CASE WHEN random() < 0.5 THEN w[1 + floor(random() * 48)::int] END,
    CASE WHEN random() < 0.3 THEN (random() * 10000)::int::text END),
  1 + (random() * 20)::int, round((random() * 1000)::numeric, 2),
  timestamptz '2024-01-01' + random() * interval '365 days',
  (ARRAY['new', 'paid', 'shipped', 'returned', 'cancelled'])[1 + floor(random() * 5)::int],
  substr(md5(random()::text) || md5(random()::text), 1, floor(random() * 64)::int)
FROM generate_series(1, $ROWS) g,
  (SELECT ARRAY['order', 'delivery', 'customer', 'payment', 'invoice', 'refund', 'address', 'express',
    'standard', 'priority', 'gift', 'wrap', 'please', 'call', 'before', 'arrival', 'leave', 'at', 'door',
    'back', 'office', 'reception', 'fragile', 'handle', 'with', 'care', 'discount', 'coupon', 'applied',
    'second', 'attempt', 'missing', 'item', 'replaced', 'damaged', 'box', 'customer', 'requested',
    'change', 'of', 'size', 'color', 'blue', 'red', 'large', 'small', 'weekend', 'evening'] AS w) v;
COMMIT;
CREATE INDEX orders_ref ON orders (ref);
CREATE INDEX orders_created ON orders (created);
VACUUM ANALYZE orders;
CHECKPOINT;"
# make_cluster DS: initdb + generate with wal_level=minimal, restart for archiving; sets PGDATA
make_cluster() {
  local ds=$1 t0=$SECONDS
  PGDATA=$W/$ds/data
  mkdir -p "$W/$ds" && chown postgres:postgres "$W/$ds" "$W/sock"
  "${AS_PG[@]}" "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 --locale=C >"$W/$ds/initdb.log"
  cat >>"$PGDATA/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$W/sock'
port = $PORT
shared_buffers = 256MB
maintenance_work_mem = 256MB
max_wal_size = 4GB
checkpoint_timeout = 30min
synchronous_commit = off
# generation only (overridden below)
wal_level = minimal
max_wal_senders = 0
archive_mode = off
EOF
  pg_start
  say "$ds: generating"
  if [[ $ds == pgbench ]]; then
    "${AS_PG[@]}" timeout 1800 "$PGBIN/pgbench" -h "$W/sock" -p "$PORT" -U postgres -i -s "$SCALE" -q postgres >"$W/$ds/gen.log" 2>&1 ||
      { tail -5 "$W/$ds/gen.log" >&2; die "pgbench -i failed"; }
    sql "CHECKPOINT"
    sql "SELECT format('pgbench_accounts %s MB + index %s MB', pg_table_size('pgbench_accounts') / 1000000, pg_indexes_size('pgbench_accounts') / 1000000)" >"$R/$ds.rel"
  else
    timeout 2400 "${AS_PG[@]}" "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$W/sock" -p "$PORT" -U postgres -d postgres -f - <<<"$REAL_SQL" >"$W/$ds/gen.log" 2>&1 ||
      { tail -5 "$W/$ds/gen.log" >&2; die "realistic dataset generation failed"; }
    sql "SELECT format('orders %s MB + 2 indexes %s MB', pg_table_size('orders') / 1000000, pg_indexes_size('orders') / 1000000)" >"$R/$ds.rel"
  fi
  pg_stop
  cat >>"$PGDATA/postgresql.conf" <<EOF
# benchmark
wal_level = replica
max_wal_senders = 10
archive_mode = on
archive_command = '/bin/true'
EOF
  pg_start
  echo "$(data_bytes "$PGDATA")" >"$R/$ds.data"
  echo $((SECONDS - t0)) >"$R/$ds.gen"
  say "$ds: $(awk '{printf "%.0f MB", $1 / 1e6}' "$R/$ds.data") in the data directory (generated in $((SECONDS - t0)) s)"
}


num() { [[ -s $1 ]] && cat "$1" || echo ''; }
# cell DS KEY FIELD: one figure, '-' when absent
cell() {
  local f=$R/$1.$2 d; d=$(num "$R/$1.data")
  if [[ $(num "$f.status") == FAILED ]]; then echo FAILED; return; fi
  [[ -s $f.secs ]] || { echo '-'; return; }
  case $3 in
    secs) awk -v s="$(cat "$f.secs")" -v b="$([[ -e $f.busy || -e $f.tree.busy ]] && echo '*')" 'BEGIN {printf "%.1f%s", s, b}' ;;
    cpu) awk -v x="$(num "$f.cpu")" 'BEGIN {if (x == "") print "-"; else printf "%.1f", x}' ;;
    mbs) awk -v s="$(cat "$f.secs")" -v d="$d" 'BEGIN {printf "%.0f", d / 1e6 / s}' ;;
    stored) [[ -s $f.stored ]] && awk -v x="$(cat "$f.stored")" 'BEGIN {printf "%.0f", x / 1e6}' || echo '-' ;;
    ratio) [[ -s $f.stored ]] && awk -v x="$(cat "$f.stored")" -v d="$d" 'BEGIN {printf "%.2f", d / x}' || echo '-' ;;
    rss) awk -v x="$(num "$f.rss")" 'BEGIN {printf "%.0f", x / 1024}' ;;
    tree) awk -v x="$(num "$f.tree")" 'BEGIN {if (x == "") print "-"; else printf "%.0f", x / 1024}' ;;
  esac
}
# ratio_of DS KEY_A KEY_B FIELD(secs|stored|rss|tree): A / B, or n/a
ratio_of() {
  local a b
  for k in "$2" "$3"; do [[ $(num "$R/$1.$k.status") == ok ]] || { echo n/a; return; }; done
  case $4 in
    secs | stored | rss | tree) a=$(num "$R/$1.$2.$4") b=$(num "$R/$1.$3.$4") ;;
  esac
  awk -v a="$a" -v b="$b" 'BEGIN {if (a != "" && b > 0) printf "%.2f", a / b; else printf "n/a"}'
}
