//! The API socket's access control: mode 0660, owner root, the group of
//! `--socket-group`; who can and cannot connect, measured by connecting as
//! other users; mutating requests logged with the caller's pid and uid; an
//! oversized body refused with 413, changing nothing.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, setgid, setgroups, setuid, ForkResult, Gid, Group, Uid};
use serde_json::{json, Value};
use testbed::{Agent, TempDir};

/// `nobody`, the unprivileged caller.
const NOBODY: u32 = 65534;

/// A directory for one agent that any user may traverse (the socket's own
/// mode is then the only gate).
fn agent_dir(prefix: &str) -> TempDir {
    let dir = TempDir::new(prefix).expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod 0755 the agent dir");
    dir
}

fn gid_of(name: &str) -> u32 {
    Group::from_name(name)
        .expect("group database")
        .unwrap_or_else(|| panic!("no group {name} on this system"))
        .gid
        .as_raw()
}

/// One HTTP/1.1 request on `socket` with `Connection: close`: the status and
/// the body. The request is written on another thread (the agent may answer
/// and close before it has read an oversized body); `chunked` sends the body
/// without a length.
fn http(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    chunked: bool,
) -> std::io::Result<(u16, String)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = s.try_clone()?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    let writer = std::thread::spawn(move || {
        // Errors are the agent closing early; the answer says why.
        match body {
            None => {
                head.push_str("\r\n");
                let _ = w.write_all(head.as_bytes());
            }
            Some(b) if chunked => {
                head.push_str(
                    "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
                );
                let _ = w.write_all(head.as_bytes());
                for c in b.chunks(64 * 1024) {
                    let frame = [format!("{:x}\r\n", c.len()).as_bytes(), c, b"\r\n"].concat();
                    if w.write_all(&frame).is_err() {
                        return;
                    }
                }
                let _ = w.write_all(b"0\r\n\r\n");
            }
            Some(b) => {
                head.push_str(&format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    b.len()
                ));
                let _ = w.write_all(head.as_bytes());
                let _ = w.write_all(&b);
            }
        }
    });
    let mut raw = Vec::new();
    let read = s.read_to_end(&mut raw);
    let _ = writer.join();
    if raw.is_empty() {
        read?;
    }
    parse_response(&raw)
}

/// Like [`http`] without a body or a writer thread: safe in a forked child.
fn http_simple(socket: &Path, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> std::io::Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let bad = || std::io::Error::other(format!("not an HTTP response: {text:?}"));
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    let body = text.split_once("\r\n\r\n").ok_or_else(bad)?.1.to_string();
    Ok((status, body))
}

/// What a child process saw: its pid, and `Ok(status)` or the errno of its
/// failure.
struct Seen {
    pid: i32,
    result: Result<u16, i32>,
    detail: String,
}

/// Forks a child that drops to `uid` with primary group `gid` and the
/// supplementary `groups`, then makes one request on `socket`.
fn as_user(uid: u32, gid: u32, groups: &[u32], socket: &Path, method: &str, path: &str) -> Seen {
    let groups: Vec<Gid> = groups.iter().map(|g| Gid::from_raw(*g)).collect();
    let (rd, wr) = nix::unistd::pipe().expect("pipe");
    // SAFETY: the child only makes syscalls and allocates (glibc's malloc is
    // fork-safe), reports through the pipe and leaves with `_exit`.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            drop(rd);
            let report = (|| -> Result<String, String> {
                setgroups(&groups).map_err(|e| format!("setgroups: {e}"))?;
                setgid(Gid::from_raw(gid)).map_err(|e| format!("setgid: {e}"))?;
                setuid(Uid::from_raw(uid)).map_err(|e| format!("setuid: {e}"))?;
                match http_simple(socket, method, path) {
                    Ok((status, body)) => Ok(format!("ok {status} {body}")),
                    Err(e) => Ok(format!("err {} {e}", e.raw_os_error().unwrap_or(-1))),
                }
            })()
            .unwrap_or_else(|e| format!("setup {e}"));
            let mut f = std::fs::File::from(wr);
            let _ = f.write_all(report.as_bytes());
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            drop(wr);
            let mut report = String::new();
            let _ = std::fs::File::from(rd).read_to_string(&mut report);
            let status = waitpid(child, None).expect("waitpid");
            assert!(
                matches!(status, WaitStatus::Exited(_, 0)),
                "child {child} ended {status:?}: {report}"
            );
            let mut words = report.splitn(3, ' ');
            let kind = words.next().unwrap_or_default();
            let code: i32 = words.next().and_then(|w| w.parse().ok()).unwrap_or(-1);
            let detail = words.next().unwrap_or_default().to_string();
            let result = match kind {
                "ok" => Ok(code as u16),
                "err" => Err(code),
                _ => panic!("child {child} could not drop privileges: {report}"),
            };
            Seen {
                pid: child.as_raw(),
                result,
                detail,
            }
        }
    }
}

/// The agent's log lines (since its start) that contain every one of `needles`,
/// waiting up to 2 s for one to appear.
fn log_lines_with(agent: &Agent, needles: &[&str]) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let found: Vec<String> = agent
            .log_tail(10_000)
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_string)
            .collect();
        if !found.is_empty() || Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn socket_is_mode_0660_owned_by_root_with_the_configured_group() {
    testbed::require_root!();
    let _gate = crate::support::Gate::shared();
    let daemon = gid_of("daemon");
    let nogroup = gid_of("nogroup");
    assert_ne!(daemon, 0);
    assert_ne!(nogroup, 0);
    let cases: [(&str, Vec<String>, u32); 3] = [
        (
            "by name",
            vec!["--socket-group".into(), "nogroup".into()],
            nogroup,
        ),
        (
            "by gid",
            vec!["--socket-group".into(), daemon.to_string()],
            daemon,
        ),
        ("default", vec![], 0),
    ];
    for (what, args, gid) in cases {
        let dir = agent_dir("nf-sock-mode");
        // A stale socket file from an earlier agent is replaced.
        std::fs::write(dir.path().join("netfaultd.sock"), b"stale").expect("stale file");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = Agent::start_with_args(dir.path(), &args)
            .unwrap_or_else(|e| panic!("{what}: netfaultd starts: {e}"));
        let meta = std::fs::symlink_metadata(agent.socket()).expect("stat the socket");
        use std::os::unix::fs::FileTypeExt;
        assert!(meta.file_type().is_socket(), "{what}: not a socket");
        assert_eq!(
            meta.mode() & 0o7777,
            0o660,
            "{what}: mode {:o}",
            meta.mode() & 0o7777
        );
        assert_eq!(meta.uid(), 0, "{what}: owner");
        assert_eq!(meta.gid(), gid, "{what}: group");
        // Nothing left of the private directory it was bound in.
        let left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list the agent dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert_eq!(left, Vec::<String>::new(), "{what}: leftovers");
    }
}

#[test]
fn unknown_socket_group_is_a_startup_error_naming_the_flag() {
    testbed::require_root!();
    let _gate = crate::support::Gate::shared();
    let dir = agent_dir("nf-sock-badgroup");
    let out = std::process::Command::new(testbed::workspace_bin("netfaultd"))
        .arg("--socket")
        .arg(dir.path().join("netfaultd.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--socket-group", "no-such-group-netfault"])
        .output()
        .expect("run netfaultd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started anyway: {err}");
    assert!(err.contains("--socket-group"), "names the flag: {err}");
    assert!(
        !dir.path().join("netfaultd.sock").exists(),
        "a socket was created"
    );
}

#[test]
fn only_root_and_group_members_can_connect() {
    testbed::require_root!();
    let _gate = crate::support::Gate::shared();
    let daemon = gid_of("daemon");
    let dir = agent_dir("nf-sock-access");
    let agent =
        Agent::start_with_args(dir.path(), &["--socket-group", "daemon"]).expect("netfaultd");
    let socket = agent.socket();

    let outsider = as_user(NOBODY, NOBODY, &[], &socket, "GET", "/healthz");
    assert_eq!(
        outsider.result,
        Err(libc::EACCES),
        "uid/gid nobody, not in daemon: {}",
        outsider.detail
    );

    let member = as_user(NOBODY, daemon, &[], &socket, "GET", "/healthz");
    assert_eq!(
        member.result,
        Ok(200),
        "uid nobody, gid daemon: {}",
        member.detail
    );

    let supplementary = as_user(NOBODY, NOBODY, &[daemon], &socket, "GET", "/healthz");
    assert_eq!(
        supplementary.result,
        Ok(200),
        "uid/gid nobody, supplementary group daemon: {}",
        supplementary.detail
    );

    let (status, _) = http(&socket, "GET", "/healthz", None, false).expect("root connects");
    assert_eq!(status, 200, "root");
}

#[test]
fn mutating_requests_are_logged_with_the_callers_pid_and_uid() {
    testbed::require_root!();
    let _gate = crate::support::Gate::shared();
    let daemon = gid_of("daemon");
    let dir = agent_dir("nf-sock-log");
    let agent =
        Agent::start_with_args(dir.path(), &["--socket-group", "daemon"]).expect("netfaultd");
    let socket = agent.socket();

    // A member of the group releases a sandbox (204 even when unknown).
    let path = "/v1/sandboxes/sock-log-test";
    let seen = as_user(NOBODY, daemon, &[], &socket, "DELETE", path);
    assert_eq!(seen.result, Ok(204), "DELETE as a member: {}", seen.detail);
    let pid = format!("pid={}", seen.pid);
    let uid = format!("uid={NOBODY}");
    let gid = format!("gid={daemon}");
    let lines = log_lines_with(
        &agent,
        &["method=DELETE", &format!("path={path} "), "status=204"],
    );
    assert_eq!(lines.len(), 1, "one line for the DELETE: {lines:?}");
    for want in [&pid, &uid, &gid] {
        assert!(
            lines[0].split_whitespace().any(|w| w == want.as_str()),
            "{want} in {:?}",
            lines[0]
        );
    }
    assert!(lines[0].contains(" INFO "), "at info: {:?}", lines[0]);

    // Root, from this process: a refused POST is logged too, with its status.
    let (status, _) = http(
        &socket,
        "POST",
        "/v1/faults",
        Some(b"{\"target\": 1}".to_vec()),
        false,
    )
    .expect("POST");
    assert_eq!(status, 400);
    let lines = log_lines_with(&agent, &["method=POST", "path=/v1/faults ", "status=400"]);
    assert_eq!(lines.len(), 1, "one line for the POST: {lines:?}");
    let me = format!("pid={}", std::process::id());
    assert!(
        lines[0].split_whitespace().any(|w| w == me),
        "{me} in {:?}",
        lines[0]
    );
    assert!(
        lines[0].split_whitespace().any(|w| w == "uid=0"),
        "uid=0 in {:?}",
        lines[0]
    );

    // Reads are not logged at info.
    let (status, _) = http(&socket, "GET", "/v1/faults", None, false).expect("GET");
    assert_eq!(status, 200);
    let (status, _) = http(&socket, "POST", "/healthz", None, false).expect("POST /healthz");
    assert_eq!(status, 405);
    // The 405 line is written after the GET's would have been.
    assert_eq!(
        log_lines_with(&agent, &["method=POST", "path=/healthz "]).len(),
        1
    );
    let reads = log_lines_with(&agent, &["method=GET"]);
    assert_eq!(reads, Vec::<String>::new(), "reads logged at info");
}

#[test]
fn oversized_body_is_refused_with_413_naming_body_and_changes_nothing() {
    testbed::require_root!();
    let _gate = crate::support::Gate::shared();
    let dir = agent_dir("nf-sock-big");
    let agent = Agent::start(dir.path()).expect("netfaultd");
    let socket = agent.socket();
    let pad = "x".repeat((1 << 20) + 1);
    let fault = json!({"target": {"sandbox": "nope"}, "action": {"type": "blackhole"},
        "duration": "30s", "pad": pad});
    let enrol = json!({"netns": "/nonexistent", "ifname": "eth0", "ips": [],
        "annotations": {"pad": pad}});
    let cases = [
        ("POST", "/v1/faults", &fault, false),
        ("POST", "/v1/faults", &fault, true),
        ("PUT", "/v1/sandboxes/sock-big", &enrol, false),
        ("PUT", "/v1/sandboxes/sock-big", &enrol, true),
    ];
    for (method, path, body, chunked) in cases {
        let what = format!("{method} {path} (chunked: {chunked})");
        let (status, text) = http(
            &socket,
            method,
            path,
            Some(body.to_string().into_bytes()),
            chunked,
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(status, 413, "{what}: {text}");
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {e}: {text}"));
        assert_eq!(v["error"]["field"], "body", "{what}: {v}");
        assert_eq!(v["error"]["code"], "invalid", "{what}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("1048576")),
            "{what}: the message gives the limit: {v}"
        );
        let (status, _) = http(&socket, "GET", "/healthz", None, false).expect("healthz");
        assert_eq!(status, 200, "{what}: healthy after");
    }
    let c = agent.client();
    assert_eq!(
        c.call("GET", "/v1/faults", None).expect("faults"),
        json!([])
    );
    assert_eq!(
        c.call("GET", "/v1/sandboxes", None).expect("sandboxes"),
        json!([])
    );
}
