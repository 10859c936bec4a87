#!/usr/bin/env bash
# Idempotent system setup for building and testing netfault on a fresh
# Debian/Ubuntu machine, as root: the eBPF toolchain, nftables, the reference
# CNI plugins, traffic tools, bpffs and /var/run/netns. Safe to run again.
set -euo pipefail

log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
    die "must run as root (try: sudo bash $0); it installs packages and mounts bpffs"
fi

# The packages the build (clang compiles the tc datapath against libbpf and
# the kernel uapi headers) and the netns tests (nft, CNI plugins, ip, iperf3)
# need; haproxy is the reference proxy of `cargo bench --bench proxy`.
PACKAGES=(clang llvm libbpf-dev linux-libc-dev libc6-dev nftables containernetworking-plugins
    iproute2 iperf3 curl jq ca-certificates haproxy
    protobuf-compiler containerd runc busybox-static mmdebstrap umoci
    dnsmasq-base bind9-dnsutils)
# dnsmasq-base, bind9-dnsutils: the DNS fault tests (tests/netns/dns.rs) run a
# real DNS server (dnsmasq) and client (dig) inside the test pods. dnsmasq-base
# is the binary alone: unlike the dnsmasq package, it starts no system service
# on the host.
# protobuf-compiler: netfault-cri's build compiles the CRI proto (k8s-cri).
# containerd, runc, busybox-static, mmdebstrap, umoci: the CRI test level
# (e2e/cri) runs a private containerd with images built here, no registry.
# Installing containerd starts no daemon where systemd is absent; where it
# does, the suite's own containerd is private (root, state, socket) anyway.
# kubectl renders daemonset/ in tests/daemonset.rs (`kubectl kustomize`, offline).
# Debian's kubernetes-client (1.20) conflicts with other kubectl packages (e.g.
# Google Cloud's), so it is only installed when no kubectl is on the PATH.
if command -v kubectl >/dev/null 2>&1; then
    log "kubectl: $(command -v kubectl) present"
else
    PACKAGES+=(kubernetes-client)
fi

installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = "installed" ]
}

command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script supports Debian and Ubuntu; install these by hand: ${PACKAGES[*]}"

missing=()
for p in "${PACKAGES[@]}"; do
    installed "$p" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
    log "packages: all present (${PACKAGES[*]})"
else
    log "packages: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends "${missing[@]}" \
        || die "apt-get install failed for: ${missing[*]}"
    log "packages: installed ${missing[*]}"
fi

# The reference CNI plugins the netns tests chain with netfault.
if [ -x /usr/lib/cni/bridge ]; then
    log "cni plugins: /usr/lib/cni/bridge present"
else
    log "warning: /usr/lib/cni/bridge not found although containernetworking-plugins is installed"
fi

# bpffs, for pinned maps and programs.
if awk '$2 == "/sys/fs/bpf" && $3 == "bpf" { found = 1 } END { exit !found }' /proc/mounts; then
    log "bpffs: already mounted at /sys/fs/bpf"
else
    mkdir -p /sys/fs/bpf 2>/dev/null || true
    if mount -t bpf bpf /sys/fs/bpf; then
        log "bpffs: mounted at /sys/fs/bpf"
    else
        log "warning: could not mount bpffs at /sys/fs/bpf (no CAP_SYS_ADMIN in this container?); eBPF tests may skip or fail"
    fi
fi

# Where `ip netns` and the tests keep named network namespaces.
if [ -d /var/run/netns ]; then
    log "netns dir: /var/run/netns exists"
else
    mkdir -p /var/run/netns
    log "netns dir: created /var/run/netns"
fi

log "done"
