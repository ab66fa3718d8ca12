#!/usr/bin/env bash
# Start and stop Redis servers on 127.0.0.1 for tests and local development.
#
#   scripts/services/redis.sh start-standalone DIR PORT
#   scripts/services/redis.sh start-cluster DIR PORT PORT PORT   three masters, no replicas
#   scripts/services/redis.sh start-node DIR PORT                 restart a stopped server of DIR
#   scripts/services/redis.sh stop-node DIR PORT                  kill one server with SIGKILL, as a crash would
#   scripts/services/redis.sh stop DIR                            stop every server of DIR
#
# Each server keeps its configuration, log, pid file and data in DIR/PORT. A cluster node
# also listens on PORT + 10000 for the cluster bus. Servers keep nothing on disk between
# starts except a cluster node's nodes.conf, so a restarted node rejoins its cluster.
# Installs Debian's redis-server package when redis-server or redis-cli is missing.
set -euo pipefail

READY_TIMEOUT_SECONDS=20

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

ensure_installed() {
    if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
        return
    fi
    echo "redis-server or redis-cli not found; installing Debian's redis-server package" >&2
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo="sudo"
    fi
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q redis-server
}

check_port() {
    if ! [[ "$1" =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ] || [ "$1" -gt 55535 ]; then
        echo "error: invalid port '$1'; give a number from 1 to 55535 (a cluster node also uses port + 10000)" >&2
        exit 2
    fi
}

write_config() {
    local node_dir="$1" port="$2" cluster="$3"
    mkdir -p "$node_dir"
    cat > "$node_dir/redis.conf" <<CONFIG
port $port
bind 127.0.0.1
protected-mode yes
daemonize yes
pidfile $node_dir/redis.pid
logfile $node_dir/redis.log
dir $node_dir
save ""
appendonly no
CONFIG
    if [ "$cluster" = yes ]; then
        cat >> "$node_dir/redis.conf" <<CONFIG
cluster-enabled yes
cluster-config-file nodes.conf
cluster-node-timeout 2000
# The masters that are up keep serving their slots while another is down.
cluster-require-full-coverage no
CONFIG
    fi
}

wait_until() {
    local description="$1"
    shift
    local deadline=$((SECONDS + READY_TIMEOUT_SECONDS))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "error: timed out after ${READY_TIMEOUT_SECONDS} s waiting for $description" >&2
            return 1
        fi
        sleep 0.1
    done
}

answers_ping() {
    [ "$(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" = PONG ]
}

cluster_ok() {
    redis-cli -h 127.0.0.1 -p "$1" cluster info 2>/dev/null | grep -q '^cluster_state:ok'
}

start_server() {
    local node_dir="$1" port="$2"
    if answers_ping "$port"; then
        echo "error: a server already listens on 127.0.0.1:$port; stop it or choose another port" >&2
        exit 1
    fi
    redis-server "$node_dir/redis.conf"
    if ! wait_until "Redis on 127.0.0.1:$port" answers_ping "$port"; then
        tail -n 20 "$node_dir/redis.log" >&2 || true
        exit 1
    fi
}

stop_server() {
    local node_dir="$1" signal="$2"
    local pid
    pid="$(cat "$node_dir/redis.pid" 2>/dev/null || true)"
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
        return
    fi
    kill "-$signal" "$pid"
    if ! wait_until "Redis process $pid to exit" bash -c "! kill -0 $pid"; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
}

command="${1:-}"
[ -n "$command" ] || usage
shift

case "$command" in
    start-standalone)
        [ $# -eq 2 ] || usage
        check_port "$2"
        ensure_installed
        write_config "$1/$2" "$2" no
        start_server "$1/$2" "$2"
        echo "Redis listening on 127.0.0.1:$2, data in $1/$2"
        ;;
    start-cluster)
        [ $# -eq 4 ] || usage
        directory="$1"
        shift
        ensure_installed
        nodes=()
        for port in "$@"; do
            check_port "$port"
            # A node that answers already was started by an earlier, interrupted run.
            if ! answers_ping "$port"; then
                write_config "$directory/$port" "$port" yes
                start_server "$directory/$port" "$port"
            fi
            nodes+=("127.0.0.1:$port")
        done
        if ! cluster_ok "$1"; then
            redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$directory/cluster-create.log"
        fi
        for port in "$@"; do
            wait_until "cluster_state:ok on 127.0.0.1:$port" cluster_ok "$port"
        done
        echo "Redis Cluster of three masters on ${nodes[*]}, data in $directory"
        ;;
    start-node)
        [ $# -eq 2 ] || usage
        check_port "$2"
        if [ ! -f "$1/$2/redis.conf" ]; then
            echo "error: no server was started on port $2 under $1; use start-standalone or start-cluster" >&2
            exit 2
        fi
        start_server "$1/$2" "$2"
        if grep -q '^cluster-enabled yes' "$1/$2/redis.conf"; then
            wait_until "cluster_state:ok on 127.0.0.1:$2" cluster_ok "$2"
        fi
        ;;
    stop-node)
        [ $# -eq 2 ] || usage
        stop_server "$1/$2" KILL
        ;;
    stop)
        [ $# -eq 1 ] || usage
        for node_dir in "$1"/*/; do
            if [ -f "$node_dir/redis.conf" ]; then
                stop_server "${node_dir%/}" TERM
            fi
        done
        ;;
    *)
        usage
        ;;
esac
