#!/usr/bin/python3
"""Adversarial frames for tests/tests/adversarial.rs (zt's standing attack suite).

Usage: attack.py <scenario> '<json params>'   (run inside a pod's or node's netns)

Every scenario crafts its frames with scapy and sends them, then prints one line per
attack, `ATTACK <label> <frames>`; the test counts them. Whatever a frame can carry in
its payload carries the tag `ZTADV:<nonce>:<label>;`, so a capture in the target's netns
names the attack that got through. Frames go out on a packet socket (`l2`: the pod's
eth0, Ethernet built here, so nothing is rewritten by the sender's kernel) or a raw IP
socket (`l3`: routed by the sender's kernel, any source address).

`nft` is no attack: it loads nftables commands through libnftables (the nft CLI is not
installed by `cargo xtask setup`; libnftables1 comes with dnsmasq-base).

Only ever sends to the addresses it is given (the test bed's). Run with /usr/bin/python3
(Debian's python3-scapy).
"""
import ctypes
import errno
import json
import socket
import struct
import sys

from scapy.all import Ether, Dot1Q, IP, IPv6, UDP, TCP, ICMP, GRE, Raw, checksum, conf, raw, get_if_hwaddr
from scapy.layers.l2 import Dot1AD
from scapy.layers.vxlan import VXLAN
from scapy.contrib.geneve import GENEVE
from scapy.layers.sctp import SCTP, SCTPChunkInit
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    PadN,
    fragment6,
)

conf.verb = 0

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD


class Out:
    """Sends frames and counts them per attack label."""

    def __init__(self, p):
        self.p = p
        self.only = set(p.get("only") or [])
        self.iface = p.get("iface", "eth0")
        self.gw_mac = p.get("gw_mac")
        self._l2 = None
        self._l3 = {}
        self.counts = {}  # label -> frames, in first-sent order

    def want(self, label):
        return not self.only or label in self.only

    def tag(self, label):
        return ("ZTADV:%s:%s;" % (self.p["nonce"], label)).encode()

    def l2sock(self):
        if self._l2 is None:
            self._l2 = conf.L2socket(iface=self.iface)
            self.src_mac = get_if_hwaddr(self.iface)
        return self._l2

    def eth(self, dst_mac=None, type_=None):
        self.l2sock()
        e = Ether(src=self.src_mac, dst=dst_mac or self.gw_mac)
        if type_ is not None:
            e.type = type_
        return e

    def l2(self, label, frames):
        if not self.want(label):
            return
        s = self.l2sock()
        for f in frames if isinstance(frames, list) else [frames]:
            try:
                s.send(f)
            except OSError as e:
                # A packet socket writing on an interface whose TC egress hook drops the
                # frame (the node's side of a pod's veth) gets ENOBUFS: sent, and dropped.
                if e.errno != errno.ENOBUFS:
                    raise
            self.counts[label] = self.counts.get(label, 0) + 1

    def l3(self, label, packets):
        """Raw IP socket with the header included (v4: IP_HDRINCL, v6: IPPROTO_RAW)."""
        if not self.want(label):
            return
        for pk in packets if isinstance(packets, list) else [packets]:
            v6 = isinstance(pk, IPv6)
            fam = socket.AF_INET6 if v6 else socket.AF_INET
            if fam not in self._l3:
                self._l3[fam] = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
            try:
                self._l3[fam].sendto(raw(pk), (pk.dst, 0))
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
            self.counts[label] = self.counts.get(label, 0) + 1

    def done(self):
        if self.only - set(self.counts):
            raise SystemExit("unknown labels in only: %s" % sorted(self.only - set(self.counts)))
        for label, n in self.counts.items():
            print("ATTACK %s %d" % (label, n))
        total = sum(self.counts.values())
        print("TOTAL %d %d" % (len(self.counts), total))


def ip(src, dst, **kw):
    return IPv6(src=src, dst=dst, **kw) if ":" in dst else IP(src=src, dst=dst, **kw)


def et(dst):
    return ETH_P_IPV6 if ":" in dst else ETH_P_IP


def fam(addr):
    return "v6" if ":" in addr else "v4"


def addrs(p, key):
    """p[key+'4'], p[key+'6'] that are set."""
    return [a for a in (p.get(key + "4"), p.get(key + "6")) if a]


# ---------------------------------------------------------------------------
# 1. VLAN tags and ethertypes (pod -> its gateway)
# ---------------------------------------------------------------------------
def vlan(o, p):
    """Double tags (802.1Q/802.1Q, 802.1ad/802.1Q) around a packet sourced from another
    local pod; single tags with that pod's source and with our own; a frame of an
    ethertype that is neither IP nor ARP."""
    for dst, spoof, own in zip(addrs(p, "victim"), addrs(p, "spoof"), addrs(p, "self")):
        f = fam(dst)

        def inner(src, dport, label):
            return ip(src, dst) / UDP(sport=40000, dport=dport) / Raw(o.tag(label))

        for vid in (0, 5):
            lb = "dot1q-dot1q-vid%d/%s" % (vid, f)
            o.l2(lb, o.eth(type_=0x8100) / Dot1Q(vlan=vid, type=0x8100) / Dot1Q(vlan=vid, type=et(dst)) / inner(spoof, p["dport_spoof"], lb))
            lb = "dot1ad-dot1q-vid%d/%s" % (vid, f)
            o.l2(lb, o.eth(type_=0x88A8) / Dot1AD(vlan=vid, type=0x8100) / Dot1Q(vlan=vid, type=et(dst)) / inner(spoof, p["dport_spoof"], lb))
        lb = "dot1q-spoofed-source/%s" % f
        o.l2(lb, o.eth(type_=0x8100) / Dot1Q(vlan=0, type=et(dst)) / inner(spoof, p["dport_spoof"], lb))
        lb = "dot1q-own-source/%s" % f
        o.l2(lb, o.eth(type_=0x8100) / Dot1Q(vlan=0, type=et(dst)) / inner(own, p["dport_own"], lb))
        lb = "dot1ad-own-source/%s" % f
        o.l2(lb, o.eth(type_=0x88A8) / Dot1AD(vlan=0, type=et(dst)) / inner(own, p["dport_own"], lb))
    lb = "ethertype-88b5"
    o.l2(lb, [o.eth(type_=0x88B5) / Raw(o.tag(lb) + b"\x00" * 32), o.eth(dst_mac="ff:ff:ff:ff:ff:ff", type_=0x88B5) / Raw(o.tag(lb) + b"\x00" * 32)])
    # A control that must arrive: untagged, our own source, the port allowed to us.
    for dst, own in zip(addrs(p, "victim"), addrs(p, "self")):
        lb = "control/%s" % fam(dst)
        o.l2(lb, o.eth(type_=et(dst)) / ip(own, dst) / UDP(sport=40000, dport=p["dport_own"]) / Raw(o.tag(lb)))


# ---------------------------------------------------------------------------
# 2. ICMP errors quoting a live flow
# ---------------------------------------------------------------------------
def icmp_error(o, p):
    """Port unreachable (v4) / destination unreachable, port (v6) from `src` to the
    flow's owner, quoting each given flow (UDP or TCP) in its original direction."""
    for q in p["quotes"]:
        me = q["from"]
        if q["proto"] == "udp":
            l4 = UDP(sport=q["sport"], dport=q["dport"])
        else:
            l4 = TCP(sport=q["sport"], dport=q["dport"], flags="PA", seq=1000, ack=1000)
        lb = q["label"]
        quoted = ip(q["src"], q["dst"]) / l4 / Raw(o.tag(lb))
        if ":" in me:
            pk = IPv6(src=me, dst=q["src"]) / ICMPv6DestUnreach(code=4) / quoted
        else:
            pk = IP(src=me, dst=q["src"]) / ICMP(type=3, code=3) / quoted
        o.l2(lb, o.eth(type_=et(me)) / pk)


# ---------------------------------------------------------------------------
# 3. Tunnels to the node
# ---------------------------------------------------------------------------
def _inner(o, p, v6, label):
    src, dst = (p["spoof6"], p["victim6"]) if v6 else (p["spoof4"], p["victim4"])
    return ip(src, dst) / UDP(sport=40001, dport=p["dport"]) / Raw(o.tag(label))


def tunnel(o, p):
    """VXLAN (4789, 8472), Geneve (6081), IPIP, 6in4 / IPv6-in-IPv6, GRE to the node's
    addresses, each carrying a packet sourced from another local pod to the victim."""
    nodes = [(p["node4"], p.get("vx_mac4")), (p["node6"], p.get("vx_mac6"))]
    for node, vxmac in nodes:
        of = fam(node)
        for inner_v6 in (False, True):
            lf = "inner6" if inner_v6 else "inner4"
            lb = "vxlan-4789/outer-%s/%s" % (of, lf)
            inner = Ether(src="02:00:00:ad:00:01", dst=vxmac) / _inner(o, p, inner_v6, lb)
            o.l2(lb, o.eth(type_=et(node)) / ip(p["self" + of[1]], node) / UDP(sport=40002, dport=4789) / VXLAN(flags=0x08, vni=p["vni"]) / inner)
        lb = "vxlan-8472/outer-%s" % of
        inner = Ether(src="02:00:00:ad:00:01", dst="02:00:00:ad:00:02") / _inner(o, p, False, lb)
        o.l2(lb, o.eth(type_=et(node)) / ip(p["self" + of[1]], node) / UDP(sport=40003, dport=8472) / VXLAN(flags=0x08, vni=1) / inner)
        lb = "geneve-6081/outer-%s" % of
        inner = Ether(src="02:00:00:ad:00:01", dst="02:00:00:ad:00:02") / _inner(o, p, False, lb)
        o.l2(lb, o.eth(type_=et(node)) / ip(p["self" + of[1]], node) / UDP(sport=40004, dport=6081) / GENEVE(vni=1, proto=0x6558) / inner)
        me = p["self" + of[1]]
        for proto, name, inner_v6 in ((4, "ipip", False), (41, "ipv6-encap", True), (47, "gre", False)):
            lb = "%s/outer-%s" % (name, of)
            inner = _inner(o, p, inner_v6, lb)
            if proto == 47:
                inner = GRE(proto=ETH_P_IP) / inner
            if of == "v6":
                outer = IPv6(src=me, dst=node, nh=proto)
            else:
                outer = IP(src=me, dst=node, proto=proto)
            o.l2(lb, o.eth(type_=et(node)) / outer / inner)


# ---------------------------------------------------------------------------
# 4. Packets with a local pod's source injected in the node
# ---------------------------------------------------------------------------
def inject(o, p):
    """Run in the node netns: a pod-sourced packet to the victim routed by the node's
    kernel (raw socket), written straight onto the victim's host-side veth, and
    decapsulated by the node's VXLAN device (sent by the node to itself)."""
    for src, dst in zip(addrs(p, "spoof"), addrs(p, "victim")):
        f = fam(dst)
        lb = "node-routed/%s" % f
        o.l3(lb, ip(src, dst) / UDP(sport=40005, dport=p["dport"]) / Raw(o.tag(lb)))
        lb = "node-veth/%s" % f
        o.l2(lb, Ether(src=get_if_hwaddr(o.iface), dst=p["victim_mac"], type=et(dst)) / ip(src, dst) / UDP(sport=40006, dport=p["dport"]) / Raw(o.tag(lb)))
    for node, vxmac in ((p["node4"], p["vx_mac4"]), (p["node6"], p["vx_mac6"])):
        for inner_v6 in (False, True):
            lb = "node-vxlan/outer-%s/%s" % (fam(node), "inner6" if inner_v6 else "inner4")
            inner = Ether(src="02:00:00:ad:00:03", dst=vxmac) / _inner(o, p, inner_v6, lb)
            o.l3(lb, ip(node, node) / UDP(sport=40007, dport=4789) / VXLAN(flags=0x08, vni=p["vni"]) / inner)


# ---------------------------------------------------------------------------
# 6. IPv6 fragments with extension headers after the Fragment header
# ---------------------------------------------------------------------------
def _datagram(o, label, size):
    t = o.tag(label)
    return t + bytes((i * 7) & 0xFF for i in range(size - len(t)))


def frag6_destopt(o, p):
    """One UDP datagram of `size` bytes per layout, fragmented to 1280-byte packets."""
    src, dst, size = p["self6"], p["victim6"], p["size"]
    layouts = {
        "frag-destopt-udp": lambda: IPv6ExtHdrFragment(id=0x5A01) / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\x00" * 4)]),
        "frag-udp": lambda: IPv6ExtHdrFragment(id=0x5A02),
        "destopt-frag-udp": lambda: IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\x00" * 4)]) / IPv6ExtHdrFragment(id=0x5A03),
        "frag-destopt-destopt-udp": lambda: IPv6ExtHdrFragment(id=0x5A04) / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\x00" * 4)]) / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\x00" * 4)]),
    }
    for name, hdrs in layouts.items():
        lb = "%s/v6" % name
        pk = IPv6(src=src, dst=dst) / hdrs() / UDP(sport=p["sport"], dport=p["dport"]) / Raw(_datagram(o, lb, size))
        pk = IPv6(raw(pk))  # checksums over the whole datagram
        o.l2(lb, [o.eth(type_=ETH_P_IPV6) / f for f in fragment6(pk, 1280)])


# ---------------------------------------------------------------------------
# Regression guards
# ---------------------------------------------------------------------------
def scan(o, p):
    """SYN scan, UDP probes, SCTP INITs and pings of the victim."""
    for me, dst in zip(addrs(p, "self"), addrs(p, "victim")):
        f = fam(dst)
        lb = "tcp-syn-scan/%s" % f
        o.l2(lb, [o.eth(type_=et(dst)) / ip(me, dst) / TCP(sport=41000 + i, dport=port, flags="S", seq=7) / Raw(o.tag(lb)) for i, port in enumerate(p["tcp_ports"])])
        lb = "udp-scan/%s" % f
        o.l2(lb, [o.eth(type_=et(dst)) / ip(me, dst) / UDP(sport=41000 + i, dport=port) / Raw(o.tag(lb)) for i, port in enumerate(p["udp_ports"])])
        lb = "sctp-init-scan/%s" % f
        o.l2(lb, [o.eth(type_=et(dst)) / ip(me, dst) / SCTP(sport=41000 + i, dport=port, tag=0) / SCTPChunkInit(init_tag=0x1234, a_rwnd=65535, n_out_streams=1, n_in_streams=1, init_tsn=1) for i, port in enumerate(p["sctp_ports"])])
        lb = "ping/%s" % f
        echo = ICMPv6EchoRequest(id=0x77, seq=1) if f == "v6" else ICMP(type=8, id=0x77, seq=1)
        o.l2(lb, o.eth(type_=et(dst)) / ip(me, dst) / echo / Raw(o.tag(lb)))


def tcp_flags(o, p):
    """TCP segments without a SYN to a denied port, and forged replies."""
    for me, dst in zip(addrs(p, "self"), addrs(p, "victim")):
        f = fam(dst)
        for flags in ("A", "F", "R", "FA", "RA", "PA", "FPU", "", "SF", "SR"):
            lb = "tcp-%s/%s" % (flags.lower() or "null", f)
            o.l2(lb, o.eth(type_=et(dst)) / ip(me, dst) / TCP(sport=42000, dport=p["dport"], flags=flags, seq=1, ack=1) / Raw(o.tag(lb)))
        # A forged reply: as if the victim had connected to our port 7000 / asked our DNS.
        lb = "tcp-synack-forged-reply/%s" % f
        o.l2(lb, o.eth(type_=et(dst)) / ip(me, dst) / TCP(sport=7000, dport=43000, flags="SA", seq=1, ack=1) / Raw(o.tag(lb)))
        lb = "udp-forged-dns-reply/%s" % f
        o.l2(lb, o.eth(type_=et(dst)) / ip(me, dst) / UDP(sport=53, dport=43001) / Raw(o.tag(lb)))


def spoof(o, p):
    """Packets from the attacker's interface with other sources, no VLAN."""
    for s in p["sources"]:
        dst = p["victim6"] if ":" in s["src"] else p["victim4"]
        lb = s["label"]
        pk = ip(s["src"], dst)
        if s.get("proto") == "tcp":
            pk = pk / TCP(sport=44000, dport=s["dport"], flags="S") / Raw(o.tag(lb))
        else:
            pk = pk / UDP(sport=44000, dport=s["dport"]) / Raw(o.tag(lb))
        o.l2(lb, o.eth(type_=et(dst)) / pk)


def _frags4(me, dst, ident, proto, l4, pieces):
    """IPv4 fragments of the bytes `l4`: pieces = [(offset bytes, length or None, more)]."""
    out = []
    for off, ln, mf in pieces:
        chunk = l4[off:] if ln is None else l4[off:off + ln]
        out.append(IP(src=me, dst=dst, id=ident, proto=proto, flags="MF" if mf else 0, frag=off // 8) / Raw(chunk))
    return out


def _frags6(me, dst, ident, nh, l4, pieces):
    out = []
    for off, ln, mf in pieces:
        chunk = l4[off:] if ln is None else l4[off:off + ln]
        out.append(IPv6(src=me, dst=dst) / IPv6ExtHdrFragment(id=ident, nh=nh, offset=off // 8, m=1 if mf else 0) / Raw(chunk))
    return out


def _l4_bytes(pk):
    """The L4 bytes of a whole packet, checksum over the pseudo-header included."""
    return raw(pk)[40 if isinstance(pk, IPv6) else 20:]


def _udp_bytes(me, dst, sport, dport, payload):
    return _l4_bytes(ip(me, dst) / UDP(sport=sport, dport=dport) / Raw(payload))


def _tcp_bytes(me, dst, sport, dport, flags, payload=b""):
    return _l4_bytes(ip(me, dst) / TCP(sport=sport, dport=dport, flags=flags, seq=9) / Raw(payload))


def frag_games(o, p):
    """Overlapping first fragments that rewrite the port, tiny first fragments (the TCP
    flags in the second), a first fragment without the L4 header, lone later fragments,
    atomic fragments, a header chain split over two IPv6 fragments."""
    ap, dp, tp = p["allowed_port"], p["denied_port"], p["tcp_denied"]
    ident = 0x3100
    for me, dst in zip(addrs(p, "self"), addrs(p, "victim")):
        f = fam(dst)
        frags = _frags6 if f == "v6" else _frags4
        e = o.eth(type_=et(dst))

        def frag_list(l4s, proto):
            nonlocal ident
            ident += 1
            out = []
            for l4, pieces in l4s:
                out += frags(me, dst, ident, proto, l4, pieces)
            return [e / x for x in out]

        pay = lambda lb: o.tag(lb).ljust(40, b"-")
        lb = "overlap-rewrites-port/%s" % f
        allowed, denied = _udp_bytes(me, dst, 45000, ap, pay(lb)), _udp_bytes(me, dst, 45000, dp, pay(lb))
        o.l2(lb, frag_list([(allowed, [(0, 16, True)]), (denied, [(0, 16, True)]), (allowed, [(16, None, False)])], 17))
        lb = "overlap-denied-first/%s" % f
        allowed, denied = _udp_bytes(me, dst, 45001, ap, pay(lb)), _udp_bytes(me, dst, 45001, dp, pay(lb))
        o.l2(lb, frag_list([(denied, [(0, 16, True)]), (allowed, [(0, 16, True)]), (denied, [(16, None, False)])], 17))
        lb = "overlap-later-rewrites-header/%s" % f
        allowed, denied = _udp_bytes(me, dst, 45002, ap, pay(lb)), _udp_bytes(me, dst, 45002, dp, pay(lb))
        o.l2(lb, frag_list([(allowed, [(0, 16, True)]), (denied, [(8, 16, True)]), (allowed, [(16, None, False)])], 17))
        lb = "tiny-first-tcp-syn/%s" % f
        syn = _tcp_bytes(me, dst, 45003, tp, "S", pay(lb))
        o.l2(lb, frag_list([(syn, [(0, 8, True), (8, None, False)])], 6))
        lb = "empty-first-fragment/%s" % f
        denied = _udp_bytes(me, dst, 45004, dp, pay(lb))
        o.l2(lb, frag_list([(b"", [(0, 0, True)]), (denied, [(8, None, False)])], 17))
        lb = "later-fragments-only/%s" % f
        denied = _udp_bytes(me, dst, 45005, dp, pay(lb))
        o.l2(lb, frag_list([(denied, [(16, 16, True), (32, None, False)])], 17))
        lb = "allowed-first-then-other-proto/%s" % f
        allowed, syn = _udp_bytes(me, dst, 45006, ap, pay(lb)), _tcp_bytes(me, dst, 45006, tp, "S", pay(lb))
        o.l2(lb, frag_list([(allowed, [(0, 16, True)]), (syn, [(16, None, False)])], 17) + frag_list([(syn, [(16, None, False)])], 6))
        if f == "v6":
            lb = "atomic-fragment/%s" % f
            o.l2(lb, e / IPv6(src=me, dst=dst) / IPv6ExtHdrFragment(id=0x3199, m=0, offset=0) / UDP(sport=45007, dport=dp) / Raw(pay(lb)))
            lb = "header-chain-split/%s" % f
            ident += 1
            udp = _udp_bytes(me, dst, 45008, dp, pay(lb))
            first = IPv6(src=me, dst=dst) / IPv6ExtHdrFragment(id=ident, nh=60, offset=0, m=1) / IPv6ExtHdrDestOpt(nh=17, options=[PadN(optdata=b"\x00" * 4)])
            second = IPv6(src=me, dst=dst) / IPv6ExtHdrFragment(id=ident, nh=60, offset=1, m=0) / Raw(udp)
            o.l2(lb, [e / first, e / second])
        else:
            lb = "allowed-first-later-to-other-dst-port/%s" % f
            # Same id, first to the allowed port, then a full first fragment to the denied port.
            allowed, denied = _udp_bytes(me, dst, 45009, ap, pay(lb)), _udp_bytes(me, dst, 45009, dp, pay(lb))
            o.l2(lb, frag_list([(allowed, [(0, 16, True)]), (denied, [(0, None, False)])], 17))
    # Controls: a fragmented datagram to the allowed port arrives.
    for me, dst in zip(addrs(p, "self"), addrs(p, "victim")):
        f = fam(dst)
        lb = "control/%s" % f
        pk = ip(me, dst) / UDP(sport=45100, dport=ap) / Raw(_datagram(o, lb, 3000))
        if f == "v6":
            pk = IPv6(src=me, dst=dst) / IPv6ExtHdrFragment(id=0x31FF) / UDP(sport=45100, dport=ap) / Raw(_datagram(o, lb, 3000))
            fl = fragment6(IPv6(raw(pk)), 1280)
        else:
            from scapy.all import fragment
            fl = fragment(IP(raw(pk)), fragsize=1400)
        o.l2(lb, [o.eth(type_=et(dst)) / x for x in fl])


def ext6(o, p):
    """IPv6 extension header chains: longer than the datapath walks, a 1 KB option, a
    routing header type 0, no next header, an unknown upper protocol."""
    me, dst, ap, dp = p["self6"], p["victim6"], p["allowed_port"], p["denied_port"]
    e = o.eth(type_=ETH_P_IPV6)
    pad = lambda: IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\x00" * 4)])

    def chain(n, first=None):
        h = first
        for _ in range(n):
            h = pad() if h is None else h / pad()
        return h

    def udp(port, lb):
        return UDP(sport=46000, dport=port) / Raw(o.tag(lb))

    for n in (7, 8, 12, 20):
        lb = "destopt-x%d-denied-port/v6" % n
        o.l2(lb, e / IPv6(src=me, dst=dst) / chain(n) / udp(dp, lb))
    # Fail closed: a chain too long to walk does not pass even to the allowed port.
    lb = "destopt-x20-allowed-port/v6"
    o.l2(lb, e / IPv6(src=me, dst=dst) / chain(20) / udp(ap, lb))
    lb = "hbh-destopt-x6-routing-denied-port/v6"
    o.l2(lb, e / IPv6(src=me, dst=dst) / chain(6, IPv6ExtHdrHopByHop(options=[PadN(optdata=b"\x00" * 4)])) / IPv6ExtHdrRouting(type=0, segleft=0, addresses=[]) / udp(dp, lb))
    lb = "destopt-x7-tcp-syn-denied/v6"
    o.l2(lb, e / IPv6(src=me, dst=dst) / chain(7) / TCP(sport=46001, dport=p["tcp_denied"], flags="S") / Raw(o.tag(lb)))
    lb = "destopt-x5-denied-port/v6"
    o.l2(lb, e / IPv6(src=me, dst=dst) / chain(5) / udp(dp, lb))
    lb = "destopt-1k-denied-port/v6"
    o.l2(lb, e / IPv6(src=me, dst=dst) / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\x00" * 253)] * 4) / udp(dp, lb))
    lb = "routing-type0-denied-port/v6"
    o.l2(lb, e / IPv6(src=me, dst=dst) / IPv6ExtHdrRouting(type=0, segleft=0, addresses=[]) / udp(dp, lb))
    lb = "no-next-header/v6"
    o.l2(lb, e / IPv6(src=me, dst=dst, nh=59) / Raw(o.tag(lb)))
    lb = "destopt-unknown-upper/v6"
    o.l2(lb, e / IPv6(src=me, dst=dst) / IPv6ExtHdrDestOpt(nh=253, options=[PadN(optdata=b"\x00" * 4)]) / Raw(o.tag(lb)))
    # Controls: short chains to the allowed port arrive.
    lb = "control-destopt-x2/v6"
    o.l2(lb, e / IPv6(src=me, dst=dst) / chain(2) / udp(ap, lb))
    lb = "control-hbh-destopt/v6"
    o.l2(lb, e / IPv6(src=me, dst=dst) / IPv6ExtHdrHopByHop(options=[PadN(optdata=b"\x00" * 4)]) / pad() / udp(ap, lb))


def malformed(o, p):
    """Broken IP and L4 headers, and Ethernet types that lie about the packet."""
    ap, dp, tp = p["allowed_port"], p["denied_port"], p["tcp_denied"]
    me4, dst4, me6, dst6 = p["self4"], p["victim4"], p["self6"], p["victim6"]

    def patch(b, off, val):
        """Overwrite bytes; an IPv4 header gets its checksum recomputed, so that the
        node's stack forwards what it can (the datapath is what must judge it)."""
        b = bytearray(b)
        b[off:off + len(val)] = val
        if b[0] >> 4 == 4:
            hl = min((b[0] & 0x0F) * 4, len(b))
            b[10:12] = b"\x00\x00"
            b[10:12] = struct.pack(">H", checksum(bytes(b[:hl])))
        return bytes(b)

    def send_raw(lb, typ, l3):
        o.l2(lb, o.eth(type_=typ) / Raw(l3))

    good4 = lambda lb, port: raw(IP(src=me4, dst=dst4) / UDP(sport=47000, dport=port) / Raw(o.tag(lb)))
    good6 = lambda lb, port: raw(IPv6(src=me6, dst=dst6) / UDP(sport=47000, dport=port) / Raw(o.tag(lb)))
    for lb, port in (("ihl-4/v4", ap), ("ihl-4-denied/v4", dp)):
        send_raw(lb, ETH_P_IP, patch(good4(lb, port), 0, b"\x44"))
    for lb, port in (("ihl-15-short/v4", ap), ("ihl-15-denied/v4", dp)):
        send_raw(lb, ETH_P_IP, patch(good4(lb, port), 0, b"\x4f"))
    lb = "ihl-6-options-shift-ports/v4"
    # IHL says 24 bytes: the L4 header the datapath must use starts 4 bytes in.
    send_raw(lb, ETH_P_IP, patch(good4(lb, ap), 0, b"\x46"))
    lb = "totlen-beyond-frame/v4"
    send_raw(lb, ETH_P_IP, patch(good4(lb, dp), 2, struct.pack(">H", 1400)))
    lb = "totlen-shorter-than-header/v4"
    send_raw(lb, ETH_P_IP, patch(good4(lb, dp), 2, struct.pack(">H", 16)))
    lb = "totlen-cuts-udp-header/v4"
    send_raw(lb, ETH_P_IP, patch(good4(lb, dp), 2, struct.pack(">H", 24)))
    lb = "version-6-in-ipv4-frame/v4"
    send_raw(lb, ETH_P_IP, patch(good4(lb, dp), 0, b"\x65"))
    lb = "ipv6-in-ipv4-ethertype"
    send_raw(lb, ETH_P_IP, good6(lb, dp))
    lb = "ipv4-in-ipv6-ethertype"
    send_raw(lb, ETH_P_IPV6, good4(lb, dp))
    for me, dst, typ in ((me4, dst4, ETH_P_IP), (me6, dst6, ETH_P_IPV6)):
        f = fam(dst)
        l3 = lambda proto, body: raw(ip(me, dst, **({"nh": proto} if f == "v6" else {"proto": proto})) / Raw(body))
        lb = "tcp-truncated-10-bytes/%s" % f
        send_raw(lb, typ, l3(6, struct.pack(">HHI", 47001, tp, 1) + b"\x00\x00"))
        lb = "tcp-doff-2/%s" % f
        tcp = bytearray(_tcp_bytes(me, dst, 47002, tp, "S", o.tag(lb)))
        tcp[12] = 0x20
        send_raw(lb, typ, l3(6, bytes(tcp)))
        lb = "udp-truncated-4-bytes/%s" % f
        send_raw(lb, typ, l3(17, struct.pack(">HH", 47003, dp)))
        lb = "udp-length-beyond-packet/%s" % f
        udp = bytearray(_udp_bytes(me, dst, 47004, dp, o.tag(lb)))
        udp[4:6] = struct.pack(">H", 900)
        send_raw(lb, typ, l3(17, bytes(udp)))
        lb = "sctp-truncated/%s" % f
        send_raw(lb, typ, l3(132, struct.pack(">HH", 47005, 9000)))
        lb = "icmp-error-truncated-quote/%s" % f
        if f == "v6":
            send_raw(lb, typ, raw(IPv6(src=me, dst=dst) / ICMPv6DestUnreach(code=4) / Raw(b"\x60\x00")))
        else:
            send_raw(lb, typ, raw(IP(src=me, dst=dst) / ICMP(type=3, code=3) / Raw(b"\x45\x00")))
    lb = "payload-length-beyond-frame/v6"
    send_raw(lb, ETH_P_IPV6, patch(good6(lb, dp), 4, struct.pack(">H", 1400)))
    lb = "payload-length-zero/v6"
    send_raw(lb, ETH_P_IPV6, patch(good6(lb, dp), 4, struct.pack(">H", 0)))
    lb = "version-4-in-ipv6-frame/v6"
    send_raw(lb, ETH_P_IPV6, patch(good6(lb, dp), 0, b"\x40"))
    for lb, b in (("control/v4", good4("control/v4", ap)), ("control/v6", good6("control/v6", ap))):
        send_raw(lb, ETH_P_IPV6 if lb.endswith("v6") else ETH_P_IP, b)


# ---------------------------------------------------------------------------
# Not an attack: nftables through libnftables
# ---------------------------------------------------------------------------
def nft(o, p):
    lib = ctypes.CDLL("libnftables.so.1")
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    for fn in ("nft_ctx_buffer_error", "nft_ctx_buffer_output", "nft_ctx_free"):
        getattr(lib, fn).argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    ctx = lib.nft_ctx_new(0)
    lib.nft_ctx_buffer_error(ctx)
    lib.nft_ctx_buffer_output(ctx)
    for cmd in p["commands"]:
        if lib.nft_run_cmd_from_buffer(ctx, cmd.encode()) != 0:
            raise SystemExit("nft %r: %s" % (cmd, (lib.nft_ctx_get_error_buffer(ctx) or b"").decode()))
        out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode()
        if out:
            print(out)
    lib.nft_ctx_free(ctx)
    print("NFT ok")


SCENARIOS = {
    "vlan": vlan,
    "icmp-error": icmp_error,
    "tunnel": tunnel,
    "inject": inject,
    "frag6-destopt": frag6_destopt,
    "scan": scan,
    "tcp-flags": tcp_flags,
    "spoof": spoof,
    "frag-games": frag_games,
    "ext6": ext6,
    "malformed": malformed,
    "nft": nft,
}


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in SCENARIOS:
        raise SystemExit("usage: attack.py {%s} '<json>'" % ",".join(SCENARIOS))
    p = json.loads(sys.argv[2])
    o = Out(p)
    SCENARIOS[sys.argv[1]](o, p)
    if sys.argv[1] != "nft":
        o.done()


if __name__ == "__main__":
    main()
