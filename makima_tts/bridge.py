"""Work handed between threads and the event loop: one cancellation token and one channel.

The engines compute on threads (a worker per utterance, or the batched scheduler's one thread);
the server lives on the event loop. These two primitives are all that crosses between them, and
neither imports anything of the server or of a model:

- `CancelToken`: how an utterance is cancelled, everywhere. `cancel()` from any thread; the
  engine checks `cancelled` between frames; `on_cancel(fn)` wakes whoever waits; `child()` is a
  token cancelled with its parent or on its own (one synthesis of a longer utterance).
- `Channel`: items from a producer thread to one consumer, in order, bounded. The consumer is the
  event loop (`await channel.aget()`, woken by `loop.call_soon_threadsafe`) or another thread
  (`channel.get()`, woken by a condition). Nothing polls: every change (an item, the end, an error,
  the consumer leaving, a cancel) wakes the side that waits for it.
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any, Callable, Generic, Optional, TypeVar

T = TypeVar("T")


class CancelToken:
    """Set by whoever stops an utterance; the engine checks it between frames and stops."""

    def __init__(self, parent: Optional["CancelToken"] = None) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._unlink: Callable[[], None] = _nothing
        if parent is not None:
            self._unlink = parent.on_cancel(self.cancel)

    def cancel(self) -> None:
        """Cancel (idempotent, any thread): the callbacks run once, on this thread."""
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        self._unlink()                 # a cancelled child no longer needs to hear of its parent
        for fn in callbacks:
            fn()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def on_cancel(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call `fn()` when cancelled (at once if it is already). Returns a function that forgets it."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return lambda: self._forget(fn)
        fn()
        return _nothing

    def child(self) -> "CancelToken":
        """A token cancelled when this one is, and cancellable alone (this one is not touched)."""
        return CancelToken(parent=self)

    def _forget(self, fn: Callable[[], None]) -> None:
        with self._lock:
            try:
                self._callbacks.remove(fn)
            except ValueError:
                pass


def _nothing() -> None:
    return None


class ChannelDone:
    """What `get()` / `aget()` return when nothing more will come: the producer ended, the consumer
    closed the channel, or its token was cancelled."""

    def __repr__(self) -> str:
        return "Channel.DONE"


class Channel(Generic[T]):
    """Items from one producer thread to one consumer (the event loop or a thread), in order.

    Producer: `put(item)` blocks while `maxsize` items wait (0: unbounded), so a consumer that stops
    reading pauses the producer instead of piling items up; it returns False once the consumer has
    gone or the token is cancelled (stop producing). `end()` after the last item, or `fail(exc)`:
    the consumer gets the items before it, then `exc` raised.

    Consumer: `async for item in channel` on the event loop, `for item in channel` on a thread (or
    `await aget()` / `get()`: the next item, or `DONE`).
    A cancel of `cancel` ends the channel at once for both sides (items still buffered are dropped).
    `close()` when leaving early: the producer's next (or blocked) `put` returns False.
    """

    DONE = ChannelDone()

    def __init__(self, maxsize: int = 0, cancel: Optional[CancelToken] = None) -> None:
        self.maxsize = max(0, int(maxsize))
        self.cancel = cancel
        self._items: deque[tuple[Any, Optional[BaseException]]] = deque()
        self._cond = threading.Condition()
        self._ended = False            # end() or fail(): nothing more will be put
        self._closed = False           # the consumer has gone
        self._waiter: Optional[asyncio.Future] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._unlink = cancel.on_cancel(self._wake) if cancel is not None else _nothing

    @property
    def ended(self) -> bool:
        """The producer has ended it (end() or fail())."""
        return self._ended

    @property
    def gone(self) -> bool:
        """The consumer has gone or the token is cancelled: producing more is wasted."""
        return self._closed or (self.cancel is not None and self.cancel.cancelled)

    # ---- producer ----------------------------------------------------------------------------

    def put(self, item: T) -> bool:
        with self._cond:
            while self.maxsize and len(self._items) >= self.maxsize and not self.gone:
                self._cond.wait()
            if self.gone or self._ended:
                return False
            self._items.append((item, None))
            self._notify()
        return True

    def end(self) -> None:
        with self._cond:
            self._ended = True
            self._notify()

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            if not self._ended:
                self._items.append((None, exc))
                self._ended = True
            self._notify()

    # ---- consumer ----------------------------------------------------------------------------

    def get(self) -> "T | ChannelDone":
        """The next item (blocking this thread), or DONE; raises what the producer failed with."""
        with self._cond:
            while not self._ready():
                self._cond.wait()
            return self._take()

    async def aget(self) -> "T | ChannelDone":
        """The next item (awaiting on the event loop), or DONE; raises what the producer failed with."""
        while True:
            with self._cond:
                if self._ready():
                    return self._take()
                self._loop = asyncio.get_running_loop()
                self._waiter = waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                with self._cond:
                    if self._waiter is waiter:
                        self._waiter = None

    def __iter__(self) -> "Channel[T]":
        return self

    def __next__(self) -> T:
        item = self.get()
        if isinstance(item, ChannelDone):
            raise StopIteration
        return item

    def __aiter__(self) -> "Channel[T]":
        return self

    async def __anext__(self) -> T:
        item = await self.aget()
        if isinstance(item, ChannelDone):
            raise StopAsyncIteration
        return item

    def close(self) -> None:
        """The consumer is done: buffered items are dropped and the producer is told (put -> False)."""
        with self._cond:
            self._closed = True
            self._items.clear()
            self._notify()
        self._unlink()
        self._unlink = _nothing

    # ---- inside ------------------------------------------------------------------------------

    def _ready(self) -> bool:
        return bool(self._items) or self._ended or self.gone

    def _take(self) -> "T | ChannelDone":
        if self.gone or not self._items:
            return self.DONE
        item, exc = self._items.popleft()
        self._notify()                  # room for a producer waiting to put
        if exc is not None:
            raise exc
        return item

    def _wake(self) -> None:
        with self._cond:
            self._notify()

    def _notify(self) -> None:
        """Under the lock: wake a waiting thread, and the event loop's waiter (from any thread)."""
        self._cond.notify_all()
        waiter = self._waiter
        if waiter is not None and self._loop is not None:
            self._waiter = None
            try:
                self._loop.call_soon_threadsafe(_wake_future, waiter)
            except RuntimeError:        # the loop is closed: nobody waits any more
                pass


def _wake_future(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
