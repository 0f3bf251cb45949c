#!/usr/bin/env bash
# Runs cim's whole test suite.
#
# Installs redis-server, zookeeper and chromium (Debian packages) when missing, starts a private
# ZooKeeper on a free loopback port for the run (tests start their own Redis instances from
# the redis-server binary, so each can be killed and restarted), builds the binaries the
# process-level tests spawn, runs every test, and stops everything afterwards, pass or fail.
set -euo pipefail
cd "$(dirname "$0")"

# shellcheck source=scripts/zookeeper.sh
. scripts/zookeeper.sh

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ -f "$ZK_JAR" ] || missing+=(zookeeper)
command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)
# The admin page is tested in a real headless browser.
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    echo "test.sh: installing ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q "${missing[@]}" || { $SUDO apt-get update -q && $SUDO apt-get install -y -q "${missing[@]}"; }
fi

WORK="$(mktemp -d -t cim-test.XXXXXX)"
ZK_PID=""
cleanup() {
    local status=$?
    if [ -n "$ZK_PID" ]; then
        kill "$ZK_PID" 2>/dev/null || true
        wait "$ZK_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT

start_zookeeper "$WORK/zk" || exit 1
export CIM_TEST_ZOOKEEPER="127.0.0.1:$ZK_PORT"
export CIM_TEST_REDIS_SERVER="$(command -v redis-server)"
echo "test.sh: zookeeper on $CIM_TEST_ZOOKEEPER, redis-server at $CIM_TEST_REDIS_SERVER"

cargo build --workspace --bins
cargo test --workspace "$@"
