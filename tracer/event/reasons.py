"""What each kernel drop reason means, in one sentence a person can act on.

The kernel names a drop with an `enum skb_drop_reason` value whose name
(without `SKB_DROP_REASON_`) says little to someone who has not read
include/net/dropreason-core.h: `IP_INADDRERRORS` is, in practice, a router
with `ip_forward` off. These sentences say what happened and, where there
is a usual culprit, which setting or tool to look at. `tracer doctor
--reasons` prints them next to the running kernel's names (read from BTF:
the numbers and the set differ between kernels), and the diagnosis uses
them as the summary of a drop it can name no better cause for.

A reason this table does not know gets `None` from `explain`: the caller
says so rather than guessing.
"""

from __future__ import annotations

#: Reasons in the kernel's enum that never name a real drop.
NOT_DROPS = frozenset({"SKB_NOT_DROPPED_YET", "SKB_CONSUMED", "MAX", "SUBSYS_MASK"})

REASONS: dict[str, str] = {
    # --- not drops
    "SKB_NOT_DROPPED_YET": "The kernel's placeholder for a packet not dropped yet; never reported for a drop.",
    "SKB_CONSUMED": "The packet was used up normally (delivered or sent), not dropped; the tracer ignores it.",
    "MAX": "The end marker of the kernel's list of reasons, never a drop.",
    "SUBSYS_MASK": "A mask the kernel uses to group reasons by subsystem, never a drop.",
    # --- generic
    "NOT_SPECIFIED": "The code that freed the packet gave no reason; its location (the function) says who: "
                     "neigh_invalidate or __neigh_event_send means the next hop never answered ARP or "
                     "neighbour discovery.",
    "NOMEM": "The kernel could not allocate memory for the packet (or a copy of it) and dropped it.",
    "PKT_TOO_SMALL": "The packet is shorter than the headers it claims to carry (truncated or malformed).",
    "PKT_TOO_BIG": "The packet is larger than the path's MTU and may not be fragmented (DF set, or IPv6): "
                   "the sender should have got ICMP fragmentation-needed / packet-too-big.",
    "HDR_TRUNC": "A header could not be read or pulled into the packet buffer: the packet is truncated.",
    "SKB_CSUM": "Computing or checking the packet's checksum failed.",
    "SKB_GSO_SEG": "Splitting a large (GSO) packet into segments failed.",
    "SKB_UCOPY_FAULT": "Copying the data from the sending process's memory failed.",
    "UNHANDLED_PROTO": "No handler in the kernel for the packet's protocol (an ethertype or protocol nobody "
                       "registered).",
    "INVALID_PROTO": "The packet's protocol field is invalid for where it arrived.",
    "QUEUE_PURGE": "A queue was emptied (a socket or device closing) with this packet still in it.",
    "RECURSION_LIMIT": "The packet looped through the stack (tunnels, redirects) past the recursion limit.",
    "PFMEMALLOC": "The packet used emergency memory reserves and its socket may not use them.",
    # --- sockets
    "NO_SOCKET": "No socket is listening on (or bound to) the destination port: the port is closed "
                 "(TCP answers with a reset, UDP with ICMP port unreachable).",
    "SOCKET_CLOSE": "The socket the packet was for is closed.",
    "SOCKET_FILTER": "A BPF filter attached to the receiving socket (SO_ATTACH_FILTER) refused the packet.",
    "SOCKET_RCVBUFF": "The receiving socket's buffer is full: the application is not reading fast enough "
                      "(or SO_RCVBUF / net.core.rmem_max is too small).",
    "SOCKET_BACKLOG": "The socket's backlog is full while the application holds its lock.",
    "PROTO_MEM": "The protocol's memory limit is reached (net.ipv4.tcp_mem, udp_mem): the host is under "
                 "socket memory pressure.",
    "UNIX_DISCONNECT": "A Unix socket peer disconnected with data still queued.",
    "UNIX_SKIP_OOB": "Out-of-band data on a Unix socket was skipped.",
    "PACKET_SOCK_ERROR": "A packet socket (AF_PACKET) could not take the packet.",
    # --- netfilter, security
    "NETFILTER_DROP": "Netfilter dropped the packet: an nftables or iptables rule, a chain's policy, or "
                      "conntrack refusing it (table full, invalid).",
    "XFRM_POLICY": "An IPsec (xfrm) policy check refused the packet.",
    "SECURITY_HOOK": "A security module (LSM such as SELinux or AppArmor) refused the packet.",
    "BPF_CGROUP_EGRESS": "A cgroup BPF egress program refused the packet the process sent.",
    "TC_EGRESS": "A tc program or action on the egress of the device dropped the packet.",
    "TC_INGRESS": "A tc program or action on the ingress of the device dropped the packet.",
    "TC_COOKIE_ERROR": "A tc classifier's cookie check failed.",
    "TC_CHAIN_NOTFOUND": "tc sent the packet to a chain that does not exist.",
    "TC_RECLASSIFY_LOOP": "tc reclassified the packet too many times (a loop in its filters).",
    "XDP": "An XDP program on the device dropped the packet (XDP_DROP or XDP_ABORTED).",
    # --- IP
    "OTHERHOST": "The frame was addressed to another host's MAC address (promiscuous capture or a "
                 "bridge): not for this host.",
    "IP_CSUM": "The IPv4 header checksum is wrong.",
    "IP_INHDR": "The IP header is invalid (version, header length or total length).",
    "IP_RPFILTER": "Reverse path filtering: the source address is not reachable through the interface the "
                   "packet came in on (net.ipv4.conf.<if>.rp_filter; asymmetric routing or a spoofed source).",
    "UNICAST_IN_L2_MULTICAST": "A unicast IP packet arrived in a link-layer multicast or broadcast frame.",
    "IP_NOPROTO": "No handler for the IP protocol number: the protocol is not supported here.",
    "IP_INADDRERRORS": "The destination is not this host and the packet cannot be forwarded: usually "
                       "IP forwarding is off (net.ipv4.ip_forward=0 / net.ipv6.conf.all.forwarding=0) or "
                       "the address is invalid here.",
    "IP_INNOROUTES": "No route for the arriving packet's destination (or a route of type unreachable / "
                     "blackhole / prohibit).",
    "IP_OUTNOROUTES": "No route to send the packet: the routing table has no route for its destination.",
    "IP_LOCAL_SOURCE": "The packet arrived from outside with one of this host's own addresses as its source.",
    "IP_INVALID_SOURCE": "The source address is invalid (multicast, broadcast or 0.0.0.0/8: a martian).",
    "IP_LOCALNET": "A 127.0.0.0/8 address arrived on a non-loopback interface (net.ipv4.conf.<if>."
                   "route_localnet is off).",
    "IP_INVALID_DEST": "The destination address is invalid for routing (0.0.0.0/8 or loopback).",
    "IP_TUNNEL_ECN": "A tunnel's ECN decapsulation found inconsistent ECN bits.",
    "IPV6DISABLED": "IPv6 is disabled on the interface (net.ipv6.conf.<if>.disable_ipv6=1).",
    "IPV6_BAD_EXTHDR": "An IPv6 extension header is malformed.",
    "IPV6_NDISC_FRAG": "A neighbour discovery message arrived fragmented, which ND forbids.",
    "IPV6_NDISC_HOP_LIMIT": "A neighbour discovery message arrived with a hop limit other than 255 "
                            "(it was routed, which ND forbids).",
    "IPV6_NDISC_BAD_CODE": "A neighbour discovery message has a non-zero ICMPv6 code.",
    "IPV6_NDISC_BAD_OPTIONS": "A neighbour discovery message has malformed options.",
    "IPV6_NDISC_NS_OTHERHOST": "A neighbour solicitation asks for an address this host does not have.",
    "DUP_FRAG": "A duplicate IP fragment arrived.",
    "FRAG_REASM_TIMEOUT": "Not all fragments of a packet arrived in time to reassemble it "
                          "(net.ipv4.ipfrag_time).",
    "FRAG_TOO_FAR": "A fragment arrived too far out of order (net.ipv4.ipfrag_max_dist).",
    "ICMP_CSUM": "The ICMP checksum is wrong.",
    # --- neighbours
    "NEIGH_CREATEFAIL": "No neighbour (ARP / ND) entry could be created for the next hop (the neighbour "
                        "table is full: net.ipv4.neigh.default.gc_thresh3).",
    "NEIGH_FAILED": "The next hop never answered ARP or neighbour discovery: it is down, on another link, "
                    "or a firewall drops ARP / ICMPv6 neighbour solicitations.",
    "NEIGH_QUEUEFULL": "Too many packets wait for the next hop's ARP / ND answer: the queue of unresolved "
                       "packets is full.",
    "NEIGH_DEAD": "The next hop's neighbour entry was removed while packets waited on it.",
    "NEIGH_HH_FILLFAIL": "The link-layer header for the next hop could not be built.",
    # --- devices, queues
    "QDISC_DROP": "The device's queueing discipline dropped the packet (its queue is full or its policy "
                  "drops): see `tc -s qdisc`.",
    "QDISC_OVERLIMIT": "The queueing discipline's limit is exceeded.",
    "QDISC_CONGESTED": "The queueing discipline dropped the packet to signal congestion.",
    "CAKE_FLOOD": "The cake qdisc dropped the packet (flood protection).",
    "FQ_BAND_LIMIT": "The fq qdisc's band limit is reached.",
    "FQ_HORIZON_LIMIT": "The fq qdisc dropped a packet timestamped too far in the future.",
    "FQ_FLOW_LIMIT": "The fq qdisc's per-flow limit is reached.",
    "DUALPI2_STEP_DROP": "The dualpi2 qdisc dropped the packet at its step threshold.",
    "CPU_BACKLOG": "The CPU's backlog of received packets is full (net.core.netdev_max_backlog).",
    "DEV_HDR": "The device found the packet's header (or its metadata) invalid.",
    "DEV_READY": "The device is not ready to send (down, no carrier, or detached).",
    "FULL_RING": "The device's ring buffer is full.",
    "TAP_FILTER": "A tun/tap device's filter refused the packet.",
    "TAP_TXFILTER": "A tun/tap device's transmit filter refused the packet.",
    "SKB_RX_HEADROOM": "The received packet lacks the headroom the device needs.",
    "NO_TX_TARGET": "There is no device to send the packet to.",
    "TUNNEL_TXINFO": "A tunnel lacks the transmit information it needs for this packet.",
    "LOCAL_MAC": "The frame's source MAC address is this host's own.",
    "MAC_INVALID_SOURCE": "The frame's source MAC address is invalid (multicast or zero).",
    "MAC_IEEE_MAC_CONTROL": "An IEEE MAC control frame (pause frames) was dropped.",
    "ARP_PVLAN_DISABLE": "ARP proxying within a private VLAN is disabled.",
    "BRIDGE_INGRESS_STP_STATE": "The bridge port's spanning tree state does not forward frames.",
    "VXLAN_INVALID_HDR": "The VXLAN header is invalid.",
    "VXLAN_VNI_NOT_FOUND": "No VXLAN device has the packet's VNI.",
    "VXLAN_ENTRY_EXISTS": "The VXLAN forwarding entry already exists.",
    "CAN_RX_INVALID_FRAME": "An invalid CAN frame was received.",
    "CANFD_RX_INVALID_FRAME": "An invalid CAN FD frame was received.",
    "CANXL_RX_INVALID_FRAME": "An invalid CAN XL frame was received.",
    "PSP_INPUT": "PSP encryption refused the received packet.",
    "PSP_OUTPUT": "PSP encryption refused the packet to send.",
    # --- UDP, TCP
    "UDP_CSUM": "The UDP checksum is wrong (corruption on the path, or a broken checksum offload).",
    "TCP_CSUM": "The TCP checksum is wrong (corruption on the path, or a broken checksum offload).",
    "TCP_MINTTL": "The TTL is below the socket's IP_MINTTL (the GTSM protection of BGP and the like).",
    "TCP_AUTH_HDR": "The TCP segment's authentication option (MD5 or AO) is malformed or both are present.",
    "TCP_MD5NOTFOUND": "The socket expects a TCP MD5 signature and the segment has none.",
    "TCP_MD5UNEXPECTED": "The segment has a TCP MD5 signature the socket does not expect.",
    "TCP_MD5FAILURE": "The segment's TCP MD5 signature is wrong (a key mismatch).",
    "TCP_AONOTFOUND": "The socket expects a TCP-AO option and the segment has none.",
    "TCP_AOUNEXPECTED": "The segment has a TCP-AO option the socket does not expect.",
    "TCP_AOKEYNOTFOUND": "No TCP-AO key matches the segment's key id.",
    "TCP_AOFAILURE": "The segment's TCP-AO signature is wrong.",
    "TCP_FLAGS": "The TCP flags are invalid for the connection's state.",
    "TCP_ABORT_ON_DATA": "Data arrived for a socket the application already closed: the connection is "
                         "reset.",
    "TCP_ZEROWINDOW": "The receiver's window is zero: it has no room for the data.",
    "TCP_OLD_DATA": "The segment carries only data already received (a retransmission).",
    "TCP_OVERWINDOW": "The segment's data is beyond the receive window.",
    "TCP_OFOMERGE": "The out-of-order segment was merged into one already queued.",
    "TCP_RFC7323_PAWS": "The segment's timestamp is older than the last one seen (PAWS, RFC 7323).",
    "TCP_RFC7323_PAWS_ACK": "A pure ACK failed the PAWS timestamp check (RFC 7323).",
    "TCP_RFC7323_TW_PAWS": "A segment for a TIME-WAIT socket failed the PAWS timestamp check.",
    "TCP_RFC7323_TSECR": "The segment's timestamp echo reply does not match what was sent.",
    "TCP_LISTEN_OVERFLOW": "The listening socket's accept queue is full: the application does not accept "
                           "connections fast enough (listen backlog, net.core.somaxconn).",
    "TCP_OLD_SEQUENCE": "The segment's sequence number is old (before the receive window).",
    "TCP_INVALID_SEQUENCE": "The segment's sequence number is not in the receive window.",
    "TCP_INVALID_END_SEQUENCE": "The segment ends beyond the receive window.",
    "TCP_INVALID_ACK_SEQUENCE": "The segment acknowledges data in a way that is invalid for the connection.",
    "TCP_RESET": "A reset (RST) closed the connection, or an invalid RST was dropped.",
    "TCP_INVALID_SYN": "A SYN arrived for a connection already established (or in a state that refuses "
                       "it).",
    "TCP_CLOSE": "The socket is in the CLOSE state.",
    "TCP_FASTOPEN": "A TCP Fast Open cookie check failed, or the data of the SYN was refused.",
    "TCP_OLD_ACK": "The ACK acknowledges data already acknowledged.",
    "TCP_TOO_OLD_ACK": "The ACK is too old to be taken into account.",
    "TCP_ACK_UNSENT_DATA": "The ACK acknowledges data never sent.",
    "TCP_OFO_QUEUE_PRUNE": "The out-of-order queue was pruned under memory pressure.",
    "TCP_OFO_DROP": "An out-of-order segment was dropped (no room, or out of the window).",
}


def explain(reason: str) -> str | None:
    """The sentence for one reason name (with or without `SKB_DROP_REASON_`), None when unknown."""
    return REASONS.get(reason.upper().removeprefix("SKB_DROP_REASON_"))


#: The neighbour functions whose NOT_SPECIFIED frees are the next hop failing to resolve
#: (older kernels, and paths that still give no reason).
NEIGHBOR_SITES = ("neigh_invalidate", "__neigh_event_send")
#: The reasons that say the next hop could not be resolved or queued for.
NEIGHBOR_REASONS = frozenset({"NEIGH_FAILED", "NEIGH_QUEUEFULL", "NEIGH_DEAD", "NEIGH_CREATEFAIL"})


def is_neighbor_failure(reason: str, location: str | None) -> bool:
    """Whether a drop is the next hop failing to resolve: a NEIGH_* reason, or an unspecified
    free at the neighbour code (`neigh_invalidate+0x..`, `__neigh_event_send+0x..`)."""
    if reason in NEIGHBOR_REASONS:
        return True
    if reason != "NOT_SPECIFIED" or not location:
        return False
    symbol = location.split("+", 1)[0].split(" ", 1)[0]
    return symbol in NEIGHBOR_SITES
