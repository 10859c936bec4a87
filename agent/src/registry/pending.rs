//! Enrolments the CNI plugin recorded while the agent was unreachable
//! (`<socket dir>/pending/<id>.json`, each an [`EnrolRequest`]): adopted
//! when the agent is back, if the pod's netns still exists.

use std::path::Path;

use netfault_api::EnrolRequest;

use super::Registry;

impl Registry {
    /// Enrols the pending sandboxes and removes their files; pods whose
    /// netns is gone by now are dropped. Returns how many were enrolled.
    pub fn adopt_pending(&self, dir: &Path) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut adopted = 0;
        for e in entries.flatten() {
            let path = e.path();
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .map(str::to_string)
            else {
                continue;
            };
            let req = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<EnrolRequest>(&b).ok());
            match req {
                Some(req) if Path::new(&req.netns).exists() => match self.enrol(&id, req) {
                    Ok(_) => {
                        tracing::info!(sandbox = %id, "enrolled a pod created while the agent was down");
                        adopted += 1;
                    }
                    Err(e) => {
                        tracing::warn!(sandbox = %id, error = %e, "could not enrol a pending pod")
                    }
                },
                _ => {
                    tracing::info!(sandbox = %id, "dropping a pending enrolment whose pod is gone")
                }
            }
            let _ = std::fs::remove_file(&path);
        }
        adopted
    }
}
