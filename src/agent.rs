//! A real netfaultd, run on a socket in a directory the test owns.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::error::{Context, Error, Result};

/// How long [`Agent::start`] waits for `GET /healthz` to answer 200.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `netfaultd --socket DIR/netfaultd.sock --state-dir DIR/state`.
/// CRI adoption is off (`--cri-socket ""`) unless the extra arguments pass a
/// `--cri-socket` of their own: a container runtime on the machine running
/// the tests must never see, adopt or release the tests' namespaces.
/// Its stdout and stderr go to `DIR/netfaultd.log` (appended across restarts).
/// `RUST_LOG` and the rest of the environment pass through. Drop stops it:
/// SIGTERM, then SIGKILL after 2 s.
#[derive(Debug)]
pub struct Agent {
    dir: PathBuf,
    args: Vec<String>,
    /// Extra environment for the next starts (see [`Agent::set_env`]).
    env: Vec<(String, String)>,
    child: Option<Child>,
    pid: u32,
    log_offset: u64,
}

impl Agent {
    /// Starts netfaultd and waits until it is ready (10 s at most; the error
    /// then includes the tail of its log).
    pub fn start(dir: &Path) -> Result<Agent> {
        Agent::start_with_args(dir, &[])
    }

    /// Like [`Agent::start`], with extra command-line arguments (kept for restarts).
    pub fn start_with_args(dir: &Path, extra_args: &[&str]) -> Result<Agent> {
        let mut agent = Agent {
            dir: dir.to_path_buf(),
            args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            child: None,
            pid: 0,
            log_offset: 0,
        };
        agent.spawn()?;
        Ok(agent)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("netfaultd.sock")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("netfaultd.log")
    }

    /// A client for the agent's socket (10 s timeout).
    pub fn client(&self) -> netfault_api::Client {
        netfault_api::Client::new(self.socket())
    }

    /// `POST /v1/faults`: the new fault's id.
    pub fn post_fault(&self, body: &Value) -> Result<String> {
        let f = self
            .client()
            .call("POST", "/v1/faults", Some(body))
            .ctx(|| format!("POST /v1/faults {body}"))?;
        f["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| Error::Agent(format!("POST /v1/faults answered without an id: {f}")))
    }

    /// `GET /v1/faults/ID`: the fault with its state and counters.
    pub fn get_fault(&self, id: &str) -> Result<Value> {
        let path = format!("/v1/faults/{id}");
        self.client()
            .call("GET", &path, None)
            .ctx(|| format!("GET {path}"))
    }

    /// `DELETE /v1/faults/ID`.
    pub fn delete_fault(&self, id: &str) -> Result<()> {
        let path = format!("/v1/faults/{id}");
        self.client()
            .call("DELETE", &path, None)
            .map(drop)
            .ctx(|| format!("DELETE {path}"))
    }

    /// `GET /v1/sandboxes`: the enrolled sandboxes.
    pub fn sandboxes(&self) -> Result<Vec<Value>> {
        let list = self
            .client()
            .call("GET", "/v1/sandboxes", None)
            .ctx(|| "GET /v1/sandboxes".into())?;
        match list {
            Value::Array(l) => Ok(l),
            other => Err(Error::Agent(format!(
                "GET /v1/sandboxes answered {other}, not a list"
            ))),
        }
    }

    /// The value of one unlabelled metric from `/metrics` (for example
    /// `netfault_delay_queue_overflows_total`), if the agent reports it.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let r = self.client().raw("GET", "/metrics", None).ok()?;
        let text = String::from_utf8_lossy(&r.body).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    /// The pid of the last started process (stale once it was killed).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process is still alive (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_))) | Some(Err(_)) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// SIGKILL and reap: a crash, as far as anyone can tell.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            match child.kill() {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {} // already reaped
                Err(e) => return Err(e).ctx(|| format!("killing netfaultd {}", self.pid)),
            }
            child
                .wait()
                .ctx(|| format!("reaping netfaultd {}", self.pid))?;
        }
        Ok(())
    }

    /// Stops it gracefully (SIGTERM, SIGKILL after `grace`) and reaps it.
    pub fn stop(&mut self, grace: Duration) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // ESRCH: already gone; reaped below.
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if child
                .try_wait()
                .ctx(|| "waiting for netfaultd".into())?
                .is_some()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ctx(|| "reaping netfaultd".into())?;
        Ok(())
    }

    /// Starts a second netfaultd beside this one, on the same socket and
    /// state dir (a DaemonSet rollout with `maxSurge`): it takes the node
    /// over (hand-over) and is ready once it serves the socket (`GET
    /// /healthz` names its pid). `self` keeps the earlier process, retired:
    /// it exits at [`Agent::stop`] once what it holds is released.
    pub fn start_successor(&self) -> Result<Agent> {
        self.start_successor_with_env(&[])
    }

    /// [`Agent::start_successor`] with more environment for the new agent.
    pub fn start_successor_with_env(&self, env: &[(&str, &str)]) -> Result<Agent> {
        let mut all = self.env.clone();
        for (k, v) in env {
            all.retain(|(key, _)| key != k);
            all.push((k.to_string(), v.to_string()));
        }
        let mut next = Agent {
            dir: self.dir.clone(),
            args: self.args.clone(),
            env: all,
            child: None,
            pid: 0,
            log_offset: 0,
        };
        next.spawn()?;
        Ok(next)
    }

    /// Sets `key=value` in the environment of every later (re)start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// Kills the running process, if any, and starts a new one on the same
    /// socket and state dir (a DaemonSet restart).
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.spawn()
    }

    /// The log written since the last (re)start, at most its last `lines` lines.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(self.log_path()) {
            if f.seek(SeekFrom::Start(self.log_offset)).is_ok() {
                let _ = f.read_to_string(&mut text);
            }
        }
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// [`Agent::restart`], waiting up to `ready` (instead of
    /// [`READY_TIMEOUT`]) for `GET /healthz`: an agent that reconciles many
    /// sandboxes at start takes longer.
    pub fn restart_within(&mut self, ready: Duration) -> Result<()> {
        self.kill()?;
        self.spawn_within(ready)
    }

    fn spawn(&mut self) -> Result<()> {
        self.spawn_within(READY_TIMEOUT)
    }

    fn spawn_within(&mut self, ready: Duration) -> Result<()> {
        crate::ensure_workspace_bins()?;
        let bin = crate::workspace_bin("netfaultd");
        if !bin.exists() {
            return Err(Error::Agent(format!(
                "{} not found: build the workspace first (cargo build --workspace)",
                bin.display()
            )));
        }
        std::fs::create_dir_all(&self.dir).ctx(|| format!("creating {}", self.dir.display()))?;
        let log_path = self.log_path();
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .ctx(|| format!("opening {}", log_path.display()))?;
        self.log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log2 = log.try_clone().ctx(|| "dup log fd".into())?;
        let cri_off: &[&str] = if self
            .args
            .iter()
            .any(|a| a == "--cri-socket" || a.starts_with("--cri-socket="))
        {
            &[]
        } else {
            &["--cri-socket", ""]
        };
        let child = Command::new(&bin)
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(cri_off)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .ctx(|| format!("starting {}", bin.display()))?;
        self.pid = child.id();
        self.child = Some(child);
        self.wait_ready(ready)
    }

    /// Whether a `GET /healthz` body comes from this process (a body
    /// without a pid, from an older agent, counts as this one's).
    fn serves(&self, body: &[u8]) -> bool {
        serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v["pid"].as_u64())
            .is_none_or(|pid| pid == u64::from(self.pid))
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let client = netfault_api::Client::new(self.socket()).with_timeout(Duration::from_secs(1));
        let deadline = Instant::now() + timeout;
        let mut last = String::from("not started");
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(Error::Agent(format!(
                    "netfaultd exited ({status}) before it was ready; log:\n{}",
                    self.log_tail(40)
                )));
            }
            match client.raw("GET", "/healthz", None) {
                // The socket is this process's (an earlier agent handing
                // the node over to it answers until it binds the path).
                Ok(r) if r.status == 200 && self.serves(&r.body) => return Ok(()),
                Ok(r) if r.status == 200 => {
                    last = "an earlier agent still serves the socket".into()
                }
                Ok(r) => last = format!("GET /healthz answered {}", r.status),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let tail = self.log_tail(40);
        let _ = self.kill();
        Err(Error::Agent(format!(
            "netfaultd not ready after {timeout:?} ({last}); log:\n{tail}"
        )))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(e) = self.stop(Duration::from_secs(2)) {
            eprintln!("testbed: stopping netfaultd: {e}");
        }
    }
}
