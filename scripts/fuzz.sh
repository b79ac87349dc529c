#!/usr/bin/env bash
# Fuzz every parser Moselle owns (fuzz/fuzz_targets/) for SECONDS each:
#   scripts/fuzz.sh [--dev] SECONDS [TARGET...]
# --dev builds without optimisation (half the build time, a tenth of the
# speed): the test command's few seconds per target use it.
# cargo-fuzz (libFuzzer, coverage-guided) on the stable toolchain, so with
# `--sanitizer none`: safe Rust needs no AddressSanitizer to show a panic,
# an overflow (debug assertions are on) or a hang. Corpora start from
# fuzz/seeds/ and grow in fuzz/corpus/ (kept between runs); a crash leaves
# its input in fuzz/artifacts/<target>/ and fails the run. Prints the
# executions of each target and in all.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
profile=()
if [[ "${1:-}" == --dev ]]; then
    profile=(--dev)
    shift
fi
secs="${1:?usage: scripts/fuzz.sh [--dev] SECONDS [TARGET...]}"
shift

CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q " ${CARGO_FUZZ_VERSION}"; then
    echo "installing cargo-fuzz ${CARGO_FUZZ_VERSION}"
    cargo install cargo-fuzz --locked --version "${CARGO_FUZZ_VERSION}"
fi

cd fuzz
targets=("$@")
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(cargo fuzz list)
fi
# One build for all targets; debug assertions catch overflows.
cargo fuzz build "${profile[@]}" --sanitizer none --debug-assertions >/dev/null 2>build.log \
    || { tail -40 build.log; exit 1; }

total=0
failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    log="fuzz-$t.log"
    if cargo fuzz run "${profile[@]}" --sanitizer none --debug-assertions "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        runs=${runs:-0}
        total=$((total + runs))
        printf '%-20s %12d executions in %ss, corpus %d\n' "$t" "$runs" "$secs" "$(ls "corpus/$t" | wc -l)"
    else
        failed+=("$t")
        printf '%-20s FAILED: %s\n' "$t" "$(grep -m1 -E 'panicked|ERROR|deadly signal|timeout' "$log" || echo 'see log')"
        grep -A15 -m1 "panicked" "$log" || tail -30 "$log"
        ls "artifacts/$t" 2>/dev/null | sed "s|^|  artifact: fuzz/artifacts/$t/|"
    fi
done
echo "total: $total executions"
if ((${#failed[@]})); then
    echo "crashes in: ${failed[*]}"
    exit 1
fi
