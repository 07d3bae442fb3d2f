"""Which filter classes exist: the ``dispa.filters`` entry-point group.

Built-in filters register through the same group as third-party packages (pyproject.toml,
``[project.entry-points."dispa.filters"]``), so a plugin author's package is found exactly
like ours. The group is read once per process; ``register`` adds a class by hand (tests,
embedding).
"""

from __future__ import annotations

import difflib
import importlib
from importlib.metadata import distributions
from typing import Callable

import msgspec

from dispa.plugins.api import BuildContext, Filter

GROUP = "dispa.filters"

_classes: dict[str, type[Filter]] | None = None
_load_errors: dict[str, str] = {}
_manual: dict[str, type[Filter]] = {}


def register(cls: type[Filter]) -> type[Filter]:
    """Make ``cls`` available under ``cls.name`` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Filter)) or not cls.name:
        raise TypeError(f"{cls!r} is not a Filter subclass with a name")
    _manual[cls.name] = cls
    if _classes is not None:
        _classes[cls.name] = cls
    return cls


def _group_entry_points() -> list:
    # Every distribution's entries, not importlib's name-deduplicated view: a stale
    # *.egg-info of the same project on sys.path (a source checkout) must not hide the
    # installed metadata.
    out = []
    for dist in distributions():
        try:
            eps = dist.entry_points
        except Exception:  # noqa: BLE001 - unreadable metadata of some other package
            continue
        out += [ep for ep in eps if ep.group == GROUP]
    return out


def available() -> dict[str, type[Filter]]:
    """Filter classes by type name (entry points, then hand-registered ones)."""
    global _classes
    if _classes is None:
        found: dict[str, type[Filter]] = {}
        for ep in _group_entry_points():
            if ep.name in found:
                continue
            try:
                cls = ep.load()
            except Exception as exc:  # a broken third-party package must not stop us
                _load_errors[ep.name] = f"{type(exc).__name__}: {exc}"
                continue
            if isinstance(cls, type) and issubclass(cls, Filter):
                found[ep.name] = cls
            else:
                _load_errors[ep.name] = f"entry point {ep.value} is not a Filter subclass"
        found.update(_manual)
        _classes = found
    return _classes


def get(type_name: str) -> type[Filter]:
    """The class registered as ``type_name``, or named by an import path
    ``"package.module:ClassName"`` (a filter used without packaging it); ``KeyError`` with
    a hint when unknown."""
    classes = available()
    try:
        return classes[type_name]
    except KeyError:
        pass
    if ":" in type_name:
        module_name, _, attr = type_name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise KeyError(f"cannot import plugin type {type_name!r}: {exc}") from None
        if not (isinstance(cls, type) and issubclass(cls, Filter)):
            raise KeyError(f"plugin type {type_name!r} is not a Filter subclass")
        return cls
    raise KeyError(unknown_message(type_name))


def unknown_message(type_name: str) -> str:
    if type_name in _load_errors:
        return f"plugin type {type_name!r} failed to load: {_load_errors[type_name]}"
    names = sorted(available())
    close = difflib.get_close_matches(type_name, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown plugin type {type_name!r}{hint}; known: {', '.join(names) or 'none'}"


def parse_config(cls: type[Filter], raw: dict) -> msgspec.Struct:
    """``raw`` (the ``config`` table) converted to ``cls.Config``; raises ValidationError."""
    return msgspec.convert(raw, cls.Config)


def check_plugins(plugins, issue: Callable[[str, tuple], None]) -> None:
    """Config-time checks of ``[plugins]`` (a ``config.model.PluginsConfig``): unique
    names, known types, each ``config`` valid for its filter, and a trial build (which
    catches e.g. a missing module file) so a bad plugin never reaches a worker."""
    seen: dict[str, int] = {}
    for n, p in enumerate(plugins.plugins):
        where = ("plugins", "plugins", n)
        if p.name in seen:
            issue(f"duplicate plugin name {p.name!r} (also plugins.plugins[{seen[p.name]}])",
                  where + ("name",))
        else:
            seen[p.name] = n
        try:
            cls = get(p.type)
        except KeyError as exc:
            issue(exc.args[0], where + ("type",))
            continue
        try:
            cfg = parse_config(cls, p.config)
        except msgspec.ValidationError as exc:
            issue(f"invalid config for plugin type {p.type!r}: {exc}", where + ("config",))
            continue
        if not p.enabled:
            continue
        try:
            instance = cls.build(cfg, BuildContext(instance_name=p.name))
        except (ValueError, OSError) as exc:
            issue(f"plugin {p.name!r} ({p.type}) cannot start: {exc}", where + ("config",))
            continue
        try:
            instance.close()
        except Exception:  # noqa: BLE001 - a trial instance; nothing to keep
            pass
