"""Issue 15: a property-based fuzz of voice uploads (hypothesis). Any multipart POST /api/v1/voices
(random bytes, truncated, forged or bit-flipped WAV/FLAC, decode-bomb headers, random field values,
missing parts) is answered 201 or a well-formed JSON error, never 500; and never leaks: the voices
folder stays valid (every voice folder has a manifest naming it and its clip, no temp or trash
folders left), the library lists exactly those folders, and no file descriptor is left open."""
from __future__ import annotations

import io
import json
import os
import struct
from collections import Counter
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
import soundfile as sf  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from makima_tts.errors import InvalidAudio  # noqa: E402
from makima_tts.server.app import create_app  # noqa: E402
from makima_tts.voices import SEED_VOICE  # noqa: E402
from makima_tts.server.settings import Settings  # noqa: E402
from tests.fakeserver import FakeEngine  # noqa: E402

MAX_UPLOAD = 256 * 1024
ERROR_STATUSES = {400, 403, 404, 408, 409, 413, 415, 422, 429, 503}


class CloningFakeEngine(FakeEngine):
    """Clones: a prompt is computed at upload, and refused (InvalidAudio) for some transcripts, so the
    upload's clean-up path (voice removed again) is fuzzed too."""
    supports_cloning = True
    fingerprint = ""            # nothing saved to disk

    def create_voice_prompt(self, audio, sr, transcript=None, x_vector_only=False):
        if transcript and "reject" in transcript:
            raise InvalidAudio("the engine cannot use this clip")
        return SimpleNamespace(meta={})


# --------------------------------------------------------------------------- audio strategies


@lru_cache(maxsize=None)
def real_clip(fmt: str, seconds: float = 3.0, sr: int = 16000) -> bytes:
    rng = np.random.default_rng(0)
    pcm = (0.3 * np.sin(np.arange(int(sr * seconds)) * 2 * np.pi * 220 / sr)
           + 0.05 * rng.standard_normal(int(sr * seconds))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, pcm, sr, format=fmt, subtype="PCM_16")
    return buf.getvalue()


@st.composite
def forged_wav(draw) -> bytes:
    channels = draw(st.sampled_from([0, 1, 2, 8, 255, 65535]))
    rate = draw(st.sampled_from([0, 1, 8000, 24000, 192000, 2**31 - 1, 2**32 - 1]))
    bits = draw(st.sampled_from([0, 8, 16, 24, 32, 7, 65535]))
    tag = draw(st.sampled_from([1, 3, 0xFFFE, 0, 0x55, 0x11]))
    data_size = draw(st.sampled_from([0, 100, 2**31, 2**32 - 1]))
    riff_size = draw(st.sampled_from([36 + data_size & 0xFFFFFFFF, 0, 2**32 - 1]))
    block = (channels * bits // 8) & 0xFFFF
    fmt = struct.pack("<HHIIHH", tag, channels, rate, (rate * block) & 0xFFFFFFFF, block, bits)
    payload = draw(st.binary(max_size=2000))
    return (b"RIFF" + struct.pack("<I", riff_size & 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", data_size & 0xFFFFFFFF) + payload)


@st.composite
def forged_flac(draw) -> bytes:
    rate = draw(st.sampled_from([0, 8000, 24000, 192000, 655350, 2**20 - 1]))
    channels = draw(st.integers(1, 8))
    bps = draw(st.sampled_from([4, 8, 16, 24, 32]))
    total = draw(st.sampled_from([0, 1000, 24000 * 3600, 2**36 - 1]))
    bits = (rate << 44) | ((channels - 1) << 41) | ((bps - 1) << 36) | total
    info = struct.pack(">HH", 4096, 4096) + b"\x00\x00\x10" + b"\x00\x40\x00" + bits.to_bytes(8, "big") \
        + os.urandom(16)
    head = bytes([0x80, 0, 0, 34])     # last metadata block, STREAMINFO, 34 bytes
    tail = draw(st.binary(max_size=2000) | st.just(real_clip("FLAC")[42:]))
    return b"fLaC" + head + info + tail


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(real_clip(draw(st.sampled_from(["WAV", "FLAC"]))))
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, min(len(data) - 1, 200)))
        data[i] = draw(st.integers(0, 255))
    return bytes(data)


@st.composite
def truncated(draw) -> bytes:
    data = real_clip(draw(st.sampled_from(["WAV", "FLAC"])))
    return data[:draw(st.integers(0, len(data)))]


clip_bytes = st.one_of(
    st.binary(max_size=3000),
    truncated(), forged_wav(), forged_flac(), mutated(),
    st.sampled_from(["WAV", "FLAC"]).map(real_clip),
    st.just(b"\x00" * (MAX_UPLOAD + 1)),          # over the limit
    st.just(b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb" * 500),   # mp3-ish
    st.just(b"OggS" + bytes(200)), st.just(b"\x1aE\xdf\xa3" + bytes(200)),   # ogg, matroska heads
)
texts = st.text(max_size=80) | st.text(alphabet="abc-_.", max_size=10) | st.just("x" * 5000)
fields = st.fixed_dictionaries({}, optional={
    "voice_id": st.sampled_from(["anna", "bob", "f", "default", "../etc", "a/b", "", "A B"]) | texts,
    "name": texts, "transcript": st.sampled_from(["Hello there.", "reject this", ""]) | texts,
    "language": st.sampled_from(["auto", "english", "klingon", ""]) | texts,
    "x_vector_only": st.sampled_from(["true", "false", "1", "0", "maybe", ""]) | texts,
    "unexpected": texts,
})
uploads = st.fixed_dictionaries({
    "data": clip_bytes, "fields": fields,
    "filename": st.sampled_from(["clip.wav", "clip.flac", "a.mp3", "", "../../x.wav", "noext"]) | texts,
    "file_part": st.sampled_from(["file", "file", "file", "missing", "as_text"]),
    "content_type": st.sampled_from(["audio/wav", "audio/flac", "application/octet-stream", "text/plain"]),
    "delete": st.booleans(),
})


# --------------------------------------------------------------------------- checks


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def check_folder(root: Path, library) -> None:
    """Every entry is a voice folder whose manifest names it and whose clip exists; nothing temporary."""
    names = sorted(os.listdir(root)) if root.exists() else []
    assert not [n for n in names if n.startswith((".tmp-", ".trash-"))], names
    voices = []
    for n in names:
        p = root / n
        if n.startswith(".") or not p.is_dir():
            continue
        manifest = json.loads((p / "manifest.json").read_text())
        assert manifest["voice_id"] == n, (n, manifest)
        audio = manifest.get("audio_file")
        assert audio and (p / audio).is_file(), (n, manifest)
        assert not [f for f in os.listdir(p) if ".tmp-" in f], os.listdir(p)
        voices.append(n)
    listed = {r.voice_id for r in library.list()}
    assert set(voices) <= listed and listed - set(voices) <= {SEED_VOICE}, (voices, listed)   # the seed: no folder


def check_answer(r) -> None:
    assert r.status_code == 201 or r.status_code in ERROR_STATUSES, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    if r.status_code == 201:
        assert isinstance(body["voice_id"], str) and body["voice_id"]
        return
    err = body["error"]
    assert isinstance(err["code"], str) and err["code"].isupper() and err["code"] != "INTERNAL_ERROR"
    assert isinstance(err["message"], str) and 0 < len(err["message"]) <= 400
    assert "/tmp" not in err["message"] and str(Path.home()) not in err["message"]


@pytest.mark.timeout(300)
def test_any_upload_gets_201_or_a_json_error_and_leaks_nothing(tmp_path):
    root = tmp_path / "voices"
    app = create_app(Settings(voices_dir=root, max_upload_bytes=MAX_UPLOAD, max_decode_seconds=20),
                     engine=CloningFakeEngine(frame_s=0))
    ctx = app.state.ctx
    with TestClient(app, raise_server_exceptions=False) as client:
        client.get("/api/v1/voices")
        baseline = open_fds()
        seen: Counter = Counter()

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(uploads)
        def one(u):
            files = None
            data = {k: v for k, v in u["fields"].items()}
            if u["file_part"] == "file":
                files = {"file": (u["filename"], u["data"], u["content_type"])}
            elif u["file_part"] == "as_text":
                data["file"] = u["data"][:200].decode("latin-1")
            if files is None:       # a multipart body even without a file part
                files = {"other": ("x.bin", b"123", "application/octet-stream")}
            r = client.post("/api/v1/voices", data=data, files=files)
            check_answer(r)
            seen[f"{r.status_code} {r.json().get('error', {}).get('code', '')}".strip()] += 1
            if r.status_code == 201:
                vid = r.json()["voice_id"]
                got = client.get(f"/api/v1/voices/{vid}")
                assert got.status_code == 200 and got.json()["voice_id"] == vid
                assert client.get(f"/api/v1/voices/{vid}/audio").status_code == 200
                if u["delete"]:
                    d = client.delete(f"/api/v1/voices/{vid}")
                    assert d.status_code in (200, 204), d.text
                    assert client.get(f"/api/v1/voices/{vid}").status_code == 404
            check_folder(root, ctx.library)

        one()
        print("answers:", dict(seen))
        assert seen["201"] and seen["400 INVALID_AUDIO"] and seen["413 UPLOAD_TOO_LARGE"], seen   # all paths taken
        for v in ctx.library.list():                # everything left can be deleted
            if v.voice_id == SEED_VOICE and not (root / SEED_VOICE).is_dir():
                continue
            assert client.delete(f"/api/v1/voices/{v.voice_id}").status_code in (200, 204)
        check_folder(root, ctx.library)
        assert [v.voice_id for v in ctx.library.list()] in ([], [SEED_VOICE])
        assert open_fds() <= baseline + 2, (baseline, sorted(os.listdir("/proc/self/fd")))
