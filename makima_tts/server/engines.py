"""Which engine serves, and when it is ready: `EngineManager`.

`engine = auto | qwen3 | chatterbox | piper` (Settings): auto serves the checkpoint's engine when
one is configured and loads (Chatterbox for a folder in its ONNX layout, else Qwen3-TTS), otherwise
the embedded Piper engine; qwen3 and chatterbox stop the server if the checkpoint cannot load; piper
never touches a checkpoint. `load_engine(settings)` is that choice, blocking (also `makima-tts say`'s). The engine loads off the event loop, at start-up or (lazy_load) on
the first request; `await engines.get()` is how everything else reaches it, and `status()` says
which engine serves and why (GET /ready, the start-up log line).
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from typing import Callable, Optional

from ..engine.types import SpeechEngine
from ..errors import EngineUnavailable, MakimaError, NotReady
from .settings import Settings

log = logging.getLogger("makima_tts.server")
LOAD_WAIT_S = 600.0          # how long a request waits for a lazy load


class EngineManager:
    """Loads the engine once and hands it out. `on_ready(engine)` is called once it serves."""

    def __init__(self, settings: Settings, executor: Executor,
                 on_ready: Optional[Callable[[SpeechEngine], None]] = None,
                 engine: Optional[SpeechEngine] = None,
                 after_ready: Optional[Callable[[SpeechEngine], None]] = None):
        self.settings = settings
        self.executor = executor
        self.on_ready = on_ready
        # run once, on a worker thread, after a loaded engine serves (the default voice prepared): ready is
        # not held back, and a request that comes meanwhile waits for that work instead of repeating it
        self.after_ready = after_ready
        self.engine: Optional[SpeechEngine] = None
        self.reason = ""                       # why this engine serves
        self.load_error: Optional[str] = None
        self.state = "starting"                # starting | loading | ready | failed
        self._loaded: Optional[asyncio.Event] = None
        self._load_task: Optional[asyncio.Future] = None
        if engine is not None:
            self._serve(engine, "engine given by the caller")

    @property
    def name(self) -> str:
        """The serving engine's name ("none" before it loads): the metrics' engine label."""
        return self.engine.name if self.engine is not None else "none"

    @property
    def streams_tokens(self) -> bool:
        """Whether the engine takes text token by token as it arrives (Qwen3's TextFeed)."""
        return self.engine is not None and hasattr(self.engine, "new_feed")

    async def start(self) -> None:
        """At app start-up, on the loop: load the engine unless lazy_load (engine = qwen3: wait for it,
        and fail the start-up if it does not load)."""
        self._loaded = asyncio.Event()
        if self.engine is not None:
            self._loaded.set()
            return
        if self.settings.engine in ("qwen3", "chatterbox") and not self.settings.lazy_load:
            await asyncio.get_running_loop().run_in_executor(self.executor, self._load_engine)
            self._loaded.set()
            if self.engine is None:
                raise EngineUnavailable(self.load_error or f"the {self.settings.engine} engine did not load")
            return
        if not self.settings.lazy_load:
            self._begin_load()

    async def get(self, wait: bool = True, timeout: float = LOAD_WAIT_S) -> SpeechEngine:
        """The engine. Starts a lazy load and waits for it; wait=False: NotReady while it loads
        (unless lazy_load, where the first request waits)."""
        if self.engine is not None:
            return self.engine
        if self.state == "failed":
            raise EngineUnavailable(f"no speech engine: {self.load_error}")
        self._begin_load()
        if not wait and not self.settings.lazy_load:
            raise NotReady("the model is still loading; retry in a few seconds (GET /ready says when)")
        assert self._loaded is not None
        try:
            await asyncio.wait_for(self._loaded.wait(), timeout)
        except asyncio.TimeoutError:
            raise NotReady("the model is still loading; retry in a few seconds") from None
        if self.engine is None:
            raise EngineUnavailable(f"no speech engine: {self.load_error}")
        return self.engine

    def status(self) -> dict:
        """GET /ready's body, less the default voice: ready, state, and which engine serves and why."""
        out: dict = {"ready": self.engine is not None, "state": self.state}
        if self.engine is not None:
            engine = self.engine
            out.update(engine=engine.name, model=str(engine.model_id), reason=self.reason,
                       sample_rate=engine.sample_rate, cloning=engine.supports_cloning,
                       batched=bool(getattr(engine, "batched", self.settings.batch and engine.supports_cloning)))
        elif self.state == "failed":
            out["reason"] = self.load_error
        elif self.settings.lazy_load and self.state == "starting":
            out["reason"] = "the model loads on the first request (lazy_load)"
        else:
            out["reason"] = "the model is loading"
        return out

    def load_piper(self) -> SpeechEngine:
        """The embedded engine (also what makes the generated `default` voice)."""
        return load_piper(self.settings)

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    # ------------------------------------------------------------------ loading (a worker thread)

    def _begin_load(self) -> None:
        if self._load_task is None:
            self.state = "loading"
            self._load_task = asyncio.get_running_loop().run_in_executor(self.executor, self._load_engine)
            loaded = self._loaded
            assert loaded is not None
            self._load_task.add_done_callback(lambda _: loaded.set())

    def _load_engine(self) -> None:
        try:
            engine, reason = load_engine(self.settings, self.load_piper)
            self._serve(engine, reason)
        except Exception as e:
            self.state = "failed"
            self.load_error = e.message if isinstance(e, MakimaError) else f"{type(e).__name__}: {e}"
            log.error("engine failed to load: %s", self.load_error)
            return
        if self.after_ready is not None:
            try:
                self.executor.submit(self._after_ready, engine)
            except RuntimeError:                   # the server is shutting down
                log.info("skipped the work after start-up: the server is shutting down")

    def _after_ready(self, engine: SpeechEngine) -> None:
        assert self.after_ready is not None
        try:
            t0 = time.perf_counter()
            self.after_ready(engine)
            log.info("start-up work done in %.1f s", time.perf_counter() - t0)
        except Exception as e:                     # a request will meet the same error, in words
            log.warning("the work after start-up failed: %s",
                        e.message if isinstance(e, MakimaError) else f"{type(e).__name__}: {e}")

    def _serve(self, engine: SpeechEngine, reason: str) -> None:
        self.engine = engine
        self.reason = reason
        if self.on_ready is not None:
            self.on_ready(engine)
        self.state = "ready"
        log.info("ready: engine %s (%s), because %s", engine.name, engine.model_id, reason)


# ---------------------------------------------------------------------- choosing and loading (blocking)


def load_engine(settings: Settings,
                load_embedded: Optional[Callable[[], SpeechEngine]] = None) -> tuple[SpeechEngine, str]:
    """The engine `settings` choose, loaded, and why it serves (the server's and `makima-tts say`'s one
    choice). Raises when the engine asked for (qwen3, chatterbox, piper) does not load; auto falls back to
    the embedded engine (`load_embedded`, default load_piper) when the checkpoint's does not."""
    s = settings
    embedded = load_embedded or (lambda: load_piper(s))
    if s.threads:
        import torch

        torch.set_num_threads(s.threads)
    if s.engine == "piper":
        return embedded(), "engine = piper"
    reason = "no Qwen3-TTS checkpoint configured (--checkpoint or MAKIMA_TTS_CHECKPOINT)"
    if s.checkpoint or s.engine != "auto":
        name, load, what = (("chatterbox", load_chatterbox, "Chatterbox-Turbo ONNX export") if s.wants_chatterbox
                            else ("qwen3", load_qwen3, "Qwen3-TTS checkpoint"))
        if not s.checkpoint:
            raise EngineUnavailable(_NEEDS_CHECKPOINT[name])
        try:
            return load(s), f"{what} {s.checkpoint}"
        except Exception as e:
            if s.engine == name:
                raise
            reason = f"the {what} {s.checkpoint} did not load ({e})"
    try:
        engine = embedded()
    except Exception as e:
        raise EngineUnavailable(f"{reason}, and the embedded engine is not available ({e}); "
                                "install it with pip install 'makima-tts[piper]' or configure a checkpoint") from e
    log.warning("engine: embedded Piper voice %r, because %s", engine.model_id, reason)
    return engine, reason


_NEEDS_CHECKPOINT = {
    "chatterbox": "engine = chatterbox needs its ONNX export: --checkpoint PATH_OR_REPO (a folder with onnx/, or "
                  "ResembleAI/chatterbox-turbo-ONNX)",
    "qwen3": "engine = qwen3 needs a checkpoint: --checkpoint PATH_OR_REPO (or MAKIMA_TTS_CHECKPOINT)"}


def load_piper(s: Settings) -> SpeechEngine:
    from ..engine.piper import PiperEngine

    return PiperEngine.load(s.piper_voice, threads=s.threads)


def load_chatterbox(s: Settings) -> SpeechEngine:
    from ..engine.chatterbox import ChatterboxEngine

    assert s.checkpoint is not None
    engine = ChatterboxEngine.load(s.checkpoint, dtype=s.onnx_dtype, threads=s.threads, device=s.device)
    log.info("Chatterbox graphs: %s, loaded in %.1f s", engine.load_info["dtype"], engine.load_info["load_s"])
    return engine


def load_qwen3(s: Settings):   # a Qwen3Engine or a BatchedEngine (they take a VoicePrompt as the voice)
    from ..engine.qwen3 import Qwen3Engine

    assert s.checkpoint is not None
    engine = Qwen3Engine.load(s.checkpoint, device=s.device, dtype=s.dtype, quantize=s.quantize,
                              weights_cache=s.weights_cache if s.weights_cache is not None else "auto",
                              codec_dtype=s.codec_dtype)
    log.info("Qwen3 weights: %s, from the %s, codec in %s, loaded in %.1f s", engine.load_info["quantize"],
             engine.load_info["weights"], engine.load_info["codec_dtype"], engine.load_info["load_s"])
    if s.batch:
        from ..engine.batch import BatchedEngine

        return BatchedEngine(engine, max_batch=s.streams())
    return engine
