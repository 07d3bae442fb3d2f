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

Cost (docs/logging.md#cost): each format has a fast path and a reference path that give
the same line. The fast path takes the raw values, asks the redactor once per line
whether any client string could need redaction (:meth:`Redactor.suspect` over them
joined: one ``translate`` and a few substring tests) and checks once that no value needs
escaping, then fills one %-format (text) or builds the msgspec record (JSON); otherwise
the line goes through the reference path, every value redacted and escaped on its own.
Text lines are kept as ``str`` and encoded once per flush. tests/unit/observability/
test_log_fast_path.py holds both paths to the same output over a corpus of secrets.
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


# The fast path's raw value of a variable (no redaction, no escaping) where it differs from
# _EXPR; the generated code checks once per line that nothing needs either (see
# compile_format). Variables whose value comes from the client and may carry a secret are
# listed in _SCANNED with the raw string the redactor would look at.
_RAW = {
    "remote_addr": '(ex.client_ip or "-")',
    "request": '(ex.method + " " + t + " " + ex.version)',
    "request_method": "ex.method",
    "request_uri": "t",
    "upstream_addr": '(ex.endpoint or "-")',
    "request_id": '(ex.request_id or "-")',
    "host": '(ex.host or ex.domain or "-")',
    "route": '(str(ex.route) if ex.route is not None else "-")',
    "cluster": '(ex.cluster or "-")',
    "error": '(e or "-")',
}
# the record field whose [[fields]] rule applies to a variable (then: the _EXPR path)
_FIELD_OF = {"remote_addr": "client_ip", "host": "host"}
_SCANNED = {"request": "t", "request_uri": "t", "error": '(e or "")'}


def _safe(s: str) -> bool:
    """True when nginx escaping leaves ``s`` unchanged (printable ASCII, no quote or
    backslash): four C-level checks instead of a regex per variable."""
    return s.isascii() and s.isprintable() and '"' not in s and "\\" not in s


def compile_format(fmt: str, red: Redactor, clock: Optional[_Clock] = None,
                   worker: int = 0, newline: bool = False) -> Callable:
    """A text format -> ``render(exchange) -> str`` (the line; with its ``\\n`` when
    ``newline``, as the sink writes it).

    The format is compiled once into the source of two functions (like a template
    engine), so rendering a line is one call; every variable's expression is fixed in
    ``_EXPR`` / ``_RAW`` (no text of the format reaches the generated code except as
    string literals). ``slow`` redacts and escapes each variable (the reference);
    ``render`` (the fast path) takes the raw values, asks the redactor once whether any
    of the client's strings could need redaction (:meth:`Redactor.suspect` over them
    joined) and checks once that the values need no escaping, then fills one %-format;
    when either check fails it returns ``slow(ex)``, so both always give the same line.
    """
    clock = clock or _Clock()
    parts: list[str] = []      # slow: one expression per piece
    raw: list[str] = []        # fast: one expression per variable
    lits: list[str] = []       # fast: the %-format
    scanned: list[str] = []    # fast: the strings the redactor must see
    prelude: list[str] = []
    wanted: list[bytes] = []
    pos = 0
    needs_t = needs_e = False
    for m in VAR_RE.finditer(fmt):
        if m.start() > pos:
            parts.append(repr(fmt[pos:m.start()]))
            lits.append(fmt[pos:m.start()].replace("%", "%%"))
        name = m.group(1).strip("{}")
        lits.append("%s")
        if name.startswith("http_"):
            hname = name[5:].replace("_", "-")
            key = hname.encode("latin-1")
            if key not in wanted:
                wanted.append(key)
            var = "h%d" % wanted.index(key)
            if hname == "referer":
                parts.append(f"_ref(h.get({key!r}))")
                # _ref: absent or empty -> "-"
                line = f"    {var} = hb({key!r}); {var} = {var}.decode('latin-1') if {var} else '-'"
                raw.append(var)
                scanned.append(var)
            else:
                parts.append(f"_hdr({hname!r}, h.get({key!r}))")
                if red._headers.get(hname.lower()) is not None:
                    raw.append(f"_hdr({hname!r}, hb({key!r}))")  # a header rule: exact path
                    line = None
                else:
                    line = (f"    {var} = hb({key!r}); "
                            f"{var} = '-' if {var} is None else {var}.decode('latin-1')")
                    raw.append(var)
                    scanned.append(var)
            if line is not None and line not in prelude:
                prelude.append(line)
        else:
            parts.append(_EXPR[name])
            field = _FIELD_OF.get(name)
            if name in _RAW and not (field and red._fields.get(field)):
                raw.append(_RAW[name])
            else:
                raw.append(_EXPR[name])
            if name in _SCANNED:
                scanned.append(_SCANNED[name])
            needs_t = needs_t or name in ("request", "request_uri")
            needs_e = needs_e or name == "error"
        pos = m.end()
    if pos < len(fmt):
        parts.append(repr(fmt[pos:]))
        lits.append(fmt[pos:].replace("%", "%%"))
    nl = "\n" if newline else ""
    lits.append(nl)
    lines = ["def slow(ex):"]
    if wanted:
        lines += ["    h = {}",
                  "    for k, v in ex.request_headers or ():",
                  "        k = k.lower()",
                  "        if k in WANTED and k not in h:",
                  "            h[k] = v"]
    lines.append(f"    return ''.join(({', '.join(parts)}, {nl!r}))")
    lines.append("def render(ex):")
    if wanted:
        lines.append("    hb = ex.header_bytes")
    if needs_t:
        lines.append("    t = ex.target")
    if needs_e:
        lines.append("    e = ex.error")
    lines += prelude
    lines.append(f"    v = ({''.join(r + ', ' for r in raw)})")
    check = "_safe(''.join(v))"
    if scanned and (red._needles or red._always or red._qnames):
        # header values repeat across requests (User-Agent, Referer): memoised checks;
        # the rest (target, error) joined into one check
        uniq = list(dict.fromkeys(scanned))
        heads = [x for x in uniq if x.startswith("h")]
        rest = [x for x in uniq if not x.startswith("h")]
        conds = [f"not suspect_cached({x})" for x in heads]
        if len(rest) == 1:
            conds.insert(0, f"not suspect({rest[0]})")
        elif rest:
            conds.insert(0, f"not suspect('\\0'.join(({''.join(x + ', ' for x in rest)})))")
        check = " and ".join(conds + [check])
    lines.append(f"    if {check}:")
    lines.append("        return FMT % v")
    lines.append("    return slow(ex)")

    def _hdr(name: str, v: Optional[bytes]) -> str:
        if v is None:
            return "-"
        out = red.header(name, v.decode("latin-1"))
        return "-" if out is None else _esc(out)

    def _ref(v: Optional[bytes]) -> str:
        return "-" if v is None else (_esc(red.target(v.decode("latin-1"))) or "-")

    ns = {"red": red, "clock": clock, "_esc": _esc, "_ms3": _ms3, "_hdr": _hdr, "_ref": _ref,
          "W": str(worker), "WANTED": frozenset(wanted), "FMT": "".join(lits),
          "_safe": _safe, "suspect": red.suspect, "suspect_cached": red.suspect_cached}
    exec("\n".join(lines), ns)  # noqa: S102 - source built from _EXPR and repr() literals
    render = ns["render"]
    render.slow = ns["slow"]
    render.source = "\n".join(lines)
    return render


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
        red = self.red
        # the json fast path applies when no field or header rule touches its fields
        # (else every line takes _json_slow, the reference)
        self._json_fast = not (red._fields.get("client_ip") or red._fields.get("host")
                               or red._headers.get("user-agent"))
        self._suspect = (red.suspect if (red._needles or red._always or red._qnames)
                         else None)
        self._suspect_cached = red.suspect_cached
        if fmt == "json":
            self._render = self._json
        else:
            self._render = compile_format(fmt, self.red, self._clock, self.worker, True)
            self.file.text = True  # str lines, encoded once per flush
        self._bind_emit()

    def _json(self, ex) -> bytes:
        if self._json_fast:
            target = ex.target
            hb = ex.header_bytes
            ref = hb(b"referer")
            ua = hb(b"user-agent")
            ref = ref.decode("latin-1") if ref else None
            ua = ua.decode("latin-1") if ua else None
            err = ex.error
            sus = self._suspect
            if sus is None or not (sus(target + "\0" + err if err else target)
                                   or (ua and self._suspect_cached(ua))
                                   or (ref and self._suspect_cached(ref))):
                attempts = ex.attempts
                route = ex.route
                return _ENCODER.encode(AccessRecord(
                    self._clock.iso_utc_ms(ex.start), ex.client_ip or "-", ex.method,
                    target, ex.version, ex.status, ex.bytes_out or 0, ex.bytes_in or 0,
                    int((ex.duration or 0.0) * 1e6) / 1e6, ex.host, ex.request_id or None,
                    ref, ua, ex.endpoint,
                    int(ex.upstream_seconds * 1e6) / 1e6 if attempts else None,
                    len(attempts), str(route) if route is not None else None,
                    ex.cluster, err or None, self.worker)) + b"\n"
        return self._json_slow(ex)

    def _json_slow(self, ex) -> bytes:
        """The reference rendering: every field through the redactor."""
        red = self.red
        ref = ex.header_bytes(b"referer")  # the first of each, like the text formats
        ua = ex.header_bytes(b"user-agent")
        ref = ref.decode("latin-1") if ref else None
        ua = ua.decode("latin-1") if ua else None
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

    def _bind_emit(self) -> None:
        # ``emit``: __call__ with AppendFile.write inlined (one frame less per line);
        # same buffer, same flush rules
        render = self._render
        f = self.file
        buf = f._buf
        limit = f.buffer_size

        def emit(ex) -> None:
            line = render(ex)
            buf.append(line)
            f._size += len(line)
            if f._size >= limit:
                f.flush()
            elif f._timer is None and f.loop is not None:
                f._timer = f.loop.call_later(f.flush_interval, f.flush)
        self.emit = emit

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
