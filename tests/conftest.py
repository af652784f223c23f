"""Shared fixtures: a tiny random-weight checkpoint in the official layout, the reference model, a clip."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from makima_tts.testing import REF_TEXT, reference_clip

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

pytest_plugins = ["makima_tts.testing.pytest_ci", "pytester"]     # CI=1: a skip is a failure


@pytest.fixture(scope="session", autouse=True)
def weights_cache(tmp_path_factory) -> Path:
    """Quantized weights are cached in a folder of this test session (engines and server children
    read MAKIMA_TTS_WEIGHTS_CACHE), never in the user's cache."""
    path = tmp_path_factory.mktemp("weights-cache")
    os.environ["MAKIMA_TTS_WEIGHTS_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from makima_tts.testing.checkpoints import build_checkpoint

    cache = os.environ.get("MAKIMA_TEST_CHECKPOINT_CACHE")
    out = Path(cache) / "tiny" if cache else tmp_path_factory.mktemp("ckpt") / "tiny"
    return build_checkpoint(out, tiny=True)


@pytest.fixture(scope="session")
def ref_clip():
    return reference_clip(3.0)


@pytest.fixture(scope="session")
def reference_model(tiny_checkpoint):
    """The reference package `qwen-tts` on the tiny checkpoint (parity checks only)."""
    import torch

    qwen_tts = pytest.importorskip("qwen_tts")
    return qwen_tts.Qwen3TTSModel.from_pretrained(str(tiny_checkpoint), dtype=torch.float32,
                                                  attn_implementation="sdpa")


@pytest.fixture(scope="session")
def engine(tiny_checkpoint):
    from makima_tts.engine.qwen3 import Qwen3Engine

    # float32 weights: the parity tests compare with the reference package's float model
    return Qwen3Engine.load(tiny_checkpoint, quantize="none")


@pytest.fixture(scope="session")
def voice(engine, ref_clip):
    return engine.create_voice_prompt(ref_clip, 24000, transcript=REF_TEXT)


@pytest.fixture(scope="session")
def chatterbox_export(tmp_path_factory) -> Path:
    """A tiny random-weight Chatterbox-Turbo export in the official ONNX layout (fp32, fp16 and q4 graphs)."""
    from makima_tts.testing.chatterbox_export import build_chatterbox_export

    cache = os.environ.get("MAKIMA_TEST_CHECKPOINT_CACHE")
    out = Path(cache) / "chatterbox-tiny" if cache else tmp_path_factory.mktemp("cbx") / "chatterbox-tiny"
    return build_chatterbox_export(out, tiny=True, dtypes=("fp32", "fp16", "q4"))
