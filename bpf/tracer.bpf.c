// SPDX-License-Identifier: GPL-2.0
/*
 * tracer: every dropped packet, with where and why.
 *
 * One handler (handle_drop) runs for each call of the kfree_skb tracepoint,
 * reached through whichever program type the running kernel accepts:
 * tp_btf (preferred), raw_tp, or the classic tracepoint (needs tracefs).
 * It parses the packet just far enough to apply the user's filter in the
 * kernel, then copies headers, conntrack state, the kernel stack and any
 * netfilter context into one struct drop_event on a ring buffer.
 *
 * Optional programs on nf_hook_slow, nft_do_chain, ipt_do_table and
 * ip6t_do_table (fentry/fexit, or kprobe/kretprobe) record which hook,
 * table and base chain a packet is in, keyed by the skb address, so the
 * drop handler can attach it. The loader enables only the set the kernel
 * accepts; all of them are optional.
 *
 * Every kernel field is read with BPF_CORE_READ so libbpf relocates it
 * against the running kernel's BTF; fields that only exist with some
 * kernel configs are guarded with bpf_core_field_exists.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>
#include "tracer.h"

char LICENSE[] SEC("license") = "GPL";

/* The enums of tracer.h that no map, program or struct field has as its type.
 * clang writes only the types that something in the object refers to into its
 * BTF, and Python reads these enums' values from there (tracer/bpf/layout.py,
 * TRACER_ENUMS): this otherwise unused global refers to all of them, so each
 * one is kept. It costs one zero-filled 8-byte .bss map per loaded object. */
struct tracer_btf_enums {
	enum tracer_limits limits;
	enum tracer_frag_flags frag_flags;
	enum tracer_ct_info ct_info;
	enum nf_source nf_source;
	enum nf_backend nf_backend;
	enum filter_flags filter_flags;
	enum filter_reason filter_reason;
	enum drop_counter drop_counter;
	enum tracer_record record;
	enum tracer_counted counted;
	enum flow_seen_flags flow_seen_flags;
	enum tracer_flow_hook flow_hook;
	enum tracer_related related;
	enum tracer_match match;
};
const struct tracer_btf_enums *tracer_btf_enums __attribute__((unused));

/* Constants that are #defines in the kernel, so absent from BTF. */
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_ARP 0x0806
#define ARPHRD_ETHER 1        /* include/uapi/linux/if_arp.h */
#define AF_INET 2             /* include/linux/socket.h: nf_conntrack_tuple src.l3num */
#define AF_INET6 10
#define IP_OFFSET_MASK 0x1fff
#define IP_MF 0x2000
/* include/net/ipv6.h */
#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_AUTH 51
#define NEXTHDR_DEST 60
#define NFCT_INFOMASK 7UL
#define CT_INFO_UNTRACKED 7
#define SKB_HDR_UNSET 0xffff  /* (u16)~0U: header offset never set */
#define IPPROTO_ICMPV6 58     /* a #define in include/uapi/linux/in6.h */
#define EEXIST 17             /* include/uapi/asm-generic/errno-base.h */

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20); /* the loader may resize before load */
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct filter_cfg);
} filter SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* Scratch space: a drop_event is too large for the 512-byte BPF stack. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct drop_event);
} scratch SEC(".maps");

/* ------------------------------------------------------------ counting maps
 *
 * Counting runs in epochs. The drop program reads the current epoch from
 * `epoch` and counts into the maps of its parity (_0 or _1). To close an
 * epoch, Python writes the next number, waits for every program run that
 * may still hold the old one (membarrier(MEMBARRIER_CMD_GLOBAL) is
 * synchronize_rcu(), and BPF tracing programs run under rcu_read_lock()),
 * then drains the old parity's maps with lookup-and-delete: no program
 * writes them any more, so nothing counted there is ever lost or counted
 * twice. A map written while being read would need both, which BPF hash
 * maps do not give (an increment through a pointer to a just-deleted
 * element is lost). */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} epoch SEC(".maps");

/* Prealloc'ed hashes: an insert never allocates in the drop path, and a
 * full map refuses (-E2BIG) instead of evicting, which the fall-back to a
 * coarse key relies on. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TRACER_FLOW_ENTRIES);
	__type(key, struct flow_key);
	__type(value, struct flow_seen);
} flow_seen SEC(".maps");

struct flow_count_map {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TRACER_FLOW_ENTRIES);
	__type(key, struct flow_key);
	__type(value, struct flow_count);
};

struct flow_count_map flow_counts_0 SEC(".maps");
struct flow_count_map flow_counts_1 SEC(".maps");

struct coarse_count_map {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TRACER_COARSE_ENTRIES);
	__type(key, struct flow_key);
	__type(value, struct flow_count);
};

struct coarse_count_map coarse_counts_0 SEC(".maps");
struct coarse_count_map coarse_counts_1 SEC(".maps");

/* Index: epoch parity. Per CPU, so it needs no atomics; Python sums. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct flow_count);
} overflow_counts SEC(".maps");

/* skb address -> netfilter context recorded by the hook programs. LRU, so
 * packets that leave netfilter without our exit program seeing them (a
 * hook module unloaded mid-flight) cannot fill it. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct nf_info);
} skb_nf SEC(".maps");

/* kretprobes see no arguments: the entry probe leaves the skb here,
 * keyed by CPU and thread (the idle thread is pid 0 on every CPU). */
struct stash_key {
	__u32 cpu;
	__u32 tid;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct stash_key);
	__type(value, __u64);
} kprobe_stash SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &which);

	if (v)
		*v += 1;
}

/* Whether the ring buffer has no room for one more drop_event. Checked
 * before the stack walk, which is most of a drop's cost: when Python falls
 * behind, a flood would otherwise pay for every stack only to have
 * bpf_ringbuf_output() refuse the record. Assumes the kernel's rule that a
 * record takes its size plus BPF_RINGBUF_HDR_SZ rounded up to 8 (sizeof
 * (struct drop_event) is a multiple of 8) and fits while the unconsumed data
 * (BPF_RB_AVAIL_DATA: producer minus consumer position) plus it stays below
 * the ring size. Both values race with the consumer and other CPUs, so this
 * is a hint: a record refused here might have fitted a moment later (counted
 * lost, as it would have been a moment earlier), and one let through may
 * still not fit (then bpf_ringbuf_output() fails and counts it). */
_Static_assert(sizeof(struct drop_event) % 8 == 0, "ring_full() assumes records need no padding");

static __always_inline int ring_full(void)
{
	__u64 need = sizeof(struct drop_event) + BPF_RINGBUF_HDR_SZ;

	return bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) + need >=
	       bpf_ringbuf_query(&events, BPF_RB_RING_SIZE);
}

/* ------------------------------------------------------------ parsing */

/* Network namespace of the packet. Assumes skb->dev (set on receive and in
 * ip_output), else the owning socket (locally sent packets before routing
 * set skb->dev), else the route's device. */
static __always_inline __u32 skb_netns(struct sk_buff *skb, struct net_device *dev)
{
	struct sock *sk;

	if (dev)
		return BPF_CORE_READ(dev, nd_net.net, ns.inum);
	sk = BPF_CORE_READ(skb, sk);
	if (sk)
		return BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	return 0;
}

/* skb->dev, or for a locally sent packet that has a route but no device yet
 * (the output hook runs before ip_output sets skb->dev), the route's device.
 * Assumes _skb_refdst holds a dst_entry pointer with flag bit 0. */
static __always_inline struct net_device *skb_device(struct sk_buff *skb)
{
	struct net_device *dev = BPF_CORE_READ(skb, dev);
	struct dst_entry *dst;

	if (dev)
		return dev;
	dst = (struct dst_entry *)(BPF_CORE_READ(skb, _skb_refdst) & ~1UL);
	if (!dst)
		return NULL;
	return BPF_CORE_READ(dst, dev);
}

/* Copies the IPv4 header and returns the transport offset from skb->head,
 * or 0 when there is no transport header in this packet (a non-first
 * fragment). */
static __always_inline __u32 parse_ipv4(struct drop_event *e, unsigned char *head, __u32 nh)
{
	struct iphdr ip;
	__u16 frag;

	if (bpf_probe_read_kernel(&ip, sizeof(ip), head + nh))
		return 0;
	if (ip.version != 4 || ip.ihl < 5)
		return 0;
	bpf_probe_read_kernel(e->l3, TRACER_L3_BYTES, head + nh);
	e->l3_off_valid = 1;
	e->l4proto = ip.protocol;
	e->frag_id = bpf_ntohs(ip.id);
	frag = bpf_ntohs(ip.frag_off);
	e->frag_off = frag & IP_OFFSET_MASK;
	if (frag & IP_MF)
		e->frag_flags |= TRACER_FRAG_MORE;
	if (frag & (IP_MF | IP_OFFSET_MASK))
		e->frag_flags |= TRACER_FRAG_IS_FRAGMENT;
	if (e->frag_off)
		return 0;
	return nh + ip.ihl * 4;
}

/* ipv6_ext_hdr() of the kernel minus NEXTHDR_NONE: the headers ipv6_find_hdr()
 * (which nftables uses for the transport offset) walks past. */
static __always_inline bool ipv6_ext(__u8 nexthdr)
{
	return nexthdr == NEXTHDR_HOP || nexthdr == NEXTHDR_ROUTING || nexthdr == NEXTHDR_FRAGMENT ||
	       nexthdr == NEXTHDR_AUTH || nexthdr == NEXTHDR_DEST;
}

/* Walks the IPv6 extension headers to the transport header, at most
 * TRACER_IPV6_MAX_EXT of them (a bounded loop, not unrolled: the verifier
 * checks each pass). Returns the transport offset from skb->head, or 0 when
 * the packet has no transport header here: a non-first fragment (offset in
 * its fragment header), a chain longer than the limit, or a header beyond
 * the linear data (`tail`). Every extension header is at least 8 bytes, so
 * each pass reads 8: the fragment header's identification is in its second
 * half.
 *
 * Global (not static): the verifier checks the walk once, on its own, with
 * unknown arguments. Inlined, how well it pruned the walk's states depended
 * on what the caller kept live across it: small changes elsewhere in the drop
 * program took it from 82k verified instructions to over the 1M limit (on
 * 6.18 and on Debian's 6.1). */
__noinline int parse_ipv6(struct drop_event *e, __u64 head_addr, __u32 nh, __u32 tail)
{
	unsigned char *head = (unsigned char *)head_addr;
	__u8 vers = 0, nexthdr;
	__u32 off;
	__u8 ext[8];
	int i;

	if (!e)
		return 0;
	bpf_probe_read_kernel(&vers, 1, head + nh);
	if ((vers >> 4) != 6)
		return 0;
	bpf_probe_read_kernel(e->l3, TRACER_L3_BYTES, head + nh);
	e->l3_off_valid = 1;
	nexthdr = e->l3[6];
	off = nh + 40;

	for (i = 0; i < TRACER_IPV6_MAX_EXT; i++) {
		if (!ipv6_ext(nexthdr))
			break;
		if (off + sizeof(ext) > tail || bpf_probe_read_kernel(ext, sizeof(ext), head + off)) {
			e->l4proto = nexthdr;
			return 0;
		}
		e->ext_count = i + 1;
		if (nexthdr == NEXTHDR_FRAGMENT) {
			__u16 frag = ((__u16)ext[2] << 8) | ext[3];

			e->frag_flags |= TRACER_FRAG_IS_FRAGMENT;
			if (frag & 1)
				e->frag_flags |= TRACER_FRAG_MORE;
			e->frag_off = frag >> 3;
			e->frag_id = ((__u32)ext[4] << 24) | ((__u32)ext[5] << 16) | ((__u32)ext[6] << 8) | ext[7];
			nexthdr = ext[0];
			if (e->frag_off) {      /* only the first fragment has a transport header */
				e->l4proto = nexthdr;
				return 0;
			}
			off += 8;
		} else if (nexthdr == NEXTHDR_AUTH) {   /* length in 4-byte units, minus 2 */
			off += ((__u32)ext[1] + 2) * 4;
			nexthdr = ext[0];
		} else {                                /* hop-by-hop, routing, destination options */
			off += ((__u32)ext[1] + 1) * 8;
			nexthdr = ext[0];
		}
	}
	e->l4proto = nexthdr;
	if (ipv6_ext(nexthdr)) {
		e->frag_flags |= TRACER_FRAG_EXT_LIMIT;
		return 0;
	}
	return off;
}

/* Reads the transport header when it lies in the linear data (skb->tail is
 * an offset from head on 64-bit kernels, NET_SKBUFF_DATA_USES_OFFSET). */
static __always_inline void copy_l4(struct drop_event *e, unsigned char *head, __u32 th, __u32 tail)
{
	__u32 avail;

	if (!th || th >= tail)
		return;
	avail = tail - th;
	if (avail > TRACER_L4_BYTES)
		avail = TRACER_L4_BYTES;
	if (avail < 4)
		return;
	/* Read the full window: bytes past tail are ignored via l4_len. */
	bpf_probe_read_kernel(e->l4, TRACER_L4_BYTES, head + th);
	e->l4_len = avail;
}

/* ------------------------------------------------------------ related packets
 *
 * What the filter also matches besides a packet's own headers (flow_match):
 * the packet an ICMP error quotes, the target of neighbour discovery and the
 * addresses of ARP. The functions that read or match them are global (not
 * static), so the verifier checks each once on its own, with unknown
 * arguments, instead of once more for every state the caller can be in: the
 * drop program's parsing paths already take most of the verifier's budget
 * (see TRACER_IPV6_MAX_EXT), and this keeps the related-packet code a fixed
 * cost. Their pointer arguments are map values of the struct's size (the
 * verifier checks that at each call); they must still test for NULL. */

/* ICMP types whose payload quotes the packet that caused them: destination
 * unreachable, source quench, redirect, time exceeded, parameter problem
 * (RFC 792); ICMPv6 destination unreachable, packet too big, time exceeded,
 * parameter problem (RFC 4443). */
static __always_inline bool icmp_error(__u8 proto, __u8 type)
{
	if (proto == IPPROTO_ICMP)
		return type == 3 || type == 4 || type == 5 || type == 11 || type == 12;
	if (proto == IPPROTO_ICMPV6)
		return type >= 1 && type <= 4;
	return false;
}

/* Neighbour discovery (RFC 4861): router solicitation/advertisement,
 * neighbour solicitation/advertisement, redirect. */
static __always_inline bool nd_type(__u8 type)
{
	return type >= 133 && type <= 137;
}

/* The quoted packet of an ICMP error whose payload starts at `in`: its IP
 * header (as l3[]) and the first TRACER_QUOTED_L4_BYTES of its transport
 * header, when the linear data holds them. The quoted IPv6 packet's
 * extension headers are not walked: its quoted_l4proto is then the first of
 * them and it has no ports. A quoted non-first IPv4 fragment has none either. */
static __always_inline void parse_quoted(struct drop_event *e, __u64 head, __u32 in, __u32 tail)
{
	__u32 ith, avail;
	__u8 vers;

	if (in + 20 > tail || bpf_probe_read_kernel(e->quoted_l3, TRACER_L3_BYTES, (void *)(head + in)))
		return;
	vers = e->quoted_l3[0] >> 4;
	if (vers == 4 && (e->quoted_l3[0] & 0x0f) >= 5) {
		e->quoted_l4proto = e->quoted_l3[9];
		e->related |= TRACER_REL_QUOTED;
		if (((e->quoted_l3[6] << 8) | e->quoted_l3[7]) & IP_OFFSET_MASK)
			return;
		ith = in + (e->quoted_l3[0] & 0x0f) * 4;
	} else if (vers == 6 && in + 40 <= tail) {
		e->quoted_l4proto = e->quoted_l3[6];
		e->related |= TRACER_REL_QUOTED;
		ith = in + 40;
	} else {
		__builtin_memset(e->quoted_l3, 0, sizeof(e->quoted_l3));
		return;
	}
	if (ith + 4 > tail)
		return;
	avail = tail - ith;
	if (avail > TRACER_QUOTED_L4_BYTES)
		avail = TRACER_QUOTED_L4_BYTES;
	if (!bpf_probe_read_kernel(e->quoted_l4, TRACER_QUOTED_L4_BYTES, (void *)(head + ith)))
		e->quoted_l4_len = avail;
}

/* An Ethernet/IPv4 ARP packet (the only kind that names IPv4 hosts): its
 * 28-byte header goes into l3[] (sender IP at 14, target IP at 24), and
 * l3_off_valid stays 0 since it is no IP header. */
static __always_inline void parse_arp(struct drop_event *e, __u64 head, __u32 nh, __u32 tail)
{
	if (nh + 28 > tail || bpf_probe_read_kernel(e->l3, 28, (void *)(head + nh)))
		return;
	if (e->l3[0] == 0 && e->l3[1] == ARPHRD_ETHER && e->l3[2] == (ETH_P_IP >> 8) &&
	    e->l3[3] == (ETH_P_IP & 0xff) && e->l3[4] == 6 && e->l3[5] == 4)
		e->related |= TRACER_REL_ARP;
	else
		__builtin_memset(e->l3, 0, 28);
}

/* Reads an ARP packet's addresses for the filter (parse_arp). */
__noinline int parse_related_arp(struct drop_event *e, __u64 head, __u32 nh, __u32 tail)
{
	if (e)
		parse_arp(e, head, nh, tail);
	return 0;
}

/* Reads what the filter matches besides the IP headers parse_packet copied:
 * `th` is the transport offset (0: none), all offsets from skb->head. It
 * takes no network offset: keeping that live across the IPv6 extension
 * header walk made Debian 6.1's verifier stop pruning the walk (raw_tp
 * reached the 1M instruction limit). */
__noinline int parse_related(struct drop_event *e, __u64 head, __u32 th, __u32 tail)
{
	__u8 type;

	if (!e || !e->l3_off_valid || !th || e->l4_len < 8)
		return 0;
	type = e->l4[0];
	if (e->l4proto == IPPROTO_ICMPV6 && type >= 135 && type <= 137) {
		/* NS, NA and redirect carry the target after 4 reserved bytes. */
		if (th + 24 <= tail && !bpf_probe_read_kernel(e->nd_target, 16, (void *)(head + th + 8)))
			e->related |= TRACER_REL_ND;
		return 0;
	}
	if (icmp_error(e->l4proto, type))
		parse_quoted(e, head, th + 8, tail);
	return 0;
}

static __always_inline void parse_packet(struct drop_event *e, struct sk_buff *skb)
{
	unsigned char *head = BPF_CORE_READ(skb, head);
	__u16 nh = BPF_CORE_READ(skb, network_header);
	__u32 tail = BPF_CORE_READ(skb, tail);
	__u32 th = 0;

	e->l3proto = bpf_ntohs(BPF_CORE_READ(skb, protocol));
	if (nh == SKB_HDR_UNSET || !head)
		return;
	if (e->l3proto == ETH_P_ARP) {
		parse_related_arp(e, (__u64)head, nh, tail);
		return;
	}
	if (e->l3proto == ETH_P_IP)
		th = parse_ipv4(e, head, nh);
	else if (e->l3proto == ETH_P_IPV6)
		th = parse_ipv6(e, (__u64)head, nh, tail);
	copy_l4(e, head, th, tail);
	parse_related(e, (__u64)head, th, tail);
}

/* One tuple of a conntrack entry. Assumes struct nf_conntrack_tuple as since
 * 2.6.x: src.u3 and dst.u3 are union nf_inet_addr (16 bytes, IPv4 in the
 * first 4; nf_ct_get_tuple() zeroes the whole tuple first), src.u.all and
 * dst.u.all the __be16 ports of TCP, UDP, SCTP, DCCP and UDP-Lite (ICMP's
 * id and 0 there instead), src.l3num the address family and dst.protonum the
 * protocol. */
static __always_inline void read_ct_tuple(struct ct_tuple *t, struct nf_conntrack_tuple *tp)
{
	bpf_core_read(t->saddr, sizeof(t->saddr), &tp->src.u3);
	bpf_core_read(t->daddr, sizeof(t->daddr), &tp->dst.u3);
	t->sport = bpf_ntohs(BPF_CORE_READ(tp, src.u.all));
	t->dport = bpf_ntohs(BPF_CORE_READ(tp, dst.u.all));
}

/* Both tuples of the entry. Assumes nf_conn->tuplehash[] is indexed by enum
 * ip_conntrack_dir (IP_CT_DIR_ORIGINAL 0: as the first packet had it;
 * IP_CT_DIR_REPLY 1: what replies carry, so after NAT it names the
 * translated peer), each holding a struct nf_conntrack_tuple `tuple`. The
 * filter matches either (flow_match), so the pre-DNAT port or address finds
 * a translated flow. An entry of another family (l3num) keeps no tuples. */
static __always_inline void read_ct_tuples(struct drop_event *e, struct nf_conn *ct)
{
	struct nf_conntrack_tuple *orig = &ct->tuplehash[IP_CT_DIR_ORIGINAL].tuple;
	struct nf_conntrack_tuple *reply = &ct->tuplehash[IP_CT_DIR_REPLY].tuple;
	__u16 l3num = BPF_CORE_READ(orig, src.l3num);

	if (l3num == AF_INET)
		e->ct_family = 4;
	else if (l3num == AF_INET6)
		e->ct_family = 6;
	else
		return;
	e->ct_l4proto = BPF_CORE_READ(orig, dst.protonum);
	read_ct_tuple(&e->ct_orig, orig);
	read_ct_tuple(&e->ct_reply, reply);
	e->related |= TRACER_REL_CT_TUPLES;
}

/* Conntrack entry attached to the packet. Assumes skb->_nfct holds the
 * nf_conn pointer with enum ip_conntrack_info in its low 3 bits, and that
 * an untracked packet carries IP_CT_UNTRACKED (7) there. nf_conn lives in
 * the nf_conntrack module on distribution kernels; the type check lets the
 * verifier drop this code when that BTF is absent. */
static __always_inline void read_conntrack(struct drop_event *e, struct sk_buff *skb)
{
	unsigned long nfct;
	struct nf_conn *ct;

	e->ct_info = TRACER_CT_INFO_NONE;
	if (!bpf_core_field_exists(skb->_nfct))
		return;
	nfct = BPF_CORE_READ(skb, _nfct);
	if (!nfct)
		return;
	e->ct_info = nfct & NFCT_INFOMASK;
	ct = (struct nf_conn *)(nfct & ~NFCT_INFOMASK);
	if (!ct || e->ct_info == CT_INFO_UNTRACKED)
		return;
	if (bpf_core_type_exists(struct nf_conn)) {
		e->ct_status = BPF_CORE_READ(ct, status);
		if (bpf_core_field_exists(ct->mark))
			e->ct_mark = BPF_CORE_READ(ct, mark);
		if (bpf_core_field_exists(ct->zone))
			e->ct_zone = BPF_CORE_READ(ct, zone.id);
		read_ct_tuples(e, ct);
	}
}

/* ------------------------------------------------------------ reassembly queues */

/* Fragments freed from an IPv4/IPv6 reassembly queue cannot be trusted for
 * skb->dev. What the kernel does (net/ipv4/inet_fragment.c, ip_fragment.c,
 * net/ipv6/reassembly.c, include/net/ipv6_frag.h; the skb->next and skb->dev
 * values below were observed on 6.18, tests/test_fragments.py checks them):
 *
 * - A queued fragment that starts a run of contiguous fragments is a node of
 *   the queue's rb-tree (fragrun_create); skb->rbnode shares storage with
 *   skb->next, skb->prev and skb->dev, so while it is (or was) linked, next
 *   is __rb_parent_color (never 0 and never the skb itself: a parent pointer,
 *   or the root's black colour bit) and dev is rb_left: another skb of the
 *   queue, or NULL. rb_erase() and rb_replace_node() leave the removed
 *   node's fields as they were, so inet_frag_rbtree_purge() frees these with
 *   that rb_left in dev.
 * - Every queued fragment goes through fragcb_clear(), whose RB_CLEAR_NODE()
 *   points __rb_parent_color (skb->next) at the skb itself and leaves
 *   rb_left (skb->dev) alone. A fragment appended to a run
 *   (fragrun_append_to_last) is then only chained through
 *   FRAG_CB(skb)->next_frag: it keeps skb->next == skb and the skb->dev it
 *   arrived with, which holds no reference (a device deleted since would
 *   leave it dangling). A run member that replaces a pulled head in the tree
 *   (rb_replace_node) becomes a node like the others.
 * - On expiry (ip_expire; ip6frag_expire_frag_queue, from ip6_frag_expire and
 *   nf_ct_frag6_expire), when the first fragment has arrived, the head (the
 *   fragment at offset 0) is taken out with inet_frag_pull_head(), which
 *   zeroes its rbnode, given head->dev = dev_get_by_index_rcu(net, iif) and
 *   freed with FRAG_REASM_TIMEOUT inside rcu_read_lock(): that dev is real.
 *   IPv4 frees the head with a routing reason instead when its route lookup
 *   fails. Then the queue's last reference goes (ipq_put / inet_frag_put),
 *   inet_frag_destroy() frees every other fragment, FRAG_REASM_TIMEOUT
 *   again, in the same timer callback on the same CPU, with nothing else
 *   freed by that CPU in between (timer softirqs do not nest). Only when
 *   another CPU held a reference at that moment does that CPU free them.
 * - ip_frag_reinit() (IPv4, FRAG_TOO_FAR) purges the tree the same way, and
 *   then the new fragment, which never reached the tree, is freed with the
 *   same reason.
 * - The defrag offset lives in FRAG_CB() here; older kernels (before
 *   "inet: inet_defrag: prevent sk release while still in use", 2024) kept
 *   it in a union with skb->sk. CO-RE tells which (skb_sk_shared()).
 *
 * So a drop with one of these reasons uses skb->dev only when skb->next is
 * NULL (a pulled head; the FRAG_TOO_FAR newcomer when nothing left a stale
 * pointer there) or the skb itself (never linked into the tree), and, unless
 * it is an expiring head, while the device still has the ifindex the skb
 * arrived on (skb_iif). Fragments that follow a head on the same CPU take the
 * head's device and namespace; the others get none rather than a wrong one.
 */

/* sk_buff of the older kernels whose ip_defrag_offset is in a union with sk:
 * a queued skb's sk is then not a socket. */
struct sk_buff___defrag_in_sk {
	int ip_defrag_offset;
} __attribute__((preserve_access_index));

static __always_inline bool skb_sk_shared(struct sk_buff *skb)
{
	return bpf_core_field_exists(((struct sk_buff___defrag_in_sk *)skb)->ip_defrag_offset);
}

/* A head recorded this long ago is from another timer callback. The whole
 * callback takes microseconds; the window only has to outlast a slow
 * (emulated) CPU, and stays far below the shortest expiry (ipfrag_time). */
#define REASM_HEAD_WINDOW_NS (50ULL * 1000 * 1000)

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct reasm_head);
} reasm_head SEC(".maps");

enum reasm_kind {
	REASM_NONE = 0,         /* not freed from a reassembly queue */
	REASM_TIMEOUT = 1,      /* FRAG_REASM_TIMEOUT */
	REASM_TOO_FAR = 2,      /* FRAG_TOO_FAR */
};

/* Reason numbers differ between kernels: CO-RE takes them from the running
 * kernel's enum skb_drop_reason, and a kernel without them has no such drops. */
static __always_inline enum reasm_kind reasm_kind(__u32 reason)
{
	if (bpf_core_enum_value_exists(enum skb_drop_reason, SKB_DROP_REASON_FRAG_REASM_TIMEOUT) &&
	    reason == bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_FRAG_REASM_TIMEOUT))
		return REASM_TIMEOUT;
	if (bpf_core_enum_value_exists(enum skb_drop_reason, SKB_DROP_REASON_FRAG_TOO_FAR) &&
	    reason == bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_FRAG_TOO_FAR))
		return REASM_TOO_FAR;
	return REASM_NONE;
}

/* The kernel's queue key, as far as the headers show it: addresses, ID and
 * (IPv4) protocol. The defrag user and VRF of the key are not visible; the
 * same CPU and time window stand in for them. */
static __always_inline void reasm_key(const struct drop_event *e, struct reasm_head *h)
{
	h->l3proto = e->l3proto;
	h->frag_id = e->frag_id;
	if (e->l3proto == ETH_P_IP) {
		h->l4proto = e->l4proto;
		__builtin_memcpy(h->saddr, &e->l3[12], 4);
		__builtin_memcpy(h->daddr, &e->l3[16], 4);
	} else {
		__builtin_memcpy(h->saddr, &e->l3[8], 16);
		__builtin_memcpy(h->daddr, &e->l3[24], 16);
	}
}

static __always_inline bool reasm_same(const struct reasm_head *a, const struct reasm_head *b)
{
	if (a->l3proto != b->l3proto || a->frag_id != b->frag_id || a->l4proto != b->l4proto)
		return false;
#pragma unroll
	for (int i = 0; i < 16; i++) {
		if (a->saddr[i] != b->saddr[i] || a->daddr[i] != b->daddr[i])
			return false;
	}
	return true;
}

/* The device's name is read only when `with_name`: the filter needs it for
 * --iface, a record always (see handle_drop), a repeat never. */
static __always_inline void set_device(struct drop_event *e, struct sk_buff *skb, struct net_device *dev,
				       bool with_name)
{
	e->netns_ino = skb_netns(skb, dev);
	if (dev) {
		e->ifindex = BPF_CORE_READ(dev, ifindex);
		if (with_name)
			BPF_CORE_READ_STR_INTO(&e->dev_name, dev, name);
	}
}

/* Device and namespace of a drop from a reassembly queue (see above). Runs
 * before the filter, so that the fragments of a head the filter leaves out
 * (it has ports, they have none) still get its namespace. */
static __always_inline void reasm_device(struct drop_event *e, struct sk_buff *skb, enum reasm_kind kind)
{
	struct reasm_head key = {}, *last;
	struct net_device *dev;
	bool head = false, linked;
	__u32 zero = 0;
	__u64 now, next;

	if (!e->l3_off_valid || !(e->frag_flags & TRACER_FRAG_IS_FRAGMENT)) {
		e->frag_flags |= TRACER_FRAG_DEV_UNKNOWN;
		return;
	}
	reasm_key(e, &key);
	last = bpf_map_lookup_elem(&reasm_head, &zero);
	if (!last)
		return;
	now = bpf_ktime_get_ns();
	next = (__u64)BPF_CORE_READ(skb, next);
	linked = next && next != (__u64)skb;    /* an rb-tree node, now or before */
	if (kind == REASM_TIMEOUT && !e->frag_off && !next) {
		head = true;            /* pulled by inet_frag_pull_head(), dev set under RCU */
	} else if (kind == REASM_TIMEOUT && now - last->ts_ns < REASM_HEAD_WINDOW_NS && reasm_same(last, &key)) {
		e->netns_ino = last->netns_ino;
		e->ifindex = last->ifindex;
		__builtin_memcpy(e->dev_name, last->dev_name, sizeof(e->dev_name));
		e->frag_flags |= TRACER_FRAG_NS_FROM_HEAD;
		return;
	}
	dev = linked ? NULL : BPF_CORE_READ(skb, dev);
	if (dev && !head && BPF_CORE_READ(dev, ifindex) != BPF_CORE_READ(skb, skb_iif))
		dev = NULL;
	if (!dev) {
		/* skb->sk is not part of the rbnode: a queued skb of a local
		 * sender (defrag on output) still names its namespace. */
		if (!skb_sk_shared(skb))
			e->netns_ino = skb_netns(skb, NULL);
		e->frag_flags |= TRACER_FRAG_DEV_UNKNOWN;
		return;
	}
	set_device(e, skb, dev, true);
	if (head) {
		key.ts_ns = now;
		key.netns_ino = e->netns_ino;
		key.ifindex = e->ifindex;
		__builtin_memcpy(key.dev_name, e->dev_name, sizeof(key.dev_name));
		*last = key;
	}
}

/* ------------------------------------------------------------ filter */

/* An address of the filter's family, 16 bytes (IPv4 in the first 4): a
 * struct, so that a global function's pointer argument covers all of it. */
struct addr16 {
	__u8 b[16];
};

/* Whether `a` is in the network `n`. The mask is zero past the prefix (for
 * IPv4 past byte 4), where the walk stops. */
static __always_inline bool net_has(const struct filter_net *n, const struct addr16 *a)
{
#pragma unroll
	for (int i = 0; i < 16; i++) {
		if (!n->mask[i])
			break;
		if ((a->b[i] ^ n->addr[i]) & n->mask[i])
			return false;
	}
	return true;
}

/* Whether any of three addresses of family `fam` (4 or 6) is in a watched
 * network (pass one twice when there are two). Global: see "related packets". */
__noinline int nets_wanted(const struct filter_cfg *f, __u32 fam, const struct addr16 *a,
			   const struct addr16 *b, const struct addr16 *c)
{
	if (!f || !a || !b || !c)
		return 0;
#pragma unroll
	for (int i = 0; i < TRACER_MAX_NETS; i++) {
		const struct filter_net *n = &f->nets[i];

		if (i >= f->nnets)
			break;
		if (n->family != fam)
			continue;
		if (net_has(n, a) || net_has(n, b) || net_has(n, c))
			return 1;
	}
	return 0;
}

static __always_inline bool has_ports(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP ||
	       proto == IPPROTO_SCTP || proto == IPPROTO_UDPLITE;
}

static __always_inline bool ports_wanted(const struct filter_cfg *f, __u16 sport, __u16 dport)
{
#pragma unroll
	for (int i = 0; i < TRACER_MAX_PORTS; i++) {
		if (i >= f->nports)
			break;
		if (f->ports[i] == sport || f->ports[i] == dport)
			return true;
	}
	return false;
}

/* One view of a packet (its headers, the packet it quotes, a conntrack
 * tuple) against --proto, --port and --host: all that are set must match. */
static __always_inline bool view_wanted(const struct filter_cfg *f, __u8 fam, __u8 proto, bool ported,
					__u16 sport, __u16 dport, const void *src, const void *dst)
{
	if ((f->flags & FILTER_PROTO) && proto != f->l4proto)
		return false;
	if ((f->flags & FILTER_PORTS) && (!ported || !ports_wanted(f, sport, dport)))
		return false;
	if ((f->flags & FILTER_NETS) && !nets_wanted(f, fam, src, dst, dst))
		return false;
	return true;
}

static __always_inline __u16 be16_at(const __u8 *p)
{
	return ((__u16)p[0] << 8) | p[1];
}

/* Which view of the packet --proto, --port and --host select it by (enum
 * tracer_match), TRACER_MATCH_NONE when none does:
 * - its own headers;
 * - the packet an ICMP error quotes, so `--port 80` shows the "fragmentation
 *   needed" that a TCP segment to port 80 caused (the quoted packet's
 *   protocol is what --proto then matches);
 * - the conntrack entry's original or reply tuple, so the pre-DNAT port or
 *   the router's address finds a translated flow;
 * - with --host only: neighbour discovery (ICMPv6 133-137, also by the NS/NA
 *   target) and ARP (sender or target) naming a watched host, whatever
 *   --port and --proto say, since every flow to that host needs them.
 * Global: see "related packets". */
__noinline int flow_match(const struct filter_cfg *f, const struct drop_event *e)
{
	bool v4;

	if (!f || !e)
		return TRACER_MATCH_NONE;
	if (e->l3_off_valid) {
		v4 = e->l3proto == ETH_P_IP;
		if (view_wanted(f, v4 ? 4 : 6, e->l4proto, e->l4_len >= 4 && has_ports(e->l4proto),
				be16_at(&e->l4[0]), be16_at(&e->l4[2]), v4 ? &e->l3[12] : &e->l3[8],
				v4 ? &e->l3[16] : &e->l3[24]))
			return TRACER_MATCH_HEADERS;
	}
	if (e->related & TRACER_REL_QUOTED) {
		v4 = (e->quoted_l3[0] >> 4) == 4;
		if (view_wanted(f, v4 ? 4 : 6, e->quoted_l4proto,
				e->quoted_l4_len >= 4 && has_ports(e->quoted_l4proto),
				be16_at(&e->quoted_l4[0]), be16_at(&e->quoted_l4[2]),
				v4 ? &e->quoted_l3[12] : &e->quoted_l3[8], v4 ? &e->quoted_l3[16] : &e->quoted_l3[24]))
			return TRACER_MATCH_QUOTED;
	}
	if (e->related & TRACER_REL_CT_TUPLES) {
		bool ported = has_ports(e->ct_l4proto);

		if (view_wanted(f, e->ct_family, e->ct_l4proto, ported, e->ct_orig.sport, e->ct_orig.dport,
				e->ct_orig.saddr, e->ct_orig.daddr))
			return TRACER_MATCH_CT_ORIGINAL;
		if (view_wanted(f, e->ct_family, e->ct_l4proto, ported, e->ct_reply.sport, e->ct_reply.dport,
				e->ct_reply.saddr, e->ct_reply.daddr))
			return TRACER_MATCH_CT_REPLY;
	}
	if (!(f->flags & FILTER_NETS))
		return TRACER_MATCH_NONE;
	if (e->related & TRACER_REL_ARP)
		return nets_wanted(f, 4, (const void *)&e->l3[14], (const void *)&e->l3[24],
				   (const void *)&e->l3[24]) ? TRACER_MATCH_NEIGHBOR : TRACER_MATCH_NONE;
	if (e->l3_off_valid && e->l3proto == ETH_P_IPV6 && e->l4proto == IPPROTO_ICMPV6 && e->l4_len &&
	    nd_type(e->l4[0]))
		return nets_wanted(f, 6, (const void *)&e->l3[8], (const void *)&e->l3[24],
				   (const void *)((e->related & TRACER_REL_ND) ? e->nd_target : &e->l3[24])) ?
			       TRACER_MATCH_NEIGHBOR : TRACER_MATCH_NONE;
	return TRACER_MATCH_NONE;
}

static __always_inline bool iface_match(const struct filter_cfg *f, const struct drop_event *e)
{
#pragma unroll
	for (int i = 0; i < 16; i++) {
		if (f->iface[i] != e->dev_name[i])
			return false;
		if (!f->iface[i])
			break;
	}
	return true;
}

#define FILTER_FLOW (FILTER_PORTS | FILTER_PROTO | FILTER_NETS)

/* True when the user asked to see this drop. Cheap tests first. Sets
 * e->matched to the view --port/--host/--proto selected it by. */
static __always_inline bool wanted(const struct filter_cfg *f, struct drop_event *e)
{
	if (e->reason == f->ignore_reason)
		return false;
	if ((f->flags & FILTER_REASONS)) {
		if (e->reason >= TRACER_REASON_WORDS * 64)
			return false;
		if (!(f->reasons[(e->reason / 64) & (TRACER_REASON_WORDS - 1)] & (1ULL << (e->reason % 64))))
			return false;
	}
	if ((f->flags & FILTER_NETNS) && e->netns_ino != f->netns_ino)
		return false;
	/* ARP (no IP header) can pass a --host filter (flow_match). */
	if ((f->flags & FILTER_IP_ONLY) && !e->l3_off_valid && !(e->related & TRACER_REL_ARP))
		return false;
	if ((f->flags & FILTER_IFACE) && !iface_match(f, e))
		return false;
	if (f->flags & FILTER_FLOW) {
		e->matched = flow_match(f, e);
		if (e->matched == TRACER_MATCH_NONE)
			return false;
	}
	return true;
}

/* ------------------------------------------------------------ counting */

static __always_inline void flow_key_of(struct flow_key *k, const struct drop_event *e, __u8 hook)
{
	k->netns_ino = e->netns_ino;
	k->reason = e->reason;
	k->location = e->location;
	k->l3proto = e->l3proto;
	k->hook = hook;
	k->kind = TRACER_COUNTED_FLOW;
	if (e->related & TRACER_REL_ARP) {      /* sender and target IPv4 */
		__builtin_memcpy(k->saddr, &e->l3[14], 4);
		__builtin_memcpy(k->daddr, &e->l3[24], 4);
		return;
	}
	if (!e->l3_off_valid)
		return;
	k->l4proto = e->l4proto;
	if (e->l3proto == ETH_P_IP) {
		__builtin_memcpy(k->saddr, &e->l3[12], 4);
		__builtin_memcpy(k->daddr, &e->l3[16], 4);
	} else {
		__builtin_memcpy(k->saddr, &e->l3[8], 16);
		__builtin_memcpy(k->daddr, &e->l3[24], 16);
	}
	if (e->frag_flags & TRACER_FRAG_IS_FRAGMENT)
		k->frag_id = e->frag_id;
	if (e->frag_off) {
		k->later_fragment = 1;
		k->sport = e->frag_off;
		return;
	}
	if (e->l4_len < 4)
		return;
	if (has_ports(e->l4proto)) {
		k->sport = ((__u16)e->l4[0] << 8) | e->l4[1];
		k->dport = ((__u16)e->l4[2] << 8) | e->l4[3];
	} else if (e->l4proto == IPPROTO_ICMP || e->l4proto == IPPROTO_ICMPV6) {
		k->sport = ((__u16)e->l4[0] << 8) | e->l4[1];   /* type, code */
	}
}

/* Adds one drop to `key` in `map`; false when the key is new and the map
 * full. Two CPUs inserting the same new key: one insert wins (BPF_NOEXIST),
 * the other finds it on the second lookup. */
static __always_inline bool count_in(void *map, const struct flow_key *key, __u64 now)
{
	struct flow_count *c = bpf_map_lookup_elem(map, key);
	struct flow_count init = {.count = 1, .first_ns = now, .last_ns = now};

	if (c) {
		__sync_fetch_and_add(&c->count, 1);
		c->last_ns = now;       /* racing CPUs each write a recent time: good enough */
		return true;
	}
	if (!bpf_map_update_elem(map, key, &init, BPF_NOEXIST))
		return true;
	c = bpf_map_lookup_elem(map, key);
	if (!c)
		return false;           /* not there after a refused insert: the map is full */
	__sync_fetch_and_add(&c->count, 1);
	c->last_ns = now;
	return true;
}

static __always_inline void count_overflow(__u32 parity, __u64 now)
{
	struct flow_count *c = bpf_map_lookup_elem(&overflow_counts, &parity);

	if (!c)
		return;
	if (!c->count)
		c->first_ns = now;
	c->count += 1;
	c->last_ns = now;
}

/* Counts one drop in the current epoch's maps: its flow key, else (flow map
 * full) its coarse key, else the overflow counter. Sets key->kind to the
 * map that took it, so a record tells Python which count it belongs to. */
static __always_inline void count_drop(struct flow_key *key, __u32 ep, __u64 now)
{
	__u32 parity = ep & 1;
	void *flows = parity ? (void *)&flow_counts_1 : (void *)&flow_counts_0;
	void *coarse = parity ? (void *)&coarse_counts_1 : (void *)&coarse_counts_0;

	if (key->kind == TRACER_COUNTED_FLOW && count_in(flows, key, now))
		return;
	key->kind = TRACER_COUNTED_COARSE;
	__builtin_memset(key->saddr, 0, sizeof(key->saddr));
	__builtin_memset(key->daddr, 0, sizeof(key->daddr));
	key->sport = 0;
	key->dport = 0;
	key->l4proto = 0;
	key->later_fragment = 0;
	key->frag_id = 0;
	count(STAT_COARSE);
	if (count_in(coarse, key, now))
		return;
	key->kind = TRACER_COUNTED_OVERFLOW;
	count(STAT_OVERFLOW);
	count_overflow(parity, now);
}

/* Whether this drop gets a record: the first of its key (registered in
 * flow_seen now), or one Python asked a sample of. A key flow_seen has no
 * room for is counted under its coarse key and gets no record: a flood of
 * new flows (spoofed sources) then costs map updates, not stack walks. */
/* Whether nftables (or xt TRACE) traces this packet: skb->nf_trace, a bit
 * that exists with CONFIG_NF_TABLES or CONFIG_NETFILTER_XT_TARGET_TRACE. */
static __always_inline bool skb_traced(struct sk_buff *skb)
{
	if (!bpf_core_field_exists(skb->nf_trace))
		return false;
	return BPF_CORE_READ_BITFIELD_PROBED(skb, nf_trace);
}

static __always_inline __u8 record_kind(struct flow_key *key, struct sk_buff *skb, __u64 now)
{
	struct flow_seen fresh = {.last_ns = now};
	struct flow_seen *seen = bpf_map_lookup_elem(&flow_seen, key);
	long err;

	if (seen) {
		seen->last_ns = now;
		/* Not atomic: two CPUs may both take the request, and an extra
		 * sample costs a record, never a count (samples count like repeats). */
		if ((seen->flags & FLOW_WANT_SAMPLE) &&
		    (!(seen->flags & FLOW_WANT_TRACED) || skb_traced(skb))) {
			seen->flags = 0;
			return TRACER_REC_SAMPLE;
		}
		return 0;
	}
	err = bpf_map_update_elem(&flow_seen, key, &fresh, BPF_NOEXIST);
	if (!err)
		return TRACER_REC_FIRST;
	if (err != -EEXIST)
		key->kind = TRACER_COUNTED_COARSE;   /* flow_seen full */
	return 0;                               /* EEXIST: another CPU sends the first */
}

/* ------------------------------------------------------------ drop */

/* A record the ring buffer had no room for. Its drop is counted already; a
 * lost first record also forgets the key, so its next drop tries again. */
static __always_inline void lost_record(struct drop_event *e)
{
	count(STAT_LOST);
	if (e->record == TRACER_REC_FIRST && e->key.kind == TRACER_COUNTED_FLOW)
		bpf_map_delete_elem(&flow_seen, &e->key);
}

static __always_inline int handle_drop(void *ctx, struct sk_buff *skb, __u64 location, __u32 reason)
{
	__u32 zero = 0;
	struct filter_cfg *f;
	struct drop_event *e;
	enum reasm_kind kind;
	struct nf_info *nf;
	__u64 key = (__u64)skb, now;
	bool ct_read;
	__u32 *ep;
	long n;

	count(STAT_SEEN);
	/* Netlink and other socket-internal buffers have no protocol: they are
	 * not packets and would drown the output. */
	if (!skb || !BPF_CORE_READ(skb, protocol))
		return 0;
	f = bpf_map_lookup_elem(&filter, &zero);
	e = bpf_map_lookup_elem(&scratch, &zero);
	if (!f || !e)
		return 0;

	/* All but the stack, which bpf_get_stack fills (zeroing what it does not
	 * use) on the record path, and nothing reads otherwise: 256 bytes less to
	 * clear for every freed packet. */
	__builtin_memset(e, 0, __builtin_offsetof(struct drop_event, stack));
	e->reason = reason;
	e->location = location;
	e->skb_addr = key;
	parse_packet(e, skb);
	kind = reasm_kind(reason);
	if (kind != REASM_NONE)
		reasm_device(e, skb, kind);
	else
		set_device(e, skb, skb_device(skb), f->flags & FILTER_IFACE);
	nf = (f->flags & FILTER_NF_CONTEXT) ? bpf_map_lookup_elem(&skb_nf, &key) : NULL;
	/* The filter matches the conntrack tuples too: read them first. */
	ct_read = f->flags & FILTER_FLOW;
	if (ct_read)
		read_conntrack(e, skb);
	if (!wanted(f, e)) {
		count(STAT_FILTERED);
		if (nf)
			bpf_map_delete_elem(&skb_nf, &key);
		return 0;
	}

	now = bpf_ktime_get_ns();
	ep = bpf_map_lookup_elem(&epoch, &zero);
	/* Without netfilter programs skb_nf stays empty: no lookup, no delete per drop. */
	if (nf) {
		e->nf = *nf;
		bpf_map_delete_elem(&skb_nf, &key);
	}
	flow_key_of(&e->key, e, nf ? e->nf.hook : TRACER_HOOK_UNKNOWN);
	e->epoch = ep ? *ep : 0;
	if (f->flags & FILTER_EVERY_DROP)
		e->record = TRACER_REC_FIRST;   /* still counted: a lost record is in a summary */
	else if (e->key.kind == TRACER_COUNTED_FLOW)
		e->record = record_kind(&e->key, skb, now);
	count_drop(&e->key, e->epoch, now);
	if (!e->record) {
		count(STAT_REPEAT);
		return 0;
	}
	if (ring_full()) {
		lost_record(e);
		return 0;
	}

	if (kind == REASM_NONE && !(f->flags & FILTER_IFACE)) {
		struct net_device *dev = skb_device(skb);

		if (dev)
			BPF_CORE_READ_STR_INTO(&e->dev_name, dev, name);
	}
	e->ts_ns = now;
	e->iif = BPF_CORE_READ(skb, skb_iif);
	e->mark = BPF_CORE_READ(skb, mark);
	e->len = BPF_CORE_READ(skb, len);
	e->pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(&e->comm, sizeof(e->comm));
	if (!ct_read)
		read_conntrack(e, skb);
	e->traced = bpf_core_field_exists(skb->nf_trace) ? skb_traced(skb) : 2;

	n = bpf_get_stack(ctx, e->stack, sizeof(e->stack), 0);
	if (n < 0)
		e->stack_err = n;
	else
		e->stack_bytes = n;

	if (bpf_ringbuf_output(&events, e, sizeof(*e), 0))
		lost_record(e);
	else
		count(STAT_EMITTED);
	return 0;
}

/* Kernel 5.17+: kfree_skb(skb, location, reason); 6.11 added rx_sk, which
 * we do not need. */
SEC("tp_btf/kfree_skb")
int BPF_PROG(kfree_skb_btf, struct sk_buff *skb, void *location, enum skb_drop_reason reason)
{
	return handle_drop(ctx, skb, (__u64)location, reason);
}

SEC("raw_tp/kfree_skb")
int BPF_PROG(kfree_skb_raw, struct sk_buff *skb, void *location, enum skb_drop_reason reason)
{
	return handle_drop(ctx, skb, (__u64)location, reason);
}

SEC("tracepoint/skb/kfree_skb")
int kfree_skb_tp(struct trace_event_raw_kfree_skb *args)
{
	__u32 reason = 0;

	if (bpf_core_field_exists(args->reason))
		reason = BPF_CORE_READ(args, reason);
	return handle_drop(args, (struct sk_buff *)BPF_CORE_READ(args, skbaddr),
			   (__u64)BPF_CORE_READ(args, location), reason);
}

/* ------------------------------------------------------------ netfilter */

/* A packet entering a netfilter hook: remember the hook, forget any
 * table/chain of an earlier hook. */
static __always_inline void nf_enter(struct sk_buff *skb, const struct nf_hook_state *state, __u8 source)
{
	__u64 key = (__u64)skb;
	struct nf_info info = {};

	info.ts_ns = bpf_ktime_get_ns();
	info.verdict = -1;
	info.source = source;
	info.pf = BPF_CORE_READ(state, pf);
	info.hook = BPF_CORE_READ(state, hook);
	bpf_map_update_elem(&skb_nf, &key, &info, BPF_ANY);
}

/* nft_do_chain(pkt, priv): priv is the base chain being run. Assumes
 * nft_chain->table->name and ->family (a bitfield since 5.x). */
static __always_inline void nft_enter(struct nft_pktinfo *pkt, struct nft_chain *chain, __u8 source)
{
	struct sk_buff *skb = BPF_CORE_READ(pkt, skb);
	const struct nf_hook_state *state = BPF_CORE_READ(pkt, state);
	struct nft_table *table = BPF_CORE_READ(chain, table);
	__u64 key = (__u64)skb;
	struct nf_info info = {};

	info.ts_ns = bpf_ktime_get_ns();
	info.verdict = -1;
	info.source = source;
	info.backend = NF_BACKEND_NFT;
	info.pf = BPF_CORE_READ(state, pf);
	info.hook = BPF_CORE_READ(state, hook);
	info.family = BPF_CORE_READ_BITFIELD_PROBED(table, family);
	bpf_probe_read_kernel_str(info.table, sizeof(info.table), BPF_CORE_READ(table, name));
	bpf_probe_read_kernel_str(info.chain, sizeof(info.chain), BPF_CORE_READ(chain, name));
	bpf_map_update_elem(&skb_nf, &key, &info, BPF_ANY);
}

/* ipt_do_table(priv, skb, state) since 5.19: priv is the xt_table. */
static __always_inline void xt_enter(struct xt_table *table, struct sk_buff *skb,
				     const struct nf_hook_state *state, __u8 source, __u8 backend)
{
	__u64 key = (__u64)skb;
	struct nf_info info = {};

	info.ts_ns = bpf_ktime_get_ns();
	info.verdict = -1;
	info.source = source;
	info.backend = backend;
	info.pf = BPF_CORE_READ(state, pf);
	info.hook = BPF_CORE_READ(state, hook);
	BPF_CORE_READ_STR_INTO(&info.table, table, name);
	bpf_map_update_elem(&skb_nf, &key, &info, BPF_ANY);
}

/* The verdict a table or chain returned; on kernels that free the skb inside
 * nft_do_chain the drop handler has already consumed the entry. */
static __always_inline void nf_verdict(struct sk_buff *skb, unsigned int ret)
{
	__u64 key = (__u64)skb;
	struct nf_info *info = bpf_map_lookup_elem(&skb_nf, &key);

	if (info)
		info->verdict = ret;
}

static __always_inline void nf_leave(struct sk_buff *skb)
{
	__u64 key = (__u64)skb;

	bpf_map_delete_elem(&skb_nf, &key);
}

SEC("fentry/nf_hook_slow")
int BPF_PROG(fentry_nf_hook_slow, struct sk_buff *skb, struct nf_hook_state *state)
{
	nf_enter(skb, state, NF_SRC_FENTRY);
	return 0;
}

/* nf_hook_slow returns after its hooks ran: a dropped packet was freed (and
 * reported) inside it, so whatever is left is stale. */
SEC("fexit/nf_hook_slow")
int BPF_PROG(fexit_nf_hook_slow, struct sk_buff *skb)
{
	nf_leave(skb);
	return 0;
}

SEC("fentry/nft_do_chain")
int BPF_PROG(fentry_nft_do_chain, struct nft_pktinfo *pkt, void *priv)
{
	nft_enter(pkt, priv, NF_SRC_FENTRY);
	return 0;
}

SEC("fexit/nft_do_chain")
int BPF_PROG(fexit_nft_do_chain, struct nft_pktinfo *pkt, void *priv, unsigned int ret)
{
	nf_verdict(BPF_CORE_READ(pkt, skb), ret);
	return 0;
}

SEC("fentry/ipt_do_table")
int BPF_PROG(fentry_ipt_do_table, void *priv, struct sk_buff *skb, const struct nf_hook_state *state)
{
	xt_enter(priv, skb, state, NF_SRC_FENTRY, NF_BACKEND_IPT);
	return 0;
}

SEC("fexit/ipt_do_table")
int BPF_PROG(fexit_ipt_do_table, void *priv, struct sk_buff *skb, const struct nf_hook_state *state,
	     unsigned int ret)
{
	nf_verdict(skb, ret);
	return 0;
}

SEC("fentry/ip6t_do_table")
int BPF_PROG(fentry_ip6t_do_table, void *priv, struct sk_buff *skb, const struct nf_hook_state *state)
{
	xt_enter(priv, skb, state, NF_SRC_FENTRY, NF_BACKEND_IP6T);
	return 0;
}

SEC("fexit/ip6t_do_table")
int BPF_PROG(fexit_ip6t_do_table, void *priv, struct sk_buff *skb, const struct nf_hook_state *state,
	     unsigned int ret)
{
	nf_verdict(skb, ret);
	return 0;
}

/* kprobe twins of the above, for kernels that refuse fentry. */

static __always_inline struct stash_key stash_key(void)
{
	struct stash_key k = {
		.cpu = bpf_get_smp_processor_id(),
		.tid = (__u32)bpf_get_current_pid_tgid(),
	};
	return k;
}

static __always_inline void stash(void *map, struct sk_buff *skb)
{
	struct stash_key k = stash_key();
	__u64 v = (__u64)skb;

	bpf_map_update_elem(map, &k, &v, BPF_ANY);
}

static __always_inline struct sk_buff *unstash(void *map)
{
	struct stash_key k = stash_key();
	__u64 *v = bpf_map_lookup_elem(map, &k);
	struct sk_buff *skb;

	if (!v)
		return NULL;
	skb = (struct sk_buff *)*v;
	bpf_map_delete_elem(map, &k);
	return skb;
}

/* nft_do_chain and ipt_do_table run inside nf_hook_slow on the same thread,
 * so they keep their skb in a map of their own rather than overwrite the
 * outer probe's. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct stash_key);
	__type(value, __u64);
} kprobe_stash_inner SEC(".maps");

SEC("kprobe/nf_hook_slow")
int BPF_KPROBE(kprobe_nf_hook_slow, struct sk_buff *skb, struct nf_hook_state *state)
{
	nf_enter(skb, state, NF_SRC_KPROBE);
	stash(&kprobe_stash, skb);
	return 0;
}

SEC("kretprobe/nf_hook_slow")
int BPF_KRETPROBE(kretprobe_nf_hook_slow)
{
	struct sk_buff *skb = unstash(&kprobe_stash);

	if (skb)
		nf_leave(skb);
	return 0;
}

SEC("kprobe/nft_do_chain")
int BPF_KPROBE(kprobe_nft_do_chain, struct nft_pktinfo *pkt, void *priv)
{
	nft_enter(pkt, priv, NF_SRC_KPROBE);
	stash(&kprobe_stash_inner, BPF_CORE_READ(pkt, skb));
	return 0;
}

SEC("kretprobe/nft_do_chain")
int BPF_KRETPROBE(kretprobe_nft_do_chain, unsigned int ret)
{
	struct sk_buff *skb = unstash(&kprobe_stash_inner);

	if (skb)
		nf_verdict(skb, ret);
	return 0;
}

SEC("kprobe/ipt_do_table")
int BPF_KPROBE(kprobe_ipt_do_table, void *priv, struct sk_buff *skb, const struct nf_hook_state *state)
{
	xt_enter(priv, skb, state, NF_SRC_KPROBE, NF_BACKEND_IPT);
	stash(&kprobe_stash_inner, skb);
	return 0;
}

SEC("kretprobe/ipt_do_table")
int BPF_KRETPROBE(kretprobe_ipt_do_table, unsigned int ret)
{
	struct sk_buff *skb = unstash(&kprobe_stash_inner);

	if (skb)
		nf_verdict(skb, ret);
	return 0;
}

SEC("kprobe/ip6t_do_table")
int BPF_KPROBE(kprobe_ip6t_do_table, void *priv, struct sk_buff *skb, const struct nf_hook_state *state)
{
	xt_enter(priv, skb, state, NF_SRC_KPROBE, NF_BACKEND_IP6T);
	stash(&kprobe_stash_inner, skb);
	return 0;
}

SEC("kretprobe/ip6t_do_table")
int BPF_KRETPROBE(kretprobe_ip6t_do_table, unsigned int ret)
{
	struct sk_buff *skb = unstash(&kprobe_stash_inner);

	if (skb)
		nf_verdict(skb, ret);
	return 0;
}
