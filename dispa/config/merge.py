"""Dynamic configuration: fragments from providers merged into the file's config (STYLE C7,
step 3).

Theory of operation
-------------------
A provider (Consul KV, Kubernetes ConfigMaps; ``dispa.discovery``) contributes *fragments*:
small TOML or JSON documents, one per registry key (``web.toml``, ``api.json``; a key ending
in ``.json`` is JSON, anything else TOML). A fragment may hold only

* ``[[target_groups]]`` entries (every key of a file's target group, ``discovery`` too);
* ``[[routing.rules]]`` entries;
* ``[[plugins.plugins]]`` entries;
* ``[domains] intercept_domains`` entries (appended to the file's list; refused when the
  file's list is empty, because that means "every host" and an entry would narrow it).

Anything else (``[server]``, ``[tls]``, ``[routing] default_target``, ...) is refused: the
static part of the config stays the file's.

Names are qualified ``name@provider`` (``api`` in Consul becomes ``api@consul``) so that they
never clash with the file's or another provider's. A reference in a fragment (a rule's
``target``, ``split``/``mirror`` targets, ``plugins_request``/``plugins_response``) without
``@`` means the provider's own element and is qualified the same way; ``name@file`` means the
file's element ``name``; ``name@other`` is left as written.

:func:`merge_document` appends the fragments to the file's parsed document and returns the
*origins*: which part of the merged document came from which fragment, so that
``config.load.load_config_document`` reports an error with the fragment's name
(``consul:dispa/web.toml``), its line and the field in the fragment's spelling. The merged
document is validated as a whole (cross references, duplicate names, plugin configs...).

:class:`DynamicConfig` keeps each provider's fragments. :meth:`DynamicConfig.offer` takes a
provider's complete set; fragments that do not validate are refused one by one (their last
good version, if any, stays in force) and recorded for /admin/status; the others are kept.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any, Iterable, Optional

from dispa.errors import ConfigError, ConfigIssue

__all__ = ["ALLOWED", "DynamicConfig", "Fragment", "merge_document", "parse_fragment",
           "qualify"]

#: top-level key -> the keys allowed inside it (None: an array of tables)
ALLOWED: dict[str, Optional[tuple[str, ...]]] = {
    "target_groups": None,
    "routing": ("rules",),
    "plugins": ("plugins",),
    "domains": ("intercept_domains",),
}
#: where each list of a fragment goes in the merged document
_LISTS: tuple[tuple[str, ...], ...] = (("target_groups",), ("routing", "rules"),
                                      ("plugins", "plugins"), ("domains", "intercept_domains"))
FILE = "file"  # the provider name of the file's elements in a reference ("web@file")
MAX_FRAGMENT_BYTES = 512 * 1024


class Fragment:
    """One fragment: ``provider`` (``consul``), ``key`` (the registry key) and its text."""

    __slots__ = ("provider", "key", "text")

    def __init__(self, provider: str, key: str, text: str):
        self.provider = provider
        self.key = key
        self.text = text

    @property
    def source(self) -> str:
        """How errors name it: ``consul:dispa/web.toml``."""
        return f"{self.provider}:{self.key}"

    @property
    def fmt(self) -> str:
        return "json" if self.key.lower().endswith(".json") else "toml"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fragment) and (self.provider, self.key, self.text) == (
            other.provider, other.key, other.text)

    def __hash__(self) -> int:
        return hash((self.provider, self.key, self.text))

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Fragment({self.source!r}, {len(self.text)} chars)"


# ====================================================================== parse + check

def parse_fragment(fragment: Fragment) -> tuple[dict, dict]:
    """``(document, line locator)`` of a fragment whose top-level keys are allowed;
    raises :class:`ConfigError` (source, line, field) otherwise."""
    from dispa.config.load import _parse_toml  # the file's parser: same errors and lines

    src = fragment.source
    if len(fragment.text) > MAX_FRAGMENT_BYTES:
        raise ConfigError([ConfigIssue(f"fragment larger than {MAX_FRAGMENT_BYTES} bytes",
                                       file=src)])
    if fragment.fmt == "json":
        try:
            data = json.loads(fragment.text)
        except (ValueError, RecursionError) as exc:
            line = getattr(exc, "lineno", None)
            msg = getattr(exc, "msg", None) or str(exc)
            raise ConfigError([ConfigIssue(f"JSON syntax error: {msg}", file=src,
                                           line=line)]) from None
        lines = _json_lines(fragment.text, data)
    else:
        data, lines = _parse_toml(fragment.text, src)
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue("a fragment is a table at the top level", file=src)])
    issues = []

    def issue(message: str, path: tuple) -> None:
        from dispa.config.load import format_path
        at = path
        line = lines.get(at)
        while line is None and at:
            at = at[:-1]
            line = lines.get(at)
        issues.append(ConfigIssue(message, file=src, line=line,
                                  path=format_path(path) or None))

    for key, value in data.items():
        if key not in ALLOWED:
            issue(f"{key!r} cannot come from dynamic configuration; a fragment may hold "
                  f"{_allowed_text()}", (key,))
            continue
        inner = ALLOWED[key]
        if inner is None:
            if not isinstance(value, list):
                issue("expected an array of tables ([[target_groups]])", (key,))
            continue
        if not isinstance(value, dict):
            issue(f"expected a table, got {type(value).__name__}", (key,))
            continue
        for sub, item in value.items():
            if sub not in inner:
                issue(f"{key}.{sub} cannot come from dynamic configuration; a fragment may "
                      f"hold {_allowed_text()}", (key, sub))
            elif not isinstance(item, list):
                issue("expected an array", (key, sub))
    if issues:
        raise ConfigError(issues)
    return data, lines


def _allowed_text() -> str:
    return ("[[target_groups]], [[routing.rules]], [[plugins.plugins]] and "
            "[domains] intercept_domains")


def _json_lines(text: str, data: Any) -> dict:
    """A best-effort locator for JSON: the line of each ``"key":`` met in document order
    (enough to point at an item of a fragment; a missed path falls back to its parent)."""
    lines: dict = {}

    def walk(value: Any, path: tuple, pos: int) -> int:
        if isinstance(value, dict):
            for k, v in value.items():
                found = text.find(json.dumps(k), pos)
                if found >= 0:
                    pos = found
                    lines[path + (k,)] = text.count("\n", 0, found) + 1
                pos = walk(v, path + (k,), pos)
        elif isinstance(value, list):
            for n, v in enumerate(value):
                if isinstance(v, (dict, list)):
                    found = text.find("{" if isinstance(v, dict) else "[", pos + 1)
                    if found >= 0:
                        lines[path + (n,)] = text.count("\n", 0, found) + 1
                        pos = found
                pos = walk(v, path + (n,), pos)
        return pos

    try:
        walk(data, (), 0)
    except RecursionError:  # pragma: no cover - absurd nesting: no lines
        return {}
    return lines


# ====================================================================== qualification

def _ref(name: Any, provider: str) -> Any:
    if not isinstance(name, str) or not name:
        return name
    if name.endswith("@" + FILE):
        return name[:-len(FILE) - 1]
    return name if "@" in name else f"{name}@{provider}"


def qualify(data: dict, provider: str) -> dict:
    """A copy of a checked fragment with its names and references qualified (module
    docstring). Malformed items are left for the validation to report."""
    data = copy.deepcopy(data)
    for group in data.get("target_groups") or []:
        if isinstance(group, dict) and isinstance(group.get("name"), str):
            group["name"] = f"{group['name']}@{provider}"
    for plugin in (data.get("plugins") or {}).get("plugins") or []:
        if isinstance(plugin, dict) and isinstance(plugin.get("name"), str):
            plugin["name"] = f"{plugin['name']}@{provider}"
    for rule in (data.get("routing") or {}).get("rules") or []:
        if not isinstance(rule, dict):
            continue
        if isinstance(rule.get("name"), str):
            rule["name"] = f"{rule['name']}@{provider}"
        if "target" in rule:
            rule["target"] = _ref(rule["target"], provider)
        for key in ("plugins_request", "plugins_response"):
            if isinstance(rule.get(key), list):
                rule[key] = [_ref(n, provider) for n in rule[key]]
        actions = rule.get("actions")
        if not isinstance(actions, dict):
            continue
        for item in actions.get("split") or []:
            if isinstance(item, dict) and "target" in item:
                item["target"] = _ref(item["target"], provider)
        mirror = actions.get("mirror")
        if isinstance(mirror, dict) and "target" in mirror:
            mirror["target"] = _ref(mirror["target"], provider)
    return data


# ====================================================================== merge

def merge_document(base: dict, parts: Iterable[tuple[Fragment, dict, dict]],
                   ) -> tuple[dict, dict]:
    """``(merged document, origins)``: ``base`` (the file's parsed document, not changed)
    with each fragment's lists appended. ``parts`` are ``(fragment, checked document, its
    locator)``; ``origins`` maps a merged path (``("target_groups", 3)``) to ``(source,
    locator, path in the fragment)`` for ``load_config_document``."""
    merged = copy.deepcopy(base) if isinstance(base, dict) else {}
    origins: dict = {}
    for fragment, data, lines in parts:
        data = qualify(data, fragment.provider)
        for path in _LISTS:
            items = data
            for part in path:
                items = items.get(part) if isinstance(items, dict) else None
            if not isinstance(items, list) or not items:
                continue
            parent = merged
            for part in path[:-1]:
                if not isinstance(parent.get(part), dict):
                    parent[part] = {}
                parent = parent[part]
            target = parent.get(path[-1])
            if not isinstance(target, list):
                target = parent[path[-1]] = []
            if path == ("domains", "intercept_domains") and not target:
                raise ConfigError([ConfigIssue(
                    "the file's domains.intercept_domains is empty (every host is proxied); "
                    "a fragment may only add to a non-empty list", file=fragment.source,
                    line=lines.get(path) or lines.get(path[:1]), path=_fmt(path))])
            for n, item in enumerate(items):
                origins[path + (len(target),)] = (fragment.source, lines, path + (n,))
                target.append(item)
    return merged, origins


def _fmt(path: tuple) -> str:
    from dispa.config.load import format_path
    return format_path(path)


# ====================================================================== the state

class DynamicConfig:
    """The fragments in force per provider, the refused ones, and merging them into the
    file's ``LoadedConfig`` (module docstring)."""

    def __init__(self) -> None:
        self.good: dict[str, dict[str, Fragment]] = {}  # provider -> key -> in force
        self.offered: dict[str, dict[str, str]] = {}  # provider -> key -> text last offered
        self.errors: dict[str, list[dict]] = {}  # source -> issues (as_dict)
        self.updated_at: dict[str, float] = {}
        self.accepted = 0
        self.refused = 0

    def fragments(self) -> list[Fragment]:
        """The fragments in force, by provider then key (a stable merge order)."""
        return [f for p in sorted(self.good) for _, f in sorted(self.good[p].items())]

    def merge(self, base, fragments: Optional[list[Fragment]] = None):
        """The file's ``LoadedConfig`` ``base`` with ``fragments`` (default: those in force)
        merged in and validated; ``base`` itself when there are none. Raises ConfigError."""
        from dispa.config.load import load_config_document
        fragments = self.fragments() if fragments is None else fragments
        if not fragments or base.document is None:
            return base
        document, lines, substituted = base.document
        parts = [(f,) + parse_fragment(f) for f in fragments]
        merged, origins = merge_document(document, parts)
        return load_config_document(merged, lines, name=base.path, substituted=substituted,
                                    origins=origins)

    def offer(self, provider: str, texts: dict[str, str], base) -> Optional[Any]:
        """Take ``provider``'s complete fragment set (``{key: text}``). Returns the merged
        ``LoadedConfig`` when what is in force changed, None otherwise (unchanged, or every
        change refused). A fragment that does not parse or makes the merged config invalid
        is refused: its previous good version, if any, stays in force and its errors show
        in :meth:`status`."""
        texts = dict(texts)
        if self.offered.get(provider) == texts:
            return None
        self.offered[provider] = texts
        old = dict(self.good.get(provider, {}))
        candidate = {k: Fragment(provider, k, t) for k, t in texts.items()}
        for key in [s for s in self.errors if s.startswith(provider + ":")]:
            self.errors.pop(key)
        # refuse the fragments the errors name, one round per refusal, until it validates
        for _ in range(len(candidate) + 1):
            others = [f for p in sorted(self.good) if p != provider
                      for _, f in sorted(self.good[p].items())]
            mine = [f for _, f in sorted(candidate.items())]
            try:
                result = self.merge(base, others + mine)
            except ConfigError as exc:
                blamed = {i.file for i in exc.errors}
                bad = [k for k, f in candidate.items() if f.source in blamed]
                if not bad:  # not a fragment's fault (the file, another provider): refuse all
                    bad = [k for k in candidate if candidate[k] != old.get(k)]
                    for k in bad:
                        self._record(candidate[k].source, exc.errors)
                    candidate = {k: f for k, f in old.items()}
                    if not bad:
                        return None
                    continue
                for k in bad:
                    self._record(candidate[k].source,
                                 [i for i in exc.errors if i.file == candidate[k].source])
                    if k in old and old[k] != candidate[k]:
                        candidate[k] = old[k]  # the last good version stays in force
                    else:
                        candidate.pop(k)
                continue
            if candidate == old:
                return None
            self.good[provider] = candidate
            if not candidate:
                self.good.pop(provider)
            self.updated_at[provider] = time.time()
            self.accepted += 1
            return result
        return None  # pragma: no cover - each round removes at least one fragment

    def forget(self, provider: str) -> bool:
        """Drop a provider's fragments (its source was removed from the config); True when
        some were in force."""
        self.offered.pop(provider, None)
        for key in [s for s in self.errors if s.startswith(provider + ":")]:
            self.errors.pop(key)
        return self.good.pop(provider, None) is not None

    def _record(self, source: str, issues: list[ConfigIssue]) -> None:
        self.refused += 1
        self.errors[source] = [i.as_dict() for i in issues]
        import logging
        for i in issues:
            logging.getLogger("dispa.config").error("dynamic configuration refused: %s",
                                                    i.format())

    def status(self) -> dict:
        """For /admin/status ``dynamic_config``."""
        return {
            "providers": {p: {"keys": sorted(frags), "updated_at": self.updated_at.get(p)}
                          for p, frags in sorted(self.good.items())},
            "errors": dict(sorted(self.errors.items())),
            "accepted": self.accepted, "refused": self.refused,
        }

