#!/usr/bin/env bash
# A login storm at the production password cost: starts an embedded cim-router with its default
# Argon2 cost (19 MiB, 2 iterations; cim-bench's own embedded mode uses a cheap one), runs
# `cim-bench login` against it and prints the router process's peak memory and thread count.
#
#   bench/password_storm.sh            # 600 clients, 64 at a time
#   bench/password_storm.sh 1000       # clients
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p cim-router -p cim-bench
BIN="${STORM_BIN:-target/release}"
WORK="$(mktemp -d -t cim-storm.XXXXXX)"
"$BIN/cim-router" --http 127.0.0.1:0 --servers 2 --certs "$WORK/certs" \
    --max-login-attempts-per-ip 100000000 --max-registrations-per-ip 100000000 \
    --max-connections-per-ip 1000000 \
    > "$WORK/router.out" 2> /dev/null &
PID=$!
trap 'kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 1 100); do
    grep -q '^router: ' "$WORK/router.out" && break
    sleep 0.2
done
URL="$(awk '/^router: / {print $2}' "$WORK/router.out")"
"$BIN/cim-bench" login --clients "${1:-600}" --router "$URL" --ca "$WORK/certs/ca.pem" |
    grep -E 'logins/s|login \(us\)'
grep -E 'VmHWM|Threads' "/proc/$PID/status"
