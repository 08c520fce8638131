#!/bin/bash
# Incremental-dump benchmarks (issue 3), as ratios measured in one run:
#  1. a 1 GiB process that writes 1 % of its pages between dumps: the
#     incremental dump's wall time, the time the process is stopped and the
#     bytes it writes, beside the full dump of the same process (median of
#     ROUNDS incremental dumps, default 5). Targets: stopped <= 5 % of the
#     full dump's; bytes written <= 1.2 x the bytes the process dirtied.
#  2. a tree of 8 fork children sharing 256 MiB: image size beside the sum of
#     their RSS and beside their distinct memory. Target: <= 1.2 x distinct.
#  3. a write-heavy loop over 256 MiB, its passes per second with tracking
#     armed beside without (alternating windows, median of 3 each).
#     Target: >= 0.95 of the untracked rate.
# Images on /dev/shm. Takes the e2e test lock. Writes bench/incr-results-DATE.txt.
set -euo pipefail
export LC_ALL=C
[ -n "${EPOCHREALTIME:-}" ] || { echo "bench/incr.sh needs bash >= 5 (EPOCHREALTIME)" >&2; exit 1; }
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
cargo build --release --quiet
SNAP=${SNAP_BIN:-$PWD/target/release/snap}
WORK=$(mktemp -d /dev/shm/snap-incr.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
gcc -O2 -o "$WORK/dirty" bench/dirty.c

LOCK=${TMPDIR:-/tmp}/snap-e2e.lock
exec 9>>"$LOCK"
flock 9

calc() { awk "BEGIN { print $* }"; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
wait_file() { local t=$(( $(date +%s) + 120 )); while [ ! -e "$1" ]; do [ "$(date +%s)" -lt $t ] || { echo "timeout waiting for $1" >&2; exit 1; }; sleep 0.01; done; }
spawn() { # statedir args... ; sets PID
    local st=$1; shift
    mkdir -p "$st"
    ( setsid "$WORK/dirty" "$@" </dev/null >/dev/null 2>&1 9>&- & echo $! >"$st.pid"; wait ) 2>/dev/null &
    while [ ! -s "$st.pid" ]; do sleep 0.001; done
    PID=$(cat "$st.pid")
    PIDS+=("$PID")
    wait_file "$st/ready"
}
# JSON field of a dump summary.
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
dump() { # json-out args...
    local out=$1; shift
    "$SNAP" dump "$@" --json >"$out" 2>"$WORK/err" || { cat "$WORK/err" >&2; exit 1; }
}
bytes_of() { du -sb "$1" | cut -f1; }

LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
OUT=()
row() { OUT+=("$(printf '%-46s %14s %14s %8s %9s' "$@")"); }
row "measure" "incremental" "full / base" "ratio" "target"

# 1. 1 GiB, 1 % written between dumps.
st=$WORK/r
spawn "$st" rounds "$st" 1024 10
pid=$PID
dump "$WORK/full.json" -t "$pid" -D "$WORK/img0" --leave-running --track-mem
FW=$(field seconds <"$WORK/full.json"); FS=$(field stopped_seconds <"$WORK/full.json"); FB=$(bytes_of "$WORK/img0")
WS=() SS=() BS=() DS=()
for r in $(seq "$ROUNDS"); do
    rm -f "$st/round"
    kill -USR1 "$pid"
    wait_file "$st/round"
    dump "$WORK/inc.json" -t "$pid" -D "$WORK/img$r" --leave-running --track-mem --prev-images-dir "$WORK/img$((r - 1))"
    [ "$(field backend <"$WORK/inc.json")" = uffd-wp ] || { echo "incremental dump did not use uffd-wp tracking: $(cat "$WORK/inc.json")" >&2; exit 1; }
    WS+=("$(field seconds <"$WORK/inc.json")")
    SS+=("$(field stopped_seconds <"$WORK/inc.json")")
    BS+=("$(bytes_of "$WORK/img$r")")
    # Pages the round wrote: every 100th page.
    DS+=("$(( (1024 << 20) / 4096 / 100 * 4096 ))")
done
IW=$(printf '%s\n' "${WS[@]}" | median); IS=$(printf '%s\n' "${SS[@]}" | median)
IB=$(printf '%s\n' "${BS[@]}" | median); DB=$(printf '%s\n' "${DS[@]}" | median)
ms() { printf '%.1f ms' "$(calc "$1 * 1000")"; }
mb() { printf '%.1f MB' "$(calc "$1 / 1000000")"; }
row "1 GiB, 1 % dirty: dump wall time" "$(ms "$IW")" "$(ms "$FW")" "$(printf '%.3f' "$(calc "$IW / $FW")")" ""
row "1 GiB, 1 % dirty: time stopped" "$(ms "$IS")" "$(ms "$FS")" "$(printf '%.3f' "$(calc "$IS / $FS")")" "<= 0.05"
row "1 GiB, 1 % dirty: bytes written (vs dirtied)" "$(mb "$IB")" "$(mb "$DB")" "$(printf '%.2f' "$(calc "$IB / $DB")")" "<= 1.2"
row "1 GiB full image (vs memory)" "$(mb "$FB")" "$(mb $((1024 << 20)))" "$(printf '%.2f' "$(calc "$FB / (1024 * 1048576)")")" ""
kill -9 "$pid"
rm -rf "$WORK"/img*

# 2. Fork tree sharing 256 MiB.
st=$WORK/t
spawn "$st" tree "$st" 256 8
read -r -a tree <"$st/ready"
RSS=0
for p in "${tree[@]}"; do RSS=$((RSS + $(awk '/^VmRSS/ {print $2}' /proc/$p/status) * 1024)); done
dump "$WORK/tree.json" -t "${tree[0]}" -D "$WORK/timg"
TB=$(bytes_of "$WORK/timg")
DISTINCT=$(( (256 << 20) + 8 * 4096 ))
row "fork tree 8 x 256 MiB: image (vs sum of RSS)" "$(mb "$TB")" "$(mb "$RSS")" "$(printf '%.3f' "$(calc "$TB / $RSS")")" ""
row "fork tree 8 x 256 MiB: image (vs distinct)" "$(mb "$TB")" "$(mb "$DISTINCT")" "$(printf '%.3f' "$(calc "$TB / $DISTINCT")")" "<= 1.2"
rm -rf "$WORK/timg"

# 3. Write-heavy loop with and without tracking.
st=$WORK/l
spawn "$st" loop "$st" 256
pid=$PID
passes() { od -An -tu8 -N8 "$st/passes" | tr -d ' '; }
rate() { # passes per second over 2 s
    local p0 t0 p1 t1
    p0=$(passes); t0=$EPOCHREALTIME
    sleep 2
    p1=$(passes); t1=$EPOCHREALTIME
    calc "($p1 - $p0) / ($t1 - $t0)"
}
UN=() TR=()
sleep 1
for i in 1 2 3; do
    UN+=("$(rate)")
    dump "$WORK/arm.json" -t "$pid" -D "$WORK/limg$i" --leave-running --track-mem
    sleep 1 # the first write to each protected page costs a fault; steady state after one pass
    TR+=("$(rate)")
    # Disarm: a dump that takes the tracking and does not arm it again.
    dump "$WORK/dis.json" -t "$pid" -D "$WORK/limg$i-off" --leave-running --prev-images-dir "$WORK/limg$i"
    rm -rf "$WORK/limg$i" "$WORK/limg$i-off"
done
RU=$(printf '%s\n' "${UN[@]}" | median); RT=$(printf '%s\n' "${TR[@]}" | median)
row "write loop 256 MiB: passes/s tracked (vs not)" "$(printf '%.0f' "$RT")" "$(printf '%.0f' "$RU")" "$(printf '%.3f' "$(calc "$RT / $RU")")" ">= 0.95"
kill -9 "$pid"

RES=bench/incr-results-$(date +%Y%m%d-%H%M%S).txt
{
    echo "snap incremental benchmarks $(date -Is) on $(uname -r), $(nproc) cpus, images on /dev/shm"
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (modified)'), load average at start: $LOAD"
    echo "incremental rows: median of $ROUNDS dumps; loop rows: median of 3 windows of 2 s"
    printf '%s\n' "${OUT[@]}"
} | tee "$RES"
echo "written $RES"
