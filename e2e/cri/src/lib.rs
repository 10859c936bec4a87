//! netfault's CRI test level: a real containerd and runc, driven over the
//! CRI v1 gRPC API exactly as a kubelet drives a node, with netfault
//! deployed from the DaemonSet manifest's own pod spec.
//!
//! # The node
//!
//! [`Node::start`] builds one node:
//! - **A node netns** (`/var/run/netns/nfcri…`, the testbed's [`testbed::Netns`]):
//!   containerd is spawned inside it (setns between fork and exec), so the
//!   bridge plugin's bridge, the routes and every `hostNetwork` pod live in
//!   it, never on the host.
//! - **A private dir** `/tmp/nfcri-UNIQUE` holding containerd's `root`,
//!   `state`, socket (`run-containerd/containerd.sock`), runc root, `opt`
//!   path, the CNI bin and conf dirs, host-local's data dir, the pod logs and
//!   volumes. The [`Layout`] is the node-layout map that translates the
//!   DaemonSet's hostPaths: `/run/netfault` → `run-netfault`,
//!   `/run/containerd` → `run-containerd`, `/opt/cni/bin` → `cni-bin`,
//!   `/etc/cni/net.d` → `cni-conf`; `/var/run/netns` and `/sys/fs/bpf` stay
//!   real (and are made shared mounts once, as on a systemd host:
//!   [`prepare_host`]).
//! - **containerd's config**: private root/state/socket,
//!   `restrict_oom_score_adj = true` (no CAP_SYS_RESOURCE here), runc with a
//!   private `Root`, the `opt` plugin's path, `sandbox_image` =
//!   [`BOX_IMAGE`], the CNI dirs. No seccomp or AppArmor default is forced:
//!   the harness sends seccomp `Unconfined` as a kubelet does without
//!   SeccompDefault, and containerd's AppArmor default applies only where
//!   AppArmor is enabled (not on these machines).
//! - **The pod conflist** `cni-conf/10-pods.conflist`: `bridge` (gateway
//!   198.18.N.1 in the node netns) + `host-local` in 198.18.N.0/24 (N random
//!   per node, [`Node::subnet`]); the reference plugins are copied from
//!   `/usr/lib/cni`. install-cni appends netfault to it.
//! - **A cgroup parent** `/nfcri…` for every pod ([`Node::cgroup_parent`]).
//! - **The box image** ([`BOX_IMAGE`], busybox-static, also the pause image)
//!   is imported at start; the agent image ([`AGENT_IMAGE`], built by
//!   `daemonset/build-image.sh --bin-dir target/<profile> --out …` from the
//!   workspace binaries, debug symbols stripped, cached per content in
//!   `target/<profile>/e2e-cri/`) when the DaemonSet is deployed.
//!
//! Dropping a [`Node`] stops and removes every sandbox through CRI, stops
//! containerd, kills leftover shims and whatever runs in the cgroup parent,
//! unmounts everything under the node dir (lazily), removes the cgroups,
//! the CNI result cache entries (`/var/lib/cni/results/<network>-*`), the
//! pods' netns files, the node netns and the dir. [`Node::footprint`] taken
//! before the drop lists what is left after it ([`Footprint::leftovers`]).
//! A test process killed before its drops run leaves its node behind; the
//! next test process sweeps it at its first [`Node::start`]
//! ([`sweep_stale_nodes`], keyed by the dead owner's pid in the dir name).
//!
//! # Driving it
//!
//! All calls are blocking (the node owns a small tokio runtime;
//! [`Node::block_on`] + [`Node::cri`] for any other CRI call):
//! - pods: [`Node::pod`] (name + annotations, namespace `default`),
//!   [`Node::run_sandbox`] ([`PodSpec`]), [`Node::sandbox_config`] /
//!   [`Node::run_sandbox_config`] for a hand-made config; a [`Sandbox`] has
//!   its id, netns path, IPs, log dir, and [`Sandbox::run`] runs a closure
//!   in its netns (sockets opened there stay there);
//! - containers: [`Node::busybox`] (a config running argv in the box
//!   image), [`Node::run_container`], [`Node::wait_exited`],
//!   [`Node::container_log`] (the CRI log file as plain text),
//!   [`Node::exec_sync`], [`Node::stop_container`] (grace 0 = SIGKILL);
//! - teardown of one pod: [`Node::stop_pod`] (as the kubelet: StopContainer
//!   with the grace period, then StopPodSandbox), [`Node::stop_sandbox`],
//!   [`Node::remove_sandbox`];
//! - the node netns: [`Node::nft`] runs `nft` in it; [`Node::pod_processes`]
//!   lists what runs in the node's cgroup parent, [`Node::container_pid`]
//!   a container's init pid;
//! - measurements: [`ping_replies`] (a busybox ping log: seq → RTT),
//!   [`TcpSink`] (a listener in a pod's netns) with [`tcp_connect_time`] /
//!   [`tcp_connect_median`] (handshakes from another pod's netns),
//!   [`HttpOk`] + [`http_status`] (HTTP status codes between pods),
//!   [`IcmpTap`] (the echo requests a pod receives, by sequence number).
//!
//! # The DaemonSet
//!
//! [`Node::deploy_daemonset`] renders `kubectl kustomize daemonset/`,
//! translates the DaemonSet's pod template ([`daemonset`] says what is
//! translated and how), imports the agent image, runs the pod sandbox and
//! its containers in order, and waits until the readiness probe (ExecSync
//! of the manifest's own command) passes, the socket answers `/healthz`, and
//! the conflist ends with netfault. The [`AgentPod`] has the container ids,
//! the host-side socket ([`AgentPod::client`], [`AgentPod::post_fault`], …)
//! and the plan; [`Node::probe`], [`Node::agent_log`], [`Node::stop_agent`]
//! act on it; [`Node::restart_container`] restarts a dead container as the
//! kubelet does. [`Node::daemonset_plan`] + [`Node::start_plan`] split the
//! deployment for tests that change the plan or start the agent later.
//!
//! install-cni's `--socket` is the one argument translated through the
//! layout: it is written into the conflist for the CNI plugin, which the
//! runtime runs on the host, so it names a host path, not a path in the
//! install-cni container.
//!
//! Tests are `#[test]`s in `tests/`, each with its own node (they run in
//! parallel); run one with `scripts/e2e-cri.sh FOCUS`. As non-root every
//! scenario returns early with `skipped: requires root`.

mod agent_pod;
mod checks;
pub mod daemonset;
mod error;
mod images;
mod measure;
mod node;

pub use agent_pod::{AgentPod, Probe, AGENT_CONTAINER, INSTALL_CNI_CONTAINER};
pub use checks::{
    bpffs_netfault, cgroup_dirs, cni_cache_entries, holder_engines, mount_of, mounts_under,
    node_cni_cache, processes, shim_socket, Footprint, CNI_CACHE_DIR,
};
pub use error::{Error, Result};
pub use images::{
    agent_image, box_image, cache_dir, repo_root, AGENT_BINARIES, AGENT_IMAGE, BOX_IMAGE, BUSYBOX,
};
pub use measure::{
    http_status, ping_replies, tcp_connect_median, tcp_connect_time, HttpOk, IcmpTap, PodServer,
    TcpSink,
};
pub use netfault_cri::api;
pub use node::{
    parse_cri_log, prepare_host, random_uuid, sweep_stale_nodes, ExecResult, Layout, Node, PodSpec,
    Sandbox, CRI_TIMEOUT, DEFAULT_MASKED_PATHS, DEFAULT_READONLY_PATHS, SHARED_HOST_PATHS,
};
