// SPDX-License-Identifier: GPL-2.0
//
// netfault's tc datapath. One object is loaded once per node agent and the
// same two programs are attached (legacy clsact, direct-action) on every
// enrolled pod interface, inside the pod's network namespace.
//
// What it owns: matching packets against a pod's fault rules and acting on
// them (loss, Gilbert-Elliott loss, blackhole, rate, corrupt, duplicate),
// plus per-rule counters and per-rule state (token bucket, GE chain).
// What it must not do: keep any state the agent cannot rebuild, or let a rule
// act after its deadline. Rules carry an absolute CLOCK_BOOTTIME deadline that
// is checked here, so a fault ends on time even if the agent is dead
// (docs/design.md, kernel facts: legacy clsact filters outlive the agent).
//
// Pods are told apart by their own IP addresses (source on egress,
// destination on ingress), not by ifindex: every pod's eth0 has ifindex 2
// (docs/design.md, kernel facts). bpf_get_netns_cookie() was tried and rejected: on this
// kernel it reports the pod's netns on egress but not on ingress.

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

// The records, codes and names shared with the agent (the one definition).
#include "abi.h"

// pod address -> sandbox slot
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NF_MAX_SANDBOXES * 4);
	__type(key, struct addr_key);
	__type(value, __u32);
} NF_SANDBOXES_MAP SEC(".maps");

// A map with one entry per rule slot, at slot * NF_RULES_PER_SANDBOX + i
// (the agent's Datapath::index).
#define PER_RULE_MAP(map_type, value_type) \
	struct { \
		__uint(type, map_type); \
		__uint(max_entries, NF_MAX_SANDBOXES * NF_RULES_PER_SANDBOX); \
		__type(key, __u32); \
		__type(value, value_type); \
	}

PER_RULE_MAP(BPF_MAP_TYPE_ARRAY, struct rule) NF_RULES_MAP SEC(".maps");
PER_RULE_MAP(BPF_MAP_TYPE_PERCPU_ARRAY, struct counters) NF_COUNTERS_MAP SEC(".maps");
// Last random draw per rule and CPU, for correlated loss.
PER_RULE_MAP(BPF_MAP_TYPE_PERCPU_ARRAY, __u32) NF_LAST_DRAW_MAP SEC(".maps");
PER_RULE_MAP(BPF_MAP_TYPE_ARRAY, struct rule_state) NF_STATE_MAP SEC(".maps");

struct pkt {
	__u8 family;
	__u8 proto;
	__u8 has_ports;
	__u8 has_l4;         // l4off points at a TCP/UDP/other L4 header
	__u8 peer[16];
	struct addr_key local;
	__u16 sport;
	__u16 dport;
	__u32 l4off;
	__u32 l4len;         // from the IP header's length fields
};

// IPv6 extension headers walked before giving up on finding the L4
// header: the verifier needs a bound, and the delay engine's parser
// (agent/src/backend/nfqueue/engine.rs, skip_ipv6_extensions) uses the same.
#define IPV6_MAX_EXT_HEADERS 8

// Walks the IPv6 extension headers from next header `next` at *off (just
// after the fixed header) to the upper-layer header, as nft's `meta l4proto`
// and the delay engine do: hop-by-hop (0), routing (43) and destination
// options (60) are (len + 1) * 8 bytes, AH (51) is (len + 2) * 4, a fragment
// header (44) is 8. Sets *proto to the upper-layer protocol and *off to its
// header. Returns 1 when *off is a transport header, 0 when there is none
// to read: a non-first fragment (*proto is then the fragment's protocol, as
// for IPv4), ESP (50) and "no next header" (59), a truncated header, or more
// than IPV6_MAX_EXT_HEADERS of them.
static __always_inline int skip_ipv6_extensions(struct __sk_buff *skb, __u8 next, __u32 *off,
						__u8 *proto)
{
	__u32 at = *off;
	for (int i = 0; i < IPV6_MAX_EXT_HEADERS; i++) {
		// Every extension header starts with (next header, length).
		__u8 h[4];
		if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS) {
			if (bpf_skb_load_bytes(skb, at, h, 2) < 0)
				goto truncated;
			next = h[0];
			at += ((__u32)h[1] + 1) * 8;
		} else if (next == IPPROTO_AH) {
			if (bpf_skb_load_bytes(skb, at, h, 2) < 0)
				goto truncated;
			next = h[0];
			at += ((__u32)h[1] + 2) * 4;
		} else if (next == IPPROTO_FRAGMENT) {
			// next header, reserved, offset (13 bits) + flags (3 bits).
			if (bpf_skb_load_bytes(skb, at, h, 4) < 0)
				goto truncated;
			next = h[0];
			at += 8;
			if ((((__u32)h[2] << 8) | h[3]) >> 3) {
				*proto = next;
				*off = at;
				return 0;
			}
		} else {
			*proto = next;
			*off = at;
			return next != IPPROTO_ESP && next != IPPROTO_NONE;
		}
	}
truncated:
	*proto = next;
	*off = at;
	return 0;
}

static __always_inline int parse(struct __sk_buff *skb, int ingress, struct pkt *p)
{
	__u32 l4off;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
			return -1;
		p->family = NF_FAMILY_IPV4;
		p->proto = ip.protocol;
		__builtin_memcpy(p->peer, ingress ? &ip.saddr : &ip.daddr, 4);
		__builtin_memcpy(p->local.addr, ingress ? &ip.daddr : &ip.saddr, 4);
		l4off = ETH_HLEN + ((__u32)ip.ihl & 0xf) * 4;
		__u32 tot = bpf_ntohs(ip.tot_len);
		p->l4off = l4off;
		p->l4len = tot > l4off - ETH_HLEN ? tot - (l4off - ETH_HLEN) : 0;
		// Non-first fragments carry no L4 header.
		if (ip.frag_off & bpf_htons(0x1fff))
			return 0;
		p->has_l4 = 1;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
			return -1;
		p->family = NF_FAMILY_IPV6;
		__builtin_memcpy(p->peer, ingress ? &ip6.saddr : &ip6.daddr, 16);
		__builtin_memcpy(p->local.addr, ingress ? &ip6.daddr : &ip6.saddr, 16);
		__u32 end = ETH_HLEN + sizeof(ip6) + bpf_ntohs(ip6.payload_len);
		l4off = ETH_HLEN + sizeof(ip6);
		int has_l4 = skip_ipv6_extensions(skb, ip6.nexthdr, &l4off, &p->proto);
		p->l4off = l4off;
		p->l4len = end > l4off ? end - l4off : 0;
		if (!has_l4)
			return 0;
		p->has_l4 = 1;
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
	for (int i = 0; i < NF_MAX_PORT_RANGES; i++) {
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
		if (r->proto == NF_PROTO_ICMP_ANY) {
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
	__u32 *last = bpf_map_lookup_elem(&NF_LAST_DRAW_MAP, &idx);
	if (!last)
		return value;
	__u64 rho = r->correlation;
	__u32 answer = (__u32)(((__u64)value * ((1ULL << 32) - rho) + (__u64)(*last) * rho) >> 32);
	*last = answer;
	return answer;
}

// 1 when the receiver will not verify this TCP/UDP segment's checksum, so a
// flipped bit would reach the application: the checksum was never computed.
// A CHECKSUM_PARTIAL skb (every socket's send on veth, which offloads
// checksums and carries CHECKSUM_PARTIAL across to the peer) holds only the
// pseudo-header sum in the check field, and receivers trust CHECKSUM_PARTIAL
// without looking. A UDP/IPv4 check of 0 means "no checksum".
static __always_inline int csum_unverified(struct __sk_buff *skb, const struct pkt *p)
{
	__u32 at = p->l4off + (p->proto == IPPROTO_TCP ? 16 : 6);
	__u8 ck[2];
	if (bpf_skb_load_bytes(skb, at, ck, 2) < 0)
		return 1;
	__u32 check = ((__u32)ck[0] << 8) | ck[1];
	if (p->proto == IPPROTO_UDP && check == 0)
		return 1;
	// Pseudo-header sum, in host order over big-endian 16-bit words. The
	// sum commutes, so peer/local order does not matter.
	__u64 sum = (__u64)p->proto + p->l4len;
	int words = p->family == NF_FAMILY_IPV4 ? 2 : 8;
	for (int i = 0; i < 8; i++) {
		if (i >= words)
			break;
		sum += ((__u32)p->peer[2 * i] << 8) | p->peer[2 * i + 1];
		sum += ((__u32)p->local.addr[2 * i] << 8) | p->local.addr[2 * i + 1];
	}
#pragma unroll
	for (int i = 0; i < 4; i++)
		sum = (sum & 0xffff) + (sum >> 16);
	return check == (__u32)sum;
}

#define CORRUPT_NONE 0
#define CORRUPT_FLIPPED 1
#define CORRUPT_DISCARD 2

// netem's corrupt: flip one random bit, here inside the L4 segment (header
// and payload), so that the receiver's L4 checksum check discards the packet
// on IPv4 and IPv6 alike. BPF_F_RECOMPUTE_CSUM keeps a CHECKSUM_COMPLETE
// skb->csum in step with the new bytes (so it reflects the flip), and
// BPF_CSUM_LEVEL_RESET turns CHECKSUM_UNNECESSARY into CHECKSUM_NONE, so the
// receiver computes the checksum instead of trusting the previous hop. A
// packet whose checksum nobody will compute (see csum_unverified) cannot be
// corrupted detectably from here; it gets the outcome the receiver's check
// would give it after a bit flip on the wire: it is discarded.
static __always_inline int corrupt(struct __sk_buff *skb, const struct pkt *p)
{
	__u32 off = p->l4off;
	__u32 len = p->l4len;
	if (off >= skb->len || len == 0)
		return CORRUPT_NONE;
	if (len > skb->len - off)
		len = skb->len - off;
	if (p->has_l4 && (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP) &&
	    csum_unverified(skb, p))
		return CORRUPT_DISCARD;
	if (len > 0xffff)
		len = 0xffff;
	__u32 bit = bpf_get_prandom_u32() % (len * 8);
	__u32 at = off + bit / 8;
	__u8 b;
	if (bpf_skb_load_bytes(skb, at, &b, 1) < 0)
		return CORRUPT_NONE;
	b ^= (__u8)(1 << (bit & 7));
	if (bpf_skb_store_bytes(skb, at, &b, 1, BPF_F_RECOMPUTE_CSUM) < 0)
		return CORRUPT_NONE;
	bpf_csum_level(skb, BPF_CSUM_LEVEL_RESET);
	return CORRUPT_FLIPPED;
}

// Token bucket policer, shared by every CPU (a spin lock, not per-CPU
// state, so the rate is the rule's and not the CPU's). 1 = over the limit.
static __always_inline int rate_drop(const struct rule *r, __u32 idx, __u32 len, __u64 now)
{
	struct rule_state *st = bpf_map_lookup_elem(&NF_STATE_MAP, &idx);
	if (!st)
		return 0;
	__u64 cost = (__u64)len * 1000000000ULL;
	__u64 burst = r->burst_bytes * 1000000000ULL;
	__u64 fill = r->fill_ns;
	__u64 rate = r->bytes_per_sec;
	int drop = 0;
	bpf_spin_lock(&st->lock);
	__s64 tokens = (__s64)st->tokens;
	__u64 last = st->last_ns;
	if (last == 0) {
		tokens = (__s64)burst;
	} else if (now > last) {
		__u64 elapsed = now - last;
		if (elapsed >= fill)
			tokens = (__s64)burst;
		else
			tokens += (__s64)(elapsed * rate);
		if (tokens > (__s64)burst)
			tokens = (__s64)burst;
	} else {
		now = last;
	}
	// A packet passes while the bucket holds anything, and may take it
	// into debt: a TCP GSO super-packet (up to 64 KiB on veth) is never
	// larger than the bucket, yet the long-run rate stays the limit.
	if (tokens > 0)
		tokens -= (__s64)cost;
	else
		drop = 1;
	st->tokens = (__u64)tokens;
	st->last_ns = now;
	bpf_spin_unlock(&st->lock);
	return drop;
}

// netem's Gilbert-Elliott loss (loss_gilb_ell): the loss draw uses the state
// the packet found, then the chain moves. State is shared by every CPU.
static __always_inline int ge_drop(const struct rule *r, __u32 idx)
{
	__u64 move = bpf_get_prandom_u32();
	__u64 lose = bpf_get_prandom_u32();
	struct rule_state *st = bpf_map_lookup_elem(&NF_STATE_MAP, &idx);
	if (!st)
		return 0;
	int drop;
	bpf_spin_lock(&st->lock);
	if (st->ge_bad) {
		if (move < r->ge_r)
			st->ge_bad = 0;
		drop = lose < r->ge_bad_loss;
	} else {
		if (move < r->ge_p)
			st->ge_bad = 1;
		drop = lose < r->ge_good_loss;
	}
	bpf_spin_unlock(&st->lock);
	return drop;
}

// IPv6 neighbour discovery (ICMPv6 router/neighbour solicitation and
// advertisement, redirect: types 133-137) is IPv6's ARP, and no rule acts on
// it, as none acts on ARP (not IP, so never parsed). Dropping it would make a
// fault outlive its deadline: the kernel holds a pod's packets in the
// neighbour queue while resolution fails, and sends them (or gives up on the
// neighbour) on its own clock, not the rule's.
static __always_inline int is_neighbour_discovery(struct __sk_buff *skb, const struct pkt *p)
{
	if (p->family != NF_FAMILY_IPV6 || !p->has_l4 || p->proto != IPPROTO_ICMPV6)
		return 0;
	__u8 type;
	if (bpf_skb_load_bytes(skb, p->l4off, &type, 1) < 0)
		return 0;
	return type >= 133 && type <= 137;
}

static __always_inline int handle(struct __sk_buff *skb, int ingress)
{
	// A duplicate made below, back in this hook: take the bit off at once.
	int is_dup = 0;
	__u32 mark = skb->mark;
	if (mark & NF_DUP_MARK) {
		skb->mark = mark & ~NF_DUP_MARK;
		is_dup = 1;
	}
	struct pkt p = {};
	if (parse(skb, ingress, &p) < 0)
		return TC_ACT_OK;
	if (is_neighbour_discovery(skb, &p))
		return TC_ACT_OK;
	p.local.family = p.family;
	__u32 *slot = bpf_map_lookup_elem(&NF_SANDBOXES_MAP, &p.local);
	if (!slot)
		return TC_ACT_OK;
	__u32 base = *slot;
	if (base >= NF_MAX_SANDBOXES)
		return TC_ACT_OK;
	base *= NF_RULES_PER_SANDBOX;

	__u8 dir = ingress ? NF_DIR_INGRESS : NF_DIR_EGRESS;
	__u64 now = bpf_ktime_get_boot_ns();
	// Rules compose: every matching rule acts, in slot order. Once one drops
	// the packet, only duplicate rules still run: the copy is a packet of its
	// own that meets every rule (but is not duplicated again), so loss and
	// duplication compose whatever the rules' order.
	int dropping = 0;
	for (__u32 i = 0; i < NF_RULES_PER_SANDBOX; i++) {
		__u32 idx = base + i;
		struct rule *r = bpf_map_lookup_elem(&NF_RULES_MAP, &idx);
		if (!r || r->deadline_ns <= now)
			continue;
		__u8 action = r->action;
		if (action == NF_ACTION_DUPLICATE ? is_dup : dropping)
			continue;
		if (!rule_matches(r, &p, dir))
			continue;
		struct counters *c = bpf_map_lookup_elem(&NF_COUNTERS_MAP, &idx);
		if (c)
			c->matched++;
		int drop = 0;
		if (action == NF_ACTION_BLACKHOLE) {
			drop = 1;
		} else if (action == NF_ACTION_LOSS) {
			drop = (__u64)draw(r, idx) < r->threshold;
		} else if (action == NF_ACTION_LOSS_GE) {
			drop = ge_drop(r, idx);
		} else if (action == NF_ACTION_RATE) {
			drop = rate_drop(r, idx, skb->len, now);
		} else if (action == NF_ACTION_CORRUPT) {
			if ((__u64)draw(r, idx) < r->threshold) {
				int res = corrupt(skb, &p);
				if (res != CORRUPT_NONE && c)
					c->affected++;
				if (res == CORRUPT_DISCARD)
					dropping = 1;
			}
		} else if (action == NF_ACTION_DUPLICATE) {
			if ((__u64)draw(r, idx) < r->threshold) {
				skb->mark |= NF_DUP_MARK;
				long err = bpf_clone_redirect(skb, skb->ifindex,
							      ingress ? BPF_F_INGRESS : 0);
				skb->mark &= ~NF_DUP_MARK;
				if (err == 0 && c)
					c->affected++;
			}
		}
		if (drop) {
			if (c)
				c->dropped++;
			dropping = 1;
		}
	}
	// Egress: STOLEN hides the drop from the sending socket, as a real
	// network (and netem) does; SHOT would return NET_XMIT_DROP and make
	// TCP/ping see local congestion (docs/design.md, kernel facts).
	if (dropping)
		return ingress ? TC_ACT_SHOT : TC_ACT_STOLEN;
	return TC_ACT_OK;
}

SEC("classifier")
int NF_EGRESS_PROGRAM(struct __sk_buff *skb)
{
	return handle(skb, 0);
}

SEC("classifier")
int NF_INGRESS_PROGRAM(struct __sk_buff *skb)
{
	return handle(skb, 1);
}

char _license[] SEC("license") = "GPL";
