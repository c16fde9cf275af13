#!/usr/bin/env bash
# A throwaway Redis Cluster on loopback, for the tests and the benchmarks: N masters, no replicas,
# no persistence (a node that restarts comes back empty, as after losing its data).
#
#   scripts/redis_cluster.sh up DIR BASE_PORT [N]   # N masters (default 3) on BASE_PORT...
#   scripts/redis_cluster.sh start-node DIR PORT    # start one node again (after it was killed)
#   scripts/redis_cluster.sh down DIR               # stop every node
#
# The cluster bus listens on port + 10000, so node ports must be 55535 or lower; keep both the
# node and the bus ports below 32768 (see scripts/stack.sh), i.e. node ports below 22768.
set -euo pipefail

cmd=${1:?usage: redis_cluster.sh up|start-node|down DIR ...}
dir=${2:?usage: redis_cluster.sh up|start-node|down DIR ...}

ping() { redis-cli -p "$1" ping >/dev/null 2>&1; }

start_node() {
    local port=$1
    redis-server "$dir/$port/redis.conf"
    for _ in $(seq 100); do ping "$port" && return 0; sleep 0.1; done
    echo "redis_cluster.sh: the node on port $port did not start; see $dir/$port/redis.log" >&2
    exit 1
}

case $cmd in
up)
    base=${3:?usage: redis_cluster.sh up DIR BASE_PORT [N]}
    n=${4:-3}
    if ((base + n - 1 > 55535)); then
        echo "redis_cluster.sh: node ports must be 55535 or lower (the bus uses port + 10000)" >&2
        exit 2
    fi
    "$0" down "$dir"
    rm -rf "$dir"
    addrs=()
    for ((i = 0; i < n; i++)); do
        port=$((base + i))
        mkdir -p "$dir/$port"
        cat >"$dir/$port/redis.conf" <<EOF
port $port
bind 127.0.0.1
cluster-enabled yes
cluster-config-file $dir/$port/nodes.conf
cluster-node-timeout 3000
cluster-require-full-coverage no
save ""
appendonly no
daemonize yes
pidfile $dir/$port/redis.pid
logfile $dir/$port/redis.log
dir $dir/$port
EOF
        start_node "$port"
        addrs+=("127.0.0.1:$port")
    done
    redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
    for addr in "${addrs[@]}"; do
        port=${addr##*:}
        for _ in $(seq 200); do
            redis-cli -p "$port" cluster info | grep -q '^cluster_state:ok' && break
            sleep 0.1
        done
        redis-cli -p "$port" cluster info | grep -q '^cluster_state:ok' || {
            echo "redis_cluster.sh: the cluster did not become ready" >&2
            exit 1
        }
    done
    ;;
start-node)
    start_node "${3:?usage: redis_cluster.sh start-node DIR PORT}"
    ;;
down)
    for pidfile in "$dir"/*/redis.pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        rm -f "$pidfile"
    done
    ;;
*)
    echo "usage: redis_cluster.sh up|start-node|down DIR ..." >&2
    exit 2
    ;;
esac
