#!/bin/bash
# Runs the WHOLE snap test suite (unit tests and end-to-end tests), as root.
# Installs what the e2e fixtures need (gcc, python3, util-linux's setpriv,
# redis-server, redis-tools, nginx-light, curl, script from bsdutils, tmux, postgresql)
# and nftables (the network lock of tests/e2e_inet.rs) with apt-get when missing. Tests run one at a time: every restore needs
# its exact PIDs free (the harness also holds a lock per test).
set -euo pipefail
cd "$(dirname "$0")"
need=()
command -v gcc >/dev/null || need+=(gcc libc6-dev)
[ -x /usr/bin/python3 ] || need+=(python3)
command -v setpriv >/dev/null || need+=(util-linux)
command -v script >/dev/null || need+=(bsdutils)   # tests/e2e_pty.rs
command -v tmux >/dev/null || need+=(tmux)           # tests/e2e_pty.rs
command -v bash >/dev/null || need+=(bash)
# Real programs of tests/e2e_servers.rs, run directly (never as services).
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v curl >/dev/null || need+=(curl)
# nft: the network lock of `snap dump --tcp-established` (tests/e2e_inet.rs).
command -v nft >/dev/null || [ -x /usr/sbin/nft ] || need+=(nftables)
# PostgreSQL server binaries for tests/e2e_ipc.rs (run directly, own cluster).
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq </dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" </dev/null
    # Installing redis-server or nginx may start their system services
    # (where no policy-rc.d forbids it): stop the ones we just installed, the
    # tests run their own.
    for s in redis-server nginx postgresql; do
        case " ${need[*]} " in *" $s "*|*" $s-light "*) ;; *) continue ;; esac
        if command -v systemctl >/dev/null && systemctl is-active --quiet "$s" 2>/dev/null; then
            systemctl stop "$s" || true
        elif [ -x "/etc/init.d/$s" ]; then
            "/etc/init.d/$s" stop >/dev/null 2>&1 || true
        fi
    done
fi
if [ "$(id -u)" != 0 ]; then
    echo "test.sh: the end-to-end tests need root (ptrace, clone3 set_tid)" >&2
    exit 1
fi
# Tests that cannot run here (a missing kernel feature or tool) say so in
# target/tmp/skipped.txt; they are listed after the run and counted in the
# closing line, never among the passes.
mkdir -p target/tmp
rm -f target/tmp/skipped.txt
log=$(mktemp)
status=0
cargo test --release -- --test-threads=1 "$@" 2>&1 | tee "$log" || status=$?
skipped=0
if [ -s target/tmp/skipped.txt ]; then
    skipped=$(wc -l < target/tmp/skipped.txt)
    echo "SKIPPED tests:"
    sed 's/^/  /' target/tmp/skipped.txt
fi
passed=$( (grep -o '^test result: [a-zA-Z]*\. [0-9]* passed' "$log" || true) | awk '{s += $4} END {print s + 0}')
failed=$( (grep -o '; [0-9]* failed' "$log" || true) | awk '{s += $2} END {print s + 0}')
rm -f "$log"
# A skipped test returned early and cargo counted it as passed: not here.
echo "$((passed - skipped)) passed, $failed failed, $skipped skipped"
exit "$status"
