/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The one record the BPF side hands to Python for every dropped packet.
 *
 * Python reads this layout from the compiled object's BTF at load time
 * (tracer/bpf/layout.py) and refuses to run if its own view differs, so a
 * field added here without a matching change there fails loudly at start
 * instead of decoding garbage.
 *
 * The constants are enums, not #defines, for the same reason: BTF carries
 * enums (name and value) but not macros, so Python reads every number below
 * by name from the object (tracer.bpf.c makes clang emit each enum, see
 * `tracer_btf_enums` there) and keeps no copy of its own.
 *
 * Everything is fixed-size and naturally aligned so that clang lays it out
 * the same way on every architecture libbpf supports.
 */
#ifndef TRACER_H
#define TRACER_H

/* Sizes of the arrays below (enumerators are integer constant expressions,
 * so they size arrays and bound loops as the #defines did). */
enum tracer_limits {
	TRACER_STACK_DEPTH = 32,
	TRACER_L3_BYTES = 40,      /* IPv4 header with options / IPv6 fixed header */
	TRACER_L4_BYTES = 20,      /* TCP header without options; covers UDP, ICMP, SCTP */
	TRACER_NAME_LEN = 32,      /* nft/xt table and chain names are truncated here */
	TRACER_MAX_PORTS = 8,
	TRACER_MAX_NETS = 8,
	TRACER_REASON_WORDS = 16,  /* bitmap of 1024 drop reasons */
	/* IPv6 extension headers walked before giving up on the transport
	 * header. The kernel sets no limit; this one keeps the verifier's work
	 * small (a bounded loop in a global function, parse_ipv6, verified once:
	 * the whole drop program verifies in about 32k instructions on 6.18 and
	 * 24k on Debian's 6.1, of the 1M limit). tracer/event/packet.py
	 * (IPV6_MAX_EXT_HEADERS) walks as far; the drop decoder refuses to run
	 * when the two differ. */
	TRACER_IPV6_MAX_EXT = 64,
	/* Flow keys tracked at once (maps flow_seen, flow_counts_*): a flood of
	 * this many distinct flows still gets one full event per flow; beyond
	 * it, drops are counted per coarse key. About 100 bytes an entry. */
	TRACER_FLOW_ENTRIES = 65536,
	/* Coarse keys (namespace, reason, location, hook) at once; beyond it,
	 * drops are counted in one overflow counter, still exactly. */
	TRACER_COARSE_ENTRIES = 4096,
	/* Transport bytes kept of the packet an ICMP error quotes: RFC 792
	 * guarantees 8 (ports, TCP sequence), and 8 are all the filter needs. */
	TRACER_QUOTED_L4_BYTES = 8,
};

/* drop_event.related (bits): which of the related-packet fields hold data.
 * They are read before the filter, which matches on them (see flow_match in
 * tracer.bpf.c). */
enum tracer_related {
	TRACER_REL_QUOTED = 0x01,    /* quoted_l3/quoted_l4: the packet an ICMP error quotes */
	TRACER_REL_CT_TUPLES = 0x02, /* ct_orig/ct_reply: the conntrack entry's two tuples */
	TRACER_REL_ND = 0x04,        /* nd_target: a neighbour solicitation/advertisement's
	                              * (or redirect's) target address */
	TRACER_REL_ARP = 0x08,       /* l3 holds an Ethernet/IPv4 ARP header (28 bytes);
	                              * l3_off_valid stays 0, it is not an IP header */
};

/* drop_event.matched: which view of the packet the --port/--host/--proto
 * filter selected it by (the first that matched, in this order). */
enum tracer_match {
	TRACER_MATCH_NONE = 0,          /* no such filter: every packet is wanted */
	TRACER_MATCH_HEADERS = 1,       /* the packet's own headers */
	TRACER_MATCH_QUOTED = 2,        /* the packet an ICMP error quotes */
	TRACER_MATCH_CT_ORIGINAL = 3,   /* the conntrack entry's original tuple (pre-NAT) */
	TRACER_MATCH_CT_REPLY = 4,      /* its reply tuple (the translated peer) */
	TRACER_MATCH_NEIGHBOR = 5,      /* ND or ARP naming a watched host (--host only) */
};

/* drop_event.frag_flags (bits) */
enum tracer_frag_flags {
	TRACER_FRAG_IS_FRAGMENT = 0x01,  /* IPv4 MF or offset set, or an IPv6 fragment header */
	TRACER_FRAG_MORE = 0x02,         /* more fragments follow (MF / M bit) */
	TRACER_FRAG_NS_FROM_HEAD = 0x04, /* freed from a reassembly queue: device and namespace
	                                  * are the queue head's (see reasm_* in tracer.bpf.c) */
	TRACER_FRAG_DEV_UNKNOWN = 0x08,  /* freed from a reassembly queue, skb->dev not a device:
	                                  * no device or namespace could be told */
	TRACER_FRAG_EXT_LIMIT = 0x10,    /* more than TRACER_IPV6_MAX_EXT extension headers */
};

/* drop_event.ct_info when the packet carries no conntrack entry. The kernel's
 * enum ip_conntrack_info stops at IP_CT_UNTRACKED (7) and lives in 3 bits of
 * skb->_nfct, so no real value is this. tracer/collectors/conntrack.py
 * (CT_INFO_NONE) uses the same; the drop decoder refuses to run when the two
 * differ. */
enum tracer_ct_info {
	TRACER_CT_INFO_NONE = 0xff,
};

/* What a ring-buffer record is (drop_event.record). Every drop the filter
 * selects is counted in a map (struct flow_count), whether or not it makes a
 * record: the counts, not the records, are what summaries report, so a
 * record lost to a full ring buffer or a full queue never breaks a count. */
enum tracer_record {
	TRACER_REC_FIRST = 1,    /* the first drop of its flow key: shown in full */
	TRACER_REC_SAMPLE = 2,   /* a later drop of a known key, asked for by Python
	                          * (FLOW_WANT_SAMPLE) to learn its attribution */
};

/* Which map counted a drop (drop_event.counted_in, flow_key.kind). */
enum tracer_counted {
	TRACER_COUNTED_FLOW = 0,     /* flow_counts_*: the full key */
	TRACER_COUNTED_COARSE = 1,   /* coarse_counts_*: the flow map was full */
	TRACER_COUNTED_OVERFLOW = 2, /* overflow_counts: the coarse map was full too */
};

/* flow_seen.flags (bits), set by Python. */
enum flow_seen_flags {
	FLOW_WANT_SAMPLE = 1,        /* send the next drop of this key in full */
	FLOW_WANT_TRACED = 2,        /* with FLOW_WANT_SAMPLE: the next one nftrace traced
	                              * (skb->nf_trace set), so its rule will be known */
};

/* flow_key.hook when no netfilter program saw the packet. */
enum tracer_flow_hook {
	TRACER_HOOK_UNKNOWN = 0xff,
};

/* The identity of a drop for counting: drops alike in all of this are one
 * flow, and repeats of a flow cost one map update. A coarse key
 * (kind TRACER_COUNTED_COARSE) has the addresses and ports zeroed. */
struct flow_key {
	__u32 netns_ino;
	__u32 reason;
	__u64 location;
	__u8 saddr[16];         /* IPv4 in the first 4 bytes */
	__u8 daddr[16];
	__u16 sport;            /* host order; ICMP: type << 8 | code in sport */
	__u16 dport;
	__u16 l3proto;          /* ETH_P_*, host order */
	__u8 l4proto;
	__u8 hook;              /* nf_info.hook, TRACER_HOOK_UNKNOWN without one */
	__u8 kind;              /* enum tracer_counted: TRACER_COUNTED_FLOW or _COARSE */
	__u8 later_fragment;    /* 1: no transport header; sport holds the fragment offset */
	__u8 _pad[2];
	__u32 frag_id;          /* a fragment's datagram ID (drop_event.frag_id), 0 otherwise:
	                         * each fragment of each datagram is a key of its own, as
	                         * reassembly drops (timeouts) are per datagram */
};

/* Drops of one key in one epoch (map values of flow_counts_*, coarse_counts_*
 * and overflow_counts). Times are bpf_ktime_get_ns(). */
struct flow_count {
	__u64 count;
	__u64 first_ns;
	__u64 last_ns;
};

/* Keys that have had their first record (map flow_seen). Python removes
 * idle ones; a removed key just gets a new first record. */
struct flow_seen {
	__u64 last_ns;          /* the key's latest drop */
	__u32 flags;            /* enum flow_seen_flags */
	__u32 _pad;
};

/* Where the netfilter part of an event came from. */
enum nf_source {
	NF_SRC_NONE = 0,
	NF_SRC_FENTRY = 1,
	NF_SRC_KPROBE = 2,
};

/* Which netfilter entry point recorded the table/chain. */
enum nf_backend {
	NF_BACKEND_NONE = 0,
	NF_BACKEND_NFT = 1,
	NF_BACKEND_IPT = 2,  /* ipt_do_table: iptables-legacy, IPv4 */
	NF_BACKEND_IP6T = 3, /* ip6t_do_table: ip6tables-legacy */
};

struct nf_info {
	__u64 ts_ns;
	__s32 verdict;          /* -1 while the hook function has not returned */
	__u8 source;            /* enum nf_source */
	__u8 backend;           /* enum nf_backend */
	__u8 pf;                /* NFPROTO_* of the hook state */
	__u8 hook;              /* NF_INET_* (or NF_NETDEV_*) of the hook state */
	__u8 family;            /* nft table family, 0 when unknown */
	__u8 _pad[7];
	char table[TRACER_NAME_LEN];
	char chain[TRACER_NAME_LEN];
};

/* One direction of a conntrack entry (nf_conn->tuplehash[dir].tuple). */
struct ct_tuple {
	__u8 saddr[16];         /* IPv4 in the first 4 bytes */
	__u8 daddr[16];
	__u16 sport;            /* host order; 0 for protocols without ports */
	__u16 dport;
};

struct drop_event {
	__u64 ts_ns;            /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 skb_addr;         /* identity of the packet for this drop only */
	__u64 location;         /* the caller that freed the skb */
	__u64 ct_status;        /* nf_conn->status (IPS_* bits) */
	__u32 reason;           /* enum skb_drop_reason, numbered per kernel */
	__u32 netns_ino;        /* net->ns.inum of the device or socket */
	__u32 ifindex;          /* skb->dev->ifindex, 0 without a device */
	__u32 iif;              /* skb->skb_iif: the interface it arrived on */
	__u32 mark;             /* skb->mark */
	__u32 len;              /* skb->len */
	__u32 pid;              /* current tgid: meaningful only in process context */
	__u32 ct_mark;
	__u16 ct_zone;
	__u8 ct_info;           /* enum ip_conntrack_info, TRACER_CT_INFO_NONE without conntrack */
	__u8 l4proto;           /* IPPROTO_* after IPv6 extension headers */
	__u16 l3proto;          /* ETH_P_* in host order (skb->protocol) */
	__u16 l3_off_valid;     /* 1 when l3[] holds a network header */
	__u16 l4_len;           /* bytes valid in l4[], 0 when none (later fragment) */
	__u16 stack_bytes;      /* bytes valid in stack[] */
	__s32 stack_err;        /* negative errno of bpf_get_stack, 0 on success */
	__u32 frag_id;          /* IPv4 ID or IPv6 fragment header identification, host order */
	__u16 frag_off;         /* fragment offset in 8-byte units, 0 for a first fragment */
	__u8 frag_flags;        /* enum tracer_frag_flags */
	__u8 ext_count;         /* IPv6 extension headers walked (fragment header included) */
	__u8 l3[TRACER_L3_BYTES];
	__u8 l4[TRACER_L4_BYTES];
	char dev_name[16];
	char comm[16];
	__u8 _pad0[4];
	struct nf_info nf;
	struct flow_key key;    /* the key that counted this drop */
	__u32 epoch;            /* the counting epoch the drop was counted in */
	__u8 record;            /* enum tracer_record */
	__u8 traced;            /* skb->nf_trace: 1 traced, 0 not (no nftrace verdict will come),
	                         * 2 unknown (the kernel has no such field) */
	__u8 _pad1[2];
	/* Related packets: read before the filter, which matches on them. */
	__u8 related;           /* enum tracer_related */
	__u8 matched;           /* enum tracer_match */
	__u8 ct_family;         /* 4 or 6 with TRACER_REL_CT_TUPLES */
	__u8 ct_l4proto;        /* the entry's IPPROTO_* (tuple dst.protonum) */
	__u8 quoted_l4proto;    /* the quoted packet's protocol (IPv6: its next header) */
	__u8 quoted_l4_len;     /* bytes valid in quoted_l4[], 0 when none */
	__u8 _pad2[2];
	struct ct_tuple ct_orig;        /* IP_CT_DIR_ORIGINAL: as the first packet had it */
	struct ct_tuple ct_reply;       /* IP_CT_DIR_REPLY: what replies carry (after NAT) */
	__u8 quoted_l3[TRACER_L3_BYTES];        /* the quoted IP header, as l3[] */
	__u8 quoted_l4[TRACER_QUOTED_L4_BYTES]; /* its first transport bytes */
	__u8 nd_target[16];     /* with TRACER_REL_ND */
	__u64 stack[TRACER_STACK_DEPTH];
};

/* The last reassembly queue head freed on a CPU (BPF-internal, per-CPU map
 * `reasm_head`): the fragments of its queue freed right after it take their
 * device and namespace from it. */
struct reasm_head {
	__u64 ts_ns;            /* bpf_ktime_get_ns() when the head was freed */
	__u32 netns_ino;
	__u32 ifindex;
	__u32 frag_id;          /* as drop_event.frag_id */
	__u16 l3proto;          /* ETH_P_IP or ETH_P_IPV6 */
	__u8 l4proto;           /* IPv4 protocol (part of the kernel's queue key); 0 for IPv6 */
	__u8 _pad;
	__u8 saddr[16];         /* IPv4 addresses in the first 4 bytes */
	__u8 daddr[16];
	char dev_name[16];
};

/* In-kernel filter, written by Python into the one-element `filter_cfg` map. */
struct filter_net {
	__u8 family;            /* 4 or 6, 0 for an unused slot */
	__u8 prefixlen;
	__u8 _pad[2];
	__u8 addr[16];
	__u8 mask[16];          /* prefixlen as a byte mask, filled by Python: the
	                         * kernel then compares without shifting */
};

/* filter_cfg.flags (bits): which of the fields below apply. */
enum filter_flags {
	FILTER_PORTS = 1 << 0,
	FILTER_PROTO = 1 << 1,
	FILTER_NETS = 1 << 2,
	FILTER_NETNS = 1 << 3,
	FILTER_IFACE = 1 << 4,
	FILTER_REASONS = 1 << 5,
	FILTER_IP_ONLY = 1 << 6,
	FILTER_EVERY_DROP = 1 << 7,  /* a record for every drop, not only a flow's first */
	FILTER_NF_CONTEXT = 1 << 8,  /* netfilter programs run: skb_nf may hold this skb */
};

/* filter_cfg.ignore_reason when no reason is to be ignored. Assumes no kernel
 * numbers a drop reason ~0: enum skb_drop_reason counts up from 0, with
 * subsystem reasons in the high 16 bits (SKB_DROP_REASON_SUBSYS_SHIFT) and
 * subsystem numbers far below 0xffff. The value does not fit an int, so the
 * compiler gives this enum an unsigned type. */
enum filter_reason {
	FILTER_NO_REASON = 0xffffffffu,
};

struct filter_cfg {
	__u32 flags;
	__u32 netns_ino;
	__u32 ignore_reason;    /* SKB_CONSUMED on kernels that report it here, else FILTER_NO_REASON */
	__u32 _pad1;
	__u16 ports[TRACER_MAX_PORTS];
	__u8 nports;
	__u8 l4proto;
	__u8 nnets;
	__u8 _pad;
	char iface[16];
	struct filter_net nets[TRACER_MAX_NETS];
	__u64 reasons[TRACER_REASON_WORDS];
};

/* Counters the loader reports (per-CPU array indices of the `stats` map);
 * Python names them after the enumerators, STAT_SEEN -> "seen". */
enum drop_counter {
	STAT_SEEN = 0,          /* kfree_skb calls seen */
	STAT_FILTERED = 1,      /* dropped by the in-kernel filter */
	STAT_EMITTED = 2,       /* events written to the ring buffer */
	STAT_LOST = 3,          /* ring buffer full: record lost (still counted in a map) */
	STAT_REPEAT = 4,        /* counted in a map without a record */
	STAT_COARSE = 5,        /* counted under a coarse key: the flow map was full */
	STAT_OVERFLOW = 6,      /* counted in the overflow counter: the coarse map was full */
	STAT_MAX = 7,
};

#endif
