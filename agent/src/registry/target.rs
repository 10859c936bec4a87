//! Resolving a fault's target to an enrolled sandbox (enrolling a bare
//! netns implicitly), and the checks of an enrolment: ids, paths, names,
//! the pod's addresses and their uniqueness on the node.
//! What it must not do: install anything (that is `Core::install`).

use std::collections::HashSet;
use std::net::IpAddr;

use netfault_api::{EnrolRequest, FieldError, Target};
use netfault_ebpf::MAX_SANDBOXES;
use netfault_sys::netns::{Netns, NetnsError};
use netfault_sys::rtnetlink::RtSocket;

use super::state::{SandboxId, State};

/// What the registry asks the system about a network namespace. The
/// registry's unit tests answer with a fake; the agent with [`SystemHost`].
pub trait Host: Send + Sync {
    /// The global addresses of `ifname` in `ns` (outer error: entering the
    /// netns; inner: the interface).
    fn addresses(
        &self,
        ns: &Netns,
        ifname: &str,
    ) -> Result<Result<Vec<IpAddr>, String>, NetnsError>;

    /// The single non-loopback interface of `ns`.
    fn sole_interface(&self, ns: &Netns) -> Result<Result<String, String>, NetnsError>;
}

/// The real system: enters the netns.
pub struct SystemHost;

impl Host for SystemHost {
    fn addresses(
        &self,
        ns: &Netns,
        ifname: &str,
    ) -> Result<Result<Vec<IpAddr>, String>, NetnsError> {
        ns.run(|_| {
            let Ok(ifindex) = nix::net::if_::if_nametoindex(ifname) else {
                return Err(format!("interface {ifname:?} does not exist in the netns"));
            };
            RtSocket::open()
                .and_then(|mut sock| sock.addresses(ifindex))
                .map_err(|e| format!("tc: {e}"))
        })
    }

    fn sole_interface(&self, ns: &Netns) -> Result<Result<String, String>, NetnsError> {
        ns.run(netfault_sys::netns::sole_interface_here)
    }
}

pub(super) fn valid_sandbox_id(id: &str) -> Result<SandboxId, FieldError> {
    let ok = !id.is_empty()
        && id.len() <= 256
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if ok {
        Ok(SandboxId::from(id))
    } else {
        Err(FieldError::invalid(
            "id",
            "sandbox id must be 1-256 characters of [A-Za-z0-9_.:-]",
        ))
    }
}

/// The address part of an `ips` entry (`"198.18.0.2/24"` or bare).
fn ip_of(entry: &str) -> Option<IpAddr> {
    entry.split('/').next().unwrap_or_default().parse().ok()
}

/// Checks an enrolment body before anything is looked at.
pub(super) fn validate_enrol(req: &EnrolRequest) -> Result<(), FieldError> {
    if !req.netns.starts_with('/') {
        return Err(FieldError::invalid("netns", "must be an absolute path"));
    }
    if req.ifname.is_empty() || req.ifname.len() > 15 {
        return Err(FieldError::invalid(
            "ifname",
            "must be an interface name of 1-15 characters",
        ));
    }
    for (i, ip) in req.ips.iter().enumerate() {
        if ip_of(ip).is_none() {
            return Err(FieldError::invalid(
                &format!("ips[{i}]"),
                &format!("{ip:?} is not an IP address"),
            ));
        }
    }
    Ok(())
}

/// The pod's own addresses: the interface's, plus those CNI reported.
pub(super) fn addresses(
    host: &dyn Host,
    ns: &Netns,
    req: &EnrolRequest,
) -> Result<Vec<IpAddr>, FieldError> {
    let mut addresses = host
        .addresses(ns, &req.ifname)
        .map_err(|e| FieldError::invalid("netns", &e.to_string()))?
        .map_err(|e| FieldError::invalid("ifname", &e))?;
    for a in req.ips.iter().filter_map(|ip| ip_of(ip)) {
        if !addresses.contains(&a) {
            addresses.push(a);
        }
    }
    if addresses.is_empty() {
        return Err(FieldError::invalid(
            "ips",
            "the interface has no global address and none was given; faults could not match its packets",
        ));
    }
    Ok(addresses)
}

/// The first rule block no sandbox uses.
pub(super) fn free_slot(st: &State) -> Result<u32, FieldError> {
    let used: HashSet<u32> = st.sandboxes.values().map(|s| s.slot).collect();
    (0..MAX_SANDBOXES)
        .find(|s| !used.contains(s))
        .ok_or_else(|| {
            FieldError::conflict(
                "id",
                &format!("this agent serves at most {MAX_SANDBOXES} sandboxes"),
            )
        })
}

/// An address keys one sandbox's packets: it may not belong to two.
pub(super) fn check_addresses_free(st: &State, addresses: &[IpAddr]) -> Result<(), FieldError> {
    match st.sandboxes.values().find_map(|s| {
        s.addresses
            .iter()
            .find(|a| addresses.contains(a))
            .map(|a| (s.id.clone(), *a))
    }) {
        Some((other, a)) => Err(FieldError::conflict(
            "ips",
            &format!(
                "address {a} already belongs to sandbox {:?}",
                other.as_str()
            ),
        )),
        None => Ok(()),
    }
}

/// What a target names.
pub(super) enum Resolved {
    Enrolled(SandboxId),
    /// A netns no sandbox has: to enrol implicitly.
    Bare {
        path: String,
        ns: Netns,
    },
}

/// The sandbox a fault's target names.
pub(super) fn resolve(st: &State, target: &Target) -> Result<Resolved, FieldError> {
    match target {
        Target::Sandbox(id) => {
            let id = SandboxId::from(id.as_str());
            if st.sandboxes.contains_key(&id) {
                Ok(Resolved::Enrolled(id))
            } else {
                Err(FieldError::not_found(
                    "target.sandbox",
                    &format!("no enrolled sandbox {:?}", id.as_str()),
                ))
            }
        }
        Target::Pod { namespace, name } => st
            .sandboxes
            .values()
            .filter(|s| {
                s.pod
                    .as_ref()
                    .is_some_and(|p| &p.namespace == namespace && &p.name == name)
            })
            .max_by_key(|s| s.enrolled_at_ms)
            .map(|s| Resolved::Enrolled(s.id.clone()))
            .ok_or_else(|| {
                FieldError::not_found("target.pod", &format!("no enrolled pod {namespace}/{name}"))
            }),
        Target::Netns(path) => {
            let ns = Netns::open(std::path::Path::new(path))
                .map_err(|e| FieldError::invalid("target.netns", &e.to_string()))?;
            match st.sandboxes.values().find(|s| s.netns_id == ns.id()) {
                Some(s) => Ok(Resolved::Enrolled(s.id.clone())),
                None => Ok(Resolved::Bare {
                    path: path.clone(),
                    ns,
                }),
            }
        }
    }
}

/// The enrolment of a namespace that CNI never showed us: its sole
/// interface, under the id `netns-<dev>-<ino>`.
pub(super) fn implicit_enrolment(
    host: &dyn Host,
    path: &str,
    ns: &Netns,
) -> Result<(SandboxId, EnrolRequest), FieldError> {
    let ifname = host
        .sole_interface(ns)
        .map_err(|e| FieldError::invalid("target.netns", &e.to_string()))?
        .map_err(|e| FieldError::invalid("target.netns", &format!("{path} {e}")))?;
    let nid = ns.id();
    let id = SandboxId::from(format!("netns-{}-{}", nid.dev, nid.ino));
    let req = EnrolRequest {
        netns: path.to_string(),
        ifname,
        ..Default::default()
    };
    Ok((id, req))
}
