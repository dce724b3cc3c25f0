#!/usr/bin/env bash
# bench/agent.sh: the agent's footprint and the repository operations that grow with its age.
#
#   bash bench/agent.sh                    # builds this checkout (release), then measures
#   WALNUT_REV=HEAD bash bench/agent.sh    # builds a git revision instead (for a dirty tree)
#
# Prints, in one run:
#   1. idle: the agent's RSS (median and max of samples every 5 s) and CPU over IDLE_SECS, after
#      its first scheduled backup (goal: RSS under 32 MiB);
#   2. API latency (wrk, LOAD_SECS per route, 4 connections on loopback): median and p99;
#   3. retention planning on a synthetic inventory of BACKUPS backups and WAL_PLAN WAL objects
#      (goal: under 1 s);
#   4. listing a repository holding WAL_OBJECTS WAL objects, on the local S3 server (walnut-testkit's
#      s3s-fs) and on file://: `walnut retention apply` (dry run; one full WAL listing) and
#      `walnut wal-show` (listing plus each segment's summary), wall time and peak RSS.
#
# Knobs: IDLE_SECS=180 LOAD_SECS=10 BACKUPS=10000 WAL_PLAN=1000000 WAL_OBJECTS=100000 KEEP=1.
# Needs root (PostgreSQL 15 runs as the `postgres` OS user); installs wrk and time if missing.
set -euo pipefail
shopt -s inherit_errexit
export LC_ALL=C
cd "$(dirname "$0")/.."
SRC=$(pwd)
IDLE_SECS=${IDLE_SECS:-180} LOAD_SECS=${LOAD_SECS:-10} BACKUPS=${BACKUPS:-10000} WAL_PLAN=${WAL_PLAN:-1000000}
WAL_OBJECTS=${WAL_OBJECTS:-100000}
PGBIN=/usr/lib/postgresql/15/bin PORT=54331
[[ $(id -u) == 0 ]] || { echo "run as root (PostgreSQL is run as the postgres OS user)" >&2; exit 2; }
[[ -x $PGBIN/postgres ]] || { echo "PostgreSQL 15 not found in $PGBIN (bash scripts/setup.sh)" >&2; exit 2; }
AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups --)
say() { printf '[%(%H:%M:%S)T load %s] %s\n' -1 "$(cut -d' ' -f1 /proc/loadavg)" "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

W=$(mktemp -d /tmp/walnut-bench.XXXXXX)
chmod 755 "$W"
PGDATA=$W/data S3_PID='' AGENT_PID=''
cleanup() {
  set +e
  [[ -n $AGENT_PID ]] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null
  [[ -f $PGDATA/postmaster.pid ]] && "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -m immediate -w -t 30 stop >/dev/null 2>&1
  [[ -n $S3_PID ]] && kill "$S3_PID" 2>/dev/null && wait "$S3_PID" 2>/dev/null
  if [[ -n ${KEEP:-} ]]; then echo "kept $W" >&2; else rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$W"/{bin,conf,state,repo,data}
chown postgres:postgres "$W"/{state,repo,data}; chmod 700 "$W/data"
exec 9>/tmp/walnut-bench.lock
flock -w 1800 9 || die "another benchmark holds /tmp/walnut-bench.lock"

for tool in wrk curl /usr/bin/time; do
  pkg=$(basename "$tool")
  command -v "$tool" >/dev/null || { say "installing $pkg"; { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg"; } >/dev/null; }
done
BUILD_DIR=$SRC REV_DESC="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates Cargo.toml Cargo.lock || echo '+dirty-tree')"
if [[ -n ${WALNUT_REV:-} ]]; then
  BUILD_DIR=$W/src REV_DESC=$(git rev-parse --short "$WALNUT_REV"); mkdir -p "$BUILD_DIR"
  git archive "$WALNUT_REV" | tar -x -C "$BUILD_DIR"
fi
say "building walnut $REV_DESC (release)"
(cd "$BUILD_DIR" && nice -n 10 cargo build -q --release --target-dir "$SRC/target" --bin walnut --bin walnut-s3-server \
  && nice -n 10 cargo build -q --release --target-dir "$SRC/target" -p walnut-core --example retention_scale)
cp "$SRC/target/release/walnut" "$SRC/target/release/walnut-s3-server" "$SRC/target/release/examples/retention_scale" "$W/bin/"
chmod 755 "$W/bin" "$W"/bin/*
WALNUT=$W/bin/walnut

# ---------------------------------------------------------------- cluster + agent (file://)
CONF=$W/conf/file.toml
printf 'repo = "file://%s"\nstate_dir = "%s"\n[agent]\nretention_interval = "1h"\n' "$W/repo" "$W/state" >"$CONF"
chmod 644 "$CONF"
"${AS_PG[@]}" "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 --locale=C >"$W/initdb.log"
cat >>"$PGDATA/postgresql.conf" <<EOF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$W/state'
archive_mode = on
archive_command = '$WALNUT --config $CONF wal-push %p'
EOF
"${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -l "$W/state/pg.log" -w -t 60 start >/dev/null || die "PostgreSQL did not start"
sql() { "$PGBIN/psql" -X -A -t -q -v ON_ERROR_STOP=1 -h "$W/state" -p "$PORT" -U postgres -d postgres -c "$1"; }
sql "CREATE TABLE t AS SELECT g, md5(g::text) FROM generate_series(1, 200000) g" >/dev/null
sql "SELECT pg_switch_wal()" >/dev/null

APORT=$((PORT + 100))
API=http://127.0.0.1:$APORT
PGHOST=127.0.0.1 PGPORT=$PORT PGUSER=postgres PGDATA=$PGDATA \
  "${AS_PG[@]}" "$WALNUT" --config "$CONF" agent --listen "127.0.0.1:$APORT" >"$W/agent.log" 2>&1 &
AGENT_PID=$!
say "agent started (pid $AGENT_PID); waiting for its first scheduled backup"
for _ in $(seq 600); do
  curl -fsS "$API/v1/backups" 2>/dev/null | grep -q '"DONE"' && break
  kill -0 "$AGENT_PID" 2>/dev/null || { cat "$W/agent.log" >&2; die "the agent exited"; }
  sleep 0.2
done
curl -fsS "$API/v1/backups" | grep -q '"DONE"' || die "no DONE backup after 120 s: $(tail -5 "$W/agent.log")"
# The agent runs under setpriv, which execs: AGENT_PID is the agent itself.
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$AGENT_PID/status"; }
ticks() { awk '{print $14 + $15}' "/proc/$AGENT_PID/stat"; }

echo "walnut $REV_DESC · $(nproc) cores · load at start $(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------- 1. idle
sleep 5
say "1. idle for ${IDLE_SECS}s (sampling RSS every 5 s)"
t0=$(ticks) s0=$(date +%s.%N)
: >"$W/rss"
end=$((SECONDS + IDLE_SECS))
while ((SECONDS < end)); do rss_kib >>"$W/rss"; sleep 5; done
t1=$(ticks) s1=$(date +%s.%N)
HZ=$(getconf CLK_TCK)
IDLE_CPU=$(awk -v a="$t0" -v b="$t1" -v s="$s0" -v e="$s1" -v hz="$HZ" 'BEGIN {printf "%.3f", (b - a) / hz / (e - s) * 100}')
IDLE_CPU_SECS=$(awk -v a="$t0" -v b="$t1" -v hz="$HZ" 'BEGIN {printf "%.2f", (b - a) / hz}')
RSS_MED=$(sort -n "$W/rss" | awk '{a[NR]=$1} END {printf "%.1f", a[int((NR+1)/2)] / 1024}')
RSS_MAX=$(sort -n "$W/rss" | tail -1 | awk '{printf "%.1f", $1 / 1024}')
HWM=$(awk '/^VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$AGENT_PID/status")
printf '\n1. Agent idle for %ss after its first backup (goal: RSS < 32 MiB)\n' "$IDLE_SECS"
printf '  RSS median %s MiB, max %s MiB (peak since start, incl. the backup: %s MiB)\n' "$RSS_MED" "$RSS_MAX" "$HWM"
printf '  CPU %s s in %ss = %s %% of one core\n' "$IDLE_CPU_SECS" "$IDLE_SECS" "$IDLE_CPU"

# ---------------------------------------------------------------- 2. API latency
say "2. API latency: wrk ${LOAD_SECS}s per route, 4 connections"
: >"$W/latency"
for route in /v1/settings /v1/backups /v1/health /metrics; do
  wrk -t2 -c4 -d"${LOAD_SECS}s" --timeout 10s --latency "$API$route" >"$W/wrk.out" 2>&1 || die "wrk failed: $(cat "$W/wrk.out")"
  awk -v r="$route" '
    /^ +50%/ {p50 = $2} /^ +99%/ {p99 = $2} /^Requests\/sec/ {rps = $2} /Non-2xx/ {bad = $NF}
    END {printf "  %-14s median %-9s p99 %-9s %8s req/s%s\n", r, p50, p99, rps, (bad ? "  NON-2xx: " bad : "")}' \
    "$W/wrk.out" >>"$W/latency"
done
RSS_AFTER_LOAD=$(rss_kib | awk '{printf "%.1f", $1 / 1024}')
printf '\n2. API latency on loopback (wrk -t2 -c4 -d%ss per route)\n%s\n  RSS after the load: %s MiB\n' \
  "$LOAD_SECS" "$(cat "$W/latency")" "$RSS_AFTER_LOAD"

# ---------------------------------------------------------------- 3. retention planning
say "3. retention planning: $BACKUPS backups, $WAL_PLAN WAL objects"
printf '\n3. Retention planning (goal: < 1 s)\n  %s\n' "$("$W/bin/retention_scale" "$BACKUPS" "$WAL_PLAN")"

# ---------------------------------------------------------------- 4. listing WAL_OBJECTS WAL objects
say "4. listing $WAL_OBJECTS WAL objects (file:// and the local S3 server)"
"$W/bin/walnut-s3-server" --exit-after 7200 >"$W/s3.out" 2>"$W/s3.err" &
S3_PID=$!
for _ in $(seq 100); do grep -q '^bucket_dir=' "$W/s3.out" && break; sleep 0.1; done
S3_BUCKET_DIR=$(sed -n 's/^bucket_dir=//p' "$W/s3.out")
[[ -n $S3_BUCKET_DIR ]] || die "S3 server did not start: $(cat "$W/s3.err")"
S3CONF=$W/conf/s3.toml
printf 'repo = "s3://walnut/big"\nstate_dir = "%s"\n[s3]\nendpoint = "%s"\nregion = "us-east-1"\naccess_key_id = "%s"\nsecret_access_key = "%s"\nforce_path_style = true\n' \
  "$W/state-s3" "$(sed -n 's/^endpoint=//p' "$W/s3.out")" "$(sed -n 's/^access_key_id=//p' "$W/s3.out")" \
  "$(sed -n 's/^secret_access_key=//p' "$W/s3.out")" >"$S3CONF"
FILECONF=$W/conf/big.toml
printf 'repo = "file://%s"\nstate_dir = "%s"\n' "$W/big" "$W/state-big" >"$FILECONF"
# Both repositories: the cluster's identity and WAL_OBJECTS hard links of one archived segment
# under consecutive names (listing and summaries never look inside beyond the envelope).
SAMPLE=$(find "$W/repo/wal" -type f -name '0000000*' | sort | head -1)
[[ -n $SAMPLE ]] || die "no archived segment in $W/repo"
for root in "$W/big" "$S3_BUCKET_DIR/big"; do
  mkdir -p "$root/wal/00000001"
  cp "$W/repo/walnut.json" "$root/walnut.json"
  # A new source copy every 50,000 links (ext4 allows 65,000 links per inode).
  perl -MFile::Copy -e 'my ($src, $dir, $n) = @ARGV; my $from;
    for my $i (0 .. $n - 1) {
      my $name = sprintf("00000001%08X%08X", int($i / 256), $i % 256);
      if ($i % 50000 == 0) { $from = "$dir/../../.src$i"; copy($src, $from) or die "copy: $!" }
      link($from, "$dir/$name") or die "link $name: $!" }' "$SAMPLE" "$root/wal/00000001" "$WAL_OBJECTS"
done
printf '\n4. Listing a repository of %s WAL objects (wall time, peak RSS)\n' "$WAL_OBJECTS"
for kind in file s3; do
  conf=$FILECONF; [[ $kind == s3 ]] && conf=$S3CONF
  # wal-show twice: the first run reads every summary and writes the summary index, the second
  # reads the index.
  for cmd in "retention apply" "wal-show" "wal-show"; do
    status=ok
    # shellcheck disable=SC2086
    /usr/bin/time -v -o "$W/time.out" "$WALNUT" --config "$conf" --json $cmd >"$W/cmd.out" 2>"$W/cmd.err" \
      || status="FAILED: $(tail -1 "$W/cmd.err" | cut -c1-150)"
    awk -F': ' -v k="$kind" -v c="$cmd" -v st="$status" '/Elapsed \(wall clock\)/ {w = $2} /Maximum resident set size/ {m = $2}
      END {printf "  %-5s %-16s %10s wall  %7.1f MiB  %s\n", k, c, w, m / 1024, (st == "ok" ? "" : st)}' "$W/time.out"
  done
done
echo "  (s3 = walnut-testkit's server: s3s-fs with its own paged listing that reads only the prefix's directories)"
echo "load at end $(cut -d' ' -f1-3 /proc/loadavg)"


