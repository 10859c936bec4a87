#!/usr/bin/env bash
# Coverage-guided fuzzing of netfault's input parsers with libFuzzer
# (cargo-fuzz, nightly toolchain): bash scripts/fuzz.sh [TARGET|all] [SECONDS]
# Targets: fault_json annotations cni_input proxy_sniff dns_message http1_framing (fuzz/src/lib.rs).
# libFuzzer starts from the committed seeds (fuzz/corpus/TARGET) and writes
# what it finds to fuzz/libfuzzer/corpus/TARGET (not committed); crashes land
# in fuzz/libfuzzer/artifacts/TARGET. `bash scripts/fuzz.sh TARGET merge`
# adds the inputs that reach new coverage to the committed seeds. The stable
# replay of the seeds runs in the normal tests (cargo test -p netfault-fuzz).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib.sh
find_cargo fuzz.sh

target=${1:-all}
seconds=${2:-600}
targets=(fault_json annotations cni_input proxy_sniff dns_message http1_framing)
[ "$target" = all ] || targets=("$target")

if ! rustup toolchain list | grep -q '^nightly'; then
    step "rustup toolchain install nightly"
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    step "cargo install cargo-fuzz"
    cargo +nightly install cargo-fuzz --locked
fi

for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/libfuzzer/corpus/$t"
    if [ "$seconds" = merge ]; then
        step "merge what $t found into fuzz/corpus/$t"
        cargo +nightly fuzz run --fuzz-dir fuzz/libfuzzer "$t" "fuzz/corpus/$t" "fuzz/libfuzzer/corpus/$t" -- -merge=1
        continue
    fi
    step "fuzz $t for ${seconds}s"
    cargo +nightly fuzz run --fuzz-dir fuzz/libfuzzer "$t" "fuzz/libfuzzer/corpus/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -max_len=8192 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        2>&1 | tee "target/fuzz-$t.log" | grep -E '^#[0-9]+ +(INITED|DONE|pulse)|stat::|ERROR|SUMMARY' || true
    grep -q 'stat::number_of_executed_units' "target/fuzz-$t.log" \
        || { echo "fuzz $t did not finish: see target/fuzz-$t.log" >&2; exit 1; }
done
