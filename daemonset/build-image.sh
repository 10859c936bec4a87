#!/usr/bin/env bash
# Builds netfault's node image, docker.io/library/netfaultd:dev, as an OCI
# archive (target/netfaultd-image.oci.tar) WITHOUT pulling a base image or
# talking to a registry: a Debian bookworm rootfs with nftables from
# mmdebstrap's extract variant, plus the release binaries under
# /opt/netfault/bin, packaged with umoci. Run as root (it installs mmdebstrap
# and umoci if missing). Reproducible: the same SOURCE_DATE_EPOCH (default: the
# last commit's time) and the same binaries give a byte-identical archive.
#
# Kept consistent with daemonset/Dockerfile (same binaries, paths, entrypoint;
# tests/daemonset.rs checks this).
#
# Load it into containerd:  ctr -n k8s.io images import target/netfaultd-image.oci.tar
#
# Usage: daemonset/build-image.sh [--bin-dir DIR] [--out FILE]
#   --bin-dir DIR  take the binaries from DIR (default: target/release, built
#                  with cargo if missing); with --bin-dir nothing is built and
#                  a missing binary is an error. The CRI test level (e2e/cri)
#                  passes target/debug, which `cargo build --workspace` fills.
#   --out FILE     write the archive there (default: target/netfaultd-image.oci.tar)
set -euo pipefail

CALLER_DIR=$PWD
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

log() { printf 'build-image: %s\n' "$*"; }
die() { printf 'build-image: error: %s\n' "$*" >&2; exit 1; }

IMAGE_NAME=docker.io/library/netfaultd:dev
SUITE=bookworm
BIN_DIR=/opt/netfault/bin
ENTRYPOINT=/opt/netfault/bin/netfaultd
# The binaries in the image; netfault-install-cni is optional while it is written.
BINARIES=(netfaultd netfaultctl netfault)
OPTIONAL_BINARIES=(netfault-install-cni)
RELEASE_DIR=${CARGO_TARGET_DIR:-$ROOT/target}/release
OUT=$ROOT/target/netfaultd-image.oci.tar
# Set by --bin-dir: use the binaries there as they are, build nothing.
EXPLICIT_BIN_DIR=0

usage() { printf 'usage: %s [--bin-dir DIR] [--out FILE]\n' "$0" >&2; exit 2; }
while [ "$#" -gt 0 ]; do
    case "$1" in
        --bin-dir)
            [ "$#" -ge 2 ] || usage
            case "$2" in /*) d=$2 ;; *) d=$CALLER_DIR/$2 ;; esac
            [ -d "$d" ] || die "--bin-dir $2: not a directory"
            RELEASE_DIR=$(cd "$d" && pwd)
            EXPLICIT_BIN_DIR=1
            shift 2 ;;
        --out)
            [ "$#" -ge 2 ] && [ -n "$2" ] || usage
            case "$2" in
                /*) OUT=$2 ;;
                *) OUT=$CALLER_DIR/$2 ;;
            esac
            shift 2 ;;
        -h|--help) usage ;;
        *) printf 'build-image: unknown argument %s\n' "$1" >&2; usage ;;
    esac
done

# --- packages -----------------------------------------------------------------
need=()
for p in mmdebstrap umoci; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)" = "installed" ] || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || die "missing ${need[*]}; run as root to install them (sudo bash $0)"
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends "${need[@]}" || die "apt-get install ${need[*]} failed"
fi
[ "$(id -u)" -eq 0 ] || die "must run as root (mmdebstrap's root mode, file ownership in the layers)"

# --- binaries -----------------------------------------------------------------
# Without --bin-dir: the release build (a no-op when up to date), and the CNI
# plugin linked statically. The plugin runs on the host, once per pod, from
# whatever glibc the node has: the static build needs none, and it starts in
# about half the time (no dynamic linking; docs/design.md, "CNI plugin speed").
# Cargo cannot set crt-static for one package of a workspace build, so it is a
# second build for the host triple, in its own target subdir.
declare -A SRC
if [ "$EXPLICIT_BIN_DIR" -eq 0 ]; then
    . scripts/lib.sh
    find_cargo build-image.sh
    log "cargo build --release -p netfault-agent -p netfault-cni -p netfault-install-cni"
    cargo build --release -p netfault-agent -p netfault-cni -p netfault-install-cni
    HOST_TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
    [ -n "$HOST_TRIPLE" ] || die "rustc -vV names no host triple"
    log "static CNI plugin: RUSTFLAGS=-Ctarget-feature=+crt-static cargo build --release -p netfault-cni --target $HOST_TRIPLE"
    RUSTFLAGS='-C target-feature=+crt-static' cargo build --release -p netfault-cni --target "$HOST_TRIPLE"
    SRC[netfault]=${CARGO_TARGET_DIR:-$ROOT/target}/$HOST_TRIPLE/release/netfault
fi
for b in "${BINARIES[@]}" "${OPTIONAL_BINARIES[@]}"; do
    [ -n "${SRC[$b]:-}" ] || SRC[$b]=$RELEASE_DIR/$b
done
for b in "${BINARIES[@]}"; do
    [ -x "${SRC[$b]}" ] || die "${SRC[$b]} missing (build it first: cargo build --workspace, or --release)"
done
include=("${BINARIES[@]}")
for b in "${OPTIONAL_BINARIES[@]}"; do
    if [ -x "${SRC[$b]}" ]; then
        include+=("$b")
    else
        log "warning: ${SRC[$b]} not found; the image will lack it (the install-cni container cannot start)"
    fi
done

# --- reproducibility ----------------------------------------------------------
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 0)
fi
export SOURCE_DATE_EPOCH
CREATED=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
log "SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH ($CREATED)"

# A work dir of its own, so that two builds (of different --out) never share one.
mkdir -p "$ROOT/target"
WORK=$(mktemp -d "$ROOT/target/image-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- rootfs -------------------------------------------------------------------
# The extract variant unpacks the packages without running maintainer scripts
# and ignores --customize-hook; only --extract-hook runs. mmdebstrap copies the
# host's resolv.conf and hostname in: remove them.
log "mmdebstrap --variant=extract --include=nftables $SUITE"
mmdebstrap --quiet --variant=extract --include=nftables \
    --extract-hook='rm -f "$1/etc/resolv.conf" "$1/etc/hostname"' \
    "$SUITE" "$WORK/rootfs.tar"

# --- the binaries' layer ------------------------------------------------------
mkdir -p "$WORK/bin-layer$BIN_DIR"
for b in "${include[@]}"; do
    install -m 0755 "${SRC[$b]}" "$WORK/bin-layer$BIN_DIR/$b"
done
tar --create --file "$WORK/bin.tar" --directory "$WORK/bin-layer" \
    --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
    --format=pax --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    opt

# --- the OCI layout -----------------------------------------------------------
LAYOUT=$WORK/layout
TAG=dev
umoci init --layout "$LAYOUT"
umoci new --image "$LAYOUT:$TAG"
umoci raw add-layer --image "$LAYOUT:$TAG" --history.created "$CREATED" \
    --history.created_by "mmdebstrap --variant=extract --include=nftables $SUITE" "$WORK/rootfs.tar"
umoci raw add-layer --image "$LAYOUT:$TAG" --history.created "$CREATED" \
    --history.created_by "netfault binaries: ${include[*]}" "$WORK/bin.tar"
umoci config --image "$LAYOUT:$TAG" --no-history --created "$CREATED" \
    --author netfault --os linux --architecture "$(dpkg --print-architecture)" \
    --config.entrypoint "$ENTRYPOINT" \
    --config.env PATH=/opt/netfault/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.workingdir /
umoci gc --layout "$LAYOUT"

# umoci names the tag "dev"; containerd's import uses the annotation as the
# image's name, so give it the full reference.
jq --arg name "$IMAGE_NAME" \
    '.manifests |= map(.annotations["org.opencontainers.image.ref.name"] = $name)' \
    "$LAYOUT/index.json" > "$WORK/index.json"
mv "$WORK/index.json" "$LAYOUT/index.json"

# --- the archive --------------------------------------------------------------
mkdir -p "$(dirname "$OUT")"
find "$LAYOUT" -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} +
tar --create --file "$OUT.tmp" --directory "$LAYOUT" \
    --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
    --format=pax --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime .
mv "$OUT.tmp" "$OUT"

size=$(stat -c %s "$OUT")
uncompressed=$(( $(stat -c %s "$WORK/rootfs.tar") + $(stat -c %s "$WORK/bin.tar") ))
log "image $IMAGE_NAME (entrypoint $ENTRYPOINT; ${include[*]} in $BIN_DIR)"
log "archive $OUT: $size bytes ($(numfmt --to=iec "$size")); uncompressed layers $uncompressed bytes ($(numfmt --to=iec "$uncompressed"))"
log "sha256 $(sha256sum "$OUT" | cut -d' ' -f1)"
