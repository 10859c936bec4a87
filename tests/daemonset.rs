//! The DaemonSet kustomization (`daemonset/`) rendered offline with
//! `kubectl kustomize` and checked object by object: the RBAC rules exactly,
//! the DaemonSet's host access, mounts, probes, env and least-privilege
//! security contexts. Also: `daemonset/build-image.sh` parses, and it and
//! `daemonset/Dockerfile` ship the same binaries with the same entrypoint.
//!
//! Needs `kubectl` (Debian: kubernetes-client; `KUBECTL` overrides the path);
//! without it the render test prints a skip line and passes. No cluster.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn kubectl() -> Option<String> {
    let bin = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_string());
    let ok = Command::new(&bin)
        .args(["version", "--client"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    ok.then_some(bin)
}

fn render(kubectl: &str) -> Vec<Value> {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(root().join("daemonset"))
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize daemonset/ failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8 output");
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("valid YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(objs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objs.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "exactly one {kind}");
    found[0]
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array, got {v}"))
        .iter()
        .map(|s| s.as_str().expect("a string"))
        .collect()
}

fn container<'a>(spec: &'a Value, name: &str) -> &'a Value {
    spec["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("container {name}"))
}

/// `(mountPath, hostPath, mountPropagation, readOnly)` of each mount.
fn mounts(spec: &Value, c: &Value) -> Vec<(String, String, String, bool)> {
    let volumes = spec["volumes"].as_array().expect("volumes");
    let mut out: Vec<_> = c["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .map(|m| {
            let vol = volumes
                .iter()
                .find(|v| v["name"] == m["name"])
                .unwrap_or_else(|| panic!("volume for {m}"));
            let host = match vol["hostPath"]["path"].as_str() {
                Some(p) => p.to_string(),
                None => format!("<{}>", vol["name"].as_str().unwrap()),
            };
            (
                m["mountPath"].as_str().unwrap().to_string(),
                host,
                m["mountPropagation"].as_str().unwrap_or("None").to_string(),
                m["readOnly"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    out.sort();
    out
}

fn owned(v: &[(&str, &str, &str, bool)]) -> Vec<(String, String, String, bool)> {
    let mut out: Vec<_> = v
        .iter()
        .map(|(a, b, c, d)| (a.to_string(), b.to_string(), c.to_string(), *d))
        .collect();
    out.sort();
    out
}

fn assert_no_privileged(v: &Value, at: &str) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "privileged" {
                    assert_eq!(x, &Value::Bool(false), "{at}.privileged");
                }
                assert_no_privileged(x, &format!("{at}.{k}"));
            }
        }
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, x)| assert_no_privileged(x, &format!("{at}[{i}]"))),
        _ => {}
    }
}

#[test]
fn kustomization_renders_the_expected_objects() {
    let Some(kubectl) = kubectl() else {
        println!("skipped: kubectl not found (apt-get install kubernetes-client)");
        return;
    };
    let objs = render(&kubectl);
    let mut kinds: Vec<&str> = objs.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "DaemonSet",
            "Namespace",
            "Role",
            "RoleBinding",
            "ServiceAccount"
        ]
    );

    assert_eq!(find(&objs, "Namespace")["metadata"]["name"], "netfault");
    let sa = find(&objs, "ServiceAccount");
    assert_eq!(sa["metadata"]["name"], "netfault");
    assert_eq!(sa["metadata"]["namespace"], "netfault");

    // RBAC: exactly these rules, nothing wider.
    let role = find(&objs, "ClusterRole");
    assert_eq!(
        role["rules"],
        json!([
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
            {"apiGroups": ["netfault.io"], "resources": ["networkfaults"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["netfault.io"], "resources": ["networkfaults/status"], "verbs": ["update", "patch"]},
        ])
    );
    for rule in role["rules"].as_array().unwrap() {
        for field in ["apiGroups", "resources", "verbs"] {
            assert!(!strings(&rule[field]).contains(&"*"), "`*` in {field}");
        }
    }
    let binding = find(&objs, "ClusterRoleBinding");
    assert_eq!(
        binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"]})
    );
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "netfault", "namespace": "netfault"}])
    );

    // The Role that tells an uninstall from a restart: read daemonsets, in
    // netfault only.
    let ns_role = find(&objs, "Role");
    assert_eq!(ns_role["metadata"]["namespace"], "netfault");
    assert_eq!(
        ns_role["rules"],
        json!([{"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["get", "list", "watch"]}])
    );
    let ns_binding = find(&objs, "RoleBinding");
    assert_eq!(ns_binding["metadata"]["namespace"], "netfault");
    assert_eq!(
        ns_binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ns_role["metadata"]["name"]})
    );
    assert_eq!(
        ns_binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "netfault", "namespace": "netfault"}])
    );

    // The DaemonSet.
    let ds = find(&objs, "DaemonSet");
    assert_eq!(ds["metadata"]["name"], "netfault");
    assert_eq!(ds["metadata"]["namespace"], "netfault");
    // A rollout hands each node over from the old agent to the new one,
    // which must run beside it for that (surge, never a node without one).
    assert_eq!(
        ds["spec"]["updateStrategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
    );
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["serviceAccountName"], "netfault");
    assert_eq!(spec["hostNetwork"], true);
    assert_ne!(spec["hostPID"], true);
    assert_ne!(spec["hostIPC"], true);
    assert_eq!(spec["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(spec["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        (10..=120).contains(&grace),
        "terminationGracePeriodSeconds {grace}"
    );
    assert_no_privileged(ds, "DaemonSet");

    let names: Vec<&str> = spec["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["netfaultd", "install-cni"]);
    for c in spec["containers"].as_array().unwrap() {
        assert_eq!(c["image"], "docker.io/library/netfaultd:dev");
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        let sc = &c["securityContext"];
        assert_eq!(sc["runAsUser"], 0);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
        assert!(c["resources"]["requests"]["memory"].is_string());
        assert!(c["resources"]["limits"]["memory"].is_string());
    }

    let d = container(spec, "netfaultd");
    assert!(
        d["command"].is_null(),
        "netfaultd runs the image's entrypoint"
    );
    assert_eq!(
        strings(&d["args"]),
        [
            "--socket",
            "/run/netfault/netfaultd.sock",
            "--state-dir",
            "/run/netfault",
            "--cri-socket",
            "/run/containerd/containerd.sock",
            "--listen-tcp",
            "127.0.0.1:7979",
            "--token-file",
            "/etc/netfault/token",
            "--max-duration",
            "24h",
            "--max-faults-per-pod",
            "32",
            "--max-loss-percent",
            "100",
            "--deny-namespace",
            "kube-system",
            "--deny-namespace",
            "netfault",
        ]
    );
    assert_eq!(
        d["env"],
        json!([
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ])
    );
    let mut caps = strings(&d["securityContext"]["capabilities"]["add"]);
    caps.sort();
    assert_eq!(
        caps,
        ["BPF", "NET_ADMIN", "NET_RAW", "PERFMON", "SYS_ADMIN"]
    );
    let probe = json!([
        "/opt/netfault/bin/netfaultctl",
        "--socket",
        "/run/netfault/netfaultd.sock",
        "health"
    ]);
    for p in ["livenessProbe", "readinessProbe"] {
        assert_eq!(d[p]["exec"]["command"], probe, "{p}");
        let period = d[p]["periodSeconds"].as_u64().unwrap();
        let timeout = d[p]["timeoutSeconds"].as_u64().unwrap();
        assert!(
            timeout >= 1 && timeout < period,
            "{p}: timeout {timeout}, period {period}"
        );
    }
    assert_eq!(
        d["resources"]["requests"],
        json!({"cpu": "50m", "memory": "64Mi"})
    );
    assert_eq!(d["resources"]["limits"]["memory"], "512Mi");
    assert_eq!(
        mounts(spec, d),
        owned(&[
            ("/run/netfault", "/run/netfault", "None", false),
            ("/var/run/netns", "/var/run/netns", "HostToContainer", false),
            ("/sys/fs/bpf", "/sys/fs/bpf", "HostToContainer", false),
            ("/run/containerd", "/run/containerd", "None", true),
            ("/tmp", "<tmp>", "None", false),
            ("/etc/netfault", "<api-token>", "None", true),
        ])
    );
    // The TCP listener's token: an optional Secret, read-only, mode 0400.
    let token_vol = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "api-token")
        .expect("api-token volume");
    assert_eq!(
        token_vol["secret"],
        json!({"secretName": "netfault-api-token", "optional": true, "defaultMode": 0o400,
               "items": [{"key": "token", "path": "token"}]})
    );
    // --listen-tcp is on by default (netfaultctl --kube's port, 7979), on
    // loopback, with the token file inside that mount; the comment says how
    // to create the Secret.
    let text = read(&root().join("daemonset/daemonset.yaml"));
    let dargs = strings(&d["args"]);
    let after = |flag: &str| {
        dargs
            .iter()
            .position(|a| *a == flag)
            .and_then(|i| dargs.get(i + 1))
            .copied()
            .unwrap_or_else(|| panic!("{flag} VALUE in netfaultd's args"))
    };
    let listen: std::net::SocketAddr = after("--listen-tcp").parse().expect("ADDR:PORT");
    assert_eq!(listen, "127.0.0.1:7979".parse().expect("addr"));
    assert_eq!(after("--token-file"), "/etc/netfault/token");
    assert!(text.contains("create secret generic netfault-api-token"));
    // The CRI socket the agent is told to use lies in a directory mounted
    // from the same host path: the runtime's socket, seen from inside.
    let args = strings(&d["args"]);
    let cri = args
        .iter()
        .position(|a| *a == "--cri-socket")
        .and_then(|i| args.get(i + 1))
        .expect("--cri-socket PATH");
    let dir = std::path::Path::new(cri).parent().expect("socket dir");
    assert!(
        mounts(spec, d)
            .iter()
            .any(|(at, host, _, _)| std::path::Path::new(at) == dir && at == host),
        "{cri} is not under a host mount of the same path"
    );

    let i = container(spec, "install-cni");
    assert_eq!(
        strings(&i["command"]),
        ["/opt/netfault/bin/netfault-install-cni"]
    );
    assert_eq!(
        strings(&i["args"]),
        [
            "--cni-bin-dir",
            "/host/opt/cni/bin",
            "--cni-conf-dir",
            "/host/etc/cni/net.d",
            "--plugin-src",
            "/opt/netfault/bin/netfault",
            "--socket",
            "/run/netfault/netfaultd.sock"
        ]
    );
    assert!(i["securityContext"]["capabilities"]["add"].is_null());
    assert_eq!(
        mounts(spec, i),
        owned(&[
            ("/host/opt/cni/bin", "/opt/cni/bin", "None", false),
            ("/host/etc/cni/net.d", "/etc/cni/net.d", "None", false),
            ("/run/netfault", "/run/netfault", "None", false),
        ])
    );
    let run = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["hostPath"]["path"] == "/run/netfault")
        .unwrap();
    assert_eq!(run["hostPath"]["type"], "DirectoryOrCreate");
    assert!(
        spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["hostPath"]["path"] != "/proc"),
        "/proc is not mounted"
    );
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The binaries of the image, in /opt/netfault/bin (build-image.sh: BINARIES then OPTIONAL_BINARIES).
const BINARIES: [&str; 4] = [
    "netfaultd",
    "netfaultctl",
    "netfault",
    "netfault-install-cni",
];

#[test]
fn build_script_parses_and_matches_the_dockerfile() {
    let script_path = root().join("daemonset/build-image.sh");
    let out = Command::new("bash")
        .arg("-n")
        .arg(&script_path)
        .output()
        .expect("run bash -n");
    assert!(
        out.status.success(),
        "bash -n build-image.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = read(&script_path);
    let dockerfile = read(&root().join("daemonset/Dockerfile"));

    // The same entrypoint.
    assert!(script.contains("ENTRYPOINT=/opt/netfault/bin/netfaultd\n"));
    assert!(script.contains("--config.entrypoint \"$ENTRYPOINT\""));
    assert!(dockerfile.contains("ENTRYPOINT [\"/opt/netfault/bin/netfaultd\"]\n"));
    // The same binaries in the same directory.
    assert!(script.contains("BIN_DIR=/opt/netfault/bin\n"));
    assert!(script.contains("BINARIES=(netfaultd netfaultctl netfault)\n"));
    assert!(script.contains("OPTIONAL_BINARIES=(netfault-install-cni)\n"));
    let copy = dockerfile
        .lines()
        .find(|l| l.starts_with("COPY --from=builder"))
        .expect("COPY --from=builder line");
    let words: Vec<&str> = copy.split_whitespace().skip(2).collect();
    let (dest, srcs) = words.split_last().unwrap();
    assert_eq!(*dest, "/opt/netfault/bin/");
    let names: Vec<&str> = srcs.iter().map(|s| s.rsplit('/').next().unwrap()).collect();
    assert_eq!(names, BINARIES);
    // What the builder stage copies out: target/release/* and the static
    // plugin from target/<triple>/release/.
    let mut built: Vec<&str> = dockerfile
        .split_whitespace()
        .map(|w| w.trim_matches('"'))
        .filter(|w| w.starts_with("target/") && w.contains("/release/"))
        .filter_map(|w| w.rsplit('/').next())
        .collect();
    built.sort_unstable();
    let mut want = BINARIES.to_vec();
    want.sort_unstable();
    assert_eq!(built, want, "the builder stage copies out");
    // Both link the CNI plugin statically (it runs on the host, from any glibc).
    for (name, text) in [("build-image.sh", &script), ("Dockerfile", &dockerfile)] {
        assert!(
            text.contains(
                "-C target-feature=+crt-static' cargo build --release -p netfault-cni --target"
            ),
            "{name} builds the static CNI plugin"
        );
    }
    // The same base: Debian bookworm with nftables.
    assert!(script.contains("SUITE=bookworm\n") && script.contains("--include=nftables"));
    assert!(dockerfile.contains("FROM debian:bookworm-slim\n"));
    assert!(dockerfile.contains("install -y --no-install-recommends nftables"));
    assert!(dockerfile.contains("FROM rust:1.95-bookworm AS builder\n"));
    // The same image name.
    assert!(script.contains("IMAGE_NAME=docker.io/library/netfaultd:dev\n"));
    assert!(dockerfile.contains("docker.io/library/netfaultd:dev"));
    // The DaemonSet runs what the image holds.
    let ds = read(&root().join("daemonset/daemonset.yaml"));
    assert!(ds.contains("image: docker.io/library/netfaultd:dev"));
    assert!(ds.contains("/opt/netfault/bin/netfault-install-cni"));
}

/// The NetworkFault CRD (daemonset/networkfault-crd.yaml, generated from
/// k8s/src/resource.rs) renders unchanged, namespaced, with a status
/// subresource and the printer columns; the agent's ClusterRole grants what
/// the reconciler needs on it (read the resources, server-side apply = PATCH
/// on the status subresource).
#[test]
fn kustomization_renders_the_networkfault_crd() {
    let Some(kubectl) = kubectl() else {
        println!("skipped: kubectl not found (apt-get install kubernetes-client)");
        return;
    };
    let objs = render(&kubectl);
    let crd = find(&objs, "CustomResourceDefinition");
    assert_eq!(crd["apiVersion"], "apiextensions.k8s.io/v1");
    assert_eq!(crd["metadata"]["name"], "networkfaults.netfault.io");
    let spec = &crd["spec"];
    assert_eq!(spec["group"], "netfault.io");
    assert_eq!(spec["scope"], "Namespaced");
    assert_eq!(spec["names"]["kind"], "NetworkFault");
    assert_eq!(spec["names"]["plural"], "networkfaults");
    assert_eq!(spec["names"]["singular"], "networkfault");
    assert_eq!(spec["names"]["shortNames"], json!(["nf"]));
    let versions = spec["versions"].as_array().expect("versions");
    assert_eq!(versions.len(), 1);
    let v = &versions[0];
    assert_eq!(
        (&v["name"], &v["served"], &v["storage"]),
        (&json!("v1alpha1"), &json!(true), &json!(true))
    );
    assert_eq!(v["subresources"], json!({"status": {}}));
    let columns: Vec<(&str, &str, &str)> = v["additionalPrinterColumns"]
        .as_array()
        .expect("printer columns")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().expect("name"),
                c["type"].as_str().expect("type"),
                c["jsonPath"].as_str().expect("jsonPath"),
            )
        })
        .collect();
    assert_eq!(
        columns,
        [
            ("Action", "string", ".spec.action.type"),
            ("Mode", "string", ".spec.mode"),
            ("Value", "string", ".spec.value"),
            ("Pods", "integer", ".status.selectedPods"),
            ("Duration", "string", ".spec.duration"),
            ("Age", "date", ".metadata.creationTimestamp"),
        ]
    );
    let schema = &v["schema"]["openAPIV3Schema"];
    let required = strings(&schema["properties"]["spec"]["required"]);
    for f in ["action", "duration", "mode", "selector"] {
        assert!(required.contains(&f), "spec.{f} is required");
    }
    let nodes = &schema["properties"]["status"]["properties"]["nodes"];
    assert_eq!(nodes["x-kubernetes-list-type"], "map");
    assert_eq!(nodes["x-kubernetes-list-map-keys"], json!(["node"]));

    // The rendered CRD is the committed file, untouched by kustomize.
    let text = read(&root().join("daemonset/networkfault-crd.yaml"));
    let committed = Value::deserialize(serde_yaml::Deserializer::from_str(&text))
        .expect("the committed CRD is YAML");
    assert_eq!(crd, &committed);

    // RBAC for the reconciler: read the resources (get/list/watch), and
    // server-side apply its node's status entry (PATCH networkfaults/status).
    let role = find(&objs, "ClusterRole");
    let allows = |resource: &str, verb: &str| {
        role["rules"].as_array().expect("rules").iter().any(|r| {
            strings(&r["apiGroups"]).contains(&"netfault.io")
                && strings(&r["resources"]).contains(&resource)
                && strings(&r["verbs"]).contains(&verb)
        })
    };
    for verb in ["get", "list", "watch"] {
        assert!(allows("networkfaults", verb), "networkfaults {verb}");
    }
    assert!(allows("networkfaults/status", "patch"), "status patch");
    for verb in ["create", "update", "patch", "delete"] {
        assert!(
            !allows("networkfaults", verb),
            "agents never {verb} the resources"
        );
    }
}

/// `daemonset/test-suite-rbac.yaml`: the optional RBAC `netfaultctl --kube`
/// needs (a Role in `netfault`, get on pods elsewhere); not in the
/// kustomization.
#[test]
fn test_suite_rbac_is_narrow_and_optional() {
    let text = read(&root().join("daemonset/test-suite-rbac.yaml"));
    let objs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("a YAML document"))
        .collect();
    let kinds: Vec<&str> = objs.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"]
    );
    let role = &objs[0];
    assert_eq!(role["metadata"]["namespace"], "netfault");
    assert_eq!(
        role["rules"],
        json!([
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
            {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["get", "create"]},
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["netfault-api-token"], "verbs": ["get"]},
        ])
    );
    let binding = &objs[1];
    assert_eq!(binding["metadata"]["namespace"], "netfault");
    assert_eq!(
        binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]})
    );
    assert_eq!(binding["subjects"][0]["kind"], "ServiceAccount");
    // The target pods' nodes: get on pods, nothing else.
    assert_eq!(
        objs[2]["rules"],
        json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}])
    );
    assert_eq!(objs[3]["roleRef"]["name"], objs[2]["metadata"]["name"]);
    assert_eq!(objs[3]["subjects"], binding["subjects"]);
    let kustomization = read(&root().join("daemonset/kustomization.yaml"));
    assert!(
        !kustomization.contains("test-suite-rbac"),
        "the test-suite RBAC is optional: not in the kustomization"
    );
}
