"""The default CPU path (quantize="auto": int8 weights in our format): cached weights, memory while loading."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from makima_tts.engine import quant
from makima_tts.engine.checkpoint import QuantCache
from makima_tts.engine.qwen3 import Qwen3Engine
from makima_tts.engine.types import GenerationSettings

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Hello there, this is the default path speaking."


def greedy(frames: int = 12) -> GenerationSettings:
    return GenerationSettings.greedy_settings(max_frames=frames)


def codes(engine, voice) -> torch.Tensor:
    return torch.stack(list(engine.frames(TEXT, voice, "english", greedy())))


@pytest.fixture(scope="module", autouse=True)
def need_kernel():
    if quant.kernel() is None:
        pytest.fail(f"the int8 kernel does not build here: {quant.kernel_error()}")


def cache_file(folder: Path) -> Path:
    files = list(folder.glob("talker-*.safetensors"))
    assert len(files) == 1, files
    return files[0]


def test_auto_is_int8_on_the_cpu(tiny_checkpoint, tmp_path):
    engine = Qwen3Engine.load(tiny_checkpoint, weights_cache=tmp_path)
    assert engine.quantize == "int8" and engine.load_info["weights"] == "checkpoint"
    assert isinstance(engine.talker.code_predictor.lm_head[0], quant.Int8Linear)
    assert Qwen3Engine.load(tiny_checkpoint, quantize="none", weights_cache=tmp_path).quantize == "none"


def test_cached_weights_give_the_codes_of_fresh_ones(tiny_checkpoint, tmp_path, voice):
    fresh = Qwen3Engine.load(tiny_checkpoint, weights_cache=None)
    first = Qwen3Engine.load(tiny_checkpoint, weights_cache=tmp_path)       # quantizes, writes the cache
    path = cache_file(tmp_path)
    second = Qwen3Engine.load(tiny_checkpoint, weights_cache=tmp_path)      # memory-maps it
    assert (fresh.load_info["weights"], first.load_info["weights"], second.load_info["weights"]) == \
        ("checkpoint", "checkpoint", "cache")
    assert cache_file(tmp_path) == path
    ref = codes(fresh, voice)
    assert torch.equal(codes(first, voice), ref)
    assert torch.equal(codes(second, voice), ref)


def _corrupt_data(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    i = header + (len(raw) - header) // 2
    raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])


def _stale(path: Path) -> None:
    """The same tensors under another checkpoint's key (as if the checkpoint had changed)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    meta["fingerprint"] = "0" * 16
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("spoil", [_corrupt_data, _truncate, _stale], ids=["bytes-changed", "truncated", "stale"])
def test_a_bad_cache_file_is_rebuilt_never_used(tiny_checkpoint, tmp_path, voice, spoil):
    from safetensors.torch import load_file

    ref = codes(Qwen3Engine.load(tiny_checkpoint, weights_cache=tmp_path), voice)
    path = cache_file(tmp_path)
    good_bytes, good = path.read_bytes(), {k: v.clone() for k, v in load_file(str(path)).items()}
    spoil(path)
    assert path.read_bytes() != good_bytes
    rebuilt = Qwen3Engine.load(tiny_checkpoint, weights_cache=tmp_path)
    assert rebuilt.load_info["weights"] == "checkpoint"          # not used ...
    assert torch.equal(codes(rebuilt, voice), ref)
    again = load_file(str(cache_file(tmp_path)))                 # ... and written anew
    assert again.keys() == good.keys() and all(torch.equal(again[k], good[k]) for k in good)
    assert Qwen3Engine.load(tiny_checkpoint, weights_cache=tmp_path).load_info["weights"] == "cache"


def test_cache_key_names_the_checkpoint_and_kernel(tiny_checkpoint, tmp_path):
    engine = Qwen3Engine.load(tiny_checkpoint, weights_cache=tmp_path)
    key = QuantCache(tmp_path, engine.fingerprint, torch.float32).key
    assert key["fingerprint"] == engine.fingerprint and key["kernel"] == quant.KERNEL_VERSION
    assert cache_file(tmp_path).name == QuantCache(tmp_path, engine.fingerprint, torch.float32).path.name


def test_writing_the_cache_removes_files_left_by_other_kernel_layouts(tiny_checkpoint, tmp_path):
    engine = Qwen3Engine.load(tiny_checkpoint, weights_cache=None)
    cache = QuantCache(tmp_path, engine.fingerprint, torch.float32)
    tmp_path.mkdir(exist_ok=True)
    old_kernel = tmp_path / cache.path.name.replace(quant.KERNEL_VERSION, "0" * len(quant.KERNEL_VERSION))
    other_format = tmp_path / cache.path.name.replace("int8-b32", "int4-b32")
    other_dtype = tmp_path / cache.path.name.replace("float32", "bfloat16")
    for f in (old_kernel, other_format, other_dtype):
        f.write_bytes(b"x")
    Qwen3Engine.load(tiny_checkpoint, weights_cache=tmp_path)                # writes the cache
    assert cache.path.is_file() and not old_kernel.exists()
    assert other_format.exists() and other_dtype.exists()                   # still valid for their users


# ---- memory while loading -------------------------------------------------------------------------

_CHILD = r"""
import json, sys
from makima_tts.engine.qwen3 import Qwen3Engine
from makima_tts.engine.types import GenerationSettings
from makima_tts.testing import proc_status_kb, reference_clip

def status(field):
    return proc_status_kb(field) * 1024
clip = reference_clip(3.0)
base = status("VmRSS")
engine = Qwen3Engine.load(sys.argv[1], weights_cache=sys.argv[2])
voice = engine.create_voice_prompt(clip, 24000, transcript="Hello world. This is a test of the voice.")
list(engine.stream("Hello there.", voice, "english", GenerationSettings.greedy_settings(max_frames=5)))
print(json.dumps({"base": base, "peak": status("VmHWM"), "weights": engine.load_info["weights"]}))
"""


def weight_bound(folder: Path) -> int:
    """Bytes the loaded default path may hold beyond the interpreter: the per-frame linears in int8 (plus
    one float32 scale per 32), every other talker and speaker tensor in float32 except the text embedding
    (memory-mapped: only looked-up rows are read), the codec file, and one float copy of the largest
    matrix while it is quantized; plus 250 MB that do not grow with the weights (the text tokenizer's
    151k-entry vocabulary ~45 MB, torch's meta-device machinery loaded on first use ~70 MB, caches,
    activations, the allocator)."""
    from safetensors import safe_open

    linear = other = largest = 0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            n = 1
            for d in f.get_slice(name).get_shape():
                n *= d
            if name == "talker.model.text_embedding.weight":
                continue
            per_frame = name.startswith(("talker.model.layers.", "talker.code_predictor.", "talker.codec_head"))
            is_matrix = len(f.get_slice(name).get_shape()) == 2 and "embedding" not in name
            if per_frame and is_matrix:
                linear += n
                largest = max(largest, n)
            else:
                other += n
    codec = (folder / "speech_tokenizer" / "model.safetensors").stat().st_size
    return int(linear * 1.125 + other * 4 + codec + 3 * 4 * largest + 250 * 2**20)


@pytest.fixture(scope="module")
def mid_checkpoint(tmp_path_factory) -> Path:
    from makima_tts.testing.checkpoints import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("mid") / "mid", tiny=False, mid=True)


@pytest.mark.parametrize("size", ["tiny", pytest.param("mid", marks=pytest.mark.slow)])
def test_peak_rss_while_loading_is_bounded_by_the_weights(size, tiny_checkpoint, request, tmp_path):
    folder = tiny_checkpoint if size == "tiny" else request.getfixturevalue("mid_checkpoint")
    bound = weight_bound(folder)
    for expect in ("checkpoint", "cache"):        # quantizing as tensors stream in, then the cached start
        out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(tmp_path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        r = json.loads(out.stdout.strip().splitlines()[-1])
        assert r["weights"] == expect
        grown = r["peak"] - r["base"]
        assert grown < bound, f"{size} ({expect}): peak grew {grown / 2**20:.0f} MB, bound {bound / 2**20:.0f} MB"
