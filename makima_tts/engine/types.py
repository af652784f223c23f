"""Plain data passed between the engines and their users (the CLI, the server).

Data flows one way: text and a voice in, `AudioChunk`s out. Nothing here knows
about sockets, and nothing here holds model weights.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional, Protocol, Union

import numpy as np

LANGUAGES = ("auto", "english", "german", "spanish", "chinese", "japanese", "french", "korean",
             "russian", "italian", "portuguese")


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
    # Frames in the first audio chunk (small: time to first audio), then in each later chunk.
    first_chunk_frames: int = 2
    chunk_frames: int = 6

    @classmethod
    def greedy_settings(cls, **kw) -> "GenerationSettings":
        return cls(talker=SamplingParams(do_sample=False, repetition_penalty=1.05),
                   predictor=SamplingParams(do_sample=False), **kw)


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


class CancelToken:
    """Set by the consumer; the engine checks it between frames and stops."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


class SpeechEngine(Protocol):
    """What the server and the CLI need of an engine."""

    name: str                 # "qwen3" | "piper"
    model_id: str             # checkpoint path / repo id / voice model name
    sample_rate: int
    supports_cloning: bool

    def builtin_voices(self) -> list[VoiceInfo]: ...

    def create_voice_prompt(self, audio: np.ndarray, sample_rate: int, transcript: Optional[str] = None,
                            x_vector_only: bool = False): ...

    def stream(self, text: str, voice: Union[str, object, None] = None, language: str = "auto",
               settings: Optional[GenerationSettings] = None,
               cancel: Optional[CancelToken] = None) -> Iterator[AudioChunk]: ...
