"""Redaction: what every log sink applies before a value leaves the process.

Theory of operation
-------------------
``[logging.sanitization]`` (config/logging_model.py) compiles, in the master, to the plain
dict ``Snapshot.observability["redaction"]``; each worker builds one :class:`Redactor` from
it (:func:`build_redactor`) and every sink passes its strings through it: the access log
(each variable / JSON field), the traffic log (target, headers, every string column) and the
tracing helper (span attributes, :meth:`Redactor.value`).

Three actions, the same everywhere:

* ``mask``   -- the value becomes ``***``; a card number keeps its last four digits
  (``************1111``, the PCI DSS display rule) and an e-mail its domain;
* ``redact`` -- a header is dropped from the record; any other value becomes ``[REDACTED]``;
* ``hash``   -- ``h:`` + 16 hex digits of a keyed BLAKE2b of the value (``hash_key``), so
  equal values can be correlated across records but not reversed or dictionary-attacked
  without the key.

What gets matched: header names (``mask_headers``, ``header:<name>`` field rules), query
parameters of logged targets and referers (``mask_query_params``, ``query:<name>``), named
record fields (``client_ip``, ``user_agent``...), and regexes over every string: card
numbers (13-19 digits starting with 2-6, spaces or dashes allowed, **Luhn-checked** so
order ids and timestamps survive), ``Bearer``/``Basic`` credentials and JWTs, e-mails
(opt-in), and the operator's own ``[[logging.sanitization.patterns]]``.

With sanitization disabled, :data:`NULL_REDACTOR` passes strings through (and still
decodes header bytes) so sinks have a single code path.

Cost: the regexes cost several microseconds per string, so they run only on strings that
pass :meth:`Redactor.suspect`, a necessary condition for any built-in rule (13 card
digits with their separators, a credential keyword, a masked query parameter's name, a
``%`` escape, ``@`` with e-mails on) checked with one ``translate`` and a few substring
searches; sinks call it once per record over all its client strings joined. Operator
patterns make every string suspect (their regexes are arbitrary).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable, Optional
from urllib.parse import unquote_plus

__all__ = ["Redactor", "NULL_REDACTOR", "build_redactor", "luhn_ok"]

MASK = "***"
#: strings memoised by Redactor.suspect_cached (per worker and redactor)
SUSPECT_CACHE = 4096
REDACTED = "[REDACTED]"

# 13..19 digits, optionally grouped by single spaces, dashes or '+' (a form-encoded space);
# not preceded or followed by another digit. Candidates are Luhn-checked before masking.
_CARD = r"(?<![0-9])[0-9](?:[ +-]?[0-9]){12,18}(?![0-9])"
_BEARER = (r"\b(?i:bearer|basic|token|digest)\s+[A-Za-z0-9._~+/=-]{6,}"
           r"|\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
_EMAIL = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"

# Span attribute names that carry a URL or a query (OpenTelemetry HTTP conventions).
_URL_NAMES = frozenset(("target", "url", "url.full", "url.query", "url.path", "http.target",
                        "http.url", "referer", "http_referer", "http.request.header.referer"))
_HEADER_PREFIXES = ("http.request.header.", "http.response.header.")
# Span attribute names of the record fields a [[fields]] rule can name.
_ALIASES = {"client.address": "client_ip", "network.peer.address": "client_ip",
            "server.address": "host", "user_agent.original": "user_agent"}


# suspect(): digits -> "1", ASCII letters -> lower case, the rest unchanged
_FOLD = bytes(0x31 if 0x30 <= c <= 0x39 else (c | 0x20 if 0x41 <= c <= 0x5a else c)
              for c in range(256))


def luhn_ok(digits: str) -> bool:
    """True when ``digits`` (only 0-9) passes the Luhn checksum."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i & 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


class Redactor:
    """A compiled ``[logging.sanitization]``: pure functions of strings, safe to share."""

    enabled = True

    def __init__(self, spec: dict):
        key = spec.get("hash_key") or ""
        self._key = hashlib.blake2b(key.encode("utf-8"), digest_size=32).digest()
        header_action = spec.get("header_action", "mask")
        self._headers: dict[str, str] = {h.lower(): header_action
                                         for h in spec.get("mask_headers", ())}
        self._query: dict[str, str] = {q.lower(): "mask"
                                       for q in spec.get("mask_query_params", ())}
        self._fields: dict[str, str] = {}
        for name, action in spec.get("fields", ()):
            kind, _, rest = name.partition(":")
            if kind == "header" and rest:
                self._headers[rest.lower()] = action
            elif kind == "query" and rest:
                self._query[rest.lower()] = action
            else:
                self._fields[name.lower()] = action
        # one alternation, one pass over each string; group names say which rule matched
        parts: list[str] = []
        if spec.get("card_numbers", True):
            parts.append(f"(?P<card>{_CARD})")
        if spec.get("bearer_tokens", True):
            parts.append(f"(?P<bearer>{_BEARER})")
        if spec.get("emails", False):
            parts.append(f"(?P<email>{_EMAIL})")
        self._re: Optional[re.Pattern] = re.compile("|".join(parts)) if parts else None
        # Cheap pre-checks (C string operations, ~0.1 us) decide whether the regexes run at
        # all: most logged strings hold neither 13 digits nor a credential keyword.
        self._cards = bool(spec.get("card_numbers", True))
        self._bearer = bool(spec.get("bearer_tokens", True))
        self._emails = bool(spec.get("emails", False))
        # the operator's regexes stay separate: they may carry their own flags and groups
        self._patterns = tuple(
            (re.compile(regex), (lambda m, a=action: self.apply(a, m.group(0))))
            for _name, regex, action in spec.get("patterns", ()))
        # suspect(): what a string must contain (after _FOLD) for a rule to change it
        needles: list[bytes] = []
        self._qnames: frozenset = frozenset()
        if self._cards:
            needles.append(b"1" * 13)
        if self._bearer:
            needles += [b"bearer", b"basic", b"token", b"digest", b"eyj"]
        if self._emails:
            needles.append(b"@")
        if self._query:
            # a masked parameter: "?name=" or "&name=" (target() splits on '&' and needs
            # the '='), or any '%' (a %-escaped name decodes to anything). Not the bare
            # name: the default list holds "key", "code", "auth", "sig", common in paths.
            needles.append(b"%")
            self._qnames = frozenset(q.encode("latin-1", "replace").translate(_FOLD, b" +-")
                                     .decode("latin-1") for q in self._query)
        # a needle that contains another is redundant (access_token: token)
        needles = sorted(set(needles), key=len)
        self._needles = tuple(n.decode("latin-1") for i, n in enumerate(needles)
                              if not any(m in n for m in needles[:i]))
        self._always = bool(self._patterns)
        self._memo: dict[str, bool] = {}

    # ---------------------------------------------------------------- actions
    def hash(self, value: str) -> str:
        """``h:`` + 16 hex digits of BLAKE2b(value) keyed with ``hash_key``."""
        return "h:" + hashlib.blake2b(value.encode("utf-8", "surrogateescape"), key=self._key,
                                      digest_size=8).hexdigest()

    def apply(self, action: str, value: str) -> str:
        """One action on a whole value."""
        if action == "hash":
            return self.hash(value)
        if action == "redact":
            return REDACTED
        return MASK

    def _sub(self, m: re.Match) -> str:
        kind = m.lastgroup
        s = m.group(0)
        if kind == "card":
            digits = "".join(c for c in s if c.isdigit())
            # card numbers start with 2-6 (Mastercard 2/5, Amex/Diners/JCB 3, Visa 4,
            # Discover/UnionPay 6): epoch-millisecond timestamps (1...) are not cards
            if digits[0] not in "23456" or not luhn_ok(digits):
                return s
            return "*" * (len(digits) - 4) + digits[-4:]
        if kind == "bearer":
            scheme, sep, _ = s.partition(" ")
            return f"{scheme} {MASK}" if sep and not s.startswith("eyJ") else MASK
        if kind == "email":
            return MASK + s[s.index("@"):]
        return s

    def _worth_scanning(self, s: str) -> bool:
        return self.suspect(s)

    def suspect(self, s: str) -> bool:
        """False when :meth:`text` and :meth:`target` surely return ``s`` unchanged.

        A necessary condition for any built-in rule to match, checked with one C-level
        ``translate`` and a few substring searches (~0.3 us on a 100-character string,
        against several us for the regexes): digits fold to ``1``, letters to lower case
        and card separators are deleted, so 13 card digits become ``1111111111111`` and
        ``BeArEr`` becomes ``bearer``. Sinks may check many strings at once by joining
        them with ``"\\0"`` (which matches no needle).
        """
        if self._always:
            return True
        # (str ``in`` is ~3x faster than bytes ``in`` in CPython 3.11: decode back)
        t = s.encode("latin-1", "replace").translate(_FOLD, b" +-").decode("latin-1")
        for n in self._needles:
            if n in t:
                return True
        if self._qnames and "=" in t:
            # a masked parameter: a name between '?' or '&' and '=' (as target() splits)
            names = self._qnames
            for part in t.replace("?", "&").split("&")[1:]:
                name, eq, _ = part.partition("=")
                if eq and name in names:
                    return True
        return False

    def suspect_cached(self, s: str) -> bool:
        """:meth:`suspect` memoised per string, for values that repeat across requests
        (User-Agent, Referer): a dict lookup instead of the scan. Bounded: the memo is
        emptied when it holds ``SUSPECT_CACHE`` strings (a client sending a new value
        each time only causes misses)."""
        memo = self._memo
        r = memo.get(s)
        if r is None:
            r = self.suspect(s)
            if len(memo) >= SUSPECT_CACHE:
                memo.clear()
            memo[s] = r
        return r

    # ---------------------------------------------------------------- public API
    def text(self, s: str) -> str:
        """The regex rules (cards, credentials, e-mails, operator patterns) over ``s``."""
        if not s:
            return s
        if self._re is not None and self.suspect(s):
            s = self._re.sub(self._sub, s)
        for rx, repl in self._patterns:
            s = rx.sub(repl, s)
        return s

    def target(self, s: str) -> str:
        """A request target or URL: masked query parameters, then :meth:`text`."""
        if not s or not self.suspect(s):  # one check covers both rules below
            return s
        q = s.find("?")
        if q >= 0 and self._query:
            pairs = s[q + 1:].split("&")
            changed = False
            for i, pair in enumerate(pairs):
                name, eq, value = pair.partition("=")
                key = unquote_plus(name) if ("%" in name or "+" in name) else name
                action = self._query.get(key.lower())
                if action is not None and eq and value:
                    pairs[i] = f"{name}={self.apply(action, unquote_plus(value))}"
                    changed = True
            if changed:
                s = s[:q + 1] + "&".join(pairs)
        return self.text(s)

    def header(self, name: str, value: str) -> Optional[str]:
        """One header's logged value (None: leave the header out of the record)."""
        action = self._headers.get(name.lower())
        if action is None:
            if name.lower() == "referer":
                return self.target(value)
            return self.text(value)
        if action == "redact":
            return None
        return self.apply(action, value)

    def headers(self, pairs: Iterable[tuple[Any, Any]]) -> list[tuple[str, str]]:
        """Header pairs (bytes or str) -> decoded, redacted ``(name, value)`` pairs."""
        out = []
        for k, v in pairs:
            if isinstance(k, (bytes, bytearray)):
                k = k.decode("latin-1")
            if isinstance(v, (bytes, bytearray)):
                v = v.decode("latin-1")
            v = self.header(k, v)
            if v is not None:
                out.append((k, v))
        return out

    def value(self, name: str, value: Any) -> Any:
        """A named value (record field or span attribute): its field rule, a header or
        URL rule by name, else :meth:`text`. Lists are redacted item by item; numbers and
        booleans pass through."""
        if isinstance(value, (list, tuple)):
            return type(value)(self.value(name, v) for v in value)
        if not isinstance(value, str):
            return value
        n = name.lower()
        action = self._fields.get(n) or self._fields.get(_ALIASES.get(n, n))
        if action is not None:
            return self.apply(action, value)
        if n.startswith(_HEADER_PREFIXES):
            h = n.split(".", 3)[3].replace("_", "-")
            v = self.header(h, value)
            return REDACTED if v is None else v
        if n.startswith("header:"):
            v = self.header(n[7:], value)
            return REDACTED if v is None else v
        if n in _URL_NAMES:
            return self.target(value)
        return self.text(value)

    def leaves_unsuspected(self, names: Iterable[str]) -> bool:
        """True when :meth:`value` returns every string it is given under these ``names``
        unchanged unless :meth:`suspect` says otherwise: no field or header rule names any
        of them. A sink with such names checks one joined string with ``suspect`` and,
        when that is False, skips the per-value calls (the tracing sink's fast path)."""
        for name in names:
            n = name.lower()
            if n in self._fields or _ALIASES.get(n, n) in self._fields:
                return False
            if n.startswith(_HEADER_PREFIXES):
                if n.split(".", 3)[3].replace("_", "-") in self._headers:
                    return False
            elif n.startswith("header:") and n[7:] in self._headers:
                return False
        return True

    def field(self, name: str, value: Optional[str]) -> Optional[str]:
        """A record field that has a field rule, else the value unchanged (no regexes:
        for fields that cannot carry secrets, e.g. the client IP or the method)."""
        if value is None:
            return None
        action = self._fields.get(name)
        return value if action is None else self.apply(action, value)


class _NullRedactor(Redactor):
    """Sanitization off: strings pass through; header bytes are still decoded."""

    enabled = False

    def __init__(self):
        super().__init__({"card_numbers": False, "bearer_tokens": False,
                          "mask_headers": (), "mask_query_params": ()})

    def value(self, name: str, value: Any) -> Any:
        return value

    def leaves_unsuspected(self, names: Iterable[str]) -> bool:
        return True

    def suspect(self, s: str) -> bool:
        return False


NULL_REDACTOR: Redactor = _NullRedactor()


def build_redactor(spec: Optional[dict]) -> Redactor:
    """The redactor for ``Snapshot.observability.get("redaction")`` (None: pass-through)."""
    return Redactor(spec) if spec else NULL_REDACTOR
