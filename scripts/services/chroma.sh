#!/usr/bin/env bash
# Start, stop or list local Chroma servers for development and benchmarks.
#
#   scripts/services/chroma.sh start [PORT...]   start `chroma run` on each port (default 58000 58001)
#   scripts/services/chroma.sh stop [PORT...]    stop the servers this script started
#   scripts/services/chroma.sh status [PORT...]  print whether each server responds to its heartbeat
#
# Servers listen on 127.0.0.1 only. Each keeps its data in $CHROMA_DATA_DIR/chroma-PORT
# (default: a new folder under /tmp, printed at start) and writes its log and pid file to
# $CHROMA_RUN_DIR (default: run/chroma in the repository). The `chroma` command comes with
# the chromadb package, which this script installs into .venv when it is missing.
set -euo pipefail

repository_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
run_dir="${CHROMA_RUN_DIR:-$repository_root/run/chroma}"
python="$repository_root/.venv/bin/python"
ready_timeout_seconds=60

usage() {
    echo "usage: $0 start|stop|status [PORT...]" >&2
    exit 2
}

ensure_chroma() {
    if [ ! -x "$python" ]; then
        echo "error: $python is missing; create the virtualenv first (scripts/bootstrap.sh)" >&2
        exit 2
    fi
    if [ ! -x "$repository_root/.venv/bin/chroma" ]; then
        echo "Installing chromadb into .venv for the chroma command" >&2
        "$python" -m pip install --quiet --disable-pip-version-check 'chromadb>=1.0,<2'
    fi
}

heartbeat() {
    curl --silent --fail --max-time 1 "http://127.0.0.1:$1/api/v2/heartbeat" >/dev/null 2>&1
}

start_one() {
    local port="$1" data_dir="$2"
    if heartbeat "$port"; then
        echo "port $port: a server already responds; leaving it" >&2
        return 0
    fi
    mkdir -p "$data_dir/chroma-$port" "$run_dir"
    ANONYMIZED_TELEMETRY=False nohup "$repository_root/.venv/bin/chroma" run --host 127.0.0.1 --port "$port" \
        --path "$data_dir/chroma-$port" >"$run_dir/chroma-$port.log" 2>&1 &
    echo $! >"$run_dir/chroma-$port.pid"
    local waited=0
    until heartbeat "$port"; do
        if ! kill -0 "$(cat "$run_dir/chroma-$port.pid")" 2>/dev/null; then
            echo "error: chroma run on port $port exited; see $run_dir/chroma-$port.log" >&2
            tail -n 20 "$run_dir/chroma-$port.log" >&2
            exit 1
        fi
        if [ "$waited" -ge $((ready_timeout_seconds * 10)) ]; then
            echo "error: chroma run on port $port did not respond within ${ready_timeout_seconds} s; see $run_dir/chroma-$port.log" >&2
            exit 1
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    echo "started Chroma on 127.0.0.1:$port (data in $data_dir/chroma-$port, pid $(cat "$run_dir/chroma-$port.pid"))"
}

stop_one() {
    local port="$1" pid_file="$run_dir/chroma-$1.pid"
    if [ ! -f "$pid_file" ]; then
        echo "port $port: no pid file in $run_dir; this script did not start it" >&2
        return 0
    fi
    local pid
    pid="$(cat "$pid_file")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$pid_file"
    echo "stopped Chroma on 127.0.0.1:$port"
}

[ $# -ge 1 ] || usage
command="$1"
shift
ports=("$@")
[ ${#ports[@]} -gt 0 ] || ports=(58000 58001)

case "$command" in
    start)
        ensure_chroma
        data_dir="${CHROMA_DATA_DIR:-$(mktemp -d /tmp/chroma-data.XXXXXX)}"
        for port in "${ports[@]}"; do start_one "$port" "$data_dir"; done
        ;;
    stop)
        for port in "${ports[@]}"; do stop_one "$port"; done
        ;;
    status)
        for port in "${ports[@]}"; do
            if heartbeat "$port"; then echo "127.0.0.1:$port responds"; else echo "127.0.0.1:$port unreachable"; fi
        done
        ;;
    *)
        usage
        ;;
esac
