#!/usr/bin/env bash
# A dead machine: kills one of two cim-server processes with SIGKILL while CLIENTS clients
# (default 1000, about half of them on the victim) are connected, and reports how soon the
# victim's clients notice and are back on the other server. The router keeps its production
# Argon2 cost (19 MiB, 2 iterations), so setting up the accounts takes a while; servers ask
# for a ping every second (clients give up on a server after three silent seconds) to keep
# the run short.
#
#   bench/failover.sh            # 1000 clients
#   bench/failover.sh 2000 --json
#
# Needs redis-server, ZooKeeper and a JRE (./test.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS="${1:-1000}"
shift || true
export PASSWORD_COST=default
export SERVER_ARGS="--heartbeat-ms 1000 --heartbeat-timeout-ms 3000"
exec bench/cluster.sh failover --clients "$CLIENTS" --kill 'server-1=%server-1%' "$@"
