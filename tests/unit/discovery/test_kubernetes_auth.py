"""Reaching the API server: kubeconfig (token, client certificate, inline or file data) and
in-cluster service-account credentials, against the double serving TLS."""

from __future__ import annotations

import asyncio
import base64
import ssl
import time

import pytest
import yaml

from dispa.discovery.config import DiscoverySource, KubernetesOptions, ServiceDiscoveryConfig
from dispa.discovery.kubernetes import (
    KubeConfigError, KubernetesProvider, load_kubeconfig, resolve_credentials,
)
from tests.support.k8s_double import K8sDouble, endpoint_slice
from tests.support.pki import CA, cert_pem, key_pem, write_pair

TOKEN = "sa-token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = CA("k8s test CA")
    server = write_pair(d, "apiserver", *ca.issue("kube-apiserver", ips=["127.0.0.1"]))
    client_cert, client_key = ca.issue("dispa", client=True)
    (d / "ca.crt").write_bytes(ca.pem)
    other = CA("someone else")
    (d / "other-ca.crt").write_bytes(other.pem)
    return {"dir": d, "ca": ca, "server": server, "client": (client_cert, client_key)}


@pytest.fixture
def tls_api(pki):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*pki["server"])
    ctx.load_verify_locations(cafile=str(pki["dir"] / "ca.crt"))
    ctx.verify_mode = ssl.CERT_OPTIONAL  # client certificate or bearer token
    d = K8sDouble(token=TOKEN, ssl_context=ctx).start()
    d.create(endpoint_slice("team", "api", "api-1", ["10.0.0.1"], ports=[("http", 8080)]))
    yield d
    d.close()


def kubeconfig(path, server: str, cluster: dict, user: dict, namespace: str = "team") -> str:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "contexts": [{"name": "other", "context": {"cluster": "nope", "user": "nope"}},
                     {"name": "test", "context": {"cluster": "c", "user": "u",
                                                  "namespace": namespace}}],
        "clusters": [{"name": "c", "cluster": {"server": server, **cluster}}],
        "users": [{"name": "u", "user": user}]}))
    return str(path)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def first_set(provider: KubernetesProvider, timeout: float = 10.0,
                    until_errors: int = 0):
    """The first set emitted (None if none in ``timeout``, or once ``until_errors`` errors
    were recorded)."""
    got: list = []
    task = asyncio.ensure_future(provider.run(got.append))
    try:
        deadline = time.monotonic() + timeout
        while not got and time.monotonic() < deadline and not (
                until_errors and provider.health.errors >= until_errors):
            await asyncio.sleep(0.02)
        return got[0] if got else None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await provider.close()


def provider(options: KubernetesOptions, service: str = "api") -> KubernetesProvider:
    p = KubernetesProvider("kubernetes", ServiceDiscoveryConfig(
        provider="kubernetes", kubernetes=options), [DiscoverySource(service=service)])
    p.backoff_initial, p.backoff_max = 0.05, 0.2
    return p


def ids(s) -> list[str]:
    return [e.id for e in s.endpoints]


def test_kubeconfig_with_a_token_and_inline_ca_data(tls_api, pki, tmp_path):
    path = kubeconfig(tmp_path / "config", tls_api.url,
                      {"certificate-authority-data": b64(pki["ca"].pem)}, {"token": TOKEN})
    # namespace "" = the context's namespace ("team")
    s = asyncio.run(first_set(provider(KubernetesOptions(kubeconfig=path, namespace=""))))
    assert s is not None and ids(s) == ["10.0.0.1:8080"]


def test_kubeconfig_with_a_client_certificate_as_inline_data(tls_api, pki, tmp_path):
    cert, key = pki["client"]
    path = kubeconfig(tmp_path / "config", tls_api.url,
                      {"certificate-authority-data": b64(pki["ca"].pem)},
                      {"client-certificate-data": b64(cert_pem(cert)),
                       "client-key-data": b64(key_pem(key))})
    # namespace "default" (the option's default) has no slices: an empty answer
    s = asyncio.run(first_set(provider(KubernetesOptions(kubeconfig=path))))
    assert s is not None and ids(s) == []
    p = provider(KubernetesOptions(kubeconfig=path), "team/api")
    s = asyncio.run(first_set(p))
    assert s is not None and ids(s) == ["10.0.0.1:8080"]
    assert p.creds.bearer() == ""  # the certificate alone authenticated it


def test_kubeconfig_file_paths_are_relative_to_the_kubeconfig(tls_api, pki, tmp_path):
    (tmp_path / "certs").mkdir()
    write_pair(tmp_path / "certs", "dispa", *pki["client"])
    (tmp_path / "certs" / "ca.crt").write_bytes(pki["ca"].pem)
    path = kubeconfig(tmp_path / "config", tls_api.url,
                      {"certificate-authority": "certs/ca.crt"},
                      {"client-certificate": "certs/dispa.crt",
                       "client-key": "certs/dispa.key"})
    s = asyncio.run(first_set(provider(KubernetesOptions(kubeconfig=path, namespace=""))))
    assert s is not None and ids(s) == ["10.0.0.1:8080"]


def test_without_credentials_the_server_says_401_and_nothing_is_emitted(tls_api, pki,
                                                                         tmp_path):
    path = kubeconfig(tmp_path / "config", tls_api.url,
                      {"certificate-authority": str(pki["dir"] / "ca.crt")}, {})
    p = provider(KubernetesOptions(kubeconfig=path, namespace=""))
    assert asyncio.run(first_set(p, until_errors=2)) is None
    assert "401" in p.health.last_error


def test_an_untrusted_server_certificate_is_refused(tls_api, pki, tmp_path):
    path = kubeconfig(tmp_path / "config", tls_api.url,
                      {"certificate-authority": str(pki["dir"] / "other-ca.crt")},
                      {"token": TOKEN})
    p = provider(KubernetesOptions(kubeconfig=path, namespace=""))
    assert asyncio.run(first_set(p, until_errors=2)) is None
    assert "certificate" in p.health.last_error.lower()


def test_in_cluster_service_account(tls_api, pki, tmp_path, monkeypatch):
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(TOKEN)
    (sa / "ca.crt").write_bytes(pki["ca"].pem)
    (sa / "namespace").write_text("team")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(tls_api.port))
    p = provider(KubernetesOptions(in_cluster=True, token_file=str(sa / "token"),
                                   ca_file=str(sa / "ca.crt"), namespace=""))
    s = asyncio.run(first_set(p))
    assert s is not None and ids(s) == ["10.0.0.1:8080"]
    assert p.creds.server == f"https://127.0.0.1:{tls_api.port}"
    assert p.creds.namespace == "team"


def test_in_cluster_outside_a_pod_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeConfigError, match="KUBERNETES_SERVICE_HOST"):
        resolve_credentials(KubernetesOptions(in_cluster=True))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(KubeConfigError, match="token"):
        resolve_credentials(KubernetesOptions(in_cluster=True,
                                              token_file=str(tmp_path / "none")))


def test_ipv6_service_host_is_bracketed(tmp_path, monkeypatch):
    (tmp_path / "token").write_text("t")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    creds = resolve_credentials(KubernetesOptions(in_cluster=True,
                                                  token_file=str(tmp_path / "token")))
    assert creds.server == "https://[fd00::1]:443"


@pytest.mark.parametrize("text, message", [
    ("a: [", "invalid YAML"),
    ("- 1", "not a mapping"),
    ("kind: Config\n", "no current-context"),
    ("current-context: x\ncontexts: []\n", "no context named 'x'"),
    ("current-context: x\ncontexts: [{name: x, context: {cluster: c, user: u}}]\n"
     "clusters: [{name: c, cluster: {server: 'https://h:6443'}}]\n"
     "users: [{name: u, user: {exec: {command: aws}}}]\n", "credential plugin"),
    ("current-context: x\ncontexts: [{name: x, context: {cluster: c}}]\n"
     "clusters: [{name: c, cluster: {server: 'h:6443'}}]\n", "not a URL"),
])
def test_bad_kubeconfigs_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "config"
    path.write_text(text)
    with pytest.raises(KubeConfigError, match=message):
        load_kubeconfig(str(path))


def test_api_server_and_token_file_override_the_kubeconfig(tmp_path):
    path = kubeconfig(tmp_path / "config", "https://10.0.0.1:6443", {}, {"token": "t"})
    creds = resolve_credentials(KubernetesOptions(
        kubeconfig=path, api_server="https://127.0.0.1:1", token_file=str(tmp_path / "tok")))
    assert creds.server == "https://127.0.0.1:1" and creds.token_file.endswith("tok")
    assert creds.namespace == "team"
