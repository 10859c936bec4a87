use super::*;
use std::os::unix::fs::MetadataExt;

use crate::testdirs::{types, Dirs};

fn entry() -> Value {
    json!({"type": "netfault", "socket": "/run/netfault/netfaultd.sock", "failurePolicy": "ignore",
           "capabilities": {"io.kubernetes.cri.pod-annotations": true}})
}

const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "1.0.0",
  "plugins": [
    {"type": "calico", "log_level": "info", "ipam": {"type": "calico-ipam"}, "mtu": 0},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
    {"type": "bandwidth", "capabilities": {"bandwidth": true}}
  ]
}"#;

fn parse(s: &str) -> Value {
    serde_json::from_str(s).unwrap()
}

#[test]
fn insert_appends_last_and_keeps_others() {
    let conf = parse(CALICO);
    let new = insert(&conf, &entry()).unwrap().unwrap();
    assert_eq!(types(&new), ["calico", "portmap", "bandwidth", "netfault"]);
    assert_eq!(new["plugins"][3], entry());
    // Other plugins are identical, key order included.
    for i in 0..3 {
        assert_eq!(
            serde_json::to_string(&new["plugins"][i]).unwrap(),
            serde_json::to_string(&conf["plugins"][i]).unwrap()
        );
    }
    let keys: Vec<&String> = new.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["name", "cniVersion", "plugins"]);
    let keys: Vec<&String> = new["plugins"][0].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["type", "log_level", "ipam", "mtu"]);
}

#[test]
fn insert_is_idempotent() {
    let once = insert(&parse(CALICO), &entry()).unwrap().unwrap();
    assert_eq!(insert(&once, &entry()).unwrap(), None);
}

#[test]
fn insert_fixes_misplaced_and_stale_entries() {
    let mut conf = parse(CALICO);
    // Misplaced: in the middle.
    conf["plugins"].as_array_mut().unwrap().insert(1, entry());
    let fixed = insert(&conf, &entry()).unwrap().unwrap();
    assert_eq!(
        types(&fixed),
        ["calico", "portmap", "bandwidth", "netfault"]
    );

    // Stale: last, but other settings.
    let mut stale = fixed.clone();
    stale["plugins"][3]["failurePolicy"] = json!("fail");
    let fixed2 = insert(&stale, &entry()).unwrap().unwrap();
    assert_eq!(fixed2, fixed);

    // Duplicate: one in the middle and one (correct) at the end.
    let mut dup = fixed.clone();
    dup["plugins"].as_array_mut().unwrap().insert(0, entry());
    assert_eq!(insert(&dup, &entry()).unwrap().unwrap(), fixed);
}

#[test]
fn remove_restores_the_plugin_list() {
    let conf = parse(CALICO);
    let with = insert(&conf, &entry()).unwrap().unwrap();
    let without = remove(&with).unwrap().unwrap();
    assert_eq!(
        serde_json::to_string(&without).unwrap(),
        serde_json::to_string(&conf).unwrap()
    );
    assert_eq!(remove(&conf).unwrap(), None);
}

#[test]
fn bad_shapes_are_errors() {
    assert_eq!(insert(&json!([1]), &entry()), Err(EditError::NotAnObject));
    assert_eq!(
        insert(&json!({"plugins": {}}), &entry()),
        Err(EditError::PluginsNotArray)
    );
    assert_eq!(remove(&json!("x")), Err(EditError::NotAnObject));
    assert_eq!(convert_conf(&json!(null)), Err(EditError::NotAnObject));
}

#[test]
fn convert_conf_wraps_the_plugin() {
    let conf = parse(
        r#"{"cniVersion": "0.4.0", "name": "bridge-net", "type": "bridge", "bridge": "cni0"}"#,
    );
    let list = convert_conf(&conf).unwrap();
    let keys: Vec<&String> = list.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["cniVersion", "name", "plugins"]);
    assert_eq!(list["cniVersion"], "0.4.0");
    assert_eq!(list["name"], "bridge-net");
    assert_eq!(list["plugins"], json!([conf]));
}

#[test]
fn primary_file_is_the_lexically_first_config() {
    let d = Dirs::new("primary");
    assert_eq!(primary_file(&d.conf_dir()).unwrap(), None);
    fs::write(d.conf_dir().join("20-b.conflist"), CALICO).unwrap();
    fs::write(d.conf_dir().join("README"), "x").unwrap();
    fs::write(d.conf_dir().join(".netfault-install-cni.1.0.tmp"), "x").unwrap();
    assert_eq!(
        primary_file(&d.conf_dir()).unwrap(),
        Some(d.conf_dir().join("20-b.conflist"))
    );
    fs::write(d.conf_dir().join("10-a.json"), CALICO).unwrap();
    assert_eq!(
        primary_file(&d.conf_dir()).unwrap(),
        Some(d.conf_dir().join("10-a.json"))
    );
    fs::write(d.conf_dir().join("05-c.conf"), CALICO).unwrap();
    assert_eq!(
        primary_file(&d.conf_dir()).unwrap(),
        Some(d.conf_dir().join("05-c.conf"))
    );
    fs::create_dir(d.conf_dir().join("00-dir.conf")).unwrap();
    assert_eq!(
        primary_file(&d.conf_dir()).unwrap(),
        Some(d.conf_dir().join("05-c.conf"))
    );
}

#[test]
fn ensure_entry_writes_once_then_never() {
    let d = Dirs::new("idem");
    let f = d.conf_dir().join("10-calico.conflist");
    fs::write(&f, CALICO).unwrap();
    assert_eq!(ensure_entry(&d.cfg()).unwrap(), Outcome::Written(f.clone()));
    let bytes = fs::read(&f).unwrap();
    let md = fs::metadata(&f).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        ensure_entry(&d.cfg()).unwrap(),
        Outcome::Unchanged(f.clone())
    );
    let md2 = fs::metadata(&f).unwrap();
    assert_eq!(fs::read(&f).unwrap(), bytes, "byte-identical");
    assert_eq!(
        (md.ino(), md.mtime(), md.mtime_nsec()),
        (md2.ino(), md2.mtime(), md2.mtime_nsec())
    );
    assert_eq!(
        types(&serde_json::from_slice(&bytes).unwrap()),
        ["calico", "portmap", "bandwidth", "netfault"]
    );
    // No temp file is left behind.
    let names: Vec<_> = fs::read_dir(d.conf_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [OsStr::new("10-calico.conflist")]);
}

#[test]
fn ensure_entry_fixes_stale_entry_in_one_rewrite() {
    let d = Dirs::new("stale");
    let f = d.conf_dir().join("10-calico.conflist");
    let mut conf = parse(CALICO);
    let mut old = entry();
    old["socket"] = json!("/old.sock");
    conf["plugins"].as_array_mut().unwrap().insert(0, old);
    fs::write(&f, serde_json::to_vec(&conf).unwrap()).unwrap();
    let mut cfg = d.cfg();
    cfg.failure_policy = FailurePolicy::Fail;
    assert_eq!(ensure_entry(&cfg).unwrap(), Outcome::Written(f.clone()));
    let now: Value = serde_json::from_slice(&fs::read(&f).unwrap()).unwrap();
    assert_eq!(types(&now), ["calico", "portmap", "bandwidth", "netfault"]);
    assert_eq!(now["plugins"][3]["failurePolicy"], "fail");
    assert_eq!(now["plugins"][3]["socket"], "/run/netfault/netfaultd.sock");
}

#[test]
fn ensure_entry_converts_a_conf() {
    let d = Dirs::new("conv");
    let conf = d.conf_dir().join("10-bridge.conf");
    let text = r#"{"cniVersion": "0.4.0", "name": "bridge-net", "type": "bridge", "ipam": {"type": "host-local"}}"#;
    fs::write(&conf, text).unwrap();
    let list = d.conf_dir().join("10-bridge.conflist");
    assert_eq!(
        ensure_entry(&d.cfg()).unwrap(),
        Outcome::Converted {
            from: conf.clone(),
            to: list.clone()
        }
    );
    assert!(!conf.exists());
    let now: Value = serde_json::from_slice(&fs::read(&list).unwrap()).unwrap();
    assert_eq!(now["plugins"][0], parse(text));
    assert_eq!(types(&now), ["bridge", "netfault"]);
    assert_eq!(
        ensure_entry(&d.cfg()).unwrap(),
        Outcome::Unchanged(list.clone())
    );
    // Removal keeps the conflist with the remaining plugin.
    assert_eq!(
        remove_entry(&d.cfg()).unwrap(),
        Outcome::Written(list.clone())
    );
    let now: Value = serde_json::from_slice(&fs::read(&list).unwrap()).unwrap();
    assert_eq!(types(&now), ["bridge"]);
}

#[test]
fn remove_entry_restores_the_file() {
    let d = Dirs::new("remove");
    let f = d.conf_dir().join("10-calico.conflist");
    fs::write(&f, CALICO).unwrap();
    ensure_entry(&d.cfg()).unwrap();
    assert_eq!(remove_entry(&d.cfg()).unwrap(), Outcome::Written(f.clone()));
    let now: Value = serde_json::from_slice(&fs::read(&f).unwrap()).unwrap();
    assert_eq!(now, parse(CALICO));
    assert_eq!(remove_entry(&d.cfg()).unwrap(), Outcome::Unchanged(f));
}

#[test]
fn invalid_json_is_left_alone() {
    let d = Dirs::new("invalid");
    let f = d.conf_dir().join("10-calico.conflist");
    fs::write(&f, b"{\"plugins\": [").unwrap();
    let err = ensure_entry(&d.cfg()).unwrap_err();
    assert!(matches!(err, Error::Json { .. }), "{err}");
    assert!(err.to_string().contains("10-calico.conflist"), "{err}");
    assert_eq!(fs::read(&f).unwrap(), b"{\"plugins\": [");
    assert!(matches!(
        remove_entry(&d.cfg()).unwrap_err(),
        Error::Json { .. }
    ));
    // A valid file with a bad shape is left alone too.
    fs::write(&f, br#"{"plugins": 3}"#).unwrap();
    assert!(matches!(
        ensure_entry(&d.cfg()).unwrap_err(),
        Error::Shape { .. }
    ));
    assert_eq!(fs::read(&f).unwrap(), br#"{"plugins": 3}"#);
}

#[test]
fn install_binary_is_atomic_and_executable() {
    let d = Dirs::new("bin");
    let dst = install_binary(&d.cfg()).unwrap();
    assert_eq!(dst, d.bin());
    assert_eq!(
        fs::read(&dst).unwrap(),
        fs::read(d.root.join("plugin-src")).unwrap()
    );
    assert_eq!(
        fs::metadata(&dst).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let names: Vec<_> = fs::read_dir(d.root.join("bin"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [OsStr::new("netfault")]);
    remove_binary(&d.cfg()).unwrap();
    assert!(!dst.exists());
    remove_binary(&d.cfg()).unwrap();
}
