"""Dispa's own logs: one line per record, as JSON, logfmt or human text.

Everything in Dispa logs through loggers below ``"dispa"`` (``logging.getLogger(__name__)``
in each module). :func:`configure` installs one handler on the ``"dispa"`` logger; the
master calls it at start-up with ``process="master"``, each worker with
``process="worker-<n>"``.

Structured data goes into ``extra={"fields": {...}}``; :func:`fields` builds that dict::

    log.info("worker started", extra=fields(worker=3, child_pid=1234))
    # {"ts":"2024-05-01T10:00:00.123Z","level":"info","logger":"dispa.server.supervisor",
    #  "process":"master","pid":99,"msg":"worker started","worker":3,"child_pid":1234}

A field whose name is one of the core keys (``ts level logger process pid msg exc stack``)
is written as ``field.<name>`` so it never hides the core value.

The formatters never raise: a value that cannot be encoded is written as its ``repr()``,
and a record whose message cannot be formatted is written with the raw message and args.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from typing import Any, TextIO

import msgspec

__all__ = [
    "FORMATS",
    "LEVELS",
    "JsonFormatter",
    "LogfmtFormatter",
    "TextFormatter",
    "configure",
    "fields",
    "get_level",
    "set_level",
]

ROOT_LOGGER = "dispa"

#: Accepted level names (lower case) -> :mod:`logging` level numbers.
LEVELS: dict[str, int] = {
    "trace": 5,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_LEVEL_NAMES: dict[int, str] = {
    5: "trace",
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}

#: Accepted values of ``fmt``.
FORMATS = ("json", "logfmt", "text")

_CORE_KEYS = frozenset(("ts", "level", "logger", "process", "pid", "msg", "exc", "stack"))
_MAX_STACK_FRAMES = 8

logging.addLevelName(5, "TRACE")


def fields(**kw: Any) -> dict[str, Any]:
    """Return the ``extra`` dict that attaches ``kw`` as structured fields to a record.

    Use as ``log.info("worker started", extra=fields(worker=3, child_pid=1234))``.

    Returns:
        ``{"fields": kw}``.
    """
    return {"fields": kw}


def level_name(levelno: int) -> str:
    """Lower-case name of a :mod:`logging` level number (``"level-15"`` if unnamed)."""
    name = _LEVEL_NAMES.get(levelno)
    if name is not None:
        return name
    return f"level-{levelno}"


def _parse_level(level: str) -> int:
    if not isinstance(level, str):
        raise ValueError(f"log level must be a string, got {type(level).__name__}")
    n = LEVELS.get(level.strip().lower())
    if n is None:
        raise ValueError(
            f"unknown log level {level!r}; expected one of: "
            + ", ".join(k for k in LEVELS if k != "warn")
        )
    return n


def _rfc3339(created: float) -> str:
    t = time.gmtime(created)
    ms = int((created - int(created)) * 1000)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (
        t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec, ms)


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # bad %-args: keep what we have
        try:
            return f"{record.msg!r} args={record.args!r}"
        except Exception:
            return "<unformattable log message>"


def _exc_parts(record: logging.LogRecord) -> tuple[str, str] | None:
    """(``"Type: message"``, one-line stack) for a record with exc_info, else None."""
    ei = record.exc_info
    if not ei or ei is True or ei[0] is None:
        return None
    etype, value, tb = ei
    try:
        only = traceback.format_exception_only(etype, value)
        exc = " ".join(part.strip() for s in only for part in s.splitlines() if part.strip())
    except Exception:
        exc = getattr(etype, "__name__", "Exception")
    try:
        frames = traceback.extract_tb(tb)[-_MAX_STACK_FRAMES:]
        stack = " > ".join(
            f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}" for f in frames)
    except Exception:
        stack = ""
    return exc, stack


def _safe(value: Any) -> Any:
    """Value itself if JSON-friendly, else its repr()."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    try:
        msgspec.json.encode(value)
        return value
    except Exception:
        try:
            return repr(value)
        except Exception:
            return "<unrepresentable>"


class _BaseFormatter(logging.Formatter):
    """Collects the core keys and the structured fields of a record, in order."""

    def __init__(self, process: str = "master"):
        super().__init__()
        self.process = process

    def items(self, record: logging.LogRecord) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = [
            ("ts", _rfc3339(record.created)),
            ("level", level_name(record.levelno)),
            ("logger", record.name),
            ("process", self.process),
            ("pid", record.process if record.process is not None else os.getpid()),
            ("msg", _message(record)),
        ]
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            for k, v in extra.items():
                k = str(k)
                if k in _CORE_KEYS:
                    k = "field." + k
                out.append((k, v))
        elif extra is not None:
            out.append(("field.fields", extra))
        exc = _exc_parts(record)
        if exc is not None:
            out.append(("exc", exc[0]))
            if exc[1]:
                out.append(("stack", exc[1]))
        elif record.stack_info:
            out.append(("stack", " | ".join(record.stack_info.splitlines())))
        return out

    def format(self, record: logging.LogRecord) -> str:
        try:
            return self.render(record)
        except Exception as e:  # never raise from logging
            try:
                return (f"{_rfc3339(time.time())} {level_name(record.levelno)} "
                        f"{record.name}: {_message(record)!r} (log formatter failed: {e!r})")
            except Exception:
                return "log formatter failed"

    def render(self, record: logging.LogRecord) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


class JsonFormatter(_BaseFormatter):
    """One JSON object per line (msgspec); non-encodable values are repr()'d."""

    _enc = msgspec.json.Encoder(enc_hook=repr)

    def render(self, record: logging.LogRecord) -> str:
        d = dict(self.items(record))
        try:
            data = self._enc.encode(d)
        except Exception:  # e.g. a dict field with unsupported keys
            data = self._enc.encode({k: _safe(v) for k, v in d.items()})
        return data.decode("utf-8", "replace")


def _logfmt_key(k: str) -> str:
    out = []
    for ch in k:
        if ch <= " " or ch in '="\x7f':
            out.append("_")
        else:
            out.append(ch)
    return "".join(out) or "_"


_LOGFMT_ESC = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _logfmt_value(v: Any) -> str:
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, (int, float)):
        return repr(v) if isinstance(v, float) else str(v)
    if isinstance(v, str):
        s = v
    elif isinstance(v, (list, tuple, dict)):
        try:
            s = msgspec.json.encode(v, enc_hook=repr).decode("utf-8", "replace")
        except Exception:
            s = repr(v)
    else:
        try:
            s = str(v)
        except Exception:
            s = repr(v)
    if s and not any(ch <= " " or ch in '="\\\x7f' for ch in s):
        return s
    parts = []
    for ch in s:
        e = _LOGFMT_ESC.get(ch)
        if e is not None:
            parts.append(e)
        elif ch < " " or ch == "\x7f":
            parts.append("\\u%04x" % ord(ch))
        else:
            parts.append(ch)
    return '"' + "".join(parts) + '"'


class LogfmtFormatter(_BaseFormatter):
    """``ts=... level=info logger=... msg="..." key=value`` (values quoted when needed)."""

    def render(self, record: logging.LogRecord) -> str:
        return " ".join(f"{_logfmt_key(k)}={_logfmt_value(v)}" for k, v in self.items(record))


class TextFormatter(_BaseFormatter):
    """Human-readable: ``TS LEVEL process[pid] logger: msg k=v``; tracebacks on extra lines."""

    def render(self, record: logging.LogRecord) -> str:
        items = self.items(record)
        d = dict(items[:6])
        line = (f"{d['ts']} {d['level'].upper():<8} {d['process']}[{d['pid']}] "
                f"{d['logger']}: {d['msg']}")
        rest = [(k, v) for k, v in items[6:] if k not in ("exc", "stack")]
        if rest:
            line += " " + " ".join(f"{_logfmt_key(k)}={_logfmt_value(v)}" for k, v in rest)
        ei = record.exc_info
        if ei and ei is not True and ei[0] is not None:
            try:
                line += "\n" + "".join(traceback.format_exception(*ei)).rstrip()
            except Exception:
                pass
        return line


_FORMATTERS: dict[str, type[_BaseFormatter]] = {
    "json": JsonFormatter,
    "logfmt": LogfmtFormatter,
    "text": TextFormatter,
}


class _DispaHandler(logging.StreamHandler):
    """Marker subclass so :func:`configure` replaces only the handler it installed."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802
        # A closed/broken stream must not spam stderr with tracebacks from logging itself.
        pass


def configure(fmt: str = "json", level: str = "info", stream: TextIO | None = None,
              process: str = "master") -> None:
    """Install Dispa's log handler on the ``"dispa"`` logger (idempotent; replaces ours).

    Args:
        fmt: ``"json"``, ``"logfmt"`` or ``"text"``.
        level: a name from :data:`LEVELS` (case-insensitive).
        stream: where lines go; ``sys.stderr`` (looked up at call time) when None.
        process: the ``process`` key of every line (``"master"``, ``"worker-3"``).

    Raises:
        ValueError: unknown ``fmt`` or ``level``.
    """
    if fmt not in _FORMATTERS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    levelno = _parse_level(level)
    logger = logging.getLogger(ROOT_LOGGER)
    for h in list(logger.handlers):
        if isinstance(h, _DispaHandler):
            logger.removeHandler(h)
    handler = _DispaHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_FORMATTERS[fmt](process=process))
    logger.addHandler(handler)
    logger.setLevel(levelno)
    logger.propagate = False


def set_level(level: str) -> None:
    """Change the level of the ``"dispa"`` logger at runtime.

    Raises:
        ValueError: ``level`` is not a name from :data:`LEVELS`.
    """
    logging.getLogger(ROOT_LOGGER).setLevel(_parse_level(level))


def get_level() -> str:
    """The effective level of the ``"dispa"`` logger, lower case (``"info"``)."""
    return level_name(logging.getLogger(ROOT_LOGGER).getEffectiveLevel())
