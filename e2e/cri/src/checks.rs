//! What a node leaves on the host, and the sweeping of it: shims, the
//! cgroup parent, mounts, CNI cache entries. [`Footprint::leftovers`] lists
//! whatever of a node still exists after it was dropped.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where libcni (containerd 1.6's CNI library) caches ADD results; not
/// configurable in 1.6. Entries are `<network>-<container id>-<ifname>`.
pub const CNI_CACHE_DIR: &str = "/var/lib/cni/results";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Everything of a node that lives outside its private dir, or is the dir:
/// take it with [`crate::Node::footprint`] before dropping the node.
#[derive(Debug, Clone)]
pub struct Footprint {
    pub dir: PathBuf,
    pub node_netns: PathBuf,
    pub pod_netns: Vec<PathBuf>,
    pub network: String,
    pub sandbox_ids: Vec<String>,
    pub cgroup_parent: String,
    pub containerd_socket: PathBuf,
}

impl Footprint {
    /// What of the node still exists: its dir, its netns files, mounts
    /// under its dir, CNI cache entries, cgroups, processes that name its
    /// dir on their command line (containerd, shims). Empty when clean.
    pub fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.dir.exists() {
            out.push(format!("node dir {}", self.dir.display()));
        }
        for m in mounts_under(&self.dir) {
            out.push(format!("mount {}", m.display()));
        }
        for p in std::iter::once(&self.node_netns).chain(&self.pod_netns) {
            if p.exists() {
                out.push(format!("netns {}", p.display()));
            }
        }
        for e in node_cni_cache(&self.network, &self.sandbox_ids) {
            out.push(format!("CNI cache {}", e.display()));
        }
        for id in &self.sandbox_ids {
            if let Some(s) = shim_socket(&self.containerd_socket, id).filter(|s| s.exists()) {
                out.push(format!("shim socket {}", s.display()));
            }
        }
        for c in cgroup_dirs(&self.cgroup_parent) {
            out.push(format!("cgroup {}", c.display()));
        }
        let needle = self.dir.to_string_lossy().into_owned();
        for (pid, cmd) in processes() {
            if cmd.contains(&needle) {
                out.push(format!("process {pid}: {cmd}"));
            }
        }
        out
    }
}

/// (pid, command line with spaces) of every process.
pub fn processes() -> Vec<(u32, String)> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let raw = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ");
            Some((pid, cmd))
        })
        .collect()
}

/// The engine threads of the delay holder processes among `processes`
/// (pid, command line): a thread per sandbox queue the holder serves, named
/// `q` and the queue number in hex. An idle holder has none.
pub fn holder_engines(processes: &[(u32, String)]) -> Vec<(u32, String)> {
    processes
        .iter()
        .filter(|(_, cmd)| cmd.contains("delay-holder"))
        .flat_map(|(pid, _)| {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|c| c.trim().to_string())
                .filter(|c| {
                    c.len() > 1
                        && c.starts_with('q')
                        && c[1..].bytes().all(|b| b.is_ascii_hexdigit())
                })
                .map(|c| (*pid, c))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The shims of the containerd serving `socket` (`-address SOCKET` on
/// their command line).
pub fn shim_pids(socket: &Path) -> Vec<u32> {
    let sock = socket.to_string_lossy().into_owned();
    processes()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("containerd-shim") && cmd.contains(&sock))
        .map(|(pid, _)| pid)
        .collect()
}

/// Mount points at or below `dir` (from /proc/self/mountinfo), shallowest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    out.sort_by_key(|p| p.components().count());
    out.dedup();
    out
}

fn unescape_mountinfo(s: &str) -> String {
    // Spaces, tabs, newlines and backslashes are octal-escaped.
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The CNI result cache entries of `network`.
pub fn cni_cache_entries(network: &str) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(CNI_CACHE_DIR) else {
        return Vec::new();
    };
    let prefix = format!("{network}-");
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

/// A node's CNI result cache entries: its network's, and those of
/// containerd's built-in `cni-loopback` network for its sandboxes.
pub fn node_cni_cache(network: &str, sandbox_ids: &[String]) -> Vec<PathBuf> {
    let mut out = cni_cache_entries(network);
    for e in cni_cache_entries("cni-loopback") {
        let name = e
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if sandbox_ids.iter().any(|id| name.contains(id.as_str())) {
            out.push(e);
        }
    }
    out
}

/// Removes a node's CNI result cache entries ([`node_cni_cache`]).
pub fn remove_cni_cache(network: &str, sandbox_ids: &[String]) {
    for e in node_cni_cache(network, sandbox_ids) {
        let _ = std::fs::remove_file(&e);
    }
}

/// The shim socket containerd 1.6 uses for a sandbox:
/// `/run/containerd/s/<sha256 of "<containerd socket>/k8s.io/<id>">` (a
/// fixed dir, whatever the config says). `None` if `sha256sum` fails.
pub fn shim_socket(containerd_socket: &Path, id: &str) -> Option<PathBuf> {
    use std::io::Write;
    let key = containerd_socket.join("k8s.io").join(id);
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    child
        .stdin
        .take()?
        .write_all(key.as_os_str().as_encoded_bytes())
        .ok()?;
    let out = child.wait_with_output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text.split_whitespace().next()?;
    Some(Path::new("/run/containerd/s").join(hex))
}

/// The cgroup dirs named `parent` in every mounted hierarchy.
pub fn cgroup_dirs(parent: &str) -> Vec<PathBuf> {
    let rel = parent.trim_start_matches('/');
    if rel.is_empty() {
        return Vec::new();
    }
    let Ok(rd) = std::fs::read_dir(CGROUP_ROOT) else {
        return Vec::new();
    };
    rd.flatten()
        .map(|e| e.path().join(rel))
        .filter(|p| p.is_dir())
        .collect()
}

/// Kills what runs under the cgroup parent and removes its cgroups,
/// deepest first (retrying while killed processes exit).
pub fn remove_cgroup_parent(parent: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let dirs = cgroup_dirs(parent);
        if dirs.is_empty() {
            return;
        }
        let mut all = Vec::new();
        for d in &dirs {
            walk_dirs(d, &mut all);
        }
        all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for d in &all {
            if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            let _ = std::fs::remove_dir(d);
        }
        if Instant::now() > deadline {
            for d in cgroup_dirs(parent) {
                eprintln!("e2e-cri: cannot remove cgroup {}", d.display());
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn walk_dirs(d: &Path, out: &mut Vec<PathBuf>) {
    out.push(d.to_path_buf());
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk_dirs(&e.path(), out);
            }
        }
    }
}

/// The mount that holds `path` (the longest mount point that is a prefix
/// of it; the last such entry, which is the visible one): its mount point
/// and whether it is shared or a slave (the propagation containerd needs
/// for `HostToContainer`).
pub fn mount_of(path: &Path) -> Option<(PathBuf, bool)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<(PathBuf, bool)> = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(mp) = fields.get(4).map(|m| PathBuf::from(unescape_mountinfo(m))) else {
            continue;
        };
        if !path.starts_with(&mp) {
            continue;
        }
        let optional = fields
            .iter()
            .skip(6)
            .take_while(|f| **f != "-")
            .any(|f| f.starts_with("shared:") || f.starts_with("master:"));
        let longer = best
            .as_ref()
            .is_none_or(|(b, _)| mp.components().count() >= b.components().count());
        if longer {
            best = Some((mp, optional));
        }
    }
    best
}

/// netfault's entries in bpffs (it pins nothing; any entry is a leak).
pub fn bpffs_netfault() -> Vec<String> {
    fn walk(d: &Path, out: &mut Vec<String>) {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                let p = e.path();
                if p.to_string_lossy().contains("netfault") {
                    out.push(p.display().to_string());
                }
                if p.is_dir() {
                    walk(&p, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/bpf"), &mut out);
    out
}
