#!/usr/bin/env bash
# netfault's full test run: system setup, formatting, lints, build, and every
# test (as root this includes the netns tests). CI runs exactly this.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

. scripts/lib.sh
find_cargo test.sh

step "setup (scripts/setup.sh)"
bash scripts/setup.sh

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo build --workspace"
cargo build --workspace

step "cargo test --workspace"
cargo test --workspace

step "all checks passed"
