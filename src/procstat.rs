//! What a process holds, read from `/proc`: memory (RSS, PSS), open file
//! descriptors and their limit, and child processes. For the scale and load
//! benches; every reader returns `None` or an empty list when the process is
//! gone or the file cannot be read.

use std::path::Path;

/// A `NAME: VALUE kB` field of a `/proc` file, in KiB.
fn kib_field(path: &Path, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Proportional set size (`Pss` of `/proc/PID/smaps_rollup`), in KiB: the
/// process's private pages plus its share of pages it shares with others.
pub fn pss_kib(pid: u32) -> Option<u64> {
    kib_field(Path::new(&format!("/proc/{pid}/smaps_rollup")), "Pss")
}

/// Resident set size (`Rss` of `/proc/PID/smaps_rollup`), in KiB; the same
/// figure as [`crate::rss_kib`], but `None` when it cannot be read.
pub fn rss_kib_of(pid: u32) -> Option<u64> {
    kib_field(Path::new(&format!("/proc/{pid}/smaps_rollup")), "Rss")
}

/// How many file descriptors the process has open (entries of `/proc/PID/fd`).
pub fn fd_count(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// The process's `RLIMIT_NOFILE` (soft, hard), from `/proc/PID/limits`;
/// `u64::MAX` for `unlimited`.
pub fn nofile_limit(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut it = line["Max open files".len()..].split_whitespace();
    let parse = |s: &str| {
        if s == "unlimited" {
            Some(u64::MAX)
        } else {
            s.parse().ok()
        }
    };
    Some((parse(it.next()?)?, parse(it.next()?)?))
}

/// The parent pid (`/proc/PID/stat`, the field after the command's `)`).
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The processes whose command line has an argument equal to `arg`, with
/// their arguments.
pub fn processes_with_arg(arg: &str) -> Vec<(u32, Vec<String>)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmd
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            args.iter().any(|a| a == arg).then_some((pid, args))
        })
        .collect()
}

/// The agent's holder processes (`netfaultd delay-holder ...`, delay and DNS
/// queues alike) that are children of `agent_pid`.
pub fn holders_of_agent(agent_pid: u32) -> Vec<u32> {
    processes_with_arg("delay-holder")
        .into_iter()
        .map(|(pid, _)| pid)
        .filter(|&pid| parent_pid(pid) == Some(agent_pid))
        .collect()
}

/// The agent's memory and descriptors and its holder's, at one step of a
/// bench (`scale`, `holders`).
#[derive(Debug, Clone)]
pub struct AgentMemory {
    pub step: String,
    pub agent_rss: u64,
    pub agent_pss: u64,
    pub fds: usize,
    pub holders: usize,
    pub holders_rss: u64,
    pub holders_pss: u64,
}

impl AgentMemory {
    /// After a second of quiet: the median of three readings of the
    /// agent's RSS (KiB), then its PSS, descriptors and the holders.
    pub fn read(step: &str, agent_pid: u32) -> AgentMemory {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let mut rss = Vec::new();
        for _ in 0..3 {
            rss.push(crate::rss_kib(agent_pid));
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        rss.sort_unstable();
        let holders = holders_of_agent(agent_pid);
        AgentMemory {
            step: step.to_string(),
            agent_rss: rss[1],
            agent_pss: pss_kib(agent_pid).unwrap_or(0),
            fds: fd_count(agent_pid).unwrap_or(0),
            holders: holders.len(),
            holders_rss: holders.iter().filter_map(|&h| rss_kib_of(h)).sum(),
            holders_pss: holders.iter().filter_map(|&h| pss_kib(h)).sum(),
        }
    }

    /// Prints `rows` as a table, in MiB.
    pub fn print_table(rows: &[AgentMemory]) {
        let mib = |kib: u64| kib as f64 / 1024.0;
        println!(
            "  {:<24} {:>10} {:>10} {:>6} {:>8} {:>12} {:>12}",
            "step", "agent RSS", "agent PSS", "fds", "holders", "holders RSS", "holders PSS"
        );
        for s in rows {
            println!(
                "  {:<24} {:>6.1} MiB {:>6.1} MiB {:>6} {:>8} {:>8.1} MiB {:>8.1} MiB",
                s.step,
                mib(s.agent_rss),
                mib(s.agent_pss),
                s.fds,
                s.holders,
                mib(s.holders_rss),
                mib(s.holders_pss)
            );
        }
    }
}

/// Threads of process `pid` (0 when it is gone).
pub fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

/// Holder processes whose parent is not `agent_pid`: after a restart, any
/// of them left by the earlier agent is an orphan.
pub fn holders_not_of(agent_pid: u32) -> Vec<u32> {
    processes_with_arg("delay-holder")
        .into_iter()
        .map(|(pid, _)| pid)
        .filter(|&pid| parent_pid(pid) != Some(agent_pid))
        .collect()
}

/// The NFQUEUE queues bound in the netns at `netns` (the kernel's
/// `nfnetlink_queue` table there): (queue number, the bound socket's
/// netlink port id). A holder serving a sandbox has its queue bound here.
pub fn queues_in_netns(netns: &std::path::Path) -> Vec<(u16, u32)> {
    let read = crate::in_netns(netns, || {
        std::fs::read_to_string("/proc/thread-self/net/netfilter/nfnetlink_queue")
    });
    let Ok(Ok(table)) = read else {
        return Vec::new();
    };
    table
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(pss_kib(me).is_some_and(|k| k > 0));
        assert!(rss_kib_of(me).is_some_and(|k| k > 0));
        assert!(fd_count(me).is_some_and(|n| n >= 3));
        let (soft, hard) = nofile_limit(me).expect("limits");
        assert!(soft <= hard);
        assert_eq!(parent_pid(me), Some(std::os::unix::process::parent_id()));
        assert_eq!(fd_count(u32::MAX), None);
    }
}
