//! Compiling a validated fault into the datapath's rule record.
//!
//! The records mirror the structs in `bpf/abi.h`; their layout is asserted
//! at compile time against the header (see [`crate::abi`]) and checked by
//! the kernel (map value size) when the object loads.

use std::net::IpAddr;

use netfault_api::{Action, Direction, FaultSpec, Match, PacketAction, Protocol};

// The codes `compile` writes (DIR_*, ACTION_*, PROTO_ICMP_ANY), from abi.h.
use crate::abi::*;
pub use crate::abi::{MAX_SANDBOXES, RULES_PER_SANDBOX};

// The API accepts no more port ranges than a rule holds.
const _: () = assert!(netfault_api::spec::MAX_PORT_RANGES == MAX_PORT_RANGES);

/// A fault rule (`struct rule`).
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
    pub port_lo: [u16; MAX_PORT_RANGES],
    pub port_hi: [u16; MAX_PORT_RANGES],
    /// Explicit padding: every byte of the record is a field.
    pub pad2: [u8; 4],
    /// rate: refill rate, bucket size, and the time to fill an empty bucket.
    pub bytes_per_sec: u64,
    pub burst_bytes: u64,
    pub fill_ns: u64,
    /// Gilbert-Elliott, scaled like `threshold`: good→bad, bad→good, loss in
    /// the bad state (1-h), loss in the good state (1-k).
    pub ge_p: u64,
    pub ge_r: u64,
    pub ge_bad_loss: u64,
    pub ge_good_loss: u64,
}

/// Shared per-rule state (`struct rule_state`): token bucket and the
/// Gilbert-Elliott chain. The agent resets it with the rule.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RawState {
    /// `struct bpf_spin_lock`; the kernel never copies it to or from user space.
    pub lock: u32,
    pub ge_bad: u32,
    pub tokens: u64,
    pub last_ns: u64,
}

// SAFETY: plain integers, no padding (the generated layout assertions match
// it field by field to `struct rule_state`, whose fields cover every byte).
unsafe impl aya::Pod for RawState {}

// SAFETY: plain integers and byte arrays with no padding (every byte is a
// field: abi.h and the generated layout assertions); every bit pattern is a
// valid RawRule.
unsafe impl aya::Pod for RawRule {}

/// Per-rule, per-CPU counters (`struct counters`).
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

/// The bucket size when a rate fault gives none: 200 ms at the rate (at
/// least four full-size frames). The datapath polices (it cannot queue: no
/// fq here), and a TCP flow that loses a burst often waits out a
/// retransmission timeout (200 ms minimum) before it sends again; a bucket
/// that holds those 200 ms of tokens keeps them for when it does, so the
/// flow's average stays at the limit. Measured on veth, one Cubic flow at
/// 20 Mbit/s: 5 ms (12.5 kB) gave 0.6 Mbit/s, 70 kB 3 Mbit/s, 300 kB 12.5,
/// 500 kB (200 ms) 19.8-20.3 Mbit/s, 1 MB 20.6-21.3 (more overshoot).
pub fn default_burst(bits_per_sec: u64) -> u64 {
    (bits_per_sec / 8 / 5).max(4 * 1500)
}

impl RawRule {
    /// Compiles `spec` into a rule that stops acting at `deadline_ns`
    /// (CLOCK_BOOTTIME nanoseconds). `None` when the action is not a
    /// [`PacketAction`] (another backend serves it).
    pub fn compile(spec: &FaultSpec, deadline_ns: u64) -> Option<RawRule> {
        let Action::Packet(action) = &spec.action else {
            return None;
        };
        Some(RawRule::compile_packet(
            spec.direction,
            &spec.r#match,
            action,
            deadline_ns,
        ))
    }

    /// Compiles a packet action on the packets `m` selects in `direction`.
    pub fn compile_packet(
        direction: Direction,
        m: &Match,
        action: &PacketAction,
        deadline_ns: u64,
    ) -> RawRule {
        let mut r = RawRule {
            deadline_ns,
            ..RawRule::default()
        };
        r.dirs = match direction {
            Direction::Egress => DIR_EGRESS,
            Direction::Ingress => DIR_INGRESS,
            Direction::Both => DIR_EGRESS | DIR_INGRESS,
        };
        r.set_action(action);
        r.set_match(m);
        r
    }

    fn set_action(&mut self, action: &PacketAction) {
        match *action {
            PacketAction::Loss {
                percent,
                correlation,
                model: None,
            } => {
                self.action = ACTION_LOSS;
                self.threshold = scale(percent);
                self.correlation = scale(correlation).min(u32::MAX as u64) as u32;
            }
            PacketAction::Loss {
                model: Some(ge), ..
            } => {
                self.action = ACTION_LOSS_GE;
                self.ge_p = scale(ge.p);
                self.ge_r = scale(ge.r);
                self.ge_bad_loss = scale(ge.one_minus_h);
                self.ge_good_loss = scale(ge.one_minus_k);
            }
            PacketAction::Blackhole => {
                self.action = ACTION_BLACKHOLE;
                self.threshold = 1 << 32;
            }
            PacketAction::Corrupt {
                percent,
                correlation,
            }
            | PacketAction::Duplicate {
                percent,
                correlation,
            } => {
                self.action = if matches!(action, PacketAction::Corrupt { .. }) {
                    ACTION_CORRUPT
                } else {
                    ACTION_DUPLICATE
                };
                self.threshold = scale(percent);
                self.correlation = scale(correlation).min(u32::MAX as u64) as u32;
            }
            PacketAction::Rate {
                bits_per_sec,
                burst_bytes,
            } => {
                self.action = ACTION_RATE;
                self.bytes_per_sec = (bits_per_sec / 8).max(1);
                self.burst_bytes = burst_bytes.unwrap_or_else(|| default_burst(bits_per_sec));
                // Time to refill an empty bucket, rounded up.
                self.fill_ns = (self.burst_bytes as u128 * 1_000_000_000)
                    .div_ceil(self.bytes_per_sec as u128)
                    .min(u64::MAX as u128) as u64;
            }
        }
    }

    fn set_match(&mut self, m: &Match) {
        self.proto = match m.protocol() {
            Protocol::Any => 0,
            Protocol::Tcp => libc::IPPROTO_TCP as u8,
            Protocol::Udp => libc::IPPROTO_UDP as u8,
            Protocol::Icmp => PROTO_ICMP_ANY,
        };
        if let Some(net) = m.cidr {
            self.prefixlen = net.prefix_len();
            match net.network() {
                IpAddr::V4(a) => {
                    self.family = 4;
                    self.addr[..4].copy_from_slice(&a.octets());
                }
                IpAddr::V6(a) => {
                    self.family = 6;
                    self.addr = a.octets();
                }
            }
        }
        for (i, p) in m.ports.iter().take(8).enumerate() {
            self.port_lo[i] = p.lo;
            self.port_hi[i] = p.hi;
            self.nports = (i + 1) as u8;
        }
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

    fn action(a: serde_json::Value) -> RawRule {
        RawRule::compile(
            &spec(json!({"target": {"sandbox": "x"}, "action": a, "duration": "1s"})),
            7,
        )
        .expect("compiles")
    }

    #[test]
    fn compiles_packet_actions() {
        let c = action(json!({"type": "corrupt", "percent": 25, "correlation": 50}));
        assert_eq!(
            (c.action, c.threshold, c.correlation),
            (3, 1 << 30, 1 << 31)
        );
        let d = action(json!({"type": "duplicate", "percent": 100}));
        assert_eq!((d.action, d.threshold), (4, 1 << 32));
        let r = action(json!({"type": "rate", "rate": "20mbit"}));
        assert_eq!((r.action, r.bytes_per_sec), (5, 2_500_000));
        assert_eq!(r.burst_bytes, 500_000, "default burst: 200 ms at the rate");
        assert_eq!(r.fill_ns, 200_000_000);
        let r = action(json!({"type": "rate", "rate": "8kbit", "burst": 3000}));
        assert_eq!(
            (r.bytes_per_sec, r.burst_bytes, r.fill_ns),
            (1000, 3000, 3_000_000_000)
        );
        let g = action(json!({"type": "loss", "model": {"p": 5, "r": 20, "1-h": 100, "1-k": 0}}));
        assert_eq!(g.action, 6);
        assert_eq!(
            (g.ge_p, g.ge_r, g.ge_bad_loss, g.ge_good_loss),
            (scale(5.0), scale(20.0), 1 << 32, 0)
        );
        assert!(RawRule::compile(
            &spec(json!({"target": {"sandbox": "x"}, "action": {"type": "delay", "latency": "1ms"}, "duration": "1s"})),
            7
        )
        .is_none());
    }
}
