"""Messages on the master <-> worker channel (tagged msgspec Structs).

Master -> worker: Init, ApplySnapshot, HealthUpdate, StatsRequest, Drain, SetLogLevel,
ReopenLogs.
Worker -> master: Ready, Ack, Nack, Stats, Passive.

Every message is one msgpack frame (see ``channel.py``). The tag is the class name, so a
worker and a master of the same build always agree; a frame that does not decode is a bug
and closes the channel.
"""

from __future__ import annotations

import msgspec

from dispa.config.snapshot import Snapshot, StaticSpec


class Init(msgspec.Struct, tag=True, frozen=True):
    """First frame to a new worker: who it is, what to bind, and what to serve."""

    worker_id: int
    generation: int
    static: StaticSpec
    snapshot: Snapshot
    health: dict[str, bool]  # "cluster/endpoint_id" -> healthy
    log_format: str
    log_level: str
    slowdown_us: int = 0  # perf-gate self-test only: busy-wait this long per request


class ApplySnapshot(msgspec.Struct, tag=True, frozen=True):
    snapshot: Snapshot


class HealthUpdate(msgspec.Struct, tag=True, frozen=True):
    """Active health-check results: "cluster/endpoint_id" -> healthy (only the changes)."""

    states: dict[str, bool]


class StatsRequest(msgspec.Struct, tag=True, frozen=True):
    seq: int


class Drain(msgspec.Struct, tag=True, frozen=True):
    """Stop accepting, finish in-flight requests within ``deadline_seconds``, then exit."""

    deadline_seconds: float


class SetLogLevel(msgspec.Struct, tag=True, frozen=True):
    level: str


class ReopenLogs(msgspec.Struct, tag=True, frozen=True):
    """SIGUSR1 or a rotation by the master: flush and reopen the log files."""


class PurgeCache(msgspec.Struct, tag=True, frozen=True):
    """Remove cached responses in every cache filter of the worker: ``key`` exactly, or
    every key starting with ``prefix`` ("" empties it); ``plugin`` limits it to one."""

    prefix: str | None = None
    key: str | None = None
    plugin: str | None = None


class Ready(msgspec.Struct, tag=True, frozen=True):
    """The worker has bound its listeners and applied its first snapshot."""

    worker_id: int
    pid: int
    version: str


class Ack(msgspec.Struct, tag=True, frozen=True):
    version: str


class Nack(msgspec.Struct, tag=True, frozen=True):
    version: str
    error: str


class Stats(msgspec.Struct, tag=True, frozen=True):
    seq: int
    export: dict


class Passive(msgspec.Struct, tag=True, frozen=True):
    """Passive health signals seen by a worker: (cluster, endpoint_id, event) triples."""

    events: list[tuple[str, str, str]]


class Fatal(msgspec.Struct, tag=True, frozen=True):
    """The worker cannot run (e.g. its listener cannot bind); the master must not respawn it."""

    error: str


ToWorker = Init | ApplySnapshot | HealthUpdate | StatsRequest | Drain | SetLogLevel | PurgeCache \
    | ReopenLogs
ToMaster = Ready | Ack | Nack | Stats | Passive | Fatal
