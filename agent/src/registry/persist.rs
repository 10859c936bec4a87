//! The state file: `<state dir>/state.json`, replaced atomically (write a
//! temporary file, then rename) after every change, and read at start.
//! The format is the one older agents wrote and read: records keep their
//! field names, and an unreadable file is moved aside rather than trusted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::AgentError;
use netfault_api::FaultSource;

use super::state::{
    annotation_digest, FaultId, FaultRecord, ResourceRecord, SandboxId, SandboxRecord, State,
};

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    sandboxes: BTreeMap<SandboxId, SandboxRecord>,
    faults: BTreeMap<FaultId, FaultRecord>,
    /// NetworkFaults (older files have none).
    #[serde(default)]
    resources: BTreeMap<String, ResourceRecord>,
}

/// Where the registry's records live between agents.
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: &Path) -> Result<StateDir, AgentError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| AgentError::Internal(format!("creating {}: {e}", dir.display())))?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    fn file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// The persisted records, or none when there is no file. An unreadable
    /// file is moved aside (`state.json.corrupt`) and treated as empty.
    pub fn load(&self) -> Result<State, AgentError> {
        let path = self.file();
        let file = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<StateFile>(&bytes) {
                Ok(s) => s,
                Err(e) => {
                    let aside = self.dir.join("state.json.corrupt");
                    tracing::error!(error = %e, "state file is unreadable; moved aside to {}", aside.display());
                    let _ = std::fs::rename(&path, aside);
                    StateFile::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile::default(),
            Err(e) => {
                return Err(AgentError::Internal(format!(
                    "reading {}: {e}",
                    path.display()
                )))
            }
        };
        let mut sandboxes = file.sandboxes;
        sandboxes
            .values_mut()
            .for_each(SandboxRecord::settle_source);
        let mut faults = file.faults;
        for sb in sandboxes.values_mut() {
            // Older files: birth faults came from the annotations, and the
            // annotations enrolled with are those that produced them.
            for id in &sb.birth_faults {
                if let Some(f) = faults.get_mut(id) {
                    f.source = FaultSource::Annotation;
                }
            }
            if sb.annotation_digest.is_none() {
                sb.annotation_digest = Some(annotation_digest(&sb.annotations));
            }
        }
        Ok(State {
            sandboxes,
            faults,
            resources: file.resources,
            readers: Default::default(),
        })
    }

    /// The file's bytes for the records of `state` (taken under the state
    /// lock; [`StateDir::write`] then runs without it).
    pub fn serialize(state: &State) -> Result<Vec<u8>, AgentError> {
        #[derive(Serialize)]
        struct View<'a> {
            sandboxes: &'a BTreeMap<SandboxId, SandboxRecord>,
            faults: &'a BTreeMap<FaultId, FaultRecord>,
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            resources: &'a BTreeMap<String, ResourceRecord>,
        }
        serde_json::to_vec_pretty(&View {
            sandboxes: &state.sandboxes,
            faults: &state.faults,
            resources: &state.resources,
        })
        .map_err(|e| AgentError::Internal(format!("serializing state: {e}")))
    }

    /// Replaces the file atomically.
    pub fn write(&self, bytes: &[u8]) -> Result<(), AgentError> {
        let tmp = self.dir.join("state.json.tmp");
        std::fs::write(&tmp, bytes)
            .and_then(|_| std::fs::rename(&tmp, self.file()))
            .map_err(|e| AgentError::Internal(format!("writing state: {e}")))
    }
}
