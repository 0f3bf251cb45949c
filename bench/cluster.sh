#!/usr/bin/env bash
# Runs a cim-bench scenario against a real cluster on this machine: Redis, a private
# ZooKeeper, one cim-router and two cim-server processes (release builds), all on loopback.
# Everything is started in a temporary directory and stopped afterwards.
#
#   bench/cluster.sh                      # cim-bench private
#   bench/cluster.sh private --json       # any cim-bench arguments
#
# In the cim-bench arguments, %server-1% and %server-2% stand for those servers' process ids
# (bench/failover.sh uses this). Environment: PASSWORD_COST=default keeps the router's
# production Argon2 cost (default: a cheap one for the thousands of bench accounts);
# SERVER_ARGS adds arguments to both cim-server command lines.
#
# Needs redis-server, ZooKeeper and a JRE (./test.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p cim-router -p cim-server -p cim-bench -p cim-certs
BIN=target/release
WORK="$(mktemp -d -t cim-bench.XXXXXX)"
PIDS=()
NAMES=() # what each of PIDS is, for the CPU report
cleanup() {
    local status=$?
    if [ "$status" -ne 0 ]; then
        for log in "$WORK"/*.log; do
            [ -e "$log" ] || continue # failed before anything started
            echo "== $log" >&2
            tail -n 5 "$log" >&2
        done
    fi
    # Newest first: servers and router drain and deregister (on SIGTERM) while ZooKeeper and
    # Redis are still up; each gets a few seconds before it is killed.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid="${PIDS[$i]}"
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 1 20); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
# shellcheck source=../scripts/zookeeper.sh
. scripts/zookeeper.sh
wait_port() {
    for _ in $(seq 1 120); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.25
    done
    echo "cluster.sh: nothing listens on port $1 ($2)" >&2
    exit 1
}

# Redis with an append-only file synced every second (its recommended durable setting).
REDIS_PORT="$(free_port)"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly yes \
    --appendfsync everysec --dir "$WORK" > "$WORK/redis.log" 2>&1 &
PIDS+=($!)
NAMES+=(redis)

zk_status=0
start_zookeeper "$WORK/zk" || zk_status=$?
PIDS+=("$ZK_PID")
NAMES+=(zookeeper)
[ "$zk_status" -eq 0 ] || exit 1
wait_port "$REDIS_PORT" redis

"$BIN/cim-certs" --out "$WORK/certs" > /dev/null
# The bench's clients all come from 127.0.0.1 and send at full speed: raise the per-address
# and per-session caps; cheap Argon2 for the thousands of accounts it creates.
CAPS=(--max-connections-per-ip 1000000 --max-msgs-per-sec 1000000)
read -r -a EXTRA_SERVER_ARGS <<< "${SERVER_ARGS:-}"
declare -A SERVER_PID
for n in 1 2; do
    "$BIN/cim-server" --id "server-$n" --zookeeper "127.0.0.1:$ZK_PORT" \
        --listen 127.0.0.1:0 --internal 127.0.0.1:0 --certs "$WORK/certs" "${CAPS[@]}" \
        ${EXTRA_SERVER_ARGS[@]+"${EXTRA_SERVER_ARGS[@]}"} > "$WORK/server-$n.log" 2>&1 &
    PIDS+=($!)
    NAMES+=("server-$n")
    SERVER_PID["server-$n"]=$!
done
COST=(--argon2-memory-kib 256 --argon2-iterations 1)
[ "${PASSWORD_COST:-}" != default ] || COST=()
HTTP_PORT="$(free_port)"
"$BIN/cim-router" --redis "redis://127.0.0.1:$REDIS_PORT" --zookeeper "127.0.0.1:$ZK_PORT" \
    --http "127.0.0.1:$HTTP_PORT" --link-ip 127.0.0.1 --certs "$WORK/certs" \
    ${COST[@]+"${COST[@]}"} --max-login-attempts-per-ip 100000000 --max-registrations-per-ip 100000000 \
    > "$WORK/router.log" 2>&1 &
PIDS+=($!)
NAMES+=(router)
wait_port "$HTTP_PORT" router
sleep 2 # servers register in ZooKeeper and the router links to them

# CPU time (user + system) a process has used, in ticks of 1/100 s: fields 14 and 15 of
# /proc/PID/stat, counted after the command name's closing parenthesis. Prints nothing for a
# process that is gone.
cpu_ticks() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
    stat="${stat##*) }"
    # shellcheck disable=SC2086
    set -- $stat
    echo $((${12} + ${13}))
}
declare -a BEFORE
for i in "${!PIDS[@]}"; do BEFORE[i]="$(cpu_ticks "${PIDS[$i]}")"; done

[ $# -gt 0 ] || set -- private
ARGS=()
for arg in "$@"; do
    for id in "${!SERVER_PID[@]}"; do arg="${arg//%$id%/${SERVER_PID[$id]}}"; done
    ARGS+=("$arg")
done
set -- "${ARGS[@]}"
bench_status=0
"$BIN/cim-bench" "$@" --router "https://127.0.0.1:$HTTP_PORT" --ca "$WORK/certs/ca.pem" ||
    bench_status=$?
# Where the cluster's CPU went during the whole cim-bench run, its set-up (registrations,
# logins) included; on stderr, so that --json output stays one line.
for i in "${!PIDS[@]}"; do
    after="$(cpu_ticks "${PIDS[$i]}")"
    if [ -z "$after" ] || [ -z "${BEFORE[i]}" ]; then
        printf 'cpu during cim-bench (set-up included)  %-10s exited\n' "${NAMES[$i]}" >&2
        continue
    fi
    ticks=$((after - BEFORE[i]))
    printf 'cpu during cim-bench (set-up included)  %-10s %d.%02d s\n' "${NAMES[$i]}" \
        $((ticks / 100)) $((ticks % 100)) >&2
done
exit "$bench_status"
