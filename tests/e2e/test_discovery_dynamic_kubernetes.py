"""ConfigMaps as configuration and Secrets as certificates, end to end: the Kubernetes API
double (tests/support/k8s_double.py), real origins, a real dispa-server with a TLS
listener, real TLS clients (Python ssl).

* ``[tls] kubernetes_secrets = ["shop/site-tls"]``: the ``kubernetes.io/tls`` Secret's pair
  serves ``site.test`` on Dispa's TLS listener; the Secret is updated with a new
  certificate: the new serial is served within ``BOUND``, and a keep-alive TLS connection
  opened before the rotation keeps working after it; a Secret whose key does not match its
  certificate is refused (the status says why) and the previous pair keeps serving.
* ``[service_discovery.kubernetes] config_maps = ["shop/dispa-config"]``: a ConfigMap key
  ``routes.toml`` adds a target group and a rule (``/k8s`` -> ``api@kubernetes``); keys not
  ending in .toml/.json are ignored; an invalid change is refused with the error in the
  status (the last good version stays); deleting the ConfigMap removes the rule.
"""

from __future__ import annotations

import socket
import ssl
import time
from contextlib import closing

import pytest

from tests.support.discovery_load import kubeconfig, served_by as _served_by, start_origins, \
    write_config
from tests.support.dispa_proc import DispaProcess, free_port, read_one_response, wait_for
from tests.support.k8s_double import K8sDouble, config_map, tls_secret
from tests.support.pki import CA, cert_pem, key_pem

BOUND = 8.0  # seconds: watch event + validation + publish to 2 workers, on a busy machine
TOKEN = "e2e-token"

ROUTES = """
[[target_groups]]
name = "api"
targets = [{{ name = "api-1", url = "{url}" }}]
[target_groups.health_check]
enabled = false

[[routing.rules]]
name = "k8s"
target = "api"
[routing.rules.conditions.path]
prefix = "/k8s"
"""


@pytest.fixture
def api():
    with closing(K8sDouble(token=TOKEN, bookmark_interval=1.0).start()) as d:
        yield d


@pytest.fixture
def origins():
    yield from start_origins(("web", "api"))


def _serial(ca: CA, tport: int) -> int:
    """The serial number of the certificate Dispa serves for ``site.test`` (verified)."""
    from cryptography import x509
    ctx = ssl.create_default_context(cadata=ca.pem.decode())
    with socket.create_connection(("127.0.0.1", tport), timeout=5) as s, \
            ctx.wrap_socket(s, server_hostname="site.test") as t:
        return x509.load_der_x509_certificate(t.getpeercert(binary_form=True)).serial_number


def test_configmap_fragments_and_tls_secret_rotation(tmp_path, api, origins):
    ca = CA()
    v1, k1 = ca.issue("site-v1", dns=["site.test"])
    api.create(tls_secret("shop", "site-tls", cert_pem(v1), key_pem(k1)))
    port, tport, admin = free_port(), free_port(), free_port()
    cfg = write_config(tmp_path, port, admin, f"""
[[targets.targets]]
name = "web-1"
url = "{origins['web'].url}"
[targets.health_check]
enabled = false

[service_discovery]
provider = "kubernetes"
refresh_interval = 10

[service_discovery.kubernetes]
kubeconfig = "{kubeconfig(tmp_path, api.url, TOKEN)}"
namespace = "shop"
config_maps = ["shop/dispa-config"]

[tls]
enabled = true
bind_address = "127.0.0.1:{tport}"
kubernetes_secrets = ["site-tls"]
""")
    d = DispaProcess(cfg, port=port, admin_port=admin)
    try:
        d.wait_ready(workers=2)
        # the master waited for the Secret: the workers started with its pair
        assert _serial(ca, tport) == v1.serial_number
        pid = d.status()["master_pid"]

        # 1. a ConfigMap fragment adds a group and a rule
        t0 = time.monotonic()
        api.create(config_map("shop", "dispa-config", {
            "routes.toml": ROUTES.format(url=origins["api"].url),
            "README": "not a fragment: ignored"}))
        wait_for(lambda: _served_by(port, "/k8s/x") == "api", BOUND, "/k8s on api@kubernetes")
        print(f"configmap fragment -> traffic: {time.monotonic() - t0:.2f}s (bound {BOUND}s)")
        assert _served_by(port, "/") == "web"
        dyn = d.status()["dynamic_config"]
        assert dyn["providers"]["kubernetes"]["keys"] == ["shop/dispa-config/routes.toml"]

        # an invalid change is refused: the last good version stays, the error is shown
        api.apply(config_map("shop", "dispa-config", {
            "routes.toml": ROUTES.format(url="ftp://127.0.0.1:1")}))
        source = "kubernetes:shop/dispa-config/routes.toml"
        wait_for(lambda: source in d.status()["dynamic_config"]["errors"], BOUND,
                 "the refused ConfigMap in the status")
        errors = d.status()["dynamic_config"]["errors"][source]
        [err] = [e for e in errors if e["path"] == "target_groups[0].targets[0].url"]
        assert err["line"] == 4 and "ftp" in err["message"], errors
        assert _served_by(port, "/k8s/x") == "api"

        # 2. the Secret is rotated: the new serial is served; an open connection survives
        ctx = ssl.create_default_context(cadata=ca.pem.decode())
        keep = ctx.wrap_socket(socket.create_connection(("127.0.0.1", tport), timeout=5),
                               server_hostname="site.test")
        request = b"GET / HTTP/1.1\r\nHost: site.test\r\n\r\n"
        keep.sendall(request)
        assert read_one_response(keep)[0] == 200
        v2, k2 = ca.issue("site-v2", dns=["site.test"])
        t0 = time.monotonic()
        api.apply(tls_secret("shop", "site-tls", cert_pem(v2), key_pem(k2)))
        wait_for(lambda: _serial(ca, tport) == v2.serial_number, BOUND, "the new serial")
        print(f"secret update -> new serial served: {time.monotonic() - t0:.2f}s")
        keep.sendall(request)  # the connection made before the rotation still serves
        assert read_one_response(keep)[0] == 200
        keep.close()

        # 3. a bad pair (key of another certificate): refused, v2 keeps serving
        v3, _ = ca.issue("site-v3", dns=["site.test"])
        api.apply(tls_secret("shop", "site-tls", cert_pem(v3), key_pem(k1)))
        wait_for(lambda: any("kubernetes:shop/site-tls" in (e.get("cert_file") or "")
                             for e in d.status()["tls"]["errors"]), BOUND,
                 "the refused pair in the status")
        [e] = [e for e in d.status()["tls"]["errors"]
               if e.get("cert_file") == "kubernetes:shop/site-tls"]
        assert "does not match" in e["error"] and e["serving_previous"] is True
        assert _serial(ca, tport) == v2.serial_number

        # 4. the ConfigMap goes away: its rule goes with it
        api.delete("ConfigMap", "shop", "dispa-config")
        wait_for(lambda: _served_by(port, "/k8s/x") == "web", BOUND, "/k8s back on web")
        assert d.status()["dynamic_config"]["providers"] == {}
        assert d.status()["master_pid"] == pid
    finally:
        d.stop()
