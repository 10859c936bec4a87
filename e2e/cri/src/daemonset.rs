//! The DaemonSet manifest's own pod spec, translated into CRI calls as a
//! kubelet would: `kubectl kustomize daemonset/` is rendered, the DaemonSet
//! parsed (serde_yaml), and its pod template becomes one
//! `PodSandboxConfig` and one `ContainerConfig` per container.
//!
//! What is translated (anything else that would change how the pod runs is
//! an [`Error::Manifest`] naming the field, never silently dropped):
//! - `hostNetwork`/`hostPID`/`hostIPC` → the sandbox's and containers'
//!   `NamespaceOption` (`NODE`, else `POD` for network and IPC and
//!   `CONTAINER` for PID, as the kubelet does);
//! - containers: `image`, `command` (CRI command), `args`, `env` (values and
//!   `valueFrom.fieldRef` of `spec.nodeName` → the node's name,
//!   `metadata.name`, `metadata.namespace`, `metadata.uid`);
//! - `volumeMounts` over `volumes`: `hostPath` (its `path` through the
//!   node-layout map, [`Layout::host_path`], symlinks resolved; `type`
//!   `DirectoryOrCreate` is created by [`prepare`], `Directory` and others
//!   must exist), `emptyDir` (a dir under the pod's dir; `medium: Memory`
//!   gets a tmpfs of `sizeLimit`, mounted by [`prepare`]), a `secret` with
//!   `optional: true` (an empty dir: there is no API server here, so the
//!   Secret is absent, and the kubelet then mounts an empty volume; a
//!   required Secret is an error);
//!   `readOnly`, `mountPropagation` (`None` → PRIVATE, `HostToContainer` →
//!   HOST_TO_CONTAINER, `Bidirectional` → BIDIRECTIONAL), `subPath`;
//! - `securityContext`: `capabilities.add/drop`, `privileged`, `runAsUser`,
//!   `runAsGroup`, `readOnlyRootFilesystem`, `allowPrivilegeEscalation:
//!   false` → `no_new_privs`; the kubelet's default masked and read-only
//!   /proc paths unless privileged; seccomp `Unconfined` (the kubelet's
//!   default without SeccompDefault); no AppArmor profile (containerd then
//!   applies its default only where AppArmor is enabled, which it is not
//!   here);
//! - `resources.limits.memory` → `memory_limit_in_bytes`,
//!   `resources.requests.cpu` → `cpu_shares`;
//! - `readinessProbe`/`livenessProbe` `exec` → [`ExecProbe`] (run with
//!   ExecSync by [`crate::Node`]); other probe kinds are errors.
//!
//! Not done (a kubelet would): the `/etc/hosts` and `/dev/termination-log`
//! mounts, the service env vars, restarts. `dnsPolicy`, `tolerations`,
//! `priorityClassName`, `serviceAccountName` and the update strategy have no
//! node-level effect here.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;

use netfault_cri::api;

use crate::error::{run, Error, IoContext, Result};
use crate::node::{unconfined, Layout, DEFAULT_MASKED_PATHS, DEFAULT_READONLY_PATHS};

/// `kubectl kustomize DIR`: the rendered YAML documents.
pub fn render(dir: &Path) -> Result<String> {
    run(Command::new("kubectl").arg("kustomize").arg(dir))
}

/// The repository's `daemonset/` dir.
pub fn manifest_dir() -> PathBuf {
    crate::images::repo_root().join("daemonset")
}

#[derive(Debug, Clone, Deserialize)]
pub struct DaemonSet {
    pub metadata: ObjectMeta,
    pub spec: DaemonSetSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DaemonSetSpec {
    pub template: PodTemplate,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PodTemplate {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: PodSpecYaml,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpecYaml {
    #[serde(default)]
    pub host_network: bool,
    #[serde(default, rename = "hostPID")]
    pub host_pid: bool,
    #[serde(default, rename = "hostIPC")]
    pub host_ipc: bool,
    pub termination_grace_period_seconds: Option<u64>,
    #[serde(default)]
    pub init_containers: Vec<serde_yaml::Value>,
    pub containers: Vec<ContainerYaml>,
    #[serde(default)]
    pub volumes: Vec<VolumeYaml>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerYaml {
    pub name: String,
    pub image: String,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub working_dir: String,
    #[serde(default)]
    pub env: Vec<EnvYaml>,
    #[serde(default)]
    pub volume_mounts: Vec<VolumeMountYaml>,
    pub security_context: Option<SecurityContextYaml>,
    pub readiness_probe: Option<ProbeYaml>,
    pub liveness_probe: Option<ProbeYaml>,
    pub startup_probe: Option<ProbeYaml>,
    pub resources: Option<ResourcesYaml>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvYaml {
    pub name: String,
    pub value: Option<String>,
    pub value_from: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMountYaml {
    pub name: String,
    pub mount_path: String,
    #[serde(default)]
    pub read_only: bool,
    pub mount_propagation: Option<String>,
    #[serde(default)]
    pub sub_path: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeYaml {
    pub name: String,
    pub host_path: Option<HostPathYaml>,
    pub empty_dir: Option<EmptyDirYaml>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HostPathYaml {
    pub path: String,
    #[serde(default, rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EmptyDirYaml {
    #[serde(default)]
    pub medium: String,
    pub size_limit: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityContextYaml {
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub run_as_non_root: Option<bool>,
    #[serde(default)]
    pub privileged: bool,
    pub allow_privilege_escalation: Option<bool>,
    #[serde(default)]
    pub read_only_root_filesystem: bool,
    pub capabilities: Option<CapabilitiesYaml>,
    pub seccomp_profile: Option<serde_yaml::Value>,
    pub se_linux_options: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct CapabilitiesYaml {
    #[serde(default)]
    pub add: Vec<String>,
    #[serde(default)]
    pub drop: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeYaml {
    pub exec: Option<ExecYaml>,
    pub timeout_seconds: Option<u64>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ExecYaml {
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ResourcesYaml {
    #[serde(default)]
    pub limits: BTreeMap<String, String>,
    #[serde(default)]
    pub requests: BTreeMap<String, String>,
}

/// Finds the (single) DaemonSet in rendered YAML.
pub fn parse_daemonset(rendered: &str) -> Result<DaemonSet> {
    let mut found = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(rendered) {
        let v = serde_yaml::Value::deserialize(doc)
            .map_err(|e| Error::Manifest(format!("rendered YAML: {e}")))?;
        if v.get("kind").and_then(|k| k.as_str()) == Some("DaemonSet") {
            found.push(v);
        }
    }
    match found.len() {
        1 => serde_yaml::from_value(found.remove(0))
            .map_err(|e| Error::Manifest(format!("DaemonSet: {e}"))),
        n => Err(Error::Manifest(format!(
            "expected exactly one DaemonSet in the rendered manifest, found {n}"
        ))),
    }
}

/// An exec probe of a container.
#[derive(Debug, Clone)]
pub struct ExecProbe {
    pub command: Vec<String>,
    pub timeout: Duration,
}

/// One container of the plan: its CRI config and probes.
#[derive(Debug, Clone)]
pub struct ContainerPlan {
    pub name: String,
    pub config: api::ContainerConfig,
    pub readiness: Option<ExecProbe>,
    pub liveness: Option<ExecProbe>,
    /// The container's mounts: (container path, host path) for mapping
    /// container paths back to the host ([`ContainerPlan::host_path_of`]).
    pub mounts: Vec<(String, PathBuf)>,
}

impl ContainerPlan {
    /// The host path behind a path inside the container, through its
    /// mounts (the longest mount path that is a prefix); `None` when the
    /// path is in the container's own filesystem.
    pub fn host_path_of(&self, container_path: &str) -> Option<PathBuf> {
        let p = Path::new(container_path);
        self.mounts
            .iter()
            .filter_map(|(c, h)| {
                let rest = p.strip_prefix(c).ok()?;
                Some((
                    c.len(),
                    if rest.as_os_str().is_empty() {
                        h.clone()
                    } else {
                        h.join(rest)
                    },
                ))
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, h)| h)
    }

    /// The value of `--flag VALUE` or `--flag=VALUE` in the command + args.
    pub fn flag(&self, flag: &str) -> Option<String> {
        flag_value(&self.config.command, flag).or_else(|| flag_value(&self.config.args, flag))
    }
}

/// Rewrites the value of `--flag VALUE` / `--flag=VALUE` through the map.
fn map_flag(argv: &mut [String], flag: &str, layout: &Layout) {
    let eq = format!("{flag}=");
    let mut i = 0;
    while i < argv.len() {
        if argv[i] == flag && i + 1 < argv.len() {
            argv[i + 1] = layout
                .host_path(&argv[i + 1])
                .to_string_lossy()
                .into_owned();
            i += 1;
        } else if let Some(v) = argv[i].strip_prefix(&eq) {
            argv[i] = format!("{eq}{}", layout.host_path(v).display());
        }
        i += 1;
    }
}

fn flag_value(argv: &[String], flag: &str) -> Option<String> {
    let eq = format!("{flag}=");
    argv.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            argv.get(i + 1).cloned()
        } else {
            a.strip_prefix(&eq).map(str::to_string)
        }
    })
}

/// The whole pod: the sandbox config and the containers, in order.
#[derive(Debug, Clone)]
pub struct PodPlan {
    pub sandbox: api::PodSandboxConfig,
    pub containers: Vec<ContainerPlan>,
    pub grace: Duration,
    /// The emptyDir dirs that get a tmpfs ([`prepare`] mounts them; the
    /// node unmounts them).
    pub tmpfs: Vec<PathBuf>,
    /// What the kubelet would do on the host before the pod starts
    /// (done by [`prepare`]).
    pub prepare: Vec<Prepare>,
}

/// One host-side step before the pod starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepare {
    /// Create a dir (`hostPath` `DirectoryOrCreate`, an emptyDir).
    Dir(PathBuf),
    /// Mount a tmpfs of this many bytes (`emptyDir.medium: Memory`).
    Tmpfs { dir: PathBuf, size: Option<u64> },
}

/// Carries out a plan's [`Prepare`] steps: the dirs, the tmpfs mounts.
pub fn prepare(plan: &PodPlan) -> Result<()> {
    for step in &plan.prepare {
        match step {
            Prepare::Dir(d) => {
                std::fs::create_dir_all(d).ctx(|| format!("creating {}", d.display()))?
            }
            Prepare::Tmpfs { dir, size } => {
                let opts = size.map(|s| format!("size={s}")).unwrap_or_default();
                nix::mount::mount(
                    Some("tmpfs"),
                    dir,
                    Some("tmpfs"),
                    nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                    Some(opts.as_str()),
                )
                .ctx(|| format!("mounting a tmpfs on {}", dir.display()))?;
            }
        }
    }
    Ok(())
}

impl PodPlan {
    pub fn container(&self, name: &str) -> Result<&ContainerPlan> {
        self.containers
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| Error::Manifest(format!("no container named {name}")))
    }

    /// A container to change before [`crate::Node::start_plan`] (extra
    /// args, another seccomp profile, ...).
    pub fn container_mut(&mut self, name: &str) -> Result<&mut ContainerPlan> {
        self.containers
            .iter_mut()
            .find(|c| c.name == name)
            .ok_or_else(|| Error::Manifest(format!("no container named {name}")))
    }
}

/// What the translation needs to know about the node.
pub struct NodeInfo<'a> {
    pub name: &'a str,
    pub layout: &'a Layout,
    pub cgroup_parent: &'a str,
}

/// Translates the DaemonSet's pod template for `node`; changes nothing on
/// the host (the dirs and tmpfs mounts the kubelet would make are listed in
/// [`PodPlan::prepare`]). The pod is named `<daemonset>-<5 random>`. An
/// error names the manifest field.
pub fn translate(ds: &DaemonSet, node: &NodeInfo) -> Result<PodPlan> {
    let spec = &ds.spec.template.spec;
    if !spec.init_containers.is_empty() {
        return Err(Error::Manifest(
            "spec.template.spec.initContainers: not supported by the translation".into(),
        ));
    }
    let suffix: String = crate::node::random_uuid()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(5)
        .collect();
    let name = format!("{}-{suffix}", ds.metadata.name);
    let namespace = if ds.metadata.namespace.is_empty() {
        "default".to_string()
    } else {
        ds.metadata.namespace.clone()
    };
    let uid = crate::node::random_uuid();
    let pod_dir = node.layout.pods.join(format!("{namespace}_{name}_{uid}"));
    let ns_opts = api::NamespaceOption {
        network: if spec.host_network {
            api::NamespaceMode::Node
        } else {
            api::NamespaceMode::Pod
        } as i32,
        pid: if spec.host_pid {
            api::NamespaceMode::Node
        } else {
            api::NamespaceMode::Container
        } as i32,
        ipc: if spec.host_ipc {
            api::NamespaceMode::Node
        } else {
            api::NamespaceMode::Pod
        } as i32,
        ..Default::default()
    };
    let mut labels: HashMap<String, String> = ds
        .spec
        .template
        .metadata
        .labels
        .clone()
        .into_iter()
        .collect();
    labels.insert("io.kubernetes.pod.name".into(), name.clone());
    labels.insert("io.kubernetes.pod.namespace".into(), namespace.clone());
    labels.insert("io.kubernetes.pod.uid".into(), uid.clone());
    let privileged = spec
        .containers
        .iter()
        .any(|c| c.security_context.as_ref().is_some_and(|s| s.privileged));
    let sandbox = api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: name.clone(),
            uid: uid.clone(),
            namespace: namespace.clone(),
            attempt: 0,
        }),
        hostname: if spec.host_network {
            String::new()
        } else {
            name.clone()
        },
        log_directory: pod_dir.to_string_lossy().into_owned(),
        labels: labels.clone(),
        annotations: ds
            .spec
            .template
            .metadata
            .annotations
            .clone()
            .into_iter()
            .collect(),
        linux: Some(api::LinuxPodSandboxConfig {
            cgroup_parent: node.cgroup_parent.to_string(),
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(ns_opts.clone()),
                privileged,
                seccomp: Some(unconfined()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };

    // Volumes: name → host path (created as the kubelet would).
    let mut volumes: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut tmpfs = Vec::new();
    let mut prepare = Vec::new();
    for (i, v) in spec.volumes.iter().enumerate() {
        let field = format!("spec.template.spec.volumes[{i}] ({})", v.name);
        let host = match (&v.host_path, &v.empty_dir) {
            (Some(hp), None) => {
                let host = node.layout.host_path(&hp.path);
                match hp.kind.as_str() {
                    "DirectoryOrCreate" => prepare.push(Prepare::Dir(host.clone())),
                    "" => {}
                    "Directory" if host.is_dir() => {}
                    "Directory" => {
                        return Err(Error::Manifest(format!(
                            "{field}: hostPath {} (here {}) is not a directory",
                            hp.path,
                            host.display()
                        )))
                    }
                    _ if host.exists() => {}
                    other => {
                        return Err(Error::Manifest(format!(
                            "{field}: hostPath {} of type {other} does not exist (here {})",
                            hp.path,
                            host.display()
                        )))
                    }
                }
                // Symlinks resolved: containerd 1.6 checks a HostToContainer
                // source's propagation on the path as given, without
                // resolving symlinks, so /var/run/netns (with /var/run ->
                // /run) is judged by the mount of `/`, which is private on
                // this machine, while /run/netns is the shared bind mount
                // prepare_host made. On a systemd node `/` is shared and the
                // unresolved path passes too.
                std::fs::canonicalize(&host).unwrap_or(host)
            }
            (None, Some(ed)) => {
                let dir = pod_dir.join("volumes").join(&v.name);
                prepare.push(Prepare::Dir(dir.clone()));
                match ed.medium.as_str() {
                    "" => {}
                    "Memory" => {
                        let size = match &ed.size_limit {
                            Some(s) => Some(quantity_bytes(s).ok_or_else(|| {
                                Error::Manifest(format!(
                                    "{field}.emptyDir.sizeLimit: cannot read {s:?}"
                                ))
                            })?),
                            None => None,
                        };
                        prepare.push(Prepare::Tmpfs {
                            dir: dir.clone(),
                            size,
                        });
                        tmpfs.push(dir.clone());
                    }
                    other => {
                        return Err(Error::Manifest(format!(
                            "{field}.emptyDir.medium: {other:?} not supported"
                        )))
                    }
                }
                dir
            }
            (None, None)
                if v.other.len() == 1
                    && v.other.get("secret").and_then(|s| s.get("optional"))
                        == Some(&serde_yaml::Value::Bool(true)) =>
            {
                let dir = pod_dir.join("volumes").join(&v.name);
                prepare.push(Prepare::Dir(dir.clone()));
                dir
            }
            _ => {
                return Err(Error::Manifest(format!(
                    "{field}: only hostPath, emptyDir and optional secret volumes are translated, got {:?}",
                    v.other.keys().collect::<Vec<_>>()
                )))
            }
        };
        volumes.insert(v.name.clone(), host);
    }

    let mut containers = Vec::new();
    for (i, c) in spec.containers.iter().enumerate() {
        let field = format!("spec.template.spec.containers[{i}] ({})", c.name);
        containers.push(translate_container(
            c,
            &field,
            &volumes,
            &ns_opts,
            node,
            (&name, &namespace, &uid),
        )?);
    }
    // install-cni's --socket is written into the conflist for the CNI plugin,
    // which runs on the HOST (containerd execs it), not in this container: it
    // is a node path, so it goes through the node-layout map like a hostPath
    // (a node whose /run/netfault lives elsewhere needs the same change).
    for c in containers.iter_mut() {
        let is_installer = c
            .config
            .command
            .first()
            .is_some_and(|cmd| cmd.ends_with("netfault-install-cni"));
        if is_installer {
            map_flag(&mut c.config.command, "--socket", node.layout);
            map_flag(&mut c.config.args, "--socket", node.layout);
        }
    }
    Ok(PodPlan {
        sandbox,
        containers,
        grace: Duration::from_secs(spec.termination_grace_period_seconds.unwrap_or(30)),
        tmpfs,
        prepare,
    })
}

fn translate_container(
    c: &ContainerYaml,
    field: &str,
    volumes: &BTreeMap<String, PathBuf>,
    ns_opts: &api::NamespaceOption,
    node: &NodeInfo,
    (pod, namespace, uid): (&str, &str, &str),
) -> Result<ContainerPlan> {
    let mut envs = Vec::new();
    for (j, e) in c.env.iter().enumerate() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), None) => v.clone(),
            (None, None) => String::new(),
            (None, Some(from)) => {
                let path = from
                    .get("fieldRef")
                    .and_then(|f| f.get("fieldPath"))
                    .and_then(|p| p.as_str())
                    .ok_or_else(|| {
                        Error::Manifest(format!(
                            "{field}.env[{j}] ({}).valueFrom: only fieldRef is translated",
                            e.name
                        ))
                    })?;
                match path {
                    "spec.nodeName" => node.name.to_string(),
                    "metadata.name" => pod.to_string(),
                    "metadata.namespace" => namespace.to_string(),
                    "metadata.uid" => uid.to_string(),
                    other => {
                        return Err(Error::Manifest(format!(
                            "{field}.env[{j}] ({}).valueFrom.fieldRef.fieldPath: {other} not translated",
                            e.name
                        )))
                    }
                }
            }
            (Some(_), Some(_)) => {
                return Err(Error::Manifest(format!(
                    "{field}.env[{j}] ({}): both value and valueFrom",
                    e.name
                )))
            }
        };
        envs.push(api::KeyValue {
            key: e.name.clone(),
            value,
        });
    }

    let mut mounts = Vec::new();
    let mut map = Vec::new();
    for (j, m) in c.volume_mounts.iter().enumerate() {
        let mfield = format!("{field}.volumeMounts[{j}] ({})", m.name);
        let host = volumes
            .get(&m.name)
            .ok_or_else(|| Error::Manifest(format!("{mfield}: no volume named {}", m.name)))?;
        let host = if m.sub_path.is_empty() {
            host.clone()
        } else {
            host.join(&m.sub_path)
        };
        let propagation = match m.mount_propagation.as_deref() {
            None | Some("None") => api::MountPropagation::PropagationPrivate,
            Some("HostToContainer") => api::MountPropagation::PropagationHostToContainer,
            Some("Bidirectional") => api::MountPropagation::PropagationBidirectional,
            Some(other) => {
                return Err(Error::Manifest(format!(
                    "{mfield}.mountPropagation: {other:?} is not None, HostToContainer or Bidirectional"
                )))
            }
        };
        mounts.push(api::Mount {
            container_path: m.mount_path.clone(),
            host_path: host.to_string_lossy().into_owned(),
            readonly: m.read_only,
            propagation: propagation as i32,
            ..Default::default()
        });
        map.push((m.mount_path.clone(), host));
    }

    let sc = c.security_context.clone();
    let privileged = sc.as_ref().is_some_and(|s| s.privileged);
    if let Some(s) = &sc {
        if s.se_linux_options.is_some() {
            return Err(Error::Manifest(format!(
                "{field}.securityContext.seLinuxOptions: not translated"
            )));
        }
        if s.seccomp_profile.is_some() {
            return Err(Error::Manifest(format!(
                "{field}.securityContext.seccompProfile: not translated"
            )));
        }
        if s.run_as_non_root == Some(true) && s.run_as_user == Some(0) {
            return Err(Error::Manifest(format!(
                "{field}.securityContext: runAsNonRoot with runAsUser 0"
            )));
        }
    }
    let caps = sc
        .as_ref()
        .and_then(|s| s.capabilities.clone())
        .unwrap_or_default();
    let security = api::LinuxContainerSecurityContext {
        capabilities: Some(api::Capability {
            add_capabilities: caps.add.clone(),
            drop_capabilities: caps.drop.clone(),
            ..Default::default()
        }),
        privileged,
        namespace_options: Some(ns_opts.clone()),
        run_as_user: sc
            .as_ref()
            .and_then(|s| s.run_as_user)
            .map(|value| api::Int64Value { value }),
        run_as_group: sc
            .as_ref()
            .and_then(|s| s.run_as_group)
            .map(|value| api::Int64Value { value }),
        readonly_rootfs: sc.as_ref().is_some_and(|s| s.read_only_root_filesystem),
        // The kubelet: no_new_privs unless privilege escalation is allowed
        // (it is by default, and always for privileged or CAP_SYS_ADMIN).
        no_new_privs: sc
            .as_ref()
            .is_some_and(|s| s.allow_privilege_escalation == Some(false)),
        masked_paths: if privileged {
            Vec::new()
        } else {
            DEFAULT_MASKED_PATHS.iter().map(|s| s.to_string()).collect()
        },
        readonly_paths: if privileged {
            Vec::new()
        } else {
            DEFAULT_READONLY_PATHS
                .iter()
                .map(|s| s.to_string())
                .collect()
        },
        seccomp: Some(unconfined()),
        ..Default::default()
    };

    let mut resources = api::LinuxContainerResources::default();
    if let Some(r) = &c.resources {
        if let Some(m) = r.limits.get("memory") {
            resources.memory_limit_in_bytes = quantity_bytes(m).ok_or_else(|| {
                Error::Manifest(format!(
                    "{field}.resources.limits.memory: cannot read {m:?}"
                ))
            })? as i64;
        }
        if let Some(cpu) = r.requests.get("cpu") {
            let milli = cpu_millis(cpu).ok_or_else(|| {
                Error::Manifest(format!(
                    "{field}.resources.requests.cpu: cannot read {cpu:?}"
                ))
            })?;
            resources.cpu_shares = (milli * 1024 / 1000).max(2) as i64;
        }
    }

    let probe = |p: &Option<ProbeYaml>, which: &str| -> Result<Option<ExecProbe>> {
        let Some(p) = p else { return Ok(None) };
        let exec = p.exec.as_ref().ok_or_else(|| {
            Error::Manifest(format!("{field}.{which}: only exec probes are translated"))
        })?;
        Ok(Some(ExecProbe {
            command: exec.command.clone(),
            timeout: Duration::from_secs(p.timeout_seconds.unwrap_or(1)),
        }))
    };
    if c.startup_probe.is_some() {
        return Err(Error::Manifest(format!(
            "{field}.startupProbe: not translated"
        )));
    }

    let mut labels = HashMap::new();
    labels.insert("io.kubernetes.container.name".to_string(), c.name.clone());
    labels.insert("io.kubernetes.pod.name".to_string(), pod.to_string());
    labels.insert(
        "io.kubernetes.pod.namespace".to_string(),
        namespace.to_string(),
    );
    labels.insert("io.kubernetes.pod.uid".to_string(), uid.to_string());
    let config = api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: c.name.clone(),
            attempt: 0,
        }),
        image: Some(api::ImageSpec {
            image: c.image.clone(),
            ..Default::default()
        }),
        command: c.command.clone(),
        args: c.args.clone(),
        working_dir: c.working_dir.clone(),
        envs,
        mounts,
        labels,
        log_path: format!("{}/0.log", c.name),
        linux: Some(api::LinuxContainerConfig {
            resources: Some(resources),
            security_context: Some(security),
        }),
        ..Default::default()
    };
    Ok(ContainerPlan {
        name: c.name.clone(),
        config,
        readiness: probe(&c.readiness_probe, "readinessProbe")?,
        liveness: probe(&c.liveness_probe, "livenessProbe")?,
        mounts: map,
    })
}

/// A Kubernetes memory quantity in bytes (`64Mi`, `1G`, `512`).
pub fn quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let units: &[(&str, u64)] = &[
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (suffix, mult) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().ok()?.checked_mul(*mult);
        }
    }
    q.parse().ok()
}

/// A CPU quantity in millicores (`50m`, `1`, `0.5`).
pub fn cpu_millis(q: &str) -> Option<u64> {
    let q = q.trim();
    if let Some(m) = q.strip_suffix('m') {
        return m.parse().ok();
    }
    let f: f64 = q.parse().ok()?;
    (f >= 0.0).then(|| (f * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(quantity_bytes("16Mi"), Some(16 << 20));
        assert_eq!(quantity_bytes("1G"), Some(1_000_000_000));
        assert_eq!(quantity_bytes("512"), Some(512));
        assert_eq!(quantity_bytes("x"), None);
        assert_eq!(cpu_millis("50m"), Some(50));
        assert_eq!(cpu_millis("0.5"), Some(500));
    }

    /// The repository's DaemonSet, rendered (None without kubectl).
    fn rendered() -> Option<DaemonSet> {
        if Command::new("kubectl")
            .arg("version")
            .arg("--client")
            .output()
            .is_err()
        {
            eprintln!("skipped: kubectl not found (scripts/setup.sh installs it)");
            return None;
        }
        let yaml = render(&manifest_dir()).expect("kubectl kustomize daemonset/");
        Some(parse_daemonset(&yaml).expect("one DaemonSet"))
    }

    fn scratch_layout() -> (PathBuf, Layout) {
        let dir = std::env::temp_dir().join(format!("nfcri-unit-{}", crate::node::random_uuid()));
        let layout = Layout::new(&dir);
        // The one `type: Directory` hostPath that the layout redirects.
        std::fs::create_dir_all(&layout.run_containerd).expect("scratch dir");
        (dir, layout)
    }

    fn mount<'a>(c: &'a ContainerPlan, path: &str) -> &'a api::Mount {
        c.config
            .mounts
            .iter()
            .find(|m| m.container_path == path)
            .unwrap_or_else(|| panic!("{} has no mount at {path}", c.name))
    }

    #[test]
    fn the_manifest_translates_as_a_kubelet_would() {
        let Some(ds) = rendered() else { return };
        let (dir, layout) = scratch_layout();
        let plan = translate(
            &ds,
            &NodeInfo {
                name: "node-1",
                layout: &layout,
                cgroup_parent: "/nfunit",
            },
        )
        .expect("translate");
        // Nothing on the host yet.
        assert!(!layout.run_netfault.exists());

        let meta = plan.sandbox.metadata.clone().expect("metadata");
        assert_eq!(meta.namespace, "netfault");
        assert!(meta.name.starts_with("netfault-"), "{}", meta.name);
        let linux = plan.sandbox.linux.clone().expect("linux");
        assert_eq!(linux.cgroup_parent, "/nfunit");
        let ns = linux
            .security_context
            .and_then(|s| s.namespace_options)
            .expect("namespace options");
        assert_eq!(ns.network, api::NamespaceMode::Node as i32, "hostNetwork");
        assert_eq!(ns.pid, api::NamespaceMode::Container as i32);
        assert_eq!(ns.ipc, api::NamespaceMode::Pod as i32);
        assert_eq!(plan.grace, Duration::from_secs(30));

        let agent = plan.container("netfaultd").expect("netfaultd");
        assert!(
            agent.config.command.is_empty(),
            "the image's entrypoint runs"
        );
        assert_eq!(
            agent.flag("--socket").as_deref(),
            Some("/run/netfault/netfaultd.sock")
        );
        let m = mount(agent, "/run/netfault");
        assert_eq!(Path::new(&m.host_path), layout.run_netfault);
        assert_eq!(
            m.propagation,
            api::MountPropagation::PropagationPrivate as i32
        );
        let m = mount(agent, "/var/run/netns");
        assert_eq!(
            Path::new(&m.host_path),
            std::fs::canonicalize("/var/run/netns").unwrap_or("/var/run/netns".into())
        );
        assert_eq!(
            m.propagation,
            api::MountPropagation::PropagationHostToContainer as i32
        );
        let m = mount(agent, "/sys/fs/bpf");
        assert_eq!(m.host_path, "/sys/fs/bpf");
        assert_eq!(
            m.propagation,
            api::MountPropagation::PropagationHostToContainer as i32
        );
        let m = mount(agent, "/run/containerd");
        assert_eq!(Path::new(&m.host_path), layout.run_containerd);
        assert!(m.readonly);
        // The optional API token Secret: absent here, an empty read-only dir.
        let m = mount(agent, "/etc/netfault");
        assert!(m.readonly);
        assert!(plan
            .prepare
            .contains(&Prepare::Dir(PathBuf::from(&m.host_path))));
        let tmp = mount(agent, "/tmp");
        assert_eq!(plan.tmpfs, [PathBuf::from(&tmp.host_path)]);
        assert!(plan.prepare.contains(&Prepare::Tmpfs {
            dir: PathBuf::from(&tmp.host_path),
            size: Some(16 << 20)
        }));
        assert!(plan
            .prepare
            .contains(&Prepare::Dir(layout.run_netfault.clone())));
        assert_eq!(
            agent.host_path_of("/run/netfault/netfaultd.sock"),
            Some(layout.run_netfault.join("netfaultd.sock"))
        );
        assert!(agent
            .config
            .envs
            .iter()
            .any(|e| e.key == "NODE_NAME" && e.value == "node-1"));

        let linux = agent.config.linux.clone().expect("linux");
        let sc = linux.security_context.expect("security context");
        let caps = sc.capabilities.clone().expect("capabilities");
        assert_eq!(caps.drop_capabilities, ["ALL"]);
        assert_eq!(
            caps.add_capabilities,
            ["NET_ADMIN", "SYS_ADMIN", "BPF", "PERFMON", "NET_RAW"]
        );
        assert!(!sc.privileged && sc.no_new_privs && sc.readonly_rootfs);
        assert_eq!(sc.run_as_user.map(|u| u.value), Some(0));
        assert_eq!(sc.masked_paths.len(), DEFAULT_MASKED_PATHS.len());
        let res = linux.resources.expect("resources");
        assert_eq!(res.memory_limit_in_bytes, 512 << 20);
        assert_eq!(res.cpu_shares, 51);
        let probe = agent.readiness.clone().expect("readiness probe");
        assert_eq!(
            probe.command,
            [
                "/opt/netfault/bin/netfaultctl",
                "--socket",
                "/run/netfault/netfaultd.sock",
                "health"
            ]
        );
        assert_eq!(probe.timeout, Duration::from_secs(5));
        assert!(agent.liveness.is_some());

        // install-cni: its --socket is a host path for the CNI plugin.
        let icni = plan.container("install-cni").expect("install-cni");
        assert_eq!(
            icni.flag("--socket").map(PathBuf::from),
            Some(layout.run_netfault.join("netfaultd.sock"))
        );
        assert_eq!(
            icni.flag("--cni-bin-dir").as_deref(),
            Some("/host/opt/cni/bin")
        );
        assert_eq!(
            Path::new(&mount(icni, "/host/opt/cni/bin").host_path),
            layout.cni_bin
        );
        assert_eq!(
            Path::new(&mount(icni, "/host/etc/cni/net.d").host_path),
            layout.cni_conf
        );
        let caps = icni
            .config
            .linux
            .clone()
            .and_then(|l| l.security_context)
            .and_then(|s| s.capabilities)
            .expect("capabilities");
        assert!(caps.add_capabilities.is_empty());
        assert_eq!(caps.drop_capabilities, ["ALL"]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn what_cannot_be_translated_is_an_error_naming_the_field() {
        let Some(ds) = rendered() else { return };
        let (dir, layout) = scratch_layout();
        let node = NodeInfo {
            name: "node-1",
            layout: &layout,
            cgroup_parent: "/nfunit",
        };
        let err = |ds: &DaemonSet| match translate(ds, &node) {
            Ok(_) => panic!("translated"),
            Err(e) => e.to_string(),
        };

        let mut bad = ds.clone();
        bad.spec.template.spec.volumes.push(VolumeYaml {
            name: "cfg".into(),
            host_path: None,
            empty_dir: None,
            other: BTreeMap::from([("configMap".to_string(), serde_yaml::Value::Null)]),
        });
        let e = err(&bad);
        assert!(
            e.contains("volumes[") && e.contains("(cfg)") && e.contains("configMap"),
            "{e}"
        );
        // A required Secret cannot be mounted without an API server.
        let mut bad = ds.clone();
        bad.spec.template.spec.volumes.push(VolumeYaml {
            name: "req".into(),
            host_path: None,
            empty_dir: None,
            other: BTreeMap::from([(
                "secret".to_string(),
                serde_yaml::from_str("{secretName: s}").expect("yaml"),
            )]),
        });
        let e = err(&bad);
        assert!(e.contains("(req)") && e.contains("secret"), "{e}");

        let mut bad = ds.clone();
        bad.spec.template.spec.containers[0].volume_mounts[0].mount_propagation =
            Some("Sideways".into());
        let e = err(&bad);
        assert!(
            e.contains("volumeMounts[0]") && e.contains("mountPropagation"),
            "{e}"
        );

        let mut bad = ds.clone();
        bad.spec.template.spec.containers[0].env.push(EnvYaml {
            name: "POD_IP".into(),
            value: None,
            value_from: Some(
                serde_yaml::from_str("fieldRef: {fieldPath: status.podIP}").expect("yaml"),
            ),
        });
        let e = err(&bad);
        assert!(e.contains("(POD_IP)") && e.contains("status.podIP"), "{e}");

        let mut bad = ds.clone();
        bad.spec.template.spec.containers[0].readiness_probe = Some(ProbeYaml {
            exec: None,
            timeout_seconds: None,
            other: BTreeMap::from([("httpGet".to_string(), serde_yaml::Value::Null)]),
        });
        let e = err(&bad);
        assert!(e.contains("readinessProbe"), "{e}");
        // Nothing was created by any of them.
        assert!(!layout.run_netfault.exists());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn flags_in_both_forms() {
        let argv: Vec<String> = ["--a", "1", "--b=2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(flag_value(&argv, "--a").as_deref(), Some("1"));
        assert_eq!(flag_value(&argv, "--b").as_deref(), Some("2"));
        assert_eq!(flag_value(&argv, "--c"), None);
    }
}
