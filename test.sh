#!/usr/bin/env bash
# Runs cim's whole test suite.
#
# Installs redis-server, zookeeper and chromium (Debian packages) when missing, starts a private
# ZooKeeper on a free loopback port for the run (tests start their own Redis instances from
# the redis-server binary, so each can be killed and restarted), builds the binaries the
# process-level tests spawn, runs every test, and stops everything afterwards, pass or fail.
set -euo pipefail
cd "$(dirname "$0")"

ZK_JAR=/usr/share/java/zookeeper.jar
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

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

ZK_PORT="$(free_port)"
mkdir -p "$WORK/zk"
cat > "$WORK/zk/zoo.cfg" <<CFG
tickTime=500
dataDir=$WORK/zk
clientPort=$ZK_PORT
clientPortAddress=127.0.0.1
minSessionTimeout=1000
maxSessionTimeout=60000
maxClientCnxns=0
admin.enableServer=false
4lw.commands.whitelist=ruok
CFG
java -Xmx256m -cp "/etc/zookeeper/conf:$ZK_JAR" org.apache.zookeeper.server.ZooKeeperServerMain \
    "$WORK/zk/zoo.cfg" > "$WORK/zk/zookeeper.log" 2>&1 &
ZK_PID=$!

ruok() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$ZK_PORT; echo ruok >&3; cat <&3" 2>/dev/null; }
for _ in $(seq 1 120); do
    [ "$(ruok)" = "imok" ] && break
    sleep 0.25
done
if [ "$(ruok)" != "imok" ]; then
    echo "test.sh: zookeeper did not start; log:" >&2
    cat "$WORK/zk/zookeeper.log" >&2
    exit 1
fi
export CIM_TEST_ZOOKEEPER="127.0.0.1:$ZK_PORT"
export CIM_TEST_REDIS_SERVER="$(command -v redis-server)"
echo "test.sh: zookeeper on $CIM_TEST_ZOOKEEPER, redis-server at $CIM_TEST_REDIS_SERVER"

cargo build --workspace --bins
cargo test --workspace "$@"
