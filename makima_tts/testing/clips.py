"""The reference clip and its transcript that tests and benchmarks clone a voice from."""
from __future__ import annotations

import numpy as np

REF_TEXT = "Hello world. This is a test of the voice."


def reference_clip(seconds: float = 3.0, sr: int = 24000, seed: int = 0) -> np.ndarray:
    """A deterministic speech-like test clip: a gliding harmonic tone with syllable-rate amplitude."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    wav = 0.25 * voiced * envelope + 0.01 * rng.standard_normal(t.shape)
    return (wav / np.max(np.abs(wav)) * 0.6).astype(np.float32)
