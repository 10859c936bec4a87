//! `netfault`: the chained CNI plugin that enrols pods with netfaultd.
//!
//! It is thin on purpose. ADD tells the agent about the sandbox (netns, interface,
//! addresses, pod identity, annotations) and passes `prevResult` through
//! unchanged; DEL releases it; CHECK asks whether it is enrolled; STATUS asks
//! whether the agent is healthy; GC releases sandboxes the runtime no longer
//! knows. With `failurePolicy: ignore` (the default) an unreachable agent never
//! fails a pod: ADD then leaves the enrolment in the agent's pending dir for it
//! to adopt when it is back (see `pending`). Errors are CNI error JSON on
//! stdout; logs go to stderr.
//!
//! A runtime execs it for every pod, on the pod's critical path, so its start
//! is kept short (docs/design.md, "CNI plugin speed"): the C `main` below
//! skips std's runtime setup, whose main-thread stack probe reads and parses
//! `/proc/self/maps` (a third of the user-space instructions of a run); stdin
//! is read in one call; every log line is one `write`.

// Outside tests, `main` is the C entry point (see `main` below).
#![cfg_attr(not(test), no_main)]

mod pending;

use std::io::{Read, Write};

use netfault_api::{Client, ClientError};
use netfault_cni::args::Env;
use netfault_cni::config::{self, FailurePolicy, NetConf};
use netfault_cni::error::{code, CniError};
use netfault_cni::version;
use serde_json::Value;

/// The process entry point, called by the C runtime instead of std's
/// `lang_start`, whose setup this plugin does not need but for two parts,
/// done here: SIGPIPE is ignored (a closed stdout or stderr is an error,
/// not a kill), and a panic exits with status 101. Nothing flushes stdout
/// at exit: `plugin_main` flushes it.
#[cfg(not(test))]
#[no_mangle]
pub extern "C" fn main(
    _argc: std::ffi::c_int,
    _argv: *const *const std::ffi::c_char,
) -> std::ffi::c_int {
    // SAFETY: setting a signal's disposition to SIG_IGN before any other
    // thread exists has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    std::panic::catch_unwind(|| {
        plugin_main(
            &Env::from_process(),
            &mut std::io::stdin().lock(),
            &mut std::io::stdout().lock(),
        )
    })
    .unwrap_or(101)
}

/// Bytes read from stdin per call: one call for any usual config.
const STDIN_CHUNK: usize = 64 * 1024;

/// Runs the plugin once on `input`, writes the reply (if any) to `out` and
/// flushes it; the process exit status.
fn plugin_main(env: &Env, input: &mut impl Read, out: &mut impl Write) -> std::ffi::c_int {
    let mut stdin = Vec::with_capacity(STDIN_CHUNK);
    let outcome = match input.read_to_end(&mut stdin) {
        Ok(_) => run(env, &stdin),
        Err(e) => Err(CniError::new(code::IO, format!("cannot read stdin: {e}"))),
    };
    let (mut text, exit) = match outcome {
        Ok(None) => return 0,
        Ok(Some(v)) => (v.to_string(), 0),
        Err(e) => {
            log(env, &format!("error {}: {}", e.code, e.msg));
            let v = e.to_json(&version::reply_version(&stdin));
            (v.to_string(), 1)
        }
    };
    text.push('\n');
    if out
        .write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .is_err()
    {
        return 1;
    }
    exit
}

/// One line on stderr, in one `write`.
fn log(env: &Env, msg: &str) {
    let cmd = env.command.as_deref().unwrap_or("-");
    let id = env.container_id.as_deref().unwrap_or("-");
    let line = format!("netfault: {cmd} {id}: {msg}\n");
    // Nowhere to report a failed log write.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Runs one CNI command. `Ok(Some)` is printed on stdout; `Ok(None)` prints nothing.
fn run(env: &Env, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let command = env.command.as_deref().ok_or_else(|| {
        CniError::new(
            code::INVALID_ENV,
            "required env variables [CNI_COMMAND] missing",
        )
    })?;
    match command {
        "VERSION" => return Ok(Some(version::version_info(stdin))),
        "ADD" | "DEL" | "CHECK" | "STATUS" | "GC" => env.require_for(command)?,
        other => {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_COMMAND: unknown command {other:?}"),
            ))
        }
    }
    let conf = config::parse(stdin)?;
    let min = match command {
        "CHECK" => "0.4.0",
        "STATUS" | "GC" => "1.1.0",
        _ => "0.0.0",
    };
    if !version::at_least(&conf.cni_version, min) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "config version {} does not allow {command} (needs {min} or later)",
                conf.cni_version
            ),
        ));
    }
    let ctx = Ctx { env, conf: &conf };
    match command {
        "ADD" => ctx.add(),
        "DEL" => ctx.del(),
        "CHECK" => ctx.check(),
        "STATUS" => ctx.status(),
        _ => ctx.gc(),
    }
}

/// How an agent call failed, as the failure policy sees it.
enum AgentFailure {
    /// Cannot connect, i/o error, timeout, garbage, or a 5xx: the agent is not serving.
    Unavailable(String),
    /// A 4xx: the agent is up and refused this request.
    Rejected { status: u16, message: String },
}

fn classify(e: ClientError) -> AgentFailure {
    match e {
        ClientError::Api {
            status, message, ..
        } if (400..500).contains(&status) => AgentFailure::Rejected { status, message },
        other => AgentFailure::Unavailable(other.to_string()),
    }
}

struct Ctx<'a> {
    env: &'a Env,
    conf: &'a NetConf,
}

impl Ctx<'_> {
    fn client(&self) -> Client {
        Client::new(&self.conf.socket).with_timeout(self.conf.timeout)
    }

    fn id(&self) -> &str {
        self.env.container_id.as_deref().unwrap_or_default()
    }

    fn log(&self, msg: &str) {
        log(self.env, msg);
    }

    /// Applies the failure policy to an unavailable agent: log and go on, or fail.
    fn unavailable(&self, what: &str, err: &str) -> Result<(), CniError> {
        match self.conf.failure_policy {
            FailurePolicy::Ignore => {
                self.log(&format!(
                    "{what}: netfaultd unavailable, continuing (failurePolicy={}): {err}",
                    self.conf.failure_policy.as_str()
                ));
                Ok(())
            }
            FailurePolicy::Fail => Err(CniError::new(
                code::TRY_AGAIN_LATER,
                format!(
                    "{what}: netfaultd unavailable (failurePolicy={})",
                    self.conf.failure_policy.as_str()
                ),
            )
            .with_details(err.to_string())),
        }
    }

    fn prev_result(&self) -> Result<&Value, CniError> {
        self.conf.prev_result.as_ref().ok_or_else(|| {
            CniError::invalid_field(
                "prevResult",
                "missing: netfault is a chained plugin and must follow an interface plugin (such as bridge) in a conflist",
            )
        })
    }

    fn add(&self) -> Result<Option<Value>, CniError> {
        let (req, warnings) = netfault_cni::enrolment(self.env, self.conf)?;
        for w in warnings {
            self.log(&w);
        }
        let pod = req.pod.clone().unwrap_or_default();
        let body = serde_json::to_value(&req)
            .map_err(|e| CniError::new(code::DECODE, format!("cannot encode enrolment: {e}")))?;
        let what = format!("enrol pod {}/{}", pod.namespace, pod.name);
        match self
            .client()
            .call("PUT", &format!("/v1/sandboxes/{}", self.id()), Some(&body))
        {
            Ok(_) => {}
            Err(e) => match classify(e) {
                AgentFailure::Unavailable(err) => {
                    self.unavailable(&what, &err)?;
                    match pending::record(&self.conf.socket, self.id(), &req) {
                        Ok(path) => self.log(&format!(
                            "{what}: left for netfaultd to adopt when it is back: {}",
                            path.display()
                        )),
                        Err(e) => self.log(&format!("{what}: cannot record it for later: {e}")),
                    }
                }
                AgentFailure::Rejected { status, message } => self.log(&format!(
                    "{what}: netfaultd refused ({status}): {message}; the pod starts without faults"
                )),
            },
        }
        Ok(self.conf.output_result())
    }

    fn del(&self) -> Result<Option<Value>, CniError> {
        // First, so that a pod deleted during an agent outage is never adopted.
        self.forget_pending(self.id());
        match self
            .client()
            .call("DELETE", &format!("/v1/sandboxes/{}", self.id()), None)
        {
            Ok(_) => {}
            Err(e) => match classify(e) {
                AgentFailure::Unavailable(err) => self.unavailable("release sandbox", &err)?,
                AgentFailure::Rejected { status, message } => self.log(&format!(
                    "release sandbox: netfaultd answered {status}: {message}"
                )),
            },
        }
        Ok(None)
    }

    fn forget_pending(&self, id: &str) {
        if let Err(e) = pending::forget(&self.conf.socket, id) {
            self.log(&format!("cannot remove the pending enrolment of {id}: {e}"));
        }
    }

    /// Ids of the sandboxes the agent knows; `None` when it is unavailable and the policy is ignore.
    fn enrolled_ids(&self, what: &str) -> Result<Option<Vec<String>>, CniError> {
        match self.client().call("GET", "/v1/sandboxes", None) {
            Ok(v) => {
                let list = match &v {
                    Value::Array(a) => Some(a),
                    other => other.get("sandboxes").and_then(Value::as_array),
                };
                let Some(list) = list else {
                    self.unavailable(what, &format!("unexpected sandbox list: {v}"))?;
                    return Ok(None);
                };
                Ok(Some(
                    list.iter()
                        .filter_map(|s| s.get("id").and_then(Value::as_str).map(str::to_string))
                        .collect(),
                ))
            }
            Err(e) => {
                let err = match classify(e) {
                    AgentFailure::Unavailable(err) => err,
                    AgentFailure::Rejected { status, message } => format!("{status}: {message}"),
                };
                self.unavailable(what, &err)?;
                Ok(None)
            }
        }
    }

    fn check(&self) -> Result<Option<Value>, CniError> {
        self.prev_result()?;
        if let Some(ids) = self.enrolled_ids("check enrolment")? {
            if !ids.iter().any(|i| i == self.id()) {
                return Err(CniError::new(
                    code::NOT_ENROLLED,
                    format!(
                        "not enrolled: netfaultd does not know sandbox {}",
                        self.id()
                    ),
                ));
            }
        }
        Ok(None)
    }

    fn status(&self) -> Result<Option<Value>, CniError> {
        let err = match self.client().raw("GET", "/healthz", None) {
            Ok(r) if r.status == 200 => return Ok(None),
            Ok(r) => format!("GET /healthz answered {}", r.status),
            Err(e) => e.to_string(),
        };
        match self.conf.failure_policy {
            FailurePolicy::Ignore => {
                self.log(&format!(
                    "netfaultd not ready, reporting available anyway (failurePolicy=ignore): {err}"
                ));
                Ok(None)
            }
            FailurePolicy::Fail => Err(CniError::new(
                code::PLUGIN_NOT_AVAILABLE,
                "netfaultd is not available (failurePolicy=fail)",
            )
            .with_details(err)),
        }
    }

    /// Releases every enrolled sandbox whose container id is not among the valid
    /// attachments. Sandboxes are matched by container id only: one sandbox per
    /// container, whatever the interface.
    fn gc(&self) -> Result<Option<Value>, CniError> {
        let valid = self.conf.valid_container_ids()?;
        for id in pending::ids(&self.conf.socket) {
            if !valid.contains(&id) {
                self.forget_pending(&id);
            }
        }
        let Some(ids) = self.enrolled_ids("garbage-collect sandboxes")? else {
            return Ok(None);
        };
        let client = self.client();
        let mut failed = Vec::new();
        for id in ids.iter().filter(|id| !valid.contains(*id)) {
            match client.call("DELETE", &format!("/v1/sandboxes/{id}"), None) {
                Ok(_) => self.log(&format!("released stale sandbox {id}")),
                Err(e) => failed.push(format!("{id}: {e}")),
            }
        }
        if !failed.is_empty() {
            self.unavailable("garbage-collect sandboxes", &failed.join("; "))?;
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Env {
        Env::from_pairs(vars)
    }

    /// A conf whose socket is in a directory that does not exist, so nothing
    /// listens and no pending enrolment can be written.
    fn no_agent_conf(policy: &str, extra: &str) -> Vec<u8> {
        let socket = std::env::temp_dir()
            .join(format!("netfault-no-such-dir-{}", std::process::id()))
            .join("netfaultd.sock");
        format!(
            r#"{{"cniVersion":"1.0.0","name":"t","type":"netfault","socket":{},"failurePolicy":"{policy}"{extra}}}"#,
            serde_json::Value::String(socket.to_string_lossy().into_owned())
        )
        .into_bytes()
    }

    const PREV: &str = r#","prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/x"}],"ips":[{"interface":0,"address":"198.18.0.4/24"}]}"#;

    fn add_env() -> Env {
        env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p"),
        ])
    }

    /// A reader that fails, as a broken stdin would.
    struct Broken;

    impl Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("broken"))
        }
    }

    #[test]
    fn main_prints_one_line_and_sets_the_status() {
        let version = env(&[("CNI_COMMAND", "VERSION")]);
        let mut out = Vec::new();
        let status = plugin_main(&version, &mut &br#"{"cniVersion":"1.0.0"}"#[..], &mut out);
        assert_eq!(status, 0);
        let text = String::from_utf8(out).expect("UTF-8");
        assert!(
            text.ends_with("}\n") && text.matches('\n').count() == 1,
            "{text:?}"
        );
        let v: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(v["cniVersion"], "1.0.0");

        let mut out = Vec::new();
        assert_eq!(plugin_main(&env(&[]), &mut &b"{}"[..], &mut out), 1);
        let v: Value = serde_json::from_slice(&out).expect("error JSON");
        assert_eq!(v["code"], code::INVALID_ENV);

        let mut out = Vec::new();
        assert_eq!(plugin_main(&version, &mut Broken, &mut out), 1);
        let v: Value = serde_json::from_slice(&out).expect("error JSON");
        assert_eq!(v["code"], code::IO);

        let mut out = Vec::new();
        let del = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ]);
        assert_eq!(
            plugin_main(&del, &mut &no_agent_conf("ignore", "")[..], &mut out),
            0
        );
        assert!(out.is_empty(), "DEL prints nothing");
    }

    #[test]
    fn missing_command_is_code_4() {
        let e = run(&env(&[]), b"{}").expect_err("no command");
        assert_eq!(e.code, code::INVALID_ENV);
        let e = run(&env(&[("CNI_COMMAND", "FROB")]), b"{}").expect_err("unknown");
        assert_eq!(e.code, code::INVALID_ENV);
    }

    #[test]
    fn version_needs_nothing_else() {
        let v = run(&env(&[("CNI_COMMAND", "VERSION")]), b"").expect("version");
        let v = v.expect("printed");
        assert_eq!(v["supportedVersions"].as_array().map(Vec::len), Some(5));
    }

    #[test]
    fn add_without_agent() {
        let out = run(&add_env(), &no_agent_conf("ignore", PREV))
            .expect("ignore policy succeeds")
            .expect("prints result");
        assert_eq!(out["ips"][0]["address"], "198.18.0.4/24");
        assert_eq!(out["cniVersion"], "1.0.0");
        let e = run(&add_env(), &no_agent_conf("fail", PREV)).expect_err("fail policy");
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
        let e = run(&add_env(), &no_agent_conf("ignore", "")).expect_err("no prevResult");
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.msg.starts_with("prevResult"), "{}", e.msg);
    }

    #[test]
    fn del_check_status_gc_without_agent() {
        let del = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ]);
        assert_eq!(run(&del, &no_agent_conf("ignore", "")), Ok(None));
        assert!(run(&del, &no_agent_conf("fail", "")).is_err());

        let mut check = add_env();
        check.command = Some("CHECK".into());
        assert_eq!(run(&check, &no_agent_conf("ignore", PREV)), Ok(None));
        assert_eq!(
            run(&check, &no_agent_conf("ignore", ""))
                .expect_err("prevResult")
                .code,
            code::INVALID_CONFIG
        );

        let status = env(&[("CNI_COMMAND", "STATUS")]);
        let conf11 = |p: &str| {
            String::from_utf8_lossy(&no_agent_conf(p, ""))
                .replace("1.0.0", "1.1.0")
                .into_bytes()
        };
        assert_eq!(run(&status, &conf11("ignore")), Ok(None));
        let e = run(&status, &conf11("fail")).expect_err("status fail");
        assert_eq!(e.code, code::PLUGIN_NOT_AVAILABLE);
        let e = run(&status, &no_agent_conf("ignore", "")).expect_err("1.0.0 has no STATUS");
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);

        let gc = env(&[("CNI_COMMAND", "GC")]);
        assert_eq!(run(&gc, &conf11("ignore")), Ok(None));
    }
}
