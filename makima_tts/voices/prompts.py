"""Computed voice prompts: computed once per voice and checkpoint, kept in memory, saved beside the voice.

`PromptCache` keeps VoicePrompts in an LRU with a TTL, computes each one once (single-flight
across threads), and persists it beside the voice keyed by the checkpoint's fingerprint
(`prompt-<fingerprint>.safetensors`), so another process or a restart loads it instead of
recomputing. A prompt is tied to what it was computed from (`VoiceRecord.prompt_key`: clip,
transcript, mode): an edited voice is recomputed even if nobody invalidated it.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import VoiceNotFound
from .records import VoiceRecord
from .store import VoiceLibrary

log = logging.getLogger("makima_tts.voices")

__all__ = ["PromptCache"]


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
        from ..engine.types import VoicePrompt

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
