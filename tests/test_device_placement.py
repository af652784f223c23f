"""The engine's tensors are made on the model's device: what the CUDA path needs, checked without a GPU.

CI has no GPU, so a tensor made without `device=` (on the CPU) that meets a CUDA model's tensors would only
fail on a GPU. Here the default device is "meta" on every thread that runs the engine: such a tensor lands on
the meta device and fails at once against the model's CPU tensors, as it would against CUDA ones. The C++
extension is left out (as on CUDA, where it never runs): the float path with torch's sampling ops.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from makima_tts.engine import sampling
from makima_tts.engine.batch import BatchedEngine
from makima_tts.engine.qwen3 import Qwen3Engine
from makima_tts.engine.types import GenerationSettings, SamplingParams
from makima_tts.testing import REF_TEXT

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Several voices can be served at once."]


def settings(seed: int) -> GenerationSettings:
    return GenerationSettings(talker=SamplingParams(repetition_penalty=1.05, top_k=20),
                              predictor=SamplingParams(repetition_penalty=1.1), seed=seed, max_frames=6)


@pytest.mark.parametrize("icl", [True, False])
def test_no_tensor_is_made_off_the_model_device(tiny_checkpoint, ref_clip, monkeypatch, icl):
    monkeypatch.setattr(sampling, "kernel", lambda: None)
    engine = Qwen3Engine.load(tiny_checkpoint, quantize="none", dtype="bfloat16")
    original_run = BatchedEngine._run

    def run_on_meta(self):
        with torch.device("meta"):
            original_run(self)

    monkeypatch.setattr(BatchedEngine, "_run", run_on_meta)
    with torch.device("meta"):
        voice = engine.create_voice_prompt(ref_clip, 24000, transcript=REF_TEXT if icl else None,
                                           x_vector_only=not icl)
        engine.prepare_voice(voice)
        alone = [c.pcm for c in engine.stream(TEXTS[0], voice, "english", settings(1))]
    assert sum(len(p) for p in alone) == 6 * 1920 and np.isfinite(np.concatenate(alone)).all()

    batched = BatchedEngine(engine, max_batch=2)
    got: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with torch.device("meta"):
                got[i] = np.concatenate([c.pcm for c in batched.stream(TEXTS[i], voice, "english", settings(i + 1))])
        except BaseException as e:      # noqa: BLE001 - raised below, on the test's thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        batched.close()
    assert not errors, errors[0]
    assert sorted(got) == [0, 1] and all(len(got[i]) == 6 * 1920 for i in got)
    assert batched.counters["max_rows"] == 2           # the two streams were stepped together
