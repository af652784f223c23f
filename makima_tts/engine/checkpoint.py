"""Finding, checking and reading a Qwen3-TTS-12Hz checkpoint in the official layout.

    config.json  generation_config.json  model.safetensors
    vocab.json  merges.txt  tokenizer_config.json        (or tokenizer.json)
    speech_tokenizer/config.json  speech_tokenizer/model.safetensors
    speech_tokenizer/preprocessor_config.json

A local folder is used as it is; anything else is taken for a Hugging Face repo
id and fetched with huggingface_hub (a clear CheckpointError when that fails).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "speech_tokenizer/config.json",
    "speech_tokenizer/model.safetensors",
)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16") from None


def parse_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} was asked for, but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


def resolve(checkpoint: str | os.PathLike) -> Path:
    """A local folder, or a Hugging Face repo id downloaded into the local cache."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        return path
    text = str(checkpoint)
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise CheckpointError(f"checkpoint folder {text!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=text, allow_patterns=[
            "*.json", "*.safetensors", "merges.txt", "vocab.json", "speech_tokenizer/*"]))
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise CheckpointError(
            f"could not fetch the Hugging Face repo {text!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            f"Without network access, download it elsewhere (`huggingface-cli download {text} --local-dir DIR`), "
            f"copy DIR here and pass --checkpoint DIR; or set HF_HUB_OFFLINE=1 if it is already in the local cache."
        ) from exc


def check_layout(folder: Path) -> None:
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if not (folder / "tokenizer.json").is_file():
        missing += [f for f in TOKENIZER_FILES if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is incomplete: missing {', '.join(missing)}")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def load_tensors(path: Path, prefix: str = "", device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file whose names start with `prefix` (prefix removed)."""
    from safetensors import SafetensorError, safe_open

    try:
        out = {}
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():
                if name.startswith(prefix):
                    out[name[len(prefix):]] = f.get_tensor(name)
        return out
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc


def load_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str, dtype: torch.dtype) -> None:
    """Copy tensors into a module's parameters by name; every parameter must be present with its shape."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise CheckpointError(f"{what}: {len(missing)} tensors missing from the checkpoint, e.g. {missing[:3]}")
    for name, ref in expected.items():
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise CheckpointError(f"{what}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                  f"the config implies {tuple(ref.shape)}")
    module.load_state_dict({k: tensors[k].to(dtype) for k in expected}, strict=True)


def fingerprint(folder: Path) -> str:
    """A short, stable id of a checkpoint's contents, cheap to compute on multi-GB files.

    Hashes the config files and, of each weight file, its size, its header and
    samples of its bytes, so two checkpoints of the same shape but other
    weights differ.
    """
    h = hashlib.sha256()
    for name in ("config.json", "speech_tokenizer/config.json"):
        h.update((folder / name).read_bytes())
    for name in ("model.safetensors", "speech_tokenizer/model.safetensors"):
        path = folder / name
        size = path.stat().st_size
        h.update(str(size).encode())
        with open(path, "rb") as f:
            for offset in [0] + [size * i // 16 for i in range(1, 16)] + [max(0, size - 65536)]:
                f.seek(offset)
                h.update(f.read(65536))
    return h.hexdigest()[:16]


@dataclass
class Checkpoint:
    folder: Path
    config: dict
    generation_config: dict

    @classmethod
    def open(cls, checkpoint: str | os.PathLike) -> "Checkpoint":
        folder = resolve(checkpoint)
        check_layout(folder)
        config = read_json(folder / "config.json")
        if "talker_config" not in config:
            raise CheckpointError(f"{folder}/config.json has no talker_config: not a Qwen3-TTS checkpoint")
        gen_path = folder / "generation_config.json"
        generation_config = read_json(gen_path) if gen_path.is_file() else {}
        return cls(folder=folder, config=config, generation_config=generation_config)
