#!/usr/bin/env bash
# Builds guest/lister (skiff-tree-lister) as a static binary that runs in the busybox guest and
# on the host alike, caches it outside the repo, and prints its path.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${SKIFF_CACHE:-/var/cache/skiff}
target_dir="$cache/lister-target"
mkdir -p "$cache"
# glibc's static libc.a comes with libc6-dev, which the Rust toolchain already needs.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --locked --release \
    --manifest-path "$repo/guest/lister/Cargo.toml" \
    --target x86_64-unknown-linux-gnu --target-dir "$target_dir" >&2
echo "$target_dir/x86_64-unknown-linux-gnu/release/skiff-tree-lister"
