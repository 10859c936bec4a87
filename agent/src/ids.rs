//! The ids the registry and the backends share: a sandbox's and a fault's.
//! A leaf module: it depends on nothing else of the agent.

use serde::{Deserialize, Serialize};

/// A sandbox's id: the runtime's container id, or `netns-<dev>-<ino>` for
/// a namespace enrolled implicitly by a fault's `{"netns": path}` target.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SandboxId(String);

/// A fault's id, `f-<16 hex digits>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FaultId(String);

macro_rules! string_id {
    ($t:ty) => {
        impl $t {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl From<&str> for $t {
            fn from(s: &str) -> Self {
                Self(s.to_string())
            }
        }
        impl From<String> for $t {
            fn from(s: String) -> Self {
                Self(s)
            }
        }
    };
}
string_id!(SandboxId);
string_id!(FaultId);

impl FaultId {
    pub fn random() -> FaultId {
        let r: u64 = rand::random();
        FaultId(format!("f-{r:016x}"))
    }
}
