// SPDX-License-Identifier: GPL-2.0
//
// netfault's tc datapath. One object is loaded once per node agent and the
// same two programs are attached (legacy clsact, direct-action) on every
// enrolled pod interface, inside the pod's network namespace.
//
// What it owns: matching packets against a pod's fault rules and dropping
// them (loss, blackhole), plus per-rule counters.
// What it must not do: keep any state the agent cannot rebuild, or let a rule
// act after its deadline. Rules carry an absolute CLOCK_BOOTTIME deadline that
// is checked here, so a fault ends on time even if the agent is dead
// (KERNEL-NOTES: legacy clsact filters outlive the agent).
//
// Pods are told apart by their own IP addresses (source on egress,
// destination on ingress), not by ifindex: every pod's eth0 has ifindex 2
// (KERNEL-NOTES). bpf_get_netns_cookie() was tried and rejected: on this
// kernel it reports the pod's netns on egress but not on ingress.

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define MAX_SANDBOXES 1024
#define RULES_PER_SANDBOX 16
#define MAX_PORT_RANGES 8

#define DIR_EGRESS 1
#define DIR_INGRESS 2

#define ACTION_LOSS 1
#define ACTION_BLACKHOLE 2

// "icmp" in the API means ICMP on IPv4 and ICMPv6 on IPv6.
#define PROTO_ICMP_ANY 255

// Layout shared with ebpf/src/rule.rs (#[repr(C)] RawRule). Keep in sync.
struct rule {
	__u64 deadline_ns;   // CLOCK_BOOTTIME; 0 = free slot
	__u64 threshold;     // drop when a 32-bit random draw < threshold (2^32 = always)
	__u32 correlation;   // netem-style correlation, scaled to 2^32
	__u8 family;         // 0 = any, 4, 6 (set when a CIDR is given)
	__u8 prefixlen;
	__u8 proto;          // 0 = any, IPPROTO_TCP, IPPROTO_UDP, PROTO_ICMP_ANY
	__u8 dirs;           // DIR_EGRESS | DIR_INGRESS
	__u8 action;
	__u8 nports;
	__u8 pad[2];
	__u8 addr[16];       // peer network, IPv4 in the first 4 bytes
	__u16 port_lo[MAX_PORT_RANGES];
	__u16 port_hi[MAX_PORT_RANGES];
};

// Layout shared with ebpf/src/rule.rs (RawCounters).
struct counters {
	__u64 matched;
	__u64 dropped;
	__u64 affected;
};

// A pod address. Layout shared with ebpf/src/lib.rs (AddrKey).
struct addr_key {
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};

// pod address -> sandbox slot
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SANDBOXES * 4);
	__type(key, struct addr_key);
	__type(value, __u32);
} nf_sandboxes SEC(".maps");

// slot * RULES_PER_SANDBOX + i -> rule
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_SANDBOXES * RULES_PER_SANDBOX);
	__type(key, __u32);
	__type(value, struct rule);
} nf_rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_SANDBOXES * RULES_PER_SANDBOX);
	__type(key, __u32);
	__type(value, struct counters);
} nf_counters SEC(".maps");

// Last random draw per rule and CPU, for correlated loss.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_SANDBOXES * RULES_PER_SANDBOX);
	__type(key, __u32);
	__type(value, __u32);
} nf_last_draw SEC(".maps");

struct pkt {
	__u8 family;
	__u8 proto;
	__u8 has_ports;
	__u8 peer[16];
	struct addr_key local;
	__u16 sport;
	__u16 dport;
};

static __always_inline int parse(struct __sk_buff *skb, int ingress, struct pkt *p)
{
	__u32 l4off;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
			return -1;
		p->family = 4;
		p->proto = ip.protocol;
		__builtin_memcpy(p->peer, ingress ? &ip.saddr : &ip.daddr, 4);
		__builtin_memcpy(p->local.addr, ingress ? &ip.daddr : &ip.saddr, 4);
		// Non-first fragments carry no L4 header.
		if (ip.frag_off & bpf_htons(0x1fff))
			return 0;
		l4off = ETH_HLEN + ((__u32)ip.ihl & 0xf) * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
			return -1;
		p->family = 6;
		p->proto = ip6.nexthdr;
		__builtin_memcpy(p->peer, ingress ? &ip6.saddr : &ip6.daddr, 16);
		__builtin_memcpy(p->local.addr, ingress ? &ip6.daddr : &ip6.saddr, 16);
		l4off = ETH_HLEN + sizeof(ip6);
	} else {
		return -1;
	}
	if (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP) {
		__u16 ports[2];
		if (bpf_skb_load_bytes(skb, l4off, ports, sizeof(ports)) == 0) {
			p->sport = bpf_ntohs(ports[0]);
			p->dport = bpf_ntohs(ports[1]);
			p->has_ports = 1;
		}
	}
	return 0;
}

static __always_inline int port_in(const struct rule *r, __u16 port)
{
#pragma unroll
	for (int i = 0; i < MAX_PORT_RANGES; i++) {
		if (i >= r->nports)
			break;
		if (port >= r->port_lo[i] && port <= r->port_hi[i])
			return 1;
	}
	return 0;
}

static __always_inline int rule_matches(const struct rule *r, const struct pkt *p, __u8 dir)
{
	if (!(r->dirs & dir))
		return 0;
	if (r->family && r->family != p->family)
		return 0;
	if (r->proto) {
		if (r->proto == PROTO_ICMP_ANY) {
			if (p->proto != IPPROTO_ICMP && p->proto != IPPROTO_ICMPV6)
				return 0;
		} else if (r->proto != p->proto) {
			return 0;
		}
	}
	if (r->family) {
		__u32 bits = r->prefixlen;
		for (int i = 0; i < 16; i++) {
			if (bits == 0)
				break;
			__u8 mask = bits >= 8 ? 0xff : (__u8)(0xff << (8 - bits));
			if ((p->peer[i] & mask) != (r->addr[i] & mask))
				return 0;
			bits = bits >= 8 ? bits - 8 : 0;
		}
	}
	if (r->nports) {
		if (!p->has_ports)
			return 0;
		if (!port_in(r, p->sport) && !port_in(r, p->dport))
			return 0;
	}
	return 1;
}

// netem's correlated draw: mix the new random value with the previous one.
static __always_inline __u32 draw(const struct rule *r, __u32 idx)
{
	__u32 value = bpf_get_prandom_u32();
	if (!r->correlation)
		return value;
	__u32 *last = bpf_map_lookup_elem(&nf_last_draw, &idx);
	if (!last)
		return value;
	__u64 rho = r->correlation;
	__u32 answer = (__u32)(((__u64)value * ((1ULL << 32) - rho) + (__u64)(*last) * rho) >> 32);
	*last = answer;
	return answer;
}

static __always_inline int handle(struct __sk_buff *skb, int ingress)
{
	struct pkt p = {};
	if (parse(skb, ingress, &p) < 0)
		return TC_ACT_OK;
	p.local.family = p.family;
	__u32 *slot = bpf_map_lookup_elem(&nf_sandboxes, &p.local);
	if (!slot)
		return TC_ACT_OK;
	__u32 base = *slot;
	if (base >= MAX_SANDBOXES)
		return TC_ACT_OK;
	base *= RULES_PER_SANDBOX;

	__u8 dir = ingress ? DIR_INGRESS : DIR_EGRESS;
	__u64 now = bpf_ktime_get_boot_ns();
	for (__u32 i = 0; i < RULES_PER_SANDBOX; i++) {
		__u32 idx = base + i;
		struct rule *r = bpf_map_lookup_elem(&nf_rules, &idx);
		if (!r || r->deadline_ns <= now)
			continue;
		if (!rule_matches(r, &p, dir))
			continue;
		struct counters *c = bpf_map_lookup_elem(&nf_counters, &idx);
		if (c)
			c->matched++;
		int drop = 0;
		if (r->action == ACTION_BLACKHOLE)
			drop = 1;
		else if (r->action == ACTION_LOSS)
			drop = (__u64)draw(r, idx) < r->threshold;
		if (drop) {
			if (c)
				c->dropped++;
			// Egress: STOLEN hides the drop from the sending socket, as a
			// real network (and netem) does; SHOT would return NET_XMIT_DROP
			// and make TCP/ping see local congestion (KERNEL-NOTES).
			return ingress ? TC_ACT_SHOT : TC_ACT_STOLEN;
		}
	}
	return TC_ACT_OK;
}

SEC("classifier")
int nf_egress(struct __sk_buff *skb)
{
	return handle(skb, 0);
}

SEC("classifier")
int nf_ingress(struct __sk_buff *skb)
{
	return handle(skb, 1);
}

char _license[] SEC("license") = "GPL";
