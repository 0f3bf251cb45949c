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
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ -f "$ZK_JAR" ] || missing+=(zookeeper)
command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)
# The admin page is tested in a real headless browser.
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    echo "test.sh: installing ${missing[*]}"
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        if ! sudo -n true 2>/dev/null; then
            echo "test.sh: installing needs root or password-less sudo; install ${missing[*]} by hand" >&2
            exit 1
        fi
        SUDO=(sudo)
    fi
    # Through `env`: sudo drops the caller's environment. The lock timeout waits out an
    # apt run of the system's own (a freshly booted machine's daily upgrade).
    APT=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300)
    "${APT[@]}" install -y -q "${missing[@]}" || { "${APT[@]}" update -q && "${APT[@]}" install -y -q "${missing[@]}"; }
fi
# The stores' scripts and commands need Redis 7 (an older one fails tests in unclear ways).
if ! command -v redis-server >/dev/null 2>&1; then
    echo "test.sh: redis-server is missing (its install failed?)" >&2
    exit 1
fi
redis_version="$(redis-server --version | sed -n 's/.* v=\([0-9]*\)\..*/\1/p')"
if [ "${redis_version:-0}" -lt 7 ]; then
    echo "test.sh: redis-server 7.0 or newer is needed; found: $(redis-server --version)" >&2
    exit 1
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
CIM_TEST_REDIS_SERVER="$(command -v redis-server)"
export CIM_TEST_REDIS_SERVER
echo "test.sh: zookeeper on $CIM_TEST_ZOOKEEPER, redis-server at $CIM_TEST_REDIS_SERVER"

cargo build --workspace --bins
cargo test --workspace "$@"
