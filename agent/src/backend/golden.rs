//! Golden files for the nft transactions the backends build (unit tests
//! only): `agent/testdata/nft/<name>.json` holds, per case, the payload
//! (`{"nftables": [...]}`) a builder produced when the file was written, so
//! a change to a builder that changes what nft is told shows up as a diff.
//!
//! Payloads are compared as JSON values (key order aside), after
//! [`canonical`], which makes one the spellings that tell nft the same
//! thing. `NETFAULT_BLESS=1 cargo test -p netfault-agent golden` rewrites
//! the files from the builders.
//!
//! [`check_kernel`] loads the golden payloads and the built ones into
//! scratch netns (`unshare -n`, root only) and compares what the kernel
//! then holds: the proof that a builder still loads the same ruleset where
//! its JSON differs in form.
//!
//! What it must not do: touch a netns other than the scratch ones it
//! creates, or run outside `cfg(test)`.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{Map, Value};

/// One payload of a golden file.
pub struct Case {
    pub name: String,
    /// Payloads applied first in the scratch netns of [`check_kernel`]
    /// (the table a change applies to), from the builders.
    pub before: Vec<Value>,
    pub payload: Value,
}

impl Case {
    pub fn new(name: impl Into<String>, payload: Value) -> Case {
        Case {
            name: name.into(),
            before: Vec::new(),
            payload,
        }
    }

    pub fn after(mut self, before: Vec<Value>) -> Case {
        self.before = before;
        self
    }
}

/// `v` with each spelling that differs only in form from another made one
/// (the second is what the `nftables` crate writes; nft reads both alike,
/// which [`check_kernel`] shows):
/// - a set element object (`{"elem": {...}}`) without its `null` members
///   (`"expires": null`, `"comment": null`, `"counter": null`);
/// - a set in a `delete` or `flush` command without its `type` (nft reads
///   only family, table and name there);
/// - a rule in a `delete` command without an empty `expr` (nft reads only
///   family, table, chain and handle there).
pub fn canonical(v: &Value) -> Value {
    match v {
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| {
                    let x = match (k.as_str(), x) {
                        ("elem", Value::Object(e)) => Value::Object(
                            e.iter()
                                .filter(|(_, y)| !y.is_null())
                                .map(|(k, y)| (k.clone(), y.clone()))
                                .collect(),
                        ),
                        ("delete" | "flush", Value::Object(c)) => {
                            let mut c = c.clone();
                            if let Some(Value::Object(set)) = c.get_mut("set") {
                                set.remove("type");
                            }
                            if k == "delete" {
                                if let Some(Value::Object(rule)) = c.get_mut("rule") {
                                    if rule.get("expr") == Some(&Value::Array(Vec::new())) {
                                        rule.remove("expr");
                                    }
                                }
                            }
                            Value::Object(c)
                        }
                        _ => x.clone(),
                    };
                    (k.clone(), canonical(&x))
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

fn path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/nft")
        .join(format!("{name}.json"))
}

/// Checks `cases` against the golden file `name`, or with `NETFAULT_BLESS`
/// set, writes them to it.
pub fn check(name: &str, cases: &[Case]) {
    let file = path(name);
    let mut now = Map::new();
    for c in cases {
        assert!(
            now.insert(c.name.clone(), canonical(&c.payload)).is_none(),
            "case {} twice",
            c.name
        );
    }
    if std::env::var_os("NETFAULT_BLESS").is_some() {
        std::fs::create_dir_all(file.parent().expect("has a parent")).expect("mkdir");
        std::fs::write(&file, render(&now)).expect("writes the golden file");
        return;
    }
    let raw = std::fs::read_to_string(&file).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (NETFAULT_BLESS=1 writes it from the builders)",
            file.display()
        )
    });
    let golden: Map<String, Value> = serde_json::from_str(&raw).expect("golden file is JSON");
    let mut failed = Vec::new();
    for (case, payload) in &now {
        match golden.get(case) {
            None => failed.push(format!("{case}: not in the golden file")),
            Some(g) if canonical(g) != *payload => {
                failed.push(format!("{case}:\n  golden: {g}\n  built:  {payload}"))
            }
            Some(_) => {}
        }
    }
    for case in golden.keys().filter(|c| !now.contains_key(*c)) {
        failed.push(format!("{case}: in the golden file, no longer built"));
    }
    assert!(
        failed.is_empty(),
        "{} differs from the builders (NETFAULT_BLESS=1 rewrites it):\n{}",
        file.display(),
        failed.join("\n")
    );
}

/// The golden file's text: an object of payloads by case, one nft command
/// a line.
fn render(cases: &Map<String, Value>) -> String {
    let mut out = String::from("{\n");
    for (i, (case, payload)) in cases.iter().enumerate() {
        let cmds = payload["nftables"]
            .as_array()
            .unwrap_or_else(|| panic!("{case}: not an nft payload: {payload}"));
        out += &format!("  {}: {{\"nftables\": [\n", Value::String(case.clone()));
        let lines: Vec<String> = cmds.iter().map(|c| format!("    {c}")).collect();
        out += &lines.join(",\n");
        out += if i + 1 < cases.len() {
            "\n  ]},\n"
        } else {
            "\n  ]}\n"
        };
    }
    out + "}\n"
}

/// Checks that each case's golden payload and built payload, applied after
/// its `before`, leave the same ruleset in the kernel. Skipped (with a
/// note) unless root with `nft` and `unshare`.
pub fn check_kernel(name: &str, cases: &[Case]) {
    if !can_use_kernel() {
        eprintln!("skipped: requires root (and nft, unshare)");
        return;
    }
    let raw = std::fs::read_to_string(path(name)).expect("reads the golden file");
    let golden: Map<String, Value> = serde_json::from_str(&raw).expect("golden file is JSON");
    for c in cases {
        let g = golden
            .get(&c.name)
            .unwrap_or_else(|| panic!("{}: not in the golden file", c.name));
        let mut want: Vec<&Value> = c.before.iter().collect();
        want.push(g);
        let mut got: Vec<&Value> = c.before.iter().collect();
        got.push(&c.payload);
        let (want, got) = (kernel_listing(&want), kernel_listing(&got));
        assert_eq!(
            want, got,
            "{}: the kernel holds another ruleset (golden, then built)",
            c.name
        );
    }
}

/// Whether [`kernel_listing`] can run: root, with `nft` and `unshare`.
fn can_use_kernel() -> bool {
    nix::unistd::geteuid().is_root()
        && ["nft", "unshare"].iter().all(|b| {
            Command::new(b)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

/// Applies `payloads` in order, each as one `nft -j -f` transaction, in a
/// fresh netns, and returns `nft -j list ruleset` afterwards, without what
/// depends on the moment: the metainfo object (nft's version) and the
/// `expires` of set elements (a timeout's remaining time).
fn kernel_listing(payloads: &[&Value]) -> Value {
    let dir = std::env::temp_dir().join(format!(
        "netfault-golden-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut script = String::from("set -e\n");
    for (i, p) in payloads.iter().enumerate() {
        let f = dir.join(format!("{i}.json"));
        std::fs::File::create(&f)
            .and_then(|mut w| w.write_all(p.to_string().as_bytes()))
            .expect("writes a payload");
        script += &format!("nft -j -f {}\n", f.display());
    }
    script += "nft -j list ruleset\n";
    let out = Command::new("unshare")
        .args(["-n", "sh", "-c", &script])
        .output()
        .expect("runs unshare");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "nft refused a payload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut v: Value = serde_json::from_slice(&out.stdout).expect("nft lists JSON");
    if let Some(objs) = v["nftables"].as_array_mut() {
        objs.retain(|o| o.get("metainfo").is_none());
    }
    drop_expires(&mut v);
    v
}

fn drop_expires(v: &mut Value) {
    match v {
        Value::Array(a) => a.iter_mut().for_each(drop_expires),
        Value::Object(o) => {
            if let Some(Value::Object(e)) = o.get_mut("elem") {
                e.remove("expires");
            }
            o.values_mut().for_each(drop_expires);
        }
        _ => {}
    }
}
