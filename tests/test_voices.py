"""Voice library, prompt cache, `makima-tts voices` CLI and the /api/v1/voices router."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from makima_tts.errors import EmptyText, InvalidAudio, InvalidVoiceId, VoiceExists, VoiceNotFound
from makima_tts.voices import PromptCache, VoiceLibrary, slugify, validate_id
from makima_tts.testing import reference_clip

REPO = Path(__file__).resolve().parent.parent
TEXT = "Hello world. This is a test of the voice."


def tone(seconds: float, sr: int = 24000, amp: float = 0.3, f: float = 220.0) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * f * t)).astype(np.float32)


def wav(pcm: np.ndarray, sr: int = 24000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, pcm, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def lib(tmp_path) -> VoiceLibrary:
    return VoiceLibrary(tmp_path / "voices")


# --------------------------------------------------------------------------- library


def test_add_stores_manifest_and_flac(lib):
    clip = reference_clip(3.0)
    rec = lib.add("alice", clip, 24000, name="Alice", transcript=f"  {TEXT} ", language="English",
                  source_name="/some/where/alice.wav", license="CC0")
    assert rec.voice_id == "alice" and rec.name == "Alice" and rec.transcript == TEXT
    assert rec.language == "english" and rec.duration_s == 3.0 and rec.sample_rate == 24000
    assert rec.has_audio and rec.warning is None and rec.license == "CC0"
    folder = lib.root / "alice"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["voice_id"] == "alice" and manifest["source_name"] == "alice.wav"
    assert manifest["audio_file"] == rec.audio_file and (folder / rec.audio_file).is_file()
    info = sf.info(str(folder / rec.audio_file))
    assert info.format == "FLAC" and info.channels == 1 and info.samplerate == 24000
    pcm, sr = lib.load_audio("alice")
    assert sr == 24000 and np.max(np.abs(pcm - clip)) < 1.0 / 16000
    pcm16 = np.clip(np.round(pcm * 32768), -32768, 32767).astype(np.int16)
    assert rec.hash == "sha256:" + hashlib.sha256(pcm16.tobytes()).hexdigest()
    j = rec.to_json()
    for key in ("voice_id", "name", "language", "transcript", "x_vector_only", "duration_s", "sample_rate",
                "created", "hash", "builtin", "generated", "license", "has_audio"):
        assert key in j
    assert j["builtin"] is False
    # a second library object on the same folder sees it
    again = VoiceLibrary(lib.root)
    assert [r.voice_id for r in again.list()] == ["alice", "makima"]
    assert again.get("alice").hash == rec.hash


def test_stereo_is_mixed_down_and_resampled(lib):
    left = tone(4.0, 44100, f=200)
    stereo = np.stack([left, left], axis=1)
    rec = lib.add("st", stereo, 44100, transcript=TEXT)
    pcm, sr = lib.load_audio("st")
    assert sr == 24000 and pcm.ndim == 1 and abs(len(pcm) - 4 * 24000) <= 2
    assert rec.duration_s == pytest.approx(4.0, abs=1e-3)
    # int16 input is accepted too
    rec = lib.add("ints", (tone(2.0) * 32767).astype(np.int16), 24000, transcript=TEXT)
    assert rec.duration_s == 2.0


@pytest.mark.parametrize("seconds,ok,warn", [(0.5, False, None), (0.99, False, None), (1.5, True, True),
                                             (5.0, True, False), (12.0, True, True), (31.0, False, None)])
def test_clip_length_limits(lib, seconds, ok, warn):
    if not ok:
        with pytest.raises(InvalidAudio, match="too (short|long)"):
            lib.add("x", tone(seconds), 24000, transcript=TEXT)
        assert not (lib.root / "x").exists()
        return
    rec = lib.add("x", tone(seconds), 24000, transcript=TEXT)
    assert (rec.warning is not None) == warn
    if warn:
        assert "3-10 s" in rec.warning


def test_silent_clipped_and_nan_clips_refused(lib):
    with pytest.raises(InvalidAudio, match="silent"):
        lib.add("x", np.zeros(48000, np.float32), 24000)
    with pytest.raises(InvalidAudio, match="silent"):
        lib.add("x", tone(2.0, amp=1e-4), 24000)
    clipped = np.clip(tone(3.0, amp=3.0), -1.0, 1.0)
    with pytest.raises(InvalidAudio, match="clipped"):
        lib.add("x", clipped, 24000)
    bad = tone(2.0)
    bad[100] = np.nan
    with pytest.raises(InvalidAudio, match="NaN"):
        lib.add("x", bad, 24000)
    # a few full-scale peaks (under 1%) are fine
    loud = tone(3.0)
    loud[::1000] = 1.0
    assert lib.add("x", loud, 24000).has_audio
    assert [r.voice_id for r in lib.list()] == ["makima", "x"]


MALICIOUS_IDS = ["../x", "/etc/passwd", "a/b", "x" * 200, "ｍａｋｉｍａ", "voice\u202e", ".", "..", "",
                 "a\\b", "x\n", "-x", "Alice", "con", "a b", None, 5]


@pytest.mark.parametrize("bad", MALICIOUS_IDS)
def test_malicious_ids_refused(tmp_path, bad):
    root = tmp_path / "voices"
    lib = VoiceLibrary(root)
    before = snapshot(tmp_path)
    data = wav(tone(2.0))
    for call in (lambda: lib.add(bad, tone(2.0), 24000, transcript=TEXT),
                 lambda: lib.add(bad, tone(2.0), 24000, transcript=TEXT, replace=True),
                 lambda: lib.add_file(bad, data, transcript=TEXT),
                 lambda: lib.get(bad), lambda: lib.remove(bad), lambda: lib.update(bad, name="n"),
                 lambda: lib.load_audio(bad), lambda: lib.audio_path(bad), lambda: validate_id(bad)):
        with pytest.raises(InvalidVoiceId):
            call()
    assert lib.exists(bad) is False
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "x").exists() and not (tmp_path / "passwd").exists()


def test_good_ids_and_slugify():
    for ok in ("a", "0", "makima", "my-voice_2", "x" * 64):
        assert validate_id(ok) == ok
    assert slugify("My Voice!") == "my-voice"
    assert slugify("Émilie (calm)") == "emilie-calm"
    assert slugify("???") == ""


def test_malformed_uploads(lib):
    good = wav(tone(2.0))
    with pytest.raises(InvalidAudio, match="empty"):
        lib.add_file("x", b"", transcript=TEXT)
    with pytest.raises(InvalidAudio):
        lib.add_file("x", b"RIFF\x00\x00\x00\x00WAVEjunk" + os.urandom(100), transcript=TEXT)
    with pytest.raises(InvalidAudio):
        lib.add_file("x", os.urandom(5000), transcript=TEXT)
    # a truncated WAV: the header and 0.1 s of samples -> too short
    with pytest.raises(InvalidAudio, match="too short"):
        lib.add_file("x", good[:44 + 4800], transcript=TEXT)
    # truncated inside the header
    with pytest.raises(InvalidAudio):
        lib.add_file("x", good[:30], transcript=TEXT)
    assert not (lib.root / "x").exists()
    # a header that claims 1 GB of samples, with 2 s really there: no 1 GB allocation, 2 s stored
    big = good[:4] + struct.pack("<I", 1 << 30) + good[8:40] + struct.pack("<I", 1 << 30) + good[44:]
    t0 = time.perf_counter()
    rec = lib.add_file("big", big, transcript=TEXT)
    assert rec.duration_s == pytest.approx(2.0, abs=0.01) and time.perf_counter() - t0 < 5


def test_long_flac_refused_before_decoding(lib):
    buf = io.BytesIO()
    sf.write(buf, np.zeros(8000 * 600, np.float32), 8000, format="FLAC")     # 10 min of silence, small
    assert len(buf.getvalue()) < 1_000_000
    with pytest.raises(InvalidAudio, match="too long: 600 s"):
        lib.add_file("x", buf.getvalue(), transcript=TEXT)


def test_mp3_named_wav_decodes(lib):
    from makima_tts.audio import make_encoder

    enc = make_encoder("mp3", 24000)
    mp3 = enc.encode(reference_clip(3.0)) + enc.finish()
    assert not mp3.startswith(b"RIFF")
    rec = lib.add_file("frommp3", mp3, source_name="clip.wav", transcript=TEXT)
    assert rec.duration_s == pytest.approx(3.0, abs=0.1) and rec.source_name == "clip.wav"


def test_replace_update_remove(lib):
    first = lib.add("v", tone(3.0), 24000, transcript="one")
    with pytest.raises(VoiceExists) as e:
        lib.add("v", tone(4.0), 24000, transcript="two")
    assert e.value.code == "VOICE_EXISTS"
    assert lib.get("v").hash == first.hash
    (lib.root / "v" / "prompt-abc.safetensors").write_bytes(b"x")
    second = lib.add("v", tone(4.0, f=300), 24000, transcript="two", replace=True)
    assert second.hash != first.hash and second.created == first.created and second.duration_s == 4.0
    files = sorted(p.name for p in (lib.root / "v").iterdir())
    assert files == ["manifest.json", second.audio_file]          # old clip and stale prompt gone
    (lib.root / "v" / "prompt-abc.safetensors").write_bytes(b"x")
    with pytest.raises(EmptyText):
        lib.update("v", transcript="  ")
    upd = lib.update("v", name="Vee", transcript="three")
    assert upd.name == "Vee" and upd.transcript == "three" and upd.hash == second.hash
    assert not (lib.root / "v" / "prompt-abc.safetensors").exists()
    assert VoiceLibrary(lib.root).get("v").transcript == "three"
    lib.remove("v")
    assert not (lib.root / "v").exists() and not lib.exists("v")
    with pytest.raises(VoiceNotFound):
        lib.get("v")
    with pytest.raises(VoiceNotFound):
        lib.remove("v")
    assert [p.name for p in lib.root.iterdir() if not p.name.startswith(".write")] == []


def test_concurrent_adds_one_wins(lib):
    n = 8
    barrier = threading.Barrier(n)
    results = []

    def worker(i):
        barrier.wait()
        try:
            lib.add("race", tone(2.0, f=200 + 10 * i), 24000, transcript=f"take {i}")
            results.append("ok")
        except VoiceExists:
            results.append("exists")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["exists"] * (n - 1) + ["ok"]
    assert lib.load_audio("race")[0].shape == (48000,)
    assert [p.name for p in lib.root.iterdir() if p.name.startswith(".tmp")] == []


def test_concurrent_adds_across_processes(tmp_path):
    root = tmp_path / "voices"
    VoiceLibrary(root)
    code = ("import sys, time, numpy as np\n"
            "from makima_tts.voices import VoiceLibrary\n"
            "from makima_tts.errors import VoiceExists\n"
            "lib = VoiceLibrary(sys.argv[1])\n"
            "pcm = (0.3*np.sin(np.arange(48000)/10)).astype(np.float32)\n"
            "while time.time() < float(sys.argv[2]): pass\n"
            "try:\n    lib.add('same', pcm, 24000, transcript=sys.argv[3]); print('ok')\n"
            "except VoiceExists: print('exists')\n")
    start = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root), str(start), f"p{i}"], cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for i in range(3)]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["exists", "exists", "ok"]


def test_broken_folders_are_reported_and_skipped(tmp_path, caplog):
    root = tmp_path / "voices"
    good = VoiceLibrary(root)
    good.add("good", tone(2.0), 24000, transcript=TEXT)
    (root / "nomanifest").mkdir()
    (root / "badjson").mkdir()
    (root / "badjson" / "manifest.json").write_text("{not json")
    (root / "noclip").mkdir()
    good_manifest = json.loads((root / "good" / "manifest.json").read_text())
    (root / "noclip" / "manifest.json").write_text(json.dumps({**good_manifest, "voice_id": "noclip",
                                                                "audio_file": "reference-gone.flac"}))
    (root / "wrongid").mkdir()
    (root / "wrongid" / "manifest.json").write_text(json.dumps(good_manifest))
    (root / "evil").mkdir()
    (root / "evil" / "manifest.json").write_text(json.dumps({**good_manifest, "voice_id": "evil",
                                                             "audio_file": "../good/" + good_manifest["audio_file"]}))
    (root / "Not An Id").mkdir()
    (root / "stray.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="makima_tts.voices"):
        lib = VoiceLibrary(root)
    assert [r.voice_id for r in lib.list()] == ["good", "makima"]
    assert set(lib.broken) == {"nomanifest", "badjson", "noclip", "wrongid", "evil", "Not An Id"}
    assert "manifest" in lib.broken["nomanifest"] and "missing" in lib.broken["noclip"]
    for name in ("nomanifest", "badjson", "noclip"):
        assert name in caplog.text
        with pytest.raises(VoiceNotFound, match="broken"):
            lib.get(name)
    # a broken voice can be replaced
    assert lib.add("nomanifest", tone(2.0), 24000, transcript=TEXT, replace=True).has_audio
    assert "nomanifest" in [r.voice_id for r in lib.list()] and "nomanifest" not in lib.broken


def test_leftovers_of_interrupted_writes_are_removed(tmp_path):
    root = tmp_path / "voices"
    lib = VoiceLibrary(root)
    rec = lib.add("v", tone(2.0), 24000, transcript=TEXT)
    (root / ".tmp-v-123").mkdir()
    (root / ".tmp-v-123" / "manifest.json").write_text("{}")
    (root / ".trash-w-456").mkdir()
    (root / "v" / "reference-000000000000.flac").write_bytes(b"old")
    (root / "v" / "manifest.json.tmp-1-2").write_text("{}")
    VoiceLibrary(root)
    assert sorted(p.name for p in root.iterdir()) == [".write.lock", "v"]
    assert sorted(p.name for p in (root / "v").iterdir()) == ["manifest.json", rec.audio_file]


_CHURN = r"""
import sys, numpy as np
from makima_tts.voices import VoiceLibrary
lib = VoiceLibrary(sys.argv[1])
rng = np.random.default_rng(int(sys.argv[2]))
print("ready", flush=True)
i = 0
while True:
    n = int(24000 * rng.uniform(1.2, 4.0))
    pcm = (0.3 * np.sin(np.arange(n) * rng.uniform(0.02, 0.1))).astype(np.float32)
    vid = "v%d" % (i % 3)
    op = i % 5
    if op == 4:
        try:
            lib.remove(vid)
        except Exception:
            pass
    elif op == 3 and lib.exists(vid):
        lib.update(vid, name="n%d" % i, transcript="t%d" % i)
    else:
        lib.add(vid, pcm, 24000, transcript="take %d" % i, replace=True)
    i += 1
"""


def _check_consistent(root: Path) -> list[str]:
    lib = VoiceLibrary(root)
    records = lib.list()
    assert lib.broken == {}
    ids = []
    for r in records:
        assert not r.voice_id.startswith(".")
        if r.seed and not r.has_audio:
            continue
        assert (root / r.voice_id / "manifest.json").is_file()
        pcm, sr = lib.load_audio(r.voice_id)
        assert sr == 24000 and abs(len(pcm) - r.duration_s * 24000) <= 12.001   # duration is rounded to 1 ms
        pcm16 = np.clip(np.round(pcm * 32768), -32768, 32767).astype(np.int16)
        assert r.hash == "sha256:" + hashlib.sha256(pcm16.tobytes()).hexdigest()
        ids.append(r.voice_id)
    junk = [p.name for p in root.iterdir() if p.name.startswith((".tmp", ".trash"))]
    assert junk == []
    for d in root.iterdir():
        if d.is_dir():
            assert sorted(n.name for n in d.iterdir() if n.name.startswith("reference-")) == \
                [lib.get(d.name).audio_file]
    return ids


def test_sigkill_during_writes_leaves_a_consistent_library(tmp_path):
    root = tmp_path / "voices"
    rnd = random.Random(1234)
    seen = set()
    for round_ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _CHURN, str(root), str(round_)], cwd=REPO,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rnd.uniform(0.05, 0.35))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        seen.update(_check_consistent(root))
    assert seen, "the child never completed a write"


# --------------------------------------------------------------------------- seed voice


def test_makima_seed_without_clip(lib):
    rec = lib.get("makima")
    assert rec.seed and not rec.has_audio and rec.name == "Makima"
    assert lib.exists("makima")
    assert [r.voice_id for r in lib.list()] == ["makima"]
    for call in (lambda: lib.load_audio("makima"), lambda: lib.audio_path("makima"),
                 lambda: PromptCache(lib, SimpleNamespace(fingerprint="f", create_voice_prompt=None)).get("makima")):
        with pytest.raises(VoiceNotFound) as e:
            call()
        msg = str(e.value)
        assert "makima-tts voices add makima ref.wav --transcript" in msg
        assert str(lib.root / "makima") in msg


def test_cli_add_fills_makima(tmp_path, capsys):
    from makima_tts.cli import main

    root = tmp_path / "voices"
    clip = tmp_path / "ref.wav"
    sf.write(str(clip), reference_clip(3.0), 24000)
    assert main(["voices", "add", "makima", str(clip), "--transcript", TEXT, "--voices-dir", str(root)]) == 0
    rec = VoiceLibrary(root).get("makima")
    assert rec.has_audio and rec.transcript == TEXT and rec.name == "Makima" and rec.seed
    assert rec.source_name == "ref.wav"
    assert VoiceLibrary(root).load_audio("makima")[0].shape == (72000,)


# --------------------------------------------------------------------------- CLI


def test_cli_list_add_remove_and_errors(tmp_path, capsys, monkeypatch):
    from makima_tts.cli import main

    root = tmp_path / "envvoices"
    monkeypatch.setenv("MAKIMA_TTS_VOICES_DIR", str(root))
    clip = tmp_path / "c.flac"
    sf.write(str(clip), tone(2.0, 48000), 48000, format="FLAC")
    assert main(["voices", "add", "bob", str(clip), "--transcript", "hi", "--name", "Bob",
                 "--language", "german"]) == 0
    out = capsys.readouterr()
    assert "added voice 'bob'" in out.out and "warning" in out.err          # 2 s: outside 3-10 s
    assert (root / "bob" / "manifest.json").is_file()
    assert main(["voices", "list"]) == 0
    out = capsys.readouterr().out
    assert "bob" in out and "Bob" in out and "german" in out and "makima" in out
    assert main(["voices", "list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [v["voice_id"] for v in data["voices"]] == ["bob", "makima"]

    assert main(["voices", "add", "bob", str(clip), "--transcript", "hi"]) == 2
    assert "error [VOICE_EXISTS]" in capsys.readouterr().err
    assert main(["voices", "add", "../bob", str(clip), "--transcript", "hi"]) == 2
    assert "error [INVALID_VOICE_ID]" in capsys.readouterr().err
    assert main(["voices", "add", "carl", str(clip)]) == 2
    assert "error [EMPTY_TEXT]" in capsys.readouterr().err
    assert main(["voices", "add", "carl", str(tmp_path / "missing.wav"), "--transcript", "x"]) == 2
    assert "error [INVALID_AUDIO]" in capsys.readouterr().err
    assert main(["voices", "add", "carl", str(clip), "--x-vector-only"]) == 0
    assert VoiceLibrary(root).get("carl").x_vector_only
    assert main(["voices", "remove", "bob"]) == 0
    assert not (root / "bob").exists()
    assert main(["voices", "remove", "bob"]) == 2
    assert "error [VOICE_NOT_FOUND]" in capsys.readouterr().err


# --------------------------------------------------------------------------- prompt cache


class CountingEngine:
    """Wraps the tiny engine: counts create_voice_prompt calls, can be slowed down or fail."""

    def __init__(self, engine, fingerprint=None, delay=0.0, fail=None):
        self.engine = engine
        self.fingerprint = fingerprint or engine.fingerprint
        self.delay = delay
        self.fail = fail
        self.calls = 0
        self._lock = threading.Lock()

    def create_voice_prompt(self, audio, sample_rate, transcript=None, x_vector_only=False):
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)
        if self.fail:
            raise self.fail
        prompt = self.engine.create_voice_prompt(audio, sample_rate, transcript, x_vector_only)
        prompt.fingerprint = self.fingerprint
        return prompt


def test_prompt_persisted_and_shared_between_caches(lib, engine):
    import torch

    lib.add("v", reference_clip(3.0), 24000, transcript=TEXT)
    seen = []
    c1 = PromptCache(lib, engine, on_compute=lambda vid, s: seen.append(vid))
    p1 = c1.get("v")
    assert c1.computations == 1 and seen == ["v"]
    assert p1.ref_text == TEXT and p1.fingerprint == engine.fingerprint
    assert (lib.root / "v" / f"prompt-{engine.fingerprint}.safetensors").is_file()
    assert c1.get("v") is p1 and c1.computations == 1 and c1.hits == 1
    # a second cache (another process, or a restart) on the same folder loads it from disk
    c2 = PromptCache(VoiceLibrary(lib.root), engine)
    p2 = c2.get("v")
    assert c2.computations == 0 and c2.disk_loads == 1
    assert torch.equal(p1.ref_codes, p2.ref_codes) and torch.allclose(p1.speaker_embedding, p2.speaker_embedding)
    # another checkpoint recomputes, and keeps its own file
    other = CountingEngine(engine, fingerprint="0123456789abcdef")
    c3 = PromptCache(lib, other)
    assert c3.get("v").fingerprint == "0123456789abcdef"
    assert c3.computations == 1 and other.calls == 1
    assert sorted(p.name for p in (lib.root / "v").glob("prompt-*")) == \
        sorted([f"prompt-{engine.fingerprint}.safetensors", "prompt-0123456789abcdef.safetensors"])


def test_prompt_follows_updates_and_replacements(lib, engine):
    lib.add("v", reference_clip(3.0), 24000, transcript=TEXT)
    c = PromptCache(lib, engine)
    c.get("v")
    lib.update("v", transcript="Something else.")
    p = c.get("v")
    assert c.computations == 2 and p.ref_text == "Something else."
    # replaced by another process (another library object): the key changes, the prompt is recomputed
    VoiceLibrary(lib.root).add("v", reference_clip(4.0, seed=3), 24000, x_vector_only=True, replace=True)
    p = c.get("v")
    assert c.computations == 3 and p.x_vector_only and p.ref_codes is None
    # a stale prompt file (wrong voice key) on disk is not trusted
    c2 = PromptCache(VoiceLibrary(lib.root), engine)
    lib.update("v", name="renamed")              # name only: prompt file stays valid
    c2.get("v")
    assert c2.computations == 0 and c2.disk_loads == 1
    c.invalidate("v")
    c.get("v")
    assert c.computations == 3 and c.disk_loads == 1


def test_ttl_expiry_and_lru_eviction(lib, engine):
    now = [0.0]
    eng = CountingEngine(engine)
    for vid in ("a", "b", "c"):
        lib.add(vid, reference_clip(2.0, seed=ord(vid)), 24000, transcript=TEXT)
    c = PromptCache(lib, eng, max_items=2, ttl_s=10.0, clock=lambda: now[0])
    pa = c.get("a")
    now[0] = 9.0
    assert c.get("a") is pa and c.hits == 1
    now[0] = 20.0                                  # expired: reloaded from disk, not recomputed
    assert c.get("a") is not pa and c.disk_loads == 1 and c.computations == 1
    (lib.root / "a" / f"prompt-{eng.fingerprint}.safetensors").unlink()
    now[0] = 40.0                                  # expired and no file: recomputed
    c.get("a")
    assert c.computations == 2
    c.get("b")
    c.get("a")                                     # a is now the most recently used
    c.get("c")                                     # evicts b
    assert len(c) == 2
    hits = c.hits
    c.get("a")
    assert c.hits == hits + 1
    loads = c.disk_loads
    c.get("b")
    assert c.hits == hits + 1 and c.disk_loads == loads + 1
    assert eng.calls == c.computations == 4


def test_concurrent_first_gets_compute_once(lib, engine):
    lib.add("v", reference_clip(3.0), 24000, transcript=TEXT)
    eng = CountingEngine(engine, delay=0.3)
    c = PromptCache(lib, eng)
    barrier = threading.Barrier(8)
    got = []

    def worker():
        barrier.wait()
        got.append(c.get("v"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and all(p is got[0] for p in got)
    assert eng.calls == 1 and c.computations == 1


def test_failed_computation_is_not_cached(lib, engine):
    lib.add("v", reference_clip(3.0), 24000)          # no transcript: ICL prompt impossible
    c = PromptCache(lib, engine)
    with pytest.raises(EmptyText):
        c.get("v")
    assert len(c) == 0
    eng = CountingEngine(engine, delay=0.2, fail=InvalidAudio("boom"))
    c2 = PromptCache(lib, eng)
    errors = []

    def worker():
        try:
            c2.get("v")
        except InvalidAudio as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 4 and eng.calls == 1
    lib.update("v", transcript=TEXT)
    assert c.get("v").ref_text == TEXT


# --------------------------------------------------------------------------- REST router


def _app(root: Path, engine=None, max_upload_bytes=2_000_000, api_keys=()):
    from fastapi import FastAPI

    from makima_tts.errors import MakimaError
    from makima_tts.server.errors import makima_error_handler
    from makima_tts.server.routes_voices import router
    from makima_tts.server.settings import Settings
    from makima_tts.voices import VoiceService

    lib = VoiceLibrary(root)
    settings = Settings(voices_dir=root, max_upload_bytes=max_upload_bytes, api_keys=list(api_keys))
    voices = VoiceService(lib, default_voice="makima")
    if engine is not None:
        voices.attach(engine)
    from makima_tts.server.metrics import Metrics

    ctx = SimpleNamespace(settings=settings, library=lib, voices=voices, engine=engine, metrics=Metrics())
    app = FastAPI()
    app.add_exception_handler(MakimaError, makima_error_handler)
    app.include_router(router)
    app.state.ctx = ctx
    return app, ctx


def _client(app):
    from fastapi.testclient import TestClient

    return TestClient(app)


def test_rest_voice_lifecycle(tmp_path, engine):
    app, ctx = _app(tmp_path / "voices", engine)
    client = _client(app)
    data = wav(reference_clip(3.0))
    r = client.post("/api/v1/voices", files={"file": ("me.wav", data, "audio/wav")},
                    data={"name": "My Voice!", "transcript": TEXT, "language": "english"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["voice_id"] == "my-voice" and body["name"] == "My Voice!" and body["has_audio"]
    assert ctx.voices.prompts.computations == 1                 # computed at upload
    r = client.post("/api/v1/voices", files={"file": ("me.wav", data, "audio/wav")},
                    data={"voice_id": "my-voice", "transcript": TEXT})
    assert r.status_code == 409 and r.json()["error"]["code"] == "VOICE_EXISTS"

    r = client.get("/api/v1/voices")
    assert r.status_code == 200
    listing = r.json()
    assert listing["total"] == 2 and [v["voice_id"] for v in listing["voices"]] == ["makima", "my-voice"]
    assert listing["default_voice"]["voice_id"] == "makima"
    page = client.get("/api/v1/voices", params={"limit": 1, "offset": 1}).json()
    assert [v["voice_id"] for v in page["voices"]] == ["my-voice"] and page["total"] == 2
    assert client.get("/api/v1/voices", params={"limit": 0}).status_code in (400, 422)

    assert client.get("/api/v1/voices/my-voice").json()["transcript"] == TEXT
    r = client.get("/api/v1/voices/my-voice/audio")
    assert r.status_code == 200 and r.headers["content-type"] == "audio/flac"
    pcm, sr = sf.read(io.BytesIO(r.content))
    assert sr == 24000 and len(pcm) == 72000
    r = client.get("/api/v1/voices/makima/audio")
    assert r.status_code == 404 and "voices add makima" in r.json()["error"]["message"]

    r = client.patch("/api/v1/voices/my-voice", json={"transcript": "New words.", "name": "Renamed"})
    assert r.status_code == 200 and r.json()["name"] == "Renamed"
    assert ctx.voices.prompts.computations == 2 and ctx.voices.prompts.get("my-voice").ref_text == "New words."
    assert client.patch("/api/v1/voices/my-voice", json={"bogus": 1}).status_code in (400, 422)

    r = client.delete("/api/v1/voices/my-voice")
    assert r.status_code == 200 and r.json()["deleted"] is True
    r = client.get("/api/v1/voices/my-voice")
    assert r.status_code == 404 and r.json()["error"]["code"] == "VOICE_NOT_FOUND"
    r = client.get("/api/v1/voices/..%2Fetc")
    assert r.status_code in (400, 404)
    r = client.get("/api/v1/voices/ABC")
    assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_VOICE_ID"


def test_rest_upload_errors(tmp_path, engine):
    root = tmp_path / "voices"
    app, ctx = _app(root, engine, max_upload_bytes=300_000)
    client = _client(app)

    def post(data, **fields):
        return client.post("/api/v1/voices", files={"file": ("c.wav", data, "audio/wav")}, data=fields)

    r = post(wav(np.zeros(48000, np.float32)), voice_id="quiet", transcript=TEXT)
    assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_AUDIO" and "silent" in r.text
    r = post(wav(reference_clip(3.0)), voice_id="../x", transcript=TEXT)
    assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_VOICE_ID"
    r = post(b"", voice_id="e", transcript=TEXT)
    assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_AUDIO"
    r = client.post("/api/v1/voices", data={"voice_id": "nofile"})
    assert r.status_code == 400
    # no transcript in ICL mode: the prompt fails at upload, and the voice is not kept
    r = post(wav(reference_clip(3.0)), voice_id="notext")
    assert r.status_code == 400 and r.json()["error"]["code"] == "EMPTY_TEXT"
    assert not (root / "notext").exists()
    r = post(wav(reference_clip(3.0)), voice_id="xv", x_vector_only="true")
    assert r.status_code == 201 and r.json()["x_vector_only"] is True
    # too large: by Content-Length ...
    big = wav(reference_clip(10.0))                  # 480 kB > 300 kB
    r = post(big, voice_id="big", transcript=TEXT)
    assert r.status_code == 413 and r.json()["error"]["code"] == "UPLOAD_TOO_LARGE"
    # ... and when streamed without a Content-Length (chunked): reading stops at the limit
    # (driven at the ASGI level: TestClient would buffer the whole body before the app sees it)
    status, body, pulled = _asgi_chunked_upload(app, total=50_000_000)
    assert status == 413 and json.loads(body)["error"]["code"] == "UPLOAD_TOO_LARGE"
    assert pulled < 1_000_000
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["xv"]


def _asgi_chunked_upload(app, total: int):
    """POST a multipart body of `total` bytes in 64 KiB pieces with no Content-Length, straight to
    the ASGI app; returns (status, body, bytes the app pulled)."""
    import asyncio

    boundary = "xyzBOUNDARY"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"voice_id\"\r\n\r\nbig2\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode()
    pieces = iter([head] + [b"\0" * 65536] * (total // 65536) + [f"\r\n--{boundary}--\r\n".encode()])
    pulled = [0]
    sent = []

    async def receive():
        piece = next(pieces, None)
        if piece is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled[0] += len(piece)
        return {"type": "http.request", "body": piece, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/api/v1/voices", "raw_path": b"/api/v1/voices", "query_string": b"",
             "root_path": "", "server": ("test", 80), "client": ("test", 1),
             "headers": [(b"host", b"test"), (b"transfer-encoding", b"chunked"),
                         (b"content-type", f"multipart/form-data; boundary={boundary}".encode())]}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body, pulled[0]


def test_rest_piper_builtin_voices(tmp_path):
    from makima_tts.engine.types import VoiceInfo

    piper = SimpleNamespace(name="piper", supports_cloning=False,
                            builtin_voices=lambda: [VoiceInfo("joe", "Joe", "english")])
    app, ctx = _app(tmp_path / "voices", piper)
    client = _client(app)
    listing = client.get("/api/v1/voices").json()
    assert [(v["voice_id"], v["builtin"]) for v in listing["voices"]] == [("joe", True), ("makima", False)]
    assert client.get("/api/v1/voices/joe").json()["builtin"] is True
    for r in (client.delete("/api/v1/voices/joe"), client.patch("/api/v1/voices/joe", json={"name": "x"})):
        assert r.status_code == 400 and r.json()["error"]["code"] == "VOICE_BUILTIN"
    # uploads are stored (for a later Qwen3 engine), with a warning
    r = client.post("/api/v1/voices", files={"file": ("c.wav", wav(reference_clip(3.0)), "audio/wav")},
                    data={"voice_id": "kept", "transcript": TEXT})
    assert r.status_code == 201 and "cannot clone" in r.json()["warning"]
    r = client.post("/api/v1/voices", files={"file": ("c.wav", wav(reference_clip(3.0)), "audio/wav")},
                    data={"voice_id": "joe", "transcript": TEXT})
    assert r.status_code == 400 and r.json()["error"]["code"] == "VOICE_BUILTIN"


def test_rest_requires_api_key(tmp_path):
    app, _ = _app(tmp_path / "voices", None, api_keys=["secret"])
    client = _client(app)
    assert client.get("/api/v1/voices").status_code == 401
    assert client.delete("/api/v1/voices/x").status_code == 401
    r = client.get("/api/v1/voices", headers={"authorization": "Bearer secret"})
    assert r.status_code == 200 and r.json()["voices"][0]["voice_id"] == "makima"


def test_prompt_cache_prepares_the_voice_once(tmp_path, engine, monkeypatch):
    """The per-voice codec priming happens when the prompt is computed or loaded, not on the
    voice's first utterance."""
    lib = VoiceLibrary(tmp_path / "voices")
    lib.add("primed", reference_clip(3.0), 24000, transcript=TEXT)
    calls = []
    original = engine.codec.streaming_decoder

    def counting(context=None):
        calls.append(context is not None)
        return original(context=context)

    monkeypatch.setattr(engine.codec, "streaming_decoder", counting)
    voice = PromptCache(lib, engine).get("primed")
    assert calls == [True]                                   # primed with the reference codes, once
    from makima_tts.engine.types import GenerationSettings

    chunks = list(engine.stream("Hello.", voice, "english", GenerationSettings.greedy_settings(max_frames=4)))
    assert calls == [True] and len(chunks) >= 2              # the utterance forked the primed state
    assert PromptCache(lib, engine).get("primed") is not voice and calls == [True, True]   # loaded from disk: primed
