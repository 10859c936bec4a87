//! nft commands run in process through libnftables (`libnftables.so.1`,
//! Debian package `libnftables1`, which the `nft` binary itself uses),
//! loaded at run time with `dlopen`: a build never needs the library, and
//! where it cannot be loaded the `nft` binary runs instead, as before.
//!
//! Why: an `nft` run is a fork, an exec, the loading of libnftables and a
//! JSON parse, about 4 ms on an idle machine; in process the same command
//! costs the JSON parse and the netlink round trip.
//!
//! Two commands, each on either path, with the same results:
//! - [`apply_json`]: a JSON payload (`{"nftables": [...]}`) as one
//!   transaction, as `nft -j -f -` does;
//! - [`list_json`]: a listing (`list ruleset inet`) as JSON, as `nft -j
//!   list ...` prints it.
//!
//! Facts of libnftables (checked in the 1.0.6 source) this relies on:
//! - `nft_ctx_new(NFT_CTX_DEFAULT)` opens the context's netlink socket
//!   there and then, so a context belongs to the netns of the thread that
//!   created it. A context is made per call, on the calling thread: run
//!   inside a pod netns (`Netns::run`), a call acts on that netns;
//! - with the output flag `NFT_CTX_OUTPUT_JSON` (what `nft -j` sets, and
//!   nothing else), `nft_run_cmd_from_buffer` parses the buffer as JSON
//!   first and as nft's language when it is not JSON (1.0.7 added an input
//!   flag; the output flag still selects JSON input there);
//! - it is not thread-safe: the interface cache (`iface.c`), the JSON
//!   parser's input descriptor (`parser_json.c`) and the first context's
//!   global init (`nft_ctx_new`) are process globals. Every call holds one
//!   process-wide lock, from the context's creation to its release;
//! - `nft_ctx_new` exits the process (`netlink_init_error`) when its
//!   netlink socket cannot be opened. A call first opens (and closes) such
//!   a socket itself and fails with an error instead;
//! - the context's socket has no `FD_CLOEXEC` for as long as the call
//!   lasts (child processes spawned meanwhile on another thread inherit
//!   it; the agent's holders mark everything above their own descriptors
//!   close-on-exec);
//! - the last close of that socket, after a transaction that deleted
//!   objects, waits for an RCU grace period (10-13 ms here): a call keeps a
//!   duplicate of the socket and closes it later, on another thread
//!   (`nfnetlink::close_later`).
//!
//! `NETFAULT_LIBNFTABLES` chooses, read once: unset, the library by its
//! soname; `off` (or `0`, or empty), the `nft` binary; anything else, the
//! path (or name) of the library to load.
//!
//! What it must not do: enter a netns (callers do), or build payloads
//! (`nft` does).

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::os::fd::AsRawFd;
use std::sync::{Mutex, OnceLock, PoisonError};

/// The library's soname.
pub const SONAME: &str = "libnftables.so.1";
/// The environment variable that chooses the path (module docs).
pub const ENV: &str = "NETFAULT_LIBNFTABLES";

/// `NFT_CTX_DEFAULT`: a context with its netlink socket.
const NFT_CTX_DEFAULT: u32 = 0;
/// `NFT_CTX_OUTPUT_JSON`: JSON output (and input, see the module docs).
const NFT_CTX_OUTPUT_JSON: c_uint = 1 << 4;

/// What an nft command did not do. `what` names the command (`applying
/// ruleset`, `list ruleset inet`); `message` is nft's own error text.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("{what} (libnftables): {message}")]
    Library { what: String, message: String },
    #[error("{what} (nft binary): {message}")]
    Binary { what: String, message: String },
}

impl NftError {
    fn library(what: &str, message: impl Into<String>) -> NftError {
        NftError::Library {
            what: what.to_string(),
            message: message.into(),
        }
    }
}

/// How nft commands run in this process.
#[derive(Debug)]
pub enum Engine {
    /// In process, through the loaded library.
    Library(Lib),
    /// Through the `nft` binary; `why` the library is not used.
    Binary { why: String },
}

static ENGINE: OnceLock<Engine> = OnceLock::new();

/// The engine of this process, chosen on first use (module docs).
pub fn engine() -> &'static Engine {
    ENGINE.get_or_init(|| Engine::choose(std::env::var(ENV).ok().as_deref()))
}

/// One line on the path in use, for the log and the capabilities.
pub fn describe() -> String {
    engine().describe()
}

/// Applies a JSON payload (`{"nftables": [...]}`) as one transaction, in
/// the calling thread's netns.
pub fn apply_json(payload: &str) -> Result<(), NftError> {
    engine().apply_json(payload)
}

/// Runs a listing (`["list", "ruleset", "inet"]`) in the calling thread's
/// netns and returns its JSON.
pub fn list_json(args: &[&str]) -> Result<String, NftError> {
    engine().list_json(args)
}

impl Engine {
    /// The engine `NETFAULT_LIBNFTABLES` (`setting`) asks for.
    pub fn choose(setting: Option<&str>) -> Engine {
        let name = match setting {
            None => SONAME,
            Some("" | "0" | "off") => {
                return Engine::Binary {
                    why: format!("{ENV}=off"),
                }
            }
            Some(name) => name,
        };
        match Lib::load(name) {
            Ok(lib) => Engine::Library(lib),
            Err(why) => Engine::Binary { why },
        }
    }

    /// Whether commands run in process.
    pub fn in_process(&self) -> bool {
        matches!(self, Engine::Library(_))
    }

    pub fn describe(&self) -> String {
        match self {
            Engine::Library(lib) => format!("libnftables in process ({})", lib.name),
            Engine::Binary { why } => format!("the nft binary ({why})"),
        }
    }

    pub fn apply_json(&self, payload: &str) -> Result<(), NftError> {
        const WHAT: &str = "applying ruleset";
        match self {
            Engine::Library(lib) => lib.run(WHAT, payload).map(drop),
            Engine::Binary { .. } => nftables::helper::apply_ruleset_raw(
                payload,
                nftables::helper::DEFAULT_NFT,
                nftables::helper::DEFAULT_ARGS,
            )
            .map(drop)
            .map_err(|e| binary_error(WHAT, e)),
        }
    }

    pub fn list_json(&self, args: &[&str]) -> Result<String, NftError> {
        let cmd = args.join(" ");
        match self {
            Engine::Library(lib) => lib.run(&cmd, &cmd),
            Engine::Binary { .. } => {
                nftables::helper::get_current_ruleset_raw(nftables::helper::DEFAULT_NFT, args)
                    .map_err(|e| binary_error(&cmd, e))
            }
        }
    }
}

/// The crate's error, with nft's own message (its `Display` leaves it out).
fn binary_error(what: &str, e: nftables::helper::NftablesError) -> NftError {
    use nftables::helper::NftablesError as E;
    let message = match &e {
        E::NftFailed { stderr, .. } if !stderr.trim().is_empty() => {
            format!("{e}: {}", stderr.trim())
        }
        _ => e.to_string(),
    };
    NftError::Binary {
        what: what.to_string(),
        message,
    }
}

type NftCtx = c_void;

/// The loaded library and the functions netfault calls.
pub struct Lib {
    /// What was loaded (a soname or a path).
    name: String,
    ctx_new: unsafe extern "C" fn(u32) -> *mut NftCtx,
    ctx_free: unsafe extern "C" fn(*mut NftCtx),
    output_set_flags: unsafe extern "C" fn(*mut NftCtx, c_uint),
    buffer_output: unsafe extern "C" fn(*mut NftCtx) -> c_int,
    buffer_error: unsafe extern "C" fn(*mut NftCtx) -> c_int,
    run_cmd_from_buffer: unsafe extern "C" fn(*mut NftCtx, *const c_char) -> c_int,
    get_output_buffer: unsafe extern "C" fn(*mut NftCtx) -> *const c_char,
    get_error_buffer: unsafe extern "C" fn(*mut NftCtx) -> *const c_char,
    /// Keeps the functions above mapped (never unloaded before them).
    _lib: libloading::Library,
}

impl std::fmt::Debug for Lib {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lib").field("name", &self.name).finish()
    }
}

/// Serializes every use of the library (module docs: not thread-safe).
static LOCK: Mutex<()> = Mutex::new(());

/// Copies a C string the library owns (`None` for NULL).
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string valid for the call.
unsafe fn owned(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// A context, freed on drop.
struct Ctx<'a> {
    lib: &'a Lib,
    ptr: *mut NftCtx,
}

impl Drop for Ctx<'_> {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `nft_ctx_new` and is freed once, here.
        unsafe { (self.lib.ctx_free)(self.ptr) }
    }
}

/// The function `sym` of `lib` (loaded as `name`, for the error).
///
/// # Safety
/// `T` is the function's type; the pointer is used only while `lib` is
/// loaded (a [`Lib`] holds both).
unsafe fn func<T: Copy>(lib: &libloading::Library, name: &str, sym: &str) -> Result<T, String> {
    // SAFETY: the caller's contract.
    unsafe { lib.get::<T>(sym) }
        .map(|f| *f)
        .map_err(|e| format!("{name} lacks {sym}: {e}"))
}

impl Lib {
    /// Loads the library `name` (a soname or a path) and finds its
    /// functions; the error says what is missing.
    pub fn load(name: &str) -> Result<Lib, String> {
        // Never unloaded (RTLD_NODELETE): its dependencies (libxtables,
        // gmp, jansson) keep process state that outlives a context.
        let flags = libc::RTLD_NOW | libc::RTLD_LOCAL | libc::RTLD_NODELETE;
        // SAFETY: libnftables' initialisers only set up its own state.
        let lib: libloading::Library =
            unsafe { libloading::os::unix::Library::open(Some(name), flags) }
                .map_err(|e| format!("cannot load {name}: {e}"))?
                .into();
        // SAFETY (each `func`): the type is the function's signature in
        // libnftables.h (the same since soname 1, nft 0.9.1).
        unsafe {
            Ok(Lib {
                name: name.to_string(),
                ctx_new: func(&lib, name, "nft_ctx_new")?,
                ctx_free: func(&lib, name, "nft_ctx_free")?,
                output_set_flags: func(&lib, name, "nft_ctx_output_set_flags")?,
                buffer_output: func(&lib, name, "nft_ctx_buffer_output")?,
                buffer_error: func(&lib, name, "nft_ctx_buffer_error")?,
                run_cmd_from_buffer: func(&lib, name, "nft_run_cmd_from_buffer")?,
                get_output_buffer: func(&lib, name, "nft_ctx_get_output_buffer")?,
                get_error_buffer: func(&lib, name, "nft_ctx_get_error_buffer")?,
                _lib: lib,
            })
        }
    }

    /// Runs `cmd` (JSON or nft's language) with JSON output on a context of
    /// the calling thread's netns; returns the output.
    fn run(&self, what: &str, cmd: &str) -> Result<String, NftError> {
        let cmd = CString::new(cmd)
            .map_err(|_| NftError::library(what, "the command holds a NUL byte"))?;
        let _one = LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        // nft_ctx_new exits the process when it cannot open its socket. The
        // probe also shows where that socket will land: the lowest free
        // descriptor, which the probe takes and gives back.
        let probe = crate::nfnetlink::netfilter_socket().map_err(|e| {
            NftError::library(what, format!("cannot open a netfilter netlink socket: {e}"))
        })?;
        let expected = probe.as_raw_fd();
        drop(probe);
        // SAFETY: NFT_CTX_DEFAULT is a valid flag; the result is checked.
        let ptr = unsafe { (self.ctx_new)(NFT_CTX_DEFAULT) };
        if ptr.is_null() {
            return Err(NftError::library(what, "nft_ctx_new failed"));
        }
        let ctx = Ctx { lib: self, ptr };
        // A second hold on the context's socket (if it is where expected:
        // another thread may have taken that number meanwhile), so that
        // freeing the context does not close it: the last close waits for
        // the RCU grace period of what the transaction deleted
        // (`nfnetlink::close_later`), which happens off this path instead.
        let kept = crate::nfnetlink::dup_fresh_netfilter_socket(expected);
        // SAFETY: a live context (`ctx`), used on this thread only, under
        // LOCK; the buffers are copied before the context goes.
        let result = unsafe {
            (self.output_set_flags)(ctx.ptr, NFT_CTX_OUTPUT_JSON);
            if (self.buffer_output)(ctx.ptr) != 0 || (self.buffer_error)(ctx.ptr) != 0 {
                Err(NftError::library(what, "cannot buffer nft's output"))
            } else {
                let rc = (self.run_cmd_from_buffer)(ctx.ptr, cmd.as_ptr());
                let out = owned((self.get_output_buffer)(ctx.ptr)).unwrap_or_default();
                let err = owned((self.get_error_buffer)(ctx.ptr)).unwrap_or_default();
                match (rc, err.trim()) {
                    (0, _) => Ok(out),
                    (rc, "") => Err(NftError::library(
                        what,
                        format!("failed (code {rc}) without a message"),
                    )),
                    (_, m) => Err(NftError::library(what, m)),
                }
            }
        };
        drop(ctx);
        if let Some(socket) = kept {
            crate::nfnetlink::close_later(socket);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::Netns;
    use serde_json::Value;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn off_chooses_the_binary_and_says_so() {
        for setting in ["off", "0", ""] {
            let e = Engine::choose(Some(setting));
            assert!(!e.in_process());
            assert_eq!(e.describe(), "the nft binary (NETFAULT_LIBNFTABLES=off)");
        }
    }

    #[test]
    fn a_missing_library_falls_back_to_the_binary_naming_it() {
        let e = Engine::choose(Some("libnftables-netfault-absent.so.9"));
        assert!(!e.in_process());
        let d = e.describe();
        assert!(
            d.starts_with("the nft binary (cannot load libnftables-netfault-absent.so.9"),
            "{d}"
        );
    }

    #[test]
    fn a_library_without_the_functions_falls_back_naming_the_first() {
        let why = Lib::load("libc.so.6").expect_err("libc has no nft_ctx_new");
        assert!(why.contains("libc.so.6 lacks nft_ctx_new"), "{why}");
        let e = Engine::choose(Some("libc.so.6"));
        assert!(!e.in_process(), "{}", e.describe());
    }

    /// The library's path, or `None` (with a note) where it is absent.
    fn lib() -> Option<Lib> {
        match Lib::load(SONAME) {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("skipped: {e}");
                None
            }
        }
    }

    #[test]
    fn the_library_loads_by_its_soname() {
        let Some(lib) = lib() else { return };
        let e = Engine::Library(lib);
        assert!(e.in_process());
        assert_eq!(e.describe(), "libnftables in process (libnftables.so.1)");
    }

    #[test]
    fn a_nul_byte_is_refused_before_the_library() {
        let Some(lib) = lib() else { return };
        let e = lib
            .run("applying ruleset", "list\0ruleset")
            .expect_err("NUL");
        assert_eq!(
            e.to_string(),
            "applying ruleset (libnftables): the command holds a NUL byte"
        );
    }

    /// A fresh netns, held by a thread for as long as the value lives.
    struct FreshNetns {
        ns: Netns,
        done: Option<std::sync::mpsc::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl FreshNetns {
        fn new() -> FreshNetns {
            let (tx, rx) = std::sync::mpsc::channel();
            let (done, wait) = std::sync::mpsc::channel::<()>();
            let thread = std::thread::spawn(move || {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
                let path = format!(
                    "/proc/{}/task/{}/ns/net",
                    std::process::id(),
                    nix::unistd::gettid()
                );
                tx.send(Netns::open(path.as_ref()).expect("opens its netns"))
                    .expect("sends");
                let _ = wait.recv();
            });
            let ns = rx.recv().expect("a fresh netns");
            FreshNetns {
                ns,
                done: Some(done),
                thread: Some(thread),
            }
        }
    }

    impl Drop for FreshNetns {
        fn drop(&mut self) {
            drop(self.done.take());
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn tables(listing: &str) -> Vec<String> {
        let v: Value = serde_json::from_str(listing).expect("nft lists JSON");
        v["nftables"]
            .as_array()
            .expect("an nftables array")
            .iter()
            .filter_map(|o| o["table"]["name"].as_str().map(String::from))
            .collect()
    }

    fn payload(table: &str) -> String {
        serde_json::json!({"nftables": [
            {"add": {"table": {"family": "inet", "name": table}}},
            {"add": {"chain": {"family": "inet", "table": table, "name": "c"}}},
            {"add": {"rule": {"family": "inet", "table": table, "chain": "c",
                "expr": [{"accept": null}]}}},
        ]})
        .to_string()
    }

    fn unique(prefix: &str) -> String {
        format!("{prefix}_{}_{}", std::process::id(), rand_suffix())
    }

    fn rand_suffix() -> u64 {
        use std::hash::{BuildHasher, RandomState};
        RandomState::new().hash_one(std::time::SystemTime::now())
    }

    /// Removes `table` from the host netns if a failed check put it there.
    fn scrub_host(table: &str) {
        let _ = Engine::Binary { why: String::new() }.apply_json(
            &serde_json::json!({"nftables": [
                {"add": {"table": {"family": "inet", "name": table}}},
                {"delete": {"table": {"family": "inet", "name": table}}},
            ]})
            .to_string(),
        );
    }

    /// Root only: a table applied in process from a thread inside a fresh
    /// netns (entered through `Netns::run`, as the agent does) is there, is
    /// listed with its rule's handle, and the host netns does not have it.
    #[test]
    fn in_process_calls_act_on_the_calling_threads_netns() {
        if !is_root() {
            eprintln!("skipped: requires root");
            return;
        }
        let Some(lib) = lib() else { return };
        let e = Engine::Library(lib);
        let table = unique("nflib");
        let pod = FreshNetns::new();
        let (applied, listed) = pod
            .ns
            .run(|_| {
                let applied = e.apply_json(&payload(&table));
                (applied, e.list_json(&["list", "ruleset", "inet"]))
            })
            .expect("runs in the netns");
        let host = e.list_json(&["list", "ruleset", "inet"]);
        let host_has = host.as_ref().map(|l| tables(l).contains(&table));
        if host_has.as_ref().is_ok_and(|h| *h) {
            scrub_host(&table);
        }
        applied.expect("applies in the pod netns");
        let listed = listed.expect("lists in the pod netns");
        assert_eq!(tables(&listed), vec![table.clone()], "{listed}");
        let v: Value = serde_json::from_str(&listed).expect("JSON");
        let rule = v["nftables"]
            .as_array()
            .and_then(|a| a.iter().find_map(|o| o.get("rule")))
            .unwrap_or_else(|| panic!("no rule listed: {listed}"));
        assert!(rule["handle"].as_u64().is_some(), "{rule}");
        assert!(
            !host_has.expect("lists the host netns"),
            "the host netns got the table"
        );
    }

    /// Root only: the library and the binary list the same ruleset alike
    /// (the agent parses either), and both fail naming the command.
    #[test]
    fn the_library_and_the_binary_agree() {
        let nft = std::process::Command::new("nft").arg("--version").output();
        if !is_root() || !nft.is_ok_and(|o| o.status.success()) {
            eprintln!("skipped: requires root and nft");
            return;
        }
        let Some(lib) = lib() else { return };
        let (inproc, binary) = (Engine::Library(lib), Engine::Binary { why: "test".into() });
        let table = unique("nfcmp");
        let pod = FreshNetns::new();
        let (a, b, errs) = pod
            .ns
            .run(|_| {
                inproc.apply_json(&payload(&table)).expect("applies");
                let a = inproc.list_json(&["list", "ruleset", "inet"]);
                let b = binary.list_json(&["list", "ruleset", "inet"]);
                // Deleting a table that is not there fails on both paths.
                let gone = serde_json::json!({"nftables": [
                    {"delete": {"table": {"family": "inet", "name": "netfault_absent"}}}]})
                .to_string();
                (a, b, (inproc.apply_json(&gone), binary.apply_json(&gone)))
            })
            .expect("runs in the netns");
        let strip = |s: String| -> Value {
            let mut v: Value = serde_json::from_str(&s).expect("JSON");
            if let Some(a) = v["nftables"].as_array_mut() {
                a.retain(|o| o.get("metainfo").is_none());
            }
            v
        };
        assert_eq!(
            strip(a.expect("library lists")),
            strip(b.expect("binary lists"))
        );
        let lib_err = errs.0.expect_err("no such table").to_string();
        assert!(
            lib_err.starts_with("applying ruleset (libnftables): ")
                && lib_err.contains("No such file or directory"),
            "{lib_err}"
        );
        // (The crate leaves the binary's stderr to the agent's.)
        let bin_err = errs.1.expect_err("no such table").to_string();
        assert!(
            bin_err.starts_with("applying ruleset (nft binary): "),
            "{bin_err}"
        );
    }

    /// Root only: calls from several threads, each in its own fresh netns,
    /// at once: each netns gets its own table and no other (the lock
    /// serializes them; each context is its thread's).
    #[test]
    fn concurrent_calls_each_act_on_their_own_netns() {
        if !is_root() {
            eprintln!("skipped: requires root");
            return;
        }
        let Some(lib) = lib() else { return };
        let e = Engine::Library(lib);
        let pods: Vec<(FreshNetns, String)> = (0..4)
            .map(|i| (FreshNetns::new(), unique(&format!("nfpar{i}"))))
            .collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = pods
                .iter()
                .map(|(pod, table)| {
                    let e = &e;
                    s.spawn(move || {
                        pod.ns
                            .run(|_| {
                                for _ in 0..10 {
                                    e.apply_json(&payload(table))?;
                                }
                                e.list_json(&["list", "ruleset", "inet"])
                            })
                            .expect("runs in the netns")
                    })
                })
                .collect();
            for ((_, table), h) in pods.iter().zip(handles) {
                let listed = h.join().expect("joins").expect("applies and lists");
                assert_eq!(tables(&listed), vec![table.clone()], "{listed}");
                let rules = listed.matches("\"rule\"").count();
                assert_eq!(rules, 10, "ten transactions, ten rules: {listed}");
            }
        });
    }
}
