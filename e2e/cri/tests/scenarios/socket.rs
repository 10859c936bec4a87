//! Faults through the socket on running pods, targeted by pod name: the
//! effect is measured on TCP handshakes between the pods' netns, then the
//! fault is deleted and the effect is gone.

use std::time::Duration;

use e2e_cri::{tcp_connect_median, tcp_connect_time, TcpSink};
use serde_json::json;

use crate::support::{deployed, on_pod};

#[test]
fn socket_fault_by_pod_name_then_delete() {
    testbed::require_root!();
    let (node, agent) = deployed();
    let client = node.pod("client", &[]).expect("client pod");
    let server = node.pod("server", &[]).expect("server pod");
    let sink = TcpSink::start(&server, 8080).expect("listener in the server pod");
    let timeout = Duration::from_secs(3);

    let before = tcp_connect_median(&client, sink.addr, 5, timeout).expect("baseline");
    assert!(
        before < Duration::from_millis(50),
        "baseline handshake {before:?}"
    );

    // A delay on the client pod, by name: every handshake pays it (the SYN
    // leaves late; the SYN-ACK arrives late).
    let f = agent
        .post_fault(&on_pod(
            "client",
            json!({"type": "delay", "latency": "100ms"}),
            json!({}),
        ))
        .expect("POST a delay by pod name");
    assert_eq!(
        f["sandbox"],
        client.id.as_str(),
        "the name resolved to another sandbox: {f}"
    );
    let delayed = tcp_connect_median(&client, sink.addr, 5, timeout).expect("delayed handshakes");
    eprintln!("handshake: {before:?} before, {delayed:?} with a 100 ms delay");
    assert!(
        delayed >= Duration::from_millis(195),
        "a 100 ms delay both ways makes a handshake >= 200 ms, got {delayed:?}"
    );
    agent
        .delete_fault(f["id"].as_str().expect("fault id"))
        .expect("DELETE the delay");
    let after = tcp_connect_median(&client, sink.addr, 5, timeout).expect("after delete");
    assert!(
        after < Duration::from_millis(50),
        "still delayed after DELETE: {after:?}"
    );

    // A blackhole on the server pod, by name: handshakes fail; deleted,
    // they complete again.
    let f = agent
        .post_fault(&on_pod("server", json!({"type": "blackhole"}), json!({})))
        .expect("POST a blackhole by pod name");
    let blocked =
        tcp_connect_time(&client, sink.addr, Duration::from_millis(500)).expect("connect");
    assert_eq!(blocked, None, "a handshake completed through a blackhole");
    agent
        .delete_fault(f["id"].as_str().expect("fault id"))
        .expect("DELETE the blackhole");
    let back = tcp_connect_time(&client, sink.addr, timeout).expect("connect");
    assert!(
        back.is_some(),
        "no handshake after the blackhole was deleted"
    );
}
