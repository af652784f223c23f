"""Token mode over Ray: the text of a streamed utterance, relayed from the ingress to the engine replica
speaking it while it still arrives.

A Serve request carries its arguments once, so the pieces that arrive after an utterance has started go
through one small named actor (like the registry): the ingress `put`s each piece at its offset in the text
(and `close`s it with the total length), the replica's `generate` pulls what is new (`get` waits for it)
and pushes it into its engine's own TextFeed. Pieces are applied in offset order whatever order the
calls run in, so the replica's feed gets exactly the text the ingress's got; the text stays until the
utterance is done (an utterance sent again after its replica was lost reads it from the start).
"""
from __future__ import annotations

import asyncio
import time
from typing import Optional

import ray

from . import NAMESPACE

RELAY = "makima-tts-text"
GET_WAIT_S = 5.0             # a get returns at the latest after this (the replica asks again)
FORGET_S = 1800.0            # a feed nobody touched for this long is dropped (its utterance is long gone)


class _Feed:
    def __init__(self) -> None:
        self.text = ""
        self.pending: dict[int, str] = {}
        self.total: Optional[int] = None       # the closed text's length
        self.changed = asyncio.Event()
        self.touched = time.monotonic()

    @property
    def closed(self) -> bool:
        return self.total is not None and len(self.text) >= self.total


@ray.remote(num_cpus=0, max_restarts=-1)
class TextRelay:
    def __init__(self) -> None:
        self.feeds: dict[str, _Feed] = {}

    def _feed(self, feed_id: str) -> _Feed:
        feed = self.feeds.get(feed_id)
        if feed is None:
            self._forget_old()
            feed = self.feeds[feed_id] = _Feed()
        feed.touched = time.monotonic()
        return feed

    def put(self, feed_id: str, offset: int, piece: str) -> None:
        feed = self._feed(feed_id)
        if offset >= len(feed.text):
            feed.pending[offset] = piece
        while len(feed.text) in feed.pending:
            feed.text += feed.pending.pop(len(feed.text))
        feed.changed.set()

    def close(self, feed_id: str, total: int) -> None:
        feed = self._feed(feed_id)
        feed.total = int(total)
        feed.changed.set()

    async def get(self, feed_id: str, offset: int, wait_s: float = GET_WAIT_S) -> tuple[str, bool]:
        """(the text after `offset`, whether that is all of it); waits up to wait_s for something new."""
        feed = self._feed(feed_id)
        while len(feed.text) <= offset and not feed.closed:
            feed.changed.clear()
            try:
                await asyncio.wait_for(feed.changed.wait(), wait_s)
            except asyncio.TimeoutError:
                break
        return feed.text[offset:], feed.closed

    def drop(self, feed_id: str) -> None:
        self.feeds.pop(feed_id, None)

    def _forget_old(self) -> None:
        now = time.monotonic()
        for fid in [f for f, feed in self.feeds.items() if now - feed.touched > FORGET_S]:
            del self.feeds[fid]


def get_relay():
    """The relay actor (made on first use; detached, like the registry)."""
    return TextRelay.options(name=RELAY, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
                             max_concurrency=10000).remote()
