"""Text streamed into the model token by token (TextFeed): the codes are those of the whole text."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from makima_tts.engine.batch import BatchedEngine
from makima_tts.engine.generate import TextFeed
from makima_tts.engine.types import CancelToken, GenerationSettings

TEXT = ("so this is what an assistant sounds like when the words arrive one at a time from a language "
        "model that has not finished its sentence yet and keeps on writing")
PIECES = [w + " " for w in TEXT.split(" ")]


def greedy(frames: int = 40) -> GenerationSettings:
    return GenerationSettings.greedy_settings(max_frames=frames)


@pytest.fixture(scope="module")
def xvoice(engine, ref_clip):
    return engine.create_voice_prompt(ref_clip, 24000, x_vector_only=True)


def whole(engine, voice, settings) -> torch.Tensor:
    return torch.stack(list(engine.frames(TEXT, voice, "english", settings)))


def pusher(feed: TextFeed, pieces, gate=None, pause_s: float = 0.0) -> threading.Thread:
    """Pushes the pieces from another thread (waiting on `gate` before each but the first, when given),
    then closes."""
    def run():
        for i, p in enumerate(pieces):
            if gate is not None and i > 0:
                gate()
            feed.push(p)
            if pause_s:
                time.sleep(pause_s)
        feed.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_feed_releases_only_tokens_later_text_cannot_change(engine):
    feed = engine.new_feed()
    enc = engine.tokenizer.encode
    feed.push("  Hel")
    assert feed.snapshot() == ([], False)                     # no whitespace after the text yet
    feed.push("lo wor")
    assert feed.snapshot() == (enc("Hello"), False)
    feed.push("ld, how")
    assert feed.snapshot() == (enc("Hello world,"), False)
    feed.push(" are you?  ")
    assert feed.snapshot() == (enc("Hello world, how are you?"), False)
    feed.close()
    assert feed.snapshot() == (enc("Hello world, how are you?"), True)
    with pytest.raises(ValueError):
        feed.push("more")


@pytest.mark.parametrize("kind", ["icl", "xvector"])
@pytest.mark.parametrize("arrival", ["at-once", "word-by-word"])
def test_streamed_text_gives_the_codes_of_the_whole_text(engine, voice, xvoice, kind, arrival):
    v = voice if kind == "icl" else xvoice
    want = whole(engine, v, greedy())
    feed = engine.new_feed()
    if arrival == "at-once":
        feed.push(TEXT)
        feed.close()
        got = torch.stack(list(engine.frames(feed, v, "english", greedy())))
    else:
        # one word per frame the model makes: the talker keeps running dry and waiting
        made = threading.Semaphore(0)
        frames = []
        t = pusher(feed, PIECES, gate=lambda: made.acquire(timeout=30))
        for f in engine.frames(feed, v, "english", greedy()):
            frames.append(f)
            made.release()
        t.join(30)
        got = torch.stack(frames)
    assert torch.equal(got, want)


def test_speaking_starts_before_the_text_ends(engine, xvoice):
    """An x-vector voice needs one token: frames come while the feed is still open."""
    assert engine.tokens_needed(xvoice) == 1
    feed = engine.new_feed()
    for p in PIECES[:3]:
        feed.push(p)
    frames, open_at_first = [], []
    it = engine.frames(feed, xvoice, "english", greedy())
    for f in it:
        if not frames:
            open_at_first.append(not feed.closed)
            pusher(feed, PIECES[3:])
        frames.append(f)
    assert open_at_first == [True]
    assert torch.equal(torch.stack(frames), whole(engine, xvoice, greedy()))


def test_an_icl_voice_needs_its_reference_frames_covered(engine, voice):
    ref_ids = engine._ref_ids(voice)
    assert engine.tokens_needed(voice) == max(1, 1 + voice.ref_codes.shape[0] - len(ref_ids))


def test_cancel_while_waiting_for_text_ends_the_utterance(engine, xvoice):
    feed = engine.new_feed()
    feed.push(PIECES[0] + PIECES[1])
    cancel = CancelToken()
    frames = []
    for f in engine.frames(feed, xvoice, "english", greedy(), cancel=cancel):
        frames.append(f)
        cancel.cancel()                   # the text runs dry after a frame or two; cancel ends the wait
    assert 1 <= len(frames) <= 3 and not feed.closed


def test_batched_streams_with_fed_text_equal_their_whole_text(engine, voice, xvoice):
    """A fed stream that keeps running dry, batched with a plain stream: both give their codes alone."""
    be = BatchedEngine(engine, max_batch=4)
    try:
        plain_want = torch.stack(list(engine.frames("A plain sentence spoken alongside.", voice, "english",
                                                    greedy(30))))
        want = whole(engine, xvoice, greedy())
        feed = engine.new_feed()
        results = {}

        def plain():
            results["plain"] = torch.stack(list(be.frames("A plain sentence spoken alongside.", voice, "english",
                                                          greedy(30))))

        t = threading.Thread(target=plain, daemon=True)
        t.start()
        pusher(feed, PIECES, pause_s=0.02)
        got = torch.stack(list(be.frames(feed, xvoice, "english", greedy())))
        t.join(60)
        assert torch.equal(got, want)
        assert torch.equal(results["plain"], plain_want)
    finally:
        be.close()
