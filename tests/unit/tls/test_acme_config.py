"""``[tls.acme]`` rules: what is refused, with the key named."""

from __future__ import annotations

import pytest

from dispa.tls.acme_config import (
    AcmeCertificate, AcmeConfig, Dns01Config, Rfc2136Config, certificate_set, check,
)


def problems(cfg: AcmeConfig, **kw) -> list[tuple[str, tuple]]:
    out = []
    check(cfg, lambda msg, path: out.append((msg, path)), **kw)
    return out


def paths(cfg: AcmeConfig, **kw) -> list[tuple]:
    return [p for _, p in problems(cfg, **kw)]


def test_defaults_are_valid_and_off():
    assert problems(AcmeConfig()) == []


def test_enabled_without_names_is_refused():
    assert ("names",) in paths(AcmeConfig(enabled=True))


@pytest.mark.parametrize("name", ["-bad.example.com", "a..b", "exa mple.com", "*"])
def test_bad_names_are_refused_at_their_index(name):
    assert ("names", 1) in paths(AcmeConfig(names=["ok.example.com", name]))


def test_wildcards_need_dns01():
    assert ("names", 0) in paths(AcmeConfig(names=["*.example.com"]))
    assert paths(AcmeConfig(names=["*.example.com"], challenge_type="dns-01")) == []


def test_tls_alpn01_needs_a_tls_listener():
    cfg = AcmeConfig(enabled=True, names=["a.example.com"], challenge_type="tls-alpn-01")
    assert ("challenge_type",) in paths(cfg, tls_enabled=False)
    assert paths(cfg, tls_enabled=True) == []


def test_dns01_provider_settings_are_required():
    base = dict(enabled=True, names=["a.example.com"], challenge_type="dns-01")
    assert ("dns01", "exec_command") in paths(
        AcmeConfig(**base, dns01=Dns01Config(provider="exec")))
    assert ("dns01", "webhook_url") in paths(
        AcmeConfig(**base, dns01=Dns01Config(provider="webhook", webhook_url="ftp://x")))
    assert ("dns01", "rfc2136", "tsig_secret") in paths(AcmeConfig(**base, dns01=Dns01Config(
        rfc2136=Rfc2136Config(tsig_key_name="k"))))
    assert ("dns01", "rfc2136", "tsig_secret") in paths(AcmeConfig(**base, dns01=Dns01Config(
        rfc2136=Rfc2136Config(tsig_key_name="k", tsig_secret="not base64!"))))


def test_retry_bounds_and_storage_settings():
    base = dict(enabled=True, names=["a.example.com"])
    assert ("retry_min",) in paths(AcmeConfig(**base, retry_min=100, retry_max=10))
    assert ("storage_dir",) in paths(AcmeConfig(**base, storage_dir=""))


def test_certificate_set_names_directories_and_refuses_duplicates():
    cfg = AcmeConfig(names=["A.example.com."], challenge_type="dns-01", certificates=[
        AcmeCertificate(names=["*.example.org", "example.org"]),
        AcmeCertificate(name="multi", names=["b.example.com", "c.example.com"])])
    assert certificate_set(cfg) == [
        ("a.example.com", ("a.example.com",)),
        ("_wildcard.example.org", ("*.example.org", "example.org")),
        ("multi", ("b.example.com", "c.example.com"))]
    dup = AcmeConfig(names=["a.example.com"],
                     certificates=[AcmeCertificate(name="a.example.com", names=["x.example"])])
    assert any("stored as" in m for m, _ in problems(dup))
    assert ("certificates", 0, "name") in paths(AcmeConfig(certificates=[
        AcmeCertificate(name="../up", names=["a.example.com"])]))


BASE = """
[server]
bind_address = "127.0.0.1:8080"
[[targets.targets]]
name = "a"
url = "http://127.0.0.1:9001"
"""


def test_a_bad_acme_table_is_refused_with_file_line_and_key():
    from dispa.config import load_config_text
    from dispa.errors import ConfigError

    text = BASE + """
[tls.acme]
enabled = true
challenge_type = "dns-01"
names = ["ok.example.com", "bad name"]

[tls.acme.dns01]
provider = "exec"
"""
    with pytest.raises(ConfigError) as err:
        load_config_text(text, fmt="toml", name="dispa.toml")
    issues = {e.as_dict()["path"]: e.as_dict() for e in err.value.errors}
    bad = issues["tls.acme.names[1]"]
    assert bad["file"] == "dispa.toml" and bad["line"] == 11
    assert "tls.acme.dns01.exec_command" in issues


def test_an_unknown_acme_key_is_refused():
    from dispa.config import load_config_text
    from dispa.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config_text(BASE + "\n[tls.acme]\nrenew_ration = 0.5\n", fmt="toml")
    assert "renew_ration" in str(err.value)


def test_a_good_acme_table_loads():
    from dispa.config import load_config_text

    lc = load_config_text(BASE + """
[tls.acme]
enabled = true
names = ["a.example.com"]
storage = "etcd"
renew_ratio = 0.5
[tls.acme.etcd]
endpoints = ["http://10.0.0.1:2379"]
""", fmt="toml")
    acme = lc.model.tls.acme
    assert acme.enabled and acme.renew_ratio == 0.5 and acme.etcd.endpoints[0].endswith("2379")


def test_external_account_binding_needs_both_keys_and_a_base64url_key():
    base = dict(enabled=True, names=["a.example.com"])
    assert ("eab_hmac_key",) in paths(AcmeConfig(**base, eab_kid="kid"))
    assert ("eab_kid",) in paths(AcmeConfig(**base, eab_hmac_key="c2VjcmV0"))
    assert ("eab_hmac_key",) in paths(AcmeConfig(**base, eab_kid="k", eab_hmac_key="a+b/c"))
    assert paths(AcmeConfig(**base, eab_kid="k", eab_hmac_key="zWNDZM6eQGHW-pSR_Tal5e")) == []


def test_renewal_must_come_before_expiry_even_with_the_largest_jitter():
    base = dict(enabled=True, names=["a.example.com"])
    assert ("renew_jitter",) in paths(AcmeConfig(**base, renew_ratio=0.9, renew_jitter=0.1))
    assert paths(AcmeConfig(**base, renew_ratio=0.8, renew_jitter=0.1)) == []


def test_admin_config_masks_the_acme_secrets():
    from dispa.config import load_config_text

    text = """
[server]
bind_address = "127.0.0.1:8080"
[[targets.targets]]
name = "a"
url = "http://127.0.0.1:9001"
[tls.acme]
names = ["a.example.com"]
challenge_type = "dns-01"
eab_kid = "kid-1"
eab_hmac_key = "c2VjcmV0LWhtYWMta2V5"
storage = "etcd"
[tls.acme.etcd]
username = "dispa"
password = "etcd-pass-1"
[tls.acme.dns01]
webhook_headers = { Authorization = "Bearer tok-123" }
[tls.acme.dns01.rfc2136]
tsig_key_name = "k"
tsig_secret = "dHNpZy1zZWNyZXQ="
"""
    loaded = load_config_text(text, fmt="toml")
    shown = repr(loaded.as_dict())
    for secret in ("c2VjcmV0LWhtYWMta2V5", "etcd-pass-1", "tok-123", "dHNpZy1zZWNyZXQ="):
        assert secret not in shown
    acme = loaded.as_dict()["tls"]["acme"]
    assert acme["eab_kid"] == "kid-1" and acme["eab_hmac_key"] == "***"
    assert acme["etcd"]["username"] == "dispa" and acme["etcd"]["password"] == "***"
    assert acme["dns01"]["webhook_headers"] == {"Authorization": "***"}
    assert acme["dns01"]["rfc2136"]["tsig_secret"] == "***"
    # the loaded model itself keeps the real values
    assert loaded.model.tls.acme.etcd.password == "etcd-pass-1"


def test_the_master_imports_no_acme_library_while_acme_is_off(tmp_path):
    # the master stays small (docs/tls-acme.md, Memory): the acme client, josepy and
    # requests are imported only when a [tls.acme] table is enabled
    import subprocess
    import sys

    code = """
import asyncio, sys
from dispa.config import load_config_text
from dispa.server.master import Master
text = '''
[server]
bind_address = "127.0.0.1:8080"
[[targets.targets]]
name = "a"
url = "http://127.0.0.1:9001"
[tls.acme]
enabled = false
names = ["a.example.com"]
'''
async def main():
    m = Master(None, loaded=load_config_text(text, fmt="toml"))
    m.acme.reconfigure(m.loaded)
    await m.acme.close()
    print(m.acme.status())
asyncio.run(main())
print(sorted(n for n in ("acme", "josepy", "requests", "OpenSSL", "dispa.tls.acme.manager")
             if n in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split("\n")
    assert out[:2] == ["None", "[]"], out
