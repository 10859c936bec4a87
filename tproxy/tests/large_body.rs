//! Large bodies through rules that do not match them are streamed: they
//! arrive intact and the proxy never holds them in memory. Alone in its own
//! test binary, so the process's peak memory is this test's.

mod common;

use common::*;
use http::{Method, Request};
use http_body_util::BodyExt;
use serde_json::json;

const SIZE: u64 = 64 << 20;

/// Peak resident memory of this process (VmHWM), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64mb_body_through_a_non_matching_rule_streams_intact() {
    let h = Harness::new(http1_server().await).await;
    let c = h.set(vec![
        json!({"type": "http-patch", "phase": "response", "body_merge": {"x": 1}, "http": {"path": "/json"}}),
        json!({"type": "http-patch", "body_merge": {"x": 1}, "http": {"path": "/api/*"}}),
        json!({"type": "http-abort", "status": 503, "http": {"path": "/never"}}),
    ]);
    let mut s = h.h1().await;
    // Warm up: buffers, tasks and allocator arenas that any request uses.
    let (status, _, _) = send1(&mut s, get("/big/1048576")).await.expect("warm-up");
    assert_eq!(status, 200);
    let before = peak_rss();

    // Upload, chunked (no length): the server checks every byte.
    let req = Request::builder()
        .method(Method::POST)
        .uri("/upload")
        .header("host", "web.test")
        .header("content-type", "application/json")
        .body(PatternBody::new(SIZE, false).boxed_unsync())
        .expect("request");
    let (status, _, body) = within(120, send1(&mut s, req)).await.expect("upload");
    assert_eq!(status, 200);
    assert_eq!(json_of(&body)["len"], SIZE);

    // Download, with a Content-Length: checked byte by byte as it arrives.
    s.ready().await.expect("ready");
    let resp = within(10, s.send_request(get(&format!("/big/{SIZE}"))))
        .await
        .expect("download");
    assert_eq!(h.proxy.open_connections(), 1, "served by the proxy");
    assert_eq!(
        resp.headers()
            .get("content-length")
            .map(|v| v.as_bytes().to_vec()),
        Some(SIZE.to_string().into_bytes())
    );
    let len = within(120, check_pattern(resp.into_body()))
        .await
        .expect("intact");
    assert_eq!(len, SIZE);

    let grown = peak_rss().saturating_sub(before);
    println!("64 MiB up and down: peak RSS grew by {} KiB", grown / 1024);
    assert!(
        grown < 32 << 20,
        "peak memory grew by {grown} bytes: a body was buffered"
    );
    assert!(c.iter().all(|c| c.snapshot().matched == 0));

    // A JSON body a patch matches but too large to buffer (over 16 MiB)
    // passes unchanged rather than being held whole.
    let req = Request::builder()
        .method(Method::POST)
        .uri("/api/upload")
        .header("host", "web.test")
        .header("content-type", "application/json")
        .body(PatternBody::new(20 << 20, false).boxed_unsync())
        .expect("request");
    let (status, _, body) = within(120, send1(&mut s, req)).await.expect("upload");
    assert_eq!(status, 200);
    assert_eq!(json_of(&body)["len"], 20 << 20);
    assert_eq!(c[1].snapshot().affected, 1);
}
