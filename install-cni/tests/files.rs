//! File-level tests: the binary's `--once`/`--uninstall` and SIGTERM, and the library's
//! watch loop against a simulated primary CNI. No root needed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, RwLock};
use std::time::{Duration, Instant};

use netfault_install_cni::{run, Config};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_netfault-install-cni");

#[path = "../src/testdirs.rs"]
mod testdirs;
use testdirs::{types, Dirs};

/// The binary, pointed at `d`'s directories.
fn command(d: &Dirs) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--cni-bin-dir")
        .arg(d.root.join("bin"))
        .arg("--cni-conf-dir")
        .arg(d.conf_dir())
        .arg("--plugin-src")
        .arg(d.root.join("plugin-src"));
    c
}

fn calico(mtu: u64) -> Value {
    json!({
        "name": "k8s-pod-network",
        "cniVersion": "1.0.0",
        "plugins": [
            {"type": "calico", "mtu": mtu, "ipam": {"type": "calico-ipam"}},
            {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}
        ]
    })
}

fn read(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

fn has_netfault_last(path: &Path) -> bool {
    fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .is_some_and(|v| {
            v["plugins"]
                .as_array()
                .and_then(|l| l.last())
                .is_some_and(|p| p["type"] == "netfault")
        })
}

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

#[test]
fn once_installs_and_uninstall_removes() {
    let d = Dirs::new("once");
    let f = d.conf_dir().join("10-calico.conflist");
    fs::write(&f, serde_json::to_vec_pretty(&calico(1500)).unwrap()).unwrap();
    let out = command(&d)
        .args(["--once", "--failure-policy", "fail", "--socket", "/x.sock"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fs::read(d.bin()).unwrap(),
        fs::read(d.root.join("plugin-src")).unwrap()
    );
    let now = read(&f);
    assert_eq!(types(&now), ["calico", "portmap", "netfault"]);
    assert_eq!(
        now["plugins"][2],
        json!({"type": "netfault", "socket": "/x.sock", "failurePolicy": "fail",
               "capabilities": {"io.kubernetes.cri.pod-annotations": true}})
    );

    let out = command(&d).arg("--uninstall").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!d.bin().exists());
    assert_eq!(read(&f), calico(1500));
}

#[test]
fn bad_flags_are_usage_errors() {
    let d = Dirs::new("flags");
    let out = command(&d)
        .args(["--once", "--failure-policy", "maybe"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = command(&d)
        .args(["--once", "--uninstall"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn sigterm_removes_entry_and_binary_then_exits_zero() {
    let d = Dirs::new("sigterm");
    let f = d.conf_dir().join("10-calico.conflist");
    fs::write(&f, serde_json::to_vec_pretty(&calico(1500)).unwrap()).unwrap();
    let mut child = command(&d).spawn().unwrap();
    wait_for("install", Duration::from_secs(5), || {
        has_netfault_last(&f) && d.bin().exists()
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!d.bin().exists());
    assert_eq!(read(&f), calico(1500));
}

/// Runs the watch loop in a thread and a reader that parses the conflist in a tight loop.
/// The test's own non-atomic writes (the simulated primary CNI writing in place) hold
/// `gate` for writing, so the reader checks only what netfault-install-cni writes.
struct Harness {
    shutdown: Option<mpsc::Sender<()>>,
    runner: Option<std::thread::JoinHandle<Result<(), netfault_install_cni::Error>>>,
    stop_reader: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<(u64, Vec<String>)>>,
    gate: Arc<RwLock<()>>,
}

impl Harness {
    /// `watched`: the files the reader parses (a missing one is skipped).
    fn start(cfg: Config, watched: Vec<PathBuf>) -> Harness {
        let gate = Arc::new(RwLock::new(()));
        let stop_reader = Arc::new(AtomicBool::new(false));
        let reader = {
            let gate = gate.clone();
            let stop = stop_reader.clone();
            std::thread::spawn(move || {
                let (mut reads, mut bad) = (0u64, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let _g = gate.read().unwrap();
                    for path in &watched {
                        match fs::read(path) {
                            Ok(b) => {
                                reads += 1;
                                if let Err(e) = serde_json::from_slice::<Value>(&b) {
                                    bad.push(format!("{e}: {:?}", String::from_utf8_lossy(&b)));
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => bad.push(format!("read: {e}")),
                        }
                    }
                }
                (reads, bad)
            })
        };
        let (tx, rx) = mpsc::channel();
        let runner = std::thread::spawn(move || run(&cfg, rx));
        Harness {
            shutdown: Some(tx),
            runner: Some(runner),
            stop_reader,
            reader: Some(reader),
            gate,
        }
    }

    /// Stops the loop (the SIGTERM stand-in) and the reader; asserts every read parsed.
    fn stop(mut self) {
        self.shutdown.take().unwrap().send(()).unwrap();
        self.runner.take().unwrap().join().unwrap().unwrap();
        self.stop_reader.store(true, Ordering::Relaxed);
        let (reads, bad) = self.reader.take().unwrap().join().unwrap();
        assert!(reads > 100, "only {reads} reads");
        assert!(
            bad.is_empty(),
            "{} of {reads} reads did not parse: {:?}",
            bad.len(),
            &bad[..bad.len().min(3)]
        );
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.take();
        self.stop_reader.store(true, Ordering::Relaxed);
    }
}

#[test]
fn watch_loop_reinserts_after_the_primary_cni_rewrites() {
    let d = Dirs::new("watch");
    let f = d.conf_dir().join("10-calico.conflist");
    fs::write(&f, serde_json::to_vec_pretty(&calico(1500)).unwrap()).unwrap();
    let h = Harness::start(d.cfg(), vec![f.clone()]);
    wait_for("first install", Duration::from_secs(2), || {
        has_netfault_last(&f) && d.bin().exists()
    });

    for round in 0..3u64 {
        // In place (truncate + write), as a CNI that rewrites its file does.
        {
            let _w = h.gate.write().unwrap();
            fs::write(
                &f,
                serde_json::to_vec_pretty(&calico(1400 + round)).unwrap(),
            )
            .unwrap();
            assert!(!has_netfault_last(&f));
        }
        wait_for(
            "re-insert after an in-place write",
            Duration::from_secs(2),
            || has_netfault_last(&f),
        );
        assert_eq!(
            read(&f)["plugins"][0]["mtu"],
            1400 + round,
            "the CNI's new content is kept"
        );

        // Via rename from a temp file in the conf dir (atomic for readers).
        let tmp = d.conf_dir().join(format!(".calico-tmp-{round}"));
        fs::write(
            &tmp,
            serde_json::to_vec_pretty(&calico(1300 + round)).unwrap(),
        )
        .unwrap();
        fs::rename(&tmp, &f).unwrap();
        wait_for("re-insert after a rename", Duration::from_secs(2), || {
            has_netfault_last(&f)
        });
        assert_eq!(read(&f)["plugins"][0]["mtu"], 1300 + round);
        assert_eq!(types(&read(&f)), ["calico", "portmap", "netfault"]);
    }

    // Quiet: no rewrite loop on its own writes (the inode stays the same).
    use std::os::unix::fs::MetadataExt;
    let ino = fs::metadata(&f).unwrap().ino();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        fs::metadata(&f).unwrap().ino(),
        ino,
        "rewrote its own settled file"
    );

    h.stop();
    assert!(!d.bin().exists(), "binary removed on shutdown");
    assert_eq!(read(&f), calico(1302), "entry removed on shutdown");
}

#[test]
fn watch_loop_follows_a_new_primary_file_and_a_conf() {
    let d = Dirs::new("newprimary");
    let conf = d.conf_dir().join("20-bridge.conf");
    let list = d.conf_dir().join("20-bridge.conflist");
    let early = d.conf_dir().join("10-calico.conflist");
    let h = Harness::start(d.cfg(), vec![conf.clone(), list.clone(), early.clone()]);
    // No config yet: only the binary.
    wait_for("binary", Duration::from_secs(2), || d.bin().exists());

    // The primary CNI drops a .conf: it becomes a .conflist with netfault.
    let tmp = d.conf_dir().join(".bridge.tmp");
    fs::write(
        &tmp,
        br#"{"cniVersion": "0.4.0", "name": "br", "type": "bridge"}"#,
    )
    .unwrap();
    fs::rename(&tmp, &conf).unwrap();
    wait_for("conversion", Duration::from_secs(2), || {
        has_netfault_last(&list) && !conf.exists()
    });
    assert_eq!(types(&read(&list)), ["bridge", "netfault"]);

    // A lexically earlier conflist appears: it becomes the primary and gets the entry.
    {
        let _w = h.gate.write().unwrap();
        fs::write(&early, serde_json::to_vec(&calico(1500)).unwrap()).unwrap();
    }
    wait_for("new primary", Duration::from_secs(2), || {
        has_netfault_last(&early)
    });

    h.stop();
    assert!(!d.bin().exists());
    assert_eq!(read(&early), calico(1500));
}
