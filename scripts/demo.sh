#!/usr/bin/env bash
# The netfault demo: sets the machine up, builds everything in release mode,
# then runs netfault-demo (pods via CNI in namespaces, loss and a blackhole,
# measured on the wire). Extra arguments go to netfault-demo. Needs root.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

. scripts/lib.sh
find_cargo demo.sh

step "setup (scripts/setup.sh)"
bash scripts/setup.sh

step "cargo build --release --workspace"
cargo build --release --workspace

step "target/release/netfault-demo $*"
exec target/release/netfault-demo "$@"
