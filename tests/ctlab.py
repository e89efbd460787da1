"""Filling and draining a lab namespace's conntrack table, for the conntrack pressure tests.

Three tools, all confined to lab namespaces and lab addresses:
- `udp_flood`: one UDP datagram to each port of some lab addresses, sent by
  a small C program (sendmmsg) compiled at test time, since Python sends
  ~300k datagrams/s too slowly to outrun the table's timeouts;
- `fill_assured`: ASSURED entries created through ctnetlink
  (IPCTNL_MSG_CT_NEW), which the kernel cannot evict early, so that new
  connections fail;
- `flush`: deletes entries through ctnetlink, all or those of one ct mark.
"""

from __future__ import annotations

import contextlib
import ipaddress
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

from tracer import nlmsg
from tracer.collectors.ctpressure import CtStatsSocket, Reading
from tracer.lab import LAB_V4, Lab
from tracer.netns import Netns

#: A server firewall that accepts everything but uses `ct`, which makes conntrack run in its
#: namespace; new entries get ct marks 0-7 in turn, so that `flush(ns, mark)` drains an eighth.
SERVER_RULESET = """
table inet lab {
    chain pre {
        type filter hook prerouting priority 0; policy accept;
        ct state new ct mark set numgen inc mod 8
    }
    chain in {
        type filter hook input priority 0; policy accept;
        ct state established,related accept
        tcp dport 5555 accept
    }
}
"""

FLOOD_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

/* udpflood SRCPORT ADDR...: one 1-byte datagram from SRCPORT to every port
 * 1-65535 of each ADDR, which must be in 198.18.0.0/15. Prints the count. */
#define BATCH 1024
int main(int argc, char **argv)
{
    static struct mmsghdr msgs[BATCH];
    static struct sockaddr_in to[BATCH];
    static struct iovec iov[BATCH];
    char byte = 'x';
    long sent = 0;
    if (argc < 3) return 2;
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in src = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    if (fd < 0 || bind(fd, (struct sockaddr *)&src, sizeof src) < 0) { perror("socket"); return 1; }
    for (int a = 2; a < argc; a++) {
        struct in_addr dst;
        if (inet_pton(AF_INET, argv[a], &dst) != 1 || (ntohl(dst.s_addr) & 0xFFFE0000u) != 0xC6120000u) {
            fprintf(stderr, "not a lab address: %s\n", argv[a]);
            return 2;
        }
        for (int port = 1; port <= 65535;) {
            int n = 0;
            for (; n < BATCH && port <= 65535; n++, port++) {
                to[n] = (struct sockaddr_in){.sin_family = AF_INET, .sin_port = htons(port), .sin_addr = dst};
                iov[n] = (struct iovec){.iov_base = &byte, .iov_len = 1};
                msgs[n].msg_hdr = (struct msghdr){.msg_name = &to[n], .msg_namelen = sizeof to[n],
                                                  .msg_iov = &iov[n], .msg_iovlen = 1};
            }
            for (int done = 0; done < n;) {
                int r = sendmmsg(fd, msgs + done, n - done, 0);
                if (r < 0) {
                    if (errno == EINTR || errno == ENOBUFS || errno == EAGAIN) continue;
                    if (errno == EPERM) { done++; continue; } /* our own output hook said no */
                    perror("sendmmsg");
                    return 1;
                }
                done += r;
                sent += r;
            }
        }
    }
    printf("%ld\n", sent);
    return 0;
}
"""


def build_flooder(directory: Path) -> Path:
    """Compiles the flooder with the first C compiler found; returns the binary's path."""
    compiler = next((c for c in ("gcc", "cc", "clang") if shutil.which(c)), None)
    if compiler is None:
        raise RuntimeError("no C compiler (gcc, cc or clang) to build the UDP flooder")
    source, binary = directory / "udpflood.c", directory / "udpflood"
    source.write_text(FLOOD_C)
    subprocess.run([compiler, "-O2", "-o", str(binary), str(source)], check=True, capture_output=True)
    return binary


def udp_flood(lab: Lab, ns: Netns, flooder: Path, addresses: list[str], src_port: int = 4000) -> int:
    """Sends from `ns` one datagram to each port of each address; returns how many were sent."""
    for addr in addresses:
        if ipaddress.ip_address(addr) not in LAB_V4:
            raise ValueError(f"refusing to flood {addr}: not a lab address")
    res = lab.run(ns, [str(flooder), str(src_port), *addresses])
    return int(res.stdout.strip())


# ---------------------------------------------------------------------------- ctnetlink

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_DELETE = 0, 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLA_F_NESTED = 0x8000
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_TIMEOUT, CTA_MARK, CTA_MARK_MASK = 1, 2, 3, 7, 8, 21
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
IPS_SEEN_REPLY, IPS_ASSURED, IPS_CONFIRMED = 1 << 1, 1 << 2, 1 << 3


def _nla(atype: int, payload: bytes) -> bytes:
    pad = b"\0" * (-len(payload) % 4)
    return struct.pack("=HH", 4 + len(payload), atype) + payload + pad


def _tuple(atype: int, src: bytes, dst: bytes, proto: int, sport: int, dport: int) -> bytes:
    ip = _nla(CTA_TUPLE_IP | NLA_F_NESTED, _nla(CTA_IP_V4_SRC, src) + _nla(CTA_IP_V4_DST, dst))
    l4 = _nla(CTA_TUPLE_PROTO | NLA_F_NESTED, _nla(CTA_PROTO_NUM, bytes([proto]))
              + _nla(CTA_PROTO_SRC_PORT, struct.pack(">H", sport)) + _nla(CTA_PROTO_DST_PORT, struct.pack(">H", dport)))
    return _nla(atype | NLA_F_NESTED, ip + l4)


def _message(msg_type: int, flags: int, seq: int, attrs: bytes, family: int = socket.AF_INET) -> bytes:
    body = struct.pack("=BBH", family, 0, 0) + attrs
    return nlmsg.NLMSG_HEADER.pack(16 + len(body), (NFNL_SUBSYS_CTNETLINK << 8) | msg_type,
                                   NLM_F_REQUEST | flags, seq, 0) + body


def assured_entry(seq: int, index: int, dst: str) -> bytes:
    """IPCTNL_MSG_CT_NEW of one ASSURED UDP entry from a source in 198.19.0.0/16 (index picks it)."""
    src = bytes([198, 19, (index >> 8) & 0xFF, index & 0xFF])
    sport = 1024 + (index >> 16)
    dst_b = socket.inet_aton(dst)
    attrs = (_tuple(CTA_TUPLE_ORIG, src, dst_b, socket.IPPROTO_UDP, sport, 9)
             + _tuple(CTA_TUPLE_REPLY, dst_b, src, socket.IPPROTO_UDP, 9, sport)
             + _nla(CTA_STATUS, struct.pack(">I", IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED))
             + _nla(CTA_TIMEOUT, struct.pack(">I", 600)))
    return _message(IPCTNL_MSG_CT_NEW, NLM_F_CREATE | NLM_F_EXCL, seq, attrs)


def _drain_errors(sock: socket.socket) -> list[int]:
    """Errnos of the NLMSG_ERROR replies waiting on the socket (without blocking)."""
    errors = []
    while True:
        try:
            data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return errors
        for mtype, _seq, msg in nlmsg.split_messages(data):
            if mtype == nlmsg.NLMSG_ERROR:
                err = struct.unpack_from("=i", msg, 16)[0]
                if err:
                    errors.append(-err)


def fill_assured(ns: Netns, dst: str, batch: int = 512) -> Reading:
    """Fills the table of `ns` to the global max with ASSURED entries; returns the last reading.

    Messages go in batches (one send per `batch`); the kernel answers only
    the ones that fail (no NLM_F_ACK), ENOMEM once the table is full.
    """
    stats = CtStatsSocket(ns)
    sock = nlmsg.netfilter_socket(ns)
    try:
        reading = stats.read()
        index, seq = 0, 0
        while reading.count < reading.max:
            room = min(batch, reading.max - reading.count)
            chunk = []
            for _ in range(room):
                seq += 1
                chunk.append(assured_entry(seq, index, dst))
                index += 1
            sock.send(b"".join(chunk))
            errors = _drain_errors(sock)
            if errors and any(e != 17 for e in errors):  # EEXIST is harmless
                reading = stats.read()
                if reading.count >= reading.max:
                    break
                raise OSError(errors[0], f"ctnetlink create failed at {reading.count} entries")
            if index % (batch * 32) == 0 or room < batch:
                reading = stats.read()
            if index > 4 * reading.max:
                raise RuntimeError(f"table stuck at {reading.count} of {reading.max}")
        return stats.read()
    finally:
        sock.close()
        stats.close()


def flush(ns: Netns, mark: int | None = None) -> None:
    """Deletes the entries of `ns`: all of them, or those whose ct mark is `mark`."""
    attrs = b""
    if mark is not None:
        attrs = _nla(CTA_MARK, struct.pack(">I", mark)) + _nla(CTA_MARK_MASK, struct.pack(">I", 0xFFFFFFFF))
    sock = nlmsg.netfilter_socket(ns)
    try:
        sock.settimeout(30)
        sock.send(_message(IPCTNL_MSG_CT_DELETE, NLM_F_ACK, 1, attrs, family=socket.AF_UNSPEC))
        data = sock.recv(1 << 16)
        for mtype, _seq, msg in nlmsg.split_messages(data):
            if mtype == nlmsg.NLMSG_ERROR:
                err = struct.unpack_from("=i", msg, 16)[0]
                if err and err != -2:  # ENOENT: nothing to delete
                    raise OSError(-err, "ctnetlink flush failed")
    finally:
        sock.close()


def read(ns: Netns) -> Reading:
    """The table and counters of `ns` now."""
    s = CtStatsSocket(ns)
    try:
        return s.read()
    finally:
        s.close()


def wait_reading(ns: Netns, pred, timeout: float = 10.0) -> Reading:
    """Polls the table of `ns` until `pred(reading)`; returns that reading or raises."""
    deadline = time.monotonic() + timeout
    r = read(ns)
    while not pred(r):
        if time.monotonic() > deadline:
            raise AssertionError(f"table never got there: {r}")
        time.sleep(0.05)
        r = read(ns)
    return r


@contextlib.contextmanager
def listener(ns: Netns, addr: str, port: int, backlog: int = 1024):
    """A TCP listener on a lab address of `ns` with a large backlog; the kernel completes handshakes itself."""
    from tracer import netns as netns_mod

    with netns_mod.entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if ipaddress.ip_address(addr) not in LAB_V4:
            raise ValueError(f"{addr} is not a lab address")
        sock.bind((addr, port))
        sock.listen(backlog)
        yield sock
    finally:
        sock.close()


def connect_until_refused(ns: Netns, addr: str, port: int, most: int,
                          timeout: float = 1.0) -> tuple[list[socket.socket], str]:
    """Opens TCP connections from `ns` and keeps them open until one fails (or `most` are open).

    Returns the open sockets (the caller closes them) and how the last attempt
    ended: "timeout", an errno name, or "open" when none failed.
    """
    from tracer import netns as netns_mod

    if ipaddress.ip_address(addr) not in LAB_V4:
        raise ValueError(f"{addr} is not a lab address")
    opened: list[socket.socket] = []
    for _ in range(most):
        with netns_mod.entered(ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((addr, port))
        except TimeoutError:
            sock.close()
            return opened, "timeout"
        except OSError as exc:
            sock.close()
            return opened, errno_name(exc.errno)
        opened.append(sock)
    return opened, "open"


def errno_name(number: int | None) -> str:
    import errno

    return errno.errorcode.get(number or 0, str(number))
