//! netfaultd: the netfault node agent.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use netfault_agent::cri::{Adopter, CriConfig};
use netfault_agent::kube::uninstall::{on_terminate, OwnerWatch, SelfRef, Shutdown};
use netfault_agent::kube::{KubeConfig, Source, Watch};
use netfault_agent::metrics::Metrics;
use netfault_agent::policy::Policy;
use netfault_agent::registry::{Config, Registry};
use netfault_agent::server::{serve, Api, SocketAccess, TokenFile};
use netfault_agent::succession::Start;

/// Bounds the connect to the runtime and each CRI call.
const CRI_CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Parser, Debug)]
#[command(
    name = "netfaultd",
    version,
    about = "netfault node agent: injects network faults into pod network namespaces"
)]
struct Args {
    /// Unix socket to serve the API on.
    #[arg(long, default_value = netfault_api::wire::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Group (name or numeric gid) whose members may use the API socket. The
    /// socket is mode 0660, owned by root; without this flag its group is
    /// root's (gid 0).
    #[arg(long, value_name = "NAME|GID")]
    socket_group: Option<String>,
    /// Directory for persisted state (survives agent restarts).
    #[arg(long, default_value = netfault_api::wire::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Policy: the longest fault duration accepted (longer: 403
    /// policy_denied on `duration`).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    max_duration: Duration,
    /// Policy: the most live faults one sandbox (pod) may have at once.
    #[arg(long, value_name = "N", default_value_t = netfault_agent::policy::DEFAULT_MAX_FAULTS_PER_POD)]
    max_faults_per_pod: usize,
    /// Policy: the highest loss a fault may cause, in percent (0-100): a
    /// loss's `percent`, the long-run loss of its Gilbert-Elliott model, and
    /// blackhole (which is 100).
    #[arg(long, value_name = "P", default_value = "100", value_parser = percent)]
    max_loss_percent: f64,
    /// Policy: a pod namespace that gets no faults (repeatable). Without
    /// this flag: kube-system and netfault. Given at least once, the list is
    /// exactly the values given; `--deny-namespace ""` alone denies none.
    #[arg(long, value_name = "NS", num_args = 1)]
    deny_namespace: Vec<String>,
    /// Policy: the file whose network namespace is the host's (never
    /// enrolled, never a target). In the DaemonSet (hostNetwork) pid 1's is
    /// the node's.
    #[arg(long, value_name = "PATH", default_value = netfault_agent::policy::HOST_NETNS, hide = true)]
    host_netns: PathBuf,
    /// How long expired faults remain listed.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    retain_expired: Duration,
    /// How long a hand-over may keep this agent frozen before it serves
    /// again (the new agent died before committing).
    #[arg(long, value_parser = positive_duration, default_value = "30s", hide = true)]
    handover_freeze_limit: Duration,
    /// The container runtime's CRI socket (containerd's, or CRI-O's
    /// /var/run/crio/crio.sock). Its ready pod sandboxes are adopted at start
    /// and when a target names an unknown pod; sandboxes it stops are
    /// released. An empty value ("") turns CRI adoption off.
    #[arg(long, value_name = "PATH", default_value = netfault_cri::CONTAINERD_SOCKET)]
    cri_socket: String,
    /// Time between two polls of the container runtime.
    #[arg(long, value_name = "D", default_value = "2s", value_parser = positive_duration)]
    cri_poll_interval: Duration,
    /// Also serve the API on this loopback TCP address (127.0.0.0/8 or ::1;
    /// port 0 picks one and logs it), for `kubectl port-forward`. Every
    /// request there needs `Authorization: Bearer <token>` (--token-file).
    #[arg(long, value_name = "ADDR:PORT", value_parser = netfault_agent::server::loopback_addr, requires = "token_file")]
    listen_tcp: Option<std::net::SocketAddr>,
    /// File holding the TCP listener's bearer token (whitespace trimmed;
    /// re-read when it changes, e.g. a Kubernetes Secret volume). A file
    /// that does not exist yet (an optional Secret not created) is not an
    /// error: the listener answers every request 503 until it appears. An
    /// existing file that is empty, malformed or unreadable stops the agent.
    #[arg(long, value_name = "PATH", requires = "listen_tcp")]
    token_file: Option<PathBuf>,
    /// This node's name: the agent watches the pods scheduled on it
    /// (`spec.nodeName`). Needs a Kubernetes client (in-cluster, or
    /// --kubeconfig).
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    node_name: Option<String>,
    /// A kubeconfig file to reach the API server with (its current
    /// context). Without it, the in-cluster configuration is used when
    /// KUBERNETES_SERVICE_HOST is set; with neither, the agent runs
    /// node-only.
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// The agent's own pod and namespace (downward API). With a Kubernetes
    /// client, SIGTERM asks the API server whether the pod's DaemonSet is
    /// gone or being deleted: then this is an uninstall, and every
    /// sandbox is released before the agent exits. Otherwise (a restart,
    /// an upgrade, any doubt) faults stay to their deadlines.
    #[arg(long, env = "POD_NAME", value_name = "NAME")]
    pod_name: Option<String>,
    #[arg(long, env = "POD_NAMESPACE", value_name = "NS")]
    pod_namespace: Option<String>,
}

/// How long SIGTERM waits for the API server's word on uninstalling.
const UNINSTALL_CHECK: Duration = Duration::from_secs(8);

/// The Kubernetes watch's configuration, or why the agent runs node-only.
fn kube_config(args: &Args) -> Result<KubeConfig, &'static str> {
    let source = match &args.kubeconfig {
        Some(p) => Some(Source::Kubeconfig(p.clone())),
        None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => Some(Source::InCluster),
        None => None,
    };
    let node = args.node_name.clone().filter(|n| !n.is_empty());
    match (source, node) {
        (Some(source), Some(node)) => Ok(KubeConfig { source, node }),
        (None, None) => Err("no Kubernetes client (no --kubeconfig, not in a cluster) and no --node-name"),
        (None, Some(_)) => Err("--node-name is set but there is no Kubernetes client (no --kubeconfig, not in a cluster)"),
        (Some(_), None) => Err("a Kubernetes client but no --node-name (or NODE_NAME): the pod watch needs this node's name"),
    }
}

/// A percentage from 0 to 100.
fn percent(value: &str) -> Result<f64, String> {
    match value.trim_end_matches('%').parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{value:?} is not a percentage from 0 to 100")),
    }
}

/// A duration of at least 1 ms (humantime syntax).
fn positive_duration(value: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(1) {
        return Err("must be at least 1ms".into());
    }
    Ok(d)
}

/// `--socket-group`: a numeric gid as is, a name through the group database.
fn socket_group(value: &str) -> anyhow::Result<nix::unistd::Gid> {
    if let Ok(gid) = value.parse::<u32>() {
        return Ok(nix::unistd::Gid::from_raw(gid));
    }
    match nix::unistd::Group::from_name(value) {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => anyhow::bail!("--socket-group {value}: no such group"),
        Err(e) => Err(e).with_context(|| format!("--socket-group {value}: looking up the group")),
    }
}

fn main() -> anyhow::Result<()> {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // The hidden subcommand the agent runs its packet holder
    // with (see `backend::nfqueue::holder`); not for users.
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(netfault_agent::backend::nfqueue::holder::SUBCOMMAND)
    {
        // One thread per sandbox's engine: two arenas, as the agent.
        limit_malloc_arenas();
        return netfault_agent::backend::nfqueue::holder::holder_main().context("the delay holder");
    }
    let args = Args::parse();
    limit_malloc_arenas();
    let access = SocketAccess {
        group: args.socket_group.as_deref().map(socket_group).transpose()?,
    };
    let token = args
        .token_file
        .as_deref()
        .map(TokenFile::open_or_wait)
        .transpose()?;
    let cri = (!args.cri_socket.is_empty()).then(|| CriConfig {
        socket: PathBuf::from(&args.cri_socket),
        poll: args.cri_poll_interval,
        call_timeout: CRI_CALL_TIMEOUT,
    });
    let kube = kube_config(&args);
    let me = match (&kube, &args.pod_name, &args.pod_namespace) {
        (Ok(cfg), Some(pod), Some(namespace)) if !pod.is_empty() && !namespace.is_empty() => {
            Some(SelfRef {
                source: cfg.source.clone(),
                namespace: namespace.clone(),
                pod: pod.clone(),
            })
        }
        _ => None,
    };
    raise_nofile();
    // Once: how the nft diversions are written (libnftables is loaded here).
    tracing::info!(nft = %netfault_sys::libnft::describe(), "nft commands run through");
    let deny: std::collections::BTreeSet<String> = if args.deny_namespace.is_empty() {
        netfault_agent::policy::DEFAULT_DENY
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        args.deny_namespace.iter().cloned().collect()
    };
    let policy = Policy::new(
        args.max_duration,
        args.max_faults_per_pod,
        args.max_loss_percent,
        deny,
        &args.host_netns,
    );
    tracing::info!(policy = %policy.capabilities(), "policy in effect");
    // One agent per state dir; a second one takes the node over (hand-over).
    let start = netfault_agent::succession::begin(&args.state_dir, &args.socket)
        .context("taking the node over")?;
    let registry = Arc::new(
        Registry::open(Config {
            state_dir: args.state_dir.clone(),
            policy,
            retain_expired: args.retain_expired,
            freeze_limit: args.handover_freeze_limit,
        })
        .context("starting the registry")?,
    );
    // Everything is installed beside the earlier agent, if any: it retires
    // now, and this one binds the socket below.
    let _state_lock = match start {
        Start::Alone(lock) => Some(lock),
        Start::Successor(s) => {
            netfault_agent::crash::point("handover.installed");
            s.commit().context("completing the hand-over")?;
            None
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Where the CNI plugin leaves enrolments it could not deliver.
    let pending = netfault_api::wire::pending_dir(&args.socket);
    registry.adopt_pending(&pending);
    rt.block_on(async move {
        let reaper = registry.clone();
        let mut background = Vec::new();
        background.push(tokio::spawn(async move {
            loop {
                let r = reaper.clone();
                let p = pending.clone();
                let next = tokio::task::spawn_blocking(move || {
                    r.adopt_pending(&p);
                    r.reap()
                })
                .await;
                let wait = match next {
                    Ok(Ok(Some(d))) => {
                        d.clamp(Duration::from_millis(5), Duration::from_millis(500))
                    }
                    Ok(Ok(None)) => Duration::from_millis(500),
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "expiring faults failed");
                        Duration::from_secs(1)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reaper task failed");
                        Duration::from_secs(1)
                    }
                };
                tokio::time::sleep(wait).await;
            }
        }));
        let owner = OwnerWatch::default();
        if let Some(me) = me.clone() {
            tokio::spawn(owner.clone().run(me));
        }
        match kube {
            Ok(cfg) => {
                tracing::info!(node = %cfg.node, source = ?cfg.source, "watching this node's pods");
                background.push(tokio::spawn(Watch::new(cfg, registry.clone()).run()));
            }
            Err(why) => {
                tracing::info!("node-only: {why}");
                registry.set_kubernetes_status(serde_json::json!({
                    "mode": "node-only",
                    "node": args.node_name,
                    "connected": false,
                    "last_error": null,
                    "reason": why,
                }));
            }
        }
        let metrics = Arc::new(Metrics::default());
        let adopter = match cri {
            Some(cfg) => {
                tracing::info!(socket = %cfg.socket.display(), poll = ?cfg.poll, "adopting pod sandboxes from the container runtime");
                let a = Adopter::new(cfg, registry.clone(), metrics.clone());
                background.push(tokio::spawn(a.clone().run()));
                Some(a)
            }
            None => {
                tracing::info!("CRI adoption is off (--cri-socket \"\")");
                None
            }
        };
        let api = Arc::new(Api {
            registry,
            metrics,
            cri: adopter,
        });
        let tcp = match (args.listen_tcp, token) {
            (Some(addr), Some(token)) => {
                let l = bind_tcp_retrying(addr)
                    .await
                    .with_context(|| format!("--listen-tcp {addr}"))?;
                Some(netfault_agent::server::serve_tcp(api.clone(), l, Arc::new(token)))
            }
            _ => None,
        };
        let tcp = async move {
            match tcp {
                Some(t) => t.await,
                None => std::future::pending().await,
            }
        };
        let registry = api.registry.clone();
        let server = serve(api, &args.socket, access);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let retired = {
            let r = registry.clone();
            async move {
                while !r.retired() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        tokio::select! {
            _ = term.recv() => {
                terminated(me, &owner, registry).await;
                Ok(())
            }
            _ = retired => {
                // A new agent serves the node: stop every source of change
                // (the socket path is the new agent's already; dropping the
                // listeners frees the TCP port for it), finish what is held
                // here at SIGTERM, and leave the kernel to the new agent.
                for task in background {
                    task.abort();
                }
                tracing::info!("retired after a hand-over: exiting at SIGTERM once drained");
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                let r = registry.clone();
                let _ = tokio::task::spawn_blocking(move || r.drain_for_exit(DRAIN_LIMIT)).await;
                Ok(())
            }
            r = server => r.context("serving the API"),
            r = tcp => r.context("serving the API on TCP"),
            _ = tokio::signal::ctrl_c() => {
                // Faults stay installed: the kernel enforces their deadlines and
                // the next agent re-adopts them from the state dir.
                tracing::info!("interrupted; leaving installed faults to their deadlines");
                Ok(())
            }
        }
    })
}

/// How long a retired agent waits at SIGTERM for its holders to release
/// what they hold and its proxied connections to close (under the
/// DaemonSet's termination grace period).
const DRAIN_LIMIT: Duration = Duration::from_secs(20);

/// Binds the TCP listener; while an agent handing the node over to this one
/// still has the port (it drops it within moments), tries again for 5 s.
async fn bind_tcp_retrying(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match netfault_agent::server::bind_tcp(addr).await {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < until =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => return other,
        }
    }
}

/// Bounds glibc's malloc arenas to two. Every netns entry is a short-lived
/// thread, and with the default (8 per core) each got an arena whose freed
/// memory stayed with it: under sustained fault churn the agent's RSS grew
/// by tens of MiB and did not come back.
fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets glibc's malloc parameters; called before
    // any other thread starts.
    let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    if ok != 1 {
        tracing::warn!("could not limit malloc arenas (mallopt M_ARENA_MAX)");
    }
}

/// Raises the soft limit of open files to the hard limit: every API
/// connection takes one, every proxied connection two. Logs what it got.
fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open-file limit"),
            Err(e) => {
                tracing::warn!(soft, hard, error = %e, "could not raise the open-file limit")
            }
        },
        Ok((soft, _)) => {
            tracing::info!(limit = soft, "open-file limit (already at its hard limit)")
        }
        Err(e) => tracing::warn!(error = %e, "could not read the open-file limit"),
    }
}

/// SIGTERM: an uninstall releases every sandbox; anything else leaves the
/// faults to the next agent and to their deadlines.
async fn terminated(me: Option<SelfRef>, owner: &OwnerWatch, registry: Arc<Registry>) {
    let verdict = match &me {
        None => Shutdown::Restart("no Kubernetes client or no POD_NAME/POD_NAMESPACE".into()),
        Some(me) => tokio::time::timeout(UNINSTALL_CHECK, on_terminate(me, owner))
            .await
            .unwrap_or_else(|_| {
                Shutdown::Restart(format!(
                    "the API server did not answer within {UNINSTALL_CHECK:?}"
                ))
            }),
    };
    match verdict {
        Shutdown::Restart(why) => {
            tracing::info!(reason = %why, "terminated; leaving installed faults to their deadlines")
        }
        Shutdown::Uninstall(why) => {
            tracing::info!(reason = %why, "uninstalling: releasing every sandbox");
            match tokio::task::spawn_blocking(move || registry.release_all()).await {
                Ok(Ok(n)) => tracing::info!(
                    sandboxes = n,
                    "uninstalled: nothing of netfault is left in the pods"
                ),
                Ok(Err(e)) => tracing::error!(error = %e, "releasing at uninstall failed"),
                Err(e) => tracing::error!(error = %e, "the release task failed"),
            }
        }
    }
}
