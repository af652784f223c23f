"""The server's parts, built once per app from its settings (the composition root).

    settings, metrics
    executor     worker threads: engine loads, voice prompts, one per utterance generating
    engines      engines.EngineManager: which engine serves, loaded when; readiness
    library      the voice library (makima_tts.voices.VoiceLibrary)
    voices       voices.VoiceService: the library's rules, the prompt cache, which voice speaks
    speech       speech.SpeechService: what the routes that speak are handed

`create_app` makes one and keeps it in `app.state.ctx`; routes get the part they use from it.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from ..engine.types import SpeechEngine
from ..voices import VoiceLibrary, VoiceService
from .engines import EngineManager
from .metrics import Metrics
from .settings import Settings
from .speech import SpeechService

log = logging.getLogger("makima_tts.server")


class ServerContext:
    def __init__(self, settings: Settings, engine: Optional[SpeechEngine] = None):
        self.settings = settings
        self.metrics = Metrics()
        self.library = VoiceLibrary(settings.voices_dir)
        self.executor = ThreadPoolExecutor(max_workers=settings.streams() + 2, thread_name_prefix="makima-gen")
        self.voices = VoiceService(self.library, default_voice=settings.default_voice,
                                   prompt_cache_size=settings.prompt_cache_size,
                                   prompt_cache_ttl_s=settings.prompt_cache_ttl_s,
                                   on_prompt_computed=lambda *_: self.metrics.prompt_computations.inc(),
                                   load_embedded=self._load_embedded)
        self.engines = EngineManager(settings, self.executor, on_ready=self.voices.attach, engine=engine,
                                     after_ready=self._prepare_default_voice)
        self.speech = SpeechService(settings, self.engines, self.voices, self.metrics, self.executor)
        from ..audio import DecodeBudget, configure_decoding

        configure_decoding(DecodeBudget(max_seconds=settings.max_decode_seconds, max_rate=settings.max_decode_rate,
                                        max_channels=settings.max_decode_channels,
                                        max_concurrent=settings.max_concurrent_decodes))

    async def start(self) -> None:
        """At app start-up, on the loop: the generation slots, and the engine (unless lazy_load)."""
        await self.speech.start()

    def _prepare_default_voice(self, engine: SpeechEngine) -> None:
        """Once the engine serves, on a worker thread: the default voice's prompt loaded (or computed) and
        prepared (a Qwen3 voice's codec priming and talker prefix, 0.7 s here), which the first request
        that speaks with it would otherwise wait for. Only a voice already stored: the generated `default`
        voice is made on first use, as before."""
        voice_id = self.voices.default_voice_info().get("voice_id")
        if voice_id and self.voices.prompts is not None and self.library.exists(voice_id):
            self.voices.prompts.get(voice_id)

    def _load_embedded(self) -> SpeechEngine:
        return self.engines.load_piper()       # what makes the generated `default` voice

    @property
    def engine(self) -> Optional[SpeechEngine]:
        """The serving engine (None while it loads)."""
        return self.engines.engine

    @property
    def draining(self) -> bool:
        return self.speech.draining

    async def drain(self, timeout: float) -> None:
        await self.speech.drain(timeout)

    def status(self) -> dict:
        """GET /ready: which engine serves and why, and the default voice."""
        out = self.engines.status()
        if self.engine is not None:
            out["default_voice"] = self.voices.default_voice_info()
        return out

    def close(self) -> None:
        self.engines.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
