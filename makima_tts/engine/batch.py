"""Several streams stepped together: one scheduler thread over one batched FrameGenerator.

At batch 1 a frame reads every talker weight once and every code-predictor weight 15 times,
so the work is bound by memory bandwidth. Stepping B streams together reads each weight once
for all of them: the cost of a frame grows far slower than B until the work is compute-bound.

    batched = BatchedEngine(engine, max_batch=8)          # engine: a loaded Qwen3Engine
    for chunk in batched.stream(text, voice, "english"):  # from any number of threads
        play(chunk.pcm)
    batched.close()

This file only schedules; the model work is generate.py's FrameGenerator, the same code that runs
one utterance alone (a batch of one):
- `stream()` (the caller's thread) sets the request up with `Qwen3Engine.plan` (a Row) and hands it
  to the scheduler with its own streaming codec decoder. The scheduler decodes each row's frames and
  cuts chunks exactly as `Qwen3Engine.stream` does (ChunkCutter), on its own thread: one thread does
  all of the compute. Chunks come back through a per-stream Channel (makima_tts.bridge): the
  consumer waits on it without polling, woken at once by a chunk, the end, an error or a cancel.
- The scheduler thread (started on demand, gone when nothing is left to do) loops over frames.
  Between frames, streams that were cancelled, closed by their consumer, or finished (EOS,
  max_frames) leave (`FrameGenerator.leave`), and waiting streams join: their prefills run together
  in one padded forward pass (`FrameGenerator.join`); while others are running, one pause takes
  joiners up to `join_tokens` prompt tokens (at least one), the rest join at the next pause.
  When nothing runs, the first stream ready waits (at most `gather_s`) for streams still being set
  up on other threads: a burst of streams prefills in one pass.
  Then `complete()` and `advance()` step every row together.
- Each row keeps its own settings, torch.Generator (seeded from `settings.seed`), codebook-0 history
  and EOS rule, drawn in the one-stream order, so a stream's codes never depend on the others.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Iterator, Optional

import torch

from ..bridge import Channel
from ..errors import EngineUnavailable, VoiceNotFound
from .generate import FrameGenerator, Row
from .codec import StreamingDecoder
from .qwen3 import ChunkCutter, Qwen3Engine
from .types import AudioChunk, CancelToken, GenerationSettings, GenerationStats, VoicePrompt

# With several rows, each row's codes are decoded every DECODE_EVERY frames (and at its chunk ends),
# all due rows in one codec call: the codec is most of the work at 8 streams, and one call over B rows
# costs far less than B calls (bench/codec.py); 4 frames a call cost 8-24 % less codec time per frame
# than 2 at 8 streams here (bench/RESULTS.md). Alone, a row decodes whole chunks (the cheapest).
DECODE_EVERY = 4


@dataclass(eq=False)
class _Stream(Row):
    """A Row of the batch plus its delivery: the consumer's channel, cancel token and timings."""

    cancel: Optional[CancelToken] = None
    cutter: Optional[ChunkCutter] = None         # stream(): the frames are decoded on the scheduler's thread
    out: Channel = field(default_factory=Channel)     # unbounded: the scheduler never waits for a consumer
    submitted: float = field(default_factory=time.perf_counter)
    timings: GenerationStats = field(default_factory=GenerationStats)

    def gone(self) -> bool:
        """Cancelled, its consumer went away, or it failed: it takes no more frames."""
        return self.out.gone or self.out.ended

    def send(self, item) -> None:
        """A frame or chunk to the consumer; an exception ends the stream with it (raised there)."""
        if isinstance(item, BaseException):
            self.out.fail(item)
        else:
            self.out.put(item)


class BatchedEngine:
    """A Qwen3Engine whose streams share one batched talker / code-predictor step per frame.

    Same streaming API as Qwen3Engine (`stream`, `create_voice_prompt`, ...); `max_batch` caps
    the rows stepped together (more streams wait to join). Thread-safe: call `stream()` from
    as many threads as you like. `close()` ends the scheduler; streams still running then end
    with EngineUnavailable."""

    generator_class = FrameGenerator

    def __init__(self, engine, max_batch: int = 8, join_tokens: int = 1024, gather_s: float = 0.25):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.engine = engine
        self.max_batch = int(max_batch)
        # while streams are running, the joiners' prefills of one pause between frames take at most
        # this many prompt tokens together (at least one joiner): a burst does not stall them long
        self.join_tokens = join_tokens
        # when nothing runs, a stream waits (at most gather_s) for the streams that are being set up
        # (their `plan` on their own threads) beside it, so that a burst prefills in one forward pass
        # instead of the first alone and the rest a prefill later; a lone stream never waits
        self.gather_s = gather_s
        self._planning = 0
        self._cond = threading.Condition()
        self._waiting: list[_Stream] = []
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._gen: Optional[FrameGenerator] = None
        self.counters = {"frames": 0, "steps": 0, "max_rows": 0, "threads_started": 0,
                         "codec_calls": 0, "codec_max_rows": 0, "joins": 0, "max_join_rows": 0}
        # called by the scheduler thread after every frame step with the rows it stepped (tests, metrics)
        self.on_step = None
        self._hold = 0
        self._news = 0        # bumped (under _cond) by whatever may let a waiting scheduler go on

    # ---- pass-through -------------------------------------------------------------------------

    name = property(lambda self: self.engine.name)
    model_id = property(lambda self: self.engine.model_id)
    sample_rate = property(lambda self: self.engine.sample_rate)
    supports_cloning = property(lambda self: self.engine.supports_cloning)
    fingerprint = property(lambda self: self.engine.fingerprint)
    defaults = property(lambda self: self.engine.defaults)

    def __getattr__(self, item):             # quantize, device, codec, tokenizer, ... of the engine
        if item == "engine":
            raise AttributeError(item)
        return getattr(self.engine, item)

    def builtin_voices(self):
        return self.engine.builtin_voices()

    def create_voice_prompt(self, *args, **kw) -> VoicePrompt:
        return self.engine.create_voice_prompt(*args, **kw)

    @property
    def running(self) -> bool:
        """Whether the scheduler thread is alive."""
        t = self._thread
        return t is not None and t.is_alive()

    @property
    def active_streams(self) -> int:
        with self._cond:
            return len(self._active) + len(self._waiting)

    @property
    def _active(self) -> list:
        return self._gen.rows if self._gen is not None else []

    def hold(self) -> None:
        """Let no stream join until resume() (running streams go on): several streams submitted
        meanwhile then join together, at one pause between frames."""
        with self._cond:
            self._hold += 1

    def resume(self) -> None:
        with self._cond:
            self._hold = max(0, self._hold - 1)
            self._cond.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the scheduler (streams still running end with EngineUnavailable); idempotent."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # ---- a stream, on the caller's thread -----------------------------------------------------

    def _request(self, text, voice, language, settings, cancel) -> _Stream:
        if voice is None:
            raise VoiceNotFound("the Qwen3-TTS Base model needs a voice: clone one from a 3-10 s clip and its transcript")
        row = self.engine.plan(text, voice, language, settings, cancel)
        if row is None:                          # cancelled while waiting for its text
            return None
        s = _Stream(**{f.name: getattr(row, f.name) for f in fields(Row)}, cancel=cancel, out=Channel(cancel=cancel))
        if s.feed is not None:
            s.feed.listen(self._poke)            # the scheduler waits for text as a row runs dry
        return s

    @contextmanager
    def _setting_up(self, text):
        """While a stream is set up (planned, its decoder made, submitted) on its caller's thread, a
        scheduler with nothing running gathers (see gather_s). A TextFeed may wait long for its text: not counted."""
        counted = isinstance(text, str)
        if counted:
            with self._cond:
                self._planning += 1
        try:
            yield
        finally:
            if counted:
                with self._cond:
                    self._planning -= 1
                    self._cond.notify_all()

    def _poke(self) -> None:
        """Text arrived, a consumer left or a stream was cancelled: wake the scheduler."""
        with self._cond:
            self._news += 1
            self._cond.notify_all()

    def _submit(self, s: _Stream) -> None:
        with self._cond:
            if self._closed:
                raise EngineUnavailable("the batched engine is closed")
            self._waiting.append(s)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="makima-batch", daemon=True)
                self.counters["threads_started"] += 1
                self._thread.start()
            self._cond.notify_all()

    def frames(self, text: str, voice: VoicePrompt, language: str = "auto",
               settings: Optional[GenerationSettings] = None, cancel: Optional[CancelToken] = None,
               stats: Optional[GenerationStats] = None) -> Iterator[torch.Tensor]:
        """Codec frames (16,) int64 as the scheduler makes them (like Qwen3Engine.frames)."""
        settings = settings or self.engine.defaults
        with self._setting_up(text):
            s = self._request(text, voice, language, settings, cancel)
            if s is None:
                return
            self._submit(s)
        yield from self._deliver(s, stats)

    def stream(self, text: str, voice: Optional[VoicePrompt] = None, language: str = "auto",
               settings: Optional[GenerationSettings] = None, cancel: Optional[CancelToken] = None,
               stats: Optional[GenerationStats] = None) -> Iterator[AudioChunk]:
        """Audio chunks as Qwen3Engine.stream cuts them (the same samples), decoded on the scheduler's
        thread: one thread does all of the compute, so the 2 cores are not shared by several thread pools."""
        settings = settings or self.engine.defaults
        stats = stats if stats is not None else GenerationStats()
        t_start = time.perf_counter()
        if voice is None:
            raise VoiceNotFound("the Qwen3-TTS Base model needs a voice: clone one from a 3-10 s clip and its transcript")
        with self._setting_up(text):
            s = self._request(text, voice, language, settings, cancel)
            if s is None:
                return
            s.cutter = ChunkCutter(self.engine._streaming_decoder(voice), settings, stats, t_start)
            self._submit(s)
        try:
            yield from self._deliver(s, stats)
        finally:
            s.cutter.close()

    def _deliver(self, s: _Stream, stats: Optional[GenerationStats]) -> Iterator:
        """The stream's items as the scheduler hands them over, to its end, its error or its cancel."""
        try:
            yield from s.out
        finally:
            s.out.close()
            self._poke()                         # the scheduler drops the row now, not at its next look
            if stats is not None:
                for name in ("queue_s", "prefill_s", "talker_s", "predictor_s", "batch_rows_sum"):
                    setattr(stats, name, getattr(s.timings, name))

    def synthesize(self, text: str, voice: VoicePrompt, language: str = "auto",
                   settings: Optional[GenerationSettings] = None):
        return Qwen3Engine.synthesize(self, text, voice, language, settings)

    # ---- the scheduler thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._loop()
        except BaseException as exc:               # a bug: fail every stream rather than hang them
            with self._cond:
                for s in self._active + self._waiting:
                    s.out.fail(exc)
                self._waiting = []
                self._thread = None
                self._gen = None
            raise

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    err = EngineUnavailable("the batched engine was closed")
                    for s in self._active + self._waiting:
                        s.out.fail(err)
                    self._waiting = []
                    if self._gen is not None:
                        self._gen.rows.clear()
                self._drop_finished()
                joiners = []
                if not self._active and not self._waiting:
                    self._thread = None            # idle: the thread ends; _submit starts a new one
                    self._gen = None
                    return
                room = self.max_batch - len(self._active)
                if room > 0 and self._waiting and not self._hold:
                    gather = self.gather_s - (time.perf_counter() - self._waiting[0].submitted)
                    if not self._active and self._planning and len(self._waiting) < room and gather > 0:
                        self._cond.wait(gather)      # streams being set up beside it: one prefill for all
                        continue
                    joiners = self._take_joiners(room)
            if joiners:
                self._join(joiners)
                continue                            # drop any that ended at prefill, join more
            if not self._active:                    # only held joiners: wait for resume()
                with self._cond:
                    if self._hold and not self._closed:
                        self._cond.wait()        # resume(), close() or a poke (a held joiner left)
                continue
            self._frame()

    def _take_joiners(self, room: int) -> list[_Stream]:
        """Waiting streams for this pause: up to `room`; while others run, up to join_tokens prompt tokens."""
        busy = bool(self._active)
        taken, tokens = [], 0
        for s in self._waiting[:room]:
            n = s.prompt.embeds.shape[1]
            if busy and taken and tokens + n > self.join_tokens:
                break
            taken.append(s)
            tokens += n
        self._waiting = self._waiting[len(taken):]
        return taken

    @staticmethod
    def _finish(s: _Stream):
        """A row's last chunk (its waiting frames and the decoder's tail); a decoding error ends that row only."""
        try:
            return s.cutter.finish()
        except Exception as exc:            # noqa: BLE001 - delivered to the row's consumer (send)
            return exc

    def _decode_due(self) -> None:
        """Decode, in one codec call, the waiting frames of every row that is due (see DECODE_EVERY)."""
        rows = [s for s in self._gen.rows if s.cutter is not None]
        every = DECODE_EVERY if len(rows) > 1 else None
        due = [s for s in rows if s.cutter.due(every)]
        if not due:
            return
        codes = [s.cutter.take_codes() for s in due]
        self.counters["codec_calls"] += 1
        self.counters["codec_max_rows"] = max(self.counters["codec_max_rows"], len(due))
        t0 = time.perf_counter()
        try:
            pcms = StreamingDecoder.push_many([s.cutter.decoder for s in due], codes)
        except Exception:                   # noqa: BLE001 - decode alone: an error ends its row only
            pcms = []
            for s, c in zip(due, codes):
                try:
                    pcms.append(s.cutter.decoder.push(c))
                except Exception as exc:    # noqa: BLE001 - delivered to the row's consumer
                    pcms.append(exc)
        share = (time.perf_counter() - t0) / len(due)
        for s, pcm in zip(due, pcms):
            if isinstance(pcm, Exception):
                s.out.fail(pcm)
                continue
            chunk = s.cutter.decoded(pcm, share)
            if chunk is not None:
                s.out.put(chunk)

    def _drop_finished(self) -> None:
        """Remove streams that ended (EOS reached, max_frames, cancelled, consumer gone)."""
        self._waiting = [s for s in self._waiting if not s.gone()]
        for s in [s for s in self._active if s.gone() or s.finished]:
            if s.cutter is not None and not s.gone():
                s.send(self._finish(s))             # the last chunk (its waiting frames, the decoder's tail)
            s.out.end()
            self._gen.leave(s)

    def _join(self, joiners: list[_Stream]) -> None:
        joiners = [s for s in joiners if not s.gone()]
        if not joiners:
            return
        t0 = time.perf_counter()
        if self._gen is None:
            # the cache grows with the rows that join (reserve): a lone stream holds one row, not max_batch
            self._gen = self.generator_class(self.engine.talker, self.engine.ids, rows=len(joiners))
        try:
            self._gen.join(joiners)
        except Exception as exc:
            for s in joiners:
                s.out.fail(exc)
            return
        dt = time.perf_counter() - t0
        self.counters["joins"] += 1
        self.counters["max_join_rows"] = max(self.counters["max_join_rows"], len(joiners))
        for s in joiners:
            s.timings.queue_s, s.timings.prefill_s = t0 - s.submitted, dt
            s.timings.talker_s = s.timings.predictor_s = 0.0
            s.timings.batch_rows_sum = 0

    def _frame(self) -> None:
        gen = self._gen
        b = len(gen.rows)
        t1 = time.perf_counter()
        done = gen.complete()                       # [(row, frame)] of rows that had no frame pending
        dt = time.perf_counter() - t1
        for s, frame in done:
            s.timings.predictor_s += dt
            s.timings.batch_rows_sum += b
            if s.cutter is None:
                s.send(frame.clone())
            else:
                s.cutter.add(frame.clone())
        self._decode_due()
        self.counters["frames"] += len(done)
        self.counters["steps"] += 1
        self.counters["max_rows"] = max(self.counters["max_rows"], b)
        try:
            # streams that end with this frame (max_frames, cancel, consumer gone) leave before the talker step
            with self._cond:
                self._drop_finished()
            if gen.rows:
                with self._cond:
                    news = self._news            # a poke from now on is not missed by the wait below
                t3 = time.perf_counter()
                moved = gen.advance()
                dt = time.perf_counter() - t3
                for s in gen.rows:
                    s.timings.talker_s += dt
                if not moved and not done:           # every row waits for its text
                    with self._cond:
                        while not self._closed and not self._waiting and self._news == news:
                            self._cond.wait()    # text, a leaving consumer, a joiner or close() wakes it
        finally:
            if self.on_step is not None:
                self.on_step(b)
