"""A filter for the TLS tests (``tests.support.tls_filters:TlsEcho``): answers
``/tls-info`` with what filters see of the connection (scheme, ``req.ctx["tls"]``)."""

from __future__ import annotations

import json

from dispa.plugins.api import Filter, Response


class TlsEcho(Filter):
    name = "test-tls-echo"

    def on_request(self, req):
        if req.path != "/tls-info":
            return None
        return Response(200, json.dumps({"scheme": req.scheme, "tls": req.ctx.get("tls")}),
                        {"content-type": "application/json"})
