"""A real BIND 9 ``named`` (Debian's ``bind9`` package) for ACME tests.

``Bind9`` starts ``named -g`` (foreground, logging to its own file) on a free loopback
port with a temporary configuration: one authoritative zone (``ZONE``, default
``acme.test``) where every name resolves to 127.0.0.1 (a wildcard A record), dynamic
updates (RFC 2136) allowed for one TSIG key (``key_name``/``secret``, hmac-sha256), no
recursion, no rndc. Pebble uses it as its resolver (``-dnsserver``) and DNS-01 records
arrive in it by dynamic update.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
from pathlib import Path

from tests.support.dispa_proc import free_port
from tests.support.process import ServerProcess

NAMED = shutil.which("named") or "/usr/sbin/named"
ZONE = "acme.test"


def _free_udp_tcp_port() -> int:
    # named needs the port free for both UDP and TCP
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port for named")


class Bind9(ServerProcess):
    """A running ``named``; use as a context manager or call ``stop()``."""

    NAME = "named"

    def __init__(self, directory: Path, *, zone: str = ZONE, key_name: str = "dispa-acme"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o777)  # named may drop to the bind user for journal files
        self.zone = zone
        self.key_name = key_name
        self.secret = base64.b64encode(os.urandom(32)).decode()
        self.port = _free_udp_tcp_port()
        zone_file = self.dir / f"{zone}.zone"
        zone_file.write_text(
            "$TTL 60\n"
            f"@ IN SOA ns.{zone}. admin.{zone}. 1 60 60 600 60\n"
            f"@ IN NS ns.{zone}.\n"
            "ns IN A 127.0.0.1\n"
            "@ IN A 127.0.0.1\n"
            "* IN A 127.0.0.1\n")
        os.chmod(zone_file, 0o666)
        conf = self.dir / "named.conf"
        conf.write_text(f"""
options {{
    directory "{self.dir}";
    listen-on port {self.port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    pid-file none;
    session-keyfile none;
    recursion no;
    allow-query {{ any; }};
    dnssec-validation no;
    notify no;
}};
controls {{ }};
key "{key_name}" {{ algorithm hmac-sha256; secret "{self.secret}"; }};
zone "{zone}" {{
    type primary;
    file "{zone_file}";
    allow-update {{ key "{key_name}"; }};
}};
""")
        self._spawn([NAMED, "-g", "-4", "-n", "1", "-c", str(conf)], self.dir / "named.log")
        self._wait_ready(self._answers)

    def _answers(self) -> bool:
        import dns.message
        import dns.query

        try:
            q = dns.message.make_query(f"ns.{self.zone}.", "A")
            return bool(dns.query.tcp(q, "127.0.0.1", port=self.port, timeout=1.0).answer)
        except Exception:  # noqa: BLE001 - dns.exception.Timeout and the like
            return False

    def txt(self, name: str) -> list[str]:
        """The TXT values of ``name`` as the server answers them now."""
        import dns.message
        import dns.query

        r = dns.query.tcp(dns.message.make_query(name, "TXT"), "127.0.0.1", port=self.port,
                          timeout=2.0)
        return [b"".join(rd.strings).decode() for rrset in r.answer for rd in rrset]
