"""The HTTP-01 responder (RFC 8555 §8.3) as a filter, compiled in only while a challenge
is pending.

Theory of operation: the master publishes a snapshot whose pipeline starts with this
filter (see ``challenges.with_challenges``), named :data:`FILTER_NAME`, with the pending
``token -> key authorization`` map as its config. The worker's pipeline
(``dispa.proxy.pipeline``) knows the name: it lets requests for hosts outside the domain
interception reach this filter (the CA asks for the name being validated, which the
interception may not list) and, unless ``apply_before_domain_match`` is on, answers
everything else for them with the usual rejection, without running the operator's global
filters. As the first global filter it also runs before routing rules (an HTTP -> HTTPS
redirect route must not hide the challenge). When nothing is pending the snapshot has no
such filter and the request path is exactly the configured one: the responder costs
nothing then.

``on_request`` is one ``str.startswith`` and one dict lookup; a request for a path
outside ``/.well-known/acme-challenge/`` or an unknown token goes on unchanged.
"""

from __future__ import annotations

import msgspec

from dispa.plugins.api import BuildContext, Filter, Request, Response

__all__ = ["AcmeHttp01", "AcmeHttp01Config", "FILTER_NAME", "PREFIX", "TYPE"]

PREFIX = "/.well-known/acme-challenge/"
# The plugin type the master puts in the snapshot: an import path, so the filter needs no
# entry point and never shows among the operator's plugin types.
TYPE = "dispa.tls.acme.http01:AcmeHttp01"
# The filter instance name in the snapshot; a leading underscore keeps it apart from the
# operator's [[plugins.plugins]] names, which are identifiers of their own.
FILTER_NAME = "_acme_http01"


class AcmeHttp01Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``tokens``: token -> key authorization of every pending HTTP-01 challenge."""

    tokens: dict[str, str] = {}


class AcmeHttp01(Filter):
    """Answers ``GET /.well-known/acme-challenge/<token>`` with the key authorization
    (200, ``text/plain``)."""

    name = "acme_http01"
    Config = AcmeHttp01Config

    def __init__(self, config: AcmeHttp01Config, ctx: BuildContext):
        super().__init__(config, ctx)
        self._tokens = {t: ka.encode("ascii") for t, ka in config.tokens.items()}

    def on_request(self, req: Request) -> Response | None:
        path = req.path
        if not path.startswith(PREFIX) or req.method not in ("GET", "HEAD"):
            return None
        ka = self._tokens.get(path[len(PREFIX):])
        if ka is None:
            return None
        return Response(200, ka, {"content-type": "text/plain", "cache-control": "no-store"})
