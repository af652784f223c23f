"""The voice library on disk: one folder per voice, written so that a crash never leaves half a voice.

Layout of the voices folder (one folder per voice)::

    VOICES_DIR/
      my-voice/
        manifest.json                    what the voice is (see records.VoiceRecord); names the clip
        reference-<hash12>.flac          the reference clip, mono 24 kHz FLAC
        prompt-<fingerprint>.safetensors the computed VoicePrompt for one checkpoint (prompts.PromptCache)
      .tmp-*/ .trash-*/                  work in progress / being deleted (never listed)
      .write.lock                        serialises writers across processes (flock)

Crash safety (a kill at any moment leaves the old voice or the new one):

* a new voice is built in a `.tmp-*` folder (files fsynced) and renamed into place in one
  step; a rename onto an existing voice folder fails, so two creators cannot both win;
* replacing or editing a voice writes the new clip under a new name first, then swaps
  `manifest.json` atomically (makima_tts.fileio); the old clip is deleted only afterwards;
* deleting renames the folder to `.trash-*` first, then removes it.

Leftovers of interrupted writes are removed when a library is opened. Folders that are
broken anyway (no manifest, bad JSON, missing clip) are logged, listed in `library.broken`
and skipped.

The seed voice `makima` is read from package data (`makima_tts/data/voices/makima/
manifest.json`), not copied: until `makima-tts voices add makima clip.wav --transcript ...`
stores a clip, it is listed with `has_audio: false` and using it raises VoiceNotFound with
that hint.
"""
from __future__ import annotations

import builtins
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Optional

import numpy as np

from ..engine.types import check_language
from ..errors import InvalidAudio, InvalidInput, InvalidVoiceId, VoiceExists, VoiceNotFound
from ..fileio import TMP_MARK, atomic_write, fsync_dir, write_synced
from .clips import check_clip, check_declared_length, encode_flac, to_pcm16_array
from .records import MANIFEST, MAX_NAME_CHARS, MAX_TRANSCRIPT_CHARS, SAMPLE_RATE, VoiceRecord, validate_id

log = logging.getLogger("makima_tts.voices")

__all__ = ["VoiceLibrary"]

STALE_TMP_S = 3600.0

_FINGERPRINT_RE = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)


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
        self._prompt_headers: dict[str, tuple[tuple, dict]] = {}   # prompt file -> (stat key, its metadata)
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
            record.engines = self.prompt_engines(record)
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
                record.engines = self.prompt_engines(record)
                records[name] = record
        for vid in self._seeds:
            seed = self._seed_record(vid)
            if seed is not None and vid not in records and vid not in broken:
                records[vid] = seed
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
        return self.root / record.voice_id / str(record.audio_file)

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

    def prompt_engines(self, record: VoiceRecord) -> "builtins.list[str]":
        """The engines ("qwen3", "chatterbox") whose prompt of the voice's current clip, transcript and mode
        is stored beside it (a `prompt-<fingerprint>.safetensors` whose metadata names that fingerprint and
        the record's prompt_key), sorted. Reads only the files' headers, each once while it is unchanged."""
        engines: set[str] = set()
        try:
            paths = list((self.root / record.voice_id).glob("prompt-*.safetensors"))
        except OSError:
            return []
        for path in paths:
            if TMP_MARK in path.name:
                continue
            md = self._prompt_metadata(path)
            try:
                meta = json.loads(md.get("meta", "{}"))
            except ValueError:
                continue
            fp = path.name[len("prompt-"):-len(".safetensors")]
            if isinstance(meta, dict) and md.get("fingerprint") == fp and meta.get("voice_key") == record.prompt_key:
                engines.add(str(meta.get("engine") or "qwen3"))      # qwen3: prompts saved before engines were named
        return sorted(engines)

    def _prompt_metadata(self, path: Path) -> dict:
        """A safetensors file's `__metadata__` ({} when it cannot be read), cached by the file's stat."""
        try:
            st = path.stat()
        except OSError:
            return {}
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._cache_lock:
            hit = self._prompt_headers.get(str(path))
        if hit is not None and hit[0] == key:
            return hit[1]
        md: dict = {}
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if 0 < n <= 16 * 1024 * 1024:
                    header = json.loads(f.read(n).decode("utf-8"))
                    found = header.get("__metadata__") if isinstance(header, dict) else None
                    md = found if isinstance(found, dict) else {}
        except (OSError, ValueError):
            md = {}
        with self._cache_lock:
            self._prompt_headers[str(path)] = (key, md)
        return md

    def _missing_clip_message(self, record: VoiceRecord) -> str:
        vid = record.voice_id
        return (f"voice {vid!r} has no reference clip yet. Record or pick a 3-10 s clip of the voice and its "
                f"exact transcript, then run: makima-tts voices add {vid} ref.wav --transcript \"...\" "
                f"(it is stored in {self.root / vid}/; use --voices-dir or MAKIMA_TTS_VOICES_DIR for another "
                "folder), or upload it with POST /api/v1/voices")

    # ---- writing ---------------------------------------------------------------------------

    def add_file(self, voice_id, data: bytes, *, source_name: Optional[str] = None, **kw) -> VoiceRecord:
        """Decode an uploaded file (wav, flac, mp3, ogg/opus, m4a) and add it."""
        from ..audio import read_audio

        validate_id(voice_id)
        if not data:
            raise InvalidAudio("the uploaded file is empty (0 bytes)")
        data = bytes(data)
        check_declared_length(data)
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
        pcm16 = to_pcm16_array(pcm)
        digest = hashlib.sha256(pcm16.tobytes()).hexdigest()
        flac = encode_flac(pcm16)
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
            write_synced(tmp / str(record.audio_file), flac)
            write_synced(tmp / MANIFEST, record.manifest_bytes())
            fsync_dir(tmp)
            try:
                os.rename(tmp, folder)   # fails if the folder appeared meanwhile (not empty)
            except OSError as e:
                raise VoiceExists(f"voice {record.voice_id!r} exists already (another upload won)") from e
            fsync_dir(self.root)
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
        audio = folder / str(record.audio_file)
        if not audio.exists():
            atomic_write(audio, flac)
        atomic_write(folder / MANIFEST, record.manifest_bytes())
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
                    from ..errors import EmptyText

                    raise EmptyText(f"voice {voice_id!r} clones from its clip and transcript: the transcript "
                                    "cannot be emptied")
                changed_transcript = new != record.transcript
                record.transcript = new
            record.updated = int(time.time())
            record.seed = voice_id in self._seeds
            folder = self.root / voice_id
            atomic_write(folder / MANIFEST, record.manifest_bytes())
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
            fsync_dir(self.root)
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
            elif n.startswith((".reference-", "reference-", MANIFEST)) and TMP_MARK in n:
                _unlink(p)       # an interrupted clip or manifest write (written under the lock)
            elif n.startswith("prompt-"):
                if prompts and n.endswith(".safetensors"):
                    _unlink(p)
                elif TMP_MARK in n and _age(p, now) > STALE_TMP_S:
                    _unlink(p)   # prompts are saved outside the lock: only an old one is abandoned

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
