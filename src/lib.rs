//! testbed: a CNI runtime test harness for netfault, without a cluster.
//!
//! It builds what a Kubernetes node has, inside network namespaces the test
//! owns, and drives it the way containerd does:
//!
//! - [`Netns`]: a named network namespace at `/var/run/netns/NAME`, created
//!   with `unshare` + a bind mount (no `ip`), removed on drop.
//! - [`Node`]: a simulated node: its own netns with a bridge, a CNI bin dir
//!   (the reference plugins from `/usr/lib/cni` plus the workspace's
//!   `netfault`), a conflist, host-local IPAM state and a libcni-style result
//!   cache, all in a temp dir. [`Node::add_pod`] runs the ADD chain exactly as
//!   libcni does (env vars, injected `name`/`cniVersion`/`prevResult`,
//!   `runtimeConfig` for declared capabilities), with every plugin process in the
//!   node netns; [`Node::del_pod`] runs DEL in reverse with the cached result.
//! - [`Agent`]: a real `netfaultd` on a socket in a temp dir; [`AgentNode`]:
//!   a node whose netfault entry talks to one.
//! - DNS ([`dnsserver`]): a dnsmasq serving a test zone in a pod, and real
//!   clients run in a pod (`dig`, glibc's resolver, a timed UDP sender).
//! - Traffic: [`udp_probe`], [`tcp_listen`], [`tcp_connect_ok`], [`tcp_echo`],
//!   real sockets opened inside the pods' namespaces; [`http_serve`] and
//!   [`http_get`] for HTTP.
//!
//! Test addresses: 198.18.0.0/24 and `fd00:xxxx:xxxx:xxxx::/64`, only inside
//! namespaces a test created. Everything is torn down on drop, also on panic,
//! and names are unique so tests run in parallel.
//!
//! The plugin and agent binaries are found next to the test executable
//! ([`workspace_bin`]); [`ensure_workspace_bins`] builds them first.

mod agent;
mod agent_node;
pub mod apiserver;
pub mod dnsserver;
mod error;
mod http;
mod netns;
mod node;
pub mod procstat;
mod stats;
mod tmp;
mod traffic;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

pub use agent::Agent;
pub use agent_node::AgentNode;
pub use apiserver::ApiServer;
pub use error::{Error, PluginError, Result};
pub use http::{http_get, http_serve, HttpReply, HttpServer};
pub use netns::{in_netns, remove_stale_netns, spawn_in_netns, Netns};
pub use node::{AddTiming, Node, NodeOptions, PluginOutput, Pod};
pub use stats::{
    ms, paired_diffs, paired_percent, paired_ratios, quantile, rotation, summary_ms, tail,
    tail_label, verify, NotVerified, Spread, Tail, P99_MIN_SAMPLES,
};
pub use tmp::TempDir;
pub use traffic::{
    tcp_connect_ok, tcp_echo, tcp_listen, udp_probe, udp_probe_ext, udp_probe_with, unspecified,
    Ipv6ExtHeader, ProbeOptions, TcpServer, UdpProbe,
};

/// Resident memory (`VmRSS`) of a process, in KiB; 0 if it cannot be read.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// True when running as root (effective uid 0).
/// The environment variable `name` parsed as a `T` (a bench's knob), or
/// `default` when it is unset or does not parse.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Returns early from a test, with a one-line message, unless running as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!("skipped: requires root");
            return;
        }
    };
}

static NAME_COUNTER: AtomicU32 = AtomicU32::new(0);

fn base36(mut n: u32, width: usize) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A name unique across processes and calls, short enough for an interface
/// name (at most 15 characters): up to 5 characters of `prefix` (letters,
/// digits, `-`), then in base 36 the pid (5 characters), a per-process
/// counter (2) and 3 random characters. [`owner_pid`] reads the pid back.
pub fn unique_name(prefix: &str) -> String {
    let prefix: String = prefix
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(5)
        .collect();
    let pid = std::process::id() % 36u32.pow(5);
    let n = NAME_COUNTER.fetch_add(1, Ordering::Relaxed) % 36u32.pow(2);
    let r = rand::random::<u32>() % 36u32.pow(3);
    format!("{prefix}{}{}{}", base36(pid, 5), base36(n, 2), base36(r, 3))
}

/// The pid encoded by [`unique_name`] in a name made with a 5-character prefix.
pub fn owner_pid(name: &str) -> Option<u32> {
    let digits = name.get(5..10)?;
    u32::from_str_radix(digits, 36).ok()
}

/// The path of a workspace binary: `target/{debug,release}/NAME`, derived from
/// the running executable (a test or bench in `target/*/deps`, or a binary in
/// `target/*`). The path may not exist; callers report that.
pub fn workspace_bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// `target/{debug,release}` of the running executable.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir
        .file_name()
        .is_some_and(|n| n == "deps" || n == "examples")
    {
        dir.pop();
    }
    dir
}

/// The workspace binaries the harness runs: (package, binary).
pub const WORKSPACE_BINS: &[(&str, &str)] = &[
    ("netfault-cni", "netfault"),
    ("netfault-agent", "netfaultd"),
    ("netfault-agent", "netfaultctl"),
];

static BUILT: OnceLock<std::result::Result<(), String>> = OnceLock::new();

/// Makes sure [`WORKSPACE_BINS`] are built and current, once per process.
///
/// `cargo test` only builds the binaries of packages that have integration
/// tests, so the harness runs `$CARGO build -p netfault-cni -p netfault-agent
/// --bins` itself (with the profile and target dir of the running executable;
/// about a second when nothing changed). Set `NETFAULT_TESTBED_NO_BUILD=1` to
/// skip it. If the build fails while all binaries exist, the existing ones are
/// used (with a warning); if one is missing, the build output is the error.
pub fn ensure_workspace_bins() -> Result<()> {
    let missing = || {
        WORKSPACE_BINS
            .iter()
            .filter(|(_, b)| !workspace_bin(b).exists())
            .map(|(_, b)| *b)
            .collect::<Vec<_>>()
    };
    let skip =
        std::env::var_os("NETFAULT_TESTBED_NO_BUILD").is_some_and(|v| !v.is_empty() && v != "0");
    let outcome = if skip {
        Ok(())
    } else {
        BUILT.get_or_init(build_workspace_bins).clone()
    };
    let missing = missing();
    match outcome {
        Ok(()) if missing.is_empty() => Ok(()),
        Ok(()) => Err(Error::Other(format!(
            "workspace binaries {missing:?} not found next to {}: run cargo build --workspace",
            bin_dir().display()
        ))),
        Err(e) if missing.is_empty() => {
            eprintln!("testbed: warning: rebuilding the workspace binaries failed; using the existing ones:\n{e}");
            Ok(())
        }
        Err(e) => Err(Error::Other(format!(
            "workspace binaries {missing:?} missing and the build failed:\n{e}"
        ))),
    }
}

fn build_workspace_bins() -> std::result::Result<(), String> {
    let profile_dir = bin_dir();
    let target_dir = profile_dir.parent().map(PathBuf::from);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("build")
        .arg("--bins");
    let mut pkgs: Vec<&str> = WORKSPACE_BINS.iter().map(|(p, _)| *p).collect();
    pkgs.dedup();
    for p in pkgs {
        cmd.args(["-p", p]);
    }
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    if let Some(t) = target_dir {
        cmd.arg("--target-dir").arg(t);
    }
    match cmd.output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{cmd:?} failed ({}):\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => Err(format!("cannot run {cmd:?}: {e}")),
    }
}

pub(crate) fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// Polls `f` every 20 ms until it is true (`true`) or `timeout` passes
/// (`false`).
pub fn eventually(timeout: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A random RFC 4122 version 4 UUID, as Kubernetes pod UIDs look.
pub fn random_uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

/// The `main` of an on-the-wire bench (`harness = false`): [`bench_ready`],
/// then `run`, then the total time; an error is printed as `BENCH bench failed: ERROR` (`{:#}`,
/// so an `anyhow` error shows its causes) and the process exits 1.
pub fn bench_main<E: std::fmt::Display>(
    bench: &str,
    run: impl FnOnce() -> std::result::Result<(), E>,
) {
    if !bench_ready(bench) {
        return;
    }
    let started = std::time::Instant::now();
    if let Err(e) = run() {
        eprintln!("{bench} bench failed: {e:#}");
        std::process::exit(1);
    }
    println!(
        "\ntotal bench time: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The start of every on-the-wire bench (`harness = false`): `false` (after
/// one line saying so) when not root; exits with a message when the
/// workspace binaries of this profile are missing (`cargo bench` does not
/// build them).
pub fn bench_ready(bench: &str) -> bool {
    if !is_root() {
        println!("{bench} bench skipped: requires root (network namespaces, eBPF, nftables)");
        return false;
    }
    for bin in ["netfaultd", "netfault"] {
        let path = workspace_bin(bin);
        if !path.exists() {
            eprintln!(
                "{bench} bench: {} not found. Build the workspace binaries in this profile first:\n  \
                 cargo build --release --workspace && cargo bench --bench {bench}",
                path.display()
            );
            std::process::exit(1);
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_short_and_distinct() {
        let names: std::collections::BTreeSet<String> =
            (0..200).map(|_| unique_name("nfbridge")).collect();
        assert_eq!(names.len(), 200);
        for n in &names {
            assert!(n.len() <= 15, "{n}");
            assert!(n.starts_with("nfbri"), "{n}");
        }
        assert!(unique_name("").len() <= 15);
        let n = unique_name("nfpod");
        assert_eq!(owner_pid(&n), Some(std::process::id()));
        assert_eq!(owner_pid("nfpo"), None);
    }

    #[test]
    fn bin_path_is_beside_the_target_dir() {
        let p = workspace_bin("netfault");
        assert_eq!(p.file_name().and_then(|n| n.to_str()), Some("netfault"));
        assert_ne!(
            p.parent()
                .and_then(|d| d.file_name())
                .and_then(|n| n.to_str()),
            Some("deps")
        );
    }

    #[test]
    fn ids() {
        assert_eq!(random_hex(32).len(), 64);
        let u = random_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(u.as_bytes()[14], b'4');
    }
}
