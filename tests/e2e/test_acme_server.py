"""HTTP-01 through a running dispa-server: pebble validates on Dispa's own HTTP port.

The certificate's name is *not* in ``intercept_domains``, so the issuance also proves the
responder runs before domain interception. ``renew_ratio`` is tiny, so pebble's
five-year certificate is due again seconds after issuance: the test sees a real renewal,
then reloads a normal ratio and checks that no challenge is left on the request path.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support.bind9 import Bind9
from tests.support.dispa_proc import DispaProcess, free_port, http_get, wait_for
from tests.support.pebble import Pebble

pytestmark = pytest.mark.timeout(120)

NAME = "web.acme.test"


def render(port: int, admin_port: int, origin_url: str, pebble: Pebble, store: Path,
           renew_ratio: float, challenge: str, tls_port: int, intercept: str,
           extra: str) -> str:
    tls = f"""
[tls]
enabled = true
bind_address = "127.0.0.1:{tls_port}"
reload_interval = 1.0
""" if challenge == "tls-alpn-01" else ""
    return tls + f"""
[server]
bind_address = "127.0.0.1:{port}"
workers = 2

[domains]
intercept_domains = [{intercept}]

[[targets.targets]]
name = "origin"
url = "{origin_url}"

[monitoring]
enabled = true
bind_host = "127.0.0.1"
metrics_port = {admin_port}
health_check_port = {admin_port}

[logging]
enabled = false
format = "json"
level = "info"

[tls.acme]
enabled = true
directory_url = "{pebble.directory_url}"
ca_bundle = "{pebble.ca_bundle}"
email = "ops@acme.test"
challenge_type = "{challenge}"
names = ["{NAME}"]
storage_dir = "{store}"
renew_ratio = {renew_ratio!r}
renew_jitter = 0.0
retry_min = 1.0
check_interval = 1.0
""" + extra


@pytest.fixture
def stack(tmp_path, origin):
    ns = Bind9(tmp_path / "bind")
    port, tls_port = free_port(), free_port()
    try:
        pebble = Pebble(tmp_path / "pebble", dns_port=ns.port, http_port=port,
                        tls_port=tls_port)
    except BaseException:
        ns.stop()
        raise
    procs = []

    def start(renew_ratio: float, challenge: str = "http-01",
              intercept: str = '"app.example.com"', extra: str = "") -> DispaProcess:
        admin_port = free_port()
        cfg = tmp_path / "dispa.toml"
        cfg.write_text(render(port, admin_port, origin.url, pebble, tmp_path / "store",
                              renew_ratio, challenge, tls_port, intercept, extra))
        p = DispaProcess(cfg, port=port, admin_port=admin_port)
        p.tls_port = tls_port
        procs.append(p)
        return p.wait_ready(workers=2)

    yield start, pebble, tmp_path / "store"
    for p in procs:
        p.stop()
    pebble.stop()
    ns.stop()


def _serial(path: Path) -> int | None:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())[0].serial_number
    except (OSError, ValueError):
        return None


def test_http01_issuance_and_renewal_answered_by_dispa(stack):
    start, pebble, store = stack
    # 5-year pebble certificates: 1.5e-8 of the lifetime is about 2.4 s
    dispa = start(renew_ratio=1.5e-8)
    chain_path = store / "certs" / NAME / "fullchain.pem"
    first = wait_for(lambda: _serial(chain_path), 40, "the first certificate")
    chain = x509.load_pem_x509_certificates(chain_path.read_bytes())
    key = serialization.load_pem_private_key((store / "certs" / NAME / "privkey.pem")
                                             .read_bytes(), None)
    assert key.public_key().public_numbers() == chain[0].public_key().public_numbers()
    assert chain[0].extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [NAME]
    chain[-1].verify_directly_issued_by(x509.load_pem_x509_certificate(pebble.roots()))
    assert stat.S_IMODE(os.stat(store / "certs" / NAME / "privkey.pem").st_mode) == 0o600

    # the renewal: a new serial in the same place, counted as ok
    wait_for(lambda: _serial(chain_path) not in (None, first), 40, "a renewed certificate")
    acme = wait_for(lambda: (a := dispa.status()["acme"]) and a["renewals"]["ok"] >= 2 and a,
                    20, "two renewals in /admin/status")
    assert acme["renewals"]["failed"] == 0, acme
    status, body = dispa.admin_get("/metrics")
    assert status == 200
    assert b'dispa_acme_renewals_total{result="ok"}' in body

    # a normal ratio again (hot reload): the manager stops renewing, the challenge
    # responder leaves the request path and the snapshot is the configured one again
    text = dispa.config_path.read_text().replace("renew_ratio = 1.5e-08",
                                                 "renew_ratio = 0.6666")
    dispa.config_path.write_text(text)
    wait_for(lambda: (st := dispa.status())["reloads"]["ok"] >= 1
             and st["acme"] and st["acme"]["pending_challenges"] == 0
             and all(w["snapshot_version"] == st["snapshot_version"] for w in st["workers"])
             and st, 20, "the reload with no challenge pending")
    code, _, body = http_get(dispa.port, "/.well-known/acme-challenge/anything", host=NAME)
    assert code == 404 and b"not served" in body  # interception answers again


def _wait_for_certificate(dispa: DispaProcess, store: Path, what: str) -> None:
    """Wait for the first certificate, issued at the first attempt; on failure, say what
    the manager and the server reported."""
    try:
        wait_for(lambda: _serial(store / "certs" / NAME / "fullchain.pem"), 40, what)
        acme = dispa.status()["acme"]
        assert acme["renewals"] == {"ok": 1, "failed": 0}, acme
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- dispa log ---\n{dispa.log()[-4000:]}") from None


def _served_serial(port: int, name: str, ca_pem: bytes) -> int | None:
    """The serial of the certificate Dispa's TLS listener presents for ``name``, verified
    against pebble's root (None while it presents none or another one)."""
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname=name) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
    return x509.load_der_x509_certificate(der).serial_number


def test_tls_alpn01_answered_by_dispa_tls_listener_which_then_serves_the_certificate(stack):
    start, pebble, store = stack
    dispa = start(renew_ratio=0.6666, challenge="tls-alpn-01")
    chain_path = store / "certs" / NAME / "fullchain.pem"
    serial = wait_for(lambda: _serial(chain_path), 40, "the certificate (tls-alpn-01)")
    st = dispa.status()["acme"]
    assert st["renewals"] == {"ok": 1, "failed": 0} and st["pending_challenges"] == 0
    # pebble's chain: the intermediate signed by its root; the listener serves the leaf
    root = pebble.roots()
    inter = x509.load_pem_x509_certificates(chain_path.read_bytes())[1]
    bundle = root + inter.public_bytes(serialization.Encoding.PEM)
    assert wait_for(lambda: _served_serial(dispa.tls_port, NAME, bundle) == serial, 20,
                    "the TLS listener serving the issued certificate")


REDIRECT_ALL = """
[routing]
[[routing.rules]]
name = "to-https"
[routing.rules.actions.redirect]
location = "https://{host}{path}"
status = 301
"""


def test_http01_is_answered_before_a_redirect_everything_rule(stack):
    start, pebble, store = stack
    dispa = start(renew_ratio=0.6666, intercept='"*.acme.test"', extra=REDIRECT_ALL)
    _wait_for_certificate(dispa, store, "the certificate despite the redirect rule")
    # every other request of the name is redirected, as configured
    code, headers, _ = http_get(dispa.port, "/page", host=NAME)
    assert code == 301 and headers["location"] == f"https://{NAME}/page"


def test_an_unreachable_ca_at_start_leaves_dispa_serving_and_counts_the_failure(
        tmp_path, origin):
    from types import SimpleNamespace

    closed = free_port()  # nothing listens there: the CA is down at first start
    ca = SimpleNamespace(directory_url=f"https://127.0.0.1:{closed}/dir", ca_bundle="")
    port, tls_port, admin_port = free_port(), free_port(), free_port()
    cfg = tmp_path / "dispa.toml"
    cfg.write_text(render(port, admin_port, origin.url, ca, tmp_path / "store", 0.6666,
                          "tls-alpn-01", tls_port, '"app.example.com"', ""))
    dispa = DispaProcess(cfg, port=port, admin_port=admin_port)
    try:
        dispa.wait_ready(workers=2)
        acme = wait_for(lambda: (a := dispa.status()["acme"]) and a["renewals"]["failed"] >= 2
                        and a, 20, "two failed attempts (retry_min = 1 s)")
        cert = acme["certificates"][NAME]
        assert cert["failures"] >= 2 and f"127.0.0.1:{closed}" in cert["last_error"]
        assert cert["serial"] is None and acme["renewals"]["ok"] == 0
        # meanwhile the plain listener serves as configured
        code, _, _ = http_get(dispa.port, "/", host="app.example.com")
        assert code == 200
        # and the TLS listener, with no certificate yet, fails the handshake cleanly
        ctx = ssl.create_default_context()
        with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as raw:
            with pytest.raises(ssl.SSLError):
                ctx.wrap_socket(raw, server_hostname=NAME)
        status, body = dispa.admin_get("/metrics")
        assert status == 200
        assert b'dispa_acme_renewals_total{result="failed"}' in body
        assert f'dispa_acme_renewal_failures{{certificate="{NAME}"}}'.encode() in body
        pids = [w["pid"] for w in dispa.status()["workers"]]
        assert http_get(dispa.port, "/", host="app.example.com")[0] == 200
        assert [w["pid"] for w in dispa.status()["workers"]] == pids  # nothing crashed
        assert "acme: renewal of web.acme.test failed" in dispa.log()
    finally:
        dispa.stop()


FILTERS_AFTER_INTERCEPTION = """
[plugins]
apply_before_domain_match = false
[[plugins.plugins]]
name = "tag"
type = "tests.support.filters:Tag"
"""


def test_http01_for_a_host_outside_interception_with_filters_after_interception(stack):
    # the name is not intercepted and the operator's filters run after interception: the
    # worker's pipeline runs the responder alone for it (dispa/proxy/pipeline.py)
    start, pebble, store = stack
    dispa = start(renew_ratio=0.6666, extra=FILTERS_AFTER_INTERCEPTION)
    _wait_for_certificate(dispa, store, "the certificate with filters after interception")
    code, _, body = http_get(dispa.port, "/.well-known/acme-challenge/anything", host=NAME)
    assert code == 404 and b"not served" in body  # nothing pending: interception as usual
