#!/usr/bin/env bash
# Coverage-guided fuzzing of Skiff's untrusted inputs with libFuzzer, on the stable toolchain
# (docs/fuzzing.md). Not part of CI: CI runs the same harness briefly (tests/fuzz_smoke.rs).
#
#   scripts/fuzz.sh [run] [TARGET...]  build, then fuzz each TARGET (default: all) in turn
#   scripts/fuzz.sh build              build the instrumented targets only
#   scripts/fuzz.sh smoke              every target for a few seconds (a check of the set-up)
#   scripts/fuzz.sh replay TARGET FILE...  run inputs (a crash, say) once, with a backtrace
#   scripts/fuzz.sh report             inputs, coverage and crashes of every campaign so far
#   scripts/fuzz.sh coverage [TARGET...]  edges each corpus reaches, by Skiff source file
#   scripts/fuzz.sh seeds              regenerate the checked-in seeds (root, nydus-image)
#
# Environment: FUZZ_RUNS (inputs per target; defaults below add up to over 10 million),
# FUZZ_NO_BUILD=1 (run the binaries built already),
# FUZZ_SECONDS (a time limit per target instead; both: whichever first), SKIFF_FUZZ_DIR (corpora, crashes and logs;
# default /var/cache/skiff/fuzz, outside the repository). One process at a time, under
# `nice -n 19`: the machine is shared.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fuzz="$repo/fuzz"
work="${SKIFF_FUZZ_DIR:-/var/cache/skiff/fuzz}"
triple=x86_64-unknown-linux-gnu
bin_dir="$work/target/$triple/release"

all_targets=(bootstrap tar fuse nydus_config api)
# Inputs per target for a full campaign, chosen by their speed (the cheap parsers get more).
declare -A default_runs=([bootstrap]=4000000 [tar]=2500000 [fuse]=1500000 [nydus_config]=2000000
    [api]=500000)
# Largest input per target, in bytes: a bootstrap or tar seed with room to grow; a batch of
# FUSE chains.
declare -A max_len=([bootstrap]=65536 [tar]=65536 [fuse]=16384 [nydus_config]=8192
    [api]=8192)

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

# The instrumentation libFuzzer needs, all of it stable `-C` flags (no -Z, no nightly):
# sancov's inline 8-bit counters and PC table for coverage, comparison tracing for the
# mutator, and debug assertions and overflow checks so that arithmetic on hostile sizes that
# would silently wrap in a release build fails loudly. `--target` keeps build scripts and
# proc-macros uninstrumented.
build() {
    mkdir -p "$work"
    local flags=(
        -Cpasses=sancov-module
        -Cllvm-args=-sanitizer-coverage-level=4
        -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
        -Cllvm-args=-sanitizer-coverage-pc-table
        -Cllvm-args=-sanitizer-coverage-trace-compares
        --cfg fuzzing
        -Cdebug-assertions
        -Coverflow-checks
        -Cforce-frame-pointers=yes
    )
    RUSTFLAGS="${flags[*]}" CARGO_TARGET_DIR="$work/target" nice -n 19 \
        cargo build --locked --release --manifest-path "$fuzz/Cargo.toml" --target "$triple" \
        --bins >&2
}

target_bin() {
    local t=$1
    [[ -x "$bin_dir/$t" ]] || { echo "fuzz.sh: no target $t (run: scripts/fuzz.sh build)" >&2; exit 2; }
    echo "$bin_dir/$t"
}

# Seeds into the corpus: the checked-in files, plus those a target makes itself.
prepare_corpus() {
    local t=$1 corpus="$work/corpus/$1"
    mkdir -p "$corpus" "$work/artifacts/$t" "$work/logs"
    if [[ -d "$fuzz/seeds/$t" ]]; then
        cp -n "$fuzz/seeds/$t"/* "$corpus"/ 2>/dev/null || true
    fi
    SKIFF_FUZZ_WRITE_SEEDS="$corpus" "$(target_bin "$t")" -runs=0 >/dev/null 2>&1 || true
}

dict_args() {
    local t=$1
    [[ -f "$fuzz/dict/$t.dict" ]] && echo "-dict=$fuzz/dict/$t.dict"
    return 0
}

# One campaign of target $1: libFuzzer's own loop, bounded by runs or seconds. The log keeps
# libFuzzer's final stats (number of executed units, coverage) for `report`.
campaign() {
    local t=$1 runs=${FUZZ_RUNS:-${default_runs[$1]}} bin log stamp
    bin=$(target_bin "$t")
    prepare_corpus "$t"
    stamp=$(date +%Y%m%d-%H%M%S)
    log="$work/logs/$t-$stamp.log"
    local limit=(-runs="$runs")
    # A time limit instead; with FUZZ_RUNS too, whichever comes first.
    if [[ -n ${FUZZ_SECONDS:-} ]]; then
        limit=(-max_total_time="$FUZZ_SECONDS")
        [[ -n ${FUZZ_RUNS:-} ]] && limit+=(-runs="$FUZZ_RUNS")
    fi
    echo "== $t: ${limit[*]}, corpus $work/corpus/$t, log $log" >&2
    local rc=0
    # -timeout: an input that takes 10 s is a hang; -rss_limit_mb: an input that makes Skiff
    # allocate 2 GiB is a bug too.
    (cd "$work/artifacts/$t" && nice -n 19 "$bin" "${limit[@]}" \
        -max_len="${max_len[$t]}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$work/artifacts/$t/" \
        $(dict_args "$t") "$work/corpus/$t") >"$log" 2>&1 || rc=$?
    summarize "$log"
    if [[ $rc -ne 0 ]]; then
        echo "== $t: libFuzzer exited $rc: see $log and $work/artifacts/$t" >&2
        return $rc
    fi
}

# One line of a log: target, executed inputs, coverage, crashes.
summarize() {
    local log=$1 t runs cov ft crashes
    t=$(basename "$log" | sed 's/-[0-9]\{8\}-[0-9]\{6\}\.log$//')
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{s+=$2} END {print s+0}')
    # The last status line: edges covered (cov) and features (ft: edges with hit counts).
    cov=$(grep -E '^#[0-9]+' "$log" | grep -o 'cov: [0-9]*' | tail -1 | awk '{print $2+0}')
    ft=$(grep -E '^#[0-9]+' "$log" | grep -o 'ft: [0-9]*' | tail -1 | awk '{print $2+0}')
    # Crashes, hangs and out-of-memory inputs each write one test unit.
    crashes=$(grep -c 'Test unit written to' "$log" || true)
    printf '%-14s %12s inputs  cov %6s  ft %6s  crashes %s  (%s)\n' \
        "$t" "$runs" "${cov:-?}" "${ft:-?}" "$crashes" "$(basename "$log")"
}

report() {
    local total=0 n
    shopt -s nullglob
    for log in "$work"/logs/*.log; do
        summarize "$log"
        n=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{s+=$2} END {print s+0}')
        total=$((total + n))
    done
    echo "total: $total inputs"
    local edges
    for t in "${all_targets[@]}"; do
        [[ -x "$bin_dir/$t" ]] || continue
        # The instrumented edges of the whole binary (Skiff and every dependency linked in).
        edges=$(SKIFF_FUZZ_WRITE_SEEDS= "$bin_dir/$t" -runs=0 2>&1 | grep -o 'Loaded 1 modules *([0-9]* inline 8-bit counters)' | grep -o '[0-9]* inline' | awk '{print $1}')
        echo "$t: ${edges:-?} instrumented edges in the binary"
    done
}

# Edge coverage of each target's corpus by source file: the target runs its corpus once,
# writing which SanitizerCoverage edges it reached (fuzz/src/coverage.rs); llvm-symbolizer
# names the edges' addresses; the edges in Skiff's own files are summed per directory.
coverage() {
    local t bin edges
    local targets=("$@")
    [[ ${#targets[@]} -eq 0 ]] && targets=("${all_targets[@]}")
    command -v llvm-symbolizer >/dev/null || apt-get install -y --no-install-recommends llvm >&2
    mkdir -p "$work/coverage"
    for t in "${targets[@]}"; do
        bin=$(target_bin "$t")
        edges="$work/coverage/$t.edges"
        rm -f "$edges"
        (cd "$work/artifacts/$t" && SKIFF_FUZZ_COVERAGE_OUT="$edges" nice -n 19 "$bin" -runs=0 \
            -max_len="${max_len[$t]}" "$work/corpus/$t" >/dev/null 2>&1) || true
        [[ -s $edges ]] || { echo "$t: no coverage written" >&2; continue; }
        echo "== $t ($(find "$work/corpus/$t" -type f | wc -l) corpus inputs): edges reached / instrumented"
        awk '{print $1}' "$edges" | llvm-symbolizer --obj="$bin" --functions=none \
            | python3 -c '
import sys, collections
repo, edges = sys.argv[1], sys.argv[2]
hits = [line.split()[1] == "1" for line in open(edges)]
locs, cur, first = [], None, True
for line in sys.stdin:
    line = line.rstrip("\n")
    if not line:
        locs.append(cur); cur, first = None, True
    elif first:
        cur, first = line.rsplit(":", 2)[0], False
tot, cov = collections.Counter(), collections.Counter()
for hit, f in zip(hits, locs):
    if f and f.startswith(repo + "/src/"):
        d = f[len(repo) + 1:]
        d = d.rsplit("/", 1)[0] if d.count("/") > 1 else d
        tot[d] += 1; cov[d] += hit
for d in sorted(tot):
    if cov[d]:
        print(f"  {d:32} {cov[d]:6} / {tot[d]:6}  {100 * cov[d] / tot[d]:5.1f} %")
c, n = sum(cov.values()), sum(tot.values())
label = "src/ (all linked in)"
print(f"  {label:32} {c:6} / {n:6}  {100 * c / max(1, n):5.1f} %")
' "$repo" "$edges" | tee "$work/coverage/$t.txt"
    done
}

# The seeds: small images built by skiff and by nydus-image from one special tree, and GNU tar
# archives of it in every format, with whiteout layers. Needs root (devices, owners, trusted
# xattrs) and nydus-image (scripts/install-nydus.sh).
seeds() {
    [[ $(id -u) -eq 0 ]] || { echo "fuzz.sh seeds: needs root" >&2; exit 2; }
    local nydus_image
    nydus_image="$("$repo/scripts/install-nydus.sh")/nydus-image"
    command -v setfattr >/dev/null || apt-get install -y --no-install-recommends attr >&2
    (cd "$repo" && cargo build --locked --bin skiff >&2)
    local skiff="$repo/target/debug/skiff"
    local tmp
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    local src="$tmp/tree"
    make_tree "$src"

    local out="$fuzz/seeds"
    rm -rf "$out/bootstrap" "$out/blobs" "$out/tar"
    mkdir -p "$out/bootstrap" "$out/blobs" "$out/tar"
    "$skiff" build "$src" --bootstrap "$out/bootstrap/skiff-lz4-4k" --blob-dir "$out/blobs" \
        --chunk-size 4K >/dev/null
    "$skiff" build "$src" --bootstrap "$out/bootstrap/skiff-none-8k" --blob-dir "$out/blobs" \
        --chunk-size 8K --compressor none >/dev/null
    local v
    for v in lz4_block:blake3 zstd:sha256 none:blake3; do
        "$nydus_image" create --log-level warn --type dir-rafs --fs-version 6 \
            --compressor "${v%%:*}" --digester "${v##*:}" --chunk-size 0x1000 \
            --bootstrap "$out/bootstrap/v6-${v%%:*}-${v##*:}-4k" --blob-dir "$out/blobs" "$src"
    done
    # Layers as nydus-snapshotter's converter builds them (tar-rafs), merged into one
    # bootstrap over two blobs.
    tar --format=pax -C "$src" -cf "$tmp/l1.tar" ./dir ./hello.txt
    tar --format=pax -C "$src" -cf "$tmp/l2.tar" ./multi.bin ./zeros.bin ./link
    # merge names each blob by its bootstrap's file name unless given the digests.
    local l blob digests=() sizes=()
    for l in l1 l2; do
        mkdir -p "$tmp/$l.blobs"
        "$nydus_image" create --log-level warn --type tar-rafs --fs-version 6 \
            --compressor lz4_block --chunk-size 0x1000 \
            --bootstrap "$tmp/$l.boot" --blob-dir "$tmp/$l.blobs" "$tmp/$l.tar"
        blob=$(ls "$tmp/$l.blobs")
        digests+=("$blob")
        sizes+=("$(stat -c %s "$tmp/$l.blobs/$blob")")
        mv "$tmp/$l.blobs/$blob" "$out/blobs/"
    done
    "$nydus_image" merge --log-level warn --bootstrap "$out/bootstrap/v6-merged-2-blobs" \
        --blob-digests "$(IFS=,; echo "${digests[*]}")" --blob-sizes "$(IFS=,; echo "${sizes[*]}")" \
        "$tmp/l1.boot" "$tmp/l2.boot"
    rm -f "$out/blobs"/*.tmp 2>/dev/null || true

    # Tar layers: each format GNU tar writes, 512-byte records (-b1) so that seeds stay small;
    # the big files only in the pax one.
    local f small=(--exclude=./multi.bin --exclude=./zeros.bin)
    tar --format=pax -b1 --xattrs --xattrs-include='*' --numeric-owner -C "$src" \
        -cf "$out/tar/tree-pax.tar" .
    for f in gnu oldgnu posix; do
        tar --format="$f" -b1 --xattrs --xattrs-include='*' --numeric-owner "${small[@]}" \
            -C "$src" -cf "$out/tar/tree-$f.tar" .
    done
    # ustar and v7 cannot hold the long name: the rest of the tree.
    for f in ustar v7; do
        tar --format="$f" -b1 --numeric-owner "${small[@]}" --exclude='./long*' -C "$src" \
            -cf "$out/tar/tree-$f.tar" . 2>/dev/null || true
    done
    gzip -9 -n -c "$out/tar/tree-ustar.tar" >"$out/tar/tree-ustar.tar.gz"
    zstd -q -19 -c "$out/tar/tree-ustar.tar" >"$out/tar/tree-ustar.tar.zst"
    # A second layer with whiteouts, an opaque directory, a replaced file and a hard link.
    local up="$tmp/upper"
    mkdir -p "$up/dir/sub"
    : >"$up/.wh.hello.txt"
    : >"$up/dir/.wh..wh..opq"
    echo replaced >"$up/dir/sub/new.txt"
    ln "$up/dir/sub/new.txt" "$up/dir/again.txt"
    : >"$up/.wh.zeros.bin"
    tar --format=pax -b1 --numeric-owner -C "$up" -cf "$tmp/upper.tar" .
    local sep=$'\n--skiff-fuzz-next-layer--\n'
    { cat "$out/tar/tree-ustar.tar"; printf '%s' "$sep"; cat "$tmp/upper.tar"; } \
        >"$out/tar/two-layers-whiteouts.tar"
    du -sh "$out"/* >&2
}

# The special tree: every kind of entry, xattrs (one binary, with a newline), hard links,
# zero and multi-chunk files, odd names, owners and times.
make_tree() {
    local d=$1
    mkdir -p "$d/dir/sub" "$d/sticky"
    : >"$d/empty"
    printf 'hello, fuzz\n' >"$d/hello.txt"
    setfattr -n user.skiff -v seed "$d/hello.txt"
    setfattr -n security.capability -v 0x0100000200200000000000000000000000000000 "$d/hello.txt"
    setfattr -n trusted.overlay.opaque -v y "$d/dir"
    ln "$d/hello.txt" "$d/hard"
    python3 -c 'import sys; sys.stdout.buffer.write(bytes(i * 7 % 251 for i in range(10000)))' \
        >"$d/multi.bin"
    head -c 8192 /dev/zero >"$d/zeros.bin"
    printf 'deep\n' >"$d/dir/sub/deep.txt"
    ln -s ../hello.txt "$d/dir/link"
    ln -s /etc/passwd "$d/abs-link"
    ln -s hello.txt "$d/link"
    mkfifo "$d/fifo"
    mknod "$d/null" c 1 3
    mknod "$d/loop" b 7 0
    printf 'x' >"$d/long-$(printf 'n%.0s' {1..200})"
    printf 'utf8\n' >"$d/$(printf 'caf\xc3\xa9 with space')"
    printf '#!/bin/sh\n' >"$d/setuid"
    chmod 4755 "$d/setuid"
    chmod 1777 "$d/sticky"
    chown 1000:1000 "$d/dir/sub/deep.txt"
    touch -h -d '2001-02-03 04:05:06.123456789' "$d/link" "$d/dir/sub/deep.txt" "$d/hello.txt"
}

# Everything runs from this function, so that the whole file is read before any of it runs
# (a campaign takes hours, and the script may be edited meanwhile).
main() {
    local cmd=${1:-run} t targets
    case "$cmd" in
        -h|--help|help) usage ;;
        build) build ;;
        seeds) seeds ;;
        report) report ;;
        coverage) shift; coverage "$@" ;;
        replay)
            shift
            t=${1:?usage: fuzz.sh replay TARGET FILE...}
            shift
            RUST_BACKTRACE=1 "$(target_bin "$t")" "$@" ;;
        smoke)
            build
            local failed=0
            for t in "${all_targets[@]}"; do
                FUZZ_SECONDS=${FUZZ_SECONDS:-10} campaign "$t" || failed=1
            done
            return $failed ;;
        run|*)
            if [[ ${1:-} == run ]]; then shift; fi
            targets=("$@")
            [[ ${#targets[@]} -eq 0 ]] && targets=("${all_targets[@]}")
            # FUZZ_NO_BUILD=1: the binaries built already (a campaign split in parts keeps
            # one build of one tree).
            [[ -n ${FUZZ_NO_BUILD:-} ]] || build
            # Every target runs even when one crashes; the exit code says whether any did.
            local failed=0
            for t in "${targets[@]}"; do campaign "$t" || failed=1; done
            report
            return $failed ;;
    esac
}

main "$@"; exit $?
