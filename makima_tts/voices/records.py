"""What a voice is: its id rules, its manifest record, and the shapes the REST API speaks.

`VoiceRecord` is what a voice folder's `manifest.json` holds (a dataclass: read and written by the
store). The API models (pydantic) are what /api/v1/voices answers and takes: `VoiceOut` (one voice,
stored or built into the engine), `VoiceList`, `VoiceDeleted`, `VoicePatch`; their JSON is the
contract of docs/protocol.md and the OpenAPI docs.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer

from ..errors import InvalidVoiceId

__all__ = ["validate_id", "slugify", "VoiceRecord", "VoiceOut", "VoiceList", "VoiceDeleted", "VoicePatch",
           "DefaultVoice", "MANIFEST", "MANIFEST_FORMAT", "SAMPLE_RATE", "MAX_NAME_CHARS", "MAX_TRANSCRIPT_CHARS"]

SAMPLE_RATE = 24000                  # stored clips are mono 24 kHz
MAX_NAME_CHARS = 200
MAX_TRANSCRIPT_CHARS = 2000
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "makima-voice/1"

_ID_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}", re.ASCII)
_RESERVED = frozenset({"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))})


def validate_id(voice_id) -> str:
    """The id itself when it is a safe voice id; InvalidVoiceId otherwise.

    Lowercase ASCII letters, digits, `_` and `-`, starting with a letter or digit, at most 64
    characters. Unicode look-alikes (fullwidth letters, direction overrides) are refused, not
    normalised, so what is stored is exactly what was asked for.
    """
    if not isinstance(voice_id, str):
        raise InvalidVoiceId(f"a voice id must be a string, got {type(voice_id).__name__}")
    if not _ID_RE.fullmatch(voice_id) or voice_id in _RESERVED:
        shown = voice_id if len(voice_id) <= 80 else voice_id[:77] + "..."
        raise InvalidVoiceId(f"invalid voice id {shown!r}: use 1-64 characters of a-z, 0-9, '_' and '-', "
                             "starting with a letter or a digit")
    return voice_id


def slugify(text: str) -> str:
    """A voice id made from a display name ("Makima (calm)" -> "makima-calm"); may be ''."""
    import unicodedata

    ascii_text = unicodedata.normalize("NFKD", text or "").encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9_]+", "-", ascii_text.lower()).strip("-_")
    return slug[:64].rstrip("-_")


# --------------------------------------------------------------------------- the manifest


_TRANSIENT = ("warning", "builtin", "has_audio", "engines")     # on a record, never in its manifest


@dataclass
class VoiceRecord:
    """One voice, as its manifest describes it."""

    voice_id: str
    name: str
    language: str = "auto"
    transcript: Optional[str] = None
    x_vector_only: bool = False
    duration_s: Optional[float] = None
    sample_rate: Optional[int] = None
    created: Optional[int] = None        # unix seconds
    updated: Optional[int] = None
    hash: Optional[str] = None           # "sha256:..." of the clip's 16-bit PCM
    builtin: bool = False
    generated: bool = False
    license: Optional[str] = None
    has_audio: bool = True
    audio_file: Optional[str] = None     # the clip's file name inside the voice folder
    source_name: Optional[str] = None    # the uploaded file's name
    seed: bool = False                   # shipped with the package (makima)
    description: str = ""
    warning: Optional[str] = None        # set on the result of add() only; not stored
    # the engines whose prompt for this clip is stored beside it (VoiceLibrary.prompt_engines); not stored
    engines: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """The voice as the API (and `makima-tts voices list --json`) shows it."""
        return VoiceOut.from_record(self).model_dump(mode="json")

    def manifest(self) -> dict:
        d = asdict(self)
        for transient in _TRANSIENT:
            d.pop(transient)
        return {"format": MANIFEST_FORMAT, **d}

    def manifest_bytes(self) -> bytes:
        return (json.dumps(self.manifest(), indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    @classmethod
    def from_manifest(cls, data: dict) -> "VoiceRecord":
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"not a {MANIFEST_FORMAT} manifest")
        known = {f for f in cls.__dataclass_fields__ if f not in _TRANSIENT}
        kwargs = {k: v for k, v in data.items() if k in known}
        if not isinstance(kwargs.get("voice_id"), str):
            raise ValueError("manifest has no voice_id")
        kwargs.setdefault("name", kwargs["voice_id"])
        return cls(**kwargs)

    @property
    def prompt_key(self) -> str:
        """Changes whenever what the prompt is computed from changes (clip, transcript, mode)."""
        h = hashlib.sha256(json.dumps([self.hash, self.transcript, bool(self.x_vector_only)]).encode())
        return h.hexdigest()[:16]


# --------------------------------------------------------------------------- the API's shapes

_ABSENT_WHEN_NONE = ("seed", "description", "warning")


class VoiceOut(BaseModel):
    """One voice in the API: a stored (cloned) voice, or one built into the serving engine.
    `seed`, `description` and `warning` appear only when they say something."""

    voice_id: str
    name: str
    language: str
    transcript: Optional[str] = None
    x_vector_only: bool = False
    duration_s: Optional[float] = None
    sample_rate: Optional[int] = None
    created: Optional[int] = None
    hash: Optional[str] = None
    builtin: bool = False
    generated: bool = False
    license: Optional[str] = None
    has_audio: bool = True
    seed: Optional[bool] = None          # true for a voice shipped with the package (makima)
    description: Optional[str] = None
    warning: Optional[str] = None        # on the answer to an upload: the clip's length, or that the engine cannot clone
    # the engines this voice is prepared for: a stored voice, those whose prompt of its current clip is stored
    # ("qwen3", "chatterbox"; another engine prepares it on first use); a built-in voice, its own engine
    engines: list[str] = []

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler: SerializerFunctionWrapHandler):   # unannotated: the schema stays the fields'
        out = handler(self)
        for key in _ABSENT_WHEN_NONE:
            if out.get(key) is None:
                out.pop(key, None)
        return out

    @classmethod
    def from_record(cls, r: VoiceRecord) -> "VoiceOut":
        return cls(voice_id=r.voice_id, name=r.name, language=r.language, transcript=r.transcript,
                   x_vector_only=r.x_vector_only, duration_s=r.duration_s, sample_rate=r.sample_rate,
                   created=r.created, hash=r.hash, builtin=r.builtin, generated=r.generated, license=r.license,
                   has_audio=r.has_audio, seed=True if r.seed else None, description=r.description or None,
                   warning=r.warning or None, engines=list(r.engines))

    @classmethod
    def builtin_voice(cls, info, engine: Optional[str] = None) -> "VoiceOut":
        """A voice of the engine itself (engine.types.VoiceInfo; `engine`: its name): no clip, cannot be edited."""
        return cls(voice_id=info.voice_id, name=info.name, language=info.language, builtin=True, has_audio=False,
                   description=getattr(info, "description", ""), engines=[engine] if engine else [])


class DefaultVoice(BaseModel):
    """Which voice speaks when a request names none, and why."""

    voice_id: Optional[str] = None
    reason: str = ""


class VoiceList(BaseModel):
    """GET /api/v1/voices: the engine's built-in voices first, then the library's, paginated."""

    voices: list[VoiceOut]
    total: int
    limit: int
    offset: int
    default_voice: DefaultVoice


class VoiceDeleted(BaseModel):
    voice_id: str
    object: Literal["voice"] = "voice"
    deleted: bool = True


class VoicePatch(BaseModel):
    """PATCH /api/v1/voices/{id}: what to change (a new transcript recomputes the prompt)."""

    model_config = ConfigDict(extra="forbid")

    name: Optional[str] = None
    transcript: Optional[str] = None
