#!/usr/bin/env bash
# bench/incremental.sh: block-incremental backups. On two datasets (pgbench scale 100, and the
# "realistic" one of bench/backup.sh), one run measures side by side:
#   - a full backup by walnut and by pgBackRest (zst level 1, process-max 2, walnut parallel 2);
#   - then, CHAIN times, a "day of change" and an incremental by each (walnut --incremental,
#     pgBackRest --type=incr), and at the end a pgBackRest --type=diff;
#   - restores: walnut's chain (1 full + CHAIN incrementals) against a walnut full backup taken
#     at the same point, and pgBackRest's chain.
# Every step runs with a cold page cache (COLD_CACHE=1, the default: caches dropped before each
# step), so "read MB" (block input of the command and its children, /usr/bin/time) is what it
# read from disk. Both tools archive every WAL file (one archive_command runs both).
#
#   nice -n 10 bash bench/incremental.sh
#
# Knobs: SCALE=100, ROWS=5200000, DATASETS="pgbench realistic", REPEAT=3 (interleaved rounds; the
# table shows medians and the spreads), CHAIN=6, TXNS=2500 (pgbench transactions per client, 2
# clients, per day of change), NEW_ROWS=10000 and UPDATED_ROWS=2000 (realistic, per day), SKIP_PGBACKREST=1,
# COLD_CACHE= (empty: warm cache), STEP_TIMEOUT=900, NO_WAIT=1, KEEP=1. Needs root.
#
# The day of change: pgbench: pgbench -n -c 2 -t TXNS (uniform random accounts: a few % of the
# accounts table's blocks, and the index pages their new versions go to); realistic: UPDATED_ROWS
# consecutive orders updated (their new versions and index entries land where PostgreSQL puts
# them) and NEW_ROWS orders inserted. The report says which share of the data directory's blocks
# each incremental stored.
set -euo pipefail
shopt -s inherit_errexit
export LC_ALL=C
cd "$(dirname "$0")/.."
SRC=$(pwd)
SCALE=${SCALE:-100} ROWS=${ROWS:-5200000} DATASETS=${DATASETS:-pgbench realistic}
STEP_TIMEOUT=${STEP_TIMEOUT:-900} REPEAT=${REPEAT:-3} CHAIN=${CHAIN:-6} TXNS=${TXNS:-2500}
NEW_ROWS=${NEW_ROWS:-10000} UPDATED_ROWS=${UPDATED_ROWS:-2000} PGBR_VARIANTS=zst1
PGBIN=/usr/lib/postgresql/15/bin PORT=54339 LOCK=/tmp/walnut-bench.lock
[[ $(id -u) == 0 ]] || { echo "run as root (PostgreSQL is run as the postgres OS user)" >&2; exit 2; }
[[ -x $PGBIN/postgres ]] || { echo "PostgreSQL 15 not found in $PGBIN (bash scripts/setup.sh)" >&2; exit 2; }
BENCH_NAME=incremental SKIP_S3=1 COLD_CACHE=${COLD_CACHE-1}
# shellcheck source=bench/lib.sh
source "$SRC/bench/lib.sh"

# change DS DAY: one day of change
change() {
  case $1 in
    pgbench)
      "${AS_PG[@]}" "$PGBIN/pgbench" -h "$W/sock" -p "$PORT" -U postgres -n -c 2 -t "$TXNS" postgres >>"$W/change.log" 2>&1 ||
        die "pgbench failed: $(tail -3 "$W/change.log")" ;;
    realistic)
      local first=$(( ($2 * 7919 % 500) * 10000 + 1 ))
      sql "UPDATE orders SET status = 'shipped', note = note || ' day $2' WHERE id BETWEEN $first AND $((first + UPDATED_ROWS - 1))"
      sql "INSERT INTO orders (id, account_id, ref, email, note, qty, price, created, status, payload)
           SELECT $ROWS + $2 * 1000000 + g, (random() * 200000)::int, md5(random()::text), 'new' || g || '@mail.test',
                  'day $2 order', 1 + (random() * 20)::int, round((random() * 1000)::numeric, 2), now(), 'new', md5(random()::text)
           FROM generate_series(1, $NEW_ROWS) g" ;;
  esac
}

# walnut_stored REPO_DIR: stored bytes of the newest backup (its row in backup-list --json)
walnut_stored() { "$WALNUT" --config "$1" --json backup-list | awk -F': ' '/"stored_bytes"/ {gsub(/[^0-9]/, "", $2); v = $2} END {print v + 0}'; }
# walnut_blocks CONFIG: blocks stored as changed blocks by the newest backup (backup-show --json)
walnut_blocks() {
  "$WALNUT" --config "$1" --json backup-show LATEST |
    awk -F'"' '/"stored": "/ {n = split($4, r, ","); for (i = 1; i <= n; i++) {split(r[i], ab, "-"); s += (ab[2] == "" ? 1 : ab[2] - ab[1] + 1)}} END {print s + 0}'
}
# pgbr_newest STANZA_DIR: bytes of pgBackRest's newest backup directory
pgbr_newest() { local d; d=$(ls -1d "$1"/backup/bench/*[0-9][FDI] 2>/dev/null | sort | tail -1); tree_bytes "$d"; }

one_round() { # DS ROUND
  local ds=$1 rd=$2 c p out=$W/$1/out i
  local repo=$W/repo/$ds-$rd
  c=$(WALNUT_BACKUP_EXTRA="max_chain = $((CHAIN + 1))" walnut_conf "$ds-r$rd" "file://$repo")
  if ((HAVE_PGBR)); then p=$(pgbr_conf "$ds-r$rd" zst1) || { FAILED+=("$ds stanza-create"); return 0; }; fi
  local push="$WALNUT -q --config $c wal-push %p"
  ((HAVE_PGBR)) && push="$push && pgbackrest --config=$p --stanza=bench archive-push %p"
  set_archive "$push"

  step "$ds" wfull.push "$WALNUT" --config "$c" backup-push --pgdata "$PGDATA" && walnut_stored "$c" >>"$R/$ds.wfull.push.storedruns"
  ((HAVE_PGBR)) && step "$ds" pfull.push pgbackrest --config="$p" --stanza=bench --type=full backup && pgbr_newest "$W/pgbr/$ds-r$rd" >>"$R/$ds.pfull.push.storedruns"
  for ((i = 1; i <= CHAIN; i++)); do
    say "$ds round $rd: day of change $i of $CHAIN"
    change "$ds" "$((rd * 100 + i))"
    if step "$ds" winc.push "$WALNUT" --config "$c" backup-push --incremental --pgdata "$PGDATA"; then
      walnut_stored "$c" >>"$R/$ds.winc.push.storedruns"
      walnut_blocks "$c" >>"$R/$ds.winc.blocks"
      grep -q 'incremental on' "$R/$ds.winc.push.out" || FAILED+=("$ds walnut incremental $i was a full backup: $(cat "$R/$ds.winc.push.err" | tail -2)")
    fi
    ((HAVE_PGBR)) && step "$ds" pinc.push pgbackrest --config="$p" --stanza=bench --type=incr backup && pgbr_newest "$W/pgbr/$ds-r$rd" >>"$R/$ds.pinc.push.storedruns"
  done
  ((HAVE_PGBR)) && step "$ds" pdiff.push pgbackrest --config="$p" --stanza=bench --type=diff backup && pgbr_newest "$W/pgbr/$ds-r$rd" >>"$R/$ds.pdiff.push.storedruns"

  # Restores: walnut's chain, a walnut full backup of the same point, pgBackRest's chain.
  local chain_id
  chain_id=$("$WALNUT" --config "$c" --json backup-list | awk -F'"' '/"id": "/ {v = $4} END {print v}')
  fresh_dir "$out"
  step "$ds" wchain.restore "$WALNUT" --config "$c" restore "$out" --backup "$chain_id" && check_restored "$ds" wchain.restore "$out"
  rm -rf "$out"
  if step "$ds" wfull2.push "$WALNUT" --config "$c" backup-push --pgdata "$PGDATA"; then
    fresh_dir "$out"
    step "$ds" wfull.restore "$WALNUT" --config "$c" restore "$out" --backup LATEST && check_restored "$ds" wfull.restore "$out"
    rm -rf "$out"
  fi
  if ((HAVE_PGBR)); then
    fresh_dir "$out"
    step "$ds" pchain.restore pgbackrest --config="$p" --stanza=bench --pg1-path="$out" --set="$(basename "$(ls -1d "$W/pgbr/$ds-r$rd"/backup/bench/*I | sort | tail -1)")" restore &&
      check_restored "$ds" pchain.restore "$out"
    rm -rf "$out"
  fi
  set_archive /bin/true
  rm -rf "$repo" "$W/pgbr/$ds-r$rd"
}

BENCH_T0=$SECONDS
for ds in $DATASETS; do
  make_cluster "$ds"
  for ((rep = 1; rep <= REPEAT; rep++)); do
    say "$ds: round $rep of $REPEAT"
    one_round "$ds" "$rep"
  done
  echo $(( $(find "$PGDATA" -path "$PGDATA/pg_wal" -prune -o -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}') / 8192 )) >"$R/$ds.blocks"
  pg_stop
  rm -rf "$PGDATA" "$W/$ds"
  PGDATA=''
done

# ---------------------------------------------------------------- report
med() { [[ -s $1 ]] && sort -n "$1" | awk '{a[NR] = $1} END {printf "%.0f", NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}' || echo ''; }
mb() { [[ -n $1 ]] && awk -v x="$1" 'BEGIN {printf "%.0f", x / 1e6}' || echo '-'; }
row() { # DS KEY LABEL
  local f=$R/$1.$2
  [[ -s $f.secs ]] || return 0
  printf '  %-36s %7s %7s %-13s %8s %9s %6s\n' "$3" "$(cat "$f.secs")" "$(num "$f.cpu")" "[$(awk '{printf "%.1f-%.1f", $1, $2}' "$f.spread")]" \
    "$(mb "$(med "$f.readruns")")" "$(mb "$(med "$f.storedruns")")" "$(( $(num "$f.rss") / 1024 ))"
}
echo
echo "walnut incremental backup benchmark  walnut $REV_DESC  $(date -u +%Y-%m-%dT%H:%MZ)  $(nproc) cores  PostgreSQL $("$PGBIN/postgres" -V | awk '{print $3}')  $( ((HAVE_PGBR)) && pgbackrest version || echo 'pgBackRest: not installed')"
echo "walnut: parallel 2, zstd 1; pgBackRest: process-max 2, zst 1 (2.45 has no block incremental); $REPEAT rounds of 1 full + $CHAIN incrementals; cache $([[ -n $COLD_CACHE ]] && echo 'cold (dropped before each step)' || echo warm)"
[[ -n $PGBR_NOTE ]] && echo "NOTE: $PGBR_NOTE"
for ds in $DATASETS; do
  echo
  case $ds in
    pgbench) echo "$ds: pgbench -i -s $SCALE; a day of change = pgbench -n -c 2 -t $TXNS" ;;
    realistic) echo "$ds: $ROWS orders; a day of change = $UPDATED_ROWS consecutive orders updated, $NEW_ROWS inserted" ;;
  esac
  printf '  %-36s %7s %7s %-13s %8s %9s %6s\n' '' 'wall s' 'CPU s' '[spread]' 'read MB' 'stored MB' 'RSS'
  row "$ds" wfull.push "walnut full backup"
  row "$ds" winc.push "walnut incremental (each of $CHAIN)"
  row "$ds" pfull.push "pgBackRest full"
  row "$ds" pinc.push "pgBackRest incr (each of $CHAIN)"
  row "$ds" pdiff.push "pgBackRest diff (after $CHAIN days)"
  row "$ds" wchain.restore "walnut restore: full + $CHAIN incr"
  row "$ds" wfull.restore "walnut restore: a full backup"
  row "$ds" pchain.restore "pgBackRest restore: full + $CHAIN incr"
  blocks=$(med "$R/$ds.winc.blocks") total=$(num "$R/$ds.blocks")
  [[ -n $blocks && -n $total ]] && awk -v b="$blocks" -v t="$total" 'BEGIN {printf "  a walnut incremental stored %d changed blocks: %.2f%% of the data directory'"'"'s %d blocks\n", b, 100 * b / t, t}'
  ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a != "" && b > 0) printf "%.2f", a / b; else printf "n/a"}'; }
  ws=$(num "$R/$ds.wfull.push.secs") is=$(num "$R/$ds.winc.push.secs")
  echo "  goal: an incremental >= 5x faster than a full: full / incremental = $(ratio "$ws" "$is")"
  echo "  goal: stored <= pgBackRest's incremental: walnut / pgBackRest = $(ratio "$(med "$R/$ds.winc.push.storedruns")" "$(med "$R/$ds.pinc.push.storedruns")")"
  echo "  goal: reads about the changed bytes: read / stored changed blocks = $(ratio "$(med "$R/$ds.winc.push.readruns")" "$(awk -v b="${blocks:-0}" 'BEGIN {print b * 8192}')")"
  echo "  goal: chain restore within 1.2x of a full restore: $(ratio "$(num "$R/$ds.wchain.restore.secs")" "$(num "$R/$ds.wfull.restore.secs")")"
done
echo "  (medians of the runs; spreads are min-max; ran in $((SECONDS - BENCH_T0)) s)"
if ((${#FAILED[@]})); then
  echo
  echo "FAILED steps:"; printf '  %s\n' "${FAILED[@]}"
  exit 1
fi
