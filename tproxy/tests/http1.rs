//! HTTP/1.1 faults through the proxy, seen by real clients on loopback.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use http::{Method, Request, StatusCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn abort_with_status_answers_instead_of_the_server() {
    let h = Harness::new(http1_server().await).await;
    let c = h.set(vec![json!({"type": "http-abort", "status": 503})]);
    let mut s = h.h1().await;
    let (status, headers, body) = send1(&mut s, get("/echo")).await.expect("response");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(&body[..], b"503 Service Unavailable\n");
    assert!(
        headers.get("date").is_none(),
        "the proxy adds no headers of its own"
    );
    assert_eq!(c[0].snapshot().matched, 1);
    assert_eq!(c[0].snapshot().affected, 1);
    assert_eq!(c[0].snapshot().dropped, 1);

    h.set(vec![
        json!({"type": "http-abort", "status": 418, "body": "no coffee"}),
    ]);
    let (status, _, body) = send1(&mut s, get("/echo")).await.expect("response");
    assert_eq!((status.as_u16(), &body[..]), (418, &b"no coffee"[..]));
}

#[tokio::test]
async fn abort_reset_is_a_connection_reset_for_the_client() {
    let h = Harness::new(http1_server().await).await;
    let c = h.set(vec![json!({"type": "http-abort", "reset": true})]);
    let mut s = h.h1().await;
    let err = send1(&mut s, get("/echo")).await.expect_err("no response");
    assert!(!err.is_user(), "{err}");

    let mut raw = h.connect().await;
    raw.write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (got, err) = within(5, read_all(&mut raw)).await;
    assert!(got.is_empty(), "no reply bytes: {got:?}");
    assert_eq!(
        err.map(|e| e.kind()),
        Some(std::io::ErrorKind::ConnectionReset),
        "the client sees an RST"
    );
    assert_eq!(c[0].snapshot().dropped, 2);
}

#[tokio::test]
async fn abort_by_path_glob_leaves_other_paths_alone() {
    let h = Harness::new(http1_server().await).await;
    let c = h.set(vec![json!({"type": "http-abort", "status": 503,
        "http": {"path": "/api/*/orders", "method": "get"}})]);
    let mut s = h.h1().await;
    for (method, path, want) in [
        ("GET", "/api/v1/orders", 503),
        ("GET", "/api/v1/x/orders", 503),
        ("get", "/api/v2/orders", 503),
        ("POST", "/api/v1/orders", 200),
        ("GET", "/api/v1/orders/7", 200),
        ("GET", "/web/api/v1/orders", 200),
        ("GET", "/api/orders", 200),
    ] {
        let req = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).expect("method"))
            .uri(path)
            .header("host", "web.test")
            .body(empty())
            .expect("request");
        let (status, _, body) = send1(&mut s, req).await.expect("response");
        assert_eq!(status.as_u16(), want, "{method} {path}");
        if want == 200 {
            assert_eq!(json_of(&body)["path"], path, "the server got the request");
        }
    }
    assert_eq!(c[0].snapshot().matched, 3);
    assert_eq!(c[0].snapshot().affected, 3);
}

#[tokio::test]
async fn header_selector_matches_exact_values() {
    let h = Harness::new(http1_server().await).await;
    h.set(vec![json!({"type": "http-abort", "status": 500,
        "http": {"headers": {"X-Canary": "yes"}}})]);
    let mut s = h.h1().await;
    for (value, want) in [
        (Some("yes"), 500),
        (Some("no"), 200),
        (None, 200),
        (Some("YES"), 200),
    ] {
        let mut req = get("/echo");
        if let Some(v) = value {
            req.headers_mut()
                .insert("x-canary", v.parse().expect("value"));
        }
        let (status, _, _) = send1(&mut s, req).await.expect("response");
        assert_eq!(status.as_u16(), want, "{value:?}");
    }
}

#[tokio::test]
async fn percent_50_over_200_requests_is_within_binomial_bounds() {
    let h = Harness::new(http1_server().await).await;
    let c = h.set(vec![
        json!({"type": "http-abort", "status": 503, "percent": 50}),
    ]);
    let mut s = h.h1().await;
    let mut aborted = 0u64;
    for _ in 0..200 {
        let (status, _, _) = send1(&mut s, get("/echo")).await.expect("response");
        match status.as_u16() {
            503 => aborted += 1,
            200 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    // Binomial(200, 0.5): mean 100, sigma 7.07; 3 sigma is 79..=121.
    assert!((79..=121).contains(&aborted), "{aborted} of 200 aborted");
    let snap = c[0].snapshot();
    assert_eq!((snap.matched, snap.affected), (200, aborted));
    println!("percent 50: {aborted}/200 aborted");
}

/// One connection, raw bytes: each response must be the right one and
/// framed right, or the next one would be misread.
#[tokio::test]
async fn keep_alive_connection_gets_the_right_answer_for_each_request() {
    let h = Harness::new(http1_server().await).await;
    h.set(vec![
        json!({"type": "http-abort", "status": 503, "http": {"path": "/fail*"}}),
        json!({"type": "http-patch", "phase": "response", "body_merge": {"replicas": 0},
            "http": {"path": "/json"}}),
    ]);
    let mut c = RawConn::new(h.connect().await);
    for round in 0..3 {
        c.send(b"GET /fail/1 HTTP/1.1\r\nHost: web\r\n\r\n").await;
        let r = c.response(false).await.expect("abort response");
        assert_eq!(r.status, 503, "round {round}");

        c.send(b"GET /echo/a?x=1 HTTP/1.1\r\nHost: web\r\n\r\n")
            .await;
        let r = c.response(false).await.expect("echo response");
        assert_eq!(r.status, 200);
        assert_eq!(json_of(&r.body)["uri"], "/echo/a?x=1");

        // An aborted request with a body: the body must not be read as the
        // next request.
        c.send(b"POST /fail/2 HTTP/1.1\r\nHost: web\r\nContent-Length: 26\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n")
            .await;
        let r = c.response(false).await.expect("abort with body");
        assert_eq!(r.status, 503);

        c.send(b"GET /json HTTP/1.1\r\nHost: web\r\n\r\n").await;
        let r = c.response(false).await.expect("patched response");
        assert_eq!(r.status, 200);
        assert_eq!(json_of(&r.body)["replicas"], 0);

        c.send(b"POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
            .await;
        let r = c.response(false).await.expect("chunked upload");
        assert_eq!(json_of(&r.body)["body"], "hello");
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let h = Harness::new(http1_server().await).await;
    h.set(vec![
        json!({"type": "http-abort", "status": 404, "http": {"path": "/b*"}}),
    ]);
    let mut c = RawConn::new(h.connect().await);
    let paths = ["/a1", "/b1", "/a2", "/b2", "/a3", "/json", "/b3"];
    let mut all = Vec::new();
    for p in paths {
        all.extend_from_slice(format!("GET {p} HTTP/1.1\r\nHost: web\r\n\r\n").as_bytes());
    }
    c.send(&all).await;
    for p in paths {
        let r = within(10, c.response(false))
            .await
            .expect("pipelined response");
        if p.starts_with("/b") {
            assert_eq!(r.status, 404, "{p}");
        } else if p == "/json" {
            assert_eq!(json_of(&r.body)["name"], "web");
        } else {
            assert_eq!(
                (r.status, json_of(&r.body)["path"].clone()),
                (200, json!(p))
            );
        }
    }
}

async fn timed(
    s: &mut hyper::client::conn::http1::SendRequest<TestBody>,
    path: &str,
) -> (u16, Duration) {
    let t = Instant::now();
    let (status, _, _) = send1(s, get(path)).await.expect("response");
    (status.as_u16(), t.elapsed())
}

#[tokio::test]
async fn request_and_response_delays_are_seen_by_the_client() {
    let h = Harness::new(http1_server().await).await;
    let mut s = h.h1().await;
    let (_, base) = timed(&mut s, "/echo").await;

    h.set(vec![
        json!({"type": "http-delay", "delay": "300ms", "http": {"path": "/echo"}}),
    ]);
    let (status, d) = timed(&mut s, "/echo").await;
    assert_eq!(status, 200);
    assert!(d >= Duration::from_millis(300), "request delay {d:?}");
    assert!(d < Duration::from_millis(1300), "request delay {d:?}");
    let (_, other) = timed(&mut s, "/other").await;
    assert!(
        other < Duration::from_millis(250),
        "unmatched path delayed: {other:?}"
    );

    h.set(vec![
        json!({"type": "http-delay", "delay": "400ms", "phase": "response",
        "http": {"code": 404}}),
    ]);
    let (status, d) = timed(&mut s, "/status/404").await;
    assert_eq!(status, 404);
    assert!(d >= Duration::from_millis(400), "response delay {d:?}");
    assert!(d < Duration::from_millis(1400), "response delay {d:?}");
    let (status, d) = timed(&mut s, "/status/200").await;
    assert_eq!(status, 200);
    assert!(
        d < Duration::from_millis(350),
        "another code delayed: {d:?}"
    );
    println!("delay: baseline {base:?}, request-phase 300ms, response-phase 400ms measured ok");
}

#[tokio::test]
async fn response_delay_holds_the_response_not_the_request() {
    let (addr, mut seen) = capture_server().await;
    let h = Harness::new(addr).await;
    h.set(vec![
        json!({"type": "http-delay", "delay": "500ms", "phase": "response"}),
    ]);
    let mut c = RawConn::new(h.connect().await);
    let t = Instant::now();
    c.send(b"GET /x HTTP/1.1\r\nHost: web\r\n\r\n").await;
    within(5, seen.recv())
        .await
        .expect("server got the request");
    let at_server = t.elapsed();
    let r = c.response(false).await.expect("response");
    let at_client = t.elapsed();
    assert_eq!(r.body, b"ok");
    assert!(
        at_server < Duration::from_millis(300),
        "request held: {at_server:?}"
    );
    assert!(
        at_client >= Duration::from_millis(500),
        "response not held: {at_client:?}"
    );
}

#[tokio::test]
async fn json_merge_patch_yields_valid_json_with_correct_framing() {
    let h = Harness::new(http1_server().await).await;
    let c = h.set(vec![json!({"type": "http-patch", "phase": "response",
        "body_merge": {"replicas": 0, "spec": {"port": null, "chaos": true}},
        "headers": {"X-Patched": "1"}})]);
    let mut conn = RawConn::new(h.connect().await);
    for _ in 0..2 {
        conn.send(b"GET /json HTTP/1.1\r\nHost: web\r\n\r\n").await;
        let r = conn.response(false).await.expect("response");
        let v = json_of(&r.body);
        assert_eq!(
            v,
            json!({"name": "web", "replicas": 0, "spec": {"image": "nginx", "chaos": true}})
        );
        assert_eq!(
            r.header("content-length"),
            Some(r.body.len().to_string().as_str()),
            "Content-Length matches the new body"
        );
        assert!(r.header("transfer-encoding").is_none());
        assert_eq!(r.header("x-patched"), Some("1"));
    }
    // Not JSON: passed unchanged.
    conn.send(b"GET /status/200 HTTP/1.1\r\nHost: web\r\n\r\n")
        .await;
    let r = conn.response(false).await.expect("response");
    assert_eq!(r.body, b"status 200");
    assert_eq!(c[0].snapshot().affected, 3);
}

#[tokio::test]
async fn request_patch_adds_headers_query_and_merges_the_body() {
    let h = Harness::new(http1_server().await).await;
    h.set(vec![
        json!({"type": "http-patch", "headers": {"X-Chaos": "on"},
        "query": {"debug": "1", "a b": "c&d"}, "body_merge": {"user": {"role": "admin"}}}),
    ]);
    let mut s = h.h1().await;
    let body = r#"{"user":{"name":"bob","role":"viewer"},"n":1}"#;
    let req = Request::builder()
        .method(Method::POST)
        .uri("/echo?x=1")
        .header("host", "web.test")
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(full(body))
        .expect("request");
    let (status, _, resp) = send1(&mut s, req).await.expect("response");
    assert_eq!(status, 200);
    let v = json_of(&resp);
    assert_eq!(v["headers"]["x-chaos"], "on");
    assert_eq!(v["query"], "x=1&a%20b=c%26d&debug=1");
    let sent = json_of(v["body"].as_str().expect("body").as_bytes());
    assert_eq!(
        sent,
        json!({"user": {"name": "bob", "role": "admin"}, "n": 1})
    );
    assert_eq!(
        v["headers"]["content-length"],
        v["body_len"].to_string(),
        "the server got a Content-Length matching the new body"
    );
}

#[tokio::test]
async fn replace_rewrites_method_path_status_headers_and_body() {
    let h = Harness::new(http1_server().await).await;
    h.set(vec![
        json!({"type": "http-replace", "path": "/moved", "method": "PUT",
            "headers": {"X-Tenant": "b"}, "body": "new body", "http": {"path": "/old*"}}),
        json!({"type": "http-replace", "phase": "response", "status": 500, "body": "oops",
            "headers": {"Content-Type": "text/plain"}, "http": {"path": "/fail"}}),
    ]);
    let mut s = h.h1().await;
    let mut req = get("/old/x?keep=1");
    req.headers_mut()
        .insert("x-tenant", "a".parse().expect("value"));
    let (status, _, body) = send1(&mut s, req).await.expect("response");
    assert_eq!(status, 200);
    let v = json_of(&body);
    assert_eq!(
        (
            v["method"].as_str(),
            v["uri"].as_str(),
            v["headers"]["x-tenant"].as_str()
        ),
        (Some("PUT"), Some("/moved?keep=1"), Some("b"))
    );
    assert_eq!(v["body"], "new body");
    assert_eq!(v["headers"]["content-length"], "8");

    let (status, headers, body) = send1(&mut s, get("/fail")).await.expect("response");
    assert_eq!((status.as_u16(), &body[..]), (500, &b"oops"[..]));
    assert_eq!(
        headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"text/plain"[..])
    );
    assert_eq!(
        headers.get("content-length").map(|v| v.as_bytes()),
        Some(&b"4"[..])
    );
}

#[tokio::test]
async fn rules_on_one_port_compose_in_order() {
    let h = Harness::new(http1_server().await).await;
    let c = h.set(vec![
        json!({"type": "http-delay", "delay": "250ms"}),
        json!({"type": "http-patch", "phase": "response", "body_merge": {"replicas": 9}}),
        json!({"type": "http-replace", "path": "/json", "http": {"path": "/alias"}}),
    ]);
    let mut s = h.h1().await;
    let t = Instant::now();
    let (status, _, body) = send1(&mut s, get("/alias")).await.expect("response");
    let d = t.elapsed();
    assert_eq!(status, 200);
    assert!(d >= Duration::from_millis(250), "{d:?}");
    assert_eq!(json_of(&body)["replicas"], 9, "replaced path, then patched");
    assert!(c.iter().all(|c| c.affected.load(Ordering::Relaxed) == 1));
}

#[tokio::test]
async fn open_connections_see_new_rules_on_their_next_request() {
    let h = Harness::new(http1_server().await).await;
    let mut s = h.h1().await;
    assert_eq!(send1(&mut s, get("/echo")).await.expect("ok").0, 200);
    h.set(vec![json!({"type": "http-abort", "status": 502})]);
    assert_eq!(send1(&mut s, get("/echo")).await.expect("aborted").0, 502);
    h.proxy.set_rules(vec![]);
    assert_eq!(send1(&mut s, get("/echo")).await.expect("ok again").0, 200);
    // An expired rule is ignored.
    let (mut rule, _) = h.rule(json!({"type": "http-abort", "status": 502}));
    rule.deadline = Instant::now();
    h.proxy.set_rules(vec![rule]);
    assert_eq!(send1(&mut s, get("/echo")).await.expect("expired").0, 200);
}

#[tokio::test]
async fn requests_no_rule_selects_pass_byte_for_byte_and_selected_ones_through_hyper() {
    let (addr, mut seen) = capture_server().await;
    let h = Harness::new(addr).await;
    // A rule that does not match leaves the request and the response
    // exactly as they were: the fast path relays bytes.
    let counters = h.set(vec![
        json!({"type": "http-delay", "delay": "1ms", "http": {"path": "/selected"}}),
    ]);
    let req = b"GET /a/b?c=d HTTP/1.1\r\nHost: Web.Example:8080\r\nX-Mixed-Case: Value\r\nuser-agent: test/1\r\nAccept: */*\r\n\r\n";
    let mut c = h.connect().await;
    c.write_all(req).await.expect("send");
    let got = within(5, seen.recv()).await.expect("captured");
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(req));
    // The server's answer byte for byte, then its close.
    let (answer, err) = within(5, read_all(&mut c)).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(
        String::from_utf8_lossy(&answer),
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    );

    // A request the rule selects is served by hyper: header names go out
    // in lower case (as haproxy sends them); request line, order and
    // values are as the client sent them.
    let req = b"GET /selected?c=d HTTP/1.1\r\nHost: Web.Example:8080\r\nX-Mixed-Case: Value\r\nuser-agent: test/1\r\n\r\n";
    let mut c = RawConn::new(h.connect().await);
    c.send(req).await;
    let got = within(5, seen.recv()).await.expect("captured");
    assert_eq!(
        String::from_utf8_lossy(&got),
        "GET /selected?c=d HTTP/1.1\r\nhost: Web.Example:8080\r\nx-mixed-case: Value\r\nuser-agent: test/1\r\n\r\n"
    );
    let r = c.response(false).await.expect("response");
    assert_eq!(r.body, b"ok");
    // The server closed after answering, so the proxy says the connection
    // is closing; nothing else is added.
    assert_eq!(r.header("Content-Length"), Some("2"));
    assert!(r
        .headers
        .iter()
        .all(|(k, _)| k == "content-length" || k.eq_ignore_ascii_case("connection")));
    assert_eq!(
        counters[0].snapshot().matched,
        1,
        "the rule saw the selected request only"
    );
}

#[tokio::test]
async fn a_server_closing_the_connection_closes_the_clients() {
    let (addr, _seen) = capture_server().await;
    let h = Harness::new(addr).await;
    let mut c = RawConn::new(h.connect().await);
    c.send(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").await;
    let r = c.response(false).await.expect("response");
    assert_eq!(r.status, 200);
    let t = Instant::now();
    let (rest, err) = within(5, read_all(&mut c.stream)).await;
    assert!(
        rest.is_empty() && err.is_none(),
        "a clean close: {rest:?} {err:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(2));

    // And `Connection: close` from a server.
    let h = Harness::new(http1_server().await).await;
    let mut c = RawConn::new(h.connect().await);
    c.send(b"GET /close HTTP/1.1\r\nHost: web\r\n\r\n").await;
    let r = c.response(false).await.expect("response");
    assert_eq!(r.header("connection"), Some("close"));
    let (rest, err) = within(5, read_all(&mut c.stream)).await;
    assert!(rest.is_empty() && err.is_none(), "{rest:?} {err:?}");
}

#[tokio::test]
async fn h2c_upgrade_is_declined_so_faults_keep_applying() {
    let h = Harness::new(http1_server().await).await;
    h.set(vec![
        json!({"type": "http-abort", "status": 503, "http": {"path": "/fail"}}),
    ]);
    let mut c = RawConn::new(h.connect().await);
    c.send(b"GET /echo HTTP/1.1\r\nHost: web\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
        .await;
    let r = c.response(false).await.expect("response");
    assert_eq!(r.status, 200, "answered in HTTP/1.1");
    let v = json_of(&r.body);
    assert!(v["headers"].get("upgrade").is_none(), "{v}");
    assert!(v["headers"].get("http2-settings").is_none(), "{v}");
    c.send(b"GET /fail HTTP/1.1\r\nHost: web\r\n\r\n").await;
    assert_eq!(c.response(false).await.expect("response").status, 503);
}

#[tokio::test]
async fn other_upgrades_are_relayed_as_bytes() {
    let h = Harness::new(http1_server().await).await;
    h.set(vec![
        json!({"type": "http-abort", "status": 503, "http": {"path": "/never"}}),
    ]);
    let mut c = RawConn::new(h.connect().await);
    c.send(b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await;
    let r = c.response(false).await.expect("101");
    assert_eq!(r.status, 101);
    let mut s = c.stream;
    s.write_all(b"\x00\x01binary after upgrade\xff")
        .await
        .expect("write");
    let mut buf = [0u8; 23];
    within(5, s.read_exact(&mut buf)).await.expect("echo");
    assert_eq!(&buf, b"\x00\x01binary after upgrade\xff");
}

#[tokio::test]
async fn an_unreachable_server_is_a_reset_for_the_client() {
    let closed = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        l.local_addr().expect("addr")
    };
    let h = Harness::new(closed).await;
    let mut s = h.connect().await;
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (got, err) = within(5, read_all(&mut s)).await;
    assert!(got.is_empty());
    assert_eq!(
        err.map(|e| e.kind()),
        Some(std::io::ErrorKind::ConnectionReset)
    );
}

#[tokio::test]
async fn ipv6_and_rule_scoping_by_side_and_network() {
    let listen6 = || async {
        tokio::net::TcpListener::bind("[::1]:0")
            .await
            .expect("bind ::1")
    };
    let server = serve_each(listen6().await, |s, peer| async move {
        let svc = hyper::service::service_fn(move |req| app(req, peer));
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
            .await;
    });
    let h = Harness::on(listen6().await, server, netfault_tproxy::Side::Inbound);
    let mut s = h.h1().await;
    let status = |fault: serde_json::Value| {
        let (rule, _) = h.rule_with(fault);
        h.proxy.set_rules(vec![rule]);
    };
    let abort = json!({"type": "http-abort", "status": 503});
    // The client is ::1: a rule for another network, or for the other
    // side of the pod, leaves it alone.
    status(json!({"action": abort, "match": {"cidr": "fd00::/64"}}));
    assert_eq!(send1(&mut s, get("/echo")).await.expect("response").0, 200);
    status(json!({"action": abort, "direction": "egress"}));
    assert_eq!(send1(&mut s, get("/echo")).await.expect("response").0, 200);
    status(json!({"action": abort, "match": {"ports": "1-79"}}));
    assert_eq!(send1(&mut s, get("/echo")).await.expect("response").0, 200);
    status(json!({"action": abort, "direction": "ingress", "match": {"cidr": "::1/128"}}));
    assert_eq!(send1(&mut s, get("/echo")).await.expect("response").0, 503);
}
