// SPDX-License-Identifier: GPL-2.0
//
// Host probe of abi.h, compiled and run by build.rs. It prints the shared
// constants and the layout of the shared structs, one item a line:
//
//   const <rust type> <C name> <value>
//   struct <C name> <Rust type> <size>
//   field <name> <offset> <size>        (the struct's fields, in order)
//   end
//
// and build.rs turns them into OUT_DIR/abi.rs: Rust constants and
// compile-time layout assertions on the hand-written Rust structs.
//
// Every `#define NF_*` of abi.h must be listed below (build.rs fails
// otherwise), and every field of a listed struct, in order: the probe fails
// when the listed fields leave a byte of the struct uncovered.

#include <stddef.h>
#include <stdio.h>

#include "abi.h"

#define STRINGIFY(x) #x
#define EXPAND_STRINGIFY(x) STRINGIFY(x)

static int failed;

// An integer constant, checked at compile time to fit its Rust type.
#define INT_CONST(cname, value, rtype, max)                                        \
	do {                                                                       \
		_Static_assert((value) >= 0 && (unsigned long long)(value) <= (max), \
			       cname " does not fit in " rtype);                   \
		printf("const %s %s %llu\n", rtype, cname, (unsigned long long)(value)); \
	} while (0)
#define U8(name) INT_CONST(#name, name, "u8", 0xffULL)
#define U32(name) INT_CONST(#name, name, "u32", 0xffffffffULL)
#define USIZE(name) INT_CONST(#name, name, "usize", 0xffffffffULL)
// A name (a C identifier): the Rust constant is its text.
#define NAME(name) printf("const str %s %s\n", #name, EXPAND_STRINGIFY(name))

static const char *cur_struct;
static size_t cur_end;

static void begin(const char *cname, const char *rust, size_t size)
{
	cur_struct = cname;
	cur_end = 0;
	printf("struct %s %s %zu\n", cname, rust, size);
}

static void field(const char *name, size_t offset, size_t size)
{
	if (offset < cur_end) {
		fprintf(stderr, "abi_probe: struct %s: field %s is listed out of order\n",
			cur_struct, name);
		failed = 1;
	} else if (offset > cur_end) {
		fprintf(stderr,
			"abi_probe: struct %s: bytes %zu..%zu (before %s) are in no listed field: "
			"list the field in abi_probe.c, or, if it is padding, make it an explicit "
			"field in abi.h\n",
			cur_struct, cur_end, offset, name);
		failed = 1;
	}
	cur_end = offset + size;
	printf("field %s %zu %zu\n", name, offset, size);
}

static void end(size_t size)
{
	if (cur_end != size) {
		fprintf(stderr,
			"abi_probe: struct %s: bytes %zu..%zu (at the end) are in no listed field: "
			"list the field in abi_probe.c, or, if it is padding, make it an explicit "
			"field in abi.h\n",
			cur_struct, cur_end, size);
		failed = 1;
	}
	printf("end\n");
}

#define STRUCT(cname, rust) begin(#cname, #rust, sizeof(struct cname))
#define FIELD(cname, name) \
	field(#name, offsetof(struct cname, name), sizeof(((struct cname *)0)->name))
#define END(cname) end(sizeof(struct cname))

int main(void)
{
	U32(NF_MAX_SANDBOXES);
	U32(NF_RULES_PER_SANDBOX);
	USIZE(NF_MAX_PORT_RANGES);
	U8(NF_DIR_EGRESS);
	U8(NF_DIR_INGRESS);
	U8(NF_ACTION_LOSS);
	U8(NF_ACTION_BLACKHOLE);
	U8(NF_ACTION_CORRUPT);
	U8(NF_ACTION_DUPLICATE);
	U8(NF_ACTION_RATE);
	U8(NF_ACTION_LOSS_GE);
	U8(NF_FAMILY_IPV4);
	U8(NF_FAMILY_IPV6);
	U8(NF_PROTO_ICMP_ANY);
	U32(NF_DUP_MARK);
	NAME(NF_EGRESS_PROGRAM);
	NAME(NF_INGRESS_PROGRAM);
	NAME(NF_SANDBOXES_MAP);
	NAME(NF_RULES_MAP);
	NAME(NF_COUNTERS_MAP);
	NAME(NF_LAST_DRAW_MAP);
	NAME(NF_STATE_MAP);

	STRUCT(rule, RawRule);
	FIELD(rule, deadline_ns);
	FIELD(rule, threshold);
	FIELD(rule, correlation);
	FIELD(rule, family);
	FIELD(rule, prefixlen);
	FIELD(rule, proto);
	FIELD(rule, dirs);
	FIELD(rule, action);
	FIELD(rule, nports);
	FIELD(rule, pad);
	FIELD(rule, addr);
	FIELD(rule, port_lo);
	FIELD(rule, port_hi);
	FIELD(rule, pad2);
	FIELD(rule, bytes_per_sec);
	FIELD(rule, burst_bytes);
	FIELD(rule, fill_ns);
	FIELD(rule, ge_p);
	FIELD(rule, ge_r);
	FIELD(rule, ge_bad_loss);
	FIELD(rule, ge_good_loss);
	END(rule);

	STRUCT(rule_state, RawState);
	FIELD(rule_state, lock);
	FIELD(rule_state, ge_bad);
	FIELD(rule_state, tokens);
	FIELD(rule_state, last_ns);
	END(rule_state);

	STRUCT(counters, RawCounters);
	FIELD(counters, matched);
	FIELD(counters, dropped);
	FIELD(counters, affected);
	END(counters);

	STRUCT(addr_key, AddrKey);
	FIELD(addr_key, family);
	FIELD(addr_key, pad);
	FIELD(addr_key, addr);
	END(addr_key);

	return failed;
}
