"""The compiled RouteTable picks exactly the rule a naive linear scan picks.

The reference below is written from the documented semantics (docs/routing.md), not from
dispa/routing/rules.py: it walks the enabled rules in (priority desc, file order) and tests
every condition directly. Hypothesis draws rule sets and requests from small alphabets so
that hosts, prefixes, regexes and templates collide often, which is where an index could go
wrong (shared prefixes, wildcard buckets, joined regex alternations, case-sensitive hosts).
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import parse_qsl

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispa.config.routing_model import RoutingConfig, check_routing
from dispa.routing.rules import RouteTable

# ---------------------------------------------------------------- the reference


def _ref_host(raw: str) -> str:
    host = raw.strip()
    if host.startswith("["):
        host = host[: host.find("]") + 1]
    elif ":" in host:
        host = host[: host.rfind(":")]
    return host[:-1] if host.endswith(".") else host


def _ref_template(template: str) -> re.Pattern:
    out = "^"
    for i, part in enumerate(re.split(r"\{([^{}]*)\}", template)):
        out += f"(?P<{part}>[^/]+)" if i % 2 else re.escape(part)
    return re.compile(out + r"\Z")


def _ref_value(spec: dict | None, value: str) -> bool:
    if spec is None:
        return True
    kind = spec.get("type", "exact")
    if kind == "regex":
        return re.search(spec["pattern"], value) is not None
    arg = spec["value"]
    return {"exact": value == arg, "contains": arg in value, "prefix": value.startswith(arg),
            "suffix": value.endswith(arg)}[kind]


def _ref_ip_in(ip: str, networks: list[str]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in ipaddress.ip_network(n, strict=False) for n in networks)


def reference_match(rules: list[dict], method: bytes, host: str, path: str, query: str,
                    headers: list[tuple[bytes, bytes]], client_ip: str):
    ordered = sorted((r for r in rules if r.get("enabled", True)),
                     key=lambda r: -r.get("priority", 0))
    for rule in ordered:
        c = rule.get("conditions", {})
        if c.get("method") and method.decode("latin-1") not in [m.upper() for m in c["method"]]:
            continue
        host_c = c.get("host", {})
        patterns = host_c.get("patterns", [])
        if patterns:
            cased = _ref_host(host)
            lower = cased.lower()
            ok = False
            for p in patterns:
                if host_c.get("case_sensitive"):
                    h, p2 = cased, p
                else:
                    h, p2 = lower, p.lower()
                if p2.startswith("*."):
                    ok |= h.endswith(p2[1:]) and len(h) > len(p2) - 1
                else:
                    ok |= h == p2
            if not ok:
                continue
        pc = c.get("path", {})
        if "exact" in pc and path != pc["exact"]:
            continue
        if "prefix" in pc and not path.startswith(pc["prefix"]):
            continue
        if "suffix" in pc and not path.endswith(pc["suffix"]):
            continue
        if "contains" in pc and pc["contains"] not in path:
            continue
        params: dict[str, str] = {}
        if "regex" in pc:
            found = re.search(pc["regex"], path)
            if not found:
                continue
            params.update({k: v for k, v in found.groupdict().items() if v is not None})
        if "template" in pc:
            found = _ref_template(pc["template"]).match(path)
            if not found:
                continue
            params.update(found.groupdict())
        if c.get("client_ip") and not _ref_ip_in(client_ip, c["client_ip"]):
            continue
        ok = True
        for h in c.get("headers", []):
            values = [v.decode("latin-1") for k, v in headers
                      if k.decode("latin-1").lower() == h["name"].lower()]
            if h.get("present") is False:
                ok &= not values
            else:
                ok &= bool(values) and any(_ref_value(h.get("value"), v) for v in values)
        pairs = parse_qsl(query, keep_blank_values=True)
        for q in c.get("query_params", []):
            values = [v for k, v in pairs if k == q["name"]]
            if q.get("present") is False:
                ok &= not values
            else:
                ok &= bool(values) and any(_ref_value(q.get("value"), v) for v in values)
        if ok:
            return rule["name"], params
    return None


# ---------------------------------------------------------------- strategies

HOST_PATTERNS = ["a.com", "b.a.com", "*.a.com", "*.b.a.com", "c.org", "*.org", "A.com",
                 "*.A.com", "127.0.0.1"]
HOSTS = ["a.com", "A.com", "b.a.com", "x.b.a.com", "B.A.COM.", "c.org", "x.c.org",
         "a.com:8080", "", "z.net", "com", "127.0.0.1:80", "x.A.com"]
EXACT = ["/", "/a", "/a/b", "/ab", "/a/1"]
PREFIXES = ["", "/", "/a", "/a/", "/ab", "/b", "/a/b/", "//", "//a"]
REGEXES = ["^/a", "^/a/(?P<x>[^/]+)", "b$", "^/a/?b", "[0-9]+", "^/(a|b)/", "(?i)^/A",
           "^/a|^/b", r"^/(\w)/\1", "^/v[0-9]+/", "^/ab", "^/a/1", "x", r"\.json$",
           "^/a/b", "^/[ab]", "(?P<n>[0-9])", "^(?!/a)", "^/a(?P<o>/b)?", "ab", "a/?b",
           "(?<=/)b", r"\bb"]
TEMPLATES = ["/a/{x}", "/{x}/b", "/a/{x}.json", "/{x}", "/a/{x}/{y}"]
PATH_CHOICES = {"exact": EXACT, "prefix": PREFIXES, "suffix": ["b", ".json", "1"],
                "contains": ["a", "/b"], "regex": REGEXES, "template": TEMPLATES}
NETWORKS = ["10.0.0.0/8", "127.0.0.1", "::1", "192.168.0.0/16"]
VALUES = st.one_of(
    st.builds(lambda t, v: {"type": t, "value": v},
              st.sampled_from(["exact", "contains", "prefix", "suffix"]),
              st.sampled_from(["1", "2", "canary", "", "a"])),
    st.builds(lambda p: {"type": "regex", "pattern": p}, st.sampled_from(["^c", "[0-9]", "y$"])),
)


def _opt(strategy):
    return st.one_of(st.none(), strategy)


@st.composite
def rules(draw):
    out = []
    for n in range(draw(st.integers(0, 24))):
        # mostly one path condition, sometimes two (AND) or none (a catch-all)
        keys = draw(st.lists(st.sampled_from(
            ["regex", "regex", "prefix", "prefix", "template", "template", "exact", "suffix",
             "contains"]), min_size=0 if draw(st.integers(0, 9)) == 0 else 1, max_size=2))
        path = {key: draw(st.sampled_from(PATH_CHOICES[key])) for key in keys}
        cond: dict = {"path": path}
        if draw(st.integers(0, 3)) == 0:
            cond["host"] = {"patterns": draw(st.lists(st.sampled_from(HOST_PATTERNS),
                                                      min_size=1, max_size=3)),
                            "case_sensitive": draw(st.booleans())}
        if draw(st.integers(0, 4)) == 0:
            cond["method"] = draw(st.lists(st.sampled_from(["GET", "POST", "get"]), min_size=1,
                                           max_size=2))
        if draw(st.integers(0, 6)) == 0:
            cond["client_ip"] = draw(st.lists(st.sampled_from(NETWORKS), min_size=1, max_size=2))
        for key, names in (("headers", ["x-env", "X-Env", "accept"]),
                           ("query_params", ["v", "q"])):
            if draw(st.integers(0, 5)) == 0:
                items = []
                for _ in range(draw(st.integers(1, 2))):
                    item = {"name": draw(st.sampled_from(names))}
                    present = draw(st.sampled_from([None, True, False]))
                    if present is not None:
                        item["present"] = present
                    if present is not False:
                        value = draw(_opt(VALUES))
                        if value is not None:
                            item["value"] = value
                    items.append(item)
                cond[key] = items
        out.append({"name": f"r{n}", "priority": draw(st.integers(0, 2)),
                    "enabled": draw(st.integers(0, 7)) > 0, "target": "t", "conditions": cond})
    return out


SEGMENTS = st.sampled_from(["a", "b", "ab", "1", "A", "x.json", "v2", "a1", ""])
PATHS = st.one_of(st.sampled_from(EXACT + ["/a/b/", "/v1/x", "/A/b", "/a/a", "/a/x.json",
                                           "/ab/b", "/a/1/b", "/b/1", "/v2/"]),
                  st.lists(SEGMENTS, min_size=1, max_size=4).map(lambda s: "/" + "/".join(s)))
HEADERS = st.lists(st.tuples(st.sampled_from([b"x-env", b"X-ENV", b"Accept", b"host"]),
                             st.sampled_from([b"canary", b"1", b"2", b"", b"cy", b"a"])),
                   max_size=3)
QUERIES = st.sampled_from(["", "v=1", "v=2&q=", "q", "v=1&v=2", "v=%32", "q=canary", "v=a+1"])
IPS = st.sampled_from(["10.1.2.3", "127.0.0.1", "::1", "::ffff:10.0.0.1", "192.168.1.1",
                       "bogus", "", "8.8.8.8"])


def _table(raw_rules: list[dict]) -> RouteTable:
    config = msgspec.convert({"rules": raw_rules}, RoutingConfig)
    problems = []
    check_routing(config, targets={"t"}, plugins=set(),
                  issue=lambda msg, path: problems.append((msg, path)))
    assert not problems, problems
    return RouteTable.build(config)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules(), st.lists(st.tuples(st.sampled_from([b"GET", b"POST", b"get"]),
                                   st.sampled_from(HOSTS), PATHS, QUERIES, HEADERS, IPS),
                         min_size=1, max_size=12))
def test_the_compiled_table_agrees_with_a_linear_scan(raw_rules, requests):
    table = _table(raw_rules)
    for method, host, path, query, headers, ip in requests:
        got = table.match(method, host, path, query, headers, ip)
        want = reference_match(raw_rules, method, host, path, query, headers, ip)
        assert (None if got is None else (got.route.name, got.params)) == want, \
            (method, host, path, query, headers, ip)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(REGEXES), min_size=2, max_size=30), PATHS)
def test_many_pure_regex_rules_joined_pick_the_first_in_priority_order(regexes, path):
    raw = [{"name": f"r{n}", "target": "t", "priority": n % 3,
            "conditions": {"path": {"regex": r}}} for n, r in enumerate(regexes)]
    got = _table(raw).match(b"GET", "a.com", path, "", [], "")
    want = reference_match(raw, b"GET", "a.com", path, "", [], "")
    assert (None if got is None else (got.route.name, got.params)) == want


def test_a_joined_search_still_finds_a_better_rule_that_starts_inside_a_worse_match():
    # "a" (order 1) matches at 0 first; "ab" (order 0) only at 1, inside that match
    raw = [{"name": "ab", "target": "t", "conditions": {"path": {"regex": "ab"}}},
           {"name": "a", "target": "t", "conditions": {"path": {"regex": "a"}}},
           {"name": "c", "target": "t", "conditions": {"path": {"regex": "c"}}}]
    assert _table(raw).match(b"GET", "h", "/aab", "", [], "").route.name == "ab"
