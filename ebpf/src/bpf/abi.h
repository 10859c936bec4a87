// SPDX-License-Identifier: GPL-2.0
//
// The ABI between the tc datapath (datapath.bpf.c) and the agent (the
// netfault-ebpf crate): the records kept in the maps, their limits and
// codes, and the names of the maps and programs. The one definition of each:
// build.rs compiles abi_probe.c (which includes this header) for the host,
// runs it, and generates the Rust constants and the layout assertions on the
// hand-written Rust structs from what it prints (OUT_DIR/abi.rs).
//
// Rules for this file:
// - Every `#define NF_*` is a shared constant and must be listed in
//   abi_probe.c (a unit test fails otherwise); local helpers use no NF_.
// - Every field of a shared struct is listed in abi_probe.c, in order, and
//   the fields cover every byte: padding is an explicit field, so the agent
//   never hands the kernel an uninitialised byte and a new field cannot hide
//   in a hole (the probe fails otherwise).
// - Only UAPI headers: this compiles for `-target bpf` and for the host.

#ifndef NETFAULT_ABI_H
#define NETFAULT_ABI_H

#include <linux/types.h>
// struct bpf_spin_lock: a UAPI type ({ __u32 val; }), so the host probe
// measures the kernel's own definition.
#include <linux/bpf.h>

// Sandboxes one agent serves, and rule slots per sandbox. Every per-rule map
// is indexed by slot * NF_RULES_PER_SANDBOX + i.
#define NF_MAX_SANDBOXES 1024
#define NF_RULES_PER_SANDBOX 16
// Port ranges one rule matches (struct rule's port_lo/port_hi).
#define NF_MAX_PORT_RANGES 8

// struct rule.dirs bits.
#define NF_DIR_EGRESS 1
#define NF_DIR_INGRESS 2

// struct rule.action.
#define NF_ACTION_LOSS 1
#define NF_ACTION_BLACKHOLE 2
#define NF_ACTION_CORRUPT 3
#define NF_ACTION_DUPLICATE 4
#define NF_ACTION_RATE 5
#define NF_ACTION_LOSS_GE 6

// struct rule.family and struct addr_key.family (0 in a rule = any).
#define NF_FAMILY_IPV4 4
#define NF_FAMILY_IPV6 6

// struct rule.proto: "icmp" in the API means ICMP on IPv4 and ICMPv6 on IPv6.
#define NF_PROTO_ICMP_ANY 255

// skb->mark bit carried by a duplicate while it re-enters the program
// (bpf_clone_redirect sends it through the same hook again). The program
// clears it at once, so it never leaves the hook; a duplicate is not
// duplicated again but meets every other rule, like any packet on the wire.
// Marks the agent sets for its own diversions must not contain this bit.
#define NF_DUP_MARK 0x00100000

// Program names: the tc filters' names (`tc filter show`).
#define NF_EGRESS_PROGRAM nf_egress
#define NF_INGRESS_PROGRAM nf_ingress

// Map names.
#define NF_SANDBOXES_MAP nf_sandboxes
#define NF_RULES_MAP nf_rules
#define NF_COUNTERS_MAP nf_counters
#define NF_LAST_DRAW_MAP nf_last_draw
#define NF_STATE_MAP nf_state

// A fault rule (NF_RULES_MAP value). Rust: RawRule.
struct rule {
	__u64 deadline_ns;   // CLOCK_BOOTTIME; 0 = free slot
	__u64 threshold;     // drop when a 32-bit random draw < threshold (2^32 = always)
	__u32 correlation;   // netem-style correlation, scaled to 2^32
	__u8 family;         // 0 = any, NF_FAMILY_* (set when a CIDR is given)
	__u8 prefixlen;
	__u8 proto;          // 0 = any, IPPROTO_TCP, IPPROTO_UDP, NF_PROTO_ICMP_ANY
	__u8 dirs;           // NF_DIR_EGRESS | NF_DIR_INGRESS
	__u8 action;         // NF_ACTION_*
	__u8 nports;
	__u8 pad[2];
	__u8 addr[16];       // peer network, IPv4 in the first 4 bytes
	__u16 port_lo[NF_MAX_PORT_RANGES];
	__u16 port_hi[NF_MAX_PORT_RANGES];
	__u8 pad2[4];        // explicit, not implicit, padding: the agent writes every byte
	// rate: bucket size in bytes and refill rate in bytes per second;
	// fill_ns = time to refill an empty bucket (burst_bytes * 1e9 / bytes_per_sec)
	__u64 bytes_per_sec;
	__u64 burst_bytes;
	__u64 fill_ns;
	// Gilbert-Elliott, scaled to 2^32 like threshold: good->bad, bad->good,
	// loss probability in the bad state (1-h) and in the good state (1-k).
	__u64 ge_p;
	__u64 ge_r;
	__u64 ge_bad_loss;
	__u64 ge_good_loss;
};

// Shared (not per-CPU) per-rule state, reset by the agent with the rule
// (NF_STATE_MAP value). Rust: RawState.
struct rule_state {
	struct bpf_spin_lock lock;
	__u32 ge_bad;        // Gilbert-Elliott: 1 in the bad state
	__u64 tokens;        // rate: bucket content in nanobytes (bytes * 1e9), signed (debt)
	__u64 last_ns;       // rate: last refill, CLOCK_BOOTTIME; 0 = bucket full
};

// Per-rule, per-CPU counters (NF_COUNTERS_MAP value). Rust: RawCounters.
struct counters {
	__u64 matched;
	__u64 dropped;
	__u64 affected;      // changed but not dropped (duplicated, corrupted)
};

// A pod address (NF_SANDBOXES_MAP key). Rust: AddrKey.
struct addr_key {
	__u8 family;         // NF_FAMILY_*
	__u8 pad[3];
	__u8 addr[16];
};

#endif // NETFAULT_ABI_H
