//! The input side of the `netfault` CNI plugin: its environment (`args`),
//! its stdin config (`config`), the previous plugin's result (`result`),
//! versions, errors, and the enrolment built from them. The binary
//! (`main.rs`) adds the agent calls; this library is what the plugin's
//! unit tests and the fuzz targets (`fuzz/`) exercise without an agent.

pub mod args;
pub mod config;
pub mod error;
pub mod result;
pub mod version;

use netfault_api::{EnrolRequest, PodRef};

use crate::args::Env;
use crate::config::NetConf;
use crate::error::CniError;

/// The enrolment an ADD sends the agent for `env` and `conf`, with the
/// warnings about input it ignored (malformed `CNI_ARGS` pairs, odd
/// `prevResult` entries). Fails when `prevResult` is missing: netfault is a
/// chained plugin.
pub fn enrolment(env: &Env, conf: &NetConf) -> Result<(EnrolRequest, Vec<String>), CniError> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::invalid_field(
            "prevResult",
            "missing: netfault is a chained plugin and must follow an interface plugin (such as bridge) in a conflist",
        )
    })?;
    let (pod, mut warnings) = args::parse_cni_args(env.args.as_deref().unwrap_or_default());
    let (ips, ip_warnings) = result::sandbox_ips(prev);
    warnings.extend(ip_warnings);
    let req = EnrolRequest {
        netns: env.netns.clone().unwrap_or_default(),
        ifname: env.ifname.clone().unwrap_or_default(),
        ips: ips.iter().map(ToString::to_string).collect(),
        pod: (!pod.is_empty()).then(|| PodRef {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            uid: pod.uid.clone(),
        }),
        annotations: conf.annotations.clone(),
    };
    Ok((req, warnings))
}
