#!/usr/bin/env bash
# The netfault demo: sets the machine up, builds everything in release mode,
# then runs netfault-demo (pods via CNI in namespaces, loss and a blackhole,
# measured on the wire). Extra arguments go to netfault-demo. Needs root.
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
command -v cargo >/dev/null 2>&1 || { echo "demo.sh: error: cargo not found; install Rust (rustup) first" >&2; exit 1; }

step "setup (scripts/setup.sh)"
bash scripts/setup.sh

step "cargo build --release --workspace"
cargo build --release --workspace

step "target/release/netfault-demo $*"
exec target/release/netfault-demo "$@"
