"""The access log: one line per finished request, JSON or an nginx-style text format.

Theory of operation
-------------------
:func:`factory` (registered in ``exchange.SINK_FACTORIES``) builds an :class:`AccessLog`
sink from ``Snapshot.observability["access_log"]`` (config: ``[logging.access_log]``,
compiled by config/logging_model.py). For each :class:`~dispa.observability.exchange.Exchange`
the sink renders one line and hands it to a :class:`~dispa.observability.rotation.AppendFile`,
which buffers and writes with one ``write(2)`` per flush; nothing waits on I/O in the
request path. Every string that comes from the client or the upstream goes through the
worker's :class:`~dispa.observability.redaction.Redactor` first.

Formats: ``"json"`` (one msgspec-encoded object per line, fields below) or a text format
with nginx variables (``$remote_addr``, ``$time_local``, ``$request``, ``$status``,
``$body_bytes_sent``, ``$http_referer``, ``$http_user_agent``, ``$request_time``,
``$upstream_addr``, ``$upstream_response_time``, ``$request_id``, ``$host``,
``$http_<header>`` ...; config/logging_model.VARIABLES); presets ``combined``, ``common``,
``main``. Text values are escaped like nginx (``"``, ``\\`` and bytes outside 0x20-0x7e
as ``\\xHH``) so a client cannot forge lines.
"""

from __future__ import annotations

import re
import time
from typing import Callable, Optional

import msgspec

from dispa.config.logging_model import VAR_RE
from dispa.observability.redaction import Redactor, build_redactor
from dispa.observability.rotation import AppendFile

__all__ = ["AccessLog", "AccessRecord", "compile_format", "factory"]


class AccessRecord(msgspec.Struct, omit_defaults=True):
    """One JSON access log line (field order is the output order)."""

    time: str
    remote_addr: str
    method: str
    uri: str
    protocol: str
    status: int
    body_bytes_sent: int
    request_length: int
    request_time: float
    host: Optional[str] = None
    request_id: Optional[str] = None
    referer: Optional[str] = None
    user_agent: Optional[str] = None
    upstream_addr: Optional[str] = None
    upstream_response_time: Optional[float] = None
    upstream_attempts: int = 0
    route: Optional[str] = None
    cluster: Optional[str] = None
    error: Optional[str] = None
    worker: int = 0


_ENCODER = msgspec.json.Encoder()

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class _Clock:
    """Formatted timestamps, computed once per second (the log is written many times a
    second; strftime per line would cost more than the rest of the line)."""

    __slots__ = ("_sec", "_local", "_iso", "_isoz")

    def __init__(self):
        self._sec = -1

    def _update(self, sec: int) -> None:
        lt = time.localtime(sec)
        off = lt.tm_gmtoff or 0
        sign = "+" if off >= 0 else "-"
        off = abs(off)
        tz = "%s%02d%02d" % (sign, off // 3600, off % 3600 // 60)
        self._local = "%02d/%s/%04d:%02d:%02d:%02d %s" % (
            lt.tm_mday, _MONTHS[lt.tm_mon - 1], lt.tm_year, lt.tm_hour, lt.tm_min,
            lt.tm_sec, tz)
        self._iso = time.strftime("%Y-%m-%dT%H:%M:%S", lt) + tz[:3] + ":" + tz[3:]
        self._isoz = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        self._sec = sec

    def local(self, t: float) -> str:
        sec = int(t)
        if sec != self._sec:
            self._update(sec)
        return self._local

    def iso(self, t: float) -> str:
        sec = int(t)
        if sec != self._sec:
            self._update(sec)
        return self._iso

    def iso_utc_ms(self, t: float) -> str:
        sec = int(t)
        if sec != self._sec:
            self._update(sec)
        return "%s.%03dZ" % (self._isoz, int((t - sec) * 1000))


_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')


def _esc(s: str) -> str:
    """nginx's log escaping: quote, backslash and non-printable bytes as ``\\xHH``."""
    if not _UNSAFE.search(s):
        return s
    return _UNSAFE.sub(lambda m: "".join("\\x%02X" % b for b in m.group(0).encode("utf-8",
                                                                                   "replace")), s)


def _ms3(v: Optional[float]) -> str:
    return "-" if v is None else "%.3f" % v


# Each variable as a Python expression over: ex (the Exchange), red (the Redactor), clock,
# h (the wanted request headers, lower-case bytes name -> bytes value), _esc, _ms3, _hdr,
# _ref, W (the worker id as text). compile_format joins them into one generated function:
# one call per line instead of one per variable.
_EXPR = {
    "remote_addr": '_esc(red.field("client_ip", ex.client_ip or "-"))',
    "remote_user": '"-"',
    "time_local": "clock.local(ex.start)",
    "time_iso8601": "clock.iso(ex.start)",
    "msec": '"%.3f" % ex.start',
    "request": '_esc(ex.method + " " + red.target(ex.target) + " " + ex.version)',
    "request_method": "_esc(ex.method)",
    "request_uri": "_esc(red.target(ex.target))",
    "server_protocol": "ex.version",
    "status": "str(ex.status)",
    "body_bytes_sent": "str(ex.bytes_out or 0)",
    "bytes_sent": "str(ex.bytes_out or 0)",
    "request_length": "str(ex.bytes_in or 0)",
    "request_time": '"%.3f" % (ex.duration or 0.0)',
    "upstream_addr": '_esc(ex.endpoint or "-")',
    "upstream_response_time": "_ms3(ex.upstream_seconds)",
    "upstream_status": '(str(ex.status) if ex.attempts else "-")',
    "request_id": '_esc(ex.request_id or "-")',
    "host": '_esc(red.field("host", ex.host or ex.domain or "-"))',
    "scheme": '(ex.scheme or "http")',
    "route": '_esc(str(ex.route) if ex.route is not None else "-")',
    "cluster": '_esc(ex.cluster or "-")',
    "error": '(_esc(red.text(ex.error)) if ex.error else "-")',
    "worker": "W",
}


def compile_format(fmt: str, red: Redactor, clock: Optional[_Clock] = None,
                   worker: int = 0) -> Callable:
    """A text format -> ``render(exchange) -> str`` (without the newline).

    The format is compiled once into the source of one function (like a template engine),
    so rendering a line is one call; every variable's expression is fixed in ``_EXPR``
    (no text of the format reaches the generated code except as string literals).
    """
    clock = clock or _Clock()
    parts: list[str] = []
    wanted: list[bytes] = []
    pos = 0
    for m in VAR_RE.finditer(fmt):
        if m.start() > pos:
            parts.append(repr(fmt[pos:m.start()]))
        name = m.group(1).strip("{}")
        if name.startswith("http_"):
            hname = name[5:].replace("_", "-")
            key = hname.encode("latin-1")
            if key not in wanted:
                wanted.append(key)
            if hname == "referer":
                parts.append(f"_ref(h.get({key!r}))")
            else:
                parts.append(f"_hdr({hname!r}, h.get({key!r}))")
        else:
            parts.append(_EXPR[name])
        pos = m.end()
    if pos < len(fmt):
        parts.append(repr(fmt[pos:]))
    lines = ["def render(ex):"]
    if wanted:
        lines += ["    h = {}",
                  "    for k, v in ex.request_headers or ():",
                  "        k = k.lower()",
                  "        if k in WANTED and k not in h:",
                  "            h[k] = v"]
    lines.append(f"    return ''.join(({', '.join(parts)},))" if parts else "    return ''")

    def _hdr(name: str, v: Optional[bytes]) -> str:
        if v is None:
            return "-"
        out = red.header(name, v.decode("latin-1"))
        return "-" if out is None else _esc(out)

    def _ref(v: Optional[bytes]) -> str:
        return "-" if v is None else (_esc(red.target(v.decode("latin-1"))) or "-")

    ns = {"red": red, "clock": clock, "_esc": _esc, "_ms3": _ms3, "_hdr": _hdr, "_ref": _ref,
          "W": str(worker), "WANTED": frozenset(wanted)}
    exec("\n".join(lines), ns)  # noqa: S102 - source built from _EXPR and repr() literals
    return ns["render"]


class AccessLog:
    """The sink: ``sink(exchange)`` renders and buffers one line."""

    def __init__(self, spec: dict, redaction: Optional[dict], ctx):
        self.spec = spec
        self.redaction = redaction
        self.ctx = ctx
        self.red = build_redactor(redaction)
        self.worker = getattr(ctx, "worker_id", 0) or 0
        self._clock = _Clock()
        metrics = getattr(ctx, "metrics", None)

        def on_error(e: OSError) -> None:
            if metrics is not None:
                metrics.inc("dispa_log_write_errors_total", (("sink", "access_log"),))

        self.file = AppendFile(spec["path"], getattr(ctx, "loop", None),
                               spec.get("buffer_size", 65536), spec.get("flush_interval", 1.0),
                               on_error)
        fmt = spec.get("format", "json")
        if fmt == "json":
            self._render = self._json
        else:
            text = compile_format(fmt, self.red, self._clock, self.worker)
            self._render = lambda ex: (text(ex) + "\n").encode("utf-8", "replace")

    def _json(self, ex) -> bytes:
        red = self.red
        ua = ref = None
        for k, v in ex.request_headers or ():  # one pass for both headers
            if len(k) == 10 and k.lower() == b"user-agent":
                ua = v.decode("latin-1")
            elif len(k) == 7 and k.lower() == b"referer":
                ref = v.decode("latin-1")
        rec = AccessRecord(
            time=self._clock.iso_utc_ms(ex.start),
            remote_addr=red.field("client_ip", ex.client_ip or "-"),
            method=ex.method, uri=red.target(ex.target), protocol=ex.version,
            status=ex.status, body_bytes_sent=ex.bytes_out or 0,
            request_length=ex.bytes_in or 0, request_time=int((ex.duration or 0.0) * 1e6) / 1e6,
            host=red.field("host", ex.host), request_id=ex.request_id or None,
            referer=red.target(ref) if ref else None,
            user_agent=red.header("user-agent", ua) if ua else None,
            upstream_addr=ex.endpoint,
            upstream_response_time=(int(ex.upstream_seconds * 1e6) / 1e6 if ex.attempts
                                    else None),
            upstream_attempts=len(ex.attempts or ()),
            route=str(ex.route) if ex.route is not None else None, cluster=ex.cluster,
            error=red.text(ex.error) if ex.error else None, worker=self.worker)
        return _ENCODER.encode(rec) + b"\n"

    def __call__(self, ex) -> None:
        self.file.write(self._render(ex))

    def reopen(self) -> None:
        """SIGUSR1 / rotation: write what is buffered, then open the path again."""
        self.file.reopen()

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def factory(snapshot, ctx, previous):
    """``exchange.SINK_FACTORIES`` entry: the access log sink, or None when it is off."""
    obs = getattr(snapshot, "observability", None) or {}
    spec = obs.get("access_log")
    if not spec:
        return None
    redaction = obs.get("redaction")
    if previous is not None and previous.spec == spec and previous.redaction == redaction:
        return previous
    return AccessLog(spec, redaction, ctx)


def _register() -> None:
    from dispa.observability.exchange import SINK_FACTORIES
    if factory not in SINK_FACTORIES:
        SINK_FACTORIES.append(factory)


_register()
