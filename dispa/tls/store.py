"""The master's certificate store: sources, change detection, rollback, ticket keys.

Theory of operation
-------------------
Sources are the ``[[tls.certificates]]`` pairs and the pairs found in
``certificate_dirs`` (``NAME.crt`` or ``NAME.pem`` with ``NAME.key``, or a sub-directory
with ``fullchain.pem`` and ``privkey.pem``, which is where ACME puts them under
``<storage_dir>/certs``). :meth:`refresh`
(every ``reload_interval`` seconds, on SIGHUP, and when ACME wrote new files) looks at each
file's (mtime, size, inode); a changed source is read and validated again
(``certs.load_pair``). A good pair replaces the current one, which is kept as the
source's *previous* version (``rollback``); a bad pair is refused with an error in the log
and in /admin/status, and the current one keeps serving. The client-auth CA bundles and
CRLs are watched the same way.

:meth:`payload` is the ``Snapshot.tls`` the workers build their contexts from: the
compiled settings plus PEM, plus the session-ticket key shared by every worker (rotated
every ``ticket_key_rotation`` seconds; the master is the only one that makes keys).
"""

from __future__ import annotations

import logging
import os
import time

from dispa.tls import ocsp
from dispa.tls.certs import CertError, file_state, load_pair

log = logging.getLogger("dispa.tls")

CERT_SUFFIXES = (".crt", ".pem", ".cer")
EXPIRY_GAUGE = "dispa_tls_certificate_expiry_seconds"
TICKET_KEY_BYTES = 80
DAY = 86400.0


class _Source:
    __slots__ = ("key", "cert_file", "key_file", "names", "state", "current", "previous",
                 "error", "pinned")

    def __init__(self, key: str, cert_file: str, key_file: str, names: list[str]):
        self.key = key
        self.cert_file = cert_file
        self.key_file = key_file
        self.names = names
        self.state = None
        self.current: dict | None = None
        self.previous: dict | None = None
        self.error = ""
        # after a rollback: the files' state then; the rolled-back version serves until
        # the files change (a forced refresh, SIGHUP or config reload, keeps it)
        self.pinned = None


class CertStore:
    """Certificates for ``Snapshot.tls`` (see the module docstring)."""

    def __init__(self, clock=time.time):
        self.clock = clock
        self.compiled: dict | None = None
        self.config = None  # dispa.tls.config.TlsConfig
        self.sources: dict[str, _Source] = {}
        self.extra_dirs: list[str] = []  # directories added at run time (ACME storage)
        self.files: dict[str, tuple] = {}  # CA/CRL path -> (state, pem, error)
        self.ticket_keys: list[bytes] = []
        self.ticket_rotated_at = 0.0
        self.warned: dict[str, float] = {}
        self.ocsp_due: dict[str, float] = {}  # certificate id -> next fetch (epoch)
        self.refreshes = 0
        self.changes = 0
        # pairs from other sources than files (Kubernetes Secrets): label -> _Source;
        # validated like files, kept across refresh() (see set_pair)
        self.external: dict[str, _Source] = {}

    # -- configuration -----------------------------------------------------------------
    def configure(self, tls_config, compiled: dict | None) -> None:
        """Take the ``[tls]`` table and its compiled settings (keeps loaded pairs whose
        files are unchanged)."""
        self.config = tls_config
        self.compiled = compiled

    @property
    def enabled(self) -> bool:
        return bool(self.compiled and self.compiled.get("enabled"))

    def _wanted(self) -> list[tuple[str, str, str, list[str]]]:
        cfg = self.config
        out = []
        for c in cfg.certificates:
            out.append((os.path.abspath(c.cert_file), c.cert_file, c.key_file,
                        [n.lower() for n in c.names]))
        dirs = list(cfg.certificate_dirs) + self.extra_dirs
        acme = getattr(cfg, "acme", None)
        if acme is not None and acme.enabled:
            # ACME writes <storage_dir>/certs/<name>/{fullchain,privkey}.pem (tls/acme)
            dirs.append(os.path.join(acme.storage_dir, "certs"))
        for d in dict.fromkeys(dirs):
            try:
                entries = sorted(os.listdir(d))
            except OSError as exc:
                if not (acme is not None and d.startswith(acme.storage_dir)):
                    log.error("certificate directory %s cannot be read: %s", d, exc)
                continue
            for entry in entries:
                sub = os.path.join(d, entry)
                if os.path.isfile(os.path.join(sub, "fullchain.pem")) and \
                        os.path.isfile(os.path.join(sub, "privkey.pem")):
                    cert_file = os.path.join(sub, "fullchain.pem")
                    out.append((os.path.abspath(cert_file), cert_file,
                                os.path.join(sub, "privkey.pem"), []))
                    continue
                stem, ext = os.path.splitext(entry)
                if ext not in CERT_SUFFIXES:
                    continue
                key_file = os.path.join(d, stem + ".key")
                if os.path.exists(key_file):
                    cert_file = os.path.join(d, entry)
                    out.append((os.path.abspath(cert_file), cert_file, key_file, []))
        return out

    # -- refresh -----------------------------------------------------------------------
    def refresh(self, *, force: bool = False) -> bool:
        """Re-read what changed; True when the payload changed (publish a snapshot)."""
        if not self.enabled:
            changed = bool(self.sources)
            self.sources = {}
            return changed
        self.refreshes += 1
        changed = False
        wanted = self._wanted()
        keys = {w[0] for w in wanted}
        for key in [k for k in self.sources if k not in keys]:
            del self.sources[key]
            changed = True
        for key, cert_file, key_file, names in wanted:
            src = self.sources.get(key)
            if src is None or src.key_file != key_file or src.names != names:
                src = self.sources[key] = _Source(key, cert_file, key_file, names)
                changed = True
            ocsp_file = _ocsp_file(cert_file)
            state = file_state(cert_file, key_file, ocsp_file)
            if not force and state == src.state:
                continue
            if src.pinned is not None:
                if state == src.pinned:
                    continue
                src.pinned = None  # the files changed since the rollback: read them
            src.state = state
            try:
                info = load_pair(cert_file, key_file)
            except CertError as exc:
                if str(exc) != src.error:
                    log.error("certificate %s refused%s: %s", cert_file,
                              "; the previous one keeps serving" if src.current else "", exc,
                              extra={"fields": {"cert_file": cert_file, "error": str(exc)}})
                src.error = str(exc)
                continue
            src.error = ""
            _warn_key_mode(key_file)
            if names:
                info["names"] = list(names)
            self._load_ocsp_file(info, ocsp_file)
            if src.current is None or src.current["id"] != info["id"] or \
                    src.current["names"] != info["names"]:
                if src.current is not None:
                    log.info("certificate %s replaced", cert_file, extra={"fields": {
                        "cert_file": cert_file, "id": info["id"],
                        "previous": src.current["id"]}})
                src.previous, src.current = src.current, info
                changed = True
        changed = self._refresh_files(force) or changed
        changed = self._drop_expired_staples() or changed
        if changed:
            self.changes += 1
        self._warn_expiry()
        return changed

    def _drop_expired_staples(self) -> bool:
        """A stapled response past its next_update is withdrawn (clients would refuse it):
        a .ocsp file nobody refreshed, or a responder that stopped answering."""
        now = self.clock()
        changed = False
        for src in self.sources.values():
            c = src.current
            if c and c.get("ocsp") and 0 < c.get("ocsp_next", 0) <= now:
                log.error("OCSP response for %s expired: no longer stapled", src.cert_file,
                          extra={"fields": {"cert_file": src.cert_file}})
                c.pop("ocsp")
                c.pop("ocsp_next")
                changed = True
        return changed

    def _refresh_files(self, force: bool) -> bool:
        changed = False
        for path in self._auth_files():
            old = self.files.get(path)
            state = file_state(path)
            if old is not None and old[0] == state and not force:
                continue
            try:
                with open(path, "r", encoding="ascii") as f:
                    pem = f.read()
                if "-----BEGIN" not in pem:
                    raise ValueError("no PEM block")
                from dispa.tls.config import _pem_bundle
                problem = _pem_bundle(path, "CA certificate or CRL")
                if problem:  # what the workers' OpenSSL would refuse: keep the old one
                    raise ValueError(problem)
                error = ""
            except (OSError, ValueError) as exc:
                pem = old[1] if old else ""
                error = f"{path}: {exc}"
                log.error("client-auth file refused: %s", error)
            if old is None or old[1] != pem:
                changed = True
                if pem and not error:
                    _warn_crl_dates(path, pem, self.clock())
            self.files[path] = (state, pem, error)
        return changed

    def _auth_files(self) -> list[str]:
        c = self.compiled or {}
        auths = [c.get("client_auth") or {}] + [s["client_auth"] for s in c.get("sni", [])]
        paths = []
        for a in auths:
            if a.get("mode", "off") != "off":
                paths += [p for p in (a.get("ca_file"), a.get("crl_file")) if p]
        return list(dict.fromkeys(paths))

    def _load_ocsp_file(self, info: dict, path: str) -> None:
        try:
            with open(path, "rb") as f:
                der = f.read(1 << 20)
        except OSError:
            return
        try:
            info["ocsp_next"] = ocsp.check_response(der, info["cert_pem"])
        except ocsp.OcspError as exc:
            log.warning("OCSP response %s not stapled: %s", path, exc)
            return
        info["ocsp"] = der.hex()
        info["ocsp_file"] = path

    async def refresh_ocsp(self, fetch=None) -> bool:
        """With ``ocsp_stapling``: fetch the responses that are due (half their
        validity passed, or never fetched); True when a stapled response changed."""
        import asyncio
        cfg = self.config
        if not self.enabled or not getattr(cfg, "ocsp_stapling", False):
            return False
        fetch = fetch or ocsp.fetch_response
        changed = False
        for src in list(self.sources.values()):
            c = src.current
            if c is None or c.get("ocsp_file"):
                continue
            now = self.clock()
            if now < self.ocsp_due.get(c["id"], 0.0):
                continue
            try:
                der = await asyncio.to_thread(fetch, c["cert_pem"])
                nxt = ocsp.check_response(der, c["cert_pem"])
            except ocsp.OcspError as exc:
                log.warning("OCSP for %s: %s", src.cert_file, exc)
                self.ocsp_due[c["id"]] = now + 300.0
                continue
            self.ocsp_due[c["id"]] = now + (max(60.0, (nxt - now) / 2) if nxt else 3600.0)
            c["ocsp_next"] = nxt
            if c.get("ocsp") != der.hex():
                c["ocsp"] = der.hex()
                changed = True
        if changed:
            self.changes += 1
        return changed

    def rotate_ticket_keys(self, *, force: bool = False) -> bool:
        """Make a new ticket key when the rotation interval passed; True when it did."""
        cfg = self.config
        if not self.enabled or not cfg.session_tickets:
            return False
        now = self.clock()
        if not force and self.ticket_keys and now - self.ticket_rotated_at < \
                cfg.ticket_key_rotation:
            return False
        self.ticket_keys = [os.urandom(TICKET_KEY_BYTES)] + self.ticket_keys[:1]
        self.ticket_rotated_at = now
        return True

    def rollback(self, cert_file: str) -> dict:
        """Serve the previous good version of a source again, until its files change
        (``POST /admin/tls/rollback``). Returns the source's new status entry; raises
        LookupError (no such source) or ValueError (nothing to roll back to)."""
        src = self.sources.get(os.path.abspath(cert_file))
        if src is None:
            raise LookupError(f"no certificate source {cert_file!r}; sources: "
                              f"{', '.join(s.cert_file for s in self.sources.values())}")
        if src.previous is None:
            raise ValueError(f"{cert_file}: no previous version to roll back to")
        if src.previous["not_after"] <= self.clock():
            raise ValueError(f"{cert_file}: the previous version has expired")
        src.current, src.previous = src.previous, src.current
        src.pinned = src.state
        self.changes += 1
        log.warning("certificate %s rolled back to %s (until its files change)",
                    src.cert_file, src.current["id"], extra={"fields": {
                        "cert_file": src.cert_file, "id": src.current["id"],
                        "previous": src.previous["id"]}})
        return {"cert_file": src.cert_file, "id": src.current["id"],
                "previous_id": src.previous["id"], "names": src.current["names"]}

    # -- pairs from other sources (Kubernetes Secrets) -----------------------------------
    def set_pair(self, label: str, cert_pem: bytes | None, key_pem: bytes | None) -> bool:
        """Offer the pair of a non-file source (``label``: ``kubernetes:ns/name``). It is
        validated like a file pair (``certs.parse_pair``): a bad pair is refused with an
        error in the status and the current one keeps serving. True when what is served
        changed (publish a snapshot)."""
        from dispa.tls.certs import parse_pair
        src = self.external.get(label)
        if src is None:
            src = self.external[label] = _Source(label, label, label, [])
        try:
            if not cert_pem or not key_pem:
                raise CertError(f"{label}: the secret has no tls.crt and tls.key")
            info = parse_pair(cert_pem, key_pem, where=label)
        except CertError as exc:
            if str(exc) != src.error:
                log.error("certificate %s refused%s: %s", label,
                          "; the previous one keeps serving" if src.current else "", exc,
                          extra={"fields": {"cert_file": label, "error": str(exc)}})
            src.error = str(exc)
            return False
        src.error = ""
        info["source"] = label
        if src.current is not None and src.current["id"] == info["id"]:
            return False
        if src.current is not None:
            log.info("certificate %s replaced", label, extra={"fields": {
                "cert_file": label, "id": info["id"], "previous": src.current["id"]}})
        src.previous, src.current = src.current, info
        self.changes += 1
        return True

    def drop_pairs(self, keep: set[str]) -> bool:
        """Forget the non-file sources whose label is not in ``keep`` (a Secret deleted,
        or no longer configured); True when a served pair went away."""
        changed = False
        for label in [k for k in self.external if k not in keep]:
            changed = self.external.pop(label).current is not None or changed
        return changed

    # -- output ------------------------------------------------------------------------
    def _all_sources(self) -> list[_Source]:
        return list(self.sources.values()) + list(self.external.values())

    def certificates(self) -> list[dict]:
        return [s.current for s in self._all_sources() if s.current is not None]

    def payload(self) -> dict | None:
        """``Snapshot.tls``: compiled settings + certificates + CA/CRL PEM + ticket key."""
        c = self.compiled
        if c is None:
            return None
        out = dict(c)
        if not self.enabled:
            return out

        def with_pem(a: dict) -> dict:
            a = dict(a)
            if a.get("mode", "off") != "off":
                a["ca_pem"] = self.files.get(a.get("ca_file"), (None, ""))[1]
                a["crl_pem"] = self.files.get(a.get("crl_file"), (None, ""))[1] \
                    if a.get("crl_file") else ""
            return a

        out["client_auth"] = with_pem(c["client_auth"])
        out["sni"] = [dict(s, client_auth=with_pem(s["client_auth"])) for s in c["sni"]]
        out["certificates"] = [
            {k: cert.get(k) for k in ("id", "names", "cert_pem", "key_pem", "not_after",
                                      "ocsp")}
            for cert in self.certificates()]
        # current first, then the previous one: workers still accept tickets made with it
        out["ticket_keys"] = [k.hex() for k in self.ticket_keys[:2]]
        return out

    def errors(self) -> list[dict]:
        out = [{"cert_file": s.cert_file, "error": s.error,
                "serving_previous": s.current is not None}
               for s in self._all_sources() if s.error]
        out += [{"file": p, "error": f[2]} for p, f in self.files.items() if f[2]]
        return out

    def status(self) -> dict:
        now = self.clock()
        return {
            "enabled": self.enabled,
            "certificates": [{
                "cert_file": s.cert_file, "names": s.current["names"] if s.current else [],
                "id": s.current["id"] if s.current else None,
                "subject": s.current["subject"] if s.current else None,
                "expires_in_seconds": round(s.current["not_after"] - now)
                if s.current else None,
                "previous_id": s.previous["id"] if s.previous else None,
                "rolled_back": s.pinned is not None,
                "ocsp_stapled": bool(s.current and s.current.get("ocsp")),
                "error": s.error or None,
            } for s in self._all_sources()],
            "errors": self.errors(),
            "ticket_key_age_seconds": round(now - self.ticket_rotated_at)
            if self.ticket_keys else None,
        }

    def expiry_gauges(self) -> list[tuple]:
        now = self.clock()
        out = []
        for s in self._all_sources():
            if s.current is None:
                continue
            c = s.current
            out.append((EXPIRY_GAUGE, "Seconds until the served certificate expires",
                        {"name": c["names"][0] if c["names"] else "-",
                         "cert_file": s.cert_file, "id": c["id"]},
                        round(c["not_after"] - now, 3)))
        return out

    def _warn_expiry(self) -> None:
        days = getattr(self.config, "expiry_warning_days", 0)
        if not days:
            return
        now = self.clock()
        for s in self.sources.values():
            c = s.current
            if c is None:
                continue
            left = c["not_after"] - now
            if left < days * DAY and now - self.warned.get(c["id"], 0.0) > DAY:
                self.warned[c["id"]] = now
                log.warning("certificate %s (%s) expires in %.1f days", s.cert_file,
                            ", ".join(c["names"]) or "-", left / DAY,
                            extra={"fields": {"cert_file": s.cert_file, "names": c["names"],
                                              "expires_in_seconds": round(left)}})


def _warn_crl_dates(path: str, pem: str, now: float) -> None:
    """A CRL past its nextUpdate makes OpenSSL refuse every client certificate
    (``client_crl_expired``): say so when the file is (re)read."""
    if "X509 CRL" not in pem:
        return
    from cryptography import x509
    for block in pem.split("-----END X509 CRL-----")[:-1]:
        start = block.find("-----BEGIN X509 CRL-----")
        if start < 0:
            continue
        try:
            crl = x509.load_pem_x509_crl((block[start:] + "-----END X509 CRL-----\n").encode())
        except ValueError as exc:
            log.error("CRL in %s cannot be parsed: %s", path, exc)
            continue
        nxt = crl.next_update_utc
        if nxt is not None and nxt.timestamp() <= now:
            log.error("CRL %s (%s) expired at %s: client certificates it covers are refused "
                      "(client_crl_expired) until a fresh CRL is in place", path,
                      crl.issuer.rfc4514_string(), nxt.isoformat(),
                      extra={"fields": {"file": path, "next_update": nxt.isoformat()}})


def _warn_key_mode(key_file: str) -> None:
    """A private key that every user of the box can read deserves a warning (it is still
    served: refusing would take a site down over a chmod)."""
    try:
        mode = os.stat(key_file).st_mode
    except OSError:
        return
    if mode & 0o004:
        log.warning("private key %s is readable by every user (mode %o): chmod 600 it",
                    key_file, mode & 0o777, extra={"fields": {"key_file": key_file}})


def _ocsp_file(cert_file: str) -> str:
    """``<cert_file>.ocsp`` (HAProxy's convention), else ``<stem>.ocsp`` beside it."""
    first = cert_file + ".ocsp"
    if os.path.exists(first):
        return first
    return os.path.splitext(cert_file)[0] + ".ocsp"


def with_tls(snapshot, payload):
    """``snapshot`` with ``tls`` replaced and its content version recomputed."""
    from dispa.config.snapshot import make_snapshot
    if snapshot.tls == payload:
        return snapshot
    fields = {f: getattr(snapshot, f) for f in snapshot.__struct_fields__ if f != "version"}
    fields["tls"] = payload
    return make_snapshot(**fields)
