"""The new ``[logging]`` sub-tables: ``[logging.access_log]`` and ``[logging.sanitization]``.

Theory of operation
-------------------
The original keys of ``[logging]``, ``[logging.database]`` and ``[logging.file]`` live in
``config/model.py`` (with the few new keys added beside them); the tables below are new.
``dispa.config.compile`` turns the whole ``[logging]`` table into the plain data of
``Snapshot.observability["access_log" | "traffic_log" | "redaction"]`` and the workers build
their sinks from it (docs/logging.md documents every key and the record schema).

Rules:

1. Per-value constraints live in ``Meta`` annotations; anything that needs a parse (regexes,
   header names, the text format's variables) lives in :func:`check_logging`, which the
   loader calls on a table that built cleanly, and which reports every problem with the
   path of the offending key in the file's spelling.
2. The access log reuses ``[logging.file]`` for its directory and rotation settings, and
   ``[logging] retention_days`` for retention, so one set of keys rules every log file.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

__all__ = ["AccessLogConfig", "FieldRule", "PatternRule", "SanitizationConfig",
           "DEFAULT_MASK_HEADERS", "DEFAULT_MASK_QUERY", "check_logging"]


class _Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of the tables here (own copy: model.py imports this module)."""


#: Headers whose values never reach a sink: credentials and session ids.
DEFAULT_MASK_HEADERS = ("authorization", "proxy-authorization", "cookie", "set-cookie",
                        "x-api-key", "x-auth-token", "x-csrf-token")
#: Query parameters masked in every logged target (``?token=...``).
DEFAULT_MASK_QUERY = ("token", "access_token", "refresh_token", "id_token", "api_key",
                      "apikey", "key", "password", "passwd", "secret", "signature", "sig",
                      "code", "session", "sessionid", "auth")

Action = Literal["mask", "redact", "hash"]


class FieldRule(_Table):
    """``[[logging.sanitization.fields]]``: one named field and what to do with it."""

    # "header:<name>", "query:<param>", or a record field ("client_ip", "host", "target",
    # "user_agent", "referer", ...), or a span attribute name ("http.request.header.x")
    name: Annotated[str, Meta(min_length=1)]
    action: Action = "mask"


class PatternRule(_Table):
    """``[[logging.sanitization.patterns]]``: a regex applied to every logged string."""

    name: Annotated[str, Meta(min_length=1)]
    regex: Annotated[str, Meta(min_length=1)]
    action: Action = "mask"


class SanitizationConfig(_Table):
    """``[logging.sanitization]``: redaction of every log sink (docs/logging.md)."""

    enabled: bool = True
    mask_headers: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_MASK_HEADERS))
    mask_query_params: list[str] = msgspec.field(
        default_factory=lambda: list(DEFAULT_MASK_QUERY))
    header_action: Action = "mask"
    card_numbers: bool = True   # Luhn-checked 13..19 digit runs
    bearer_tokens: bool = True  # "Bearer xxx" anywhere in a logged string
    emails: bool = False
    hash_key: str = ""          # key of the keyed hash (BLAKE2b); required by "hash" rules
    fields: list[FieldRule] = msgspec.field(default_factory=list)
    patterns: list[PatternRule] = msgspec.field(default_factory=list)


#: Text format presets (nginx log_format equivalents).
PRESETS = {
    "combined": ('$remote_addr - $remote_user [$time_local] "$request" $status '
                 '$body_bytes_sent "$http_referer" "$http_user_agent"'),
    "common": '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent',
    "main": ('$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent '
             '"$http_referer" "$http_user_agent" rt=$request_time uct=$upstream_response_time '
             'ua="$upstream_addr" rid=$request_id'),
}

#: The variables a text format may use (``$http_<name>`` reads any request header).
VARIABLES = ("remote_addr", "remote_user", "time_local", "time_iso8601", "msec", "request",
             "request_method", "request_uri", "server_protocol", "status", "body_bytes_sent",
             "bytes_sent", "request_length", "http_referer", "http_user_agent",
             "request_time", "upstream_addr", "upstream_response_time", "upstream_status",
             "request_id", "host", "scheme", "route", "cluster", "error", "worker")

VAR_RE = re.compile(r"\$(\{[A-Za-z_][A-Za-z0-9_]*\}|[A-Za-z_][A-Za-z0-9_]*)")


class AccessLogConfig(_Table):
    """``[logging.access_log]``: one line per request (docs/logging.md)."""

    enabled: bool = False
    # relative to [logging.file] directory; "-" writes to the worker's stdout
    path: Annotated[str, Meta(min_length=1)] = "access.log"
    # "json", a preset ("combined", "common", "main") or a text format with $variables
    format: Annotated[str, Meta(min_length=1)] = "json"
    buffer_size: Annotated[int, Meta(ge=0, le=16 * 1024 * 1024)] = 65536
    flush_interval: Annotated[float, Meta(gt=0, le=60)] = 1.0


def format_variables(fmt: str) -> list[str]:
    """The variable names a text format uses, in order."""
    return [m.group(1).strip("{}") for m in VAR_RE.finditer(PRESETS.get(fmt, fmt))]


def check_logging(logging_cfg, issue: Callable[[str, tuple], None]) -> None:
    """Rules of ``[logging]`` that Meta cannot express; reports each with its path."""
    where = ("logging",)
    al = logging_cfg.access_log
    if al.format != "json":
        for name in format_variables(al.format):
            if name not in VARIABLES and not name.startswith("http_"):
                issue(f"unknown access log variable ${name}; known: "
                      + ", ".join("$" + v for v in VARIABLES) + ", $http_<header>",
                      where + ("access_log", "format"))
                break
    san = logging_cfg.sanitization
    swhere = where + ("sanitization",)
    needs_key = san.header_action == "hash"
    for n, rule in enumerate(san.fields):
        needs_key |= rule.action == "hash"
        kind, _, rest = rule.name.partition(":")
        if kind in ("header", "query") and not rest:
            issue(f"{rule.name!r}: name the {kind} after the colon",
                  swhere + ("fields", n, "name"))
    for n, rule in enumerate(san.patterns):
        needs_key |= rule.action == "hash"
        try:
            re.compile(rule.regex)
        except re.error as e:
            issue(f"invalid regex: {e}", swhere + ("patterns", n, "regex"))
    if needs_key and san.enabled and len(san.hash_key) < 16:
        issue("a \"hash\" action needs hash_key (at least 16 characters; use ${ENV_VAR})",
              swhere + ("hash_key",))
    for n, h in enumerate(san.mask_headers):
        if not h or any(c in h for c in " :\t\r\n"):
            issue(f"{h!r} is not a header name", swhere + ("mask_headers", n))
    url = logging_cfg.database.url
    if logging_cfg.enabled and logging_cfg.type in ("database", "both") and not (
            url.startswith(("sqlite://", "sqlite:", "postgresql://", "postgres://"))):
        issue("url must start with sqlite:// or postgresql://", where + ("database", "url"))


# ---------------------------------------------------------------- compile (plain data)
# The three parts of Snapshot.observability this table feeds (config/compile.py
# OBSERVABILITY_PARTS). Relative paths stay relative (the snapshot must not depend on where
# it was compiled): they are relative to the master's working directory, which the workers
# (forked from it, they write) and the master (it rotates) share.

def _rotation(lc) -> dict:
    f = lc.file
    return {"max_bytes": f.max_file_size if f.rotation else 0,
            "interval": f.rotate_interval if f.rotation else "none",
            "compression": f.compression,
            "retention_days": lc.retention_days}


def _path(directory: str, name: str) -> str:
    import os
    if name == "-":
        return "-"
    return os.path.normpath(os.path.join(directory, name))


def compile_access_log(config) -> dict | None:
    """``Snapshot.observability["access_log"]`` or None when the access log is off."""
    lc = config.logging
    al = lc.access_log
    if not al.enabled:
        return None
    fmt = al.format if al.format == "json" else PRESETS.get(al.format, al.format)
    return {"path": _path(lc.file.directory, al.path), "format": fmt,
            "buffer_size": al.buffer_size, "flush_interval": al.flush_interval,
            "rotation": _rotation(lc)}


def compile_traffic_log(config) -> dict | None:
    """``Snapshot.observability["traffic_log"]`` or None when traffic logging is off."""
    lc = config.logging
    if not lc.enabled:
        return None
    db = lc.database
    out: dict = {"retention_days": lc.retention_days, "file": None, "database": None,
                 "queue_size": db.queue_size, "batch_size": db.batch_size,
                 "flush_interval": db.flush_interval}
    if lc.type in ("file", "both"):
        out["file"] = {"path": _path(lc.file.directory, lc.file.traffic_file),
                       "rotation": _rotation(lc)}
    if lc.type in ("database", "both"):
        out["database"] = {"url": db.url, "max_connections": db.max_connections,
                           "connection_timeout": db.connection_timeout, "table": db.table}
    return out


def compile_redaction(config) -> dict | None:
    """``Snapshot.observability["redaction"]``: the sanitization rules, when some sink that
    applies them (access log, traffic log, tracing) is on and sanitization is enabled."""
    lc = config.logging
    san = lc.sanitization
    obs = getattr(config, "observability", None)
    tracing = getattr(obs, "tracing", None)
    if not san.enabled or not (lc.enabled or lc.access_log.enabled
                               or getattr(tracing, "enabled", False)):
        return None
    return {"mask_headers": sorted({h.lower() for h in san.mask_headers}),
            "mask_query_params": sorted({q.lower() for q in san.mask_query_params}),
            "header_action": san.header_action, "card_numbers": san.card_numbers,
            "bearer_tokens": san.bearer_tokens, "emails": san.emails,
            "hash_key": san.hash_key,
            "fields": [[r.name.lower(), r.action] for r in san.fields],
            "patterns": [[r.name, r.regex, r.action] for r in san.patterns]}
