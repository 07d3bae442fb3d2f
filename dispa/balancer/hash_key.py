"""Hash keys: the bytes a consistent-hash selector hashes for one request.

Theory of operation
-------------------
A key is described once, in config, by a *spec*: one part or several joined with ``+``.

==================  =====================================================================
part                value (raw bytes, never decoded)
==================  =====================================================================
``client_ip``       the downstream address as text (``"203.0.113.7"``; nginx
                    ``$remote_addr``)
``method``          the request method (``GET``)
``path``            the path of the request target, without the query
``uri``             path plus ``?query`` when there is a query (nginx ``$request_uri``)
``query:<arg>``     the raw value of the first ``<arg>=`` in the query string; the name
                    matches case-insensitively, like nginx ``$arg_<arg>``
``header:<name>``   the field's value; several fields of that name are joined with
                    ``", "`` (RFC 9110 §5.3; nginx >= 1.23 ``$http_<name>`` does the same)
``cookie:<name>``   the value of the first cookie ``<name>`` across every ``Cookie`` field
                    (RFC 6265 §4.2.1, §5.4: pairs split on ``;``); names are case-sensitive
==================  =====================================================================

Rules:

1. A part that is absent *or empty* is replaced by the client IP, so a request without the
   header still sticks to one endpoint per client instead of piling every such request on
   the endpoint that owns the empty key. (nginx falls back to round robin for an empty
   key: one more reason not to let it happen.)
2. A single-part key is exactly that part's bytes, so ``header:x-user`` hashes like nginx's
   ``hash $http_x_user consistent`` and ``query:k`` like ``hash $arg_k consistent``.
3. Parts of a combined key are joined with ``separator`` (default ``b"\\x1f"``, ASCII Unit
   Separator: a control byte that RFC 9110 §5.5 forbids in field values and that a raw
   request target cannot carry), so ``("ab", "c")`` and ``("a", "bc")`` never collide. To
   reproduce an nginx key such as ``hash "$remote_addr:$http_x_user"``, pass
   ``separator=b":"``.
4. Text inputs (``method``, ``path``, ``query``, ``client_ip``) are the latin-1 decoding of
   the wire bytes (how ``dispa.proxy`` holds them), so they are encoded back with latin-1
   and the key is the wire bytes again; text outside latin-1 is encoded as UTF-8.

The spec is parsed once (:func:`compile_hash_key`); :meth:`HashKey.build` runs per request
and does one pass over the headers per header or cookie part. Not yet benchmarked.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["DEFAULT_SEPARATOR", "PART_KINDS", "HashKey", "compile_hash_key"]

#: ASCII Unit Separator: cannot occur in a field value (RFC 9110 §5.5) or a raw target.
DEFAULT_SEPARATOR = b"\x1f"

#: Parts that take no argument, and parts written ``kind:<name>``.
_PLAIN = ("client_ip", "method", "path", "uri")
_NAMED = ("header", "cookie", "query")
PART_KINDS = _PLAIN + _NAMED

# RFC 9110 §5.6.2 tchar, for header names (minus "+", the part separator of a spec).
_TCHAR = frozenset(b"!#$%&'*-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")

_CLIENT_IP, _METHOD, _PATH, _URI, _HEADER, _COOKIE, _QUERY = range(7)
_CODES = {"client_ip": _CLIENT_IP, "method": _METHOD, "path": _PATH, "uri": _URI,
          "header": _HEADER, "cookie": _COOKIE, "query": _QUERY}


def _b(s: str | bytes | None) -> bytes:
    if s is None:
        return b""
    if isinstance(s, bytes):
        return s
    try:
        return s.encode("latin-1")
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogatepass")


def _parse_part(text: str) -> tuple[int, bytes]:
    part = text.strip()
    if part in _PLAIN:
        return _CODES[part], b""
    kind, sep, name = part.partition(":")
    kind = kind.strip()
    name = name.strip()
    if not sep or kind not in _NAMED:
        raise ValueError(f"unknown hash key part {part!r}; expected one of "
                         f"{', '.join(_PLAIN)} or header:<name>, cookie:<name>, query:<arg>")
    if not name:
        raise ValueError(f"hash key part {part!r} needs a name after ':'")
    raw = _b(name)
    if kind == "header":
        if any(c not in _TCHAR for c in raw):
            raise ValueError(f"hash key part {part!r}: {name!r} is not a valid header name")
        return _HEADER, raw.lower()
    if any(c <= 0x20 or c in b";=&#\x7f" for c in raw):
        raise ValueError(f"hash key part {part!r}: {name!r} is not a valid {kind} name")
    return _CODES[kind], raw.lower() if kind == "query" else raw


class HashKey:
    """A parsed hash-key spec. Build with :func:`compile_hash_key`; immutable.

    ``parts`` is the tuple of ``(kind, name)`` pairs it was built from (``name`` is ``""`` for
    plain parts); ``separator`` the joining bytes.
    """

    __slots__ = ("_parts", "separator", "spec")

    def __init__(self, parts: tuple[tuple[int, bytes], ...], separator: bytes, spec: str) -> None:
        self._parts = parts
        self.separator = separator
        self.spec = spec

    @property
    def parts(self) -> tuple[tuple[str, str], ...]:
        kinds = {v: k for k, v in _CODES.items()}
        return tuple((kinds[c], n.decode("latin-1")) for c, n in self._parts)

    def __repr__(self) -> str:
        return f"<HashKey {self.spec!r}>"

    def build(self, method: str | bytes, path: str | bytes, query: str | bytes | None,
              headers: Sequence[tuple[bytes, bytes]], client_ip: str | bytes) -> bytes:
        """The key bytes for one request.

        ``headers`` is the raw field list ``[(name, value), ...]`` with any casing; ``query``
        is the query string without ``?`` (``None`` or empty for none). Never raises for
        well-typed input; a missing or empty part becomes ``client_ip`` (rule 1).
        """
        ip = _b(client_ip)
        out = []
        for code, name in self._parts:
            if code == _CLIENT_IP:
                v = ip
            elif code == _HEADER:
                v = _header(headers, name)
            elif code == _COOKIE:
                v = _cookie(headers, name)
            elif code == _QUERY:
                v = _query_arg(_b(query), name)
            elif code == _PATH:
                v = _b(path)
            elif code == _URI:
                q = _b(query)
                v = _b(path) + b"?" + q if q else _b(path)
            else:
                v = _b(method)
            out.append(v if v else ip)
        if len(out) == 1:
            return out[0]
        return self.separator.join(out)

    __call__ = build


def compile_hash_key(spec: str, *, separator: bytes = DEFAULT_SEPARATOR) -> HashKey:
    """Parse ``spec`` (e.g. ``"client_ip+header:x-user"``) into a :class:`HashKey`.

    Raises ``ValueError`` for an empty spec or part, an unknown part, a named part without a
    name or with characters its kind cannot carry; ``TypeError`` if ``separator`` is not
    ``bytes``.
    """
    if not isinstance(spec, str):
        raise TypeError("a hash key spec is a str")
    if not isinstance(separator, bytes):
        raise TypeError("separator must be bytes")
    if not spec.strip():
        raise ValueError("empty hash key spec")
    pieces = spec.split("+")
    if any(not p.strip() for p in pieces):
        raise ValueError(f"hash key spec {spec!r} has an empty part")
    return HashKey(tuple(_parse_part(p) for p in pieces), separator, spec)


def _header(headers: Sequence[tuple[bytes, bytes]], want: bytes) -> bytes:
    found = [v.strip(b" \t") for n, v in headers if len(n) == len(want) and n.lower() == want]
    if not found:
        return b""
    return found[0] if len(found) == 1 else b", ".join(found)


def _cookie(headers: Sequence[tuple[bytes, bytes]], want: bytes) -> bytes:
    for n, v in headers:
        if len(n) == 6 and n.lower() == b"cookie":
            for pair in v.split(b";"):
                name, eq, value = pair.partition(b"=")
                if eq and name.strip(b" \t") == want:
                    return value.strip(b" \t")
    return b""


def _query_arg(query: bytes, want: bytes) -> bytes:
    if not query:
        return b""
    for pair in query.split(b"&"):
        name, eq, value = pair.partition(b"=")
        if eq and name.lower() == want:
            return value
    return b""
