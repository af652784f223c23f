"""Which voice speaks a request: a voice name (or none) in, one `ResolvedVoice` out, for any engine.

The order: the request's voice, the session's voice, the `default_voice` setting, the seed voice
`makima` once it has a clip, and otherwise the generated `default` voice (made once, on first
need, by the voice service). OpenAI's voice names (`alloy`, ...) mean "the default" unless the
library has a voice of that name.

An engine that clones (Qwen3) speaks with a computed VoicePrompt; one that does not (Piper)
with one of its built-in speakers, and a cloned voice named to it is CLONING_UNSUPPORTED.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from ..errors import CloningUnsupported, MakimaError, VoiceNotFound
from .store import VoiceLibrary

if TYPE_CHECKING:
    from ..engine.types import SpeechEngine, VoicePrompt
    from .prompts import PromptCache

__all__ = ["ResolvedVoice", "resolve", "default_voice_info", "OPENAI_VOICES", "SEED_VOICE", "GENERATED_VOICE",
           "QWEN_HINT"]

# OpenAI's voice names: clients send them by default; they map to the server's default voice.
OPENAI_VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage",
                           "shimmer", "verse", "marin", "cedar"})
SEED_VOICE = "makima"
GENERATED_VOICE = "default"
QWEN_HINT = ("voice cloning needs the Qwen3-TTS engine: start the server with --checkpoint PATH_OR_REPO "
             "(or set MAKIMA_TTS_CHECKPOINT)")


@dataclass(frozen=True)
class ResolvedVoice:
    """The voice an utterance speaks with: its name (what `audio_start` reports) and what the
    engine takes for it, one of: `prompt` (a cloning engine's computed VoicePrompt) or `speaker`
    (the id of one of the engine's built-in voices)."""

    voice_id: str
    prompt: Optional["VoicePrompt"] = None
    speaker: Optional[str] = None

    @property
    def engine_voice(self) -> Union["VoicePrompt", str, None]:
        """The `voice` argument of `engine.stream`."""
        return self.prompt if self.prompt is not None else self.speaker


def resolve(requested: Optional[str], session_voice: Optional[str], *, engine: "SpeechEngine",
            library: VoiceLibrary, prompts: Optional["PromptCache"], default_voice: Optional[str],
            generated: Callable[[], Any]) -> ResolvedVoice:
    """The voice for a request (see the module's docstring). `generated()` makes the `default`
    voice when needed and returns its prompt. Blocking (may compute a prompt): call from a worker
    thread."""
    if not engine.supports_cloning:
        builtin = [v.voice_id for v in engine.builtin_voices()]
        for name in (requested, session_voice):
            if not name or ((name in OPENAI_VOICES or name == GENERATED_VOICE) and name not in builtin):
                continue
            if name in builtin:
                return ResolvedVoice(name, speaker=name)
            if library.exists(name):
                raise CloningUnsupported(f"voice {name!r} is a cloned voice, and the {engine.name} engine that "
                                         f"is serving cannot clone; {QWEN_HINT}")
            raise VoiceNotFound(f"voice {name!r} not found; the {engine.name} engine is serving, with "
                                f"built-in voices: {', '.join(builtin)}")
        return ResolvedVoice(builtin[0], speaker=builtin[0])
    assert prompts is not None, "a cloning engine has a prompt cache"
    for name in (requested, session_voice):
        if not name or (name in OPENAI_VOICES and not library.exists(name)):
            continue
        if name == GENERATED_VOICE:          # named: made on first need, as when none is named
            return ResolvedVoice(GENERATED_VOICE, prompt=generated())
        return ResolvedVoice(name, prompt=prompts.get(name))
    if default_voice:
        return ResolvedVoice(default_voice, prompt=prompts.get(default_voice))
    if seed_ready(library):
        return ResolvedVoice(SEED_VOICE, prompt=prompts.get(SEED_VOICE))
    return ResolvedVoice(GENERATED_VOICE, prompt=generated())


def default_voice_info(engine: Optional["SpeechEngine"], library: VoiceLibrary,
                       default_voice: Optional[str]) -> dict:
    """Which voice speaks when none is named, and why: {"voice_id", "reason"} (for `ready`, /ready and
    the voices list)."""
    if engine is None:
        return {"voice_id": None, "reason": "the model is not loaded yet"}
    if not engine.supports_cloning:
        vid = engine.builtin_voices()[0].voice_id
        return {"voice_id": vid, "reason": f"the built-in voice of the {engine.name} engine"}
    if default_voice:
        return {"voice_id": default_voice, "reason": "the default_voice setting"}
    if seed_ready(library):
        return {"voice_id": SEED_VOICE, "reason": "the seed voice makima has its reference clip"}
    return {"voice_id": GENERATED_VOICE,
            "reason": "no default_voice set and makima's clip is missing: a voice generated from the "
                      "embedded engine's built-in voice (made on first use)"}


def seed_ready(library: VoiceLibrary) -> bool:
    """Whether the seed voice makima has its reference clip."""
    try:
        return bool(library.get(SEED_VOICE).has_audio)
    except MakimaError:
        return False
