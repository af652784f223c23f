"""What the tests and the benchmarks share (never imported by the server).

- `REF_TEXT`, `reference_clip`: the reference clip and its transcript every test and benchmark clones;
- `makima_tts.testing.checkpoints`: random-weight Qwen3-TTS-12Hz checkpoints in the official layout
  (`build_checkpoint`; needs the reference package `qwen_tts` of the test extra, imported lazily);
- `makima_tts.testing.server`: a real `makima-tts serve` in a child process (`ServerProcess`), and
  `metric` to read one series of its /metrics (raises when the series is missing);
- `proc_status_kb`: a process's resident memory now (VmRSS) or at its peak (VmHWM), from /proc (Linux).

This module imports numpy only; the others import what they need when called.
"""
from __future__ import annotations

from .clips import REF_TEXT, reference_clip

__all__ = ["REF_TEXT", "proc_status_kb", "reference_clip"]


def proc_status_kb(field: str, pid: "int | str" = "self") -> int:
    """A kB field of /proc/PID/status (VmRSS: resident now; VmHWM: the peak); KeyError when it is missing."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)
