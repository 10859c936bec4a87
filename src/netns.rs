//! Named network namespaces, without `ip`.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

use crate::error::{Context, Error, Result};

/// Where named namespaces live, as `ip netns` and containerd keep them.
pub const NETNS_DIR: &str = "/var/run/netns";

/// A named network namespace bound at `/var/run/netns/NAME`, with `lo` up.
/// Dropping it unmounts (lazily) and removes the file; the kernel frees the
/// namespace when nothing else holds it.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// Creates the namespace: `unshare(CLONE_NEWNET)` on a fresh thread, then a
    /// bind mount of that thread's `/proc/thread-self/ns/net` onto the file.
    pub fn create(name: &str) -> Result<Netns> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(Error::Other(format!("invalid netns name {name:?}")));
        }
        std::fs::create_dir_all(NETNS_DIR).ctx(|| format!("creating {NETNS_DIR}"))?;
        let path = Path::new(NETNS_DIR).join(name);
        File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .ctx(|| format!("creating {}", path.display()))?;
        // From here on, Drop cleans up whatever part got done.
        let ns = Netns {
            name: name.to_string(),
            path,
        };
        let target = ns.path.clone();
        let made = std::thread::spawn(move || -> Result<()> {
            unshare(CloneFlags::CLONE_NEWNET).ctx(|| "unshare(CLONE_NEWNET)".into())?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .ctx(|| format!("bind-mounting the new netns onto {}", target.display()))?;
            set_link_up("lo")
        })
        .join();
        match made {
            Ok(r) => r?,
            Err(_) => return Err(Error::Other("netns creation thread panicked".into())),
        }
        Ok(ns)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` inside this namespace on a fresh OS thread (see [`in_netns`]).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&self.path, f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // EINVAL: not mounted (creation failed half-way).
        if let Err(e) = umount2(&self.path, MntFlags::MNT_DETACH) {
            if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
                eprintln!("testbed: umount {}: {e}", self.path.display());
            }
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("testbed: remove {}: {e}", self.path.display());
            }
        }
    }
}

/// Removes namespaces in [`NETNS_DIR`] left by dead test processes (killed
/// before their drops ran): names starting with one of `prefixes` (each
/// exactly 5 characters, as given to [`crate::unique_name`]) whose encoded
/// pid no longer exists. Returns how many were removed. Namespaces of live
/// processes are never touched.
pub fn remove_stale_netns(prefixes: &[&str]) -> usize {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !prefixes.iter().any(|p| p.len() == 5 && name.starts_with(p)) {
            continue;
        }
        let Some(pid) = crate::owner_pid(&name) else {
            continue;
        };
        if pid == 0 || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        drop(Netns {
            name: name.clone(),
            path: e.path(),
        });
        removed += 1;
    }
    removed
}

/// Runs `f` on a fresh OS thread that has first entered the network namespace
/// at `path`. The calling thread's namespace is never changed. A socket opened
/// inside `f` stays in that namespace and can be returned and used anywhere.
/// A panic in `f` is propagated.
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = File::open(path).ctx(|| format!("opening netns {}", path.display()))?;
    std::thread::scope(|s| {
        let handle = s.spawn(move || -> Result<T> {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .ctx(|| format!("setns into {}", path.display()))?;
            drop(file);
            Ok(f())
        });
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Sets IFF_UP on an interface of the calling thread's netns (ioctl SIOCSIFFLAGS).
pub(crate) fn set_link_up(ifname: &str) -> Result<()> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .ctx(|| "socket for SIOCSIFFLAGS".into())?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if ifname.len() >= ifr.ifr_name.len() {
        return Err(Error::Other(format!("interface name {ifname:?} too long")));
    }
    for (dst, src) in ifr.ifr_name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: valid socket fd and a properly initialised ifreq for these requests.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            return Err(Error::Io {
                context: format!("SIOCGIFFLAGS {ifname}"),
                source: std::io::Error::last_os_error(),
            });
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) < 0 {
            return Err(Error::Io {
                context: format!("SIOCSIFFLAGS {ifname}"),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

fn cstring(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Other(format!("path {} holds a NUL byte", p.display())))
}

/// Spawns `cmd` inside the network namespace at `netns` (`setns` between
/// fork and exec). With `binds` (source, target), the child also gets a
/// mount namespace of its own, with `/` made a recursive slave (nothing it
/// mounts propagates back), and each source bind-mounted over its target:
/// only that process sees them.
pub fn spawn_in_netns(
    netns: &Path,
    cmd: &mut Command,
    binds: &[(PathBuf, PathBuf)],
) -> Result<Child> {
    let ns = File::open(netns).ctx(|| format!("opening netns {}", netns.display()))?;
    let ns_fd = ns.as_raw_fd();
    let binds: Vec<(CString, CString)> = binds
        .iter()
        .map(|(s, t)| Ok((cstring(s)?, cstring(t)?)))
        .collect::<Result<_>>()?;
    // SAFETY: between fork and exec the closure only makes raw syscalls
    // (setns, unshare, mount: async-signal-safe) on an fd that stays open
    // until spawn returns and on C strings built before the fork; it
    // allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if binds.is_empty() {
                return Ok(());
            }
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            for (source, target) in &binds {
                if libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .ctx(|| format!("executing {:?}", cmd.get_program()))?;
    drop(ns);
    Ok(child)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_enter_and_sweep() {
        if !crate::is_root() {
            eprintln!("skipped: requires root");
            return;
        }
        let ns = Netns::create(&crate::unique_name("nftst")).expect("netns");
        let mine = std::fs::metadata("/proc/thread-self/ns/net").map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.ino()
        });
        let inside = ns
            .run(|| {
                use std::os::unix::fs::MetadataExt;
                let ino = std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino());
                // lo is up: a UDP socket can talk to itself on 127.0.0.1.
                let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
                let addr = s.local_addr().expect("addr");
                s.send_to(b"x", addr).expect("send on lo");
                let mut b = [0u8; 1];
                s.set_read_timeout(Some(std::time::Duration::from_secs(1)))
                    .expect("timeout");
                (ino, s.recv(&mut b).is_ok())
            })
            .expect("run");
        assert!(inside.1, "loopback is up in the new netns");
        assert_ne!(inside.0.ok(), mine.ok(), "a different netns");
        drop(ns);

        // A namespace whose owner pid (36^5 - 1) cannot exist is swept; the
        // live one is not.
        let stale = Netns::create("nfzzzzzzzz00abc").expect("stale netns");
        let live = Netns::create(&crate::unique_name("nfzzz")).expect("live netns");
        let path = stale.path().to_path_buf();
        std::mem::forget(stale);
        assert_eq!(remove_stale_netns(&["nfzzz"]), 1);
        assert!(!path.exists());
        assert!(live.path().exists());
    }
}
