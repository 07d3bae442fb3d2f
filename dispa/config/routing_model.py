"""The ``[routing]`` table: routing rules (conditions -> target, actions), and their checks.

Theory of operation
-------------------
The Structs below describe ``[routing]`` exactly as the operator writes it; the format is the
original Dispa's (``enable_logging``, ``default_target``, ``[[routing.rules]]`` with
``conditions`` and ``actions``), extended with new keys (``client_ip``, ``path.template``,
``actions.response_headers``, ``actions.redirect``, ``actions.split``, ``actions.mirror``).
``dispa.routing.rules.RouteTable.build`` compiles them into the matcher the workers use;
docs/routing.md documents every key.

Rules:

1. Per-value constraints live in ``Meta`` annotations (the loader reports them with the
   file's line). Everything that needs more than one value, or a parse (regexes, CIDRs, host
   patterns, header names, cross-references to targets and plugins), lives in
   :func:`check_routing`, which the loader calls on a table that built cleanly.
2. :func:`check_routing` reports *every* problem, each with the path of the offending key in
   the file's spelling (``("routing", "rules", 3, "conditions", "path", "regex")``).
3. ``RouteTable.build`` trusts a table that passed :func:`check_routing`; it does not repeat
   the checks.

WARNING: a new key here needs a row in docs/routing.md (tests/unit/routing/test_rules_docs.py
checks it), a check in :func:`check_routing` when it can be wrong in a way ``Meta`` cannot
see, and compiling in ``dispa/routing/rules.py``.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import Annotated, Literal, Optional, Union

import msgspec
from msgspec import Meta

from dispa.balancer.geo import GeoCondition

# config.model imports this module (for ``Config.routing``), so this module must not import
# config.model at its top, or importing it first would fail half-way through the cycle. The
# base class is therefore restated here; tests/unit/routing/test_rules_docs.py checks that its
# options stay those of ``config.model._Table``.


class _Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every table: frozen, unknown keys rejected (as ``config.model._Table``)."""


NonNegativeInt = Annotated[int, Meta(ge=0)]
__all__ = [
    "ContainsMatch", "CustomResponse", "ExactMatch", "HeaderActions", "HeaderCondition",
    "HostCondition", "MirrorConfig", "PathActions", "PathCondition", "PrefixMatch",
    "QueryCondition", "RedirectConfig", "RegexMatch", "RegexReplace", "RoutingConfig",
    "RoutingRule", "RuleActions", "RuleConditions", "SplitTarget", "SuffixMatch", "ValueMatch",
    "REDIRECT_STATUSES", "check_routing", "compile_template", "host_pattern",
    "template_names", "translate_replacement",
]

# RFC 9110 §15.4: the redirect statuses that carry a Location.
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
# Placeholders of redirect.location (besides template parameters).
LOCATION_PLACEHOLDERS = ("path", "query", "host")

NonEmpty = Annotated[str, Meta(min_length=1)]


# ---------------------------------------------------------------- value matchers

class StringMatch(_Table, tag_field="type"):
    """A string test on a header or query value; ``type`` selects the variant."""


class ExactMatch(StringMatch, tag="exact"):
    """The value equals ``value``."""

    value: str


class ContainsMatch(StringMatch, tag="contains"):
    """The value contains ``value``."""

    value: str


class PrefixMatch(StringMatch, tag="prefix"):
    """The value starts with ``value``."""

    value: str


class SuffixMatch(StringMatch, tag="suffix"):
    """The value ends with ``value``."""

    value: str


class RegexMatch(StringMatch, tag="regex"):
    """``pattern`` (Python ``re`` syntax) matches somewhere in the value (``re.search``)."""

    pattern: str


ValueMatch = Union[ExactMatch, ContainsMatch, RegexMatch, PrefixMatch, SuffixMatch]


# ---------------------------------------------------------------- conditions

class PathCondition(_Table):
    """``[routing.rules.conditions.path]``: every key that is set must hold (AND)."""

    exact: Optional[str] = None
    prefix: Optional[str] = None
    suffix: Optional[str] = None
    regex: Optional[str] = None  # re.search; named groups become path parameters
    contains: Optional[str] = None
    template: Optional[str] = None  # "/users/{id}/orders/{order}": {name} = one segment


class HostCondition(_Table):
    """``[routing.rules.conditions.host]``: any pattern may match (OR)."""

    patterns: list[str] = msgspec.field(default_factory=list)
    case_sensitive: bool = False


class HeaderCondition(_Table):
    """One ``[[routing.rules.conditions.headers]]`` entry."""

    name: NonEmpty
    value: Optional[ValueMatch] = None
    present: Optional[bool] = None  # false: the header must be absent


class QueryCondition(_Table):
    """One ``[[routing.rules.conditions.query_params]]`` entry."""

    name: NonEmpty
    value: Optional[ValueMatch] = None  # absent: a presence check
    present: Optional[bool] = None  # false: the parameter must be absent


class RuleConditions(_Table):
    """``[routing.rules.conditions]``: all must hold (AND); within a list any may (OR)."""

    method: list[str] = msgspec.field(default_factory=list)
    client_ip: list[str] = msgspec.field(default_factory=list)
    path: PathCondition = msgspec.field(default_factory=PathCondition)
    host: HostCondition = msgspec.field(default_factory=HostCondition)
    headers: list[HeaderCondition] = msgspec.field(default_factory=list)
    query_params: list[QueryCondition] = msgspec.field(default_factory=list)
    # where the client is ([geo] database): countries/continents, their negations, unknown
    geo: Optional[GeoCondition] = None


# ---------------------------------------------------------------- actions

class HeaderActions(_Table):
    """Header edits, applied in the order rename, remove, set, add."""

    set: dict[str, str] = msgspec.field(default_factory=dict)
    add: dict[str, str] = msgspec.field(default_factory=dict)
    remove: list[str] = msgspec.field(default_factory=list)
    rename: dict[str, str] = msgspec.field(default_factory=dict)


class RegexReplace(_Table):
    """``regex_replace``: the first match of ``pattern`` becomes ``replacement``
    (``$1``/``${1}``/``${name}`` refer to groups, ``$$`` is a literal ``$``)."""

    pattern: str
    replacement: str


class PathActions(_Table):
    """``[routing.rules.actions.path]``: applied in the order replace, strip_prefix,
    regex_replace, prepend."""

    prepend: Optional[str] = None
    strip_prefix: Optional[str] = None
    replace: Optional[str] = None
    regex_replace: Optional[RegexReplace] = None


class CustomResponse(_Table):
    """``[routing.rules.actions.custom_response]``: answer directly, no upstream."""

    status: Annotated[int, Meta(ge=200, le=599)] = 200
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    body: str = ""
    content_type: str = "text/plain; charset=utf-8"


class RedirectConfig(_Table):
    """``[routing.rules.actions.redirect]``: answer with a redirect to ``location``."""

    location: NonEmpty
    status: int = 302


class SplitTarget(_Table):
    """One ``[[routing.rules.actions.split]]`` entry: a share of the traffic."""

    target: NonEmpty
    weight: NonNegativeInt = 1


class MirrorConfig(_Table):
    """``[routing.rules.actions.mirror]``: copy requests to a shadow target."""

    target: NonEmpty
    percent: Annotated[float, Meta(ge=0, le=100)] = 100.0


class RuleActions(_Table):
    """``[routing.rules.actions]``."""

    headers: HeaderActions = msgspec.field(default_factory=HeaderActions)
    response_headers: HeaderActions = msgspec.field(default_factory=HeaderActions)
    path: PathActions = msgspec.field(default_factory=PathActions)
    custom_response: Optional[CustomResponse] = None
    redirect: Optional[RedirectConfig] = None
    split: list[SplitTarget] = msgspec.field(default_factory=list)
    mirror: Optional[MirrorConfig] = None


# ---------------------------------------------------------------- rules

class RoutingRule(_Table):
    """One ``[[routing.rules]]`` entry."""

    name: NonEmpty
    priority: int = 0
    enabled: bool = True
    target: str = ""
    plugins_request: list[str] = msgspec.field(default_factory=list)
    plugins_response: list[str] = msgspec.field(default_factory=list)
    plugins_order: Literal["as_listed", "name_asc", "name_desc"] = "as_listed"
    plugins_dedup: bool = False
    conditions: RuleConditions = msgspec.field(default_factory=RuleConditions)
    actions: RuleActions = msgspec.field(default_factory=RuleActions)


class RoutingConfig(_Table):
    """``[routing]``: rules tried in priority order; the first whose conditions hold wins."""

    enable_logging: bool = False
    default_target: str = ""
    rules: list[RoutingRule] = msgspec.field(default_factory=list)


# ================================================================ helpers shared with rules.py

# RFC 9110 §5.6.2: token = 1*tchar (header names, methods).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A template parameter: {name}, name a Python identifier (it becomes a regex group name).
_PARAM = re.compile(r"\{([^{}]*)\}")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A redirect goes to an absolute URL or a path on this host (RFC 9110 §10.2.2).
_LOCATION_START = re.compile(r"/|\{path\}|[A-Za-z][A-Za-z0-9+.-]*://")
# regex_replace replacement syntax: $$, $1, ${1}, ${name}
_DOLLAR = re.compile(r"\$(?:(\$)|([0-9]+)|\{([^{}]*)\})")


def template_names(template: str) -> list[str]:
    """The parameter names of a path template, in order (``{id}`` -> ``"id"``)."""
    return _PARAM.findall(template)


def compile_template(template: str) -> re.Pattern:
    """``"/users/{id}"`` -> a pattern that fully matches a path and captures ``id``.

    ``{name}`` matches one or more characters other than ``/``; everything else is literal.
    Raises ``ValueError`` for a malformed template (check_routing reports it).
    """
    out, pos, seen = ["^"], 0, set()
    for found in _PARAM.finditer(template):
        literal = template[pos:found.start()]
        if "{" in literal or "}" in literal:
            raise ValueError("unbalanced '{' or '}'")
        out.append(re.escape(literal))
        name = found.group(1)
        if not _IDENT.fullmatch(name):
            raise ValueError(f"parameter name {name!r} is not an identifier")
        if name in seen:
            raise ValueError(f"parameter {{{name}}} appears twice")
        seen.add(name)
        out.append(f"(?P<{name}>[^/]+)")
        pos = found.end()
    rest = template[pos:]
    if "{" in rest or "}" in rest:
        raise ValueError("unbalanced '{' or '}'")
    out.append(re.escape(rest) + r"\Z")
    return re.compile("".join(out), re.DOTALL)


def translate_replacement(replacement: str, pattern: re.Pattern) -> str:
    """``$1``/``${1}``/``${name}``/``$$`` -> Python's ``\\g<1>``/``\\g<name>``/``$`` syntax.

    Raises ``ValueError`` for a reference to a group ``pattern`` does not have.
    """
    out, pos = [], 0
    for found in _DOLLAR.finditer(replacement):
        out.append(replacement[pos:found.start()].replace("\\", "\\\\"))
        pos = found.end()
        dollar, number, name = found.groups()
        if dollar:
            out.append("$")
            continue
        ref = number if number is not None else name
        if ref.isdigit():
            if int(ref) > pattern.groups:
                raise ValueError(f"${ref} refers to group {int(ref)} but the pattern has "
                                 f"{pattern.groups} group(s)")
        elif ref not in pattern.groupindex:
            raise ValueError(f"${{{ref}}} refers to no named group of the pattern")
        out.append(f"\\g<{ref}>")
    out.append(replacement[pos:].replace("\\", "\\\\"))
    return "".join(out)


def host_pattern(pattern: str) -> tuple[str, bool] | str:
    """Validate one host pattern -> ``(key, wildcard)`` or an error message.

    ``key`` is the lowercase name (IDNA-encoded) for an exact pattern, the suffix without the
    ``*.`` for a wildcard; IP addresses are accepted, IPv6 written ``[::1]`` as in a Host.
    """
    from dispa.config.load import normalize_hostname  # load imports the model: no cycle here

    text = pattern.strip()
    wildcard = text.startswith("*.")
    if wildcard:
        text = text[2:]
    if "*" in text:
        hint = " (leave out the host condition to match every host)" \
            if pattern.strip() == "*" else ""
        return f"{pattern!r}: a wildcard is allowed only as a leading \"*.\"{hint}"
    if not wildcard:
        bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        try:
            address = ipaddress.ip_address(bare)
        except ValueError:
            pass
        else:
            return (f"[{address.compressed}]" if address.version == 6 else str(address)), False
    if ":" in text:
        return f"{pattern!r}: host patterns match the host without its port"
    name = normalize_hostname(text)
    if name is None:
        return f"{pattern!r} is not a valid host name" + (" pattern" if wildcard else "")
    return name, wildcard


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | str:
    """A client_ip entry -> network (an address is a /32 or /128), or an error message."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as exc:
        return f"{text!r} is not an IP address or CIDR network ({exc})"


def _header_name_problem(name: str) -> str | None:
    if not _TOKEN.fullmatch(name):
        return f"{name!r} is not a valid header name (RFC 9110 §5.1: token characters only)"
    return None


def _header_value_problem(value: str, what: str = "header value") -> str | None:
    # RFC 9110 §5.5: field values carry no CR, LF or NUL (or other controls but HTAB); the
    # serializer would refuse them per request, so they are refused here once.
    if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value):
        return f"{what} {value!r} contains CR, LF or another control character"
    if not all(ord(c) < 256 for c in value):
        return f"{what} {value!r} has characters outside latin-1; percent-encode them"
    return None


def _string_items(mapping: dict, path: tuple, issue: "Issue") -> list[tuple[str, str]]:
    """The (name, value) pairs of a free-form table whose values are all strings; any other
    value is reported (the loader passes free-form tables through unconverted)."""
    out = []
    for name, value in mapping.items():
        if not isinstance(value, str):
            what = "a table" if isinstance(value, dict) else \
                "an array" if isinstance(value, list) else repr(value)
            issue(f"expected a string, got {what}", path + (name,))
        else:
            out.append((name, value))
    return out


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _regex_problem(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"invalid regular expression {pattern!r}: {exc}"
    except (OverflowError, RecursionError, ValueError) as exc:  # absurd repeat counts, nesting
        return f"invalid regular expression {pattern!r}: {exc}"
    return None


# ================================================================ check_routing

Issue = Callable[[str, tuple], None]


def check_routing(routing: RoutingConfig, *, targets: set[str], plugins: set[str],
                  issue: Issue) -> None:
    """Report every problem of a built ``[routing]`` table through ``issue(message, path)``.

    ``targets`` holds the names a rule may send to (target groups and endpoint names);
    ``plugins`` the names of the configured plugin instances. ``path`` is a tuple of keys and
    list indexes in the file's spelling, starting with ``"routing"``. Returns nothing; raises
    nothing for any built table.
    """
    where = ("routing",)
    if routing.default_target and routing.default_target not in targets:
        issue(_unknown("default_target", routing.default_target, targets),
              where + ("default_target",))
    names: dict[str, int] = {}
    for n, rule in enumerate(routing.rules):
        path = where + ("rules", n)
        if rule.name in names:
            issue(f"duplicate rule name {rule.name!r} (also routing.rules[{names[rule.name]}])",
                  path + ("name",))
        else:
            names[rule.name] = n
        _check_rule(rule, path, targets, plugins, issue)


def _unknown(what: str, name: str, known: set[str]) -> str:
    if not known:
        return f"{what} {name!r} is not a known target (no targets are configured)"
    return f"{what} {name!r} is not a known target{_did_you_mean(name, known)}"


def _check_rule(rule: RoutingRule, path: tuple, targets: set[str], plugins: set[str],
                issue: Issue) -> None:
    actions = rule.actions
    a_path = path + ("actions",)
    exclusive = [key for key, value in (("custom_response", actions.custom_response),
                                        ("redirect", actions.redirect),
                                        ("split", actions.split)) if value]
    if len(exclusive) > 1:
        issue(f"{' and '.join(exclusive)} are mutually exclusive: keep one",
              a_path + (exclusive[1],))
    if rule.target and actions.split:
        issue("target and split are both set: split replaces target, remove one",
              path + ("target",))
    if not (rule.target or exclusive):
        issue("the rule sends nowhere: set target, split, custom_response or redirect",
              path + ("target",))
    if rule.target and rule.target not in targets:
        issue(_unknown("target", rule.target, targets), path + ("target",))
    for key in ("plugins_request", "plugins_response"):
        for i, name in enumerate(getattr(rule, key)):
            if name not in plugins:
                hint = _did_you_mean(name, plugins) if plugins else \
                    " (no [[plugins.plugins]] are configured)"
                issue(f"unknown plugin {name!r}{hint}", path + (key, i))
    _check_conditions(rule.conditions, path + ("conditions",), issue)
    params = _template_params(rule.conditions.path)
    _check_header_actions(actions.headers, a_path + ("headers",), issue)
    _check_header_actions(actions.response_headers, a_path + ("response_headers",), issue)
    _check_path_actions(actions.path, params, a_path + ("path",), issue)
    if actions.custom_response is not None:
        _check_custom_response(actions.custom_response, a_path + ("custom_response",), issue)
    if actions.redirect is not None:
        _check_redirect(actions.redirect, params, a_path + ("redirect",), issue)
    if actions.split:
        for i, share in enumerate(actions.split):
            if share.target not in targets:
                issue(_unknown("split target", share.target, targets),
                      a_path + ("split", i, "target"))
        if not any(share.weight for share in actions.split):
            issue("every split weight is 0: at least one must be positive",
                  a_path + ("split",))
    if actions.mirror is not None:
        if actions.mirror.target not in targets:
            issue(_unknown("mirror target", actions.mirror.target, targets),
                  a_path + ("mirror", "target"))
        if actions.custom_response is not None or actions.redirect is not None:
            issue("mirror has nothing to copy: the rule answers directly "
                  "(custom_response or redirect)", a_path + ("mirror",))


def _template_params(cond: PathCondition) -> set[str] | None:
    """The parameter names the rule captures, or None when its template is malformed."""
    names: set[str] = set()
    if cond.template is not None:
        try:
            names.update(compile_template(cond.template).groupindex)
        except ValueError:
            return None
    if cond.regex is not None and not _regex_problem(cond.regex):
        names.update(re.compile(cond.regex).groupindex)
    return names


def _check_conditions(cond: RuleConditions, path: tuple, issue: Issue) -> None:
    for i, method in enumerate(cond.method):
        if not _TOKEN.fullmatch(method):
            issue(f"{method!r} is not an HTTP method (RFC 9110 §9.1: a token)",
                  path + ("method", i))
    for i, entry in enumerate(cond.client_ip):
        network = parse_network(entry)
        if isinstance(network, str):
            issue(network, path + ("client_ip", i))
    for i, pattern in enumerate(cond.host.patterns):
        checked = host_pattern(pattern)
        if isinstance(checked, str):
            issue(checked, path + ("host", "patterns", i))
    p = cond.path
    for key in ("exact", "prefix", "template"):
        value = getattr(p, key)
        if value is not None and not value.startswith("/") and (value or key != "prefix"):
            issue(f"{key} {value!r} never matches: request paths start with \"/\"",
                  path + ("path", key))
    if p.regex is not None:
        problem = _regex_problem(p.regex)
        if problem:
            issue(problem, path + ("path", "regex"))
    if p.template is not None:
        try:
            compile_template(p.template)
        except ValueError as exc:
            issue(f"invalid template {p.template!r}: {exc}", path + ("path", "template"))
    for key, items in (("headers", cond.headers), ("query_params", cond.query_params)):
        for i, item in enumerate(items):
            where = path + (key, i)
            if key == "headers":
                problem = _header_name_problem(item.name)
                if problem:
                    issue(problem, where + ("name",))
            if item.present is False and item.value is not None:
                issue("present = false contradicts value: a missing "
                      f"{'header' if key == 'headers' else 'parameter'} has no value",
                      where + ("present",))
            if isinstance(item.value, RegexMatch):
                problem = _regex_problem(item.value.pattern)
                if problem:
                    issue(problem, where + ("value", "pattern"))


def _check_header_actions(edits: HeaderActions, path: tuple, issue: Issue) -> None:
    for key in ("set", "add"):
        for name, value in _string_items(getattr(edits, key), path + (key,), issue):
            problem = _header_name_problem(name) or _header_value_problem(value)
            if problem:
                issue(problem, path + (key, name))
    for i, name in enumerate(edits.remove):
        problem = _header_name_problem(name)
        if problem:
            issue(problem, path + ("remove", i))
    for old, new in _string_items(edits.rename, path + ("rename",), issue):
        problem = _header_name_problem(old) or _header_name_problem(new)
        if problem:
            issue(problem, path + ("rename", old))
    removed = {name.lower() for name in edits.remove}
    for key in ("set", "add"):
        for name in getattr(edits, key):
            if name.lower() in removed:
                issue(f"{name!r} is both removed and in {key}: remove drops only the "
                      "incoming field; leave it out of remove", path + (key, name))
    for old in edits.rename:
        if old.lower() in removed:
            issue(f"{old!r} is both removed and renamed", path + ("rename", old))


def _check_path_actions(actions: PathActions, params: set[str] | None, path: tuple,
                        issue: Issue) -> None:
    for key in ("replace", "prepend", "strip_prefix"):
        value = getattr(actions, key)
        if value is None:
            continue
        problem = _header_value_problem(value, key) if key != "strip_prefix" else None
        if problem is None and (" " in value or "?" in value or "#" in value):
            problem = f"{key} {value!r} may not contain spaces, '?' or '#'"
        if problem:
            issue(problem, path + (key,))
            continue
        if key in ("replace", "strip_prefix") and not value.startswith("/"):
            issue(f"{key} {value!r} must start with \"/\"", path + (key,))
        if key != "strip_prefix" and params is not None:
            for name in template_names(value):
                if name not in params:
                    issue(f"{key} uses {{{name}}}, which the rule's path template/regex does "
                          f"not capture" + _did_you_mean(name, params), path + (key,))
    rr = actions.regex_replace
    if rr is not None:
        problem = _regex_problem(rr.pattern)
        if problem:
            issue(problem, path + ("regex_replace", "pattern"))
            return
        try:
            translate_replacement(rr.replacement, re.compile(rr.pattern))
        except ValueError as exc:
            issue(f"replacement {rr.replacement!r}: {exc}",
                  path + ("regex_replace", "replacement"))


def _check_custom_response(resp: CustomResponse, path: tuple, issue: Issue) -> None:
    for name, value in _string_items(resp.headers, path + ("headers",), issue):
        problem = _header_name_problem(name) or _header_value_problem(value)
        if problem:
            issue(problem, path + ("headers", name))
    problem = _header_value_problem(resp.content_type, "content_type")
    if problem:
        issue(problem, path + ("content_type",))


def _check_redirect(redirect: RedirectConfig, params: set[str] | None, path: tuple,
                    issue: Issue) -> None:
    if redirect.status not in REDIRECT_STATUSES:
        issue(f"status {redirect.status} is not a redirect: expected one of "
              f"{', '.join(map(str, REDIRECT_STATUSES))}", path + ("status",))
    location = redirect.location
    problem = _header_value_problem(location, "location")
    if problem:
        issue(problem, path + ("location",))
        return
    if not _LOCATION_START.match(location):
        issue(f"location {location!r} must be an absolute URL (\"https://host/...\") or "
              "start with \"/\"", path + ("location",))
    known = set(LOCATION_PLACEHOLDERS) | (params or set())
    for name in template_names(location):
        if name not in known:
            issue(f"location: unknown placeholder {{{name}}}: expected {{path}}, {{query}}, "
                  "{host} or a path parameter of the rule" + _did_you_mean(name, known),
                  path + ("location",))
    stripped = _PARAM.sub("", location)
    if "{" in stripped or "}" in stripped:
        issue(f"location {location!r}: unbalanced '{{' or '}}'", path + ("location",))
