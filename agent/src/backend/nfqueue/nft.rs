//! The nft side of the delay engine: a `netfault` table (family inet) in the
//! pod netns that diverts a fault's packets to the engine's NFQUEUE.
//!
//! Layout of the table:
//! - one set `f<tag>` per fault, of type `nf_proto`, holding `ipv4` and
//!   `ipv6` with a `timeout` equal to the fault's remaining duration, in
//!   milliseconds (sent over netlink: nft's JSON only takes seconds). Every
//!   rule of the fault looks itself up in that set, so diversion stops at the
//!   deadline in the kernel even with the agent dead;
//! - base chains `egress` (hook postrouting) and `ingress` (hook prerouting),
//!   one rule per fault and port side, each ending in `goto divert`;
//! - a regular chain `divert` holding one rule: the xtables `NFQUEUE` target
//!   with `bypass` (no listener: packets pass undelayed).
//!
//! This kernel lacks `nft_queue` (`CONFIG_NFT_QUEUE`), so nft's own `queue`
//! statement cannot load. It has `nft_compat` and `xt_NFQUEUE`, which is what
//! iptables-nft uses. The nft binary cannot write an xtables expression, so
//! that one rule (and the set elements, for their millisecond timeouts) is
//! sent here as one raw nf_tables netlink batch; everything else is built
//! from the `nftables` crate's typed values (`netfault_sys::nft`) and goes
//! to nft as one transaction (libnftables in process, or the `nft` binary:
//! `netfault_sys::libnft`).
//!
//! A fault's tag is stable while it lives ([`Tags`]). Once the table exists,
//! a change touches only the faults that come or go ([`sync_here`]): the
//! others' sets, rules and set elements (whose kernel timeouts keep
//! running) are never rebuilt, so their packets stay delayed throughout.
//!
//! Every function with `_here` must run on a thread inside the pod netns
//! (`Netns::run`): nft's netlink socket (or its child process) and ours
//! belong to the calling thread's netns.

use netfault_sys::netns::InNetns;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use netfault_api::spec::{Direction, Match, Protocol};
use netfault_sys::nfnetlink::{
    batch_socket, elements_msg, Batch, BatchError, Msg, NFNL_SUBSYS_NFTABLES, NFPROTO_INET,
    NFTA_LIST_ELEM,
};
use netfault_sys::nft::{
    accept, anonymous_set, eq, meta, number, payload, port_set, prefix_match, set_lookup, word,
    NfTable, Transaction,
};
use nftables::expr::MetaKey;
use nftables::schema::NfListObject;
use nftables::stmt::{JumpTarget, Statement};
use nftables::types::{NfChainType, NfFamily, NfHook};
use serde_json::Value;

use super::error::DelayError;

pub const FAMILY: &str = "inet";

/// Where one queue engine's diversion lives: its table (family inet) and
/// the NFQUEUE number its rule sends to. The delay engine and the DNS
/// engine each have their own, so neither ever rewrites the other's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub table: &'static str,
    pub queue: u16,
    /// Whether packets on the loopback interface pass undiverted (a rule
    /// `oifname "lo" accept` in `egress`, `iifname "lo" accept` in
    /// `ingress`). The delay engine skips them: a delay acts on the pod's
    /// network, like the eBPF faults on its interface, and the in-agent
    /// proxy's legs to a server in the same pod run over loopback.
    pub skip_loopback: bool,
}

/// The delay engine's table and queue.
pub const DELAY: Layout = Layout {
    table: "netfault",
    queue: super::queue::QUEUE_NUM,
    skip_loopback: true,
};

/// The DNS engine's table and queue (UDP queries of `dns-*` faults).
pub const DNS: Layout = Layout {
    table: "netfault_dns",
    queue: super::queue::DNS_QUEUE_NUM,
    // A resolver on the pod's loopback is still a resolver whose answers
    // a `dns-*` fault acts on.
    skip_loopback: false,
};

impl Layout {
    /// The two queue numbers a holder may read: the first, or during a
    /// hand-over (the earlier agent's holder still reads the one in the
    /// table's rule) the other.
    pub fn queues(self) -> [u16; 2] {
        [self.queue, self.queue ^ 0x0100]
    }

    fn nft(self) -> NfTable {
        NfTable {
            family: NfFamily::INet,
            name: self.table,
        }
    }
}

/// What one fault diverts, and for how long the kernel keeps diverting.
#[derive(Debug, Clone)]
pub struct Diversion {
    pub tag: u32,
    pub direction: Direction,
    pub selector: Match,
    /// Remaining lifetime in milliseconds (at least 1).
    pub timeout_ms: u64,
}

/// Tags of delay faults, stable while a fault lives (its set `f<tag>` and
/// rules stay untouched while other faults come and go), and per sandbox
/// the tags whose diversion is known to be in place in its table.
#[derive(Debug)]
pub struct Tags {
    /// Fault id -> (sandbox, tag).
    by_fault: HashMap<String, (String, u32)>,
    /// Sandbox -> tags installed and complete (`known` of [`sync_here`]).
    installed: HashMap<String, BTreeSet<u32>>,
    /// Where the search for a free tag starts: tags are not reused soon
    /// after being freed, so a stale set never passes for a new fault's.
    next: u32,
}

impl Default for Tags {
    /// Tags start at a random number: a new agent taking over a table an
    /// earlier agent (still running, see [`sync_here`]) filled picks other
    /// set names than that agent's, so both can be in the table at once.
    fn default() -> Self {
        Tags {
            by_fault: HashMap::new(),
            installed: HashMap::new(),
            next: rand::random::<u32>() >> 1,
        }
    }
}

impl Tags {
    /// The tag of `fault` in `sandbox`, allocated on first use.
    pub fn tag(&mut self, sandbox: &str, fault: &str) -> u32 {
        if let Some((sb, tag)) = self.by_fault.get(fault) {
            if sb == sandbox {
                return *tag;
            }
        }
        let used: BTreeSet<u32> = self
            .by_fault
            .values()
            .map(|(_, t)| *t)
            .chain(self.installed.values().flatten().copied())
            .collect();
        let mut tag = self.next;
        while used.contains(&tag) {
            tag = tag.wrapping_add(1);
        }
        self.next = tag.wrapping_add(1);
        self.by_fault
            .insert(fault.to_string(), (sandbox.to_string(), tag));
        tag
    }

    /// Frees the tag of a fault that went.
    pub fn free(&mut self, fault: &str) {
        self.by_fault.remove(fault);
    }

    /// Frees the tags of `sandbox`'s faults other than `current`.
    pub fn retain_faults(&mut self, sandbox: &str, current: &[&str]) {
        self.by_fault
            .retain(|id, (sb, _)| sb != sandbox || current.contains(&id.as_str()));
    }

    /// Forgets every sandbox for which `live` is false (its table is gone).
    pub fn retain_sandboxes(&mut self, live: impl Fn(&str) -> bool) {
        self.installed.retain(|sb, _| live(sb));
        self.by_fault.retain(|_, (sb, _)| live(sb));
    }

    /// The tags installed in `sandbox`'s table.
    pub fn installed(&self, sandbox: &str) -> BTreeSet<u32> {
        self.installed.get(sandbox).cloned().unwrap_or_default()
    }

    pub fn set_installed(&mut self, sandbox: &str, tags: BTreeSet<u32>) {
        self.installed.insert(sandbox.to_string(), tags);
    }
}

fn set_name(tag: u32) -> String {
    format!("f{tag}")
}

/// The rules (statement lists) of one fault in one chain.
fn rules_for(d: &Diversion, egress: bool) -> Vec<Vec<Statement<'static>>> {
    let mut base = vec![eq(meta(MetaKey::Nfproto), set_lookup(&set_name(d.tag)))];
    if let Some(net) = d.selector.cidr {
        base.push(prefix_match(net, !egress));
    }
    let l4 = || meta(MetaKey::L4proto);
    match d.selector.protocol() {
        Protocol::Any if !d.selector.ports.is_empty() => {
            base.push(eq(l4(), anonymous_set([word("tcp"), word("udp")])))
        }
        Protocol::Any => {}
        Protocol::Tcp => base.push(eq(l4(), word("tcp"))),
        Protocol::Udp => base.push(eq(l4(), word("udp"))),
        Protocol::Icmp => base.push(eq(l4(), anonymous_set([word("icmp"), word("ipv6-icmp")]))),
    }
    let goto = || {
        Statement::Goto(JumpTarget {
            target: "divert".into(),
        })
    };
    if d.selector.ports.is_empty() {
        base.push(goto());
        return vec![base];
    }
    let ports = port_set(d.selector.ports.iter().map(|p| (p.lo, p.hi)));
    ["sport", "dport"]
        .into_iter()
        .map(|side| {
            let mut r = base.clone();
            r.push(eq(payload("th", side), ports.clone()));
            r.push(goto());
            r
        })
        .collect()
}

/// One nft transaction that replaces the whole table with `diversions`
/// (without the set elements and the queue rule, which [`commit_here`] adds).
pub fn ruleset(l: Layout, diversions: &[Diversion]) -> Transaction {
    table_tx(l, diversions, true)
}

/// [`ruleset`], or with `replace` false the same without removing a table
/// first, for a netns that has none. Removing one (even one that was not
/// there: nft adds it to delete it) makes the kernel free it after an RCU
/// grace period, and the next netfilter transaction in the netns (the set
/// elements' batch, right after) waits for that: 10-13 ms here.
fn table_tx(l: Layout, diversions: &[Diversion], replace: bool) -> Transaction {
    let nft = l.nft();
    let mut tx = Transaction::new();
    if replace {
        // Removes the table whether or not it exists.
        tx.remove_table(&nft);
    }
    tx.add(nft.table());
    tx.add(nft.chain("divert"));
    tx.add(nft.base_chain("egress", NfChainType::Filter, NfHook::Postrouting, 0));
    tx.add(nft.base_chain("ingress", NfChainType::Filter, NfHook::Prerouting, 0));
    // Packets the engine re-sends after their delay must not be diverted again.
    tx.add(nft.rule(
        "egress",
        vec![
            eq(meta(MetaKey::Mark), number(super::engine::REINJECT_MARK)),
            accept(),
        ],
    ));
    if l.skip_loopback {
        for (chain, key) in [("egress", MetaKey::Oifname), ("ingress", MetaKey::Iifname)] {
            tx.add(nft.rule(chain, vec![eq(meta(key), word("lo")), accept()]));
        }
    }
    for d in diversions {
        fault_cmds(l, d, &mut tx);
    }
    tx
}

fn nft(tx: &Transaction) -> Result<(), DelayError> {
    tx.apply().map_err(|e| DelayError::Nft(e.to_string()))
}

/// What the kernel's table (`netfault`, `netfault_dns`) holds, from nft's
/// JSON listing.
#[derive(Debug, Default)]
struct Listed {
    /// Tags of the fault sets `f<tag>`.
    sets: BTreeSet<u32>,
    /// Per tag, its rules: (chain, handle).
    rules: BTreeMap<u32, Vec<(String, u32)>>,
    /// Chains `divert`, `egress` and `ingress`, the queue rule and the
    /// reinject-mark rule are there, and nothing else is.
    complete: bool,
}

/// The tag of a fault set's name (`f<tag>`).
fn tag_of(set: &str) -> Option<u32> {
    set.strip_prefix('f')
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|t| t.parse().ok())
}

/// The fault set a rule looks up (`@f<tag>` anywhere in its expressions).
fn rule_tag(expr: &Value) -> Option<u32> {
    match expr {
        Value::String(s) => s.strip_prefix('@').and_then(tag_of),
        Value::Array(a) => a.iter().find_map(rule_tag),
        Value::Object(o) => o.values().find_map(rule_tag),
        _ => None,
    }
}

/// Parses the JSON of `list ruleset inet`: `None` without `l`'s table.
fn parse_listing(l: Layout, raw: &str) -> Result<Option<Listed>, DelayError> {
    let table = l.table;
    let v: Value = serde_json::from_str(raw)
        .map_err(|e| DelayError::Nft(format!("listing the table: invalid JSON: {e}")))?;
    let objects = v["nftables"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let ours = |o: &Value| o["family"] == FAMILY && o["table"] == table;
    let exists = objects
        .iter()
        .any(|o| o["table"]["family"] == FAMILY && o["table"]["name"] == table);
    if !exists {
        return Ok(None);
    }
    let mut listed = Listed::default();
    let mut foreign = false;
    let mut chains = BTreeSet::new();
    // Rules without a fault set: the reinject-mark rule and, with
    // `skip_loopback`, one loopback rule per base chain.
    let (mut queue_rules, mut plain_egress, mut plain_ingress) = (0usize, 0usize, 0usize);
    for o in objects {
        if let Some(set) = o.get("set").filter(|s| ours(s)) {
            match set["name"].as_str().and_then(tag_of) {
                Some(tag) => {
                    listed.sets.insert(tag);
                }
                None => foreign = true,
            }
        } else if let Some(chain) = o.get("chain").filter(|c| ours(c)) {
            chains.insert(chain["name"].as_str().unwrap_or_default().to_string());
        } else if let Some(rule) = o.get("rule").filter(|r| ours(r)) {
            let chain = rule["chain"].as_str().unwrap_or_default();
            // (A handle past u32, which the crate cannot name, counts as
            // foreign: the table is then rebuilt.)
            let handle = rule["handle"].as_u64().and_then(|h| u32::try_from(h).ok());
            match (chain, rule_tag(&rule["expr"]), handle) {
                ("divert", None, _) => queue_rules += 1,
                ("egress" | "ingress", Some(tag), Some(h)) => listed
                    .rules
                    .entry(tag)
                    .or_default()
                    .push((chain.to_string(), h)),
                ("egress", None, _) => plain_egress += 1,
                ("ingress", None, _) => plain_ingress += 1,
                _ => foreign = true,
            }
        }
    }
    let skeleton = ["divert", "egress", "ingress"]
        .iter()
        .all(|c| chains.contains(*c))
        && chains.len() == 3;
    let lo = usize::from(l.skip_loopback);
    listed.complete =
        skeleton && queue_rules == 1 && plain_egress == 1 + lo && plain_ingress == lo && !foreign;
    Ok(Some(listed))
}

/// Lists `l`'s table in the calling thread's netns.
fn list_here(_inside: &InNetns, l: Layout) -> Result<Option<Listed>, DelayError> {
    let raw = netfault_sys::libnft::list_json(&["list", "ruleset", FAMILY])
        .map_err(|e| DelayError::Nft(format!("listing the table: {e}")))?;
    parse_listing(l, &raw)
}

/// Adds the rules and set of one fault to `tx`.
fn fault_cmds(l: Layout, d: &Diversion, tx: &mut Transaction) {
    let nft = l.nft();
    tx.add_set(&nft, set_name(d.tag));
    for (egress, chain) in [(true, "egress"), (false, "ingress")] {
        let wanted = if egress {
            d.direction.includes_egress()
        } else {
            d.direction.includes_ingress()
        };
        if !wanted {
            continue;
        }
        for expr in rules_for(d, egress) {
            tx.add(nft.rule(chain, expr));
        }
    }
}

/// The queue rule a change writes: the queue number this agent's holder
/// reads, and whether the rule in the table (another agent's, maybe for
/// another queue) is replaced in the same netlink batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueRule {
    pub num: u16,
    pub replace: bool,
}

/// Brings `l`'s table in line with `wanted`, diverting to queue `queue`,
/// without disturbing the diversion of a fault that stays: its set, rules
/// and set elements (with their running kernel timeouts) are left as they are.
///
/// `known` holds the tags whose diversion the caller installed earlier in
/// this netns and trusts to be complete. A set in the table that is not
/// known (left by an earlier agent, or half-installed by a failed change)
/// is removed, with its rules, and installed afresh if wanted.
///
/// - No table (or one that is not netfault's layout): the table is built
///   whole: one nft transaction, then one netlink batch with every set's
///   elements and the queue rule. On failure, the table is removed.
/// - `takeover` (this agent has just started a holder for the sandbox, so
///   the table's queue rule and sets may be another agent's): make before
///   break. One nft transaction adds the sets and rules of `wanted` (under
///   this agent's tags, which differ from the other agent's); one netlink
///   batch adds their elements and replaces the queue rule with one for
///   `queue`; then one nft transaction removes the other sets and their
///   rules. Every packet is diverted throughout, by the old rules or the
///   new, and from the batch on to this agent's queue.
/// - Otherwise: one nft transaction deletes the rules (by handle) and sets
///   of faults that went, and adds the sets and rules of new faults; then a
///   netlink batch adds only the new faults' elements. A new fault diverts
///   nothing until its elements arrive (its rules look up its empty set).
///
/// Returns the tags whose diversion is in place afterwards (for `known` on
/// the next call) and the outcome.
pub fn sync_here(
    inside: &InNetns,
    l: Layout,
    queue: u16,
    takeover: bool,
    wanted: &[Diversion],
    known: &BTreeSet<u32>,
) -> (BTreeSet<u32>, Result<(), DelayError>) {
    let all: BTreeSet<u32> = wanted.iter().map(|d| d.tag).collect();
    let listed = match list_here(inside, l) {
        Ok(Some(listed)) if listed.complete => listed,
        Ok(listed) => {
            // An incomplete table (a failed change, another agent's) is
            // replaced; none is simply created.
            if let Err(e) = nft(&table_tx(l, wanted, listed.is_some())) {
                return (BTreeSet::new(), Err(e));
            }
            let rule = QueueRule {
                num: queue,
                replace: false,
            };
            if let Err(e) = commit_here(inside, l, wanted, Some(rule)) {
                let _ = remove_here(inside, l);
                return (BTreeSet::new(), Err(e));
            }
            return (all, Ok(()));
        }
        // Nothing changed.
        Err(e) => return (known.clone(), Err(e)),
    };
    if takeover && !wanted.iter().any(|d| listed.sets.contains(&d.tag)) {
        return match take_over_here(inside, l, queue, wanted, &listed) {
            Ok(()) => (all, Ok(())),
            // What was added is unknown to the next call, which removes it.
            Err(e) => (BTreeSet::new(), Err(e)),
        };
    }
    let keep: BTreeSet<u32> = all
        .iter()
        .copied()
        .filter(|t| known.contains(t) && listed.sets.contains(t))
        .collect();
    let added: Vec<Diversion> = wanted
        .iter()
        .filter(|d| !keep.contains(&d.tag))
        .cloned()
        .collect();
    let rule = takeover.then_some(QueueRule {
        num: queue,
        replace: true,
    });
    let payload = delta(l, &listed, &keep, &added);
    if payload.is_none() && rule.is_none() {
        return (keep, Ok(()));
    }
    // All or nothing: on failure the table is as it was.
    if let Some(payload) = payload {
        if let Err(e) = nft(&payload) {
            return (keep, Err(e));
        }
    }
    if let Err(e) = commit_here(inside, l, &added, rule) {
        // The new faults' rules and (empty) sets stay until the next call,
        // which removes them as unknown; they divert nothing meanwhile.
        return (keep, Err(e));
    }
    (all, Ok(()))
}

/// The make-before-break change of [`sync_here`] with `takeover`.
fn take_over_here(
    inside: &InNetns,
    l: Layout,
    queue: u16,
    wanted: &[Diversion],
    listed: &Listed,
) -> Result<(), DelayError> {
    let nft_table = l.nft();
    let mut add = Transaction::new();
    for d in wanted {
        fault_cmds(l, d, &mut add);
    }
    if !add.is_empty() {
        nft(&add)?;
    }
    let rule = QueueRule {
        num: queue,
        replace: true,
    };
    commit_here(inside, l, wanted, Some(rule))?;
    let mut drop_old = Transaction::new();
    for tag in &listed.sets {
        for (chain, handle) in listed.rules.get(tag).map(Vec::as_slice).unwrap_or(&[]) {
            drop_old.delete(nft_table.rule_at(chain.clone(), *handle));
        }
        drop_old.delete(NfListObject::Set(nft_table.set(set_name(*tag))));
    }
    if !drop_old.is_empty() {
        // Not fatal: the old rules divert to the same queue until the next
        // change removes their sets as unknown.
        if let Err(e) = nft(&drop_old) {
            tracing::warn!(table = l.table, error = %e, "removing the earlier agent's fault sets");
        }
    }
    Ok(())
}

/// The nft transaction of a change to a complete table (`None`: nothing to
/// do): it deletes the rules (by handle) and sets of the listed faults not
/// in `keep`, then adds the sets and rules of `added`.
fn delta(
    l: Layout,
    listed: &Listed,
    keep: &BTreeSet<u32>,
    added: &[Diversion],
) -> Option<Transaction> {
    let nft = l.nft();
    let mut tx = Transaction::new();
    for tag in listed.sets.iter().filter(|t| !keep.contains(t)) {
        for (chain, handle) in listed.rules.get(tag).map(Vec::as_slice).unwrap_or(&[]) {
            tx.delete(nft.rule_at(chain.clone(), *handle));
        }
        tx.delete(NfListObject::Set(nft.set(set_name(*tag))));
    }
    // Deletions first: a set may be removed and added again under the same
    // name in this one transaction.
    for d in added {
        fault_cmds(l, d, &mut tx);
    }
    (!tx.is_empty()).then_some(tx)
}

/// The nft transaction that removes the table whether or not it exists.
fn removal(l: Layout) -> Transaction {
    let mut tx = Transaction::new();
    tx.remove_table(&l.nft());
    tx
}

/// Removes `l`'s table if it exists.
pub fn remove_here(_inside: &InNetns, l: Layout) -> Result<(), DelayError> {
    nft(&removal(l))
}

// ----- the xt NFQUEUE rule, over nf_tables netlink -----

const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_TARGET_NAME: u16 = 1;
const NFTA_TARGET_REV: u16 = 2;
const NFTA_TARGET_INFO: u16 = 3;
/// `xt_NFQ_info_v3.flags`: pass packets when nobody listens.
const NFQ_FLAG_BYPASS: u16 = 1;

/// One nf_tables batch: every fault's set elements (`ipv4`, `ipv6`, with
/// the fault's remaining time as a millisecond timeout), then, with
/// `rule`, the single rule of chain `divert`:
/// `xt target NFQUEUE --queue-num N --queue-bypass` (after deleting the
/// chain's rules, in the same batch, if `rule.replace`).
pub fn commit_here(
    _inside: &InNetns,
    l: Layout,
    diversions: &[Diversion],
    rule: Option<QueueRule>,
) -> Result<(), DelayError> {
    let queue = rule.map(|r| r.num);
    if diversions.is_empty() && queue.is_none() {
        return Ok(());
    }
    let fd = batch_socket()
        .map_err(|e| DelayError::Netlink(format!("netfilter netlink socket: {e}")))?;
    let mut batch = Batch::new();
    for (i, d) in diversions.iter().enumerate() {
        let seq = batch.next_seq();
        // The kernel acks the batch's last message; errors come regardless.
        let last_msg = queue.is_none() && i + 1 == diversions.len();
        batch.push(elements_msg(
            l.table,
            &set_name(d.tag),
            d.timeout_ms,
            false,
            seq,
            last_msg,
        ));
    }
    if rule.is_some_and(|r| r.replace) {
        let seq = batch.next_seq();
        batch.push(flush_divert(l.table, seq));
    }
    let rule_seq = queue.map(|q| {
        let seq = batch.next_seq();
        batch.push(queue_rule(l.table, q, seq));
        seq
    });
    let sent = batch.send(&fd);
    // Off this path: the close would wait for the grace period of what the
    // nft transaction before this batch deleted.
    netfault_sys::nfnetlink::close_later(fd);
    sent.map_err(|e| match e {
        BatchError::Refused { seq, source } => {
            let what = if Some(seq) == rule_seq {
                "the NFQUEUE rule (xt_NFQUEUE through nft_compat)"
            } else {
                "a fault's set elements"
            };
            DelayError::Netlink(format!("the kernel refused {what}: {source}"))
        }
        other => DelayError::Netlink(other.to_string()),
    })
}

/// Deletes every rule of chain `divert` (a DELRULE naming the chain and no
/// handle), as message `seq` of a batch.
fn flush_divert(table: &str, seq: u32) -> Vec<u8> {
    let mut m = Msg::new(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELRULE,
        libc::NLM_F_REQUEST as u16,
        seq,
        NFPROTO_INET,
        0,
    );
    m.str(NFTA_RULE_TABLE, table);
    m.str(NFTA_RULE_CHAIN, "divert");
    m.finish()
}

/// The rule of chain `divert`, `xt target NFQUEUE --queue-num N
/// --queue-bypass`, as message `seq` of a batch (acked).
fn queue_rule(table: &str, queue: u16, seq: u32) -> Vec<u8> {
    let req = libc::NLM_F_REQUEST as u16;
    let create = libc::NLM_F_CREATE as u16;
    let mut rule = Msg::new(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE,
        req | create | (libc::NLM_F_APPEND | libc::NLM_F_ACK) as u16,
        seq,
        NFPROTO_INET,
        0,
    );
    rule.str(NFTA_RULE_TABLE, table);
    rule.str(NFTA_RULE_CHAIN, "divert");
    rule.begin(NFTA_RULE_EXPRESSIONS);
    rule.begin(NFTA_LIST_ELEM);
    rule.str(NFTA_EXPR_NAME, "target");
    rule.begin(NFTA_EXPR_DATA);
    rule.str(NFTA_TARGET_NAME, "NFQUEUE");
    rule.attr(NFTA_TARGET_REV, &3u32.to_be_bytes());
    // struct xt_NFQ_info_v3 { u16 queuenum; u16 queues_total; u16 flags; },
    // padded to XT_ALIGN (8).
    let mut info = Vec::with_capacity(8);
    info.extend_from_slice(&queue.to_ne_bytes());
    info.extend_from_slice(&1u16.to_ne_bytes());
    info.extend_from_slice(&NFQ_FLAG_BYPASS.to_ne_bytes());
    info.extend_from_slice(&[0, 0]);
    rule.attr(NFTA_TARGET_INFO, &info);
    rule.end();
    rule.end();
    rule.end();
    rule.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::golden;
    use serde_json::json;

    fn rule(chain: &str, handle: u64, expr: Value) -> Value {
        json!({"rule": {"family": "inet", "table": "netfault", "chain": chain,
            "handle": handle, "expr": expr}})
    }

    fn listing(extra: &[Value]) -> String {
        let mut objs = vec![
            json!({"metainfo": {"version": "1.0.6"}}),
            json!({"table": {"family": "inet", "name": "netfault", "handle": 1}}),
            json!({"set": {"family": "inet", "table": "netfault", "name": "f3",
                "type": "nf_proto", "handle": 3, "flags": ["timeout"]}}),
            json!({"set": {"family": "inet", "table": "netfault", "name": "f12",
                "type": "nf_proto", "handle": 4, "flags": ["timeout"]}}),
            json!({"chain": {"family": "inet", "table": "netfault", "name": "divert"}}),
            json!({"chain": {"family": "inet", "table": "netfault", "name": "egress"}}),
            json!({"chain": {"family": "inet", "table": "netfault", "name": "ingress"}}),
            rule(
                "divert",
                5,
                json!([{"xt": {"type": "target", "name": "NFQUEUE"}}]),
            ),
            rule(
                "egress",
                6,
                json!([{"match": {"op": "==", "left": {"meta": {"key": "mark"}},
                "right": crate::backend::nfqueue::engine::REINJECT_MARK}}, {"accept": null}]),
            ),
            rule(
                "egress",
                7,
                json!([{"match": {"op": "==", "left": {"meta": {"key": "oifname"}},
                "right": "lo"}}, {"accept": null}]),
            ),
            rule(
                "ingress",
                8,
                json!([{"match": {"op": "==", "left": {"meta": {"key": "iifname"}},
                "right": "lo"}}, {"accept": null}]),
            ),
            rule(
                "egress",
                10,
                json!([{"match": {"op": "==", "left": {"meta": {"key": "nfproto"}},
                "right": "@f3"}}, {"goto": {"target": "divert"}}]),
            ),
            rule(
                "ingress",
                9,
                json!([{"match": {"op": "==", "left": {"meta": {"key": "nfproto"}},
                "right": "@f12"}}, {"goto": {"target": "divert"}}]),
            ),
            rule(
                "egress",
                11,
                json!([{"match": {"op": "==", "left": {"meta": {"key": "nfproto"}},
                "right": "@f3"}}, {"goto": {"target": "divert"}}]),
            ),
            // Another table's objects are not ours.
            json!({"table": {"family": "inet", "name": "other", "handle": 2}}),
            json!({"set": {"family": "inet", "table": "other", "name": "x"}}),
        ];
        objs.extend_from_slice(extra);
        json!({"nftables": objs}).to_string()
    }

    #[test]
    fn listing_maps_rules_to_fault_sets() {
        let l = parse_listing(DELAY, &listing(&[]))
            .expect("parses")
            .expect("table exists");
        assert!(l.complete, "{l:?}");
        assert_eq!(l.sets, BTreeSet::from([3, 12]));
        assert_eq!(
            l.rules.get(&3),
            Some(&vec![
                ("egress".to_string(), 10),
                ("egress".to_string(), 11)
            ])
        );
        assert_eq!(l.rules.get(&12), Some(&vec![("ingress".to_string(), 9)]));
    }

    #[test]
    fn listing_without_the_table_is_none() {
        let raw = json!({"nftables": [{"metainfo": {}},
            {"table": {"family": "inet", "name": "other", "handle": 2}}]})
        .to_string();
        assert!(parse_listing(DELAY, &raw).expect("parses").is_none());
    }

    #[test]
    fn foreign_objects_make_the_table_incomplete() {
        let foreign_set =
            json!({"set": {"family": "inet", "table": "netfault", "name": "blocked"}});
        let stray_rule = rule("ingress", 20, json!([{"accept": null}]));
        let second_queue = rule("divert", 21, json!([{"accept": null}]));
        for extra in [foreign_set, stray_rule, second_queue] {
            let l = parse_listing(DELAY, &listing(std::slice::from_ref(&extra)))
                .expect("parses")
                .expect("table exists");
            assert!(!l.complete, "{extra} went unnoticed");
        }
    }

    /// A table from an agent that did not skip loopback is rebuilt, not
    /// kept: its rules would divert the proxy's loopback legs.
    #[test]
    fn a_table_without_the_loopback_rules_is_incomplete() {
        let raw = listing(&[]);
        let v: Value = serde_json::from_str(&raw).expect("json");
        let without: Vec<Value> = v["nftables"]
            .as_array()
            .expect("array")
            .iter()
            .filter(|o| !o.to_string().contains("ifname"))
            .cloned()
            .collect();
        let raw = json!({ "nftables": without }).to_string();
        let l = parse_listing(DELAY, &raw)
            .expect("parses")
            .expect("table exists");
        assert!(!l.complete, "{l:?}");
    }

    #[test]
    fn set_names_parse_to_tags() {
        assert_eq!(tag_of("f0"), Some(0));
        assert_eq!(tag_of("f4294967295"), Some(u32::MAX));
        for bad in ["f", "g1", "f-1", "f1x", "f4294967296", "f+1"] {
            assert_eq!(tag_of(bad), None, "{bad}");
        }
    }

    fn div(tag: u32, direction: Direction, cidr: Option<&str>, protocol: Protocol) -> Diversion {
        Diversion {
            tag,
            direction,
            selector: Match {
                cidr: cidr.map(|c| c.parse().expect("cidr")),
                protocol: Some(protocol),
                ports: Vec::new(),
            },
            timeout_ms: 5000,
        }
    }

    fn ports(mut d: Diversion, ports: &[(u16, u16)]) -> Diversion {
        d.selector.ports = ports
            .iter()
            .map(|&(lo, hi)| netfault_api::spec::PortRange { lo, hi })
            .collect();
        d
    }

    /// One diversion per kind of selector, tags 1 to 6.
    fn sample() -> Vec<(&'static str, Diversion)> {
        use Direction::*;
        vec![
            (
                "egress_v4_tcp_port",
                ports(
                    div(1, Egress, Some("10.0.0.0/8"), Protocol::Tcp),
                    &[(80, 80)],
                ),
            ),
            (
                "ingress_v6_udp_ports_and_range",
                ports(
                    div(2, Ingress, Some("fd00::/8"), Protocol::Udp),
                    &[(53, 53), (5000, 5010)],
                ),
            ),
            ("both_icmp", div(3, Both, None, Protocol::Icmp)),
            (
                "both_any_with_ports_v4_host",
                ports(
                    div(4, Both, Some("192.0.2.7/32"), Protocol::Any),
                    &[(443, 443), (8000, 8099)],
                ),
            ),
            (
                "egress_any_v6",
                div(5, Egress, Some("2001:db8::/32"), Protocol::Any),
            ),
            (
                "ingress_tcp_every_port",
                div(6, Ingress, None, Protocol::Tcp),
            ),
        ]
    }

    /// What the kernel lists after `ruleset` of tags 1, 3 and 4 of
    /// [`sample`] in a fresh netns (sets and rule handles).
    fn listed_1_3_4() -> Listed {
        let rules = |r: &[(&str, u32)]| r.iter().map(|&(c, h)| (c.to_string(), h)).collect();
        let rules = BTreeMap::from([
            (1, rules(&[("egress", 8), ("egress", 9)])),
            (3, rules(&[("egress", 12), ("ingress", 14)])),
            (
                4,
                rules(&[
                    ("egress", 18),
                    ("egress", 21),
                    ("ingress", 24),
                    ("ingress", 27),
                ]),
            ),
        ]);
        Listed {
            sets: BTreeSet::from([1, 3, 4]),
            rules,
            complete: true,
        }
    }

    fn golden_cases() -> Vec<golden::Case> {
        let sample = sample();
        let all: Vec<Diversion> = sample.iter().map(|(_, d)| d.clone()).collect();
        let mut cases = vec![golden::Case::new(
            "ruleset_empty",
            ruleset(DELAY, &[]).to_json(),
        )];
        for (name, d) in &sample {
            cases.push(golden::Case::new(
                format!("ruleset_{name}"),
                ruleset(DELAY, std::slice::from_ref(d)).to_json(),
            ));
        }
        cases.push(golden::Case::new(
            "ruleset_several",
            ruleset(DELAY, &all).to_json(),
        ));
        let before = ruleset(DELAY, &[all[0].clone(), all[2].clone(), all[3].clone()]).to_json();
        // Tag 4 stays; 1 and 3 go; 1 comes back with another selector (its
        // set removed and added in one transaction) and 7 is new.
        let added = [
            ports(div(1, Direction::Both, None, Protocol::Udp), &[(123, 123)]),
            div(7, Direction::Egress, Some("198.51.100.0/24"), Protocol::Any),
        ];
        let delta = delta(DELAY, &listed_1_3_4(), &BTreeSet::from([4]), &added)
            .expect("a change")
            .to_json();
        cases.push(golden::Case::new("delta", delta).after(vec![before.clone()]));
        cases.push(golden::Case::new("removal", removal(DELAY).to_json()).after(vec![before]));
        cases
    }

    #[test]
    fn golden_payloads() {
        golden::check("delay", &golden_cases());
    }

    /// Root only: the golden payloads and the built ones leave the same
    /// table in the kernel.
    #[test]
    fn golden_payloads_load_the_same_ruleset() {
        golden::check_kernel("delay", &golden_cases());
    }

    #[test]
    fn a_delta_without_changes_is_none() {
        assert!(delta(DELAY, &listed_1_3_4(), &BTreeSet::from([1, 3, 4]), &[]).is_none());
    }

    #[test]
    fn tags_are_stable_and_not_reused_soon() {
        let mut t = Tags::default();
        let a = t.tag("sb", "a");
        let b = t.tag("sb", "b");
        assert_ne!(a, b);
        assert_eq!(t.tag("sb", "a"), a, "stable across calls");
        t.free("a");
        let c = t.tag("sb", "c");
        assert!(c != a && c != b, "a freed tag is not handed out at once");
        t.set_installed("sb", BTreeSet::from([b, c]));
        t.retain_faults("sb", &["c"]);
        let d = t.tag("sb", "d");
        assert!(![a, b, c].contains(&d), "installed tags stay reserved");
        t.retain_sandboxes(|_| false);
        assert!(t.installed("sb").is_empty());
    }
}
