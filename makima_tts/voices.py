"""The voice library: cloned voices on disk, and their computed prompts in memory.

Layout of the voices folder (one folder per voice)::

    VOICES_DIR/
      my-voice/
        manifest.json                    what the voice is (see VoiceRecord); names the clip
        reference-<hash12>.flac          the reference clip, mono 24 kHz FLAC
        prompt-<fingerprint>.safetensors the computed VoicePrompt for one checkpoint
      .tmp-*/ .trash-*/                  work in progress / being deleted (never listed)
      .write.lock                        serialises writers across processes (flock)

Crash safety (a kill at any moment leaves the old voice or the new one):

* a new voice is built in a `.tmp-*` folder (files fsynced) and renamed into place in one
  step; a rename onto an existing voice folder fails, so two creators cannot both win;
* replacing or editing a voice writes the new clip under a new name first, then swaps
  `manifest.json` with an atomic `os.replace`; the old clip is deleted only afterwards;
* deleting renames the folder to `.trash-*` first, then removes it.

Leftovers of interrupted writes are removed when a library is opened. Folders that are
broken anyway (no manifest, bad JSON, missing clip) are logged, listed in `library.broken`
and skipped.

The seed voice `makima` is read from package data (`makima_tts/data/voices/makima/
manifest.json`), not copied: until `makima-tts voices add makima clip.wav --transcript ...`
stores a clip, it is listed with `has_audio: false` and using it raises VoiceNotFound with
that hint.

Prompts: `PromptCache` keeps VoicePrompts in an LRU with a TTL, computes each one once
(single-flight across threads), and persists it beside the voice keyed by the checkpoint's
fingerprint, so another process or a restart loads it instead of recomputing.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .engine.types import check_language
from .errors import InvalidAudio, InvalidInput, InvalidVoiceId, VoiceExists, VoiceNotFound

log = logging.getLogger("makima_tts.voices")

__all__ = ["VoiceRecord", "VoiceLibrary", "PromptCache", "validate_id", "slugify", "SAMPLE_RATE",
           "MIN_SECONDS", "MAX_SECONDS", "RECOMMENDED_SECONDS"]

SAMPLE_RATE = 24000
MIN_SECONDS = 1.0
MAX_SECONDS = 30.0
RECOMMENDED_SECONDS = (3.0, 10.0)
CLIP_LEVEL = 0.999          # a sample at or above this magnitude counts as clipped
MAX_CLIPPED_FRACTION = 0.01
SILENCE_RMS = 1e-3          # -60 dBFS
MAX_NAME_CHARS = 200
MAX_TRANSCRIPT_CHARS = 2000
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "makima-voice/1"
STALE_TMP_S = 3600.0

_ID_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}", re.ASCII)
_FINGERPRINT_RE = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)
_RESERVED = frozenset({"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))})


def validate_id(voice_id) -> str:
    """The id itself when it is a safe voice id; InvalidVoiceId otherwise.

    Lowercase ASCII letters, digits, `_` and `-`, starting with a letter or digit, at most 64
    characters. Unicode look-alikes (fullwidth letters, direction overrides) are refused, not
    normalised, so what is stored is exactly what was asked for.
    """
    if not isinstance(voice_id, str):
        raise InvalidVoiceId(f"a voice id must be a string, got {type(voice_id).__name__}")
    if not _ID_RE.fullmatch(voice_id) or voice_id in _RESERVED:
        shown = voice_id if len(voice_id) <= 80 else voice_id[:77] + "..."
        raise InvalidVoiceId(f"invalid voice id {shown!r}: use 1-64 characters of a-z, 0-9, '_' and '-', "
                             "starting with a letter or a digit")
    return voice_id


def slugify(text: str) -> str:
    """A voice id made from a display name ("Makima (calm)" -> "makima-calm"); may be ''."""
    import unicodedata

    ascii_text = unicodedata.normalize("NFKD", text or "").encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9_]+", "-", ascii_text.lower()).strip("-_")
    return slug[:64].rstrip("-_")


# --------------------------------------------------------------------------- records


@dataclass
class VoiceRecord:
    """One voice, as its manifest describes it."""

    voice_id: str
    name: str
    language: str = "auto"
    transcript: Optional[str] = None
    x_vector_only: bool = False
    duration_s: Optional[float] = None
    sample_rate: Optional[int] = None
    created: Optional[int] = None        # unix seconds
    updated: Optional[int] = None
    hash: Optional[str] = None           # "sha256:..." of the clip's 16-bit PCM
    builtin: bool = False
    generated: bool = False
    license: Optional[str] = None
    has_audio: bool = True
    audio_file: Optional[str] = None     # the clip's file name inside the voice folder
    source_name: Optional[str] = None    # the uploaded file's name
    seed: bool = False                   # shipped with the package (makima)
    description: str = ""
    warning: Optional[str] = None        # set on the result of add() only; not stored

    def to_json(self) -> dict:
        out = {"voice_id": self.voice_id, "name": self.name, "language": self.language,
               "transcript": self.transcript, "x_vector_only": self.x_vector_only, "duration_s": self.duration_s,
               "sample_rate": self.sample_rate, "created": self.created, "hash": self.hash,
               "builtin": self.builtin, "generated": self.generated, "license": self.license,
               "has_audio": self.has_audio}
        if self.seed:
            out["seed"] = True
        if self.description:
            out["description"] = self.description
        if self.warning:
            out["warning"] = self.warning
        return out

    def manifest(self) -> dict:
        d = asdict(self)
        for transient in ("warning", "builtin", "has_audio"):
            d.pop(transient)
        return {"format": MANIFEST_FORMAT, **d}

    @classmethod
    def from_manifest(cls, data: dict) -> "VoiceRecord":
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"not a {MANIFEST_FORMAT} manifest")
        known = {f for f in cls.__dataclass_fields__ if f not in ("warning", "builtin", "has_audio")}
        kwargs = {k: v for k, v in data.items() if k in known}
        if not isinstance(kwargs.get("voice_id"), str):
            raise ValueError("manifest has no voice_id")
        kwargs.setdefault("name", kwargs["voice_id"])
        return cls(**kwargs)

    @property
    def prompt_key(self) -> str:
        """Changes whenever what the prompt is computed from changes (clip, transcript, mode)."""
        h = hashlib.sha256(json.dumps([self.hash, self.transcript, bool(self.x_vector_only)]).encode())
        return h.hexdigest()[:16]


# --------------------------------------------------------------------------- file helpers


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    _write_file(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _manifest_bytes(record: VoiceRecord) -> bytes:
    return (json.dumps(record.manifest(), indent=2, ensure_ascii=False) + "\n").encode("utf-8")


class _WriteLock:
    """In-process lock + an flock on VOICES_DIR/.write.lock (other processes; released by the
    kernel if the holder dies)."""

    def __init__(self, root: Path):
        self._path = root / ".write.lock"
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: Optional[int] = None

    def __enter__(self):
        self._thread_lock.acquire()
        if self._depth == 0:
            try:
                fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                fd = None
            if fd is not None:
                try:
                    import fcntl

                    fcntl.flock(fd, fcntl.LOCK_EX)
                except ImportError:  # pragma: no cover - Windows: in-process lock only
                    pass
            self._fd = fd
        self._depth += 1
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
        self._thread_lock.release()


# --------------------------------------------------------------------------- audio checks


def _mono_f32(audio) -> np.ndarray:
    x = np.asarray(audio)
    if x.size == 0:
        raise InvalidAudio("the clip is empty (no samples)")
    if x.ndim == 2:
        x = x.mean(axis=1) if x.shape[1] <= x.shape[0] else x.mean(axis=0)
    elif x.ndim != 1:
        raise InvalidAudio(f"expected mono or (samples, channels) audio, got shape {x.shape}")
    if x.dtype.kind in "iu":
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
    elif x.dtype.kind != "f":
        raise InvalidAudio(f"unsupported sample type {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise InvalidAudio("the clip contains NaN or infinite samples")
    return x


def check_clip(audio, sample_rate: int) -> tuple[np.ndarray, Optional[str]]:
    """(mono float32 at 24 kHz, a warning or None); InvalidAudio when the clip is unusable."""
    try:
        sample_rate = int(sample_rate)
    except (TypeError, ValueError):
        raise InvalidAudio(f"invalid sample rate {sample_rate!r}") from None
    if sample_rate < 8000 or sample_rate > 384000:
        raise InvalidAudio(f"invalid sample rate {sample_rate} Hz")
    x = _mono_f32(audio)
    seconds = len(x) / sample_rate
    if seconds < MIN_SECONDS:
        raise InvalidAudio(f"the clip is too short: {seconds:.2f} s; at least {MIN_SECONDS:.0f} s is needed "
                           f"({RECOMMENDED_SECONDS[0]:.0f}-{RECOMMENDED_SECONDS[1]:.0f} s recommended)")
    if seconds > MAX_SECONDS:
        raise InvalidAudio(f"the clip is too long: {seconds:.1f} s; at most {MAX_SECONDS:.0f} s is accepted "
                           f"({RECOMMENDED_SECONDS[0]:.0f}-{RECOMMENDED_SECONDS[1]:.0f} s recommended); trim it")
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    if rms < SILENCE_RMS:
        raise InvalidAudio(f"the clip is silent (RMS level {20 * np.log10(max(rms, 1e-12)):.0f} dBFS); "
                           "record the voice louder")
    clipped = float(np.mean(np.abs(x) >= CLIP_LEVEL))
    if clipped > MAX_CLIPPED_FRACTION:
        raise InvalidAudio(f"the clip is clipped: {clipped * 100:.1f}% of its samples are at full scale; "
                           "record it at a lower level")
    warning = None
    lo, hi = RECOMMENDED_SECONDS
    if not lo <= seconds <= hi:
        warning = f"the clip is {seconds:.1f} s long; {lo:.0f}-{hi:.0f} s clips clone best"
    if sample_rate != SAMPLE_RATE:
        from .audio import resample

        x = resample(x, sample_rate, SAMPLE_RATE)
    return np.clip(x, -1.0, 1.0).astype(np.float32), warning


def _check_declared_length(data: bytes) -> None:
    """Refuse, before decoding, a file whose header says it is far longer than a clip may be
    (a small compressed file can expand to hours of samples)."""
    try:
        import soundfile as sf

        info = sf.info(io.BytesIO(data))
        seconds = info.frames / info.samplerate if info.samplerate > 0 else 0.0
    except Exception:
        return  # not readable by libsndfile: read_audio decides
    if seconds > 4 * MAX_SECONDS:
        raise InvalidAudio(f"the clip is too long: {seconds:.0f} s; at most {MAX_SECONDS:.0f} s is accepted "
                           f"({RECOMMENDED_SECONDS[0]:.0f}-{RECOMMENDED_SECONDS[1]:.0f} s recommended); trim it")


def _encode_flac(pcm16: np.ndarray) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, pcm16, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


# --------------------------------------------------------------------------- seeds


def _seed_manifests() -> dict[str, dict]:
    """Manifests shipped in makima_tts/data/voices/<id>/manifest.json."""
    out: dict[str, dict] = {}
    try:
        from importlib.resources import files

        base = files("makima_tts") / "data" / "voices"
        if not base.is_dir():
            return out
        for entry in base.iterdir():
            mf = entry / MANIFEST
            try:
                if not mf.is_file():
                    continue
                data = json.loads(mf.read_text(encoding="utf-8"))
                out[validate_id(data["voice_id"])] = data
            except Exception as e:  # a bad package file must not stop the server
                log.warning("seed voice %s: unreadable manifest: %s", entry, e)
    except Exception as e:  # pragma: no cover
        log.warning("seed voices: %s", e)
    return out


# --------------------------------------------------------------------------- library


class VoiceLibrary:
    """Voices stored under `root`; thread-safe, and safe to share a folder between processes."""

    def __init__(self, root, *, seeds: bool = True):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = _WriteLock(self.root)
        self._cache: dict[str, tuple[tuple, VoiceRecord]] = {}
        self._cache_lock = threading.Lock()
        self._seeds = _seed_manifests() if seeds else {}
        self.broken: dict[str, str] = {}     # folder name -> why it is skipped
        self._reported: set[tuple[str, str]] = set()
        self._cleanup()
        self.list()

    # ---- reading ---------------------------------------------------------------------------

    def validate_id(self, voice_id) -> str:
        return validate_id(voice_id)

    def _dir(self, voice_id: str) -> Path:
        return self.root / validate_id(voice_id)

    def _report(self, name: str, reason: str) -> None:
        self.broken[name] = reason
        if (name, reason) not in self._reported:
            self._reported.add((name, reason))
            log.warning("voices: skipping broken voice folder %s: %s", self.root / name, reason)

    def _read(self, voice_id: str) -> Optional[VoiceRecord]:
        """The stored record, None when there is no folder; ValueError when it is broken."""
        folder = self.root / voice_id
        mf = folder / MANIFEST
        try:
            st = mf.stat()
        except FileNotFoundError:
            if folder.is_dir():
                raise ValueError("no manifest.json") from None
            return None
        except NotADirectoryError:
            raise ValueError("not a folder") from None
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._cache_lock:
            hit = self._cache.get(voice_id)
        if hit is not None and hit[0] == key:
            return dc_replace(hit[1])
        try:
            data = json.loads(mf.read_bytes().decode("utf-8"))
            record = VoiceRecord.from_manifest(data)
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"unreadable manifest.json: {e}") from None
        except FileNotFoundError:  # removed meanwhile
            return None
        if record.voice_id != voice_id:
            raise ValueError(f"manifest says voice_id {record.voice_id!r}, folder is {voice_id!r}")
        if not record.audio_file or "/" in record.audio_file or "\\" in record.audio_file \
                or record.audio_file.startswith("."):
            raise ValueError("manifest names no valid reference file")
        if not (folder / record.audio_file).is_file():
            raise ValueError(f"reference clip {record.audio_file} is missing")
        record.has_audio = True
        with self._cache_lock:
            self._cache[voice_id] = (key, record)
        return dc_replace(record)

    def _seed_record(self, voice_id: str) -> Optional[VoiceRecord]:
        data = self._seeds.get(voice_id)
        if data is None:
            return None
        return VoiceRecord(voice_id=voice_id, name=data.get("name") or voice_id, language=data.get("language", "auto"),
                           transcript=data.get("transcript"), x_vector_only=bool(data.get("x_vector_only", False)),
                           license=data.get("license"), description=data.get("description", ""), has_audio=False,
                           seed=True)

    def get(self, voice_id) -> VoiceRecord:
        """The voice's record (a seed voice without a clip has has_audio=False); VoiceNotFound."""
        voice_id = validate_id(voice_id)
        try:
            record = self._read(voice_id)
        except ValueError as e:
            self._report(voice_id, str(e))
            raise VoiceNotFound(f"voice {voice_id!r} is broken ({e}); replace it with "
                                f"`makima-tts voices add {voice_id} clip.wav --transcript \"...\" --replace` "
                                "or remove it") from None
        if record is not None:
            if voice_id in self._seeds:
                record.seed = True
            return record
        seed = self._seed_record(voice_id)
        if seed is not None:
            return seed
        raise VoiceNotFound(f"voice {voice_id!r} not found")

    def exists(self, voice_id) -> bool:
        try:
            self.get(voice_id)
            return True
        except (VoiceNotFound, InvalidVoiceId):
            return False

    def list(self) -> list[VoiceRecord]:
        """All voices sorted by id (seed voices without a clip included); refreshes `broken`."""
        records: dict[str, VoiceRecord] = {}
        broken: dict[str, str] = {}
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            names = []
        for name in names:
            if name.startswith("."):
                continue
            if not (self.root / name).is_dir():
                continue
            try:
                validate_id(name)
            except InvalidVoiceId:
                broken[name] = "folder name is not a valid voice id"
                continue
            try:
                record = self._read(name)
            except ValueError as e:
                broken[name] = str(e)
                continue
            if record is not None:
                records[name] = record
        for vid in self._seeds:
            if vid not in records and vid not in broken:
                records[vid] = self._seed_record(vid)
            elif vid in records:
                records[vid].seed = True
        self.broken = {}
        for name, reason in broken.items():
            self._report(name, reason)
        return [records[k] for k in sorted(records)]

    def audio_path(self, voice_id) -> Path:
        record = self.get(voice_id)
        if not record.has_audio:
            raise VoiceNotFound(self._missing_clip_message(record))
        return self.root / record.voice_id / record.audio_file

    def load_audio(self, voice_id) -> tuple[np.ndarray, int]:
        import soundfile as sf

        path = self.audio_path(voice_id)
        try:
            pcm, sr = sf.read(str(path), dtype="float32", always_2d=False)
        except Exception as e:
            raise VoiceNotFound(f"voice {voice_id!r}: its reference clip cannot be read: {e}") from e
        return np.ascontiguousarray(pcm, dtype=np.float32), int(sr)

    def prompt_path(self, voice_id: str, fingerprint: str) -> Path:
        if not _FINGERPRINT_RE.fullmatch(str(fingerprint)):
            raise ValueError(f"unsafe checkpoint fingerprint {fingerprint!r}")
        return self._dir(voice_id) / f"prompt-{fingerprint}.safetensors"

    def _missing_clip_message(self, record: VoiceRecord) -> str:
        vid = record.voice_id
        return (f"voice {vid!r} has no reference clip yet. Record or pick a 3-10 s clip of the voice and its "
                f"exact transcript, then run: makima-tts voices add {vid} ref.wav --transcript \"...\" "
                f"(it is stored in {self.root / vid}/; use --voices-dir or MAKIMA_TTS_VOICES_DIR for another "
                "folder), or upload it with POST /api/v1/voices")

    # ---- writing ---------------------------------------------------------------------------

    def add_file(self, voice_id, data: bytes, *, source_name: Optional[str] = None, **kw) -> VoiceRecord:
        """Decode an uploaded file (wav, flac, mp3, ogg/opus, m4a) and add it."""
        from .audio import read_audio

        validate_id(voice_id)
        if not data:
            raise InvalidAudio("the uploaded file is empty (0 bytes)")
        data = bytes(data)
        _check_declared_length(data)
        pcm, sr = read_audio(data)
        return self.add(voice_id, pcm, sr, source_name=source_name, **kw)

    def add(self, voice_id, audio: np.ndarray, sample_rate: int, *, name: Optional[str] = None,
            transcript: Optional[str] = None, language: str = "auto", x_vector_only: bool = False,
            source_name: Optional[str] = None, generated: bool = False, license: Optional[str] = None,
            replace: bool = False) -> VoiceRecord:
        """Store a voice. VoiceExists when it exists and not `replace`. The result carries a
        `warning` when the clip is outside the recommended 3-10 s."""
        voice_id = validate_id(voice_id)
        seed = self._seeds.get(voice_id, {})
        name = _clean_text(name, "name", MAX_NAME_CHARS) or seed.get("name") or voice_id
        transcript = _clean_text(transcript, "transcript", MAX_TRANSCRIPT_CHARS)
        language = check_language(language if language not in (None, "") else seed.get("language", "auto"))
        if license is None:
            license = seed.get("license")
        if source_name is not None:
            source_name = os.path.basename(str(source_name))[:200] or None
        pcm, warning = check_clip(audio, sample_rate)
        pcm16 = np.clip(np.round(pcm * 32768.0), -32768, 32767).astype(np.int16)
        digest = hashlib.sha256(pcm16.tobytes()).hexdigest()
        flac = _encode_flac(pcm16)
        now = int(time.time())
        record = VoiceRecord(voice_id=voice_id, name=name, language=language, transcript=transcript,
                             x_vector_only=bool(x_vector_only), duration_s=round(len(pcm16) / SAMPLE_RATE, 3),
                             sample_rate=SAMPLE_RATE, created=now, updated=now, hash=f"sha256:{digest}",
                             generated=bool(generated), license=license,
                             audio_file=f"reference-{digest[:12]}.flac", source_name=source_name,
                             seed=voice_id in self._seeds)
        folder = self.root / voice_id
        with self._lock:
            if os.path.lexists(folder):
                if not replace:
                    raise VoiceExists(f"voice {voice_id!r} exists already; remove it first or use replace")
                self._replace_in_place(folder, record, flac)
            else:
                self._create(folder, record, flac)
        self._forget(voice_id)
        out = self.get(voice_id)
        out.warning = warning
        return out

    def _create(self, folder: Path, record: VoiceRecord, flac: bytes) -> None:
        tmp = self.root / f".tmp-{record.voice_id}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            _write_file(tmp / record.audio_file, flac)
            _write_file(tmp / MANIFEST, _manifest_bytes(record))
            _fsync_dir(tmp)
            try:
                os.rename(tmp, folder)   # fails if the folder appeared meanwhile (not empty)
            except OSError as e:
                raise VoiceExists(f"voice {record.voice_id!r} exists already (another upload won)") from e
            _fsync_dir(self.root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _replace_in_place(self, folder: Path, record: VoiceRecord, flac: bytes) -> None:
        if not folder.is_dir() or folder.is_symlink():
            raise VoiceExists(f"{folder} is in the way and is not a voice folder; move it away")
        try:
            old = self._read(record.voice_id)
        except ValueError:
            old = None
        if old is not None:
            record.created = old.created or record.created
        audio = folder / record.audio_file
        if not audio.exists():
            tmp_audio = folder / f".{record.audio_file}.tmp-{uuid.uuid4().hex[:8]}"
            _write_file(tmp_audio, flac)
            os.replace(tmp_audio, audio)
        _atomic_write(folder / MANIFEST, _manifest_bytes(record))
        self._clean_folder(folder, record.audio_file, prompts=True)

    def update(self, voice_id, *, name: Optional[str] = None, transcript: Optional[str] = None) -> VoiceRecord:
        """Change the name and/or transcript; a new transcript invalidates persisted prompts."""
        voice_id = validate_id(voice_id)
        with self._lock:
            record = self.get(voice_id)
            if not record.has_audio:
                raise VoiceNotFound(self._missing_clip_message(record))
            changed_transcript = False
            if name is not None:
                record.name = _clean_text(name, "name", MAX_NAME_CHARS) or voice_id
            if transcript is not None:
                new = _clean_text(transcript, "transcript", MAX_TRANSCRIPT_CHARS)
                if new is None and not record.x_vector_only:
                    from .errors import EmptyText

                    raise EmptyText(f"voice {voice_id!r} clones from its clip and transcript: the transcript "
                                    "cannot be emptied")
                changed_transcript = new != record.transcript
                record.transcript = new
            record.updated = int(time.time())
            record.seed = voice_id in self._seeds
            folder = self.root / voice_id
            _atomic_write(folder / MANIFEST, _manifest_bytes(record))
            if changed_transcript:
                for p in folder.glob("prompt-*.safetensors"):
                    _unlink(p)
        self._forget(voice_id)
        return self.get(voice_id)

    def remove(self, voice_id) -> None:
        voice_id = validate_id(voice_id)
        folder = self.root / voice_id
        with self._lock:
            if not os.path.lexists(folder):
                if voice_id in self._seeds:
                    raise VoiceNotFound(f"the seed voice {voice_id!r} has no stored clip to remove")
                raise VoiceNotFound(f"voice {voice_id!r} not found")
            trash = self.root / f".trash-{voice_id}-{uuid.uuid4().hex[:12]}"
            os.rename(folder, trash)
            _fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)
        self._forget(voice_id)
        self.broken.pop(voice_id, None)

    # ---- housekeeping ------------------------------------------------------------------------

    def _forget(self, voice_id: str) -> None:
        with self._cache_lock:
            self._cache.pop(voice_id, None)

    def _clean_folder(self, folder: Path, keep_audio: Optional[str], prompts: bool = False) -> None:
        """Remove clips other than `keep_audio` and leftovers of interrupted writes (under the lock)."""
        now = time.time()
        try:
            entries = list(folder.iterdir())
        except OSError:
            return
        for p in entries:
            n = p.name
            if n.startswith("reference-") and n.endswith(".flac") and n != keep_audio:
                _unlink(p)
            elif n.startswith(".reference-") or n.startswith(MANIFEST + ".tmp-"):
                _unlink(p)
            elif n.startswith("prompt-"):
                if prompts and n.endswith(".safetensors"):
                    _unlink(p)
                elif ".tmp-" in n and _age(p, now) > STALE_TMP_S:
                    _unlink(p)

    def _cleanup(self) -> None:
        """Finish what interrupted writers left: temp and trash folders, orphan clips."""
        with self._lock:
            try:
                names = os.listdir(self.root)
            except OSError:
                return
            for name in names:
                path = self.root / name
                if name.startswith(".tmp-") or name.startswith(".trash-"):
                    shutil.rmtree(path, ignore_errors=True)
                    continue
                if name.startswith(".") or not path.is_dir():
                    continue
                try:
                    validate_id(name)
                    record = self._read(name)
                except (InvalidVoiceId, ValueError):
                    continue
                if record is not None:
                    self._clean_folder(path, record.audio_file)


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except OSError:
        pass


def _age(p: Path, now: float) -> float:
    try:
        return now - p.stat().st_mtime
    except OSError:
        return 0.0


def _clean_text(value, what: str, limit: int) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string")
    value = value.strip()
    if len(value) > limit:
        raise InvalidInput(f"{what} is too long ({len(value)} characters; at most {limit})")
    if any(ord(c) < 32 and c not in "\n\t" for c in value):
        raise InvalidInput(f"{what} contains control characters")
    return value or None


# --------------------------------------------------------------------------- prompt cache


@dataclass
class _Entry:
    key: str
    prompt: object
    expires: float


class PromptCache:
    """VoicePrompts by voice id: memory (LRU + TTL) -> disk (this checkpoint's file) -> compute.

    Shared by all sessions; thread-safe. Concurrent first requests for one voice compute it
    once (the others wait for that result). `computations` counts prompts computed by the
    engine (not loaded); `on_compute(voice_id, seconds)` is called after each.
    """

    def __init__(self, library: VoiceLibrary, engine, max_items: int = 64, ttl_s: float = 3600.0,
                 on_compute: Optional[Callable[..., None]] = None, clock: Callable[[], float] = time.monotonic):
        self.library = library
        self.engine = engine
        self.max_items = max(1, int(max_items))
        self.ttl_s = float(ttl_s)
        self.on_compute = on_compute
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: "OrderedDict[str, _Entry]" = OrderedDict()
        self._inflight: dict[tuple[str, str], Future] = {}
        self.computations = 0
        self.disk_loads = 0
        self.hits = 0

    @property
    def fingerprint(self) -> str:
        return str(getattr(self.engine, "fingerprint", "") or "")

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def invalidate(self, voice_id: Optional[str] = None) -> None:
        """Forget one voice's prompt (or all with None); the next get() reloads or recomputes."""
        with self._lock:
            if voice_id is None:
                self._entries.clear()
            else:
                self._entries.pop(voice_id, None)

    def get(self, voice_id):
        record = self.library.get(voice_id)
        if not record.has_audio:
            raise VoiceNotFound(self.library._missing_clip_message(record))
        key = record.prompt_key
        now = self._clock()
        with self._lock:
            entry = self._entries.get(record.voice_id)
            if entry is not None and entry.key == key and now < entry.expires:
                self._entries.move_to_end(record.voice_id)
                self.hits += 1
                return entry.prompt
            fut = self._inflight.get((record.voice_id, key))
            owner = fut is None
            if owner:
                fut = Future()
                self._inflight[(record.voice_id, key)] = fut
        if not owner:
            return fut.result()
        try:
            prompt = self._load_or_compute(record, key)
            prepare = getattr(self.engine, "prepare_voice", None)
            if prepare is not None:          # per-voice work done now, not on the voice's first utterance
                prompt = prepare(prompt)
        except BaseException as e:
            with self._lock:
                self._inflight.pop((record.voice_id, key), None)
            fut.set_exception(e)
            raise
        with self._lock:
            self._inflight.pop((record.voice_id, key), None)
            self._entries[record.voice_id] = _Entry(key, prompt, self._clock() + self.ttl_s)
            self._entries.move_to_end(record.voice_id)
            while len(self._entries) > self.max_items:
                self._entries.popitem(last=False)
        fut.set_result(prompt)
        return prompt

    def _load_or_compute(self, record: VoiceRecord, key: str):
        from .engine.types import VoicePrompt

        fp = self.fingerprint
        path = None
        try:
            path = self.library.prompt_path(record.voice_id, fp) if fp else None
        except ValueError:
            path = None
        if path is not None and path.is_file():
            try:
                prompt = VoicePrompt.load(path)
                if prompt.fingerprint == fp and prompt.meta.get("voice_key") == key:
                    with self._lock:
                        self.disk_loads += 1
                    return prompt
            except Exception as e:
                log.warning("voice %s: ignoring unreadable prompt file %s: %s", record.voice_id, path, e)
        audio, sr = self.library.load_audio(record.voice_id)
        t0 = time.perf_counter()
        prompt = self.engine.create_voice_prompt(audio, sr, record.transcript, record.x_vector_only)
        seconds = time.perf_counter() - t0
        with self._lock:
            self.computations += 1
        try:
            prompt.meta = {**(prompt.meta or {}), "voice_id": record.voice_id, "voice_key": key}
        except Exception:  # a prompt type without meta: nothing to persist under a key
            path = None
        if path is not None and hasattr(prompt, "save"):
            try:
                if path.parent.is_dir():
                    prompt.save(path)
            except Exception as e:
                log.warning("voice %s: could not save the prompt to %s: %s", record.voice_id, path, e)
        if self.on_compute is not None:
            try:
                self.on_compute(record.voice_id, seconds)
            except Exception:  # metrics must not break synthesis
                log.exception("on_compute callback failed")
        return prompt
