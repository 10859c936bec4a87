#!/usr/bin/env bash
# Runs the CRI test level (e2e/cri: a private containerd + runc per test,
# driven over CRI v1 as a kubelet does), or only the scenarios whose test
# name contains FOCUS (a ginkgo --focus in spirit; cargo's name filter).
#
#   scripts/e2e-cri.sh               # every scenario
#   scripts/e2e-cri.sh birth         # only tests with "birth" in their name
#   scripts/e2e-cri.sh packaging -- --nocapture
#
# Scenario names start with their area: node_, packaging_, birth_, socket_,
# lifecycle_, bad_input_, seccomp_ (list them: cargo test -p netfault-e2e-cri
# -- --list).
#
# Runs scripts/setup.sh first when a tool the suite needs is missing, then
# `cargo build --workspace` (the agent image is built from those debug
# binaries), then `cargo test -p netfault-e2e-cri -- FOCUS`. Needs root; as
# another user every scenario prints "skipped: requires root".
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

. scripts/lib.sh
find_cargo e2e-cri.sh

FOCUS=()
if [ "$#" -gt 0 ] && [ "$1" != "--" ]; then
    FOCUS=("$1")
    shift
fi
[ "${1:-}" = "--" ] && shift

missing=()
for tool in containerd containerd-shim-runc-v2 runc ctr umoci mmdebstrap kubectl protoc jq nft; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
for f in /bin/busybox /usr/lib/cni/bridge /usr/lib/cni/host-local; do
    [ -e "$f" ] || missing+=("$f")
done
if [ "${#missing[@]}" -gt 0 ]; then
    step "setup (scripts/setup.sh): missing ${missing[*]}"
    bash scripts/setup.sh
fi

step "cargo build --workspace"
cargo build --workspace

step "cargo test -p netfault-e2e-cri -- ${FOCUS[*]:-} $*"
cargo test -p netfault-e2e-cri -- "${FOCUS[@]}" "$@"
