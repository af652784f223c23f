"""At most `max_streams` utterances generate at once; up to `max_queue` wait; the rest are refused."""
from __future__ import annotations

import asyncio
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

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._sem.locked() and self.waiting >= self.max_queue:
            raise Overloaded(f"server busy: {self.running} utterances generating and {self.waiting} waiting; "
                             "retry shortly")
        self.waiting += 1
        self._metrics.queued.set(self.waiting)
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
            self._metrics.queued.set(self.waiting)
        self.running += 1
        self._metrics.active_streams.set(self.running)
        try:
            yield
        finally:
            self.running -= 1
            self._metrics.active_streams.set(self.running)
            self._sem.release()
