"""The request phases (ARCHITECTURE §2, STYLE C3) and the filter hook names.

Every protocol walks the same phases in this order. The compiled Session implements the
core phases (accept, parse head, route, upstream choice, forward, log) today; the filter
phases (request, upstream request, response) are the extension points that the filter API
plugs into. A route whose filter chain is empty never pays for them: the chain compiler
keeps only overridden hooks, so an empty chain is an empty tuple and the Session skips it.

| # | phase | who | filter hook | may answer? |
| --- | --- | --- | --- | --- |
| 1 | accept | core | ``on_connect`` | close only |
| 2 | parse head | compiled parser | - | 400/413/414/431/501/505 |
| 3 | route | core (interception, later routing rules) | - | 404/421 |
| 4 | request | chain, declared order | ``on_request`` | yes |
| 5 | upstream choice | selector | - | 502/503 |
| 6 | upstream request | chain | ``on_upstream_request`` | no |
| 7 | forward | core (pool, retries) | - | 502/504 |
| 8 | response | chain, reverse order | ``on_response`` | replace |
| 9 | log | chain + metrics | ``on_log`` | no |
"""

from __future__ import annotations

import enum


class Phase(enum.IntEnum):
    ACCEPT = 1
    PARSE_HEAD = 2
    ROUTE = 3
    REQUEST = 4
    UPSTREAM_CHOICE = 5
    UPSTREAM_REQUEST = 6
    FORWARD = 7
    RESPONSE = 8
    LOG = 9


# Hook name per filter phase, in the order a request meets them.
HOOKS: dict[Phase, str] = {
    Phase.ACCEPT: "on_connect",
    Phase.REQUEST: "on_request",
    Phase.UPSTREAM_REQUEST: "on_upstream_request",
    Phase.RESPONSE: "on_response",
    Phase.LOG: "on_log",
}
