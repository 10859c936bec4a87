//! Measurements on the wire between pods: HTTP requests from a client pod
//! to server pods (busybox `nc` with a 1 s connect timeout, `GET /ok`,
//! success = an HTTP 200 answer), run in the client pod with `kubectl exec`.
//!
//! - [`reach`]: a few requests to each of several pods at once, counted;
//! - [`Stream`]: requests one after another (50 ms apart) for as long as it
//!   lives, each timed on this machine as its lines arrive, to time an
//!   effect's onset and to find gaps in a fault across an agent restart.
//!
//! What it owns: the probe processes (killed on drop).
//! What it must not do: decide what a result means: scenarios do.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::cluster::show;
use crate::{Error, Result, TestNs, HTTP_PORT};

/// The shell function `p IP LABEL`: one request, prints `LABEL ok` or
/// `LABEL fail`. busybox's `timeout` bounds a connection that opens but
/// never answers.
fn probe_fn() -> String {
    format!(
        "p() {{ r=$(printf 'GET /ok HTTP/1.0\\r\\n\\r\\n' | busybox timeout 3 nc -w 1 \"$1\" {HTTP_PORT} 2>/dev/null); \
         case \"$r\" in *' 200 '*) echo \"$2 ok\";; *) echo \"$2 fail\";; esac; }}"
    )
}

/// Counted answers of one target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reach {
    pub ok: u32,
    pub fail: u32,
}

impl Reach {
    /// Every request answered.
    pub fn passes(&self) -> bool {
        self.ok > 0 && self.fail == 0
    }
    /// No request answered.
    pub fn blocked(&self) -> bool {
        self.fail > 0 && self.ok == 0
    }
}

/// `tries` requests from `client` to each `(name, ip)` of `targets`, all at
/// once; the counts by name.
pub fn reach(
    ns: &TestNs,
    client: &str,
    targets: &[(&str, &str)],
    tries: u32,
) -> Result<BTreeMap<String, Reach>> {
    let out = ns.exec(client, &["sh", "-c", &reach_script(targets, tries)])?;
    parse_reach(&out, targets, tries).map_err(|e| Error::Other(format!("probe from {client}: {e}")))
}

/// The shell script of [`reach`]: prints `NAME ok|fail` per request.
pub fn reach_script(targets: &[(&str, &str)], tries: u32) -> String {
    let mut script = probe_fn();
    script.push('\n');
    for _ in 0..tries {
        for (name, ip) in targets {
            script.push_str(&format!("p {ip} {name} &\n"));
        }
    }
    script.push_str("wait\n");
    script
}

/// Counts [`reach_script`]'s output; every request must have answered.
pub fn parse_reach(
    out: &str,
    targets: &[(&str, &str)],
    tries: u32,
) -> std::result::Result<BTreeMap<String, Reach>, String> {
    let mut counts: BTreeMap<String, Reach> = targets
        .iter()
        .map(|(n, _)| (n.to_string(), Reach::default()))
        .collect();
    for line in out.lines() {
        let mut w = line.split_whitespace();
        let (Some(name), Some(verdict)) = (w.next(), w.next()) else {
            continue;
        };
        if let Some(r) = counts.get_mut(name) {
            match verdict {
                "ok" => r.ok += 1,
                _ => r.fail += 1,
            }
        }
    }
    for (name, r) in &counts {
        if r.ok + r.fail != tries {
            return Err(format!(
                "{name}: {} answers of {tries} in the output {out:?}",
                r.ok + r.fail
            ));
        }
    }
    Ok(counts)
}

/// The shell script of a [`Stream`]: `s` before each request, `r ok` or
/// `r fail` after it, 50 ms between requests, forever.
pub fn stream_script(ip: &str) -> String {
    format!(
        "{}\nwhile :; do echo s; p {ip} r; busybox sleep 0.05; done",
        probe_fn()
    )
}

/// One request of a [`Stream`]: when it started and ended (on this
/// machine's clock, as its lines arrived) and whether it was answered.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub start: Instant,
    pub end: Instant,
    pub ok: bool,
}

/// Requests to one pod, one after another, until dropped.
pub struct Stream {
    child: Child,
    rx: Receiver<(Instant, String)>,
    started: Option<Instant>,
    /// Every finished request so far.
    pub samples: Vec<Sample>,
    what: String,
}

impl Stream {
    /// Starts requests from `client` to `ip`.
    pub fn start(ns: &TestNs, client: &str, ip: &str) -> Result<Stream> {
        let script = stream_script(ip);
        let mut cmd = Command::new("kubectl");
        cmd.args(["-n", &ns.name, "exec", client, "--", "sh", "-c", &script]);
        let what = show(&cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| Error::Command {
                cmd: what.clone(),
                msg: format!("cannot start: {e}"),
            })?;
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            return Err(Error::Other(format!("{what}: no stdout")));
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Ok(Stream {
            child,
            rx,
            started: None,
            samples: vec![],
            what,
        })
    }

    /// Takes in the lines that arrive until `until`.
    pub fn pump(&mut self, until: Instant) -> Result<()> {
        loop {
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            match self.rx.recv_timeout(until - now) {
                Ok((at, line)) => self.take(at, &line),
                Err(RecvTimeoutError::Timeout) => return Ok(()),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.try_wait().ok().flatten();
                    return Err(Error::Other(format!(
                        "the probe stream ended ({}): {status:?}",
                        self.what
                    )));
                }
            }
        }
    }

    fn take(&mut self, at: Instant, line: &str) {
        match line.trim() {
            "s" => self.started = Some(at),
            "r ok" | "r fail" => {
                if let Some(start) = self.started.take() {
                    self.samples.push(Sample {
                        start,
                        end: at,
                        ok: line.trim() == "r ok",
                    });
                }
            }
            _ => {}
        }
    }

    /// Waits (up to `timeout`) until two requests in a row that ended after
    /// `since` had the answer `ok`; returns when the first of them started
    /// (not before `since`). A request that began before `since` counts: the
    /// change may have landed while it was under way.
    pub fn until(&mut self, ok: bool, since: Instant, timeout: Duration) -> Result<Instant> {
        let deadline = since + timeout;
        loop {
            let after: Vec<&Sample> = self.samples.iter().filter(|s| s.end > since).collect();
            if let Some(w) = after.windows(2).find(|w| w[0].ok == ok && w[1].ok == ok) {
                return Ok(w[0].start.max(since));
            }
            if Instant::now() > deadline {
                let seen: String = after.iter().map(|s| if s.ok { '+' } else { '-' }).collect();
                return Err(Error::Other(format!(
                    "no two {} requests in a row within {timeout:?} (seen since: {seen})",
                    if ok { "answered" } else { "unanswered" }
                )));
            }
            self.pump(
                (Instant::now() + Duration::from_millis(200))
                    .min(deadline + Duration::from_millis(1)),
            )?;
        }
    }

    /// The longest span, between `from` and `to`, covered by consecutive
    /// requests whose answer was `ok` (from the first one's start to the
    /// last one's end), and how many requests ended in the window.
    pub fn longest_run(&self, ok: bool, from: Instant, to: Instant) -> (Duration, usize) {
        let inside: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.start >= from && s.end <= to)
            .collect();
        let mut longest = Duration::ZERO;
        let mut run_start: Option<Instant> = None;
        for s in &inside {
            if s.ok == ok {
                let start = *run_start.get_or_insert(s.start);
                longest = longest.max(s.end - start);
            } else {
                run_start = None;
            }
        }
        (longest, inside.len())
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    //! The probe scripts run as they run in the cluster: `/bin/sh` of the
    //! box image (chrooted into its unpacked layer) against its `httpd`, in a
    //! throwaway netns (`unshare --net`), as root.

    use super::*;
    use std::path::Path;

    /// The box image's rootfs, unpacked into `dir`.
    fn box_root(dir: &Path) -> std::path::PathBuf {
        let archive = e2e_cri::box_image().expect("the box image");
        let oci = dir.join("oci");
        let root = dir.join("root");
        std::fs::create_dir_all(&oci).expect("mkdir");
        std::fs::create_dir_all(&root).expect("mkdir");
        crate::cluster::run(
            Command::new("tar")
                .arg("xf")
                .arg(&archive)
                .arg("-C")
                .arg(&oci),
        )
        .expect("untar the layout");
        for blob in std::fs::read_dir(oci.join("blobs/sha256"))
            .expect("blobs")
            .flatten()
        {
            let listing = crate::cluster::run(Command::new("tar").arg("tf").arg(blob.path()));
            if listing.is_ok_and(|l| l.lines().any(|l| l.ends_with("bin/busybox"))) {
                crate::cluster::run(
                    Command::new("tar")
                        .arg("xf")
                        .arg(blob.path())
                        .arg("-C")
                        .arg(&root),
                )
                .expect("untar the layer");
            }
        }
        assert!(root.join("bin/sh").exists(), "the layer has /bin/sh");
        // A container runtime gives every container a /dev/null.
        crate::cluster::run(
            Command::new("mknod")
                .arg(root.join("dev/null"))
                .args(["c", "1", "3"]),
        )
        .expect("mknod dev/null");
        root
    }

    /// Runs `script` in the box rootfs with a server (the pods' own command)
    /// on 127.0.0.1:HTTP_PORT in a fresh netns; its stdout.
    fn in_box(root: &Path, script: &str) -> String {
        let server = format!("echo ok > /tmp/ok && exec httpd -f -p {HTTP_PORT} -h /tmp");
        // Until the server answers (5 s at most), then the script.
        let wait = format!(
            "{}\ni=0; until [ \"$(p 127.0.0.1 w)\" = 'w ok' ] || [ $i -gt 100 ]; do i=$((i+1)); busybox sleep 0.05; done",
            probe_fn()
        );
        let outer = format!(
            "chroot {r} /bin/ip link set lo up && (chroot {r} /bin/sh -c '{server}' & echo $! > {r}/srv.pid) \\
             && chroot {r} /bin/sh -c \"$WAIT\" && chroot {r} /bin/sh -c \"$PROBE\"; kill $(cat {r}/srv.pid)",
            r = root.display()
        );
        crate::cluster::run(
            Command::new("unshare")
                .args(["--net", "sh", "-c", &outer])
                .env("WAIT", wait)
                .env("PROBE", script)
                .env("PATH", "/bin:/usr/bin:/sbin:/usr/sbin"),
        )
        .expect("the probe script runs")
    }

    #[test]
    fn reach_counts_answers_and_refusals() {
        testbed::require_root!();
        let dir = testbed::TempDir::new("nfkprobe").expect("temp dir");
        let root = box_root(dir.path());
        // 127.0.0.1 answers; 198.18.0.1 has no route in the fresh netns.
        let targets = [("up", "127.0.0.1"), ("down", "198.18.0.1")];
        let out = in_box(&root, &reach_script(&targets, 3));
        let got = parse_reach(&out, &targets, 3).expect("every request reported");
        assert_eq!(got["up"], Reach { ok: 3, fail: 0 }, "{out}");
        assert!(got["up"].passes());
        assert_eq!(got["down"], Reach { ok: 0, fail: 3 }, "{out}");
        assert!(got["down"].blocked());
        assert!(
            parse_reach("up ok\n", &targets, 3).is_err(),
            "missing answers are an error"
        );
    }

    #[test]
    fn stream_script_alternates_start_and_result() {
        testbed::require_root!();
        let dir = testbed::TempDir::new("nfkstrm").expect("temp dir");
        let root = box_root(dir.path());
        let script = format!(
            "busybox timeout 1 sh -c '{}'",
            stream_script("127.0.0.1").replace('\'', "'\\''")
        );
        let out = in_box(&root, &script);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines.len() >= 6, "several requests in 1 s: {out}");
        for pair in lines.chunks(2).filter(|c| c.len() == 2) {
            assert_eq!(pair, ["s", "r ok"], "{out}");
        }
    }
}
