//! DNS inside the test pods: a real server (dnsmasq) serving a small local
//! zone, and real clients run in a pod's network namespace: `dig`, the glibc
//! resolver (`getent ahosts`), and a UDP query sender timed by the kernel's
//! receive stamps.
//!
//! It owns the processes it starts (a [`DnsServer`] is killed on drop, a
//! client is waited for with a deadline), their temp files, and, for a glibc
//! client only, a private mount namespace in which its own `resolv.conf` and
//! `nsswitch.conf` are bound over the host's: that process sees them, nothing
//! else does. Processes enter a pod's netns with `setns` before `exec`.
//!
//! It must not change anything outside the pods' namespaces: no host
//! `resolv.conf`, no host mounts, no `ip netns exec`, no system service. It
//! knows nothing about faults: what a query should get is the test's to say.

use std::fs::File;
use std::io::Read;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::{Context, Error, Result};
use crate::netns::{in_netns, spawn_in_netns};
use crate::node::Pod;
use crate::tmp::TempDir;

/// The zone every [`DnsServer`] serves (all names below `example.test`;
/// every answer has TTL [`ZONE_TTL`]). Addresses are data only, inside the
/// test ranges (198.18.0.0/15, fd00::/8), never used by an interface.
pub mod zone {
    /// `api.example.test` A.
    pub const API_V4: &str = "198.18.100.10";
    /// `api.example.test` AAAA.
    pub const API_V6: &str = "fd00:53::10";
    /// `web.example.test` A.
    pub const WEB_V4: &str = "198.18.100.20";
    /// `web.example.test` AAAA.
    pub const WEB_V6: &str = "fd00:53::20";
    /// `example.test` A (the apex: `*.example.test` must not match it).
    pub const APEX_V4: &str = "198.18.100.1";
    /// `mail.example.test` A, the apex's MX (preference 10).
    pub const MAIL_V4: &str = "198.18.100.25";
    /// `big.example.test` has this many A records, 198.18.101.1 upwards:
    /// more than 512 bytes, so without EDNS it only fits over TCP.
    pub const BIG_RECORDS: u8 = 40;
    /// The TXT record of `api.example.test`.
    pub const API_TXT: &str = "netfault test zone";
    /// The TTL of every record the server answers with.
    pub const ZONE_TTL: u32 = 300;
    /// The UDP payload size the server advertises in its own EDNS OPT
    /// record (dig's default request is 1232: a different number shows the
    /// OPT in an answer is the server's).
    pub const SERVER_EDNS_UDP: u16 = 1400;
}

/// How long a [`DnsServer`] may take to answer its first query.
const SERVER_READY: Duration = Duration::from_secs(5);

/// A dnsmasq serving [`zone`] on port 53 of a pod's addresses (IPv4, and
/// IPv6 when the pod has one), logging every query it receives. Dropping it
/// stops it: SIGTERM, then SIGKILL after a second.
#[derive(Debug)]
pub struct DnsServer {
    // Field order is drop order: the process (stopped in Drop), then its files.
    child: Option<Child>,
    dir: TempDir,
    v4: Option<IpAddr>,
    v6: Option<IpAddr>,
}

impl DnsServer {
    /// Starts dnsmasq inside `pod` and waits (5 s at most) until it answers
    /// on each of the pod's addresses.
    ///
    /// `--bind-dynamic` rather than `--bind-interfaces`: a pod's IPv6 address
    /// can still be tentative (DAD) when the server starts; dnsmasq then
    /// listens as soon as the address is usable instead of failing.
    pub fn start(pod: &Pod) -> Result<DnsServer> {
        let dir = TempDir::new("netfault-dns")?;
        let v4 = pod.ipv4();
        let v6 = pod.ipv6();
        if v4.is_none() && v6.is_none() {
            return Err(Error::Other(format!("pod {} has no address", pod.name)));
        }
        let hosts = dir.path().join("big.hosts");
        let big: String = (1..=zone::BIG_RECORDS)
            .map(|i| format!("198.18.101.{i} big.example.test\n"))
            .collect();
        std::fs::write(&hosts, big).ctx(|| format!("writing {}", hosts.display()))?;
        let log_path = dir.path().join("dnsmasq.log");
        let log = File::create(&log_path).ctx(|| format!("creating {}", log_path.display()))?;

        let mut cmd = Command::new("dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--user=root",
            "--pid-file=",
            "--bind-dynamic",
            "--port=53",
            "--log-queries",
            "--log-facility=-",
            "--local=/example.test/",
        ]);
        for ip in v4.iter().chain(v6.iter()) {
            cmd.arg(format!("--listen-address={ip}"));
        }
        cmd.arg(format!("--local-ttl={}", zone::ZONE_TTL))
            .arg(format!("--edns-packet-max={}", zone::SERVER_EDNS_UDP))
            .arg(format!(
                "--host-record=api.example.test,{},{}",
                zone::API_V4,
                zone::API_V6
            ))
            .arg(format!(
                "--host-record=web.example.test,{},{}",
                zone::WEB_V4,
                zone::WEB_V6
            ))
            .arg(format!("--host-record=example.test,{}", zone::APEX_V4))
            .arg(format!("--host-record=mail.example.test,{}", zone::MAIL_V4))
            .arg("--mx-host=example.test,mail.example.test,10")
            .arg(format!("--txt-record=api.example.test,{}", zone::API_TXT))
            .arg(format!("--addn-hosts={}", hosts.display()))
            .env_clear()
            .env("PATH", default_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().ctx(|| "dup log fd".into())?)
            .stderr(log);
        let child = spawn_in_netns(pod.netns_path(), &mut cmd, &[]).map_err(|e| {
            Error::Other(format!(
                "starting dnsmasq in pod {} (package dnsmasq-base): {e}",
                pod.name
            ))
        })?;
        let mut server = DnsServer {
            child: Some(child),
            dir,
            v4,
            v6,
        };
        server.wait_ready(pod)?;
        Ok(server)
    }

    fn wait_ready(&mut self, pod: &Pod) -> Result<()> {
        let deadline = Instant::now() + SERVER_READY;
        for ip in self.v4.iter().chain(self.v6.iter()).copied() {
            loop {
                if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                    self.child = None;
                    return Err(Error::Other(format!(
                        "dnsmasq exited ({status}) before it answered; its log:\n{}",
                        self.log()
                    )));
                }
                let r = Dig::new(ip, "api.example.test", "A").time(1).run(pod)?;
                if r.status.as_deref() == Some("NOERROR") {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(Error::Other(format!(
                        "dnsmasq does not answer on {ip} after {SERVER_READY:?}: {}\nits log:\n{}",
                        r.output,
                        self.log()
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// The IPv4 address it listens on.
    pub fn v4(&self) -> Option<IpAddr> {
        self.v4
    }

    /// The IPv6 address it listens on.
    pub fn v6(&self) -> Option<IpAddr> {
        self.v6
    }

    /// Its IPv4 address, or its IPv6 one on a v6-only pod.
    pub fn ip(&self) -> IpAddr {
        match (self.v4, self.v6) {
            (Some(ip), _) | (None, Some(ip)) => ip,
            // start() refuses a pod without addresses.
            (None, None) => IpAddr::from([0u8; 4]),
        }
    }

    /// Everything it logged so far (one `query[TYPE] NAME from ADDR` line
    /// per query it received).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dnsmasq.log")).unwrap_or_default()
    }

    /// How many `qtype` queries for `name` (as dig prints it, without the
    /// trailing dot) the server received, over UDP and TCP.
    pub fn queries_seen(&self, name: &str, qtype: &str) -> usize {
        let needle = format!("query[{qtype}] {name} from ");
        self.log().lines().filter(|l| l.contains(&needle)).count()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            stop(child, Duration::from_secs(1));
        }
    }
}

/// SIGTERM, SIGKILL after `grace`, and reap.
fn stop(mut child: Child, grace: Duration) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // ESRCH: it already exited; reaped below.
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn default_path() -> std::ffi::OsString {
    std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into())
}

/// What a client process did.
#[derive(Debug, Clone)]
pub struct Ran {
    /// `None`: killed at the deadline.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    /// From spawn to exit.
    pub elapsed: Duration,
}

/// Runs `cmd` to completion inside `netns` (see [`spawn_in_netns`]),
/// collecting its output; kills it if it runs longer than `timeout`.
pub fn run_in_netns(
    netns: &Path,
    cmd: &mut Command,
    binds: &[(PathBuf, PathBuf)],
    timeout: Duration,
) -> Result<Ran> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = spawn_in_netns(netns, cmd, binds)?;
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut out);
            }
            String::from_utf8_lossy(&out).into_owned()
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = started + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Err(e) => return Err(e).ctx(|| format!("waiting for {:?}", cmd.get_program())),
        }
    };
    let elapsed = started.elapsed();
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Ok(Ran {
        status,
        stdout,
        stderr,
        elapsed,
    })
}

/// One resource record as dig prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigRecord {
    /// With the trailing dot, as dig prints it.
    pub name: String,
    pub ttl: u32,
    pub class: String,
    pub rtype: String,
    /// The rest of the line (an address, `10 mail.example.test.`, a quoted TXT).
    pub data: String,
}

impl DigRecord {
    /// The address of an A or AAAA record.
    pub fn address(&self) -> Option<IpAddr> {
        matches!(self.rtype.as_str(), "A" | "AAAA")
            .then(|| self.data.parse().ok())
            .flatten()
    }

    fn parse(line: &str) -> Option<DigRecord> {
        let mut f = line.split_whitespace();
        let name = f.next()?.to_string();
        let ttl = f.next()?.parse().ok()?;
        let class = f.next()?.to_string();
        let rtype = f.next()?.to_string();
        let data = f.collect::<Vec<_>>().join(" ");
        Some(DigRecord {
            name,
            ttl,
            class,
            rtype,
            data,
        })
    }
}

/// What dig saw: the answer's header, sections and EDNS, or a timeout.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DigResult {
    /// NOERROR, NXDOMAIN, SERVFAIL, REFUSED, FORMERR...; `None` when no
    /// answer came (timeout, or no server reachable).
    pub status: Option<String>,
    /// The answer's id (dig only accepts an answer whose id is its query's).
    pub id: Option<u16>,
    /// Header flags, for example `["qr", "aa", "rd", "ra"]`.
    pub flags: Vec<String>,
    /// The question section, e.g. `["api.example.test. IN A"]`.
    pub question: Vec<String>,
    pub answers: Vec<DigRecord>,
    pub authority: Vec<DigRecord>,
    /// The additional section (the OPT pseudo-record is in `edns_udp`).
    pub additional: Vec<DigRecord>,
    /// The UDP size of the answer's EDNS OPT (`; EDNS: version: 0, flags:; udp: N`).
    pub edns_udp: Option<u16>,
    /// dig got a truncated UDP answer and asked again over TCP.
    pub retried_tcp: bool,
    /// The transport of the answer dig printed: `UDP` or `TCP`.
    pub transport: Option<String>,
    /// dig's `Query time`.
    pub query_time: Option<Duration>,
    /// Wall time of the dig process.
    pub elapsed: Duration,
    /// `;; Warning...`, `ID mismatch`, `Question section mismatch` lines.
    pub warnings: Vec<String>,
    pub exit_code: Option<i32>,
    /// stdout then stderr, for messages.
    pub output: String,
}

impl DigResult {
    /// No answer arrived.
    pub fn timed_out(&self) -> bool {
        self.status.is_none()
    }

    pub fn flag(&self, f: &str) -> bool {
        self.flags.iter().any(|x| x == f)
    }

    /// The A and AAAA addresses of the answer section.
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.answers.iter().filter_map(DigRecord::address).collect()
    }

    /// Parses dig's default output (`+nocmd`).
    pub fn parse(stdout: &str, stderr: &str) -> DigResult {
        let mut r = DigResult {
            output: format!("{stdout}{stderr}"),
            ..DigResult::default()
        };
        #[derive(PartialEq)]
        enum Section {
            None,
            Question,
            Answer,
            Authority,
            Additional,
        }
        let mut section = Section::None;
        for line in stdout.lines().chain(stderr.lines()) {
            let line = line.trim_end();
            if line.is_empty() {
                section = Section::None;
                continue;
            }
            if let Some(h) = line.strip_prefix(";; ->>HEADER<<- ") {
                // A second header (the TCP retry) replaces the first.
                r.flags.clear();
                r.question.clear();
                r.answers.clear();
                r.authority.clear();
                r.additional.clear();
                r.edns_udp = None;
                for part in h.split(", ") {
                    if let Some(s) = part.strip_prefix("status: ") {
                        r.status = Some(s.to_string());
                    } else if let Some(id) = part.strip_prefix("id: ") {
                        r.id = id.trim().parse().ok();
                    }
                }
            } else if let Some(f) = line.strip_prefix(";; flags: ") {
                let flags = f.split(';').next().unwrap_or_default();
                r.flags = flags.split_whitespace().map(str::to_string).collect();
            } else if let Some(e) = line.strip_prefix("; EDNS: ") {
                r.edns_udp = e.split("udp: ").nth(1).and_then(|n| n.trim().parse().ok());
            } else if line.starts_with(";; QUESTION SECTION") {
                section = Section::Question;
            } else if line.starts_with(";; ANSWER SECTION") {
                section = Section::Answer;
            } else if line.starts_with(";; AUTHORITY SECTION") {
                section = Section::Authority;
            } else if line.starts_with(";; ADDITIONAL SECTION") {
                section = Section::Additional;
            } else if line.starts_with(";; Truncated, retrying in TCP mode") {
                r.retried_tcp = true;
            } else if let Some(t) = line.strip_prefix(";; Query time: ") {
                r.query_time = t
                    .strip_suffix(" msec")
                    .and_then(|n| n.parse().ok())
                    .map(Duration::from_millis);
            } else if let Some(s) = line.strip_prefix(";; SERVER: ") {
                r.transport = s
                    .rsplit('(')
                    .next()
                    .and_then(|t| t.strip_suffix(')'))
                    .map(str::to_string);
            } else if line.to_ascii_lowercase().contains("warning") || line.contains("mismatch") {
                r.warnings.push(line.to_string());
            } else if section == Section::Question {
                let q = line.trim_start_matches(';');
                r.question
                    .push(q.split_whitespace().collect::<Vec<_>>().join(" "));
            } else if !line.starts_with(';') {
                let rec = DigRecord::parse(line);
                match (&section, rec) {
                    (Section::Answer, Some(rec)) => r.answers.push(rec),
                    (Section::Authority, Some(rec)) => r.authority.push(rec),
                    (Section::Additional, Some(rec)) => r.additional.push(rec),
                    _ => {}
                }
            }
        }
        r
    }
}

/// A `dig` query, run in a pod: `dig @SERVER -p PORT NAME TYPE +tries=1
/// +time=T` plus the options given.
#[derive(Debug, Clone)]
pub struct Dig {
    server: IpAddr,
    port: u16,
    name: String,
    qtype: String,
    time: u32,
    options: Vec<String>,
}

impl Dig {
    /// One try, 2 s to answer, on port 53.
    pub fn new(server: IpAddr, name: &str, qtype: &str) -> Dig {
        Dig {
            server,
            port: 53,
            name: name.to_string(),
            qtype: qtype.to_string(),
            time: 2,
            options: Vec::new(),
        }
    }

    pub fn port(mut self, port: u16) -> Dig {
        self.port = port;
        self
    }

    /// `+time=SECONDS` (at least 1: dig's own minimum).
    pub fn time(mut self, seconds: u32) -> Dig {
        self.time = seconds.max(1);
        self
    }

    /// `+tcp`: ask over TCP only.
    pub fn tcp(self) -> Dig {
        self.opt("+tcp")
    }

    /// `+notcp`: ask over UDP (dig still retries over TCP on truncation).
    pub fn notcp(self) -> Dig {
        self.opt("+notcp")
    }

    /// `+ignore`: take a truncated UDP answer as it is.
    pub fn ignore(self) -> Dig {
        self.opt("+ignore")
    }

    /// Any other dig option, e.g. `+bufsize=1232` or `+noedns`.
    pub fn opt(mut self, option: &str) -> Dig {
        self.options.push(option.to_string());
        self
    }

    /// Runs it inside `pod` (killed if it outlives its own timeout by 5 s).
    pub fn run(&self, pod: &Pod) -> Result<DigResult> {
        let mut cmd = Command::new("dig");
        cmd.env_clear()
            .env("PATH", default_path())
            .arg("+nocmd")
            .arg(format!("@{}", self.server))
            .args(["-p", &self.port.to_string()])
            .arg(&self.name)
            .arg(&self.qtype)
            .arg("+tries=1")
            .arg(format!("+time={}", self.time))
            .args(&self.options);
        // TCP retry after truncation: a second try of the same length.
        let limit = Duration::from_secs(2 * u64::from(self.time) + 5);
        let ran = run_in_netns(pod.netns_path(), &mut cmd, &[], limit)
            .map_err(|e| Error::Other(format!("dig (package bind9-dnsutils): {e}")))?;
        let mut r = DigResult::parse(&ran.stdout, &ran.stderr);
        r.elapsed = ran.elapsed;
        r.exit_code = ran.status.and_then(|s| s.code());
        Ok(r)
    }
}

/// A `resolv.conf` (naming only the test's servers, with `options
/// timeout:T attempts:N`) and an `nsswitch.conf` resolving hosts by DNS only,
/// bound over the host's in a glibc client's own mount namespace.
#[derive(Debug)]
pub struct Resolver {
    dir: TempDir,
    pub timeout_s: u32,
    pub attempts: u32,
}

impl Resolver {
    /// At most 3 `nameservers` (glibc's limit) are used, in order.
    pub fn new(nameservers: &[IpAddr], timeout_s: u32, attempts: u32) -> Result<Resolver> {
        let dir = TempDir::new("netfault-resolv")?;
        let mut conf: String = nameservers
            .iter()
            .map(|ip| format!("nameserver {ip}\n"))
            .collect();
        conf.push_str(&format!(
            "options timeout:{timeout_s} attempts:{attempts}\n"
        ));
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(&resolv, conf).ctx(|| format!("writing {}", resolv.display()))?;
        let nss = dir.path().join("nsswitch.conf");
        std::fs::write(&nss, "hosts: dns\n").ctx(|| format!("writing {}", nss.display()))?;
        Ok(Resolver {
            dir,
            timeout_s,
            attempts,
        })
    }

    /// What a failed lookup should take: every attempt waits `timeout` for
    /// each server (one server here).
    pub fn give_up_after(&self) -> Duration {
        Duration::from_secs(u64::from(self.timeout_s) * u64::from(self.attempts))
    }

    fn binds(&self) -> Vec<(PathBuf, PathBuf)> {
        vec![
            (
                self.dir.path().join("resolv.conf"),
                PathBuf::from("/etc/resolv.conf"),
            ),
            (
                self.dir.path().join("nsswitch.conf"),
                PathBuf::from("/etc/nsswitch.conf"),
            ),
        ]
    }
}

/// What `getent ahosts NAME` printed: the glibc resolver's answer.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// 0: found; 2: not found (or every server failed).
    pub exit_code: Option<i32>,
    /// Distinct addresses, in order.
    pub addresses: Vec<IpAddr>,
    pub elapsed: Duration,
    pub output: String,
}

impl Lookup {
    pub fn found(&self) -> bool {
        self.exit_code == Some(0) && !self.addresses.is_empty()
    }
}

/// `getent ahosts NAME` in `pod`, through `resolver` (glibc's getaddrinfo
/// with AF_UNSPEC: A and AAAA queries in parallel, retried on timeout).
pub fn getent_ahosts(pod: &Pod, resolver: &Resolver, name: &str) -> Result<Lookup> {
    let mut cmd = Command::new("getent");
    cmd.env_clear()
        .env("PATH", default_path())
        .args(["ahosts", name]);
    let limit = resolver.give_up_after() * 3 + Duration::from_secs(5);
    let ran = run_in_netns(pod.netns_path(), &mut cmd, &resolver.binds(), limit)?;
    let mut addresses = Vec::new();
    for line in ran.stdout.lines() {
        if let Some(ip) = line.split_whitespace().next().and_then(|a| a.parse().ok()) {
            if !addresses.contains(&ip) {
                addresses.push(ip);
            }
        }
    }
    Ok(Lookup {
        exit_code: ran.status.and_then(|s| s.code()),
        addresses,
        elapsed: ran.elapsed,
        output: format!("{}{}", ran.stdout, ran.stderr),
    })
}

/// One query of [`udp_queries`] and its answer.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// When the query was handed to the socket.
    pub sent_at: Instant,
    /// The first answer that carried the query's id.
    pub answer: Option<Vec<u8>>,
    /// From the send to the kernel's receive stamp of that answer
    /// (`SO_TIMESTAMPNS`: a test thread that wakes late is not counted).
    pub rtt: Option<Duration>,
}

/// The id of a DNS message: its first two bytes (RFC 1035 4.1.1).
fn message_id(m: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*m.first()?, *m.get(1)?]))
}

/// Sends each of `queries` (ready-made DNS messages with distinct ids) from
/// one UDP socket in `pod` to `server`, one every `gap` (pipelined: the
/// schedule does not wait for answers), then waits `linger` for the last
/// answers. Answers are matched to queries by id.
pub fn udp_queries(
    pod: &Pod,
    server: SocketAddr,
    queries: &[Vec<u8>],
    gap: Duration,
    linger: Duration,
) -> Result<Vec<Exchange>> {
    use nix::sys::socket::{setsockopt, sockopt, ControlMessageOwned, MsgFlags};
    use std::collections::HashMap;

    let mut index = HashMap::new();
    for (i, q) in queries.iter().enumerate() {
        let id = message_id(q).ok_or_else(|| Error::Other(format!("query {i} is empty")))?;
        if index.insert(id, i).is_some() {
            return Err(Error::Other(format!("two queries have the id {id}")));
        }
    }
    let any = crate::unspecified(server.ip());
    let sock = in_netns(pod.netns_path(), move || UdpSocket::bind((any, 0)))?
        .ctx(|| format!("binding UDP in pod {}", pod.name))?;
    sock.set_read_timeout(Some(Duration::from_millis(10)))
        .ctx(|| "SO_RCVTIMEO".into())?;
    setsockopt(&sock, sockopt::ReceiveTimestampns, &true).ctx(|| "SO_TIMESTAMPNS".into())?;
    let rx = sock.try_clone().ctx(|| "cloning the UDP socket".into())?;

    let start = Instant::now();
    let start_wall = SystemTime::now();
    let done = std::sync::atomic::AtomicBool::new(false);
    let (sent, got) = std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            let mut got: Vec<(Vec<u8>, Duration)> = Vec::new();
            let mut buf = vec![0u8; 65536];
            let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                let Ok(msg) = nix::sys::socket::recvmsg::<nix::sys::socket::SockaddrStorage>(
                    rx.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::empty(),
                ) else {
                    continue;
                };
                let n = msg.bytes;
                let from_server = msg
                    .address
                    .and_then(|a| sockaddr(&a))
                    .is_some_and(|a| a == server);
                let stamp = msg.cmsgs().ok().and_then(|mut c| {
                    c.find_map(|m| match m {
                        ControlMessageOwned::ScmTimestampns(ts) => Some(
                            SystemTime::UNIX_EPOCH
                                + Duration::new(ts.tv_sec() as u64, ts.tv_nsec() as u32),
                        ),
                        _ => None,
                    })
                });
                let at = stamp
                    .and_then(|t| t.duration_since(start_wall).ok())
                    .unwrap_or_else(|| start.elapsed());
                if from_server {
                    got.push((buf[..n].to_vec(), at));
                }
            }
            got
        });
        let mut sent = Vec::with_capacity(queries.len());
        for (i, q) in queries.iter().enumerate() {
            let due = gap.saturating_mul(u32::try_from(i).unwrap_or(u32::MAX));
            if let Some(w) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(w);
            }
            let at = SystemTime::now()
                .duration_since(start_wall)
                .unwrap_or_else(|_| start.elapsed());
            let ok = sock.send_to(q, server).is_ok();
            sent.push((at, ok));
        }
        std::thread::sleep(linger);
        done.store(true, std::sync::atomic::Ordering::Release);
        let got = receiver.join().unwrap_or_default();
        (sent, got)
    });
    let mut out: Vec<Exchange> = sent
        .iter()
        .map(|(at, _)| Exchange {
            sent_at: start + *at,
            answer: None,
            rtt: None,
        })
        .collect();
    for (answer, at) in got {
        let Some(&i) = message_id(&answer).and_then(|id| index.get(&id)) else {
            continue;
        };
        let (sent_at, ok) = sent[i];
        let slot = &mut out[i];
        if ok && slot.answer.is_none() {
            slot.rtt = Some(at.saturating_sub(sent_at));
            slot.answer = Some(answer);
        }
    }
    Ok(out)
}

fn sockaddr(a: &nix::sys::socket::SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    a.as_sockaddr_in6()
        .map(|v6| SocketAddr::from((v6.ip(), v6.port())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANSWER: &str = ";; Got answer:
;; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 26671
;; flags: qr aa rd ra; QUERY: 1, ANSWER: 1, AUTHORITY: 0, ADDITIONAL: 1

;; OPT PSEUDOSECTION:
; EDNS: version: 0, flags:; udp: 1400
;; QUESTION SECTION:
;api.example.test.\t\tIN\tA

;; ANSWER SECTION:
api.example.test.\t300\tIN\tA\t198.18.100.10

;; Query time: 3 msec
;; SERVER: 198.18.9.1#53(198.18.9.1) (UDP)
;; WHEN: Wed Dec 02 15:36:16 UTC 2026
;; MSG SIZE  rcvd: 61
";

    #[test]
    fn parses_an_answer() {
        let r = DigResult::parse(ANSWER, "");
        assert_eq!(r.status.as_deref(), Some("NOERROR"));
        assert_eq!(r.id, Some(26671));
        assert_eq!(r.flags, ["qr", "aa", "rd", "ra"]);
        assert_eq!(r.question, ["api.example.test. IN A"]);
        assert_eq!(r.edns_udp, Some(1400));
        assert_eq!(r.transport.as_deref(), Some("UDP"));
        assert_eq!(r.query_time, Some(Duration::from_millis(3)));
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].ttl, 300);
        assert_eq!(r.answers[0].rtype, "A");
        assert_eq!(r.addresses(), vec![IpAddr::from([198, 18, 100, 10])]);
        assert!(!r.timed_out() && !r.retried_tcp && r.warnings.is_empty());
    }

    #[test]
    fn parses_a_tcp_retry_and_a_timeout() {
        let udp = ANSWER.replace("qr aa rd ra", "qr aa tc rd ra");
        let tcp = ANSWER
            .replace("NOERROR", "SERVFAIL")
            .replace("(UDP)", "(TCP)")
            .replace("api.example.test.\t300\tIN\tA\t198.18.100.10\n", "");
        let out = format!("{udp};; Truncated, retrying in TCP mode.\n{tcp}");
        let r = DigResult::parse(&out, "");
        assert!(r.retried_tcp);
        assert_eq!(r.status.as_deref(), Some("SERVFAIL"));
        assert_eq!(r.transport.as_deref(), Some("TCP"));
        assert!(!r.flag("tc"));
        assert!(r.answers.is_empty());

        let r = DigResult::parse(
            ";; communications error to 198.18.0.3#53: timed out\n;; no servers could be reached\n",
            "",
        );
        assert!(r.timed_out());
    }
}
