//! netfault-install-cni: installs the `netfault` CNI plugin on a node and keeps its entry
//! as the last plugin of the conflist the container runtime uses (Istio's install-cni pattern).
//!
//! - [`insert`], [`remove`] and [`convert_conf`] edit a CNI config as pure functions on
//!   `serde_json::Value`; other plugins and keys are kept as they are, in their order.
//! - [`primary_file`], [`write_atomic`], [`ensure_entry`], [`remove_entry`],
//!   [`install_binary`] work on files: every write is a temp file in the target's own
//!   directory, fsynced, then renamed over the target, so readers never see a partial file.
//! - [`run`] installs, watches the conf dir with inotify and re-inserts the entry when the
//!   primary CNI rewrites its file, and uninstalls when the shutdown channel fires.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use serde_json::{json, Map, Value};
use tracing::{debug, error, info, warn};

/// The plugin's `type` and the name of its binary in the CNI bin dir.
pub const PLUGIN_TYPE: &str = "netfault";
/// Every temp file this program writes starts with this prefix (and has no CNI extension).
pub const TEMP_PREFIX: &str = ".netfault-install-cni.";
/// How long the watch loop waits after the last event before it reconciles.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: not valid JSON, left alone: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: {source}", path.display())]
    Shape { path: PathBuf, source: EditError },
    #[error("inotify on {}: {source}", path.display())]
    Inotify { path: PathBuf, source: Errno },
}

/// A CNI config whose shape the editing functions cannot work on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error("the config is not a JSON object")]
    NotAnObject,
    #[error("`plugins` is not an array")]
    PluginsNotArray,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

pub use netfault_api::wire::FailurePolicy;

#[derive(Debug, Clone)]
pub struct Config {
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub plugin_src: PathBuf,
    pub socket: String,
    pub failure_policy: FailurePolicy,
}

impl Config {
    /// The conflist entry (design.md, "CNI conflist entry").
    pub fn entry(&self) -> Value {
        json!({
            "type": PLUGIN_TYPE,
            "socket": self.socket,
            "failurePolicy": self.failure_policy.as_str(),
            "capabilities": {"io.kubernetes.cri.pod-annotations": true},
        })
    }

    pub fn binary_path(&self) -> PathBuf {
        self.cni_bin_dir.join(PLUGIN_TYPE)
    }
}

// ---------------------------------------------------------------------------------------
// Pure editing.

fn is_netfault(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn plugins(conf: &Value) -> Result<&Vec<Value>, EditError> {
    let obj = conf.as_object().ok_or(EditError::NotAnObject)?;
    match obj.get("plugins") {
        Some(Value::Array(list)) => Ok(list),
        _ => Err(EditError::PluginsNotArray),
    }
}

fn with_plugins(conf: &Value, list: Vec<Value>) -> Value {
    let mut out = conf.clone();
    out["plugins"] = Value::Array(list);
    out
}

/// Whether `conf` is a conflist (has `plugins`) rather than a single-plugin `.conf`.
pub fn is_conflist(conf: &Value) -> bool {
    conf.get("plugins").is_some()
}

/// Puts `entry` as the last plugin of the conflist `conf`. `None` when it already is (with
/// the same settings and no other netfault entry): nothing to write. Any other netfault
/// entry is dropped; the other plugins keep their order and contents.
pub fn insert(conf: &Value, entry: &Value) -> Result<Option<Value>, EditError> {
    let list = plugins(conf)?;
    let ours = list.iter().filter(|p| is_netfault(p)).count();
    if ours == 1 && list.last() == Some(entry) {
        return Ok(None);
    }
    let mut out: Vec<Value> = list.iter().filter(|p| !is_netfault(p)).cloned().collect();
    out.push(entry.clone());
    Ok(Some(with_plugins(conf, out)))
}

/// Drops every netfault entry from the conflist `conf`. `None` when there is none.
pub fn remove(conf: &Value) -> Result<Option<Value>, EditError> {
    let list = plugins(conf)?;
    if !list.iter().any(is_netfault) {
        return Ok(None);
    }
    let out = list.iter().filter(|p| !is_netfault(p)).cloned().collect();
    Ok(Some(with_plugins(conf, out)))
}

/// Turns a single-plugin `.conf` into a conflist `{"cniVersion", "name", "plugins": [conf]}`.
pub fn convert_conf(conf: &Value) -> Result<Value, EditError> {
    let obj = conf.as_object().ok_or(EditError::NotAnObject)?;
    let mut out = Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(v) = obj.get(key) {
            out.insert(key.to_owned(), v.clone());
        }
    }
    out.insert("plugins".to_owned(), Value::Array(vec![conf.clone()]));
    Ok(Value::Object(out))
}

// ---------------------------------------------------------------------------------------
// Files.

fn is_cni_config_name(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    !name.starts_with(TEMP_PREFIX)
        && [".conflist", ".conf", ".json"]
            .iter()
            .any(|ext| name.len() > ext.len() && name.ends_with(ext))
}

/// The config file the runtime uses: the lexically first `*.conflist`, `*.conf` or
/// `*.json` in `dir` (as libcni's `ConfFiles` + sort, which containerd and CRI-O use).
pub fn primary_file(dir: &Path) -> Result<Option<PathBuf>, Error> {
    let mut names = Vec::new();
    for ent in fs::read_dir(dir).map_err(io_err(dir))? {
        let ent = ent.map_err(io_err(dir))?;
        let name = ent.file_name();
        if !is_cni_config_name(&name) {
            continue;
        }
        // Only regular files (following symlinks); a vanished entry is skipped.
        match fs::metadata(ent.path()) {
            Ok(md) if md.is_file() => names.push(name),
            _ => continue,
        }
    }
    names.sort();
    Ok(names.first().map(|n| dir.join(n)))
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn temp_path(dir: &Path) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{TEMP_PREFIX}{}.{n}.tmp", std::process::id()))
}

/// Writes `bytes` to `path` atomically: a temp file in the same directory, fsync, chmod
/// `mode`, rename over `path`, fsync of the directory. The temp file is removed on error.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = temp_path(dir);
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))?;
        sync_dir(dir);
        Ok(())
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        warn!(dir = %dir.display(), error = %e, "fsync of the directory failed");
    }
}

fn to_bytes(conf: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(conf).expect("a Value always serializes");
    out.push(b'\n');
    out
}

fn read_json(path: &Path) -> Result<Value, Error> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path: path.to_owned(),
        source,
    })
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644)
}

/// What [`ensure_entry`] or [`remove_entry`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The conf dir holds no CNI config yet.
    NoConfig,
    /// The file already was as wanted: nothing was written.
    Unchanged(PathBuf),
    /// The file was rewritten.
    Written(PathBuf),
    /// A `.conf` was converted: `to` was written, then `from` removed.
    Converted { from: PathBuf, to: PathBuf },
}

/// Makes the netfault entry the last plugin of the primary config file. Writes nothing when
/// it already is. A `.conf` (or single-plugin `.json`) becomes `<stem>.conflist`, written
/// before the `.conf` is removed. A file that is not valid JSON is left alone (an error).
pub fn ensure_entry(cfg: &Config) -> Result<Outcome, Error> {
    let Some(path) = primary_file(&cfg.cni_conf_dir)? else {
        return Ok(Outcome::NoConfig);
    };
    let conf = read_json(&path)?;
    let shape = |source| Error::Shape {
        path: path.clone(),
        source,
    };
    let entry = cfg.entry();
    if is_conflist(&conf) {
        return match insert(&conf, &entry).map_err(shape)? {
            None => Ok(Outcome::Unchanged(path)),
            Some(new) => {
                write_atomic(&path, &to_bytes(&new), mode_of(&path))?;
                Ok(Outcome::Written(path))
            }
        };
    }
    let list = convert_conf(&conf).map_err(shape)?;
    let new = insert(&list, &entry)
        .map_err(shape)?
        .expect("a converted conf has no netfault entry");
    let to = path.with_extension("conflist");
    write_atomic(&to, &to_bytes(&new), mode_of(&path))?;
    fs::remove_file(&path).map_err(io_err(&path))?;
    sync_dir(&cfg.cni_conf_dir);
    Ok(Outcome::Converted { from: path, to })
}

/// Removes the netfault entry from the primary config file (a converted `.conf` stays a
/// `.conflist` with the remaining plugins). Writes nothing when there is none.
pub fn remove_entry(cfg: &Config) -> Result<Outcome, Error> {
    let Some(path) = primary_file(&cfg.cni_conf_dir)? else {
        return Ok(Outcome::NoConfig);
    };
    let conf = read_json(&path)?;
    if !is_conflist(&conf) {
        return Ok(Outcome::Unchanged(path));
    }
    let new = remove(&conf).map_err(|source| Error::Shape {
        path: path.clone(),
        source,
    })?;
    match new {
        None => Ok(Outcome::Unchanged(path)),
        Some(new) => {
            write_atomic(&path, &to_bytes(&new), mode_of(&path))?;
            Ok(Outcome::Written(path))
        }
    }
}

/// Copies the plugin binary to `<bin dir>/netfault` atomically, mode 0755.
pub fn install_binary(cfg: &Config) -> Result<PathBuf, Error> {
    let dst = cfg.binary_path();
    let bytes = fs::read(&cfg.plugin_src).map_err(io_err(&cfg.plugin_src))?;
    write_atomic(&dst, &bytes, 0o755)?;
    Ok(dst)
}

/// Removes `<bin dir>/netfault`; a missing file is fine.
pub fn remove_binary(cfg: &Config) -> Result<(), Error> {
    let dst = cfg.binary_path();
    match fs::remove_file(&dst) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&dst)(e)),
        _ => Ok(()),
    }
}

/// Installs the binary, then the entry (the runtime must never see the entry without the
/// binary).
pub fn install(cfg: &Config) -> Result<Outcome, Error> {
    let bin = install_binary(cfg)?;
    info!(binary = %bin.display(), "plugin binary installed");
    let outcome = ensure_entry(cfg)?;
    log_outcome("insert", &outcome);
    Ok(outcome)
}

/// Removes the entry, then the binary.
pub fn uninstall(cfg: &Config) -> Result<(), Error> {
    let outcome = remove_entry(cfg)?;
    log_outcome("remove", &outcome);
    remove_binary(cfg)?;
    info!(binary = %cfg.binary_path().display(), "plugin binary removed");
    Ok(())
}

fn log_outcome(what: &str, outcome: &Outcome) {
    match outcome {
        Outcome::NoConfig => info!(what, "no CNI config in the conf dir yet"),
        Outcome::Unchanged(p) => debug!(what, file = %p.display(), "conflist already as wanted"),
        Outcome::Written(p) => info!(what, file = %p.display(), "conflist rewritten"),
        Outcome::Converted { from, to } => {
            info!(what, from = %from.display(), to = %to.display(), "conf converted to a conflist")
        }
    }
}

fn reconcile(cfg: &Config) {
    match ensure_entry(cfg) {
        Ok(outcome) => log_outcome("insert", &outcome),
        Err(e) => error!(error = %e, "cannot insert the netfault entry"),
    }
}

/// Installs, then watches the conf dir until `shutdown` fires (a message or a dropped
/// sender), re-inserting the entry [`DEBOUNCE`] after the last relevant event; then
/// uninstalls. A config file that cannot be edited (not JSON, bad shape) and errors while
/// watching are logged, not returned; the other install errors (inotify setup, the binary)
/// and uninstall errors are returned.
pub fn run(cfg: &Config, shutdown: Receiver<()>) -> Result<(), Error> {
    let dir = &cfg.cni_conf_dir;
    // Watch first, so no rewrite between install and watch is missed.
    let inotify =
        Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(|source| {
            Error::Inotify {
                path: dir.clone(),
                source,
            }
        })?;
    let mask = AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_DELETE;
    inotify
        .add_watch(dir.as_path(), mask)
        .map_err(|source| Error::Inotify {
            path: dir.clone(),
            source,
        })?;
    match install(cfg) {
        Ok(_) => {}
        // The binary must be there; a bad config file is only logged and retried on events.
        Err(e @ (Error::Json { .. } | Error::Shape { .. })) => {
            error!(error = %e, "cannot insert the netfault entry")
        }
        Err(e) => return Err(e),
    }
    info!(dir = %dir.display(), "watching the CNI conf dir");

    let mut last_event: Option<Instant> = None;
    loop {
        loop {
            match inotify.read_events() {
                Ok(events) => {
                    for ev in events {
                        let relevant = ev.name.as_deref().is_some_and(is_cni_config_name);
                        if relevant {
                            debug!(name = ?ev.name, mask = ?ev.mask, "conf dir event");
                            last_event = Some(Instant::now());
                        }
                        if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                            last_event = Some(Instant::now());
                        }
                    }
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    error!(error = %e, "reading inotify events failed");
                    break;
                }
            }
        }
        if let Some(t) = last_event {
            if t.elapsed() >= DEBOUNCE {
                last_event = None;
                reconcile(cfg);
            }
        }
        match shutdown.recv_timeout(Duration::from_millis(20)) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    info!("shutting down: removing the netfault entry and binary");
    uninstall(cfg)
}

#[cfg(test)]
extern crate self as netfault_install_cni;
#[cfg(test)]
mod testdirs;
#[cfg(test)]
mod tests;
