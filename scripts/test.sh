#!/usr/bin/env bash
# netfault's full test run: system setup, formatting, lints, build, and every
# test (as root this includes the netns tests). CI runs exactly this.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==== %s ====\n' "$*"; }

# Under sudo, root's PATH usually lacks the invoking user's ~/.cargo/bin.
if ! command -v cargo >/dev/null 2>&1; then
    for home in "${CARGO_HOME:-}" "${HOME:-/root}/.cargo" \
        "${SUDO_USER:+$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cargo}"; do
        if [ -n "$home" ] && [ -x "$home/bin/cargo" ]; then
            export PATH="$home/bin:$PATH"
            rustup_home="$(dirname "$home")/.rustup"
            if [ -z "${RUSTUP_HOME:-}" ] && [ -d "$rustup_home" ]; then
                export RUSTUP_HOME="$rustup_home"
            fi
            break
        fi
    done
fi
command -v cargo >/dev/null 2>&1 || { echo "test.sh: error: cargo not found; install Rust (rustup) first" >&2; exit 1; }

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
