#!/usr/bin/env bash
# Run nginx in the foreground in front of API instances, installing Debian's nginx first
# where it is missing. Arguments go to `python -m app.deployment.nginx`, for example:
#   scripts/run_nginx.sh --backends 127.0.0.1:8001,127.0.0.1:8002 --port 8080
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "error: nginx is not installed; install the nginx package (apt-get install nginx) and run this again" >&2
        exit 2
    fi
    echo "Installing nginx with apt-get" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >&2
fi

exec "${PYTHON:-.venv/bin/python}" -m app.deployment.nginx "$@"
