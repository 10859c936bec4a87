//! Compiling a validated fault into the datapath's rule record.
//!
//! The layout mirrors `struct rule` in `bpf/datapath.bpf.c`; the size is
//! asserted at compile time on this side and checked by the kernel (map value
//! size) when the object loads.

use std::net::IpAddr;

use netfault_api::{Action, Direction, FaultSpec, Protocol};

pub const MAX_SANDBOXES: u32 = 1024;
pub const RULES_PER_SANDBOX: u32 = 16;

const DIR_EGRESS: u8 = 1;
const DIR_INGRESS: u8 = 2;
const ACTION_LOSS: u8 = 1;
const ACTION_BLACKHOLE: u8 = 2;
const PROTO_ICMP_ANY: u8 = 255;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawRule {
    pub deadline_ns: u64,
    pub threshold: u64,
    pub correlation: u32,
    pub family: u8,
    pub prefixlen: u8,
    pub proto: u8,
    pub dirs: u8,
    pub action: u8,
    pub nports: u8,
    pub pad: [u8; 2],
    pub addr: [u8; 16],
    pub port_lo: [u16; 8],
    pub port_hi: [u16; 8],
}

const _: () = assert!(std::mem::size_of::<RawRule>() == 80);

// SAFETY: plain old data with no padding-dependent invariants; every bit
// pattern is a valid RawRule.
unsafe impl aya::Pod for RawRule {}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCounters {
    pub matched: u64,
    pub dropped: u64,
    /// Packets changed but not dropped (duplicated, corrupted).
    pub affected: u64,
}

// SAFETY: three u64s.
unsafe impl aya::Pod for RawCounters {}

/// Scales a percentage to the program's 2^32 threshold/correlation range.
fn scale(percent: f64) -> u64 {
    ((percent / 100.0) * 4_294_967_296.0)
        .round()
        .clamp(0.0, 4_294_967_296.0) as u64
}

impl RawRule {
    /// Compiles `spec` into a rule that stops acting at `deadline_ns`
    /// (CLOCK_BOOTTIME nanoseconds). `None` when the datapath does not
    /// implement the action.
    pub fn compile(spec: &FaultSpec, deadline_ns: u64) -> Option<RawRule> {
        let mut r = RawRule {
            deadline_ns,
            ..RawRule::default()
        };
        r.dirs = match spec.direction {
            Direction::Egress => DIR_EGRESS,
            Direction::Ingress => DIR_INGRESS,
            Direction::Both => DIR_EGRESS | DIR_INGRESS,
        };
        match spec.action {
            Action::Loss {
                percent,
                correlation,
                model: None,
            } => {
                r.action = ACTION_LOSS;
                r.threshold = scale(percent);
                r.correlation = scale(correlation).min(u32::MAX as u64) as u32;
            }
            Action::Blackhole => {
                r.action = ACTION_BLACKHOLE;
                r.threshold = 1 << 32;
            }
            _ => return None,
        }
        let m = &spec.r#match;
        r.proto = match m.protocol() {
            Protocol::Any => 0,
            Protocol::Tcp => libc::IPPROTO_TCP as u8,
            Protocol::Udp => libc::IPPROTO_UDP as u8,
            Protocol::Icmp => PROTO_ICMP_ANY,
        };
        if let Some(net) = m.cidr {
            r.prefixlen = net.prefix_len();
            match net.network() {
                IpAddr::V4(a) => {
                    r.family = 4;
                    r.addr[..4].copy_from_slice(&a.octets());
                }
                IpAddr::V6(a) => {
                    r.family = 6;
                    r.addr = a.octets();
                }
            }
        }
        for (i, p) in m.ports.iter().take(8).enumerate() {
            r.port_lo[i] = p.lo;
            r.port_hi[i] = p.hi;
            r.nports = (i + 1) as u8;
        }
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netfault_api::Limits;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> FaultSpec {
        FaultSpec::parse(&v, &Limits::default()).expect("valid spec")
    }

    #[test]
    fn compiles_loss_with_selector() {
        let r = RawRule::compile(
            &spec(json!({"target": {"sandbox": "x"}, "direction": "egress",
                "match": {"cidr": "198.18.0.5/32", "protocol": "udp", "ports": "53,9000-9010"},
                "action": {"type": "loss", "percent": 50, "correlation": 25}, "duration": "1s"})),
            42,
        )
        .expect("loss compiles");
        assert_eq!(r.deadline_ns, 42);
        assert_eq!(r.threshold, 1 << 31);
        assert_eq!(r.correlation, 1 << 30);
        assert_eq!((r.family, r.prefixlen, r.proto, r.dirs), (4, 32, 17, 1));
        assert_eq!(&r.addr[..4], &[198, 18, 0, 5]);
        assert_eq!((r.nports, r.port_lo[1], r.port_hi[1]), (2, 9000, 9010));
    }

    #[test]
    fn full_loss_and_blackhole_always_drop() {
        let r = RawRule::compile(
            &spec(
                json!({"target": {"sandbox": "x"}, "action": {"type": "loss", "percent": 100}, "duration": "1s"}),
            ),
            1,
        )
        .expect("loss compiles");
        // The program drops when a u32 draw < threshold: 2^32 covers every draw.
        assert_eq!(r.threshold, 1 << 32);
        let b = RawRule::compile(
            &spec(
                json!({"target": {"sandbox": "x"}, "match": {"cidr": "fd00::/8", "protocol": "icmp"}, "action": {"type": "blackhole"}, "duration": "1s"}),
            ),
            1,
        )
        .expect("blackhole compiles");
        assert_eq!(
            (b.threshold, b.family, b.prefixlen, b.proto, b.dirs),
            (1 << 32, 6, 8, 255, 3)
        );
    }
}
