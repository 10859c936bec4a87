//! Fuzz targets: every parser that takes input from outside the agent.
//!
//! Each target takes arbitrary bytes, must never panic, hang or allocate
//! without bound, and checks what must hold of its output (an error names a
//! field; what parses re-parses the same; an answer decodes). They are run
//! two ways:
//! - coverage-guided by libFuzzer: `scripts/fuzz.sh TARGET SECONDS`
//!   (cargo-fuzz on the nightly toolchain, `fuzz/libfuzzer/`);
//! - on stable by this crate's tests, which replay the committed corpus
//!   (`fuzz/corpus/TARGET/`) and then mutate it for a short time.

use std::collections::BTreeMap;
use std::time::Duration;

use netfault_api::action::{parse_action, Action, DnsAction, ProxyAction};
use netfault_api::annotations::faults_from_annotations;
use netfault_api::spec::{FaultSpec, Limits};
use netfault_dns::{decide, udp_payload, udp_reply, NotHandled, Outcome, Query, Transport};
use serde_json::Value;

/// A target: a name (its corpus directory) and its function, which says
/// whether the parser accepted the input (the corpus must hold both kinds).
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]) -> bool,
}

/// Every target, by name.
pub const TARGETS: &[Target] = &[
    Target {
        name: "fault_json",
        run: fault_json,
    },
    Target {
        name: "annotations",
        run: annotations,
    },
    Target {
        name: "cni_input",
        run: cni_input,
    },
    Target {
        name: "proxy_sniff",
        run: proxy_sniff,
    },
    Target {
        name: "dns_message",
        run: dns_message,
    },
    Target {
        name: "http1_framing",
        run: http1_framing,
    },
];

/// The fault JSON of `POST /v1/faults`, as the server reads it: bytes →
/// JSON → [`FaultSpec::parse`]. An error names a field; a spec that parses
/// serializes to JSON that parses to the same spec.
pub fn fault_json(data: &[u8]) -> bool {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return false;
    };
    let mut accepted = false;
    for limits in [
        Limits::default(),
        Limits {
            max_duration: Duration::from_secs(60),
            target_required: false,
        },
    ] {
        match FaultSpec::parse(&value, &limits) {
            Ok(spec) => {
                accepted = true;
                let again = serde_json::to_value(&spec)
                    .ok()
                    .map(|v| FaultSpec::parse(&v, &limits));
                match again {
                    Some(Ok(back)) => assert_eq!(
                        serde_json::to_value(&back).ok(),
                        serde_json::to_value(&spec).ok(),
                        "a parsed spec re-parses to itself"
                    ),
                    Some(Err(e)) => panic!("a parsed spec does not re-parse: {e}"),
                    None => panic!("a parsed spec does not serialize"),
                }
            }
            Err(e) => assert!(!e.to_string().is_empty(), "an error says something"),
        }
    }
    let _ = parse_action(&value);
    accepted
}

/// A pod's annotations: the input is split into `key\0value\0` pairs (a
/// key without `/` gets the `netfault.io/` prefix, so most inputs reach
/// the parser), then read as the agent reads a pod's annotations.
pub fn annotations(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let mut map = BTreeMap::new();
    while let (Some(k), Some(v)) = (parts.next(), parts.next()) {
        let key = if k.contains('/') {
            k.to_string()
        } else {
            format!("netfault.io/{k}")
        };
        map.insert(key, v.to_string());
    }
    if map.is_empty() {
        // One value for the faults list itself.
        map.insert("netfault.io/faults".to_string(), text.into_owned());
    }
    match faults_from_annotations(&map, Duration::from_secs(24 * 3600)) {
        Ok(specs) => {
            for s in &specs {
                assert!(serde_json::to_value(s).is_ok());
            }
            !specs.is_empty()
        }
        Err(e) => {
            assert!(
                e.to_string().contains("netfault.io/"),
                "an annotation error names the annotation: {e}"
            );
            false
        }
    }
}

/// The CNI plugin's input: the first line holds `CNI_*` variables as
/// `NAME=VALUE` separated by `\x1f`, the rest is stdin. Runs what the
/// plugin does before it calls the agent, for every command.
pub fn cni_input(data: &[u8]) -> bool {
    use netfault_cni::{args::Env, config, version};
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let (env_part, stdin) = data.split_at(split);
    let stdin = stdin.get(1..).unwrap_or_default();
    let env_text = String::from_utf8_lossy(env_part);
    let pairs: Vec<(&str, &str)> = env_text
        .split('\x1f')
        .filter_map(|p| p.split_once('='))
        .collect();
    let env = Env::from_pairs(&pairs);
    let _ = version::version_info(stdin);
    let _ = version::reply_version(stdin);
    for command in ["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"] {
        if let Err(e) = env.require_for(command) {
            assert!(e.to_json("1.0.0").is_object());
        }
    }
    if let Some(a) = env.args.as_deref() {
        let _ = netfault_cni::args::parse_cni_args(a);
    }
    match config::parse(stdin) {
        Ok(conf) => {
            let _ = conf.output_result();
            let _ = conf.valid_container_ids();
            match netfault_cni::enrolment(&env, &conf) {
                Ok((req, _warnings)) => {
                    for ip in &req.ips {
                        assert!(ip.parse::<std::net::IpAddr>().is_ok(), "{ip}");
                    }
                    true
                }
                Err(e) => {
                    assert!(e.to_json("1.0.0").is_object());
                    false
                }
            }
        }
        Err(e) => {
            assert!(e.to_json("1.0.0").is_object());
            false
        }
    }
}

/// What the transparent proxy reads first from a client: the protocol
/// sniffing on every prefix (as bytes trickle in), and the `http.path` glob
/// with the input split into pattern and path.
pub fn proxy_sniff(data: &[u8]) -> bool {
    let http = netfault_tproxy::fuzzing::sniff(data);
    let text = String::from_utf8_lossy(data);
    if let Some((pattern, path)) = text.split_once('\n') {
        let _ = netfault_tproxy::glob_match(pattern, path);
    }
    http
}

/// The proxy's HTTP/1 fast path: request and response heads, and bodies
/// by their framing, fed at once and in pieces.
pub fn http1_framing(data: &[u8]) -> bool {
    netfault_tproxy::fuzzing::http1_framing(data)
}

/// DNS: a UDP payload or TCP message as the queue engine and the proxy
/// read it, every kind of fault decided on it (each answer must decode),
/// and the bytes as an IP packet for the reply builder.
pub fn dns_message(data: &[u8]) -> bool {
    let actions = dns_actions();
    let query = Query::parse(data);
    let accepted = query.is_ok();
    match query {
        Ok(q) => {
            for t in [Transport::Udp, Transport::Tcp] {
                let v = decide(&actions, &q, t, |_, _| {});
                if let Outcome::Answer(a) = v.outcome {
                    if let Err(e) = hickory_proto::op::Message::from_vec(&a) {
                        panic!("an answer that does not decode: {e}");
                    }
                }
            }
        }
        Err(NotHandled::Malformed(_) | NotHandled::NotAQuery) => {}
    }
    let _ = udp_payload(data);
    let _ = udp_reply(data, data);
    accepted
}

fn dns_actions() -> Vec<DnsAction> {
    let specs = [
        r#"{"type":"dns-delay","delay":"1ms"}"#,
        r#"{"type":"dns-spoof","random":true,"dns":{"types":["AAAA"]}}"#,
        r#"{"type":"dns-spoof","addresses":["198.18.0.1","fd00::1"],"ttl":30}"#,
        r#"{"type":"dns-truncate","percent":50}"#,
        r#"{"type":"dns-error","rcode":"servfail","dns":{"names":["*.example.test"]}}"#,
        r#"{"type":"dns-drop","percent":10}"#,
    ];
    specs
        .iter()
        .filter_map(|s| serde_json::from_str::<Value>(s).ok())
        .filter_map(|v| match parse_action(&v) {
            Ok(Action::Proxy(ProxyAction::Dns(a))) => Some(a),
            _ => None,
        })
        .collect()
}
