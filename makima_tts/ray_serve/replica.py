"""The engine deployment: one replica = one engine, loaded as the single-process server loads it.

`generate()` is a streaming method: it yields the chunks of one utterance as tuples
(pcm float32, index, frame_index, num_frames, is_last); the ingress asks for it with
`handle.options(stream=True, multiplexed_model_id=VOICE_KEY)`. Voices are Ray Serve multiplexed
models: the model id is `voice_id@prompt_key` (voices.records.VoiceRecord.prompt_key), the replica
loads the prompt from the shared voice library (computing it only when no saved prompt fits) and
does its one-time per-voice work (`prepare_voice`) once; Serve routes an utterance to a replica
that holds its voice when one has room. An edited voice has a new key, so it is loaded anew.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from ray import serve

from ..bridge import CancelToken
from ..engine.types import GenerationSettings
from ..server.settings import Settings
from .registry import REPORT_S, get_registry

log = logging.getLogger("makima_tts.ray")
MAX_VOICES_PER_REPLICA = 64     # voices a replica keeps loaded (multiplexed models); LRU beyond
_END = object()


def load_engine(settings: Settings):
    """The engine the single-process server would serve with these settings (engine = auto | qwen3 |
    piper; Qwen3 batched unless --no-batch). Returns (engine, reason)."""
    s = settings
    if s.threads:
        import torch

        torch.set_num_threads(s.threads)
    if s.engine != "piper" and s.checkpoint:
        from ..engine.qwen3 import Qwen3Engine

        engine: Any = Qwen3Engine.load(s.checkpoint, device=s.device, dtype=s.dtype, quantize=s.quantize,
                                  weights_cache=s.weights_cache if s.weights_cache is not None else "auto",
                                  codec_dtype=s.codec_dtype)
        if s.batch:
            from ..engine.batch import BatchedEngine

            engine = BatchedEngine(engine, max_batch=s.streams())
        return engine, f"Qwen3-TTS checkpoint {s.checkpoint}"
    if s.engine == "qwen3":
        from ..errors import EngineUnavailable

        raise EngineUnavailable("engine = qwen3 needs a checkpoint")
    from ..engine.piper import PiperEngine

    return PiperEngine.load(s.piper_voice, threads=s.threads), "no Qwen3-TTS checkpoint: the embedded engine"


def _next(it):
    try:
        return next(it)
    except StopIteration:
        return _END


def _close_after(future, it) -> None:
    """After a cancelled utterance: wait for the engine's pending step, then close its generator."""
    try:
        future.result()
    except BaseException:
        pass
    close = getattr(it, "close", None)
    if close is not None:
        close()


class EngineReplica:
    """The body of the `Engine` deployment (app.py wraps it with serve.deployment and its options)."""

    def __init__(self, settings: dict):
        self.settings = Settings(**settings)
        t0 = time.perf_counter()
        self.engine, self.reason = load_engine(self.settings)
        self.load_s = time.perf_counter() - t0
        self.pool = ThreadPoolExecutor(max_workers=self.settings.streams() + 4, thread_name_prefix="makima-replica")
        self.prompts = None
        if getattr(self.engine, "supports_cloning", False):
            from ..voices import VoiceLibrary
            from ..voices.prompts import PromptCache

            self.prompts = PromptCache(VoiceLibrary(self.settings.voices_dir), self.engine,
                                       max_items=max(MAX_VOICES_PER_REPLICA, self.settings.prompt_cache_size),
                                       ttl_s=self.settings.prompt_cache_ttl_s)
        self.streams = 0                 # utterances generating now
        self.served = 0                  # utterances taken up
        self.voice_loads: Counter = Counter()      # voice id -> times this replica loaded it (multiplexing)
        self.prompts_created = 0         # prompts computed for the ingress (uploads, voices without a saved prompt)
        ctx = serve.get_replica_context()
        rid = getattr(ctx, "replica_id", None)
        self.replica_id = str(getattr(rid, "unique_id", None) or getattr(ctx, "replica_tag", "") or os.getpid())
        self._relay: Any = None          # the text relay (token mode), looked up on first use
        self._stop = threading.Event()
        threading.Thread(target=self._report_loop, name="makima-replica-report", daemon=True).start()
        log.info("replica %s: engine %s (%s) loaded in %.1f s", self.replica_id, self.engine.name,
                 self.engine.model_id, self.load_s)

    # ------------------------------------------------------------------ what the ingress asks

    def info(self) -> dict:
        """What the ingress's RayEngine needs to stand for this engine."""
        e = self.engine
        return {"name": e.name, "model_id": str(e.model_id), "sample_rate": int(e.sample_rate),
                "supports_cloning": bool(e.supports_cloning), "fingerprint": str(getattr(e, "fingerprint", "") or ""),
                "defaults": getattr(e, "defaults", None), "builtin_voices": list(e.builtin_voices()),
                "max_streams": self.settings.streams(), "reason": self.reason, "load_s": self.load_s,
                # where the engine takes text token by token (Qwen3): its tokenizer, for the ingress's TextFeeds
                "tokenizer": getattr(e, "tokenizer", None) if hasattr(e, "new_feed") else None}

    def stats(self) -> dict:
        p = self.prompts
        return {"pid": os.getpid(), "streams": self.streams, "served": self.served,
                "max_streams": self.settings.streams(),
                "voices": sorted(self.voice_loads), "voice_loads": dict(self.voice_loads),
                "prompts_cached": len(p) if p is not None else 0,
                "prompts_computed": (p.computations if p is not None else 0) + self.prompts_created,
                "prompts_from_disk": p.disk_loads if p is not None else 0}

    async def create_voice_prompt(self, audio, sample_rate: int, transcript: Optional[str] = None,
                                  x_vector_only: bool = False):
        loop = asyncio.get_running_loop()
        prompt = await loop.run_in_executor(self.pool, lambda: self.engine.create_voice_prompt(
            audio, sample_rate, transcript, x_vector_only))
        self.prompts_created += 1
        return prompt

    @serve.multiplexed(max_num_models_per_replica=MAX_VOICES_PER_REPLICA)
    async def voice(self, model_id: str):
        """A library voice's prompt, ready to speak (loaded once per replica; Serve keeps it)."""
        voice_id = model_id.split("@", 1)[0]
        assert self.prompts is not None, "a voice of the library needs a cloning engine"
        loop = asyncio.get_running_loop()
        prompt = await loop.run_in_executor(self.pool, self.prompts.get, voice_id)
        self.voice_loads[voice_id] += 1
        return prompt

    async def _engine_voice(self, ref: Optional[tuple]):
        kind, value = ref if ref else ("none", None)
        if kind == "library":
            model_id = serve.get_multiplexed_model_id() or value
            return await self.voice(model_id)
        if kind == "prompt" and hasattr(self.engine, "prepare_voice"):
            return self.engine.prepare_voice(value)
        return value

    async def generate(self, text: "str | tuple", voice: Optional[tuple], language: str = "auto",
                       settings: Optional[GenerationSettings] = None):
        """One utterance's chunks. `text`: the text, or ("feed", id) for text that still arrives (token mode:
        pulled from the relay into the engine's own TextFeed while it speaks). Cancelling the request (the
        ingress's utterance was cancelled, or its client left) stops the engine before its next frame."""
        self.served += 1
        engine_voice = await self._engine_voice(voice)
        token = CancelToken()
        pull = None
        if isinstance(text, tuple):
            feed = self.engine.new_feed(max_chars=self.settings.max_text_chars)
            pull = asyncio.ensure_future(self._pull(text[1], feed))
            it = self.engine.stream(feed, engine_voice, language, settings, cancel=token)
        else:
            it = self.engine.stream(text, engine_voice, language, settings, cancel=token)
        loop = asyncio.get_running_loop()
        pending = None
        self.streams += 1
        try:
            while True:
                pending = self.pool.submit(_next, it)
                chunk = await asyncio.wrap_future(pending, loop=loop)
                pending = None
                if chunk is _END:
                    return
                yield (chunk.pcm, chunk.index, chunk.frame_index, chunk.num_frames, chunk.is_last)
        finally:
            self.streams -= 1
            token.cancel()
            if pull is not None:
                pull.cancel()
            if pending is not None:
                self.pool.submit(_close_after, pending, it)
            else:
                close = getattr(it, "close", None)
                if close is not None:
                    close()

    async def _pull(self, feed_id: str, feed) -> None:
        """Token mode: the text's pieces from the relay into `feed`, as they arrive, then its close."""
        from .relay import get_relay

        if self._relay is None:
            self._relay = get_relay()
        offset = 0
        try:
            while True:
                piece, closed = await self._relay.get.remote(feed_id, offset)
                if piece:
                    feed.push(piece)
                    offset += len(piece)
                if closed:
                    break
        except asyncio.CancelledError:
            raise
        except Exception as e:          # the relay went away: the text so far is all this utterance gets
            log.warning("token mode: the text relay failed (%s); the utterance ends with its text so far", e)
        feed.close()

    # ------------------------------------------------------------------ reports

    def _report_loop(self) -> None:
        registry = None
        while not self._stop.wait(REPORT_S):
            try:
                if registry is None:
                    registry = get_registry()
                registry.report.remote(self.replica_id, self.stats())
            except Exception as e:       # the registry restarts; reports resume
                registry = None
                log.debug("replica report failed: %s", e)

    def __del__(self):
        self._stop.set()
