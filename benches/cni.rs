//! The netfault CNI plugin process alone: how long ADD and DEL take, with the
//! agent up and with it down (the fail-open path), side by side with the
//! reference `bridge` plugin in the same chain, and where the time goes.
//!
//! Run (as root), from the workspace root:
//!
//! ```text
//! cargo build --release --workspace && cargo bench --bench cni
//! ```
//!
//! `cargo bench` does not build the plugin and agent binaries: build them
//! first (the bench runs `target/release/netfault` and `netfaultd`). It
//! prints numbers side by side with the goal (plugin p99 <= 2 ms); it does not
//! pass or fail on them. As non-root it prints one line and exits 0. About a
//! minute or two. `NETFAULT_CNI_BENCH_PODS` sets the number of pods per node
//! (default 200).
//!
//! Two builds of the plugin run side by side, alternately: the workspace's
//! (`target/release/netfault`, dynamically linked, as `cargo build` makes
//! it) and a static one that the bench builds first (`RUSTFLAGS='-C
//! target-feature=+crt-static' cargo build --release -p netfault-cni
//! --target <arch>-unknown-linux-gnu`, into the same target dir; see
//! docs/design.md, "CNI plugin speed"); `NETFAULT_CNI_BENCH_STATIC=0` leaves
//! it out. `NETFAULT_CNI_BENCH_PLUGIN=PATH` adds a third binary, named
//! `given` (an older build, for a before/after).
//!
//! Two nodes, chain bridge (+ host-local) then netfault: one whose agent runs
//! (`failurePolicy: ignore`), one whose socket has no listener (ADD records the
//! enrolment in the pending dir and succeeds). Pods are added alternately on
//! the two nodes; each node keeps [`POPULATION`] pods enrolled (a new pod's
//! ADD, then the oldest pod's DEL), so the agent's state holds a node's worth
//! of sandboxes. The agent's dir (socket, state, pending) is on tmpfs
//! (`/dev/shm`), as `/run/netfault` is on a node.
//!
//! The bench runs the chain itself, as a runtime does: each plugin is a child
//! spawned by a thread that has entered the node's netns (`posix_spawn`, a
//! vfork, as Go's `os/exec` in containerd does), with the libcni env and
//! stdin of the testbed's `Node`; a process is timed from spawn to exit with
//! its stdin written and its output read. The breakdown, per pod on the node
//! with the agent:
//! - the spawn floor: static busybox `true`, and `/bin/true` (a minimal
//!   dynamically linked program), spawned the same way;
//! - `netfault VERSION`: exec, dynamic linking, `main`, reading stdin and
//!   printing, with no socket: the floor of any run of the plugin;
//! - the same enrolment `PUT` and the release `DELETE`, sent by this process
//!   on a fresh connection (the plugin's own client): the agent's part;
//! - `GET /healthz` from this process: the socket round trip and the agent's
//!   HTTP path, with no work behind it;
//! - the plugin's ADD again on the same pod after that release (a settled
//!   pod), and once more (the agent finds it enrolled and answers at once).
//!
//! Bench honesty (issue 13):
//! - rotation: for each pod index, the (build, node) configurations run in an
//!   order rotated by one from the previous pod's;
//! - verification: after every measured ADD, the agent lists the sandbox
//!   (node with the agent) or the plugin left its pending enrolment
//!   (`pending/ID.json`, node without); after every DEL, neither is left.
//!   Otherwise "NOT VERIFIED" and exit 1;
//! - paired medians: each pod's netfault ADD is paired with the `bridge` ADD
//!   of the same pod, just before it in the same chain; the ratio netfault /
//!   bridge is printed as the median [IQR] over the pods, per build and node;
//! - "p99" only over at least 100 pods, else "max".

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Display;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netfault_api::{Client, EnrolRequest, PodRef};
use serde_json::Value;
use testbed::{in_netns, ms, quantile, unique_name, Agent, Netns, Node, NodeOptions, Pod};

/// Pods each node keeps enrolled while the bench adds and deletes others.
const POPULATION: usize = 30;
/// Pods per node, unless `NETFAULT_CNI_BENCH_PODS` says otherwise.
const DEFAULT_PODS: usize = 200;
/// Unrecorded pods per node first (page cache, the agent's first enrolment).
const WARMUP: usize = 5;
/// The static program of the spawn floor.
const BUSYBOX: &str = "/bin/busybox";

type R<T> = Result<T, String>;

trait Ctx<T> {
    fn ctx(self, what: &str) -> R<T>;
}

impl<T, E: Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &str) -> R<T> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

fn main() {
    testbed::bench_main("cni", run);
}

/// Samples in milliseconds, by row label, in the order rows were first added.
#[derive(Default)]
struct Samples {
    rows: Vec<(String, Vec<f64>)>,
}

impl Samples {
    fn push(&mut self, label: &str, d: Duration) {
        match self.rows.iter_mut().find(|(l, _)| l == label) {
            Some((_, v)) => v.push(ms(d)),
            None => self.rows.push((label.to_string(), vec![ms(d)])),
        }
    }

    fn get(&self, label: &str) -> &[f64] {
        self.rows
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, v)| v.as_slice())
            .unwrap_or_default()
    }
}

fn p(v: &[f64], q: f64) -> f64 {
    quantile(v, q).unwrap_or(f64::NAN)
}

fn pods_per_node() -> R<usize> {
    match std::env::var("NETFAULT_CNI_BENCH_PODS") {
        Ok(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("NETFAULT_CNI_BENCH_PODS: a positive number, got {s:?}")),
        Err(_) => Ok(DEFAULT_PODS),
    }
}

/// A directory on tmpfs, removed with its content on drop.
struct ShmDir(PathBuf);

impl ShmDir {
    fn new() -> R<ShmDir> {
        use std::os::unix::fs::DirBuilderExt;
        let path = Path::new("/dev/shm").join(unique_name("nfcnb"));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(path.join("down"))
            .ctx(&format!("creating {}", path.display()))?;
        Ok(ShmDir(path))
    }
}

impl Drop for ShmDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("cni bench: cannot remove {}: {e}", self.0.display());
        }
    }
}

/// What one process did.
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Spawns `program` from a thread inside `netns` with exactly `env` (plus
/// `PATH`) and `stdin`, and waits for it. Without `pre_exec`, std spawns
/// with `posix_spawn` (a vfork), as a Go runtime execs CNI plugins.
fn spawn_in(
    netns: &Path,
    program: &Path,
    args: &[&str],
    env: &[(String, String)],
    stdin: &[u8],
) -> R<Ran> {
    let what = format!("running {}", program.display());
    in_netns(netns, || -> R<Ran> {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().ctx(&what)?;
        if let Some(mut input) = child.stdin.take() {
            // EPIPE: the program did not read its stdin; its output says why.
            let _ = input.write_all(stdin);
        }
        let out = child.wait_with_output().ctx(&what)?;
        Ok(Ran {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: started.elapsed(),
        })
    })
    .ctx(&what)?
}

/// One of the two nodes, its label, and the pods it keeps.
struct Bench<'a> {
    node: &'a Node,
    /// The netfault build to run now.
    build: &'a Build,
    label: &'static str,
    agent: Option<Client>,
    live: VecDeque<Pod>,
}

impl Bench<'_> {
    /// Runs `command` of one chain entry for `pod`, as libcni would.
    fn plugin(&self, plugin: &str, command: &str, pod: &Pod, prev: Option<&Value>) -> R<Ran> {
        let entry = self
            .node
            .plugin_entry(plugin)
            .ok_or_else(|| format!("the conflist has no {plugin}"))?;
        let conf = self.node.build_conf(&entry, prev, &BTreeMap::new());
        let bin = match plugin {
            "netfault" => self.build.path.clone(),
            other => self.node.bin_dir().join(other),
        };
        let ran = spawn_in(
            self.node.netns().path(),
            &bin,
            &[],
            &self.node.pod_env(command, pod),
            conf.to_string().as_bytes(),
        )?;
        if !ran.ok {
            return Err(format!(
                "{plugin} {command} failed on the node {}: {} {}",
                self.label, ran.stdout, ran.stderr
            ));
        }
        Ok(ran)
    }

    /// ADD of a new pod through the chain (bridge, then netfault with bridge's
    /// result); records each plugin's time.
    fn add(&mut self, name: &str, s: Option<&mut Samples>) -> R<()> {
        let netns = Netns::create(&format!("{}-{name}", unique_name("nfpod")))
            .ctx("creating a pod netns")?;
        let container_id: String = (0..32)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        let uid = format!("{:032x}", rand::random::<u128>());
        let mut pod = Pod {
            name: name.to_string(),
            namespace: "default".into(),
            cni_args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={uid}"
            ),
            uid,
            container_id,
            ifname: "eth0".into(),
            netns,
            ips: Vec::new(),
            result: Value::Null,
        };
        let bridge = self.plugin("bridge", "ADD", &pod, None)?;
        let result: Value = serde_json::from_str(bridge.stdout.trim()).ctx("bridge's result")?;
        let netfault = self.plugin("netfault", "ADD", &pod, Some(&result))?;
        let printed: Value =
            serde_json::from_str(netfault.stdout.trim()).ctx("netfault's result")?;
        self.verify(&pod, true)?;
        if printed != result {
            return Err(format!(
                "netfault ADD changed prevResult: {result} became {printed}"
            ));
        }
        pod.ips = result["ips"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        pod.result = result;
        if let Some(s) = s {
            s.push(
                &format!("{}: netfault ADD, {}", self.build.name, self.label),
                netfault.elapsed,
            );
            s.push(&format!("bridge ADD, {}", self.label), bridge.elapsed);
            // The same bridge time again, keyed by build, paired
            // index by index with this build's netfault ADD.
            s.push(
                &format!("bridge ADD, {} build, {}", self.build.name, self.label),
                bridge.elapsed,
            );
            if let Some(c) = &self.agent {
                self.breakdown(c, &pod, s)?;
            }
        }
        self.live.push_back(pod);
        Ok(())
    }

    /// DEL of the oldest pod: netfault, then bridge (the chain reversed).
    fn del_oldest(&mut self, s: Option<&mut Samples>) -> R<()> {
        let Some(pod) = self.live.pop_front() else {
            return Ok(());
        };
        let netfault = self.plugin("netfault", "DEL", &pod, Some(&pod.result))?;
        self.verify(&pod, false)?;
        let bridge = self.plugin("bridge", "DEL", &pod, Some(&pod.result))?;
        if let Some(s) = s {
            s.push(
                &format!("{}: netfault DEL, {}", self.build.name, self.label),
                netfault.elapsed,
            );
            s.push(&format!("bridge DEL, {}", self.label), bridge.elapsed);
        }
        Ok(())
    }

    /// That the plugin did what the node's configuration says, outside the
    /// timing: with the agent, the sandbox is enrolled (`enrolled`) or not;
    /// without, its pending enrolment exists or not.
    fn verify(&self, pod: &Pod, enrolled: bool) -> R<()> {
        let id = &pod.container_id;
        let (seen, what) = match &self.agent {
            Some(c) => {
                let list = c
                    .call("GET", "/v1/sandboxes", None)
                    .ctx("GET /v1/sandboxes")?;
                let seen = list
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|s| s["id"] == id.as_str());
                (seen, "the agent lists the sandbox")
            }
            None => {
                let path =
                    netfault_api::wire::pending_dir(self.node.socket()).join(format!("{id}.json"));
                (path.exists(), "its pending enrolment exists")
            }
        };
        testbed::verify(seen == enrolled, || {
            format!(
                "{}, {}: after {}, {what}: {seen}, expected {enrolled}",
                self.build.name,
                self.label,
                if enrolled { "ADD" } else { "DEL" }
            )
        })
        .map_err(|e| e.to_string())
    }

    /// The parts of a netfault ADD, measured separately on a pod just added.
    fn breakdown(&self, client: &Client, pod: &Pod, s: &mut Samples) -> R<()> {
        let ns = self.node.netns().path();
        for (label, program, args) in [
            ("spawn floor: static busybox true", BUSYBOX, &["true"][..]),
            (
                "spawn floor: /bin/true (dynamic libc)",
                "/bin/true",
                &[][..],
            ),
        ] {
            let ran = spawn_in(ns, Path::new(program), args, &[], b"")?;
            if !ran.ok {
                return Err(format!("{program} failed: {}", ran.stderr));
            }
            s.push(label, ran.elapsed);
        }
        let version = spawn_in(
            ns,
            &self.build.path,
            &[],
            &[("CNI_COMMAND".into(), "VERSION".into())],
            br#"{"cniVersion":"1.0.0"}"#,
        )?;
        if !version.ok {
            return Err(format!("netfault VERSION failed: {}", version.stderr));
        }
        s.push(
            &format!(
                "{}: netfault VERSION (exec + start, no socket)",
                self.build.name
            ),
            version.elapsed,
        );

        let t = Instant::now();
        let health = client.raw("GET", "/healthz", None).ctx("GET /healthz")?;
        s.push("GET /healthz round trip", t.elapsed());
        if health.status != 200 {
            return Err(format!("GET /healthz answered {}", health.status));
        }

        let path = format!("/v1/sandboxes/{}", pod.container_id);
        let t = Instant::now();
        client.call("DELETE", &path, None).ctx("DELETE sandbox")?;
        s.push("DELETE sandbox round trip (agent releases)", t.elapsed());

        let req = EnrolRequest {
            netns: pod.netns_path().to_string_lossy().into_owned(),
            ifname: pod.ifname.clone(),
            ips: pod.ips.iter().map(ToString::to_string).collect(),
            pod: Some(PodRef {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                uid: pod.uid.clone(),
            }),
            annotations: BTreeMap::new(),
        };
        let body = serde_json::to_value(&req).ctx("encoding the enrolment")?;
        let t = Instant::now();
        client.call("PUT", &path, Some(&body)).ctx("PUT sandbox")?;
        s.push("PUT sandbox round trip (agent enrols)", t.elapsed());

        // The plugin's ADD again, on the settled pod, after the same release.
        client.call("DELETE", &path, None).ctx("DELETE sandbox")?;
        let again = self.plugin("netfault", "ADD", pod, Some(&pod.result))?;
        s.push(
            &format!(
                "{}: netfault ADD again, same pod, agent up",
                self.build.name
            ),
            again.elapsed,
        );
        // Once more: the agent finds the sandbox enrolled and answers at once.
        let known = self.plugin("netfault", "ADD", pod, Some(&pod.result))?;
        s.push(
            &format!(
                "{}: netfault ADD again, already enrolled, agent up",
                self.build.name
            ),
            known.elapsed,
        );
        Ok(())
    }
}

/// The binary's size and whether it has an ELF interpreter (a dynamic
/// loader), for the header.
fn describe(bin: &Path) -> String {
    let Ok(bytes) = std::fs::read(bin) else {
        return format!("{} (unreadable)", bin.display());
    };
    let kind = match elf_interp(&bytes) {
        Some(true) => "dynamically linked",
        Some(false) => "static",
        None => "not a 64-bit ELF",
    };
    format!("{} ({} KiB, {kind})", bin.display(), bytes.len() / 1024)
}

/// Whether a 64-bit little-endian ELF file has a `PT_INTERP` program header.
fn elf_interp(b: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if b.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let phoff = usize::try_from(u64::from_le_bytes(b.get(0x20..0x28)?.try_into().ok()?)).ok()?;
    let (size, count) = (usize::from(u16_at(0x36)?), usize::from(u16_at(0x38)?));
    let mut interp = false;
    for i in 0..count {
        let at = phoff + i * size;
        interp |= u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) == PT_INTERP;
    }
    Some(interp)
}

/// A build of the plugin.
struct Build {
    name: &'static str,
    path: PathBuf,
}

/// The builds to compare: the workspace's, a static one unless
/// `NETFAULT_CNI_BENCH_STATIC=0`, and `NETFAULT_CNI_BENCH_PLUGIN` if set.
fn builds() -> Vec<Build> {
    let mut builds = vec![Build {
        name: "workspace",
        path: testbed::workspace_bin("netfault"),
    }];
    if std::env::var_os("NETFAULT_CNI_BENCH_STATIC").is_none_or(|v| v != "0") {
        match build_static() {
            Ok(path) => builds.push(Build {
                name: "static",
                path,
            }),
            Err(e) => eprintln!("cni bench: no static build: {e}"),
        }
    }
    if let Some(path) = std::env::var_os("NETFAULT_CNI_BENCH_PLUGIN") {
        builds.push(Build {
            name: "given",
            path: PathBuf::from(path),
        });
    }
    builds
}

/// Builds the plugin with glibc linked statically, in the profile and target
/// dir of the workspace binaries; its path.
fn build_static() -> R<PathBuf> {
    let workspace = testbed::workspace_bin("netfault");
    let bin_dir = workspace.parent().ok_or("no bin dir")?;
    let profile = bin_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("no profile dir")?;
    let target_dir = bin_dir.parent().ok_or("no target dir")?;
    let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building the static plugin ({triple}, crt-static) ...");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "build",
            "--quiet",
            "-p",
            "netfault-cni",
            "--bin",
            "netfault",
        ])
        .args(["--target", &triple])
        .env("CARGO_TARGET_DIR", target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd.output().ctx("running cargo")?;
    if !out.status.success() {
        return Err(format!(
            "cargo build failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let path = target_dir.join(&triple).join(profile).join("netfault");
    match std::fs::read(&path).ok().as_deref().and_then(elf_interp) {
        Some(false) => Ok(path),
        _ => Err(format!("{} is not a static ELF", path.display())),
    }
}

fn run() -> R<()> {
    let pods = pods_per_node()?;
    let builds = builds();
    println!(
        "== netfault CNI plugin process alone: {pods} pods per node and build, {POPULATION} kept enrolled"
    );
    for b in &builds {
        println!("   {:<10} {}", format!("{}:", b.name), describe(&b.path));
    }
    // Drop order (reverse of declaration): pods go with the benches, then
    // the nodes, the agent, and the tmpfs dir.
    let shm = ShmDir::new()?;
    let agent = Agent::start(&shm.0).ctx("starting netfaultd")?;
    let up = Node::new(NodeOptions {
        socket: agent.socket(),
        ..NodeOptions::default()
    })
    .ctx("creating the node with the agent")?;
    let down = Node::new(NodeOptions {
        socket: shm.0.join("down").join("netfaultd.sock"),
        ..NodeOptions::default()
    })
    .ctx("creating the node without an agent")?;
    let mut benches = [
        Bench {
            node: &up,
            build: &builds[0],
            label: "agent up",
            agent: Some(agent.client().with_timeout(Duration::from_secs(2))),
            live: VecDeque::new(),
        },
        Bench {
            node: &down,
            build: &builds[0],
            label: "agent down",
            agent: None,
            live: VecDeque::new(),
        },
    ];
    let mut s = Samples::default();
    eprintln!("warming up and filling each node with {POPULATION} pods ...");
    for i in 0..WARMUP + POPULATION {
        for b in benches.iter_mut() {
            b.add(&format!("fill-{i}"), None)?;
            if i < WARMUP {
                b.del_oldest(None)?;
            }
        }
    }
    eprintln!("measuring ...");
    let configs: Vec<(usize, usize)> = (0..builds.len())
        .flat_map(|b| (0..benches.len()).map(move |n| (b, n)))
        .collect();
    for i in 0..pods {
        for k in testbed::rotation(i, configs.len()) {
            let (build, node) = configs[k];
            let b = &mut benches[node];
            b.build = &builds[build];
            b.add(&format!("pod-{i}"), Some(&mut s))?;
            b.del_oldest(Some(&mut s))?;
        }
    }
    for b in benches.iter_mut() {
        while !b.live.is_empty() {
            b.del_oldest(None)?;
        }
    }
    let left = agent.sandboxes().ctx("listing sandboxes")?;
    if !left.is_empty() {
        return Err(format!(
            "{} sandboxes still enrolled after every DEL",
            left.len()
        ));
    }
    let pending = shm.0.join("down").join("pending");
    let left = std::fs::read_dir(&pending).map(|d| d.count()).unwrap_or(0);
    if left != 0 {
        return Err(format!(
            "{left} pending enrolments left in {} after every DEL",
            pending.display()
        ));
    }
    report(&s, &builds, pods);
    Ok(())
}

fn report(s: &Samples, builds: &[Build], pods: usize) {
    // Every row has `pods` samples: p99 over at least 100, else only max.
    let has_p99 = pods >= testbed::P99_MIN_SAMPLES;
    let row = |label: &str, v: &[f64], note: &str| {
        let p99 = if has_p99 {
            format!(" {:>7.2}", p(v, 0.99))
        } else {
            String::new()
        };
        println!(
            "   {label:<52} {:>7.2}{p99} {:>7.2}{note}",
            p(v, 0.5),
            v.iter().copied().fold(f64::NAN, f64::max)
        );
    };
    println!(
        "\n   {:<52} {:>7}{} {:>7}",
        "process time, ms",
        "p50",
        if has_p99 { "     p99" } else { "" },
        "max"
    );
    for label in ["agent up", "agent down"] {
        for cmd in ["ADD", "DEL"] {
            for b in builds {
                let nf = s.get(&format!("{}: netfault {cmd}, {label}", b.name));
                let t = testbed::tail(nf);
                let goal = format!(
                    "   goal p99 <= 2 ms: {}{}",
                    if t.value <= 2.0 { "met" } else { "NOT met" },
                    if has_p99 {
                        ""
                    } else {
                        " (by the max: under 100 pods)"
                    }
                );
                row(&format!("{}: netfault {cmd}, {label}", b.name), nf, &goal);
            }
            row(
                &format!("  bridge {cmd} (yardstick), same chain"),
                s.get(&format!("bridge {cmd}, {label}")),
                "",
            );
        }
    }
    println!("\n   breakdown (node with the agent), ms");
    for (label, v) in &s.rows {
        if !label.contains(", agent") || label.contains(" again") {
            row(label, v, "");
        }
    }
    let put = p(s.get("PUT sandbox round trip (agent enrols)"), 0.5);
    for b in builds {
        let add = p(s.get(&format!("{}: netfault ADD, agent up", b.name)), 0.5);
        let floor = p(
            s.get(&format!(
                "{}: netfault VERSION (exec + start, no socket)",
                b.name
            )),
            0.5,
        );
        println!(
            "   p50, {}: ADD {add:.2} = plugin process floor {floor:.2} + enrol round trip {put:.2} + the rest {:.2}",
            b.name,
            add - floor - put
        );
    }
    println!(
        "\n   netfault ADD / bridge ADD of the same pod (paired), median [IQR] over {pods} pods:"
    );
    for label in ["agent up", "agent down"] {
        for b in builds {
            let ratios = testbed::paired_ratios(
                s.get(&format!("{}: netfault ADD, {label}", b.name)),
                s.get(&format!("bridge ADD, {} build, {label}", b.name)),
            );
            println!(
                "   {:<52} x{}",
                format!("{}, {label}", b.name),
                testbed::Spread::of(&ratios).iqr(2)
            );
        }
    }
    if has_p99 {
        println!(
            "   ({pods} samples per row and build; p99 is the value at rank round(0.99 (n - 1)))"
        );
    } else {
        println!("   ({pods} samples per row and build: under 100, so no p99, the max)");
    }
}
