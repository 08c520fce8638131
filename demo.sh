#!/bin/bash
# Demo: start a real program (a bash loop appending a counter to a file),
# checkpoint it with snap (which stops it), show that it is gone, restore it
# and show the counter continuing from where it stopped, same PID.
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(id -u)" != 0 ]; then echo "demo.sh: run as root (snap needs ptrace and clone3 set_tid)" >&2; exit 1; fi
if ! command -v cc >/dev/null; then
    echo "installing a C toolchain (needed to link Rust crates)..." >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev </dev/null
fi
echo "== building snap (release)"
cargo build --release --quiet
SNAP=$PWD/target/release/snap
W=$(mktemp -d /tmp/snap-demo.XXXXXX)
PID=
cleanup() { [ -n "$PID" ] && kill -9 -- "-$PID" 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
OUT=$W/counter.txt
echo "== starting: bash -c 'i=0; while :; do echo \$i >> $OUT; i=\$((i+1)); sleep 0.1; done'"
setsid bash -c "i=0; while :; do echo \$i >> $OUT; i=\$((i+1)); sleep 0.1; done" </dev/null >/dev/null 2>&1 &
PID=$!
sleep 1
echo "pid $PID, counter so far: $(tail -n1 "$OUT")"
echo "== snap dump -t $PID -D $W/img"
"$SNAP" dump -t "$PID" -D "$W/img"
wait "$PID" 2>/dev/null || true
LAST=$(tail -n1 "$OUT")
sleep 1
echo "process gone: $([ -e /proc/$PID ] && echo no || echo yes); counter still at $(tail -n1 "$OUT") (was $LAST)"
echo "== snap image show $W/img"
"$SNAP" image show "$W/img" || true
echo "== snap restore -D $W/img -d"
"$SNAP" restore -D "$W/img" -d
sleep 1
echo "restored pid $PID: $(tr '\0' ' ' </proc/$PID/cmdline)"
echo "counter continues: $(tail -n +"$((LAST + 2))" "$OUT" | head -n 12 | tr '\n' ' ')..."
N=$(awk 'NR>1 && $1 != prev+1 {bad=1} {prev=$1} END {print bad ? "GAP/REPEAT" : "no gaps, no repeats"}' "$OUT")
echo "check: $N"
