//! The API on a loopback TCP port (`netfaultd --listen-tcp --token-file`):
//! every request needs the bearer token (401 with `WWW-Authenticate: Bearer`
//! otherwise, changing nothing), the right token creates and deletes faults
//! whose effect is measured on the wire, a rewritten token file takes effect
//! on the next request, `netfaultctl --url --token-file` works end to end,
//! a token file that does not exist yet means 503 on every TCP request until
//! it appears (the optional Secret of the DaemonSet), and bad flags stop the
//! agent at start with an error naming the flag.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testbed::{udp_probe, Agent, AgentNode, Node, NodeOptions, TempDir};

use crate::support::{v4, Gate};

const TOKEN: &str = "tcp-api-token-0123456789abcdefghij";

pub(crate) fn write_token(path: &Path, token: &str) {
    std::fs::write(path, format!("{token}\n")).expect("write the token file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .expect("chmod 0600 the token file");
}

/// An agent with `--listen-tcp 127.0.0.1:0 --token-file DIR/token`, its node,
/// and the TCP address it logged.
fn tcp_node(prefix: &str) -> (AgentNode, PathBuf, SocketAddr) {
    let dir = TempDir::new(prefix).expect("temp dir");
    let token = dir.path().join("token");
    write_token(&token, TOKEN);
    let (bed, addr) = tcp_agent_node(dir, &token);
    (bed, token, addr)
}

/// An agent in `dir` with `--listen-tcp 127.0.0.1:0 --token-file TOKEN`
/// (which need not exist yet), its node, and the TCP address it logged.
pub(crate) fn tcp_agent_node(dir: TempDir, token: &Path) -> (AgentNode, SocketAddr) {
    let token_arg = token.to_str().expect("utf-8 path").to_string();
    let agent = Agent::start_with_args(
        dir.path(),
        &["--listen-tcp", "127.0.0.1:0", "--token-file", &token_arg],
    )
    .unwrap_or_else(|e| panic!("netfaultd with --listen-tcp: {e}"));
    let addr = tcp_addr(&agent);
    let node = Node::new(NodeOptions {
        socket: agent.socket(),
        ..NodeOptions::default()
    })
    .unwrap_or_else(|e| panic!("node netns and CNI chain: {e}"));
    (AgentNode { node, agent, dir }, addr)
}

/// The address from the agent's "serving the API on TCP" log line.
pub(crate) fn tcp_addr(agent: &Agent) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = agent.log_tail(10_000);
        let found = log
            .lines()
            .filter(|l| l.contains("serving the API on TCP"))
            .find_map(|l| {
                l.split("addr=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            });
        if let Some(a) = found {
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "no TCP address in the log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One raw request over TCP with the given `Authorization` value (bytes, so
/// that malformed ones can be sent): status, lower-cased head, body.
/// POSTs `fault` over TCP with `auth` as the Authorization value; asserts
/// 201 and returns the new fault's id.
fn post_fault_over_tcp(addr: SocketAddr, auth: &[u8], fault: &str) -> String {
    let (status, _, resp) = tcp_http(addr, "POST", "/v1/faults", Some(auth), Some(fault));
    assert_eq!(status, 201, "{resp}");
    serde_json::from_str::<Value>(&resp).expect("json")["id"]
        .as_str()
        .expect("an id")
        .to_string()
}

fn tcp_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&[u8]>,
    body: Option<&str>,
) -> (u16, String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n").into_bytes();
    if let Some(a) = auth {
        req.extend_from_slice(b"Authorization: ");
        req.extend_from_slice(a);
        req.extend_from_slice(b"\r\n");
    }
    let body = body.unwrap_or_default();
    req.extend_from_slice(
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    s.write_all(&req).expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line in {head:?}"));
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn bearer(token: &str) -> Vec<u8> {
    format!("Bearer {token}").into_bytes()
}

fn ctl(addr: SocketAddr, token_file: &Path, args: &[&str]) -> Output {
    Command::new(testbed::workspace_bin("netfaultctl"))
        .arg("--url")
        .arg(format!("http://{addr}"))
        .arg("--token-file")
        .arg(token_file)
        .args(args)
        .env_remove("NETFAULT_SOCKET")
        .stdin(Stdio::null())
        .output()
        .expect("run netfaultctl")
}

#[test]
fn tcp_api_needs_the_token_and_its_faults_change_the_wire() {
    testbed::require_root!();
    let _gate = Gate::shared();
    let (bed, token_file, addr) = tcp_node("netfault-tcp");
    let [a, b] = [
        bed.add_pod("a").expect("pod a"),
        bed.add_pod("b").expect("pod b"),
    ];
    let fault = json!({"target": {"sandbox": a.container_id}, "direction": "egress",
        "match": {"protocol": "udp", "ports": "7501"}, "action": {"type": "blackhole"},
        "duration": "30s"})
    .to_string();
    let list_before = bed
        .agent
        .client()
        .call("GET", "/v1/faults", None)
        .expect("list over the socket, without a token");
    assert_eq!(list_before, json!([]));

    // Refused: no header, wrong tokens of the same and other lengths, other
    // schemes, malformed values. Each is a 401 naming Authorization.
    let same_len: String = TOKEN
        .chars()
        .map(|c| if c == 'a' { 'b' } else { c })
        .collect();
    assert_eq!(same_len.len(), TOKEN.len());
    assert_ne!(same_len, TOKEN);
    let refused: Vec<Option<Vec<u8>>> = vec![
        None,
        Some(bearer(&same_len)),
        Some(bearer("short")),
        Some(bearer(&format!("{TOKEN}x"))),
        Some(bearer(&TOKEN[..TOKEN.len() - 1])),
        Some(format!("Basic {TOKEN}").into_bytes()),
        Some(b"Bearer".to_vec()),
        Some(b"Bearer \xff\xfe".to_vec()),
    ];
    for auth in &refused {
        for (method, path, body) in [
            ("POST", "/v1/faults", Some(fault.as_str())),
            ("GET", "/v1/faults", None),
            ("GET", "/healthz", None),
        ] {
            let (status, head, resp) = tcp_http(addr, method, path, auth.as_deref(), body);
            let shown = auth.as_deref().map(String::from_utf8_lossy);
            assert_eq!(status, 401, "{method} {path} with {shown:?}: {resp}");
            assert!(
                head.contains("\r\nwww-authenticate: bearer"),
                "{method} {path} with {shown:?}: {head}"
            );
            let v: Value = serde_json::from_str(&resp).expect("a JSON error body");
            assert_eq!(v["error"]["code"], "unauthorized", "{v}");
            assert_eq!(v["error"]["field"], "Authorization", "{v}");
        }
    }
    // The Client without a token, and with a wrong one: 401 too.
    let url = format!("http://{addr}");
    for client in [
        netfault_api::Client::tcp(&url).expect("url"),
        netfault_api::Client::tcp(&url)
            .expect("url")
            .with_token(same_len.clone()),
    ] {
        match client.call(
            "POST",
            "/v1/faults",
            Some(&serde_json::from_str(&fault).expect("json")),
        ) {
            Err(netfault_api::ClientError::Api { status: 401, .. }) => {}
            other => panic!("expected 401, got {other:?}"),
        }
    }
    assert_eq!(
        bed.agent
            .client()
            .call("GET", "/v1/faults", None)
            .expect("list"),
        list_before,
        "a refused request created a fault"
    );
    let p = udp_probe(&a, &b, v4(&b), 7501, 200, Duration::from_micros(200)).expect("probe");
    assert_eq!(p.received, p.sent, "refused requests left the wire alone");

    // The right token (scheme in any case, extra spaces): the fault is made
    // and blackholes the traffic; DELETE through TCP ends it.
    let client = netfault_api::Client::tcp(&url)
        .expect("url")
        .with_token(TOKEN);
    let id = post_fault_over_tcp(addr, format!("bEaReR   {TOKEN}  ").as_bytes(), &fault);
    let p = udp_probe(&a, &b, v4(&b), 7501, 200, Duration::from_micros(200)).expect("probe");
    assert_eq!(p.received, 0, "the fault made over TCP blackholes the flow");
    let listed = client
        .call("GET", "/v1/faults", None)
        .expect("list over TCP");
    assert!(listed.to_string().contains(&id), "{listed}");
    // The hand-over is for a new agent on the node (the unix socket) only:
    // even with the token, TCP does not know it, and nothing freezes.
    let good = bearer(TOKEN);
    let (status, _, resp) = tcp_http(
        addr,
        "POST",
        "/v1/handover",
        Some(&good),
        Some(r#"{"successor": 1}"#),
    );
    assert_eq!(status, 404, "{resp}");
    let again = post_fault_over_tcp(addr, &good, &fault.replace("7501", "7502"));
    client
        .call("DELETE", &format!("/v1/faults/{again}"), None)
        .expect("not frozen: DELETE over TCP");
    client
        .call("DELETE", &format!("/v1/faults/{id}"), None)
        .expect("DELETE over TCP");
    let p = udp_probe(&a, &b, v4(&b), 7501, 200, Duration::from_micros(200)).expect("probe");
    assert_eq!(p.received, p.sent, "the fault deleted over TCP is gone");
    // Mutating requests are logged with the TCP peer.
    let log = bed.agent.log_tail(10_000);
    assert!(
        log.lines().any(|l| l.contains("api request (tcp)")
            && l.contains("POST")
            && l.contains("peer=127.0.0.1:")),
        "no log line naming the TCP peer:\n{log}"
    );

    // Rotation: the file rewritten in place, then replaced by a rename.
    let rotated = "rotated-token-ABCDEFGHIJKLMNOPQRSTUV";
    write_token(&token_file, rotated);
    let (old, _, _) = tcp_http(addr, "GET", "/v1/faults", Some(&bearer(TOKEN)), None);
    let (new, _, _) = tcp_http(addr, "GET", "/v1/faults", Some(&bearer(rotated)), None);
    assert_eq!((old, new), (401, 200), "after rewriting the token file");
    let staged = token_file.with_extension("new");
    let third = "third-token-0123456789-zyxwvutsrq";
    write_token(&staged, third);
    std::fs::rename(&staged, &token_file).expect("rename over the token file");
    let (old, _, _) = tcp_http(addr, "GET", "/v1/faults", Some(&bearer(rotated)), None);
    let (new, _, _) = tcp_http(addr, "GET", "/v1/faults", Some(&bearer(third)), None);
    assert_eq!(
        (old, new),
        (401, 200),
        "after renaming a new token file over it"
    );

    // netfaultctl --url --token-file: apply, list, delete, each seen on the wire.
    let dir = TempDir::new("nfctl-tcp").expect("temp dir");
    let file = dir.path().join("fault.json");
    std::fs::write(&file, &fault).expect("write");
    let out = ctl(
        addr,
        &token_file,
        &["-o", "json", "apply", "-f", file.to_str().expect("utf-8")],
    );
    assert!(
        out.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: Value = serde_json::from_slice(&out.stdout).expect("apply -o json prints JSON");
    let id = created[0]["id"].as_str().expect("created id").to_string();
    let p = udp_probe(&a, &b, v4(&b), 7501, 200, Duration::from_micros(200)).expect("probe");
    assert_eq!(p.received, 0, "netfaultctl --url applied the blackhole");
    let out = ctl(addr, &token_file, &["list"]);
    assert!(
        out.status.success(),
        "list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id));
    let out = ctl(addr, &token_file, &["delete", &id]);
    assert!(
        out.status.success(),
        "delete: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = udp_probe(&a, &b, v4(&b), 7501, 200, Duration::from_micros(200)).expect("probe");
    assert_eq!(
        p.received, p.sent,
        "netfaultctl --url deleted the blackhole"
    );
    // A wrong token file: exit 1 naming the flag, nothing listed.
    let wrong = dir.path().join("wrong");
    write_token(&wrong, "not-the-token-0123456789");
    let out = ctl(addr, &wrong, &["list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--token-file"), "{err}");
    assert_eq!(
        bed.agent
            .client()
            .call("GET", "/v1/faults", None)
            .expect("list"),
        json!([]),
        "faults left behind"
    );
}

/// Runs netfaultd with `args` (plus a private socket and state dir, CRI
/// off), expecting it to exit by itself within 10 s.
fn netfaultd_exit(dir: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(testbed::workspace_bin("netfaultd"))
        .arg("--socket")
        .arg(dir.join("netfaultd.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--cri-socket", ""])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start netfaultd");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("reap");
            panic!(
                "netfaultd {args:?} kept running: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("reap")
}

#[test]
fn bad_tcp_flags_stop_the_agent_naming_the_flag() {
    testbed::require_root!();
    let _gate = Gate::shared();
    testbed::ensure_workspace_bins().expect("workspace binaries");
    let dir = TempDir::new("netfault-tcp-flags").expect("temp dir");
    let token = dir.path().join("token");
    write_token(&token, TOKEN);
    let empty = dir.path().join("empty");
    std::fs::write(&empty, " \n\t").expect("write");
    let missing = dir.path().join("missing");
    let t = token.to_str().expect("utf-8");
    let e = empty.to_str().expect("utf-8");
    let m = missing.to_str().expect("utf-8");
    let d = dir.path().to_str().expect("utf-8");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--listen-tcp", "0.0.0.0:0", "--token-file", t],
            "--listen-tcp",
        ),
        (
            vec!["--listen-tcp", "198.18.0.1:7979", "--token-file", t],
            "--listen-tcp",
        ),
        (
            vec!["--listen-tcp", "[::]:0", "--token-file", t],
            "--listen-tcp",
        ),
        (
            vec!["--listen-tcp", "127.0.0.1", "--token-file", t],
            "--listen-tcp",
        ),
        (vec!["--listen-tcp", "127.0.0.1:0"], "--token-file"),
        (
            vec!["--listen-tcp", "127.0.0.1:0", "--token-file", e],
            "--token-file",
        ),
        // A directory where the file cannot be read: not "missing", wrong.
        (
            vec!["--listen-tcp", "127.0.0.1:0", "--token-file", d],
            "--token-file",
        ),
        // --token-file without --listen-tcp, and the reverse.
        (vec!["--token-file", m], "--listen-tcp"),
    ];
    for (args, flag) in cases {
        let out = netfaultd_exit(dir.path(), &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started: {err}");
        assert!(
            err.contains(flag),
            "{args:?}: the error names {flag}: {err}"
        );
        assert!(
            !dir.path().join("netfaultd.sock").exists(),
            "{args:?}: the socket was served before the error"
        );
    }
}

/// The DaemonSet's token comes from an optional Secret: without the file the
/// agent starts, answers every TCP request 503 naming the file and the
/// Secret (changing nothing), serves its socket as usual, logs it once, and
/// takes the token as soon as the file appears.
#[test]
fn tcp_api_answers_503_until_the_token_file_appears() {
    testbed::require_root!();
    let _gate = Gate::shared();
    let dir = TempDir::new("netfault-tcp-wait").expect("temp dir");
    let token_file = dir.path().join("secret").join("token");
    let token_arg = token_file.to_str().expect("utf-8 path").to_string();
    let (bed, addr) = tcp_agent_node(dir, &token_file);
    let [a, b] = [
        bed.add_pod("a").expect("pod a"),
        bed.add_pod("b").expect("pod b"),
    ];
    let fault = json!({"target": {"sandbox": a.container_id}, "direction": "egress",
        "match": {"protocol": "udp", "ports": "7502"}, "action": {"type": "blackhole"},
        "duration": "30s"})
    .to_string();

    for auth in [None, Some(bearer(TOKEN))] {
        for (method, path, body) in [
            ("POST", "/v1/faults", Some(fault.as_str())),
            ("GET", "/v1/faults", None),
            ("GET", "/healthz", None),
        ] {
            let (status, head, resp) = tcp_http(addr, method, path, auth.as_deref(), body);
            assert_eq!(status, 503, "{method} {path}: {resp}");
            assert!(head.contains("\r\nretry-after: "), "{head}");
            let v: Value = serde_json::from_str(&resp).expect("a JSON error body");
            assert_eq!(v["error"]["code"], "unavailable", "{v}");
            assert_eq!(v["error"]["field"], "token-file", "{v}");
            let msg = v["error"]["message"].as_str().expect("a message");
            assert!(
                msg.contains(&token_arg),
                "the message names the file: {msg}"
            );
            assert!(
                msg.contains("kubectl -n netfault create secret generic netfault-api-token"),
                "the message says how to create the Secret: {msg}"
            );
        }
    }
    // netfaultctl --url shows the agent's reason.
    let ctl_token = bed.dir.path().join("ctl-token");
    write_token(&ctl_token, TOKEN);
    let out = ctl(addr, &ctl_token, &["list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no token yet"), "{err}");
    // The socket is unaffected, and the refused POST changed nothing.
    assert_eq!(
        bed.agent
            .client()
            .call("GET", "/v1/faults", None)
            .expect("list over the socket"),
        json!([])
    );
    let p = udp_probe(&a, &b, v4(&b), 7502, 200, Duration::from_micros(200)).expect("probe");
    assert_eq!(p.received, p.sent, "a 503 left the wire alone");
    let log = bed.agent.log_tail(10_000);
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("does not exist yet"))
            .count(),
        1,
        "logged once:\n{log}"
    );

    // The file appears (as the kubelet fills a Secret volume): a wrong token
    // is a 401, the right one works and its fault is on the wire.
    std::fs::create_dir_all(token_file.parent().expect("a parent")).expect("mkdir");
    write_token(&token_file, TOKEN);
    let (status, _, _) = tcp_http(
        addr,
        "GET",
        "/v1/faults",
        Some(&bearer("wrong-token-0123456789abcdef")),
        None,
    );
    assert_eq!(status, 401, "a wrong token once the file exists");
    let id = post_fault_over_tcp(addr, &bearer(TOKEN), &fault);
    let p = udp_probe(&a, &b, v4(&b), 7502, 200, Duration::from_micros(200)).expect("probe");
    assert_eq!(p.received, 0, "the fault made once the token appeared acts");
    let (status, _, _) = tcp_http(
        addr,
        "DELETE",
        &format!("/v1/faults/{id}"),
        Some(&bearer(TOKEN)),
        None,
    );
    assert_eq!(status, 204);
    let p = udp_probe(&a, &b, v4(&b), 7502, 200, Duration::from_micros(200)).expect("probe");
    assert_eq!(p.received, p.sent, "deleted");
    let log = bed.agent.log_tail(10_000);
    assert!(
        log.lines()
            .any(|l| l.contains("the API token file appeared")),
        "{log}"
    );
}
