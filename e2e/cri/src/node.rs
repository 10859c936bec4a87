//! A node: a private containerd + runc started inside a network namespace
//! the test created, with its own root, state, socket, CNI dirs and cgroup
//! parent, driven over CRI v1 as a kubelet does.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::future::Future;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use netfault_cri::api;
use netfault_cri::Cri;
use testbed::{Netns, TempDir};

use crate::error::{run, Error, IoContext, Result};
use crate::images::{self, BOX_IMAGE};

/// How long one CRI call may take (image import and container start on a
/// loaded 2-core machine included).
pub const CRI_TIMEOUT: Duration = Duration::from_secs(60);

/// The node-layout map: where this node keeps what a real node keeps at
/// fixed host paths. [`Layout::host_path`] translates a manifest's hostPath
/// (or a host path named in an argument) into the test's private dir;
/// paths outside the map (`/var/run/netns`, `/sys/fs/bpf`, ...) stay real.
///
/// | node path          | this node                         |
/// |--------------------|-----------------------------------|
/// | `/run/netfault`    | `DIR/run-netfault`                |
/// | `/run/containerd`  | `DIR/run-containerd` (holds `containerd.sock`) |
/// | `/opt/cni/bin`     | `DIR/cni-bin`                     |
/// | `/etc/cni/net.d`   | `DIR/cni-conf`                    |
#[derive(Debug, Clone)]
pub struct Layout {
    /// The node's private dir (`/tmp/nfcri-UNIQUE`).
    pub dir: PathBuf,
    pub run_netfault: PathBuf,
    pub run_containerd: PathBuf,
    pub cni_bin: PathBuf,
    pub cni_conf: PathBuf,
    /// containerd's `root`, `state`, the runc root and the `opt` plugin's path.
    pub containerd_root: PathBuf,
    pub containerd_state: PathBuf,
    pub runc_root: PathBuf,
    pub opt: PathBuf,
    /// Pod log dirs (`<ns>_<name>_<uid>/<container>/0.log`) and emptyDir volumes.
    pub pods: PathBuf,
    /// host-local IPAM's data dir.
    pub ipam: PathBuf,
}

impl Layout {
    /// The layout of a node whose private dir is `dir` (creates nothing).
    pub fn new(dir: &Path) -> Layout {
        Layout {
            dir: dir.to_path_buf(),
            run_netfault: dir.join("run-netfault"),
            run_containerd: dir.join("run-containerd"),
            cni_bin: dir.join("cni-bin"),
            cni_conf: dir.join("cni-conf"),
            containerd_root: dir.join("containerd-root"),
            containerd_state: dir.join("containerd-state"),
            runc_root: dir.join("runc"),
            opt: dir.join("opt"),
            pods: dir.join("pods"),
            ipam: dir.join("ipam"),
        }
    }

    /// The node paths this layout redirects, with their private dirs.
    pub fn map(&self) -> [(&'static str, &Path); 4] {
        [
            ("/run/netfault", &self.run_netfault),
            ("/run/containerd", &self.run_containerd),
            ("/opt/cni/bin", &self.cni_bin),
            ("/etc/cni/net.d", &self.cni_conf),
        ]
    }

    /// Translates a node path: the longest mapped prefix (whole components)
    /// is replaced; other paths are returned unchanged.
    pub fn host_path(&self, node_path: &str) -> PathBuf {
        let p = Path::new(node_path);
        for (from, to) in self.map() {
            if let Ok(rest) = p.strip_prefix(from) {
                return if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                };
            }
        }
        p.to_path_buf()
    }

    /// containerd's CRI socket (`/run/containerd/containerd.sock` on a node).
    pub fn containerd_socket(&self) -> PathBuf {
        self.run_containerd.join("containerd.sock")
    }
}

/// What to start a pod with ([`Node::run_sandbox`]).
#[derive(Debug, Clone, Default)]
pub struct PodSpec {
    pub name: String,
    /// `default` when empty.
    pub namespace: String,
    pub annotations: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    /// hostNetwork: the sandbox shares the node netns (no CNI).
    pub host_network: bool,
}

impl PodSpec {
    /// A pod in `default` with these annotations.
    pub fn new(name: &str) -> PodSpec {
        PodSpec {
            name: name.to_string(),
            ..PodSpec::default()
        }
    }

    pub fn annotation(mut self, key: &str, value: &str) -> PodSpec {
        self.annotations.insert(key.to_string(), value.to_string());
        self
    }
}

/// A started pod sandbox.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// The config it was started with (CreateContainer needs it again).
    pub config: api::PodSandboxConfig,
    /// `/var/run/netns/cni-...`; `None` for hostNetwork.
    pub netns: Option<PathBuf>,
    /// The pod IPs CNI gave it (empty for hostNetwork).
    pub ips: Vec<IpAddr>,
    /// The pod's log dir (containers log to `<name>/0.log` in it).
    pub log_dir: PathBuf,
}

impl Sandbox {
    /// The primary pod IP.
    pub fn ip(&self) -> Result<IpAddr> {
        self.ips
            .first()
            .copied()
            .ok_or_else(|| Error::Other(format!("sandbox {} has no IP", self.name)))
    }

    /// Runs `f` on a thread inside the pod's netns (sockets opened there
    /// stay there).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let ns = self
            .netns
            .as_ref()
            .ok_or_else(|| Error::Other(format!("sandbox {} has no own netns", self.name)))?;
        Ok(testbed::in_netns(ns, f)?)
    }
}

/// The result of ExecSync.
#[derive(Debug, Clone)]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// One test node (see the crate doc). Dropping it tears everything down.
pub struct Node {
    name: String,
    network: String,
    subnet: u8,
    layout: Layout,
    cgroup_parent: String,
    rt: tokio::runtime::Runtime,
    cri: Cri,
    containerd: Mutex<Option<Child>>,
    /// Netns paths of the sandboxes started here (removed if containerd left them).
    netns_paths: Mutex<Vec<PathBuf>>,
    /// Ids of the sandboxes started here (CNI cache entries, shim sockets).
    sandbox_ids: Mutex<Vec<String>>,
    /// tmpfs mounts made for emptyDir volumes.
    pub(crate) tmpfs: Mutex<Vec<PathBuf>>,
    netns: Netns,
    // Last: removed after everything else is unmounted.
    _dir: TempDir,
}

/// The reference CNI plugins a node's bin dir gets (from `/usr/lib/cni`).
const REFERENCE_PLUGINS: &[&str] = &["bridge", "host-local", "loopback", "portmap"];
const REFERENCE_DIR: &str = "/usr/lib/cni";

/// Host paths the DaemonSet mounts with `mountPropagation:
/// HostToContainer` and that stay real (not redirected by the layout).
pub const SHARED_HOST_PATHS: &[&str] = &["/var/run/netns", "/sys/fs/bpf"];

/// Makes [`SHARED_HOST_PATHS`] shared mounts, as they are on a systemd
/// host (systemd makes every mount shared) and as `ip netns add` leaves
/// `/var/run/netns` (a recursive bind of itself, made shared). containerd
/// refuses `HostToContainer` from a private mount ("is not a shared or
/// slave mount"), and this machine's mounts are all private. Idempotent: a
/// path already on a shared or slave mount is left alone.
pub fn prepare_host() -> Result<()> {
    use nix::mount::{mount, MsFlags};
    for p in SHARED_HOST_PATHS {
        std::fs::create_dir_all(p).ctx(|| format!("creating {p}"))?;
        let path = std::fs::canonicalize(p).ctx(|| format!("resolving {p}"))?;
        let Some((mount_point, shared)) = crate::checks::mount_of(&path) else {
            return Err(Error::Other(format!("no mount holds {}", path.display())));
        };
        if shared {
            continue;
        }
        if mount_point != path {
            // Not a mount point of its own: bind it onto itself (recursive,
            // so the netns files already bound inside stay visible).
            mount(
                Some(&path),
                &path,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .ctx(|| format!("bind-mounting {} onto itself", path.display()))?;
        }
        mount(
            None::<&str>,
            &path,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
        .ctx(|| format!("making {} a shared mount", path.display()))?;
    }
    Ok(())
}

static HOST_PREPARED: Mutex<bool> = Mutex::new(false);

/// The node dirs' prefix under the temp dir (`/tmp/nfcri-<unique>`).
const DIR_PREFIX: &str = "nfcri";
/// In a node dir: the node's name, network, cgroup parent and netns.
const NODE_RECORD: &str = "node.json";
/// In a node dir: one `<sandbox id> <netns path or ->` line per sandbox.
const SANDBOX_RECORD: &str = "sandboxes";

/// Removes the nodes of test processes that died before their drops ran
/// (killed, or a timeout): for each `/tmp/nfcri-*` dir whose owner pid (in
/// its name, [`testbed::unique_name`]) is gone, kills the processes that
/// name the dir (containerd, shims) and what runs in its cgroup parent,
/// unmounts and removes the dir, its cgroups, CNI cache entries, shim
/// sockets and netns files. Nodes of live processes are never touched.
/// Runs once per process, at the first [`Node::start`]. Returns how many
/// nodes it removed.
pub fn sweep_stale_nodes() -> usize {
    let tmp = std::env::temp_dir();
    let Ok(rd) = std::fs::read_dir(&tmp) else {
        return 0;
    };
    let mut swept = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(unique) = name.strip_prefix(&format!("{DIR_PREFIX}-")) else {
            continue;
        };
        let Some(pid) = unique
            .get(..5)
            .and_then(|p| u32::from_str_radix(p, 36).ok())
        else {
            continue;
        };
        if pid == 0 || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = e.path();
        // Only node dirs: the record is written before containerd starts,
        // so a dir without one holds no process of a node (and may be
        // another test's dir that happens to share the prefix).
        if !dir.join(NODE_RECORD).exists() {
            continue;
        }
        let needle = dir.to_string_lossy().into_owned();
        for (p, cmd) in crate::checks::processes() {
            if cmd.contains(&needle) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let record: serde_json::Value = std::fs::read(dir.join(NODE_RECORD))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let sandboxes = std::fs::read_to_string(dir.join(SANDBOX_RECORD)).unwrap_or_default();
        let mut ids = Vec::new();
        let mut netns: Vec<PathBuf> = record["netns"]
            .as_str()
            .map(PathBuf::from)
            .into_iter()
            .collect();
        for line in sandboxes.lines() {
            let mut parts = line.split(' ');
            if let Some(id) = parts.next() {
                ids.push(id.to_string());
            }
            if let Some(ns) = parts.next().filter(|n| n.starts_with('/')) {
                netns.push(PathBuf::from(ns));
            }
        }
        if let Some(parent) = record["cgroup_parent"].as_str() {
            crate::checks::remove_cgroup_parent(parent);
        }
        unmount_under(&dir);
        if let Some(network) = record["network"].as_str() {
            crate::checks::remove_cni_cache(network, &ids);
        }
        let socket = Layout::new(&dir).containerd_socket();
        for id in &ids {
            if let Some(s) = crate::checks::shim_socket(&socket, id) {
                let _ = std::fs::remove_file(s);
            }
        }
        for ns in netns.iter().filter(|n| n.starts_with(testbed_netns_dir())) {
            let _ = nix::mount::umount2(ns, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_file(ns);
        }
        if std::fs::remove_dir_all(&dir).is_ok() {
            swept += 1;
        }
    }
    swept
}

fn testbed_netns_dir() -> &'static Path {
    Path::new("/var/run/netns")
}

impl Node {
    /// Creates the node netns and dirs, writes the pod conflist (`bridge` +
    /// `host-local` in 198.18.N.0/24), starts containerd inside the netns and
    /// imports the box image (also the sandbox image).
    pub fn start() -> Result<Node> {
        {
            let mut done = HOST_PREPARED.lock().unwrap_or_else(|p| p.into_inner());
            if !*done {
                prepare_host()?;
                let swept = sweep_stale_nodes();
                if swept > 0 {
                    eprintln!("e2e-cri: swept {swept} node(s) left by dead test processes");
                }
                *done = true;
            }
        }
        let name = testbed::unique_name("nfcri");
        let dir = TempDir::new(DIR_PREFIX)?;
        let layout = Layout::new(dir.path());
        for d in [
            &layout.run_netfault,
            &layout.run_containerd,
            &layout.cni_bin,
            &layout.cni_conf,
            &layout.containerd_root,
            &layout.containerd_state,
            &layout.runc_root,
            &layout.opt,
            &layout.pods,
            &layout.ipam,
        ] {
            std::fs::create_dir_all(d).ctx(|| format!("creating {}", d.display()))?;
        }
        for p in REFERENCE_PLUGINS {
            let src = Path::new(REFERENCE_DIR).join(p);
            if !src.exists() {
                return Err(Error::Other(format!(
                    "{} missing: install containernetworking-plugins (scripts/setup.sh does)",
                    src.display()
                )));
            }
            std::fs::copy(&src, layout.cni_bin.join(p))
                .ctx(|| format!("copying {}", src.display()))?;
        }
        let netns = Netns::create(&name)?;
        // For sweep_stale_nodes, should this process die before its drops run.
        let record = serde_json::json!({
            "name": name,
            "network": format!("nfcri-{name}"),
            "cgroup_parent": format!("/{name}"),
            "netns": netns.path(),
        });
        std::fs::write(layout.dir.join(NODE_RECORD), record.to_string())
            .ctx(|| "writing the node record".into())?;
        let subnet = 1 + (rand::random::<u8>() % 250);
        let network = format!("nfcri-{name}");
        let bridge = testbed::unique_name("nfcbr");
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": network,
            "plugins": [{
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": format!("198.18.{subnet}.0/24")}]],
                    "dataDir": layout.ipam,
                }
            }]
        });
        let conf = layout.cni_conf.join("10-pods.conflist");
        std::fs::write(
            &conf,
            serde_json::to_vec_pretty(&conflist).unwrap_or_default(),
        )
        .ctx(|| format!("writing {}", conf.display()))?;
        let config = layout.dir.join("containerd.toml");
        std::fs::write(&config, containerd_config(&layout))
            .ctx(|| format!("writing {}", config.display()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .ctx(|| "tokio runtime".into())?;
        let child = spawn_in_netns(
            Command::new("containerd").arg("--config").arg(&config),
            netns.path(),
            &layout.dir.join("containerd.log"),
        )?;
        let containerd = Mutex::new(Some(child));
        let cri = match rt.block_on(connect(&layout.containerd_socket(), &containerd)) {
            Ok(c) => c,
            Err(e) => {
                let log =
                    std::fs::read_to_string(layout.dir.join("containerd.log")).unwrap_or_default();
                if let Some(mut c) = containerd.lock().ok().and_then(|mut c| c.take()) {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                unmount_under(&layout.dir);
                return Err(Error::Other(format!(
                    "containerd did not come up: {e}\ncontainerd.log:\n{}",
                    tail(&log, 40)
                )));
            }
        };
        let node = Node {
            cgroup_parent: format!("/{name}"),
            name,
            network,
            subnet,
            layout,
            rt,
            cri,
            containerd,
            netns_paths: Mutex::new(Vec::new()),
            sandbox_ids: Mutex::new(Vec::new()),
            tmpfs: Mutex::new(Vec::new()),
            netns,
            _dir: dir,
        };
        node.import_image(&images::box_image()?, BOX_IMAGE)?;
        Ok(node)
    }

    /// The node's name (what `NODE_NAME` is set to).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The CNI network name of the pod conflist (also the prefix of the
    /// CNI result cache entries).
    pub fn network(&self) -> &str {
        &self.network
    }

    /// The pods' subnet, 198.18.N.0/24: this is N. The node netns holds .1.
    pub fn subnet(&self) -> u8 {
        self.subnet
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The node netns (containerd, the bridge and hostNetwork pods live in it).
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The cgroup parent every pod of this node gets (`/NAME`).
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    /// The pod conflist (the node's only one: `10-pods.conflist`).
    pub fn conflist_path(&self) -> PathBuf {
        self.layout.cni_conf.join("10-pods.conflist")
    }

    /// A clone of the CRI client (use it inside [`Node::block_on`]).
    pub fn cri(&self) -> Cri {
        self.cri.clone()
    }

    /// Runs a future on the node's runtime (for direct CRI calls).
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Imports an OCI archive into containerd's `k8s.io` namespace with
    /// `ctr`, and waits until the CRI image service lists `name`.
    pub fn import_image(&self, archive: &Path, name: &str) -> Result<()> {
        run(Command::new("ctr")
            .arg("--address")
            .arg(self.layout.containerd_socket())
            .args(["-n", "k8s.io", "images", "import"])
            .arg(archive))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut cri = self.cri();
            let st = self.block_on(async {
                cri.image
                    .image_status(api::ImageStatusRequest {
                        image: Some(api::ImageSpec {
                            image: name.to_string(),
                            ..Default::default()
                        }),
                        verbose: false,
                    })
                    .await
            });
            if let Ok(r) = st {
                if r.into_inner().image.is_some() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: format!("image {name} to be listed by CRI after the import"),
                    seconds: 10.0,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The sandbox config a kubelet would send for `spec` (cgroup parent,
    /// log dir, kubelet's labels, pod namespaces).
    pub fn sandbox_config(&self, spec: &PodSpec) -> api::PodSandboxConfig {
        let namespace = if spec.namespace.is_empty() {
            "default".to_string()
        } else {
            spec.namespace.clone()
        };
        let uid = random_uuid();
        let mut labels: HashMap<String, String> = spec.labels.clone().into_iter().collect();
        labels.insert("io.kubernetes.pod.name".into(), spec.name.clone());
        labels.insert("io.kubernetes.pod.namespace".into(), namespace.clone());
        labels.insert("io.kubernetes.pod.uid".into(), uid.clone());
        let log_dir = self
            .layout
            .pods
            .join(format!("{namespace}_{}_{uid}", spec.name));
        let mode = |host: bool, pod: api::NamespaceMode| {
            if host {
                api::NamespaceMode::Node as i32
            } else {
                pod as i32
            }
        };
        api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: spec.name.clone(),
                uid,
                namespace,
                attempt: 0,
            }),
            hostname: if spec.host_network {
                String::new()
            } else {
                spec.name.clone()
            },
            log_directory: log_dir.to_string_lossy().into_owned(),
            labels,
            annotations: spec.annotations.clone().into_iter().collect(),
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                security_context: Some(api::LinuxSandboxSecurityContext {
                    namespace_options: Some(api::NamespaceOption {
                        network: mode(spec.host_network, api::NamespaceMode::Pod),
                        pid: api::NamespaceMode::Container as i32,
                        ipc: api::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    seccomp: Some(unconfined()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// RunPodSandbox with [`Node::sandbox_config`] of `spec`.
    pub fn run_sandbox(&self, spec: &PodSpec) -> Result<Sandbox> {
        self.run_sandbox_config(self.sandbox_config(spec))
    }

    /// A pod in `default` named `name` with these annotations.
    pub fn pod(&self, name: &str, annotations: &[(&str, &str)]) -> Result<Sandbox> {
        let mut spec = PodSpec::new(name);
        for (k, v) in annotations {
            spec = spec.annotation(k, v);
        }
        self.run_sandbox(&spec)
    }

    /// RunPodSandbox with a ready-made config; reads the netns and IPs back
    /// from PodSandboxStatus.
    pub fn run_sandbox_config(&self, config: api::PodSandboxConfig) -> Result<Sandbox> {
        let log_dir = PathBuf::from(&config.log_directory);
        std::fs::create_dir_all(&log_dir).ctx(|| format!("creating {}", log_dir.display()))?;
        let meta = config.metadata.clone().unwrap_or_default();
        let mut cri = self.cri();
        let cfg = config.clone();
        let id = self.block_on(async move {
            cri.runtime
                .run_pod_sandbox(api::RunPodSandboxRequest {
                    config: Some(cfg),
                    runtime_handler: String::new(),
                })
                .await
                .map(|r| r.into_inner().pod_sandbox_id)
                .map_err(netfault_cri::CriError::call("RunPodSandbox"))
        })?;
        if let Ok(mut v) = self.sandbox_ids.lock() {
            v.push(id.clone());
        }
        let mut cri = self.cri();
        let (status, info) = self.block_on(cri.sandbox_status(&id))?;
        let netns = netfault_cri::netns_path(&info);
        {
            use std::io::Write;
            let line = format!(
                "{id} {}\n",
                netns.as_deref().unwrap_or(Path::new("-")).display()
            );
            let path = self.layout.dir.join(SANDBOX_RECORD);
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut f| f.write_all(line.as_bytes()))
                .ctx(|| format!("appending to {}", path.display()))?;
        }
        if let (Some(ns), Ok(mut v)) = (&netns, self.netns_paths.lock()) {
            v.push(ns.clone());
        }
        Ok(Sandbox {
            id,
            name: meta.name,
            namespace: meta.namespace,
            uid: meta.uid,
            config,
            netns,
            ips: netfault_cri::sandbox_ips(&status),
            log_dir,
        })
    }

    /// A container config for the box image running `argv` (logging to
    /// `<name>/0.log` in the pod's log dir).
    pub fn busybox(&self, name: &str, argv: &[&str]) -> api::ContainerConfig {
        api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: name.to_string(),
                attempt: 0,
            }),
            image: Some(api::ImageSpec {
                image: BOX_IMAGE.to_string(),
                ..Default::default()
            }),
            command: argv.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}/0.log"),
            linux: Some(api::LinuxContainerConfig {
                security_context: Some(api::LinuxContainerSecurityContext {
                    seccomp: Some(unconfined()),
                    masked_paths: DEFAULT_MASKED_PATHS.iter().map(|s| s.to_string()).collect(),
                    readonly_paths: DEFAULT_READONLY_PATHS
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
                    namespace_options: Some(api::NamespaceOption {
                        network: api::NamespaceMode::Pod as i32,
                        pid: api::NamespaceMode::Container as i32,
                        ipc: api::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// CreateContainer + StartContainer in `sandbox`: the container id.
    pub fn run_container(&self, sandbox: &Sandbox, config: api::ContainerConfig) -> Result<String> {
        if let Some(dir) = Path::new(&config.log_path).parent() {
            let d = sandbox.log_dir.join(dir);
            std::fs::create_dir_all(&d).ctx(|| format!("creating {}", d.display()))?;
        }
        let mut cri = self.cri();
        let sandbox_id = sandbox.id.clone();
        let sandbox_config = sandbox.config.clone();
        self.block_on(async move {
            let id = cri
                .runtime
                .create_container(api::CreateContainerRequest {
                    pod_sandbox_id: sandbox_id,
                    config: Some(config),
                    sandbox_config: Some(sandbox_config),
                })
                .await
                .map_err(netfault_cri::CriError::call("CreateContainer"))?
                .into_inner()
                .container_id;
            cri.runtime
                .start_container(api::StartContainerRequest {
                    container_id: id.clone(),
                })
                .await
                .map_err(netfault_cri::CriError::call("StartContainer"))?;
            Ok(id)
        })
    }

    /// ExecSync: runs `cmd` in the container, as a kubelet's exec probe does.
    pub fn exec_sync(
        &self,
        container: &str,
        cmd: &[String],
        timeout: Duration,
    ) -> Result<ExecResult> {
        let mut cri = self.cri();
        let r = self
            .block_on(cri.runtime.exec_sync(api::ExecSyncRequest {
                container_id: container.to_string(),
                cmd: cmd.to_vec(),
                timeout: timeout.as_secs() as i64,
            }))
            .map_err(netfault_cri::CriError::call("ExecSync"))?
            .into_inner();
        Ok(ExecResult {
            exit_code: r.exit_code,
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        })
    }

    /// StopContainer with a grace period (0: SIGKILL at once).
    pub fn stop_container(&self, container: &str, grace: Duration) -> Result<()> {
        let mut cri = self.cri();
        self.block_on(cri.runtime.stop_container(api::StopContainerRequest {
            container_id: container.to_string(),
            timeout: grace.as_secs() as i64,
        }))
        .map_err(netfault_cri::CriError::call("StopContainer"))?;
        Ok(())
    }

    /// `ContainerStatus` (not verbose).
    fn container_status(&self, container: &str) -> Result<api::ContainerStatus> {
        let mut cri = self.cri();
        Ok(self
            .block_on(cri.runtime.container_status(api::ContainerStatusRequest {
                container_id: container.to_string(),
                verbose: false,
            }))
            .map_err(netfault_cri::CriError::call("ContainerStatus"))?
            .into_inner()
            .status
            .unwrap_or_default())
    }

    /// The container's state (`ContainerStatus`).
    pub fn container_state(&self, container: &str) -> Result<api::ContainerState> {
        let st = self.container_status(container)?;
        Ok(
            api::ContainerState::try_from(st.state)
                .unwrap_or(api::ContainerState::ContainerUnknown),
        )
    }

    /// Waits until the container has exited; returns its exit code.
    pub fn wait_exited(&self, container: &str, timeout: Duration) -> Result<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.container_status(container)?;
            if st.state == api::ContainerState::ContainerExited as i32 {
                return Ok(st.exit_code);
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: format!("container {container} to exit"),
                    seconds: timeout.as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// StopPodSandbox (CNI DEL, the sandbox's containers killed).
    pub fn stop_sandbox(&self, id: &str) -> Result<()> {
        let mut cri = self.cri();
        self.block_on(cri.runtime.stop_pod_sandbox(api::StopPodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        }))
        .map_err(netfault_cri::CriError::call("StopPodSandbox"))?;
        Ok(())
    }

    /// RemovePodSandbox (removes its containers and its netns).
    pub fn remove_sandbox(&self, id: &str) -> Result<()> {
        let mut cri = self.cri();
        self.block_on(
            cri.runtime
                .remove_pod_sandbox(api::RemovePodSandboxRequest {
                    pod_sandbox_id: id.to_string(),
                }),
        )
        .map_err(netfault_cri::CriError::call("RemovePodSandbox"))?;
        Ok(())
    }

    /// Stops a pod as a kubelet deletes one: StopContainer with the grace
    /// period for all its containers at once (SIGTERM, SIGKILL after the
    /// grace), then StopPodSandbox.
    pub fn stop_pod(&self, sandbox: &Sandbox, grace: Duration) -> Result<()> {
        let mut cri = self.cri();
        let id = sandbox.id.clone();
        let containers = self
            .block_on(cri.runtime.list_containers(api::ListContainersRequest {
                filter: Some(api::ContainerFilter {
                    pod_sandbox_id: id.clone(),
                    ..Default::default()
                }),
            }))
            .map_err(netfault_cri::CriError::call("ListContainers"))?
            .into_inner()
            .containers;
        // All at once, as the kubelet does: each waits out its own grace.
        let stops: Vec<_> = containers
            .into_iter()
            .map(|c| {
                let mut cri = self.cri();
                self.rt.spawn(async move {
                    cri.runtime
                        .stop_container(api::StopContainerRequest {
                            container_id: c.id,
                            timeout: grace.as_secs() as i64,
                        })
                        .await
                        .map_err(netfault_cri::CriError::call("StopContainer"))
                })
            })
            .collect();
        for s in stops {
            self.block_on(s)
                .map_err(|e| Error::Other(format!("StopContainer task: {e}")))??;
        }
        self.stop_sandbox(&id)
    }

    /// A container's log as the text it wrote (the CRI log format's
    /// timestamps, streams and partial-line tags removed).
    /// The log of the container's latest attempt (`<name>/<attempt>.log`,
    /// as the kubelet names them) is read.
    pub fn container_log(&self, sandbox: &Sandbox, container: &str) -> Result<String> {
        let dir = sandbox.log_dir.join(container);
        let latest = std::fs::read_dir(&dir)
            .ctx(|| format!("reading {}", dir.display()))?
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.strip_suffix(".log")?.parse::<u32>().ok()
            })
            .max()
            .unwrap_or(0);
        let path = dir.join(format!("{latest}.log"));
        let raw = std::fs::read_to_string(&path).ctx(|| format!("reading {}", path.display()))?;
        Ok(parse_cri_log(&raw))
    }

    /// All pod sandboxes containerd knows (any state).
    pub fn sandboxes(&self) -> Result<Vec<api::PodSandbox>> {
        let mut cri = self.cri();
        Ok(self
            .block_on(
                cri.runtime
                    .list_pod_sandbox(api::ListPodSandboxRequest { filter: None }),
            )
            .map_err(netfault_cri::CriError::call("ListPodSandbox"))?
            .into_inner()
            .items)
    }

    /// What of this node lives outside its dir, for the check after drop
    /// ([`crate::Footprint::leftovers`]).
    pub fn footprint(&self) -> crate::Footprint {
        crate::Footprint {
            dir: self.layout.dir.clone(),
            node_netns: self.netns.path().to_path_buf(),
            pod_netns: self
                .netns_paths
                .lock()
                .map(|v| v.clone())
                .unwrap_or_default(),
            network: self.network.clone(),
            sandbox_ids: self
                .sandbox_ids
                .lock()
                .map(|v| v.clone())
                .unwrap_or_default(),
            cgroup_parent: self.cgroup_parent.clone(),
            containerd_socket: self.layout.containerd_socket(),
        }
    }

    /// The host pid of a running container's init process (from the
    /// verbose ContainerStatus).
    pub fn container_pid(&self, container: &str) -> Result<u32> {
        let mut cri = self.cri();
        let r = self
            .block_on(cri.runtime.container_status(api::ContainerStatusRequest {
                container_id: container.to_string(),
                verbose: true,
            }))
            .map_err(netfault_cri::CriError::call("ContainerStatus"))?
            .into_inner();
        r.info
            .get("info")
            .and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok())
            .and_then(|v| v["pid"].as_u64())
            .filter(|p| *p > 0)
            .map(|p| p as u32)
            .ok_or_else(|| Error::Other(format!("container {container} has no pid (not running?)")))
    }

    /// The processes in this node's cgroup parent (pod containers and
    /// what they started, such as the agent's delay holders): (pid, command line).
    pub fn pod_processes(&self) -> Vec<(u32, String)> {
        let needle = format!(":{}/", self.cgroup_parent);
        crate::checks::processes()
            .into_iter()
            .filter(|(pid, _)| {
                std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                    .is_ok_and(|c| c.lines().any(|l| l.contains(&needle)))
            })
            .collect()
    }

    /// containerd's pid (for the leftovers check).
    pub fn containerd_pid(&self) -> Option<u32> {
        self.containerd
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(Child::id))
    }

    /// Runs `nft` with `args` inside the node netns; its stdout.
    pub fn nft(&self, args: &[&str]) -> Result<String> {
        let file = File::open(self.netns.path())
            .ctx(|| format!("opening {}", self.netns.path().display()))?;
        let fd = file.as_raw_fd();
        let mut cmd = Command::new("nft");
        cmd.args(args);
        // SAFETY: only setns, async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = run(&mut cmd);
        drop(file);
        out
    }

    /// The teardown (also run by Drop): every sandbox stopped and removed
    /// through CRI, containerd stopped, leftover shims and container
    /// processes killed, mounts under the node dir unmounted, the cgroup
    /// parent, CNI cache entries and netns files removed.
    fn teardown(&mut self) {
        // 1. Through CRI, as a kubelet would on node drain.
        if let Ok(list) = self.sandboxes() {
            for s in list {
                let _ = self.stop_sandbox(&s.id);
                if let Err(e) = self.remove_sandbox(&s.id) {
                    eprintln!("e2e-cri: RemovePodSandbox {}: {e}", s.id);
                }
            }
        }
        // 2. containerd: SIGTERM, then SIGKILL.
        let socket = self.layout.containerd_socket();
        if let Some(mut child) = self.containerd.lock().ok().and_then(|mut c| c.take()) {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        // 3. Shims still running for this containerd, and what runs in the
        // cgroup parent.
        for pid in crate::checks::shim_pids(&socket) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        crate::checks::remove_cgroup_parent(&self.cgroup_parent);
        // 4. Mounts (overlay rootfs, shm, tmpfs emptyDirs) under the node dir.
        unmount_under(&self.layout.dir);
        // 5. CNI result cache entries (the pod network's and containerd's own
        // `cni-loopback`), shim sockets in /run/containerd/s, netns files.
        let ids = self
            .sandbox_ids
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        crate::checks::remove_cni_cache(&self.network, &ids);
        for id in &ids {
            if let Some(s) = crate::checks::shim_socket(&socket, id) {
                let _ = std::fs::remove_file(s);
            }
        }
        if let Ok(paths) = self.netns_paths.lock() {
            for p in paths.iter() {
                if p.exists() {
                    let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// kubelet's default masked paths for an unprivileged container.
pub const DEFAULT_MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
/// kubelet's default read-only paths for an unprivileged container.
pub const DEFAULT_READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The seccomp profile a kubelet sends when the pod names none (and the
/// kubelet's SeccompDefault is off): Unconfined.
pub(crate) fn unconfined() -> api::SecurityProfile {
    api::SecurityProfile {
        profile_type: api::security_profile::ProfileType::Unconfined as i32,
        localhost_ref: String::new(),
    }
}

fn containerd_config(l: &Layout) -> String {
    let sock = l.containerd_socket();
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
"#,
        root = l.containerd_root.display(),
        state = l.containerd_state.display(),
        sock = sock.display(),
        opt = l.opt.display(),
        sandbox = BOX_IMAGE,
        runc = l.runc_root.display(),
        bin = l.cni_bin.display(),
        conf = l.cni_conf.display(),
    )
}

/// Spawns `cmd` with its network namespace set to `netns` (setns between
/// fork and exec), output to `log`.
fn spawn_in_netns(cmd: &mut Command, netns: &Path, log: &Path) -> Result<Child> {
    let file = File::open(netns).ctx(|| format!("opening {}", netns.display()))?;
    let out = File::create(log).ctx(|| format!("creating {}", log.display()))?;
    let err = out.try_clone().ctx(|| "dup log".into())?;
    let fd = file.as_raw_fd();
    cmd.stdin(Stdio::null()).stdout(out).stderr(err).env(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    // SAFETY: only setns, async-signal-safe, between fork and exec; `file`
    // outlives the spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().ctx(|| format!("spawning {cmd:?}"))?;
    drop(file);
    Ok(child)
}

/// Connects to a starting containerd: retries until `Version` answers.
async fn connect(socket: &Path, child: &Mutex<Option<Child>>) -> Result<Cri> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if socket.exists() {
            if let Ok(mut cri) = Cri::connect(socket, CRI_TIMEOUT).await {
                if cri.version().await.is_ok() {
                    return Ok(cri);
                }
            }
        }
        if let Ok(mut c) = child.lock() {
            if let Some(Ok(Some(status))) = c.as_mut().map(Child::try_wait) {
                return Err(Error::Other(format!("containerd exited: {status}")));
            }
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                what: format!("containerd's CRI on {}", socket.display()),
                seconds: 20.0,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Lazily unmounts every mount point at or below `dir`, deepest first.
pub(crate) fn unmount_under(dir: &Path) {
    for m in crate::checks::mounts_under(dir).into_iter().rev() {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The text of a CRI-format log (`TIMESTAMP STREAM P|F MESSAGE` lines).
pub fn parse_cri_log(raw: &str) -> String {
    let mut out = String::new();
    for line in raw.lines() {
        let mut parts = line.splitn(4, ' ');
        let (_ts, _stream, tag) = (parts.next(), parts.next(), parts.next());
        let msg = parts.next().unwrap_or_default();
        out.push_str(msg);
        if tag != Some("P") {
            out.push('\n');
        }
    }
    out
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub use testbed::random_uuid;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_maps_whole_components_only() {
        let l = Layout::new(Path::new("/tmp/x"));
        assert_eq!(
            l.host_path("/run/netfault/netfaultd.sock"),
            Path::new("/tmp/x/run-netfault/netfaultd.sock")
        );
        assert_eq!(
            l.host_path("/run/netfault"),
            Path::new("/tmp/x/run-netfault")
        );
        assert_eq!(l.host_path("/run/netfaultx"), Path::new("/run/netfaultx"));
        assert_eq!(l.host_path("/var/run/netns"), Path::new("/var/run/netns"));
        assert_eq!(l.host_path("/etc/cni/net.d"), Path::new("/tmp/x/cni-conf"));
        assert_eq!(
            l.containerd_socket(),
            Path::new("/tmp/x/run-containerd/containerd.sock")
        );
    }

    #[test]
    fn cri_log_lines_become_text() {
        let raw = "2026-01-01T00:00:00.1Z stdout F hello\n2026-01-01T00:00:00.2Z stderr P par\n2026-01-01T00:00:00.3Z stderr F tial\n";
        assert_eq!(parse_cri_log(raw), "hello\npartial\n");
    }
}
