//! Enrolments the CNI plugin recorded while the agent was unreachable
//! (`<socket dir>/pending/<id>.json`, each an [`EnrolRequest`]).

use std::path::Path;

use netfault_api::EnrolRequest;

/// Takes the pending enrolments out of `dir` (their files are removed):
/// those whose pod's netns still exists, as (sandbox id, request).
pub(super) fn take(dir: &Path) -> Vec<(String, EnrolRequest)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut taken = Vec::new();
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
            Some(req) if Path::new(&req.netns).exists() => taken.push((id, req)),
            _ => {
                tracing::info!(sandbox = %id, "dropping a pending enrolment whose pod is gone")
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    taken
}
