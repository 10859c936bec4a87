//! The two images a test node imports, built locally (no registry):
//!
//! - [`BOX_IMAGE`]: busybox-static (`/bin/busybox` and `sh`, `sleep`, `ping`,
//!   `nc`, ... links) as an OCI layout made with `umoci`; its `Cmd` sleeps
//!   forever, so it is the sandbox (pause) image as well as the pods' image.
//! - the agent image ([`AGENT_IMAGE`]), made by `daemonset/build-image.sh
//!   --bin-dir ... --out ...` from the binaries `cargo build --workspace`
//!   left in this profile's target dir. Debug symbols are stripped from
//!   copies first (`strip --strip-debug`): netfaultd's 130 MB of DWARF would
//!   make every import slow and changes nothing at run time.
//!
//! Both archives are built once per content: a file lock serialises builders
//! (tests in parallel, several test processes), and the archive name carries
//! a key of the inputs' size and mtime, so a rebuilt binary gives a new image.
//! They live in `target/<profile>/e2e-cri/`.

use std::fs::File;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{run, Error, IoContext, Result};

/// The busybox image: pods' containers and the sandbox (pause) image.
pub const BOX_IMAGE: &str = "docker.io/library/nfbox:dev";
/// The agent image, as the DaemonSet names it.
pub const AGENT_IMAGE: &str = "docker.io/library/netfaultd:dev";
/// The busybox-static binary the box image is made of.
pub const BUSYBOX: &str = "/bin/busybox";
/// The applets linked in the box image's `/bin`.
const APPLETS: &[&str] = &[
    "sh", "sleep", "ping", "nc", "cat", "echo", "ls", "ip", "wget", "httpd", "date", "true",
];
/// The workspace binaries in the agent image (all required here: the
/// install-cni container is part of the DaemonSet).
pub const AGENT_BINARIES: &[&str] = &[
    "netfaultd",
    "netfaultctl",
    "netfault",
    "netfault-install-cni",
];

/// `target/<profile>/e2e-cri`: the image cache.
pub fn cache_dir() -> PathBuf {
    testbed::workspace_bin("e2e-cri")
}

/// The repository's root (where `daemonset/` is).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Holds the cache's lock while building.
fn lock_cache() -> Result<File> {
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    let path = dir.join("lock");
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .ctx(|| format!("opening {}", path.display()))?;
    f.lock().ctx(|| format!("locking {}", path.display()))?;
    Ok(f)
}

/// A key of files' size, mtime and name, and of extra bytes.
fn key(files: &[PathBuf], extra: &[u8]) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        let m = std::fs::metadata(f).ctx(|| format!("stat {}", f.display()))?;
        f.hash(&mut h);
        m.size().hash(&mut h);
        m.mtime().hash(&mut h);
        m.mtime_nsec().hash(&mut h);
    }
    extra.hash(&mut h);
    Ok(format!("{:016x}", h.finish()))
}

/// Removes `prefix*suffix` files in the cache other than `keep` that are
/// older than 10 minutes (a younger one may be imported right now by a
/// test process that still has the binaries it was built from).
fn prune(prefix: &str, suffix: &str, keep: &Path) {
    let Ok(rd) = std::fs::read_dir(cache_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(600));
        if n.starts_with(prefix) && n.ends_with(suffix) && e.path() != keep && old {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The box image's OCI archive (built if needed).
pub fn box_image() -> Result<PathBuf> {
    let busybox = PathBuf::from(BUSYBOX);
    if !busybox.exists() {
        return Err(Error::Other(format!(
            "{BUSYBOX} missing: install busybox-static (scripts/setup.sh does)"
        )));
    }
    let _lock = lock_cache()?;
    let out = cache_dir().join(format!("nfbox-{}.oci.tar", key(&[busybox], b"nfbox 1")?));
    if out.exists() {
        return Ok(out);
    }
    let work = cache_dir().join("nfbox-build");
    let _ = std::fs::remove_dir_all(&work);
    let rootfs = work.join("rootfs");
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin).ctx(|| format!("creating {}", bin.display()))?;
    for d in ["tmp", "etc", "proc", "sys", "dev"] {
        std::fs::create_dir_all(rootfs.join(d)).ctx(|| format!("creating rootfs/{d}"))?;
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")
        .ctx(|| "writing etc/passwd".into())?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n").ctx(|| "writing etc/group".into())?;
    std::fs::copy(BUSYBOX, bin.join("busybox")).ctx(|| format!("copying {BUSYBOX}"))?;
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", bin.join(a)).ctx(|| format!("linking bin/{a}"))?;
    }
    let layer = work.join("layer.tar");
    tar_dir(&rootfs, &layer)?;
    let layout = work.join("layout");
    let image = format!("{}:dev", layout.display());
    run(Command::new("umoci")
        .arg("init")
        .arg("--layout")
        .arg(&layout))?;
    run(Command::new("umoci").args(["new", "--image", &image]))?;
    run(Command::new("umoci")
        .args(["raw", "add-layer", "--image", &image])
        .arg(&layer))?;
    run(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--os",
        "linux",
        "--config.cmd",
        "/bin/sleep",
        "--config.cmd",
        "inf",
        "--config.env",
        "PATH=/bin",
        "--config.workingdir",
        "/",
    ]))?;
    run(Command::new("umoci").arg("gc").arg("--layout").arg(&layout))?;
    name_layout(&layout, BOX_IMAGE)?;
    tar_layout(&layout, &out)?;
    let _ = std::fs::remove_dir_all(&work);
    prune("nfbox-", ".oci.tar", &out);
    Ok(out)
}

/// Sets the image name containerd's import uses (the index's
/// `org.opencontainers.image.ref.name` annotation) to the full reference.
fn name_layout(layout: &Path, name: &str) -> Result<()> {
    let path = layout.join("index.json");
    let text = std::fs::read_to_string(&path).ctx(|| format!("reading {}", path.display()))?;
    let mut index: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
    let Some(manifests) = index["manifests"].as_array_mut() else {
        return Err(Error::Other(format!("{}: no manifests", path.display())));
    };
    for m in manifests {
        m["annotations"]["org.opencontainers.image.ref.name"] = name.into();
    }
    std::fs::write(&path, index.to_string()).ctx(|| format!("writing {}", path.display()))
}

fn tar_layout(layout: &Path, out: &Path) -> Result<()> {
    let tmp = out.with_extension("tmp");
    tar_dir(layout, &tmp)?;
    std::fs::rename(&tmp, out).ctx(|| format!("renaming {} to {}", tmp.display(), out.display()))
}

/// The agent image's OCI archive, built by `daemonset/build-image.sh` from
/// this profile's workspace binaries (if the cache has none for them).
pub fn agent_image() -> Result<PathBuf> {
    // Not testbed::ensure_workspace_bins: its `cargo build -p … --bins`
    // unifies features differently from `cargo build --workspace`, so the
    // two rebuild each other's binaries (a minute here, and a new image each
    // time). The binaries come from `cargo build --workspace`, which
    // scripts/e2e-cri.sh and scripts/test.sh run first.
    let bins: Vec<PathBuf> = AGENT_BINARIES
        .iter()
        .map(|b| testbed::workspace_bin(b))
        .collect();
    if let Some(missing) = bins.iter().find(|p| !p.exists()) {
        return Err(Error::MissingBinary {
            path: missing.clone(),
        });
    }
    let script = repo_root().join("daemonset/build-image.sh");
    let script_text = std::fs::read(&script).ctx(|| format!("reading {}", script.display()))?;
    let _lock = lock_cache()?;
    let k = key(&bins, &script_text)?;
    let out = cache_dir().join(format!("netfaultd-{k}.oci.tar"));
    if out.exists() {
        return Ok(out);
    }
    let stage = cache_dir().join("agent-bin");
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(&stage).ctx(|| format!("creating {}", stage.display()))?;
    for b in &bins {
        let name = b.file_name().unwrap_or_default();
        let dst = stage.join(name);
        // strip writes a new file; --strip-debug keeps the symbols (panics
        // still name functions). Without binutils' strip, the binaries go in
        // as they are (a bigger image, nothing else changes).
        let stripped = Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&dst)
            .arg(b)
            .stdin(std::process::Stdio::null())
            .status();
        match stripped {
            Ok(st) if st.success() => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::copy(b, &dst).ctx(|| format!("copying {}", b.display()))?;
            }
            other => {
                return Err(Error::Command {
                    command: format!("strip --strip-debug -o {} {}", dst.display(), b.display()),
                    status: format!("{other:?}"),
                    output: String::new(),
                })
            }
        }
    }
    let tmp = cache_dir().join(format!("netfaultd-{k}.building"));
    run(Command::new("bash")
        .arg(&script)
        .arg("--bin-dir")
        .arg(&stage)
        .arg("--out")
        .arg(&tmp))?;
    std::fs::rename(&tmp, &out).ctx(|| format!("renaming {}", tmp.display()))?;
    let _ = std::fs::remove_dir_all(&stage);
    prune("netfaultd-", ".oci.tar", &out);
    Ok(out)
}

/// Tars `dir`'s content into `out` reproducibly: names sorted, owned by root.
fn tar_dir(dir: &Path, out: &Path) -> Result<()> {
    run(Command::new("tar")
        .arg("--create")
        .arg("--file")
        .arg(out)
        .arg("--directory")
        .arg(dir)
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            ".",
        ]))?;
    Ok(())
}
