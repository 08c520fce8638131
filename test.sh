#!/bin/bash
# Runs the WHOLE snap test suite (unit tests and end-to-end tests), as root.
# Installs what the e2e fixtures need (gcc, python3, util-linux's setpriv)
# with apt-get when missing. Tests run one at a time: every restore needs
# its exact PIDs free (the harness also holds a lock per test).
set -euo pipefail
cd "$(dirname "$0")"
need=()
command -v gcc >/dev/null || need+=(gcc libc6-dev)
[ -x /usr/bin/python3 ] || need+=(python3)
command -v setpriv >/dev/null || need+=(util-linux)
command -v bash >/dev/null || need+=(bash)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq </dev/null
    apt-get install -y -qq "${need[@]}" </dev/null
fi
if [ "$(id -u)" != 0 ]; then
    echo "test.sh: the end-to-end tests need root (ptrace, clone3 set_tid)" >&2
    exit 1
fi
exec cargo test --release -- --test-threads=1 "$@"
