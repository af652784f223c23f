"""Plain data passed between the engines and their users (the CLI, the server).

Data flows one way: text and a voice in, `AudioChunk`s out. Nothing here knows
about sockets, and nothing here holds model weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Protocol, Union

import numpy as np

from ..bridge import CancelToken

if TYPE_CHECKING:
    import torch

LANGUAGES = ("auto", "english", "german", "spanish", "chinese", "japanese", "french", "korean",
             "russian", "italian", "portuguese")


def check_language(language: Optional[str]) -> str:
    """"auto" (also for None or "") or one of LANGUAGES, lower-cased; UnknownLanguage otherwise."""
    from ..errors import UnknownLanguage

    lang = str(language or "auto").strip().lower()
    if lang not in LANGUAGES:
        raise UnknownLanguage(f"unknown language {language!r}; use one of: {', '.join(LANGUAGES)}")
    return lang


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings for one stage (the talker, or the code predictor)."""

    do_sample: bool = True
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def greedy(self) -> "SamplingParams":
        return replace(self, do_sample=False)


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that shapes one utterance besides its text, voice and language."""

    talker: SamplingParams = SamplingParams(repetition_penalty=1.05)
    predictor: SamplingParams = SamplingParams()
    seed: Optional[int] = None
    # None: derived from the text length, so a model that never says EOS still stops.
    max_frames: Optional[int] = None
    # Frames in the first audio chunk (small: time to first audio); later chunks double up to chunk_frames.
    first_chunk_frames: int = 1
    chunk_frames: int = 6

    @classmethod
    def greedy_settings(cls, **kw) -> "GenerationSettings":
        return cls(talker=SamplingParams(do_sample=False, repetition_penalty=1.05),
                   predictor=SamplingParams(do_sample=False), **kw)

    def with_overrides(self, overrides: Optional[Mapping[str, Any]] = None) -> "GenerationSettings":
        """These settings with a request's sampling overrides, in the shape of the protocol's
        `start.sampling` (docs/protocol.md): the talker's fields at the top (do_sample, temperature,
        top_k, top_p, repetition_penalty), the code predictor's under "predictor", and seed and
        max_frames. A missing or None value keeps the setting. Used by the server and by `say`."""
        if not overrides:
            return self

        def stage(params: SamplingParams, values: Mapping[str, Any]) -> SamplingParams:
            changes = {k: values[k] for k in _SAMPLING_FIELDS if values.get(k) is not None}
            return replace(params, **changes) if changes else params

        changes: dict[str, Any] = {"talker": stage(self.talker, overrides),
                                   "predictor": stage(self.predictor, overrides.get("predictor") or {})}
        for name in ("seed", "max_frames"):
            if overrides.get(name) is not None:
                changes[name] = overrides[name]
        return replace(self, **changes)


_SAMPLING_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")


@dataclass
class GenerationStats:
    """Where one utterance's time went, filled by the engine when the caller passes one (`stats=`):
    bench/, `say` and `bench` read it. Seconds since the request unless said otherwise."""

    frames: Optional[int] = None       # frames generated (set when the stream ends)
    ttfa_s: Optional[float] = None     # first audio chunk ready
    total_s: Optional[float] = None    # the stream ended
    prefill_s: float = 0.0             # the prompt's forward pass
    talker_s: float = 0.0              # talker steps (summed)
    predictor_s: float = 0.0           # code predictor steps (summed)
    decode_s: float = 0.0              # codec decoding (summed; a shared call is split between its rows)
    queue_s: float = 0.0               # batched: waiting for a row
    batch_rows_sum: int = 0            # batched: rows in the batch, summed over this stream's frames


@dataclass
class AudioChunk:
    """A piece of an utterance: float32 mono PCM in [-1, 1]."""

    pcm: np.ndarray
    sample_rate: int
    index: int          # chunk number within the utterance, from 0
    frame_index: int    # first codec frame in this chunk (0 for engines without frames)
    num_frames: int     # codec frames in this chunk
    is_last: bool

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / self.sample_rate


@dataclass
class VoiceInfo:
    """A voice an engine offers by itself (no cloning needed)."""

    voice_id: str
    name: str
    language: str
    builtin: bool = True
    description: str = ""


class SpeechEngine(Protocol):
    """What the server and the CLI need of an engine."""

    name: str                 # "qwen3" | "piper" | "chatterbox"
    model_id: str             # checkpoint path / repo id / voice model name
    sample_rate: int
    supports_cloning: bool

    def builtin_voices(self) -> list[VoiceInfo]: ...

    def create_voice_prompt(self, audio: np.ndarray, sample_rate: int, transcript: Optional[str] = None,
                            x_vector_only: bool = False): ...

    def stream(self, text: str, voice: Union[str, object, None] = None, language: str = "auto",
               settings: Optional[GenerationSettings] = None,
               cancel: Optional[CancelToken] = None) -> Iterator[AudioChunk]: ...


@dataclass
class VoicePrompt:
    """A cloned voice, computed once from a reference clip and reused for every utterance.

    `ref_codes` (frames x 16 codebooks, int64) and `ref_text` are set in ICL mode; in
    x-vector-only mode only `speaker_embedding` is used. `fingerprint` names the
    checkpoint it was computed with: a prompt is only valid for that checkpoint.
    `tensors` holds what else an engine computed from the clip, by name (Chatterbox: its speech
    encoder's conditionals); `meta["engine"]` names the engine that made the prompt.
    """

    speaker_embedding: "torch.Tensor"
    ref_codes: Optional["torch.Tensor"] = None
    ref_text: Optional[str] = None
    x_vector_only: bool = False
    fingerprint: str = ""
    meta: dict = field(default_factory=dict)
    tensors: dict = field(default_factory=dict)

    @property
    def engine(self) -> str:
        """The engine the prompt was made by ("qwen3" for prompts saved before engines were named)."""
        return str((self.meta or {}).get("engine") or "qwen3")

    @property
    def icl(self) -> bool:
        return not self.x_vector_only

    def save(self, path) -> None:
        """Write as safetensors (atomically: makima_tts.fileio)."""
        import json

        from safetensors.torch import save

        from ..fileio import atomic_write

        tensors = {"speaker_embedding": self.speaker_embedding.detach().float().cpu().contiguous()}
        if self.ref_codes is not None:
            tensors["ref_codes"] = self.ref_codes.detach().to(dtype=__import__("torch").int64).cpu().contiguous()
        for name, value in (self.tensors or {}).items():
            tensors[f"extra.{name}"] = value.detach().cpu().contiguous()
        metadata = {"format": "makima-voice-prompt/1", "x_vector_only": json.dumps(self.x_vector_only),
                    "ref_text": json.dumps(self.ref_text), "fingerprint": self.fingerprint,
                    "meta": json.dumps(self.meta)}
        atomic_write(path, save(tensors, metadata=metadata))

    @classmethod
    def load(cls, path) -> "VoicePrompt":
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            if md.get("format") != "makima-voice-prompt/1":
                raise ValueError(f"{path} is not a makima voice prompt")
            keys = set(f.keys())
            emb = f.get_tensor("speaker_embedding")
            codes = f.get_tensor("ref_codes") if "ref_codes" in keys else None
            extra = {k[len("extra."):]: f.get_tensor(k) for k in sorted(keys) if k.startswith("extra.")}
        return cls(speaker_embedding=emb, ref_codes=codes, ref_text=json.loads(md.get("ref_text", "null")),
                   x_vector_only=json.loads(md.get("x_vector_only", "false")),
                   fingerprint=md.get("fingerprint", ""), meta=json.loads(md.get("meta", "{}")), tensors=extra)
