"""Outlier ejection: passive detection of misbehaving endpoints (Envoy semantics, sans-I/O).

Theory of operation
-------------------
The detector watches the responses of every endpoint of one cluster, in one worker, and
*ejects* (takes out of the selector's mask for a while) an endpoint that looks broken
compared with its own history or with its peers. It follows Envoy's outlier detection
(``envoy.config.cluster.v3.OutlierDetection``; the "Outlier detection" architecture page and
``source/common/upstream/outlier_detection_impl.cc``):

* **Consecutive 5xx** (``consecutive_5xx``, default 5): that many 5xx answers or
  locally-originated failures (connect error, reset, timeout: ``status=0``) in a row.
* **Consecutive gateway failures** (``consecutive_gateway_failure``, off by default as
  Envoy's ``enforcing_consecutive_gateway_failure = 0``): 502, 503, 504 or a local failure
  in a row; another 5xx resets this streak, as in Envoy.
* **Success rate** (``success_rate_enabled``, off by default): every ``interval``, the
  endpoints that served at least ``success_rate_request_volume`` requests in the interval
  are compared; if there are at least ``success_rate_minimum_hosts`` of them, each one whose
  success rate is below ``mean - success_rate_stdev_factor * stdev`` (population stdev) is
  ejected.

An ejected endpoint stays out for ``base_ejection_time * multiplier`` capped at
``max_ejection_time``. The multiplier grows by one on each ejection (while the product stays
below ``max_ejection_time + base_ejection_time``, as Envoy bounds it) and shrinks by one at
each ``interval`` sweep that finds the endpoint in service, so a flapping endpoint is kept
out longer and a recovered one is forgiven over time.

Rules:

1. ``max_ejection_percent``: an ejection happens only if afterwards at most that share of
   the endpoints is ejected, and at least one endpoint is always left in (so a cluster of
   one endpoint never ejects it, and neither does a cluster of two with the default 10%).
   ``always_eject_one_host`` (Envoy's flag) allows one ejection whatever the percentage,
   still never the last endpoint. A refused ejection counts as ``ejections_overflow``, and
   the streak that caused it starts again, as in Envoy.
2. Time is an argument (monotonic seconds). ``record``, ``tick``, ``ejected`` and ``mask``
   first let time advance: endpoints whose ejection ended are brought back at once (Envoy
   waits for the next interval sweep; we need no timer), and every elapsed ``interval``
   runs one sweep (multiplier decay, success-rate detection). After a long idle period the
   catch-up stops as soon as nothing is ejected and every multiplier is zero, so it costs at
   most ``(max_ejection_time / interval + max multiplier + 2)`` sweeps of O(n).
3. Outcomes of an ejected endpoint (requests already in flight) are counted for the success
   rate but start no ejection; its streaks are cleared when it comes back.
4. Not modelled: Envoy's interval jitter, the ``enforcing_*`` percentages (detection is
   always enforced when configured), split local/external origin errors, and the
   failure-percentage detector.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import msgspec
from msgspec import Meta

__all__ = ["LOCAL_FAILURE", "OutlierConfig", "OutlierDetector"]

MAX_SECONDS = 7 * 24 * 3600
Seconds = Annotated[float, Meta(gt=0, le=MAX_SECONDS)]

#: ``status`` for a locally-originated failure: connect error, reset, upstream timeout.
#: Envoy maps these to 503 when origins are not split; they count as 5xx and gateway failures.
LOCAL_FAILURE = 0

_GATEWAY_STATUSES = frozenset((502, 503, 504))


class OutlierConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Outlier detection settings; names and defaults are Envoy's unless noted
    (docs/resilience.md lists every key)."""

    consecutive_5xx: Annotated[int, Meta(ge=0)] = 5
    consecutive_gateway_failure: Annotated[int, Meta(ge=0)] = 0  # Envoy: detected, not enforced
    interval: Seconds = 10.0
    base_ejection_time: Seconds = 30.0
    max_ejection_time: Seconds = 300.0
    max_ejection_percent: Annotated[float, Meta(ge=0, le=100)] = 10.0
    always_eject_one_host: bool = False
    success_rate_enabled: bool = False  # Envoy: on, via enforcing_success_rate = 100
    success_rate_minimum_hosts: Annotated[int, Meta(ge=1)] = 5
    success_rate_request_volume: Annotated[int, Meta(ge=1)] = 100
    success_rate_stdev_factor: Annotated[float, Meta(gt=0, le=100)] = 1.9  # Envoy: 1900 / 1000

    def __post_init__(self) -> None:
        if self.max_ejection_time < self.base_ejection_time:
            raise ValueError("max_ejection_time must be >= base_ejection_time")


_COUNTERS = ("ejections_total", "ejections_consecutive_5xx", "ejections_consecutive_gateway_failure",
             "ejections_success_rate", "ejections_overflow", "unejections_total", "sweeps")


class OutlierDetector:
    """Outlier detection over ``n_endpoints`` endpoints (indexes as for selectors).

    ``OutlierDetector(n_endpoints, config=None)``. Raises ``ValueError`` for fewer than one
    endpoint. Not thread-safe: one per worker and cluster.
    """

    __slots__ = ("config", "_n", "_c5", "_cgw", "_req", "_ok", "_until", "_mult", "_times",
                 "_ejected", "_next_sweep", "_now", "counters", "last_success_rate")

    def __init__(self, n_endpoints: int, config: OutlierConfig | None = None) -> None:
        if n_endpoints < 1:
            raise ValueError("an outlier detector needs at least one endpoint")
        self.config = config if config is not None else OutlierConfig()
        n = self._n = n_endpoints
        self._c5 = [0] * n
        self._cgw = [0] * n
        self._req = [0] * n  # this interval's requests and successes (success rate)
        self._ok = [0] * n
        self._until = [0.0] * n  # ejected until (valid while ejected)
        self._mult = [0] * n  # ejection time multiplier
        self._times = [0] * n  # ejections so far, for the admin view
        self._ejected: set[int] = set()
        self._next_sweep: float | None = None
        self._now = -math.inf
        #: Monotonic counters (Envoy's ``outlier_detection.*`` stats, same meanings).
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        #: The last sweep's ``{"mean", "stdev", "threshold", "hosts"}``, or None.
        self.last_success_rate: dict[str, float] | None = None

    # ---------------------------------------------------------------------- time

    def tick(self, now: float) -> list[int]:
        """Advance to ``now``: bring back endpoints whose ejection ended, run due sweeps.

        Returns the endpoints brought back by this call (ascending).
        """
        if now <= self._now:
            return []
        self._now = now
        back: list[int] = []
        if self._next_sweep is None:
            self._next_sweep = now + self.config.interval
        elif now >= self._next_sweep:
            interval = self.config.interval
            due = int((now - self._next_sweep) // interval) + 1
            mult = self._mult
            for k in range(due):
                t = self._next_sweep + k * interval
                back.extend(self._uneject_due(t))
                self._sweep(t, first=(k == 0))
                if not self._ejected and not any(mult):
                    break  # rule 2: further sweeps would change nothing
            self._next_sweep += due * interval
        back.extend(self._uneject_due(now))
        back.sort()
        return back

    def _uneject_due(self, t: float) -> list[int]:
        if not self._ejected:
            return []
        due = [i for i in self._ejected if self._until[i] <= t]
        for i in due:
            self._ejected.discard(i)
            self._c5[i] = self._cgw[i] = 0
            self.counters["unejections_total"] += 1
        return due

    def _sweep(self, t: float, first: bool) -> None:
        """One interval sweep (Envoy ``onIntervalTimer``)."""
        self.counters["sweeps"] += 1
        mult = self._mult
        for i in range(self._n):
            if i not in self._ejected and mult[i] > 0:
                mult[i] -= 1
        if first and self.config.success_rate_enabled:
            self._success_rate_ejections(t)
        if first:
            self._req = [0] * self._n
            self._ok = [0] * self._n

    def _success_rate_ejections(self, t: float) -> None:
        c = self.config
        rates = [(i, self._ok[i] / self._req[i]) for i in range(self._n)
                 if i not in self._ejected and self._req[i] >= c.success_rate_request_volume]
        if len(rates) < c.success_rate_minimum_hosts:
            self.last_success_rate = None
            return
        mean = sum(r for _, r in rates) / len(rates)
        stdev = math.sqrt(sum((r - mean) ** 2 for _, r in rates) / len(rates))
        threshold = mean - c.success_rate_stdev_factor * stdev
        self.last_success_rate = {"mean": mean, "stdev": stdev, "threshold": threshold,
                                  "hosts": float(len(rates))}
        for i, r in rates:
            if r < threshold:
                self._eject(i, t, "ejections_success_rate")

    # ---------------------------------------------------------------------- ejection

    def _may_eject_one_more(self) -> bool:
        k = len(self._ejected) + 1
        if k >= self._n:  # rule 1: always leave one endpoint in
            return False
        if k * 100 <= self.config.max_ejection_percent * self._n:
            return True
        return self.config.always_eject_one_host and k == 1

    def _eject(self, i: int, now: float, reason: str) -> bool:
        if not self._may_eject_one_more():
            self.counters["ejections_overflow"] += 1
            return False
        c = self.config
        base = c.base_ejection_time
        if self._mult[i] * base < c.max_ejection_time + base:
            self._mult[i] += 1
        self._until[i] = now + min(base * self._mult[i], c.max_ejection_time)
        self._ejected.add(i)
        self._times[i] += 1
        self.counters["ejections_total"] += 1
        self.counters[reason] += 1
        return True

    # ---------------------------------------------------------------------- public API

    def record(self, i: int, now: float, status: int) -> bool:
        """Record one response of endpoint ``i``: its HTTP status, or ``LOCAL_FAILURE`` (0).

        Returns ``True`` when this outcome ejected ``i``. Raises ``IndexError`` for an index
        outside the cluster.
        """
        self.tick(now)
        failed = status == LOCAL_FAILURE or 500 <= status <= 599
        self._req[i] += 1
        if not failed:
            self._ok[i] += 1
            self._c5[i] = self._cgw[i] = 0
            return False
        self._c5[i] += 1
        if status == LOCAL_FAILURE or status in _GATEWAY_STATUSES:
            self._cgw[i] += 1
        else:
            self._cgw[i] = 0
        if i in self._ejected:  # rule 3
            return False
        c = self.config
        if c.consecutive_5xx and self._c5[i] >= c.consecutive_5xx:
            self._c5[i] = 0
            return self._eject(i, now, "ejections_consecutive_5xx")
        if c.consecutive_gateway_failure and self._cgw[i] >= c.consecutive_gateway_failure:
            self._cgw[i] = 0
            return self._eject(i, now, "ejections_consecutive_gateway_failure")
        return False

    def record_ok(self, i: int, now: float, ok: bool) -> bool:
        """``record`` for callers that only know success or failure (failure = local failure)."""
        return self.record(i, now, 200 if ok else LOCAL_FAILURE)

    def is_ejected(self, i: int) -> bool:
        """Whether ``i`` is ejected as of the last call that took a ``now``."""
        return i in self._ejected

    def ejected(self, now: float) -> set[int]:
        """The endpoints ejected at ``now`` (a new set)."""
        self.tick(now)
        return set(self._ejected)

    def mask(self, now: float, healthy: list[bool] | None = None) -> list[bool] | None:
        """``healthy`` with the ejected endpoints switched off; ``None`` when all are usable."""
        self.tick(now)
        if not self._ejected:
            return None if healthy is None or all(healthy) else list(healthy)
        out = list(healthy) if healthy is not None else [True] * self._n
        for i in self._ejected:
            out[i] = False
        return out

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """Plain data for ``/admin/status``; with ``now``, time advances first."""
        if now is not None:
            self.tick(now)
        return {
            "ejected": sorted(self._ejected),
            "endpoints": [
                {"ejected": i in self._ejected,
                 "ejected_until": self._until[i] if i in self._ejected else None,
                 "multiplier": self._mult[i],
                 "times_ejected": self._times[i],
                 "consecutive_5xx": self._c5[i],
                 "consecutive_gateway_failure": self._cgw[i],
                 "interval_requests": self._req[i],
                 "interval_successes": self._ok[i]}
                for i in range(self._n)],
            "next_sweep_at": self._next_sweep,
            "success_rate": self.last_success_rate,
            "counters": dict(self.counters),
        }
