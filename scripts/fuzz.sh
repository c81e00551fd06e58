#!/usr/bin/env bash
# Coverage-guided fuzzing of Ration with cargo-fuzz (libFuzzer), on the stable toolchain.
#
#   scripts/fuzz.sh list                      the targets
#   scripts/fuzz.sh run TARGET [SECONDS] [-- LIBFUZZER_ARGS...]
#                                             fuzz one target (default 300 s)
#   scripts/fuzz.sh all [SECONDS]             every target in turn, SECONDS each
#   scripts/fuzz.sh repro TARGET FILE         run one input (a crash) and show the panic
#   scripts/fuzz.sh tmin TARGET FILE          minimize a crashing input
#   scripts/fuzz.sh smoke                     the deterministic smoke run CI does
#   scripts/fuzz.sh install                   only install cargo-fuzz
#
# Installs what it needs: cargo-fuzz from crates.io (pinned), built with the
# machine's toolchain; libFuzzer itself comes with the libfuzzer-sys crate and is
# compiled by gcc/g++. No nightly: targets are built with `--sanitizer none`, which
# cargo-fuzz supports on stable (coverage instrumentation and libFuzzer work; only
# the sanitizers need nightly). The code is pure safe Rust, so what the fuzzers look
# for is panics, failed assertions and overflow (debug assertions are on).
#
# Environment:
#   FUZZ_JOBS=N          run N libFuzzer workers (default 1: the machine has 2 cores)
#   FUZZ_SANITIZER=...   address|leak|... instead of none; needs a nightly toolchain,
#                        named by FUZZ_TOOLCHAIN (e.g. FUZZ_TOOLCHAIN=nightly)
#   FUZZ_RSS_MB=N        libFuzzer's memory limit per input run (default 2048)
#
# Files: fuzz/corpus/TARGET (the growing corpus; seeded from `ration-fuzz`'s seeds
# example), fuzz/artifacts/TARGET (crashes, timeouts, out-of-memory inputs). See
# fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
TARGETS=(proto_requests entry_decode snapshot_restore core_apply)

log() { printf '[fuzz.sh] %s\n' "$*" >&2; }

install_cargo_fuzz() {
    if cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
        return
    fi
    log "installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io (a few minutes, once)"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
}

toolchain_args() {
    if [[ -n "${FUZZ_TOOLCHAIN:-}" ]]; then
        echo "+${FUZZ_TOOLCHAIN}"
    fi
}

check_target() {
    local t
    for t in "${TARGETS[@]}"; do
        [[ "$t" == "$1" ]] && return
    done
    log "unknown target '$1'; targets: ${TARGETS[*]}"
    exit 2
}

seed_corpus() {
    # Valid encodings of every message and entry kind, so mutation starts deep.
    # Seeds are named by content hash: re-running adds nothing twice.
    cargo run -q -p ration-fuzz --example seeds -- fuzz/corpus
}

run_target() {
    local target=$1 seconds=$2
    shift 2
    check_target "$target"
    mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
    local sanitizer=${FUZZ_SANITIZER:-none}
    local jobs=${FUZZ_JOBS:-1}
    local parallel=()
    if [[ "$jobs" -gt 1 ]]; then
        # libFuzzer then runs workers in the background, each logging to fuzz-N.log.
        parallel=(-jobs="$jobs" -workers="$jobs")
    fi
    log "fuzzing $target for ${seconds}s (sanitizer $sanitizer, $jobs job(s))"
    # shellcheck disable=SC2046
    cargo $(toolchain_args) fuzz run --fuzz-dir fuzz --sanitizer "$sanitizer" "$target" \
        "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" \
        -rss_limit_mb="${FUZZ_RSS_MB:-2048}" \
        -timeout=20 \
        -print_final_stats=1 \
        "${parallel[@]}" \
        "$@"
}

cmd=${1:-help}
shift || true
case "$cmd" in
    list)
        printf '%s\n' "${TARGETS[@]}"
        ;;
    install)
        install_cargo_fuzz
        ;;
    run)
        [[ $# -ge 1 ]] || { log "usage: scripts/fuzz.sh run TARGET [SECONDS] [-- ARGS]"; exit 2; }
        target=$1
        shift
        seconds=300
        if [[ $# -ge 1 && "$1" != "--" ]]; then
            seconds=$1
            shift
        fi
        [[ "${1:-}" == "--" ]] && shift
        install_cargo_fuzz
        seed_corpus
        run_target "$target" "$seconds" "$@"
        ;;
    all)
        seconds=${1:-300}
        install_cargo_fuzz
        seed_corpus
        for t in "${TARGETS[@]}"; do
            run_target "$t" "$seconds"
        done
        ;;
    repro)
        [[ $# -eq 2 ]] || { log "usage: scripts/fuzz.sh repro TARGET FILE"; exit 2; }
        check_target "$1"
        install_cargo_fuzz
        # shellcheck disable=SC2046
        RUST_BACKTRACE=1 cargo $(toolchain_args) fuzz run --fuzz-dir fuzz \
            --sanitizer "${FUZZ_SANITIZER:-none}" "$1" "$2"
        ;;
    tmin)
        [[ $# -eq 2 ]] || { log "usage: scripts/fuzz.sh tmin TARGET FILE"; exit 2; }
        check_target "$1"
        install_cargo_fuzz
        # shellcheck disable=SC2046
        cargo $(toolchain_args) fuzz tmin --fuzz-dir fuzz \
            --sanitizer "${FUZZ_SANITIZER:-none}" "$1" "$2"
        ;;
    smoke)
        cargo test -p ration-fuzz --test smoke
        ;;
    *)
        sed -n '2,30p' "$0"
        exit 2
        ;;
esac
