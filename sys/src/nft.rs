//! nft rules as the `nftables` crate's typed values (`schema`, `stmt`,
//! `expr`): the pieces the agent's diversions share (the nfqueue backend's
//! delay diversion and the proxy backend's), and [`Transaction`], which
//! applies commands as one nft transaction in the calling thread's netns
//! (through libnftables in process, or the `nft` binary: [`crate::libnft`]).
//!
//! One piece netfault needs has no typed form in the crate (0.6): a set of
//! type `nf_proto` (`SetType` does not list it). [`Transaction::add_set`]
//! sends that one command as a JSON fragment; everything else is typed.
//!
//! What it must not do: know about faults or their selectors (ports come
//! as plain ranges), or enter a netns.

use std::borrow::Cow;

use nftables::expr::{
    Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, Range, SetItem, CT,
};
use nftables::schema::{
    Chain, Element, FlushObject, NfCmd, NfListObject, Rule, Set, SetType, SetTypeValue, Table,
};
use nftables::stmt::{Mangle, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde::Serialize;
use serde_json::Value;

pub use crate::libnft::NftError;

/// `left == right`.
pub fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

/// `left != right`.
pub fn ne(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::NEQ,
    })
}

/// `meta <key>`.
pub fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

/// `ct <key>` (`mark`, `state`, `direction`, ...).
pub fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: key.into(),
        family: None,
        dir: None,
    }))
}

/// A header field: `ip saddr`, `th dport`, ...
pub fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

/// A symbol or string: `tcp`, `ipv4`, `lo`, `new`, ...
pub fn word(s: impl Into<Cow<'static, str>>) -> Expression<'static> {
    Expression::String(s.into())
}

/// A number (a mark, a port).
pub fn number(n: u32) -> Expression<'static> {
    Expression::Number(n)
}

/// A lookup in the named set `name` (`@name`).
pub fn set_lookup(name: &str) -> Expression<'static> {
    Expression::String(format!("@{name}").into())
}

/// An anonymous set: `{ a, b }`.
pub fn anonymous_set(items: impl IntoIterator<Item = Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(
        items.into_iter().map(SetItem::Element).collect(),
    ))
}

/// `<key> set <value>` (`meta mark set 0x...`, `ct mark set 0x...`).
pub fn mangle(key: Expression<'static>, value: Expression<'static>) -> Statement<'static> {
    Statement::Mangle(Mangle { key, value })
}

/// The `accept` verdict.
pub fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

/// The match of the remote end's address on a prefix: `ip saddr 198.18.0.0/15`,
/// `ip6 daddr fd00::/8`, ... (`remote_is_src`: the peer is the source).
pub fn prefix_match(net: ipnet::IpNet, remote_is_src: bool) -> Statement<'static> {
    let (proto, addr) = match net {
        ipnet::IpNet::V4(n) => ("ip", n.network().to_string()),
        ipnet::IpNet::V6(n) => ("ip6", n.network().to_string()),
    };
    let field = if remote_is_src { "saddr" } else { "daddr" };
    eq(
        payload(proto, field),
        Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(word(addr)),
            len: u32::from(net.prefix_len()),
        })),
    )
}

/// An anonymous set of ports and port ranges, each given as `(lo, hi)`
/// (a single port when `lo == hi`).
pub fn port_set(ports: impl IntoIterator<Item = (u16, u16)>) -> Expression<'static> {
    anonymous_set(ports.into_iter().map(|(lo, hi)| {
        if lo == hi {
            number(lo.into())
        } else {
            Expression::Range(Box::new(Range {
                range: [number(lo.into()), number(hi.into())],
            }))
        }
    }))
}

/// A table of one family, and the objects in it.
#[derive(Debug, Clone, Copy)]
pub struct NfTable {
    pub family: NfFamily,
    pub name: &'static str,
}

impl NfTable {
    pub fn table(&self) -> NfListObject<'static> {
        NfListObject::Table(Table {
            family: self.family,
            name: self.name.into(),
            handle: None,
        })
    }

    /// A regular chain (reached by `jump` and `goto` only).
    pub fn chain(&self, name: &'static str) -> NfListObject<'static> {
        NfListObject::Chain(Chain {
            family: self.family,
            table: self.name.into(),
            name: name.into(),
            ..Chain::default()
        })
    }

    /// A base chain on `hook`, with policy `accept`.
    pub fn base_chain(
        &self,
        name: &'static str,
        kind: NfChainType,
        hook: NfHook,
        prio: i32,
    ) -> NfListObject<'static> {
        NfListObject::Chain(Chain {
            family: self.family,
            table: self.name.into(),
            name: name.into(),
            _type: Some(kind),
            hook: Some(hook),
            prio: Some(prio),
            policy: Some(NfChainPolicy::Accept),
            ..Chain::default()
        })
    }

    /// A rule of `chain`, appended when added.
    pub fn rule(
        &self,
        chain: &'static str,
        expr: Vec<Statement<'static>>,
    ) -> NfListObject<'static> {
        NfListObject::Rule(Rule {
            family: self.family,
            table: self.name.into(),
            chain: chain.into(),
            expr: expr.into(),
            ..Rule::default()
        })
    }

    /// The rule of `chain` with `handle` (to delete it).
    pub fn rule_at(
        &self,
        chain: impl Into<Cow<'static, str>>,
        handle: u32,
    ) -> NfListObject<'static> {
        NfListObject::Rule(Rule {
            family: self.family,
            table: self.name.into(),
            chain: chain.into(),
            handle: Some(handle),
            ..Rule::default()
        })
    }

    /// The set `name`, to delete or flush. nft reads only the family, table
    /// and name of a set there; the crate's `Set` needs a type all the
    /// same, so this one carries `ipv4_addr`, whatever the set's type.
    pub fn set(&self, name: impl Into<Cow<'static, str>>) -> Box<Set<'static>> {
        Box::new(Set {
            family: self.family,
            table: self.name.into(),
            name: name.into(),
            set_type: SetTypeValue::Single(SetType::Ipv4Addr),
            ..Set::default()
        })
    }

    /// Elements of the set `name`.
    pub fn elements(
        &self,
        set: impl Into<Cow<'static, str>>,
        elem: Vec<Expression<'static>>,
    ) -> NfListObject<'static> {
        NfListObject::Element(Element {
            family: self.family,
            table: self.name.into(),
            name: set.into(),
            elem: elem.into(),
        })
    }
}

/// A command of a [`Transaction`].
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
enum Cmd {
    Typed(NfCmd<'static>),
    /// A command the crate has no type for (see [`Transaction::add_set`]).
    Raw(Value),
}

/// Commands applied as one nft transaction (all or nothing): the crate's
/// `Batch`, plus the commands it has no type for.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Transaction {
    #[serde(rename = "nftables")]
    cmds: Vec<Cmd>,
}

impl Transaction {
    pub fn new() -> Transaction {
        Transaction::default()
    }

    pub fn add(&mut self, obj: NfListObject<'static>) {
        self.cmds.push(Cmd::Typed(NfCmd::Add(obj)));
    }

    pub fn delete(&mut self, obj: NfListObject<'static>) {
        self.cmds.push(Cmd::Typed(NfCmd::Delete(obj)));
    }

    pub fn flush(&mut self, obj: FlushObject<'static>) {
        self.cmds.push(Cmd::Typed(NfCmd::Flush(obj)));
    }

    /// Removes `table` whether or not it exists (`add` then `delete`).
    pub fn remove_table(&mut self, table: &NfTable) {
        self.add(table.table());
        self.delete(table.table());
    }

    /// Adds the set `name` of type `nf_proto` (`ipv4`, `ipv6`) with flag
    /// `timeout` to `table`.
    ///
    /// The one JSON fragment here: the crate's `SetType` cannot name
    /// `nf_proto`, so this command is written as nft's JSON for it,
    /// `{"add": {"set": {"family", "table", "name", "type": "nf_proto",
    /// "flags": ["timeout"]}}}`.
    pub fn add_set(&mut self, table: &NfTable, name: impl Into<String>) {
        let family = serde_json::to_value(table.family).expect("a family serializes");
        self.cmds.push(Cmd::Raw(serde_json::json!({"add": {"set": {
            "family": family,
            "table": table.name,
            "name": name.into(),
            "type": "nf_proto",
            "flags": ["timeout"],
        }}})));
    }

    pub fn is_empty(&self) -> bool {
        self.cmds.is_empty()
    }

    /// The payload nft is given (`{"nftables": [...]}`).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("nft commands serialize")
    }

    /// Applies the commands as one transaction, in the calling thread's
    /// netns.
    pub fn apply(&self) -> Result<(), NftError> {
        let payload = serde_json::to_string(self).expect("nft commands serialize");
        crate::libnft::apply_json(&payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const T: NfTable = NfTable {
        family: NfFamily::INet,
        name: "t",
    };

    fn stmt(s: Statement<'static>) -> Value {
        serde_json::to_value(s).expect("serializes")
    }

    #[test]
    fn prefixes_match_the_remote_end() {
        let v4 = prefix_match("198.18.0.0/15".parse().expect("net"), true);
        assert_eq!(
            stmt(v4),
            json!({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                "right": {"prefix": {"addr": "198.18.0.0", "len": 15}}}})
        );
        let v6 = prefix_match("fd00::1/8".parse().expect("net"), false);
        assert_eq!(
            stmt(v6),
            json!({"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "daddr"}},
                "right": {"prefix": {"addr": "fd00::", "len": 8}}}})
        );
    }

    #[test]
    fn port_sets_hold_ports_and_ranges() {
        let s = port_set([(80, 80), (8000, 8099)]);
        assert_eq!(
            serde_json::to_value(s).expect("serializes"),
            json!({"set": [80, {"range": [8000, 8099]}]})
        );
    }

    #[test]
    fn a_transaction_keeps_its_order_and_its_one_raw_command() {
        let mut tx = Transaction::new();
        assert!(tx.is_empty());
        tx.remove_table(&T);
        tx.add(T.table());
        tx.add_set(&T, "f1");
        tx.add(T.rule(
            "c",
            vec![eq(meta(MetaKey::Nfproto), set_lookup("f1")), accept()],
        ));
        tx.delete(T.rule_at("c", 7));
        tx.flush(FlushObject::Set(T.set("f1")));
        let t = json!({"family": "inet", "name": "t"});
        assert_eq!(
            tx.to_json(),
            json!({"nftables": [
                {"add": {"table": t}},
                {"delete": {"table": t}},
                {"add": {"table": t}},
                {"add": {"set": {"family": "inet", "table": "t", "name": "f1",
                    "type": "nf_proto", "flags": ["timeout"]}}},
                {"add": {"rule": {"family": "inet", "table": "t", "chain": "c", "expr": [
                    {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "@f1"}},
                    {"accept": null}]}}},
                {"delete": {"rule": {"family": "inet", "table": "t", "chain": "c",
                    "expr": [], "handle": 7}}},
                {"flush": {"set": {"family": "inet", "table": "t", "name": "f1",
                    "type": "ipv4_addr"}}},
            ]})
        );
    }
}
