#!/usr/bin/env bash
# Install the Debian programs the tests and benchmarks run, where they are missing:
# nginx (the tests run it in front of API instances), docker-compose (its `config` command
# validates docker-compose.yml without a Docker engine) and wrk (the HTTP load generator of
# bench/http_scaling.py). Needs root and apt-get.
set -euo pipefail

missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v wrk >/dev/null || missing+=(wrk)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "error: ${missing[*]} missing; install them with your package manager (Debian: apt-get install ${missing[*]})" >&2
    exit 2
fi
echo "Installing ${missing[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
