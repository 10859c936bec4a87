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
//! them closes, or for at most [`DRAIN_LIMIT`]. Then nothing is left. A
//! proxy fault that comes back during a drain starts a new proxy; the old
//! one keeps relaying its connections, and the next drain waits for them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netfault_api::spec::{dns_ports, Direction, Match, Protocol};
use netfault_api::{BackendKind, FieldError, ProxyAction};
use netfault_sys::netns::{Netns, NetnsError};
use netfault_tproxy::{Connector, Proxy, ProxyRule, RuleCounters};

use super::nfqueue::{NfqueueBackend, QueueFault};
use super::{
    ActiveFault, Availability, Backend, BackendError, BackendOps, CounterReader, SandboxCtx,
    SandboxMemo,
};
use crate::ids::{FaultId, SandboxId};
pub mod divert;

/// How long a diversion lives without the agent re-arming it: after the
/// agent dies, new connections go direct within this time.
pub const LEASE: Duration = Duration::from_secs(2);
/// How often the agent re-arms the lease (a netlink batch per sandbox).
const REFRESH: Duration = Duration::from_millis(500);
/// How long connections proxied before a removal keep their diversion.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Divert(#[from] divert::DivertError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("starting the proxy runtime: {0}")]
    Runtime(std::io::Error),
}

type SocketReply = tokio::sync::oneshot::Sender<std::io::Result<OwnedFd>>;
type SocketRequest = (Option<IpAddr>, SocketAddr, SocketReply);

/// Creates upstream sockets inside the pod netns, on its own thread.
struct Factory {
    tx: Arc<Mutex<std::sync::mpsc::Sender<SocketRequest>>>,
}

impl Factory {
    fn start(ns: &Netns, sandbox: &str) -> Result<Factory, NetnsError> {
        let (tx, rx) = std::sync::mpsc::channel::<SocketRequest>();
        let name = format!("sockets-{}", &sandbox[..sandbox.len().min(8)]);
        ns.spawn(&name, move |inside| {
            // Ends when the engine drops the sender.
            while let Ok((from, to, reply)) = rx.recv() {
                let made = divert::upstream_socket_here(inside, from, to)
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

/// A drain in progress: its task and the proxies whose connections it
/// waits for.
struct Draining {
    task: tokio::task::JoinHandle<()>,
    proxies: Vec<Proxy>,
}

/// Connections `proxies` serve now.
fn open_in(proxies: &[Proxy]) -> u64 {
    proxies.iter().map(Proxy::open_connections).sum()
}

/// Per sandbox, a number that changes whenever a proxy (re)starts there;
/// a drain removes the diversion only if its epoch is still current, and
/// holds the lock while it does.
type Epochs = Arc<Mutex<HashMap<SandboxId, u64>>>;

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
    fn start(n: usize) -> Result<Workers, ProxyError> {
        let mut handles = Vec::with_capacity(n);
        let mut stop = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(ProxyError::Runtime)?;
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
                .map_err(ProxyError::Runtime)?;
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

/// Every sandbox's proxy state.
#[derive(Default)]
pub struct ProxyBackend {
    /// Accept loops, lease refreshers and drains.
    rt: Option<tokio::runtime::Runtime>,
    workers: Option<Arc<Workers>>,
    sandboxes: HashMap<SandboxId, SandboxProxy>,
    /// Sandboxes whose last fault went while connections were open.
    draining: HashMap<SandboxId, Draining>,
    /// Per sandbox, the proxies of drains that a new fault cut short:
    /// their connections still run on the diversion, so the next drain
    /// waits for them too (and a release cuts them).
    carried: HashMap<SandboxId, Vec<Proxy>>,
    epochs: Epochs,
    counters: HashMap<FaultId, Arc<RuleCounters>>,
    tags: HashMap<FaultId, u32>,
    next_tag: u32,
    /// Every running sandbox proxy, for the open-connection gauge.
    gauge: ConnectionGauge,
    /// The UDP half of the `dns-*` faults: the DNS engine's queue, table
    /// and holders (the TCP half is served by the proxy like any rule).
    dns_udp: DnsQueue,
}

/// The DNS engine: an [`NfqueueBackend`] with the DNS table and queue (its
/// `Default` is [`NfqueueBackend::for_dns`], never the delay engine's).
struct DnsQueue(NfqueueBackend);

impl Default for DnsQueue {
    fn default() -> Self {
        DnsQueue(NfqueueBackend::for_dns())
    }
}

/// One fault as the proxy serves it: a proxy fault as given, or the TCP
/// half of a DNS fault (egress, TCP, its DNS ports).
struct Served<'a> {
    id: &'a FaultId,
    direction: Direction,
    selector: Match,
    action: &'a ProxyAction,
    remaining: Duration,
}

/// Whether a DNS fault's `match.protocol` takes in `p` (UDP or TCP).
fn dns_over(m: &Match, p: Protocol) -> bool {
    matches!(m.protocol, None | Some(Protocol::Any)) || m.protocol == Some(p)
}

/// The traffic the `p` half of a DNS fault diverts: the pod's queries to
/// the fault's CIDR on its DNS ports.
fn dns_selector(m: &Match, p: Protocol) -> Match {
    Match {
        cidr: m.cidr,
        protocol: Some(p),
        ports: dns_ports(m),
    }
}

/// Connections the proxy serves right now, over every sandbox, and the
/// malformed DNS messages its DNS relays passed through; readable from any
/// thread.
#[derive(Clone, Default)]
pub struct ConnectionGauge(Arc<Mutex<HashMap<SandboxId, Proxy>>>, Arc<AtomicU64>);

impl ConnectionGauge {
    pub fn open_connections(&self) -> u64 {
        lock(&self.0).values().map(|p| p.open_connections()).sum()
    }

    /// Malformed DNS messages over TCP, the sandboxes' proxies gone included.
    pub fn dns_malformed(&self) -> u64 {
        let live: u64 = lock(&self.0).values().map(|p| p.dns_malformed()).sum();
        live + self.1.load(Ordering::Relaxed)
    }

    fn add(&self, sandbox: &SandboxId, proxy: Proxy) {
        lock(&self.0).insert(sandbox.clone(), proxy);
    }

    /// Stops counting a sandbox's proxy (its DNS count is kept).
    fn retire(&self, sandbox: &SandboxId) {
        if let Some(p) = lock(&self.0).remove(sandbox) {
            self.1.fetch_add(p.dns_malformed(), Ordering::Relaxed);
        }
    }
}

impl Drop for ProxyBackend {
    fn drop(&mut self) {
        self.sandboxes.clear();
        lock(&self.gauge.0).clear();
        if let Some(rt) = self.rt.take() {
            // Never blocks, so it is safe inside another runtime.
            rt.shutdown_background();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn flatten<T>(r: Result<Result<T, divert::DivertError>, NetnsError>) -> Result<T, ProxyError> {
    match r {
        Ok(inner) => inner.map_err(ProxyError::from),
        Err(e) => Err(e.into()),
    }
}

impl ProxyBackend {
    /// The open-connection gauge (`netfault_proxy_open_connections`).
    pub fn gauge(&self) -> ConnectionGauge {
        self.gauge.clone()
    }

    fn runtime(&mut self) -> Result<tokio::runtime::Handle, ProxyError> {
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
                .map_err(ProxyError::Runtime)?;
            self.rt = Some(rt);
        }
        self.rt
            .as_ref()
            .map(|r| r.handle().clone())
            .ok_or_else(|| ProxyError::Runtime(std::io::Error::other("no runtime")))
    }

    fn tag(&mut self, id: &FaultId) -> u32 {
        if let Some(t) = self.tags.get(id) {
            return *t;
        }
        self.next_tag = self.next_tag.wrapping_add(1);
        self.tags.insert(id.clone(), self.next_tag);
        self.next_tag
    }

    fn diversions(&mut self, faults: &[Served<'_>]) -> Vec<divert::Diversion> {
        faults
            .iter()
            .map(|f| divert::Diversion {
                tag: self.tag(f.id),
                inbound: f.direction.includes_ingress(),
                outbound: f.direction.includes_egress(),
                selector: f.selector.clone(),
                lease_ms: lease_ms(f.remaining),
            })
            .collect()
    }

    /// Cancels a drain in progress and bumps the sandbox's epoch, so that a
    /// drain that already decided to remove the diversion is done first
    /// (it holds the lock) and one that did not yet never will.
    fn new_epoch(&mut self, sandbox: &SandboxId) {
        if let Some(d) = self.draining.remove(sandbox) {
            d.task.abort();
            // Their connections go on; the next drain waits for them.
            self.carried
                .entry(sandbox.clone())
                .or_default()
                .extend(d.proxies);
        }
        let mut epochs = lock(&self.epochs);
        *epochs.entry(sandbox.clone()).or_default() += 1;
    }

    /// Closes a sandbox's proxy at once, cutting the connections it
    /// carries, without touching its netns (it is gone or going).
    fn close(&mut self, sandbox: &SandboxId) {
        self.new_epoch(sandbox);
        if let Some(sp) = self.sandboxes.remove(sandbox) {
            sp.proxy.shutdown();
        }
        for p in self.carried.remove(sandbox).unwrap_or_default() {
            p.shutdown();
        }
        self.gauge.retire(sandbox);
        lock(&self.epochs).remove(sandbox);
    }

    /// Brings a sandbox in line with `faults` (its active proxy faults):
    /// with none, stops diverting new connections and closes the listeners;
    /// the rest goes once the proxied connections are done.
    fn apply(&mut self, sb: &SandboxCtx<'_>, faults: &[Served<'_>]) -> Result<(), ProxyError> {
        let Some(ns) = sb.netns else {
            // The pod is gone, and its diversion with it.
            self.close(sb.id);
            return Ok(());
        };
        if faults.is_empty() {
            return self.wind_down(sb.id, ns);
        }
        let now = Instant::now();
        let rules: Vec<ProxyRule> = faults
            .iter()
            .map(|f| ProxyRule {
                id: f.id.to_string(),
                direction: f.direction,
                selector: f.selector.clone(),
                action: f.action.clone(),
                deadline: now + f.remaining,
                counters: self.counters.entry(f.id.clone()).or_default().clone(),
            })
            .collect();
        let divs = self.diversions(faults);
        let deadlines: Vec<Instant> = faults.iter().map(|f| now + f.remaining).collect();
        let fresh = !self.sandboxes.contains_key(sb.id);
        if fresh {
            self.new_epoch(sb.id);
            let sp = self.start_sandbox(sb.id, ns, sb.addresses)?;
            self.gauge.add(sb.id, sp.proxy.clone());
            self.sandboxes.insert(sb.id.clone(), sp);
        }
        let Some(sp) = self.sandboxes.get(sb.id) else {
            return Ok(());
        };
        // Rules first: a connection diverted from now on finds its fault.
        sp.proxy.set_rules(rules);
        crate::crash::point("proxy.rules-set");
        let ports = sp.ports;
        let install = divs.clone();
        match flatten(ns.run(move |inside| divert::install_here(inside, &install, &ports))) {
            Ok(()) => {
                *lock(&sp.leases) = divs.into_iter().zip(deadlines).collect();
                Ok(())
            }
            Err(e) => {
                if fresh {
                    let _ = remove_diversion(ns);
                    self.sandboxes.remove(sb.id);
                    self.gauge.retire(sb.id);
                }
                Err(e)
            }
        }
    }

    /// The sandbox has no proxy fault left.
    fn wind_down(&mut self, sandbox: &SandboxId, ns: &Netns) -> Result<(), ProxyError> {
        let Some(sp) = self.sandboxes.remove(sandbox) else {
            if self.draining.contains_key(sandbox) {
                return Ok(());
            }
            // Nothing of ours runs (a proxy that failed to start may have
            // cut a drain short): remove whatever is left.
            for p in self.carried.remove(sandbox).unwrap_or_default() {
                p.shutdown();
            }
            return remove_diversion(ns);
        };
        self.gauge.retire(sandbox);
        sp.stop_accepting();
        sp.proxy.set_rules(Vec::new());
        // With those of earlier proxies here whose drain was cut short.
        let mut proxies = self.carried.remove(sandbox).unwrap_or_default();
        proxies.retain(|p| p.open_connections() > 0);
        proxies.push(sp.proxy.clone());
        if open_in(&proxies) == 0 {
            self.new_epoch(sandbox);
            return remove_diversion(ns);
        }
        // Keep only the connection-level rules while proxied connections
        // finish; new connections go direct from now on.
        let ports = sp.ports;
        flatten(ns.run(move |inside| divert::install_here(inside, &[], &ports)))?;
        let rt = self.runtime()?;
        let epoch = *lock(&self.epochs).entry(sandbox.clone()).or_default();
        let epochs = self.epochs.clone();
        let (sb, p) = (sandbox.clone(), ns.clone());
        let name = sb.clone();
        let started = Instant::now();
        let waiting = proxies.clone();
        let drain = rt.spawn(async move {
            while open_in(&waiting) > 0 && started.elapsed() < DRAIN_LIMIT {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let open = open_in(&waiting);
            // Past the drain limit: cut what is left.
            for p in &waiting {
                p.shutdown();
            }
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
        self.draining.insert(
            sandbox.clone(),
            Draining {
                task: drain,
                proxies,
            },
        );
        Ok(())
    }

    fn start_sandbox(
        &mut self,
        sandbox: &SandboxId,
        ns: &Netns,
        local: &[IpAddr],
    ) -> Result<SandboxProxy, ProxyError> {
        let rt = self.runtime()?;
        let workers = self
            .workers
            .clone()
            .ok_or_else(|| ProxyError::Runtime(std::io::Error::other("no proxy workers")))?;
        let listeners = flatten(ns.run(divert::open_listeners_here))?;
        let ports = listeners.ports();
        let connector = PodConnector {
            factory: Factory::start(ns, sandbox.as_str())?,
            local: local.to_vec(),
        };
        let proxy = Proxy::new(Arc::new(connector));
        let mut accepts = Vec::new();
        let _guard = rt.enter();
        for (listener, side) in listeners.into_sided() {
            let listener = tokio::net::TcpListener::from_std(listener)
                .map_err(|e| divert::DivertError::from_io("serving a listener", e))?;
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
        let lease_fd = Arc::new(flatten(ns.run(divert::lease_socket_here))?);
        let refresher = rt.spawn(refresh_leases(
            leases.clone(),
            lease_fd,
            ns.clone(),
            sandbox.clone(),
        ));
        Ok(SandboxProxy {
            proxy,
            accepts,
            refresher,
            leases,
            ports,
        })
    }
}

impl BackendOps for ProxyBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Proxy
    }

    /// A DNS fault's counters add up its TCP (proxy) and UDP (queue) halves.
    fn counters(&self, fault: &FaultId) -> Option<CounterReader> {
        let tcp = self.counters.get(fault).cloned();
        let udp = self.dns_udp.0.fault_counters(fault);
        if tcp.is_none() && udp.is_none() {
            return None;
        }
        Some(CounterReader::new(move || {
            let mut sum = tcp.as_ref().map(|c| c.snapshot()).unwrap_or_default();
            if let Some(u) = udp.as_ref().map(|c| c.snapshot()) {
                sum.matched += u.matched;
                sum.affected += u.affected;
                sum.dropped += u.dropped;
            }
            sum
        }))
    }

    fn holds(&self, sandbox: &SandboxId) -> bool {
        self.sandboxes.contains_key(sandbox)
            || self.draining.contains_key(sandbox)
            || self.carried.contains_key(sandbox)
            || self.dns_udp.0.holds(sandbox)
    }

    fn forget_fault(&mut self, fault: &FaultId) {
        self.counters.remove(fault);
        self.tags.remove(fault);
        self.dns_udp.0.forget_fault(fault);
    }

    fn lost_sandboxes(&mut self) -> Vec<SandboxId> {
        self.dns_udp.0.lost_sandboxes()
    }

    /// Closes the sandbox's proxy at once, cutting the connections it
    /// carries (no drain: the pod is going away), and removes the diversion
    /// if the netns is still there.
    fn forget_sandbox(
        &mut self,
        sb: &SandboxCtx<'_>,
        _memo: &mut SandboxMemo,
    ) -> Result<(), BackendError> {
        self.close(sb.id);
        let udp = self
            .dns_udp
            .0
            .release(sb)
            .map_err(|e| BackendError::new("removing the DNS diversion", e));
        match sb.netns {
            Some(ns) => remove_diversion(ns)
                .map_err(|e| BackendError::new("removing the proxy diversion", e)),
            None => Ok(()),
        }?;
        udp
    }

    fn retire(&mut self) {
        // New connections go to the new agent's listeners (its table
        // replaced ours); these stop accepting and re-arming leases.
        for sp in self.sandboxes.values() {
            sp.stop_accepting();
        }
        // A drain finishing now would remove the new agent's diversion;
        // its connections are still counted (`drained`).
        for d in self.draining.values() {
            d.task.abort();
        }
    }

    fn reclaim(&mut self) {
        // Every sync installs the sandbox's table whole (with this agent's
        // listener ports); the DNS queue's rule is re-taken like the delay's.
        self.dns_udp.0.reclaim();
    }

    fn drain(&mut self) {
        self.dns_udp.0.drain();
    }

    fn drained(&mut self) -> bool {
        let live: u64 = self
            .sandboxes
            .values()
            .map(|sp| sp.proxy.open_connections())
            .sum();
        let carried: u64 = self.carried.values().map(|p| open_in(p)).sum();
        let draining: u64 = self.draining.values().map(|d| open_in(&d.proxies)).sum();
        let dns = self.dns_udp.0.drained();
        live + carried + draining == 0 && dns
    }

    fn availability(&self) -> Availability {
        Availability::section(
            BackendKind::Proxy,
            "proxy",
            super::caps::proxy_section(LEASE),
        )
    }
}

impl Backend for ProxyBackend {
    type Action = ProxyAction;

    fn admit(&self, _action: &ProxyAction, _active: &[&ProxyAction]) -> Result<(), FieldError> {
        Ok(())
    }

    fn sync(
        &mut self,
        sb: &SandboxCtx<'_>,
        _memo: &mut SandboxMemo,
        faults: &mut [ActiveFault<'_, ProxyAction>],
    ) -> Result<(), BackendError> {
        let mut tcp = Vec::with_capacity(faults.len());
        let mut udp = Vec::new();
        for f in faults.iter() {
            let m = &f.spec.r#match;
            if !matches!(f.action, ProxyAction::Dns(_)) {
                tcp.push(Served {
                    id: f.id,
                    direction: f.spec.direction,
                    selector: m.clone(),
                    action: f.action,
                    remaining: f.remaining,
                });
                continue;
            }
            if dns_over(m, Protocol::Tcp) {
                tcp.push(Served {
                    id: f.id,
                    direction: Direction::Egress,
                    selector: dns_selector(m, Protocol::Tcp),
                    action: f.action,
                    remaining: f.remaining,
                });
            }
            if dns_over(m, Protocol::Udp) {
                udp.push(QueueFault {
                    id: f.id,
                    spec: f.spec,
                    remaining: f.remaining,
                    direction: Direction::Egress,
                    selector: dns_selector(m, Protocol::Udp),
                });
            }
        }
        // Both halves, whatever the other's outcome.
        let udp = self
            .dns_udp
            .0
            .apply(sb, &udp)
            .map_err(|e| BackendError::new("applying the DNS faults (UDP)", e));
        crate::crash::point("proxy.dns-udp-applied");
        self.apply(sb, &tcp)
            .map_err(|e| BackendError::new("applying the proxy faults", e))?;
        udp
    }
}

/// Re-arms a sandbox's leases every [`REFRESH`] for as long as it runs:
/// a netlink batch through `fd`, or if that fails, `nft` in the netns.
async fn refresh_leases(leases: Leases, fd: Arc<OwnedFd>, ns: Netns, sandbox: SandboxId) {
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
        let (fd, ns) = (fd.clone(), ns.clone());
        let r = tokio::task::spawn_blocking(move || match divert::rearm(&fd, &divs) {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::debug!(error = %e, "re-arming over netlink failed; trying nft");
                flatten(ns.run(move |inside| divert::refresh_here(inside, &divs)))
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

/// Removes the diversion from the netns.
fn remove_diversion(ns: &Netns) -> Result<(), ProxyError> {
    flatten(ns.run(divert::remove_here))
}

/// The lease of a diversion: [`LEASE`], never past the fault's deadline.
fn lease_ms(remaining: Duration) -> u64 {
    remaining.min(LEASE).as_millis().max(1) as u64
}
