//! What this node can do, checked for real: the kernel's config
//! (`/proc/config.gz`, or `/boot/config-<release>`), loaded modules, how
//! nft commands run (libnftables in process, or the `nft` binary) and an
//! NFQUEUE netlink socket. Served as
//! `GET /v1/capabilities` so users see why something is unavailable.

use std::io::Read;
use std::path::Path;

use netfault_api::BackendKind;
use serde_json::{json, Value};

/// `y`, `m`, or absent, per `CONFIG_` option.
pub struct KernelConfig {
    text: Option<String>,
}

impl KernelConfig {
    pub fn read() -> KernelConfig {
        let gz = std::fs::File::open("/proc/config.gz").ok().and_then(|f| {
            let mut s = String::new();
            flate2::read::GzDecoder::new(f)
                .read_to_string(&mut s)
                .ok()
                .map(|_| s)
        });
        let text = gz.or_else(|| {
            let release = nix::sys::utsname::uname()
                .ok()?
                .release()
                .to_string_lossy()
                .into_owned();
            std::fs::read_to_string(format!("/boot/config-{release}")).ok()
        });
        KernelConfig { text }
    }

    /// `Some(true)` when built in or a module, `Some(false)` when not set,
    /// `None` when the config is unreadable.
    pub fn has(&self, option: &str) -> Option<bool> {
        let text = self.text.as_ref()?;
        let y = format!("{option}=y");
        let m = format!("{option}=m");
        Some(text.lines().any(|l| l == y || l == m))
    }

    /// Config first, then a loaded module as a fallback.
    fn feature(&self, option: &str, module: &str) -> bool {
        self.has(option)
            .unwrap_or_else(|| Path::new("/sys/module").join(module).exists())
    }
}

fn in_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// Whether nft commands can run: libnftables loaded, or `nft` in PATH.
fn nft_runs() -> bool {
    netfault_sys::libnft::engine().in_process() || in_path("nft")
}

const NO_NFT: &str = "neither libnftables (libnftables.so.1) nor the nft binary (in PATH) is there";

fn nfqueue_socket_opens() -> Result<(), String> {
    netfault_sys::nfnetlink::netfilter_socket()
        .map(drop)
        .map_err(|e| format!("cannot open a netfilter netlink socket: {e}"))
}

/// What the node offers every backend: `edt`, `netem`, `ipv6` and whether
/// the kernel config could be read (the start of the capabilities document).
pub fn node_facts() -> Value {
    let cfg = KernelConfig::read();
    let fq = cfg.feature("CONFIG_NET_SCH_FQ", "sch_fq");
    let netem = cfg.feature("CONFIG_NET_SCH_NETEM", "sch_netem");
    let mut edt = json!({"available": false});
    edt["reason"] = json!(if fq {
        "sch_fq is available, but netfault has no EDT delay path yet"
    } else {
        "sch_fq is not available on this kernel"
    });
    let mut netem_v = json!({"available": netem, "used": false});
    netem_v["reason"] = json!(if netem {
        "present, but netfault never depends on sch_netem"
    } else {
        "sch_netem is not available on this kernel; netfault does not need it"
    });
    json!({
        "edt": edt,
        "netem": netem_v,
        "ipv6": Path::new("/proc/net/if_inet6").exists(),
        "kernel_config_readable": cfg.text.is_some(),
        "nft": netfault_sys::libnft::describe(),
    })
}

/// The `delay` section (the NFQUEUE backend), and whether it is available.
pub fn nfqueue_section() -> (Value, bool) {
    let cfg = KernelConfig::read();
    let nft = nft_runs();
    let nft_queue = cfg.feature("CONFIG_NFT_QUEUE", "nft_queue");
    let xt_nfqueue = cfg.feature("CONFIG_NETFILTER_XT_TARGET_NFQUEUE", "xt_NFQUEUE")
        && cfg.feature("CONFIG_NFT_COMPAT", "nft_compat");
    let nl_queue = cfg.feature("CONFIG_NETFILTER_NETLINK_QUEUE", "nfnetlink_queue");
    let reason = if !nft {
        Some(NO_NFT.to_string())
    } else if !nl_queue {
        Some("the kernel lacks nfnetlink_queue (CONFIG_NETFILTER_NETLINK_QUEUE)".to_string())
    } else if !xt_nfqueue {
        Some(
            "the kernel lacks xt_NFQUEUE through nft_compat (CONFIG_NETFILTER_XT_TARGET_NFQUEUE, CONFIG_NFT_COMPAT), which netfault's diversion rule uses"
                .to_string(),
        )
    } else {
        nfqueue_socket_opens().err()
    };
    let mut delay = json!({
        "backend": BackendKind::Nfqueue.as_str(),
        "available": reason.is_none(),
        "diversion": "nft table inet netfault, xt NFQUEUE target with bypass",
        "nft_queue_statement": nft_queue,
        "timing": "dedicated thread per pod, ns sleeps with 1 ns timer slack",
    });
    if let Some(r) = &reason {
        delay["reason"] = json!(r);
    }
    (delay, reason.is_none())
}

/// The `proxy` section (the transparent proxy backend), and whether it is
/// available.
pub fn proxy_section(lease: std::time::Duration) -> (Value, bool) {
    let cfg = KernelConfig::read();
    let nft = nft_runs();
    // Without a readable kernel config, assume it is there (the install
    // then says what is missing).
    let tproxy = cfg.text.is_none() || cfg.feature("CONFIG_NFT_TPROXY", "nft_tproxy");
    let reason = if !nft {
        Some(NO_NFT)
    } else if !tproxy {
        Some("the kernel lacks nft_tproxy (CONFIG_NFT_TPROXY)")
    } else {
        None
    };
    let mut proxy = json!({
        "backend": BackendKind::Proxy.as_str(),
        "available": reason.is_none(),
        "diversion": "nft table inet netfault_proxy: tproxy to IP_TRANSPARENT listeners in the pod netns, fwmark policy routing to lo",
        "lease_seconds": lease.as_secs(),
        "protocols": ["http/1.1", "h2 (prior knowledge)", "grpc", "raw tcp"],
    });
    if let Some(r) = reason {
        proxy["reason"] = json!(r);
    }
    (proxy, reason.is_none())
}
