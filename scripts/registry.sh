#!/usr/bin/env bash
# A local OCI registry for tests: Debian's docker-registry (the CNCF distribution registry) on
# 127.0.0.1, with its own config, storage, htpasswd file and access log under a run directory.
#
#   scripts/registry.sh start [--name N] [--port P] [--addr IP] [--netns NS] [--htpasswd user:pass]
#                             [--proxy-remote URL [--proxy-auth user:pass]]
#                             [--notify URL [--notify-auth HEADER]]
#   scripts/registry.sh stop  [--name N]
#
# start prints the address (IP:PORT, default 127.0.0.1:PORT) on stdout once the registry
# answers. --netns runs it inside an existing network namespace (`ip netns exec`), listening on
# --addr there (scripts/bench-net.sh: a registry behind a throttled veth). The run directory is
# $SKIFF_REGISTRY_RUN (default /tmp/skiff-registry)/NAME: config.yml, storage/, htpasswd,
# registry.log (access and application log), pid. --notify sends the registry's notifications
# (the events envelope of pushes and pulls) to URL, with `Authorization: HEADER` if given.
set -euo pipefail

cmd=${1:-}
shift || true
name=default
port=5000
addr=127.0.0.1
netns=
htpasswd=
proxy_remote=
proxy_auth=
notify=
notify_auth=
while [ $# -gt 0 ]; do
    case "$1" in
    --name) name=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --addr) addr=$2; shift 2 ;;
    --netns) netns=$2; shift 2 ;;
    --htpasswd) htpasswd=$2; shift 2 ;;
    --proxy-remote) proxy_remote=$2; shift 2 ;;
    --proxy-auth) proxy_auth=$2; shift 2 ;;
    --notify) notify=$2; shift 2 ;;
    --notify-auth) notify_auth=$2; shift 2 ;;
    *) echo "registry.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
run=${SKIFF_REGISTRY_RUN:-/tmp/skiff-registry}/$name

install_deps() {
    local missing=()
    command -v docker-registry >/dev/null || missing+=(docker-registry)
    command -v htpasswd >/dev/null || missing+=(apache2-utils)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "registry.sh: installing ${missing[*]}" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 ||
            { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2; }
        # The package starts a system registry on :5000; tests run their own.
        systemctl disable --now docker-registry >/dev/null 2>&1 || true
        if [ -f /run/docker-registry.pid ]; then kill "$(cat /run/docker-registry.pid)" 2>/dev/null || true; fi
    fi
}

stop() {
    if [ -f "$run/pid" ]; then
        pid=$(cat "$run/pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$run/pid"
    fi
}

case "$cmd" in
start)
    install_deps
    stop
    mkdir -p "$run/storage"
    auth=
    if [ -n "$htpasswd" ]; then
        htpasswd -Bbn "${htpasswd%%:*}" "${htpasswd#*:}" > "$run/htpasswd"
        auth="auth:
  htpasswd:
    realm: skiff-test
    path: $run/htpasswd"
    fi
    proxy=
    if [ -n "$proxy_remote" ]; then
        # A pull-through cache of another registry, with that registry's credentials if any
        # (registry 2.8 uses them only with a Bearer-token origin, not an htpasswd one:
        # distribution/distribution#3153).
        proxy="proxy:
  remoteurl: $proxy_remote"
        if [ -n "$proxy_auth" ]; then
            proxy="$proxy
  username: ${proxy_auth%%:*}
  password: \"${proxy_auth#*:}\""
        fi
    fi
    notifications=
    if [ -n "$notify" ]; then
        notifications="notifications:
  endpoints:
    - name: skiff-accel
      url: $notify
      timeout: 5s
      threshold: 3
      backoff: 1s"
        if [ -n "$notify_auth" ]; then
            notifications="$notifications
      headers:
        Authorization: [\"$notify_auth\"]"
        fi
    fi
    cat > "$run/config.yml" <<YAML
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $run/storage
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: $addr:$port
  secret: skiff-test-secret
$auth
$proxy
$notifications
YAML
    : > "$run/registry.log"
    inns=()
    if [ -n "$netns" ]; then inns=(ip netns exec "$netns"); fi
    setsid "${inns[@]}" docker-registry serve "$run/config.yml" >> "$run/registry.log" 2>&1 < /dev/null &
    echo $! > "$run/pid"
    for _ in $(seq 100); do
        code=$("${inns[@]}" curl -s -o /dev/null -w '%{http_code}' "http://$addr:$port/v2/" || true)
        if [ "$code" = 200 ] || [ "$code" = 401 ]; then
            echo "$addr:$port"
            exit 0
        fi
        if ! kill -0 "$(cat "$run/pid")" 2>/dev/null; then break; fi
        sleep 0.1
    done
    echo "registry.sh: the registry did not start; its log:" >&2
    cat "$run/registry.log" >&2
    stop
    exit 1
    ;;
stop) stop ;;
*) echo "usage: registry.sh start|stop [--name N] [--port P] [--addr IP] [--netns NS] [--htpasswd user:pass] [--proxy-remote URL [--proxy-auth user:pass]] [--notify URL [--notify-auth HEADER]]" >&2; exit 2 ;;
esac
