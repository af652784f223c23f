"""Finding, checking and reading a Qwen3-TTS-12Hz checkpoint in the official layout.

    config.json  generation_config.json  model.safetensors
    vocab.json  merges.txt  tokenizer_config.json        (or tokenizer.json)
    speech_tokenizer/config.json  speech_tokenizer/model.safetensors
    speech_tokenizer/preprocessor_config.json

A local folder is used as it is; anything else is taken for a Hugging Face repo
id and fetched with huggingface_hub (a clear CheckpointError when that fails).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..fileio import hash_samples
from .weights import read_json

REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "speech_tokenizer/config.json",
    "speech_tokenizer/model.safetensors",
)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype, device: Optional[torch.device] = None) -> torch.dtype:
    """A float dtype by name; "auto": float32 on the CPU, bfloat16 on CUDA (the reference's GPU setting)."""
    if dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


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
        hash_samples(h, folder / name, 16)
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


# ------------------------------------------------------------------------------------------------
# The talker, built without float copies: modules on the meta device, tensors read one at a time
# (memory-mapped), quantized as they stream in; the quantized result cached for the next start.

def _quantized_path(name: str) -> bool:
    """The per-frame linear layers (talker layers, code predictor, codec head) get int8 weights;
    embeddings and the text projection (run once per token of the prompt) stay float."""
    return name.startswith(("model.layers.", "code_predictor.", "codec_head"))


def _set_tensor(module: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    if name in module._parameters:
        module._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
    else:
        module._buffers[name] = t


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Modules built on the meta device skip their random init: every weight is read from the
    checkpoint, and the init on meta tensors would only import torch's decomposition tables (~2 s of
    a start)."""
    saved = {cls: cls.reset_parameters for cls in (torch.nn.Linear, torch.nn.Embedding)}
    try:
        for cls in saved:
            cls.reset_parameters = lambda self: None        # type: ignore[method-assign]
        yield
    finally:
        for cls, fn in saved.items():
            cls.reset_parameters = fn                       # type: ignore[method-assign]


def load_talker(ck: "Checkpoint", device: torch.device, dtype: torch.dtype, quantize: str,
                cache_dir: Optional[Path] = None) -> tuple["torch.nn.Module", str, str]:
    """The talker of `ck` on `device`, float layers in `dtype`, per-frame linears in `quantize`
    ("none", "int8", "int4" (the code predictor in 4 bits), "int8-dynamic"). -> (talker, the quantization used, where the weights came from:
    "checkpoint" or "cache").

    The 151k-row text embedding stays memory-mapped from the checkpoint in its stored dtype (only
    the rows a prompt looks up are ever read). With "int8" and a `cache_dir`, the quantized weights
    are written there once (safetensors, atomically, named by the checkpoint's fingerprint and the
    kernel's layout) and memory-mapped on the next start."""
    from . import quant
    from .model import Talker, checkpoint_names

    if quantize in ("int8", "int4") and quant.kernel() is None:
        quantize = "int8-dynamic"
    cache = None
    if quantize in ("int8", "int4") and cache_dir is not None and device.type == "cpu":
        cache = QuantCache(Path(cache_dir), fingerprint(ck.folder), dtype, quantize)
    with torch.device("meta"), _no_init():
        talker = Talker(ck.config)
    from .weights import SafetensorsFile

    f = SafetensorsFile(ck.folder / "model.safetensors")
    names = set(f.keys())

    def read(name: str) -> torch.Tensor:
        parts = checkpoint_names("talker." + name)
        missing = [p for p in parts if p not in names]
        if missing:
            raise CheckpointError(f"talker: tensor {missing[0]} is missing from the checkpoint")
        ts = [f.read(p) for p in parts]
        return ts[0] if len(ts) == 1 else torch.cat(ts)

    if "talker.model.text_embedding.weight" not in names:
        raise CheckpointError("talker: tensor talker.model.text_embedding.weight is missing from the checkpoint")
    text_embedding = f.mmap("talker.model.text_embedding.weight")
    _check_shape("model.text_embedding.weight", text_embedding, talker.model.text_embedding.weight)
    stored = cache.load() if cache is not None else None
    source = "checkpoint"
    if stored is not None:
        _assign_quantized(talker, stored, device)
        source = "cache"
    else:
        _stream_in(talker, read, device, dtype, quantize)
        if cache is not None:
            cache.save(talker)
    # kept memory-mapped, as stored (bfloat16 on the hub): Talker.embed_text casts the looked-up rows
    talker.model.text_embedding.weight = torch.nn.Parameter(text_embedding.to(device), requires_grad=False)
    if quantize in ("int8", "int4"):
        quant.use_kernel_ops(talker)
    return talker.eval(), quantize, source


def _check_shape(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if tuple(t.shape) != tuple(ref.shape):
        raise CheckpointError(f"talker: tensor {name} has shape {tuple(t.shape)}, the config implies {tuple(ref.shape)}")


def _stream_in(talker, read, device, dtype, quantize: str) -> None:
    """Fill the meta-device talker from the checkpoint, one tensor at a time; linears on the per-frame
    path are quantized as they come in (only one float matrix exists at a time)."""
    from . import quant

    for mod_name, module in list(talker.named_modules()):
        prefix = mod_name + "." if mod_name else ""
        if quantize != "none" and isinstance(module, torch.nn.Linear) and _quantized_path(mod_name):
            # "int4": the code predictor's weights in 4 bits (read 15 times a frame), the talker's in 8
            method = quantize
            if quantize == "int4" and not mod_name.startswith("code_predictor."):
                method = "int8"
            w = read(prefix + "weight").float()
            _check_shape(prefix + "weight", w, module.weight)
            lin = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            lin.weight = torch.nn.Parameter(w, requires_grad=False)
            if module.bias is not None:
                lin.bias = torch.nn.Parameter(read(prefix + "bias").float(), requires_grad=False)
            parent_name, _, attr = mod_name.rpartition(".")
            setattr(talker.get_submodule(parent_name) if parent_name else talker, attr,
                    quant.quantize_linear(lin, method))
            continue
        for name, ref in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if ref.device.type != "meta" or prefix + name == "model.text_embedding.weight":
                continue
            t = read(prefix + name)
            _check_shape(prefix + name, t, ref)
            t = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
            _set_tensor(module, name, t)


def _assign_quantized(talker, stored: dict, device) -> None:
    """Put the cached tensors (memory-mapped) into the meta-device talker: Int8Linear modules where the
    cache holds qweight/scales, plain tensors elsewhere."""
    from . import quant

    for mod_name, module in list(talker.named_modules()):
        prefix = mod_name + "." if mod_name else ""
        if isinstance(module, torch.nn.Linear) and prefix + "qweight" in stored:
            qweight = stored[prefix + "qweight"]
            kind = quant.Int4Linear if qweight.dtype == torch.uint8 else quant.Int8Linear
            new = kind(module.in_features, module.out_features, qweight, stored[prefix + "scales"],
                       stored.get(prefix + "bias"))
            parent_name, _, attr = mod_name.rpartition(".")
            setattr(talker.get_submodule(parent_name) if parent_name else talker, attr, new)
            continue
        for name, ref in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if ref.device.type != "meta" or prefix + name == "model.text_embedding.weight":
                continue
            t = stored.get(prefix + name)
            if t is None or tuple(t.shape) != tuple(ref.shape):
                raise CheckpointError(f"quantized weights cache: {prefix + name} missing or of the wrong shape")
            _set_tensor(module, name, t.to(device))


class QuantCache:
    """Quantized talker weights of one checkpoint, stored once and memory-mapped afterwards.

    One safetensors file per (checkpoint fingerprint, format, dtype, kernel version and order), written to a
    temporary name, fsynced and renamed (a crash leaves no half file under the real name). The
    metadata repeats the key and an XXH3-64 hash per tensor (checked on every load: ~0.1 s for the
    0.6B's 790 MB, where CRC32 took 0.4 s): a file that does not match (stale key, truncated, bytes
    changed) is deleted and rebuilt, never used. Writing a file removes the same checkpoint's files
    of the same format and dtype made for other kernel layouts (left by an upgrade, never read again)."""

    def __init__(self, folder: Path, checkpoint_fingerprint: str, dtype: torch.dtype, method: str = "int8"):
        from .quant import KERNEL_VERSION, layout

        self.folder = folder
        fmt = f"{method}-b32"          # "int8-b32"; "int4-b32": the code predictor in 4 bits
        order = layout()               # "tiles" where AMX runs, else "groups"
        self.key = {"format": fmt, "fingerprint": checkpoint_fingerprint, "dtype": str(dtype).replace("torch.", ""),
                    "kernel": KERNEL_VERSION, "layout": order, "hash": "xxh3_64"}
        self.family = f"talker-{checkpoint_fingerprint}-{fmt}-{self.key['dtype']}-"
        self.path = folder / f"{self.family}{KERNEL_VERSION}-{order}.safetensors"

    def load(self) -> Optional[dict]:
        """The cached tensors (memory-mapped), or None when there is no valid file (an invalid one is removed)."""
        import logging

        from safetensors import safe_open

        if not self.path.is_file():
            return None
        log = logging.getLogger(__name__)
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if any(meta.get(k) != v for k, v in self.key.items()):
                    raise ValueError("it was made for another checkpoint, format or kernel")
                hashes = json.loads(meta.get("xxh3_64", "{}"))
                out = {}
                for name in f.keys():
                    t = f.get_tensor(name)
                    if _hash(t) != hashes.get(name):
                        raise ValueError(f"checksum mismatch in {name}")
                    out[name] = t
                if set(hashes) != set(out):
                    raise ValueError("tensors are missing")
            return out
        except Exception as exc:             # corrupt, truncated, stale: rebuild
            log.warning("quantized weights cache %s is not usable (%s); rebuilding it", self.path.name, exc)
            self.path.unlink(missing_ok=True)
            return None

    def save(self, talker) -> None:
        import logging

        from safetensors.torch import save_file

        from ..fileio import atomic_path

        tensors = {k: v.contiguous() for k, v in talker.state_dict().items()
                   if k != "model.text_embedding.weight"}
        hashes = {k: _hash(v) for k, v in tensors.items()}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path) as tmp:
                save_file(tensors, str(tmp), metadata={**self.key, "xxh3_64": json.dumps(hashes)})
            for old in self.folder.glob(self.family + "*.safetensors"):
                if old != self.path:
                    old.unlink(missing_ok=True)
        except OSError as exc:              # a read-only cache folder costs the next start time, nothing else
            logging.getLogger(__name__).warning("could not write the quantized weights cache (%s)", exc)


def _hash(t: torch.Tensor) -> str:
    import xxhash

    return xxhash.xxh3_64_hexdigest(t.contiguous().view(torch.uint8).numpy())
