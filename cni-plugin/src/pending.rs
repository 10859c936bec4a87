//! Enrolments the agent could not take. With `failurePolicy: ignore` and the
//! agent down, ADD leaves its enrolment request as
//! `<socket dir>/pending/<id>.json` (see `netfault_api::wire::pending_dir`);
//! netfaultd adopts those files when it is back, so a pod born during an agent
//! outage still gets enrolled. DEL and GC remove the file, so a pod that is
//! gone is never adopted. Writes are atomic (temp file + rename), and the temp
//! name has no `.json` suffix, so the agent never reads half a file.
//!
//! There is no fsync: the rename alone makes the file appear whole to the
//! agent, and a pending enrolment only matters until the next boot (the
//! pod's netns does not survive one, and the agent drops enrolments whose
//! netns is gone); the default dir, `/run/netfault`, is a tmpfs anyway. It
//! saved 0.5 ms or more of the fail-open ADD on a disk-backed dir.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use netfault_api::EnrolRequest;

fn file(socket: &Path, id: &str) -> PathBuf {
    netfault_api::wire::pending_dir(socket).join(format!("{id}.json"))
}

/// Records `req` for the agent to adopt later. `id` must be a validated
/// container id. Only `pending/` itself is created: if the socket's directory
/// does not exist, netfault was never installed here and nothing is written.
pub fn record(socket: &Path, id: &str, req: &EnrolRequest) -> std::io::Result<PathBuf> {
    let dir = netfault_api::wire::pending_dir(socket);
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let body = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    let tmp = dir.join(format!(".{id}.{}.tmp", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&body));
    let target = file(socket, id);
    let renamed = written.and_then(|_| std::fs::rename(&tmp, &target));
    if renamed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    renamed.map(|_| target)
}

/// Removes the pending enrolment of `id`; true if there was one.
pub fn forget(socket: &Path, id: &str) -> std::io::Result<bool> {
    match std::fs::remove_file(file(socket, id)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Ids with a pending enrolment.
pub fn ids(socket: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(netfault_api::wire::pending_dir(socket)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .map(str::to_string)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_list_forget() {
        let dir =
            std::env::temp_dir().join(format!("netfault-pending-test-{}", std::process::id()));
        let socket = dir.join("netfaultd.sock");
        assert!(
            record(&socket, "abc", &EnrolRequest::default()).is_err(),
            "no socket dir: nothing written"
        );
        assert!(!dir.exists());
        std::fs::create_dir(&dir).expect("socket dir");
        let req = EnrolRequest {
            netns: "/var/run/netns/x".into(),
            ifname: "eth0".into(),
            ips: vec!["198.18.0.2".into()],
            ..EnrolRequest::default()
        };
        let path = record(&socket, "abc", &req).expect("recorded");
        assert_eq!(path, dir.join("pending").join("abc.json"));
        let back: EnrolRequest = serde_json::from_slice(&std::fs::read(&path).expect("readable"))
            .expect("an EnrolRequest");
        assert_eq!(back.ips, req.ips);
        record(&socket, "abc", &req).expect("overwrites");
        assert_eq!(ids(&socket), vec!["abc".to_string()]);
        assert!(forget(&socket, "abc").expect("removed"));
        assert!(!forget(&socket, "abc").expect("idempotent"));
        assert!(ids(&socket).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
