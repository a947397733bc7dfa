#!/usr/bin/env bash
# Installs Nydus 2.2 (nydus-image and nydusd, from the nydus-rs crate on crates.io) as a peer
# for the benchmarks, into ${SKIFF_CACHE:-/var/cache/skiff}/tools, never into the repository.
# Idempotent: does nothing when both binaries are present. Prints the bin directory.
# About 7 minutes on 2 cores; set SKIFF_NICE=1 to build at the lowest CPU priority.
set -euo pipefail
case "${1:-}" in
    -h|--help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
cache="${SKIFF_CACHE:-/var/cache/skiff}"
tools="${SKIFF_TOOLS:-$cache/tools}"
if [[ -x "$tools/bin/nydusd" && -x "$tools/bin/nydus-image" ]]; then
    echo "$tools/bin"
    exit 0
fi
missing=()
for p in cmake pkg-config libssl-dev clang libfuse3-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
fi
mkdir -p "$tools"
export CARGO_TARGET_DIR="$cache/cargo-target-nydus"
nice=()
[[ ${SKIFF_NICE:-0} == 1 ]] && nice=(nice -n 19)
"${nice[@]}" cargo install nydus-rs --version 2.2.0 --locked --features virtiofs --root "$tools" >&2
[[ -x "$tools/bin/nydusd" && -x "$tools/bin/nydus-image" ]] || { echo "nydus not installed" >&2; exit 1; }
echo "$tools/bin"
