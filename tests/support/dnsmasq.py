"""A real dnsmasq (Debian's ``dnsmasq`` package) serving a test zone on a loopback port.

The zone has two parts:

* ``hosts``: A/AAAA records from an ``--addn-hosts`` file that :meth:`Dnsmasq.set_hosts`
  rewrites and reloads with SIGHUP (dnsmasq rereads addn-hosts on SIGHUP);
* ``srv``: SRV records (``srv-host=`` lines of its conf file). dnsmasq reads those only at
  start, so :meth:`Dnsmasq.set_srv` rewrites the file and the test restarts the server.

Names under ``.test`` (``domain``) that have no record get NXDOMAIN (``--local=/test/``),
names outside it REFUSED (there is no upstream); every answer
has the TTL ``ttl`` (``--local-ttl``). The port stays the same across restarts.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode

from tests.support.dispa_proc import free_port


class Dnsmasq:
    """``start()``, ``set_hosts({name: [ip, ...]})`` (+SIGHUP), ``stop()``, ``restart()``."""

    def __init__(self, workdir: Path, *, ttl: int = 1, port: int | None = None,
                 extra_args: tuple[str, ...] = (), domain: str = "test"):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ttl = ttl
        self.port = port or free_port()
        self.hosts_path = self.dir / "hosts"
        self.conf_path = self.dir / "dnsmasq.conf"
        self.log_path = self.dir / "dnsmasq.log"
        self.hosts: dict[str, list[str]] = {}
        self.srv: list[tuple[str, str, int, int, int]] = []
        self.proc: subprocess.Popen | None = None
        self.extra_args = tuple(extra_args)
        self.domain = domain  # names under it without a record: NXDOMAIN; others: REFUSED
        self.hosts_path.write_text("")
        self._write_conf()

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"``: a ``[service_discovery.dns] resolvers`` entry."""
        return f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ the zone
    def _write_conf(self) -> None:
        lines = [f"srv-host={name},{target},{port},{priority},{weight}"
                 for name, target, port, priority, weight in self.srv]
        self.conf_path.write_text("\n".join(lines) + "\n")

    def set_hosts(self, hosts: dict[str, list[str]], *, reload: bool = True) -> None:
        """Replace the A/AAAA records; with ``reload``, SIGHUP a running server."""
        self.hosts = {k: list(v) for k, v in hosts.items()}
        text = "".join(f"{ip} {name}\n" for name, ips in self.hosts.items() for ip in ips)
        tmp = self.hosts_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.hosts_path)
        if reload and self.running:
            self.proc.send_signal(signal.SIGHUP)

    def set_srv(self, records: list[tuple[str, str, int, int, int]]) -> None:
        """``[(name, target, port, priority, weight)]``; takes effect at the next start."""
        self.srv = list(records)
        self._write_conf()

    # ------------------------------------------------------------------ process
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> "Dnsmasq":
        binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        cmd = [binary, "--keep-in-foreground", f"--conf-file={self.conf_path}",
               f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces",
               "--no-resolv", "--no-hosts", f"--addn-hosts={self.hosts_path}",
               f"--local=/{self.domain}/", f"--local-ttl={self.ttl}", "--neg-ttl=1",
               "--pid-file=", "--user=root", "--group=root", "--cache-size=0",
               "--log-facility=-", *self.extra_args]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dnsmasq exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text()[-2000:]}")
            if self.answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("dnsmasq did not answer within the timeout")

    def answers(self) -> bool:
        """One query; True when the server answered (any rcode)."""
        try:
            q = dns.message.make_query(f"probe.{self.domain}.", "A")
            r = dns.query.udp(q, "127.0.0.1", port=self.port, timeout=0.2)
        except (dns.exception.Timeout, OSError):
            return False
        return r.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def restart(self) -> "Dnsmasq":
        self.stop()
        return self.start()

    def lookup(self, name: str, rdtype: str = "A") -> list[str]:
        """The records' text as the server answers now (test assertions)."""
        q = dns.message.make_query(name, rdtype)
        r = dns.query.udp(q, "127.0.0.1", port=self.port, timeout=2)
        return sorted(rd.to_text() for rrset in r.answer for rd in rrset)
