#!/usr/bin/env bash
# Runs every Skiff test on this machine: unit, integration (FUSE, Debian rootfs) and microVM.
# Installs what the tests need first (Debian packages, the Rust build), idempotently.
#
# With CI=true a missing prerequisite fails the run; it is never skipped.
set -euo pipefail
case "${1:-}" in
    -h|--help)
        echo "usage: scripts/test.sh [cargo test harness args...]   (CI=true: missing prerequisites fail)"
        exit 0 ;;
esac
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

"$repo/scripts/install-deps.sh"
# The local S3 server (moto) of the S3 and cache tests, installed once into a venv.
"$repo/scripts/s3.sh" install
# nydus-image 2.2, which makes the Nydus RAFS v6 images the v6 tests read (and nydusd, the
# benchmarks' peer), built once from crates.io and cached outside the repo (about 7 minutes on
# 2 cores the first time).
"$repo/scripts/install-nydus.sh" >/dev/null
# QEMU 10 from bookworm-backports beside the system's 7.2 (never replacing it), for the microVM
# tests that run on both; the tests find it at the path it prints.
SKIFF_QEMU10=$("$repo/scripts/install-qemu10.sh")
export SKIFF_QEMU10
# The microVM's kernel and initramfs, built once and cached outside the repo.
"$repo/guest/build-initramfs.sh" >/dev/null

# The gates a maintainer runs first: formatting and lints (warnings are errors), so a failing
# style check stops the run before the long tests.
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
cargo build --locked --all-targets
# Tests that mount or boot VMs are independent of each other; two at a time suits 2 cores.
cargo test --locked --all-targets -- --test-threads="${SKIFF_TEST_THREADS:-2}" "$@"
