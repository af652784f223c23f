"""The checks a reference clip passes before the library stores it, and its stored form.

A clip is made mono float32 by `audio.to_mono_f32` (the one normaliser), held to the one length
policy of `audio.check_clip_length` (MIN_CLIP_SECONDS .. MAX_CLIP_SECONDS, a warning outside the
recommended 3-10 s), refused when silent, clipped or not finite, and resampled to 24 kHz; it is
stored as 16-bit FLAC.
"""
from __future__ import annotations

import io
from typing import Optional

import numpy as np

from ..audio import MAX_CLIP_SECONDS, RECOMMENDED_CLIP_SECONDS, check_clip_length, resample, to_mono_f32
from ..errors import InvalidAudio
from .records import SAMPLE_RATE

__all__ = ["check_clip", "check_declared_length", "to_pcm16_array", "encode_flac"]

CLIP_LEVEL = 0.999          # a sample at or above this magnitude counts as clipped
MAX_CLIPPED_FRACTION = 0.01
SILENCE_RMS = 1e-3          # -60 dBFS


def check_clip(audio, sample_rate: int) -> tuple[np.ndarray, Optional[str]]:
    """(mono float32 at 24 kHz, a warning or None); InvalidAudio when the clip is unusable."""
    try:
        sample_rate = int(sample_rate)
    except (TypeError, ValueError):
        raise InvalidAudio(f"invalid sample rate {sample_rate!r}") from None
    if sample_rate < 8000 or sample_rate > 384000:
        raise InvalidAudio(f"invalid sample rate {sample_rate} Hz")
    if np.asarray(audio).size == 0:
        raise InvalidAudio("the clip is empty (no samples)")
    x = to_mono_f32(audio)
    if not np.all(np.isfinite(x)):
        raise InvalidAudio("the clip contains NaN or infinite samples")
    warning = check_clip_length(len(x) / sample_rate)
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    if rms < SILENCE_RMS:
        raise InvalidAudio(f"the clip is silent (RMS level {20 * np.log10(max(rms, 1e-12)):.0f} dBFS); "
                           "record the voice louder")
    clipped = float(np.mean(np.abs(x) >= CLIP_LEVEL))
    if clipped > MAX_CLIPPED_FRACTION:
        raise InvalidAudio(f"the clip is clipped: {clipped * 100:.1f}% of its samples are at full scale; "
                           "record it at a lower level")
    if sample_rate != SAMPLE_RATE:
        x = resample(x, sample_rate, SAMPLE_RATE)
    return np.clip(x, -1.0, 1.0).astype(np.float32), warning


def check_declared_length(data: bytes) -> None:
    """Refuse, before decoding, a file whose header says it is far longer than a clip may be
    (a small compressed file can expand to hours of samples)."""
    try:
        import soundfile as sf

        info = sf.info(io.BytesIO(data))
        seconds = info.frames / info.samplerate if info.samplerate > 0 else 0.0
    except Exception:
        return  # not readable by libsndfile: read_audio decides
    if seconds > 4 * MAX_CLIP_SECONDS:
        lo, hi = RECOMMENDED_CLIP_SECONDS
        raise InvalidAudio(f"the clip is too long: {seconds:.0f} s; at most {MAX_CLIP_SECONDS:.0f} s is accepted "
                           f"({lo:.0f}-{hi:.0f} s recommended); trim it")


def to_pcm16_array(pcm: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] -> int16, as the clip is stored (and hashed)."""
    return np.clip(np.round(pcm * 32768.0), -32768, 32767).astype(np.int16)


def encode_flac(pcm16: np.ndarray) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, pcm16, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()
