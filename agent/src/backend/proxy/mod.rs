//! The agent side of the transparent proxy (`http-*` and `tcp-*` faults).
//!
//! Per sandbox with at least one proxy fault:
//! - listening sockets (`IP_TRANSPARENT`) created inside the pod netns
//!   (`divert::open_listeners_here`) and served by the agent's proxy runtime:
//!   each accepted connection goes to the `netfault_tproxy` engine, with its
//!   original destination (the accepted socket's local address);
//! - a socket factory thread that stays in the pod netns and creates the
//!   proxy's upstream sockets (marked so the diversion skips them; on the
//!   server side bound to the real client address);
//! - the nft diversion (`divert::install_here`), whose set elements are a
//!   lease the agent re-arms every `REFRESH`: if the agent dies, new
//!   connections bypass the proxy within `LEASE`.
//!
//! Removing a sandbox's last proxy fault removes the fault's diversion at
//! once (new connections go direct) and closes the listeners; connections
//! already proxied finish, relayed without faults: the table keeps only its
//! connection-level rules (and the policy routing stays) until the last of
//! them closes, or for at most [`DRAIN_LIMIT`]. Then nothing is left.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netfault_api::{Action, Counters, FaultSpec};
use netfault_tproxy::{Connector, Proxy, ProxyRule, RuleCounters};

use crate::sys::netns::{self, NetnsError};
pub mod divert;


/// How long a diversion lives without the agent re-arming it: after the
/// agent dies, new connections go direct within this time.
pub const LEASE: Duration = Duration::from_secs(2);
/// How often the agent re-arms the lease (a netlink batch per sandbox).
const REFRESH: Duration = Duration::from_millis(500);
/// How long connections proxied before a removal keep their diversion.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum L7Error {
    #[error(transparent)]
    Proxy(#[from] divert::ProxyError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("starting the proxy runtime: {0}")]
    Runtime(std::io::Error),
}

/// A proxy fault to apply.
#[derive(Debug, Clone)]
pub struct ProxyFault {
    pub id: String,
    pub spec: FaultSpec,
    /// Time left until the fault's deadline.
    pub remaining: Duration,
}

type SocketReply = tokio::sync::oneshot::Sender<std::io::Result<OwnedFd>>;
type SocketRequest = (Option<IpAddr>, SocketAddr, SocketReply);

/// Creates upstream sockets inside the pod netns, on its own thread.
struct Factory {
    tx: Arc<Mutex<std::sync::mpsc::Sender<SocketRequest>>>,
}

impl Factory {
    fn start(path: &Path, sandbox: &str) -> Result<Factory, NetnsError> {
        let (tx, rx) = std::sync::mpsc::channel::<SocketRequest>();
        let name = format!("sockets-{}", &sandbox[..sandbox.len().min(8)]);
        netns::spawn_in(path, &name, move || {
            // Ends when the engine drops the sender.
            while let Ok((from, to, reply)) = rx.recv() {
                let made = divert::upstream_socket_here(from, to)
                    .map(OwnedFd::from)
                    .map_err(|e| std::io::Error::other(e.to_string()));
                let _ = reply.send(made);
            }
        })?;
        Ok(Factory {
            tx: Arc::new(Mutex::new(tx)),
        })
    }
}

/// The engine's way out of the pod: sockets from the factory, connected
/// asynchronously on the proxy runtime.
struct PodConnector {
    factory: Factory,
    /// The pod's own addresses: a connection *to* one of them is the server
    /// side, whose upstream keeps the real client address as its source.
    local: Vec<IpAddr>,
}

/// How often a connect that found its 4-tuple taken (a port of the
/// client's address still in TIME_WAIT) is tried again on another port.
const CONNECT_TRIES: usize = 4;

impl PodConnector {
    fn socket(
        tx: &Mutex<std::sync::mpsc::Sender<SocketRequest>>,
        bind: Option<IpAddr>,
        to: SocketAddr,
    ) -> std::io::Result<tokio::sync::oneshot::Receiver<std::io::Result<OwnedFd>>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        tx.lock()
            .map_err(|_| std::io::Error::other("socket factory poisoned"))?
            .send((bind, to, reply))
            .map_err(|_| std::io::Error::other("socket factory stopped"))?;
        Ok(rx)
    }
}

impl Connector for PodConnector {
    fn connect(
        &self,
        from: SocketAddr,
        to: SocketAddr,
    ) -> Pin<Box<dyn std::future::Future<Output = std::io::Result<tokio::net::TcpStream>> + Send>>
    {
        let bind = self.local.contains(&to.ip()).then_some(from.ip());
        let tx = self.factory.tx.clone();
        Box::pin(async move {
            let mut tries = 0;
            loop {
                tries += 1;
                let fd = PodConnector::socket(&tx, bind, to)?
                    .await
                    .map_err(|_| std::io::Error::other("socket factory stopped"))??;
                let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
                match socket.connect(to).await {
                    Err(e)
                        if e.kind() == std::io::ErrorKind::AddrNotAvailable
                            && tries < CONNECT_TRIES => {}
                    r => return r,
                }
            }
        })
    }
}

type Leases = Arc<Mutex<Vec<(divert::Diversion, Instant)>>>;

/// Per sandbox, a number that changes whenever a proxy (re)starts there;
/// a drain removes the diversion only if its epoch is still current, and
/// holds the lock while it does.
type Epochs = Arc<Mutex<HashMap<String, u64>>>;

struct SandboxProxy {
    proxy: Proxy,
    /// Accept loops: aborting them closes the listeners.
    accepts: Vec<tokio::task::JoinHandle<()>>,
    refresher: tokio::task::JoinHandle<()>,
    /// What the refresher re-arms: each diversion with its fault's deadline.
    leases: Leases,
    ports: divert::ListenerPorts,
}

impl SandboxProxy {
    fn stop_accepting(&self) {
        for t in &self.accepts {
            t.abort();
        }
        self.refresher.abort();
    }
}

impl Drop for SandboxProxy {
    fn drop(&mut self) {
        self.stop_accepting();
    }
}

/// The threads that serve proxied connections: one single-threaded tokio
/// runtime each (thread per core, as haproxy and Envoy do). A connection
/// stays on the thread that got it, so its wake-ups never cross threads;
/// a work-stealing runtime spent most of its time in futex wake-ups here.
struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    next: std::sync::atomic::AtomicUsize,
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl Workers {
    fn start(n: usize) -> Result<Workers, L7Error> {
        let mut handles = Vec::with_capacity(n);
        let mut stop = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(L7Error::Runtime)?;
            handles.push(rt.handle().clone());
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            stop.push(tx);
            std::thread::Builder::new()
                .name(format!("proxy-{i}"))
                .spawn(move || {
                    rt.block_on(async {
                        let _ = rx.await;
                    });
                })
                .map_err(L7Error::Runtime)?;
        }
        Ok(Workers {
            handles,
            next: std::sync::atomic::AtomicUsize::new(0),
            stop,
        })
    }

    /// The next worker, round robin.
    fn pick(&self) -> &tokio::runtime::Handle {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.handles[i % self.handles.len()]
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for tx in self.stop.drain(..) {
            let _ = tx.send(());
        }
    }
}

/// Every sandbox's proxy state, owned by the registry.
#[derive(Default)]
pub struct ProxyEngine {
    /// Accept loops, lease refreshers and drains.
    rt: Option<tokio::runtime::Runtime>,
    workers: Option<Arc<Workers>>,
    sandboxes: HashMap<String, SandboxProxy>,
    /// Sandboxes whose last fault went while connections were open.
    draining: HashMap<String, tokio::task::JoinHandle<()>>,
    epochs: Epochs,
    counters: HashMap<String, Arc<RuleCounters>>,
    tags: HashMap<String, u32>,
    next_tag: u32,
}

impl Drop for ProxyEngine {
    fn drop(&mut self) {
        self.sandboxes.clear();
        if let Some(rt) = self.rt.take() {
            // Never blocks, so it is safe inside another runtime.
            rt.shutdown_background();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn flatten<T>(r: Result<Result<T, divert::ProxyError>, NetnsError>) -> Result<T, L7Error> {
    match r {
        Ok(inner) => inner.map_err(L7Error::from),
        Err(e) => Err(e.into()),
    }
}

impl ProxyEngine {
    pub fn has(&self, sandbox: &str) -> bool {
        self.sandboxes.contains_key(sandbox) || self.draining.contains_key(sandbox)
    }

    fn runtime(&mut self) -> Result<tokio::runtime::Handle, L7Error> {
        if self.workers.is_none() {
            let n = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8));
            self.workers = Some(Arc::new(Workers::start(n)?));
        }
        if self.rt.is_none() {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("proxy-control")
                .enable_all()
                .build()
                .map_err(L7Error::Runtime)?;
            self.rt = Some(rt);
        }
        self.rt
            .as_ref()
            .map(|r| r.handle().clone())
            .ok_or_else(|| L7Error::Runtime(std::io::Error::other("no runtime")))
    }

    fn tag(&mut self, id: &str) -> u32 {
        if let Some(t) = self.tags.get(id) {
            return *t;
        }
        self.next_tag = self.next_tag.wrapping_add(1);
        self.tags.insert(id.to_string(), self.next_tag);
        self.next_tag
    }

    fn diversions(&mut self, faults: &[ProxyFault]) -> Vec<divert::Diversion> {
        faults
            .iter()
            .map(|f| divert::Diversion {
                tag: self.tag(&f.id),
                inbound: f.spec.direction.includes_ingress(),
                outbound: f.spec.direction.includes_egress(),
                selector: f.spec.r#match.clone(),
                lease_ms: lease_ms(f.remaining),
            })
            .collect()
    }

    /// Cancels a drain in progress and bumps the sandbox's epoch, so that a
    /// drain that already decided to remove the diversion is done first
    /// (it holds the lock) and one that did not yet never will.
    fn new_epoch(&mut self, sandbox: &str) {
        if let Some(d) = self.draining.remove(sandbox) {
            d.abort();
        }
        let mut epochs = lock(&self.epochs);
        *epochs.entry(sandbox.to_string()).or_default() += 1;
    }

    /// Closes a sandbox's proxy at once, cutting the connections it
    /// carries, without touching its netns (it is gone or going).
    pub fn close(&mut self, sandbox: &str) {
        self.new_epoch(sandbox);
        if let Some(sp) = self.sandboxes.remove(sandbox) {
            sp.proxy.shutdown();
        }
        lock(&self.epochs).remove(sandbox);
    }

    /// The sandbox is being released (CNI DEL): closes its proxy at once
    /// (no drain: the pod is going away) and removes the diversion if the
    /// netns is still there.
    pub fn release(&mut self, sandbox: &str, netns_path: &Path) -> Result<(), L7Error> {
        self.close(sandbox);
        remove_diversion(netns_path)
    }

    /// Brings a sandbox in line with `faults` (its active proxy faults):
    /// with none, stops diverting new connections and closes the listeners;
    /// the rest goes once the proxied connections are done.
    pub fn apply(
        &mut self,
        sandbox: &str,
        netns_path: &Path,
        local: &[IpAddr],
        faults: &[ProxyFault],
    ) -> Result<(), L7Error> {
        let path = PathBuf::from(netns_path);
        if faults.is_empty() {
            return self.wind_down(sandbox, &path);
        }
        let now = Instant::now();
        let rules: Vec<ProxyRule> = faults
            .iter()
            .filter_map(|f| {
                let Action::Proxy(action) = &f.spec.action else {
                    tracing::warn!(
                        rule = %f.id,
                        action = f.spec.action.type_name(),
                        "not a proxy action; ignoring the rule"
                    );
                    return None;
                };
                Some(ProxyRule {
                    id: f.id.clone(),
                    direction: f.spec.direction,
                    selector: f.spec.r#match.clone(),
                    action: action.clone(),
                    deadline: now + f.remaining,
                    counters: self.counters.entry(f.id.clone()).or_default().clone(),
                })
            })
            .collect();
        let divs = self.diversions(faults);
        let deadlines: Vec<Instant> = faults.iter().map(|f| now + f.remaining).collect();
        let fresh = !self.sandboxes.contains_key(sandbox);
        if fresh {
            self.new_epoch(sandbox);
            let sp = self.start_sandbox(sandbox, &path, local)?;
            self.sandboxes.insert(sandbox.to_string(), sp);
        }
        let Some(sp) = self.sandboxes.get(sandbox) else {
            return Ok(());
        };
        // Rules first: a connection diverted from now on finds its fault.
        sp.proxy.set_rules(rules);
        let ports = sp.ports;
        let install = divs.clone();
        match flatten(netns::run_in(&path, move || {
            divert::install_here(&install, &ports)
        })) {
            Ok(()) => {
                *lock(&sp.leases) = divs.into_iter().zip(deadlines).collect();
                Ok(())
            }
            Err(e) => {
                if fresh {
                    let _ = remove_diversion(&path);
                    self.sandboxes.remove(sandbox);
                }
                Err(e)
            }
        }
    }

    /// The sandbox has no proxy fault left.
    fn wind_down(&mut self, sandbox: &str, path: &Path) -> Result<(), L7Error> {
        let Some(sp) = self.sandboxes.remove(sandbox) else {
            if self.draining.contains_key(sandbox) {
                return Ok(());
            }
            // Nothing of ours runs: remove whatever an earlier agent left.
            return remove_diversion(path);
        };
        sp.stop_accepting();
        sp.proxy.set_rules(Vec::new());
        if sp.proxy.open_connections() == 0 {
            self.new_epoch(sandbox);
            return remove_diversion(path);
        }
        // Keep only the connection-level rules while proxied connections
        // finish; new connections go direct from now on.
        let ports = sp.ports;
        flatten(netns::run_in(path, move || {
            divert::install_here(&[], &ports)
        }))?;
        let rt = self.runtime()?;
        let epoch = *lock(&self.epochs).entry(sandbox.to_string()).or_default();
        let epochs = self.epochs.clone();
        let (sb, p) = (sandbox.to_string(), path.to_path_buf());
        let name = sb.clone();
        let started = Instant::now();
        let drain = rt.spawn(async move {
            while sp.proxy.open_connections() > 0 && started.elapsed() < DRAIN_LIMIT {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let open = sp.proxy.open_connections();
            // Past the drain limit: cut what is left.
            sp.proxy.shutdown();
            let removed = tokio::task::spawn_blocking(move || {
                let epochs = lock(&epochs);
                // A proxy started here since: the diversion is its own now.
                (epochs.get(&sb).copied() == Some(epoch)).then(|| remove_diversion(&p))
            })
            .await;
            match removed {
                Ok(Some(Ok(()))) => {
                    tracing::info!(sandbox = %name, cut = open, "proxy drained, diversion removed")
                }
                Ok(Some(Err(e))) => {
                    tracing::warn!(sandbox = %name, error = %e, "removing a drained diversion failed")
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "drain task failed"),
            }
            drop(sp);
        });
        self.draining.insert(sandbox.to_string(), drain);
        Ok(())
    }

    fn start_sandbox(
        &mut self,
        sandbox: &str,
        path: &Path,
        local: &[IpAddr],
    ) -> Result<SandboxProxy, L7Error> {
        let rt = self.runtime()?;
        let workers = self
            .workers
            .clone()
            .ok_or_else(|| L7Error::Runtime(std::io::Error::other("no proxy workers")))?;
        let listeners = flatten(netns::run_in(path, divert::open_listeners_here))?;
        let ports = listeners.ports();
        let connector = PodConnector {
            factory: Factory::start(path, sandbox)?,
            local: local.to_vec(),
        };
        let proxy = Proxy::new(Arc::new(connector));
        let mut accepts = Vec::new();
        let _guard = rt.enter();
        for (listener, side) in listeners.into_sided() {
            let listener = tokio::net::TcpListener::from_std(listener)
                .map_err(|e| divert::ProxyError::from_io("serving a listener", e))?;
            let p = proxy.clone();
            let sb = sandbox.to_string();
            let workers = workers.clone();
            accepts.push(rt.spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, peer)) => {
                            let Ok(orig) = stream.local_addr() else {
                                continue;
                            };
                            // Straight to a listener's own port: not a
                            // diverted connection (and proxying it would
                            // loop back here).
                            if ports.contains(orig.port()) {
                                continue;
                            }
                            // Re-registered with the worker's own reactor.
                            let Ok(std) = stream.into_std() else {
                                continue;
                            };
                            let p = p.clone();
                            workers.pick().spawn(async move {
                                match tokio::net::TcpStream::from_std(std) {
                                    Ok(s) => p.serve(s, peer, orig, side).await,
                                    Err(e) => tracing::warn!(error = %e, "proxy worker refused a connection"),
                                }
                            });
                        }
                        Err(e) => {
                            tracing::warn!(sandbox = %sb, error = %e, "proxy accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }));
        }
        let leases: Leases = Arc::default();
        let lease_fd = Arc::new(flatten(netns::run_in(path, divert::lease_socket_here))?);
        let refresher = rt.spawn(refresh_leases(
            leases.clone(),
            lease_fd,
            path.to_path_buf(),
            sandbox.to_string(),
        ));
        Ok(SandboxProxy {
            proxy,
            accepts,
            refresher,
            leases,
            ports,
        })
    }

    /// Live counters of a proxy fault.
    pub fn counters(&self, fault: &str) -> Option<Counters> {
        self.counters.get(fault).map(|c| c.snapshot())
    }

    /// Forgets a fault's counters and tag (after it was removed or expired).
    pub fn forget(&mut self, fault: &str) {
        self.counters.remove(fault);
        self.tags.remove(fault);
    }

    /// Connections the proxy serves right now, over every sandbox.
    pub fn open_connections(&self) -> u64 {
        self.sandboxes
            .values()
            .map(|s| s.proxy.open_connections())
            .sum()
    }
}

/// Re-arms a sandbox's leases every [`REFRESH`] for as long as it runs:
/// a netlink batch through `fd`, or if that fails, `nft` in the netns.
async fn refresh_leases(leases: Leases, fd: Arc<OwnedFd>, path: PathBuf, sandbox: String) {
    loop {
        tokio::time::sleep(REFRESH).await;
        let now = Instant::now();
        let divs: Vec<divert::Diversion> = lock(&leases)
            .iter()
            .filter(|(_, deadline)| *deadline > now)
            .map(|(d, deadline)| divert::Diversion {
                lease_ms: lease_ms(*deadline - now),
                ..d.clone()
            })
            .collect();
        if divs.is_empty() {
            continue;
        }
        let (fd, p) = (fd.clone(), path.clone());
        let r = tokio::task::spawn_blocking(move || match divert::rearm(&fd, &divs) {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::debug!(error = %e, "re-arming over netlink failed; trying nft");
                flatten(netns::run_in(&p, move || divert::refresh_here(&divs)))
            }
        })
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(sandbox = %sandbox, error = %e, "re-arming the proxy lease failed")
            }
            Err(e) => tracing::warn!(sandbox = %sandbox, error = %e, "lease task failed"),
        }
    }
}

/// Removes the diversion from the netns at `path`; a netns that is gone
/// has nothing left to remove.
fn remove_diversion(path: &Path) -> Result<(), L7Error> {
    match netns::run_in(path, divert::remove_here) {
        Ok(r) => r.map_err(L7Error::from),
        Err(NetnsError::Gone { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The lease of a diversion: [`LEASE`], never past the fault's deadline.
fn lease_ms(remaining: Duration) -> u64 {
    remaining.min(LEASE).as_millis().max(1) as u64
}
