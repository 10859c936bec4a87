//! netfault-install-cni: runs in the DaemonSet with the host's CNI bin and conf dirs mounted.
//! Installs the `netfault` plugin binary and its conflist entry, keeps the entry in place
//! while the primary CNI rewrites its config, and removes both on SIGTERM/SIGINT.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::mpsc;

use anyhow::Context;
use clap::Parser;
use netfault_install_cni::{Config, FailurePolicy};
use nix::sys::signal::{SigSet, Signal};
use tracing::info;

#[derive(Parser, Debug)]
#[command(name = "netfault-install-cni", version, about)]
struct Args {
    /// The host's CNI bin dir, as mounted in this container.
    #[arg(
        long,
        env = "NETFAULT_CNI_BIN_DIR",
        default_value = "/host/opt/cni/bin"
    )]
    cni_bin_dir: PathBuf,
    /// The host's CNI conf dir, as mounted in this container.
    #[arg(
        long,
        env = "NETFAULT_CNI_CONF_DIR",
        default_value = "/host/etc/cni/net.d"
    )]
    cni_conf_dir: PathBuf,
    /// The plugin binary to install as `netfault`.
    #[arg(
        long,
        env = "NETFAULT_PLUGIN_SRC",
        default_value = "/opt/netfault/bin/netfault"
    )]
    plugin_src: PathBuf,
    /// The agent's socket, written into the conflist entry.
    #[arg(
        long,
        env = "NETFAULT_SOCKET",
        default_value = "/run/netfault/netfaultd.sock"
    )]
    socket: String,
    /// The entry's failurePolicy.
    #[arg(long, env = "NETFAULT_FAILURE_POLICY", default_value = "ignore")]
    failure_policy: FailurePolicy,
    /// Install the binary and the entry, then exit.
    #[arg(long, conflicts_with = "uninstall")]
    once: bool,
    /// Remove the entry and the binary, then exit.
    #[arg(long)]
    uninstall: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour only on a terminal: container logs are files.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let cfg = Config {
        cni_bin_dir: args.cni_bin_dir,
        cni_conf_dir: args.cni_conf_dir,
        plugin_src: args.plugin_src,
        socket: args.socket,
        failure_policy: args.failure_policy,
    };
    if args.uninstall {
        return netfault_install_cni::uninstall(&cfg).context("uninstall");
    }
    if args.once {
        netfault_install_cni::install(&cfg).context("install")?;
        return Ok(());
    }

    // Block SIGTERM/SIGINT before any thread starts, so only the waiting thread takes them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().context("blocking SIGTERM/SIGINT")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        if let Ok(sig) = signals.wait() {
            info!(signal = %sig, "signal received");
        }
        let _ = tx.send(());
    });
    netfault_install_cni::run(&cfg, rx).context("install-cni")?;
    info!("uninstalled; exiting");
    Ok(())
}
