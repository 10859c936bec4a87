//! A simulated Kubernetes node: a netns with a bridge, driven through a real
//! CNI chain exactly as containerd (libcni) drives it.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::error::{Context, Error, PluginError, Result};
use crate::netns::Netns;
use crate::tmp::TempDir;

/// Where the reference CNI plugins are installed (Debian's containernetworking-plugins).
pub const SYSTEM_CNI_DIR: &str = "/usr/lib/cni";
/// The capability containerd uses to pass pod annotations.
pub const ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";
/// Name prefixes of node and pod namespaces (5 characters: see `unique_name`).
const NODE_PREFIX: &str = "nfnod";
const POD_PREFIX: &str = "nfpod";

/// The pod IPv4 range of every node (each node is its own netns, so they never clash).
pub const POD_CIDR_V4: &str = "198.18.0.0/24";

/// What to build. `Default` is: no agent listening (a socket path inside the
/// node's temp dir), `failurePolicy: ignore`, IPv4 only, netfault in the chain,
/// `cniVersion` 1.0.0 (the newest the Debian reference plugins speak).
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The agent socket written into the netfault conf. Empty: a path in the
    /// node's dir where nothing listens.
    pub socket: PathBuf,
    /// `failurePolicy` of the netfault entry, written as given (so invalid values can be tested).
    pub failure_policy: String,
    /// Allocate from [`POD_CIDR_V4`]. `false` with `ipv6` makes IPv6-only pods.
    pub ipv4: bool,
    /// Dual stack: also allocate from a random `fd00:xxxx:xxxx:xxxx::/64`.
    pub ipv6: bool,
    /// Whether the conflist has netfault after bridge.
    pub with_netfault: bool,
    /// The conflist's `cniVersion`.
    pub cni_version: String,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            socket: PathBuf::new(),
            failure_policy: "ignore".into(),
            ipv4: true,
            ipv6: false,
            with_netfault: true,
            cni_version: "1.0.0".into(),
        }
    }
}

/// A pod sandbox made by [`Node::add_pod`]. Dropping it removes its netns;
/// call [`Node::del_pod`] first to run CNI DEL as a runtime would.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// 64 hex characters, like a containerd sandbox id.
    pub container_id: String,
    /// `eth0`.
    pub ifname: String,
    pub netns: Netns,
    /// The sandbox's addresses from the final CNI result.
    pub ips: Vec<IpAddr>,
    /// The final CNI result (what libcni caches).
    pub result: Value,
    /// The exact `CNI_ARGS` used.
    pub cni_args: String,
}

impl Pod {
    pub fn ipv4(&self) -> Option<IpAddr> {
        self.ips.iter().copied().find(IpAddr::is_ipv4)
    }

    pub fn ipv6(&self) -> Option<IpAddr> {
        self.ips.iter().copied().find(IpAddr::is_ipv6)
    }

    /// The `CNI_NETNS` path.
    pub fn netns_path(&self) -> &Path {
        self.netns.path()
    }
}

/// How long each plugin of an ADD took, and the whole chain.
#[derive(Debug, Clone, Default)]
pub struct AddTiming {
    /// The whole chain: from the first plugin's exec to the last one's exit,
    /// plus writing the cache (pod netns creation excluded).
    pub total: Duration,
    /// (plugin type, wall time of its process) in chain order.
    pub plugins: Vec<(String, Duration)>,
}

impl AddTiming {
    /// The time of one plugin, by type.
    pub fn plugin(&self, plugin_type: &str) -> Option<Duration> {
        self.plugins
            .iter()
            .find(|(t, _)| t == plugin_type)
            .map(|(_, d)| *d)
    }
}

/// What a plugin process did.
#[derive(Debug, Clone)]
pub struct PluginOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl PluginOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn exit_code(&self) -> Option<i32> {
        self.status.code()
    }

    /// stdout as JSON (a result, a CNI error or VERSION info).
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(self.stdout.trim()).ok()
    }

    /// The CNI error `code` on stdout, if any.
    pub fn cni_code(&self) -> Option<u64> {
        self.json()?.get("code")?.as_u64()
    }

    /// The CNI error `msg` on stdout, or empty.
    pub fn cni_msg(&self) -> String {
        self.json()
            .and_then(|v| v.get("msg").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_default()
    }

    fn into_error(self, plugin: &str, command: &str) -> Error {
        Error::Plugin(Box::new(PluginError {
            plugin: plugin.to_string(),
            command: command.to_string(),
            exit_code: self.status.code(),
            cni_error: self.json(),
            stdout: self.stdout,
            stderr: self.stderr,
        }))
    }
}

/// A simulated node. See the crate docs. Dropping it removes its netns (and
/// with it the bridge and the host ends of every veth) and its temp dir.
#[derive(Debug)]
pub struct Node {
    opts: NodeOptions,
    // Field order is drop order: the netns goes first, then the files.
    netns: Netns,
    dir: TempDir,
    bridge: String,
    network_name: String,
    ipv6_subnet: Option<String>,
    conflist: Value,
}

impl Node {
    pub fn new(mut opts: NodeOptions) -> Result<Node> {
        if !opts.ipv4 && !opts.ipv6 {
            return Err(Error::Other(
                "NodeOptions: ipv4 and ipv6 are both false, pods would get no address".into(),
            ));
        }
        crate::ensure_workspace_bins()?;
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(|| {
            let n = crate::netns::remove_stale_netns(&[NODE_PREFIX, POD_PREFIX]);
            if n > 0 {
                eprintln!("testbed: removed {n} network namespaces left by dead test runs");
            }
        });
        let dir = TempDir::new("netfault-node")?;
        if opts.socket.as_os_str().is_empty() {
            opts.socket = dir.path().join("no-agent.sock");
        }
        let bin_dir = dir.path().join("bin");
        for sub in ["bin", "net.d", "ipam", "cache"] {
            std::fs::create_dir_all(dir.path().join(sub))
                .ctx(|| format!("creating {sub} in {}", dir.path().display()))?;
        }
        for plugin in ["bridge", "host-local", "loopback"] {
            let src = Path::new(SYSTEM_CNI_DIR).join(plugin);
            if !src.exists() {
                return Err(Error::Other(format!(
                    "{} not found: install containernetworking-plugins",
                    src.display()
                )));
            }
            std::os::unix::fs::symlink(&src, bin_dir.join(plugin))
                .ctx(|| format!("linking {}", src.display()))?;
        }
        let netfault = crate::workspace_bin("netfault");
        if opts.with_netfault && !netfault.exists() {
            return Err(Error::Other(format!(
                "{} not found: build the workspace first (cargo build --workspace)",
                netfault.display()
            )));
        }
        std::os::unix::fs::symlink(&netfault, bin_dir.join("netfault"))
            .ctx(|| format!("linking {}", netfault.display()))?;

        let bridge = crate::unique_name("nfbr");
        let network_name = format!("netfault-{bridge}");
        let ipv6_subnet = opts.ipv6.then(|| {
            let r: [u16; 3] = rand::random();
            format!("fd00:{:x}:{:x}:{:x}::/64", r[0], r[1], r[2])
        });
        let mut ranges = Vec::new();
        if opts.ipv4 {
            ranges.push(json!([{ "subnet": POD_CIDR_V4 }]));
        }
        if let Some(s) = &ipv6_subnet {
            ranges.push(json!([{ "subnet": s }]));
        }
        let mut plugins = vec![json!({
            "type": "bridge",
            "bridge": bridge,
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": ranges,
                "dataDir": dir.path().join("ipam"),
            },
        })];
        if opts.with_netfault {
            plugins.push(json!({
                "type": "netfault",
                "socket": opts.socket,
                "failurePolicy": opts.failure_policy,
                "capabilities": { ANNOTATIONS_CAPABILITY: true },
            }));
        }
        let conflist = json!({
            "cniVersion": opts.cni_version,
            "name": network_name,
            "plugins": plugins,
        });
        let conf_path = dir.path().join("net.d").join("10-netfault.conflist");
        std::fs::write(
            &conf_path,
            serde_json::to_vec_pretty(&conflist).unwrap_or_default(),
        )
        .ctx(|| format!("writing {}", conf_path.display()))?;
        let netns = Netns::create(&crate::unique_name(NODE_PREFIX))?;
        Ok(Node {
            opts,
            netns,
            dir,
            bridge,
            network_name,
            ipv6_subnet,
            conflist,
        })
    }

    pub fn options(&self) -> &NodeOptions {
        &self.opts
    }

    /// The node's own network namespace (the "host" of the pods).
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The conflist's `name`.
    pub fn network_name(&self) -> &str {
        &self.network_name
    }

    /// The pod IPv6 subnet, when dual-stack.
    pub fn ipv6_subnet(&self) -> Option<&str> {
        self.ipv6_subnet.as_deref()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `CNI_PATH`: symlinks to the plugins.
    pub fn bin_dir(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    /// libcni's cache dir (`results/NETWORK-CONTAINERID-IFNAME`).
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// The agent socket in the netfault conf.
    pub fn socket(&self) -> &Path {
        &self.opts.socket
    }

    pub fn conflist(&self) -> &Value {
        &self.conflist
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The raw conf of the chain's plugin of this type (as in the conflist).
    pub fn plugin_entry(&self, plugin_type: &str) -> Option<Value> {
        self.plugins()
            .into_iter()
            .find(|p| p["type"] == plugin_type)
    }

    /// The stdin libcni would give `entry`: `name` and `cniVersion` from the
    /// conflist, `prevResult` if any, and `runtimeConfig` for each capability the
    /// entry declares (here only pod annotations).
    pub fn build_conf(
        &self,
        entry: &Value,
        prev_result: Option<&Value>,
        annotations: &BTreeMap<String, String>,
    ) -> Value {
        let mut conf: Map<String, Value> = entry.as_object().cloned().unwrap_or_default();
        conf.insert("name".into(), Value::String(self.network_name.clone()));
        conf.insert(
            "cniVersion".into(),
            Value::String(self.opts.cni_version.clone()),
        );
        if let Some(prev) = prev_result {
            conf.insert("prevResult".into(), prev.clone());
        }
        let wants_annotations = entry
            .get("capabilities")
            .and_then(|c| c.get(ANNOTATIONS_CAPABILITY))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if wants_annotations {
            let mut rc = Map::new();
            rc.insert(ANNOTATIONS_CAPABILITY.into(), json!(annotations));
            conf.insert("runtimeConfig".into(), Value::Object(rc));
        }
        Value::Object(conf)
    }

    /// The environment a runtime gives a plugin for `command` on `pod`.
    pub fn pod_env(&self, command: &str, pod: &Pod) -> Vec<(String, String)> {
        self.cni_env(
            command,
            &pod.container_id,
            &pod.netns.path().to_string_lossy(),
            &pod.ifname,
            &pod.cni_args,
        )
    }

    fn cni_env(
        &self,
        command: &str,
        container_id: &str,
        netns: &str,
        ifname: &str,
        cni_args: &str,
    ) -> Vec<(String, String)> {
        vec![
            ("CNI_COMMAND".into(), command.into()),
            ("CNI_CONTAINERID".into(), container_id.into()),
            ("CNI_NETNS".into(), netns.into()),
            ("CNI_IFNAME".into(), ifname.into()),
            ("CNI_ARGS".into(), cni_args.into()),
            (
                "CNI_PATH".into(),
                self.bin_dir().to_string_lossy().into_owned(),
            ),
        ]
    }

    /// Runs one plugin binary (by type, from the bin dir) in the node netns with
    /// exactly `env` (plus `PATH`; inherited `CNI_*` variables are removed) and
    /// `stdin`. Returns whatever it did, failure included.
    pub fn run_plugin_raw<K: AsRef<str>, V: AsRef<str>>(
        &self,
        plugin_type: &str,
        env: &[(K, V)],
        stdin: &[u8],
    ) -> Result<PluginOutput> {
        let bin = self.bin_dir().join(plugin_type);
        let mut cmd = Command::new(&bin);
        cmd.env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            )
            .envs(env.iter().map(|(k, v)| (k.as_ref(), v.as_ref())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(v) = std::env::var_os("RUST_LOG") {
            cmd.env("RUST_LOG", v);
        }
        let started = Instant::now();
        let mut child = crate::netns::spawn_in_netns(self.netns.path(), &mut cmd, &[])?;
        if let Some(mut input) = child.stdin.take() {
            // EPIPE: the plugin did not read its stdin; its output says why.
            let _ = input.write_all(stdin);
        }
        let out = child
            .wait_with_output()
            .ctx(|| format!("waiting for {}", bin.display()))?;
        Ok(PluginOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: started.elapsed(),
        })
    }

    /// Creates a pod netns and runs CNI ADD for it through the whole chain.
    /// On failure the chain's DEL runs (as containerd tears down a failed
    /// sandbox) and the plugin's error is returned ([`Error::Plugin`]).
    pub fn add_pod(&self, name: &str, annotations: &BTreeMap<String, String>) -> Result<Pod> {
        self.add_pod_timed(name, annotations).map(|(pod, _)| pod)
    }

    /// [`Node::add_pod`], also returning how long the chain and each plugin
    /// took. For benches: compare `timing.plugin("netfault")` with the total,
    /// or the totals of two nodes built with and without `with_netfault`.
    pub fn add_pod_timed(
        &self,
        name: &str,
        annotations: &BTreeMap<String, String>,
    ) -> Result<(Pod, AddTiming)> {
        self.add_pod_as(name, &crate::random_uuid(), annotations)
    }

    /// [`Node::add_pod_timed`] for a pod whose uid the caller chose, e.g. a
    /// pod the scripted API server announced before its sandbox existed.
    pub fn add_pod_as(
        &self,
        name: &str,
        uid: &str,
        annotations: &BTreeMap<String, String>,
    ) -> Result<(Pod, AddTiming)> {
        let uid = uid.to_string();
        let safe: String = name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(40)
            .collect();
        let netns = Netns::create(&format!("{}-{safe}", crate::unique_name(POD_PREFIX)))?;
        let container_id = crate::random_hex(32);
        let namespace = "default".to_string();
        let cni_args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={uid}"
        );
        let mut pod = Pod {
            name: name.to_string(),
            namespace,
            uid,
            container_id,
            ifname: "eth0".into(),
            netns,
            ips: Vec::new(),
            result: Value::Null,
            cni_args,
        };
        let started = Instant::now();
        let mut timing = AddTiming::default();
        let mut prev: Option<Value> = None;
        for entry in self.plugins() {
            let (plugin, out) = self.run_entry(&entry, "ADD", &pod, prev.as_ref(), annotations)?;
            timing.plugins.push((plugin.to_string(), out.elapsed));
            if !out.success() {
                let err = out.into_error(plugin, "ADD");
                // containerd tears a failed sandbox's network down.
                if let Err(e) = self.run_del_chain(&pod, prev.as_ref(), annotations) {
                    eprintln!("testbed: DEL after failed ADD: {e}");
                }
                return Err(err);
            }
            let result = out.json().ok_or_else(|| {
                Error::Other(format!(
                    "CNI plugin {plugin} ADD printed no JSON result: {:?} (stderr {:?})",
                    out.stdout, out.stderr
                ))
            })?;
            prev = Some(result);
        }
        let result = prev.unwrap_or(Value::Null);
        self.cache_write(&pod, &result, annotations)?;
        timing.total = started.elapsed();
        pod.ips = sandbox_ips(&result);
        pod.result = result;
        Ok((pod, timing))
    }

    /// CNI DEL through the chain in reverse, each plugin getting the cached
    /// result as `prevResult` (libcni semantics); the cache entry is then
    /// removed. Stops at the first failing plugin. The pod's netns is kept
    /// until the `Pod` is dropped.
    pub fn del_pod(&self, pod: &Pod) -> Result<()> {
        let (prev, annotations) = self.cached(pod).unwrap_or_default();
        self.run_del_chain(pod, prev.as_ref(), &annotations)?;
        let path = self.cache_path(pod);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).ctx(|| format!("removing {}", path.display())),
        }
    }

    fn run_del_chain(
        &self,
        pod: &Pod,
        prev: Option<&Value>,
        annotations: &BTreeMap<String, String>,
    ) -> Result<()> {
        let mut plugins = self.plugins();
        plugins.reverse();
        self.run_chain(&plugins, "DEL", pod, prev, annotations)
    }

    /// CNI CHECK through the chain in order with the cached result.
    pub fn check_pod(&self, pod: &Pod) -> Result<()> {
        let (prev, annotations) = self
            .cached(pod)
            .ok_or_else(|| Error::Other(format!("no cached result for pod {}", pod.name)))?;
        self.run_chain(&self.plugins(), "CHECK", pod, prev.as_ref(), &annotations)
    }

    /// Runs `command` for `pod` through `plugins` in the order given, all
    /// with the same `prevResult`; stops at the first failing plugin.
    fn run_chain(
        &self,
        plugins: &[Value],
        command: &str,
        pod: &Pod,
        prev: Option<&Value>,
        annotations: &BTreeMap<String, String>,
    ) -> Result<()> {
        for entry in plugins {
            let (plugin, out) = self.run_entry(entry, command, pod, prev, annotations)?;
            if !out.success() {
                return Err(out.into_error(plugin, command));
            }
        }
        Ok(())
    }

    /// Runs `command` of one chain entry for `pod`, with the conf libcni
    /// would give it; the entry's plugin type and what the plugin did.
    fn run_entry<'e>(
        &self,
        entry: &'e Value,
        command: &str,
        pod: &Pod,
        prev: Option<&Value>,
        annotations: &BTreeMap<String, String>,
    ) -> Result<(&'e str, PluginOutput)> {
        let plugin = entry["type"].as_str().unwrap_or_default();
        let conf = self.build_conf(entry, prev, annotations);
        let out = self.run_plugin_raw(
            plugin,
            &self.pod_env(command, pod),
            conf.to_string().as_bytes(),
        )?;
        Ok((plugin, out))
    }

    /// Runs one command of the netfault plugin alone, for `pod`, with the conf
    /// the chain would give it (`prevResult` = the pod's result when `with_prev`),
    /// the `pod_env`, and `overrides` merged into the conf last.
    pub fn run_netfault(
        &self,
        command: &str,
        pod: &Pod,
        with_prev: bool,
        overrides: &Value,
    ) -> Result<PluginOutput> {
        let entry = self.plugin_entry("netfault").unwrap_or_else(|| {
            json!({"type": "netfault", "socket": self.opts.socket, "failurePolicy": self.opts.failure_policy,
                   "capabilities": { ANNOTATIONS_CAPABILITY: true }})
        });
        let mut conf = self.build_conf(&entry, with_prev.then_some(&pod.result), &BTreeMap::new());
        if let (Some(c), Some(o)) = (conf.as_object_mut(), overrides.as_object()) {
            for (k, v) in o {
                c.insert(k.clone(), v.clone());
            }
        }
        self.run_plugin_raw(
            "netfault",
            &self.pod_env(command, pod),
            conf.to_string().as_bytes(),
        )
    }

    fn cache_path(&self, pod: &Pod) -> PathBuf {
        self.cache_dir().join("results").join(format!(
            "{}-{}-{}",
            self.network_name, pod.container_id, pod.ifname
        ))
    }

    /// The cached result of `pod` (if the cache entry has one) and the
    /// annotations it was added with.
    fn cached(&self, pod: &Pod) -> Option<(Option<Value>, BTreeMap<String, String>)> {
        let bytes = std::fs::read(self.cache_path(pod)).ok()?;
        let cached: Value = serde_json::from_slice(&bytes).ok()?;
        let annotations = cached
            .get("capabilityArgs")
            .and_then(|a| a.get(ANNOTATIONS_CAPABILITY))
            .and_then(|a| serde_json::from_value(a.clone()).ok())
            .unwrap_or_default();
        Some((cached.get("result").cloned(), annotations))
    }

    /// Writes libcni's cache entry (`kind: cniCacheV1`).
    fn cache_write(
        &self,
        pod: &Pod,
        result: &Value,
        annotations: &BTreeMap<String, String>,
    ) -> Result<()> {
        let args: Vec<Value> = pod
            .cni_args
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| json!([k, v]))
            .collect();
        let entry = json!({
            "kind": "cniCacheV1",
            "containerId": pod.container_id,
            "config": base64(self.conflist.to_string().as_bytes()),
            "ifName": pod.ifname,
            "networkName": self.network_name,
            "cniArgs": args,
            "capabilityArgs": { ANNOTATIONS_CAPABILITY: annotations },
            "result": result,
        });
        let path = self.cache_path(pod);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, entry.to_string()).ctx(|| format!("writing {}", path.display()))
    }
}

/// The sandbox addresses of a CNI result: `ips[].address` whose `interface`
/// has a non-empty `sandbox` (or that have no `interface`).
pub(crate) fn sandbox_ips(result: &Value) -> Vec<IpAddr> {
    let ifaces = result.get("interfaces").and_then(Value::as_array);
    result
        .get("ips")
        .and_then(Value::as_array)
        .map(|ips| {
            ips.iter()
                .filter(|ip| match ip.get("interface").and_then(Value::as_u64) {
                    None => true,
                    Some(i) => ifaces
                        .and_then(|l| l.get(usize::try_from(i).unwrap_or(usize::MAX)))
                        .and_then(|f| f.get("sandbox"))
                        .and_then(Value::as_str)
                        .is_some_and(|s| !s.is_empty()),
                })
                .filter_map(|ip| ip.get("address").and_then(Value::as_str))
                .filter_map(|a| a.split('/').next().and_then(|a| a.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(T[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn result_ips() {
        let r = json!({"interfaces":[{"name":"br"},{"name":"eth0","sandbox":"/x"}],
            "ips":[{"interface":1,"address":"198.18.0.2/24"},{"interface":0,"address":"198.18.0.1/24"},
                   {"address":"fd00::2/64"}]});
        let ips: Vec<String> = sandbox_ips(&r).iter().map(ToString::to_string).collect();
        assert_eq!(ips, vec!["198.18.0.2", "fd00::2"]);
    }
}
