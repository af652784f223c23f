"""What each engine replica reports (streams, voices cached, prompt work), kept by one named actor.

Replicas push a report every REPORT_S; the ingress polls `snapshot()`. A replica that stops
reporting (dead, or being replaced) drops out after STALE_S, so /ready never waits on a dead one.
"""
from __future__ import annotations

import time

import ray

from . import NAMESPACE, REGISTRY

REPORT_S = 0.5
STALE_S = 2.5


@ray.remote(num_cpus=0, max_restarts=-1)
class Registry:
    def __init__(self) -> None:
        self.reports: dict[str, tuple[float, dict]] = {}

    def report(self, replica_id: str, stats: dict) -> None:
        self.reports[replica_id] = (time.monotonic(), stats)

    def gone(self, replica_id: str) -> None:
        self.reports.pop(replica_id, None)

    def snapshot(self) -> list[dict]:
        now = time.monotonic()
        for rid in [r for r, (t, _) in self.reports.items() if now - t > STALE_S]:
            del self.reports[rid]
        return [dict(stats, replica_id=rid) for rid, (_, stats) in sorted(self.reports.items())]


def get_registry():
    """The registry actor (made on first use; detached, so it outlives the driver that made it)."""
    return Registry.options(name=REGISTRY, namespace=NAMESPACE, get_if_exists=True, lifetime="detached").remote()
