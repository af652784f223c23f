"""BatchedEngine: streams stepped together give the codes (and audio) they give alone."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from makima_tts.engine.batch import BatchedEngine
from makima_tts.engine.generate import FrameGenerator
from makima_tts.engine.types import CancelToken, GenerationSettings, GenerationStats, SamplingParams
from makima_tts.errors import EmptyText, EngineUnavailable, UnknownLanguage, VoiceNotFound

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello there, how are you today?",
         "A much longer sentence, with commas, numbers like 42, and several clauses to read.", "Short one."]


def greedy(n: int) -> GenerationSettings:
    return GenerationSettings.greedy_settings(max_frames=n)


def sampled(n: int, seed: int, **kw) -> GenerationSettings:
    return GenerationSettings(max_frames=n, seed=seed, **kw)


@pytest.fixture(scope="module")
def xvoice(engine, ref_clip):
    return engine.create_voice_prompt(ref_clip, 24000, x_vector_only=True)


@pytest.fixture()
def batched(engine):
    be = BatchedEngine(engine, max_batch=8)
    yield be
    be.close()
    assert not be.running


def solo(engine, text, voice, settings) -> torch.Tensor:
    return torch.stack(list(engine.frames(text, voice, "english", settings)))


def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.002)


class Runner:
    """Consumes a batched stream's frames on its own thread."""

    def __init__(self, be, text, voice, settings, cancel=None, stop_after=None):
        self.frames: list[torch.Tensor] = []
        self.error = None
        self.args = (text, voice, "english", settings, cancel)
        self.stop_after = stop_after
        self.thread = threading.Thread(target=self._run, args=(be,), daemon=True)
        self.thread.start()

    def _run(self, be):
        try:
            it = be.frames(*self.args)
            for f in it:
                self.frames.append(f)
                if self.stop_after is not None and len(self.frames) >= self.stop_after:
                    it.close()                        # the consumer goes away
                    break
        except BaseException as e:        # noqa: BLE001
            self.error = e

    def codes(self) -> torch.Tensor:
        self.thread.join(60)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error
        return torch.stack(self.frames) if self.frames else torch.zeros(0, 16, dtype=torch.long)


def start_together(be, specs):
    """Start every stream while joining is held, so they all join at the same pause."""
    be.hold()
    try:
        runners = [Runner(be, *spec) for spec in specs]
        wait_for(lambda: be.active_streams == len(specs))
    finally:
        be.resume()
    return runners


@pytest.mark.parametrize("x_vector_only", [False, True], ids=["icl", "xvector"])
def test_alone_equals_unbatched(engine, voice, xvoice, batched, x_vector_only):
    v = xvoice if x_vector_only else voice
    want = solo(engine, TEXTS[0], v, greedy(30))
    got = torch.stack(list(batched.frames(TEXTS[0], v, "english", greedy(30))))
    assert torch.equal(got, want)


@pytest.mark.parametrize("others", [1, 2, 3])
def test_batched_equals_alone(engine, voice, xvoice, batched, others):
    """A greedy stream batched with others (other texts, voices, lengths, seeded sampling) gives its codes alone."""
    specs = [(TEXTS[0], voice, greedy(30))]
    pool = [(TEXTS[1], xvoice, greedy(22)), (TEXTS[2], voice, sampled(35, seed=7)),
            (TEXTS[3], xvoice, sampled(18, seed=11))]
    specs += pool[:others]
    runners = start_together(batched, specs)
    for r, (text, v, s) in zip(runners, specs):
        assert torch.equal(r.codes(), solo(engine, text, v, s)), text
    assert batched.counters["max_rows"] == len(specs)


def test_voice_does_not_leak(engine, voice, xvoice, batched):
    """Same text, two voices, side by side: each stream's codes are those of its own voice alone."""
    specs = [(TEXTS[0], voice, greedy(25)), (TEXTS[0], xvoice, greedy(25))]
    a, b = start_together(batched, specs)
    ca, cb = a.codes(), b.codes()
    assert not torch.equal(ca, cb)
    assert torch.equal(ca, solo(engine, TEXTS[0], voice, greedy(25)))
    assert torch.equal(cb, solo(engine, TEXTS[0], xvoice, greedy(25)))


def test_seeded_sampling_batched_equals_alone(engine, voice, xvoice, batched):
    """Each stream draws from its own generator in the one-stream order: exact equality."""
    pen = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.1)
    specs = [(TEXTS[0], voice, sampled(30, seed=1)), (TEXTS[0], voice, sampled(30, seed=2)),
             (TEXTS[1], xvoice, sampled(30, seed=1, predictor=pen)), (TEXTS[2], voice, greedy(30))]
    runners = start_together(batched, specs)
    got = [r.codes() for r in runners]
    for g, (text, v, s) in zip(got, specs):
        assert torch.equal(g, solo(engine, text, v, s))
    assert not torch.equal(got[0], got[1])        # different seeds, different draws


class EosAt(BatchedEngine):
    """Makes the stream whose text is `text` say EOS after `frames` frames (random weights never do)."""

    def __init__(self, engine, text, frames, **kw):
        super().__init__(engine, **kw)
        marked = self.marked = set()

        class Gen(FrameGenerator):
            def choose_code0(self, row, logits):
                if id(row) in marked and len(row.history) >= frames:
                    return torch.tensor([self.ids.codec_eos])
                return super().choose_code0(row, logits)

        self.generator_class = Gen
        self.eos_text = text

    def _request(self, text, *args):
        s = super()._request(text, *args)
        if text == self.eos_text:
            self.marked.add(id(s))
        return s


def test_join_and_leave_midway(engine, voice, xvoice):
    """Streams joining mid-way and leaving (cancel, consumer closing, max_frames, EOS) leave the others' codes as they are alone."""
    be = EosAt(engine, TEXTS[3], 9, max_batch=8)
    cancel = CancelToken()
    late: list[Runner] = []
    steps = []

    def on_step(rows):
        steps.append(rows)
        if len(steps) == 4:
            cancel.cancel()
        if len(steps) == 6:                   # a stream joins mid-way (at the next pause)
            n = be.active_streams
            late.append(Runner(be, TEXTS[1], voice, sampled(20, seed=5)))
            wait_for(lambda: be.active_streams > n)

    be.on_step = on_step
    try:
        specs = [(TEXTS[0], voice, greedy(40)),                  # runs throughout
                 (TEXTS[2], xvoice, greedy(40), cancel),        # cancelled at frame 4
                 (TEXTS[1], xvoice, greedy(40), None, 5),       # consumer closes after 5 frames
                 (TEXTS[2], voice, greedy(12)),                 # max_frames
                 (TEXTS[3], xvoice, greedy(40))]                # EOS after 9 frames
        runners = start_together(be, specs)
        got = [r.codes() for r in runners]
        late_codes = late[0].codes()
        wait_for(lambda: not be.running)
    finally:
        be.close()
    assert torch.equal(got[0], solo(engine, TEXTS[0], voice, greedy(40)))
    full = solo(engine, TEXTS[2], xvoice, greedy(40))
    assert len(got[1]) <= 4 and torch.equal(got[1], full[:len(got[1])])
    assert torch.equal(got[2], solo(engine, TEXTS[1], xvoice, greedy(40))[:5])
    assert torch.equal(got[3], solo(engine, TEXTS[2], voice, greedy(12)))
    assert torch.equal(got[4], solo(engine, TEXTS[3], xvoice, greedy(40))[:9])
    assert torch.equal(late_codes, solo(engine, TEXTS[1], voice, sampled(20, seed=5)))
    assert max(steps) == 5 and steps[-1] == 1


def test_max_batch_queues_the_rest(engine, voice, xvoice):
    be = BatchedEngine(engine, max_batch=2)
    try:
        specs = [(TEXTS[i % 4], voice if i % 2 else xvoice, greedy(10 + 3 * i)) for i in range(5)]
        runners = start_together(be, specs)
        for r, (text, v, s) in zip(runners, specs):
            assert torch.equal(r.codes(), solo(engine, text, v, s))
        assert be.counters["max_rows"] == 2
    finally:
        be.close()


def test_stream_chunks_equal_unbatched(engine, voice, xvoice, batched):
    """Audio chunks (boundaries and samples) are those of Qwen3Engine.stream."""
    s = GenerationSettings.greedy_settings(max_frames=17, first_chunk_frames=2, chunk_frames=6)
    want = list(engine.stream(TEXTS[0], voice, "english", s))
    other = Runner(batched, TEXTS[1], xvoice, greedy(30))
    stats = GenerationStats()
    got = list(batched.stream(TEXTS[0], voice, "english", s, stats=stats))
    other.codes()
    assert [(c.index, c.frame_index, c.num_frames, c.is_last) for c in got] == \
        [(c.index, c.frame_index, c.num_frames, c.is_last) for c in want]
    assert [c.num_frames for c in got] == [2, 4, 6, 5]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.pcm, b.pcm)
    assert stats.frames == 17 and stats.ttfa_s > 0 and stats.prefill_s > 0


def test_cancel_stops_everything(engine, voice, xvoice):
    be = BatchedEngine(engine, max_batch=4)
    try:
        tokens = [CancelToken() for _ in range(3)]
        s = GenerationSettings.greedy_settings(max_frames=5000)
        chunks = []

        def consume(tok):
            for c in be.stream(TEXTS[0], voice, "english", s, cancel=tok):
                chunks.append(c)

        threads = [threading.Thread(target=consume, args=(t,), daemon=True) for t in tokens]
        for t in threads:
            t.start()
        wait_for(lambda: be.counters["frames"] >= 30)
        for t in tokens:
            t.cancel()
        for t in threads:
            t.join(10)
            assert not t.is_alive()
        wait_for(lambda: not be.running, timeout=5)
        frames = be.counters["frames"]
        time.sleep(0.2)
        assert be.counters["frames"] == frames      # nothing keeps running
        assert not any(c.is_last for c in chunks)    # a cancelled stream has no last chunk
        assert be.active_streams == 0
    finally:
        be.close()


def test_idle_thread_ends_and_restarts(engine, voice, batched):
    list(batched.frames(TEXTS[0], voice, "english", greedy(5)))
    wait_for(lambda: not batched.running, timeout=5)
    list(batched.frames(TEXTS[3], voice, "english", greedy(5)))
    wait_for(lambda: not batched.running, timeout=5)
    assert batched.counters["threads_started"] == 2


def test_close_ends_running_streams(engine, voice):
    be = BatchedEngine(engine, max_batch=2)
    r = Runner(be, TEXTS[0], voice, GenerationSettings.greedy_settings(max_frames=5000))
    wait_for(lambda: be.counters["frames"] >= 5)
    be.close()
    assert not be.running
    with pytest.raises(EngineUnavailable):
        r.codes()
    with pytest.raises(EngineUnavailable):
        list(be.frames(TEXTS[0], voice, "english", greedy(3)))


def test_api_and_errors(engine, voice, batched, ref_clip):
    assert (batched.name, batched.model_id, batched.sample_rate, batched.supports_cloning) == \
        (engine.name, engine.model_id, engine.sample_rate, engine.supports_cloning)
    assert batched.fingerprint == engine.fingerprint and batched.defaults == engine.defaults
    assert batched.builtin_voices() == engine.builtin_voices()
    v = batched.create_voice_prompt(ref_clip, 24000, transcript="Hello world. This is a test of the voice.")
    assert torch.equal(v.ref_codes, voice.ref_codes)
    with pytest.raises(VoiceNotFound):
        list(batched.stream(TEXTS[0], None))
    with pytest.raises(EmptyText):
        list(batched.stream("  ", voice))
    with pytest.raises(UnknownLanguage):
        list(batched.stream(TEXTS[0], voice, "klingon"))
    with pytest.raises(TypeError):
        list(batched.stream(TEXTS[0], "not a prompt"))
    assert not batched.running


@pytest.fixture(scope="module")
def default_engine(tiny_checkpoint):
    """The default CPU path: quantize="auto" (int8 weights in our format)."""
    from makima_tts.engine.qwen3 import Qwen3Engine

    e = Qwen3Engine.load(tiny_checkpoint)
    assert e.quantize == "int8"
    return e


@pytest.mark.parametrize("others", [1, 7])
def test_default_path_batched_equals_alone(default_engine, voice, xvoice, others):
    """The default path's codes in a batch (joiners prefilled together, padded to one length; up to 8
    rows through the int8 kernel) equal its codes alone."""
    be = BatchedEngine(default_engine, max_batch=8)
    try:
        pool = [(TEXTS[i % 4], xvoice if i % 2 else voice, greedy(20 + 3 * i) if i % 3 else sampled(24, seed=i))
                for i in range(1, 8)]
        specs = [(TEXTS[0], voice, greedy(30))] + pool[:others]
        runners = start_together(be, specs)
        for r, (text, v, s) in zip(runners, specs):
            assert torch.equal(r.codes(), solo(default_engine, text, v, s)), text
        assert be.counters["max_rows"] == len(specs)
    finally:
        be.close()


def test_streams_share_codec_calls(engine, voice, xvoice):
    """Streams decoded on the scheduler share one codec call per step; each still gets the chunks it
    gets alone (same boundaries, samples equal to float rounding)."""
    s = GenerationSettings.greedy_settings(max_frames=15, first_chunk_frames=2, chunk_frames=4)
    specs = [(TEXTS[0], voice), (TEXTS[1], xvoice), (TEXTS[3], voice)]
    want = [list(engine.stream(t, v, "english", s)) for t, v in specs]
    be = BatchedEngine(engine, max_batch=4)
    try:
        got: list = [None] * 3

        def run(i):
            got[i] = list(be.stream(specs[i][0], specs[i][1], "english", s))

        be.hold()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        wait_for(lambda: be.active_streams == 3)
        be.resume()
        for t in threads:
            t.join(60)
        assert be.counters["codec_max_rows"] == 3
        assert be.counters["codec_calls"] < sum(len(w) for w in want)
        for g, w in zip(got, want):
            assert [(c.index, c.frame_index, c.num_frames, c.is_last) for c in g] == \
                [(c.index, c.frame_index, c.num_frames, c.is_last) for c in w]
            a, b = np.concatenate([c.pcm for c in g]), np.concatenate([c.pcm for c in w])
            assert a.shape == b.shape and np.max(np.abs(a - b)) < 2e-3
    finally:
        be.close()


def test_voice_prefix_computed_once_same_codes(engine, ref_clip, monkeypatch):
    """The talker's voice-only first positions are computed once per voice and language, copied into
    each utterance's cache row, and give the codes of prefilling the whole prompt."""
    from makima_tts.engine import qwen3
    from makima_tts.testing import REF_TEXT

    voice = engine.create_voice_prompt(ref_clip, 24000, transcript=REF_TEXT)     # fresh: nothing cached on it
    calls = []
    real = qwen3.compute_prefix
    monkeypatch.setattr(qwen3, "compute_prefix", lambda *a: calls.append(a[1].shape[1]) or real(*a))
    with_prefix = [solo(engine, text, voice, greedy(8)) for text in TEXTS[:2]]
    assert len(calls) == 1                        # one voice, one language: one prefix for both texts
    row = engine.plan(TEXTS[0], voice, "english", greedy(8))
    ref_ids = engine._ref_ids(voice)
    assert row.prompt.prefix is not None and row.prompt.prefix.length == calls[0] > 9 + len(ref_ids) - 1
    assert row.prompt.length == row.prompt.prefix.length + row.prompt.embeds.shape[1]
    engine.plan(TEXTS[0], voice, "auto", greedy(8))
    assert len(calls) == 2 and calls[1] == calls[0] - 1      # "auto": no language position, its own prefix
    monkeypatch.setattr(qwen3, "voice_prefix_length", lambda *a: 0)       # the whole prompt prefilled
    assert engine.plan(TEXTS[0], voice, "english", greedy(8)).prompt.prefix is None
    for text, codes in zip(TEXTS[:2], with_prefix):
        assert torch.equal(solo(engine, text, voice, greedy(8)), codes)


def test_a_burst_of_streams_prefills_together(engine, voice, xvoice, monkeypatch):
    """Streams set up (planned) at the same moment join in one prefill: the first to be ready waits
    for the others being set up beside it (at most gather_s) instead of prefilling alone; the codes are
    those each gets alone. A lone stream does not wait (nobody else is being set up)."""
    specs = [(TEXTS[0], voice), (TEXTS[1], xvoice), (TEXTS[3], voice)]
    want = [solo(engine, t, v, greedy(6)) for t, v in specs]
    be = BatchedEngine(engine, max_batch=4, gather_s=60.0)
    plan, release, first_ready = engine.plan, threading.Event(), threading.Event()
    others_in = threading.Semaphore(0)

    def slow_plan(text, *a, **kw):              # the 2nd and 3rd stream's set-up ends after the 1st's
        if text != TEXTS[0]:
            others_in.release()
            row = plan(text, *a, **kw)
            release.wait(30)
        else:
            row = plan(text, *a, **kw)
            for _ in range(2):                  # ... and both are being set up when the 1st is ready
                assert others_in.acquire(timeout=30)
            first_ready.set()
        return row

    monkeypatch.setattr(be.engine, "plan", slow_plan)
    try:
        runners = [Runner(be, t, v, greedy(6)) for t, v in specs]
        assert first_ready.wait(30)
        wait_for(lambda: be.active_streams == 1)            # the first waits for the others ...
        time.sleep(0.2)
        assert be.counters["joins"] == 0
        release.set()
        got = [r.codes() for r in runners]
        assert be.counters["joins"] == 1 and be.counters["max_join_rows"] == 3   # ... one prefill for all
        for g, w in zip(got, want):
            assert torch.equal(g, w)
        monkeypatch.setattr(be.engine, "plan", plan)
        lone = Runner(be, TEXTS[1], voice, greedy(3))
        lone.thread.join(20)                                   # well before gather_s
        assert not lone.thread.is_alive() and len(lone.codes()) == 3
        assert be.counters["joins"] == 2 and be.counters["max_join_rows"] == 3
    finally:
        be.close()
