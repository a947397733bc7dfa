#!/usr/bin/env bash
# Builds guest/lister (skiff-tree-lister) as a static binary that runs in the busybox guest and
# on the host alike, caches it outside the repo, and prints its path.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${SKIFF_CACHE:-/var/cache/skiff}
# One target directory per version of the lister's sources: worktrees and checkouts with
# different listers share the cache without overwriting each other's binary.
version=$(cd "$repo/guest/lister" && cat Cargo.toml Cargo.lock src/*.rs | sha256sum | cut -c1-16)
target_dir="$cache/lister-target/$version"
mkdir -p "$cache"
# glibc's static libc.a comes with libc6-dev, which the Rust toolchain already needs.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --locked --release \
    --manifest-path "$repo/guest/lister/Cargo.toml" \
    --target x86_64-unknown-linux-gnu --target-dir "$target_dir" >&2
echo "$target_dir/x86_64-unknown-linux-gnu/release/skiff-tree-lister"
