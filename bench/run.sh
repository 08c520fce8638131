#!/bin/bash
# Benchmarks for snap, as ratios measured in one run on this machine:
#   memcpy bandwidth (the reference), dump and restore throughput of a
#   64 MiB and a 1 GiB process (images on tmpfs) as a fraction of memcpy,
#   and the wall time to dump and to restore a `sleep` process (median of 10).
# Targets: 1 GiB dump and restore >= 40% of memcpy; small dump/restore < 10 ms.
# Writes bench/results-DATE.txt. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
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
gcc -O1 -pthread -o "$BIN/bigmem" fixtures/bigmem.c

now() { date +%s.%N; }
calc() { awk "BEGIN { print $* }"; }
wait_gone() { # pid [timeout s]
    local t=$(( $(date +%s) + ${2:-30} ))
    while [ -e /proc/$1 ]; do
        [ "$(date +%s)" -lt $t ] || { echo "pid $1 did not go away" >&2; return 1; }
        sleep 0.01
    done
}
wait_file() { local t=$(( $(date +%s) + 120 )); while [ ! -e "$1" ]; do [ "$(date +%s)" -lt $t ] || { echo "timeout waiting for $1" >&2; exit 1; }; sleep 0.01; done; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

MEMCPY=$("$BIN/memcpy_bw")
OUT=()
row() { OUT+=("$(printf '%-34s %12s %10s %8s' "$@")"); }
row "measure" "value" "ratio" "target"
row "memcpy bandwidth" "${MEMCPY} GB/s" "1.00" ""

mem_case() { # MiB
    local mib=$1 st=$WORK/st$1 img=$WORK/img$1
    mkdir -p "$st"
    setsid "$BIN/bigmem" "$st" "$mib" </dev/null >/dev/null 2>&1 &
    local pid=$!
    PIDS+=($pid)
    wait_file "$st/ready"
    local t0 t1 t2
    t0=$(now)
    "$SNAP" dump -t $pid -D "$img"
    t1=$(now)
    wait "$pid" 2>/dev/null || true
    wait_gone $pid
    "$SNAP" restore -D "$img" -d
    t2=$(now)
    rm -f "$st/result"
    kill -USR1 $pid
    wait_file "$st/result"
    grep -q '^ok' "$st/result" || { echo "bigmem $mib MiB after restore: $(cat "$st/result")" >&2; exit 1; }
    kill -9 $pid
    wait_gone $pid
    local bytes=$((mib << 20))
    local dbw rbw
    dbw=$(calc "$bytes / ($t1 - $t0) / 1000000000")
    rbw=$(calc "$bytes / ($t2 - $t1) / 1000000000")
    local tgt=""
    [ "$mib" -ge 1024 ] && tgt=">= 0.40"
    row "dump ${mib} MiB" "$(printf '%.2f GB/s' "$dbw")" "$(printf '%.2f' "$(calc "$dbw / $MEMCPY")")" "$tgt"
    row "restore ${mib} MiB" "$(printf '%.2f GB/s' "$rbw")" "$(printf '%.2f' "$(calc "$rbw / $MEMCPY")")" "$tgt"
    rm -rf "$img"
}
mem_case 64
mem_case 1024

DUMPS=() RESTS=()
for i in $(seq 10); do
    setsid sleep 1000 </dev/null >/dev/null 2>&1 &
    pid=$!
    PIDS+=($pid)
    while [ "$(cut -d' ' -f1 /proc/$pid/syscall 2>/dev/null)" != 230 ] && [ "$(cut -d' ' -f1 /proc/$pid/syscall 2>/dev/null)" != 35 ]; do sleep 0.005; done
    img=$WORK/sleep$i
    t0=$(now); "$SNAP" dump -t $pid -D "$img"; t1=$(now)
    wait $pid 2>/dev/null || true
    wait_gone $pid
    t2=$(now); "$SNAP" restore -D "$img" -d; t3=$(now)
    kill -9 $pid
    wait_gone $pid
    DUMPS+=("$(calc "($t1 - $t0) * 1000")")
    RESTS+=("$(calc "($t3 - $t2) * 1000")")
done
row "dump sleep (median of 10)" "$(printf '%s\n' "${DUMPS[@]}" | median | xargs printf '%.1f ms')" "" "< 10 ms"
row "restore sleep (median of 10)" "$(printf '%s\n' "${RESTS[@]}" | median | xargs printf '%.1f ms')" "" "< 10 ms"

RES=bench/results-$(date +%Y%m%d-%H%M%S).txt
{
    echo "snap benchmarks $(date -Is) on $(uname -r), $(nproc) cpus, images on /dev/shm"
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    printf '%s\n' "${OUT[@]}"
} | tee "$RES"
echo "written $RES"
