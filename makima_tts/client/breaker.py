"""A circuit breaker: closed -> open after `failure_threshold` consecutive failures -> half-open
after `cooldown_s` (one probe goes through) -> closed if the probe succeeds, open again if not.

Plain state, no I/O: the client asks `admit()` before touching the server (it raises
`CircuitOpen`, or says that this call is the half-open probe) and reports `success()` /
`failure()`. Thread-safe (the blocking client shares it with its loop thread).
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from .errors import CircuitOpen

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(self, failure_threshold: int = 5, cooldown_s: float = 10.0,
                 on_change: Optional[Callable[[str, str], None]] = None,
                 clock: Callable[[], float] = time.monotonic):
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0          # consecutive
        self._opened_at = 0.0
        self.last_failure: Optional[BaseException] = None

    @property
    def state(self) -> str:
        return self._state

    @property
    def failures(self) -> int:
        return self._failures

    def retry_after(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when not open)."""
        if self._state != OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown_s - self._clock())

    def admit(self) -> bool:
        """Before a call. Raises CircuitOpen while open (or while the half-open probe is out);
        returns True when this call must probe (the breaker just went half-open), else False."""
        with self._lock:
            if self._state == CLOSED:
                return False
            if self._state == OPEN and self._clock() - self._opened_at >= self.cooldown_s:
                change = self._set(HALF_OPEN)
            else:
                wait = self.retry_after() if self._state == OPEN else self.cooldown_s
                raise CircuitOpen(self._open_message(), retry_after=wait)
        self._notify(change)
        return True

    def success(self) -> None:
        with self._lock:
            self._failures = 0
            change = self._set(CLOSED) if self._state != CLOSED else None
        self._notify(change)

    def failure(self, exc: Optional[BaseException] = None) -> None:
        with self._lock:
            self._failures += 1
            self.last_failure = exc
            change = None
            if self._state == HALF_OPEN or (self._state == CLOSED and self._failures >= self.failure_threshold):
                self._opened_at = self._clock()
                change = self._set(OPEN)
            elif self._state == OPEN:
                self._opened_at = self._clock()
        self._notify(change)

    def reset(self) -> None:
        self.success()

    # ------------------------------------------------------------------ internals

    def _open_message(self) -> str:
        last = self.last_failure
        cause = f"; last failure: [{getattr(last, 'code', type(last).__name__)}] {last}" if last else ""
        if self._state == HALF_OPEN:
            return f"circuit breaker half-open: a probe of the server is in progress{cause}"
        return (f"circuit breaker open after {self._failures} consecutive failures; next try in "
                f"{self.retry_after():.1f} s{cause}")

    def _set(self, new: str):
        old, self._state = self._state, new
        return (old, new) if old != new else None

    def _notify(self, change) -> None:
        if change and self.on_change is not None:
            self.on_change(*change)
