"""Audio utilities shared by the server and the CLI.

All PCM here is float32 mono in [-1, 1] unless said otherwise.

* Resampling: `resample` (one shot) and `StreamResampler` (chunk by chunk, soxr).
* Raw encodings: `to_pcm16`, `to_f32le`, `wav_bytes`.
* Streaming encoders for the OpenAI formats: `make_encoder(fmt, sample_rate)` for
  mp3, opus (Ogg Opus), aac (ADTS), flac, wav and pcm. mp3/opus/aac/flac need PyAV
  (the `av` package, in the `server` extra); wav and pcm need nothing.
* Decoding: `read_audio(data_or_path)` -> (mono float32, sample_rate).
* `to_mono_f32(pcm)`: any PCM array to mono float32 (the one normaliser: integers scaled by
  their type's full scale), and the one policy for reference clips: `check_clip_length`
  (MIN_CLIP_SECONDS .. MAX_CLIP_SECONDS, RECOMMENDED_CLIP_SECONDS).
* `time_stretch(pcm, sr, speed)`: tempo change that keeps the pitch (FFmpeg's atempo, needs PyAV).
"""
from __future__ import annotations

import io
import logging
import os
import struct
import threading
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from .errors import InvalidAudio, UnsupportedFormat

__all__ = ["resample", "StreamResampler", "to_pcm16", "to_f32le", "wav_bytes", "wav_header",
           "Encoder", "make_encoder", "ENCODER_FORMATS", "CONTENT_TYPES", "read_audio", "time_stretch",
           "RESAMPLE_STREAM_TOLERANCE", "to_mono_f32", "check_clip_length", "MIN_CLIP_SECONDS",
           "MAX_CLIP_SECONDS", "RECOMMENDED_CLIP_SECONDS", "prepare_reference"]

# Largest absolute difference between chunked (StreamResampler) and one-shot (resample) output,
# for any chunking, at the same quality setting. Measured differences are ~1e-7 (float rounding);
# the bound leaves a wide margin.
RESAMPLE_STREAM_TOLERANCE = 1e-4

_RESAMPLE_QUALITY = "HQ"


# One policy for reference clips, wherever one is taken (the voice library, the engine's
# create_voice_prompt): how long it may be, and what clones best.
MIN_CLIP_SECONDS = 1.0
MAX_CLIP_SECONDS = 30.0
RECOMMENDED_CLIP_SECONDS = (3.0, 10.0)


def to_mono_f32(pcm, channel_axis: Optional[int] = None) -> np.ndarray:
    """Any PCM array -> contiguous mono float32 (the array itself when it already is one).

    Integers are scaled by their type's full scale: int16 / 32768, int32 / 2**31; unsigned types
    are centred first (uint8: (x - 128) / 128). Floats are taken as they are (no clipping, no
    check for NaN). 2-D input is mixed down over `channel_axis`; when it is None, (samples,
    channels) is assumed (soundfile's convention), or (channels, samples) when the first axis is
    the shorter. Empty input gives an empty array. InvalidAudio for more than 2 dimensions or
    samples that are not numbers.
    """
    x = np.asarray(pcm)
    if x.ndim > 2:
        raise InvalidAudio(f"expected mono or (samples, channels) audio, got shape {x.shape}")
    kind = x.dtype.kind
    if kind in "iu":
        info = np.iinfo(x.dtype)
        full = float(1 << (info.bits - 1))          # 32768 for 16 bits
        x = x.astype(np.float64 if info.bits > 16 else np.float32)
        x = (x - full) / full if kind == "u" else x / full
    elif kind != "f":
        raise InvalidAudio(f"unsupported sample type {x.dtype}")
    if x.ndim == 2:
        if channel_axis is None:
            channel_axis = 1 if x.shape[0] >= x.shape[1] else 0
        x = x.mean(axis=channel_axis)
    return np.ascontiguousarray(x, dtype=np.float32)


def check_clip_length(seconds: float) -> Optional[str]:
    """InvalidAudio when a reference clip is shorter than MIN_CLIP_SECONDS or longer than
    MAX_CLIP_SECONDS; a warning when it is outside RECOMMENDED_CLIP_SECONDS; else None."""
    lo, hi = RECOMMENDED_CLIP_SECONDS
    if seconds < MIN_CLIP_SECONDS:
        raise InvalidAudio(f"the clip is too short: {seconds:.2f} s; at least {MIN_CLIP_SECONDS:.0f} s is needed "
                           f"({lo:.0f}-{hi:.0f} s recommended)")
    if seconds > MAX_CLIP_SECONDS:
        raise InvalidAudio(f"the clip is too long: {seconds:.1f} s; at most {MAX_CLIP_SECONDS:.0f} s is accepted "
                           f"({lo:.0f}-{hi:.0f} s recommended); trim it")
    if not lo <= seconds <= hi:
        return f"the clip is {seconds:.1f} s long; {lo:.0f}-{hi:.0f} s clips clone best"
    return None


def prepare_reference(audio, sample_rate: int, rate: int = 24000) -> np.ndarray:
    """A reference clip as an engine's create_voice_prompt takes it: any rate, mono or (samples, channels)
    stereo -> mono float32 at `rate`, held to the one clip policy (to_mono_f32: integers by their full
    scale; check_clip_length). InvalidAudio for an empty clip, NaN or infinite samples, or a bad rate."""
    if np.asarray(audio).size == 0:
        raise InvalidAudio("the reference clip is empty")
    wav = to_mono_f32(audio)
    if not np.all(np.isfinite(wav)):
        raise InvalidAudio("the reference clip contains NaN or infinite samples")
    if sample_rate <= 0:
        raise InvalidAudio(f"invalid sample rate {sample_rate}")
    check_clip_length(len(wav) / sample_rate)
    if sample_rate != rate:
        wav = resample(wav, sample_rate, rate)
    return wav


# --------------------------------------------------------------------------- resampling

def resample(pcm: np.ndarray, from_sr: int, to_sr: int) -> np.ndarray:
    """Resample float32 mono PCM in one go (soxr, high quality)."""
    x = to_mono_f32(pcm)
    if from_sr == to_sr or len(x) == 0:
        return x.copy()
    import soxr

    return np.asarray(soxr.resample(x, from_sr, to_sr, quality=_RESAMPLE_QUALITY), dtype=np.float32)


class StreamResampler:
    """Resample a stream chunk by chunk.

    The concatenation of every `process(chunk)` output followed by `flush()` equals
    `resample(whole, from_sr, to_sr)` to within RESAMPLE_STREAM_TOLERANCE, for any chunking.
    Output lags input by the filter delay (a few ms); `flush()` returns the tail.
    """

    def __init__(self, from_sr: int, to_sr: int):
        self.from_sr = int(from_sr)
        self.to_sr = int(to_sr)
        self._passthrough = self.from_sr == self.to_sr
        self._stream = None
        self._done = False
        if not self._passthrough:
            import soxr

            self._stream = soxr.ResampleStream(self.from_sr, self.to_sr, 1, dtype="float32",
                                               quality=_RESAMPLE_QUALITY)

    def process(self, chunk: np.ndarray) -> np.ndarray:
        if self._done:
            raise RuntimeError("StreamResampler.process() after flush()")
        x = to_mono_f32(chunk)
        if self._passthrough:
            return x.copy()
        if len(x) == 0:
            return np.zeros(0, np.float32)
        return np.asarray(self._stream.resample_chunk(x, last=False), dtype=np.float32)

    def flush(self) -> np.ndarray:
        if self._done:
            return np.zeros(0, np.float32)
        self._done = True
        if self._passthrough:
            return np.zeros(0, np.float32)
        return np.asarray(self._stream.resample_chunk(np.zeros(0, np.float32), last=True), dtype=np.float32)


# --------------------------------------------------------------------------- raw encodings

def to_pcm16(pcm: np.ndarray) -> bytes:
    """float32 [-1, 1] -> signed 16-bit little-endian bytes (clipped, rounded)."""
    x = to_mono_f32(pcm)
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype("<i2").tobytes()


def to_f32le(pcm: np.ndarray) -> bytes:
    """float32 -> 32-bit float little-endian bytes, clipped to [-1, 1] (resampling can overshoot)."""
    return np.clip(to_mono_f32(pcm), -1.0, 1.0).astype("<f4").tobytes()


_UNKNOWN_SIZE = 0xFFFFFFFF


def wav_header(sample_rate: int, num_samples: Optional[int] = None, channels: int = 1,
               bits: int = 16) -> bytes:
    """A 44-byte PCM WAV header. num_samples=None: length unknown (sizes set to 0xFFFFFFFF,
    which players and decoders read as 'until the end of the stream')."""
    block = channels * bits // 8
    if num_samples is None:
        data_size = riff_size = _UNKNOWN_SIZE
    else:
        data_size = num_samples * block
        riff_size = 36 + data_size
    return (b"RIFF" + struct.pack("<I", riff_size) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, bits)
            + b"data" + struct.pack("<I", data_size))


def wav_bytes(pcm: np.ndarray, sr: int) -> bytes:
    """A complete 16-bit mono WAV file."""
    data = to_pcm16(pcm)
    return wav_header(sr, len(data) // 2) + data


# --------------------------------------------------------------------------- streaming encoders

CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
    "mulaw": "audio/PCMU",     # G.711 mu-law, raw (RFC 4856), one byte a sample
    "alaw": "audio/PCMA",      # G.711 A-law, raw
}
ENCODER_FORMATS = tuple(CONTENT_TYPES)


class Encoder:
    """Streaming encoder: `encode(pcm)` returns the bytes ready so far (may be b""),
    `finish()` the rest. Concatenated, they form one file/stream of `fmt`."""

    fmt: str = ""
    content_type: str = ""
    sample_rate: int = 0

    def encode(self, pcm: np.ndarray) -> bytes:
        raise NotImplementedError

    def finish(self) -> bytes:
        raise NotImplementedError


class _PcmEncoder(Encoder):
    def __init__(self, sample_rate: int):
        self.fmt, self.content_type, self.sample_rate = "pcm", CONTENT_TYPES["pcm"], sample_rate

    def encode(self, pcm):
        return to_pcm16(pcm)

    def finish(self):
        return b""


class _WavEncoder(Encoder):
    def __init__(self, sample_rate: int):
        self.fmt, self.content_type, self.sample_rate = "wav", CONTENT_TYPES["wav"], sample_rate
        self._header_sent = False

    def encode(self, pcm):
        out = b""
        if not self._header_sent:
            self._header_sent = True
            out = wav_header(self.sample_rate)
        return out + to_pcm16(pcm)

    def finish(self):
        return self.encode(np.zeros(0, np.float32)) if not self._header_sent else b""


class _Sink(io.RawIOBase):
    """A non-seekable file that collects what the muxer writes."""

    def __init__(self):
        super().__init__()
        self._parts: list[bytes] = []

    def writable(self):
        return True

    def seekable(self):
        return False

    def write(self, b):
        self._parts.append(bytes(b))
        return len(b)

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


# fmt -> (container format, codec candidates, bit rate, container options)
_AV_FORMATS = {
    "mp3": ("mp3", ("libmp3lame", "mp3"), 96_000, {}),
    "opus": ("ogg", ("libopus", "opus"), 48_000, {"page_duration": "20000"}),  # 20 ms Ogg pages
    "aac": ("adts", ("aac",), 64_000, {}),
    "flac": ("flac", ("flac",), None, {}),
}


class _AVEncoder(Encoder):
    def __init__(self, fmt: str, sample_rate: int):
        try:
            import av
        except ImportError as e:  # pragma: no cover - av is in the server extra
            raise UnsupportedFormat(f"format {fmt!r} needs PyAV: pip install 'makima-tts[server]'") from e
        self._av = av
        container_fmt, codecs, bit_rate, options = _AV_FORMATS[fmt]
        self.fmt, self.content_type, self.sample_rate = fmt, CONTENT_TYPES[fmt], int(sample_rate)
        codec = None
        for name in codecs:
            try:
                codec = av.codec.Codec(name, "w")
                break
            except Exception:
                continue
        if codec is None:
            raise UnsupportedFormat(f"no {fmt} encoder in this PyAV/FFmpeg build")
        rates = list(codec.audio_rates or [])
        if fmt == "opus":
            rate = 48000
        elif not rates or self.sample_rate in rates:
            rate = self.sample_rate
        else:
            higher = [r for r in rates if r >= self.sample_rate]
            rate = min(higher) if higher else max(rates)
        self.codec_rate = rate
        self._resampler = StreamResampler(self.sample_rate, rate) if rate != self.sample_rate else None
        self._sink = _Sink()
        self._container = av.open(self._sink, mode="w", format=container_fmt, options=dict(options),
                                  container_options={"flush_packets": "1"}, buffer_size=4096)
        self._stream = self._container.add_stream(codec.name, rate=rate, layout="mono")
        if bit_rate:
            self._stream.bit_rate = bit_rate
        self._pts = 0
        self._closed = False

    def _encode_frame(self, x: Optional[np.ndarray]) -> None:
        if x is None:
            packets = self._stream.encode(None)
        else:
            if len(x) == 0:
                return
            frame = self._av.AudioFrame.from_ndarray(x[None, :], format="flt", layout="mono")
            frame.sample_rate = self.codec_rate
            frame.pts = self._pts
            self._pts += len(x)
            packets = self._stream.encode(frame)
        for p in packets:
            self._container.mux(p)

    def encode(self, pcm):
        if self._closed:
            raise RuntimeError("encode() after finish()")
        x = to_mono_f32(pcm)
        if self._resampler is not None:
            x = self._resampler.process(x)
        self._encode_frame(np.clip(x, -1.0, 1.0))
        return self._sink.take()

    def finish(self):
        if self._closed:
            return b""
        if self._resampler is not None:
            self._encode_frame(np.clip(self._resampler.flush(), -1.0, 1.0))
        self._encode_frame(None)
        self._container.close()
        self._closed = True
        return self._sink.take()


_G711_CODECS = {"mulaw": "pcm_mulaw", "alaw": "pcm_alaw"}
G711_FORMATS = tuple(_G711_CODECS)


class G711Encoder(Encoder):
    """Raw G.711 (mu-law or A-law, one byte a sample, no header) by FFmpeg's pcm_mulaw / pcm_alaw
    encoders through PyAV. Sample by sample, so every chunk is encoded at once and alone."""

    def __init__(self, fmt: str, sample_rate: int):
        try:
            import av
        except ImportError as e:  # pragma: no cover - av is in the server extra
            raise UnsupportedFormat(f"format {fmt!r} needs PyAV: pip install 'makima-tts[server]'") from e
        if fmt not in _G711_CODECS:
            raise UnsupportedFormat(f"unsupported G.711 format {fmt!r}; use mulaw or alaw")
        self._av = av
        self.fmt, self.content_type, self.sample_rate = fmt, CONTENT_TYPES[fmt], int(sample_rate)
        self._ctx = av.CodecContext.create(_G711_CODECS[fmt], "w")
        self._ctx.sample_rate = self.sample_rate
        self._ctx.layout = "mono"
        self._ctx.format = "s16"
        self._pts = 0

    def encode(self, pcm) -> bytes:
        x = to_mono_f32(pcm)
        if len(x) == 0:
            return b""
        s16 = np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)
        frame = self._av.AudioFrame.from_ndarray(s16[None, :], format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        self._pts += len(s16)
        return b"".join(bytes(p) for p in self._ctx.encode(frame))

    def finish(self) -> bytes:
        return b"".join(bytes(p) for p in self._ctx.encode(None))


def make_encoder(fmt: str, sample_rate: int) -> Encoder:
    """A streaming encoder for `fmt` (mp3, opus, aac, flac, wav, pcm, mulaw, alaw), fed float32 mono PCM
    at `sample_rate`. pcm is raw s16le; mulaw / alaw are raw G.711 (PyAV's encoders); wav is s16le with
    a length-unknown header; opus is Ogg Opus at 48 kHz (resampled internally); the others keep
    sample_rate where the codec allows it."""
    fmt = (fmt or "").lower()
    if fmt == "pcm":
        return _PcmEncoder(sample_rate)
    if fmt == "wav":
        return _WavEncoder(sample_rate)
    if fmt in _AV_FORMATS:
        return _AVEncoder(fmt, sample_rate)
    if fmt in _G711_CODECS:
        return G711Encoder(fmt, sample_rate)
    raise UnsupportedFormat(f"unsupported audio format {fmt!r}; supported: {', '.join(ENCODER_FORMATS)}")


# --------------------------------------------------------------------------- decoding

_READ_HINT = "supported: wav, flac, mp3, ogg (vorbis/opus), m4a/aac, webm (opus)"


@dataclass
class DecodeBudget:
    """What one decode may cost: checked from the container's header before decoding, and the
    decoder stopped as soon as it passes the limit (a header may lie)."""

    max_seconds: float = 60.0
    max_rate: int = 96000
    max_channels: int = 2
    max_concurrent: int = 2
    wait_s: float = 30.0          # how long a decode waits for its turn before OVERLOADED

    @property
    def max_samples(self) -> int:
        return int(self.max_seconds * self.max_rate)


_budget = DecodeBudget()
_decode_slots = threading.BoundedSemaphore(_budget.max_concurrent)


def configure_decoding(budget: DecodeBudget) -> None:
    """Set the process-wide decode budget (the server does, from its settings)."""
    global _budget, _decode_slots
    _budget = budget
    _decode_slots = threading.BoundedSemaphore(max(1, int(budget.max_concurrent)))


# The containers accepted (by their first bytes) and, for PyAV, its demuxer for each.
_DEMUXERS = {"wav": "wav", "flac": "flac", "ogg": "ogg", "mp3": "mp3", "mp4": "mov", "aac": "aac",
             "webm": "matroska"}
_CODECS = ("pcm_", "flac", "mp3", "aac", "opus", "vorbis", "alac")


def sniff_format(raw: bytes) -> Optional[str]:
    """The container of an audio file from its first bytes, if it is one we decode; else None."""
    head = raw[:16]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xF6) == 0xF0:
        return "aac"            # ADTS
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0:
        return "mp3"            # an MPEG audio frame
    return None


def _too_much(what: str, budget: DecodeBudget) -> InvalidAudio:
    return InvalidAudio(f"the clip is too large to decode: {what} (limits: {budget.max_seconds:g} s, "
                        f"{budget.max_rate} Hz, {budget.max_channels} channels); send a 3-10 s clip")


def _check_params(seconds: Optional[float], rate: Optional[int], channels: Optional[int],
                  budget: DecodeBudget) -> None:
    if rate is not None and rate > budget.max_rate:
        raise _too_much(f"{rate} Hz", budget)
    if channels is not None and channels > budget.max_channels:
        raise _too_much(f"{channels} channels", budget)
    if seconds is not None and seconds > budget.max_seconds:
        raise _too_much(f"{seconds:.0f} s", budget)


def _read_with_av(data: bytes, fmt: Optional[str] = None, budget: Optional[DecodeBudget] = None
                  ) -> tuple[np.ndarray, int]:
    import av

    budget = budget or _budget
    with av.open(io.BytesIO(data), mode="r", format=_DEMUXERS.get(fmt) if fmt else None) as container:
        streams = container.streams.audio
        if not streams:
            raise InvalidAudio(f"no audio stream found ({_READ_HINT})")
        stream = streams[0]
        codec = stream.codec_context.name or ""
        if not codec.startswith(_CODECS):
            raise InvalidAudio(f"unsupported audio codec {codec[:32]!r} ({_READ_HINT})")
        seconds = None
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            seconds = container.duration / 1e6
        _check_params(seconds, stream.rate or None, stream.channels or None, budget)
        parts = []
        sr = None
        total = 0
        for frame in container.decode(stream):
            channels = len(frame.layout.channels)
            _check_params(None, frame.sample_rate, channels, budget)
            arr = frame.to_ndarray()
            fmt_ = frame.format
            if not fmt_.is_planar:
                arr = arr.reshape(-1, channels).T
            parts.append(to_mono_f32(arr, channel_axis=0))
            sr = frame.sample_rate
            total += parts[-1].shape[-1]
            if total > budget.max_seconds * sr:        # the header lied: stop the decoder now
                raise _too_much(f"more than {budget.max_seconds:g} s", budget)
    if not parts or sr is None:
        raise InvalidAudio("audio contains no samples")
    return np.concatenate(parts).astype(np.float32), int(sr)


def _read_with_soundfile(raw: bytes, budget: DecodeBudget) -> tuple[np.ndarray, int]:
    import soundfile as sf

    with sf.SoundFile(io.BytesIO(raw)) as f:
        frames = f.frames if 0 <= f.frames < (1 << 62) else None
        _check_params(frames / f.samplerate if frames is not None and f.samplerate > 0 else None,
                      f.samplerate, f.channels, budget)
        limit = int(budget.max_seconds * f.samplerate)
        x = f.read(frames=limit + 1, dtype="float32", always_2d=True)
        sr = f.samplerate
    if len(x) > limit:
        raise _too_much(f"more than {budget.max_seconds:g} s", budget)
    pcm = to_mono_f32(x, channel_axis=1) if x.shape[1] > 1 else x[:, 0].copy()
    return pcm, int(sr)


def read_audio(data: Union[bytes, bytearray, memoryview, str, os.PathLike],
               budget: Optional[DecodeBudget] = None) -> tuple[np.ndarray, int]:
    """Decode an audio file (bytes or a path) to (float32 mono PCM, sample rate).

    Multi-channel audio is mixed down to mono. Only the containers of `sniff_format` are read;
    soundfile (libsndfile) reads wav, flac, ogg and mp3; m4a/aac and webm go through PyAV when it
    is installed. Every decode is under a budget (DecodeBudget: duration, rate and channels from
    the header before decoding, the decoder stopped past the limit, a few decodes at once).
    Raises InvalidAudio for missing, empty, too large or undecodable input.
    """
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise InvalidAudio(f"cannot read audio file {os.path.basename(path)!r}: {e.strerror or e}") from e
    elif isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
    else:
        raise InvalidAudio(f"expected audio bytes or a file path, got {type(data).__name__}")
    if not raw:
        raise InvalidAudio("audio is empty (0 bytes)")
    fmt = sniff_format(raw)
    if fmt is None:
        raise InvalidAudio(f"could not decode the audio: not a recognised audio file ({_READ_HINT})")
    budget = budget or _budget
    slots = _decode_slots
    if not slots.acquire(timeout=budget.wait_s):
        from .errors import Overloaded

        raise Overloaded("too many clips are being decoded at once; retry shortly")
    try:
        return _decode(raw, fmt, budget)
    finally:
        slots.release()


def _decode(raw: bytes, fmt: str, budget: DecodeBudget) -> tuple[np.ndarray, int]:
    errors = []
    if fmt in ("wav", "flac", "ogg", "mp3"):
        try:
            pcm, sr = _read_with_soundfile(raw, budget)
            if len(pcm) == 0:
                raise InvalidAudio("audio contains no samples")
            return np.ascontiguousarray(pcm), sr
        except InvalidAudio:
            raise
        except Exception as e:  # libsndfile could not read it: try FFmpeg
            errors.append(f"soundfile: {e}")
    try:
        pcm, sr = _read_with_av(raw, fmt, budget)
    except InvalidAudio:
        raise
    except ImportError:
        raise InvalidAudio("could not decode the audio: not a wav, flac, ogg or mp3 file, and PyAV (for other "
                           "formats) is not installed: pip install av") from None
    except Exception as e:
        errors.append(f"ffmpeg: {e}")
        logging.getLogger("makima_tts.audio").debug("undecodable audio: %s", "; ".join(errors))
        raise InvalidAudio(f"could not decode the audio: the data is not a recognised, complete audio file "
                           f"({_READ_HINT})") from None
    if len(pcm) == 0:
        raise InvalidAudio("audio contains no samples")
    return pcm, sr


# --------------------------------------------------------------------------- time stretch

MIN_SPEED, MAX_SPEED = 0.25, 4.0


# One FFmpeg `atempo` instance takes 0.5..2.0 in every FFmpeg version (newer ones take up to 100,
# but skip input above 2.0); outside that range the change is split over a chain of instances.
_ATEMPO_MIN, _ATEMPO_MAX = 0.5, 2.0
_STRETCH_FRAME = 4096           # samples per frame pushed into the filter graph
_STRETCH_TAIL_S = 0.1           # silence appended so the filter's windows emit the input's very end


def _atempo_factors(speed: float) -> list[float]:
    """`speed` as a product of equal factors, each within what one atempo instance accepts."""
    n = 1
    while not (_ATEMPO_MIN <= speed ** (1.0 / n) <= _ATEMPO_MAX):
        n += 1
    return [speed ** (1.0 / n)] * n


def time_stretch(pcm: np.ndarray, sr: int, speed: float) -> np.ndarray:
    """Play `pcm` `speed` times faster (0.25..4.0) without changing its pitch.

    FFmpeg's `atempo` filter (WSOLA) through PyAV: abuffer -> atempo (chained when the speed is
    outside 0.5..2.0) -> abuffersink, flushed at the end. Output is mono float32 of length exactly
    round(len(pcm) / speed) (the filter's tail trimmed or zero-padded). Each call is independent.
    """
    speed = float(speed)
    if not (MIN_SPEED <= speed <= MAX_SPEED) or not np.isfinite(speed):
        raise ValueError(f"speed must be between {MIN_SPEED} and {MAX_SPEED}, got {speed}")
    x = to_mono_f32(pcm)
    n_out = int(round(len(x) / speed))
    if abs(speed - 1.0) < 1e-6 or len(x) == 0:
        return x.copy()

    from fractions import Fraction

    import av

    sr = int(sr)
    time_base = Fraction(1, sr)
    graph = av.filter.Graph()
    node = graph.add_abuffer(format="flt", sample_rate=sr, layout="mono", time_base=time_base)
    src = node
    for factor in _atempo_factors(speed):
        stage = graph.add("atempo", f"{factor!r}")
        node.link_to(stage)
        node = stage
    sink = graph.add("abuffersink")
    node.link_to(sink)
    graph.configure()

    out: list[np.ndarray] = []

    def drain() -> None:
        while True:
            try:
                frame = sink.pull()
            except (av.error.BlockingIOError, av.error.EOFError):
                return
            out.append(frame.to_ndarray().reshape(-1))

    padded = np.concatenate([x, np.zeros(int(np.ceil(_STRETCH_TAIL_S * sr)), np.float32)])
    for i in range(0, len(padded), _STRETCH_FRAME):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(padded[None, i:i + _STRETCH_FRAME]),
                                           format="flt", layout="mono")
        frame.sample_rate = sr
        frame.pts = i
        frame.time_base = time_base
        src.push(frame)
        drain()
    src.push(None)                       # end of stream: flush what the filter still holds
    drain()
    y = np.concatenate(out) if out else np.zeros(0, np.float32)
    if len(y) < n_out:
        y = np.concatenate([y, np.zeros(n_out - len(y), np.float32)])
    return np.ascontiguousarray(y[:n_out], dtype=np.float32)
