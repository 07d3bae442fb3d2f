"""Read a configuration file, validate it, and compile it: file -> LoadedConfig.

Theory of operation
-------------------
``load_config`` runs five stages and collects problems in one list as it goes, so that an
operator sees every mistake at once:

1. **read** the file (``.toml``, or ``.yaml``/``.yml`` by extension);
2. **parse** it with tomllib / PyYAML, and build a *locator*: field path -> line number
   (TOML: a small scanner of ``[table]``/``[[array]]`` headers, ``key =`` lines and array
   items; YAML: PyYAML node marks, exact);
3. **substitute** ``${NAME}`` / ``${NAME:-default}`` in string values (``$${`` is a literal
   ``${``); a value that came from a substitution may then fill an int/float/bool field;
4. **build** the model (``config.model``) table by table and list item by list item; each
   leaf is converted with msgspec against its annotated type, so ``Meta`` constraints apply;
5. **check** cross-field rules on the tables that built cleanly (duplicate endpoints,
   health-check timeout > interval, addresses, host names, ...), then **compile**.

Rules:

1. Only :class:`~dispa.errors.ConfigError` leaves this module for a bad file, whatever the
   bytes (tests/unit/config/test_fuzz.py and tests/fuzz/fuzz_config.py hold us to it).
2. Every issue names the file, the line when it can be found, and the field path in the
   file's own spelling (``targets.targets[2].url``).
3. Stage 5 runs only on tables that built without error, so one mistake is not reported
   twice in two wordings.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import tomllib
import typing
import urllib.parse
from collections.abc import Mapping
from typing import Any, Literal, Union

import msgspec
import yaml

from dispa.config import model as m
from dispa.config.snapshot import Snapshot, StaticSpec
from dispa.errors import ConfigError, ConfigIssue

Path = tuple  # of str (keys) and int (list indices)

# Deeper nesting than this is refused: no valid file comes near it, and a YAML alias cycle
# (`&a [*a]`) would otherwise recurse forever.
MAX_DEPTH = 32

YAML_SUFFIXES = (".yaml", ".yml")


def format_path(path: Path) -> str:
    """``("targets", "targets", 2, "url")`` -> ``"targets.targets[2].url"``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


# ============================================================== the result

@dataclasses.dataclass(frozen=True)
class LoadedConfig:
    """A validated, compiled configuration.

    ``static`` needs new workers to change, ``snapshot`` is swapped into running workers;
    ``model`` is the file as validated (``config.model.Config``).
    """

    path: str
    static: StaticSpec
    snapshot: Snapshot
    model: m.Config
    log_level: str
    log_format: str
    # (parsed document, line locator, substituted paths) of the file: dynamic configuration
    # fragments are validated merged into it without re-reading the file (config/merge.py)
    document: tuple | None = dataclasses.field(default=None, compare=False, repr=False)

    def as_dict(self) -> dict:
        """The effective configuration (defaults filled in, file spelling) for /admin/config.

        Secrets are masked: the password of ``logging.database.url``, the Consul token,
        the etcd password and ``logging.sanitization.hash_key`` become ``***``.
        The worker count is the one in use (``--workers`` wins over the file).
        """
        data = msgspec.to_builtins(self.model)
        data["logging"]["database"]["url"] = mask_url_password(data["logging"]["database"]["url"])
        if data["logging"]["sanitization"]["hash_key"]:  # the redaction hash key
            data["logging"]["sanitization"]["hash_key"] = "***"
        discovery = data.get("service_discovery")
        if discovery:  # registry credentials (docs/discovery.md)
            for table, key in (("consul", "token"), ("etcd", "password")):
                if discovery[table][key]:
                    discovery[table][key] = "***"
        acme = (data.get("tls") or {}).get("acme")
        if acme:  # [tls.acme]: etcd password, TSIG secret, EAB key, webhook headers
            from dispa.tls.acme_config import mask_secrets
            mask_secrets(acme)
        tracing = (data.get("observability") or {}).get("tracing") or {}
        for name in tracing.get("headers") or {}:  # exporter credentials (docs/tracing.md)
            tracing["headers"][name] = "***"
        if self.static.workers:
            data["server"]["workers"] = self.static.workers
        return data


def mask_url_password(url: str) -> str:
    """``postgresql://u:secret@h/db`` -> ``postgresql://u:***@h/db``; others unchanged."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))


# ============================================================== public API

def load_config(path: str | os.PathLike, *, env: Mapping[str, str] | None = None,
                workers_override: int | None = None) -> LoadedConfig:
    """Load, validate and compile the configuration file at ``path``.

    The format follows the extension: ``.yaml``/``.yml`` is YAML, anything else TOML.
    ``env`` replaces ``os.environ`` for ``${NAME}`` substitution; ``workers_override`` (the
    CLI's ``--workers``; 0 means one per CPU) wins over ``server.workers``.

    Returns a :class:`LoadedConfig`.
    Raises :class:`ConfigError` listing every problem found: unreadable file, syntax error,
    unknown key, bad value, cross-field conflict. No other exception escapes for a bad file.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError([ConfigIssue(f"cannot read the file: {exc.strerror or exc}",
                                       file=name)]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigIssue(f"the file is not UTF-8 ({exc.reason} at byte "
                                       f"{exc.start})", file=name)]) from None
    fmt = "yaml" if name.lower().endswith(YAML_SUFFIXES) else "toml"
    return load_config_text(text, fmt=fmt, name=name, env=env, workers_override=workers_override)


def load_config_text(text: str, *, fmt: Literal["toml", "yaml"], name: str = "<string>",
                     env: Mapping[str, str] | None = None,
                     workers_override: int | None = None) -> LoadedConfig:
    """Like :func:`load_config` for a configuration held in a string (tests, admin API).

    Returns a :class:`LoadedConfig`; raises :class:`ConfigError` with every problem.
    """
    if fmt == "toml":
        data, lines = _parse_toml(text, name)
    elif fmt == "yaml":
        data, lines = _parse_yaml(text, name)
    else:
        raise ConfigError([ConfigIssue(f"unknown configuration format {fmt!r}", file=name)])
    if workers_override is not None and (
            isinstance(workers_override, bool) or not isinstance(workers_override, int)
            or workers_override < 0):
        raise ConfigError([ConfigIssue(f"--workers must be an integer >= 0, got "
                                       f"{workers_override!r}", path="server.workers")])
    ctx = _Context(name, lines)
    data = _substitute(data, os.environ if env is None else env, ctx)
    return _load_document(ctx, data, workers_override)


def load_config_document(document: Any, lines: dict, *, name: str,
                         substituted: frozenset = frozenset(),
                         origins: Mapping[Path, tuple[str, dict, Path]] | None = None,
                         workers_override: int | None = None) -> LoadedConfig:
    """Validate and compile an already parsed (and substituted) document: a file's
    ``LoadedConfig.document`` with dynamic fragments merged in (``config.merge``).

    ``origins`` maps a path prefix of ``document`` to ``(source name, that source's line
    locator, the prefix's path in that source)``: an issue under such a prefix names the
    source, its line and the field in its own spelling instead of the file's. Raises
    :class:`ConfigError` with every problem."""
    ctx = _Context(name, lines)
    ctx.substituted = set(substituted)
    ctx.origins = dict(origins or {})
    return _load_document(ctx, document, workers_override)


def _load_document(ctx: "_Context", data: Any, workers_override: int | None) -> LoadedConfig:
    from dispa.config.compile import compile_config  # compile imports this module's helpers

    ctx.raw = data
    config = ctx.build(data, m.Config, ())
    _check(ctx)
    ctx.raise_if_any()
    static, snapshot = compile_config(config, workers_override=workers_override)
    return LoadedConfig(path=ctx.name, static=static, snapshot=snapshot, model=config,
                        log_level=config.logging.level, log_format=config.logging.format,
                        document=(data, ctx.lines, frozenset(ctx.substituted)))


def check_file(path: str | os.PathLike) -> list[ConfigIssue]:
    """Every problem of the file at ``path``; ``[]`` when it loads. Never raises for a bad file."""
    try:
        load_config(path)
    except ConfigError as exc:
        return list(exc.errors)
    return []


# ============================================================== parsing + locators

_TOML_LINE = re.compile(r"\(at line (\d+), column (\d+)\)")


def _parse_toml(text: str, name: str) -> tuple[dict, dict]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        found = _TOML_LINE.search(msg)
        line = int(found.group(1)) if found else None
        if line is None and "end of document" in msg:
            line = text.count("\n") + 1
        msg = _TOML_LINE.sub("", msg).strip()
        raise ConfigError([ConfigIssue(f"TOML syntax error: {msg}", file=name,
                                       line=line)]) from None
    except (RecursionError, ValueError, TypeError) as exc:  # pragma: no cover - defensive
        raise ConfigError([ConfigIssue(f"TOML syntax error: {exc}", file=name)]) from None
    try:
        lines = toml_locator(text)
    except Exception:  # pragma: no cover - the locator is best effort, never fatal
        lines = {}
    return data, lines


def _parse_yaml(text: str, name: str) -> tuple[Any, dict]:
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # the reader rejects control characters already here
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue(f"YAML syntax error: {problem}", file=name,
                                       line=line)]) from None
    except (RecursionError, ValueError, TypeError, OverflowError) as exc:
        # PyYAML's constructors let a few of these through (e.g. a timestamp out of range).
        raise ConfigError([ConfigIssue(f"YAML error: {exc}", file=name)]) from None
    finally:
        if loader is not None:
            loader.dispose()
    lines: dict = {}
    if node is not None:
        _yaml_lines(node, (), lines, 0)
    return data, lines


def _yaml_lines(node: yaml.Node, path: Path, lines: dict, depth: int) -> None:
    if depth > MAX_DEPTH:
        return
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                sub = path + (key.value,)
                lines.setdefault(sub, key.start_mark.line + 1)
                _yaml_lines(value, sub, lines, depth + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _yaml_lines(item, path + (i,), lines, depth + 1)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_keys(s: str, pos: int) -> tuple[list[str], int]:
    """Parse a (dotted) TOML key starting at ``pos``; returns the parts and the end offset."""
    parts: list[str] = []
    n = len(s)
    while True:
        while pos < n and s[pos] in " \t":
            pos += 1
        if pos < n and s[pos] in "\"'":
            quote = s[pos]
            end = pos + 1
            while end < n and s[end] != quote:
                end += 2 if (quote == '"' and s[end] == "\\") else 1
            parts.append(s[pos + 1:end])
            pos = end + 1
        else:
            found = _BARE_KEY.match(s, pos)
            if not found:
                return parts, pos
            parts.append(found.group())
            pos = found.end()
        while pos < n and s[pos] in " \t":
            pos += 1
        if pos < n and s[pos] == ".":
            pos += 1
            continue
        return parts, pos


def toml_locator(text: str) -> dict:
    """Map field paths to 1-based line numbers by scanning TOML source.

    Tracks ``[table]`` and ``[[array]]`` headers (with element indices), ``key =`` lines
    (dotted keys too), the items of multi-line arrays, and skips multi-line strings. Good
    enough for the original format; a path it misses falls back to its parent's line.
    """
    lines: dict = {}
    arrays: dict = {}  # resolved array-of-tables path -> index of its last element
    current: Path = ()
    src = text.splitlines()
    i = 0
    while i < len(src):
        raw = src[i]
        lineno = i + 1
        s = raw.strip()
        i += 1
        if not s or s.startswith("#"):
            continue
        if s.startswith("[["):
            keys, _ = _toml_keys(s, 2)
            current = _resolve(keys, arrays, new_element=True)
            lines.setdefault(current[:-1], lineno)
            lines[current] = lineno
            continue
        if s.startswith("["):
            keys, _ = _toml_keys(s, 1)
            current = _resolve(keys, arrays, new_element=False)
            lines.setdefault(current, lineno)
            continue
        keys, pos = _toml_keys(s, 0)
        if not keys or pos >= len(s) or s[pos] != "=":
            continue
        path = current + tuple(keys)
        lines[path] = lineno
        i = _scan_value(src, i - 1, raw.index("=") + 1, path, lines)
    return lines


def _resolve(keys: list[str], arrays: dict, *, new_element: bool) -> Path:
    out: list = []
    for n, key in enumerate(keys):
        out.append(key)
        last = n == len(keys) - 1
        if last and new_element:
            index = arrays.get(tuple(out), -1) + 1
            arrays[tuple(out)] = index
            out.append(index)
        elif tuple(out) in arrays:
            out.append(arrays[tuple(out)])
    return tuple(out)


def _scan_value(src: list[str], row: int, col: int, path: Path, lines: dict) -> int:
    """Scan a value that may span lines; record the line of each item of a top array.

    Returns the index of the first line after the value.
    """
    depth = 0
    item = -1
    expect_item = False
    top_is_array = False
    while row < len(src):
        s = src[row]
        j = col
        while j < len(s):
            c = s[j]
            if c == "#":
                break
            if c in "\"'":
                if expect_item:
                    item += 1
                    lines[path + (item,)] = row + 1
                    expect_item = False
                triple = s.startswith(c * 3, j)
                if triple:
                    end = s.find(c * 3, j + 3)
                    while end < 0:  # multi-line string: find the closing quotes
                        row += 1
                        if row >= len(src):
                            return row
                        s, j = src[row], 0
                        end = s.find(c * 3)
                    j = end + 3
                    continue
                j += 1
                while j < len(s) and s[j] != c:
                    j += 2 if (c == '"' and s[j] == "\\") else 1
                j += 1
                continue
            if c in " \t":
                j += 1
                continue
            if c in "[{":
                if depth == 1 and top_is_array and expect_item:
                    item += 1
                    lines[path + (item,)] = row + 1
                    expect_item = False
                if depth == 0 and c == "[":
                    top_is_array = True
                    expect_item = True
                depth += 1
            elif c in "]}":
                depth -= 1
                expect_item = False
            elif c == ",":
                if depth == 1 and top_is_array:
                    expect_item = True
            elif depth == 1 and top_is_array and expect_item:
                item += 1
                lines[path + (item,)] = row + 1
                expect_item = False
            j += 1
        row += 1
        col = 0
        if depth <= 0:
            return row
    return row


# ============================================================== substitution

_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


def _substitute(data: Any, env: Mapping[str, str], ctx: "_Context") -> Any:
    """Replace ``${NAME}``/``${NAME:-default}`` in every string value; ``$${`` -> ``${``."""

    def walk(value: Any, path: Path, depth: int) -> Any:
        if depth > MAX_DEPTH:
            ctx.issue("nesting too deep", path)
            return None
        if isinstance(value, dict):
            return {k: walk(v, path + (k,), depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, path + (n,), depth + 1) for n, v in enumerate(value)]
        if isinstance(value, str) and "${" in value:
            return sub(value, path)
        return value

    def sub(value: str, path: Path) -> str:
        problems: list[str] = []

        def one(found: re.Match) -> str:
            text = found.group(0)
            if text == "$${":
                return "${"
            if found.group(1) is None:
                problems.append("malformed variable reference: expected ${NAME} or "
                                "${NAME:-default} (write $${ for a literal ${)")
                return text
            name, default = found.group(1), found.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(f"environment variable {name!r} is not set "
                            f"(give a default with ${{{name}:-value}})")
            return text

        result = _VAR.sub(one, value)
        for problem in problems:
            ctx.issue(problem, path)
        if problems:
            ctx.bad_substitution.add(path)
        ctx.substituted.add(path)
        return result

    return walk(data, (), 0)


# ============================================================== building the model

def _unwrap(tp: Any) -> Any:
    """Strip ``Annotated`` to get at the structural type."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _tagged_members(tp: Any) -> list | None:
    tp = _unwrap(tp)
    if typing.get_origin(tp) is Union:
        members = typing.get_args(tp)
        if all(_is_struct(t) and t.__struct_config__.tag_field for t in members):
            return list(members)
    return None


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _did_you_mean(word: str, choices: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest choice, or ``""``.

    Also matches a word of a snake_case choice (``stiky`` -> ``sticky_sessions``).
    """
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not close:
        parts = {part: choice for choice in choices for part in choice.split("_")
                 if len(part) >= 4}
        found = difflib.get_close_matches(word, list(parts), n=1, cutoff=0.75)
        close = [parts[found[0]]] if found else []
    return f"; did you mean {close[0]!r}?" if close else ""


_AT = re.compile(r" - at `\$(.*)`$")
_GOT = re.compile(r", got `[^`]*`")


class _Context:
    """Collects issues while building; knows the file name and the line locator."""

    def __init__(self, name: str, lines: dict):
        self.name = name
        self.lines = lines
        self.issues: list[ConfigIssue] = []
        self.substituted: set = set()  # paths whose string came from ${...}
        self.bad_substitution: set = set()  # paths already reported by _substitute
        self.built: dict = {}  # path -> Struct, for every table that built cleanly
        self.raw: Any = None  # the parsed (and substituted) document
        # path prefix -> (source, its locator, path there): parts from dynamic fragments
        self.origins: dict = {}

    def raw_at(self, path: Path) -> Any:
        """The parsed value at ``path``, or None."""
        value = self.raw
        for part in path:
            if isinstance(part, int) and isinstance(value, list) and part < len(value):
                value = value[part]
            elif isinstance(part, str) and isinstance(value, dict):
                value = value.get(part)
            else:
                return None
        return value

    def line_of(self, path: Path) -> int | None:
        while True:
            line = self.lines.get(path)
            if line is not None or not path:
                return line
            path = path[:-1]

    def issue(self, message: str, path: Path, *, line_path: Path | None = None) -> None:
        for n in range(len(path), 0, -1) if self.origins else ():
            origin = self.origins.get(path[:n])
            if origin is not None:  # a dynamic fragment's: its name, line and spelling
                source, lines, at = origin
                where = at + path[n:]
                at_line = line_path if line_path is not None else path
                line_at = at + at_line[n:] if at_line[:n] == path[:n] else at
                line = lines.get(line_at)
                while line is None and line_at:  # a missed path: its parent's line
                    line_at = line_at[:-1]
                    line = lines.get(line_at)
                self.issues.append(ConfigIssue(message, file=source, line=line,
                                               path=format_path(where) or None))
                return
        self.issues.append(ConfigIssue(
            message, file=self.name, line=self.line_of(path if line_path is None else line_path),
            path=format_path(path) or None))

    def raise_if_any(self) -> None:
        if self.issues:
            raise ConfigError(self.issues)

    # -- the builder: returns the converted value, or None after recording issues

    def build(self, value: Any, tp: Any, path: Path, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            self.issue("nesting too deep", path)
            return None
        base = _unwrap(tp)
        if typing.get_origin(base) is Union and type(None) in typing.get_args(base):
            # Optional[...]: a present value is built as the non-None part
            rest = tuple(a for a in typing.get_args(base) if a is not type(None))
            if value is not None and (len(rest) > 1 or _is_struct(_unwrap(rest[0]))
                                      or _tagged_members(rest[0]) is not None):
                return self.build(value, Union[rest] if len(rest) > 1 else rest[0], path,
                                  depth)
        if _is_struct(base):
            return self._build_struct(value, base, path, depth)
        members = _tagged_members(tp)
        if members is not None:
            return self._build_tagged(value, members, path, depth)
        origin = typing.get_origin(base)
        if base is dict or origin is dict:
            # free-form tables (a plugin's `config`): checked later against their own schema
            if not isinstance(value, dict):
                self.issue(f"expected a table, got {_describe(value)}", path)
                return None
            return value
        if origin in (list, tuple):
            item_tp = typing.get_args(base)[0]
            if not isinstance(value, list):
                self.issue(f"expected an array, got {_describe(value)}", path)
                return None
            items = [self.build(v, item_tp, path + (n,), depth + 1) for n, v in enumerate(value)]
            if any(v is None for v in items):
                return None
            return origin(items)
        return self._build_leaf(value, tp, path)

    def _build_struct(self, value: Any, cls: type, path: Path, depth: int,
                      skip: str | None = None) -> Any:
        if not isinstance(value, dict):
            what = "a table" if path else "a table at the top level"
            self.issue(f"expected {what}, got {_describe(value)}", path)
            return None
        fields = {f.encode_name: f for f in msgspec.structs.fields(cls)}
        ok = True
        for key in value:
            if key == skip:
                continue
            if not isinstance(key, str):
                self.issue(f"keys must be strings, got {_describe(key)}", path)
                ok = False
            elif key not in fields:
                self.issue(f"unknown key {key!r}{_did_you_mean(key, list(fields))}",
                           path + (key,))
                ok = False
        kwargs = {}
        for key, field in fields.items():
            if key in value:
                built = self.build(value[key], field.type, path + (key,), depth + 1)
                if built is not None:
                    built = self._field_check(cls, key, built, path + (key,))
                if built is None:
                    ok = False
                else:
                    kwargs[field.name] = built
            elif field.required:
                self.issue(f"missing required key {key!r}", path + (key,), line_path=path)
                ok = False
            elif _is_struct(_unwrap(field.type)):
                # Build absent tables from {} so no two configs share a default instance.
                kwargs[field.name] = self._build_struct({}, _unwrap(field.type),
                                                        path + (key,), depth + 1)
        if not ok:
            return None
        try:
            built = cls(**kwargs)
        except (TypeError, ValueError) as exc:  # pragma: no cover - model/builder mismatch
            self.issue(str(exc), path)
            return None
        self.built[path] = built
        return built

    def _field_check(self, cls: type, key: str, value: Any, path: Path) -> Any:
        """Run FIELD_CHECKS for one built value (each item for a list); None on failure."""
        check = FIELD_CHECKS.get((cls, key))
        if check is None:
            return value
        ok = True
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for n, item in items:
            problem = check(item)
            if problem:
                self.issue(problem, path if n is None else path + (n,))
                ok = False
        return value if ok else None

    def _build_tagged(self, value: Any, members: list, path: Path, depth: int) -> Any:
        if not isinstance(value, dict):
            self.issue(f"expected a table, got {_describe(value)}", path)
            return None
        tag_field = members[0].__struct_config__.tag_field
        by_tag = {t.__struct_config__.tag: t for t in members}
        tag = value.get(tag_field, members[0].__struct_config__.tag)
        if not isinstance(tag, str) or tag not in by_tag:
            choices = ", ".join(by_tag)
            hint = _did_you_mean(tag, list(by_tag)) if isinstance(tag, str) else ""
            self.issue(f"unknown {tag_field} {_describe(tag)}: expected one of {choices}{hint}",
                       path + (tag_field,))
            return None
        return self._build_struct(value, by_tag[tag], path, depth, skip=tag_field)

    def _build_leaf(self, value: Any, tp: Any, path: Path) -> Any:
        if isinstance(value, (dict, list)):
            self.issue(f"expected {_type_name(tp)}, got {_describe(value)}", path)
            return None
        if path in self.bad_substitution:
            return None  # already reported: the variable is not set
        base = _unwrap(tp)
        if typing.get_origin(base) is Literal:
            choices = typing.get_args(base)
            if value in choices and type(value) is type(choices[0]):
                return value
            names = [c for c in choices if isinstance(c, str)]
            hint = _did_you_mean(value, names) if isinstance(value, str) else ""
            self.issue(f"invalid value {_describe(value)}: expected one of "
                       f"{', '.join(map(str, choices))}{hint}", path)
            return None
        lax = path in self.substituted
        try:
            return msgspec.convert(value, tp, strict=not lax)
        except msgspec.ValidationError as exc:
            if lax and isinstance(value, str):
                # "${WORKERS:-4}" into `int | "auto"`: msgspec's lax mode does not coerce a
                # str inside a union that also holds a str literal, so try an int ourselves.
                try:
                    return msgspec.convert(int(value.strip()), tp)
                except (ValueError, msgspec.ValidationError):
                    pass
            message = _GOT.sub("", str(exc))
            sub = _AT.search(message)
            message = _AT.sub("", message).replace("`", "")
            if sub and sub.group(1):
                message += f" (at {sub.group(1)})"
            self.issue(f"{message[:1].lower()}{message[1:]}, got {_describe(value)}", path)
            return None


def _type_name(tp: Any) -> str:
    base = _unwrap(tp)
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}
    if base in names:
        return names[base]
    return "a single value"


# ============================================================== cross-field checks

# RFC 9110 §5.6.2: token = 1*tchar
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# RFC 1123 labels; underscores tolerated because real internal names carry them.
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def normalize_hostname(name: str) -> str | None:
    """Lowercase ``name`` (IDNA-encode non-ASCII); ``None`` when it is not a valid host name."""
    name = name.strip().lower().rstrip(".")
    if not name:
        return None
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if len(name) > 253:
        return None
    if all(_LABEL.match(label) for label in name.split(".")):
        return name
    return None


def parse_host_port(text: str) -> tuple[str, int] | str:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port); an error message otherwise."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            return "expected \"[ipv6]:port\""
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{host!r} is not an IPv6 address"
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            return "expected \"host:port\" (IPv6 as \"[::1]:8080\")"
        if ":" in host:
            return "write an IPv6 address in brackets, as \"[::1]:8080\""
        if not _is_ip(host) and normalize_hostname(host) is None:
            return f"{host!r} is not a valid host name or IP address"
        host = host.lower()
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        return f"port {port_text!r} is not a number from 0 to 65535"
    return host, int(port_text)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_wildcard_host(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


def parse_upstream_url(url: str) -> tuple[str, int] | str:
    """``"http://host[:port][/]"`` -> (host, port); an error message otherwise."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        return f"invalid URL: {exc}"
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        return f"unsupported URL scheme {parts.scheme!r}; expected \"http://host:port\"" \
            if scheme else "expected \"http://host:port\""
    if parts.username is not None or parts.password is not None:
        return "credentials in an upstream URL are not supported"
    if parts.path not in ("", "/"):
        return f"an upstream URL may not have a path ({parts.path!r}); routes come later"
    if parts.query or parts.fragment or url.rstrip().endswith(("?", "#")):
        return "an upstream URL may not have a query or fragment"
    host = parts.hostname or ""
    if not host:
        return "the URL has no host"
    if not _is_ip(host):
        normalized = normalize_hostname(host)
        if normalized is None:
            return f"{host!r} is not a valid host name or IP address"
        host = normalized
    if port == 0:
        return "port 0 is not a valid upstream port"
    return host, (443 if scheme == "https" else 80) if port is None else port


def is_https_url(url: str) -> bool:
    """An ``https://`` upstream URL (the pool connects with TLS, see docs/tls.md)."""
    return url.strip().lower().startswith("https://")


def endpoint_id(host: str, port: int) -> str:
    """The stable endpoint id: ``host:port``; IPv6 hosts in brackets (``[::1]:8080``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_domains(entries: list[str], path: Path, wildcard_support: bool,
                  ctx: _Context) -> tuple[list[str], list[str]]:
    """Validate domain entries; returns (exact names, wildcard suffixes like ".test.com")."""
    exact: list[str] = []
    suffixes: list[str] = []
    for n, entry in enumerate(entries):
        where = path + (n,)
        if entry.startswith("*."):
            if not wildcard_support:
                ctx.issue(f"{entry!r} is a wildcard but domains.wildcard_support is false",
                          where)
                continue
            name = normalize_hostname(entry[2:])
            if name is None:
                ctx.issue(f"{entry!r} is not a valid wildcard domain (\"*.example.com\")", where)
            elif "." + name not in suffixes:
                suffixes.append("." + name)
            continue
        if "*" in entry:
            hint = " (use an empty intercept_domains list to intercept every host)" \
                if entry.strip() == "*" else ""
            ctx.issue(f"{entry!r}: a wildcard is allowed only as a leading \"*.\"{hint}", where)
            continue
        name = normalize_hostname(entry)
        if name is None:
            ctx.issue(f"{entry!r} is not a valid host name", where)
        elif name not in exact:
            exact.append(name)
    return exact, suffixes


def _check(ctx: _Context) -> None:
    """Cross-field rules, each on the tables that built without error (``ctx.built``)."""
    server = ctx.built.get(("server",))
    if server is not None:
        _check_server(server, ctx)
    domains = ctx.built.get(("domains",))
    if domains is not None:
        split_domains(domains.intercept_domains, ("domains", "intercept_domains"),
                      domains.wildcard_support, ctx)
        split_domains(domains.exclude_domains, ("domains", "exclude_domains"),
                      domains.wildcard_support, ctx)
    _check_cluster(ctx)
    groups = ctx.raw_at(("target_groups",))
    seen: dict[str, int] = {}
    for n in range(len(groups) if isinstance(groups, list) else 0):
        group = ctx.built.get(("target_groups", n))
        if group is None:
            continue
        if group.name == "default":
            ctx.issue("the name 'default' is the [targets] cluster; choose another",
                      ("target_groups", n, "name"))
        elif group.name in seen:
            ctx.issue(f"duplicate target group {group.name!r} (also target_groups"
                      f"[{seen[group.name]}])", ("target_groups", n, "name"))
        else:
            seen[group.name] = n
        _check_cluster(ctx, ("target_groups", n))
    from dispa.tls.config import check_cluster_tls  # [targets.tls], [target_groups.tls]
    check_cluster_tls([(p, ctx.built[p]) for p in [("targets",)] + [
        ("target_groups", n) for n in range(len(groups) if isinstance(groups, list) else 0)]
        if p in ctx.built], ctx.issue)
    plugins = ctx.built.get(("plugins",))
    if plugins is not None:
        from dispa.plugins.registry import check_plugins
        check_plugins(plugins, ctx.issue)
    geo = ctx.built.get(("geo",))
    if geo is not None:
        _check_geo(geo, {"default"} | set(seen), ctx)
    routing = ctx.built.get(("routing",))
    if routing is not None:
        from dispa.config.routing_model import check_routing
        targets = {"default"} | set(seen) | ({"@geo"} if geo is not None else set())
        cluster = ctx.built.get(("targets",))
        if cluster is not None:
            targets |= {e.name for e in cluster.endpoints}
        names = {p.name for p in plugins.plugins if p.enabled} if plugins is not None else set()
        check_routing(routing, targets=targets, plugins=names, issue=ctx.issue)
        if geo is None:
            for n, rule in enumerate(routing.rules):
                if rule.conditions.geo is not None:
                    ctx.issue("a geo condition needs a [geo] table with a database",
                              ("routing", "rules", n, "conditions", "geo"))
    monitoring = ctx.built.get(("monitoring",))
    if monitoring is not None:
        _check_monitoring(monitoring, server, ctx)
    tls = ctx.built.get(("tls",))
    if tls is not None:
        _check_tls(tls, server, ctx)
    _check_l4(ctx, server, tls, {"default"} | set(seen))
    _check_http2(ctx, tls)


def _check_http2(ctx: _Context, tls) -> None:
    """ALPN ``h2`` needs ``[http2] enabled``; ``protocol = "h2"`` needs https:// targets and
    ``"h2c"`` http:// ones (docs/http2.md)."""
    http2 = ctx.built.get(("http2",))
    if tls is not None and "h2" in getattr(tls, "alpn", ()) and \
            (http2 is None or not http2.enabled):
        ctx.issue('ALPN "h2" needs HTTP/2: set [http2] enabled = true', ("tls", "alpn"))
    groups = ctx.raw_at(("target_groups",))
    paths = [("targets",)] + [("target_groups", n)
                              for n in range(len(groups) if isinstance(groups, list) else 0)]
    for where in paths:
        cluster = ctx.built.get(where)
        proto = getattr(cluster, "protocol", "http1")
        if proto == "http1":
            continue
        want = "https://" if proto == "h2" else "http://"
        for n, e in enumerate(cluster.endpoints):
            if not e.url.lower().startswith(want):
                ctx.issue(f'protocol = "{proto}" needs {want} target URLs',
                          where + ("targets", n, "url"))


def _check_l4(ctx: _Context, server, tls, groups: set[str]) -> None:
    """``[[l4.listeners]]`` (config/stream_model.py): names, addresses, target groups."""
    l4 = ctx.built.get(("l4",))
    if l4 is None or not l4.listeners:
        return
    from dispa.config.stream_model import check_l4
    binds = {}
    for what, owner in (("server.bind_address", server),
                        ("tls.bind_address", tls if getattr(tls, "enabled", False) else None)):
        parsed = parse_host_port(owner.bind_address) if owner is not None else ""
        if not isinstance(parsed, str):
            binds[f"{parsed[0]}:{parsed[1]}"] = what
    check_l4(l4, groups=groups, binds=binds, parse_host_port=parse_host_port, issue=ctx.issue)


def _check_tls(tls, server: m.ServerConfig | None, ctx: _Context) -> None:
    from dispa.tls.config import check_tls
    http = parse_host_port(server.bind_address) if server is not None else None
    check_tls(tls, ctx.issue, None if isinstance(http, str) else http)
    _check_discovery(ctx)
    observability = ctx.built.get(("observability",))
    if observability is not None:
        from dispa.config.tracing_model import check_tracing
        check_tracing(observability, ctx.issue)
    logging_cfg = ctx.built.get(("logging",))
    if logging_cfg is not None:
        from dispa.config.logging_model import check_logging
        check_logging(logging_cfg, ctx.issue)
    tls = ctx.built.get(("tls",))
    if getattr(tls, "acme", None) is not None:
        from dispa.tls.acme_config import check as check_acme
        check_acme(tls.acme, lambda msg, path: ctx.issue(msg, ("tls", "acme") + path),
                   tls_enabled=tls.enabled)


def _check_discovery(ctx: _Context) -> None:
    """Service discovery sources against ``[service_discovery]`` (docs/discovery.md)."""
    from dispa.discovery.config import check_discovery
    paths = [("targets", "discovery")]
    groups = ctx.raw_at(("target_groups",))
    paths += [("target_groups", n, "discovery")
              for n in range(len(groups) if isinstance(groups, list) else 0)]
    sources = [(p, ctx.built[p]) for p in paths if p in ctx.built]
    settings = ctx.built.get(("service_discovery",))
    if ctx.raw_at(("service_discovery",)) is not None and settings is None:
        return  # the table did not build: already reported
    check_discovery(settings, sources, ctx.issue)


def _check_geo(geo, groups: set[str], ctx: _Context) -> None:
    """The database opens and validates; every region's target is a target group."""
    from dispa.balancer.geo import GeoDatabase, GeoDatabaseError
    try:
        GeoDatabase(geo.database).close()
    except GeoDatabaseError as exc:
        ctx.issue(str(exc), ("geo", "database"))
    for n, region in enumerate(geo.regions):
        if region.target not in groups:
            ctx.issue(f"region {region.name!r}: target {region.target!r} is not a target "
                      f"group{_did_you_mean(region.target, sorted(groups))}",
                      ("geo", "regions", n, "target"))


def _check_server(server: m.ServerConfig, ctx: _Context) -> None:
    where = ("server",)
    if server.max_line_bytes > server.max_head_bytes:
        ctx.issue(f"max_line_bytes ({server.max_line_bytes}) is larger than max_head_bytes "
                  f"({server.max_head_bytes})", where + ("max_line_bytes",))


def _check_cluster(ctx: _Context, where: Path = ("targets",)) -> None:
    top = ctx.raw_at(where)
    raw = ctx.raw_at(where + ("targets",))
    if isinstance(ctx.raw, dict) and (top is None or isinstance(top, dict)) and (
            raw is None or raw == []) and ctx.raw_at(where + ("discovery",)) is None:
        table = format_path(where)
        ctx.issue(f"at least one upstream is required: add a [[{table}.targets]] table "
                  "with name and url", where + ("targets",))
    names: dict[str, int] = {}
    ids: dict[str, int] = {}
    for n in range(len(raw) if isinstance(raw, list) else 0):
        path = where + ("targets", n)
        endpoint = ctx.built.get(path)
        if endpoint is None:
            continue
        if endpoint.name in names:
            ctx.issue(f"duplicate name {endpoint.name!r} (also {format_path(where)}.targets"
                      f"[{names[endpoint.name]}])", path + ("name",))
        else:
            names[endpoint.name] = n
        address = parse_upstream_url(endpoint.url)
        if isinstance(address, str):
            continue  # reported by FIELD_CHECKS
        eid = endpoint_id(*address)
        if eid in ids:
            ctx.issue(f"duplicate endpoint {eid} (also {format_path(where)}.targets"
                      f"[{ids[eid]}])", path + ("url",))
        else:
            ids[eid] = n
    health = ctx.built.get(where + ("health_check",))
    if health is not None:
        if health.timeout > health.interval:
            ctx.issue(f"timeout ({health.timeout:g}s) is longer than interval "
                      f"({health.interval:g}s)", where + ("health_check", "timeout"))
    pool = ctx.built.get(where + ("pool",))
    if pool is not None and pool.max_idle > pool.max_total:
        ctx.issue(f"max_idle ({pool.max_idle}) is larger than max_total ({pool.max_total})",
                  where + ("pool", "max_idle"))


def _check_monitoring(mon: m.MonitoringConfig, server: m.ServerConfig | None,
                      ctx: _Context) -> None:
    where = ("monitoring",)
    from dispa.observability.custom_metrics import check_monitoring_metrics
    check_monitoring_metrics(mon, ctx.issue)
    if not mon.enabled or server is None:
        return
    address = parse_host_port(server.bind_address)
    if isinstance(address, str):
        return
    host, port = address
    for key in ("metrics_port", "health_check_port"):
        admin_port = getattr(mon, key)
        if admin_port and admin_port == port and (
                host == mon.bind_host or _is_wildcard_host(host)
                or _is_wildcard_host(mon.bind_host)):
            ctx.issue(f"{key} {admin_port} is also the proxy's port (server.bind_address)",
                      where + (key,))


# ============================================================== per-field checks
# Each takes the converted value (one item for a list) and returns a problem or None. They run
# as soon as the value builds, whatever its siblings do.

def _check_bind_address(value: str) -> str | None:
    address = parse_host_port(value)
    return f"bind_address {value!r}: {address}" if isinstance(address, str) else None


def _check_network(value: str) -> str | None:
    try:
        ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        return f"{value!r} is not an IP address or CIDR network"
    return None


def _check_via(value: str) -> str | None:
    if value and not _TOKEN.match(value):
        return (f"via {value!r} must be an HTTP token (RFC 9110 §7.6.3 pseudonym), "
                "or \"\" to send no Via header")
    return None


def _check_header_name(value: str) -> str | None:
    if value and not _TOKEN.match(value):
        return f"{value!r} is not a valid header name (RFC 9110 §5.1), or \"\" to turn it off"
    return None


def _check_upstream_url(value: str) -> str | None:
    address = parse_upstream_url(value)
    return f"url {value!r}: {address}" if isinstance(address, str) else None


def _check_probe_path(value: str) -> str | None:
    if not value.startswith("/") or not value.isprintable() or " " in value:
        return f"path {value!r} must start with \"/\" and contain no spaces or control characters"
    return None


def _check_probe_host(value: str) -> str | None:
    if value and (not value.isprintable() or any(c in value for c in " \t/")):
        return f"host {value!r} is not a valid Host header value"
    return None


_DB_SCHEMES = ("sqlite:", "postgresql://", "postgres://")


def _check_database_url(value: str) -> str | None:
    if not value.lower().startswith(_DB_SCHEMES):
        return (f"url {mask_url_password(value)!r}: expected sqlite://PATH, sqlite::memory: "
                "or postgresql://user:password@host:port/db")
    return None


def _check_bind_host(value: str) -> str | None:
    if not _is_ip(value) and normalize_hostname(value) is None:
        return f"bind_host {value!r} is not an IP address or host name"
    return None


FIELD_CHECKS = {
    (m.ServerConfig, "bind_address"): _check_bind_address,
    (m.ServerConfig, "trusted_proxies"): _check_network,
    (m.ServerConfig, "via"): _check_via,
    (m.ServerConfig, "request_id_header"): _check_header_name,
    (m.EndpointConfig, "url"): _check_upstream_url,
    (m.HealthCheckConfig, "path"): _check_probe_path,
    (m.HealthCheckConfig, "host"): _check_probe_host,
    (m.DatabaseLogConfig, "url"): _check_database_url,
    (m.MonitoringConfig, "bind_host"): _check_bind_host,
}
