#!/bin/bash
# Where an incremental dump's wall time goes: a 1 GiB process writing 1 %
# of its pages between dumps (bench/dirty.c rounds), one full dump with
# --track-mem --leave-running, then ROUNDS incremental dumps with
# SNAP_TIMING=1. Each snap binary given (default target/release/snap) takes
# its turn in every round, so two builds are compared in the same run, on
# the same process and chain:
#   bench/incr-profile.sh [SNAP_BIN...]
# Prints per binary the median wall ("seconds" of --json: from the start of
# the dump proper to the image complete), stopped time and the whole
# command's wall time (process start, taking the tracking from its holder,
# handing it to a new holder), and the
# median milliseconds of each SNAP_TIMING phase (time since the phase
# before). Images on /dev/shm. Takes the e2e test lock.
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-7}
MIB=${MIB:-1024}
BINS=("$@")
[ ${#BINS[@]} -gt 0 ] || { cargo build --release --quiet; BINS=("$PWD/target/release/snap"); }
WORK=$(mktemp -d /dev/shm/snap-iprof.XXXXXX)
PID=
cleanup() { [ -z "$PID" ] || kill -9 "$PID" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
gcc -O2 -o "$WORK/dirty" bench/dirty.c
exec 9>>"${TMPDIR:-/tmp}/snap-e2e.lock"
flock 9
wait_file() { local t=$(( $(date +%s) + 120 )); while [ ! -e "$1" ]; do [ "$(date +%s)" -lt $t ] || { echo "timeout waiting for $1" >&2; exit 1; }; sleep 0.01; done; }
st=$WORK/r
mkdir -p "$st"
( setsid "$WORK/dirty" rounds "$st" "$MIB" 10 </dev/null >/dev/null 2>&1 9>&- & echo $! >"$st.pid"; wait ) 2>/dev/null &
while [ ! -s "$st.pid" ]; do sleep 0.001; done
PID=$(cat "$st.pid")
wait_file "$st/ready"
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
"${BINS[0]}" dump -t "$PID" -D "$WORK/img0" --leave-running --track-mem --json >"$WORK/full.json" 2>/dev/null
echo "full dump: $(field seconds <"$WORK/full.json") s wall, $(field stopped_seconds <"$WORK/full.json") s stopped"
n=0
for r in $(seq "$ROUNDS"); do
    for b in "${!BINS[@]}"; do
        rm -f "$st/round"
        kill -USR1 "$PID"
        wait_file "$st/round"
        n=$((n + 1))
        t0=$EPOCHREALTIME
        SNAP_TIMING=1 "${BINS[$b]}" dump -t "$PID" -D "$WORK/img$n" --leave-running --track-mem \
            --prev-images-dir "$WORK/img$((n - 1))" --json >"$WORK/j$n" 2>"$WORK/t$n" || { cat "$WORK/t$n" >&2; exit 1; }
        t1=$EPOCHREALTIME
        [ "$(field backend <"$WORK/j$n")" = uffd-wp ] || { echo "round $n did not use uffd-wp: $(cat "$WORK/j$n")" >&2; exit 1; }
        echo "$b $(field seconds <"$WORK/j$n") $(field stopped_seconds <"$WORK/j$n") $(awk "BEGIN { print $t1 - $t0 }") $(field pages_read <"$WORK/j$n") $(field pages_stored <"$WORK/j$n") $(du -sb "$WORK/img$n" | cut -f1)" >>"$WORK/sum"
        awk -v b="$b" '/^snap timing:/ { ms = $3; lab = $0; sub(/.*ms\)  /, "", lab); gsub(/[0-9]+\.[0-9]+ ms/, "# ms", lab); if (seen[lab]++) lab = lab " (" seen[lab] ")"; printf "%s\t%s\t%.3f\n", b, lab, ms - prev; prev = ms }' "$WORK/t$n" >>"$WORK/phases"
    done
done
python3 - "$WORK/sum" "$WORK/phases" "${BINS[@]}" <<'PY'
import sys, statistics as st
summ, phases, bins = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = [l.split() for l in open(summ)]
print(f"load average now: {open('/proc/loadavg').read().split()[:3]}")
for b, name in enumerate(bins):
    w = [float(r[1]) for r in rows if r[0] == str(b)]
    s = [float(r[2]) for r in rows if r[0] == str(b)]
    c = [float(r[3]) for r in rows if r[0] == str(b)]
    pr = [int(r[4]) for r in rows if r[0] == str(b)]
    ps = [int(r[5]) for r in rows if r[0] == str(b)]
    ib = [int(r[6]) for r in rows if r[0] == str(b)]
    print(f"[{b}] pages read {st.median(pr)}, stored {st.median(ps)}, image {st.median(ib)/1e6:.2f} MB (medians)")
    print(f"[{b}] {name}: median wall {st.median(w)*1e3:.1f} ms (min {min(w)*1e3:.1f}), stopped {st.median(s)*1e3:.1f} ms, whole command {st.median(c)*1e3:.1f} ms, n={len(w)}")
if len(bins) > 1:
    w0 = st.median([float(r[1]) for r in rows if r[0] == '0'])
    for b in range(1, len(bins)):
        wb = st.median([float(r[1]) for r in rows if r[0] == str(b)])
        c0 = st.median([float(r[3]) for r in rows if r[0] == '0'])
        cb = st.median([float(r[3]) for r in rows if r[0] == str(b)])
        print(f"wall ratio [{b}]/[0]: {wb / w0:.3f}; whole command {cb / c0:.3f}")
per = {}
order = []
for l in open(phases):
    b, lab, ms = l.rstrip("\n").split("\t")
    if lab not in order: order.append(lab)
    per.setdefault((b, lab), []).append(float(ms))
print("phase (ms since the previous one, median)" + "".join(f"  [{b}]" .rjust(9) for b in range(len(bins))))
for lab in order:
    print(f"{lab[:52]:52}" + "".join(f"{st.median(per[(str(b), lab)]):9.1f}" if (str(b), lab) in per else "        -" for b in range(len(bins))))
PY
