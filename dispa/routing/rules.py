"""Routing rules, compiled: ``RouteTable.match`` picks the rule for a request, ``Route`` acts.

Theory of operation
-------------------
This module owns phase 3 of the request path (STYLE C3, "route") for the ``[routing]``
table: given a request head it finds *the first enabled rule, in (priority desc, file
order), whose conditions all hold*, and it carries out that rule's actions (target choice,
path rewrite, header edits, direct responses and redirects).

``RouteTable.build`` runs once per snapshot, in the worker, off the request path. It turns
every rule into a :class:`Route` (conditions pre-parsed: regexes compiled, networks turned
into integers, header names lowercased to ``bytes``) and files each route in an index, so
that ``match`` tests only the few rules that could hold:

1. **Host.** Rules with host patterns go in a bucket per pattern: a dict keyed by exact
   host, and a dict keyed by wildcard suffix (``*.example.com`` under ``example.com``). The
   buckets a Host value reaches are worked out once and memoised (a bounded dict, as in
   ``routing.vhost``): its exact bucket, the wildcard bucket of each strict suffix of the
   name, label by label (``a.b.example.com`` -> ``b.example.com``, ``example.com``,
   ``com``), and the bucket of rules without a host condition.
2. **Path, inside a bucket.** A rule with ``path.exact`` is keyed by that path. Otherwise
   the longest literal prefix that the rule *requires* keys it in a prefix dict: the
   ``prefix`` condition, the literal head of a ``template`` (up to the first ``{``), or the
   literal head of a ``regex`` anchored with ``^`` (found with the stdlib regex parser).
   ``match`` tries ``path[:n]`` only for the prefix lengths ``n`` that exist under the
   path's first segment (``/api/``), plus those of prefixes shorter than one segment.
   Everything else is "loose": a candidate for every path of the bucket.
3. **Regexes.** In each group (one exact path, one prefix, or the loose list), rules whose
   only condition is a path regex are joined into one alternation, in priority order, each
   alternative followed by an empty marker group (``lastindex`` names the rule). A search
   returns the leftmost match and, at that position, the first alternative in priority
   order; ``_take`` walks the match starts, so the result is the best rule whose regex
   matches anywhere: one scan in C instead of a Python call per rule. Regexes that a join
   could change (named groups, backreferences, global inline flags) are tested alone.

The candidates found this way are sorted by evaluation order and each is tested in full
(``Route._test``: every condition except the host bucket's own pattern). The first that
passes wins. The index only ever *narrows*: each key is a condition the rule needs anyway,
so the result is the same as the linear scan, which
tests/unit/routing/test_rules_equivalence.py checks against a naive reference on random
rule sets (Hypothesis).

Rules:

1. Nothing here allocates per request beyond the candidate list, the lazily parsed query
   (only when a candidate has a query condition), the params dict and the ``Match``.
2. A ``Route`` is immutable after build and shared by all requests of the worker.
3. ``build`` trusts a table that passed ``config.routing_model.check_routing``.

WARNING: ``Route._test`` must test every condition that the index does not guarantee. A new
condition needs a line there, in the reference matcher of the equivalence test, and in
``_is_pure_regex`` (which must then return False for rules that use it).

Measured with perf/micro/bench_routes.py (10,000 rules): 2.4-3.2 us per match in the best
rounds, 2.5-5 us median, on a busy 2-core box with CPython 3.11; figures in docs/routing.md
"Performance". Not compiled with Cython yet: the module is plain Python.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

import msgspec

from dispa.config.routing_model import (
    ContainsMatch, ExactMatch, HeaderActions, PrefixMatch, RegexMatch, RoutingConfig,
    RoutingRule, SuffixMatch, compile_template, host_pattern, translate_replacement,
)
from dispa.routing.vhost import normalize_host

try:  # the regex parser, used only to find literal prefixes; the index works without it
    from re import _constants as _sre_c
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_constants as _sre_c  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = ["Match", "Route", "RouteTable"]

# Memo sizes for normalised hosts and parsed client addresses; cleared when full (as
# routing.vhost does), so a flood of distinct values costs a rebuild, never memory.
_CACHE_LIMIT = 4096

_PARAM = re.compile(r"\{([^{}]*)\}")
_CTL = re.compile(r"[\x00-\x20\x7f]")
# A backreference makes a regex unsafe to join with others (group numbers shift).
_BACKREF = re.compile(r"\\[1-9]|\(\?P=|\(\?\(")


class Match(msgspec.Struct):
    """The result of :meth:`RouteTable.match`: the route and the path parameters it
    captured (template ``{name}`` segments and named groups of ``path.regex``).

    A msgspec Struct because it is made once per routed request: it costs half of a
    ``__slots__`` class with ``__init__`` (measured, CPython 3.11)."""

    route: Any
    params: dict


# ================================================================ conditions, pre-parsed

def _value_test(match: Any) -> Callable[[str], bool]:
    """A value matcher (ExactMatch, ...) -> a predicate on ``str``."""
    if isinstance(match, ExactMatch):
        return match.value.__eq__
    if isinstance(match, RegexMatch):
        search = re.compile(match.pattern).search
        return lambda v: search(v) is not None
    arg = match.value
    if isinstance(match, ContainsMatch):
        return lambda v: arg in v
    if isinstance(match, PrefixMatch):
        return lambda v: v.startswith(arg)
    if isinstance(match, SuffixMatch):
        return lambda v: v.endswith(arg)
    raise TypeError(f"unknown value match {match!r}")  # pragma: no cover - model changed


def _network(text: str) -> tuple[int, int, int]:
    """``"10.0.0.0/8"`` -> (version, network as int, mask as int)."""
    net = ipaddress.ip_network(text.strip(), strict=False)
    return net.version, int(net.network_address), int(net.netmask)


def _parse_ip(text: str) -> tuple[int, int] | None:
    """``"10.1.2.3"`` -> (4, int); IPv4-mapped IPv6 counts as IPv4; None if not an address."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.partition("%")[0]  # IPv6 zone id
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.version, int(address)


def _strip_host(raw: str) -> str:
    """The host without port and trailing dot, case kept (for case-sensitive patterns);
    the same cuts as ``vhost.normalize_host``."""
    host = raw.strip()
    if host.startswith("["):
        end = host.find("]")
        host = host[: end + 1] if end > 0 else host
    else:
        colon = host.rfind(":")
        if colon >= 0:
            host = host[:colon]
    return host[:-1] if host.endswith(".") else host


def _regex_literal_prefix(pattern: str) -> str:
    """The literal text every match of ``pattern`` (searched) must start the subject with:
    ``"^/api/v[0-9]+"`` -> ``"/api/v"``; ``""`` when unanchored or not purely literal."""
    try:
        parsed = _sre_parse.parse(pattern)
    except Exception:  # noqa: BLE001 - anything the parser refuses just is not indexed
        return ""
    if parsed.state.flags & (re.IGNORECASE | re.MULTILINE | re.VERBOSE):
        return ""
    items = list(parsed)
    if not items or items[0][0] is not _sre_c.AT or items[0][1] not in (
            _sre_c.AT_BEGINNING, _sre_c.AT_BEGINNING_STRING):
        return ""
    out = []
    for op, arg in items[1:]:
        if op is not _sre_c.LITERAL:
            break
        out.append(chr(arg))
    return "".join(out)


def _alternative(compiled: re.Pattern) -> str | None:
    """The pattern wrapped to be one alternative of a joined pattern, or None when joining
    could change what it matches: named groups (names must be unique in the join),
    backreferences (group numbers shift) and global inline flags (they must lead)."""
    pattern = compiled.pattern
    if compiled.groupindex or _BACKREF.search(pattern) or compiled.flags & (
            re.IGNORECASE | re.MULTILINE | re.VERBOSE | re.DOTALL):
        return None
    try:
        re.compile(f"(?:{pattern})")  # refuses a global inline flag, e.g. "(?a)" inside
    except (re.error, OverflowError, RecursionError, ValueError):
        return None
    return f"(?:{pattern})"


def _starts_anchored(pattern: str) -> bool:
    try:
        items = list(_sre_parse.parse(pattern))
    except Exception:  # noqa: BLE001
        return False
    return bool(items) and items[0][0] is _sre_c.AT and items[0][1] is _sre_c.AT_BEGINNING


def _split_placeholders(text: str) -> tuple[tuple[bool, str], ...]:
    """``"/a/{id}"`` -> ((False, "/a/"), (True, "id")): literal and placeholder parts."""
    parts: list[tuple[bool, str]] = []
    pos = 0
    for found in _PARAM.finditer(text):
        if found.start() > pos:
            parts.append((False, text[pos:found.start()]))
        parts.append((True, found.group(1)))
        pos = found.end()
    if pos < len(text):
        parts.append((False, text[pos:]))
    return tuple(parts)


def _expand(parts: tuple[tuple[bool, str], ...], values: dict) -> str:
    return "".join(values.get(v, "") if is_param else v for is_param, v in parts)


def _escape_ctl(text: str) -> str:
    """Percent-encode controls and spaces: a Location header must not carry CR/LF."""
    return _CTL.sub(lambda m: f"%{ord(m.group()):02X}", text)


class _HeaderEdits:
    """Pre-encoded header edits, applied as rename, remove, set, add."""

    __slots__ = ("rename", "remove", "set", "add", "empty")

    def __init__(self, edits: HeaderActions):
        self.rename = {old.lower().encode("latin-1"): new.encode("latin-1")
                       for old, new in edits.rename.items()}
        self.remove = tuple(n.encode("latin-1") for n in edits.remove)
        self.set = tuple((n.encode("latin-1"), v.encode("latin-1"))
                         for n, v in edits.set.items())
        self.add = tuple((n.encode("latin-1"), v.encode("latin-1"))
                         for n, v in edits.add.items())
        self.empty = not (self.rename or self.remove or self.set or self.add)

    def apply(self, headers) -> None:
        if self.rename:
            rename = self.rename
            raw = headers.raw
            out = [(rename.get(k.lower(), k), v) for k, v in raw]
            if any(a[0] is not b[0] for a, b in zip(out, raw)):
                headers.raw = out
                headers.changed = True
        for name in self.remove:
            headers.remove(name)
        for name, value in self.set:
            headers.set(name, value)
        for name, value in self.add:
            headers.add(name, value)


# ================================================================ Route

class Route:
    """One enabled rule, compiled: what it matches, where it sends, what it changes.

    Public, read-only attributes: ``name``, ``priority``, ``order`` (its index in
    ``RouteTable.rules``), ``target`` (``""`` when the rule splits or answers directly),
    ``split`` (``((target, weight), ...)``), ``mirror`` (``(target, percent)`` or None),
    ``plugins_request``/``plugins_response`` (ordered and deduplicated as configured),
    ``direct`` (answers with ``custom_response`` or ``redirect``), ``has_request_edits``
    (path actions or request header edits) and ``has_response_edits``.
    """

    __slots__ = (
        "name", "priority", "order", "target", "split", "mirror", "plugins_request",
        "plugins_response", "direct", "has_request_edits", "has_response_edits",
        # compiled conditions (None when absent)
        "_methods", "_p_exact", "_p_prefix", "_p_suffix", "_p_contains", "_p_regex",
        "_regex_params", "_template", "_hosts_cs", "_networks", "_headers", "_query",
        "_simple", "_geo",
        # compiled actions
        "_cum", "_total", "_last", "_local", "_redirect", "_redirect_status", "_replace",
        "_strip", "_rr", "_prepend", "_req_edits", "_resp_edits",
        # index keys
        "_index_prefix", "_pure_regex",
    )

    def __init__(self, rule: RoutingRule, order: int):
        c = rule.conditions
        a = rule.actions
        self.name = rule.name
        self.priority = rule.priority
        self.order = order
        self.split = tuple((s.target, s.weight) for s in a.split)
        self.mirror = (a.mirror.target, float(a.mirror.percent)) if a.mirror else None
        self.direct = a.custom_response is not None or a.redirect is not None
        self.target = "" if (self.split or self.direct) else rule.target
        self.plugins_request = _order_plugins(rule.plugins_request, rule)
        self.plugins_response = _order_plugins(rule.plugins_response, rule)

        # -- conditions
        self._methods = frozenset(m.upper().encode("ascii") for m in c.method) or None
        p = c.path
        self._p_exact = p.exact
        self._p_prefix = p.prefix
        self._p_suffix = p.suffix
        self._p_contains = p.contains
        regex = re.compile(p.regex) if p.regex is not None else None
        self._p_regex = regex
        self._regex_params = bool(regex is not None and regex.groupindex)
        self._template = compile_template(p.template) if p.template is not None else None
        self._hosts_cs = None
        if c.host.case_sensitive and c.host.patterns:
            exact, suffixes = [], []
            for pattern in c.host.patterns:
                text = pattern.strip().rstrip(".")
                if text.startswith("*."):
                    suffixes.append(text[1:])  # ".Example.com"
                elif _parse_ip(text) is not None:  # an address has no case: "[::1]" form
                    exact.append(host_pattern(text)[0])
                else:
                    exact.append(text)
            self._hosts_cs = (frozenset(exact), tuple(suffixes))
        self._networks = tuple(_network(n) for n in c.client_ip) or None
        self._headers = tuple(
            (h.name.lower().encode("latin-1"), len(h.name), h.present is False,
             _value_test(h.value) if h.value is not None else None)
            for h in c.headers) or None
        self._query = tuple(
            (q.name, q.present is False, _value_test(q.value) if q.value is not None else None)
            for q in c.query_params) or None

        self._geo = c.geo
        # only method and plain path tests: _test stops after those
        self._simple = (self._hosts_cs is None and self._networks is None and self._geo is None
                        and self._headers is None and self._query is None
                        and regex is None and self._template is None)

        # -- index keys
        literal = ""
        if p.prefix is not None:
            literal = p.prefix
        if p.template is not None:
            head = p.template.split("{", 1)[0]
            literal = head if len(head) > len(literal) else literal
        if p.regex is not None:
            head = _regex_literal_prefix(p.regex)
            literal = head if len(head) > len(literal) else literal
        self._index_prefix = literal if (literal or p.prefix is not None) else None
        self._pure_regex = _is_pure_regex(rule)

        # -- actions
        weights = [w for _, w in self.split]
        self._cum = tuple(_cumulative(weights))
        self._total = sum(weights)
        self._last = next((t for t, w in reversed(self.split) if w), "")
        self._local = None
        if a.custom_response is not None:
            r = a.custom_response
            headers = []
            if not any(k.lower() == "content-type" for k in r.headers):
                headers.append((b"Content-Type", r.content_type.encode("latin-1")))
            headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in r.headers.items()]
            self._local = (r.status, tuple(headers), r.body.encode("utf-8"))
        self._redirect = None
        self._redirect_status = 302
        if a.redirect is not None:
            self._redirect = _location_parts(a.redirect.location)
            self._redirect_status = a.redirect.status
        pa = a.path
        self._replace = _split_placeholders(pa.replace) if pa.replace is not None else None
        self._strip = pa.strip_prefix or None
        self._rr = None
        if pa.regex_replace is not None:
            rx = re.compile(pa.regex_replace.pattern)
            self._rr = (rx, translate_replacement(pa.regex_replace.replacement, rx))
        self._prepend = _split_placeholders(pa.prepend) if pa.prepend else None
        self._req_edits = _HeaderEdits(a.headers)
        self._resp_edits = _HeaderEdits(a.response_headers)
        self.has_request_edits = not self._req_edits.empty or any(
            x is not None for x in (self._replace, self._strip, self._rr, self._prepend))
        self.has_response_edits = not self._resp_edits.empty

    def __repr__(self) -> str:
        return f"<Route {self.name!r} priority={self.priority} target={self.target!r}>"

    # -- matching (RouteTable.match calls this on candidates only)

    def _test(self, method: bytes, host: str, path: str, query: str,
              headers: list, client_ip: str, lazy: list) -> dict | None:
        """Every condition but the host bucket's: the params dict, or None."""
        if self._methods is not None and method not in self._methods:
            return None
        if self._p_exact is not None and path != self._p_exact:
            return None
        if self._p_prefix is not None and not path.startswith(self._p_prefix):
            return None
        if self._p_suffix is not None and not path.endswith(self._p_suffix):
            return None
        if self._p_contains is not None and self._p_contains not in path:
            return None
        if self._simple:
            return {}
        if self._hosts_cs is not None:
            cased = _strip_host(host)
            exact, suffixes = self._hosts_cs
            if cased not in exact and not any(
                    cased.endswith(s) and len(cased) > len(s) for s in suffixes):
                return None
        if self._networks is not None:
            ip = lazy[1]
            if ip is None:
                ip = lazy[1] = lazy[2]._client(client_ip)
            if not ip:
                return None
            version, value = ip
            if not any(v == version and value & mask == net
                       for v, net, mask in self._networks):
                return None
        if self._geo is not None:
            lookup = lazy[2].geo_lookup
            if not self._geo.matches(lookup(client_ip) if lookup is not None else None):
                return None
        if self._headers is not None:
            # a scan per condition: cheaper than building a name -> values map for the
            # dozen fields of a request, and the length test skips most lower() calls
            for name, size, absent, test in self._headers:
                hit = False
                for k, v in headers:
                    if len(k) == size and k.lower() == name and (
                            absent or test is None or test(v.decode("latin-1"))):
                        hit = True
                        break
                if hit is absent:
                    return None
        if self._query is not None:
            qmap = lazy[0]
            if qmap is None:
                qmap = lazy[0] = _query_map(query)
            for name, absent, test in self._query:
                values = qmap.get(name)
                if absent:
                    if values is not None:
                        return None
                elif values is None:
                    return None
                elif test is not None and not any(test(v) for v in values):
                    return None
        params: dict[str, str] = {}
        if self._p_regex is not None:
            found = self._p_regex.search(path)
            if found is None:
                return None
            if self._regex_params:
                params = found.groupdict()
                if None in params.values():  # an optional group that took no part
                    params = {k: v for k, v in params.items() if v is not None}
        if self._template is not None:
            found = self._template.match(path)
            if found is None:
                return None
            if params:
                params.update(found.groupdict())
            else:
                params = found.groupdict()
        return params

    # -- actions

    def pick_target(self, rnd: float) -> str:
        """The target for one request: a weighted pick among ``split`` given a uniform
        ``rnd`` in [0, 1) (weight-0 shares are never picked), else ``target``
        (``""`` for a rule that answers directly)."""
        if not self._total:
            return self.target
        i = bisect.bisect_right(self._cum, max(rnd, 0.0) * self._total)
        # rnd >= 1 (out of contract) falls past the end: the last share that has weight
        return self.split[i][0] if i < len(self.split) else self._last

    def local_response(self, host: str, path: str, query: str, params: dict | None = None
                       ) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        """``(status, headers, body)`` when the rule answers itself, else None.

        ``custom_response`` gives its status, headers (``Content-Type`` first unless the
        headers name one) and UTF-8 body. ``redirect`` gives its status, a ``Location`` with
        ``{path}``, ``{query}``, ``{host}`` and path-parameter placeholders filled in
        (``?{query}``/``&{query}`` vanish with an empty query) and an empty body. Framing
        headers (Content-Length) are the caller's.
        """
        if self._local is not None:
            status, headers, body = self._local
            return status, list(headers), body
        if self._redirect is None:
            return None
        values = {"path": path, "query": query, "host": host}
        if params:
            values = {**params, **values}
        out = []
        for kind, text in self._redirect:
            if kind == 0:
                out.append(text)
            elif kind == 1:
                out.append(values.get(text, ""))
            elif query:  # kind 2: "?{query}" / "&{query}"
                out.append(text + query)
        location = _escape_ctl("".join(out)).encode("latin-1", "replace")
        return self._redirect_status, [(b"Location", location)], b""

    def rewrite_path(self, path: str, params: dict) -> str:
        """Apply the path actions in order: replace, strip_prefix, regex_replace, prepend.

        ``{name}`` in ``replace``/``prepend`` is the captured path parameter; a stripped
        path that no longer starts with ``/`` gets one; ``prepend`` does not double a ``/``.
        Returns the new path (``path`` itself when the rule has no path actions).
        """
        if self._replace is not None:
            path = _expand(self._replace, params)
        if self._strip is not None and path.startswith(self._strip):
            path = path[len(self._strip):]
            if not path.startswith("/"):
                path = "/" + path
        if self._rr is not None:
            rx, template = self._rr
            path = rx.sub(template, path, count=1)
        if self._prepend is not None:
            head = _expand(self._prepend, params)
            if head.endswith("/") and path.startswith("/"):
                head = head[:-1]
            path = head + path
        return path

    def edit_request_headers(self, headers) -> None:
        """Apply ``actions.headers`` to a ``dispa.plugins.api.Headers`` (rename, remove, set,
        add); marks it changed when anything changed."""
        self._req_edits.apply(headers)

    def edit_response_headers(self, headers) -> None:
        """Apply ``actions.response_headers`` to a ``Headers``, like ``edit_request_headers``."""
        self._resp_edits.apply(headers)


def _order_plugins(names: list[str], rule: RoutingRule) -> tuple[str, ...]:
    out = list(dict.fromkeys(names)) if rule.plugins_dedup else list(names)
    if rule.plugins_order == "name_asc":
        out.sort()
    elif rule.plugins_order == "name_desc":
        out.sort(reverse=True)
    return tuple(out)


def _cumulative(weights: list[int]) -> list[int]:
    out, total = [], 0
    for w in weights:
        total += w
        out.append(total)
    return out


def _location_parts(location: str) -> tuple[tuple[int, str], ...]:
    """Location template -> parts: (0, literal), (1, placeholder), (2, "?"/"&") for a
    "?{query}"/"&{query}" that disappears with an empty query."""
    parts: list[tuple[int, str]] = []
    for is_param, text in _split_placeholders(location):
        if is_param and text == "query" and parts and parts[-1][0] == 0 \
                and parts[-1][1][-1:] in ("?", "&"):
            kind, literal = parts.pop()
            if literal[:-1]:
                parts.append((0, literal[:-1]))
            parts.append((2, literal[-1]))
        else:
            parts.append((1 if is_param else 0, text))
    return tuple(parts)


def _is_pure_regex(rule: RoutingRule) -> bool:
    """True when the rule's only condition (besides a case-insensitive host) is path.regex:
    then "its regex matches" is "it matches", and it may join a group's alternation."""
    c = rule.conditions
    p = c.path
    return (p.regex is not None and p.exact is None and p.prefix is None and p.suffix is None
            and p.contains is None and p.template is None and not c.method
            and not c.client_ip and not c.headers and not c.query_params
            and not (c.host.case_sensitive and c.host.patterns))


def _query_map(query: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    if query:
        for k, v in parse_qsl(query, keep_blank_values=True):
            out.setdefault(k, []).append(v)
    return out


# ================================================================ the index
# Groups and buckets are plain tuples (attribute access and method calls cost more than
# tuple unpacking on this path).
#
# group  = (ids, joined, marks, anchored, first)
#   ids       orders of the rules tested one by one, ascending
#   joined    the alternation of the group's pure-regex rules, or None; each alternative is
#             followed by an empty marker group, so ``lastindex`` names the alternative
#   marks     marker group index -> rule order
#   anchored  every alternative starts with "^": one ``match`` at 0 gives the answer
#   first     the lowest order among the alternatives (the search loop stops there)
# bucket = (exact, prefix, short, by_segment, loose)
#   exact       path -> group;  prefix: literal prefix -> group
#   short       the distinct lengths of prefixes with no "/" after their first character
#   by_segment  first segment ("/api/") -> the distinct lengths of the prefixes that start
#               with it; a path starting with such a prefix has that same first segment
#   loose       group or None


def _group(routes: list[Route]) -> tuple:
    alternatives: list[tuple[int, str, bool]] = []
    ids: list[int] = []
    joinable = sum(1 for r in routes if r._pure_regex) >= 2  # one regex alone: no join
    for r in routes:
        alt = _alternative(r._p_regex) if joinable and r._pure_regex else None
        if alt is None:
            ids.append(r.order)
        else:
            alternatives.append((r.order, alt, _starts_anchored(r._p_regex.pattern)))
    joined, marks, anchored, first = None, {}, False, -1
    if len(alternatives) >= 2:
        source = "|".join(f"{alt}(?P<_m{order}>)" for order, alt, _ in alternatives)
        try:
            joined = re.compile(source)
        except (re.error, OverflowError, RecursionError):  # pragma: no cover - size limits
            joined = None
    if joined is not None:
        marks = {joined.groupindex[f"_m{order}"]: order for order, _, _ in alternatives}
        anchored = all(a for _, _, a in alternatives)
        first = alternatives[0][0]
    else:
        ids += [order for order, _, _ in alternatives]
    return tuple(sorted(ids)), joined, marks, anchored, first


def _take(group: tuple, path: str, out: list[int]) -> None:
    """Add a group's candidates for ``path`` to ``out``."""
    ids, joined, marks, anchored, first = group
    if ids:
        out += ids
    if joined is None:
        return
    if anchored:
        found = joined.match(path)
        if found is not None:
            out.append(marks[found.lastindex])
        return
    # search() returns the leftmost match, and at one position the first alternative in
    # priority order. The rule we want may match further right, so walk the match starts:
    # the best over all starts is the best alternative that matches anywhere (search
    # semantics: "^" and lookbehinds still see the whole string when pos > 0).
    best = -1
    pos = 0
    end = len(path)
    while pos <= end:
        found = joined.search(path, pos)
        if found is None:
            break
        order = marks[found.lastindex]
        if best < 0 or order < best:
            best = order
            if order == first:
                break
        pos = found.start() + 1
    if best >= 0:
        out.append(best)


def _bucket(routes: list[Route]) -> tuple:
    exact: dict[str, list[Route]] = {}
    prefix: dict[str, list[Route]] = {}
    loose: list[Route] = []
    for r in routes:
        if r._p_exact is not None:
            exact.setdefault(r._p_exact, []).append(r)
        elif r._index_prefix is not None:
            prefix.setdefault(r._index_prefix, []).append(r)
        else:
            loose.append(r)
    short: set[int] = set()
    by_segment: dict[str, set[int]] = {}
    for key in prefix:
        slash = key.find("/", 1)
        if slash < 0:
            short.add(len(key))
        else:
            by_segment.setdefault(key[:slash + 1], set()).add(len(key))
    return ({k: _group(v) for k, v in exact.items()},
            {k: _group(v) for k, v in prefix.items()},
            tuple(sorted(short)),
            {k: tuple(sorted(v)) for k, v in by_segment.items()},
            _group(loose) if loose else None)


def _collect(bucket: tuple, path: str, out: list[int]) -> None:
    """Add the candidates of one host bucket for ``path`` to ``out``."""
    exact, prefix, short, by_segment, loose = bucket
    group = exact.get(path)
    if group is not None:
        _take(group, path, out)
    if short:
        for length in short:
            group = prefix.get(path[:length])
            if group is not None:
                _take(group, path, out)
    if by_segment:
        slash = path.find("/", 1)
        if slash > 0:
            lengths = by_segment.get(path[:slash + 1])
            if lengths is not None:
                for length in lengths:
                    group = prefix.get(path[:length])
                    if group is not None:
                        _take(group, path, out)
    if loose is not None:
        _take(loose, path, out)


class RouteTable:
    """The compiled ``[routing]`` table of one snapshot.

    ``rules`` holds the enabled rules in evaluation order (priority descending, then file
    order); ``default_target`` is the target when no rule matches (None: the default group);
    ``enable_logging`` asks the caller to log each decision.
    """

    __slots__ = ("rules", "default_target", "enable_logging", "geo_lookup", "_exact", "_wild", "_any",
                 "_plans", "_ips")

    def __init__(self, rules: tuple[Route, ...], default_target: str | None,
                 enable_logging: bool, host_patterns: list[list[tuple[str, bool]]]):
        self.rules = rules
        self.default_target = default_target
        self.enable_logging = enable_logging
        # client address -> GeoInfo | None, for `geo` conditions (set by the proxy from [geo])
        self.geo_lookup = None
        exact: dict[str, list[Route]] = {}
        wild: dict[str, list[Route]] = {}
        anywhere: list[Route] = []
        for route, patterns in zip(rules, host_patterns):
            if not patterns:
                anywhere.append(route)
            for key, wildcard in dict.fromkeys(patterns):
                (wild if wildcard else exact).setdefault(key, []).append(route)
        self._exact = {k: _bucket(v) for k, v in exact.items()}
        self._wild = {k: _bucket(v) for k, v in wild.items()}
        self._any = _bucket(anywhere) if anywhere else None
        self._plans: dict[str, tuple] = {}
        self._ips: dict[str, tuple[int, int] | bool] = {}

    @classmethod
    def build(cls, routing: RoutingConfig) -> "RouteTable":
        """Compile a ``[routing]`` table that passed ``check_routing``.

        Returns the table; raises ``ValueError`` (or ``re.error``) only for a table that
        would not have passed the check.
        """
        enabled = [rule for rule in routing.rules if rule.enabled]
        enabled.sort(key=lambda rule: -rule.priority)  # stable: ties keep file order
        routes = tuple(Route(rule, n) for n, rule in enumerate(enabled))
        patterns = []
        for rule in enabled:
            keys = []
            for pattern in rule.conditions.host.patterns:
                key = host_pattern(pattern)
                if isinstance(key, str):
                    raise ValueError(key)
                keys.append(key)
            patterns.append(keys)
        return cls(routes, routing.default_target or None, routing.enable_logging, patterns)

    def __len__(self) -> int:
        return len(self.rules)

    def match(self, method: bytes, host: str, path: str, query: str,
              headers: list[tuple[bytes, bytes]], client_ip: str) -> Match | None:
        """The first rule (priority desc, file order) whose conditions all hold.

        ``method`` as sent (bytes, case-sensitive); ``host`` the Host value (normalised
        here: lowercase, no port, no trailing dot); ``path`` and ``query`` the request
        target split at ``?`` (raw, percent-encoding kept); ``headers`` the raw header pairs;
        ``client_ip`` the client address (text). Returns a :class:`Match`, or None when no
        rule matches (the caller then uses ``default_target``). Never raises for any input.
        """
        plan = self._plans.get(host)
        if plan is None:
            plan = self._plan(host)
        found: list[int] = []
        for bucket in plan:
            _collect(bucket, path, found)
        if not found:
            return None
        if len(found) > 1:
            found.sort()
        rules = self.rules
        lazy: list = [None, None, self]  # query map, client address, the table (memo)
        last = -1
        for order in found:
            if order == last:
                continue
            last = order
            route = rules[order]
            params = route._test(method, host, path, query, headers, client_ip, lazy)
            if params is not None:
                return Match(route, params)
        return None

    def _plan(self, host: str) -> tuple:
        """The buckets a Host value reaches (memoised): its exact bucket, the wildcard
        buckets of each strict suffix of the normalised name (``a.b.c`` -> ``b.c``, ``c``),
        and the bucket of rules without a host condition."""
        name = normalize_host(host.encode("latin-1", "replace"))
        plan = []
        bucket = self._exact.get(name)
        if bucket is not None:
            plan.append(bucket)
        dot = name.find(".")
        while dot >= 0:
            bucket = self._wild.get(name[dot + 1:])
            if bucket is not None:
                plan.append(bucket)
            dot = name.find(".", dot + 1)
        if self._any is not None:
            plan.append(self._any)
        if len(self._plans) >= _CACHE_LIMIT:
            self._plans.clear()
        result = self._plans[host] = tuple(plan)
        return result

    def _client(self, client_ip: str) -> tuple[int, int] | bool:
        """Parsed client address (memoised); False when it is not an address."""
        ip = self._ips.get(client_ip)
        if ip is None:
            ip = _parse_ip(client_ip) or False
            if len(self._ips) >= _CACHE_LIMIT:
                self._ips.clear()
            self._ips[client_ip] = ip
        return ip
