"""Audio utilities (makima_tts.audio): resampling, encoders, decoding, time stretch."""
import io
import struct

import numpy as np
import pytest

from makima_tts.audio import (CONTENT_TYPES, ENCODER_FORMATS, RESAMPLE_STREAM_TOLERANCE, StreamResampler,
                              make_encoder, read_audio, resample, time_stretch, to_f32le, to_pcm16, wav_bytes,
                              wav_header)
from makima_tts.errors import InvalidAudio, UnsupportedFormat

av = pytest.importorskip("av")
sf = pytest.importorskip("soundfile")

SR = 22050


def tone(freq=440.0, seconds=1.0, sr=SR, amp=0.5):
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_freq(x, sr):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * sr / len(x))


def rms(x):
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def av_decode(data: bytes):
    """Decode with PyAV (independent of read_audio): mono float32, sample rate."""
    parts, sr = [], None
    with av.open(io.BytesIO(data)) as c:
        for frame in c.decode(c.streams.audio[0]):
            a = frame.to_ndarray()
            if not frame.format.is_planar:
                a = a.reshape(-1, len(frame.layout.channels)).T
            if a.dtype == np.int16:
                a = a / 32768.0
            elif a.dtype == np.int32:
                a = a / 2147483648.0
            parts.append(a.astype(np.float32).mean(axis=0))
            sr = frame.sample_rate
    return np.concatenate(parts), sr


def best_correlation(ref, y, max_lag):
    """Highest normalised correlation between ref and y over lags 0..max_lag (codec delay)."""
    best = -1.0
    n = len(ref) - max_lag
    a = ref[:n]
    for lag in range(0, max_lag + 1):
        b = y[lag:lag + n]
        if len(b) < n:
            break
        c = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
        best = max(best, c)
    return best


# --------------------------------------------------------------------------- resampling

@pytest.mark.parametrize("to_sr", [8000, 16000, 24000, 44100, 48000])
def test_resample_length_and_pitch(to_sr):
    x = tone(440, 1.0)
    y = resample(x, SR, to_sr)
    assert y.dtype == np.float32
    assert abs(len(y) - to_sr) <= 1
    assert abs(dominant_freq(y, to_sr) - 440) < 3
    assert abs(rms(y) - rms(x)) < 0.01


def test_resample_same_rate_is_copy():
    x = tone()
    y = resample(x, SR, SR)
    assert np.array_equal(x, y) and y is not x


@pytest.mark.parametrize("to_sr", [16000, 24000, 48000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stream_resampler_equals_one_shot(to_sr, seed):
    rng = np.random.default_rng(seed)
    x = (tone(300, 1.5) + 0.1 * rng.standard_normal(int(1.5 * SR)).astype(np.float32)).astype(np.float32)
    r = StreamResampler(SR, to_sr)
    parts, i = [], 0
    while i < len(x):
        n = int(rng.integers(1, 4000))
        parts.append(r.process(x[i:i + n]))
        i += n
    parts.append(r.flush())
    chunked = np.concatenate(parts)
    one = resample(x, SR, to_sr)
    assert len(chunked) == len(one)
    assert np.max(np.abs(chunked - one)) <= RESAMPLE_STREAM_TOLERANCE


def test_stream_resampler_passthrough_and_flush_once():
    r = StreamResampler(SR, SR)
    x = tone(seconds=0.1)
    assert np.array_equal(r.process(x), x)
    assert len(r.flush()) == 0
    r2 = StreamResampler(SR, 24000)
    r2.process(x)
    r2.flush()
    assert len(r2.flush()) == 0
    with pytest.raises(RuntimeError):
        r2.process(x)


# --------------------------------------------------------------------------- raw encodings

def test_to_pcm16_scaling_and_clipping():
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0], np.float32)
    y = np.frombuffer(to_pcm16(x), "<i2")
    assert list(y) == [0, 16384, -16384, 32767, -32767, 32767, -32768]


def test_to_f32le_roundtrip():
    x = tone(seconds=0.01)
    assert np.array_equal(np.frombuffer(to_f32le(x), "<f4"), x)


def test_wav_bytes_reads_back():
    x = tone(seconds=0.5)
    y, sr = sf.read(io.BytesIO(wav_bytes(x, SR)), dtype="float32")
    assert sr == SR and len(y) == len(x)
    assert np.max(np.abs(y - x)) < 1e-4


def test_wav_header_unknown_length():
    h = wav_header(24000)
    assert len(h) == 44 and h[:4] == b"RIFF" and h[8:12] == b"WAVE"
    assert struct.unpack("<I", h[4:8])[0] == 0xFFFFFFFF
    assert struct.unpack("<I", h[40:44])[0] == 0xFFFFFFFF
    assert struct.unpack("<I", h[24:28])[0] == 24000


# --------------------------------------------------------------------------- streaming encoders

def encode_stream(fmt, x, sr, chunk=2205):
    enc = make_encoder(fmt, sr)
    pieces = [enc.encode(x[i:i + chunk]) for i in range(0, len(x), chunk)]
    tail = enc.finish()
    return enc, pieces, tail


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav"])
@pytest.mark.parametrize("sr", [22050, 24000])
def test_encoder_roundtrip(fmt, sr):
    x = tone(440, 2.0, sr=sr)
    enc, pieces, tail = encode_stream(fmt, x, sr)
    assert enc.content_type == CONTENT_TYPES[fmt]
    # incremental: bytes come out before finish()
    assert sum(len(p) for p in pieces) > 0
    y, ysr = av_decode(b"".join(pieces) + tail)
    if fmt == "opus":
        assert ysr == 48000
    else:
        assert ysr == sr
    duration = len(y) / ysr
    assert 1.95 <= duration <= 2.15, duration  # codec priming/padding only
    ref = resample(x, sr, ysr)
    assert abs(rms(y) - rms(ref)) < 0.05
    assert abs(dominant_freq(y, ysr) - 440) < 3
    # same waveform (lossy codecs delay the signal by their priming samples)
    assert best_correlation(ref[:ysr // 2], y[:ysr // 2 + 4000], max_lag=3000) > 0.95


def test_encoders_first_bytes_early():
    """The first bytes of every format are ready after half a second of audio at most."""
    x = tone(440, 0.5)
    for fmt in ENCODER_FORMATS:
        enc = make_encoder(fmt, SR)
        got = b""
        for i in range(0, len(x), 1102):
            got += enc.encode(x[i:i + 1102])
        assert got, fmt
        enc.finish()


def test_wav_stream_header_and_decode():
    x = tone(440, 1.0)
    enc, pieces, tail = encode_stream("wav", x, SR)
    data = b"".join(pieces) + tail
    assert pieces[0][:4] == b"RIFF"
    assert struct.unpack("<I", data[40:44])[0] == 0xFFFFFFFF
    assert len(data) == 44 + 2 * len(x)
    y, sr = read_audio(data)
    assert sr == SR and abs(len(y) - len(x)) <= 1
    assert np.max(np.abs(y[:len(x)] - x)) < 1e-3


def test_pcm_stream_is_raw_s16le():
    x = tone(440, 0.3)
    enc, pieces, tail = encode_stream("pcm", x, SR)
    assert b"".join(pieces) + tail == to_pcm16(x)


def test_wav_encoder_with_no_audio_still_has_header():
    enc = make_encoder("wav", SR)
    assert enc.finish()[:4] == b"RIFF"


@pytest.mark.parametrize("fmt", ["ogg", "wma", "", "MP4"])
def test_unknown_format(fmt):
    with pytest.raises(UnsupportedFormat) as ei:
        make_encoder(fmt, SR)
    assert ei.value.code == "UNSUPPORTED_FORMAT"


def test_encode_after_finish_raises():
    enc = make_encoder("mp3", SR)
    enc.encode(tone(seconds=0.1))
    enc.finish()
    assert enc.finish() == b""
    with pytest.raises(RuntimeError):
        enc.encode(tone(seconds=0.1))


# --------------------------------------------------------------------------- read_audio

def write_with_av(x, sr, container, codec, channels=1):
    buf = io.BytesIO()
    layout = "mono" if channels == 1 else "stereo"
    with av.open(buf, "w", format=container) as c:
        s = c.add_stream(codec, rate=sr, layout=layout)
        data = np.tile(x[None, :], (channels, 1)).astype(np.float32)
        if channels == 2:
            data[1] *= 0.5
        frame = av.AudioFrame.from_ndarray(data, format="fltp", layout=layout)
        frame.sample_rate = sr
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return buf.getvalue()


def sf_bytes(x, sr, fmt, subtype=None):
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["wav", "wav_float", "flac", "ogg_vorbis", "ogg_opus", "mp3", "m4a"])
def test_read_audio_formats(kind, tmp_path):
    sr = 48000 if kind == "ogg_opus" else 24000
    x = tone(440, 1.0, sr=sr)
    data = {
        "wav": lambda: sf_bytes(x, sr, "WAV", "PCM_16"),
        "wav_float": lambda: sf_bytes(x, sr, "WAV", "FLOAT"),
        "flac": lambda: sf_bytes(x, sr, "FLAC"),
        "ogg_vorbis": lambda: sf_bytes(x, sr, "OGG", "VORBIS"),
        "ogg_opus": lambda: write_with_av(x, sr, "ogg", "libopus"),
        "mp3": lambda: write_with_av(x, sr, "mp3", "libmp3lame"),
        "m4a": lambda: write_with_av(x, sr, "ipod", "aac"),
    }[kind]()
    for source in (data, tmp_path / f"clip.{kind}", str(tmp_path / f"clip.{kind}")):
        if not isinstance(source, bytes):
            (tmp_path / f"clip.{kind}").write_bytes(data)
        y, ysr = read_audio(source)
        assert y.dtype == np.float32 and y.ndim == 1
        assert ysr == sr
        assert 0.95 <= len(y) / ysr <= 1.1
        assert abs(rms(y) - rms(x)) < 0.05
        assert abs(dominant_freq(y, ysr) - 440) < 3


@pytest.mark.parametrize("kind", ["wav", "flac", "m4a"])
def test_read_audio_stereo_is_mixed_to_mono(kind):
    x = tone(440, 0.5, sr=24000)
    if kind == "m4a":
        data = write_with_av(x, 24000, "ipod", "aac", channels=2)
    else:
        stereo = np.stack([x, 0.5 * x], axis=1)
        data = sf_bytes(stereo, 24000, kind.upper())
    y, sr = read_audio(data)
    assert y.ndim == 1 and sr == 24000
    # mean of L (amp 0.5) and R (amp 0.25): amplitude 0.375
    assert abs(rms(y) - 0.375 / np.sqrt(2)) < 0.02


@pytest.mark.parametrize("data", [b"", b"not audio at all" * 10, b"RIFF\x00\x00\x00\x00WAVEjunk", bytes(range(256)) * 8])
def test_read_audio_bad_bytes(data):
    with pytest.raises(InvalidAudio) as ei:
        read_audio(data)
    assert ei.value.code == "INVALID_AUDIO"
    assert str(ei.value)


def test_read_audio_zero_samples():
    with pytest.raises(InvalidAudio, match="no samples|empty|decode"):
        read_audio(wav_bytes(np.zeros(0, np.float32), SR))


def test_read_audio_missing_file(tmp_path):
    with pytest.raises(InvalidAudio, match="cannot read"):
        read_audio(tmp_path / "nope.wav")


def test_read_audio_wrong_type():
    with pytest.raises(InvalidAudio):
        read_audio(12345)


# --------------------------------------------------------------------------- time stretch

@pytest.mark.parametrize("speed", [0.25, 0.5, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0])
@pytest.mark.parametrize("freq", [220.0, 440.0])
def test_time_stretch_duration_and_pitch(speed, freq):
    x = tone(freq, 2.0)
    y = time_stretch(x, SR, speed)
    assert y.dtype == np.float32
    assert len(y) == round(len(x) / speed)
    assert abs(dominant_freq(y, SR) - freq) < 3
    # no level loss or blow-up in the steady part
    mid = y[len(y) // 10: -len(y) // 10]
    assert abs(rms(mid) - rms(x)) < 0.03
    assert np.max(np.abs(y)) < 0.6


def test_time_stretch_keeps_two_tone_spectrum():
    t = np.arange(2 * SR) / SR
    x = (0.3 * np.sin(2 * np.pi * 200 * t) + 0.2 * np.sin(2 * np.pi * 700 * t)).astype(np.float32)
    y = time_stretch(x, SR, 1.5)
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    freqs = np.fft.rfftfreq(len(y), 1 / SR)
    top2 = sorted(freqs[np.argsort(spec)[-40:]])
    assert any(abs(f - 200) < 5 for f in top2) and any(abs(f - 700) < 5 for f in top2)


def test_time_stretch_silence_and_empty():
    assert len(time_stretch(np.zeros(0, np.float32), SR, 2.0)) == 0
    z = time_stretch(np.zeros(SR, np.float32), SR, 2.0)
    assert len(z) == SR // 2 and not np.any(z)


@pytest.mark.parametrize("speed", [0.0, 0.2, 4.5, -1.0, float("nan")])
def test_time_stretch_rejects_out_of_range(speed):
    with pytest.raises(ValueError):
        time_stretch(tone(), SR, speed)


# --------------------------------------------------------------------------- decoding under a budget (issue 15)


def _flac(seconds: float, rate: int, channels: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros((int(seconds * rate), channels), np.int16), rate, format="FLAC")
    return buf.getvalue()


def test_decode_budget_refuses_from_the_header_before_decoding(monkeypatch):
    """A small FLAC that says 119 s at 192 kHz x 8 channels is refused from its header: no sample is
    decoded (the decoder is never asked to read)."""
    import soundfile as sf

    from makima_tts.audio import DecodeBudget, read_audio
    from makima_tts.errors import InvalidAudio

    bomb = _flac(119, 192000, 8)
    assert len(bomb) < 2_000_000
    reads = []
    original = sf.SoundFile.read
    monkeypatch.setattr(sf.SoundFile, "read", lambda self, *a, **k: reads.append(1) or original(self, *a, **k))
    budget = DecodeBudget(max_seconds=60, max_rate=96000, max_channels=2)
    for data in (bomb, _flac(1, 192000, 1), _flac(1, 24000, 8), _flac(90, 8000, 1)):
        with pytest.raises(InvalidAudio, match="too large to decode"):
            read_audio(data, budget)
    assert reads == []
    pcm, sr = read_audio(_flac(3, 48000, 2), budget)
    assert sr == 48000 and len(pcm) == 3 * 48000


def test_decoder_is_stopped_past_the_limit_when_the_header_says_nothing():
    """An ADTS AAC stream (no duration in any header) of 20 s, with a 5 s budget: the decoder stops."""
    av = pytest.importorskip("av")
    from makima_tts.audio import DecodeBudget, _read_with_av, make_encoder
    from makima_tts.errors import InvalidAudio

    enc = make_encoder("aac", 24000)
    data = enc.encode(np.zeros(20 * 24000, np.float32)) + enc.finish()
    with pytest.raises(InvalidAudio, match="too large to decode"):
        _read_with_av(data, "aac", DecodeBudget(max_seconds=5))
    pcm, sr = _read_with_av(data, "aac", DecodeBudget(max_seconds=60))
    assert len(pcm) >= 19 * sr
    del av


def test_only_listed_formats_are_decoded():
    from makima_tts.audio import read_audio, sniff_format
    from makima_tts.errors import InvalidAudio

    assert sniff_format(_flac(1, 24000, 1)) == "flac"
    for data in (b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"\x00\x00\x01\xba" + b"\x00" * 100,  # MPEG-PS
                 b"GIF89a" + b"\x00" * 100):
        with pytest.raises(InvalidAudio, match="not a recognised audio file"):
            read_audio(data)


def test_concurrent_decodes_are_limited(monkeypatch):
    import threading

    from makima_tts import audio
    from makima_tts.errors import Overloaded

    audio.configure_decoding(audio.DecodeBudget(max_concurrent=1, wait_s=0.01))
    try:
        held = threading.Event()
        release = threading.Event()
        original = audio._decode

        def slow(raw, fmt, budget):
            held.set()
            release.wait(30)
            return original(raw, fmt, budget)

        monkeypatch.setattr(audio, "_decode", slow)
        t = threading.Thread(target=audio.read_audio, args=(_flac(1, 24000, 1),))
        t.start()
        assert held.wait(30)
        with pytest.raises(Overloaded):
            audio.read_audio(_flac(1, 24000, 1))
        release.set()
        t.join(30)
    finally:
        audio.configure_decoding(audio.DecodeBudget())


# --------------------------------------------------------------------------- one normaliser, one clip policy (issue 14)


@pytest.mark.parametrize("dtype,full,zero", [(np.int16, 32768, 0), (np.int32, 2 ** 31, 0), (np.uint8, 128, 128),
                                             (np.int8, 128, 0), (np.uint16, 32768, 32768)])
def test_to_mono_f32_scales_integers_by_their_full_scale(dtype, full, zero):
    from makima_tts.audio import to_mono_f32

    info = np.iinfo(dtype)
    x = np.array([info.min, zero, info.max], dtype=dtype)
    y = to_mono_f32(x)
    assert y.dtype == np.float32
    assert y[0] == -1.0 and y[1] == 0.0 and y[2] == pytest.approx((full - 1) / full, abs=1e-6)


def test_to_mono_f32_mixes_channels_and_refuses_what_is_not_audio():
    from makima_tts.audio import to_mono_f32

    left, right = np.full(1000, 0.5, np.float32), np.full(1000, -0.25, np.float32)
    assert np.allclose(to_mono_f32(np.stack([left, right], axis=1)), 0.125)        # (samples, channels)
    assert np.allclose(to_mono_f32(np.stack([left, right], axis=0)), 0.125)        # (channels, samples)
    short = np.array([[0.5, -0.5]], np.float32)                                    # 1 frame of 2 channels
    assert to_mono_f32(short, channel_axis=1).tolist() == [0.0]
    ints = np.stack([np.full(10, 16384, np.int16), np.zeros(10, np.int16)], axis=1)
    assert np.allclose(to_mono_f32(ints), 0.25)
    assert len(to_mono_f32(np.zeros(0, np.float32))) == 0
    x = np.zeros(10, np.float32)
    assert to_mono_f32(x) is x                                                      # no copy when already mono f32
    for bad in (np.zeros((2, 2, 2), np.float32), np.array([True, False]), np.array(["a"])):
        with pytest.raises(InvalidAudio):
            to_mono_f32(bad)


@pytest.mark.parametrize("seconds,ok", [(0.9, False), (1.0, True), (30.0, True), (30.5, False)])
def test_one_clip_length_policy_for_the_library_and_the_engine(tmp_path, seconds, ok):
    """The library (an upload) and the engine (create_voice_prompt) take the same clips: 1-30 s."""
    from makima_tts.audio import MAX_CLIP_SECONDS, MIN_CLIP_SECONDS
    from makima_tts.engine.qwen3 import prepare_reference
    from makima_tts.voices.clips import check_clip

    assert (MIN_CLIP_SECONDS, MAX_CLIP_SECONDS) == (1.0, 30.0)
    clip = (tone(220.0, seconds, sr=24000, amp=0.3) * 32767).astype(np.int16)
    if ok:
        a, _ = check_clip(clip, 24000)
        b = prepare_reference(clip, 24000)
        assert np.array_equal(a, np.clip(b, -1, 1)) and a.dtype == b.dtype == np.float32
    else:
        for take in (check_clip, prepare_reference):
            with pytest.raises(InvalidAudio, match="too (short|long)"):
                take(clip, 24000)
