//! The committed CRD manifest is the one the Rust types generate, its schema
//! is structural (what the API server requires of a CRD), and the committed
//! example resource validates.

use std::path::PathBuf;

use netfault_k8s::{crd_yaml, validate, Mode, NetworkFault, REGENERATE};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    let p = root().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn the_committed_crd_is_the_generated_one() {
    let generated = crd_yaml().expect("the CRD serializes");
    let committed = read("daemonset/networkfault-crd.yaml");
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map_or_else(|| "the end".to_string(), |i| format!("line {}", i + 1));
        panic!(
            "daemonset/networkfault-crd.yaml differs from the types (first at {line}); \
             regenerate it from the repository root:\n  {REGENERATE}"
        );
    }
}

/// Walks an OpenAPI v3 schema as the API server's structural check does
/// (the rules it can be held to offline).
fn check_structural(s: &Value, at: &str, problems: &mut Vec<String>) {
    let Some(m) = s.as_object() else {
        problems.push(format!("{at}: not an object"));
        return;
    };
    for banned in [
        "$ref",
        "definitions",
        "$defs",
        "anyOf",
        "oneOf",
        "allOf",
        "not",
    ] {
        if m.contains_key(banned) {
            problems.push(format!("{at}: {banned} (not structural here)"));
        }
    }
    let open = m.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
        || m.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    if !m.contains_key("type") && !open {
        problems.push(format!("{at}: no type"));
    }
    if m.get("additionalProperties") == Some(&Value::Bool(false)) {
        problems.push(format!("{at}: additionalProperties false"));
    }
    if m.contains_key("properties") && m.contains_key("additionalProperties") {
        problems.push(format!("{at}: both properties and additionalProperties"));
    }
    if let Some(p) = m.get("properties").and_then(Value::as_object) {
        for (k, v) in p {
            check_structural(v, &format!("{at}.{k}"), problems);
        }
    }
    if let Some(i) = m.get("items") {
        check_structural(i, &format!("{at}[]"), problems);
    }
    if let Some(a) = m.get("additionalProperties").filter(|a| a.is_object()) {
        check_structural(a, &format!("{at}{{}}"), problems);
    }
    if m.get("x-kubernetes-list-type") == Some(&Value::from("map")) {
        let keys = m["x-kubernetes-list-map-keys"]
            .as_array()
            .expect("map keys");
        let required = m["items"]["required"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for k in keys {
            if !required.contains(k) {
                problems.push(format!("{at}: list map key {k} is not required"));
            }
        }
    }
}

#[test]
fn the_schema_is_structural() {
    let crd: Value = serde_yaml::from_str(&read("daemonset/networkfault-crd.yaml")).expect("YAML");
    let versions = crd["spec"]["versions"].as_array().expect("versions");
    assert_eq!(versions.len(), 1);
    let schema = &versions[0]["schema"]["openAPIV3Schema"];
    let mut problems = Vec::new();
    check_structural(schema, "", &mut problems);
    assert!(problems.is_empty(), "{problems:#?}");
    // The fault body keeps the action's fields for netfault-api's parser,
    // and the apiserver still checks the action type.
    let action = &schema["properties"]["spec"]["properties"]["action"];
    assert_eq!(action["x-kubernetes-preserve-unknown-fields"], true);
    assert_eq!(action["required"], serde_json::json!(["type"]));
    assert!(action["properties"]["type"]["enum"]
        .as_array()
        .expect("enum")
        .contains(&Value::from("delay")));
}

#[test]
fn the_example_validates() {
    let nf: NetworkFault =
        serde_yaml::from_str(&read("daemonset/examples/networkfault-delay.yaml"))
            .expect("the example is a NetworkFault");
    let v = validate(&nf).unwrap_or_else(|e| panic!("the example is invalid: {e}"));
    assert_eq!(v.namespace, "default");
    assert_eq!(v.mode, Mode::FixedPercent(50));
    assert_eq!(v.fault.action.type_name(), "delay");
    assert_eq!(v.fault.duration, std::time::Duration::from_secs(300));
    assert_eq!(v.selector.requirements.len(), 2);
}

/// A resource as a user writes it, with one mistake, is refused with the field.
#[test]
fn yaml_mistakes_name_the_field() {
    let text = read("daemonset/examples/networkfault-delay.yaml");
    for (from, to, field) in [
        (
            "latency: 100ms",
            "latency: 100 parsecs",
            "spec.action.latency",
        ),
        (
            "operator: NotIn",
            "operator: NotEquals",
            "spec.selector.matchExpressions[0].operator",
        ),
        ("value: 50", "value: 150", "spec.value"),
        ("mode: fixed-percent", "mode: some", "spec.mode"),
        ("ports: \"80\"", "ports: \"80-70\"", "spec.match.ports"),
    ] {
        assert!(text.contains(from), "{from}");
        let nf: NetworkFault =
            serde_yaml::from_str(&text.replace(from, to)).expect("still a NetworkFault");
        let e = validate(&nf).expect_err(to);
        assert_eq!(e.field, field, "{to}: {e}");
    }
}
