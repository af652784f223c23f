"""makima_tts.bridge: the cancel token and the thread-to-event-loop channel (no polling)."""
from __future__ import annotations

import asyncio
import threading

import pytest

from makima_tts.bridge import CancelToken, Channel
from makima_tts.engine.types import CancelToken as EngineCancelToken


def test_the_engine_and_the_bridge_share_one_cancel_token():
    assert EngineCancelToken is CancelToken


def test_cancel_runs_callbacks_once_and_reaches_children_only_downwards():
    parent = CancelToken()
    heard = []
    forget = parent.on_cancel(lambda: heard.append("a"))
    parent.on_cancel(lambda: heard.append("b"))
    forget()
    child, other = parent.child(), parent.child()
    other.cancel()                               # a child alone: the parent and its siblings go on
    assert other.cancelled and not parent.cancelled and not child.cancelled
    parent.cancel()
    parent.cancel()
    assert heard == ["b"] and child.cancelled
    late = []
    parent.on_cancel(lambda: late.append(1))    # already cancelled: called at once
    assert late == [1]


def test_a_cancelled_child_leaves_its_parent():
    parent = CancelToken()
    for _ in range(100):
        parent.child().cancel()
    assert parent._callbacks == []


def test_every_item_arrives_in_order_on_the_event_loop():
    async def main():
        channel: Channel[int] = Channel(maxsize=3)

        def produce():
            for i in range(500):
                assert channel.put(i)
            channel.end()

        thread = threading.Thread(target=produce)
        thread.start()
        got = []
        while (item := await channel.aget()) is not Channel.DONE:
            got.append(item)
        thread.join(5)
        return got

    assert asyncio.run(main()) == list(range(500))


def test_a_thread_consumer_gets_the_items_then_the_error():
    channel: Channel[str] = Channel()
    channel.put("a")
    channel.put("b")
    channel.fail(ValueError("broken"))
    assert channel.put("c") is False             # nothing after the end
    assert channel.get() == "a" and channel.get() == "b"
    with pytest.raises(ValueError, match="broken"):
        channel.get()


def test_a_full_channel_pauses_the_producer_until_the_consumer_reads():
    channel: Channel[int] = Channel(maxsize=2)
    put = []

    def produce():
        for i in range(5):
            if not channel.put(i):
                return
            put.append(i)

    thread = threading.Thread(target=produce)
    thread.start()
    thread.join(0.3)
    assert thread.is_alive() and put == [0, 1]   # blocked on the third, not spinning past it
    assert [channel.get() for _ in range(5)] == [0, 1, 2, 3, 4]
    thread.join(5)
    assert put == [0, 1, 2, 3, 4] and not thread.is_alive()


def test_cancel_wakes_a_blocked_producer_and_a_waiting_consumer():
    async def main():
        token = CancelToken()
        full: Channel[int] = Channel(maxsize=1, cancel=token)
        empty: Channel[int] = Channel(cancel=token)
        results = []

        def produce():
            full.put(0)
            results.append(full.put(1))         # blocks: nobody reads; returns False on the cancel

        thread = threading.Thread(target=produce)
        thread.start()
        waiting = asyncio.ensure_future(empty.aget())
        await asyncio.sleep(0.1)
        assert not waiting.done() and thread.is_alive()
        token.cancel()                           # from the loop: both sides wake, nothing polls
        assert await asyncio.wait_for(waiting, 2) is Channel.DONE
        await asyncio.get_running_loop().run_in_executor(None, thread.join, 2)
        assert results == [False]
        assert await full.aget() is Channel.DONE  # buffered items are dropped after a cancel

    asyncio.run(main())


def test_close_stops_the_producer():
    channel: Channel[int] = Channel(maxsize=1)
    stopped = threading.Event()

    def produce():
        i = 0
        while channel.put(i):
            i += 1
        stopped.set()

    thread = threading.Thread(target=produce)
    thread.start()
    assert channel.get() == 0
    channel.close()
    assert stopped.wait(2)
    thread.join(2)

