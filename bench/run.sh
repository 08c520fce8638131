#!/bin/bash
# Benchmarks for snap, as ratios measured in one run on this machine:
#   memcpy bandwidth (the reference), dump and restore throughput of a
#   64 MiB and a 1 GiB process (images on tmpfs) as a fraction of memcpy,
#   and the wall time to dump and to restore a `sleep` process (median of 10).
# Also measured, as the floors a dump/restore of fresh memory cannot beat on
# this machine: first-touch bandwidth of fresh anonymous memory (a restore
# faults in every page of the restored process) and the bandwidth of writing
# a new file on /dev/shm (a dump allocates every page of the image); the
# "floor" column is each figure's ratio to the floor that bounds it.
# Memory figures are the median of REPS runs (default 3).
# Targets: 1 GiB dump and restore >= 40% of memcpy; small dump/restore < 10 ms.
# Takes the e2e test lock ($TMPDIR/snap-e2e.lock) so it never runs beside the
# end-to-end tests (same PIDs, same CPUs). Writes bench/results-DATE.txt.
# Times are taken with $EPOCHREALTIME (no process started inside the
# measured interval). Run as root. SNAP_TIMING=1 makes snap print where its time goes.
set -euo pipefail
export LC_ALL=C
[ -n "${EPOCHREALTIME:-}" ] || { echo "bench/run.sh needs bash >= 5 (EPOCHREALTIME)" >&2; exit 1; }
cd "$(dirname "$0")/.."
ROOT=$PWD
REPS=${REPS:-3}
cargo build --release --quiet
SNAP=${SNAP_BIN:-$ROOT/target/release/snap}
WORK=$(mktemp -d /dev/shm/snap-bench.XXXXXX)
BIN=$WORK/bin
mkdir -p "$BIN"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
gcc -O2 -o "$BIN/memcpy_bw" bench/memcpy_bw.c
gcc -O2 -o "$BIN/fresh_bw" bench/fresh_bw.c
gcc -O1 -pthread -o "$BIN/bigmem" fixtures/bigmem.c

LOCK=${TMPDIR:-/tmp}/snap-e2e.lock
exec 9>>"$LOCK"
if ! flock -n 9; then
    echo "waiting for $LOCK (tests running)..." >&2
    flock 9
fi

calc() { awk "BEGIN { print $* }"; }
wait_gone() { # pid [timeout s]
    local t=$(( $(date +%s) + ${2:-30} ))
    while [ -e /proc/$1 ]; do
        [ "$(date +%s)" -lt $t ] || { echo "pid $1 did not go away" >&2; return 1; }
        sleep 0.005
    done
}
wait_file() { local t=$(( $(date +%s) + 120 )); while [ ! -e "$1" ]; do [ "$(date +%s)" -lt $t ] || { echo "timeout waiting for $1" >&2; exit 1; }; sleep 0.01; done; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
# Start a workload in its own session under a reaper subshell, so it is
# reaped as soon as it dies (pid 1 here reaps only after seconds) and bash
# prints no "Killed" notices. Sets PID.
spawn() { # pidfile cmd...
    local pf=$1; shift
    rm -f "$pf"
    # The workload must not inherit fd 9 (our lock): it would hold the lock too.
    ( setsid "$@" </dev/null >/dev/null 2>&1 9>&- & echo $! >"$pf"; wait ) 2>/dev/null &
    while [ ! -s "$pf" ]; do sleep 0.001; done
    PID=$(cat "$pf")
    PIDS+=("$PID")
}

LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
MEMCPY=$("$BIN/memcpy_bw")
read -r TOUCH TMPFSW < <("$BIN/fresh_bw" "$WORK" 1024)
OUT=()
row() { OUT+=("$(printf '%-34s %12s %8s %8s %9s' "$@")"); }
row "measure" "value" "ratio" "floor" "target"
row "memcpy bandwidth" "${MEMCPY} GB/s" "1.00" "" ""
row "first touch of fresh memory" "${TOUCH} GB/s" "$(printf '%.2f' "$(calc "$TOUCH / $MEMCPY")")" "" ""
row "tmpfs write, new 1 GiB file" "${TMPFSW} GB/s" "$(printf '%.2f' "$(calc "$TMPFSW / $MEMCPY")")" "" ""

mem_case() { # MiB
    local mib=$1 st=$WORK/st$1 img=$WORK/img$1 ds=() rs=() i
    for i in $(seq "$REPS"); do
        rm -rf "$st" "$img"
        mkdir -p "$st"
        spawn "$WORK/pid" "$BIN/bigmem" "$st" "$mib"
        local pid=$PID
        wait_file "$st/ready"
        local t0 t1 t2 t3
        t0=$EPOCHREALTIME
        "$SNAP" dump -t $pid -D "$img" 2>"$WORK/err" || { cat "$WORK/err" >&2; exit 1; }
        t1=$EPOCHREALTIME
        wait_gone $pid
        t2=$EPOCHREALTIME
        "$SNAP" restore -D "$img" -d
        t3=$EPOCHREALTIME
        rm -f "$st/result"
        kill -USR1 $pid
        wait_file "$st/result"
        grep -q '^ok' "$st/result" || { echo "bigmem $mib MiB after restore: $(cat "$st/result")" >&2; exit 1; }
        kill -9 $pid
        ds+=("$(calc "$t1 - $t0")")
        rs+=("$(calc "$t3 - $t2")")
        rm -rf "$img"
    done
    local bytes=$((mib << 20)) dt rt dbw rbw tgt=""
    dt=$(printf '%s\n' "${ds[@]}" | median)
    rt=$(printf '%s\n' "${rs[@]}" | median)
    dbw=$(calc "$bytes / $dt / 1000000000")
    rbw=$(calc "$bytes / $rt / 1000000000")
    [ "$mib" -ge 1024 ] && tgt=">= 0.40"
    row "dump ${mib} MiB ($(printf '%.0f' "$(calc "$dt * 1000")") ms)" "$(printf '%.2f GB/s' "$dbw")" \
        "$(printf '%.2f' "$(calc "$dbw / $MEMCPY")")" "$(printf '%.2f' "$(calc "$dbw / $TMPFSW")")" "$tgt"
    row "restore ${mib} MiB ($(printf '%.0f' "$(calc "$rt * 1000")") ms)" "$(printf '%.2f GB/s' "$rbw")" \
        "$(printf '%.2f' "$(calc "$rbw / $MEMCPY")")" "$(printf '%.2f' "$(calc "$rbw / $TOUCH")")" "$tgt"
}
mem_case 64
mem_case 1024

DUMPS=() RESTS=()
for i in $(seq 10); do
    spawn "$WORK/pid" sleep 1000
    pid=$PID
    while [ "$(cut -d' ' -f1 /proc/$pid/syscall 2>/dev/null)" != 230 ] && [ "$(cut -d' ' -f1 /proc/$pid/syscall 2>/dev/null)" != 35 ]; do sleep 0.005; done
    img=$WORK/sleep$i
    t0=$EPOCHREALTIME; "$SNAP" dump -t $pid -D "$img"; t1=$EPOCHREALTIME
    wait_gone $pid
    t2=$EPOCHREALTIME; "$SNAP" restore -D "$img" -d; t3=$EPOCHREALTIME
    kill -9 $pid
    DUMPS+=("$(calc "($t1 - $t0) * 1000")")
    RESTS+=("$(calc "($t3 - $t2) * 1000")")
done
row "dump sleep (median of 10)" "$(printf '%s\n' "${DUMPS[@]}" | median | xargs printf '%.1f ms')" "" "" "< 10 ms"
row "restore sleep (median of 10)" "$(printf '%s\n' "${RESTS[@]}" | median | xargs printf '%.1f ms')" "" "" "< 10 ms"

RES=bench/results-$(date +%Y%m%d-%H%M%S).txt
{
    echo "snap benchmarks $(date -Is) on $(uname -r), $(nproc) cpus ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), images on /dev/shm"
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (modified)'), load average at start: $LOAD"
    echo "ratio = to memcpy; floor = to the first-touch (restore) or tmpfs-write (dump) bandwidth; memory rows: median of $REPS"
    printf '%s\n' "${OUT[@]}"
} | tee "$RES"
echo "written $RES"
