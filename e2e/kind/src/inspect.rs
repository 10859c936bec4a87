//! What a node holds of netfault, read with one shell script on the node
//! ([`crate::Cluster::node_sh`]): conflists that chain `netfault`, the
//! plugin binary, bpffs pins, `/run/netfault`, and in every pod netns
//! (`/var/run/netns/*`, entered with `nsenter`) its IPv4 address, its
//! `netfault*` nft tables and its tc filters with netfault's handle
//! (0x4e46) or name.
//!
//! What it owns: the script and the parsing of its output.
//! What it must not do: change anything on the node: the script only runs
//! `grep`, `ls`, `ip addr show`, `nft list tables` and `tc filter show`.

use std::collections::BTreeMap;

use crate::{Cluster, Error, Result};

/// What a node holds of netfault.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NodeState {
    /// `nft` is on the node (kind's node image may lack it).
    pub nft: bool,
    /// Conflists whose plugins include `netfault`.
    pub chained: Vec<String>,
    /// The plugin binary is in the CNI bin dir.
    pub plugin: bool,
    /// bpffs entries named netfault*.
    pub pins: Vec<String>,
    /// `/run/netfault`'s entries, space-separated.
    pub state_dir: String,
    /// Each pod netns by path.
    pub netns: BTreeMap<String, NetnsState>,
}

/// One pod netns.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NetnsState {
    /// Its `eth0`'s IPv4 address (to tell the pods apart).
    pub ip: String,
    /// Its nft tables whose names hold `netfault`.
    pub tables: Vec<String>,
    /// Its tc filters (ingress and egress of `eth0`) with netfault's handle or name.
    pub filters: u32,
}

/// Reads `node`'s state.
pub fn node_state(c: &Cluster, node: &str) -> Result<NodeState> {
    let out = c.node_sh(
        node,
        &script(
            &c.target.cni_conf_dir,
            &c.target.cni_bin_dir,
            "/var/run/netns",
        ),
    )?;
    parse(&out).map_err(|e| Error::Other(format!("{node}: {e}")))
}

/// The script: one line per fact (`chained FILE`, `plugin`, `nft`, `pin
/// PATH`, `state ENTRIES`, `netns PATH ip IP`, `table PATH TABLE`,
/// `filters PATH N`, `error WHAT`).
pub fn script(conf_dir: &str, bin_dir: &str, netns_dir: &str) -> String {
    format!(
        r#"conf='{conf_dir}'; bin='{bin_dir}'; nsdir='{netns_dir}'
for f in "$conf"/*; do [ -f "$f" ] && grep -Eq '"type"[[:space:]]*:[[:space:]]*"netfault"' "$f" && echo "chained $f"; done
[ -e "$bin/netfault" ] && echo plugin
for p in /sys/fs/bpf/*; do case "$p" in *netfault*) echo "pin $p";; esac; done
echo "state $(ls /run/netfault 2>/dev/null | tr '\n' ' ')"
command -v nft >/dev/null && echo nft
command -v tc >/dev/null || echo "error tc is not on the node"
command -v nsenter >/dev/null || echo "error nsenter is not on the node"
for ns in "$nsdir"/*; do
  [ -e "$ns" ] || continue
  ip=$(nsenter --net="$ns" ip -o -4 addr show dev eth0 2>/dev/null | awk '{{print $4}}' | cut -d/ -f1)
  echo "netns $ns ip $ip"
  if command -v nft >/dev/null; then
    nsenter --net="$ns" nft list tables 2>/dev/null | grep -i netfault | sed "s|^|table $ns |"
  fi
  n=$(for d in ingress egress; do nsenter --net="$ns" tc filter show dev eth0 $d 2>/dev/null; done | grep -Eci 'handle 0x4e46|netfault')
  echo "filters $ns $n"
done
true
"#
    )
}

/// Parses [`script`]'s output; an `error` line is an error.
pub fn parse(out: &str) -> std::result::Result<NodeState, String> {
    let mut s = NodeState::default();
    for line in out.lines() {
        let (k, rest) = line.split_once(' ').unwrap_or((line, ""));
        match k {
            "chained" => s.chained.push(rest.to_string()),
            "plugin" => s.plugin = true,
            "nft" => s.nft = true,
            "pin" => s.pins.push(rest.to_string()),
            "state" => s.state_dir = rest.trim().to_string(),
            "error" => return Err(rest.to_string()),
            "netns" => {
                let mut p = rest.split(' ');
                let path = p.next().unwrap_or_default().to_string();
                let ip = p.nth(1).unwrap_or_default().to_string();
                s.netns.entry(path).or_default().ip = ip;
            }
            "table" => {
                let (path, table) = rest.split_once(' ').unwrap_or((rest, ""));
                s.netns
                    .entry(path.to_string())
                    .or_default()
                    .tables
                    .push(table.to_string());
            }
            "filters" => {
                let (path, n) = rest.split_once(' ').unwrap_or((rest, "0"));
                s.netns.entry(path.to_string()).or_default().filters =
                    n.trim().parse().unwrap_or(0);
            }
            _ => {}
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// The script on this machine, over a conf dir with a chained conflist
    /// and one without, a bin dir with the plugin and an empty netns dir:
    /// it finds exactly the chained file and the plugin; then without them,
    /// nothing.
    #[test]
    fn the_script_finds_the_chained_conflist_and_the_plugin() {
        let dir = testbed::TempDir::new("nfkinsp").expect("temp dir");
        let (conf, bin, nsdir) = (
            dir.path().join("net.d"),
            dir.path().join("bin"),
            dir.path().join("netns"),
        );
        for d in [&conf, &bin, &nsdir] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        let chained = conf.join("10-kindnet.conflist");
        std::fs::write(
            &chained,
            r#"{"cniVersion":"0.3.1","name":"kindnet","plugins":[{"type":"ptp"},{"type": "netfault","socket":"/run/netfault/netfaultd.sock"}]}"#,
        )
        .expect("write");
        std::fs::write(
            conf.join("99-other.conflist"),
            r#"{"name":"other","plugins":[{"type":"bridge","netfault":"not a type"}]}"#,
        )
        .expect("write");
        std::fs::write(bin.join("netfault"), "").expect("write");
        let path = format!(
            "/usr/sbin:/sbin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        let run = || {
            let out = crate::cluster::run(
                Command::new("sh")
                    .args([
                        "-c",
                        &script(
                            &conf.display().to_string(),
                            &bin.display().to_string(),
                            &nsdir.display().to_string(),
                        ),
                    ])
                    .env("PATH", &path),
            )
            .expect("the script runs");
            parse(&out)
        };
        let s = match run() {
            Ok(s) => s,
            Err(e) => {
                // A machine without iproute2 or util-linux: the script says
                // so, as it would on a node.
                eprintln!("skipped: {e}");
                return;
            }
        };
        assert_eq!(s.chained, vec![chained.display().to_string()], "{s:?}");
        assert!(s.plugin, "{s:?}");
        assert!(s.netns.is_empty(), "{s:?}");

        std::fs::remove_file(&chained).expect("rm");
        std::fs::remove_file(bin.join("netfault")).expect("rm");
        let s = run().expect("the script runs again");
        assert!(s.chained.is_empty() && !s.plugin, "{s:?}");
    }

    #[test]
    fn parse_reads_every_netns_fact() {
        let out = "nft\nnetns /var/run/netns/cni-1 ip 10.244.1.5\ntable /var/run/netns/cni-1 table inet netfault\n\
                   filters /var/run/netns/cni-1 2\nnetns /var/run/netns/cni-2 ip 10.244.1.6\nfilters /var/run/netns/cni-2 0\n\
                   state netfaultd.sock state.json \n";
        let s = parse(out).expect("parses");
        assert!(s.nft);
        assert_eq!(s.state_dir, "netfaultd.sock state.json");
        let one = &s.netns["/var/run/netns/cni-1"];
        assert_eq!(one.ip, "10.244.1.5");
        assert_eq!(one.tables, vec!["table inet netfault".to_string()]);
        assert_eq!(one.filters, 2);
        assert_eq!(s.netns["/var/run/netns/cni-2"].filters, 0);
        assert_eq!(
            parse("error tc is not on the node\n"),
            Err("tc is not on the node".into())
        );
    }
}
