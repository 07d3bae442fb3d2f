"""Observability: Dispa's own logs (:mod:`.logs`) and metrics (:mod:`.metrics`).

Submodules are imported explicitly (``from dispa.observability import metrics``) so that a
worker importing metrics does not pull in anything else.
"""
