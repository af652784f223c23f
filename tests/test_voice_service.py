"""makima_tts.voices.VoiceService: the rules the voices API and the sessions go through (issue 14):
the built-in guard, prompt invalidation, rollback of an upload the engine cannot use, the generated
`default` voice; and the one typed ResolvedVoice for any engine. No model: fake engines."""
from __future__ import annotations

import io
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import pytest
import soundfile as sf

from makima_tts.engine.types import AudioChunk, VoiceInfo
from makima_tts.errors import BuiltinVoice, CloningUnsupported, InvalidAudio, VoiceExists, VoiceNotFound
from makima_tts.testing import reference_clip
from makima_tts.voices import GENERATED_VOICE, ResolvedVoice, VoiceLibrary, VoiceService

TEXT = "Hello world. This is a test of the voice."


def wav(pcm: np.ndarray, sr: int = 24000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, pcm, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.name != ".write.lock"}


class Piperish:
    """An engine with a built-in voice `joe` that cannot clone."""
    name = "piper"
    model_id = "joe"
    supports_cloning = False

    def builtin_voices(self):
        return [VoiceInfo("joe", "Joe", "english")]


class Cloner:
    """A cloning engine; its prompt fails for transcripts containing `fail` (with `error`)."""
    name = "qwen3"
    model_id = "fake"
    supports_cloning = True
    fingerprint = ""             # nothing saved to disk

    def __init__(self, error: Optional[BaseException] = None):
        self.error = error if error is not None else RuntimeError("the engine cannot use this clip")
        self.computed: list[str] = []

    def builtin_voices(self):
        return []

    def create_voice_prompt(self, audio, sr, transcript=None, x_vector_only=False):
        if transcript and "fail" in transcript:
            raise self.error
        self.computed.append(transcript)
        return SimpleNamespace(meta={}, ref_text=transcript)


class Embedded:
    """The embedded engine that speaks the generated `default` voice's sentence (a 4 s tone)."""
    sample_rate = 22050
    model_id = "en_US-joe-medium"

    def __init__(self):
        self.loads = 0

    def stream(self, text, voice, language, settings):
        t = np.arange(4 * self.sample_rate) / self.sample_rate
        pcm = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        for i, piece in enumerate(np.array_split(pcm, 4)):
            yield AudioChunk(piece, self.sample_rate, i, i, 1, i == 3)


@pytest.fixture
def lib(tmp_path) -> VoiceLibrary:
    return VoiceLibrary(tmp_path / "voices")


def test_builtin_voices_cannot_be_uploaded_over_edited_removed_or_downloaded(lib):
    # a library voice named like the engine's built-in one (stored while Qwen3 served) is shadowed
    lib.add("joe", reference_clip(3.0), 24000, transcript=TEXT)
    voices = VoiceService(lib)
    voices.attach(Piperish())
    before = tree(lib.root)
    with pytest.raises(BuiltinVoice, match="built-in voice of the piper engine; pick another id"):
        voices.create("joe", wav(reference_clip(3.0)), transcript=TEXT)
    with pytest.raises(BuiltinVoice, match="built-in voice of the piper engine; pick another id"):
        voices.create(None, wav(reference_clip(3.0)), name="Joe", transcript=TEXT)      # id made from the name
    with pytest.raises(BuiltinVoice, match="cannot be edited"):
        voices.update("joe", name="Not Joe")
    with pytest.raises(BuiltinVoice, match="cannot be removed"):
        voices.delete("joe")
    with pytest.raises(VoiceNotFound, match="no reference clip"):
        voices.clip("joe")
    assert tree(lib.root) == before                          # the stored `joe` untouched
    got = voices.get("joe")
    assert got.builtin is True and got.has_audio is False
    listed = voices.list()
    assert [(v.voice_id, v.builtin) for v in listed.voices] == [("joe", True), ("joe", False), ("makima", False)]
    # another engine has no built-in `joe`: the stored voice is the library's again
    voices.attach(Cloner())
    assert voices.update("joe", name="Joe 2").name == "Joe 2"
    assert voices.delete("joe").deleted is True and not (lib.root / "joe").exists()


@pytest.mark.parametrize("error", [RuntimeError("boom"), InvalidAudio("the engine cannot use this clip"),
                                   KeyboardInterrupt()])
def test_an_upload_whose_prompt_fails_leaves_no_voice(lib, error):
    voices = VoiceService(lib)
    engine = Cloner(error)
    voices.attach(engine)
    before = tree(lib.root)
    with pytest.raises(type(error)):
        voices.create("v", wav(reference_clip(3.0)), transcript="this will fail")
    assert tree(lib.root) == before                          # no folder, no temp or trash left
    assert not lib.exists("v") and len(voices.prompts) == 0
    # the id is free again, and a good upload under it works
    out = voices.create("v", wav(reference_clip(3.0)), transcript=TEXT)
    assert out.voice_id == "v" and out.has_audio and engine.computed == [TEXT]


def test_a_refused_upload_never_removes_the_voice_already_there(lib):
    voices = VoiceService(lib)
    voices.attach(Cloner())
    voices.create("v", wav(reference_clip(3.0)), transcript=TEXT)
    with pytest.raises(VoiceExists):
        voices.create("v", wav(reference_clip(4.0)), transcript="this will fail")
    assert lib.get("v").duration_s == 3.0 and voices.resolve_voice("v").voice_id == "v"


def test_edits_and_removals_invalidate_the_prompt(lib):
    voices = VoiceService(lib)
    engine = Cloner()
    voices.attach(engine)
    voices.create("v", wav(reference_clip(3.0)), transcript=TEXT)
    assert engine.computed == [TEXT] and len(voices.prompts) == 1           # computed at upload
    voices.update("v", transcript="New words.")                              # recomputed now
    assert engine.computed == [TEXT, "New words."]
    assert voices.resolve_voice("v").prompt.ref_text == "New words." and len(engine.computed) == 2
    voices.update("v", name="Renamed")                                       # forgotten, same prompt key
    assert len(voices.prompts) == 0
    voices.resolve_voice("v")
    assert len(voices.prompts) == 1
    voices.delete("v")
    assert len(voices.prompts) == 0
    with pytest.raises(VoiceNotFound):
        voices.resolve_voice("v")


def test_an_upload_on_an_engine_that_cannot_clone_is_kept_with_a_warning(lib):
    voices = VoiceService(lib)
    voices.attach(Piperish())
    out = voices.create(None, wav(reference_clip(12.0)), filename="My Clip.wav", transcript=TEXT)
    assert out.voice_id == "my-clip" and lib.exists("my-clip")
    assert "clone best" in out.warning and "piper engine serving now cannot clone" in out.warning


def test_resolved_voice_is_one_type_for_every_engine(lib):
    lib.add("anna", reference_clip(3.0), 24000, transcript=TEXT)
    piper = VoiceService(lib)
    piper.attach(Piperish())
    for name in (None, "alloy", "joe", GENERATED_VOICE):
        voice = piper.resolve_voice(name)
        assert voice == ResolvedVoice("joe", speaker="joe") and voice.engine_voice == "joe"
    with pytest.raises(CloningUnsupported):
        piper.resolve_voice("anna")
    qwen = VoiceService(lib, default_voice="anna")
    qwen.attach(Cloner())
    voice = qwen.resolve_voice("alloy")                                     # OpenAI's name: the default
    assert voice.voice_id == "anna" and voice.speaker is None and voice.engine_voice is voice.prompt
    assert voice.prompt.ref_text == TEXT
    assert qwen.resolve_voice(None, "anna") == voice                        # the session's voice
    assert qwen.default_voice_info() == {"voice_id": "anna", "reason": "the default_voice setting"}


def test_the_generated_default_voice_is_made_once_and_again_after_removal(lib):
    embedded = Embedded()

    def load():
        embedded.loads += 1
        return embedded

    voices = VoiceService(lib, load_embedded=load, embedded_available=lambda: True)
    engine = Cloner()
    voices.attach(engine)
    assert voices.default_voice_info()["voice_id"] == GENERATED_VOICE
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(voices.resolve_voice(None))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got) == 3 and all(v.voice_id == GENERATED_VOICE and v.prompt is not None for v in got)
    assert embedded.loads == 1 and voices.generated_made == 1 and len(engine.computed) == 1
    record = lib.get(GENERATED_VOICE)
    assert record.generated and "joe" in record.license and record.duration_s == pytest.approx(4.0, abs=0.01)
    assert voices.delete(GENERATED_VOICE).deleted
    assert voices.resolve_voice(GENERATED_VOICE).voice_id == GENERATED_VOICE    # named: made again
    assert embedded.loads == 2 and voices.generated_made == 2


def test_without_the_embedded_engine_the_error_says_how_to_add_a_voice(lib):
    voices = VoiceService(lib, load_embedded=Embedded, embedded_available=lambda: False)
    voices.attach(Cloner())
    with pytest.raises(VoiceNotFound, match=r"voices add.*makima-tts\[piper\]"):
        voices.resolve_voice(None)
    assert not lib.exists(GENERATED_VOICE)


class Fingerprinted:
    """A cloning engine whose prompts are real VoicePrompts, saved beside the voice under its fingerprint."""
    supports_cloning = True
    model_id = "fake"

    def __init__(self, name: str, fingerprint: str):
        self.name = name
        self.fingerprint = fingerprint

    def builtin_voices(self):
        return []

    def create_voice_prompt(self, audio, sr, transcript=None, x_vector_only=False):
        import torch

        from makima_tts.engine.types import VoicePrompt

        return VoicePrompt(speaker_embedding=torch.zeros(4), ref_text=transcript, fingerprint=self.fingerprint,
                           meta={"engine": self.name})


def test_the_listing_names_the_engines_a_voice_is_prepared_for(lib):
    """Issue 19: a voice made with one engine is listed as such; used with the other, it lists both."""
    voices = VoiceService(lib)
    voices.attach(Fingerprinted("qwen3", "q" * 16))
    made = voices.create("v", wav(reference_clip(3.0)), transcript=TEXT)
    assert made.engines == ["qwen3"]
    assert voices.get("v").engines == ["qwen3"] and lib.get("v").to_json()["engines"] == ["qwen3"]
    other = VoiceService(lib)
    other.attach(Fingerprinted("chatterbox", "c" * 16))
    listed = {v.voice_id: v for v in other.list().voices}
    assert listed["v"].engines == ["qwen3"] and listed["makima"].engines == []
    other.resolve_voice("v")                                 # prepared for Chatterbox on first use
    assert other.get("v").engines == ["chatterbox", "qwen3"]
    as_json = {v["voice_id"]: v for v in other.list().model_dump(mode="json")["voices"]}
    assert as_json["v"]["engines"] == ["chatterbox", "qwen3"]
    # a new transcript makes the stored prompts stale: only the serving engine's is made again
    assert other.update("v", transcript="Another text.").engines == ["chatterbox"]
    # a built-in voice names its own engine
    piper = VoiceService(lib)
    piper.attach(Piperish())
    assert piper.get("joe").engines == ["piper"] and piper.list().voices[0].engines == ["piper"]
