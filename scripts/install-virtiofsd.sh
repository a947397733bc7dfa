#!/usr/bin/env bash
# Install virtiofsd (the reference vhost-user-fs daemon, from crates.io) as a
# peer used to validate the microVM test harness without Skiff itself.
#
# Idempotent: does nothing if the binary is already present.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: $(basename "$0") [--force] [--help]

Installs virtiofsd with 'cargo install virtiofsd --locked' into
\$SKIFF_TOOLS (default: \${SKIFF_CACHE:-/var/cache/skiff}/tools), building in
a separate CARGO_TARGET_DIR so it never touches the project's target/.
Prints the path of the installed binary on success.

  --force   reinstall even if the binary already exists
USAGE
}

force=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --force) force=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

cache="${SKIFF_CACHE:-/var/cache/skiff}"
tools="${SKIFF_TOOLS:-$cache/tools}"
bin="$tools/bin/virtiofsd"
version="${VIRTIOFSD_VERSION:-}"

if [[ $force -eq 0 && -x "$bin" ]]; then
    echo "$bin"
    exit 0
fi

# Build dependencies (virtiofsd links libseccomp and libcap-ng).
missing=()
for p in libseccomp-dev libcap-ng-dev pkg-config; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if [[ ${#missing[@]} -gt 0 ]]; then
    sudo_cmd=()
    [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
    if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "cargo not found" >&2
        exit 1
    fi
fi

mkdir -p "$tools"
export CARGO_TARGET_DIR="${VIRTIOFSD_TARGET_DIR:-$cache/cargo-target-virtiofsd}"
args=(install virtiofsd --locked --root "$tools")
[[ -n "$version" ]] && args+=(--version "$version")
[[ $force -eq 1 ]] && args+=(--force)
cargo "${args[@]}" >&2

if [[ ! -x "$bin" ]]; then
    echo "virtiofsd was not installed at $bin" >&2
    exit 1
fi
echo "$bin"
