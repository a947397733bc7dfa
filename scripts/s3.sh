#!/usr/bin/env bash
# A local S3-compatible server for tests: moto's server, installed once into a venv under
# /var/cache/skiff and listening on 127.0.0.1 only.
#
#   scripts/s3.sh install         install moto[server] (idempotent)
#   scripts/s3.sh start [PORT]    start it (default port 0 = pick a free one); prints the endpoint
#                                 and writes its pid to $SKIFF_S3_STATE/moto.<port>.pid
#   scripts/s3.sh stop PORT       stop the server started on PORT
set -euo pipefail

venv=${SKIFF_S3_VENV:-/var/cache/skiff/moto-venv}
state=${SKIFF_S3_STATE:-/tmp/skiff-s3}

install() {
    if [[ -x "$venv/bin/moto_server" ]]; then
        return 0
    fi
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]' >&2
    [[ -x "$venv/bin/moto_server" ]] || { echo "s3.sh: moto_server missing after install" >&2; exit 1; }
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

case "${1:-}" in
    install)
        install ;;
    start)
        install
        port=${2:-0}
        [[ "$port" == 0 ]] && port=$(free_port)
        mkdir -p "$state"
        setsid "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$state/moto.$port.log" 2>&1 &
        echo $! >"$state/moto.$port.pid"
        for _ in $(seq 1 100); do
            if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
                echo "http://127.0.0.1:$port"
                exit 0
            fi
            sleep 0.1
        done
        echo "s3.sh: moto did not start on port $port; log: $state/moto.$port.log" >&2
        exit 1 ;;
    stop)
        port=${2:?usage: s3.sh stop PORT}
        pidfile="$state/moto.$port.pid"
        if [[ -f "$pidfile" ]]; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
            rm -f "$pidfile" "$state/moto.$port.log"
        fi ;;
    -h|--help|*)
        sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
        [[ "${1:-}" == -h || "${1:-}" == --help ]] ;;
esac
