//! HTTP/2 (prior knowledge) and gRPC through the proxy, with hyper's
//! HTTP/2 client.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use serde_json::json;

async fn send2(
    s: &mut hyper::client::conn::http2::SendRequest<TestBody>,
    req: Request<TestBody>,
) -> Result<(StatusCode, http::HeaderMap, Bytes, Option<http::HeaderMap>), hyper::Error> {
    s.ready().await?;
    let resp = s.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await?;
    let trailers = collected.trailers().cloned();
    Ok((parts.status, parts.headers, collected.to_bytes(), trailers))
}

fn h2_get(path: &str) -> Request<TestBody> {
    Request::builder()
        .uri(format!("http://web.test{path}"))
        .body(empty())
        .expect("request")
}

fn grpc_call(path: &str) -> Request<TestBody> {
    Request::builder()
        .method(Method::POST)
        .uri(format!("http://web.test{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(&b"\x00\x00\x00\x00\x02hi"[..]))
        .expect("request")
}

#[tokio::test]
async fn h2_prior_knowledge_passes_through_with_streams_and_trailers() {
    let h = Harness::new(http2_server().await).await;
    h.set(vec![
        json!({"type": "http-abort", "status": 503, "http": {"path": "/never"}}),
    ]);
    let mut s = h.h2().await;
    let (status, _, body, _) = send2(&mut s, h2_get("/echo?q=1")).await.expect("echo");
    assert_eq!(status, 200);
    let v = json_of(&body);
    assert_eq!(
        (v["version"].as_str(), v["uri"].as_str()),
        (Some("HTTP/2.0"), Some("http://web.test/echo?q=1"))
    );

    // Concurrent streams on the one connection, one of them large.
    let mut up = s.clone();
    let upload = tokio::spawn(async move {
        let req = Request::builder()
            .method(Method::POST)
            .uri("http://web.test/upload")
            .body(pattern_body(3 << 20, false))
            .expect("request");
        send2(&mut up, req).await
    });
    let (status, _, body, trailers) = send2(&mut s, grpc_call("/grpc/Echo")).await.expect("grpc");
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"\x00\x00\x00\x00\x02hi");
    assert_eq!(
        trailers
            .and_then(|t| t.get("grpc-status").cloned())
            .map(|v| v.as_bytes().to_vec()),
        Some(b"0".to_vec()),
        "the server's trailers pass through"
    );
    let (status, _, body, _) = within(20, upload).await.expect("join").expect("upload");
    assert_eq!(status, 200);
    assert_eq!(json_of(&body)["len"], 3 << 20);
}

#[tokio::test]
async fn grpc_abort_answers_with_grpc_status_trailers_only() {
    let h = Harness::new(http2_server().await).await;
    let c = h.set(vec![
        json!({"type": "http-abort", "status": 503, "http": {"path": "/grpc/pkg.Svc/Unavailable"}}),
        json!({"type": "http-abort", "status": 404, "body": "no such method", "http": {"path": "/grpc/pkg.Svc/Missing"}}),
    ]);
    let mut s = h.h2().await;
    for (path, code, message) in [
        (
            "/grpc/pkg.Svc/Unavailable",
            "14",
            "injected fault: HTTP 503 Service Unavailable",
        ),
        ("/grpc/pkg.Svc/Missing", "12", "no such method"),
    ] {
        let resp = {
            s.ready().await.expect("ready");
            s.send_request(grpc_call(path)).await.expect("response")
        };
        assert_eq!(resp.status(), 200, "gRPC errors travel with HTTP 200");
        assert_eq!(resp.version(), Version::HTTP_2);
        let headers = resp.headers().clone();
        assert_eq!(
            headers.get("content-type").map(|v| v.as_bytes()),
            Some(&b"application/grpc"[..])
        );
        assert_eq!(
            headers.get("grpc-status").map(|v| v.as_bytes()),
            Some(code.as_bytes()),
            "{path}"
        );
        assert_eq!(
            headers.get("grpc-message").map(|v| v.as_bytes()),
            Some(message.replace('%', "%25").as_bytes())
        );
        let body = resp.into_body();
        assert!(
            body.is_end_stream(),
            "Trailers-Only: the HEADERS frame ends the stream"
        );
        let collected = body.collect().await.expect("body");
        assert!(collected.trailers().is_none());
        assert!(collected.to_bytes().is_empty());
    }
    // Other methods still reach the server.
    let (_, _, _, trailers) = send2(&mut s, grpc_call("/grpc/pkg.Svc/Other"))
        .await
        .expect("grpc");
    assert!(trailers.is_some_and(|t| t.get("grpc-status").is_some_and(|v| v == "0")));
    assert_eq!(c[0].snapshot().dropped, 1);
    assert_eq!(c[1].snapshot().dropped, 1);
}

#[tokio::test]
async fn h2_faults_act_per_stream() {
    let h = Harness::new(http2_server().await).await;
    h.set(vec![
        json!({"type": "http-abort", "reset": true, "http": {"path": "/reset"}}),
        json!({"type": "http-abort", "status": 429, "http": {"path": "/limited"}}),
        json!({"type": "http-delay", "delay": "300ms", "http": {"path": "/slowed"}}),
        json!({"type": "http-patch", "phase": "response", "body_merge": {"replicas": 1}, "http": {"path": "/json"}}),
    ]);
    let mut s = h.h2().await;
    let err = send2(&mut s, h2_get("/reset"))
        .await
        .expect_err("stream reset");
    assert!(!err.is_user(), "{err}");
    let (status, _, body, _) = send2(&mut s, h2_get("/limited")).await.expect("429");
    assert_eq!(
        (status.as_u16(), &body[..]),
        (429, &b"429 Too Many Requests\n"[..])
    );
    let t = Instant::now();
    let (status, _, _, _) = send2(&mut s, h2_get("/slowed")).await.expect("delayed");
    assert_eq!(status, 200);
    assert!(t.elapsed() >= Duration::from_millis(300));
    let (status, headers, body, _) = send2(&mut s, h2_get("/json")).await.expect("patched");
    assert_eq!(status, 200);
    assert_eq!(json_of(&body)["replicas"], 1);
    if let Some(cl) = headers.get("content-length") {
        assert_eq!(cl.to_str().expect("ascii"), body.len().to_string());
    }
    // The connection survived the stream reset.
    let (status, _, _, _) = send2(&mut s, h2_get("/echo")).await.expect("still up");
    assert_eq!(status, 200);
}
