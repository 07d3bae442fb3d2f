"""PROXY protocol v1 and v2 (HAProxy's spec, proxy-protocol.txt): build and parse, sans-I/O.

Theory of operation
-------------------
A PROXY header is the first thing on a TCP connection and carries the original client's
address through a proxy. Dispa *sends* one to an upstream (``encode_v1``/``encode_v2``)
when a listener has ``proxy_protocol_send``, and *accepts* one from a trusted downstream
(``parse``) when it has ``proxy_protocol_accept``.

``parse(buf)`` looks at the bytes received so far and returns one of:

* ``None``: not enough bytes yet to decide (call again with more);
* a :class:`ProxyHeader`: ``length`` bytes of ``buf`` are the header; what follows is payload;
* raises :class:`ProxyProtocolError` for anything malformed (the connection is closed).

Limits: a v1 header is at most 107 bytes (spec §2.1); a v2 header's address block is taken
up to ``MAX_V2_LENGTH`` bytes (TLVs are skipped, not interpreted).
"""

from __future__ import annotations

import ipaddress
import struct

__all__ = ["ProxyHeader", "ProxyProtocolError", "V2_SIGNATURE", "encode_v1", "encode_v2",
           "parse"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # "PROXY TCP6 " + two IPv6 + two ports + CRLF (spec §2.1)
MAX_V2_LENGTH = 4096  # address block + TLVs we accept (the spec allows 65535)

_AF_INET, _AF_INET6 = 0x1, 0x2
_STREAM, _DGRAM = 0x1, 0x2


class ProxyProtocolError(ValueError):
    """A malformed or unexpected PROXY protocol header."""


class ProxyHeader:
    """A parsed header: ``length`` bytes long; ``source``/``dest`` are ``(ip, port)`` or
    None for a LOCAL (v2) or UNKNOWN (v1) header, which carries no address."""

    __slots__ = ("length", "source", "dest", "version")

    def __init__(self, length: int, source, dest, version: int):
        self.length = length
        self.source = source
        self.dest = dest
        self.version = version

    def __repr__(self) -> str:
        return f"ProxyHeader(v{self.version}, {self.source} -> {self.dest})"


def encode_v1(source: tuple[str, int], dest: tuple[str, int]) -> bytes:
    """``PROXY TCP4|TCP6 src dst sport dport\\r\\n``; ``UNKNOWN`` when the families differ."""
    fam_s = ipaddress.ip_address(source[0]).version
    fam_d = ipaddress.ip_address(dest[0]).version
    if fam_s != fam_d:
        return b"PROXY UNKNOWN\r\n"
    proto = "TCP4" if fam_s == 4 else "TCP6"
    return f"PROXY {proto} {source[0]} {dest[0]} {source[1]} {dest[1]}\r\n".encode("ascii")


def encode_v2(source: tuple[str, int] | None, dest: tuple[str, int] | None, *,
              stream: bool = True) -> bytes:
    """A binary v2 header, command PROXY (LOCAL when ``source`` is None)."""
    if source is None or dest is None:
        return V2_SIGNATURE + bytes((0x20, 0x00)) + b"\x00\x00"
    s = ipaddress.ip_address(source[0])
    d = ipaddress.ip_address(dest[0])
    if s.version != d.version:  # map the IPv4 one into IPv6
        s = s if s.version == 6 else ipaddress.IPv6Address(f"::ffff:{s}")
        d = d if d.version == 6 else ipaddress.IPv6Address(f"::ffff:{d}")
    fam = _AF_INET if s.version == 4 else _AF_INET6
    body = s.packed + d.packed + struct.pack("!HH", source[1], dest[1])
    return (V2_SIGNATURE + bytes((0x21, (fam << 4) | (_STREAM if stream else _DGRAM)))
            + struct.pack("!H", len(body)) + body)


def parse(buf: bytes) -> ProxyHeader | None:
    """The header at the start of ``buf`` (module docstring for the three outcomes)."""
    if not buf:
        return None
    if buf[0] == 0x0D:
        n = min(len(buf), len(V2_SIGNATURE))
        if buf[:n] != V2_SIGNATURE[:n]:
            raise ProxyProtocolError("not a PROXY protocol v2 signature")
        return _parse_v2(buf)
    if buf[0] == 0x50:  # "P"
        n = min(len(buf), 6)
        if buf[:n] != b"PROXY "[:n]:
            raise ProxyProtocolError("not a PROXY protocol v1 header")
        return _parse_v1(buf)
    raise ProxyProtocolError("the connection does not start with a PROXY protocol header")


def _parse_v1(buf: bytes) -> ProxyHeader | None:
    end = buf.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buf) >= V1_MAX:
            raise ProxyProtocolError("PROXY v1 header longer than 107 bytes")
        return None
    parts = buf[:end].split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return ProxyHeader(end + 2, None, None, 1)
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError("malformed PROXY v1 header")
    try:
        src = ipaddress.ip_address(parts[2].decode("ascii"))
        dst = ipaddress.ip_address(parts[3].decode("ascii"))
        sport, dport = int(parts[4]), int(parts[5])
    except (ValueError, UnicodeDecodeError):
        raise ProxyProtocolError("malformed PROXY v1 address") from None
    want = 4 if parts[1] == b"TCP4" else 6
    if src.version != want or dst.version != want or not (0 <= sport < 65536) \
            or not (0 <= dport < 65536) or not parts[4].isdigit() or not parts[5].isdigit():
        raise ProxyProtocolError("malformed PROXY v1 address")
    return ProxyHeader(end + 2, (str(src), sport), (str(dst), dport), 1)


def _parse_v2(buf: bytes) -> ProxyHeader | None:
    if len(buf) < 16:
        return None
    ver_cmd, fam_proto = buf[12], buf[13]
    length = struct.unpack("!H", buf[14:16])[0]
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError("PROXY v2 header with an unknown version")
    if length > MAX_V2_LENGTH:
        raise ProxyProtocolError(f"PROXY v2 header over {MAX_V2_LENGTH} bytes")
    if len(buf) < 16 + length:
        return None
    total = 16 + length
    cmd = ver_cmd & 0x0F
    if cmd == 0x0:  # LOCAL: a health check by the proxy itself; no address
        return ProxyHeader(total, None, None, 2)
    if cmd != 0x1:
        raise ProxyProtocolError("PROXY v2 header with an unknown command")
    fam = fam_proto >> 4
    body = buf[16:total]
    if fam == _AF_INET and length >= 12:
        src = str(ipaddress.IPv4Address(body[0:4]))
        dst = str(ipaddress.IPv4Address(body[4:8]))
        sport, dport = struct.unpack("!HH", body[8:12])
    elif fam == _AF_INET6 and length >= 36:
        src = _unmap(ipaddress.IPv6Address(body[0:16]))
        dst = _unmap(ipaddress.IPv6Address(body[16:32]))
        sport, dport = struct.unpack("!HH", body[32:36])
    elif fam == 0x0:  # AF_UNSPEC: keep the connection's own addresses
        return ProxyHeader(total, None, None, 2)
    else:
        raise ProxyProtocolError("PROXY v2 header with an unsupported address family")
    return ProxyHeader(total, (src, sport), (dst, dport), 2)


def _unmap(addr: ipaddress.IPv6Address) -> str:
    mapped = addr.ipv4_mapped
    return str(mapped) if mapped is not None else str(addr)
