"""What the tests and the benchmarks share (never imported by the server).

- `REF_TEXT`, `reference_clip`: the reference clip and its transcript every test and benchmark clones;
- `makima_tts.testing.checkpoints`: random-weight Qwen3-TTS-12Hz checkpoints in the official layout
  (`build_checkpoint`; needs the reference package `qwen_tts` of the test extra, imported lazily);
- `makima_tts.testing.server`: a real `makima-tts serve` in a child process (`ServerProcess`), and
  `metric` to read one series of its /metrics (raises when the series is missing).

This module imports numpy only; the others import what they need when called.
"""
from __future__ import annotations

from .clips import REF_TEXT, reference_clip

__all__ = ["REF_TEXT", "reference_clip"]
