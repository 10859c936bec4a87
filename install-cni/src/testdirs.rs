//! Test directories shared by the unit tests (`src/tests.rs`) and the
//! file-level tests (`tests/files.rs`, which include this file by path).

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use netfault_install_cni::{Config, FailurePolicy};
use serde_json::Value;

/// A unique temp dir with `bin/`, `net.d/` and a fake plugin binary, removed on drop.
pub struct Dirs {
    pub root: PathBuf,
}

impl Dirs {
    pub fn new(tag: &str) -> Dirs {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let root = std::env::temp_dir().join(format!(
            "netfault-install-cni-{tag}-{}-{n}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("bin")).expect("test bin dir");
        fs::create_dir_all(root.join("net.d")).expect("test conf dir");
        fs::write(root.join("plugin-src"), b"#!/bin/sh\necho fake netfault\n")
            .expect("fake plugin");
        Dirs { root }
    }

    pub fn conf_dir(&self) -> PathBuf {
        self.root.join("net.d")
    }

    pub fn bin(&self) -> PathBuf {
        self.root.join("bin/netfault")
    }

    pub fn cfg(&self) -> Config {
        Config {
            cni_bin_dir: self.root.join("bin"),
            cni_conf_dir: self.conf_dir(),
            plugin_src: self.root.join("plugin-src"),
            socket: "/run/netfault/netfaultd.sock".into(),
            failure_policy: FailurePolicy::Ignore,
        }
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// The plugin types of a conflist, in order.
pub fn types(conf: &Value) -> Vec<String> {
    conf["plugins"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| p["type"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}
