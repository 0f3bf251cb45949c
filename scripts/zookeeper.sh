# Sourced by test.sh and bench/cluster.sh: a private ZooKeeper on a free loopback port.
#
#   start_zookeeper DIR   starts it with its data and log in DIR, waits until it answers, and
#                         sets ZK_PORT and ZK_PID (stopping it is the caller's job)

ZK_JAR=/usr/share/java/zookeeper.jar

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_zookeeper() {
    local dir="$1"
    ZK_PORT="$(free_port)"
    mkdir -p "$dir"
    cat > "$dir/zoo.cfg" <<CFG
tickTime=500
dataDir=$dir
clientPort=$ZK_PORT
clientPortAddress=127.0.0.1
minSessionTimeout=1000
maxSessionTimeout=60000
maxClientCnxns=0
admin.enableServer=false
4lw.commands.whitelist=ruok
CFG
    java -Xmx256m -cp "/etc/zookeeper/conf:$ZK_JAR" org.apache.zookeeper.server.ZooKeeperServerMain \
        "$dir/zoo.cfg" > "$dir/zookeeper.log" 2>&1 &
    ZK_PID=$!
    for _ in $(seq 1 120); do
        [ "$(zookeeper_ruok)" = "imok" ] && return 0
        sleep 0.25
    done
    echo "zookeeper did not start; log:" >&2
    cat "$dir/zookeeper.log" >&2
    return 1
}

zookeeper_ruok() {
    timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$ZK_PORT; echo ruok >&3; cat <&3" 2>/dev/null
}
