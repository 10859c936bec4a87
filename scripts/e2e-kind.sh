#!/usr/bin/env bash
# Runs the cluster suite (e2e/kind, crate netfault-e2e-kind) on a real
# Kubernetes cluster:
#
#   scripts/e2e-kind.sh [--cluster kind|k3s|existing] [--focus NAME]
#                       [--bin-dir DIR] [--agent-image FILE] [--name NAME] [--keep]
#
#   --cluster kind      (default) create a Kind cluster NAME from
#                       e2e/kind/kind-config.yaml (1 control plane + 2
#                       workers) unless it exists; deleted at the end if this
#                       run created it (unless --keep)
#   --cluster k3s       use the k3s running on this host (KUBECONFIG, default
#                       /etc/rancher/k3s/k3s.yaml); the DaemonSet is installed
#                       through a generated overlay with k3s's containerd and
#                       CNI paths
#   --cluster existing  use the current kubeconfig's cluster as it is; the
#                       images must already be on its nodes, and the nodes
#                       are not inspected after the uninstall
#   --focus NAME        one scenario (list: cargo test -p netfault-e2e-kind
#                       --test kind -- --list)
#   --bin-dir DIR       take netfaultd, netfaultctl, netfault and
#                       netfault-install-cni from DIR (passed to
#                       daemonset/build-image.sh --bin-dir); default: the
#                       release build that build-image.sh makes
#   --agent-image FILE  load this agent image archive (made by build-image.sh,
#                       e.g. in a Debian bookworm container as the workflow
#                       does) instead of building one here
#   --name NAME         the Kind cluster's name (default netfault-e2e)
#   --keep              keep a cluster this run created
#
# Steps: the agent image (daemonset/build-image.sh, an OCI archive, no
# registry) and the workload image (busybox-static, the CRI level's box
# image); the cluster; both images loaded (kind load image-archive / k3s ctr
# images import), each checked by name on every node; then the suite (cargo
# test -p netfault-e2e-kind --test kind), which installs the DaemonSet
# (kubectl apply -k) with its token Secret and runs the scenarios. On
# failure, logs go to target/e2e-kind/logs (agent logs, events, kind export
# logs). Needs root (build-image.sh's mmdebstrap, k3s ctr), kubectl, and for
# Kind docker and kind.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
. scripts/lib.sh

CLUSTER=kind
FOCUS=
BIN_DIR=
AGENT_ARCHIVE=
NAME=netfault-e2e
KEEP=0
AGENT_IMAGE=docker.io/library/netfaultd:dev
BOX_IMAGE=docker.io/library/nfbox:dev
OUT=$ROOT/target/e2e-kind
LOGS=$OUT/logs

die() { printf 'e2e-kind: error: %s\n' "$*" >&2; exit 1; }
usage() {
    sed -n '5,7p' "$0" >&2
    exit 2
}
while [ "$#" -gt 0 ]; do
    case "$1" in
        --cluster) [ "$#" -ge 2 ] || usage; CLUSTER=$2; shift 2 ;;
        --focus) [ "$#" -ge 2 ] || usage; FOCUS=$2; shift 2 ;;
        --bin-dir) [ "$#" -ge 2 ] || usage; BIN_DIR=$(cd "$2" && pwd) || die "--bin-dir $2: not a directory"; shift 2 ;;
        --agent-image) [ "$#" -ge 2 ] || usage; AGENT_ARCHIVE=$(realpath "$2") && [ -f "$AGENT_ARCHIVE" ] || die "--agent-image $2: no such file"; shift 2 ;;
        --name) [ "$#" -ge 2 ] || usage; NAME=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) usage ;;
        *) printf 'e2e-kind: unknown argument %s\n' "$1" >&2; usage ;;
    esac
done
case "$CLUSTER" in
    kind|k3s|existing) ;;
    *) die "--cluster $CLUSTER: must be kind, k3s or existing" ;;
esac
[ "$(id -u)" -eq 0 ] || die "must run as root (sudo): build-image.sh needs it, and so does k3s ctr"
find_cargo e2e-kind.sh

need=(kubectl)
case "$CLUSTER" in
    kind) need+=(kind docker) ;;
    k3s) need+=(k3s) ;;
esac
for t in "${need[@]}"; do
    command -v "$t" >/dev/null 2>&1 || die "$t not found (needed for --cluster $CLUSTER; see e2e/kind/README.md)"
done
missing=()
tools=(umoci protoc jq)
[ -n "$AGENT_ARCHIVE" ] || tools+=(mmdebstrap)
for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ -e /bin/busybox ] || missing+=(/bin/busybox)
if [ "${#missing[@]}" -gt 0 ]; then
    step "setup (scripts/setup.sh): missing ${missing[*]}"
    bash scripts/setup.sh
fi
mkdir -p "$OUT"

# --- images -------------------------------------------------------------------
if [ -n "$AGENT_ARCHIVE" ]; then
    step "agent image: $AGENT_ARCHIVE (given)"
    NETFAULTCTL=${BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/release}/netfaultctl
elif [ -n "$BIN_DIR" ]; then
    step "agent image (daemonset/build-image.sh --bin-dir $BIN_DIR)"
    AGENT_ARCHIVE=$OUT/netfaultd.oci.tar
    bash daemonset/build-image.sh --bin-dir "$BIN_DIR" --out "$AGENT_ARCHIVE"
    NETFAULTCTL=$BIN_DIR/netfaultctl
else
    step "agent image (daemonset/build-image.sh, release build)"
    AGENT_ARCHIVE=$OUT/netfaultd.oci.tar
    bash daemonset/build-image.sh --out "$AGENT_ARCHIVE"
    NETFAULTCTL=${CARGO_TARGET_DIR:-$ROOT/target}/release/netfaultctl
fi
[ -x "$NETFAULTCTL" ] || die "$NETFAULTCTL missing"

step "workload image (busybox-static, no registry)"
BOX_ARCHIVE=$(cargo run -q -p netfault-e2e-kind --bin e2e-kind-box-image)
[ -f "$BOX_ARCHIVE" ] || die "the box image builder printed no archive: $BOX_ARCHIVE"

# --- cluster ------------------------------------------------------------------
CREATED=0
cleanup() {
    rc=$?
    if [ "$rc" -ne 0 ]; then
        collect_logs || true
    fi
    if [ "$CREATED" -eq 1 ] && [ "$KEEP" -eq 0 ]; then
        step "kind delete cluster --name $NAME"
        kind delete cluster --name "$NAME" || true
    fi
    exit "$rc"
}
collect_logs() {
    step "logs to $LOGS"
    mkdir -p "$LOGS"
    kubectl -n netfault get pods -o wide > "$LOGS/agent-pods.txt" 2>&1 || true
    for p in $(kubectl -n netfault get pods -o name 2>/dev/null); do
        n=${p#pod/}
        kubectl -n netfault logs "$n" --all-containers --prefix > "$LOGS/$n.log" 2>&1 || true
        kubectl -n netfault logs "$n" --all-containers --prefix --previous > "$LOGS/$n.previous.log" 2>/dev/null || true
    done
    kubectl get events -A --sort-by=.lastTimestamp > "$LOGS/events.txt" 2>&1 || true
    kubectl get networkfaults -A -o yaml > "$LOGS/networkfaults.yaml" 2>&1 || true
    if [ "$CLUSTER" = kind ]; then
        kind export logs "$LOGS/kind" --name "$NAME" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

case "$CLUSTER" in
    kind)
        export KUBECONFIG=$OUT/kubeconfig-$NAME
        if kind get clusters 2>/dev/null | grep -qx "$NAME"; then
            step "kind cluster $NAME exists; using it"
            kind get kubeconfig --name "$NAME" > "$KUBECONFIG"
        else
            step "kind create cluster --name $NAME"
            CREATED=1
            kind create cluster --name "$NAME" --config e2e/kind/kind-config.yaml \
                --kubeconfig "$KUBECONFIG" --wait 180s
        fi
        ;;
    k3s)
        export KUBECONFIG=${KUBECONFIG:-/etc/rancher/k3s/k3s.yaml}
        ;;
    existing) ;;
esac
kubectl cluster-info >/dev/null || die "the cluster does not answer (KUBECONFIG=${KUBECONFIG:-~/.kube/config})"
kubectl wait --for=condition=Ready nodes --all --timeout=180s

# --- load the images ----------------------------------------------------------
# kind load image-archive streams the archive into `ctr -n k8s.io images
# import --all-platforms --digests` on each node (kind's
# pkg/cluster/nodeutils LoadImageArchive); ctr's importer reads OCI archives
# as well as docker-archives, and names an OCI image after its index's
# org.opencontainers.image.ref.name annotation, which build-image.sh sets to
# the full reference. If a node still lacks the name (an importer that names
# OCI images otherwise), convert to a docker-archive with skopeo, whose
# manifest.json RepoTags every importer honours, and load that.
has_image() { # node image
    case "$CLUSTER" in
        kind) docker exec "$1" ctr -n k8s.io images ls -q | grep -qx "$2" ;;
        k3s) k3s ctr -n k8s.io images ls -q | grep -qx "$2" ;;
    esac
}
load_archive() { # archive
    case "$CLUSTER" in
        kind) kind load image-archive "$1" --name "$NAME" ;;
        k3s) k3s ctr -n k8s.io images import "$1" ;;
    esac
}
nodes() {
    case "$CLUSTER" in
        kind) kind get nodes --name "$NAME" ;;
        k3s) hostname ;;
    esac
}
load_image() { # archive image
    step "load $2 ($1)"
    load_archive "$1"
    local lacking=()
    for n in $(nodes); do has_image "$n" "$2" || lacking+=("$n"); done
    [ "${#lacking[@]}" -eq 0 ] && return 0
    printf 'e2e-kind: %s not named on %s after loading the OCI archive; converting to a docker-archive\n' "$2" "${lacking[*]}"
    command -v skopeo >/dev/null 2>&1 || die "skopeo not found (apt-get install skopeo) to convert $1"
    local docker_archive=${1%.oci.tar}.docker.tar
    rm -f "$docker_archive"
    skopeo copy "oci-archive:$1" "docker-archive:$docker_archive:$2"
    load_archive "$docker_archive"
    for n in $(nodes); do has_image "$n" "$2" || die "$2 still missing on node $n"; done
}
case "$CLUSTER" in
    kind|k3s)
        load_image "$AGENT_ARCHIVE" "$AGENT_IMAGE"
        load_image "$BOX_ARCHIVE" "$BOX_IMAGE"
        ;;
    existing)
        printf 'e2e-kind: --cluster existing: %s and %s must already be on every node (nothing is loaded)\n' "$AGENT_IMAGE" "$BOX_IMAGE"
        ;;
esac

# --- k3s: its containerd and CNI paths ------------------------------------------
SUITE_ENV=(NETFAULT_E2E_CLUSTER="$CLUSTER" NETFAULT_E2E_KIND_NAME="$NAME" NETFAULT_E2E_NETFAULTCTL="$NETFAULTCTL")
if [ "$CLUSTER" = k3s ]; then
    # k3s keeps containerd's socket in /run/k3s/containerd and the CNI dirs
    # under /var/lib/rancher/k3s; read them from the containerd config k3s
    # generated (bin_dir/bin_dirs and conf_dir of the CRI plugin).
    CFG=/var/lib/rancher/k3s/agent/etc/containerd/config.toml
    [ -f "$CFG" ] || die "$CFG not found: is k3s running on this host?"
    cni_bin=$(sed -n -E 's/^[[:space:]]*bin_dirs?[[:space:]]*=[[:space:]]*\[?[[:space:]]*"([^"]+)".*/\1/p' "$CFG" | head -n1)
    cni_conf=$(sed -n -E 's/^[[:space:]]*conf_dir[[:space:]]*=[[:space:]]*"([^"]+)".*/\1/p' "$CFG" | head -n1)
    [ -n "$cni_bin" ] && [ -n "$cni_conf" ] || die "no CNI bin_dir/conf_dir in $CFG"
    OVERLAY=$OUT/k3s-overlay
    mkdir -p "$OVERLAY"
    # kustomize wants a relative path to a base outside the overlay's dir.
    rel=$(realpath --relative-to="$OVERLAY" "$ROOT/daemonset")
    sed -e "s|@DAEMONSET@|$rel|" -e "s|@CNI_BIN@|$cni_bin|" -e "s|@CNI_CONF@|$cni_conf|" \
        e2e/kind/k3s/kustomization.yaml.in > "$OVERLAY/kustomization.yaml"
    step "k3s overlay: CNI bin $cni_bin, conf $cni_conf, containerd /run/k3s/containerd"
    kubectl kustomize "$OVERLAY" > /dev/null || die "kubectl kustomize $OVERLAY failed"
    SUITE_ENV+=(NETFAULT_E2E_KUSTOMIZE="$OVERLAY" NETFAULT_E2E_CNI_BIN_DIR="$cni_bin" NETFAULT_E2E_CNI_CONF_DIR="$cni_conf")
fi

# --- the suite ----------------------------------------------------------------
ARGS=()
[ -n "$FOCUS" ] && ARGS=(--focus "$FOCUS")
step "cargo test -p netfault-e2e-kind --test kind -- ${ARGS[*]:-}"
env "${SUITE_ENV[@]}" cargo test -p netfault-e2e-kind --test kind -- "${ARGS[@]}"
