#!/usr/bin/env bash
# bench/backup.sh: base backup and restore figures for walnut, measured in one run next to
# pg_basebackup (-Ft -z and -Ft) and pgBackRest (full backup + restore, lz4 and zst, process-max=2),
# on two datasets: a pgbench database (scale 100, ~1.5 GB) and a "realistic" one (~1 GB table of
# mixed text, hex strings, numbers and timestamps, plus two indexes) that compresses like real data.
#
#   nice -n 10 bash bench/backup.sh                  # builds this checkout (release), then measures
#   WALNUT_REV=HEAD nice -n 10 bash bench/backup.sh  # builds a git revision instead (for a dirty tree)
#
# Also: walnut verify against pgbackrest verify on the same backups, and (SKIP_AGE unset) the cost
# of age encryption on backup-push, backup-fetch, restore and verify.
#
# Knobs (environment): SCALE=100 (pgbench -i -s), ROWS=5200000 (realistic rows), DATASETS="pgbench
# realistic", STEP_TIMEOUT=900 (seconds, any one timed command), SKIP_PGBACKREST=1, SKIP_S3=1, SKIP_AGE=1
# (the file:// runs again with age encryption, compared with the clear ones),
# PGBR_VARIANTS="lz4 zst zst1" (zst1 = zst at level 1, walnut's level), REPEAT=3 (runs of every
# walnut and pgBackRest figure; the table shows the median, the spread is min-max), NO_WAIT=1 (do not wait
# for bench/wal.sh), KEEP=1 (keep the work directory). Needs root (PostgreSQL 15 runs as the
# `postgres` OS user), PostgreSQL 15 in /usr/lib/postgresql/15/bin, ~12 GB free in /tmp.
#
# Method: each dataset is generated once (wal_level=minimal, so generation writes little WAL), then
# the cluster is restarted with wal_level=replica, archive_mode=on and every tool runs against the
# same, idle, page-cached cluster, one after the other. Each tool archives its own WAL with its own
# archive_command (switched with ALTER SYSTEM + pg_reload_conf, proved working by a WAL switch
# before the timed run). Every timed command runs as `postgres`, alone, after `sync`, from fork to
# exit (wall time); CPU = user + system seconds of the command and its children; max RSS is
# /usr/bin/time -v (the largest single process of the command's tree); "sum RSS" is the peak,
# sampled every 0.5 s, of the RSS summed over the command's processes (pgBackRest runs a main
# process plus process-max workers). Sizes: data = bytes of the data directory without pg_wal;
# stored = bytes of the backup in the repository (WAL archive excluded; pg_basebackup's pg_wal.tar
# included); ratio = data / stored; MB = 10^6 bytes.
set -euo pipefail
shopt -s inherit_errexit
export LC_ALL=C
cd "$(dirname "$0")/.."
SRC=$(pwd)
SCALE=${SCALE:-100} ROWS=${ROWS:-5200000} DATASETS=${DATASETS:-pgbench realistic}
STEP_TIMEOUT=${STEP_TIMEOUT:-900} PGBR_VARIANTS=${PGBR_VARIANTS:-lz4 zst zst1} REPEAT=${REPEAT:-3}
PGBIN=/usr/lib/postgresql/15/bin PORT=54339 LOCK=/tmp/walnut-bench.lock
[[ $(id -u) == 0 ]] || { echo "run as root (PostgreSQL is run as the postgres OS user)" >&2; exit 2; }
[[ -x $PGBIN/postgres ]] || { echo "PostgreSQL 15 not found in $PGBIN (bash scripts/setup.sh)" >&2; exit 2; }
BENCH_NAME=backup
# shellcheck source=bench/lib.sh
source "$SRC/bench/lib.sh"

# ---------------------------------------------------------------- the runs
walnut_runs() { # DS KIND(file|s3|age: file:// encrypted with age)
  local ds=$1 kind=$2 c repo store k=w$2 out=$W/$1/out
  if [[ $kind != s3 ]]; then repo=file://$W/repo/$ds store=$W/repo/$ds; else repo=s3://walnut/$ds store=$S3_BUCKET_DIR/$ds; fi
  c=$(walnut_conf "$ds-$kind" "$repo")
  set_archive "$WALNUT -q --config $c wal-push %p"
  if step "$ds" "$k.push" "$WALNUT" --json --config "$c" backup-push --pgdata "$PGDATA"; then
    tree_bytes "$store/backups" >"$R/$ds.$k.push.stored"
    sed -n 's/^ *"data_bytes": *\([0-9]*\).*/\1/p' "$R/$ds.$k.push.out" >"$R/$ds.$k.push.walnut_data"
    if [[ $kind != s3 ]]; then step "$ds" "$k.verify" "$WALNUT" -q --config "$c" verify || true; fi
    fresh_dir "$out"
    step "$ds" "$k.fetch" "$WALNUT" --config "$c" backup-fetch "$out" LATEST && check_restored "$ds" "$k.fetch" "$out"
    if [[ $kind != s3 ]]; then
      rm -rf "$out"; fresh_dir "$out"
      step "$ds" "$k.restore" "$WALNUT" --config "$c" restore "$out" && check_restored "$ds" "$k.restore" "$out"
    fi
    rm -rf "$out"
  fi
  rm -rf "$store"
}
basebackup_runs() { # DS
  local ds=$1 out=$W/$1/out
  set_archive /bin/true
  fresh_dir "$out"
  step "$ds" pbz.push "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$PORT" -U postgres -D "$out" -Ft -z -c fast && tree_bytes "$out" >"$R/$ds.pbz.push.stored"
  fresh_dir "$out"
  step "$ds" pbt.push "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$PORT" -U postgres -D "$out" -Ft -c fast && tree_bytes "$out" >"$R/$ds.pbt.push.stored"
  rm -rf "$out"
}
pgbr_runs() { # DS VARIANT
  local ds=$1 v=$2 c out=$W/$1/out
  c=$(pgbr_conf "$ds-$v" "$v") || { FAILED+=("$ds pgbackrest $v stanza-create"); return 0; }
  set_archive "pgbackrest --config=$c --stanza=bench archive-push %p"
  if step "$ds" "$v.push" pgbackrest --config="$c" --stanza=bench --type=full backup; then
    tree_bytes "$W/pgbr/$ds-$v/backup/bench/"*F >"$R/$ds.$v.push.stored"
    step "$ds" "$v.verify" pgbackrest --config="$c" --stanza=bench verify || true
    fresh_dir "$out"
    step "$ds" "$v.restore" pgbackrest --config="$c" --stanza=bench --pg1-path="$out" restore && check_restored "$ds" "$v.restore" "$out"
    rm -rf "$out"
  fi
  rm -rf "$W/pgbr/$ds-$v"
}

BENCH_T0=$SECONDS
for ds in $DATASETS; do
  make_cluster "$ds"
  # Interleaved repeats, so a noisy minute hits every tool alike.
  for ((rep = 1; rep <= REPEAT; rep++)); do
    say "$ds: round $rep of $REPEAT"
    walnut_runs "$ds" file
    ((HAVE_S3)) && walnut_runs "$ds" s3
    [[ -z ${SKIP_AGE:-} ]] && walnut_runs "$ds" age
    if ((HAVE_PGBR)); then for v in $PGBR_VARIANTS; do pgbr_runs "$ds" "$v"; done; fi
  done
  basebackup_runs "$ds"
  set_archive /bin/true
  pg_stop
  rm -rf "$PGDATA" "$W/$ds"
  PGDATA=''
done

# ---------------------------------------------------------------- report
ROWS_SHOWN=(wfile.push ws3.push wage.push wfile.fetch ws3.fetch wage.fetch wfile.restore wage.restore wfile.verify wage.verify pbz.push pbt.push)
for v in $PGBR_VARIANTS; do ROWS_SHOWN+=("$v.push" "$v.restore" "$v.verify"); done
label() {
  case $1 in
    wfile.push) echo "walnut backup-push  file:// zstd-1" ;;
    ws3.push) echo "walnut backup-push  s3 zstd-1" ;;
    wfile.fetch) echo "walnut backup-fetch file://" ;;
    ws3.fetch) echo "walnut backup-fetch s3" ;;
    wfile.restore) echo "walnut restore      file://" ;;
    wage.push) echo "walnut backup-push  file:// +age" ;;
    wage.fetch) echo "walnut backup-fetch file:// +age" ;;
    wage.restore) echo "walnut restore      file:// +age" ;;
    wfile.verify) echo "walnut verify       file://" ;;
    wage.verify) echo "walnut verify       file:// +age" ;;
    lz4.verify) echo "pgBackRest verify   lz4-1" ;;
    zst.verify) echo "pgBackRest verify   zst-3" ;;
    zst1.verify) echo "pgBackRest verify   zst-1" ;;
    pbz.push) echo "pg_basebackup -Ft -z (gzip)" ;;
    pbt.push) echo "pg_basebackup -Ft (no compr.)" ;;
    lz4.push) echo "pgBackRest backup   lz4-1" ;;
    lz4.restore) echo "pgBackRest restore  lz4-1" ;;
    zst.push) echo "pgBackRest backup   zst-3" ;;
    zst.restore) echo "pgBackRest restore  zst-3" ;;
    zst1.push) echo "pgBackRest backup   zst-1" ;;
    zst1.restore) echo "pgBackRest restore  zst-1" ;;
    *) echo "$1" ;;
  esac
}
set -- $DATASETS
echo
echo "walnut base backup benchmark  walnut $REV_DESC  $(date -u +%Y-%m-%dT%H:%MZ)  $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)  PostgreSQL $("$PGBIN/postgres" -V | awk '{print $3}')  $( ((HAVE_PGBR)) && pgbackrest version || echo 'pgBackRest: not installed')"
echo "walnut: [backup] parallel = 2, zstd level 1; pgBackRest: process-max=2, start-fast=y, lz4 level 1 / zst level 3 (its default) / zst level 1; pg_basebackup: -c fast, -X stream, gzip level 6"
for ds in "$@"; do
  case $ds in
    pgbench) d="pgbench -i -s $SCALE" ;;
    realistic) d="$ROWS rows of words, md5 hex, e-mails, numbers, timestamps" ;;
    *) d=$ds ;;
  esac
  printf '  %-10s %s (%s), data %s MB (without pg_wal), generated in %s s\n' "$ds:" "$d" "$(num "$R/$ds.rel")" "$(awk '{printf "%.0f", $1 / 1e6}' "$R/$ds.data")" "$(num "$R/$ds.gen")"
done
[[ -n $S3_NOTE ]] && echo "NOTE: $S3_NOTE"
[[ -n $PGBR_NOTE ]] && echo "NOTE: $PGBR_NOTE"
echo
W1=34 FMT='%7s %6s %6s %8s %6s %6s %6s'
printf "%-${W1}s" ''; for ds in "$@"; do printf ' | %-51s' "$ds"; done; echo
printf "%-${W1}s" 'tool / operation'; for ds in "$@"; do printf " | $FMT" 'wall s' 'CPU s' 'MB/s' 'stored' 'ratio' 'RSS' 'sumRSS'; done; echo
printf "%-${W1}s" ''; for ds in "$@"; do printf " | $FMT" '' '' '' 'MB' '' 'MiB' 'MiB'; done; echo
for k in "${ROWS_SHOWN[@]}"; do
  [[ $k == ws3.* ]] && ((!HAVE_S3)) && continue
  [[ $k == lz4.* || $k == zst* ]] && ((!HAVE_PGBR)) && continue
  printf "%-${W1}s" "$(label "$k")"
  for ds in "$@"; do printf " | $FMT" "$(cell "$ds" "$k" secs)" "$(cell "$ds" "$k" cpu)" "$(cell "$ds" "$k" mbs)" "$(cell "$ds" "$k" stored)" \
    "$(cell "$ds" "$k" ratio)" "$(cell "$ds" "$k" rss)" "$(cell "$ds" "$k" tree)"; done
  echo
done
echo "  CPU s = user + system time of the command and its children (not PostgreSQL's, not the S3 server's);"
echo "  MB/s = data size / wall time (for restores too); RSS = max RSS of the largest process (/usr/bin/time -v);"
echo "  sumRSS = peak of the RSS summed over the command's processes, sampled every 0.5 s; * = rustc/cargo/wal.sh ran meanwhile"
for ds in "$@"; do
  wd=$(num "$R/$ds.wfile.push.walnut_data")
  [[ -n $wd ]] && echo "  $ds: walnut's manifest counts $(awk -v x="$wd" 'BEGIN {printf "%.0f", x / 1e6}') MB of data"
done
if ((HAVE_PGBR)); then
  echo
  echo "== walnut (file://) / pgBackRest: below 1.00 = walnut faster / smaller / leaner =="
  printf '%-16s' 'vs'; for ds in "$@"; do printf ' | %-46s' "$ds"; done; echo
  printf '%-16s' ''; for ds in "$@"; do printf ' | %8s %8s %8s %9s %9s' 'backup' 'restore' 'stored' 'mem(RSS)' 'mem(sum)'; done; echo
  for v in $PGBR_VARIANTS; do
    printf '%-16s' "pgBackRest $(label "$v.push" | awk '{print $NF}')"
    for ds in "$@"; do
      printf ' | %8s %8s %8s %9s %9s' "$(ratio_of "$ds" wfile.push "$v.push" secs)" "$(ratio_of "$ds" wfile.restore "$v.restore" secs)" \
        "$(ratio_of "$ds" wfile.push "$v.push" stored)" "$(ratio_of "$ds" wfile.push "$v.push" rss)" "$(ratio_of "$ds" wfile.push "$v.push" tree)"
    done
    echo
  done
  echo "  backup: walnut backup-push / pgbackrest backup; restore: walnut restore / pgbackrest restore (both from a local repo, recovery config written)"
  echo
  echo "== verify: walnut verify (every part read whole and checked against its trailer and the manifest, the WAL from the backup's start) vs pgbackrest verify (every backup file and archived WAL file checked), same data =="
  for ds in "$@"; do
    for v in $PGBR_VARIANTS; do
      for k in wfile.verify "$v.verify"; do [[ $(num "$R/$ds.$k.status") == ok ]] || continue 2; done
      printf '  %-10s walnut %6.1f s [%s] %5s MB/s   pgBackRest %-5s %6.1f s [%s] %5s MB/s   walnut/pgBackRest %s\n' "$ds" \
        "$(cat "$R/$ds.wfile.verify.secs")" "$(awk '{printf "%.1f-%.1f", $1, $2}' "$R/$ds.wfile.verify.spread")" "$(cell "$ds" wfile.verify mbs)" \
        "$(label "$v.push" | awk '{print $NF}')" "$(cat "$R/$ds.$v.verify.secs")" "$(awk '{printf "%.1f-%.1f", $1, $2}' "$R/$ds.$v.verify.spread")" \
        "$(cell "$ds" "$v.verify" mbs)" "$(ratio_of "$ds" wfile.verify "$v.verify" secs)"
    done
  done
  echo "  MB/s = data directory size / wall time"
fi
if [[ -z ${SKIP_AGE:-} ]]; then
  echo
  echo "== Encryption (age) / clear, file://: goal <= 1.10 wall time and <= 1.15 CPU =="
  printf '%-16s' ''; for ds in "$@"; do printf ' | %-30s' "$ds"; done; echo
  printf '%-16s' ''; for ds in "$@"; do printf ' | %9s %9s %10s' 'wall' 'CPU' 'verdict'; done; echo
  for op in push fetch restore verify; do
    printf '%-16s' "$op"
    for ds in "$@"; do
      wall=$(ratio_of "$ds" "wage.$op" "wfile.$op" secs)
      cpu=$(awk -v a="$(num "$R/$ds.wage.$op.cpu")" -v b="$(num "$R/$ds.wfile.$op.cpu")" 'BEGIN {if (a != "" && b > 0) printf "%.2f", a / b; else printf "n/a"}')
      verdict=$(awk -v w="$wall" -v c="$cpu" 'BEGIN {if (w == "n/a" || c == "n/a") print "-"; else print (w <= 1.10 && c <= 1.15) ? "met" : "NOT met"}')
      printf ' | %9s %9s %10s' "$wall" "$cpu" "$verdict"
    done
    echo
  done
  echo "  medians of $REPEAT interleaved runs; the spreads of the wall times are in the table above; CPU s [min-max]:"
  for ds in "$@"; do
    for op in push fetch restore verify; do
      printf '    %-10s %-8s clear %s [%s]  age %s [%s]\n' "$ds" "$op" "$(num "$R/$ds.wfile.$op.cpu")" \
        "$(tr ' ' - <"$R/$ds.wfile.$op.cpuspread" 2>/dev/null)" "$(num "$R/$ds.wage.$op.cpu")" "$(tr ' ' - <"$R/$ds.wage.$op.cpuspread" 2>/dev/null)"
    done
  done
fi
echo
echo "== Goal: faster than pgBackRest at the same compression ratio; peak memory under 256 MiB =="
peak=0
for f in "$R"/*.w*.rss; do
  if [[ -s $f ]] && (($(cat "$f") > peak)); then peak=$(cat "$f"); fi
done
printf '  walnut peak RSS over all its runs: %.0f MiB -> %s\n' "$(awk -v x="$peak" 'BEGIN {print x / 1024}')" "$( ((peak > 0 && peak < 256 * 1024)) && echo 'under 256 MiB' || echo 'NOT under 256 MiB')"
if ((HAVE_PGBR)); then
  for ds in "$@"; do
    [[ $(num "$R/$ds.wfile.push.status") == ok ]] || continue
    for v in $PGBR_VARIANTS; do
      [[ $(num "$R/$ds.$v.push.status") == ok ]] || continue
      awk -v ds="$ds" -v v="$(label "$v.push" | awk '{print $NF}')" -v d="$(cat "$R/$ds.data")" \
        -v wt="$(cat "$R/$ds.wfile.push.secs")" -v ws="$(cat "$R/$ds.wfile.push.stored")" -v pt="$(cat "$R/$ds.$v.push.secs")" -v ps="$(cat "$R/$ds.$v.push.stored")" \
        -v wr="$(num "$R/$ds.wfile.restore.secs")" -v pr="$(num "$R/$ds.$v.restore.secs")" \
        -v wtsp="$(num "$R/$ds.wfile.push.spread")" -v ptsp="$(num "$R/$ds.$v.push.spread")" \
        -v wrsp="$(num "$R/$ds.wfile.restore.spread")" -v prsp="$(num "$R/$ds.$v.restore.spread")" '
        # A win or a loss only outside the spreads (min..max of the repeated runs), else a tie.
        function vs(a, b, asp, bsp,   x, y) {
          split(asp, x, " "); split(bsp, y, " ")
          if (x[3] < 2 || y[3] < 2) return "one run each: no verdict"
          return x[2] < y[1] ? "faster" : x[1] > y[2] ? "SLOWER" : "tie, spreads overlap"
        }
        function sp(s,   x) { split(s, x, " "); return sprintf("%.1f-%.1f", x[1], x[2]) }
        BEGIN {
          printf "  %-10s vs pgBackRest %-6s backup median %6.1f s [%s] vs %6.1f s [%s] (%s), ratio %.2f vs %.2f (%s)", ds, v, wt, sp(wtsp), pt, sp(ptsp), vs(wt, pt, wtsp, ptsp), d / ws, d / ps, ((d / ws) >= (d / ps) * 0.98 ? "same or better" : "LOWER")
          if (wr != "" && pr != "") printf ", restore median %6.1f s [%s] vs %6.1f s [%s] (%s)", wr, sp(wrsp), pr, sp(prsp), vs(wr, pr, wrsp, prsp)
          printf "\n" }'
    done
  done
fi
echo "  (medians of $REPEAT interleaved runs, [min-max]; a verdict only outside both spreads; ran in $((SECONDS - BENCH_T0)) s)"
if ((${#FAILED[@]})); then
  echo
  echo "FAILED steps:"; printf '  %s\n' "${FAILED[@]}"
  exit 1
fi
