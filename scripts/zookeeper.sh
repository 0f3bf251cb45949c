# Sourced by test.sh and bench/cluster.sh: a private ZooKeeper on a free loopback port.
#
#   start_zookeeper DIR   starts it with its data and log in DIR, waits until it answers, and
#                         sets ZK_PORT and ZK_PID (stopping it is the caller's job)

ZK_JAR=/usr/share/java/zookeeper.jar
# Without an SLF4J binding ZooKeeper logs nothing; this one (libslf4j-java, which zookeeper
# depends on) writes its warnings and errors to the log, so a failed start says why.
ZK_SLF4J=/usr/share/java/slf4j-simple.jar

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_zookeeper() {
    local dir="$1"
    ZK_PORT="$(free_port)" || true
    if [ -z "$ZK_PORT" ]; then
        echo "zookeeper: no free port found (free_port needs python3)" >&2
        return 1
    fi
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
    local classpath="/etc/zookeeper/conf:$ZK_JAR"
    [ ! -f "$ZK_SLF4J" ] || classpath="$classpath:$ZK_SLF4J"
    java -Xmx256m -Dorg.slf4j.simpleLogger.defaultLogLevel=warn -cp "$classpath" \
        org.apache.zookeeper.server.ZooKeeperServerMain "$dir/zoo.cfg" > "$dir/zookeeper.log" 2>&1 &
    ZK_PID=$!
    for _ in $(seq 1 120); do
        [ "$(zookeeper_ruok)" = "imok" ] && return 0
        # Exited (a bad configuration, the port taken): no use waiting.
        kill -0 "$ZK_PID" 2>/dev/null || break
        sleep 0.25
    done
    echo "zookeeper did not start; log:" >&2
    cat "$dir/zookeeper.log" >&2
    return 1
}

zookeeper_ruok() {
    # Stops if the port does not answer yet: bash goes on past a failed `exec` redirection,
    # and the echo would then write to whatever the caller left open as descriptor 3.
    timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$ZK_PORT || exit 1; echo ruok >&3; cat <&3" 2>/dev/null
}
