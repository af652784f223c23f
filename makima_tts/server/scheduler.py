"""At most `max_streams` utterances generate at once; up to `max_queue` wait; the rest are refused,
with an estimate of when to retry (`retry_after_ms`)."""
from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from ..errors import Overloaded
from .metrics import Metrics


class Scheduler:
    def __init__(self, max_streams: int, max_queue: int, metrics: Metrics):
        self.max_streams = max(1, max_streams)
        self.max_queue = max(0, max_queue)
        self._sem = asyncio.Semaphore(self.max_streams)
        self._metrics = metrics
        self.waiting = 0
        self.running = 0
        self.hold_s: float | None = None     # how long a slot is held, smoothed (EWMA); None before any

    def retry_after_ms(self) -> int:
        """When a refused request may find a slot: the smoothed slot-holding time, times the requests
        ahead of it (those waiting, plus itself) per slot, clamped to 0.1-30 s; 1 s before any
        utterance has finished."""
        if self.hold_s is None:
            return Overloaded.DEFAULT_RETRY_AFTER_MS
        estimate = self.hold_s * (self.waiting + 1) / self.max_streams
        return int(round(min(30.0, max(0.1, estimate)) * 1000))

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._sem.locked() and self.waiting >= self.max_queue:
            raise Overloaded(f"server busy: {self.running} utterances generating and {self.waiting} waiting; "
                             "retry shortly", retry_after_ms=self.retry_after_ms())
        self.waiting += 1
        self._metrics.queued.set(self.waiting)
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
            self._metrics.queued.set(self.waiting)
        self.running += 1
        self._metrics.active_streams.set(self.running)
        started = time.monotonic()
        try:
            yield
        finally:
            held = time.monotonic() - started
            self.hold_s = held if self.hold_s is None else 0.8 * self.hold_s + 0.2 * held
            self.running -= 1
            self._metrics.active_streams.set(self.running)
            self._sem.release()
