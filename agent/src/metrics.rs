//! Prometheus text exposition for `/metrics`.
//!
//! Fault counters are read from the datapath's per-CPU maps at scrape time
//! (through the registry), so the numbers are what the kernel did.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::registry::Registry;

#[derive(Default)]
pub struct Metrics {
    requests_ok: AtomicU64,
    requests_client_error: AtomicU64,
    requests_server_error: AtomicU64,
    /// CRI adoption (`--cri-socket`).
    pub cri: CriCounters,
}

/// What the CRI adopter counts (see `cri`).
#[derive(Default)]
pub struct CriCounters {
    /// Sandboxes enrolled from the runtime's list.
    pub adopted: AtomicU64,
    /// Sandboxes released because the runtime (or their netns) says they are gone.
    pub released: AtomicU64,
    /// Failed runtime passes and failed adoptions.
    pub errors: AtomicU64,
    /// The last pass reached the runtime.
    pub connected: AtomicBool,
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn count_request(&self, status: u16) {
        let c = match status {
            500.. => &self.requests_server_error,
            400.. => &self.requests_client_error,
            _ => &self.requests_ok,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, reg: &Registry) -> String {
        let sandboxes = reg.sandboxes();
        let faults = reg.faults();
        let mut out = String::new();
        let active = faults.iter().filter(|f| f.state == "active").count();
        let _ = writeln!(out, "# HELP netfault_sandboxes Enrolled sandboxes.\n# TYPE netfault_sandboxes gauge\nnetfault_sandboxes {}", sandboxes.len());
        let _ = writeln!(out, "# HELP netfault_faults_active Faults currently applied.\n# TYPE netfault_faults_active gauge\nnetfault_faults_active {active}");
        let _ = writeln!(out, "# HELP netfault_api_requests_total API requests by outcome.\n# TYPE netfault_api_requests_total counter");
        for (class, c) in [
            ("2xx", &self.requests_ok),
            ("4xx", &self.requests_client_error),
            ("5xx", &self.requests_server_error),
        ] {
            let _ = writeln!(
                out,
                "netfault_api_requests_total{{class=\"{class}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP netfault_delay_queue_overflows_total Times a delay queue's socket overflowed, letting packets pass undelayed.\n# TYPE netfault_delay_queue_overflows_total counter\nnetfault_delay_queue_overflows_total {}",
            crate::backend::nfqueue::queue_overflows()
        );
        let _ = writeln!(
            out,
            "# HELP netfault_dns_malformed_total Malformed DNS messages on a DNS fault's ports, passed through untouched.\n# TYPE netfault_dns_malformed_total counter\nnetfault_dns_malformed_total {}",
            reg.dns_malformed()
        );
        let _ = writeln!(
            out,
            "# HELP netfault_proxy_open_connections Connections the transparent proxy serves now.\n# TYPE netfault_proxy_open_connections gauge\nnetfault_proxy_open_connections {}",
            reg.proxy_open_connections()
        );
        let cri = &self.cri;
        for (name, help, v) in [
            (
                "netfault_cri_adopted_total",
                "Sandboxes adopted from the container runtime (CRI).",
                &cri.adopted,
            ),
            (
                "netfault_cri_released_total",
                "Sandboxes released because the container runtime stopped them or their netns is gone.",
                &cri.released,
            ),
            (
                "netfault_cri_errors_total",
                "Failed container runtime passes and failed adoptions.",
                &cri.errors,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP netfault_cri_connected Whether the last container runtime pass reached the runtime.\n# TYPE netfault_cri_connected gauge\nnetfault_cri_connected {}",
            u8::from(cri.connected.load(Ordering::Relaxed))
        );
        for (name, help) in [
            (
                "netfault_fault_packets_matched_total",
                "Packets that matched a fault's selector.",
            ),
            (
                "netfault_fault_packets_dropped_total",
                "Packets a fault dropped.",
            ),
            (
                "netfault_fault_affected_total",
                "Packets (delay), requests or connections (proxy) a fault acted on.",
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for f in &faults {
                let v = if name.ends_with("matched_total") {
                    f.counters.matched
                } else if name.ends_with("affected_total") {
                    f.counters.affected
                } else {
                    f.counters.dropped
                };
                let action = f.spec["action"]["type"].as_str().unwrap_or_default();
                let _ = writeln!(
                    out,
                    "{name}{{fault=\"{}\",sandbox=\"{}\",action=\"{}\",state=\"{}\"}} {v}",
                    label(&f.id),
                    label(&f.sandbox),
                    label(action),
                    label(&f.state)
                );
            }
        }
        let name = "netfault_dns_answers_total";
        let _ = writeln!(
            out,
            "# HELP {name} DNS queries a dns-* fault acted on, by action and, for dns-error, rcode.\n# TYPE {name} counter"
        );
        for f in &faults {
            let action = &f.spec["action"];
            let Some(ty) = action["type"].as_str().filter(|t| t.starts_with("dns-")) else {
                continue;
            };
            let rcode = action["rcode"].as_str().unwrap_or_default();
            let _ = writeln!(
                out,
                "{name}{{fault=\"{}\",sandbox=\"{}\",action=\"{}\",rcode=\"{}\",state=\"{}\"}} {}",
                label(&f.id),
                label(&f.sandbox),
                label(ty),
                label(rcode),
                label(&f.state),
                f.counters.affected
            );
        }
        out
    }
}
