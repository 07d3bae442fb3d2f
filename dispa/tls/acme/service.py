"""The master's ACME side: starts and stops the manager with the configuration, and turns
pending challenges into snapshots for the workers.

Theory of operation
-------------------
The master keeps ``loaded`` (the compiled configuration) and publishes
``loaded.snapshot``. While challenges are pending, the published snapshot is
``challenges.with_challenges(base, pending)``, where ``base`` is the snapshot compiled
from the file (plus discovered endpoints): the master passes every new base through
:meth:`AcmeService.snapshot_for`, and a challenge coming or going strips the previous
challenges off the current snapshot first, so a reload or a discovery update while a
challenge is pending keeps it, and the end of the challenge leaves exactly the base.
:meth:`publish` holds the master's reload lock and returns once every worker ACKed, so
the CA is told to validate only after every worker answers. (The TLS store's
``publish_tls`` starts from the current snapshot, so it keeps pending challenges too.)

Cheap when ACME is off: nothing here imports the ``acme`` library or cryptography until a
``[tls.acme]`` table with ``enabled = true`` shows up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging

log = logging.getLogger("dispa.acme")


def acme_config(loaded):
    """The ``[tls.acme]`` table of a loaded configuration, or None."""
    return getattr(getattr(loaded.model, "tls", None), "acme", None)


class AcmeService:
    """Glue between :class:`dispa.server.master.Master` and the ACME manager."""

    def __init__(self, master):
        self.master = master
        self.manager = None
        self.challenges: dict | None = None
        self._plain_pipeline = None  # the pipeline before the responder was added
        self._cfg = None
        self._switch: asyncio.Task | None = None

    def snapshot_for(self, snapshot):
        """``snapshot`` (compiled from the file, maybe with discovered endpoints) with the
        pending challenges; itself when none is pending. The master calls this wherever it
        makes a new snapshot to publish."""
        if not self.challenges:
            return snapshot
        from dispa.tls.acme.challenges import with_challenges

        self._plain_pipeline = snapshot.pipeline
        return with_challenges(snapshot, self.challenges)

    def _strip(self, snapshot):
        if snapshot.acme_challenges is None or self._plain_pipeline is None:
            return snapshot
        from dispa.tls.acme.challenges import replace_fields

        return replace_fields(snapshot, pipeline=self._plain_pipeline, acme_challenges=None)

    async def publish(self, challenges: dict | None) -> None:
        """Make every worker answer ``challenges`` (None: none); returns after the ACKs."""
        m = self.master
        async with m._reload_lock:
            base = self._strip(m.loaded.snapshot)
            self.challenges = challenges
            snapshot = self.snapshot_for(base)
            m.loaded = dataclasses.replace(m.loaded, snapshot=snapshot)
            errors = await m.supervisor.apply(snapshot)
        if errors:
            log.warning("acme: challenge snapshot not applied everywhere: %s", errors)

    def reconfigure(self, loaded) -> None:
        """Start, restart or stop the manager for ``loaded``'s ``[tls.acme]`` (in the
        background: stopping a manager may need to publish, which takes the reload lock)."""
        cfg = acme_config(loaded)
        if cfg is not None and not cfg.enabled:
            cfg = None
        if cfg == self._cfg:
            return
        self._cfg = cfg
        previous = self._switch
        self._switch = asyncio.ensure_future(self._replace(cfg, previous))

    async def _replace(self, cfg, previous) -> None:
        if previous is not None:
            await previous
        old, self.manager = self.manager, None
        if old is not None:
            await old.close()
            if self.challenges:
                await self.publish(None)
        if cfg is None:
            return
        from dispa.tls.acme.manager import AcmeManager

        self.manager = AcmeManager(cfg, publish=self.publish, on_issued=self._on_issued)
        self.manager.start()
        log.info("acme: manager started", extra={"fields": {
            "certificates": [c.name for c in self.manager.certs],
            "challenge": cfg.challenge_type, "storage": cfg.storage}})

    async def _on_issued(self, name: str) -> None:
        reload = getattr(self.master, "reload_certificates", None)
        if reload is None:
            return  # the TLS store's file polling picks the new files up
        r = reload()
        if inspect.isawaitable(r):
            await r

    async def close(self) -> None:
        self._cfg = None
        if self._switch is not None:
            await self._switch
        if self.manager is not None:
            await self.manager.close()
            self.manager = None

    def status(self) -> dict | None:
        return None if self.manager is None else self.manager.status()

    def gauges(self) -> list:
        return [] if self.manager is None else self.manager.gauges()
