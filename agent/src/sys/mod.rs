//! The system layer: entering network namespaces, and talking to the
//! kernel's netfilter. Nothing here knows about faults.

pub mod netns;
pub mod nftjson;
